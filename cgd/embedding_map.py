"""A 2-D map of a run's reference embeddings (UMAP), computed once per run and cached on disk.

>>> from cgd.embedding_map import compute_embedding_map, load_embedding_map
>>> m = compute_embedding_map(RunDir("runs/demo"))   # RUN/embedding_map.npz (+ .json)
>>> m.xy.shape, m.index.shape                         # (M, 2) float32, (M,) sample indices

Above ``max_points`` samples the map is drawn for a seeded random subsample (``index`` says which
samples, ``subsampled`` is True) so the dashboard stays responsive; the cache key holds the
embeddings file's size and modification time plus every parameter, so a re-scored run gets a
fresh map and an unchanged one is never recomputed. ``method="pca"`` is a fast linear fallback
(no umap-learn needed) for previews and tests.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

from .runs import RunDir, atomic_write_bytes, read_json, utcnow, write_json

__all__ = ["EmbeddingMap", "MapConfig", "compute_embedding_map", "load_embedding_map", "map_key", "MAP_FILE",
           "DEFAULT_MAX_POINTS"]

MAP_FILE = "embedding_map.npz"
DEFAULT_MAX_POINTS = 20_000


@dataclass(frozen=True)
class MapConfig:
    """method: "umap" (umap-learn, seeded) or "pca"; max_points: subsample size limit;
    n_neighbors / min_dist: UMAP's (capped at M - 1 neighbours for tiny sets)."""

    method: str = "umap"
    max_points: int = DEFAULT_MAX_POINTS
    seed: int = 0
    n_neighbors: int = 15
    min_dist: float = 0.1

    def __post_init__(self) -> None:
        if self.method not in ("umap", "pca"):
            raise ValueError(f"method must be 'umap' or 'pca', got {self.method!r}")
        if self.max_points < 10:
            raise ValueError(f"max_points must be at least 10, got {self.max_points}")


@dataclass
class EmbeddingMap:
    """xy: (M, 2) float32 map coordinates; index: (M,) int64 sample indices (sorted) into the run's
    training set; n_total: N; subsampled: M < N; info: method, parameters, timings."""

    xy: np.ndarray
    index: np.ndarray
    n_total: int
    subsampled: bool
    info: dict = field(default_factory=dict)


def map_key(run: RunDir, cfg: MapConfig) -> str:
    """Hash of the embeddings file's identity (size, mtime) and the map parameters."""
    p = run.path("embeddings.npy")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no reference embeddings in this run yet (run the scoring first)")
    st = p.stat()
    return hashlib.sha256(json.dumps([st.st_size, st.st_mtime_ns, asdict(cfg)]).encode()).hexdigest()[:16]


def load_embedding_map(run: RunDir, cfg: MapConfig | None = None) -> EmbeddingMap | None:
    """The cached map, or None when absent or stale (embeddings changed). With ``cfg`` None any
    cached map for the current embeddings is accepted."""
    meta = read_json(run.path(MAP_FILE).with_suffix(".json"), None)
    if not meta or not run.path(MAP_FILE).is_file() or not run.path("embeddings.npy").is_file():
        return None
    want = map_key(run, cfg or MapConfig(**meta["config"]))
    if meta.get("key") != want:
        return None
    with np.load(run.path(MAP_FILE), allow_pickle=False) as z:
        xy, index = z["xy"].astype(np.float32), z["index"].astype(np.int64)
    return EmbeddingMap(xy, index, int(meta["n_total"]), bool(meta["subsampled"]), meta)


def _pca2(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(0, keepdims=True)
    # top-2 right singular vectors of the centred data
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T


def compute_embedding_map(run: RunDir, cfg: MapConfig = MapConfig(), force: bool = False) -> EmbeddingMap:
    """Compute (or load the cached) 2-D map of ``RUN/embeddings.npy`` and cache it in the run folder.

    Embeddings (N, D) are L2-normalised reference features; UMAP uses the euclidean metric on them
    (equivalent in ranking to cosine). Above ``cfg.max_points`` a seeded subsample (sorted indices)
    is mapped. Deterministic for a given seed (UMAP with ``random_state`` runs single-threaded).
    """
    if not force:
        cached = load_embedding_map(run, cfg)
        if cached is not None:
            return cached
    key = map_key(run, cfg)
    t0 = time.perf_counter()
    emb = run.load_array("embeddings.npy", mmap=True)
    n = int(emb.shape[0])
    if emb.ndim != 2 or n < 3:
        raise ValueError(f"{run.path('embeddings.npy')}: need an (N, D) array with N >= 3, got shape {emb.shape}")
    if n > cfg.max_points:
        index = np.sort(np.random.default_rng(cfg.seed).choice(n, size=cfg.max_points, replace=False))
    else:
        index = np.arange(n)
    x = np.asarray(emb[index], dtype=np.float32)
    if cfg.method == "umap":
        try:
            import umap
        except ImportError as e:  # pragma: no cover - a dependency of the dashboard extra
            raise ImportError("the UMAP map needs umap-learn (pip install umap-learn), or use method='pca'") from e
        reducer = umap.UMAP(n_components=2, n_neighbors=int(min(cfg.n_neighbors, len(x) - 1)), min_dist=cfg.min_dist,
                            metric="euclidean", random_state=cfg.seed, init="spectral" if len(x) > 10 else "random")
        with warnings.catch_warnings():  # "n_jobs overridden by random_state": seeded maps are single-threaded
            warnings.filterwarnings("ignore", message=".*n_jobs value.*", category=UserWarning)
            xy = reducer.fit_transform(x)
    else:
        xy = _pca2(x.astype(np.float64))
    xy = np.asarray(xy, np.float32)
    secs = time.perf_counter() - t0
    buf = io.BytesIO()
    np.savez(buf, xy=xy, index=index.astype(np.int64))
    atomic_write_bytes(run.path(MAP_FILE), buf.getvalue())
    meta = {"key": key, "config": asdict(cfg), "n_total": n, "n_points": int(len(index)), "subsampled": bool(len(index) < n),
            "seconds": round(secs, 3), "created": utcnow()}
    write_json(run.path(MAP_FILE).with_suffix(".json"), meta)
    return EmbeddingMap(xy, index.astype(np.int64), n, bool(len(index) < n), meta)
