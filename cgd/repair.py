"""Judging a retraining against the run's own before/after figures: did the repair work?

:func:`repair_outcome` turns the per-epoch metrics and the retraining's final event into the run's
summary: before and after (the figures of the epoch whose weights the model ends with), the kept and
best epochs, whether training stopped early, and an :class:`Outcome`: a status, one plain sentence,
the checkpoint's label and suggestions of what to try next. Each suggestion cites the measurement
behind it; none is offered without one.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .config import RetrainConfig

__all__ = ["Outcome", "repair_outcome", "judge", "STATUSES"]

# status -> (headline, checkpoint label)
STATUSES = {
    "repaired": ("Repair worked: the backdoor is gone and clean accuracy held.", "Repaired model"),
    "backdoor_remains": ("Repair failed: the backdoor is still active.", "Retrained model (backdoor still active)"),
    "ca_lost": ("The backdoor is gone, but clean accuracy fell beyond the tolerance.", "Retrained model (clean accuracy lost)"),
    "failed": ("Repair failed: the backdoor is still active and clean accuracy fell.", "Retrained model (repair failed)"),
    "no_backdoor_effect": ("The model showed no backdoor effect before repair; retraining kept clean accuracy.",
                           "Retrained model"),
    "unverified": ("Retraining finished, but the attack success rate cannot be measured: this run has no "
                   "triggered test set (no known trigger).", "Retrained model (backdoor removal not verified)"),
}


@dataclass
class Outcome:
    """What a retraining achieved. status: one of :data:`STATUSES`; message: one sentence with the
    figures; label: what to call the checkpoint; suggestions: what to try next, each with its evidence;
    asr_limit: the ASR (in %) below which the backdoor counts as removed; ca_limit: the CA drop
    (points) beyond which clean accuracy counts as lost."""

    status: str
    message: str
    label: str
    suggestions: list[str] = field(default_factory=list)
    asr_limit: float = float("nan")
    ca_limit: float = float("nan")

    @property
    def ok(self) -> bool:
        return self.status in ("repaired", "no_backdoor_effect")

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def asr_limit(asr_base: float, n_bd: int | None) -> float:
    """ASR (%) at or below which a backdoor counts as removed: what the model's ordinary mistakes
    give on the same classes (``asr_base``, see :func:`cgd.evaluation.asr_baseline`) plus 2 points
    and two standard errors of an ASR measured on ``n_bd`` triggered images."""
    base = float(asr_base) if _finite(asr_base) else 0.0
    se = 100.0 * math.sqrt(max(base / 100.0, 0.01) * (1 - min(base / 100.0, 0.99)) / n_bd) if n_bd else 0.0
    return base + 2.0 + 2.0 * se


def judge(before: dict, after: dict, cfg: RetrainConfig, n_test: int | None = None, n_bd: int | None = None) -> tuple[str, float, float]:
    """(status, asr_limit, ca_limit) of a repair from before/after metrics (percent)."""
    from .retrain import drop_tolerance

    ca_limit = drop_tolerance(cfg, float(before.get("ca", float("nan"))), n_test)
    ca_lost = _finite(before.get("ca")) and _finite(after.get("ca")) and before["ca"] - after["ca"] > ca_limit
    if not _finite(after.get("asr")):
        return "unverified", float("nan"), ca_limit
    limit = asr_limit(after.get("asr_base", float("nan")), n_bd)
    if _finite(before.get("asr")) and before["asr"] <= asr_limit(before.get("asr_base", float("nan")), n_bd):
        return ("ca_lost" if ca_lost else "no_backdoor_effect"), limit, ca_limit
    remains = after["asr"] > limit
    if remains and ca_lost:
        return "failed", limit, ca_limit
    if remains:
        return "backdoor_remains", limit, ca_limit
    return ("ca_lost" if ca_lost else "repaired"), limit, ca_limit


def _suggestions(status: str, rows: list[dict], done: dict, cfg: RetrainConfig, verdict: dict | None) -> list[str]:
    out = []
    family = (verdict or {}).get("family")
    if status in ("backdoor_remains", "failed"):
        asr_curve = [r.get("asr") for r in rows if r.get("epoch", 0) >= 1 and _finite(r.get("asr"))]
        still_falling = len(asr_curve) >= 2 and asr_curve[-1] < asr_curve[-2] - 0.5
        if done.get("restored") and done.get("kept_epoch", 0) < (done.get("epochs_run") or 0):
            out.append(f"The early stop restored epoch {done.get('kept_epoch')}'s weights; ASR was lower later. Try "
                       f"--patience {cfg.patience + 1} or a larger --tolerance: on the demo, the fixed 1-point rule "
                       "restored pre-unlearning weights (ASR 95.8 %) where a noise-aware tolerance reached 4.3 %.")
        if still_falling or cfg.epochs * cfg.min_batches < 600:
            out.append(f"Retrain longer: --epochs {cfg.epochs + 5} or --min-batches {max(cfg.min_batches, 60) + 30}. On the "
                       "built-in demo, 60 batches per epoch instead of 29 brought ASR from 6.6 % to 3.5 %.")
        if family == "clean-label" and (cfg.stamp_clean_label == 0 or not cfg.subtract_trigger):
            out.append("The verdict says clean-label. Try the defaults' clean-label repair (--stamp-clean-label 0.5 "
                       "--subtract-trigger): the target class is trained as clean with the estimated trigger subtracted, "
                       "and the trigger is stamped on other classes with their own labels. On the demo's SIG it brought "
                       "ASR from 87.3 % to 2.4 % with CA kept (the paper's recipe: 77.2 %; bench/README.md).")
        elif family == "clean-label" and cfg.stamp_gain < 3:
            out.append("The verdict says clean-label. If the attack may add a stronger trigger at test time (Narcissus "
                       "multiplies it by 3), try --stamp-gain 3: on CIFAR-10 Narcissus (10,000 images) ASR after repair "
                       "fell from 28.2 % to 7.1 % with CA 64.3 -> 66.7 (a model never poisoned: 22.4 %); on the demo, with "
                       "today's defaults, from 36.1 % to 13.7 % (never poisoned: 29.1 %), and with Narcissus on half the "
                       "automobiles (5 %, target 1) from 99.6 % to 0.7 %. It costs where the trigger is not strengthened "
                       "(demo SIG 2.4 -> 6.2 %; bench/README.md).")
        if family == "dirty-label" and len((verdict or {}).get("targets") or []) == 1 and cfg.stamp == 0:
            out.append("The verdict says dirty-label with one target. Try --stamp 0.5 (the default; the paper has none): "
                       "the trigger estimated from the suspect subset is stamped on half of the other classes' clean "
                       "samples with their own labels. On the demo poisoned with Trojan at 3 % (target 9) ASR after repair "
                       "fell from 42.2 % to 1.6 %, with Blended at 5 % (target 2) from 7.0 % to 1.4 %; it does not help "
                       "against warping triggers (WaNet; bench/README.md).")
        one_target = (verdict or {}).get("mode") == "all-to-one"
        if one_target and cfg.outside_targets in ("unlearn", "distill"):
            out.append("The verdict names the target, so suspects labelled with other classes are clean samples. Try "
                       "--outside-targets clean (the default; the paper unlearns them): the unlearning then acts on the "
                       "target-labelled suspects alone. On the demo poisoned with Trojan at 3 % (target 9, no stamp) ASR "
                       "after repair fell from 42.2 % to 0.6 %, with BPP at 5 % (target 3) from 8.2 % to 0.7 % "
                       "(bench/README.md).")
        elif one_target and cfg.outside_targets == "clean":  # right only if the verdict named every target
            out.append("The suspects labelled with other classes were trained as clean, which is right only if every poison "
                       "carries the named target. If the reference also rejects many training samples of other classes (the "
                       "Inspect page's per-class view), the attack may relabel into several classes: try --outside-targets "
                       "agreed (only those the reference assigns to their own label are trained as clean, the rest left out) "
                       "or --outside-targets unlearn (the paper's rule). On GTSRB BadNets all-to-all (10,000 images), read "
                       "as all-to-one with target 39, ASR after repair was 34.4 % with the default, 0.9 % with agreed and "
                       "0.6 % with unlearn, CA 94.8, 95.3 and 95.4 % (bench/README.md).")
        elif one_target:  # "agreed" left the disputed ones out and the backdoor stayed
            out.append("The suspects labelled with other classes that the reference agrees with were trained as clean. If "
                       "the attack may relabel into several classes, try --outside-targets unlearn (the paper's rule), "
                       "which unlearns them all (bench/README.md).")
        if family == "clean-label":
            out.append("The verdict says clean-label: the suspect samples' labels are right, and their class has few clean "
                       "samples left. Try --alpha 0.1 (a stronger pull towards the reference): on CIFAR-10 SIG it brought "
                       "ASR from 70 % to 6.1 % with CA +2.1 (bench/README.md).")
    if status in ("backdoor_remains", "failed") and not out:
        out.append("No setting measured so far is known to fix this case. bench/README.md lists what was tried on the "
                   "attacks the defaults do not remove (clean-label SIG, LC and Narcissus; WaNet) and what each did. "
                   "The Inspect page's trigger view and the suspect subset show what the model still learns.")
    if status in ("ca_lost", "failed"):
        out.append(f"Lower the learning rate (--lr {cfg.lr / 2:g}): on the defense benchmark lr 0.01 cost 1.2-4.8 CA points "
                   "where 0.003 kept CA (bench/README.md).")
        if cfg.take_unused == "none" and (verdict or {}).get("mode") == "all-to-one":
            out.append("Train the samples the thresholds left unused that are labelled with other classes as clean "
                       "(--take-unused others, the default): on the demo (BadNets 10 %) CA after repair rose from 65.5 to "
                       "66.4 % with the same ASR (bench/README.md).")
        if (cfg.split_target == "none" and (verdict or {}).get("mode") == "all-to-one"
                and (verdict or {}).get("family") == "dirty-label"):
            out.append("Split the target class by the model's own features (--split-target leave, the default), so "
                       "that its clean images among the suspects are not unlearnt: on the demo's Blended at 5 % bird "
                       "recall after repair went from 34 to 57 % (bench/README.md).")
        if cfg.keep == 0:
            out.append("Distil the clean samples from the model before repair (--keep 0.3): on full-size CIFAR-10 never "
                       "poisoned CA after repair rose from 80.50 to 81.26 %, on the demo's Blended at 5 % from 63.07 to "
                       "63.53 %; it did not help the demo's BadNets, WaNet or low-frequency rows (bench/README.md).")
        if cfg.unlearn_floor == 0:
            out.append("Bound the unlearning term with --unlearn-floor 1e-4: without it, Blended lost 1.4 CA points on the "
                       "defense benchmark; with it, none.")
    return out


def repair_outcome(rows: list[dict], done: dict | None, cfg: RetrainConfig, clean_size: int, clean_oversampled: int,
                   suspect_size: int, verdict: dict | None = None, n_bd: int | None = None) -> dict:
    """The run's summary of a retraining.

    rows: metrics per epoch (epoch 0 = before repair); done: guided_retrain's final event. The
    "after" figures are the kept epoch's (the weights the model ends with), so the summary agrees
    with the curves; ``stopped_early`` is true only when epochs were left unrun.
    """
    done = done or {}
    before = {k: rows[0].get(k) for k in ("ca", "asr", "ra", "asr_base")} if rows and rows[0].get("epoch") == 0 else {}
    after = dict(done.get("final") or {})
    n_test = after.pop("n_test", None) if "n_test" in after else (rows[0].get("n_test") if rows else None)
    status, limit, ca_limit = judge(before, after, cfg, n_test, n_bd)
    headline, label = STATUSES[status]
    parts = [headline]
    if before and _finite(before.get("ca")) and _finite(after.get("ca")):
        parts.append(f"CA {before['ca']:.1f} -> {after['ca']:.1f} %")
    if _finite(after.get("asr")):
        parts.append(f"ASR {before.get('asr', float('nan')):.1f} -> {after['asr']:.1f} % (removed at or below {limit:.1f} %: "
                     f"what the model's ordinary mistakes give, {after.get('asr_base', float('nan')):.1f} %, plus noise)")
    kept, epochs_run = done.get("kept_epoch"), done.get("epochs_run")
    if done.get("restored"):
        parts.append(f"weights of epoch {kept} kept after a drop in CA" + (f" (epoch {epochs_run} of {cfg.epochs} ran)"
                                                                           if done.get("stopped_early") else ""))
    outcome = Outcome(status, "; ".join(parts[:1]) + " " + "; ".join(parts[1:]) + ("." if len(parts) > 1 else ""), label,
                      _suggestions(status, rows, done, cfg, verdict), limit, ca_limit)
    return {"before": before or None, "after": after, "best_epoch": done.get("best_epoch"), "kept_epoch": kept,
            "epochs_run": epochs_run, "epochs": cfg.epochs, "restored": bool(done.get("restored")),
            "stopped_early": bool(done.get("stopped_early")), "clean_size": clean_size,
            "clean_oversampled": clean_oversampled, "suspect_size": suspect_size, "outcome": outcome.to_dict()}
