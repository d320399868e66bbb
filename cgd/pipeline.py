"""The whole audit as resumable stages over a run folder.

``data -> victim -> reference -> suspicious -> separate -> retrain -> export``

Each stage has an input key (a hash of everything it depends on); a finished stage whose key is
unchanged and whose files exist is skipped on re-run. Long stages checkpoint inside themselves
(reference scoring per chunk, suspicious training per run, retraining per epoch), so a killed job
resumes where it stopped and, for the same seed, ends with the same results. The work of each stage
lives in the module named for it (:mod:`cgd.rundata`, :mod:`cgd.train`, :mod:`cgd.scoring`,
:mod:`cgd.scores`, :mod:`cgd.retrain`, :mod:`cgd.export`, :mod:`cgd.verdict`); a stage here computes
its key, calls that work and records it.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import MISSING, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from . import __version__, layout
from .config import DEFAULT_PRETRAINED, RetrainConfig, RunConfig, SeparationConfig
from .export import export_indices
from .rundata import RunData, load_run_data, prepare_dataset, source_signature, write_dataset
from .runs import Reporter, RunDir, read_json, utcnow, write_json
from .scores import compute_scores, read_scores, read_subsets, subsets, write_scores
from .scoring import check_finite_logits, classnames_templates, score_reference
from .separation import Subset, detection_metrics, oversample_per_class

if TYPE_CHECKING:
    from .trigger import TriggerPlan

__all__ = ["RunConfig", "STAGES", "run_pipeline", "load_run_data", "scores_table", "export_indices", "RunData",
           "DEFAULT_PRETRAINED", "PipelineStopped"]

STAGES = ("data", "victim", "reference", "suspicious", "separate", "retrain", "export")


class PipelineStopped(RuntimeError):
    """Raised when a stop was requested (a STOP file in the run folder)."""


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Options added after runs existed, with the value that reproduces the behaviour from before they did
# (declared as ``pre`` on the config fields): at that value an option is left out of its stage key,
# so older run folders keep their keys and are not recomputed.
_PRE_OPTION_VALUES = {f.name: f.metadata["pre"] for cls in (RetrainConfig, SeparationConfig) for f in fields(cls)
                      if f.metadata.get("pre", MISSING) is not MISSING}


def _config_key(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not (k in _PRE_OPTION_VALUES and v == _PRE_OPTION_VALUES[k])}


def _file_sig(path: str | None) -> Any:
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: file not found")
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _versions() -> dict:
    import torch

    out = {"cgd": __version__, "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    try:
        import open_clip

        out["open_clip"] = open_clip.__version__
    except Exception:  # noqa: BLE001 - open_clip is optional for classifier references
        pass
    return out


# ------------------------------------------------------------------------------------------------
# Stage context
# ------------------------------------------------------------------------------------------------

class _Ctx:
    def __init__(self, cfg: RunConfig, run: RunDir, emit: Callable[[dict], None], progress_bars: bool):
        from .device import resolve_device

        self.cfg, self.run, self.emit, self.bars = cfg, run, emit, progress_bars
        self.device = resolve_device(cfg.device)
        self._data: RunData | None = None
        self._data_mm: RunData | None = None
        self._flip_said = False  # the note on flips turned off is emitted once

    def check_stop(self) -> None:
        if self.run.path(layout.STOP).exists():
            raise PipelineStopped("stop requested")

    @property
    def data(self) -> RunData:
        """The run's dataset in memory (training stages need it resident)."""
        if self._data is None:
            self._data = load_run_data(self.run, mmap=False)
        return self._data

    @property
    def data_mapped(self) -> RunData:
        """The run's dataset with images memory-mapped read-only (scoring streams through them)."""
        if self._data is not None:
            return self._data
        if self._data_mm is None:
            self._data_mm = load_run_data(self.run, mmap=True)
        return self._data_mm

    def forget_data(self) -> None:
        self._data = self._data_mm = None

    @property
    def flip(self) -> bool:
        """Whether training stages augment with horizontal flips (the run's ``flip`` on its class names);
        the first call that finds them turned off by ``auto`` says why in a note."""
        from .train import mirror_pairs

        classes = read_json(self.run.path(layout.CLASSES_JSON), []) or []
        on = self.cfg.flips(classes)
        if not on and self.cfg.flip == "auto" and not self._flip_said:
            self._flip_said = True
            pairs = mirror_pairs(classes)
            shown = "; ".join(f"{classes[i]!r} / {classes[j]!r}" for i, j in pairs[:4])
            more = f" and {len(pairs) - 4} more pairs" if len(pairs) > 4 else ""
            self.emit({"kind": "note", "message": f"training without horizontal flips: a flip turns one class into "
                                                  f"another ({shown}{more}); --flip on flips anyway"})
        return on

    def flip_key(self) -> tuple:
        """The stage-key part for flips: empty when flipping (the behaviour from before the option)."""
        return () if self.flip else (("flip", False),)

    def reporter(self, stage: str, total: int, unit: str = "img") -> Reporter:
        return Reporter(self.run, stage, total, unit, bar=self.bars)


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------

def _data_key(cfg: RunConfig, run: RunDir) -> str:
    """The data stage's key: the spec and everything that shapes the data, plus the source's content
    signature (a run recorded before signatures existed keeps its key while the signature is unknown)."""
    parts = ["data", cfg.data, cfg.subset, cfg.seed, cfg.holdout_fraction, cfg.attack, cfg.poison_rate, cfg.target,
             cfg.attack_params, cfg.reference.spec if cfg.reference.kind == "classifier" else None,
             *((("data_root", cfg.data_root),) if cfg.data_root else ())]
    rec = run.stage_record("data") or {}
    if rec.get("done") and "source" not in rec and rec.get("key") == _key(*parts):
        return rec["key"]  # recorded by a version without source signatures
    return _key(*parts, ("source", source_signature(cfg.data, cfg.data_root)))


def _stage_data(ctx: _Ctx) -> str:
    cfg, run = ctx.cfg, ctx.run
    key = _data_key(cfg, run)
    if run.stage_done("data", key, [layout.data_file("train_x"), layout.CLASSES_JSON]):
        return key
    t0 = time.perf_counter()
    prepared = prepare_dataset(cfg, attack_cache=run.path("attack"))
    info = write_dataset(run, cfg, prepared)
    run.update_run(dataset=info)
    run.invalidate_from(list(STAGES[1:]))
    ctx.forget_data()
    run.mark_stage("data", key, time.perf_counter() - t0, source=source_signature(cfg.data, cfg.data_root))
    for n in prepared.notes:
        ctx.emit({"kind": "note", "message": n})
    return key


def _stage_victim(ctx: _Ctx, data_key: str) -> str:
    """The model to repair: the given checkpoint, or one trained on the (poisoned) data."""
    from .models import build_model, save_checkpoint
    from .train import train_classifier

    cfg, run = ctx.cfg, ctx.run
    vc = cfg.victim_config(flip=ctx.flip)
    key = _key("victim", data_key, cfg.model and _file_sig(cfg.model), cfg.arch, vc.epochs, vc.lr, cfg.seed,
               None if cfg.model else cfg.precision, *((("train_batch_size", vc.batch_size),) if vc.batch_size != 256 else ()),
               *(() if cfg.model else ctx.flip_key()))
    if run.stage_done("victim", key, [layout.VICTIM]):
        return key
    t0 = time.perf_counter()
    d = ctx.data
    if cfg.model:
        model, meta = _load_model_to_repair(cfg.model, d.train.num_classes)
        arch, source = meta["arch"], {"checkpoint": str(cfg.model)}
    else:
        import torch

        torch.manual_seed(cfg.seed)
        arch, model = cfg.arch, build_model(cfg.arch, d.train.num_classes)
        rep = ctx.reporter("victim", vc.epochs, "epoch")
        train_classifier(model, d.train.images, d.train.labels, vc, ctx.device,
                         on_epoch=lambda s: (rep(s["epoch"]), ctx.check_stop()))
        rep.close()
        source = {"trained": {"arch": arch, "epochs": vc.epochs, "lr": vc.lr}}
    save_checkpoint(model, run.path(layout.VICTIM), arch, d.train.classes, source=source)
    run.mark_stage("victim", key, time.perf_counter() - t0, arch=arch, **source)
    return key


def _load_model_to_repair(path: str, num_classes: int):
    """load_checkpoint, with any failure reported as a CheckpointError naming the file; NaN weights refused."""
    import torch

    from .models import CheckpointError, load_checkpoint

    try:
        model, meta = load_checkpoint(path, num_classes=num_classes, device="cpu")
    except (CheckpointError, OSError):
        raise
    except Exception as e:  # noqa: BLE001 - e.g. safetensors' own error for a file that is not one
        raise CheckpointError(f"{path}: not a readable checkpoint ({e.__class__.__name__}: {e})") from None
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} tensors hold NaN or infinite values (first: {bad[0]}); "
                              "the model is broken and cannot be repaired")
    return model, meta


def _stage_reference(ctx: _Ctx, data_key: str) -> str:
    """Reference logits (N, K) and embeddings (N, D), scored in chunks that survive a kill, cached by content."""
    cfg, run, rc = ctx.cfg, ctx.run, ctx.cfg.reference
    d = ctx.data_mapped  # images stay on disk: scored chunk by chunk in constant memory
    names, templates = classnames_templates(cfg, d.dataset_kind, d.train.classes)
    ref_ckpt = rc.target if rc.kind == "classifier" else rc.checkpoint
    key = _key("reference", data_key, rc.spec, rc.resolved_pretrained(), ref_ckpt and _file_sig(ref_ckpt), names,
               templates, cfg.precision, rc.chunk_size, rc.clip_config and _file_sig(rc.clip_config))
    if run.stage_done("reference", key, [layout.CLIP_LOGITS, layout.EMBEDDINGS]):
        return key
    t0 = time.perf_counter()
    n_test = len(d.test) if d.test is not None else 0
    rep = ctx.reporter("reference", len(d.train) + n_test)
    built: list = []  # the reference, built once when some chunk really needs scoring

    def make_ref():
        if not built:
            built.append(_make_reference(ctx, names, templates))
        return built[0]

    what = f"reference {rc.spec}" + (f" ({ref_ckpt})" if ref_ckpt else "")
    res = score_reference(run, make_ref, d.train.images, d.train.true_labels(), key, rc.chunk_size, what, rep,
                          ctx.check_stop, cache_key=_score_cache_key(ctx, names, templates, ref_ckpt, d.train.images))
    if d.test is not None:  # the clean test split: what the verdict compares the training set against
        score_reference(run, make_ref, d.test.images, d.test.labels, key, rc.chunk_size, what + " (test split)",
                        lambda done: rep(len(d.train) + done), ctx.check_stop,
                        cache_key=_score_cache_key(ctx, names, templates, ref_ckpt, d.test.images), split="test")
    rep.close()
    secs = time.perf_counter() - t0
    if res["describe"]:
        run.update_run(reference=res["describe"])
    run.mark_stage("reference", key, secs, images_per_s=res["n"] / max(secs, 1e-9), from_cache=res["cached"],
                   forward_images=res["forward_images"],
                   zero_shot_acc=res["correct"] / res["n"] if res["n"] else float("nan"))
    if res["cached"]:
        ctx.emit({"kind": "note", "message": "reference scores read from the score cache (same images, model, weights, prompts)"})
    return key


def _inside_web_roots(path: str) -> bool:
    """Whether ``path`` resolves inside CGD_DATA_ROOT, CGD_RUNS_ROOT or cgd's cache (the demo reference)."""
    from .data import cache_dir

    p = Path(path).expanduser().resolve()
    roots = [os.environ.get("CGD_DATA_ROOT", "data"), os.environ.get("CGD_RUNS_ROOT", "runs"), str(cache_dir())]
    return any(p.is_relative_to(Path(r).expanduser().resolve()) for r in roots)


def _make_reference(ctx: _Ctx, names: list[str], templates: list[str]):
    import torch

    from .reference import ReferenceError, check_clip_model_name, make_reference, register_clip_config

    rc = ctx.cfg.reference
    from .jobs import WEB_JOB_ENV

    web = os.environ.get(WEB_JOB_ENV) == "1"
    if web:  # a dashboard job: files only from the roots the server was given, no hub or folder names
        for what, path in (("--clip-config", rc.clip_config), ("--checkpoint", rc.checkpoint),
                           ("--reference", rc.target if rc.kind == "classifier" else None)):
            if path and not _inside_web_roots(path):
                raise ReferenceError(f"{what} {path}: outside the data folder; a dashboard job reads only there")
    if rc.clip_config:
        register_clip_config(rc.clip_config)
    if rc.kind == "clip":
        check_clip_model_name(rc.target, allow_remote_names=not web)
    torch.manual_seed(ctx.cfg.seed)  # random-weight references (tests) must not depend on which stages ran before
    return make_reference(rc.spec, names, templates, pretrained=rc.resolved_pretrained(), checkpoint=rc.checkpoint,
                          device=ctx.device, precision=ctx.cfg.precision, batch_size=rc.score_batch_size)


def _score_cache_key(ctx: _Ctx, names: list[str], templates: list[str], ref_ckpt: str | None, images) -> str | None:
    """The shared score cache's key for this reference pass (None: not cacheable, e.g. random CLIP weights)."""
    import torch

    from .device import resolve_precision
    from .score_cache import file_digest, image_digest, score_key

    rc = ctx.cfg.reference
    weights = file_digest(ref_ckpt) if ref_ckpt else rc.resolved_pretrained()
    if weights is None:  # random weights: valid only for the same seed
        weights = f"random-seed-{ctx.cfg.seed}"
    workload = "matmul_infer" if rc.kind == "clip" else "conv_train"
    precision = resolve_precision(ctx.cfg.precision, ctx.device, workload)
    extra = {"kind": rc.kind, "device": ctx.device.type, "torch": torch.__version__,
             "open_clip": _versions().get("open_clip"), "clip_config": file_digest(rc.clip_config) if rc.clip_config else None}
    return score_key(image_digest(images), rc.target if rc.kind == "clip" else "classifier",
                     weights, names, templates, precision, extra)


def _stage_suspicious(ctx: _Ctx, data_key: str, victim_key: str | None) -> str:
    """Suspicious-model logits: mean over ``runs`` fresh models, or the victim's own."""
    from .models import load_checkpoint
    from .train import predict

    cfg, run, sc = ctx.cfg, ctx.run, ctx.cfg.suspicious
    key = _key("suspicious", data_key, sc.mode, victim_key if sc.mode == "victim" else None, cfg.arch, sc.runs,
               sc.train.epochs, cfg.seed, cfg.precision, *(() if sc.mode == "victim" else ctx.flip_key()))
    if run.stage_done("suspicious", key, [layout.MODEL_LOGITS]):
        return key
    t0 = time.perf_counter()
    d = ctx.data
    if sc.mode == "victim":
        models = [load_checkpoint(run.path(layout.VICTIM), device=ctx.device)[0]]
    else:
        models = [_suspicious_model(ctx, i, key) for i in range(sc.runs)]

    def mean_logits(images) -> np.ndarray:
        acc = sum(predict(m, images, ctx.device, precision=cfg.precision).astype(np.float64) for m in models)
        return (acc / len(models)).astype(np.float32)

    lg = mean_logits(d.train.images)
    if sc.mode == "victim":
        check_finite_logits(lg, f"model to repair {cfg.model or layout.VICTIM}")
    run.save_array(layout.MODEL_LOGITS, lg)
    if d.test is not None:  # the test split's losses: the verdict's baseline
        run.save_array(layout.MODEL_LOGITS_TEST, mean_logits(d.test.images))
    run.mark_stage("suspicious", key, time.perf_counter() - t0)
    return key


def _suspicious_model(ctx: _Ctx, i: int, key: str):
    """Suspicious model ``i``: its saved checkpoint for this key, else trained now and saved."""
    import torch

    from .models import build_model, load_checkpoint, save_checkpoint
    from .train import train_classifier

    cfg, run, d = ctx.cfg, ctx.run, ctx.data
    path = run.path(layout.suspicious_model(i))
    if path.exists() and (read_json(path.with_suffix(".json"), {}) or {}).get("key") == key:
        return load_checkpoint(path, device=ctx.device)[0]
    ctx.check_stop()
    tc = cfg.suspicious_config(i, flip=ctx.flip)
    torch.manual_seed(tc.seed)
    model = build_model(cfg.arch, d.train.num_classes)
    rep = ctx.reporter(f"suspicious {i + 1}/{cfg.suspicious.runs}", tc.epochs, "epoch")
    train_classifier(model, d.train.images, d.train.labels, tc, ctx.device, on_epoch=lambda s: (rep(s["epoch"]), ctx.check_stop()))
    rep.close()
    save_checkpoint(model, path, cfg.arch, d.train.classes, key=key, run_index=i)
    return model


def scores_table(run: RunDir, sep: SeparationConfig | None = None, overrides: dict[int, int] | None = None):
    """The run's scores (see :mod:`cgd.scores`) computed from its logits, with ``subset`` set at
    ``sep`` (default: the run's saved separation) and ``overrides`` (default: the run's saved
    manual moves)."""
    d = load_run_data(run)
    sep = sep or RunConfig.from_dict(run.read_run().get("config", {})).separation
    df = compute_scores(run.load_array(layout.CLIP_LOGITS), run.load_array(layout.MODEL_LOGITS), d.train.labels,
                        d.source_index, d.train.poison_mask, d.train.original_labels)
    df["subset"] = subsets(df, sep, run.read_overrides() if overrides is None else overrides)
    return df


def _stage_separate(ctx: _Ctx, ref_key: str, susp_key: str) -> str:
    cfg, run = ctx.cfg, ctx.run
    overrides = read_json(run.path(layout.OVERRIDES_JSON), {}) or {}
    key = _key("separate", ref_key, susp_key, _config_key(cfg.separation.to_dict()), overrides)
    if run.stage_done("separate", key, [layout.SCORES, layout.SEPARATION_JSON]):
        from .verdict import VERDICT_VERSION

        if (run.read_verdict() or {}).get("version") != VERDICT_VERSION:
            # reused scores, but a verdict of another version: judge them again, so verdict.json and run.json
            # (what `cgd run` prints and the benchmarks read) agree with the verdict retraining acts on
            _write_verdict(ctx, read_scores(run))
        return key
    t0 = time.perf_counter()
    df = scores_table(run, cfg.separation)
    write_scores(run, df)
    sub = df["subset"].to_numpy()
    info = {"config": cfg.separation.to_dict(), "n": len(df), **{m.label: int((sub == m).sum()) for m in Subset},
            "overrides": len(overrides)}
    d = ctx.data_mapped  # only the labels and the ground truth are read
    if d.train.poison_mask is not None:
        info["detection"] = detection_metrics(sub, d.train.poison_mask, df["clip_nll"].to_numpy(), df["model_nll"].to_numpy())
    write_json(run.path(layout.SEPARATION_JSON), info)
    _write_verdict(ctx, df)
    run.mark_stage("separate", key, time.perf_counter() - t0)
    ctx.emit({"kind": "separation", **info})
    return key


def _write_verdict(ctx: _Ctx, df) -> None:
    """The audit verdict of the scores (cgd.verdict), into verdict.json and run.json."""
    from .verdict import verdict_doc

    doc = verdict_doc(ctx.run, df)
    write_json(ctx.run.path(layout.VERDICT_JSON), doc)
    ctx.run.update_run(verdict=doc)
    ctx.emit({"kind": "verdict", **doc})


def _trigger_plan(ctx: _Ctx, sub: np.ndarray, verdict: dict | None, rcfg, model) -> "TriggerPlan":
    """What retraining does with the estimated trigger (cgd.trigger.plan_trigger_repair); its notes go to the log."""
    from .trigger import plan_trigger_repair, split_applies

    ref_pred = ctx.run.load_array(layout.CLIP_LOGITS).argmax(1) if (rcfg.drop_disputed or rcfg.outside_targets == "agreed"
                                                                 or rcfg.take_unused == "agreed") else None
    suspicion = None
    split = split_applies(rcfg, verdict)
    if rcfg.unlearn_budget > 0 or split:  # the joint rank's direction: the reference doubts the label, the model learnt it easily
        df = read_scores(ctx.run)
        suspicion = (df["clip_rank"].to_numpy() - df["model_rank"].to_numpy()) if df is not None else None
    feats = _target_features(ctx, model, int(verdict["targets"][0]), rcfg.precision) if split else None
    plan = plan_trigger_repair(ctx.data.train.images, ctx.data.train.labels, sub, verdict, rcfg, ref_pred, suspicion,
                               target_features=feats)
    for msg in plan.notes:
        ctx.emit({"kind": "note", "message": msg})
    return plan


def _target_features(ctx: _Ctx, model, target: int, precision: str) -> np.ndarray:
    """(M, D) penultimate features of ``model`` (the model before repair) on the M training samples labelled ``target``."""
    from .train import predict

    d = ctx.data
    idx = np.flatnonzero(np.asarray(d.train.labels) == target)
    _, feats = predict(model, d.train.images[idx], ctx.device, precision=precision, features=True)
    return feats


def _stage_retrain(ctx: _Ctx, sep_key: str, victim_key: str) -> str:
    from .evaluation import evaluate_model
    from .models import load_checkpoint, save_checkpoint
    from .repair import repair_outcome
    from .retrain import RetrainState, guided_retrain
    from .trigger import plan_uses_verdict
    from .verdict import current_verdict

    cfg, run = ctx.cfg, ctx.run
    rcfg = cfg.retrain_config(flip=ctx.flip)
    verdict = current_verdict(run)
    parts = [sep_key, victim_key, _config_key(rcfg.to_dict())]
    if plan_uses_verdict(rcfg):
        # the trigger plan follows the verdict, which a newer verdict version may change without any score changing
        parts.append({k: (verdict or {}).get(k) for k in ("poisoned", "targets", "family", "mode")
                      + (("estimated_poisons",) if rcfg.unlearn_budget > 0 else ())})
    key = _key("retrain", *parts)
    if run.stage_done("retrain", key, [layout.REPAIRED, layout.METRICS_CSV]):
        return key
    t0 = time.perf_counter()
    d = ctx.data
    if d.test is None:
        from .data import DatasetError

        raise DatasetError("retraining needs a clean test set for CA (the data stage found none)")
    sub = read_subsets(run)
    model, meta = load_checkpoint(run.path(layout.VICTIM), device=ctx.device)
    plan = _trigger_plan(ctx, sub, verdict, rcfg, model)
    sub = plan.subsets
    clean_idx = oversample_per_class(np.flatnonzero(sub == Subset.CLEAN), d.train.labels, cfg.seed)
    suspect_idx = np.flatnonzero(sub == Subset.SUSPECT)
    state = RetrainState(run.path(layout.CHUNKS, "retrain"), key)
    resume = state.load()
    if resume is not None:
        ctx.emit({"kind": "note", "message": f"resuming retraining after epoch {resume['epoch']}"})
    rep = ctx.reporter("retrain", rcfg.epochs, "epoch")
    header = [f"cgd retrain metrics; key {key}"]
    events = guided_retrain(model, d.train.images, d.train.labels, clean_idx, suspect_idx, run.load_array(layout.CLIP_LOGITS),
                            lambda m: evaluate_model(m, d.test.images, d.test.labels, d.bd, ctx.device, precision=cfg.precision),
                            plan.config, ctx.device, resume=resume, trigger=plan.trigger, target=plan.target,
                            unstamp=plan.unstamp, unlearn_mask=plan.unlearn,
                            hold_out=list((verdict or {}).get("targets") or []) if (verdict or {}).get("poisoned") else [])
    done = None
    for ev in events:
        if ev["kind"] == "batch":
            state.batch_rows.append({k: ev[k] for k in ("epoch", "batch", "loss", "ce", "kl", "unlearn")})
            run.write_csv(layout.METRICS_BATCHES_CSV, state.batch_rows)
            ctx.emit(ev)
            rep(ev["epoch"] - 1, batch=ev["batch"], loss=ev["loss"])
        elif ev["kind"] == "epoch":
            state.add_epoch(ev)
            run.write_csv(layout.METRICS_CSV, state.rows, header)
            ctx.emit({k: v for k, v in ev.items() if k != "state"})
            rep(ev["epoch"], ca=ev["ca"], asr=ev["asr"])
            if "state" in ev:
                state.save(ev["state"])
        elif ev["kind"] == "done":
            done = ev
        ctx.check_stop()
    rep.close()
    summary = repair_outcome(state.rows, done, rcfg, clean_size=int(len(np.unique(clean_idx))),
                             clean_oversampled=int(len(clean_idx)), suspect_size=int(len(suspect_idx)),
                             verdict=verdict, n_bd=len(d.bd) if d.bd is not None else None)
    save_checkpoint(model, run.path(layout.REPAIRED), meta["arch"], d.train.classes, repaired_from=layout.VICTIM,
                    retrain=rcfg.to_dict(), outcome=summary["outcome"])
    run.update_run(summary=summary)
    run.mark_stage("retrain", key, time.perf_counter() - t0)
    ctx.emit({"kind": "summary", **summary})
    return key


def _stage_export(ctx: _Ctx, sep_key: str) -> str:
    key = _key("export", sep_key)
    if ctx.run.stage_done("export", key, [f"{layout.EXPORTS}/clean_indices.json", f"{layout.EXPORTS}/suspect_indices.json"]):
        return key
    t0 = time.perf_counter()
    export_indices(ctx.run)
    ctx.run.mark_stage("export", key, time.perf_counter() - t0)
    return key


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------

def run_pipeline(cfg: RunConfig, stages: tuple[str, ...] | list[str] = STAGES, on_event: Callable[[dict], None] | None = None,
                 progress_bars: bool = True) -> dict:
    """Run ``stages`` (in pipeline order; earlier finished stages are reused, missing ones run) on
    ``cfg.out``. Returns the final ``run.json`` dict. Holds the run folder's lock throughout."""
    from .device import device_info, seed_everything
    from .runs import remove_stale_temps

    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; expected some of {', '.join(STAGES)}")
    if not cfg.out:
        raise ValueError("RunConfig.out (the run folder) is required")
    cfg.check()
    run = RunDir(cfg.out)
    emit = on_event or (lambda e: None)
    with run.lock():
        run.path(layout.STOP).unlink(missing_ok=True)
        remove_stale_temps(run.root, recursive=True)  # left by a killed job (we hold the lock)
        info = run.read_run() or {"created": utcnow(), "format": "cgd-run-1"}
        info.update(config=cfg.to_dict(), versions=_versions(), updated=utcnow())
        write_json(run.run_json, info)
        seed_everything(cfg.seed)
        ctx = _Ctx(cfg, run, emit, progress_bars)
        run.update_run(device=device_info(ctx.device))
        t_start = time.perf_counter()
        try:
            run.write_status("running", "data", 0.0)
            _run_stages(ctx, stages)
        except PipelineStopped:
            run.write_status("stopped", "", 0.0, message="stopped by request")
            raise
        except BaseException as e:
            run.write_status("failed", "", 0.0, error=f"{e.__class__.__name__}: {e}")
            raise
        total = time.perf_counter() - t_start
        run.update_run(updated=utcnow(), total_seconds=round(total, 3))
        run.write_status("done", "", 1.0, elapsed_s=total)
        return run.read_run()


def _run_stages(ctx: _Ctx, stages) -> None:
    """Every stage up to the last one asked for, each reusing its finished result when its key matches."""
    wanted = [s for s in STAGES if s in stages]
    need = STAGES[: max(STAGES.index(s) for s in wanted) + 1]
    k_data = _stage_data(ctx)
    needs_victim = "retrain" in need or "victim" in wanted or ctx.cfg.suspicious.mode == "victim"
    k_vic = _stage_victim(ctx, k_data) if "victim" in need and needs_victim else None
    k_ref = _stage_reference(ctx, k_data) if "reference" in need else None
    k_susp = _stage_suspicious(ctx, k_data, k_vic) if "suspicious" in need else None
    k_sep = _stage_separate(ctx, k_ref, k_susp) if "separate" in need else None
    if "retrain" in need:
        _stage_retrain(ctx, k_sep, k_vic)
    if "export" in need:
        _stage_export(ctx, k_sep)
