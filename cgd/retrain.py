"""CLIP-guided retraining of the model to repair.

Per batch, drawn from the (oversampled) clean subset and the suspect subset together:

* clean samples: cross-entropy with the given label;
* suspect samples: ``alpha * KL(softmax(ref / T) || softmax(student / T)) * T^2``
  ``+ beta * mean(log p_student(given label))`` — distillation from the reference (CLIP) logits
  plus an unlearning term that lowers the probability of the given, possibly poisoned, label.

SGD with a cosine schedule over epochs of ``min_batches`` to ``max_batches`` batches; after each
epoch CA/ASR/RA are measured, and when CA stays below the best retraining epoch by more than the
drop tolerance for ``patience`` epochs in a row (or at the last epoch), the weights of the last
epoch within tolerance are restored and training stops. :func:`guided_retrain` is a generator of
events, so a UI can draw live curves and stop it by closing the generator. :class:`RetrainState`
keeps a run's retraining resumable.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import PRESETS as _PRESETS
from .config import RetrainConfig, apply_preset
from .device import autocast, resolve_device, resolve_precision
from .train import augment_batch, to_device_u8, u8_to_float

__all__ = ["RetrainConfig", "guided_losses", "guided_retrain", "PRESETS", "RetrainState", "EPOCH_COLUMNS", "drop_tolerance"]


PRESETS: dict[str, RetrainConfig] = {name: apply_preset(RetrainConfig(), name) for name in _PRESETS}


_DEFAULTS = RetrainConfig()


def guided_losses(student: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor, suspect: torch.Tensor,
                  temperature: float | None = None, alpha: float | None = None, beta: float | None = None,
                  unlearn: str | None = None, unlearn_floor: float | None = None,
                  unlearn_mask: torch.Tensor | None = None, before: torch.Tensor | None = None,
                  keep: float | None = None) -> dict[str, torch.Tensor]:
    """The three loss terms on one batch. A weight left as None takes :class:`RetrainConfig`'s value.

    student, reference: (B, K) logits; labels: (B,) given labels; suspect: (B,) bool (False = clean).
    Returns {"total", "ce", "kl", "unlearn", "keep"} (scalars). ``ce`` and ``keep`` are means over clean
    samples, ``kl`` (already times T^2) and ``unlearn`` over suspect samples; a term with no samples in
    the batch is 0. total = ce + keep_weight * keep + alpha * kl + beta * unlearn.

    ``unlearn="log_p"`` (the paper): mean log p(label), <= 0 and unbounded below, so once a
    suspect label is unlikely the term keeps growing and can swamp the other two.
    ``unlearn="log_1mp"``: mean -log(1 - p(label)), >= 0, large while the model still believes
    the label and fading to 0 as p(label) -> 0 (computed stably as logsumexp over the other classes).
    ``unlearn_floor`` (log_p only, a probability in [0, 1)): log p(label) is clamped at log(floor), so
    a suspect sample whose label is already below ``floor`` adds a constant and no gradient.
    ``unlearn_mask`` (B,) bool: the suspect samples whose labels are unlearnt (default: all of them);
    the others get the distillation term only.
    ``before`` (B, K): the logits of the model before repair on these samples (un-augmented, without a
    stamped trigger); with a ``keep`` weight > 0 the clean samples are also distilled from them,
    ``keep`` = mean KL(softmax(before / T) || softmax(student / T)) * T^2, which holds the model's
    clean behaviour while the other terms remove the backdoor. A class whose ``before`` logit is -inf
    is left out of both distributions (the retraining leaves out the verdict's target, so only the odds
    between the other classes are held and the target's logit stays free to be unlearnt).
    """
    d = _DEFAULTS
    temperature = d.temperature if temperature is None else temperature
    alpha = d.alpha if alpha is None else alpha
    beta = d.beta if beta is None else beta
    unlearn = d.unlearn if unlearn is None else unlearn
    unlearn_floor = d.unlearn_floor if unlearn_floor is None else unlearn_floor
    keep = d.keep if keep is None else keep
    if not 0.0 <= unlearn_floor < 1.0:
        raise ValueError(f"unlearn_floor must be in [0, 1), got {unlearn_floor}")
    # Masked sums instead of boolean indexing and ``.any()``: the same maths without a
    # device->host synchronisation per batch (on a GPU those stall the launch queue).
    student = student.float()
    clean_f = (~suspect).to(student.dtype)
    susp = suspect.bool()
    n_clean = clean_f.sum().clamp(min=1.0)
    n_susp = susp.to(student.dtype).sum().clamp(min=1.0)
    ce = (F.cross_entropy(student, labels, reduction="none") * clean_f).sum() / n_clean
    t = float(temperature)
    log_p_s = F.log_softmax(student / t, dim=1)
    p_ref = F.softmax(reference.float() / t, dim=1)
    kl_rows = F.kl_div(log_p_s, p_ref, reduction="none").sum(1)  # (B,) KL(p_ref || p_student) per sample
    kl = torch.where(susp, kl_rows, 0.0).sum() / n_susp * (t * t)
    if unlearn == "log_p":
        per = F.log_softmax(student, dim=1).gather(1, labels[:, None]).squeeze(1)
        if unlearn_floor > 0:
            per = per.clamp(min=math.log(unlearn_floor))
    elif unlearn == "log_1mp":
        others = student.scatter(1, labels[:, None], float("-inf"))
        per = torch.logsumexp(student, dim=1) - torch.logsumexp(others, dim=1)  # -log(1 - p(label)) >= 0
    else:
        raise ValueError(f"unlearn must be 'log_p' or 'log_1mp', got {unlearn!r}")
    unl = susp if unlearn_mask is None else susp & unlearn_mask.bool()
    term = torch.where(unl, per, 0.0).sum() / (n_susp if unlearn_mask is None else unl.to(student.dtype).sum().clamp(min=1.0))
    total = ce + alpha * kl + beta * term
    held = torch.zeros((), device=student.device)
    if before is not None and keep > 0:
        live = torch.isfinite(before)  # classes left out (-inf) are dropped from both distributions
        log_p_b = F.log_softmax(before.detach().float() / t, dim=1)
        log_q = F.log_softmax(student.masked_fill(~live, float("-inf")) / t, dim=1)
        held_rows = torch.where(live, log_p_b.exp() * (log_p_b - log_q), 0.0).sum(1)
        held = (held_rows * clean_f).sum() / n_clean * (t * t)
        total = total + keep * held
    return {"total": total, "ce": ce, "kl": kl, "unlearn": term, "keep": held}


def drop_tolerance(cfg: RetrainConfig, best_ca: float, n_test: int | None) -> float:
    """CA points below the best epoch that count as a real drop: ``tolerance``, widened to
    ``tolerance_se`` standard errors of a CA measured on ``n_test`` images when that is larger."""
    if not cfg.tolerance_se or not n_test or not math.isfinite(best_ca):
        return cfg.tolerance
    p = min(max(best_ca / 100.0, 0.0), 1.0)
    return max(cfg.tolerance, cfg.tolerance_se * 100.0 * math.sqrt(p * (1 - p) / n_test))


def _state_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def freeze_batchnorm(model: nn.Module) -> int:
    """Put every BatchNorm layer of ``model`` in eval mode (normalise with, and keep, its running statistics)
    while the rest trains; its affine weights still learn. Returns how many layers were frozen."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.eval()
    return len(bns)


def guided_retrain(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    clean_idx: np.ndarray,
    suspect_idx: np.ndarray,
    reference_logits: np.ndarray,
    evaluate: Callable[[nn.Module], dict[str, float]],
    cfg: RetrainConfig = RetrainConfig(),
    device: str | torch.device = "auto",
    resume: dict | None = None,
    trigger: np.ndarray | None = None,
    target: int | None = None,
    unstamp: np.ndarray | None = None,
    unlearn_mask: np.ndarray | None = None,
    hold_out: list[int] | None = None,
) -> Iterator[dict]:
    """Retrain ``model`` in place; yields events (dicts with a ``kind``):

    * ``{"kind": "epoch", "epoch": 0, ...}`` — metrics before repair (ca, asr, ra);
    * ``{"kind": "batch", "epoch", "batch", "loss", "ce", "kl", "unlearn"}`` every ``log_every`` batches;
    * ``{"kind": "epoch", "epoch", "loss", "ce", "kl", "unlearn", "ca", "asr", "ra", "lr", "seconds",
      "early_stop", "state"}`` after each epoch — ``state`` is a resumable snapshot (pass it back
      as ``resume`` to continue from there with identical results);
    * ``{"kind": "done", "best_epoch", "kept_epoch", "restored", "stopped_early", "epochs_run", "final": {...}}``:
      ``kept_epoch`` is the epoch whose weights the model ends with (``final`` holds its metrics),
      ``best_epoch`` the one with the highest CA, ``restored`` whether weights were rolled back, and
      ``stopped_early`` whether epochs were left unrun.

    An epoch whose CA is more than the drop tolerance (:func:`drop_tolerance`) below the best so far
    starts a streak; training goes on from it, and at ``patience`` such epochs in a row (or when the
    last epoch ends a streak) the weights after the last epoch within tolerance are restored and
    ``early_stop`` is set (with ``restored_epoch`` naming that epoch).

    trigger, target: an estimated additive trigger (H, W, 3) in pixel units (:func:`cgd.trigger.estimate_trigger`)
    and the class it targets: with ``cfg.stamp > 0`` that share of the clean samples of other classes
    gets the trigger added (scaled by a factor drawn from [1, ``cfg.stamp_gain``]; for a random half of
    them from [1, ``cfg.stamp_gain_clean_label``] when the two differ), labelled with their own class,
    so the trigger stops predicting the target. unstamp: (N,) bool, the samples whose trigger is
    subtracted whenever they are drawn (clean-label poisons trained as clean, see the pipeline).
    unlearn_mask: (N,) bool, the suspect samples whose labels are unlearnt (default: every one; the
    others get the distillation term only; :func:`cgd.trigger.plan_trigger_repair`).
    hold_out: with ``cfg.keep > 0``, the classes the keep term leaves out (the verdict's targets; None:
    ``target`` if given). The logits of ``model`` as passed in (the model before repair, also when
    resuming) are computed once on every sample and held on the clean samples over the other classes.

    images: (N, H, W, 3) uint8; labels: (N,) given labels; clean_idx: (M,) indices (oversampled,
    repeats allowed); suspect_idx: (S,); reference_logits: (N, K) float.
    """
    dev = resolve_device(device)
    prec = resolve_precision(cfg.precision, dev)
    clean_idx = np.asarray(clean_idx, np.int64)
    suspect_idx = np.asarray(suspect_idx, np.int64)
    if len(clean_idx) + len(suspect_idx) == 0:
        raise ValueError("guided retraining needs a non-empty clean or suspect subset")
    if reference_logits.shape[0] != len(labels):
        raise ValueError(f"reference logits have {reference_logits.shape[0]} rows, the dataset has {len(labels)}")
    x_all = to_device_u8(images, dev)
    y_all = torch.as_tensor(labels, dtype=torch.long, device=dev)
    ref_all = torch.as_tensor(reference_logits, dtype=torch.float32, device=dev)
    pool = torch.as_tensor(np.concatenate([clean_idx, suspect_idx]), device=dev)
    is_susp = torch.cat([torch.zeros(len(clean_idx), dtype=torch.bool), torch.ones(len(suspect_idx), dtype=torch.bool)]).to(dev)
    # suspects whose label the reference agrees with are likely clean-label poisons (their label is right)
    ok = None if cfg.unlearn_agreeing else np.asarray(reference_logits).argmax(1) != np.asarray(labels)
    if unlearn_mask is not None:
        ok = np.asarray(unlearn_mask, bool) if ok is None else ok & np.asarray(unlearn_mask, bool)
    unlearn_ok = None if ok is None else torch.as_tensor(ok, device=dev)
    stamping = cfg.stamp > 0 and trigger is not None and target is not None
    delta = (torch.as_tensor(np.asarray(trigger, np.float32) / 255.0).permute(2, 0, 1)[None].to(dev)
             if trigger is not None else None)
    if unstamp is not None and delta is not None and np.asarray(unstamp).any():
        # clean-label poisons trained as clean: their estimated trigger taken off once, before any
        # augmentation (a flipped sinusoid is the negated one), in pixel units rounded back to uint8
        off = torch.as_tensor(np.flatnonzero(np.asarray(unstamp, bool)), device=dev)
        x_all = x_all.clone()
        x_all[off] = (x_all[off].float() - delta * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    before_all = None
    if cfg.keep > 0:  # the model before repair (the one passed in, also when resuming) on every sample, once
        from .train import predict

        before_all = torch.as_tensor(predict(model, x_all, dev, precision=prec), device=dev)
        out_cls = [int(c) for c in (hold_out if hold_out is not None else ([] if target is None else [target]))]
        if len(set(out_cls)) >= before_all.shape[1]:  # no class left to hold
            before_all = None
        elif out_cls:  # hold the odds between the other classes only: the targets' own logits are free to move
            before_all[:, out_cls] = float("-inf")
    n = len(pool)
    steps = min(cfg.max_batches, max(cfg.min_batches, math.ceil(n / cfg.batch_size)))
    passes = math.ceil(steps * cfg.batch_size / n)  # > 1 only when min_batches asks for more than one pass
    model.to(dev)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * steps))
    gen_cpu = torch.Generator().manual_seed(cfg.seed)
    gen_dev = torch.Generator(device=dev).manual_seed(cfg.seed + 1)

    if resume is None:
        m0 = evaluate(model)
        start_epoch, best_ca, best_epoch, streak, good_epoch = 1, -math.inf, 0, 0, 0
        good_state = _state_cpu(model)
        history = [{"kind": "epoch", "epoch": 0, **m0, "loss": float("nan"), "ce": float("nan"),
                    "kl": float("nan"), "unlearn": float("nan"), "lr": cfg.lr, "seconds": 0.0, "early_stop": False}]
        yield history[0]
    else:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        gen_cpu.set_state(resume["gen_cpu"])
        gen_dev.set_state(resume["gen_dev"].to(gen_dev.get_state().device) if dev.type != "cuda" else resume["gen_dev"])
        start_epoch, best_ca, best_epoch = resume["epoch"] + 1, resume["best_ca"], resume["best_epoch"]
        streak = int(resume.get("streak", 0))
        good_state = resume["good"] if streak and resume.get("good") is not None else _state_cpu(model)
        good_epoch = int(resume.get("good_epoch", resume["epoch"] - streak))

    stopped = False
    last_epoch = start_epoch - 1  # the last epoch that ran (the resumed one when none is left)
    for epoch in range(start_epoch, cfg.epochs + 1):
        last_epoch = epoch
        model.train()
        if cfg.bn_stats == "freeze":
            freeze_batchnorm(model)
        t0 = time.perf_counter()
        sums = {k: torch.zeros((), device=dev) for k in ("total", "ce", "kl", "unlearn")}
        nb = 0
        perm = torch.cat([torch.randperm(n, generator=gen_cpu) for _ in range(passes)]).to(dev)
        for b in range(steps):
            sel = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            idx = pool[sel]
            xb = x_all[idx]
            if cfg.augment:
                xb = augment_batch(xb, gen_dev, flip=cfg.flip)
            xb = u8_to_float(xb, cfg.channels_last)
            if stamping:  # the estimated trigger on clean samples of other classes, which keep their own labels
                hit = (~is_susp[sel]) & (y_all[idx] != target) & (torch.rand(len(sel), device=dev, generator=gen_dev) < cfg.stamp)
                top = cfg.stamp_gain
                u = torch.rand(len(sel), 1, 1, 1, device=dev, generator=gen_dev)
                if cfg.stamp_gain_clean_label != cfg.stamp_gain:  # half the stamps get the other range
                    half = torch.rand(len(sel), 1, 1, 1, device=dev, generator=gen_dev) < 0.5
                    top = torch.where(half, cfg.stamp_gain_clean_label, cfg.stamp_gain)
                gain = 1.0 + (top - 1.0) * u
                xb = torch.where(hit[:, None, None, None], (xb + gain * delta).clamp_(0.0, 1.0), xb)
            with autocast(dev, prec):
                out = model(xb)
            losses = guided_losses(out, ref_all[idx], y_all[idx], is_susp[sel], cfg.temperature, cfg.alpha, cfg.beta,
                                   cfg.unlearn, cfg.unlearn_floor, None if unlearn_ok is None else unlearn_ok[idx],
                                   None if before_all is None else before_all[idx], cfg.keep)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            opt.step()
            sched.step()
            for k in sums:
                sums[k] += losses[k].detach()
            nb += 1
            if cfg.log_every and nb % cfg.log_every == 0:
                yield {"kind": "batch", "epoch": epoch, "batch": nb, **{k if k != "total" else "loss": float(v) / nb for k, v in sums.items()}}
        model.eval()
        m = evaluate(model)
        ev = {"kind": "epoch", "epoch": epoch, **m, **{k if k != "total" else "loss": float(v) / max(nb, 1) for k, v in sums.items()},
              "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0, "early_stop": False}
        if epoch > 1 and m["ca"] < best_ca - drop_tolerance(cfg, best_ca, m.get("n_test")):
            streak += 1
            if streak >= max(1, cfg.patience) or epoch == cfg.epochs:
                model.load_state_dict(good_state)
                ev["early_stop"] = True
                ev["restored_epoch"] = good_epoch
                stopped = True
                yield ev
                break
        else:
            streak = 0
            if m["ca"] > best_ca:
                best_ca, best_epoch = m["ca"], epoch
            good_state, good_epoch = _state_cpu(model), epoch
        ev["state"] = {"model": good_state if not streak else _state_cpu(model), "optimizer": copy.deepcopy(opt.state_dict()),
                       "scheduler": sched.state_dict(), "gen_cpu": gen_cpu.get_state(), "gen_dev": gen_dev.get_state(),
                       "epoch": epoch, "best_ca": best_ca, "best_epoch": best_epoch, "streak": streak,
                       "good": good_state if streak else None, "good_epoch": good_epoch}
        yield ev
    model.eval()
    yield {"kind": "done", "best_epoch": best_epoch, "kept_epoch": good_epoch if stopped else last_epoch,
           "restored": stopped, "stopped_early": stopped and last_epoch < cfg.epochs, "epochs_run": last_epoch,
           "final": evaluate(model)}


EPOCH_COLUMNS = ("epoch", "loss", "ce", "kl", "unlearn", "ca", "asr", "ra", "asr_base", "lr", "seconds", "early_stop")


class RetrainState:
    """The resumable state of one retraining in a folder (``RUN/chunks/retrain``): the weights after
    the last finished epoch (and, mid-streak, the weights an early stop would restore), optimiser,
    schedule and random-generator states, and the metric rows so far. Files are written atomically.

    ``load()`` returns a ``resume`` dict for :func:`guided_retrain` when the folder holds a state of
    the same ``key``, else None; ``rows`` / ``batch_rows`` then hold the rows recorded with it.
    """

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = Path(folder), key
        self.rows: list[dict] = []
        self.batch_rows: list[dict] = []

    def load(self) -> dict | None:
        from safetensors.torch import load_file

        from .runs import read_json

        meta = read_json(self.folder / "state.json", {}) or {}
        if meta.get("key") != self.key or not (self.folder / "state.safetensors").exists():
            return None
        flat = load_file(str(self.folder / "state.safetensors"))
        self.rows, self.batch_rows = list(meta["rows"]), list(meta.get("batch_rows", []))
        return {"model": {k[6:]: v for k, v in flat.items() if k.startswith("model.")},
                "optimizer": torch.load(self.folder / "optimizer.pt", weights_only=True),
                "scheduler": meta["scheduler"], "gen_cpu": flat["gen_cpu"], "gen_dev": flat["gen_dev"],
                "epoch": meta["epoch"], "best_ca": meta["best_ca"], "best_epoch": meta["best_epoch"],
                "streak": meta.get("streak", 0),
                "good": {k[5:]: v for k, v in flat.items() if k.startswith("good.")} or None}

    def add_epoch(self, ev: dict) -> dict:
        row = {k: ev.get(k, float("nan")) for k in EPOCH_COLUMNS}
        self.rows.append(row)
        return row

    def save(self, s: dict) -> None:
        """Write the snapshot ``s`` (an epoch event's ``state``) with the rows so far."""
        from safetensors.torch import save_file

        from .runs import write_json

        flat = {f"model.{k}": v.contiguous() for k, v in s["model"].items()}
        if s.get("good") is not None:  # mid-streak: the weights an early stop would restore
            flat.update({f"good.{k}": v.contiguous() for k, v in s["good"].items()})
        flat["gen_cpu"], flat["gen_dev"] = s["gen_cpu"], s["gen_dev"].cpu()
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / "state.tmp.safetensors"
        save_file(flat, str(tmp))
        tmp.replace(self.folder / "state.safetensors")
        torch.save(s["optimizer"], self.folder / "optimizer.tmp.pt")
        (self.folder / "optimizer.tmp.pt").replace(self.folder / "optimizer.pt")
        write_json(self.folder / "state.json", {"key": self.key, "epoch": s["epoch"], "best_ca": s["best_ca"],
                                                "best_epoch": s["best_epoch"], "streak": s.get("streak", 0),
                                                "scheduler": s["scheduler"], "rows": self.rows, "batch_rows": self.batch_rows})
