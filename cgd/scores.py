"""Per-sample scores of a run, computed once from the two sets of logits and read by key.

``scores.parquet`` holds one row per training sample:

========================  =====================================================================
index, source_index       position in the run's training set / in the original dataset
label                     the given label
clip_nll, model_nll       -log p(label) under the reference and the suspicious models (nats)
clip_rank, model_rank     their ranks in (0, 1] over the whole set ("global", the paper)
clip_rank_class, ...      the same ranks within each given label ("per_class")
clip_pred, clip_conf      the reference's top class and its probability
model_pred                the suspicious models' top class
subset                    :class:`~cgd.separation.Subset` code at the run's saved separation
poison, original_label    ground truth, where the run has it
========================  =====================================================================

(The ``clip_`` columns hold the reference's scores whatever the reference is, CLIP or a classifier.)
Tables written before the per-class columns existed are completed on reading (:func:`read_scores`).
"""
from __future__ import annotations

import io

import numpy as np

from . import layout
from .config import SeparationConfig
from .runs import RunDir, atomic_write_bytes
from .separation import Subset, apply_overrides, flag_subsets, label_nll, rank_normalise

__all__ = ["compute_scores", "ranks", "subsets", "write_scores", "read_scores", "read_subsets", "top_k"]

RANK_COLUMNS = {"global": ("clip_rank", "model_rank"), "per_class": ("clip_rank_class", "model_rank_class")}


def compute_scores(ref_logits: np.ndarray, model_logits: np.ndarray, labels: np.ndarray,
                   source_index: np.ndarray | None = None, poison_mask: np.ndarray | None = None,
                   original_labels: np.ndarray | None = None):
    """The scores table (a pandas DataFrame, columns above, ``subset`` not yet set).

    ref_logits, model_logits: (N, K) float; labels: (N,) ints in [0, K).
    """
    import pandas as pd

    y = np.asarray(labels)
    clip_nll, model_nll = label_nll(ref_logits, y), label_nll(model_logits, y)
    z = ref_logits - ref_logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    df = pd.DataFrame({
        "index": np.arange(len(y)),
        "source_index": np.arange(len(y)) if source_index is None else np.asarray(source_index),
        "label": y,
        "clip_nll": clip_nll, "model_nll": model_nll,
        "clip_rank": rank_normalise(clip_nll), "model_rank": rank_normalise(model_nll),
        "subset": np.zeros(len(y), np.int8),
        "clip_rank_class": rank_normalise(clip_nll, y), "model_rank_class": rank_normalise(model_nll, y),
        "clip_pred": ref_logits.argmax(1), "clip_conf": p.max(1), "model_pred": model_logits.argmax(1),
    })
    if poison_mask is not None:
        df["poison"] = np.asarray(poison_mask, bool)
    if original_labels is not None:
        df["original_label"] = np.asarray(original_labels)
    return df


def ranks(df, rank_mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(reference ranks, suspicious-model ranks) of the table in ``rank_mode`` ("global" | "per_class")."""
    if rank_mode not in RANK_COLUMNS:
        raise ValueError(f"rank_mode must be one of {', '.join(RANK_COLUMNS)}, got {rank_mode!r}")
    a, b = RANK_COLUMNS[rank_mode]
    return df[a].to_numpy(), df[b].to_numpy()


def subsets(df, cfg: SeparationConfig, overrides: dict[int, int] | None = None) -> np.ndarray:
    """(N,) int8 Subset codes of the table at ``cfg``, with manual ``overrides`` applied."""
    return apply_overrides(flag_subsets(*ranks(df, cfg.rank_mode), cfg), overrides)


def write_scores(run: RunDir, df) -> None:
    """scores.parquet, atomically."""
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(run.path(layout.SCORES), buf.getvalue())


def read_scores(run: RunDir, columns: list[str] | None = None):
    """The run's scores table; tables from older versions are brought to the current columns
    (subset names become codes; per-class ranks are computed; display text columns are dropped)."""
    import pandas as pd

    df = pd.read_parquet(run.path(layout.SCORES), columns=columns)
    if "subset" in df and df["subset"].dtype.kind not in "iu":
        df["subset"] = df["subset"].astype(str).map({m.label: int(m) for m in Subset}).astype(np.int8)
    for kind in ("clip", "model"):  # older tables: one rank column, in the run's rank mode then
        if f"{kind}_rank_class" not in df and f"{kind}_nll" in df and "label" in df:
            nll, y = df[f"{kind}_nll"].to_numpy(), df["label"].to_numpy()
            df[f"{kind}_rank"], df[f"{kind}_rank_class"] = rank_normalise(nll), rank_normalise(nll, y)
    return df.drop(columns=[c for c in ("clip_top3",) if c in df])


def read_subsets(run: RunDir) -> np.ndarray:
    """(N,) int8 Subset codes saved by the separate stage."""
    return read_scores(run, columns=["subset"])["subset"].to_numpy(np.int8)


def top_k(logits: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(indices (N, k), probabilities (N, k)) of the k most likely classes per row of (N, K) logits."""
    logits = np.asarray(logits, np.float64)
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    idx = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(p, idx, 1)
