"""A content-addressed cache of reference scores, shared by every run on the machine.

The reference pass (zero-shot logits and image embeddings of every training image) is cgd's most
expensive stage; a run over the same images with the same model, weights, prompts and precision
reads its scores from here instead of scoring again.

Layout of ``ROOT`` (default ``$CGD_CACHE/scores``, next to :func:`cgd.data.cache_dir`)::

    <key>/logits.npy        (N, K) float32 reference logits
    <key>/embeddings.npy    (N, D) float32 or float16 image embeddings
    <key>/meta.json         {"format", "key", "created", "n", "k", "d", "bytes", "meta": caller's meta}
    .tmp-<key>-<pid>-<hex>/ an entry being written (renamed onto <key>/ when complete)
    .del-<key>-<pid>-<hex>/ an entry being removed (renamed away first, then deleted)

The key (:func:`score_key`) is a hash of everything that changes the numbers: the images' bytes
(:func:`image_digest`), model, weights, class names, prompt templates, resolved precision and any
extras. An entry's last-use time is its folder's mtime (touched on every hit); :meth:`ScoreCache.put`
evicts least-recently-used entries until the cache fits ``max_bytes``.

Safety: keys are checked to be lowercase hex before any path is built from them; arrays are read
with ``allow_pickle=False``; meta is JSON. An entry appears by one ``rename`` of a complete folder,
so a reader never sees a partial entry, and two processes putting the same key leave one whole entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = ["FORMAT_VERSION", "DEFAULT_MAX_MB", "KEY_RE", "CacheEntry", "ScoreCache", "image_digest", "file_digest",
           "score_key", "validate_key", "cache_main"]

FORMAT_VERSION = 1  # part of every key: bump when the entry layout or the meaning of the numbers changes
DEFAULT_MAX_MB = 4096  # $CGD_SCORE_CACHE_MB when unset
KEY_RE = re.compile(r"[0-9a-f]{16,128}")
LOGITS, EMBEDDINGS, META = "logits.npy", "embeddings.npy", "meta.json"
STALE_TEMP_S = 6 * 3600  # a .tmp-/.del- folder older than this belongs to a killed process
_HASH_CHUNK = 32 << 20  # bytes hashed per step (constant memory)


# --------------------------------------------------------------------------------------------
# Digests and keys
# --------------------------------------------------------------------------------------------

def image_digest(images: np.ndarray) -> str:
    """SHA-256 (first 32 hex digits) of an image array's shape, dtype and bytes in C order.

    SHA-256 rather than BLAKE2b: with the CPU's SHA instructions it hashes 50,000 x 32 x 32 x 3 uint8
    (147 MiB) in about 0.11 s on the 2-core dev machine, BLAKE2b in 0.20 s.

    images: (N, H, W, 3) uint8 as the run sees them (any plain-data array is accepted; its shape
    and dtype are part of the hash). A memory-mapped array, also one larger than RAM, is hashed in
    row chunks of 32 MB whose pages are released as it goes (:func:`cgd.data.iter_row_chunks`), so
    memory stays constant; it gives the same digest as the same array in memory.
    """
    from .data import iter_row_chunks

    arr = np.asanyarray(images)
    if arr.dtype.hasobject or arr.dtype.fields is not None:
        raise ValueError(f"image_digest: expected a uint8 image array, got dtype {arr.dtype}")
    h = hashlib.sha256()
    h.update(f"cgd-images|{arr.dtype.str}|{tuple(int(s) for s in arr.shape)}|".encode())
    if arr.ndim == 0:
        h.update(np.ascontiguousarray(arr).tobytes())
    else:
        for _, _, block in iter_row_chunks(arr, _HASH_CHUNK):
            h.update(np.ascontiguousarray(block).data)
    return h.hexdigest()[:32]


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 (first 32 hex digits) of a file's bytes, read in 1 MB blocks (constant memory).

    For weights given as a file (``--checkpoint``) or a custom open_clip model config: the key then
    follows the content, not the name or the mtime."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    except OSError as e:
        raise OSError(f"{path}: cannot read file to hash it ({e.strerror or e})") from None
    return h.hexdigest()[:32]


def score_key(images_digest: str, model: str, weights: str | None, classnames: Sequence[str],
              templates: Sequence[str], precision: str, extra: dict[str, Any] | None = None) -> str:
    """The cache key (32 hex digits) of one reference pass.

    images_digest: :func:`image_digest` of the (N, H, W, 3) uint8 images, in the run's order.
    model: the model name (e.g. ``"ViT-B-32"``, or ``"classifier"``).
    weights: what identifies the weights: an open_clip pretrained tag, a :func:`file_digest`, or
    ``"random"``/None for seeded random weights, which are only the same for the same seed: then
    ``extra`` must hold ``"seed"`` (ValueError otherwise).
    classnames, templates: the prompts, in order (the logit columns follow ``classnames``).
    precision: the *resolved* precision actually used (``"bf16"``, ``"fp32"``, ...), not ``"auto"``.
    extra: anything else that changes the numbers (reference kind, device type, a custom model
    config's digest, ...): JSON-like values; key order does not matter.
    """
    if not isinstance(images_digest, str) or not images_digest:
        raise ValueError("score_key: images_digest must be a non-empty string (see image_digest)")
    if precision in ("auto", "", None):
        raise ValueError(f"score_key: precision must be the resolved one ('bf16', 'fp32', ...), got {precision!r}")
    extra = dict(extra or {})
    if weights in (None, "random") and extra.get("seed") is None:
        raise ValueError("score_key: random weights are only reproducible for one seed: pass extra={'seed': SEED}")
    parts = {"format": FORMAT_VERSION, "images": images_digest, "model": str(model), "weights": weights,
             "classnames": [str(c) for c in classnames], "templates": [str(t) for t in templates],
             "precision": str(precision), "extra": extra}
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def validate_key(key: str) -> str:
    """``key`` if it is 16-128 lowercase hex digits, else ValueError (no path is built from anything else)."""
    if not isinstance(key, str) or KEY_RE.fullmatch(key) is None:
        raise ValueError(f"invalid score-cache key {key!r}: expected 16-128 lowercase hex digits")
    return key


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CacheEntry:
    """One entry as :meth:`ScoreCache.entries` lists it. Times are Unix seconds; bytes on disk."""

    key: str
    bytes: int
    created: float
    last_used: float
    n: int
    k: int
    d: int
    model: str | None
    weights: str | None
    path: str


def _default_root() -> Path:
    return Path(os.environ.get("CGD_CACHE", Path.home() / ".cache" / "cgd")) / "scores"


def _default_max_bytes() -> int:
    raw = os.environ.get("CGD_SCORE_CACHE_MB", "").strip()
    if not raw:
        return DEFAULT_MAX_MB << 20
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"CGD_SCORE_CACHE_MB={raw!r}: expected a size in MB (a number >= 0)") from None
    if not mb >= 0:
        raise ValueError(f"CGD_SCORE_CACHE_MB={raw!r}: expected a size in MB (a number >= 0)")
    return int(mb * (1 << 20))


def _npy_bytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Size on disk of an .npy of this shape and dtype (header 1.0, as :class:`cgd.runs.NpyWriter` writes)."""
    import io

    hdr = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        hdr, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    return hdr.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _folder_bytes(path: Path) -> int:
    total = 0
    try:
        with os.scandir(path) as it:
            for e in it:
                try:
                    if e.is_file(follow_symlinks=False):
                        total += e.stat(follow_symlinks=False).st_size
                except OSError:
                    pass
    except OSError:
        pass
    return total


class _Corrupt(Exception):
    """An entry that exists but cannot be used."""


class ScoreCache:
    """Reference scores keyed by :func:`score_key`, least-recently-used entries evicted past ``max_bytes``.

    root: the cache folder (default ``$CGD_CACHE/scores``, ``~/.cache/cgd/scores`` without ``$CGD_CACHE``);
    created on the first :meth:`put`. max_bytes: size limit in bytes (default ``$CGD_SCORE_CACHE_MB`` MB,
    4096 MB when unset; 0 stores nothing).
    """

    def __init__(self, root: Path | str | None = None, max_bytes: int | None = None):
        self.root = Path(root) if root is not None else _default_root()
        self.max_bytes = int(max_bytes) if max_bytes is not None else _default_max_bytes()
        if self.max_bytes < 0:
            raise ValueError(f"ScoreCache: max_bytes must be >= 0, got {self.max_bytes}")

    def __repr__(self) -> str:
        return f"ScoreCache({str(self.root)!r}, max_bytes={self.max_bytes})"

    # ---- paths
    def path(self, key: str) -> Path:
        """The folder of entry ``key`` (validated first)."""
        return self.root / validate_key(key)

    def _aside(self, kind: str, key: str) -> Path:
        return self.root / f".{kind}-{key}-{os.getpid()}-{secrets.token_hex(4)}"

    # ---- read
    def get(self, key: str, mmap: bool = True) -> tuple[np.ndarray, np.ndarray, dict] | None:
        """``(logits (N, K) float32, embeddings (N, D) float32|float16, meta)`` of ``key``, or None.

        None on a miss or on a corrupt entry (unreadable or inconsistent files, bad JSON), which is
        removed. Arrays are read with ``allow_pickle=False``, memory-mapped read-only unless
        ``mmap=False``. ``meta`` is the dict given to :meth:`put`. A hit touches the entry's last use.
        """
        folder = self.path(key)
        if not folder.is_dir():
            return None
        try:
            logits, emb, info = self._read(folder, key, mmap)
        except FileNotFoundError:  # removed (evicted, cleared) while we read: a plain miss
            return None
        except _Corrupt as e:
            warnings.warn(f"score cache: removing corrupt entry {folder} ({e})", RuntimeWarning, stacklevel=2)
            self._remove(folder, key)
            return None
        try:
            os.utime(folder)
        except OSError:  # a read-only cache still serves hits
            pass
        return logits, emb, dict(info.get("meta") or {})

    def _read(self, folder: Path, key: str, mmap: bool) -> tuple[np.ndarray, np.ndarray, dict]:
        try:
            info = json.loads((folder / META).read_text(encoding="utf-8"))
        except FileNotFoundError:
            if not folder.exists():
                raise
            raise _Corrupt(f"{META} missing") from None
        except (OSError, ValueError) as e:
            raise _Corrupt(f"{META}: {e}") from None
        if not isinstance(info, dict) or info.get("key") != key or info.get("format") != FORMAT_VERSION:
            raise _Corrupt(f"{META}: not an entry for this key and format")
        arrays = []
        for name in (LOGITS, EMBEDDINGS):
            try:
                arrays.append(np.load(folder / name, mmap_mode="r" if mmap else None, allow_pickle=False))
            except FileNotFoundError:
                if not folder.exists():
                    raise
                raise _Corrupt(f"{name} missing") from None
            except (OSError, ValueError, EOFError) as e:
                raise _Corrupt(f"{name}: {e}") from None
        logits, emb = arrays
        if logits.ndim != 2 or logits.dtype != np.float32:
            raise _Corrupt(f"{LOGITS}: {logits.shape} {logits.dtype}, expected (N, K) float32")
        if emb.ndim != 2 or emb.dtype not in (np.float32, np.float16):
            raise _Corrupt(f"{EMBEDDINGS}: {emb.shape} {emb.dtype}, expected (N, D) float32 or float16")
        if (len(logits), logits.shape[1], emb.shape[1]) != (info.get("n"), info.get("k"), info.get("d")) \
                or len(emb) != len(logits):
            raise _Corrupt(f"array shapes {logits.shape} / {emb.shape} disagree with {META}")
        return logits, emb, info

    # ---- write
    def put(self, key: str, logits: np.ndarray, embeddings: np.ndarray, meta: dict | None = None) -> Path | None:
        """Store ``logits`` (N, K) and ``embeddings`` (N, D) under ``key``; return the entry's folder.

        logits are stored as float32, embeddings as float16 if given so, else float32; both are copied
        in row chunks (a memory-mapped input stays on disk). ``meta``: a JSON-able dict returned by
        :meth:`get` (``model``, ``weights`` are shown by :meth:`entries`; values JSON cannot hold are
        stored as strings). The entry is written in a temp folder and renamed into place; if another
        process stored the same key first, its entry is kept. Then least-recently-used entries are
        evicted until the cache fits ``max_bytes``, never the one just written.

        Returns None (with a RuntimeWarning, nothing written) when the entry alone exceeds ``max_bytes``.
        Raises ValueError for a bad key or arrays; OSError for a full or unwritable disk.
        """
        from .data import iter_row_chunks
        from .runs import NpyWriter

        validate_key(key)
        logits, embeddings = np.asanyarray(logits), np.asanyarray(embeddings)
        if logits.ndim != 2 or embeddings.ndim != 2 or len(logits) != len(embeddings):
            raise ValueError(f"ScoreCache.put: expected logits (N, K) and embeddings (N, D) with the same N, "
                             f"got {logits.shape} and {embeddings.shape}")
        for name, a in (("logits", logits), ("embeddings", embeddings)):
            if a.dtype.kind not in "fiu":
                raise ValueError(f"ScoreCache.put: {name} must be numeric, got {a.dtype}")
        emb_dtype = np.dtype(np.float16) if embeddings.dtype == np.float16 else np.dtype(np.float32)
        n, k, d = int(logits.shape[0]), int(logits.shape[1]), int(embeddings.shape[1])
        info = {"format": FORMAT_VERSION, "key": key, "created": time.time(), "n": n, "k": k, "d": d,
                "embeddings_dtype": emb_dtype.name, "meta": dict(meta or {})}
        meta_bytes = json.dumps(info, sort_keys=True, default=str, indent=1).encode()
        size = _npy_bytes((n, k), np.dtype(np.float32)) + _npy_bytes((n, d), emb_dtype) + len(meta_bytes)
        if size > self.max_bytes:
            warnings.warn(f"score cache: an entry of {_fmt_bytes(size)} exceeds the cache limit of "
                          f"{_fmt_bytes(self.max_bytes)} (CGD_SCORE_CACHE_MB); not stored", RuntimeWarning, stacklevel=2)
            return None

        final = self.path(key)
        try:  # already stored (by this or another run): nothing to write
            self._read(final, key, mmap=True)
            os.utime(final)
            return final
        except (FileNotFoundError, NotADirectoryError, _Corrupt):
            pass
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self._aside("tmp", key)
        tmp.mkdir()
        try:
            for name, src, dt in ((LOGITS, logits, np.dtype(np.float32)), (EMBEDDINGS, embeddings, emb_dtype)):
                with NpyWriter(tmp / name, src.shape, dt) as w:
                    for _, _, block in iter_row_chunks(src):
                        w.write(np.asarray(block, dtype=dt))
            with open(tmp / META, "wb") as f:
                f.write(meta_bytes)
                f.flush()
                os.fsync(f.fileno())
            self._install(tmp, final, key)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self.evict(keep=key)
        return final

    def _install(self, tmp: Path, final: Path, key: str) -> None:
        """Rename the complete ``tmp`` onto ``final``; keep a valid entry another process put first."""
        for _ in range(3):
            try:
                os.rename(tmp, final)
                return
            except OSError:
                if not final.exists():
                    continue  # removed between the rename and the check: try again
            try:
                self._read(final, key, mmap=True)
                os.utime(final)
                return  # the same key, stored by another process: equal numbers, keep theirs
            except FileNotFoundError:
                continue
            except _Corrupt:
                self._remove(final, key)
        raise OSError(f"{final}: could not install the score-cache entry (another process keeps replacing it)")

    def _remove(self, folder: Path, key: str) -> int:
        """Move ``folder`` aside (atomic: readers see it whole or not at all), then delete it. Bytes freed."""
        size = _folder_bytes(folder)
        aside = self._aside("del", key)
        try:
            os.rename(folder, aside)
        except FileNotFoundError:
            return 0
        shutil.rmtree(aside, ignore_errors=True)
        return size

    # ---- listing, eviction
    def _scan(self) -> list[CacheEntry]:
        out: list[CacheEntry] = []
        try:
            it = list(os.scandir(self.root))
        except FileNotFoundError:
            return out
        now = time.time()
        for e in it:
            if e.name.startswith((".tmp-", ".del-")):
                try:  # a killed writer's or remover's leftovers
                    if e.is_dir(follow_symlinks=False) and now - e.stat(follow_symlinks=False).st_mtime > STALE_TEMP_S:
                        shutil.rmtree(e.path, ignore_errors=True)
                except OSError:
                    pass
                continue
            if KEY_RE.fullmatch(e.name) is None or not e.is_dir(follow_symlinks=False):
                continue
            try:
                st = e.stat(follow_symlinks=False)
                info = json.loads(Path(e.path, META).read_text(encoding="utf-8"))
                if not isinstance(info, dict):
                    raise ValueError
            except (OSError, ValueError):
                info = {}
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
            m = info.get("meta") if isinstance(info.get("meta"), dict) else {}
            out.append(CacheEntry(
                key=e.name, bytes=_folder_bytes(Path(e.path)), created=float(info.get("created") or st.st_mtime),
                last_used=st.st_mtime, n=int(info.get("n") or 0), k=int(info.get("k") or 0), d=int(info.get("d") or 0),
                model=None if m.get("model") is None else str(m.get("model")),
                weights=None if m.get("weights") is None else str(m.get("weights")), path=e.path))
        return out

    def entries(self) -> list[dict]:
        """One dict per entry, most recently used first: key, bytes, created, last_used (Unix s),
        n (images), k (classes), d (embedding width), model, weights, path."""
        return [asdict(e) for e in sorted(self._scan(), key=lambda e: -e.last_used)]

    def total_bytes(self) -> int:
        """Bytes held by all entries (temp folders of writes in progress not counted)."""
        return sum(e.bytes for e in self._scan())

    def evict(self, keep: str | None = None) -> int:
        """Remove least-recently-used entries (never ``keep``) until the total fits ``max_bytes``. Bytes freed."""
        ents = sorted(self._scan(), key=lambda e: e.last_used)
        total = sum(e.bytes for e in ents)
        freed = 0
        for e in ents:
            if total <= self.max_bytes:
                break
            if e.key == keep:
                continue
            got = self._remove(Path(e.path), e.key)
            total -= e.bytes
            freed += got
        return freed

    def clear(self, keys: Iterable[str] | None = None) -> int:
        """Remove the given entries (all when None; missing keys are skipped). Bytes freed."""
        if keys is None:
            return sum(self._remove(Path(e.path), e.key) for e in self._scan())
        return sum(self._remove(self.path(k), k) for k in [validate_key(k) for k in keys])


# --------------------------------------------------------------------------------------------
# `cgd cache ls|clear`
# --------------------------------------------------------------------------------------------

def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _fmt_age(seconds: float) -> str:
    s = max(0.0, seconds)
    for unit, width in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= width:
            return f"{s / width:.0f}{unit}"
    return f"{s:.0f}s"


_USAGE = ("usage: cgd cache ls | cgd cache clear [KEY...]\n"
          "  ls              list the shared reference-score cache ($CGD_CACHE/scores)\n"
          "  clear [KEY...]  remove the given entries (a unique key prefix of 8+ digits is enough), or all")


def cache_main(argv: list[str]) -> int:
    """``cgd cache ls`` / ``cgd cache clear [KEY...]``: 0 on success, 2 with a one-line error."""
    def fail(msg: str) -> int:
        print(f"cgd cache: error: {msg}", file=sys.stderr)
        return 2

    argv = list(argv)
    if not argv:
        return fail("expected a command: ls or clear (see `cgd cache --help`)")
    if argv[0] in ("-h", "--help", "help"):
        print(_USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        cache = ScoreCache()
    except ValueError as e:
        return fail(str(e))
    if cmd == "ls":
        if rest:
            return fail(f"ls takes no arguments, got {' '.join(rest)!r}")
        ents, now = cache.entries(), time.time()
        for e in ents:
            what = "/".join(str(x) for x in (e["model"] or "?", e["weights"] or "?"))
            print(f"{e['key']}  {_fmt_bytes(e['bytes']):>9}  used {_fmt_age(now - e['last_used']):>4} ago  "
                  f"{what}  n={e['n']}")
        total = sum(e["bytes"] for e in ents)
        print(f"total {_fmt_bytes(total)} in {len(ents)} entries (limit {_fmt_bytes(cache.max_bytes)}) at {cache.root}")
        return 0
    if cmd == "clear":
        if not rest:
            freed = cache.clear()
            print(f"freed {_fmt_bytes(freed)} ({freed} bytes)")
            return 0
        have = [e["key"] for e in cache.entries()]
        keys: list[str] = []
        for arg in rest:
            if not re.fullmatch(r"[0-9a-f]{8,128}", arg):
                return fail(f"invalid key {arg!r}: expected 8-128 lowercase hex digits (see `cgd cache ls`)")
            match = [k for k in have if k.startswith(arg)]
            if not match:
                return fail(f"no cache entry {arg!r} (see `cgd cache ls`)")
            if len(match) > 1:
                return fail(f"key prefix {arg!r} matches {len(match)} entries; give more digits")
            keys.append(match[0])
        freed = cache.clear(keys)
        print(f"freed {_fmt_bytes(freed)} ({freed} bytes) from {len(keys)} entries")
        return 0
    return fail(f"unknown command {cmd!r}: expected ls or clear")
