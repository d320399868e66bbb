"""Every dataset loader on small files in the real formats, written to tmp_path; bad input; ImageSet."""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cgd.data as data
from cgd.data import (
    DatasetError,
    ImageSet,
    load_cifar,
    load_dataset,
    load_gtsrb,
    load_imagefolder,
    load_npz,
    load_splits,
    load_tinyimagenet,
    save_npz,
    seeded_subset,
)
from cgd.evaluation import BackdoorTest

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CGD_CACHE", str(tmp_path / "cache"))


def rand_images(n, h=32, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def save_img(path: Path, arr: np.ndarray, mode: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if mode:
        im = im.convert(mode)
    im.save(path, **kw)
    return path


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 python batches (torchvision layout)
# --------------------------------------------------------------------------------------------

def _flat(x):
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(len(x), 3072)


def write_cifar10(root: Path, x, y, xt, yt, bytes_keys=False) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)

    def dump(name, obj):
        if bytes_keys:  # as the original Python 2 pickles read under encoding='bytes'
            obj = {k.encode(): v for k, v in obj.items()}
        with open(d / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    for i, part in enumerate(np.array_split(np.arange(len(x)), 5), start=1):
        dump(f"data_batch_{i}", {"batch_label": f"training batch {i} of 5", "labels": [int(v) for v in y[part]],
                                 "data": _flat(x[part]), "filenames": [f"f{j}.png" for j in part]})
    dump("test_batch", {"batch_label": "testing batch 1 of 1", "labels": [int(v) for v in yt], "data": _flat(xt),
                        "filenames": [f"t{j}.png" for j in range(len(xt))]})
    dump("batches.meta", {"label_names": CIFAR10_NAMES, "num_cases_per_batch": len(x) // 5, "num_vis": 3072})
    return root


@pytest.fixture()
def cifar10_files(tmp_path):
    x, xt = rand_images(25, seed=1), rand_images(7, seed=2)
    y, yt = np.arange(25) % 10, np.array([3, 1, 4, 1, 5, 9, 2])
    return write_cifar10(tmp_path / "c10", x, y, xt, yt), (x, y, xt, yt)


def test_cifar10(cifar10_files):
    root, (x, y, xt, yt) = cifar10_files
    train, test = load_splits(f"cifar10:{root}")
    np.testing.assert_array_equal(train.images, x)  # CHW rows -> HWC, batch order kept
    np.testing.assert_array_equal(train.labels, y)
    np.testing.assert_array_equal(test.images, xt)
    np.testing.assert_array_equal(test.labels, yt)
    assert train.classes == CIFAR10_NAMES
    # the batches folder itself is accepted as the root
    assert load_cifar(root / "cifar-10-batches-py", "test").fingerprint() == test.fingerprint()


def test_cifar10_python2_style_pickles(tmp_path):
    """Bytes keys, and numpy arrays pickled under numpy 1.x's module name (as the official files are)."""
    x, y = rand_images(10, seed=3), np.arange(10)
    root = write_cifar10(tmp_path / "c", x, y, x[:3], y[:3], bytes_keys=True)
    for f in (root / "cifar-10-batches-py").iterdir():
        f.write_bytes(f.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    s = load_cifar(root, "train")
    np.testing.assert_array_equal(s.images, x)
    assert s.classes == CIFAR10_NAMES


def test_cifar100(tmp_path):
    d = tmp_path / "c100" / "cifar-100-python"
    d.mkdir(parents=True)
    x, xt = rand_images(12, seed=4), rand_images(4, seed=5)
    y, yt = np.arange(12) * 8 % 100, np.array([99, 0, 50, 7])
    names = [f"class{i:02d}" for i in range(100)]
    for name, xs, ys in (("train", x, y), ("test", xt, yt)):
        with open(d / name, "wb") as f:
            pickle.dump({"filenames": ["a"] * len(xs), "batch_label": name, "fine_labels": [int(v) for v in ys],
                         "coarse_labels": [int(v) // 5 for v in ys], "data": _flat(xs)}, f, protocol=2)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": [f"super{i}" for i in range(20)]}, f, protocol=2)
    train, test = load_splits(f"cifar100:{tmp_path / 'c100'}")
    np.testing.assert_array_equal(train.images, x)
    np.testing.assert_array_equal(train.labels, y)  # fine labels, not coarse
    np.testing.assert_array_equal(test.labels, yt)
    assert train.classes == names and train.num_classes == 100


def _rewrite_batch(root: Path, name: str, **changes) -> Path:
    f = root / "cifar-10-batches-py" / name
    with open(f, "rb") as fh:
        d = pickle.load(fh)
    d.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del d[k]
    with open(f, "wb") as fh:
        pickle.dump(d, fh, protocol=2)
    return f


def test_cifar_malicious_pickle_refused(cifar10_files, tmp_path):
    root, _ = cifar10_files
    marker = tmp_path / "pwned"
    f = root / "cifar-10-batches-py" / "data_batch_3"
    with open(f, "wb") as fh:
        pickle.dump({"data": RunsCode(marker), "labels": [0]}, fh, protocol=2)
    with pytest.raises(DatasetError, match=r"data_batch_3.*refused to unpickle posix\.system"):
        load_cifar(root, "train")
    assert not marker.exists()


@pytest.mark.parametrize("change, match", [
    (dict(labels=[10] + [0] * 4), r"data_batch_2\[labels\]: label 10 out of range \[0, 10\)"),
    (dict(labels=[0, 1]), r"data_batch_2: 5 images in 'data' but 2 'labels'"),
    (dict(data=np.zeros((5, 1000), np.uint8)), r"data_batch_2\[data\]: expected shape \(N, 3072\)"),
    (dict(data=np.zeros((5, 3072), np.float32)), r"data_batch_2\[data\]: expected uint8"),
    (dict(labels=["cat"] * 5), r"data_batch_2\[labels\]: expected a list of integer labels"),
    (dict(labels=None), r"data_batch_2: missing field 'labels'"),
])
def test_cifar_bad_fields(cifar10_files, change, match):
    root, _ = cifar10_files
    _rewrite_batch(root, "data_batch_2", **change)
    with pytest.raises(DatasetError, match=match):
        load_cifar(root, "train")


def test_cifar_bad_files(cifar10_files):
    root, _ = cifar10_files
    d = root / "cifar-10-batches-py"
    (d / "data_batch_4").write_bytes(b"")
    with pytest.raises(DatasetError, match="data_batch_4: not a CIFAR python batch"):
        load_cifar(root, "train")
    # random bytes: refused with an error naming the file, whatever the bytes happen to look like (some
    # start with a valid pickle opcode and are refused by the reader's size check instead)
    for seed in range(20):
        (d / "data_batch_4").write_bytes(np.random.default_rng(seed).bytes(300))
        with pytest.raises(DatasetError, match="data_batch_4: "):
            load_cifar(root, "train")
    (d / "data_batch_4").unlink()
    with pytest.raises(DatasetError, match="data_batch_4: CIFAR batch file missing"):
        load_cifar(root, "train")
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["a", "b"]}, f)
    with pytest.raises(DatasetError, match=r"batches.meta\[label_names\]: expected a list of 10"):
        load_cifar(root, "test")


def test_cifar_from_real_images(tmp_path, cifar_root):
    """Real CIFAR-10 pixels (shared JPEG assets, official order) through the python-batch format."""
    classes = sorted(p.name for p in (cifar_root / "train").iterdir())
    assert classes == sorted(CIFAR10_NAMES)
    files = [sorted((cifar_root / "train" / c).iterdir())[:3] for c in classes]
    x = data.decode_images([f for fs in files for f in fs])
    y = np.repeat([CIFAR10_NAMES.index(c) for c in classes], 3)
    root = write_cifar10(tmp_path / "real", x, y, x[:5], y[:5])
    s = load_cifar(root, "train")
    np.testing.assert_array_equal(s.images, x)
    assert [s.classes[v] for v in s.labels[::3]] == classes
    assert 20 < float(x.std()) < 120  # real photographs, not blank


# --------------------------------------------------------------------------------------------
# GTSRB
# --------------------------------------------------------------------------------------------

GT_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"


def _gt_row(fn, w, h, c):
    return f"{fn};{w};{h};5;5;{w - 5};{h - 5};{c}\n"


def write_gtsrb(train_dir: Path, test_dir: Path, gt_file: Path, seed=0, classes=(0, 1, 42)):
    """Class folders 000NN with .ppm images (varied sizes) and GT-000NN.csv; flat test images + GT csv."""
    rng = np.random.default_rng(seed)
    y, yt = [], []
    for c in classes:
        d = train_dir / f"{c:05d}"
        rows = []
        for j in range(2):
            h, w = (32, 32) if j == 0 else (40 + c % 7, 35)
            save_img(d / f"00000_{j:05d}.ppm", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            rows.append(_gt_row(f"00000_{j:05d}.ppm", w, h, c))
            y.append(c)
        (d / f"GT-{c:05d}.csv").write_text(GT_HEADER + "".join(rows))
    rows = []
    for i, c in enumerate([42, 0, 1, 0]):
        save_img(test_dir / f"{i:05d}.ppm", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        rows.append(_gt_row(f"{i:05d}.ppm", 32, 32, c))
        yt.append(c)
    (test_dir / "GT-final_test.test.csv").write_text(GT_HEADER.replace(";ClassId", ""))  # the unlabelled one
    gt_file.parent.mkdir(parents=True, exist_ok=True)
    gt_file.write_text(GT_HEADER + "".join(rows))
    return np.array(y), np.array(yt)


def _check_gtsrb(root, y, yt, first_train: Path, first_test: Path):
    train, test = load_splits(f"gtsrb:{root}")
    assert train.images.shape == (len(y), 32, 32, 3) and train.num_classes == 43
    np.testing.assert_array_equal(train.labels, y)
    np.testing.assert_array_equal(test.labels, yt)
    np.testing.assert_array_equal(train.images[0], np.asarray(Image.open(first_train)))  # 32x32 kept exactly
    np.testing.assert_array_equal(test.images[0], np.asarray(Image.open(first_test)))
    assert load_gtsrb(root, "train", size=(16, 20)).image_size == (16, 20)


def test_gtsrb_official_layout(tmp_path):
    b = tmp_path / "GTSRB"
    y, yt = write_gtsrb(b / "Final_Training" / "Images", b / "Final_Test" / "Images", b / "Final_Test" / "GT-final_test.csv")
    _check_gtsrb(tmp_path, y, yt, b / "Final_Training/Images/00000/00000_00000.ppm", b / "Final_Test/Images/00000.ppm")


def test_gtsrb_official_layout_gt_beside_images(tmp_path):
    b = tmp_path / "GTSRB"
    y, yt = write_gtsrb(b / "Final_Training" / "Images", b / "Final_Test" / "Images", b / "Final_Test" / "Images" / "GT-final_test.csv")
    np.testing.assert_array_equal(load_gtsrb(tmp_path, "test").labels, yt)


def test_gtsrb_torchvision_layout(tmp_path):
    """torchvision 0.29: ROOT/gtsrb/GTSRB/Training/000NN/, ROOT/gtsrb/GTSRB/Final_Test/Images/, ROOT/gtsrb/GT-final_test.csv."""
    b = tmp_path / "gtsrb" / "GTSRB"
    y, yt = write_gtsrb(b / "Training", b / "Final_Test" / "Images", tmp_path / "gtsrb" / "GT-final_test.csv")
    _check_gtsrb(tmp_path, y, yt, b / "Training/00000/00000_00000.ppm", b / "Final_Test/Images/00000.ppm")
    assert load_gtsrb(tmp_path / "gtsrb", "test").fingerprint() == load_gtsrb(tmp_path, "test").fingerprint()


def test_gtsrb_backdoorbench_layout(tmp_path):
    y, yt = write_gtsrb(tmp_path / "Train", tmp_path / "Test", tmp_path / "Test" / "GT-final_test.csv")
    _check_gtsrb(tmp_path, y, yt, tmp_path / "Train/00000/00000_00000.ppm", tmp_path / "Test/00000.ppm")


def test_gtsrb_bad_input(tmp_path):
    b = tmp_path / "GTSRB"
    gt = b / "Final_Test" / "GT-final_test.csv"
    write_gtsrb(b / "Final_Training" / "Images", b / "Final_Test" / "Images", gt)
    good = gt.read_text()
    gt.write_text(good.replace(";ClassId", ";Label"))
    with pytest.raises(DatasetError, match="GT-final_test.csv: expected ';'-separated columns Filename and ClassId"):
        load_gtsrb(tmp_path, "test")
    gt.write_text(good.replace("00001.ppm;32;32;5;5;27;27;0", "00001.ppm;32;32;5;5;27;27;43"))
    with pytest.raises(DatasetError, match=r"GT-final_test.csv, line 3: ClassId 43 out of range"):
        load_gtsrb(tmp_path, "test")
    gt.write_text(good.replace("00001.ppm;32;32;5;5;27;27;0", "00001.ppm;32;32;5;5;27;27;x"))
    with pytest.raises(DatasetError, match=r"line 3: expected a file name and an integer ClassId"):
        load_gtsrb(tmp_path, "test")
    gt.write_text(good)
    (b / "Final_Test" / "Images" / "00002.ppm").unlink()
    with pytest.raises(DatasetError, match=r"00002\.ppm"):
        load_gtsrb(tmp_path, "test")
    gt.unlink()
    with pytest.raises(DatasetError, match="GT-final_test.csv not found"):
        load_gtsrb(tmp_path, "test")
    (b / "Final_Training" / "Images" / "stop-signs").mkdir()
    with pytest.raises(DatasetError, match="stop-signs: GTSRB class folders must be named"):
        load_gtsrb(tmp_path, "train")
    with pytest.raises(DatasetError, match="no GTSRB layout found"):
        load_gtsrb(tmp_path / "GTSRB" / "Final_Training" / "Images", "train")


def test_gtsrb_real_files(tmp_path, gtsrb_root):
    """A few real GTSRB images with their real CSV rows, copied into the official layout."""
    src = gtsrb_root / "GTSRB"
    b = tmp_path / "GTSRB"
    for c in ("00000", "00014"):
        lines = (src / "Final_Training" / "Images" / c / f"GT-{c}.csv").read_text().splitlines()
        d = b / "Final_Training" / "Images" / c
        d.mkdir(parents=True)
        (d / f"GT-{c}.csv").write_text("\n".join(lines[:4]) + "\n")
        for ln in lines[1:4]:
            shutil.copy(src / "Final_Training" / "Images" / c / ln.split(";")[0], d)
    lines = (src / "Final_Test" / "GT-final_test.csv").read_text().splitlines()
    (b / "Final_Test" / "Images").mkdir(parents=True)
    (b / "Final_Test" / "GT-final_test.csv").write_text("\n".join(lines[:6]) + "\n")
    for ln in lines[1:6]:
        shutil.copy(src / "Final_Test" / "Images" / ln.split(";")[0], b / "Final_Test" / "Images")
    train, test = load_splits(f"gtsrb:{tmp_path}")
    np.testing.assert_array_equal(train.labels, [0, 0, 0, 14, 14, 14])
    assert train.classes[14].lower().startswith("stop")
    np.testing.assert_array_equal(test.labels, [int(ln.split(";")[-1]) for ln in lines[1:6]])
    assert test.images.shape == (5, 32, 32, 3) and test.images.std() > 5


# --------------------------------------------------------------------------------------------
# Tiny-ImageNet
# --------------------------------------------------------------------------------------------

def write_tiny(root: Path, restructured_val=False, seed=0):
    """tiny-imagenet-200 layout with an unsorted wnids.txt."""
    rng = np.random.default_rng(seed)
    base = root / "tiny-imagenet-200"
    wnids = ["n09", "n02", "n05"]
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("n01\tunused\nn02\tEgyptian cat\nn05\tlemon, citrus\nn09\tgoldfish, Carassius auratus\n")
    for w in wnids:
        for j in range(2):
            save_img(base / "train" / w / "images" / f"{w}_{j}.JPEG", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        (base / "train" / w / f"{w}_boxes.txt").write_text(f"{w}_0.JPEG\t0\t0\t10\t10\n")
    ann = []
    for i, w in enumerate(["n05", "n09", "n02", "n05"]):
        fn = f"val_{i}.JPEG"
        if restructured_val:
            save_img(base / "val" / w / fn, rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        else:
            save_img(base / "val" / "images" / fn, rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        ann.append(f"{fn}\t{w}\t0\t0\t63\t63")
    if not restructured_val:
        (base / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    (base / "test" / "images").mkdir(parents=True)
    return base


def test_tinyimagenet(tmp_path):
    base = write_tiny(tmp_path)
    train, test = load_splits(f"tinyimagenet:{tmp_path}")
    assert train.classes == ["goldfish", "Egyptian cat", "lemon"]  # wnids.txt order, first words.txt name
    np.testing.assert_array_equal(train.labels, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(test.labels, [2, 0, 1, 2])  # annotation order
    assert train.images.shape == (6, 64, 64, 3)
    np.testing.assert_array_equal(test.images[1], np.asarray(Image.open(base / "val/images/val_1.JPEG")))
    srt = load_tinyimagenet(base, "val", class_order="sorted")  # base folder itself as root
    assert srt.classes == ["Egyptian cat", "lemon", "goldfish"]
    np.testing.assert_array_equal(srt.labels, [0, 1, 1, 2])
    np.testing.assert_array_equal(load_tinyimagenet(base, "train", class_order="sorted").labels, [0, 0, 1, 1, 2, 2])


def test_tinyimagenet_restructured_val(tmp_path):
    write_tiny(tmp_path, restructured_val=True)
    np.testing.assert_array_equal(load_tinyimagenet(tmp_path, "val").labels, [0, 1, 2, 2])  # n09, n02, n05 x2
    np.testing.assert_array_equal(load_tinyimagenet(tmp_path, "val", class_order="sorted").labels, [0, 1, 1, 2])


def test_tinyimagenet_bad_input(tmp_path):
    base = write_tiny(tmp_path)
    ann = base / "val" / "val_annotations.txt"
    good = ann.read_text()
    ann.write_text(good.replace("val_2.JPEG\tn02", "val_2.JPEG\tn77"))
    with pytest.raises(DatasetError, match=r"val_annotations.txt, line 3: unknown class id 'n77'"):
        load_tinyimagenet(tmp_path, "val")
    ann.write_text(good)
    (base / "val" / "images" / "val_3.JPEG").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"val_3\.JPEG: empty file"):
        load_tinyimagenet(tmp_path, "val")
    shutil.rmtree(base / "train" / "n05")
    with pytest.raises(DatasetError, match=r"n05/images: missing training folder for class n05"):
        load_tinyimagenet(tmp_path, "train")
    (base / "wnids.txt").unlink()
    with pytest.raises(DatasetError, match="wnids.txt missing"):
        load_tinyimagenet(tmp_path, "train")


# --------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------

def test_imagefolder_modes_sizes_and_skips(tmp_path):
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    save_img(root / "cat" / "a.png", rgb)
    save_img(root / "cat" / "b.jpg", rgb, quality=95)
    save_img(root / "cat" / "sub" / "c.bmp", rgb)  # nested folders count for their class
    grey = np.full((20, 24), 100, np.uint8)
    save_img(root / "cat" / "d.png", grey)  # L
    rgba = np.zeros((20, 24, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    save_img(root / "dog" / "e.png", rgba)  # RGBA, fully transparent
    sixteen = np.zeros((20, 24), np.uint16)
    sixteen[0, 0], sixteen[0, 1], sixteen[0, 2] = 65535, 257 * 100, 200
    save_img(root / "dog" / "f.png", sixteen)  # 16-bit greyscale
    save_img(root / "dog" / "f2.png", np.full((20, 24), 2570, np.uint16))  # dark 16-bit: stays dark
    save_img(root / "dog" / "g.gif", rgb, mode="P")
    save_img(root / "dog" / "h.png", rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))  # other size: resized
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / ".DS_Store").write_bytes(b"\0\1")
    (root / ".hidden").mkdir()
    assert Image.open(root / "dog" / "f.png").mode.startswith("I")
    s = load_imagefolder(root)
    assert s.classes == ["cat", "dog"] and s.images.shape == (9, 20, 24, 3)
    np.testing.assert_array_equal(s.labels, [0, 0, 0, 0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(s.images[0], rgb)  # a.png (sorted names)
    assert s.meta["skipped_files"] == 1 and s.meta["skipped_links"] == 0
    assert s.meta["resized_files"] == 1 and s.meta["resized_to"] == [20, 24]  # h.png (40x30), noted for the run
    by_name = {n: i for i, n in enumerate(["a.png", "b.jpg", "d.png", "sub/c.bmp", "e.png", "f.png", "f2.png", "g.gif", "h.png"])}
    np.testing.assert_array_equal(s.images[by_name["sub/c.bmp"]], rgb)
    assert (s.images[by_name["d.png"]] == 100).all()
    assert (s.images[by_name["e.png"]] == (10, 20, 30)).all()
    f16 = s.images[by_name["f.png"]]
    assert tuple(f16[0, :3, 0]) == (255, 100, 1) and f16[5, 5, 0] == 0  # 16-bit range mapped onto 8 bits
    assert (s.images[by_name["f2.png"]] == 10).all()  # not stretched to its own maximum
    assert abs(int(s.images[by_name["g.gif"]].astype(int).mean()) - int(rgb.mean())) < 20
    with pytest.raises(DatasetError, match=r"notes\.txt: not an image file"):
        load_imagefolder(root, on_bad="error")


def test_imagefolder_splits(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 3), ("test", 2)):
        for c in ("b", "a"):
            for j in range(n):
                size = (16, 16) if split == "train" else (24, 20)
                save_img(tmp_path / "ds" / split / c / f"{j}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    train, test = load_splits(f"imagefolder:{tmp_path / 'ds'}")
    assert train.classes == test.classes == ["a", "b"] and len(train) == 6 and len(test) == 4
    assert test.image_size == train.image_size == (16, 16)  # test resized to the train size
    assert load_dataset(f"imagefolder:{tmp_path / 'ds' / 'train'}", "train").fingerprint() == train.fingerprint()
    with pytest.raises(DatasetError, match="has no test split"):
        load_dataset(f"imagefolder:{tmp_path / 'ds' / 'train'}", "test")
    shutil.copytree(tmp_path / "ds" / "test" / "b", tmp_path / "ds" / "test" / "c")
    with pytest.raises(DatasetError, match="classes"):
        load_splits(f"imagefolder:{tmp_path / 'ds'}")


def _two_class_folder(root: Path) -> Path:
    rng = np.random.default_rng(2)
    for c in ("x", "y"):
        for j in range(2):
            save_img(root / c / f"{j}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return root


@pytest.mark.parametrize("bad, match", [
    ("zero", r"x/bad\.png: (empty file|cannot read image header)"),
    ("corrupt", r"x/bad\.png: (cannot decode image|cannot read image header)"),
    ("truncated", r"x/bad\.png: cannot decode image"),
    ("tiny", r"x/bad\.png: image of 1x1 pixels is too small"),
    ("oversize", r"x/bad\.png: image of 64x64 pixels exceeds the limit of 1000 pixels"),
])
def test_imagefolder_bad_images(tmp_path, monkeypatch, bad, match):
    root = _two_class_folder(tmp_path / "f")
    f = root / "x" / "bad.png"
    if bad == "zero":
        f.write_bytes(b"")
    elif bad == "corrupt":
        f.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    elif bad == "truncated":
        save_img(f, np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
        f.write_bytes(f.read_bytes()[:-30])
    elif bad == "tiny":
        save_img(f, np.zeros((1, 1, 3), np.uint8))
    else:
        monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 1000)
        save_img(f, np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(DatasetError, match=match):
        load_imagefolder(root, size=(8, 8), on_bad="error")
    if bad in ("zero", "corrupt"):  # also when the size is taken from the files' headers
        with pytest.raises(DatasetError, match=match):
            load_imagefolder(root, on_bad="error")
    with pytest.raises(DatasetError, match=match):  # the default refuses it by name too...
        load_imagefolder(root, size=(8, 8))
    # ...and --on-bad-files skip-unreadable leaves it out, counted
    s = load_imagefolder(root, size=(8, 8), on_bad="skip-unreadable")
    assert s.meta["skipped_files"] == 1 and "x/bad.png" not in s.meta["files"] and len(s) == len(s.meta["files"])


def test_imagefolder_bad_layouts(tmp_path):
    root = _two_class_folder(tmp_path / "f")
    (root / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: class folder 'empty' holds no images"):
        load_imagefolder(root)
    (root / "empty" / "readme.md").write_text("x")
    with pytest.raises(DatasetError, match="holds no images"):
        load_imagefolder(root)
    with pytest.raises(DatasetError, match="expected at least 2 class folders, found 1"):
        load_imagefolder(_one_class(tmp_path))
    with pytest.raises(DatasetError, match="no such folder"):
        load_imagefolder(tmp_path / "missing")
    with pytest.raises(ValueError, match="on_bad"):
        load_imagefolder(root, on_bad="ignore")


def _one_class(tmp_path):
    save_img(tmp_path / "one" / "only" / "a.png", np.zeros((4, 4, 3), np.uint8))
    return tmp_path / "one"


def test_imagefolder_cache(tmp_path, monkeypatch):
    root = _two_class_folder(tmp_path / "f")
    first = load_imagefolder(root)
    assert list((tmp_path / "cache").glob("imagefolder-*.npz"))

    def no_decoding(*a, **k):
        raise AssertionError("decoded again instead of reading the cache")

    with monkeypatch.context() as m:
        m.setattr(data, "decode_images", no_decoding)
        assert load_imagefolder(root).fingerprint() == first.fingerprint()
    # changing a file invalidates the cache entry
    f = root / "y" / "1.png"
    save_img(f, np.full((8, 8, 3), 7, np.uint8))
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    second = load_imagefolder(root)
    assert second.fingerprint() != first.fingerprint()
    assert (second.images[3] == 7).all()
    # a corrupt cache entry is rebuilt, not trusted
    for c in (tmp_path / "cache").glob("imagefolder-*.npz"):
        c.write_bytes(b"garbage")
    assert load_imagefolder(root).fingerprint() == second.fingerprint()


# --------------------------------------------------------------------------------------------
# .npz
# --------------------------------------------------------------------------------------------

def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_roundtrip_all_fields(tmp_path):
    x = rand_images(6, 8, 8)
    s = ImageSet(x, [0, 1, 2, 0, 1, 2], ["a", "b", "c"], poison_mask=[0, 1, 0, 0, 0, 1], original_labels=[0, 0, 2, 0, 1, 1])
    t = ImageSet(rand_images(3, 8, 8, seed=1), [2, 1, 0], ["a", "b", "c"])
    bd = rand_images(2, 8, 8, seed=2)
    f = save_npz(tmp_path / "d.npz", s, t, x_test_bd=bd, y_test_bd=np.array([1, 2]), target_test_bd=np.array([0, 0]),
                 attack="{}")
    train, test = load_splits(f"npz:{f}")
    assert train.fingerprint() == s.fingerprint() and train.classes == ["a", "b", "c"]
    np.testing.assert_array_equal(train.poison_mask, s.poison_mask)
    np.testing.assert_array_equal(train.original_labels, s.original_labels)
    assert test.fingerprint() == t.fingerprint()
    b = test.meta["bd_test"]
    assert isinstance(b, BackdoorTest)
    np.testing.assert_array_equal(b.images, bd)
    np.testing.assert_array_equal(b.target_labels, [0, 0])


def test_npz_layouts_and_dtypes(tmp_path):
    x = rand_images(4, 6, 5)
    y = np.array([0, 1, 1, 0], np.int32)
    ref, _ = load_npz(_npz(tmp_path / "ref.npz", x=x, y=y))
    assert ref.classes == ["0", "1"] and ref.labels.dtype == np.int64
    nchw, _ = load_npz(_npz(tmp_path / "nchw.npz", x=x.transpose(0, 3, 1, 2), y=y))
    assert nchw.fingerprint() == ref.fingerprint()
    f01, _ = load_npz(_npz(tmp_path / "f01.npz", x=x.astype(np.float32) / 255, y=y))
    assert np.abs(f01.images.astype(int) - x).max() <= 1
    f255, _ = load_npz(_npz(tmp_path / "f255.npz", x=x.astype(np.float64), y=y))
    np.testing.assert_array_equal(f255.images, x)
    grey, _ = load_npz(_npz(tmp_path / "g.npz", x=x[..., 0], y=y))
    assert grey.images.shape == (4, 6, 5, 3) and (grey.images[..., 2] == x[..., 0]).all()
    ints, _ = load_npz(_npz(tmp_path / "i.npz", x=x.astype(np.int64), y=y.astype(np.uint8)))
    assert ints.fingerprint() == ref.fingerprint()


def test_npz_object_arrays_refused(tmp_path):
    marker = tmp_path / "pwned"
    f = _npz(tmp_path / "evil.npz", x=rand_images(2, 4, 4), y=np.array([RunsCode(marker), 1], dtype=object))
    with pytest.raises(DatasetError, match=r"evil\.npz\[y\]: refused to load .*object arrays"):
        load_npz(f)
    assert not marker.exists()


@pytest.mark.parametrize("arrays, match", [
    (dict(x=rand_images(3, 4, 4)), r"missing array 'y'"),
    (dict(x=rand_images(3, 4, 4), y=np.array([0, 1])), r"\[y\]: expected shape \(3,\) to match x"),
    (dict(x=rand_images(3, 4, 4), y=np.array([0.0, 1.0, 1.0])), r"\[y\]: labels must be integers"),
    (dict(x=rand_images(3, 4, 4), y=np.array([0, 1, 5]), classes=np.array(["a", "b"])), r"\[y\]: label 5 out of range \[0, 2\)"),
    (dict(x=rand_images(3, 4, 4), y=np.array([0, 1, -1])), r"\[y\]: label -1 out of range"),
    (dict(x=rand_images(3, 4, 4), y=np.array([0, 1, 1]), poison_mask=np.array([1, 0])), r"\[poison_mask\]: expected shape \(3,\)"),
    (dict(x=rand_images(3, 4, 4), y=np.array([0, 1, 1]), original_labels=np.array([0, 1, 9])), r"\[original_labels\]: label 9 out of range"),
    (dict(x=np.zeros((3, 4), np.uint8), y=np.array([0, 1, 1])), r"\[x\]: expected images of shape \(N, H, W, 3\)"),
    (dict(x=np.zeros((3, 4, 4, 4), np.uint8), y=np.array([0, 1, 1])), r"\[x\]: expected 3 colour channels"),
    (dict(x=np.zeros((0, 4, 4, 3), np.uint8), y=np.zeros(0, np.int64)), r"\[x\]: holds no images"),
    (dict(x=np.full((2, 4, 4, 3), np.nan, np.float32), y=np.array([0, 1])), r"\[x\]: images contain NaN"),
    (dict(x=np.full((2, 4, 4, 3), -0.5, np.float32), y=np.array([0, 1])), r"\[x\]: float images must lie in \[0, 1\] or \[0, 255\]"),
    (dict(x=np.full((2, 4, 4, 3), 300, np.int32), y=np.array([0, 1])), r"\[x\]: integer images must lie in \[0, 255\]"),
    (dict(x=np.zeros((2, 4, 4, 3), bool), y=np.array([0, 1])), r"\[x\]: images must be uint8"),
    (dict(x=rand_images(2, 4, 4), y=np.array([0, 1]), x_test=rand_images(2, 4, 4)), r"has x_test but no y_test"),
    (dict(x=rand_images(2, 4, 4), y=np.array([0, 1]), x_test=rand_images(2, 4, 4), y_test=np.array([1])), r"\[y_test\]: expected shape \(2,\)"),
    (dict(x=rand_images(2, 4, 4), y=np.array([0, 1]), x_test=rand_images(2, 4, 4), y_test=np.array([1, 0]),
          x_test_bd=rand_images(1, 4, 4), y_test_bd=np.array([1])), r"has x_test_bd but no target_test_bd"),
    (dict(x=rand_images(2, 4, 4), y=np.array([0, 1]), x_test_bd=rand_images(1, 4, 4), y_test_bd=np.array([1]),
          target_test_bd=np.array([0])), r"has x_test_bd but no clean test split"),
    (dict(x=rand_images(2, 4, 4), y=np.array([0, 1]), x_test=rand_images(2, 4, 4), y_test=np.array([1, 0]),
          x_test_bd=rand_images(2, 4, 4), y_test_bd=np.array([1, 1]), target_test_bd=np.array([0])), r"\[target_test_bd\]: expected shape \(2,\)"),
])
def test_npz_bad_fields(tmp_path, arrays, match):
    f = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError, match=r"bad\.npz.*" + match):
        load_npz(f)


def test_npz_bad_files(tmp_path):
    with pytest.raises(DatasetError, match=r"nope\.npz: no such \.npz file"):
        load_npz(tmp_path / "nope.npz")
    (tmp_path / "zero.npz").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"zero\.npz: not a readable \.npz file"):
        load_npz(tmp_path / "zero.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04" + os.urandom(100))
    with pytest.raises(DatasetError, match=r"junk\.npz"):
        load_npz(tmp_path / "junk.npz")
    np.save(tmp_path / "single.npy", rand_images(2, 4, 4))
    with pytest.raises(DatasetError, match=r"single\.npy: a single \.npy array"):
        load_npz(tmp_path / "single.npy")


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------

def test_spec_errors(tmp_path):
    with pytest.raises(DatasetError, match="expected KIND:PATH"):
        load_splits("just-a-path")
    with pytest.raises(DatasetError, match="unknown kind 'mnist'"):
        load_splits("mnist:/data")
    with pytest.raises(DatasetError, match="empty path"):
        load_splits("npz:")
    with pytest.raises(DatasetError, match="no GTSRB layout"):
        load_splits(f"gtsrb:{tmp_path}")
    with pytest.raises(DatasetError, match=r"data_batch_1: CIFAR batch file missing"):
        load_splits(f"cifar10:{tmp_path}")
    with pytest.raises(DatasetError, match="no attack_result.pt"):
        load_splits(f"backdoorbench:{tmp_path}")


# --------------------------------------------------------------------------------------------
# ImageSet
# --------------------------------------------------------------------------------------------

def _set():
    return ImageSet(rand_images(5, 4, 4), [0, 1, 2, 1, 0], ["a", "b", "c"], poison_mask=[1, 0, 0, 1, 0],
                    original_labels=[0, 1, 2, 2, 0], name="s", meta={"source_index": np.arange(5), "k": 1})


def test_fingerprint():
    s = _set()
    fp = s.fingerprint()
    assert len(fp) == 16 and _set().fingerprint() == fp
    px = _set()
    px.images[2, 1, 1, 0] ^= 1
    assert px.fingerprint() != fp
    lab = _set()
    lab.labels[4] = 2
    assert lab.fingerprint() != fp
    assert s.subset([1, 0, 2, 3, 4]).fingerprint() != fp  # order
    assert s.subset(np.arange(5)).fingerprint() == fp


def test_subset_keeps_masks():
    s = _set()
    sub = s.subset(np.array([3, 0]), name="picked")
    np.testing.assert_array_equal(sub.poison_mask, [True, True])
    np.testing.assert_array_equal(sub.original_labels, [2, 0])
    np.testing.assert_array_equal(sub.labels, [1, 0])
    np.testing.assert_array_equal(sub.images, s.images[[3, 0]])
    assert sub.name == "picked" and sub.meta == {"k": 1} and sub.classes == s.classes
    seeded = seeded_subset(s, 3, seed=0)
    np.testing.assert_array_equal(seeded.images, s.images[seeded.meta["source_index"]])
    np.testing.assert_array_equal(seeded.poison_mask, s.poison_mask[seeded.meta["source_index"]])
    assert seeded_subset(s, 3, seed=0).fingerprint() == seeded.fingerprint() and seeded_subset(s, None, 0) is s
    np.testing.assert_array_equal(s.true_labels(), [0, 1, 2, 2, 0])
    np.testing.assert_array_equal(s.class_counts(), [2, 2, 1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(images=np.zeros((2, 4, 4), np.uint8)), r"\(N, H, W, 3\)"),
    (dict(images=np.zeros((2, 4, 4, 3), np.float32)), "must be uint8"),
    (dict(labels=[0, 1, 1]), r"labels must have shape \(2,\)"),
    (dict(labels=[0.0, 1.0]), "labels must be integers"),
    (dict(labels=[0, 3]), r"label 3 out of range \[0, 2\)"),
    (dict(classes=["only"]), "at least 2 classes"),
    (dict(poison_mask=[True]), "poison_mask must have shape"),
    (dict(original_labels=[0, 1, 1]), "original_labels must have shape"),
])
def test_imageset_validation(kwargs, match):
    args = dict(images=np.zeros((2, 4, 4, 3), np.uint8), labels=[0, 1], classes=["a", "b"], name="t")
    args.update(kwargs)
    with pytest.raises(DatasetError, match=match):
        ImageSet(**args)
