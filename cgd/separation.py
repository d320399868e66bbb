"""Entropy-based separation of a training set into clean, suspect and unused subsets.

Score -> rank -> flag -> order, NumPy in and out:

* :func:`label_nll` — per-sample "entropy": negative log-likelihood of the given label (nats, >= 0).
  High CLIP NLL = CLIP disagrees with the label (dirty-label poison); low suspicious-model NLL =
  learnt unusually fast (any poison).
* :func:`rank_normalise` — ranks in (0, 1] (rank / N, ascending; ties share their average rank),
  globally or within each given class.
* :func:`flag_subsets` — the CGD rule at a :class:`~cgd.config.SeparationConfig`'s ``sigma1`` /
  ``sigma2``, plus (``sigma3``) the tail of the joint rank of ``clip_rank - model_rank``, which catches
  poisons that are suspicious on both axes without being in either axis's own tail; codes are
  :class:`Subset` values (:func:`separate` takes the thresholds one by one).
* :func:`oversample_per_class` — clean indices repeated per class to the largest class, seeded.
* :func:`detection_metrics`, :func:`auroc`, :func:`roc_curve`, :func:`threshold_sweep`.
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np

from .config import PRESETS, SeparationConfig, apply_preset

__all__ = [
    "Subset", "UNUSED", "CLEAN", "SUSPECT", "SUBSET_NAMES", "flag_subsets",
    "SeparationConfig", "SEPARATION_PRESETS",
    "label_nll",
    "rank_normalise",
    "separate",
    "apply_overrides",
    "oversample_per_class",
    "detection_metrics",
    "auroc",
    "roc_curve",
    "threshold_sweep",
    "subset_counts",
]

class Subset(IntEnum):
    """Where separation puts a sample. Stored as these int8 codes in scores.parquet and overrides.json."""

    UNUSED = 0  # neither clean nor suspect: left out of retraining
    CLEAN = 1  # trained on with its label
    SUSPECT = 2  # distilled from the reference, its label unlearnt

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: "int | str | Subset") -> "Subset":
        """A Subset from its code (0/1/2) or name ("clean", ...); ValueError otherwise."""
        if isinstance(value, str) and not value.strip().isdigit():
            try:
                return cls[value.strip().upper()]
            except KeyError:
                raise ValueError(f"subset must be one of {', '.join(m.label for m in cls)}, got {value!r}") from None
        try:
            return cls(int(value))
        except (ValueError, TypeError):
            raise ValueError(f"subset code must be 0, 1 or 2, got {value!r}") from None


UNUSED, CLEAN, SUSPECT = Subset.UNUSED, Subset.CLEAN, Subset.SUSPECT
SUBSET_NAMES = {m: m.label for m in Subset}

SEPARATION_PRESETS: dict[str, SeparationConfig] = {name: apply_preset(SeparationConfig(), name) for name in PRESETS}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def label_nll(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ``labels`` under ``softmax(logits)``.

    logits: (N, K) float, finite. labels: (N,) ints in [0, K). Returns (N,) float64 >= 0, in nats.
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, K), got shape {logits.shape}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must be ({logits.shape[0]},), got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]})")
    if not np.isfinite(logits).all():
        bad = int(np.flatnonzero(~np.isfinite(logits).all(axis=1))[0])
        raise ValueError(f"logits contain NaN or infinite values (first at sample {bad}); the model is broken or diverged")
    lp = _log_softmax(logits)
    return np.maximum(-lp[np.arange(len(labels)), labels], 0.0)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get their average rank."""
    n = len(x)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    ranks = np.empty(n, np.float64)
    # boundaries of tie groups
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], n]
    avg = (starts + ends + 1) / 2.0  # mean of (start+1 .. end)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def rank_normalise(values: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Rank / N in (0, 1], ascending (the largest value gets 1).

    values: (N,) float. groups: optional (N,) ints; ranks are then computed within each group and
    divided by the group's size. Ties share their average rank.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {values.shape}")
    if np.isnan(values).any():
        raise ValueError("values contain NaN")
    if groups is None:
        return _average_ranks(values) / max(len(values), 1)
    groups = np.asarray(groups)
    out = np.empty(len(values), np.float64)
    for g in np.unique(groups):
        m = groups == g
        out[m] = _average_ranks(values[m]) / m.sum()
    return out


def flag_subsets(clip_rank: np.ndarray, model_rank: np.ndarray, cfg: SeparationConfig) -> np.ndarray:
    """The CGD rule at ``cfg``'s thresholds, with an optional joint tail. Returns (N,) int8
    :class:`Subset` codes: 1 clean, 2 suspect, 0 unused.

    clip_rank, model_rank: (N,) ranks in (0, 1] of the reference and suspicious-model NLLs, in
    ``cfg.rank_mode`` (the caller picks the matching columns, see :func:`cgd.scores.ranks`).

    clean   = clip_rank <= 1 - sigma1  and  model_rank >= sigma1
    suspect = clip_rank >  1 - sigma2  or   model_rank <  sigma2   (wins where both hold)
              or  joint_rank > 1 - sigma3,   joint_rank = rank_normalise(clip_rank - model_rank)

    ``sigma3 = 0`` is the paper's rule. The joint tail flags samples that the reference finds
    unlikely *and* the suspicious model learnt fast, though neither is in its axis's own top
    ``sigma2``: on the defense benchmark (10,000 CIFAR-10 images, trusted-classifier reference)
    sigma3 = 0.1 raised the suspect TPR for SSBA from 89.3 to 98.6 % and for low-frequency poisons
    from 94.7 to 99.5 % while the FPR rose by at most 0.7 points (bench/README.md).
    """
    clip_rank = np.asarray(clip_rank, np.float64)
    model_rank = np.asarray(model_rank, np.float64)
    if clip_rank.shape != model_rank.shape or clip_rank.ndim != 1:
        raise ValueError(f"clip_rank and model_rank must be equal-length 1-D arrays, got {clip_rank.shape} and {model_rank.shape}")
    out = np.zeros(len(clip_rank), np.int8)
    out[(clip_rank <= 1.0 - cfg.sigma1) & (model_rank >= cfg.sigma1)] = CLEAN
    suspect = (clip_rank > 1.0 - cfg.sigma2) | (model_rank < cfg.sigma2)
    if cfg.sigma3 > 0 and len(clip_rank):
        suspect |= rank_normalise(clip_rank - model_rank) > 1.0 - cfg.sigma3
    out[suspect] = SUSPECT
    return out


def separate(clip_rank: np.ndarray, model_rank: np.ndarray, sigma1: float | None = None, sigma2: float | None = None,
             sigma3: float | None = None) -> np.ndarray:
    """:func:`flag_subsets` with the thresholds given one by one; one left out takes
    :class:`~cgd.config.SeparationConfig`'s default."""
    given = {k: v for k, v in (("sigma1", sigma1), ("sigma2", sigma2), ("sigma3", sigma3)) if v is not None}
    return flag_subsets(clip_rank, model_rank, SeparationConfig(**given))


def apply_overrides(subset: np.ndarray, overrides: dict[int, int] | None) -> np.ndarray:
    """Subset codes with manual overrides {index: code} applied (a copy)."""
    out = np.array(subset, np.int8, copy=True)
    for i, code in (overrides or {}).items():
        try:
            code = Subset.parse(code)
        except ValueError as e:
            raise ValueError(f"override for sample {i}: {e}") from None
        if not 0 <= int(i) < len(out):
            raise ValueError(f"override index {i} out of range [0, {len(out)})")
        out[int(i)] = code
    return out


def oversample_per_class(indices: np.ndarray, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Repeat ``indices`` within each class up to the largest class's count, then shuffle; seeded.

    indices: (M,) sample indices (e.g. the clean subset). labels: (N,) labels of the whole set.
    Returns (C * max_count,) indices where C is the number of classes present in ``indices``:
    each class keeps all its own samples once, plus a seeded draw without replacement (repeated
    as needed) to fill up. Classes absent from ``indices`` stay absent.
    """
    indices = np.asarray(indices, np.int64)
    if len(indices) == 0:
        return indices.copy()
    rng = np.random.default_rng(seed)
    lab = np.asarray(labels)[indices]
    classes, counts = np.unique(lab, return_counts=True)
    target = counts.max()
    parts = []
    for c in classes:
        own = indices[lab == c]
        reps, rest = divmod(int(target), len(own))
        extra = rng.choice(own, size=rest, replace=False) if rest else np.zeros(0, np.int64)
        parts.append(np.concatenate([np.tile(own, reps), extra]))
    out = np.concatenate(parts)
    return out[rng.permutation(len(out))]


def subset_counts(subset: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Per-class counts of each subset: {"clean": (K,), "suspect": (K,), "unused": (K,)}."""
    return {name: np.bincount(np.asarray(labels)[subset == code], minlength=num_classes)
            for code, name in SUBSET_NAMES.items()}


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` (higher = more positive) for a boolean mask.

    Mann-Whitney formulation with average ranks for ties; NaN when one class is empty.
    """
    scores = np.asarray(scores, np.float64)
    positives = np.asarray(positives, bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _average_ranks(scores)
    return float((r[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, positives: np.ndarray, max_points: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) arrays from (0, 0) to (1, 1), thinned to at most ``max_points`` thresholds."""
    scores = np.asarray(scores, np.float64)
    positives = np.asarray(positives, bool)
    order = np.argsort(-scores, kind="stable")
    p = positives[order]
    tps = np.cumsum(p)
    fps = np.cumsum(~p)
    distinct = np.r_[np.flatnonzero(np.diff(scores[order])), len(p) - 1]
    if len(distinct) > max_points:
        distinct = distinct[np.linspace(0, len(distinct) - 1, max_points).astype(int)]
    tpr = np.r_[0.0, tps[distinct] / max(p.sum(), 1)]
    fpr = np.r_[0.0, fps[distinct] / max((~p).sum(), 1)]
    return fpr, tpr


def _rates(flag: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    tp = int((flag & truth).sum())
    fp = int((flag & ~truth).sum())
    fn = int((~flag & truth).sum())
    tn = int((~flag & ~truth).sum())
    tpr = tp / (tp + fn) if tp + fn else float("nan")
    fpr = fp / (fp + tn) if fp + tn else float("nan")
    prec = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * prec * tpr / (prec + tpr) if tp else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "tpr": tpr, "fpr": fpr, "precision": prec, "f1": f1, "size": int(flag.sum())}


def detection_metrics(subset: np.ndarray, poison_mask: np.ndarray, clip_nll: np.ndarray | None = None,
                      model_nll: np.ndarray | None = None) -> dict:
    """Detection quality against a ground-truth poison mask.

    ``suspect``: the suspect subset as a detector of poisoned samples (TPR = share of poisons
    caught, FPR = share of clean samples flagged). ``clean``: the clean subset as a selector of
    clean samples (positives = clean samples; ``poison_in_clean`` = poisons that slipped in).
    AUROC of each entropy as a poison score (CLIP NLL high = poison; model NLL low = poison).
    """
    truth = np.asarray(poison_mask, bool)
    subset = np.asarray(subset)
    out = {"suspect": _rates(subset == SUSPECT, truth), "clean": _rates(subset == CLEAN, ~truth),
           "poison_in_clean": int(((subset == CLEAN) & truth).sum()), "n_poison": int(truth.sum()), "n": int(len(truth))}
    if clip_nll is not None:
        out["auroc_clip"] = auroc(clip_nll, truth)
    if model_nll is not None:
        out["auroc_model"] = auroc(-np.asarray(model_nll), truth)
    return out


def threshold_sweep(clip_rank: np.ndarray, model_rank: np.ndarray, poison_mask: np.ndarray | None = None,
                    sigmas: np.ndarray | None = None, sigma2_ratio: float = 0.5, sigma3: float | None = None) -> list[dict]:
    """Subset sizes (and detection rates when ground truth exists) over a grid of sigma1 values,
    with sigma2 = sigma2_ratio * sigma1 and a fixed sigma3 (None: SeparationConfig's default).
    One dict per grid point."""
    sigmas = np.round(np.linspace(0.02, 0.5, 25), 4) if sigmas is None else np.asarray(sigmas)
    sigma3 = SeparationConfig().sigma3 if sigma3 is None else float(sigma3)
    rows = []
    for s1 in sigmas:
        s2 = float(s1) * sigma2_ratio
        sub = flag_subsets(clip_rank, model_rank, SeparationConfig(float(s1), s2, sigma3=sigma3))
        row = {"sigma1": float(s1), "sigma2": s2, "clean": int((sub == CLEAN).sum()),
               "suspect": int((sub == SUSPECT).sum()), "unused": int((sub == UNUSED).sum())}
        if poison_mask is not None:
            m = detection_metrics(sub, poison_mask)
            row.update({"suspect_tpr": m["suspect"]["tpr"], "suspect_fpr": m["suspect"]["fpr"],
                        "poison_in_clean": m["poison_in_clean"]})
        rows.append(row)
    return rows
