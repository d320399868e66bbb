"""BackdoorBench attack records (``backdoorbench:RECORD_DIR``): the record format, read safely.

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

The clean images are not in the record: they are the named dataset at ``data_path``. This module
knows the record format only (it imports nothing from :mod:`cgd.data`): it reads and checks the
record, lists the folders that may hold the clean dataset, and turns the record's dataset states into
arrays given the clean split's labels. :func:`cgd.data.load_backdoorbench` joins it with the clean
dataset from the dataset registry (``backdoorbench:RECORD_DIR`` specs). The record is read with
``torch.load(weights_only=True)`` and a narrow allowlist of numpy array/dtype/scalar reconstructors,
so a record holding any other Python object is refused without running it.

The clean data's folder comes from, in order: the caller's ``clean_root`` (and ``clean_root/<leaf of
data_path>``), else ``data_path`` itself (absolute, or relative to the record folder and to the
BackdoorBench folder above ``record/``). A ``data_path`` with ``..`` components is refused outright;
with an ``allowed_root`` every candidate is resolved (symlinks followed) and one that lands outside
it is refused (the BackdoorBench-folder guesses are just not tried).
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence

import numpy as np

from .arrays import DatasetError, cached_arrays, files_key, to_uint8_images

__all__ = ["load_record", "read_record", "Record", "clean_candidates", "PoisonedSplit", "poisoned_split",
           "poisoned_train", "backdoor_test", "check_num_classes", "RECORD_FILE", "RECORD_KEYS", "DATASET_ALIASES"]

RECORD_FILE = "attack_result.pt"
RECORD_KEYS = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test")
# BackdoorBench dataset names that differ from the cgd dataset kind (cgd.data.DATASET_KINDS) holding them
DATASET_ALIASES = {"tiny": "tinyimagenet"}

Decoder = Callable[[Sequence[Path], tuple[int, int]], np.ndarray]
"""``decode(files, (H, W)) -> (len(files), H, W, 3) uint8``: how poisoned PNGs are decoded
(:func:`cgd.data.decode_images`)."""


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
# The record and where its clean data is
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """A checked attack record.

    path : the ``attack_result.pt``; data : the record dict as loaded; clean_data : BackdoorBench's
    dataset name, lower-cased (``"cifar10"``, ``"tiny"``, ...); kind : the cgd dataset kind holding
    it (:data:`DATASET_ALIASES` applied); size : ``img_size`` as (H, W) pixels; data_path : as stored.
    """

    path: Path
    data: dict
    clean_data: str
    kind: str
    size: tuple[int, int]
    data_path: str

    @property
    def dir(self) -> Path:
        return self.path.parent


def read_record(record_dir: str | os.PathLike) -> Record:
    """Load and check the record in ``record_dir`` (a record folder or its ``attack_result.pt``)."""
    rp = Path(record_dir).expanduser()
    record_path = rp if rp.is_file() else rp / RECORD_FILE
    if not record_path.is_file():
        raise DatasetError(f"{rp}: no {RECORD_FILE} found (expected a BackdoorBench record folder record/<name>/)")
    rec = load_record(record_path)
    name = str(rec["clean_data"]).lower()
    img_size = rec["img_size"]
    try:
        size = (int(img_size[0]), int(img_size[1]))
    except Exception:
        raise DatasetError(f"{record_path}[img_size]: expected (H, W, C), got {img_size!r}") from None
    data_path = rec["data_path"]
    if not isinstance(data_path, str):
        raise DatasetError(f"{record_path}[data_path]: expected a string, got {type(data_path).__name__}")
    return Record(record_path, rec, name, DATASET_ALIASES.get(name, name), size, data_path)


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def clean_candidates(record: Record, clean_root: str | os.PathLike | None = None,
                     allowed_root: str | os.PathLike | None = None) -> list[Path]:
    """Folders that may hold the record's clean dataset, most specific first (see the module docstring).

    Raises :class:`DatasetError` naming the record and the path for a ``data_path`` with ``..``
    components, and, with ``allowed_root``, for a candidate (``clean_root``, ``clean_root/<leaf>``,
    the absolute ``data_path`` or ``data_path`` under the record folder) resolving outside it; the
    candidates are then returned resolved.
    """
    raw = str(record.data_path).replace("\\", "/")
    dp = PurePosixPath(raw)
    if ".." in dp.parts:
        raise DatasetError(f"{record.path}[data_path]: {record.data_path!r} has '..' components; refused "
                           "(a record's data_path must name its dataset folder without climbing out of folders)")
    leaf = dp.name
    primary: list[tuple[Path, str]] = []
    guesses: list[Path] = []
    if clean_root is not None:
        root = Path(clean_root).expanduser()
        primary.append((root, "the clean data root"))
        if leaf:
            primary.append((root / leaf, f"the clean data root and data_path {record.data_path!r}"))
    elif dp.is_absolute():
        primary.append((Path(dp), f"data_path {record.data_path!r}"))
    else:
        primary.append((record.dir / dp, f"data_path {record.data_path!r} under the record folder"))
        # BackdoorBench runs from its root with records in ./record/<name> and data in ./data/<name>
        parts = dp.parts
        if "data" in parts:
            tail = PurePosixPath(*parts[parts.index("data"):])
            guesses = [anc / tail for anc in (record.dir.parent.parent, record.dir.parent)]
    if allowed_root is None:
        cands = [c for c, _ in primary] + guesses
    else:
        ar = Path(allowed_root).expanduser().resolve()
        cands = []
        for c, why in primary:
            r = c.resolve()
            if not _within(r, ar):
                raise DatasetError(f"{record.path}: clean data path {c} (from {why}) resolves to {r}, outside the "
                                   f"allowed data root {ar}; refused")
            cands.append(r)
        cands += [r for r in (g.resolve() for g in guesses) if _within(r, ar)]
    out: list[Path] = []
    for c in cands:
        if c not in out:
            out.append(c)
    return out


def check_num_classes(record: Record, k: int, clean_desc: str) -> None:
    """Raise unless the record's ``num_classes`` equals ``k``, the clean dataset's class count."""
    if int(record.data["num_classes"]) != k:
        raise DatasetError(f"{record.path}[num_classes]: record says {record.data['num_classes']} classes, the clean "
                           f"{record.clean_data} dataset at {clean_desc} has {k}")


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
    x = to_uint8_images(img[None], where)[0]
    if x.shape[:2] != tuple(size):
        from PIL import Image

        x = np.asarray(Image.fromarray(x).resize((size[1], size[0]), Image.BICUBIC), dtype=np.uint8)
    return x


@dataclass
class PoisonedSplit:
    """One dataset state of a record, decoded.

    rows : (M,) int64, the clean-split indices making up the dataset, in order.
    positions : (P,) int64, positions in ``rows`` that are poisoned.
    images : (P, H, W, 3) uint8, the poisoned images.
    bd_labels, true_labels : (P,) int64, their given (poisoned) and original labels.
    """

    rows: np.ndarray
    positions: np.ndarray
    images: np.ndarray
    bd_labels: np.ndarray
    true_labels: np.ndarray


def poisoned_split(state: Any, part: str, n_clean: int, size: tuple[int, int], record_path: Path,
                   decode: Decoder) -> PoisonedSplit:
    """Decode one dataset state (``bd_train`` or ``bd_test``) over a clean split of ``n_clean``
    images; poisoned PNGs are read with ``decode`` (resized to ``size`` (H, W)) and cached."""
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
        key = f"bdb-{part}-" + files_key([record_path, *files], f"{record_path.resolve()}|{size}")
        arr = cached_arrays(key, lambda: {"x": decode(files, size)})["x"]
        images[np.asarray(file_pos)] = arr
    return PoisonedSplit(rows, poisoned_pos.astype(np.int64), images, bd_labels, true_labels)


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
# The record's two datasets as arrays
# --------------------------------------------------------------------------------------------

def poisoned_train(record: Record, clean_labels: np.ndarray, num_classes: int, decode: Decoder, clean_desc: str,
                   size: tuple[int, int]) -> tuple[np.ndarray, PoisonedSplit]:
    """The training set the victim saw: ``(rows, split)`` where ``rows`` (M,) are the clean training
    indices in order and ``split`` holds the poisoned samples (positions into ``rows``). Checks the
    record's original labels against ``clean_labels`` (N,) and the poisoned labels against
    ``num_classes``. ``size`` (H, W): the clean images' size."""
    if record.data["bd_train"] is None:
        raise DatasetError(f"{record.path}[bd_train]: the record holds no poisoned training set (the attack poisons "
                           "batches during training), so there is no training set to audit")
    sp = _checked_split(record, "bd_train", "poisoned label", clean_labels, num_classes, decode, clean_desc, size)
    return sp.rows, sp


def _checked_split(record: Record, key: str, what: str, clean_labels: np.ndarray, num_classes: int, decode: Decoder,
                   clean_desc: str, size: tuple[int, int]):
    """The record's poisoned split ``key`` ("bd_train"/"bd_test"), its true labels checked against the
    clean labels and its poisoned labels (``what``, for the message) against the class count."""
    sp = poisoned_split(record.data[key], key, len(clean_labels), size, record.path, decode)
    _check_true_labels(sp.true_labels, clean_labels[sp.rows[sp.positions]], f"{record.path}[{key}]", clean_desc)
    bd = sp.bd_labels
    if len(bd) and (bd.min() < 0 or bd.max() >= num_classes):
        raise DatasetError(f"{record.path}[{key}]: {what} {int(bd[(bd < 0) | (bd >= num_classes)][0])} "
                           f"out of range [0, {num_classes})")
    return sp


def backdoor_test(record: Record, clean_labels: np.ndarray, num_classes: int, decode: Decoder, clean_desc: str,
                  size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The triggered test images whose true label differs from the target: ``(images (M, H, W, 3)
    uint8, true_labels (M,), target_labels (M,))``, checked against the clean test labels (N,)."""
    sp = _checked_split(record, "bd_test", "target label", clean_labels, num_classes, decode, clean_desc, size)
    tbd = sp.bd_labels
    keep = sp.true_labels != tbd
    return sp.images[keep], sp.true_labels[keep], tbd[keep]
