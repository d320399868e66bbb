"""The audit verdict: is this training set poisoned, which class is the target, what kind of attack.

The rank rule (:func:`cgd.separation.flag_subsets`) always flags its tails, poisoned set or not. The
verdict asks a different question: do the samples that look poisoned *concentrate in one given
label* beyond what that label shows on data known to be clean? The run's test split is that
baseline: the reference and the suspicious models score it too (``clip_logits_test.npy``,
``model_logits_test.npy``), so every statistic compares a class's training samples with the same
class's test samples, at cut-offs taken from the training set's tails (``tail``, 10 %):

* ``contradiction`` -- within a class, the association between "the reference finds it very
  unlikely" and "the models learnt it very fast" (hypergeometric z). Clean samples the reference
  finds unlikely are hard for the models too; dirty-label poisons are both.
* ``disagreement`` -- how much more often the reference finds the class's training samples very
  unlikely than its test samples (dirty-label poisons that the models do not learn fast: warping).
* ``fast_learning`` -- how much more often the models learnt the class's training samples very
  fast than they fit its test samples (clean-label poisons: right labels, a trigger learnt fast).
* ``fit_shift`` -- within the class, how much better the models fit its training samples than its
  test samples, over the whole distribution (Mann-Whitney AUC of the two NLL samples against the
  median class): poisons in a hard class are learnt better than its test samples without reaching
  the set's fastest tail (SIG on half of the demo's cats: z 4.1 here, 1.3 on the tail statistics;
  clean-label rows score 6.5-24 against 5.6-10.6 before; never-poisoned sets at most 2.5).
* ``ref_shift`` -- the same comparison under the reference: within the class, how much more
  unlikely it finds the training samples than the test samples (AUC against the median class). The
  reference never trained on either split, so a clean class shows none, even where the reference
  fails the class; relabelled samples it only doubts, short of the set's unlikely tail, show here
  (WaNet with target 5 on the demo: 5.2, disagreement 1.5).
* ``joint`` -- (reference evidence + model evidence) / sqrt(2) in one class, each the larger of its
  two statistics and both positive: two independent sources each only moderately unusual (Blended
  at 5 % with target 2 on the demo: 3.5 and 3.8, joint 5.2).
* ``relabel`` -- (reference evidence + the class-share z, capped at 5) / sqrt(2), where the class holds
  clearly more of the training set than of the test set (share z >= 3): the two signatures of
  relabelling, from independent sources (low-frequency at 5 % with target 9 on the demo: the reference
  3.2, share 5.5, relabel 5.8; its trigger is optimised to look like the target, so the reference
  doubts its poisons less than others'; Blended at 3 % with target 6: 2.8 and 4.6, relabel 5.2). The
  cap keeps a naturally imbalanced split from raising the alarm unless the reference also doubts
  that class's training samples at z >= 2.1.

Besides the per-class statistics, ``spread`` (:func:`_spread`): the reference rejects the training
samples of more than max(2, K // 3) classes more often than their test samples, each at
``disagreement`` z >= threshold / 2 -- relabelling over many labels (an all-to-all attack whose poisons
the models do not learn fast, or label noise the test split does not share); its score is the
Stouffer z of the max(2, K // 3) + 1 largest class z.

The largest z over classes and statistics is the evidence score; the set is judged poisoned when
it reaches :attr:`VerdictConfig.threshold` (5.0: never-poisoned sets score 1.2-2.5 on the defense
benchmark and the demo, poisoned ones 5.2-26.5; see bench/README.md). Several hot classes make the
attack all-to-all; otherwise the class with the largest z is the target. The family follows from
the class shares of the two splits: a target class holding more of the training set than of the
test set received relabelled samples (dirty-label; share z >= 3). At a low rate the relabelled
samples are too few to shift the share that far, so a class whose samples the reference rejects
*and* the models learnt fast (``contradiction`` at the alarm threshold) is dirty-label too when its
share moved somewhat (z >= 1.5) and the contradiction beats the fast-learning evidence (CIFAR-10
Blended at 2 %: share z 2.98, contradiction 9.1, fast learning 2.8), or when nothing says
clean-label (BadNets at 1 % on the demo, target 4: 80 poisons, share z 1.6, contradiction 10.9).
Otherwise a class learnt fast with its share unchanged is clean-label: its poisons carry their right
labels. The poison count is estimated from the same excesses.

Runs scored before the test split's logits were kept are judged across classes only (each class
against the median class, robust z), with the higher :attr:`VerdictConfig.threshold_uncalibrated`.
Arrays in, a small dataclass out; :func:`run_verdict` reads a run folder.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .separation import rank_normalise

__all__ = ["VerdictConfig", "Verdict", "audit_verdict", "class_statistics", "run_verdict", "current_verdict", "verdict_doc",
           "VERDICT_VERSION"]

# bumped whenever the statistics or the threshold change: a verdict.json of another version is recomputed
# from the run's scores when read (current_verdict), so an old run never shows an outdated judgement
VERDICT_VERSION = 10


@dataclass(frozen=True)
class VerdictConfig:
    """tail: the rank tail that counts as 'very' unlikely / fast (fraction of the set).
    threshold: robust z at which a class counts as poisoned. quadrant_max: the share of the whole
    set in the contradiction quadrant above which the set counts as poisoned (all-to-all).
    min_class: classes with fewer samples are not judged on their own.

    The reference's disagreement (or ref_shift) alone (no class-share shift, no fast learning) never raises the alarm:
    relabelling adds samples to the target class, and a class whose training samples the reference
    rejects without that is what a reference failing on the class gives (GTSRB, never poisoned: a
    flip-trained reference calls 70 of 89 "keep left" training signs "keep right", z 5.1)."""

    tail: float = 0.1
    threshold: float = 5.0
    threshold_uncalibrated: float = 12.0
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
    caveat: str = ""

    def to_dict(self, classes: list[str] | None = None) -> dict:
        d = asdict(self)
        d["version"] = VERDICT_VERSION
        if classes is not None:
            d["target_names"] = [classes[t] for t in self.targets if 0 <= t < len(classes)]
        d["summary"] = self.sentence(classes)
        return d

    def sentence(self, classes: list[str] | None = None) -> str:
        """One plain sentence for pages, the CLI and reports."""
        name = (lambda k: f"{k} ({classes[k]})") if classes else str
        if not self.poisoned:
            return (f"No sign of poisoning: no class holds an unusual share of suspicious samples (largest score "
                    f"{self.score:.1f}, alarm at {self.threshold:.1f}).") + (f" {self.caveat}" if self.caveat else "")
        fam = {"dirty-label": "dirty-label (the reference disagrees with the poisoned samples' labels)",
               "clean-label": "clean-label (the labels look right, but the models learn these samples unusually fast)",
               "undetermined": "of undetermined kind"}.get(self.family, self.family)
        spread = (self.evidence or {}).get("spread")
        if self.mode == "all-to-all" and spread:
            return (f"Poisoned, all-to-all: the reference rejects the training samples of {len(spread['classes'])} classes "
                    f"far more often than their test samples (z >= {spread['z_min']:.1f} in each): relabelling over many "
                    f"labels, an all-to-all attack or label noise the test split does not share; attack {fam}; about "
                    f"{self.estimated_poisons:,} relabelled samples (score {self.score:.1f}, alarm at {self.threshold:.1f}).")
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


def _split_stats(clip_nll: np.ndarray, model_nll: np.ndarray, y: np.ndarray, k: int, ref_cut: float, fast_cut: float
                 ) -> dict[str, np.ndarray]:
    """Per class (K,) counts on one split: n, and how many samples the reference finds very unlikely
    (NLL above ``ref_cut``), the models learnt very fast (NLL below ``fast_cut``), and both."""
    unlikely, fast = clip_nll > ref_cut, model_nll < fast_cut

    def count(mask: np.ndarray) -> np.ndarray:
        return np.bincount(y[mask], minlength=k).astype(np.float64)

    return {"n": count(np.ones(len(y), bool)), "disagreement": count(unlikely), "fast_learning": count(fast),
            "contradiction": count(unlikely & fast)}


def _excess_z(tr: dict, te: dict, key: str, ok: np.ndarray, centred: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(rate on the training split - rate on the test split per class, its z-score): the excess over
    the binomial standard error of both rates combined with the classes' spread of excesses
    (1.4826 x MAD). ``centred``: the excess over the median class's excess instead of over 0, so a
    shift every class shares (one class's poisons filling the set's unlikely tail) counts for none."""
    n_tr, n_te = np.maximum(tr["n"], 1), np.maximum(te["n"], 1)
    e = tr[key] / n_tr - te[key] / n_te
    pooled = (tr[key] + te[key] + 0.5) / (n_tr + n_te + 1.0)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n_tr + 1 / n_te))
    return e, _spread_z(e, se, ok, centred)


def _spread_z(x: np.ndarray, se: np.ndarray, ok: np.ndarray, centred: bool) -> np.ndarray:
    """Per class (K,): ``x`` (minus the median class's when ``centred``) over sqrt(se^2 + (1.4826 MAD)^2),
    the sampling error combined with the classes' spread; -inf where not ``ok`` or fewer than 3 are."""
    z = np.full(len(x), -np.inf)
    if ok.sum() >= 3:
        med = float(np.median(x[ok]))
        spread = 1.4826 * float(np.median(np.abs(x[ok] - med)))
        z[ok] = (x[ok] - (med if centred else 0.0)) / np.sqrt(se[ok] ** 2 + spread ** 2)
    return z


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` (N,), tied values sharing the average of their ranks."""
    order = np.argsort(x, kind="stable")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    r = np.empty(len(x))
    r[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return r


def _shift_z(v: np.ndarray, y: np.ndarray, v_t: np.ndarray, y_t: np.ndarray, k: int, ok: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """Per class (K,): the AUC P(training value > test value) of ``v`` (N,) against ``v_t`` (M,) within
    the class (ties count half), and its z against the median class: (AUC - median) /
    sqrt(SE^2 + (1.4826 MAD)^2), with the Mann-Whitney SE sqrt((n + m + 1) / (12 n m)). The median
    absorbs a train/test gap every class shares (models fit what they trained on; a reference trained
    on part of the test split); -inf where not ``ok``."""
    auc = np.full(k, np.nan)
    se = np.full(k, np.inf)
    for c in np.flatnonzero(ok):
        a, b = v[y == c], v_t[y_t == c]
        r = _average_ranks(np.concatenate([a, b]))
        u = r[:len(a)].sum() - len(a) * (len(a) + 1) / 2  # training samples ranked above test ones
        auc[c] = u / (len(a) * len(b))
        se[c] = np.sqrt((len(a) + len(b) + 1) / (12.0 * len(a) * len(b)))
    return auc, _spread_z(auc, se, ok, centred=True)


def _fit_shift_z(mn: np.ndarray, y: np.ndarray, mn_t: np.ndarray, y_t: np.ndarray, k: int, ok: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per class: the AUC P(test NLL > training NLL) of the suspicious models' NLLs and its z (:func:`_shift_z`)."""
    return _shift_z(-np.asarray(mn), y, -np.asarray(mn_t), y_t, k, ok)


def _ref_shift_z(cn: np.ndarray, y: np.ndarray, cn_t: np.ndarray, y_t: np.ndarray, k: int, ok: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per class: the AUC P(training NLL > test NLL) of the reference's NLLs and its z (:func:`_shift_z`).
    The reference never trained on either split, so on a clean class the two are exchangeable (AUC
    about 0.5, or the median class's); a reference that fails a class fails its test samples too."""
    return _shift_z(np.asarray(cn), y, np.asarray(cn_t), y_t, k, ok)


def _joint_z(z: dict[str, np.ndarray]) -> np.ndarray:
    """Per class: (reference evidence + model evidence) / sqrt(2), where both are positive (-inf
    elsewhere); reference evidence = max(disagreement, ref_shift), model evidence = max(fast_learning,
    fit_shift). Two independent sources that are each only moderately unusual in the same class."""
    ref = np.maximum(z["disagreement"], z["ref_shift"])
    mod = np.maximum(z["fast_learning"], z["fit_shift"])
    return np.where((ref > 0) & (mod > 0), (ref + mod) / np.sqrt(2.0), -np.inf)


# class-share z at which a class counts as holding relabelled samples, and the most it adds to ``relabel``:
# a class-share shift alone can be natural (a test split balanced differently from the training set)
SHARE_Z_MIN, SHARE_Z_CAP = 3.0, 5.0


def _relabel_z(z: dict[str, np.ndarray], z_share: np.ndarray) -> np.ndarray:
    """Per class: (reference evidence + min(class-share z, 5)) / sqrt(2) where the class holds more of the
    training set than of the test set (share z >= 3) and the reference doubts its training samples
    (max(disagreement, ref_shift) > 0); -inf elsewhere. The two signatures of relabelling, from
    independent sources (counts and the reference's NLLs); capping the share keeps a naturally
    imbalanced split from raising the alarm without the reference."""
    ref = np.maximum(z["disagreement"], z["ref_shift"])
    return np.where((ref > 0) & (z_share >= SHARE_Z_MIN), (ref + np.minimum(z_share, SHARE_Z_CAP)) / np.sqrt(2.0), -np.inf)


def _association_z(tr: dict, ok: np.ndarray) -> np.ndarray:
    """Within each class: do the samples the reference finds unlikely tend to be the ones the models
    learnt fast? z of the observed count of both against its hypergeometric expectation
    (unlikely x fast / n). Clean classes show none or a negative association (hard samples are learnt
    slowly), also where a weak reference fails a whole class; dirty-label poisons are both."""
    n, u, f, q = tr["n"], tr["disagreement"], tr["fast_learning"], tr["contradiction"]
    n1 = np.maximum(n, 2)
    expect = u * f / n1
    var = u * f * (n1 - u) * (n1 - f) / (n1 ** 2 * (n1 - 1))
    z = np.full(len(n), -np.inf)
    z[ok] = (q[ok] - expect[ok]) / np.sqrt(np.maximum(var[ok], 0.25))
    return z


def _contradiction_excess(tr: dict) -> np.ndarray:
    """Per class (K,): training samples both very unlikely and learnt very fast, beyond the count that
    independence gives (unlikely x fast / n); about how many dirty-label poisons the class holds."""
    return tr["contradiction"] - tr["disagreement"] * tr["fast_learning"] / np.maximum(tr["n"], 1)


def _share_z(tr: dict, te: dict) -> tuple[np.ndarray, np.ndarray]:
    """(extra training samples per class beyond the test split's class shares, its z-score): a class
    that holds more of the training set than of the test set received relabelled samples."""
    n_tr, n_te = tr["n"].sum(), te["n"].sum()
    s_tr, s_te = tr["n"] / max(n_tr, 1), (te["n"] + 0.5) / max(n_te + 0.5 * len(te["n"]), 1)
    se = np.sqrt(s_te * (1 - s_te) * (1 / max(n_tr, 1) + 1 / max(n_te, 1)))
    return tr["n"] - s_te * n_tr, (s_tr - s_te) / np.maximum(se, 1e-9)


def audit_verdict(clip_nll: np.ndarray, model_nll: np.ndarray, labels: np.ndarray, num_classes: int,
                  cfg: VerdictConfig = VerdictConfig(), test: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                  ref_pred: np.ndarray | None = None) -> Verdict:
    """The verdict for one scored training set.

    clip_nll, model_nll: (N,) -log p(given label) under the reference and the suspicious models
    (nats); labels: (N,) given labels; num_classes: K. test: (reference NLL, suspicious-model NLL,
    labels) of the run's clean test split, (M,) each (recommended; :func:`run_verdict` passes it).
    With it, per class:

    * ``contradiction``: the association, within the class, between "the reference finds it very
      unlikely" and "the models learnt it very fast" (hypergeometric z; needs no test split);
    * ``disagreement``: how much more often the reference finds the class's training samples very
      unlikely than its test samples (the reference is clean, so the test split is its baseline);
    * ``fast_learning``: how much more often the models learnt the class's training samples very
      fast than they fit its test samples (clean-label poisons: the trigger is learnt, the labels are right);

    and the class-share shift between the splits decides the family (dirty-label attacks add
    relabelled samples to the target class; clean-label ones do not) and estimates the poison count.
    Without a test split the statistics are compared across classes only (:func:`class_statistics`),
    with a higher alarm threshold. ref_pred: unused, kept for callers' reports.
    """
    y = np.asarray(labels)
    if test is None or len(test[2]) < cfg.min_class:
        return _across_classes(clip_nll, model_nll, y, num_classes, cfg)
    cn, mn = np.asarray(clip_nll, np.float64), np.asarray(model_nll, np.float64)
    cn_t, mn_t, y_t = (np.asarray(a) for a in test)
    ref_cut = float(np.quantile(cn, 1 - cfg.tail))
    tr = _split_stats(cn, mn, y, num_classes, ref_cut, float(np.quantile(mn, cfg.tail)))
    te = _split_stats(cn_t, mn_t, y_t, num_classes, ref_cut, float(np.quantile(mn_t, cfg.tail)))
    ok = (tr["n"] >= cfg.min_class) & (te["n"] >= 5)
    auc, z_fit = _fit_shift_z(mn, y, mn_t, y_t, num_classes, ok)
    auc_ref, z_ref = _ref_shift_z(cn, y, cn_t, y_t, num_classes, ok)
    z = {"contradiction": _association_z(tr, ok), "disagreement": _excess_z(tr, te, "disagreement", ok)[1],
         "fast_learning": _excess_z(tr, te, "fast_learning", ok)[1], "fit_shift": z_fit, "ref_shift": z_ref}
    z["joint"] = _joint_z(z)
    extra, z_share = _share_z(tr, te)
    z["relabel"] = _relabel_z(z, z_share)
    evidence = {}
    for key, zk in z.items():
        c = int(np.argmax(zk))
        evidence[key] = {"class": c, "z": float(zk[c]) if np.isfinite(zk[c]) else float("nan")}
        if key in ("fit_shift", "ref_shift"):  # the class's AUC and the median class's
            a = auc if key == "fit_shift" else auc_ref
            evidence[key].update(auc=float(a[c]), median_auc=float(np.nanmedian(a[ok])) if ok.any() else float("nan"))
        elif key == "joint":
            evidence[key].update(reference=float(max(z["disagreement"][c], z["ref_shift"][c])),
                                 models=float(max(z["fast_learning"][c], z["fit_shift"][c])))
        elif key == "relabel":
            evidence[key].update(reference=float(max(z["disagreement"][c], z["ref_shift"][c])), share=float(z_share[c]))
        else:
            evidence[key].update(rate=float(tr[key][c] / max(tr["n"][c], 1)), test_rate=float(te[key][c] / max(te["n"][c], 1)))
    best = max(z, key=lambda k: np.max(z[k]))
    score = float(np.max(z[best])) if np.isfinite(np.max(z[best])) else 0.0
    quad_share = float(tr["contradiction"].sum() / max(tr["n"].sum(), 1))
    spread = _spread(z["disagreement"], ok, num_classes, cfg)
    if spread is not None:
        evidence["spread"] = spread
        spread_est = max(_rejected_excess(cn, y, cn_t, y_t, ok, t) for t in ESTIMATE_TAILS)
        spread_verdict = Verdict(True, max(score, spread["z"]), cfg.threshold, [], "all-to-all", "dirty-label", spread_est,
                                 evidence, quad_share)
    if score < cfg.threshold:
        if spread is not None:
            return spread_verdict
        return Verdict(False, score, cfg.threshold, [], "none", "none", 0, evidence, quad_share)
    # classes with dirty-label evidence of their own; the disagreement is taken over the median class's, since
    # one class's poisons filling the set's unlikely tail raise every class's rate a little (CIFAR-10 LC: 4 classes
    # at z 2.5-2.9, an all-to-one attack read as all-to-all)
    dirty_z = np.maximum(z["contradiction"], _excess_z(tr, te, "disagreement", ok, centred=True)[1])
    hot = np.flatnonzero(dirty_z >= cfg.threshold / 2)
    if len(hot) > max(2, num_classes // 3):  # poisons under many labels: all-to-all
        est = int(round(max(0.0, float(_contradiction_excess(tr)[hot].sum()))))
        return Verdict(True, score, cfg.threshold, [], "all-to-all", "dirty-label", est, evidence, quad_share)
    target = int(np.argmax(z[best]))
    evidence["class_share"] = {"class": target, "z": float(z_share[target]), "extra_samples": float(extra[target])}
    contra, models = z["contradiction"][target], max(z["fast_learning"][target], z["fit_shift"][target])
    if z_share[target] >= 3.0:  # the target class holds relabelled samples of other classes
        family, est = "dirty-label", int(round(max(0.0, float(extra[target]))))
    elif contra >= cfg.threshold and (models < cfg.threshold / 2 or (contra > models and z_share[target] >= 1.5)):
        # a low rate: too few relabelled samples to move the share far. The reference rejects the samples the
        # models learnt fast, and either nothing says clean-label or the share moved somewhat (clean-label poisons
        # leave it at 0) and the contradiction beats the fast learning (CIFAR-10 Blended at 2 %: share z 2.98,
        # contradiction 9.1, fast learning 2.8 -- read as clean-label under v9, and its repair kept the backdoor)
        family = "dirty-label"
        est = int(round(max(0.0, float(extra[target]), float(_contradiction_excess(tr)[target]))))
    elif models >= cfg.threshold / 2:
        family = "clean-label"
        est = max(_fast_excess(cn, mn, y, mn_t, y_t, num_classes, target, t) for t in ESTIMATE_TAILS)
    else:
        family, est = "undetermined", 0
    if family == "undetermined" and best in ("disagreement", "ref_shift"):
        if spread is not None:  # not one class the reference fails on: many classes' training samples are rejected
            return spread_verdict
        return Verdict(False, score, cfg.threshold, [], "none", "none", 0, evidence, quad_share, caveat=(
            f"Class {target}: the reference finds its training samples unlikely far more often than its test samples "
            f"(z {score:.1f}), but the class holds no more of the training set than of the test set and the models do "
            "not learn these samples fast; that is what a reference failing on this class gives, so it is not counted "
            "as poisoning. Check the class on the Inspect page."))
    return Verdict(True, score, cfg.threshold, [target], "all-to-one", family, est, evidence, quad_share)


def _spread(z_dis: np.ndarray, ok: np.ndarray, k: int, cfg: VerdictConfig) -> dict | None:
    """Relabelling spread over many labels (all-to-all): the reference rejects the training samples of
    more than max(2, K // 3) classes more often than their test samples, each at ``disagreement`` z >=
    threshold / 2. Returns those classes, the smallest of their z and the Stouffer z of the m =
    max(2, K // 3) + 1 largest (at least threshold / 2 x sqrt(m), so at or above the alarm), or None.

    One class alone is what a reference failing on it gives, and the count scales with K: CIFAR-10
    BadNets all-to-all (10,000 images) has 7 of 10 classes at z 2.8-5.0; never-poisoned sets have at
    most 6 of 43 (GTSRB, a reference trained on near-duplicates of its test split) and 0 of 10 (CIFAR-10,
    the demo). Label noise that the test split does not share looks the same, and is reported so."""
    m = max(2, k // 3) + 1
    zs = np.where(ok, z_dis, -np.inf)
    top = np.sort(zs)[::-1][:m]
    if len(top) < m or not np.all(top >= cfg.threshold / 2):
        return None
    cls = np.flatnonzero(zs >= cfg.threshold / 2)
    return {"classes": [int(c) for c in cls], "z_min": float(zs[cls].min()), "z": float(top.sum() / np.sqrt(m))}


def _rejected_excess(cn: np.ndarray, y: np.ndarray, cn_t: np.ndarray, y_t: np.ndarray, ok: np.ndarray, tail: float) -> int:
    """About how many training samples the reference rejects beyond what their classes' test samples give,
    summed over the ``ok`` classes (signed, so the noise of classes without poisons cancels), at one tail:
    per class, solving p_train = p_test (1 - e/n) + e/n for e (relabelled samples all beyond the cut)."""
    cut = float(np.quantile(cn, 1 - tail))
    e = sum(_solve_excess(float((y == c).sum()), float((cn[y == c] > cut).mean()), float((cn_t[y_t == c] > cut).mean()))
            for c in np.flatnonzero(ok))
    return max(0, round(e))


def _solve_excess(n: float, p_tr: float, p_te: float) -> float:
    """How many of a class's ``n`` training samples carry an effect its test samples show at rate
    ``p_te``, when the training samples show it at ``p_tr``: e from p_tr = p_te (1 - e/n) + e/n."""
    return n * (p_tr - p_te) / max(1.0 - p_te, 1e-6)


def _fast_excess(cn, mn, y, mn_t, y_t, k: int, target: int, tail: float) -> int:
    """About how many target-class training samples were learnt faster than the class's test samples
    fit, at one tail: solving p_train = p_test (1 - e/n) + e/n for e."""
    n = float((y == target).sum())
    p_tr = float((mn[y == target] < np.quantile(mn, tail)).mean()) if n else 0.0
    m_t = y_t == target
    p_te = float((mn_t[m_t] < np.quantile(mn_t, tail)).mean()) if m_t.any() else 0.0
    return max(0, round(_solve_excess(n, p_tr, p_te)))


def _across_classes(clip_nll: np.ndarray, model_nll: np.ndarray, y: np.ndarray, num_classes: int,
                    cfg: VerdictConfig) -> Verdict:
    """The verdict without a test split: each statistic compared across classes (robust z)."""
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
    threshold = cfg.threshold_uncalibrated
    one = score >= threshold
    spread = not one and quad_share > cfg.quadrant_max
    if not (one or spread):
        return Verdict(False, score, threshold, [], "none", "none", 0, evidence, quad_share)
    if spread:
        est = int(round((quad_share - cfg.quadrant_max / 3) * n.sum()))
        return Verdict(True, score, threshold, [], "all-to-all", "dirty-label", max(est, 0), evidence, quad_share)
    target = int(np.argmax(z[best]))
    dirty = max(z["contradiction"][target], z["disagreement"][target]) >= threshold / 2
    clean_label = not dirty and z["fast_learning"][target] >= threshold
    family = "dirty-label" if dirty else ("clean-label" if clean_label else "undetermined")
    stat = "disagreement" if dirty and z["disagreement"][target] >= z["contradiction"][target] else (
        "contradiction" if dirty else "fast")
    est = max(_excess(class_statistics(cr, mr, y, num_classes, t), stat, target, ok) for t in ESTIMATE_TAILS)
    return Verdict(True, score, threshold, [target], "all-to-one", family, est, evidence, quad_share)


# rank tails over which the poison count is estimated (the largest excess wins: a wide tail holds
# more of the poisons, a narrow one less of the clean background)
ESTIMATE_TAILS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)


def _excess(st: dict, key: str, target: int, ok: np.ndarray) -> int:
    """About how many of the target class's samples are beyond what a typical class shows: solving
    k = r0 (n - e) + e for e, with k the target's count and r0 the median rate of the other classes."""
    others = ok.copy()
    others[target] = False
    r0 = float(np.median(st[key][others])) if others.any() else 0.0
    n_t = float(st["n"][target])
    k = float(st[key][target]) * n_t
    return int(max(0.0, round((k - r0 * n_t) / max(1.0 - r0, 1e-6))))


def run_verdict(run, df=None) -> tuple[Verdict, list[str]]:
    """The verdict of a scored run folder (a :class:`cgd.runs.RunDir`) and its class names: the
    training set's NLLs from its scores table, compared with its test split's when the run has the
    test split's logits (runs scored before those were kept are judged across classes only)."""
    from . import layout
    from .scores import read_scores
    from .separation import label_nll

    df = read_scores(run) if df is None else df
    classes = run.read_classes() or []
    k = len(classes) or int(df["label"].max()) + 1
    test = None
    if all(run.has(n) for n in (layout.CLIP_LOGITS_TEST, layout.MODEL_LOGITS_TEST, layout.data_file("test_y"))):
        y_t = run.load_array(layout.data_file("test_y"))
        test = (label_nll(run.load_array(layout.CLIP_LOGITS_TEST), y_t), label_nll(run.load_array(layout.MODEL_LOGITS_TEST), y_t), y_t)
    v = audit_verdict(df["clip_nll"].to_numpy(), df["model_nll"].to_numpy(), df["label"].to_numpy(), k, test=test)
    return v, classes


def current_verdict(run) -> dict | None:
    """The run's verdict as a dict: its ``verdict.json`` when written by this version of the verdict,
    else recomputed from the run's scores (None before the run was scored). Nothing is written."""
    from . import layout

    saved = run.read_verdict()
    if saved and saved.get("version") == VERDICT_VERSION:
        return saved
    if not run.has(layout.SCORES):
        return saved
    from .scores import read_scores

    return verdict_doc(run, read_scores(run))


def verdict_doc(run, df) -> dict:
    """The verdict of a run's scores table ``df`` as written to verdict.json: :meth:`Verdict.to_dict`
    with the class names, plus ``tail_fraction`` (the share the rank rule flags as suspect)."""
    from .separation import Subset

    v, classes = run_verdict(run, df)
    doc = v.to_dict(classes)
    sub = df["subset"].to_numpy()
    doc["tail_fraction"] = float((sub == Subset.SUSPECT).mean()) if len(sub) else 0.0
    return doc
