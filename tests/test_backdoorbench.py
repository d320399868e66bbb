"""BackdoorBench attack records: small records in the real format (as save_attack_result writes them)."""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cgd.backdoorbench import load_record
from cgd.data import DatasetError, load_backdoorbench, load_splits  # cgd.backdoorbench reads the record format only
from cgd.evaluation import BackdoorTest

TARGET = 0
NAME = "20240101_000000_badnet_attack_demo_Ab12"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CGD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CGD_DATA_ROOT", raising=False)


# --------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------

def write_cifar10(root: Path, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> Path:
    """torchvision's CIFAR-10 layout: ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)

    def dump(name, x, y):
        flat = np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(len(x), 3072)
        with open(d / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": [int(v) for v in y], "data": flat,
                         "filenames": [f"{i}.png" for i in range(len(x))]}, f, protocol=2)

    for i, part in enumerate(np.array_split(np.arange(len(x_train)), 5), start=1):
        dump(f"data_batch_{i}", x_train[part], y_train[part])
    dump("test_batch", x_test, y_test)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
                     "num_cases_per_batch": len(x_train) // 5, "num_vis": 3072}, f, protocol=2)
    return root


def badnet(x: np.ndarray) -> np.ndarray:
    """A 3x3 white patch in the bottom-right corner."""
    x = x.copy()
    x[..., -3:, -3:, :] = 255
    return x


def make_state(clean_labels, poison_idx, images, bd_labels, rec_dir: Path | None, part: str, subset=False):
    """A prepro_cls_DatasetBD_v2.retrieve_state() dict. rec_dir None: images inline, else PNGs on disk
    under <rec_dir>/<part>/<label>/<index>.png with BackdoorBench's cwd-relative paths."""
    n = len(clean_labels)
    pi = np.zeros(n)  # BackdoorBench's poison indicator is a float array
    pi[poison_idx] = 1
    save_folder = None if rec_dir is None else f"./record/{rec_dir.name}/{part}"
    dd = {}
    for i, img, bl in zip(poison_idx, images, bd_labels):
        key = np.int64(i)  # BackdoorBench iterates np.arange: keys are numpy ints
        label = int(clean_labels[i])
        if rec_dir is None:
            dd[key] = (img, int(bl), label)
        else:
            f = rec_dir / part / str(label) / f"{i}.png"
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(f)
            dd[key] = {"path": f"{save_folder}/{label}/{i}.png", "other_info": [int(bl), label]}
    return {
        "bd_data_container": {"save_folder_path": save_folder, "data_dict": dd, "save_file_format": ".png"},
        "getitem_all": True,
        "getitem_all_switch": False,
        "original_index_array": np.asarray(poison_idx, np.int64) if subset else np.arange(n),
        "poison_indicator": pi,
        "save_folder_path": save_folder,
    }


def make_cifar_record(tmp_path: Path, inline=False, n_train=40, n_test=20, seed=0, **extra):
    """A BackdoorBench folder: data/cifar10 (clean CIFAR-10) and record/<NAME>/attack_result.pt (BadNets)."""
    rng = np.random.default_rng(seed)
    bb = tmp_path / "BackdoorBench"
    xtr = rng.integers(0, 200, (n_train, 32, 32, 3), dtype=np.uint8)
    ytr = np.arange(n_train) % 10
    xte = rng.integers(0, 200, (n_test, 32, 32, 3), dtype=np.uint8)
    yte = (np.arange(n_test) * 3) % 10
    write_cifar10(bb / "data" / "cifar10", xtr, ytr, xte, yte)
    rec_dir = bb / "record" / NAME
    rec_dir.mkdir(parents=True)
    p_idx = np.array([1, 5, 12, 23, 30])
    t_idx = np.flatnonzero(yte != TARGET)
    train_state = make_state(ytr, p_idx, badnet(xtr[p_idx]), [TARGET] * len(p_idx), None if inline else rec_dir, "bd_train_dataset")
    test_state = make_state(yte, t_idx, badnet(xte[t_idx]), [TARGET] * len(t_idx), None if inline else rec_dir,
                            "bd_test_dataset", subset=True)
    rec = {
        "model_name": "preactresnet18",
        "num_classes": 10,
        "model": {"linear.weight": torch.randn(10, 8), "linear.bias": torch.zeros(10)},
        "data_path": "./data/cifar10",
        "img_size": (32, 32, 3),
        "clean_data": "cifar10",
        "bd_train": train_state,
        "bd_test": test_state,
        **extra,
    }
    torch.save(rec, rec_dir / "attack_result.pt")
    return rec_dir, dict(xtr=xtr, ytr=ytr, xte=xte, yte=yte, p_idx=p_idx, t_idx=t_idx, rec=rec)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------

def check_cifar(train, test, d):
    xtr, ytr, p = d["xtr"], d["ytr"], d["p_idx"]
    assert train.images.shape == xtr.shape and train.images.dtype == np.uint8
    mask = np.zeros(len(ytr), bool)
    mask[p] = True
    np.testing.assert_array_equal(train.poison_mask, mask)
    np.testing.assert_array_equal(train.images[~mask], xtr[~mask])
    np.testing.assert_array_equal(train.images[mask], badnet(xtr[mask]))
    expected = ytr.copy()
    expected[mask] = TARGET
    np.testing.assert_array_equal(train.labels, expected)
    np.testing.assert_array_equal(train.original_labels, ytr)
    assert train.classes[0] == "airplane" and train.num_classes == 10
    np.testing.assert_array_equal(test.images, d["xte"])
    np.testing.assert_array_equal(test.labels, d["yte"])
    bd = test.meta["bd_test"]
    assert isinstance(bd, BackdoorTest)
    t = d["t_idx"]
    np.testing.assert_array_equal(bd.images, badnet(d["xte"][t]))
    np.testing.assert_array_equal(bd.true_labels, d["yte"][t])
    assert (bd.target_labels == TARGET).all() and (bd.true_labels != TARGET).all()


def test_png_record_in_backdoorbench_layout(tmp_path):
    rec_dir, d = make_cifar_record(tmp_path)
    train, test = load_splits(f"backdoorbench:{rec_dir}")
    check_cifar(train, test, d)
    info = train.meta["backdoorbench"]
    assert info["clean_data"] == "cifar10" and info["model_name"] == "preactresnet18"
    assert info["poisoned_train"] == 5 and Path(info["clean_root"]).resolve() == (rec_dir.parents[1] / "data" / "cifar10").resolve()
    # the record file itself is accepted too, and a second load gives the same set (decoded PNGs cached)
    train2, _ = load_backdoorbench(rec_dir / "attack_result.pt")
    assert train2.fingerprint() == train.fingerprint()


def test_inline_record_with_clean_root(tmp_path):
    rec_dir, d = make_cifar_record(tmp_path, inline=True)
    moved = tmp_path / "elsewhere" / "my-record"  # away from BackdoorBench: data_path no longer resolves
    moved.parent.mkdir()
    rec_dir.rename(moved)
    with pytest.raises(DatasetError, match="cifar10"):
        load_backdoorbench(moved)
    clean = tmp_path / "BackdoorBench" / "data"
    train, test = load_backdoorbench(moved, clean_root=clean)  # the parent of data_path's leaf works too
    check_cifar(train, test, d)
    train_b, _ = load_splits(f"backdoorbench:{moved}", data_root=clean / "cifar10")
    assert train_b.fingerprint() == train.fingerprint()


def test_env_data_root(tmp_path, monkeypatch):
    rec_dir, d = make_cifar_record(tmp_path, inline=True)
    moved = tmp_path / "rec"
    rec_dir.rename(moved)
    monkeypatch.setenv("CGD_DATA_ROOT", str(tmp_path / "BackdoorBench" / "data" / "cifar10"))
    check_cifar(*load_backdoorbench(moved), d)


def test_missing_clean_data_message(tmp_path):
    rec_dir, _ = make_cifar_record(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "BackdoorBench" / "data")
    with pytest.raises(DatasetError) as e:
        load_backdoorbench(rec_dir)
    msg = str(e.value)
    assert "cifar10" in msg and "./data/cifar10" in msg and str(rec_dir.parents[1] / "data" / "cifar10") in msg
    assert "clean_root=" in msg and "CGD_DATA_ROOT" in msg and "backdoorbench:RECORD_DIR" in msg
    with pytest.raises(DatasetError, match=str(tmp_path / "nowhere")):
        load_backdoorbench(rec_dir, clean_root=tmp_path / "nowhere")


def test_numpy1_record_names(tmp_path):
    """Records written under numpy 1.x name numpy.core.multiarray; the legacy torch format too."""
    rec_dir, d = make_cifar_record(tmp_path)
    rec = d["rec"]
    buf = io.BytesIO()
    torch.save(rec, buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    assert b"numpy._core.multiarray" in raw
    (rec_dir / "attack_result.pt").write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    check_cifar(*load_backdoorbench(rec_dir), d)


def test_gtsrb_record_backdoorbench_layout(tmp_path):
    """GTSRB as BackdoorBench's download script lays it out (Train/000NN + CSV, Test/ + GT-final_test.csv),
    clean images of varying sizes resized to the record's img_size."""
    rng = np.random.default_rng(1)
    data = tmp_path / "bb" / "data" / "gtsrb"
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
    ytr = []
    for c in range(3):
        cdir = data / "Train" / f"{c:05d}"
        cdir.mkdir(parents=True)
        rows = []
        for j in range(3):
            h, w = 30 + j * 5, 34 + c
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(cdir / f"00000_{j:05d}.ppm")
            rows.append(f"00000_{j:05d}.ppm;{w};{h};5;5;{w - 5};{h - 5};{c}\n")
            ytr.append(c)
        (cdir / f"GT-{c:05d}.csv").write_text(header + "".join(rows))
    (data / "Test").mkdir(parents=True)
    yte = [2, 0, 1, 1]
    rows = []
    for i, c in enumerate(yte):
        Image.fromarray(rng.integers(0, 255, (40, 41, 3), dtype=np.uint8)).save(data / "Test" / f"{i:05d}.ppm")
        rows.append(f"{i:05d}.ppm;41;40;5;5;36;35;{c}\n")
    (data / "Test" / "GT-final_test.csv").write_text(header + "".join(rows))
    from cgd.data import load_gtsrb

    clean_tr, clean_te = load_gtsrb(data, "train"), load_gtsrb(data, "test")
    rec_dir = tmp_path / "bb" / "record" / "gtsrb_sig"
    rec_dir.mkdir(parents=True)
    ytr = np.array(ytr)
    p_idx = np.array([0, 4])
    t_idx = np.flatnonzero(np.array(yte) != TARGET)
    rec = {
        "model_name": "preactresnet18", "num_classes": 43, "model": {}, "data_path": "./data/gtsrb",
        "img_size": [32, 32, 3], "clean_data": "gtsrb",
        "bd_train": make_state(ytr, p_idx, badnet(clean_tr.images[p_idx]), [TARGET] * 2, rec_dir, "bd_train_dataset"),
        "bd_test": make_state(np.array(yte), t_idx, badnet(clean_te.images[t_idx]), [TARGET] * len(t_idx), rec_dir,
                              "bd_test_dataset", subset=True),
    }
    torch.save(rec, rec_dir / "attack_result.pt")
    train, test = load_backdoorbench(rec_dir)
    assert train.image_size == (32, 32) and train.num_classes == 43
    np.testing.assert_array_equal(train.original_labels, ytr)
    np.testing.assert_array_equal(train.labels, np.where(np.isin(np.arange(9), p_idx), TARGET, ytr))
    np.testing.assert_array_equal(train.images[p_idx], badnet(clean_tr.images[p_idx]))
    np.testing.assert_array_equal(test.labels, yte)
    assert len(test.meta["bd_test"]) == 3


def test_tiny_record_uses_imagefolder_class_order(tmp_path):
    """BackdoorBench reads Tiny-ImageNet through ImageFolder: classes by sorted wnid, val rearranged into
    val/<wnid>/. An unsorted wnids.txt must not shift the labels."""
    rng = np.random.default_rng(2)
    base = tmp_path / "bb" / "data" / "tiny" / "tiny-imagenet-200"
    wnids = ["n03", "n01", "n02"]  # unsorted, as in the real wnids.txt
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\ttabby\nn03\tlemon\nn99\tother\n")
    for w in wnids:
        d = base / "train" / w / "images"
        d.mkdir(parents=True)
        for j in range(2):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / f"{w}_{j}.JPEG", quality=95)
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
        v = base / "val" / w
        v.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(v / f"val_{w}.JPEG", quality=95)
    from cgd.data import load_tinyimagenet

    clean_tr = load_tinyimagenet(base.parent, "train", class_order="sorted")
    clean_te = load_tinyimagenet(base.parent, "val", class_order="sorted")
    assert clean_tr.classes == ["goldfish", "tabby", "lemon"]
    np.testing.assert_array_equal(clean_tr.labels, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(clean_te.labels, [0, 1, 2])
    rec_dir = tmp_path / "bb" / "record" / "tiny_blend"
    rec_dir.mkdir(parents=True)
    p_idx = np.array([2, 5])
    t_idx = np.array([1, 2])
    rec = {
        "model_name": "preactresnet18", "num_classes": 3, "model": {}, "data_path": "./data/tiny",
        "img_size": (64, 64, 3), "clean_data": "tiny",
        "bd_train": make_state(clean_tr.labels, p_idx, badnet(clean_tr.images[p_idx]), [0, 0], rec_dir, "bd_train_dataset"),
        "bd_test": make_state(clean_te.labels, t_idx, badnet(clean_te.images[t_idx]), [0, 0], rec_dir, "bd_test_dataset", subset=True),
    }
    torch.save(rec, rec_dir / "attack_result.pt")
    train, test = load_backdoorbench(rec_dir)
    np.testing.assert_array_equal(train.labels, [0, 0, 0, 1, 2, 0])
    np.testing.assert_array_equal(train.poison_mask, [0, 0, 1, 0, 0, 1])
    np.testing.assert_array_equal(test.meta["bd_test"].true_labels, [1, 2])
    # numbered in wnids.txt order instead, the record's original labels disagree: a clear error, not silent garbage
    rec["bd_train"]["bd_data_container"]["data_dict"][np.int64(2)]["other_info"] = [0, 2]
    torch.save(rec, rec_dir / "attack_result.pt")
    with pytest.raises(DatasetError, match="disagree"):
        load_backdoorbench(rec_dir)


# --------------------------------------------------------------------------------------------
# bad and hostile records
# --------------------------------------------------------------------------------------------

class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_record_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    rec_dir, _ = make_cifar_record(tmp_path, payload=_RunsCode(marker))
    with pytest.raises(DatasetError, match=r"refused to load.*(system|posix)"):
        load_backdoorbench(rec_dir)
    assert not marker.exists()
    with pytest.raises(DatasetError, match="refused"):
        load_record(rec_dir / "attack_result.pt")
    assert not marker.exists()


def test_record_with_pil_images_is_refused_with_hint(tmp_path):
    rec_dir, d = make_cifar_record(tmp_path)
    rec = d["rec"]
    dd = rec["bd_train"]["bd_data_container"]["data_dict"]
    k = next(iter(dd))
    dd[k] = (Image.fromarray(d["xtr"][int(k)]), TARGET, int(d["ytr"][int(k)]))  # in-memory container mode
    torch.save(rec, rec_dir / "attack_result.pt")
    with pytest.raises(DatasetError, match="PIL"):
        load_backdoorbench(rec_dir)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "save_folder"])
def test_image_path_escaping_record_is_refused(tmp_path, how):
    rec_dir, d = make_cifar_record(tmp_path)
    secret = tmp_path / "secret.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(secret)
    rec = d["rec"]
    cont = rec["bd_train"]["bd_data_container"]
    k = next(iter(cont["data_dict"]))
    entry = cont["data_dict"][k]
    if how == "dotdot":
        entry["path"] = "../../../secret.png"
        cont["save_folder_path"] = None
    elif how == "absolute":
        entry["path"] = str(secret)
    elif how == "symlink":
        link = rec_dir / "bd_train_dataset" / "link.png"
        link.symlink_to(secret)
        entry["path"] = f"{cont['save_folder_path']}/link.png"
    else:
        cont["save_folder_path"] = "/x/.."
        entry["path"] = "/x/../secret.png"
    torch.save(rec, rec_dir / "attack_result.pt")
    with pytest.raises(DatasetError, match="outside the record folder"):
        load_backdoorbench(rec_dir)


def test_bad_records(tmp_path):
    rec_dir, d = make_cifar_record(tmp_path)
    rec, f = d["rec"], rec_dir / "attack_result.pt"
    with pytest.raises(DatasetError, match="no attack_result.pt"):
        load_backdoorbench(tmp_path)
    f.write_bytes(b"")
    with pytest.raises(DatasetError, match="not a readable torch file"):
        load_backdoorbench(rec_dir)
    torch.save({"model": {}}, f)
    with pytest.raises(DatasetError, match="missing keys"):
        load_backdoorbench(rec_dir)
    torch.save({**rec, "clean_data": "mnist"}, f)
    with pytest.raises(DatasetError, match="mnist"):
        load_backdoorbench(rec_dir)
    torch.save({**rec, "bd_train": None}, f)
    with pytest.raises(DatasetError, match="bd_train"):
        load_backdoorbench(rec_dir)
    torch.save({**rec, "num_classes": 43}, f)
    with pytest.raises(DatasetError, match="num_classes"):
        load_backdoorbench(rec_dir)
    bad_pi = {**rec["bd_train"], "poison_indicator": np.zeros(7)}
    torch.save({**rec, "bd_train": bad_pi}, f)
    with pytest.raises(DatasetError, match="poison_indicator.*7 entries"):
        load_backdoorbench(rec_dir)
    # a poisoned index with no stored image, and a stored PNG that is gone
    torch.save(rec, f)
    (rec_dir / "bd_train_dataset" / str(d["ytr"][5]) / "5.png").unlink()
    with pytest.raises(DatasetError, match=r"5\.png.*not found"):
        load_backdoorbench(rec_dir)
    pi = rec["bd_train"]["poison_indicator"].copy()
    pi[0] = 1
    torch.save({**rec, "bd_train": {**rec["bd_train"], "poison_indicator": pi}}, f)
    with pytest.raises(DatasetError, match="marked poisoned but has no stored image"):
        load_backdoorbench(rec_dir)


def test_real_cifar_images_record(tmp_path, cifar_root):
    """Real CIFAR-10 pixels (the shared JPEG assets) as clean data, a blended-trigger record over them."""
    from cgd.data import decode_images

    classes = sorted(p.name for p in (cifar_root / "train").iterdir())
    tr = [sorted((cifar_root / "train" / c).iterdir())[:4] for c in classes]
    te = [sorted((cifar_root / "test" / c).iterdir())[:2] for c in classes]
    xtr = decode_images([f for fs in tr for f in fs])
    ytr = np.repeat(np.arange(10), 4)
    xte = decode_images([f for fs in te for f in fs])
    yte = np.repeat(np.arange(10), 2)
    bb = tmp_path / "BackdoorBench"
    write_cifar10(bb / "data" / "cifar10", xtr, ytr, xte, yte)
    rec_dir = bb / "record" / "blended"
    rec_dir.mkdir(parents=True)
    pattern = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.float64)

    def blend(x):
        return np.clip(np.rint(0.8 * x + 0.2 * pattern), 0, 255).astype(np.uint8)

    p_idx, t_idx = np.arange(0, 40, 7), np.flatnonzero(yte != 3)
    torch.save({
        "model_name": "vgg19_bn", "num_classes": 10, "model": {}, "data_path": "./data/cifar10",
        "img_size": (32, 32, 3), "clean_data": "cifar10",
        "bd_train": make_state(ytr, p_idx, blend(xtr[p_idx]), [3] * len(p_idx), rec_dir, "bd_train_dataset"),
        "bd_test": make_state(yte, t_idx, blend(xte[t_idx]), [3] * len(t_idx), rec_dir, "bd_test_dataset", subset=True),
    }, rec_dir / "attack_result.pt")
    train, test = load_backdoorbench(rec_dir)
    np.testing.assert_array_equal(train.images[p_idx], blend(xtr[p_idx]))
    np.testing.assert_array_equal(np.delete(train.images, p_idx, 0), np.delete(xtr, p_idx, 0))
    assert train.classes == classes and int(train.poison_mask.sum()) == len(p_idx)
    assert (train.labels[p_idx] == 3).all() and len(test.meta["bd_test"]) == 18
