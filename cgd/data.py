"""Datasets as uint8 arrays: the :class:`ImageSet`, its loaders and the dataset-kind registry.

Every loader returns images as one ``(N, H, W, 3)`` uint8 array (RGB) and labels as ``(N,)``
int64, decoded once and cached on disk (``$CGD_CACHE`` or ``~/.cache/cgd``) keyed by the files'
names, sizes and modification times. Loaders that decode image files (ImageFolder, GTSRB,
Tiny-ImageNet) stream the decoded pixels into an ``.npy`` file in the cache and return it
memory-mapped (``mmap_mode='r'``): a set larger than RAM loads in constant memory, and
:func:`iter_row_chunks` / :func:`release_pages` walk such an array without keeping it resident
(generic array I/O lives in :mod:`cgd.arrays`).

Dataset specs are strings ``kind:PATH`` with the kinds of :data:`DATASET_KINDS` (one registry read by
the loaders, the CLI help and the dashboard): ``cifar10:ROOT``, ``cifar100:ROOT``, ``gtsrb:ROOT``,
``tinyimagenet:ROOT``, ``imagefolder:ROOT``, ``npz:FILE``, ``backdoorbench:RECORD_DIR`` (a
BackdoorBench attack record, read by :mod:`cgd.backdoorbench` and joined with its clean dataset by
:func:`load_backdoorbench`). An ImageFolder root holding ``train/`` and ``test/`` uses them as the two splits.

Untrusted input is bounded before anything large is allocated: ``.npz`` files by their zip directory
and ``.npy`` headers (:func:`inspect_npz`), CIFAR batches by their size (a pickle cannot declare more
bytes than the file holds), implied class counts by :data:`MAX_CLASSES`; ImageFolder symlinks are
followed only inside the dataset folder. Importing this module does not import torch.
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
from typing import Any, Callable, Sequence

import numpy as np

from . import backdoorbench as _bb
from .arrays import (  # noqa: F401  (iter_row_chunks, release_pages, take_rows, cache_dir: re-exported)
    DatasetError,
    NpyWriter,
    atomic_savez,
    cache_dir,
    cached_arrays,
    files_key,
    inspect_npz,
    iter_row_chunks,
    read_npz,
    release_pages,
    remove_stale_temps,
    take_rows,
    to_uint8_images,
)
from .arrays import SPILL_BYTES as _DEFAULT_SPILL_BYTES
from .zero_shot_metadata import GTSRB_CLASSNAMES

__all__ = [
    "ON_BAD_FILES",
    "ImageSet",
    "BackdoorTest",
    "DatasetError",
    "DatasetKind",
    "DATASET_KINDS",
    "DATASET_KIND_NAMES",
    "parse_spec",
    "spec_help",
    "load_dataset",
    "load_splits",
    "load_npz",
    "inspect_npz",
    "save_npz",
    "load_imagefolder",
    "load_cifar",
    "load_gtsrb",
    "load_tinyimagenet",
    "load_backdoorbench",
    "decode_images",
    "iter_row_chunks",
    "release_pages",
    "take_rows",
    "IMAGE_EXTENSIONS",
    "MAX_CLASSES",
    "cache_dir",
    "seeded_subset",
]

# what an image folder's loader does with files it cannot use: "error" stops at the first (naming it);
# "skip" leaves out files that are not images and links leading outside (counted) and stops at an
# image file that cannot be decoded; "skip-unreadable" also leaves those out (counted)
ON_BAD_FILES = ("skip", "error", "skip-unreadable")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# refuse decompression bombs; larger images need an explicit opt-in ($CGD_MAX_IMAGE_PIXELS)
MAX_IMAGE_PIXELS = int(os.environ.get("CGD_MAX_IMAGE_PIXELS") or 8192 * 8192)
# a class list implied by labels alone (an .npz without `classes`) is bounded; see load_npz
MAX_CLASSES = 100_000
SPILL_BYTES = _DEFAULT_SPILL_BYTES  # ImageSet.subset: larger selections from a memory map go to a temp file

# old private names, now in cgd.arrays
_files_key = files_key
_cached = cached_arrays
_as_nhwc = to_uint8_images


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
            pm = np.asarray(self.poison_mask)
            if pm.dtype != bool:
                if pm.dtype.kind not in "biuf":
                    raise DatasetError(f"{where}: poison_mask must hold booleans or 0/1, got dtype {pm.dtype}")
                bad = pm[(pm != 0) & (pm != 1)]
                if bad.size:
                    raise DatasetError(f"{where}: poison_mask must hold booleans or 0/1, found the value {bad.flat[0].item()!r}")
            self.poison_mask = pm.astype(bool)
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
        """SHA-256 (first 16 hex digits) of pixels, labels and order: equal sets give equal prints.

        Hashes the pixels chunk by chunk (constant memory for a memory-mapped set)."""
        h = hashlib.sha256()
        h.update(str(self.images.shape).encode())
        for _, _, chunk in iter_row_chunks(self.images):
            h.update(np.ascontiguousarray(chunk).data)
        h.update(np.ascontiguousarray(self.labels).data)
        h.update("\n".join(self.classes).encode())
        return h.hexdigest()[:16]

    def subset(self, idx: np.ndarray | Sequence[int], name: str | None = None) -> "ImageSet":
        """Rows ``idx`` (any integer index array, order kept) as a new ImageSet.

        A large subset of memory-mapped images stays on disk (see :func:`take_rows`)."""
        idx = np.asarray(idx, dtype=np.int64)
        return replace(
            self,
            images=take_rows(self.images, idx, SPILL_BYTES),
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


@dataclass
class BackdoorTest:
    """Triggered test images for ASR/RA.

    images : (M, H, W, 3) uint8, test images with the trigger applied (only samples whose true
        label differs from their target).
    true_labels : (M,) int64, the images' real classes.
    target_labels : (M,) int64, the class the attacker wants (all equal for all-to-one).
    """

    images: np.ndarray
    true_labels: np.ndarray
    target_labels: np.ndarray

    def __post_init__(self) -> None:
        self.true_labels = np.asarray(self.true_labels, np.int64)
        self.target_labels = np.asarray(self.target_labels, np.int64)
        if not (len(self.images) == len(self.true_labels) == len(self.target_labels)):
            raise ValueError("BackdoorTest: images, true_labels and target_labels must have equal lengths")

    def __len__(self) -> int:
        return len(self.true_labels)



# --------------------------------------------------------------------------------------------
# Decoding and caching
# --------------------------------------------------------------------------------------------

def _cached_images(key: str, files: Sequence[str | Path], size: tuple[int, int] | None,
                   **small: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """Decoded ``files`` (memory-mapped read-only, see :func:`decode_images`), the ``small``
    arrays (labels) and how many files were resized to the common size, cached under ``key``.

    The pixels live in ``KEY.x.npy`` (streamed, renamed into place when complete), the small arrays
    in ``KEY.npz``, written last: an entry counts only when both exist and agree on N, so a killed
    or failed build leaves nothing that is ever read back (its temp files are removed by the next).
    """
    d = cache_dir()
    xp, zp = d / f"{key}.x.npy", d / f"{key}.npz"
    if zp.is_file() and xp.is_file():
        try:
            with np.load(zp, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            x = np.load(xp, mmap_mode="r", allow_pickle=False)
            n_ok = int(arrays.pop("_n", -1)) == len(files) == len(x)
            resized = int(arrays.pop("_resized", -1))  # entries from before the count was kept are rebuilt
            if (n_ok and resized >= 0 and x.dtype == np.uint8 and x.ndim == 4 and x.shape[-1] == 3
                    and set(arrays) == set(small)):
                return x, arrays, resized
        except Exception:  # a corrupt cache entry is rebuilt
            pass
    zp.unlink(missing_ok=True)
    xp.unlink(missing_ok=True)
    remove_stale_temps(d, prefix=f".{key}.")
    stats: dict[str, Any] = {}
    x = decode_images(files, size, out=xp, stats=stats)
    atomic_savez(zp, _n=np.int64(len(files)), _resized=np.int64(stats["resized"]), **small)
    return x, dict(small), int(stats["resized"])


def _pil():
    """PIL's Image module. Its own decompression-bomb *warning* (above ~89 Mpx) is silenced: every
    image is checked against :data:`MAX_IMAGE_PIXELS` (smaller) and refused with a clear error."""
    import warnings

    from PIL import Image

    if not any(f[0] == "ignore" and f[2] is Image.DecompressionBombWarning for f in warnings.filters):
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    return Image


def _decode_one(path: str | Path, size: tuple[int, int] | None) -> np.ndarray:
    """One image file as (H, W, 3) uint8, resized to ``size`` (H, W) when given."""
    return _decode_file(path, size)[0]


def _decode_file(path: str | Path, size: tuple[int, int] | None) -> tuple[np.ndarray, bool]:
    """(:func:`_decode_one`'s array, whether the image had to be resized)."""
    from PIL import UnidentifiedImageError

    Image = _pil()

    try:
        if os.stat(path).st_size == 0:
            raise DatasetError(f"{path}: empty file (0 bytes), expected an image")
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise DatasetError(f"{path}: image of {w}x{h} pixels exceeds the limit of {MAX_IMAGE_PIXELS} pixels")
            if w < 2 or h < 2:
                raise DatasetError(f"{path}: image of {w}x{h} pixels is too small (expected at least 2x2)")
            if im.mode.startswith("I;16") or im.mode in ("I", "F"):
                # 16-bit (and 32-bit) greyscale: map the full 16-bit range onto 8 bits (65535 -> 255),
                # keeping 8-bit-valued data as is; never stretch by the image's own maximum
                arr = np.asarray(im, dtype=np.float64)
                top = arr.max(initial=0)
                scale = 1.0 if top <= 255 else 255.0 / 65535.0 if top <= 65535 else 255.0 / top
                arr = np.clip(np.rint(np.clip(arr, 0, None) * scale), 0, 255).astype(np.uint8)
                im = Image.fromarray(arr)
            im = im.convert("RGB")
            resized = size is not None and im.size != (size[1], size[0])
            if resized:
                im = im.resize((size[1], size[0]), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8), resized
    except DatasetError:
        raise
    except Image.DecompressionBombError as e:
        raise DatasetError(f"{path}: image refused as a decompression bomb ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: cannot decode image ({e.__class__.__name__}: {e})") from None


def _image_size(path: str | Path) -> tuple[int, int]:
    Image = _pil()

    try:
        if os.stat(path).st_size == 0:
            raise DatasetError(f"{path}: empty file (0 bytes), expected an image")
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"{path}: cannot read image header ({e})") from None


def decode_images(files: Sequence[str | Path], size: tuple[int, int] | None = None, workers: int | None = None,
                  out: str | os.PathLike | None = None, stats: dict | None = None) -> np.ndarray:
    """Decode image files to one (N, H, W, 3) uint8 array.

    ``size`` (H, W): resize every image to it (bicubic). When ``None`` all images must share a size,
    else the most common size among the first 256 is used and the others resized to it.
    Decoding runs in a thread pool (PIL releases the GIL while decoding), in chunks of rows; the
    first bad file stops it with a :class:`DatasetError` naming the file.

    ``out``: a path: stream the pixels into an ``.npy`` file there instead of memory — each worker
    writes its decoded chunk straight into a temp file (``os.pwrite``), which is renamed onto
    ``out`` once every image is in and removed on any error — and return it memory-mapped
    read-only. Resident memory stays at a few chunks whatever N is.

    ``stats``: a dict that receives ``"resized"`` (how many images had another size than the
    output and were resized) and ``"size"`` ((H, W), the output size).
    """
    files = [os.fspath(f) for f in files]  # plain strings: a list of a million Paths alone takes ~400 MB
    if stats is not None:
        stats.update(resized=0, size=None)
    if not files:
        return np.zeros((0, 1, 1, 3), np.uint8)
    if size is None:
        sizes = Counter(_image_size(f) for f in files[:256])
        size = sizes.most_common(1)[0][0]
    size = (int(size[0]), int(size[1]))
    shape = (len(files), size[0], size[1], 3)
    if out is None:
        arr = np.empty(shape, np.uint8)

        def put(lo: int, block: np.ndarray) -> None:
            arr[lo:lo + len(block)] = block

        resized = _decode_into(files, size, workers, put)
    else:
        with NpyWriter(out, shape, np.uint8) as w:
            resized = _decode_into(files, size, workers, w.write_at)
        arr = np.load(out, mmap_mode="r", allow_pickle=False)
    if stats is not None:
        stats.update(resized=resized, size=size)
    return arr


def _decode_into(files: Sequence[str], size: tuple[int, int], workers: int | None,
                 sink: Callable[[int, np.ndarray], None]) -> int:
    """Decode ``files`` in chunks on a thread pool; ``sink(first_row, block)`` receives each chunk.
    Returns how many images were resized to ``size``.

    Fails fast: the first error stops the other workers and is raised (lowest chunk first)."""
    import threading
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    n = len(files)
    step = int(np.clip((8 << 20) // max(size[0] * size[1] * 3, 1), 1, 256))
    stop = threading.Event()

    def work(lo: int) -> int:
        hi = min(lo + step, n)
        buf = np.empty((hi - lo, size[0], size[1], 3), np.uint8)
        resized = 0
        for i in range(lo, hi):
            if stop.is_set():
                return resized
            buf[i - lo], r = _decode_file(files[i], size)
            resized += r
        sink(lo, buf)
        return resized

    ex = ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) * 2))
    futs = [ex.submit(work, lo) for lo in range(0, n, step)]
    try:
        wait(futs, return_when=FIRST_EXCEPTION)
        failed = [f for f in futs if f.done() and not f.cancelled() and f.exception() is not None]
        if failed:
            raise failed[0].exception()
        return sum(f.result() for f in futs)
    except BaseException:
        stop.set()
        for f in futs:
            f.cancel()
        raise
    finally:
        ex.shutdown(wait=True)


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
    return atomic_savez(path, **arrays)


def _implied_classes(path: Path, z: dict[str, np.ndarray]) -> list[str]:
    """Class names "0".."K-1" for an ``.npz`` without ``classes``: K = 1 + the largest label in ``y``
    and ``y_test``. Bounded before anything is built: K must be at most :data:`MAX_CLASSES` and,
    above 1,000 classes, at most the number of labelled samples (more classes than samples is a
    corrupt label field, not a dataset)."""
    top, field_, n = 0, "y", 0
    for key in ("y", "y_test"):
        if key in z:
            y = z[key]
            if y.ndim != 1 or y.dtype.kind not in "iu":
                continue  # reported by the label checks
            n += len(y)
            m = int(y.max(initial=0))
            if m > top:
                top, field_ = m, key
    k = top + 1
    if k > MAX_CLASSES or (k > 1000 and k > n):
        raise DatasetError(f"{path}[{field_}]: label {top} implies {k:,} classes for {n:,} labelled samples; expected "
                           f"at most {MAX_CLASSES:,} classes and, above 1,000, no more classes than samples "
                           "(add a 'classes' array naming them if the labels are right)")
    return [str(i) for i in range(k)]


def load_npz(path: str | os.PathLike, classes: Sequence[str] | None = None) -> tuple[ImageSet, ImageSet | None]:
    """Read a ``.npz`` with ``x``, ``y`` (required) and optional ``poison_mask``, ``original_labels``,
    ``classes``, ``x_test``/``y_test`` (and ``x_test_bd``, ``y_test_bd``, ``target_test_bd``).
    Returns (train, test or None).

    The file is checked by :func:`inspect_npz` (sizes, zip bombs, object arrays) before any array
    is read. Images follow :func:`cgd.arrays.to_uint8_images` (dtype/range rules, at least 2x2);
    every split must have the training images' size; ``poison_mask`` holds booleans or 0/1.
    """
    path = Path(path)
    z = read_npz(path)
    for key in ("x", "y"):
        if key not in z:
            raise DatasetError(f"{path}: missing array {key!r} (found {sorted(z)})")
    x = to_uint8_images(z["x"], f"{path}[x]")
    y = z["y"]
    if y.ndim != 1 or len(y) != len(x):
        raise DatasetError(f"{path}[y]: expected shape ({len(x)},) to match x, got {y.shape}")
    if y.dtype.kind not in "iu":
        raise DatasetError(f"{path}[y]: labels must be integers, got {y.dtype}")
    if classes is None:
        if "classes" in z:
            if z["classes"].ndim != 1:
                raise DatasetError(f"{path}[classes]: expected a (K,) array of class names, got shape {z['classes'].shape}")
            if len(z["classes"]) > MAX_CLASSES:
                raise DatasetError(f"{path}[classes]: {len(z['classes']):,} class names, more than the limit of {MAX_CLASSES:,}")
            classes = [str(c) for c in z["classes"]]
        else:
            classes = _implied_classes(path, z)
    k = len(classes)
    _check_labels(y, k, f"{path}[y]", len(x))
    for key in ("poison_mask", "original_labels"):
        if key in z and z[key].shape != y.shape:
            raise DatasetError(f"{path}[{key}]: expected shape {y.shape} to match y, got {z[key].shape}")
    if "original_labels" in z:
        _check_labels(z["original_labels"], k, f"{path}[original_labels]", len(x))
    if "poison_mask" in z:
        pm = z["poison_mask"]
        if pm.dtype.kind not in "biu":
            raise DatasetError(f"{path}[poison_mask]: expected booleans (or 0/1 integers), got {pm.dtype}")
        if pm.dtype.kind != "b" and pm.size and (pm.min() < 0 or pm.max() > 1):
            bad = pm[(pm < 0) | (pm > 1)][0]
            raise DatasetError(f"{path}[poison_mask]: expected booleans (or 0/1 integers), found the value {bad}")
    try:
        train = ImageSet(
            x, y, list(classes),
            poison_mask=z.get("poison_mask"),
            original_labels=z.get("original_labels"),
            name=f"{path.name}:train",
        )
    except DatasetError as e:
        raise DatasetError(f"{path}: {e}") from None
    test = None
    if "x_test" in z:
        if "y_test" not in z:
            raise DatasetError(f"{path}: has x_test but no y_test")
        xt = to_uint8_images(z["x_test"], f"{path}[x_test]")
        _check_same_size(xt, x, f"{path}[x_test]", f"{path}[x]")
        _check_labels(z["y_test"], k, f"{path}[y_test]", len(xt))
        test = ImageSet(xt, z["y_test"], list(classes), name=f"{path.name}:test")
    if "x_test_bd" in z:

        for key in ("y_test_bd", "target_test_bd"):
            if key not in z:
                raise DatasetError(f"{path}: has x_test_bd but no {key} (true labels and target labels of the triggered test images)")
        if test is None:
            raise DatasetError(f"{path}: has x_test_bd but no clean test split (x_test, y_test)")
        xb = to_uint8_images(z["x_test_bd"], f"{path}[x_test_bd]")
        _check_same_size(xb, x, f"{path}[x_test_bd]", f"{path}[x]")
        _check_labels(z["y_test_bd"], k, f"{path}[y_test_bd]", len(xb))
        _check_labels(z["target_test_bd"], k, f"{path}[target_test_bd]", len(xb))
        test.meta["bd_test"] = BackdoorTest(xb, z["y_test_bd"], z["target_test_bd"])
    return train, test


def _check_same_size(x: np.ndarray, ref: np.ndarray, where: str, ref_where: str) -> None:
    """Raise unless the (N, H, W, 3) images ``x`` have the (H, W) of ``ref``."""
    if x.shape[1:3] != ref.shape[1:3]:
        raise DatasetError(f"{where}: images of {x.shape[1]}x{x.shape[2]} pixels (shape {x.shape}) but {ref_where} "
                           f"holds {ref.shape[1]}x{ref.shape[2]} (shape {ref.shape}); every split must have one image size")


def _check_labels(y: np.ndarray, k: int, where: str, n: int) -> None:
    """Raise unless ``y`` is a (n,) integer array with values in [0, k)."""
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise DatasetError(f"{where}: expected shape ({n},) to match the images, got {y.shape}")
    if y.dtype.kind not in "iu":
        raise DatasetError(f"{where}: labels must be integers, got {y.dtype}")
    if n and (y.min() < 0 or y.max() >= k):
        bad = int(y[(y < 0) | (y >= k)][0])
        raise DatasetError(f"{where}: label {bad} out of range [0, {k}) for {k} classes")


# --------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------

def _link_target(link: str, base: str) -> str | None:
    """The resolved target of the symlink ``link`` when it exists and lies inside ``base`` (a
    resolved folder); ``None`` for a dangling or looping link or one that leads outside."""
    try:
        target = os.path.realpath(link, strict=True)
    except (OSError, RuntimeError, ValueError):  # dangling (ENOENT) or a loop (ELOOP)
        return None
    return target if target == base or target.startswith(base.rstrip(os.sep) + os.sep) else None


def _walk_class(folder: str, base: str, on_link: Callable[[str], None]) -> list[str]:
    """Files under ``folder`` (recursively, hidden files skipped, symlinked sub-folders not entered),
    sorted as :class:`pathlib.Path` sorts them. A symlinked file is listed by its target when that
    lies inside ``base``; every other symlink that is dangling, looping or leads outside goes to
    ``on_link``."""
    found: list[tuple[tuple[str, ...], str]] = []

    def walk(d: str, rel: tuple[str, ...]) -> None:
        try:
            entries = list(os.scandir(d))
        except OSError as e:
            raise DatasetError(f"{d}: cannot list folder ({e.strerror or e})") from None
        for e in entries:
            if e.is_symlink():
                if e.name.startswith("."):
                    continue
                target = _link_target(e.path, base)
                if target is None:
                    on_link(e.path)
                elif os.path.isfile(target):
                    found.append((rel + (e.name,), target))
                # a symlinked folder inside the root is not entered (as Path.rglob does not)
            elif e.is_dir(follow_symlinks=False):
                walk(e.path, rel + (e.name,))
            elif e.is_file(follow_symlinks=False) and not e.name.startswith("."):
                found.append((rel + (e.name,), e.path))

    walk(folder, ())
    found.sort(key=lambda t: t[0])
    return [f for _, f in found]


def _list_imagefolder(root: Path, on_bad: str = "skip", link_root: Path | None = None
                      ) -> tuple[list[str], list[int], list[str], int, int]:
    """Image files (as strings: compact for millions of files), labels, class names, and the counts
    of skipped non-image files and skipped symlinks.

    Symlinks (class folders or files) are followed only when they resolve inside ``link_root``
    (default ``root``); dangling, looping or outside links are skipped and counted, or with
    ``on_bad="error"`` refused with a :class:`DatasetError` naming the link."""
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder (expected ROOT/<class>/<image files>)")
    base = os.path.realpath(link_root if link_root is not None else root)
    skipped_links = 0

    def bad_link(p: str) -> None:
        nonlocal skipped_links
        if on_bad == "error":
            raise DatasetError(f"{p}: symbolic link that is dangling, loops or leads outside the dataset folder {base}; "
                               "refused (use on_bad='skip' / --on-bad-files skip to skip such links)")
        skipped_links += 1

    class_dirs: list[tuple[str, str]] = []
    for e in sorted(os.scandir(root), key=lambda e: e.name):
        if e.name.startswith("."):
            continue
        if e.is_symlink():
            target = _link_target(e.path, base)
            if target is None:
                bad_link(e.path)
            elif os.path.isdir(target):
                class_dirs.append((e.name, target))
        elif e.is_dir(follow_symlinks=False):
            class_dirs.append((e.name, e.path))
    classes = [c for c, _ in class_dirs]
    if len(classes) < 2:
        raise DatasetError(f"{root}: expected at least 2 class folders, found {len(classes)}")
    files: list[str] = []
    labels: list[int] = []
    skipped = 0
    for i, (c, d) in enumerate(class_dirs):
        n_before = len(files)
        for f in _walk_class(d, base, bad_link):
            if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                files.append(f)
                labels.append(i)
            elif on_bad == "error":
                raise DatasetError(f"{f}: not an image file (extensions accepted: {', '.join(IMAGE_EXTENSIONS)})")
            else:
                skipped += 1
        if len(files) == n_before:
            raise DatasetError(f"{root / c}: class folder {c!r} holds no images")
    return files, labels, classes, skipped, skipped_links


def load_imagefolder(root: str | os.PathLike, size: tuple[int, int] | None = None, on_bad: str = "skip",
                     link_root: str | os.PathLike | None = None) -> ImageSet:
    """Read ``ROOT/<class>/<image>`` (classes sorted by name) into an ImageSet, cached.

    ``on_bad``: ``"skip"`` counts non-image files (``meta['skipped_files']``) and symlinks that are
    dangling, loop or resolve outside ``link_root`` (default ``root``; ``meta['skipped_links']``) and
    refuses an image file that cannot be decoded, naming it; ``"skip-unreadable"`` leaves those out too
    (also counted in ``meta['skipped_files']``); ``"error"`` raises a :class:`DatasetError` naming the first. ``meta['files']`` lists the files in row order, relative
    to ``meta['files_root']`` (``link_root`` or ``root``).
    ``size`` (H, W): resize every image to it; without it the most common size is used. Images of
    another size are resized, and counted in ``meta['resized_files']`` with the size in
    ``meta['resized_to']`` ([H, W]).
    """
    if on_bad not in ON_BAD_FILES:
        raise ValueError(f"on_bad must be one of {', '.join(ON_BAD_FILES)}, got {on_bad!r}")
    root = Path(root)
    files, labels, classes, skipped, links = _list_imagefolder(root, on_bad, None if link_root is None else Path(link_root))
    key = "imagefolder-" + files_key(files, f"{root.resolve()}|{size}")
    try:
        x, arr, resized = _cached_images(key, files, size, y=np.array(labels, np.int64))
    except DatasetError as e:
        if on_bad != "skip-unreadable":
            raise DatasetError(f"{e} (use --on-bad-files skip-unreadable to leave such files out, counted)") from None
        # leave out the files that cannot be decoded (counted), then decode the rest
        keep = [i for i, f in enumerate(files) if _decodable(f)]
        skipped += len(files) - len(keep)
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
        if not files:
            raise DatasetError(f"{root}: none of the image files can be decoded") from None
        key = "imagefolder-" + files_key(files, f"{root.resolve()}|{size}")
        x, arr, resized = _cached_images(key, files, size, y=np.array(labels, np.int64))
    s = ImageSet(x, arr["y"], classes, name=f"imagefolder:{root}")
    s.meta["skipped_files"] = skipped
    s.meta["skipped_links"] = links
    s.meta["resized_files"] = resized
    s.meta["resized_to"] = list(s.image_size)
    base = Path(link_root) if link_root is not None else root
    s.meta["files"] = [os.path.relpath(f, base) for f in files]  # row order; relative to files_root
    s.meta["files_root"] = str(base.resolve())
    return s


def _decodable(path: str) -> bool:
    try:
        _decode_file(path, None)
        return True
    except DatasetError:
        return False


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (torchvision's python pickle layout)
# --------------------------------------------------------------------------------------------

def _declared_bytes(shape: Any, dtype: Any) -> int | None:
    """Bytes an array of ``shape`` and ``dtype`` (as a pickle passes them) would take; ``None`` when
    they are not understood (numpy then refuses them itself)."""
    try:
        dims = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
        n = np.dtype(dtype).itemsize
    except Exception:
        return None
    for d in dims:
        n *= max(d, 0)
    return n


def _scan_pickle(data: bytes, path: Path) -> None:
    """Walk the opcodes of the pickle ``data`` without building anything; refuse any length-prefixed
    argument (bytes, strings, longs) that declares more bytes than the file has left, so that the
    unpickler never allocates what a small file merely declares."""
    import pickletools

    n, pos = len(data), 0
    widths = {pickletools.TAKEN_FROM_ARGUMENT1: (1, False), pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
              pickletools.TAKEN_FROM_ARGUMENT4U: (4, False), pickletools.TAKEN_FROM_ARGUMENT8U: (8, False)}
    while pos < n:
        code = data[pos]
        op = pickletools.code2op.get(chr(code))
        if op is None:
            raise DatasetError(f"{path}: not a CIFAR python batch (unknown pickle opcode 0x{code:02x} at byte {pos})")
        pos += 1
        if op.name == "STOP":
            return
        arg = op.arg
        if arg is None:
            continue
        if arg.n >= 0:
            pos += arg.n
        elif arg.n == pickletools.UP_TO_NEWLINE:
            for _ in range(2 if arg.name == "stringnl_noescape_pair" else 1):
                j = data.find(b"\n", pos)
                if j < 0:
                    raise DatasetError(f"{path}: not a CIFAR python batch (truncated {op.name} at byte {pos})")
                pos = j + 1
        else:
            width, signed = widths[arg.n]
            length = int.from_bytes(data[pos:pos + width], "little", signed=signed)
            pos += width
            if length < 0 or pos + length > n:
                raise DatasetError(f"{path}: declares a {length:,}-byte {op.name} field at byte {pos} but the file holds "
                                   f"only {n:,} bytes; refused before allocating")
            pos += length
    raise DatasetError(f"{path}: not a CIFAR python batch (truncated: no STOP opcode in {n:,} bytes)")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR batches: plain containers and numpy arrays only, never code.

    Arrays are bounded by ``limit`` bytes (the file's size: real data always comes from the file),
    checked before numpy allocates what a pickle declares (``_reconstruct``/``ndarray`` shapes,
    ``scalar`` dtypes)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def __init__(self, file: Any, limit: int, **kw: Any):
        super().__init__(file, **kw)
        self._limit = int(limit)

    def _check(self, shape: Any, dtype: Any, what: str) -> None:
        nbytes = _declared_bytes(shape, dtype)
        if nbytes is not None and nbytes > self._limit:
            raise DatasetError(f"declares a {what} of shape {shape!r} dtype {dtype!r} ({nbytes:,} bytes) but the file "
                               f"holds only {self._limit:,} bytes; refused before allocating")

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) not in self._ALLOWED:
            raise DatasetError(f"refused to unpickle {module}.{name}: CIFAR batches hold only arrays and lists")
        obj = super().find_class(module, name)
        if name == "ndarray":
            def ndarray(shape: Any, dtype: Any = float, *args: Any, **kw: Any) -> np.ndarray:
                self._check(shape, dtype, "array")
                return np.ndarray(shape, dtype, *args, **kw)

            self._ndarray = ndarray
            return ndarray
        if name == "_reconstruct":
            def reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
                self._check(shape, dtype, "array")
                if subtype is getattr(self, "_ndarray", None):
                    subtype = np.ndarray
                return obj(subtype, shape, dtype)

            return reconstruct
        if name == "scalar":
            def scalar(dtype: Any, *args: Any) -> Any:
                self._check((), dtype, "scalar")
                return obj(dtype, *args)

            return scalar
        return obj


def _read_cifar_batch(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path}: CIFAR batch file missing")
    data = path.read_bytes()
    _scan_pickle(data, path)
    try:
        d = _NumpyOnlyUnpickler(io.BytesIO(data), len(data), encoding="latin1").load()
    except DatasetError as e:
        raise DatasetError(f"{path}: {e}") from None
    except Exception as e:
        raise DatasetError(f"{path}: not a CIFAR python batch ({e.__class__.__name__}: {e})") from None
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: not a CIFAR python batch (expected a dict, got {type(d).__name__})")
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
        f = base / n
        if not f.is_file():
            raise DatasetError(f"{f}: CIFAR batch file missing (expected {base}/{', '.join(names)})")
        d = _read_cifar_batch(f)
        for key in ("data", label_key):
            if key not in d:
                raise DatasetError(f"{f}: missing field {key!r} (found {sorted(map(str, d))})")
        raw = np.asarray(d["data"])
        if raw.dtype != np.uint8:
            raise DatasetError(f"{f}[data]: expected uint8 pixels, got {raw.dtype}")
        if raw.ndim != 2 or raw.shape[1] != 3072:
            raise DatasetError(f"{f}[data]: expected shape (N, 3072), got {raw.shape}")
        try:
            y = np.asarray(d[label_key])
        except Exception:
            y = np.asarray([None])
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise DatasetError(f"{f}[{label_key}]: expected a list of integer labels, got {y.dtype} of shape {y.shape}")
        if len(y) != len(raw):
            raise DatasetError(f"{f}: {len(raw)} images in 'data' but {len(y)} {label_key!r}")
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise DatasetError(f"{f}[{label_key}]: label {int(y[(y < 0) | (y >= num_classes)][0])} out of range [0, {num_classes})")
        xs.append(raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(y.astype(np.int64))
    classes = [str(i) for i in range(num_classes)]
    if meta_file.is_file():
        meta = _read_cifar_batch(meta_file)
        names_ = meta.get(meta_key)
        if not isinstance(names_, (list, tuple)) or len(names_) != num_classes:
            raise DatasetError(f"{meta_file}[{meta_key}]: expected a list of {num_classes} class names, got {names_!r:.80}")
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in names_]
    return ImageSet(np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys), classes, name=f"cifar{num_classes}:{split}")


# --------------------------------------------------------------------------------------------
# GTSRB (official, torchvision and BackdoorBench layouts)
# --------------------------------------------------------------------------------------------

GTSRB_SIZE = (32, 32)
GTSRB_CLASSES = 43
_GTSRB_TRAIN_DIRS = ("Final_Training/Images", "Training", "Train")  # official, torchvision, BackdoorBench
_GTSRB_TEST_DIRS = ("Final_Test/Images", "Test", "Final_Test")


def _gtsrb_base(root: Path) -> Path:
    """The folder holding the GTSRB split folders, for any of the known layouts.

    official: ``GTSRB/Final_Training/Images/000NN/``, ``GTSRB/Final_Test/Images/`` (+ GT-final_test.csv);
    torchvision: ``gtsrb/GTSRB/Training/000NN/``, ``gtsrb/GTSRB/Final_Test/Images/``, ``gtsrb/GT-final_test.csv``;
    BackdoorBench: ``Train/000NN/``, ``Test/`` (images and GT-final_test.csv).
    """
    for cand in (root, root / "GTSRB", root / "gtsrb" / "GTSRB", root / "gtsrb"):
        if any((cand / d).is_dir() for d in _GTSRB_TRAIN_DIRS + _GTSRB_TEST_DIRS):
            return cand
    raise DatasetError(f"{root}: no GTSRB layout found (expected GTSRB/Final_Training/Images/000NN/, "
                       "gtsrb/GTSRB/Training/000NN/ or BackdoorBench's Train/000NN/ and Test/)")


def _read_gt_csv(path: Path) -> list[tuple[str, int]]:
    rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=";", skipinitialspace=True)
            if reader.fieldnames is None or "Filename" not in reader.fieldnames or "ClassId" not in reader.fieldnames:
                raise DatasetError(f"{path}: expected ';'-separated columns Filename and ClassId, got {reader.fieldnames}")
            for line, r in enumerate(reader, start=2):
                fn, cid = (r.get("Filename") or "").strip(), (r.get("ClassId") or "").strip()
                if not fn or not cid.isdigit():
                    raise DatasetError(f"{path}, line {line}: expected a file name and an integer ClassId, got {fn!r}, {cid!r}")
                if int(cid) >= GTSRB_CLASSES:
                    raise DatasetError(f"{path}, line {line}: ClassId {cid} out of range [0, {GTSRB_CLASSES})")
                if Path(fn).name != fn:
                    raise DatasetError(f"{path}, line {line}: file name {fn!r} must not contain a folder")
                rows.append((fn, int(cid)))
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not a text CSV file ({e})") from None
    return rows


def load_gtsrb(root: str | os.PathLike, split: str = "train", size: tuple[int, int] = GTSRB_SIZE, download: bool = False) -> ImageSet:
    """GTSRB (43 classes) resized to ``size`` (H, W), from the official, torchvision or BackdoorBench layout.

    Train images come from the class folders ``000NN`` (sorted file names, label = folder number);
    test images and labels from ``GT-final_test.csv`` (row order).
    """
    root = Path(root)
    if download:
        import torchvision

        torchvision.datasets.GTSRB(str(root), split="train" if split == "train" else "test", download=True)
    base = _gtsrb_base(root)
    files: list[Path] = []
    labels: list[int] = []
    if split == "train":
        img_root = next((base / d for d in _GTSRB_TRAIN_DIRS if (base / d).is_dir()), None)
        if img_root is None:
            raise DatasetError(f"{base}: GTSRB training images folder missing (looked for {', '.join(_GTSRB_TRAIN_DIRS)})")
        for d in sorted(p for p in img_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not d.name.isdigit() or int(d.name) >= GTSRB_CLASSES:
                raise DatasetError(f"{d}: GTSRB class folders must be named 00000..{GTSRB_CLASSES - 1:05d}")
            cls = int(d.name)
            for f in sorted(d.iterdir()):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                    files.append(f)
                    labels.append(cls)
    else:
        test_root = next((base / d for d in _GTSRB_TEST_DIRS if (base / d).is_dir()), None)
        if test_root is None:
            raise DatasetError(f"{base}: GTSRB test images folder missing (looked for {', '.join(_GTSRB_TEST_DIRS)})")
        cands = [base / "Final_Test" / "GT-final_test.csv", test_root / "GT-final_test.csv", base / "GT-final_test.csv",
                 base.parent / "GT-final_test.csv", root / "GT-final_test.csv"]
        gt = next((c for c in cands if c.is_file()), None)
        if gt is None:
            raise DatasetError(f"{base}: GTSRB test labels GT-final_test.csv not found (looked in "
                               f"{', '.join(sorted({str(c.parent) for c in cands}))})")
        for fn, cls in _read_gt_csv(gt):
            files.append(test_root / fn)
            labels.append(cls)
    if not files:
        raise DatasetError(f"{base}: no GTSRB images found for split {split!r}")
    key = f"gtsrb-{split}-" + files_key(files, f"{base.resolve()}|{size}")
    x, arr, _ = _cached_images(key, files, size, y=np.array(labels, np.int64))
    return ImageSet(x, arr["y"], list(GTSRB_CLASSNAMES), name=f"gtsrb:{split}")


# --------------------------------------------------------------------------------------------
# Tiny-ImageNet (tiny-imagenet-200)
# --------------------------------------------------------------------------------------------

def load_tinyimagenet(root: str | os.PathLike, split: str = "train", class_order: str = "wnids") -> ImageSet:
    """Tiny-ImageNet-200: ``train/<wnid>/images/*.JPEG`` and ``val/images`` + ``val_annotations.txt``
    (or ``val/<wnid>/*.JPEG``, the layout BackdoorBench's download rearranges it into), at 64x64.

    ``class_order``: ``"wnids"`` numbers classes in ``wnids.txt`` order (samples in file order);
    ``"sorted"`` numbers them by sorted wnid and orders samples by (class, file name), as torchvision's
    ``ImageFolder`` (and so BackdoorBench) does.
    """
    if class_order not in ("wnids", "sorted"):
        raise ValueError(f"class_order must be 'wnids' or 'sorted', got {class_order!r}")
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = Path(root)
    base = root / "tiny-imagenet-200" if (root / "tiny-imagenet-200").is_dir() else root
    wnids_file = base / "wnids.txt"
    if not wnids_file.is_file():
        raise DatasetError(f"{base}: wnids.txt missing (expected the tiny-imagenet-200 layout)")
    wnids = [w.strip() for w in wnids_file.read_text().split() if w.strip()]
    if len(set(wnids)) != len(wnids):
        raise DatasetError(f"{wnids_file}: repeated class ids")
    if class_order == "sorted":
        wnids = sorted(wnids)
    index = {w: i for i, w in enumerate(wnids)}
    names = {w: w for w in wnids}
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
        val = base / "val"
        ann = val / "val_annotations.txt"
        if ann.is_file():
            pairs: list[tuple[str, int]] = []
            for n, line in enumerate(ann.read_text().splitlines(), start=1):
                parts = line.split("\t")
                if not line.strip():
                    continue
                if len(parts) < 2:
                    raise DatasetError(f"{ann}, line {n}: expected '<file>\\t<wnid>...', got {line!r}")
                if parts[1] not in index:
                    raise DatasetError(f"{ann}, line {n}: unknown class id {parts[1]!r} (not in wnids.txt)")
                if Path(parts[0]).name != parts[0]:
                    raise DatasetError(f"{ann}, line {n}: file name {parts[0]!r} must not contain a folder")
                pairs.append((parts[0], index[parts[1]]))
            if class_order == "sorted":
                pairs.sort(key=lambda p: (p[1], p[0]))
            for fn, c in pairs:
                files.append(val / "images" / fn)
                labels.append(c)
        elif val.is_dir() and any((val / w).is_dir() for w in wnids):
            extra = sorted(d.name for d in val.iterdir() if d.is_dir() and d.name not in index and not d.name.startswith("."))
            if extra:
                raise DatasetError(f"{val}: folders {extra[:5]} are not class ids in wnids.txt")
            for w in wnids:
                d = val / w
                if d.is_dir():
                    for f in sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
                        files.append(f)
                        labels.append(index[w])
        else:
            raise DatasetError(f"{ann}: validation annotations missing (and no val/<wnid>/ folders)")
    if not files:
        raise DatasetError(f"{base}: no Tiny-ImageNet images found for split {split!r}")
    key = f"tiny-{split}-{class_order}-" + files_key(files, str(base.resolve()))
    x, arr, _ = _cached_images(key, files, (64, 64), y=np.array(labels, np.int64))
    return ImageSet(x, arr["y"], [names[w] for w in wnids], name=f"tinyimagenet:{split}")


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------

def _markers(*names: str) -> Callable[[Path], bool]:
    def detect(root: Path) -> bool:
        return root.is_dir() and any((root / m).is_file() for m in names)

    return detect


def _is_gtsrb(root: Path) -> bool:
    if not root.is_dir():
        return False
    try:
        _gtsrb_base(root)
        return True
    except DatasetError:
        return False


def _spec_cifar(k: int) -> Callable[..., tuple[ImageSet, ImageSet | None]]:
    def load(path: str, download: bool = False, **_: Any) -> tuple[ImageSet, ImageSet | None]:
        return load_cifar(path, "train", k, download), load_cifar(path, "test", k, False)

    return load


def _spec_gtsrb(path: str, download: bool = False, **_: Any) -> tuple[ImageSet, ImageSet | None]:
    return load_gtsrb(path, "train", download=download), load_gtsrb(path, "test", download=False)


def _spec_tinyimagenet(path: str, **_: Any) -> tuple[ImageSet, ImageSet | None]:
    return load_tinyimagenet(path, "train"), load_tinyimagenet(path, "val")


def _spec_imagefolder(path: str, on_bad_files: str = "skip", **_: Any) -> tuple[ImageSet, ImageSet | None]:
    root = Path(path)
    if (root / "train").is_dir():
        train = load_imagefolder(root / "train", on_bad=on_bad_files, link_root=root)
        test = (load_imagefolder(root / "test", size=train.image_size, on_bad=on_bad_files, link_root=root)
                if (root / "test").is_dir() else None)
        if test is not None and test.classes != train.classes:
            raise DatasetError(f"{root}: test/ classes {test.classes} differ from train/ classes {train.classes}")
        return train, test
    return load_imagefolder(root, on_bad=on_bad_files), None


def _spec_npz(path: str, **_: Any) -> tuple[ImageSet, ImageSet | None]:
    return load_npz(path)


def _spec_backdoorbench(path: str, data_root: str | os.PathLike | None = None,
                        allowed_root: str | os.PathLike | None = None, **_: Any) -> tuple[ImageSet, ImageSet | None]:
    return load_backdoorbench(path, clean_root=data_root, allowed_root=allowed_root)


def _clean_cifar(k: int) -> Callable[[Path, tuple[int, int]], tuple[ImageSet, ImageSet]]:
    def load(root: Path, size: tuple[int, int]) -> tuple[ImageSet, ImageSet]:
        return load_cifar(root, "train", k), load_cifar(root, "test", k)

    return load


def _clean_gtsrb(root: Path, size: tuple[int, int]) -> tuple[ImageSet, ImageSet]:
    return load_gtsrb(root, "train", size=size), load_gtsrb(root, "test", size=size)


def _clean_tinyimagenet(root: Path, size: tuple[int, int]) -> tuple[ImageSet, ImageSet]:
    # BackdoorBench reads Tiny-ImageNet through torchvision's ImageFolder: classes sorted by wnid
    return load_tinyimagenet(root, "train", class_order="sorted"), load_tinyimagenet(root, "val", class_order="sorted")


@dataclass(frozen=True)
class DatasetKind:
    """One kind of dataset spec (``name:PATH``), as the loaders, the CLI help and the dashboard see it.

    name : the spec prefix (``"cifar10"``); label : a human name (``"CIFAR-10"``); layout : one line
    on the expected folder or file layout; placeholder : what PATH names (``ROOT``, ``FILE``, ...);
    downloadable : torchvision can download it into ROOT; is_file : PATH is a file, not a folder;
    loader : ``loader(path, *, download, data_root, allowed_root, on_bad_files) -> (train, test or
    None)`` (see :func:`load_splits`); detect : ``detect(folder) -> bool``, does the folder hold this
    dataset (``None`` where that cannot be told); load_clean : ``load_clean(root, (H, W)) -> (train,
    test)`` in BackdoorBench's sample order, set for the datasets BackdoorBench records can be built on.
    """

    name: str
    label: str
    layout: str
    loader: Callable[..., tuple[ImageSet, ImageSet | None]] = field(repr=False)
    placeholder: str = "ROOT"
    downloadable: bool = False
    is_file: bool = False
    detect: Callable[[Path], bool] | None = field(default=None, repr=False)
    load_clean: Callable[[Path, tuple[int, int]], tuple[ImageSet, ImageSet]] | None = field(default=None, repr=False)

    @property
    def spec(self) -> str:
        """The spec pattern, e.g. ``"cifar10:ROOT"``."""
        return f"{self.name}:{self.placeholder}"


DATASET_KINDS: dict[str, DatasetKind] = {k.name: k for k in (
    DatasetKind("cifar10", "CIFAR-10",
                "The official python version: a folder holding `cifar-10-batches-py/` (or its batch files).",
                _spec_cifar(10), downloadable=True,
                detect=_markers("cifar-10-batches-py/data_batch_1", "data_batch_1"), load_clean=_clean_cifar(10)),
    DatasetKind("cifar100", "CIFAR-100",
                "The official python version: a folder holding `cifar-100-python/` (or its `train`, `test` and `meta` files).",
                _spec_cifar(100), downloadable=True,
                detect=_markers("cifar-100-python/train", "train"), load_clean=_clean_cifar(100)),
    DatasetKind("gtsrb", "GTSRB",
                "The official layout (`GTSRB/Final_Training/Images/000NN/*.ppm`, `GTSRB/Final_Test/...` with "
                "`GT-final_test.csv`), torchvision's `gtsrb/GTSRB/Training/` or BackdoorBench's `Train/` and `Test/`.",
                _spec_gtsrb, downloadable=True, detect=_is_gtsrb, load_clean=_clean_gtsrb),
    DatasetKind("tinyimagenet", "Tiny-ImageNet",
                "`tiny-imagenet-200/` with `train/<wnid>/images/` and `val/` (`val_annotations.txt` or `val/<wnid>/`).",
                _spec_tinyimagenet,
                detect=_markers("tiny-imagenet-200/wnids.txt", "wnids.txt"), load_clean=_clean_tinyimagenet),
    DatasetKind("imagefolder", "Image folder (one sub-folder per class)",
                "`ROOT/<class>/*.jpg`, or `ROOT/train/<class>/` and `ROOT/test/<class>/` for two splits "
                "(else a seeded 10% hold-out).",
                _spec_imagefolder),
    DatasetKind("npz", "NumPy .npz file",
                "Arrays `x` (N,H,W,3 uint8) and `y` (N,); optional `poison_mask`, `original_labels`, `classes`, "
                "`x_test`, `y_test`. No pickled objects.",
                _spec_npz, placeholder="FILE", is_file=True),
    DatasetKind("backdoorbench", "BackdoorBench attack record",
                "A BackdoorBench attack record folder (`attack_result.pt` with its bd_train / bd_test data); the clean "
                "dataset it used is found from the record's data_path or the data root.",
                _spec_backdoorbench, placeholder="RECORD_DIR"),
)}
DATASET_KIND_NAMES: tuple[str, ...] = tuple(DATASET_KINDS)  # the names alone (DATASET_KINDS was this tuple)


def spec_help() -> str:
    """One line listing the spec patterns, for ``--data`` help texts."""
    return ", ".join(k.spec for k in DATASET_KINDS.values())


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``kind:PATH`` and check the kind against :data:`DATASET_KINDS`."""
    if ":" not in spec:
        raise DatasetError(f"dataset spec {spec!r}: expected KIND:PATH with KIND one of {', '.join(DATASET_KINDS)}")
    kind, path = spec.split(":", 1)
    kind = kind.lower().replace("-", "")
    if kind not in DATASET_KINDS:
        raise DatasetError(f"dataset spec {spec!r}: unknown kind {kind!r}; expected one of {', '.join(DATASET_KINDS)}")
    if not path:
        raise DatasetError(f"dataset spec {spec!r}: empty path")
    return kind, path


def load_splits(spec: str, download: bool = False, data_root: str | os.PathLike | None = None,
                on_bad_files: str = "skip", allowed_root: str | os.PathLike | None = None
                ) -> tuple[ImageSet, ImageSet | None]:
    """Load (train, test) from a ``kind:PATH`` spec; test is ``None`` where the source has none.

    ``data_root``: for ``backdoorbench:RECORD_DIR``, the folder of the clean dataset the attack used
    (default ``$CGD_DATA_ROOT``, else the record's own ``data_path``); ignored by the other kinds.
    ``allowed_root``: for ``backdoorbench``, the folder the clean data must resolve inside (default
    ``$CGD_DATA_ROOT`` when set, else anywhere; see :func:`load_backdoorbench`).
    ``on_bad_files``: for ``imagefolder``, ``"skip"`` non-image files and symlinks that are dangling or
    lead outside the folder (counted in each split's ``meta['skipped_files']`` / ``['skipped_links']``)
    or raise an ``"error"`` naming the first; ``"skip-unreadable"`` also skips image files that cannot
    be decoded (counted in ``meta['skipped_files']``), which the other two refuse by name.
    The two splits must have one image size (:class:`DatasetError` naming both otherwise).
    """
    if on_bad_files not in ON_BAD_FILES:
        raise ValueError(f"on_bad_files must be one of {', '.join(ON_BAD_FILES)}, got {on_bad_files!r}")
    kind, path = parse_spec(spec)
    train, test = DATASET_KINDS[kind].loader(path, download=download, data_root=data_root, allowed_root=allowed_root,
                                             on_bad_files=on_bad_files)
    if test is not None and test.image_size != train.image_size:
        raise DatasetError(f"{spec}: test images are {test.image_size[0]}x{test.image_size[1]} pixels but training "
                           f"images are {train.image_size[0]}x{train.image_size[1]}; every split must have one image size")
    return train, test


def load_dataset(spec: str, split: str = "train", download: bool = False, data_root: str | os.PathLike | None = None,
                 on_bad_files: str = "skip", allowed_root: str | os.PathLike | None = None) -> ImageSet:
    """One split (``"train"`` or ``"test"``) of a ``kind:PATH`` spec (``data_root``, ``on_bad_files``,
    ``allowed_root``: see :func:`load_splits`)."""
    train, test = load_splits(spec, download, data_root, on_bad_files, allowed_root)
    if split == "train":
        return train
    if test is None:
        raise DatasetError(f"{spec}: has no test split")
    return test


# --------------------------------------------------------------------------------------------
# BackdoorBench records joined with their clean dataset
# --------------------------------------------------------------------------------------------

def load_backdoorbench(record_dir: str | os.PathLike, clean_root: str | os.PathLike | None = None,
                       allowed_root: str | os.PathLike | None = None) -> tuple[ImageSet, ImageSet]:
    """Load a BackdoorBench attack record as (poisoned train, clean test with ``meta['bd_test']``).

    ``record_dir``: the record folder (or its ``attack_result.pt``), read by :mod:`cgd.backdoorbench`.
    ``clean_root``: folder of the clean dataset the attack used (default ``$CGD_DATA_ROOT``, else the
    record's ``data_path`` resolved against the record folder and the BackdoorBench folder above
    ``record/``). ``allowed_root``: the clean data must resolve inside this folder (default
    ``$CGD_DATA_ROOT`` when set, else no restriction); a candidate outside it, or a ``data_path``
    with ``..`` components, is refused with a :class:`DatasetError` naming the record and the path.
    The clean dataset kinds are those of :data:`DATASET_KINDS` with a ``load_clean``.

    train: images (N, H, W, 3) uint8 as the victim trained on them, ``labels`` as given (poisoned),
    ``poison_mask`` (N,) bool and ``original_labels`` (N,) from the record. test: the clean test split;
    ``test.meta['bd_test']`` is a :class:`cgd.evaluation.BackdoorTest` of the triggered test images
    whose true label differs from the attack target. ``train.meta['backdoorbench']`` holds the
    record's metadata (model name, dataset, image size, clean root used).
    """

    env_root = os.environ.get("CGD_DATA_ROOT") or None
    if clean_root is None:
        clean_root = env_root
    if allowed_root is None:
        allowed_root = env_root
    rec = _bb.read_record(record_dir)
    kind = DATASET_KINDS.get(rec.kind)
    if kind is None or kind.load_clean is None or kind.detect is None:
        supported = sorted({n for n, k in DATASET_KINDS.items() if k.load_clean is not None}
                           | {a for a, n in _bb.DATASET_ALIASES.items() if n in DATASET_KINDS})
        raise DatasetError(f"{rec.path}[clean_data]: dataset {rec.data['clean_data']!r} is not supported "
                           f"(supported: {', '.join(supported)})")
    tried = _bb.clean_candidates(rec, clean_root, allowed_root)
    root = next((c for c in tried if kind.detect(c)), None)
    if root is None:
        raise DatasetError(
            f"{rec.path}: the clean {rec.clean_data} dataset the attack used is not stored in the record and was not found "
            f"(record data_path {rec.data_path!r}; tried {', '.join(str(c) for c in tried) or 'nothing inside the allowed root'}). "
            f"Pass the folder of {kind.label} ({kind.layout}) as clean_root= (load_backdoorbench), data_root= "
            f"(load_splits('backdoorbench:RECORD_DIR', data_root=...)) or the environment variable CGD_DATA_ROOT "
            f"(for `cgd --data backdoorbench:RECORD_DIR`)."
        )
    clean_train, clean_test = kind.load_clean(root, rec.size)
    k = len(clean_train.classes)
    _bb.check_num_classes(rec, k, str(root))
    hw = clean_train.image_size
    rows, sp = _bb.poisoned_train(rec, clean_train.labels, k, decode_images, str(root), hw)
    images = clean_train.images[rows]  # fancy indexing copies
    labels = clean_train.labels[rows].copy()
    original = labels.copy()
    mask = np.zeros(len(rows), bool)
    images[sp.positions] = sp.images
    labels[sp.positions] = sp.bd_labels
    mask[sp.positions] = True
    rid = rec.dir.resolve().name
    train = ImageSet(images, labels, clean_train.classes, poison_mask=mask, original_labels=original,
                     name=f"backdoorbench:{rid}:train")
    bd_images, bd_true, bd_target = _bb.backdoor_test(rec, clean_test.labels, k, decode_images, str(root), hw)
    test = ImageSet(clean_test.images, clean_test.labels, clean_test.classes, name=f"backdoorbench:{rid}:test")
    test.meta["bd_test"] = BackdoorTest(bd_images, bd_true, bd_target)
    info = {
        "record": str(rec.path),
        "clean_data": rec.clean_data,
        "clean_root": str(root),
        "data_path": rec.data_path,
        "model_name": str(rec.data["model_name"]),
        "num_classes": k,
        "img_size": [int(v) for v in rec.data["img_size"]],
        "poisoned_train": int(mask.sum()),
        "bd_test": len(bd_true),
    }
    train.meta["backdoorbench"] = info
    test.meta["backdoorbench"] = info
    return train, test


def seeded_subset(s: ImageSet, n: int | None, seed: int) -> ImageSet:
    """The first ``n`` samples after a seeded shuffle (order of the shuffle kept); all if ``n`` is None."""
    if n is None or n >= len(s):
        return s
    perm = np.random.default_rng(seed).permutation(len(s))[:n]
    sub = s.subset(perm)
    base = s.meta.get("source_index")
    sub.meta["source_index"] = perm if base is None else np.asarray(base)[perm]
    return sub
