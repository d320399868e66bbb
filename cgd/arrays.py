"""Generic array and file I/O: atomic writes, JSON, streamed ``.npy`` files, row-chunked walks of
memory maps, a file-keyed array cache and bounded ``.npz`` reading.

A leaf module: it imports only numpy and the standard library, so every other module (datasets,
run folders, the BackdoorBench importer) can build on it without import cycles.

Bounds on untrusted ``.npz`` files (:func:`inspect_npz`, :func:`read_npz`), checked from the zip
directory and each member's ``.npy`` header before any array is allocated:

- the declared uncompressed sizes of all members together must not exceed ``$CGD_MAX_NPZ_BYTES``
  bytes (default 8 GiB);
- a member declaring more than 64 MiB must not be compressed more than 1000:1 (image data does not
  compress that far; a zip bomb does: 0.6 MB packed into 614 MB is 1023:1);
- each member must be an ``.npy`` array without Python objects whose header shape and dtype need
  exactly the bytes the zip says the member holds.
"""
from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import re
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

__all__ = [
    "DatasetError",
    "atomic_write_bytes",
    "atomic_write_text",
    "write_json",
    "read_json",
    "NpyWriter",
    "save_npy",
    "atomic_savez",
    "remove_stale_temps",
    "iter_row_chunks",
    "release_pages",
    "take_rows",
    "SPILL_BYTES",
    "cache_dir",
    "files_key",
    "cached_arrays",
    "inspect_npz",
    "read_npz",
    "max_npz_bytes",
    "to_uint8_images",
    "MAX_NPZ_RATIO",
    "NPZ_RATIO_MIN_BYTES",
]


class DatasetError(ValueError):
    """A dataset file or field is missing or malformed; the message names it."""


# --------------------------------------------------------------------------------------------
# Atomic files and JSON
# --------------------------------------------------------------------------------------------

def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON, atomically (numpy scalars/arrays and paths converted)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default, allow_nan=True))


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` when the file is absent; ValueError naming it when invalid."""
    path = Path(path)
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def atomic_savez(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """``np.savez`` (uncompressed, no pickle needed to read back) to a temp file, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------------
# Streamed .npy files
# --------------------------------------------------------------------------------------------

class NpyWriter:
    """Write an ``.npy`` file chunk by chunk, atomically: the bytes go to a temp file in the same
    folder (``.NAME.tmpPID``), which is fsynced and renamed onto ``path`` only when every row has
    been written; an exception removes it, and a killed writer's temp file is removed by
    :func:`remove_stale_temps`. Nothing partial ever appears at ``path``. The file is byte-for-byte
    what ``np.save`` writes for the same array.

    ``write(rows)`` appends rows in order; ``write_at(first_row, rows)`` writes anywhere and is
    safe from several threads at once (``os.pwrite``). Use as a context manager::

        with NpyWriter(path, (n, h, w, 3), np.uint8) as w:
            for block in blocks:
                w.write(block)
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, ...], dtype: Any):
        self.path = Path(path)
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        if self.dtype.hasobject:
            raise ValueError(f"{self.path}: object arrays cannot be saved (no pickle)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._rows = 0
        self._next = 0
        self._lock = threading.Lock()
        self._fd: int | None = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            hdr = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                hdr, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape})
            self.offset = hdr.tell()
            self._pwrite(hdr.getvalue(), 0)
            os.ftruncate(self._fd, self.offset + self._row_bytes * (self.shape[0] if self.shape else 1))
        except BaseException:
            self.abort()
            raise

    def _pwrite(self, data: Any, pos: int) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            k = os.pwrite(self._fd, view, pos)
            view, pos = view[k:], pos + k

    def write_at(self, first_row: int, rows: np.ndarray) -> None:
        """Write ``rows`` (R, *shape[1:]) at rows ``first_row .. first_row + R``."""
        rows = np.asarray(rows)
        if rows.shape[1:] != self.shape[1:] or rows.dtype != self.dtype:
            raise ValueError(f"{self.path}: rows of shape {rows.shape[1:]} {rows.dtype}, expected {self.shape[1:]} {self.dtype}")
        if first_row < 0 or first_row + len(rows) > self.shape[0]:
            raise ValueError(f"{self.path}: rows {first_row}:{first_row + len(rows)} outside [0, {self.shape[0]})")
        self._pwrite(np.ascontiguousarray(rows), self.offset + first_row * self._row_bytes)
        with self._lock:
            self._rows += len(rows)

    def write(self, rows: np.ndarray) -> None:
        """Append ``rows`` after the rows appended so far."""
        with self._lock:
            first = self._next
            self._next += len(rows)
        self.write_at(first, rows)

    def commit(self) -> Path:
        """Check that every row arrived, fsync, rename onto ``path``."""
        try:
            n = self.shape[0] if self.shape else 1
            if not self.shape:
                raise ValueError(f"{self.path}: NpyWriter writes arrays of at least one dimension")
            if self._rows != n:
                raise ValueError(f"{self.path}: {self._rows} of {n} rows written")
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.replace(self.tmp, self.path)
            return self.path
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Close and delete the temp file (``path`` is left as it was)."""
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "NpyWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def save_npy(path: str | os.PathLike, arr: np.ndarray) -> Path:
    """np.save, atomically and in chunks (:class:`NpyWriter`): a memory-mapped ``arr`` is copied in
    constant memory."""
    arr = np.asanyarray(arr)
    if arr.ndim == 0:
        arr = np.asarray(arr)
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        return atomic_write_bytes(path, buf.getvalue())
    with NpyWriter(path, arr.shape, arr.dtype) as w:
        for _, _, block in iter_row_chunks(arr):
            w.write(block)
    return Path(path)


_TEMP_NAME = re.compile(r"\.tmp(\d*)(\.[A-Za-z0-9]+)?$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, prefix: str = "", recursive: bool = False) -> list[Path]:
    """Delete temp files left by killed writers in ``folder``; returns what was removed.

    Temp files are those named ``*.tmpPID``, ``*.tmpPID.EXT`` or ``*.tmp.EXT`` (every atomic
    writer in cgd uses one of these). One whose PID is a live process other than this one is kept
    (its writer is still at work); ones without a PID are removed, so call this only while holding
    the folder's lock (the run folder) or with a ``prefix`` only this caller writes.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for f in (folder.rglob(prefix + "*") if recursive else folder.glob(prefix + "*")):
        m = _TEMP_NAME.search(f.name)
        if not m or not f.is_file():
            continue
        pid = int(m.group(1)) if m.group(1) else None
        if pid is not None and pid != os.getpid() and _pid_alive(pid):
            continue
        try:
            f.unlink()
            removed.append(f)
        except OSError:
            pass
    return removed


# --------------------------------------------------------------------------------------------
# Walking (memory-mapped) arrays
# --------------------------------------------------------------------------------------------

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


def iter_row_chunks(arr: np.ndarray, max_bytes: int = 32 << 20) -> Iterator[tuple[int, int, np.ndarray]]:
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


def cache_dir() -> Path:
    """Folder for decoded-array caches: ``$CGD_CACHE`` or ``~/.cache/cgd`` (created)."""
    d = Path(os.environ.get("CGD_CACHE", Path.home() / ".cache" / "cgd"))
    d.mkdir(parents=True, exist_ok=True)
    return d


SPILL_BYTES = 64 << 20  # take_rows: larger selections from a memory map go to a temp file, not memory


def take_rows(arr: np.ndarray, idx: np.ndarray, spill_bytes: int | None = None) -> np.ndarray:
    """``arr[idx]`` along the first axis.

    From a memory map, a selection of more than ``spill_bytes`` (default :data:`SPILL_BYTES`) is
    gathered chunk by chunk into an unlinked temp file in :func:`cache_dir` and returned
    memory-mapped read-only: the file has no name from the start, so it disappears with the last
    reference (or a killed process) and never needs cleaning up. Anything else is plain fancy indexing.
    """
    idx = np.asarray(idx, dtype=np.int64)
    limit = SPILL_BYTES if spill_bytes is None else int(spill_bytes)
    row_bytes = arr.nbytes // len(arr) if len(arr) else 0
    if getattr(arr, "_mmap", None) is None or len(idx) * row_bytes <= limit:
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


# --------------------------------------------------------------------------------------------
# A cache of arrays keyed by source files
# --------------------------------------------------------------------------------------------

def files_key(files: Sequence[str | os.PathLike], extra: str = "") -> str:
    """20 hex digits of SHA-256 over ``extra`` and each file's name, size and modification time."""
    h = hashlib.sha256(extra.encode())
    for f in files:
        try:
            st = os.stat(f)
        except OSError as e:
            raise DatasetError(f"{f}: cannot read file ({e.strerror or e})") from None
        h.update(f"{os.fspath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def cached_arrays(key: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Arrays cached under ``key`` in :func:`cache_dir`, or ``build()`` them and cache them
    (atomic write, read back without pickle; a corrupt entry is rebuilt)."""
    path = cache_dir() / f"{key}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception:  # a corrupt cache entry is rebuilt
            path.unlink(missing_ok=True)
    arrays = build()
    atomic_savez(path, **arrays)
    return arrays


# --------------------------------------------------------------------------------------------
# Bounded .npz reading
# --------------------------------------------------------------------------------------------

MAX_NPZ_RATIO = 1000  # refuse members compressed more than this ...
NPZ_RATIO_MIN_BYTES = 64 << 20  # ... when they declare more than this many uncompressed bytes
_NPY_MAGIC = b"\x93NUMPY"
_MAX_HEADER = 1 << 16


def max_npz_bytes() -> int:
    """The bound on an ``.npz``'s declared uncompressed size: ``$CGD_MAX_NPZ_BYTES`` or 8 GiB."""
    raw = os.environ.get("CGD_MAX_NPZ_BYTES")
    if not raw:
        return 8 << 30
    try:
        v = int(float(raw))
    except ValueError:
        raise DatasetError(f"CGD_MAX_NPZ_BYTES={raw!r}: expected a number of bytes") from None
    if v <= 0:
        raise DatasetError(f"CGD_MAX_NPZ_BYTES={raw!r}: expected a positive number of bytes")
    return v


def _read_npy_header(f: Any, where: str) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, header length in bytes) of the ``.npy`` stream ``f``;
    reads only the header."""
    magic = f.read(8)
    if len(magic) < 8 or magic[:6] != _NPY_MAGIC:
        raise DatasetError(f"{where}: not an .npy array (no NUMPY header)")
    major = magic[6]
    if major == 1:
        raw = f.read(2)
        hlen = int.from_bytes(raw, "little") if len(raw) == 2 else -1
        enc, pre = "latin1", 10
    elif major in (2, 3):
        raw = f.read(4)
        hlen = int.from_bytes(raw, "little") if len(raw) == 4 else -1
        enc, pre = ("latin1" if major == 2 else "utf8"), 12
    else:
        raise DatasetError(f"{where}: unsupported .npy format version {major}.{magic[7]}")
    if hlen < 0 or hlen > _MAX_HEADER:
        raise DatasetError(f"{where}: .npy header of {hlen} bytes is truncated or too large")
    text = f.read(hlen)
    if len(text) != hlen:
        raise DatasetError(f"{where}: truncated .npy header")
    try:
        d = ast.literal_eval(text.decode(enc))
        if not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"}:
            raise ValueError(f"header keys {sorted(d) if isinstance(d, dict) else type(d).__name__}")
        shape = d["shape"]
        if not isinstance(shape, tuple) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ValueError(f"shape {shape!r}")
        dtype = np.lib.format.descr_to_dtype(d["descr"])
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise DatasetError(f"{where}: malformed .npy header ({e})") from None
    return shape, dtype, bool(d["fortran_order"]), pre + hlen


def inspect_npz(path: str | os.PathLike) -> dict:
    """What an ``.npz`` holds, from its zip directory and each member's ``.npy`` header only (no
    array data is decompressed beyond the headers); refuses files over the bounds in the module
    docstring with a :class:`DatasetError` naming the file and member.

    Returns ``{"path", "file_bytes", "total_bytes" (declared uncompressed), "limit_bytes",
    "members": [{"name" (key, without .npy), "member" (zip name), "shape" (tuple), "dtype" (str),
    "fortran_order", "nbytes" (array data, from the header), "compressed_bytes",
    "uncompressed_bytes"}]}``.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such .npz file")
    size = path.stat().st_size
    limit = max_npz_bytes()
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        try:
            with open(path, "rb") as f:
                head = f.read(6)
        except OSError:
            head = b""
        if head == _NPY_MAGIC:
            raise DatasetError(f"{path}: a single .npy array, expected an .npz archive with arrays x and y") from None
        raise DatasetError(f"{path}: not a readable .npz file ({e.__class__.__name__}: {e})") from None
    members: list[dict] = []
    total = 0
    with zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            name = info.filename
            key = name[:-4] if name.endswith(".npy") else name
            where = f"{path}[{key}]"
            total += info.file_size
            if total > limit:
                raise DatasetError(f"{path}: declares {total:,} bytes of uncompressed arrays (at member {name!r}), over the "
                                   f"limit of {limit:,} bytes; refused before loading (raise CGD_MAX_NPZ_BYTES to accept it)")
            if info.file_size > NPZ_RATIO_MIN_BYTES and info.file_size > MAX_NPZ_RATIO * max(info.compress_size, 1):
                raise DatasetError(f"{where}: {info.compress_size:,} compressed bytes expand to {info.file_size:,} "
                                   f"(over {MAX_NPZ_RATIO}:1); refused as a zip bomb before loading")
            if not name.endswith(".npy"):
                raise DatasetError(f"{where}: not an .npy array member (an .npz holds arrays saved by numpy only)")
            try:
                with zf.open(info) as f:
                    shape, dtype, fortran, hdr = _read_npy_header(f, where)
            except DatasetError:
                raise
            except Exception as e:  # zlib.error, BadZipFile, NotImplementedError (compression), ...
                raise DatasetError(f"{where}: unreadable member ({e.__class__.__name__}: {e})") from None
            if dtype.hasobject:
                raise DatasetError(f"{where}: refused to load (dtype {dtype} holds Python objects); "
                                   "object arrays (pickle) are not accepted")
            nbytes = dtype.itemsize
            for s in shape:
                nbytes *= s
            if hdr + nbytes != info.file_size:
                raise DatasetError(f"{where}: header declares shape {shape} {dtype} ({nbytes:,} bytes) but the member "
                                   f"holds {max(info.file_size - hdr, 0):,} bytes of data; the file is damaged or forged")
            members.append({"name": key, "member": name, "shape": tuple(shape), "dtype": str(dtype),
                            "fortran_order": fortran, "nbytes": nbytes, "compressed_bytes": info.compress_size,
                            "uncompressed_bytes": info.file_size})
    return {"path": str(path), "file_bytes": size, "total_bytes": total, "limit_bytes": limit, "members": members}


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an ``.npz``, after :func:`inspect_npz` has checked the bounds; never unpickles."""
    path = Path(path)
    inspect_npz(path)
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


# --------------------------------------------------------------------------------------------
# Image arrays
# --------------------------------------------------------------------------------------------

def _all_integral(x: np.ndarray) -> bool:
    for _, _, block in iter_row_chunks(x, 16 << 20):
        if not np.array_equal(block, np.floor(block)):
            return False
    return True


def to_uint8_images(x: np.ndarray, where: str) -> np.ndarray:
    """Image array (N, H, W, 3), (N, H, W), (N, H, W, 1) or (N, C, H, W) with C in {1, 3}, as
    contiguous (N, H, W, 3) uint8. ``where`` names the field in errors.

    Pixel values: uint8 as is; other integers must lie in [0, 255]. Floats must be finite and in
    [0, 255]; then: max <= 1.0 means [0, 1] (scaled by 255); a max above 1.0 means 0-255 only
    when every value is a whole number; fractional values above 1.0 are ambiguous (a [0, 1] set
    with a stray value, or rescaled data) and refused. Images must be at least 2 x 2 pixels.
    """
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
    if x.shape[1] < 2 or x.shape[2] < 2:
        raise DatasetError(f"{where}: images of {x.shape[1]}x{x.shape[2]} pixels are too small (expected at least 2x2)")
    if x.dtype != np.uint8:
        if x.dtype.kind == "f":
            if not np.isfinite(x).all():
                raise DatasetError(f"{where}: images contain NaN or infinite values")
            lo, hi = float(x.min()), float(x.max())
            if lo < -1e-6 or hi > 255.0 + 1e-6:
                raise DatasetError(f"{where}: float images must lie in [0, 1] or [0, 255], got [{lo:.4g}, {hi:.4g}] "
                                   "(normalised data? store uint8 pixels)")
            if hi <= 1.0 + 1e-6:
                scale = 255.0
            elif _all_integral(x):
                scale = 1.0
            else:
                raise DatasetError(f"{where}: float images with values in [{lo:.4g}, {hi:.4g}] are ambiguous: expected "
                                   "[0, 1] floats (max <= 1) or whole-number 0-255 values, got fractional values above 1 "
                                   "(store uint8 pixels)")
            x = np.clip(np.rint(x * scale), 0, 255).astype(np.uint8)
        elif x.dtype.kind in "iu":
            if x.min() < 0 or x.max() > 255:
                raise DatasetError(f"{where}: integer images must lie in [0, 255], got [{x.min()}, {x.max()}]")
            x = x.astype(np.uint8)
        else:
            raise DatasetError(f"{where}: images must be uint8 (or float in [0, 1]), got {x.dtype}")
    return np.ascontiguousarray(x)
