"""The audit verdict: is this training set poisoned, which class is the target, what kind of attack.

The rank rule (:func:`cgd.separation.flag_subsets`) always flags its tails, poisoned set or not. The
verdict asks a different question: do the samples that look poisoned *concentrate in one given
label* beyond what ordinary difficulty differences between classes give? A backdoor attack that
sends triggered images to one target class leaves its traces in that class only:

* ``contradiction`` — the share of a class's samples that the reference finds very unlikely
  (reference rank in the top ``tail``) *and* the suspicious models learnt very fast (model rank in
  the bottom ``tail``). Clean samples that the reference finds unlikely are usually hard for the
  models too, so this quadrant stays nearly empty in a clean set; dirty-label poisons fill it.
* ``disagreement`` — the share of a class's samples that the reference finds very unlikely. It
  catches dirty-label poisons that the models do not learn fast (warping triggers).
* ``fast_learning`` — the share of a class's samples in the models' fast tail minus its share in
  the reference's confident tail: a class that the models learn much faster than the reference
  finds it easy. It catches clean-label poisons (their labels are right, the trigger is learnt).

Each statistic is turned into a robust z-score across classes: the class's value minus the median
over classes, over the larger of the classes' spread (1.4826 x MAD) and the binomial standard error
at the median rate. The set is judged poisoned when the largest z reaches :attr:`VerdictConfig.
threshold` (calibrated on never-poisoned sets, see bench/README.md), or when the contradiction
quadrant as a whole holds far more samples than a clean set's (an all-to-all attack spreads its
poisons over every label). Arrays in, a small dataclass out.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .separation import rank_normalise

__all__ = ["VerdictConfig", "Verdict", "audit_verdict", "class_statistics"]


@dataclass(frozen=True)
class VerdictConfig:
    """tail: the rank tail that counts as 'very' unlikely / fast (fraction of the set).
    threshold: robust z at which a class counts as poisoned. quadrant_max: the share of the whole
    set in the contradiction quadrant above which the set counts as poisoned (all-to-all).
    min_class: classes with fewer samples are not judged on their own."""

    tail: float = 0.1
    threshold: float = 8.0
    quadrant_max: float = 0.03
    min_class: int = 20


@dataclass
class Verdict:
    """The audit verdict (see the module docstring).

    poisoned: the set looks poisoned. score: the largest robust z over classes and statistics;
    threshold: where an alarm starts. targets: suspected target classes (empty when none or spread).
    mode: "all-to-one", "all-to-all" or "none". family: "dirty-label" (the reference disagrees with
    the poisons' labels), "clean-label" (it agrees; the models learn them fast), "undetermined" or
    "none". estimated_poisons: about how many samples carry the attack. evidence: per statistic,
    the class with the largest z, its z, its rate and the median rate. tail_fraction: the share of
    the set the rank rule flags at the run's thresholds (filled by the caller), shown on a clean
    set as "the lowest-ranked x %".
    """

    poisoned: bool
    score: float
    threshold: float
    targets: list[int]
    mode: str
    family: str
    estimated_poisons: int
    evidence: dict = field(default_factory=dict)
    quadrant_share: float = 0.0
    tail_fraction: float | None = None

    def to_dict(self, classes: list[str] | None = None) -> dict:
        d = asdict(self)
        if classes is not None:
            d["target_names"] = [classes[t] for t in self.targets if 0 <= t < len(classes)]
        d["summary"] = self.sentence(classes)
        return d

    def sentence(self, classes: list[str] | None = None) -> str:
        """One plain sentence for pages, the CLI and reports."""
        name = (lambda k: f"{k} ({classes[k]})") if classes else str
        if not self.poisoned:
            return (f"No sign of poisoning: no class holds an unusual share of suspicious samples (largest score "
                    f"{self.score:.1f}, alarm at {self.threshold:.1f}).")
        fam = {"dirty-label": "dirty-label (the reference disagrees with the poisoned samples' labels)",
               "clean-label": "clean-label (the labels look right, but the models learn these samples unusually fast)",
               "undetermined": "of undetermined kind"}.get(self.family, self.family)
        if self.mode == "all-to-all":
            return (f"Poisoned, all-to-all: suspicious samples are spread over every label "
                    f"({100 * self.quadrant_share:.1f} % of the set in the contradiction quadrant); attack {fam}; "
                    f"about {self.estimated_poisons:,} poisoned samples.")
        tgt = ", ".join(name(t) for t in self.targets)
        return (f"Poisoned: target class {tgt}; attack {fam}; about {self.estimated_poisons:,} poisoned samples "
                f"(score {self.score:.1f}, alarm at {self.threshold:.1f}).")


def _robust_z(rate: np.ndarray, n: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Per class: (rate - median) / max(1.4826 MAD, binomial SE at the median rate, 1e-3); -inf where not ok."""
    z = np.full(len(rate), -np.inf)
    if ok.sum() < 3:
        return z
    r = rate[ok]
    med = float(np.median(r))
    mad = 1.4826 * float(np.median(np.abs(r - med)))
    se = np.sqrt(max(med, 1.0 / max(n[ok].max(), 1)) * (1 - min(med, 0.99)) / np.maximum(n, 1))
    z[ok] = (rate[ok] - med) / np.maximum(np.maximum(mad, se[ok]), 1e-3)
    return z


def class_statistics(clip_rank: np.ndarray, model_rank: np.ndarray, labels: np.ndarray, num_classes: int,
                     tail: float = 0.1) -> dict[str, np.ndarray]:
    """Per class (K,): n, and the rates of the three statistics (see the module docstring).

    clip_rank, model_rank: (N,) global ranks in (0, 1]; labels: (N,) given labels."""
    y = np.asarray(labels)
    n = np.bincount(y, minlength=num_classes).astype(np.float64)
    unlikely = clip_rank > 1.0 - tail
    fast = model_rank <= tail
    confident = clip_rank <= tail

    def rate(mask: np.ndarray) -> np.ndarray:
        return np.bincount(y[mask], minlength=num_classes) / np.maximum(n, 1)

    return {"n": n, "contradiction": rate(unlikely & fast), "disagreement": rate(unlikely),
            "fast_learning": rate(fast) - rate(confident), "fast": rate(fast), "confident": rate(confident)}


def audit_verdict(clip_nll: np.ndarray, model_nll: np.ndarray, labels: np.ndarray, num_classes: int,
                  cfg: VerdictConfig = VerdictConfig(), ref_pred: np.ndarray | None = None) -> Verdict:
    """The verdict for one scored training set.

    clip_nll, model_nll: (N,) -log p(given label) under the reference and the suspicious models
    (nats); labels: (N,) given labels; num_classes: K. ref_pred: (N,) the reference's top class,
    optional (not needed by the statistics; kept for callers' reports).
    """
    y = np.asarray(labels)
    cr, mr = rank_normalise(np.asarray(clip_nll, np.float64)), rank_normalise(np.asarray(model_nll, np.float64))
    st = class_statistics(cr, mr, y, num_classes, cfg.tail)
    n = st["n"]
    ok = n >= cfg.min_class
    z = {k: _robust_z(st[k], n, ok) for k in ("contradiction", "disagreement", "fast_learning")}
    evidence = {}
    for k, zk in z.items():
        c = int(np.argmax(zk))
        evidence[k] = {"class": c, "z": float(zk[c]) if np.isfinite(zk[c]) else float("nan"), "rate": float(st[k][c]),
                       "median_rate": float(np.median(st[k][ok])) if ok.any() else float("nan")}
    best = max(z, key=lambda k: np.max(z[k]))
    score = float(np.max(z[best])) if np.isfinite(np.max(z[best])) else 0.0
    quad_share = float((st["contradiction"] * n).sum() / max(n.sum(), 1))
    one = score >= cfg.threshold
    spread = not one and quad_share > cfg.quadrant_max
    if not (one or spread):
        return Verdict(False, score, cfg.threshold, [], "none", "none", 0, evidence, quad_share)
    if spread:
        est = int(round((quad_share - cfg.quadrant_max / 3) * n.sum()))
        return Verdict(True, score, cfg.threshold, [], "all-to-all", "dirty-label", max(est, 0), evidence, quad_share)
    target = int(np.argmax(z[best]))
    dirty = max(z["contradiction"][target], z["disagreement"][target]) >= cfg.threshold / 2
    clean_label = not dirty and z["fast_learning"][target] >= cfg.threshold
    family = "dirty-label" if dirty else ("clean-label" if clean_label else "undetermined")
    stat = "disagreement" if dirty and z["disagreement"][target] >= z["contradiction"][target] else (
        "contradiction" if dirty else "fast_learning")
    est = _excess(st, stat if stat != "fast_learning" else "fast", target, ok)
    return Verdict(True, score, cfg.threshold, [target], "all-to-one", family, est, evidence, quad_share)


def _excess(st: dict, key: str, target: int, ok: np.ndarray) -> int:
    """About how many of the target class's samples are beyond what a typical class shows: solving
    k = r0 (n - e) + e for e, with k the target's count and r0 the median rate of the other classes."""
    others = ok.copy()
    others[target] = False
    r0 = float(np.median(st[key][others])) if others.any() else 0.0
    n_t = float(st["n"][target])
    k = float(st[key][target]) * n_t
    return int(max(0.0, round((k - r0 * n_t) / max(1.0 - r0, 1e-6))))
