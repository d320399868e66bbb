"""Import BackdoorBench attack records as ImageSets (``backdoorbench:RECORD_DIR``).

BackdoorBench (SCLBD/BackdoorBench, ``utils/save_load_attack.py``) writes each attack to a record
folder ``record/<name>/`` whose ``attack_result.pt`` is a ``torch.save``'d dict:

``model_name`` (str), ``num_classes`` (int), ``model`` (the victim's state_dict),
``data_path`` (str, e.g. ``"./data/cifar10"``, relative to the BackdoorBench folder the attack ran in),
``img_size`` (``(H, W, C)``), ``clean_data`` (``"cifar10"``, ``"cifar100"``, ``"gtsrb"``, ``"tiny"``, ...),
``bd_train`` (a dataset state or ``None``), ``bd_test`` (a dataset state), plus any extra keys.

A dataset state (``prepro_cls_DatasetBD_v2.retrieve_state``) is a dict with
``original_index_array`` ((M,) ints: the rows of the clean split forming the dataset, in order),
``poison_indicator`` ((N,) 0/1 over the whole clean split), ``save_folder_path``, two ``getitem``
flags, and ``bd_data_container``: ``{"save_folder_path", "save_file_format", "data_dict"}``.
``data_dict`` maps a clean-split index to its poisoned sample, either on disk,
``{"path": "<save_folder_path>/<label>/<index>.png", "other_info": [poisoned_label, true_label]}``
(BackdoorBench's default; the path is relative to where the attack ran, typically
``./record/<name>/bd_train_dataset/...``), or inline, ``(image, poisoned_label, true_label)``.

The clean images are not in the record: they are the named dataset at ``data_path``, loaded here
through cgd's own loaders in the order BackdoorBench uses. The record is read with
``torch.load(weights_only=True)`` and a narrow allowlist of numpy array/dtype/scalar
reconstructors, so a record holding any other Python object is refused without running it.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .data import (
    DatasetError,
    ImageSet,
    _as_nhwc,
    _cached,
    _files_key,
    _gtsrb_base,
    decode_images,
    load_cifar,
    load_gtsrb,
    load_tinyimagenet,
)

__all__ = ["load_backdoorbench", "load_record", "RECORD_FILE", "CLEAN_DATASETS"]

RECORD_FILE = "attack_result.pt"
RECORD_KEYS = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test")
# BackdoorBench dataset name -> (cgd kind, marker files one of which a dataset root holds)
CLEAN_DATASETS = {
    "cifar10": ("cifar10", ("cifar-10-batches-py/data_batch_1", "data_batch_1")),
    "cifar100": ("cifar100", ("cifar-100-python/train", "train")),
    "gtsrb": ("gtsrb", ()),
    "tiny": ("tinyimagenet", ("tiny-imagenet-200/wnids.txt", "wnids.txt")),
    "tinyimagenet": ("tinyimagenet", ("tiny-imagenet-200/wnids.txt", "wnids.txt")),
}
_LAYOUT_HINT = {
    "cifar10": "the folder holding cifar-10-batches-py/",
    "cifar100": "the folder holding cifar-100-python/",
    "gtsrb": "the folder holding Train/ and Test/ (BackdoorBench), GTSRB/Final_Training/ or gtsrb/GTSRB/Training/",
    "tinyimagenet": "the folder holding tiny-imagenet-200/",
}


# --------------------------------------------------------------------------------------------
# Reading the record safely
# --------------------------------------------------------------------------------------------

def _numpy_safe_globals() -> list:
    """The numpy reconstructors a record needs: arrays, numeric/bool dtypes, scalars. Nothing else.

    Records written under numpy 1.x name ``numpy.core.multiarray``; numpy 2 names ``numpy._core``.
    Object, string and void dtypes are not allowed (their dtype instances cannot be built).
    """
    try:
        core = np._core.multiarray  # numpy >= 2
    except AttributeError:  # pragma: no cover - numpy 1.x
        core = np.core.multiarray
    allowed: list = [np.ndarray, np.dtype]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(core._reconstruct, f"{mod}._reconstruct"), (core.scalar, f"{mod}.scalar")]
    allowed += [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    numeric = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
               np.float16, np.float32, np.float64)
    for t in numeric:  # the dtype classes (numpy.dtypes.*DType), needed to BUILD dtype instances
        cls = type(np.dtype(t))
        if cls is not np.dtype:
            allowed.append(cls)
    return allowed


def _refusal_reason(msg: str) -> str:
    """The informative sentence of torch's weights-only refusal (which global or call was refused),
    without its advice to allowlist the global or to retry with weights_only=False."""
    for line in (ln.strip() for ln in msg.splitlines()):
        if "WeightsUnpickler error:" in line:
            line = line.split("WeightsUnpickler error:", 1)[1].strip()
        elif not line.startswith(("Trying to", "Unsupported", "Can only", "Only")):
            continue
        return line.split(" Please use")[0].strip().rstrip(".")
    return "unsupported object"


def load_record(path: str | os.PathLike) -> dict:
    """Read a BackdoorBench ``attack_result.pt`` without running any code from it.

    Uses ``torch.load(map_location='cpu', weights_only=True)`` with only numpy's array, dtype and
    scalar reconstructors added to the allowlist. Raises :class:`DatasetError` for a missing,
    unreadable or refused file, or one that is not an attack record.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file (expected a BackdoorBench {RECORD_FILE})")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            rec = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _refusal_reason(str(e))
        hint = ""
        if "PIL" in detail:
            hint = (" Records that keep poisoned images in memory as PIL objects (save_folder_path=None) cannot "
                    "be read safely; re-run the attack with BackdoorBench's default PNG storage.")
        raise DatasetError(
            f"{path}: refused to load: the file holds Python objects other than tensors, numpy arrays and "
            f"plain containers, and unpickling them could run code ({detail}).{hint}"
        ) from None
    except Exception as e:
        raise DatasetError(f"{path}: not a readable torch file ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(rec, dict):
        raise DatasetError(f"{path}: expected a dict (BackdoorBench attack record), got {type(rec).__name__}")
    missing = [k for k in RECORD_KEYS if k not in rec]
    if missing:
        raise DatasetError(f"{path}: not a BackdoorBench attack record: missing keys {missing} (found {sorted(map(str, rec))})")
    return rec


# --------------------------------------------------------------------------------------------
# Clean data
# --------------------------------------------------------------------------------------------

def _looks_like(kind: str, markers: tuple[str, ...], root: Path) -> bool:
    if not root.is_dir():
        return False
    if kind == "gtsrb":
        try:
            _gtsrb_base(root)
            return True
        except DatasetError:
            return False
    return any((root / m).is_file() for m in markers)


def _clean_candidates(record_dir: Path, data_path: str, clean_root: str | os.PathLike | None) -> list[Path]:
    """Folders that may hold the clean dataset, most specific first."""
    leaf = PurePosixPath(str(data_path).replace("\\", "/")).name
    if clean_root is not None:
        root = Path(clean_root).expanduser()
        return [root] + ([root / leaf] if leaf else [])
    cands: list[Path] = []
    dp = PurePosixPath(str(data_path).replace("\\", "/"))
    if dp.is_absolute():
        cands.append(Path(dp))
    else:
        cands.append(record_dir / dp)
        # BackdoorBench runs from its root with records in ./record/<name> and data in ./data/<name>
        parts = dp.parts
        if "data" in parts:
            tail = PurePosixPath(*parts[parts.index("data"):])
            for anc in (record_dir.parent.parent, record_dir.parent):
                cands.append(anc / tail)
    out: list[Path] = []
    for c in cands:
        if c not in out:
            out.append(c)
    return out


def _load_clean(name: str, root: Path, size: tuple[int, int]) -> tuple[ImageSet, ImageSet]:
    kind = CLEAN_DATASETS[name][0]
    if kind in ("cifar10", "cifar100"):
        k = 10 if kind == "cifar10" else 100
        return load_cifar(root, "train", k), load_cifar(root, "test", k)
    if kind == "gtsrb":
        return load_gtsrb(root, "train", size=size), load_gtsrb(root, "test", size=size)
    # BackdoorBench reads Tiny-ImageNet through torchvision's ImageFolder: classes sorted by wnid
    return (load_tinyimagenet(root, "train", class_order="sorted"),
            load_tinyimagenet(root, "val", class_order="sorted"))


# --------------------------------------------------------------------------------------------
# Poisoned samples
# --------------------------------------------------------------------------------------------

def _resolve_image_path(p: Any, save_folder: Any, record_dir: Path, where: str) -> Path:
    """Map a stored PNG path onto the record folder; refuse anything that lands outside it.

    BackdoorBench stores ``<save_folder_path>/<label>/<index>.png`` with ``save_folder_path`` like
    ``./record/<name>/bd_train_dataset`` (relative to the folder the attack ran in).
    """
    if not isinstance(p, str) or not p:
        raise DatasetError(f"{where}: expected an image path string, got {type(p).__name__}")
    rd = record_dir.resolve()
    ps = p.replace("\\", "/")
    pp = PurePosixPath(ps)
    sf = str(save_folder).replace("\\", "/").rstrip("/") if isinstance(save_folder, str) and save_folder else None
    if sf and ps.startswith(sf + "/"):
        rel = PurePosixPath(PurePosixPath(sf).name, ps[len(sf) + 1:])
    elif record_dir.name in pp.parts[:-1]:
        i = len(pp.parts) - 1 - pp.parts[::-1].index(record_dir.name)
        rel = PurePosixPath(*pp.parts[i + 1:])
    elif not pp.is_absolute():
        rel = pp
    else:
        raise DatasetError(f"{where}: image path {p!r} lies outside the record folder {rd}; refused")
    full = (rd / Path(rel)).resolve()
    if full != rd and rd not in full.parents:
        raise DatasetError(f"{where}: image path {p!r} resolves to {full}, outside the record folder {rd}; refused")
    if not full.is_file():
        raise DatasetError(f"{where}: poisoned image {p!r} not found (looked for {full})")
    return full


def _as_label(v: Any, where: str) -> int:
    """An integer label from an int, numpy integer, 0-d integer array/tensor or integral float."""
    try:
        import torch

        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v.item()
    if isinstance(v, (bool, np.bool_)):
        raise DatasetError(f"{where}: expected an integer label, got {v!r}")
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return int(v)
    raise DatasetError(f"{where}: expected an integer label, got {v!r}")


def _inline_image(img: Any, size: tuple[int, int], where: str) -> np.ndarray:
    """One inline image (HWC/CHW/HW array or tensor, uint8 or float) as (H, W, 3) uint8 at ``size``."""
    try:
        import torch

        if isinstance(img, torch.Tensor):
            img = img.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(img, np.ndarray):
        raise DatasetError(f"{where}: expected an image array or a PNG path, got {type(img).__name__}")
    if img.dtype.kind not in "uif":
        raise DatasetError(f"{where}: image array has dtype {img.dtype}, expected uint8 or float")
    x = _as_nhwc(img[None], where)[0]
    if x.shape[:2] != tuple(size):
        from PIL import Image

        x = np.asarray(Image.fromarray(x).resize((size[1], size[0]), Image.BICUBIC), dtype=np.uint8)
    return x


def _poisoned_samples(state: Any, part: str, n_clean: int, size: tuple[int, int], record_path: Path
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Decode one dataset state.

    Returns (rows, poisoned_pos, images, bd_labels, true_labels): ``rows`` (M,) the clean indices
    making up the dataset in order, ``poisoned_pos`` (P,) positions in ``rows`` that are poisoned,
    ``images`` (P, H, W, 3) uint8, ``bd_labels`` and ``true_labels`` (P,) int64.
    """
    where = f"{record_path}[{part}]"
    record_dir = record_path.parent
    if not isinstance(state, dict):
        raise DatasetError(f"{where}: expected a dataset state dict, got {type(state).__name__}")
    for k in ("bd_data_container", "poison_indicator"):
        if k not in state:
            raise DatasetError(f"{where}: missing field {k!r} (found {sorted(map(str, state))})")
    pi = np.asarray(state["poison_indicator"])
    if pi.ndim != 1 or pi.dtype.kind not in "biuf":
        raise DatasetError(f"{where}[poison_indicator]: expected a (N,) 0/1 array, got shape {pi.shape} dtype {pi.dtype}")
    if len(pi) != n_clean:
        raise DatasetError(f"{where}[poison_indicator]: has {len(pi)} entries but the clean split has {n_clean} images; "
                           "the clean dataset is not the one the attack used")
    rows = state.get("original_index_array")
    rows = np.arange(n_clean) if rows is None else np.asarray(rows)
    if rows.ndim != 1 or rows.dtype.kind not in "iu":
        raise DatasetError(f"{where}[original_index_array]: expected a (M,) integer array, got shape {rows.shape} dtype {rows.dtype}")
    rows = rows.astype(np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= n_clean):
        raise DatasetError(f"{where}[original_index_array]: indices must lie in [0, {n_clean}), got [{rows.min()}, {rows.max()}]")
    cont = state["bd_data_container"]
    if not isinstance(cont, dict) or not isinstance(cont.get("data_dict"), dict):
        raise DatasetError(f"{where}[bd_data_container]: expected a dict with a 'data_dict' dict")
    dd: dict[int, Any] = {}
    for k, v in cont["data_dict"].items():
        dd[_as_label(k, f"{where}[bd_data_container][data_dict] key")] = v
    save_folder = cont.get("save_folder_path") or state.get("save_folder_path")
    poisoned_pos = np.flatnonzero(pi[rows] == 1)
    p = len(poisoned_pos)
    bd_labels = np.empty(p, np.int64)
    true_labels = np.empty(p, np.int64)
    images = np.empty((p, size[0], size[1], 3), np.uint8)
    files: list[Path] = []
    file_pos: list[int] = []
    for j, pos in enumerate(poisoned_pos):
        i = int(rows[pos])
        w = f"{where}[bd_data_container][data_dict][{i}]"
        if i not in dd:
            raise DatasetError(f"{w}: sample {i} is marked poisoned but has no stored image")
        e = dd[i]
        if isinstance(e, dict):
            if "path" not in e:
                raise DatasetError(f"{w}: expected keys 'path' and 'other_info', got {sorted(map(str, e))}")
            info = e.get("other_info")
            files.append(_resolve_image_path(e["path"], save_folder, record_dir, w))
            file_pos.append(j)
        elif isinstance(e, (tuple, list)):
            info = list(e[1:])
            images[j] = _inline_image(e[0], size, w)
        else:
            raise DatasetError(f"{w}: expected a {{'path', 'other_info'}} dict or an (image, label, original) tuple, got {type(e).__name__}")
        if not isinstance(info, (list, tuple)) or len(info) < 2:
            raise DatasetError(f"{w}: expected other_info [poisoned_label, original_label], got {info!r}")
        bd_labels[j] = _as_label(info[0], w + " poisoned label")
        true_labels[j] = _as_label(info[1], w + " original label")
    if files:
        key = f"bdb-{part}-" + _files_key([record_path, *files], f"{record_path.resolve()}|{size}")
        arr = _cached(key, lambda: {"x": decode_images(files, size)})["x"]
        images[np.asarray(file_pos)] = arr
    return rows, poisoned_pos, images, bd_labels, true_labels


def _check_true_labels(true_labels: np.ndarray, clean_labels: np.ndarray, where: str, clean_desc: str) -> None:
    bad = np.flatnonzero(true_labels != clean_labels)
    if len(bad):
        j = int(bad[0])
        raise DatasetError(
            f"{where}: the record's original labels disagree with the clean dataset at {len(bad)} of "
            f"{len(true_labels)} poisoned samples (first: record {int(true_labels[j])}, dataset {int(clean_labels[j])}); "
            f"the clean data at {clean_desc} is not the one (or not in the order) the attack used"
        )


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def load_backdoorbench(record_dir: str | os.PathLike, clean_root: str | os.PathLike | None = None
                       ) -> tuple[ImageSet, ImageSet]:
    """Load a BackdoorBench attack record as (poisoned train, clean test with ``meta['bd_test']``).

    ``record_dir``: the record folder (or its ``attack_result.pt``). ``clean_root``: folder of the
    clean dataset the attack used (default ``$CGD_DATA_ROOT``, else the record's ``data_path``
    resolved against the record folder and the BackdoorBench folder above ``record/``).

    train: images (N, H, W, 3) uint8 as the victim trained on them, ``labels`` as given (poisoned),
    ``poison_mask`` (N,) bool and ``original_labels`` (N,) from the record. test: the clean test split;
    ``test.meta['bd_test']`` is a :class:`cgd.evaluation.BackdoorTest` of the triggered test images
    whose true label differs from the attack target. ``train.meta['backdoorbench']`` holds the
    record's metadata (model name, dataset, image size, clean root used).
    """
    from .evaluation import BackdoorTest

    rp = Path(record_dir).expanduser()
    record_path = rp if rp.is_file() else rp / RECORD_FILE
    if not record_path.is_file():
        raise DatasetError(f"{rp}: no {RECORD_FILE} found (expected a BackdoorBench record folder record/<name>/)")
    rec = load_record(record_path)
    rdir = record_path.parent
    name = str(rec["clean_data"]).lower()
    if name not in CLEAN_DATASETS:
        raise DatasetError(f"{record_path}[clean_data]: dataset {rec['clean_data']!r} is not supported "
                           f"(supported: {', '.join(sorted(CLEAN_DATASETS))})")
    kind, markers = CLEAN_DATASETS[name]
    img_size = rec["img_size"]
    try:
        size = (int(img_size[0]), int(img_size[1]))
    except Exception:
        raise DatasetError(f"{record_path}[img_size]: expected (H, W, C), got {img_size!r}") from None
    data_path = rec["data_path"]
    if not isinstance(data_path, str):
        raise DatasetError(f"{record_path}[data_path]: expected a string, got {type(data_path).__name__}")
    if clean_root is None and os.environ.get("CGD_DATA_ROOT"):
        clean_root = os.environ["CGD_DATA_ROOT"]
    tried = _clean_candidates(rdir, data_path, clean_root)
    root = next((c for c in tried if _looks_like(kind, markers, c)), None)
    if root is None:
        raise DatasetError(
            f"{record_path}: the clean {name} dataset the attack used is not stored in the record and was not found "
            f"(record data_path {data_path!r}; tried {', '.join(str(c) for c in tried)}). Pass {_LAYOUT_HINT[kind]} as "
            f"clean_root= (load_backdoorbench), data_root= (load_splits('backdoorbench:RECORD_DIR', data_root=...)) "
            f"or the environment variable CGD_DATA_ROOT (for `cgd --data backdoorbench:RECORD_DIR`)."
        )
    clean_train, clean_test = _load_clean(name, root, size)
    k = len(clean_train.classes)
    if int(rec["num_classes"]) != k:
        raise DatasetError(f"{record_path}[num_classes]: record says {rec['num_classes']} classes, the clean {name} "
                           f"dataset at {root} has {k}")
    hw = clean_train.image_size

    if rec["bd_train"] is None:
        raise DatasetError(f"{record_path}[bd_train]: the record holds no poisoned training set (the attack poisons "
                           "batches during training), so there is no training set to audit")
    rows, pos, imgs, bd, true = _poisoned_samples(rec["bd_train"], "bd_train", len(clean_train), hw, record_path)
    _check_true_labels(true, clean_train.labels[rows[pos]], f"{record_path}[bd_train]", str(root))
    images = clean_train.images[rows]  # fancy indexing copies
    labels = clean_train.labels[rows].copy()
    original = labels.copy()
    mask = np.zeros(len(rows), bool)
    images[pos] = imgs
    labels[pos] = bd
    mask[pos] = True
    if len(labels) and (labels.min() < 0 or labels.max() >= k):
        raise DatasetError(f"{record_path}[bd_train]: poisoned label {int(labels[(labels < 0) | (labels >= k)][0])} "
                           f"out of range [0, {k})")
    rid = rdir.resolve().name
    train = ImageSet(images, labels, clean_train.classes, poison_mask=mask, original_labels=original,
                     name=f"backdoorbench:{rid}:train")

    trows, tpos, timgs, tbd, ttrue = _poisoned_samples(rec["bd_test"], "bd_test", len(clean_test), hw, record_path)
    _check_true_labels(ttrue, clean_test.labels[trows[tpos]], f"{record_path}[bd_test]", str(root))
    if len(tbd) and (tbd.min() < 0 or tbd.max() >= k):
        raise DatasetError(f"{record_path}[bd_test]: target label {int(tbd[(tbd < 0) | (tbd >= k)][0])} out of range [0, {k})")
    keep = ttrue != tbd
    test = ImageSet(clean_test.images, clean_test.labels, clean_test.classes, name=f"backdoorbench:{rid}:test")
    test.meta["bd_test"] = BackdoorTest(timgs[keep], ttrue[keep], tbd[keep])

    info = {
        "record": str(record_path),
        "clean_data": name,
        "clean_root": str(root),
        "data_path": data_path,
        "model_name": str(rec["model_name"]),
        "num_classes": k,
        "img_size": [int(v) for v in img_size],
        "poisoned_train": int(mask.sum()),
        "bd_test": int(keep.sum()),
    }
    train.meta["backdoorbench"] = info
    test.meta["backdoorbench"] = info
    return train, test
