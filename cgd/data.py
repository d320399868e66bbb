"""Datasets as uint8 arrays: the :class:`ImageSet` and its loaders.

Every loader returns images as one ``(N, H, W, 3)`` uint8 array (RGB) and labels as ``(N,)``
int64, decoded once and cached on disk (``$CGD_CACHE`` or ``~/.cache/cgd``) keyed by the files'
names, sizes and modification times. Loaders that decode image files (ImageFolder, GTSRB,
Tiny-ImageNet) stream the decoded pixels into an ``.npy`` file in the cache and return it
memory-mapped (``mmap_mode='r'``): a set larger than RAM loads in constant memory, and
:func:`iter_row_chunks` / :func:`release_pages` walk such an array without keeping it resident.
Dataset specs are strings ``kind:PATH``:

``cifar10:ROOT``, ``cifar100:ROOT``, ``gtsrb:ROOT``, ``tinyimagenet:ROOT``, ``imagefolder:ROOT``,
``npz:FILE``, ``backdoorbench:RECORD_DIR`` (a BackdoorBench attack record; see :mod:`cgd.backdoorbench`).

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
    "iter_row_chunks",
    "release_pages",
    "take_rows",
    "DATASET_KINDS",
    "IMAGE_EXTENSIONS",
    "cache_dir",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# refuse decompression bombs; larger images need an explicit opt-in ($CGD_MAX_IMAGE_PIXELS)
MAX_IMAGE_PIXELS = int(os.environ.get("CGD_MAX_IMAGE_PIXELS") or 8192 * 8192)


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
            images=take_rows(self.images, idx),
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


def _files_key(files: Sequence[str | Path], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for f in files:
        try:
            st = os.stat(f)
        except OSError as e:
            raise DatasetError(f"{f}: cannot read file ({e.strerror or e})") from None
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


SPILL_BYTES = 64 << 20  # take_rows: larger selections from a memory map go to a temp file, not memory


def take_rows(arr: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``arr[idx]`` along the first axis.

    From a memory map, a selection of more than :data:`SPILL_BYTES` is gathered chunk by chunk
    into an unlinked temp file in :func:`cache_dir` and returned memory-mapped read-only: the file
    has no name from the start, so it disappears with the last reference (or a killed process) and
    never needs cleaning up. Anything else is plain fancy indexing.
    """
    import tempfile

    idx = np.asarray(idx, dtype=np.int64)
    row_bytes = arr.nbytes // len(arr) if len(arr) else 0
    if getattr(arr, "_mmap", None) is None or len(idx) * row_bytes <= SPILL_BYTES:
        return arr[idx]
    fd, name = tempfile.mkstemp(prefix=".rows-", suffix=".tmp", dir=cache_dir())
    os.unlink(name)
    with os.fdopen(fd, "w+b") as f:
        f.truncate(len(idx) * row_bytes)
        step = max(1, (32 << 20) // row_bytes)
        for lo in range(0, len(idx), step):
            block = np.ascontiguousarray(arr[idx[lo:lo + step]])
            view, pos = memoryview(block).cast("B"), lo * row_bytes
            while len(view):
                k = os.pwrite(fd, view, pos)
                view, pos = view[k:], pos + k
            release_pages(arr)
        return np.memmap(f, dtype=arr.dtype, mode="r", shape=(len(idx),) + arr.shape[1:])


def _cached_images(key: str, files: Sequence[Path], size: tuple[int, int] | None,
                   **small: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Decoded ``files`` (memory-mapped read-only, see :func:`decode_images`) and the ``small``
    arrays (labels), cached under ``key``.

    The pixels live in ``KEY.x.npy`` (streamed, renamed into place when complete), the small arrays
    in ``KEY.npz``, written last: an entry counts only when both exist and agree on N, so a killed
    or failed build leaves nothing that is ever read back (its temp files are removed by the next).
    """
    from .runs import remove_stale_temps

    d = cache_dir()
    xp, zp = d / f"{key}.x.npy", d / f"{key}.npz"
    if zp.is_file() and xp.is_file():
        try:
            with np.load(zp, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            x = np.load(xp, mmap_mode="r", allow_pickle=False)
            n_ok = int(arrays.pop("_n", -1)) == len(files) == len(x)
            if n_ok and x.dtype == np.uint8 and x.ndim == 4 and x.shape[-1] == 3 and set(arrays) == set(small):
                return x, arrays
        except Exception:  # a corrupt cache entry is rebuilt
            pass
    zp.unlink(missing_ok=True)
    xp.unlink(missing_ok=True)
    remove_stale_temps(d, prefix=f".{key}.")
    x = decode_images(files, size, out=xp)
    tmp = d / f".{key}.npz.tmp{os.getpid()}.npz"
    try:
        np.savez(tmp, _n=np.int64(len(files)), **small)
        os.replace(tmp, zp)
    finally:
        tmp.unlink(missing_ok=True)
    return x, dict(small)


def _pil():
    """PIL's Image module. Its own decompression-bomb *warning* (above ~89 Mpx) is silenced: every
    image is checked against :data:`MAX_IMAGE_PIXELS` (smaller) and refused with a clear error."""
    import warnings

    from PIL import Image

    if not any(f[0] == "ignore" and f[2] is Image.DecompressionBombWarning for f in warnings.filters):
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    return Image


def _decode_one(path: str | Path, size: tuple[int, int] | None) -> np.ndarray:
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
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
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


def decode_images(files: Sequence[Path], size: tuple[int, int] | None = None, workers: int | None = None,
                  out: str | os.PathLike | None = None) -> np.ndarray:
    """Decode image files to one (N, H, W, 3) uint8 array.

    ``size`` (H, W): resize every image to it (bicubic). When ``None`` all images must share a size,
    else the most common size among the first 256 is used and the others resized to it.
    Decoding runs in a thread pool (PIL releases the GIL while decoding), in chunks of rows; the
    first bad file stops it with a :class:`DatasetError` naming the file.

    ``out``: a path: stream the pixels into an ``.npy`` file there instead of memory — each worker
    writes its decoded chunk straight into a temp file (``os.pwrite``), which is renamed onto
    ``out`` once every image is in and removed on any error — and return it memory-mapped
    read-only. Resident memory stays at a few chunks whatever N is.
    """
    from .runs import NpyWriter

    files = [os.fspath(f) for f in files]  # plain strings: a list of a million Paths alone takes ~400 MB
    if not files:
        return np.zeros((0, 1, 1, 3), np.uint8)
    if size is None:
        sizes = Counter(_image_size(f) for f in files[:256])
        size = sizes.most_common(1)[0][0]
    shape = (len(files), int(size[0]), int(size[1]), 3)
    if out is None:
        arr = np.empty(shape, np.uint8)

        def put(lo: int, block: np.ndarray) -> None:
            arr[lo:lo + len(block)] = block

        _decode_into(files, size, workers, put)
        return arr
    with NpyWriter(out, shape, np.uint8) as w:
        _decode_into(files, size, workers, w.write_at)
    return np.load(out, mmap_mode="r", allow_pickle=False)


def _decode_into(files: Sequence[str], size: tuple[int, int], workers: int | None,
                 sink: Callable[[int, np.ndarray], None]) -> None:
    """Decode ``files`` in chunks on a thread pool; ``sink(first_row, block)`` receives each chunk.

    Fails fast: the first error stops the other workers and is raised (lowest chunk first)."""
    import threading
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    n = len(files)
    step = int(np.clip((8 << 20) // max(size[0] * size[1] * 3, 1), 1, 256))
    stop = threading.Event()

    def work(lo: int) -> None:
        hi = min(lo + step, n)
        buf = np.empty((hi - lo, size[0], size[1], 3), np.uint8)
        for i in range(lo, hi):
            if stop.is_set():
                return
            buf[i - lo] = _decode_one(files[i], size)
        sink(lo, buf)

    ex = ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) * 2))
    futs = [ex.submit(work, lo) for lo in range(0, n, step)]
    try:
        wait(futs, return_when=FIRST_EXCEPTION)
        failed = [f for f in futs if f.done() and not f.cancelled() and f.exception() is not None]
        if failed:
            raise failed[0].exception()
    except BaseException:
        stop.set()
        for f in futs:
            f.cancel()
        raise
    finally:
        ex.shutdown(wait=True)


def _byte_bounds(a: np.ndarray) -> tuple[int, int]:
    try:
        from numpy.lib.array_utils import byte_bounds
    except ImportError:  # numpy < 2
        byte_bounds = np.byte_bounds
    return byte_bounds(a)


def release_pages(arr: np.ndarray) -> None:
    """Let the OS drop the resident pages under ``arr``, a slice of a memory-mapped file.

    For a read-only or shared map (``np.memmap`` modes ``'r'``, ``'r+'``, ``'w+'``) the data stays
    on disk and in the page cache and is read back on the next access: only the process's resident
    memory changes (Linux ``MADV_DONTNEED``). A no-op for in-memory arrays, copy-on-write maps
    (mode ``'c'``, whose private changes would be lost) and platforms without ``madvise``.
    """
    import mmap

    mm = getattr(arr, "_mmap", None)
    if mm is None or getattr(arr, "mode", "c") not in ("r", "r+", "w+") or arr.size == 0 or not hasattr(mm, "madvise"):
        return
    try:
        base = np.frombuffer(mm, np.uint8).__array_interface__["data"][0]
        lo, hi = _byte_bounds(arr)
        ps = mmap.PAGESIZE
        start = (lo - base) // ps * ps
        end = min(-(-(hi - base) // ps) * ps, len(mm))
        if 0 <= start < end:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)
    except (ValueError, OSError, BufferError, TypeError, AttributeError):
        pass


def iter_row_chunks(arr: np.ndarray, max_bytes: int = 32 << 20):
    """Yield ``(start, stop, arr[start:stop])`` over the rows of ``arr`` in slices of at most
    ``max_bytes`` (at least one row each).

    Slices of a memory map are released (:func:`release_pages`) once the consumer asks for the
    next one, so walking a larger-than-RAM array keeps resident memory flat. The slices are views:
    copy what must outlive the step.
    """
    n = len(arr)
    if n == 0:
        return
    step = max(1, int(max_bytes) // max(1, arr.nbytes // n))
    for start in range(0, n, step):
        stop = min(start + step, n)
        block = arr[start:stop]
        yield start, stop, block
        release_pages(block)


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
        z = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DatasetError(f"{path}: not a readable .npz file ({e.__class__.__name__}: {e})") from None
    if not hasattr(z, "files"):
        raise DatasetError(f"{path}: a single .npy array, expected an .npz archive with arrays x and y")
    out: dict[str, np.ndarray] = {}
    with z:
        for k in z.files:
            try:
                out[k] = z[k]
            except ValueError as e:
                raise DatasetError(f"{path}[{k}]: refused to load ({e}); object arrays (pickle) are not accepted") from None
            except Exception as e:
                raise DatasetError(f"{path}[{k}]: unreadable array ({e.__class__.__name__}: {e})") from None
    return out


def _as_nhwc(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 3:  # grayscale N,H,W
        x = np.repeat(x[..., None], 3, axis=-1)
    if x.ndim != 4:
        raise DatasetError(f"{where}: expected images of shape (N, H, W, 3), got {x.shape}")
    if x.size == 0:
        raise DatasetError(f"{where}: holds no images (shape {x.shape})")
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
            lo, hi = float(x.min()), float(x.max())
            if lo < -1e-6 or hi > 255.0 + 1e-6:
                raise DatasetError(f"{where}: float images must lie in [0, 1] or [0, 255], got [{lo:.4g}, {hi:.4g}] "
                                   "(normalised data? store uint8 pixels)")
            scale = 255.0 if hi <= 1.0 + 1e-6 else 1.0
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
            if z["classes"].ndim != 1:
                raise DatasetError(f"{path}[classes]: expected a (K,) array of class names, got shape {z['classes'].shape}")
            classes = [str(c) for c in z["classes"]]
        else:
            k = int(max(y.max(initial=0), z["y_test"].max(initial=0) if "y_test" in z else 0)) + 1
            classes = [str(i) for i in range(k)]
    k = len(classes)
    _check_labels(y, k, f"{path}[y]", len(x))
    for key in ("poison_mask", "original_labels"):
        if key in z and z[key].shape != y.shape:
            raise DatasetError(f"{path}[{key}]: expected shape {y.shape} to match y, got {z[key].shape}")
    if "original_labels" in z:
        _check_labels(z["original_labels"], k, f"{path}[original_labels]", len(x))
    if "poison_mask" in z and z["poison_mask"].dtype.kind not in "biu":
        raise DatasetError(f"{path}[poison_mask]: expected booleans (or 0/1 integers), got {z['poison_mask'].dtype}")
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
        xt = _as_nhwc(z["x_test"], f"{path}[x_test]")
        _check_labels(z["y_test"], k, f"{path}[y_test]", len(xt))
        test = ImageSet(xt, z["y_test"], list(classes), name=f"{path.name}:test")
    if "x_test_bd" in z:
        from .evaluation import BackdoorTest

        for key in ("y_test_bd", "target_test_bd"):
            if key not in z:
                raise DatasetError(f"{path}: has x_test_bd but no {key} (true labels and target labels of the triggered test images)")
        if test is None:
            raise DatasetError(f"{path}: has x_test_bd but no clean test split (x_test, y_test)")
        xb = _as_nhwc(z["x_test_bd"], f"{path}[x_test_bd]")
        _check_labels(z["y_test_bd"], k, f"{path}[y_test_bd]", len(xb))
        _check_labels(z["target_test_bd"], k, f"{path}[target_test_bd]", len(xb))
        test.meta["bd_test"] = BackdoorTest(xb, z["y_test_bd"], z["target_test_bd"])
    return train, test


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

def _list_imagefolder(root: Path, on_bad: str = "skip") -> tuple[list[str], list[int], list[str], int]:
    """Image files (as strings: compact for millions of files), labels, class names, non-image count."""
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder (expected ROOT/<class>/<image files>)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise DatasetError(f"{root}: expected at least 2 class folders, found {len(classes)}")
    files: list[str] = []
    labels: list[int] = []
    skipped = 0
    for i, c in enumerate(classes):
        n_before = len(files)
        for f in sorted((root / c).rglob("*")):
            if not f.is_file() or f.name.startswith("."):
                continue
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(str(f))
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
    x, arr = _cached_images(key, files, size, y=np.array(labels, np.int64))
    s = ImageSet(x, arr["y"], classes, name=f"imagefolder:{root}")
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
    key = f"gtsrb-{split}-" + _files_key(files, f"{base.resolve()}|{size}")
    x, arr = _cached_images(key, files, size, y=np.array(labels, np.int64))
    from .zero_shot_metadata import GTSRB_CLASSNAMES

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
    key = f"tiny-{split}-{class_order}-" + _files_key(files, str(base.resolve()))
    x, arr = _cached_images(key, files, (64, 64), y=np.array(labels, np.int64))
    return ImageSet(x, arr["y"], [names[w] for w in wnids], name=f"tinyimagenet:{split}")


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


def load_splits(spec: str, download: bool = False, data_root: str | os.PathLike | None = None,
                on_bad_files: str = "skip") -> tuple[ImageSet, ImageSet | None]:
    """Load (train, test) from a ``kind:PATH`` spec; test is ``None`` where the source has none.

    ``data_root``: for ``backdoorbench:RECORD_DIR``, the folder of the clean dataset the attack used
    (default ``$CGD_DATA_ROOT``, else the record's own ``data_path``); ignored by the other kinds.
    ``on_bad_files``: for ``imagefolder``, ``"skip"`` non-image files (counted in each split's
    ``meta['skipped_files']``) or raise an ``"error"`` naming the first.
    """
    if on_bad_files not in ("skip", "error"):
        raise ValueError(f"on_bad_files must be 'skip' or 'error', got {on_bad_files!r}")
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
            train = load_imagefolder(root / "train", on_bad=on_bad_files)
            test = load_imagefolder(root / "test", size=train.image_size, on_bad=on_bad_files) if (root / "test").is_dir() else None
            if test is not None and test.classes != train.classes:
                raise DatasetError(f"{root}: test/ classes {test.classes} differ from train/ classes {train.classes}")
            return train, test
        return load_imagefolder(root, on_bad=on_bad_files), None
    if kind == "npz":
        return load_npz(path)
    if kind == "backdoorbench":
        from .backdoorbench import load_backdoorbench

        return load_backdoorbench(path, clean_root=data_root)
    raise AssertionError(kind)


def load_dataset(spec: str, split: str = "train", download: bool = False, data_root: str | os.PathLike | None = None,
                 on_bad_files: str = "skip") -> ImageSet:
    """One split (``"train"`` or ``"test"``) of a ``kind:PATH`` spec (``data_root``, ``on_bad_files``:
    see :func:`load_splits`)."""
    train, test = load_splits(spec, download, data_root, on_bad_files)
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
