"""Hostile and ambiguous dataset input (an outside audit's findings), on real files made here: records
whose data_path escapes the data root, symlinks out of an ImageFolder, small files that declare huge
arrays, silent misreadings; and the structure the loaders rest on (cgd.arrays, no import cycles, the
dataset-kind registry)."""
from __future__ import annotations

import ast
import pickle
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cgd.arrays as arrays
import cgd.data as data
import cgd.runs as runs
from cgd.data import (
    DATASET_KINDS,
    DatasetError,
    DatasetKind,
    ImageSet,
    inspect_npz,
    load_backdoorbench,
    load_cifar,
    load_imagefolder,
    load_npz,
    load_splits,
)
from test_backdoorbench import check_cifar, make_cifar_record

CGD = Path(data.__file__).resolve().parent


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("CGD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CGD_DATA_ROOT", raising=False)
    monkeypatch.delenv("CGD_MAX_NPZ_BYTES", raising=False)


def rand_images(n, h=8, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def save_img(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _set_data_path(rec_dir: Path, data_path: str) -> None:
    rec = torch.load(rec_dir / "attack_result.pt", weights_only=False)
    rec["data_path"] = data_path
    torch.save(rec, rec_dir / "attack_result.pt")


def _outside_cifar(tmp_path: Path) -> Path:
    """A clean CIFAR-10 copy outside the BackdoorBench folder (the same images as the record's)."""
    import shutil

    dst = tmp_path / "outside" / "cifar10"
    shutil.copytree(tmp_path / "BackdoorBench" / "data" / "cifar10", dst)
    return dst


# --------------------------------------------------------------------------------------------
# 1. BackdoorBench data_path outside the allowed root
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data_path", ["./data/../data/cifar10", "data/x/../../../outside/cifar10", "../outside/cifar10"])
def test_record_data_path_with_dotdot_is_refused(tmp_path, data_path):
    rec_dir, _ = make_cifar_record(tmp_path, inline=True)
    _outside_cifar(tmp_path)
    _set_data_path(rec_dir, data_path)
    with pytest.raises(DatasetError, match=r"attack_result\.pt\[data_path\]: .*'\.\.' components; refused"):
        load_backdoorbench(rec_dir)
    with pytest.raises(DatasetError, match=r"'\.\.' components"):
        load_splits(f"backdoorbench:{rec_dir}")


def test_record_absolute_data_path_outside_allowed_root_is_refused(tmp_path):
    rec_dir, d = make_cifar_record(tmp_path, inline=True)
    outside = _outside_cifar(tmp_path)
    _set_data_path(rec_dir, str(outside))
    bb = tmp_path / "BackdoorBench"
    with pytest.raises(DatasetError) as e:
        load_backdoorbench(rec_dir, allowed_root=bb)
    msg = str(e.value)
    assert str(rec_dir / "attack_result.pt") in msg and str(outside) in msg and "outside the allowed data root" in msg
    with pytest.raises(DatasetError, match="outside the allowed data root"):
        load_splits(f"backdoorbench:{rec_dir}", allowed_root=bb)
    # without a root the plain library honours the absolute path, as BackdoorBench wrote it
    check_cifar(*load_backdoorbench(rec_dir), d)
    # inside the root it is accepted
    check_cifar(*load_backdoorbench(rec_dir, allowed_root=tmp_path), d)


def test_env_data_root_bounds_symlinked_clean_data(tmp_path, monkeypatch):
    """CGD_DATA_ROOT is the default allowed root: data/cifar10 as a symlink to a copy elsewhere is refused."""
    import shutil

    rec_dir, d = make_cifar_record(tmp_path, inline=True)
    outside = _outside_cifar(tmp_path)
    data_dir = tmp_path / "BackdoorBench" / "data"
    shutil.rmtree(data_dir / "cifar10")
    (data_dir / "cifar10").symlink_to(outside, target_is_directory=True)
    monkeypatch.setenv("CGD_DATA_ROOT", str(data_dir))
    with pytest.raises(DatasetError, match=rf"{rec_dir.name}.*{data_dir / 'cifar10'}.*resolves to {outside}, outside the allowed"):
        load_backdoorbench(rec_dir)
    # an explicit root that holds the target is accepted
    check_cifar(*load_backdoorbench(rec_dir, allowed_root=tmp_path), d)


def test_backdoorbench_guesses_outside_allowed_root_are_not_tried(tmp_path):
    """The BackdoorBench-folder guesses (data beside record/) lying outside the root are skipped, not read."""
    rec_dir, _ = make_cifar_record(tmp_path, inline=True)
    with pytest.raises(DatasetError, match="was not found"):
        load_backdoorbench(rec_dir, allowed_root=rec_dir)


# --------------------------------------------------------------------------------------------
# 2. Symlinks in an ImageFolder
# --------------------------------------------------------------------------------------------

def _linked_folder(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    for c in ("a", "b"):
        for j in range(2):
            save_img(root / c / f"{j}.png", rand_images(1, seed=10 * ord(c) + j)[0])
    secret = save_img(tmp_path / "secret.png", np.full((8, 8, 3), 7, np.uint8))
    save_img(tmp_path / "elsewhere" / "x.png", np.full((8, 8, 3), 9, np.uint8))
    (root / "b" / "outside.png").symlink_to(secret)
    (root / "b" / "dangling.png").symlink_to(root / "b" / "nowhere.png")
    (root / "b" / "loop1.png").symlink_to(root / "b" / "loop2.png")
    (root / "b" / "loop2.png").symlink_to(root / "b" / "loop1.png")
    (root / "c").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # a class folder outside
    (root / "a" / "inside.png").symlink_to(root / "b" / "0.png")  # inside the root: read
    return root


def test_imagefolder_symlinks_outside_or_broken_are_skipped_and_counted(tmp_path):
    root = _linked_folder(tmp_path)
    s = load_imagefolder(root)
    assert s.classes == ["a", "b"] and len(s) == 5
    assert s.meta["skipped_links"] == 5  # outside.png, dangling.png, loop1.png, loop2.png, c/
    assert not (s.images == 7).all(axis=(1, 2, 3)).any() and not (s.images == 9).all(axis=(1, 2, 3)).any()
    b0 = np.asarray(Image.open(root / "b" / "0.png"))
    np.testing.assert_array_equal(s.images[2], b0)  # a/0.png, a/1.png, a/inside.png (-> b/0.png)
    with pytest.raises(DatasetError, match=r"ds/(b/(dangling|loop1|loop2|outside)\.png|c): symbolic link .*refused"):
        load_imagefolder(root, on_bad="error")


def test_imagefolder_split_links_inside_the_dataset_root_are_followed(tmp_path):
    root = tmp_path / "ds"
    for split in ("train", "test"):
        for c in ("a", "b"):
            save_img(root / split / c / "0.png", rand_images(1, seed=ord(c))[0])
    (root / "test" / "a" / "1.png").symlink_to(root / "train" / "a" / "0.png")  # outside test/, inside ds/
    train, test = load_splits(f"imagefolder:{root}", on_bad_files="error")
    assert len(test) == 3 and test.meta["skipped_links"] == 0


# --------------------------------------------------------------------------------------------
# 3. Small files declaring huge arrays
# --------------------------------------------------------------------------------------------

def _peak_mb(fn) -> float:
    tracemalloc.start()
    try:
        fn()
    except DatasetError:
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 1e6


def test_npz_labels_implying_a_billion_classes_are_refused(tmp_path):
    f = tmp_path / "huge.npz"
    np.savez(f, x=rand_images(4), y=np.array([0, 1, 10**9, 2]))
    with pytest.raises(DatasetError, match=r"huge\.npz\[y\]: label 1000000000 implies 1,000,000,001 classes for 4"):
        load_npz(f)
    np.savez(f, x=rand_images(4), y=np.array([0, 1, 5000, 2]))  # above 1,000 classes, more than samples
    with pytest.raises(DatasetError, match=r"\[y\]: label 5000 implies 5,001 classes"):
        load_npz(f)
    np.savez(f, x=rand_images(4), y=np.array([0, 1, 2, 3]), x_test=rand_images(2), y_test=np.array([0, 999]))
    train, test = load_npz(f)  # up to 1,000 classes are always fine
    assert train.num_classes == 1000 and test.num_classes == 1000


def _write_zero_member_npz(path: Path, shape: tuple[int, ...], method=zipfile.ZIP_DEFLATED) -> Path:
    """An .npz whose x.npy holds zeros of ``shape`` uint8, streamed (nothing large in memory)."""
    import io

    hdr = io.BytesIO()
    np.lib.format.write_array_header_1_0(hdr, {"descr": "|u1", "fortran_order": False, "shape": shape})
    n = int(np.prod(shape))
    with zipfile.ZipFile(path, "w", compression=method) as z:
        with z.open("x.npy", "w", force_zip64=True) as f:
            f.write(hdr.getvalue())
            chunk = bytes(1 << 20)
            for lo in range(0, n, len(chunk)):
                f.write(chunk[:min(len(chunk), n - lo)])
        with z.open("y.npy", "w") as f:
            np.save(f, np.zeros(shape[0], np.int64))
    return path


def test_npz_zip_bomb_is_refused_from_its_headers(tmp_path):
    bomb = _write_zero_member_npz(tmp_path / "bomb.npz", (44000, 32, 32, 3))  # 135 MB of zeros in ~0.13 MB (1020:1)
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(DatasetError, match=r"bomb\.npz\[x\]: .*compressed bytes expand to 135,168,128 \(over 1000:1\); refused as a zip bomb"):
        inspect_npz(bomb)
    assert _peak_mb(lambda: load_npz(bomb)) < 20  # refused before any array is allocated


def test_npz_over_the_size_limit_is_refused(tmp_path, monkeypatch):
    f = tmp_path / "big.npz"
    np.savez(f, x=rand_images(100), y=np.arange(100) % 2)
    monkeypatch.setenv("CGD_MAX_NPZ_BYTES", "10000")
    with pytest.raises(DatasetError, match=r"big\.npz: declares 19,328 bytes .* over the limit of 10,000 bytes.*CGD_MAX_NPZ_BYTES"):
        load_npz(f)
    monkeypatch.setenv("CGD_MAX_NPZ_BYTES", "lots")
    with pytest.raises(DatasetError, match="CGD_MAX_NPZ_BYTES='lots'"):
        inspect_npz(f)


def test_npz_forged_header_is_refused(tmp_path):
    """A header declaring far more data than the member holds (numpy would allocate it first)."""
    import io

    hdr = io.BytesIO()
    np.lib.format.write_array_header_1_0(hdr, {"descr": "|u1", "fortran_order": False, "shape": (300000, 32, 32, 3)})
    f = tmp_path / "forged.npz"
    with zipfile.ZipFile(f, "w") as z:
        z.writestr("x.npy", hdr.getvalue() + bytes(100))
        z.writestr("y.npy", b"")
    with pytest.raises(DatasetError, match=r"forged\.npz\[x\]: header declares shape \(300000, 32, 32, 3\) uint8 \(921,600,000 bytes\)"):
        load_npz(f)
    assert _peak_mb(lambda: load_npz(f)) < 20


def test_inspect_npz_reads_headers_only(tmp_path):
    f = tmp_path / "ok.npz"
    np.savez_compressed(f, x=rand_images(6, 5, 7), y=np.arange(6, dtype=np.int32), classes=np.array(["a", "b"]))
    facts = inspect_npz(f)
    by = {m["name"]: m for m in facts["members"]}
    assert set(by) == {"x", "y", "classes"}
    assert by["x"]["shape"] == (6, 5, 7, 3) and by["x"]["dtype"] == "uint8" and by["x"]["nbytes"] == 6 * 5 * 7 * 3
    assert by["y"]["dtype"] == "int32" and by["classes"]["dtype"] == "<U1"
    assert facts["total_bytes"] == sum(m["uncompressed_bytes"] for m in facts["members"]) > by["x"]["nbytes"]
    assert facts["file_bytes"] == f.stat().st_size and facts["limit_bytes"] == 8 << 30
    assert data.inspect_npz is arrays.inspect_npz


def _cifar_root_with_first_batch(tmp_path: Path, raw: bytes) -> Path:
    d = tmp_path / "c10" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    (d / "data_batch_1").write_bytes(raw)
    return tmp_path / "c10"


class _Reconstruct:
    """Pickles as numpy's own array reconstructor called with a huge shape (no data follows)."""

    def __reduce__(self):
        return (np._core.multiarray._reconstruct, (np.ndarray, (300000, 3072), b"B"))


def test_cifar_batch_declaring_921_mb_is_refused_before_allocating(tmp_path):
    raw = pickle.dumps({"data": _Reconstruct(), "labels": [0]}, protocol=2)
    assert len(raw) < 200
    root = _cifar_root_with_first_batch(tmp_path, raw)
    with pytest.raises(DatasetError, match=r"data_batch_1: declares a array of shape \(300000, 3072\).*921,600,000 bytes.*holds only"):
        load_cifar(root)
    assert _peak_mb(lambda: load_cifar(root)) < 20


def test_cifar_batch_with_a_huge_length_prefix_is_refused(tmp_path):
    # PROTO 2, EMPTY_DICT, "data": BINBYTES of a declared 921,600,000 bytes (the file ends after 2)
    raw = b"\x80\x02}X\x04\x00\x00\x00dataB" + (921_600_000).to_bytes(4, "little") + b"\x00\x00"
    root = _cifar_root_with_first_batch(tmp_path, raw)
    with pytest.raises(DatasetError, match=r"data_batch_1: declares a 921,600,000-byte BINBYTES field .* refused before allocating"):
        load_cifar(root)
    assert _peak_mb(lambda: load_cifar(root)) < 20


# --------------------------------------------------------------------------------------------
# 4. Silent misreadings
# --------------------------------------------------------------------------------------------

def test_float_images_rule(tmp_path):
    f = tmp_path / "f.npz"
    x01 = np.random.default_rng(0).random((4, 8, 8, 3)).astype(np.float32)
    x01[0, 0, 0, 0] = 1.01  # one stray value above 1 in a [0, 1] set: was read as 0-255 (a black set)
    np.savez(f, x=x01, y=np.array([0, 1, 0, 1]))
    with pytest.raises(DatasetError, match=r"f\.npz\[x\]: float images with values in \[.*, 1\.01\] are ambiguous"):
        load_npz(f)
    x01[0, 0, 0, 0] = 1.0
    np.savez(f, x=x01, y=np.array([0, 1, 0, 1]))
    s, _ = load_npz(f)  # max <= 1: [0, 1]
    assert s.images.max() == 255 and abs(float(s.images.mean()) - 127.5) < 10
    np.savez(f, x=np.full((2, 4, 4, 3), 200.0), y=np.array([0, 1]))  # whole numbers above 1: 0-255
    assert (load_npz(f)[0].images == 200).all()
    np.savez(f, x=np.full((2, 4, 4, 3), 100.5), y=np.array([0, 1]))
    with pytest.raises(DatasetError, match="ambiguous"):
        load_npz(f)


def test_npz_test_split_of_another_size_is_refused(tmp_path):
    f = tmp_path / "sizes.npz"
    np.savez(f, x=rand_images(4, 32, 32), y=np.array([0, 1, 0, 1]), x_test=rand_images(2, 16, 16), y_test=np.array([0, 1]))
    with pytest.raises(DatasetError, match=r"sizes\.npz\[x_test\]: images of 16x16 pixels.*sizes\.npz\[x\] holds 32x32"):
        load_splits(f"npz:{f}")


def test_mixed_size_imagefolder_records_the_resize(tmp_path):
    root = tmp_path / "mixed"
    for c in ("a", "b"):
        for j in range(3):
            save_img(root / c / f"{j}.png", rand_images(1, 20, 24, seed=j)[0])
    save_img(root / "b" / "big.png", rand_images(1, 40, 30)[0])
    for _ in range(2):  # built, then read back from the cache
        s = load_imagefolder(root)
        assert s.image_size == (20, 24) and s.meta["resized_files"] == 1 and s.meta["resized_to"] == [20, 24]
    from cgd.rundata import _load_notes

    assert any("1 images of another size were resized to 20x24" in n for n in _load_notes(s, None))


def test_poison_mask_values_other_than_0_1_are_refused(tmp_path):
    f = tmp_path / "pm.npz"
    np.savez(f, x=rand_images(3), y=np.array([0, 1, 0]), poison_mask=np.array([0, 2, 1]))
    with pytest.raises(DatasetError, match=r"pm\.npz\[poison_mask\]: expected booleans \(or 0/1 integers\), found the value 2"):
        load_npz(f)
    with pytest.raises(DatasetError, match="poison_mask must hold booleans or 0/1, found the value 2"):
        ImageSet(rand_images(3), [0, 1, 0], ["a", "b"], poison_mask=[0, 2, 1])
    assert ImageSet(rand_images(3), [0, 1, 0], ["a", "b"], poison_mask=np.array([0.0, 1.0, 0.0])).poison_mask.sum() == 1


# --------------------------------------------------------------------------------------------
# 5. Too-small images in an .npz
# --------------------------------------------------------------------------------------------

def test_npz_images_smaller_than_2x2_are_refused(tmp_path):
    f = tmp_path / "tiny.npz"
    np.savez(f, x=rand_images(4, 1, 1), y=np.array([0, 1, 0, 1]))
    with pytest.raises(DatasetError, match=r"tiny\.npz\[x\]: images of 1x1 pixels are too small \(expected at least 2x2\)"):
        load_npz(f)


# --------------------------------------------------------------------------------------------
# 6-8. Structure: cgd.arrays, no import cycles, the dataset-kind registry
# --------------------------------------------------------------------------------------------

def _imports(module: str) -> set[str]:
    """Every module ``cgd.<module>`` imports, at any level (functions included), as names."""
    tree = ast.parse((CGD / f"{module}.py").read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                out.add(node.module or "")
            else:
                base = f"cgd.{node.module}" if node.module else "cgd"
                out.add(base)
                if not node.module:
                    out |= {f"cgd.{a.name}" for a in node.names}
    return out


def test_arrays_is_a_leaf_of_numpy_and_the_standard_library():
    allowed = set(sys.stdlib_module_names) | {"numpy"}
    assert {m.split(".")[0] for m in _imports("arrays")} <= allowed
    for name in ("atomic_write_bytes", "atomic_write_text", "write_json", "read_json", "NpyWriter", "save_npy",
                 "remove_stale_temps"):
        assert getattr(runs, name) is getattr(arrays, name), name
    for name in ("iter_row_chunks", "release_pages", "take_rows", "cache_dir", "DatasetError", "inspect_npz"):
        assert getattr(data, name) is getattr(arrays, name), name


def test_no_import_cycles_among_the_data_modules():
    """No module among data, backdoorbench, runs and arrays reaches itself through cgd's imports
    (function-level imports count)."""
    graph: dict[str, set[str]] = {}
    for f in CGD.glob("*.py"):
        mod = f"cgd.{f.stem}"
        graph[mod] = {m for m in _imports(f.stem) if m.startswith("cgd.") and m != mod}
    for start in ("cgd.data", "cgd.backdoorbench", "cgd.runs", "cgd.arrays"):
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m in seen or m not in graph:
                continue
            seen.add(m)
            todo += graph[m]
        assert start not in seen, f"{start} imports a module that imports it back"
    assert "cgd.data" not in graph["cgd.backdoorbench"] and graph["cgd.arrays"] == set()


def test_importing_cgd_data_does_not_import_torch():
    code = "import sys, cgd.data; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=CGD.parent).returncode == 0


def test_dataset_kind_registry(tmp_path, monkeypatch):
    assert all(isinstance(k, DatasetKind) and k.name == n and k.label and k.layout for n, k in DATASET_KINDS.items())
    assert {n for n, k in DATASET_KINDS.items() if k.downloadable} == {"cifar10", "cifar100", "gtsrb"}
    assert {n for n, k in DATASET_KINDS.items() if k.is_file} == {"npz"}
    assert data.DATASET_KIND_NAMES == tuple(DATASET_KINDS) and "backdoorbench" in data.DATASET_KIND_NAMES
    assert DATASET_KINDS["cifar10"].label == "CIFAR-10" and "cifar-10-batches-py" in DATASET_KINDS["cifar10"].layout
    assert "npz:FILE" in data.spec_help() and "backdoorbench:RECORD_DIR" in data.spec_help()
    with pytest.raises(Exception):
        DATASET_KINDS["npz"].label = "x"  # frozen
    # BackdoorBench's dataset names all map onto registry kinds that can load a record's clean data
    from cgd.backdoorbench import DATASET_ALIASES

    assert all(DATASET_KINDS[k].load_clean is not None for k in DATASET_ALIASES.values())
    # the spec functions dispatch through the registry: a kind added there loads
    toy = ImageSet(rand_images(2), [0, 1], ["a", "b"], name="toy")
    monkeypatch.setitem(DATASET_KINDS, "toy", DatasetKind("toy", "Toy", "anything", lambda path, **_: (toy, None)))
    assert load_splits("toy:whatever")[0] is toy and data.load_dataset("toy:x") is toy
    with pytest.raises(DatasetError, match="unknown kind 'mnist'; expected one of .*toy"):
        data.parse_spec("mnist:/x")
