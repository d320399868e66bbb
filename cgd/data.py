"""Datasets as uint8 arrays: the :class:`ImageSet` and its loaders.

Every loader returns images as one ``(N, H, W, 3)`` uint8 array (RGB) and labels as ``(N,)``
int64, decoded once and cached on disk (``$CGD_CACHE`` or ``~/.cache/cgd``) keyed by the files'
names, sizes and modification times. Dataset specs are strings ``kind:PATH``:

``cifar10:ROOT``, ``cifar100:ROOT``, ``gtsrb:ROOT``, ``tinyimagenet:ROOT``, ``imagefolder:ROOT``,
``npz:FILE``, ``backdoorbench:RECORD_DIR``.

An ImageFolder root holding ``train/`` and ``test/`` uses them as the two splits.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import pickle
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

__all__ = [
    "ImageSet",
    "DatasetError",
    "load_dataset",
    "load_splits",
    "load_npz",
    "save_npz",
    "load_imagefolder",
    "load_cifar",
    "load_gtsrb",
    "load_tinyimagenet",
    "decode_images",
    "DATASET_KINDS",
    "IMAGE_EXTENSIONS",
    "cache_dir",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MAX_IMAGE_PIXELS = 8192 * 8192  # refuse decompression bombs; larger images need an explicit opt-in


class DatasetError(ValueError):
    """A dataset file or field is missing or malformed; the message names it."""


@dataclass
class ImageSet:
    """A labelled image set held as uint8 arrays.

    Attributes
    ----------
    images : np.ndarray, shape (N, H, W, 3), uint8, RGB.
    labels : np.ndarray, shape (N,), int64 in [0, len(classes)): the labels as given (possibly poisoned).
    classes : list of str, class names in label order.
    poison_mask : np.ndarray of bool, shape (N,), optional ground truth (True = poisoned).
    original_labels : np.ndarray, shape (N,), optional true labels before poisoning.
    name : str, a short description (source and split).
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    poison_mask: np.ndarray | None = None
    original_labels: np.ndarray | None = None
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        imgs = self.images
        where = f"ImageSet {self.name!r}" if self.name else "ImageSet"
        if not isinstance(imgs, np.ndarray) or imgs.ndim != 4 or imgs.shape[-1] != 3:
            raise DatasetError(f"{where}: images must be an (N, H, W, 3) array, got shape {getattr(imgs, 'shape', type(imgs))}")
        if imgs.dtype != np.uint8:
            raise DatasetError(f"{where}: images must be uint8, got {imgs.dtype}")
        self.labels = np.asarray(self.labels)
        if self.labels.ndim != 1 or len(self.labels) != len(imgs):
            raise DatasetError(f"{where}: labels must have shape ({len(imgs)},), got {self.labels.shape}")
        if self.labels.dtype.kind not in "iu":
            raise DatasetError(f"{where}: labels must be integers, got {self.labels.dtype}")
        self.labels = self.labels.astype(np.int64, copy=False)
        self.classes = [str(c) for c in self.classes]
        k = len(self.classes)
        if k < 2:
            raise DatasetError(f"{where}: needs at least 2 classes, got {k}")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= k):
            bad = int(self.labels[(self.labels < 0) | (self.labels >= k)][0])
            raise DatasetError(f"{where}: label {bad} out of range [0, {k}) for {k} classes")
        if self.poison_mask is not None:
            self.poison_mask = np.asarray(self.poison_mask).astype(bool)
            if self.poison_mask.shape != self.labels.shape:
                raise DatasetError(f"{where}: poison_mask must have shape {self.labels.shape}, got {self.poison_mask.shape}")
        if self.original_labels is not None:
            self.original_labels = np.asarray(self.original_labels).astype(np.int64)
            if self.original_labels.shape != self.labels.shape:
                raise DatasetError(f"{where}: original_labels must have shape {self.labels.shape}, got {self.original_labels.shape}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def has_ground_truth(self) -> bool:
        return self.poison_mask is not None

    def fingerprint(self) -> str:
        """SHA-256 (first 16 hex digits) of pixels, labels and order: equal sets give equal prints."""
        h = hashlib.sha256()
        h.update(str(self.images.shape).encode())
        h.update(np.ascontiguousarray(self.images).data)
        h.update(np.ascontiguousarray(self.labels).data)
        h.update("\n".join(self.classes).encode())
        return h.hexdigest()[:16]

    def subset(self, idx: np.ndarray | Sequence[int], name: str | None = None) -> "ImageSet":
        """Rows ``idx`` (any integer index array, order kept) as a new ImageSet."""
        idx = np.asarray(idx, dtype=np.int64)
        return replace(
            self,
            images=self.images[idx],
            labels=self.labels[idx],
            poison_mask=None if self.poison_mask is None else self.poison_mask[idx],
            original_labels=None if self.original_labels is None else self.original_labels[idx],
            name=self.name if name is None else name,
            meta={k: v for k, v in self.meta.items() if k != "source_index"},
        )

    def class_counts(self) -> np.ndarray:
        """(K,) int64: number of samples per given label."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def true_labels(self) -> np.ndarray:
        """(N,) the original labels where known, else the given labels."""
        return self.labels if self.original_labels is None else self.original_labels


# --------------------------------------------------------------------------------------------
# Decoding and caching
# --------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """Folder for decoded-array caches: ``$CGD_CACHE`` or ``~/.cache/cgd``."""
    d = Path(os.environ.get("CGD_CACHE", Path.home() / ".cache" / "cgd"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _files_key(files: Sequence[Path], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _cached(key: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Load arrays cached under ``key`` or build and cache them (atomic write, no pickle)."""
    path = cache_dir() / f"{key}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception:  # a corrupt cache entry is rebuilt
            path.unlink(missing_ok=True)
    arrays = build()
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return arrays


def _decode_one(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        if path.stat().st_size == 0:
            raise DatasetError(f"{path}: empty file (0 bytes), expected an image")
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise DatasetError(f"{path}: image of {w}x{h} pixels exceeds the limit of {MAX_IMAGE_PIXELS} pixels")
            if w < 2 or h < 2:
                raise DatasetError(f"{path}: image of {w}x{h} pixels is too small (expected at least 2x2)")
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                arr = (arr / max(arr.max(), 1) * 255).astype(np.uint8)
                im = Image.fromarray(arr)
            im = im.convert("RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except DatasetError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: cannot decode image ({e.__class__.__name__}: {e})") from None


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception as e:
        raise DatasetError(f"{path}: cannot read image header ({e})") from None


def decode_images(files: Sequence[Path], size: tuple[int, int] | None = None, workers: int | None = None) -> np.ndarray:
    """Decode image files to one (N, H, W, 3) uint8 array.

    ``size`` (H, W): resize every image to it (bicubic). When ``None`` all images must share a size,
    else the most common size among the first 256 is used and the others resized to it.
    Decoding runs in a thread pool (PIL releases the GIL while decoding).
    """
    from concurrent.futures import ThreadPoolExecutor

    files = [Path(f) for f in files]
    if not files:
        return np.zeros((0, 1, 1, 3), np.uint8)
    if size is None:
        sizes = Counter(_image_size(f) for f in files[:256])
        size = sizes.most_common(1)[0][0]
    out = np.empty((len(files), size[0], size[1], 3), np.uint8)

    def work(i: int) -> None:
        out[i] = _decode_one(files[i], size)

    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) * 2)) as ex:
        list(ex.map(work, range(len(files))))
    return out


# --------------------------------------------------------------------------------------------
# .npz
# --------------------------------------------------------------------------------------------

def save_npz(path: str | os.PathLike, train: ImageSet, test: ImageSet | None = None, **extra: np.ndarray) -> Path:
    """Write an ImageSet (and optional test split) as ``.npz`` readable without pickle.

    Keys: ``x`` (N,H,W,3) uint8, ``y`` (N,), ``classes`` (K,) str, optional ``poison_mask``,
    ``original_labels``, ``x_test``, ``y_test`` and any ``extra`` arrays. Written atomically.
    """
    path = Path(path)
    arrays: dict[str, np.ndarray] = {"x": train.images, "y": train.labels, "classes": np.array(train.classes, dtype=str)}
    if train.poison_mask is not None:
        arrays["poison_mask"] = train.poison_mask
    if train.original_labels is not None:
        arrays["original_labels"] = train.original_labels
    if test is not None:
        arrays["x_test"] = test.images
        arrays["y_test"] = test.labels
    arrays.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"{path}: no such .npz file")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        raise DatasetError(f"{path}: refused to load ({e}); object arrays (pickle) are not accepted") from None
    except Exception as e:
        raise DatasetError(f"{path}: not a readable .npz file ({e})") from None


def _as_nhwc(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 3:  # grayscale N,H,W
        x = np.repeat(x[..., None], 3, axis=-1)
    if x.ndim != 4:
        raise DatasetError(f"{where}: expected images of shape (N, H, W, 3), got {x.shape}")
    if x.shape[-1] != 3 and x.shape[1] in (1, 3):  # NCHW
        x = np.moveaxis(x, 1, -1)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if x.shape[-1] != 3:
        raise DatasetError(f"{where}: expected 3 colour channels, got shape {x.shape}")
    if x.dtype != np.uint8:
        if x.dtype.kind == "f":
            if not np.isfinite(x).all():
                raise DatasetError(f"{where}: images contain NaN or infinite values")
            scale = 255.0 if x.max() <= 1.0 + 1e-6 else 1.0
            x = np.clip(np.rint(x * scale), 0, 255).astype(np.uint8)
        elif x.dtype.kind in "iu":
            if x.min() < 0 or x.max() > 255:
                raise DatasetError(f"{where}: integer images must lie in [0, 255], got [{x.min()}, {x.max()}]")
            x = x.astype(np.uint8)
        else:
            raise DatasetError(f"{where}: images must be uint8 (or float in [0, 1]), got {x.dtype}")
    return np.ascontiguousarray(x)


def load_npz(path: str | os.PathLike, classes: Sequence[str] | None = None) -> tuple[ImageSet, ImageSet | None]:
    """Read a ``.npz`` with ``x``, ``y`` (required) and optional ``poison_mask``, ``original_labels``,
    ``classes``, ``x_test``/``y_test``. Returns (train, test or None)."""
    path = Path(path)
    z = _npz_arrays(path)
    for key in ("x", "y"):
        if key not in z:
            raise DatasetError(f"{path}: missing array {key!r} (found {sorted(z)})")
    x = _as_nhwc(z["x"], f"{path}[x]")
    y = z["y"]
    if y.ndim != 1 or len(y) != len(x):
        raise DatasetError(f"{path}[y]: expected shape ({len(x)},) to match x, got {y.shape}")
    if y.dtype.kind not in "iu":
        raise DatasetError(f"{path}[y]: labels must be integers, got {y.dtype}")
    if classes is None:
        if "classes" in z:
            classes = [str(c) for c in z["classes"]]
        else:
            k = int(max(y.max(initial=0), z["y_test"].max(initial=0) if "y_test" in z else 0)) + 1
            classes = [str(i) for i in range(k)]
    train = ImageSet(
        x, y, list(classes),
        poison_mask=z.get("poison_mask"),
        original_labels=z.get("original_labels"),
        name=f"{path.name}:train",
    )
    test = None
    if "x_test" in z:
        if "y_test" not in z:
            raise DatasetError(f"{path}: has x_test but no y_test")
        test = ImageSet(_as_nhwc(z["x_test"], f"{path}[x_test]"), z["y_test"], list(classes), name=f"{path.name}:test")
    if "x_test_bd" in z:
        from .evaluation import BackdoorTest

        for k in ("y_test_bd", "target_test_bd"):
            if k not in z:
                raise DatasetError(f"{path}: has x_test_bd but no {k} (true labels and target labels of the triggered test images)")
        bd = BackdoorTest(_as_nhwc(z["x_test_bd"], f"{path}[x_test_bd]"), z["y_test_bd"], z["target_test_bd"])
        if test is None:
            raise DatasetError(f"{path}: has x_test_bd but no clean test split (x_test, y_test)")
        test.meta["bd_test"] = bd
    return train, test


# --------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------

def _list_imagefolder(root: Path, on_bad: str = "skip") -> tuple[list[Path], list[int], list[str], int]:
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder (expected ROOT/<class>/<image files>)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise DatasetError(f"{root}: expected at least 2 class folders, found {len(classes)}")
    files: list[Path] = []
    labels: list[int] = []
    skipped = 0
    for i, c in enumerate(classes):
        n_before = len(files)
        for f in sorted((root / c).rglob("*")):
            if not f.is_file() or f.name.startswith("."):
                continue
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(f)
                labels.append(i)
            elif on_bad == "error":
                raise DatasetError(f"{f}: not an image file (extensions accepted: {', '.join(IMAGE_EXTENSIONS)})")
            else:
                skipped += 1
        if len(files) == n_before:
            raise DatasetError(f"{root / c}: class folder {c!r} holds no images")
    return files, labels, classes, skipped


def load_imagefolder(root: str | os.PathLike, size: tuple[int, int] | None = None, on_bad: str = "skip") -> ImageSet:
    """Read ``ROOT/<class>/<image>`` (classes sorted by name) into an ImageSet, cached.

    ``on_bad``: ``"skip"`` counts non-image files (in ``meta['skipped_files']``), ``"error"`` raises.
    Corrupt image files always raise a :class:`DatasetError` naming the file.
    """
    if on_bad not in ("skip", "error"):
        raise ValueError(f"on_bad must be 'skip' or 'error', got {on_bad!r}")
    root = Path(root)
    files, labels, classes, skipped = _list_imagefolder(root, on_bad)
    key = "imagefolder-" + _files_key(files, f"{root.resolve()}|{size}")
    arr = _cached(key, lambda: {"x": decode_images(files, size), "y": np.array(labels, np.int64)})
    s = ImageSet(arr["x"], arr["y"], classes, name=f"imagefolder:{root}")
    s.meta["skipped_files"] = skipped
    return s


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (torchvision's python pickle layout)
# --------------------------------------------------------------------------------------------

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR batches: plain containers and numpy arrays only, never code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise DatasetError(f"refused to unpickle {module}.{name}: CIFAR batches hold only arrays and lists")


def _read_cifar_batch(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path}: CIFAR batch file missing")
    with open(path, "rb") as f:
        try:
            d = _NumpyOnlyUnpickler(f, encoding="latin1").load()
        except DatasetError as e:
            raise DatasetError(f"{path}: {e}") from None
        except Exception as e:
            raise DatasetError(f"{path}: not a CIFAR python batch ({e})") from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def load_cifar(root: str | os.PathLike, split: str = "train", num_classes: int = 10, download: bool = False) -> ImageSet:
    """CIFAR-10/100 in torchvision's layout (``ROOT/cifar-10-batches-py`` or ``ROOT/cifar-100-python``).

    ``download=True`` fetches the archive through torchvision first (needs internet).
    """
    root = Path(root)
    if num_classes not in (10, 100):
        raise ValueError("num_classes must be 10 or 100")
    if download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if num_classes == 10 else torchvision.datasets.CIFAR100
        cls(str(root), train=(split == "train"), download=True)
    if num_classes == 10:
        base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta_file, meta_key, label_key = base / "batches.meta", "label_names", "labels"
    else:
        base = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
        names = ["train"] if split == "train" else ["test"]
        meta_file, meta_key, label_key = base / "meta", "fine_label_names", "fine_labels"
    xs, ys = [], []
    for n in names:
        d = _read_cifar_batch(base / n)
        if "data" not in d or label_key not in d:
            raise DatasetError(f"{base / n}: missing field 'data' or {label_key!r}")
        data = np.asarray(d["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DatasetError(f"{base / n}[data]: expected shape (N, 3072), got {data.shape}")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    classes = [str(c) for c in _read_cifar_batch(meta_file)[meta_key]] if meta_file.is_file() else [str(i) for i in range(num_classes)]
    return ImageSet(np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys), classes, name=f"cifar{num_classes}:{split}")


# --------------------------------------------------------------------------------------------
# GTSRB (official Final_Training/Final_Test layout, and torchvision's GTSRB layout)
# --------------------------------------------------------------------------------------------

GTSRB_SIZE = (32, 32)


def _gtsrb_base(root: Path) -> Path:
    for cand in (root, root / "GTSRB", root / "gtsrb" / "GTSRB", root / "gtsrb"):
        if (cand / "Final_Training").is_dir() or (cand / "Training").is_dir() or (cand / "Final_Test").is_dir():
            return cand
    raise DatasetError(f"{root}: no GTSRB layout found (expected GTSRB/Final_Training/Images/000NN/ or gtsrb/GTSRB/Training/)")


def _read_gt_csv(path: Path) -> list[tuple[str, int]]:
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter=";")
        if reader.fieldnames is None or "Filename" not in reader.fieldnames or "ClassId" not in reader.fieldnames:
            raise DatasetError(f"{path}: expected ';'-separated columns Filename and ClassId, got {reader.fieldnames}")
        for r in reader:
            rows.append((r["Filename"], int(r["ClassId"])))
    return rows


def load_gtsrb(root: str | os.PathLike, split: str = "train", size: tuple[int, int] = GTSRB_SIZE, download: bool = False) -> ImageSet:
    """GTSRB (43 classes) resized to ``size``, from the official or torchvision layout."""
    root = Path(root)
    if download:
        import torchvision

        torchvision.datasets.GTSRB(str(root), split="train" if split == "train" else "test", download=True)
    base = _gtsrb_base(root)
    files: list[Path] = []
    labels: list[int] = []
    if split == "train":
        img_root = base / "Final_Training" / "Images" if (base / "Final_Training").is_dir() else base / "Training"
        if not img_root.is_dir():
            raise DatasetError(f"{img_root}: GTSRB training images folder missing")
        for d in sorted(p for p in img_root.iterdir() if p.is_dir()):
            cls = int(d.name)
            for f in sorted(d.iterdir()):
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    files.append(f)
                    labels.append(cls)
    else:
        test_root = base / "Final_Test" / "Images" if (base / "Final_Test").is_dir() else base / "Final_Test"
        gt = None
        for cand in (base / "Final_Test" / "GT-final_test.csv", base / "GT-final_test.csv", test_root / "GT-final_test.csv", root / "GT-final_test.csv"):
            if cand.is_file():
                gt = cand
                break
        if gt is None:
            raise DatasetError(f"{base}: GTSRB test labels GT-final_test.csv not found")
        for fn, cls in _read_gt_csv(gt):
            files.append(test_root / fn)
            labels.append(cls)
    if not files:
        raise DatasetError(f"{base}: no GTSRB images found for split {split!r}")
    key = f"gtsrb-{split}-" + _files_key(files, f"{base.resolve()}|{size}")
    arr = _cached(key, lambda: {"x": decode_images(files, size), "y": np.array(labels, np.int64)})
    from .zero_shot_metadata import GTSRB_CLASSNAMES

    return ImageSet(arr["x"], arr["y"], list(GTSRB_CLASSNAMES), name=f"gtsrb:{split}")


# --------------------------------------------------------------------------------------------
# Tiny-ImageNet (tiny-imagenet-200)
# --------------------------------------------------------------------------------------------

def load_tinyimagenet(root: str | os.PathLike, split: str = "train") -> ImageSet:
    """Tiny-ImageNet-200: ``train/<wnid>/images/*.JPEG`` and ``val/images`` + ``val_annotations.txt``."""
    root = Path(root)
    base = root / "tiny-imagenet-200" if (root / "tiny-imagenet-200").is_dir() else root
    wnids_file = base / "wnids.txt"
    if not wnids_file.is_file():
        raise DatasetError(f"{base}: wnids.txt missing (expected the tiny-imagenet-200 layout)")
    wnids = [w.strip() for w in wnids_file.read_text().split() if w.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    names = dict(wnids and [(w, w) for w in wnids])
    words = base / "words.txt"
    if words.is_file():
        for line in words.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 2 and parts[0] in index:
                names[parts[0]] = parts[1].split(",")[0].strip()
    files: list[Path] = []
    labels: list[int] = []
    if split == "train":
        for w in wnids:
            d = base / "train" / w / "images"
            if not d.is_dir():
                raise DatasetError(f"{d}: missing training folder for class {w}")
            for f in sorted(d.iterdir()):
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    files.append(f)
                    labels.append(index[w])
    else:
        ann = base / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise DatasetError(f"{ann}: validation annotations missing")
        for line in ann.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 2:
                continue
            if parts[1] not in index:
                raise DatasetError(f"{ann}: unknown class id {parts[1]!r} (not in wnids.txt)")
            files.append(base / "val" / "images" / parts[0])
            labels.append(index[parts[1]])
    key = f"tiny-{split}-" + _files_key(files, str(base.resolve()))
    arr = _cached(key, lambda: {"x": decode_images(files, (64, 64)), "y": np.array(labels, np.int64)})
    return ImageSet(arr["x"], arr["y"], [names[w] for w in wnids], name=f"tinyimagenet:{split}")


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------

DATASET_KINDS = ("cifar10", "cifar100", "gtsrb", "tinyimagenet", "imagefolder", "npz", "backdoorbench")


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``kind:PATH`` and check the kind."""
    if ":" not in spec:
        raise DatasetError(f"dataset spec {spec!r}: expected KIND:PATH with KIND one of {', '.join(DATASET_KINDS)}")
    kind, path = spec.split(":", 1)
    kind = kind.lower().replace("-", "")
    if kind not in DATASET_KINDS:
        raise DatasetError(f"dataset spec {spec!r}: unknown kind {kind!r}; expected one of {', '.join(DATASET_KINDS)}")
    if not path:
        raise DatasetError(f"dataset spec {spec!r}: empty path")
    return kind, path


def load_splits(spec: str, download: bool = False) -> tuple[ImageSet, ImageSet | None]:
    """Load (train, test) from a ``kind:PATH`` spec; test is ``None`` where the source has none."""
    kind, path = parse_spec(spec)
    if kind in ("cifar10", "cifar100"):
        k = 10 if kind == "cifar10" else 100
        return load_cifar(path, "train", k, download), load_cifar(path, "test", k, False)
    if kind == "gtsrb":
        return load_gtsrb(path, "train", download=download), load_gtsrb(path, "test", download=False)
    if kind == "tinyimagenet":
        return load_tinyimagenet(path, "train"), load_tinyimagenet(path, "val")
    if kind == "imagefolder":
        root = Path(path)
        if (root / "train").is_dir():
            train = load_imagefolder(root / "train")
            test = load_imagefolder(root / "test", size=train.image_size) if (root / "test").is_dir() else None
            if test is not None and test.classes != train.classes:
                raise DatasetError(f"{root}: test/ classes {test.classes} differ from train/ classes {train.classes}")
            return train, test
        return load_imagefolder(root), None
    if kind == "npz":
        return load_npz(path)
    if kind == "backdoorbench":
        from .backdoorbench import load_backdoorbench

        return load_backdoorbench(path)
    raise AssertionError(kind)


def load_dataset(spec: str, split: str = "train", download: bool = False) -> ImageSet:
    """One split (``"train"`` or ``"test"``) of a ``kind:PATH`` spec."""
    train, test = load_splits(spec, download)
    if split == "train":
        return train
    if test is None:
        raise DatasetError(f"{spec}: has no test split")
    return test


def seeded_subset(s: ImageSet, n: int | None, seed: int) -> ImageSet:
    """The first ``n`` samples after a seeded shuffle (order of the shuffle kept); all if ``n`` is None."""
    if n is None or n >= len(s):
        return s
    perm = np.random.default_rng(seed).permutation(len(s))[:n]
    sub = s.subset(perm)
    base = s.meta.get("source_index")
    sub.meta["source_index"] = perm if base is None else np.asarray(base)[perm]
    return sub
