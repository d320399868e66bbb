"""The whole audit as resumable stages over a run folder.

``data -> victim -> reference -> suspicious -> separate -> retrain -> export``

Each stage has an input key (a hash of everything it depends on); a finished stage whose key is
unchanged and whose files exist is skipped on re-run. Long stages checkpoint inside themselves
(reference scoring per chunk, suspicious training per run, retraining per epoch), so a killed job
resumes where it stopped and, for the same seed, ends with the same results.
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__
from .data import DatasetError, ImageSet, load_splits, parse_spec, seeded_subset
from .evaluation import BackdoorTest
from .runs import Reporter, RunDir, read_json, utcnow, write_json
from .separation import (CLEAN, SUBSET_NAMES, SUSPECT, SeparationConfig, apply_overrides, detection_metrics,
                         label_nll, oversample_per_class, rank_normalise, separate)

__all__ = ["RunConfig", "STAGES", "run_pipeline", "load_run_data", "scores_table", "export_indices",
           "DEFAULT_PRETRAINED", "PipelineStopped"]

STAGES = ("data", "victim", "reference", "suspicious", "separate", "retrain", "export")
DEFAULT_PRETRAINED = {"ViT-B-32": "laion2b_s34b_b79k", "ViT-B-16": "laion2b_s34b_b88k", "RN50": "openai"}


class PipelineStopped(RuntimeError):
    """Raised when a stop was requested (a STOP file in the run folder)."""


@dataclass
class RunConfig:
    """Everything a run depends on. Written to ``run.json``; CLI flags map one to one."""

    data: str = ""
    out: str = ""
    data_root: str | None = None  # backdoorbench records: folder of the clean dataset the attack used
    on_bad_files: str = "skip"  # imagefolder: "skip" non-image files (counted in the dataset notes) or "error"
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    subset: int | None = None  # first N per split after a seeded shuffle
    holdout_fraction: float = 0.1  # test split carved from train when the source has none
    # attack simulator (teaching / benchmarks)
    attack: str | None = None
    poison_rate: float = 0.1
    target: int = 0
    attack_params: dict = field(default_factory=dict)
    # reference
    reference: str = "clip:ViT-B-32"
    pretrained: str | None = None  # open_clip tag; None -> the model's default tag; "none" -> random weights
    checkpoint: str | None = None  # local CLIP weights file
    clip_config: str | None = None  # extra open_clip model config (JSON) to register, for custom architectures
    classnames: list[str] | None = None
    templates: list[str] | None = None
    score_batch_size: int = 256
    chunk_size: int = 4096
    # model to repair
    model: str | None = None  # checkpoint; None -> train one on the data
    arch: str = "preact-resnet18"
    train_epochs: int = 20
    train_lr: float = 1e-3
    train_batch_size: int = 256
    # suspicious model
    suspicious: str = "train"  # "train" (the paper) or "victim" (use the model to repair's logits)
    suspicious_runs: int = 3
    suspicious_epochs: int = 5
    # separation
    sigma1: float = 0.2
    sigma2: float = 0.1
    rank_mode: str = "global"
    sigma3: float = 0.1  # joint tail of clip_rank - model_rank flagged suspect too (the paper: 0), see cgd.separation.separate
    # retraining
    epochs: int = 10
    max_batches: int = 200
    min_batches: int = 60  # retraining batches per epoch at least: small sets are cycled (the paper: 0)
    tolerance_se: float = 1.5  # early stop: tolerance widened to this many standard errors of CA (the paper: 0)
    lr: float = 0.003  # the paper uses 0.01 (`--preset paper`); see cgd.retrain.RetrainConfig
    alpha: float = 5e-4
    beta: float = 0.025
    temperature: float = 3.0
    tolerance: float = 1.0
    patience: int = 2  # epochs in a row below best CA - tolerance before the early stop (the paper: 1)
    unlearn: str = "log_p"  # "log_p" (paper) | "log_1mp" (bounded), see cgd.retrain.guided_losses
    unlearn_floor: float = 1e-4  # log_p: stop unlearning a sample once p(label) < floor (the paper: 0)
    batch_size: int = 256

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def retrain_config(self):
        from .retrain import RetrainConfig

        return RetrainConfig(epochs=self.epochs, max_batches=self.max_batches, min_batches=self.min_batches, tolerance_se=self.tolerance_se, batch_size=self.batch_size, lr=self.lr,
                             temperature=self.temperature, alpha=self.alpha, beta=self.beta, tolerance=self.tolerance,
                             patience=self.patience,
                             unlearn=self.unlearn, unlearn_floor=self.unlearn_floor,
                             precision=self.precision, seed=self.seed)

    def separation_config(self) -> SeparationConfig:
        return SeparationConfig(self.sigma1, self.sigma2, self.rank_mode, self.sigma3)

    def resolved_pretrained(self) -> str | None:
        if self.checkpoint or not self.reference.startswith("clip:"):
            return None
        if self.pretrained is None:
            name = self.reference.split(":", 1)[1]
            return DEFAULT_PRETRAINED.get(name) or _first_tag(name)
        return None if self.pretrained.lower() in ("none", "random", "") else self.pretrained


def _first_tag(model_name: str) -> str | None:
    try:
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(model_name)
        return tags[0] if tags else None
    except Exception:
        return None


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Options added after runs existed, with the value that reproduces the behaviour from before they did
# (the paper's): a config at that value leaves the option out of its stage key, so older run folders
# keep their keys and are not recomputed.
_PRE_OPTION_VALUES = {"unlearn": "log_p", "unlearn_floor": 0.0, "patience": 1, "sigma3": 0.0, "min_batches": 0,
                      "tolerance_se": 0.0}


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
    except Exception:
        pass
    return out


# ------------------------------------------------------------------------------------------------
# Loading what the data stage wrote
# ------------------------------------------------------------------------------------------------

@dataclass
class RunData:
    train: ImageSet
    test: ImageSet | None
    bd: BackdoorTest | None
    source_index: np.ndarray | None
    target: int | None
    dataset_kind: str


def load_run_data(run: RunDir, mmap: bool = True) -> RunData:
    """The dataset the data stage wrote into the run folder (images memory-mapped)."""
    classes = read_json(run.path("data", "classes.json"))
    if classes is None:
        raise FileNotFoundError(f"{run.path('data')}: no dataset in this run yet (run the data stage)")
    info = read_json(run.path("data", "info.json"), {})
    la = run.load_array
    opt = lambda n: la(f"data/{n}.npy") if run.has(f"data/{n}.npy") else None  # noqa: E731
    train = ImageSet(la("data/train_x.npy", mmap=mmap), la("data/train_y.npy"), classes,
                     poison_mask=opt("poison_mask"), original_labels=opt("original_labels"), name=info.get("name", "train"))
    test = None
    if run.has("data/test_x.npy"):
        test = ImageSet(la("data/test_x.npy", mmap=mmap), la("data/test_y.npy"), classes, name="test")
    bd = None
    if run.has("data/bd_x.npy"):
        bd = BackdoorTest(la("data/bd_x.npy", mmap=mmap), la("data/bd_true.npy"), la("data/bd_target.npy"))
    return RunData(train, test, bd, opt("source_index"), info.get("target"), info.get("dataset_kind", ""))


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------

class _Ctx:
    def __init__(self, cfg: RunConfig, run: RunDir, emit: Callable[[dict], None], progress_bars: bool):
        self.cfg, self.run, self.emit, self.bars = cfg, run, emit, progress_bars
        import torch  # noqa: F401

        from .device import resolve_device

        self.device = resolve_device(cfg.device)
        self._data: RunData | None = None
        self._data_mm: RunData | None = None

    def check_stop(self) -> None:
        if self.run.path("STOP").exists():
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

    def reporter(self, stage: str, total: int, unit: str = "img") -> Reporter:
        return Reporter(self.run, stage, total, unit, bar=self.bars)


def _stage_data(ctx: _Ctx) -> str:
    cfg, run = ctx.cfg, ctx.run
    key = _key("data", cfg.data, cfg.subset, cfg.seed, cfg.holdout_fraction, cfg.attack, cfg.poison_rate, cfg.target,
               cfg.attack_params, cfg.reference if cfg.reference.startswith("classifier:") else None,
               *((("data_root", cfg.data_root),) if cfg.data_root else ()))
    if run.stage_done("data", key, ["data/train_x.npy", "data/classes.json"]):
        return key
    t0 = time.perf_counter()
    kind, _ = parse_spec(cfg.data)
    train, test = load_splits(cfg.data, data_root=cfg.data_root, on_bad_files=cfg.on_bad_files)
    notes = []
    skipped = {n: s.meta.get("skipped_files", 0) for n, s in (("train", train), ("test", test)) if s is not None}
    if any(skipped.values()):
        notes.append("skipped non-image files: " + ", ".join(f"{v} in {n}" for n, v in skipped.items() if v)
                     + " (use --on-bad-files error to refuse them)")
    if test is None:
        if not 0 < cfg.holdout_fraction < 1:
            raise DatasetError(f"{cfg.data}: has no test split; set holdout_fraction in (0, 1) to carve one")
        perm = np.random.default_rng(cfg.seed + 7).permutation(len(train))
        n_test = max(1, int(round(len(train) * cfg.holdout_fraction)))
        test, train = train.subset(np.sort(perm[:n_test]), "holdout"), train.subset(np.sort(perm[n_test:]))
        train.meta["source_index"] = np.sort(perm[n_test:])
        notes.append(f"no test split: held out {n_test} training images (seeded) for evaluation")
    # a classifier reference trained on part of the test split: keep those images out of evaluation
    if cfg.reference.startswith("classifier:"):
        from .models import read_checkpoint_meta

        tr_on = read_checkpoint_meta(cfg.reference.split(":", 1)[1]).get("trained_on") or {}
        if tr_on.get("data") == cfg.data and tr_on.get("split") == "test" and test is not None:
            used = np.asarray(tr_on.get("indices", []), np.int64)
            keep = np.setdiff1d(np.arange(len(test)), used)
            test = test.subset(keep)
            notes.append(f"excluded {len(used)} test images that trained the reference classifier")
    train = seeded_subset(train, cfg.subset, cfg.seed)
    test = seeded_subset(test, cfg.subset, cfg.seed) if test is not None else None
    bd = test.meta.get("bd_test") if test is not None else None
    target = None
    if cfg.attack:
        from .attacks import make_attack

        if train.poison_mask is not None and train.poison_mask.any():
            raise DatasetError(f"{cfg.data}: already carries poisoned samples; do not apply --attack on top")
        atk = make_attack(cfg.attack, image_size=train.image_size, seed=cfg.seed, **cfg.attack_params)
        atk.cache_dir = run.path("attack")
        train = atk.poison(train, cfg.poison_rate, cfg.target, seed=cfg.seed)
        bd = atk.backdoor_test(test, cfg.target) if test is not None else None
        target = cfg.target
        notes.append(f"attack {cfg.attack}: {int(train.poison_mask.sum())} of {len(train)} samples poisoned, target {cfg.target}")
    elif bd is not None:
        tl = np.unique(bd.target_labels)
        target = int(tl[0]) if len(tl) == 1 else None
    sa = run.save_array
    sa("data/train_x.npy", train.images)
    sa("data/train_y.npy", train.labels)
    for name in ("poison_mask", "original_labels"):
        p = run.path("data", f"{name}.npy")
        if getattr(train, name) is not None:
            sa(f"data/{name}.npy", getattr(train, name))
        elif p.exists():
            p.unlink()
    if train.meta.get("source_index") is not None:
        sa("data/source_index.npy", np.asarray(train.meta["source_index"], np.int64))
    if test is not None:
        sa("data/test_x.npy", test.images)
        sa("data/test_y.npy", test.labels)
    for n in ("bd_x", "bd_true", "bd_target"):
        run.path("data", f"{n}.npy").unlink(missing_ok=True)
    if bd is not None and len(bd):
        sa("data/bd_x.npy", bd.images)
        sa("data/bd_true.npy", bd.true_labels)
        sa("data/bd_target.npy", bd.target_labels)
    write_json(run.path("data", "classes.json"), train.classes)
    info = {"name": train.name, "spec": cfg.data, "dataset_kind": kind, "n_train": len(train),
            "n_test": len(test) if test is not None else 0, "n_bd_test": len(bd) if bd is not None else 0,
            "image_size": list(train.image_size), "num_classes": train.num_classes, "fingerprint": train.fingerprint(),
            "has_ground_truth": train.has_ground_truth, "target": target, "notes": notes,
            "attack": train.meta.get("attack")}
    write_json(run.path("data", "info.json"), info)
    run.update_run(dataset=info)
    run.invalidate_from(list(STAGES[1:]))
    ctx._data = ctx._data_mm = None
    run.mark_stage("data", key, time.perf_counter() - t0)
    for n in notes:
        ctx.emit({"kind": "note", "message": n})
    return key


def _train_cfg(cfg: RunConfig, epochs: int, lr: float, seed: int, schedule: str = "cosine", batch_size: int = 256):
    from .train import TrainConfig

    return TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=5e-4, optimizer="adam", schedule=schedule,
                       precision=cfg.precision, seed=seed)


def _stage_victim(ctx: _Ctx, data_key: str) -> str:
    """The model to repair: the given checkpoint, or one trained on the (poisoned) data."""
    from .models import build_model, save_checkpoint
    from .train import train_classifier

    cfg, run = ctx.cfg, ctx.run
    key = _key("victim", data_key, cfg.model and _file_sig(cfg.model), cfg.arch, cfg.train_epochs, cfg.train_lr, cfg.seed,
               None if cfg.model else cfg.precision,
               *((("train_batch_size", cfg.train_batch_size),) if cfg.train_batch_size != 256 else ()))
    if run.stage_done("victim", key, ["models/victim.safetensors"]):
        return key
    t0 = time.perf_counter()
    d = ctx.data
    if cfg.model:
        model, meta = _load_model_to_repair(cfg.model, d.train.num_classes)
        arch, source = meta["arch"], {"checkpoint": str(cfg.model)}
    else:
        import torch

        torch.manual_seed(cfg.seed)
        arch = cfg.arch
        model = build_model(arch, d.train.num_classes)
        rep = ctx.reporter("victim", cfg.train_epochs, "epoch")
        train_classifier(model, d.train.images, d.train.labels, _train_cfg(cfg, cfg.train_epochs, cfg.train_lr, cfg.seed, batch_size=cfg.train_batch_size),
                         ctx.device, on_epoch=lambda s: (rep(s["epoch"]), ctx.check_stop()))
        rep.close()
        source = {"trained": {"arch": arch, "epochs": cfg.train_epochs, "lr": cfg.train_lr}}
    save_checkpoint(model, run.path("models", "victim.safetensors"), arch, d.train.classes, source=source)
    run.mark_stage("victim", key, time.perf_counter() - t0, arch=arch, **source)
    return key


def _load_model_to_repair(path: str, num_classes: int):
    """load_checkpoint, with any failure reported as a CheckpointError naming the file; NaN weights refused."""
    from .models import CheckpointError, load_checkpoint

    try:
        model, meta = load_checkpoint(path, num_classes=num_classes, device="cpu")
    except (CheckpointError, OSError):
        raise
    except Exception as e:  # e.g. safetensors' own error for a file that is not one
        raise CheckpointError(f"{path}: not a readable checkpoint ({e.__class__.__name__}: {e})") from None
    _check_finite_weights(model, path)
    return model, meta


def _check_finite_weights(model, path: str) -> None:
    """Raise a CheckpointError naming ``path`` and the first tensor holding NaN or infinite values."""
    import torch

    from .models import CheckpointError

    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} tensors hold NaN or infinite values (first: {bad[0]}); "
                              "the model is broken and cannot be repaired")


def _check_finite_logits(lg: np.ndarray, what: str, start: int = 0) -> None:
    bad = ~np.isfinite(lg).all(axis=1)
    if bad.any():
        raise ValueError(f"{what}: NaN or infinite logits for {int(bad.sum())} of {len(lg)} images "
                         f"(first: sample {start + int(np.flatnonzero(bad)[0])}); the model's weights are broken")


def _classnames_templates(cfg: RunConfig, d: RunData) -> tuple[list[str], list[str]]:
    from .zero_shot_metadata import default_classnames, default_templates

    names = cfg.classnames or default_classnames(d.dataset_kind if d.dataset_kind != "imagefolder" else "", d.train.classes)
    if d.dataset_kind == "imagefolder" and not cfg.classnames and d.train.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]:
        names = default_classnames("cifar10", d.train.classes)
    if len(names) != d.train.num_classes:
        raise ValueError(f"classnames: {len(names)} given, the dataset has {d.train.num_classes} classes")
    return list(names), list(cfg.templates or default_templates(d.dataset_kind))


def _stage_reference(ctx: _Ctx, data_key: str) -> str:
    """Reference logits (N, K) and embeddings (N, D), scored in chunks that survive a kill."""
    from .reference import make_reference

    cfg, run = ctx.cfg, ctx.run
    d = ctx.data_mapped  # images stay on disk: scored chunk by chunk in constant memory
    names, templates = _classnames_templates(cfg, d)
    ref_ckpt = cfg.reference.split(":", 1)[1] if cfg.reference.startswith("classifier:") else cfg.checkpoint
    key = _key("reference", data_key, cfg.reference, cfg.resolved_pretrained(), ref_ckpt and _file_sig(ref_ckpt), names,
               templates, cfg.precision, cfg.chunk_size, cfg.clip_config and _file_sig(cfg.clip_config))
    if run.stage_done("reference", key, ["clip_logits.npy", "embeddings.npy"]):
        return key
    t0 = time.perf_counter()
    if cfg.clip_config:
        import open_clip

        if not Path(cfg.clip_config).is_file():
            raise FileNotFoundError(f"{cfg.clip_config}: open_clip model config not found")
        open_clip.add_model_config(cfg.clip_config)
    import torch

    torch.manual_seed(cfg.seed)  # random-weight references (tests) must not depend on which stages ran before
    ref = make_reference(cfg.reference, names, templates, pretrained=cfg.resolved_pretrained(), checkpoint=cfg.checkpoint,
                         device=ctx.device, precision=cfg.precision, batch_size=cfg.score_batch_size)
    chunk_dir = run.path("chunks", "reference")
    chunk_dir.mkdir(parents=True, exist_ok=True)
    marker = read_json(chunk_dir / "key.json", {})
    if marker.get("key") != key:
        for f in chunk_dir.glob("*.npz"):
            f.unlink()
        write_json(chunk_dir / "key.json", {"key": key})
    import warnings

    from .data import release_pages
    from .reference import ReferenceError
    from .runs import NpyWriter

    n = len(d.train)
    rep = ctx.reporter("reference", n)
    starts = list(range(0, n, cfg.chunk_size))
    what = f"reference {cfg.reference}" + (f" ({ref_ckpt})" if ref_ckpt else "")
    for start in starts:  # pass 1: every chunk scored and saved (a killed job resumes here)
        stop = min(start + cfg.chunk_size, n)
        cf = chunk_dir / f"{start:09d}.npz"
        if not cf.exists():
            ctx.check_stop()
            images = d.train.images[start:stop]
            with warnings.catch_warnings():  # read-only memory map: the reference only reads it
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                r = ref.score(images, progress=lambda done, tot, s=start: rep(s + done))
            release_pages(images)
            try:
                _check_finite_logits(r.logits, what, start)
            except ValueError as e:
                raise ReferenceError(str(e)) from None
            tmp = cf.with_name(cf.stem + ".tmp.npz")
            np.savez(tmp, logits=r.logits, embeddings=r.embeddings)
            tmp.replace(cf)
        rep(stop)
    rep.close()
    # pass 2: stream the chunks into the two arrays (never all in memory at once)
    y_true = d.train.true_labels()
    correct = 0
    emb_dtype = np.float16 if n > 200_000 else np.float32
    writers: dict[str, NpyWriter] = {}
    try:
        for start in starts:
            stop = min(start + cfg.chunk_size, n)
            with np.load(chunk_dir / f"{start:09d}.npz", allow_pickle=False) as z:
                lg, em = z["logits"].astype(np.float32, copy=False), z["embeddings"].astype(emb_dtype, copy=False)
            if not writers:
                writers = {"lg": NpyWriter(run.path("clip_logits.npy"), (n, lg.shape[1]), np.float32),
                           "em": NpyWriter(run.path("embeddings.npy"), (n, em.shape[1]), emb_dtype)}
            writers["lg"].write(lg)
            writers["em"].write(em)
            correct += int((lg.argmax(1) == y_true[start:stop]).sum())
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for w in writers.values():
        w.commit()
    secs = time.perf_counter() - t0
    zs_acc = correct / n if n else float("nan")
    run.update_run(reference=ref.describe())
    run.mark_stage("reference", key, secs, images_per_s=n / max(secs, 1e-9), zero_shot_acc=zs_acc)
    return key


def _stage_suspicious(ctx: _Ctx, data_key: str, victim_key: str) -> str:
    """Suspicious-model logits: mean over ``suspicious_runs`` fresh models, or the victim's own."""
    from .models import build_model, load_checkpoint, save_checkpoint
    from .train import predict, train_classifier

    cfg, run = ctx.cfg, ctx.run
    d = ctx.data
    if cfg.suspicious not in ("train", "victim"):
        raise ValueError(f"suspicious must be 'train' or 'victim', got {cfg.suspicious!r}")
    key = _key("suspicious", data_key, cfg.suspicious, victim_key if cfg.suspicious == "victim" else None, cfg.arch,
               cfg.suspicious_runs, cfg.suspicious_epochs, cfg.seed, cfg.precision)
    if run.stage_done("suspicious", key, ["model_logits.npy"]):
        return key
    t0 = time.perf_counter()
    if cfg.suspicious == "victim":
        model, _ = load_checkpoint(run.path("models", "victim.safetensors"), device=ctx.device)
        lg = predict(model, d.train.images, ctx.device, precision=cfg.precision)
        _check_finite_logits(lg, f"model to repair {cfg.model or 'models/victim.safetensors'}")
    else:
        import torch

        acc = None
        for i in range(cfg.suspicious_runs):
            path = run.path("models", f"suspicious_{i}.safetensors")
            meta_ok = path.exists() and read_json(path.with_suffix(".json"), {}).get("key") == key
            if meta_ok:
                model, _ = load_checkpoint(path, device=ctx.device)
            else:
                ctx.check_stop()
                torch.manual_seed(cfg.seed * 1000 + 100 + i)
                model = build_model(cfg.arch, d.train.num_classes)
                rep = ctx.reporter(f"suspicious {i + 1}/{cfg.suspicious_runs}", cfg.suspicious_epochs, "epoch")
                train_classifier(model, d.train.images, d.train.labels,
                                 _train_cfg(cfg, cfg.suspicious_epochs, 3e-4, cfg.seed * 1000 + 100 + i, schedule="none"),
                                 ctx.device, on_epoch=lambda s, r=rep: (r(s["epoch"]), ctx.check_stop()))
                rep.close()
                save_checkpoint(model, path, cfg.arch, d.train.classes, key=key, run_index=i)
            p = predict(model, d.train.images, ctx.device, precision=cfg.precision).astype(np.float64)
            acc = p if acc is None else acc + p
        lg = (acc / cfg.suspicious_runs).astype(np.float32)
    run.save_array("model_logits.npy", lg)
    run.mark_stage("suspicious", key, time.perf_counter() - t0)
    return key


def scores_table(run: RunDir, sep: SeparationConfig | None = None, overrides: dict[int, int] | None = None):
    """Per-sample scores as a pandas DataFrame, computed from the run's logits.

    Columns: index, source_index, label, clip_nll, model_nll, clip_rank, model_rank, subset
    (clean/suspect/unused), clip_pred, clip_conf, clip_top3, model_pred, and when ground truth
    exists: poison (bool), original_label.
    """
    import pandas as pd

    d = load_run_data(run)
    cfg = RunConfig.from_dict(run.read_run().get("config", {}))
    sep = sep or cfg.separation_config()
    y = d.train.labels
    clip_logits = run.load_array("clip_logits.npy")
    model_logits = run.load_array("model_logits.npy")
    clip_nll = label_nll(clip_logits, y)
    model_nll = label_nll(model_logits, y)
    groups = y if sep.rank_mode == "per_class" else None
    clip_rank = rank_normalise(clip_nll, groups)
    model_rank = rank_normalise(model_nll, groups)
    subset = separate(clip_rank, model_rank, sep.sigma1, sep.sigma2, sep.sigma3)
    if overrides is None:
        overrides = {int(k): int(v) for k, v in (read_json(run.path("overrides.json"), {}) or {}).items()}
    subset = apply_overrides(subset, overrides)
    z = clip_logits - clip_logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    top3 = np.argsort(-clip_logits, axis=1)[:, :3]
    names = np.array(d.train.classes)
    df = pd.DataFrame({
        "index": np.arange(len(y)),
        "source_index": d.source_index if d.source_index is not None else np.arange(len(y)),
        "label": y,
        "clip_nll": clip_nll, "model_nll": model_nll, "clip_rank": clip_rank, "model_rank": model_rank,
        "subset": pd.Categorical([SUBSET_NAMES[int(s)] for s in subset], categories=["clean", "suspect", "unused"]),
        "clip_pred": clip_logits.argmax(1), "clip_conf": p.max(1),
        "clip_top3": [", ".join(f"{names[j]} {p[i, j]:.2f}" for j in top3[i]) for i in range(len(y))],
        "model_pred": model_logits.argmax(1),
    })
    if d.train.poison_mask is not None:
        df["poison"] = d.train.poison_mask
    if d.train.original_labels is not None:
        df["original_label"] = d.train.original_labels
    return df


def _stage_separate(ctx: _Ctx, ref_key: str, susp_key: str) -> str:
    cfg, run = ctx.cfg, ctx.run
    overrides = read_json(run.path("overrides.json"), {}) or {}
    key = _key("separate", ref_key, susp_key, _config_key(cfg.separation_config().to_dict()), overrides)
    if run.stage_done("separate", key, ["scores.parquet", "separation.json"]):
        return key
    t0 = time.perf_counter()
    df = scores_table(run)
    from .runs import atomic_write_bytes
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(run.path("scores.parquet"), buf.getvalue())
    subset = df["subset"].map({"unused": 0, "clean": 1, "suspect": 2}).to_numpy(np.int8)
    info = {"config": cfg.separation_config().to_dict(), "n": len(df), "clean": int((subset == CLEAN).sum()),
            "suspect": int((subset == SUSPECT).sum()), "unused": int((subset == 0).sum()), "overrides": len(overrides)}
    d = ctx.data_mapped  # only the labels and the ground truth are read
    if d.train.poison_mask is not None:
        info["detection"] = detection_metrics(subset, d.train.poison_mask, df["clip_nll"].to_numpy(), df["model_nll"].to_numpy())
    write_json(run.path("separation.json"), info)
    run.mark_stage("separate", key, time.perf_counter() - t0)
    ctx.emit({"kind": "separation", **info})
    return key


def _read_subsets(run: RunDir) -> np.ndarray:
    import pandas as pd

    df = pd.read_parquet(run.path("scores.parquet"), columns=["subset"])
    return df["subset"].astype(str).map({"unused": 0, "clean": 1, "suspect": 2}).to_numpy(np.int8)


def _stage_retrain(ctx: _Ctx, sep_key: str, victim_key: str) -> str:
    import torch
    from safetensors.torch import load_file, save_file

    from .evaluation import evaluate_model
    from .models import load_checkpoint, save_checkpoint
    from .retrain import guided_retrain

    cfg, run = ctx.cfg, ctx.run
    rcfg = cfg.retrain_config()
    key = _key("retrain", sep_key, victim_key, _config_key(rcfg.to_dict()))
    if run.stage_done("retrain", key, ["models/repaired.safetensors", "metrics.csv"]):
        return key
    t0 = time.perf_counter()
    d = ctx.data
    if d.test is None:
        raise DatasetError("retraining needs a clean test set for CA (the data stage found none)")
    subset = _read_subsets(run)
    clean_idx = oversample_per_class(np.flatnonzero(subset == CLEAN), d.train.labels, cfg.seed)
    suspect_idx = np.flatnonzero(subset == SUSPECT)
    model, meta = load_checkpoint(run.path("models", "victim.safetensors"), device=ctx.device)
    ref_logits = run.load_array("clip_logits.npy")

    def evaluate(m):
        return evaluate_model(m, d.test.images, d.test.labels, d.bd, ctx.device, precision=cfg.precision)

    # resume from the last finished epoch of the same configuration
    state_dir = run.path("chunks", "retrain")
    resume = None
    rows: list[dict] = []
    st_meta = read_json(state_dir / "state.json", {})
    if st_meta.get("key") == key and (state_dir / "state.safetensors").exists():
        flat = load_file(str(state_dir / "state.safetensors"))
        resume = {"model": {k[6:]: v for k, v in flat.items() if k.startswith("model.")},
                  "optimizer": torch.load(state_dir / "optimizer.pt", weights_only=True),
                  "scheduler": st_meta["scheduler"], "gen_cpu": flat["gen_cpu"], "gen_dev": flat["gen_dev"],
                  "epoch": st_meta["epoch"], "best_ca": st_meta["best_ca"], "best_epoch": st_meta["best_epoch"],
                  "streak": st_meta.get("streak", 0),
                  "good": {k[5:]: v for k, v in flat.items() if k.startswith("good.")} or None}
        rows = st_meta["rows"]
        ctx.emit({"kind": "note", "message": f"resuming retraining after epoch {st_meta['epoch']}"})
    rep = ctx.reporter("retrain", cfg.epochs, "epoch")
    batch_rows: list[dict] = [r for r in st_meta.get("batch_rows", [])] if resume is not None else []
    header = [f"cgd retrain metrics; key {key}"]
    summary = {}
    for ev in guided_retrain(model, d.train.images, d.train.labels, clean_idx, suspect_idx, ref_logits, evaluate, rcfg,
                             ctx.device, resume=resume):
        if ev["kind"] == "batch":
            batch_rows.append({k: ev[k] for k in ("epoch", "batch", "loss", "ce", "kl", "unlearn")})
            run.write_csv("metrics_batches.csv", batch_rows)
            ctx.emit(ev)
            rep(ev["epoch"] - 1, batch=ev["batch"], loss=ev["loss"])
            ctx.check_stop()
            continue
        if ev["kind"] == "epoch":
            row = {k: ev[k] for k in ("epoch", "loss", "ce", "kl", "unlearn", "ca", "asr", "ra", "lr", "seconds", "early_stop")}
            rows.append(row)
            run.write_csv("metrics.csv", rows, header)
            ctx.emit({**row, "kind": "epoch"})
            rep(ev["epoch"], ca=ev["ca"], asr=ev["asr"])
            if "state" in ev:
                s = ev["state"]
                flat = {f"model.{k}": v.contiguous() for k, v in s["model"].items()}
                if s.get("good") is not None:  # mid-streak: the weights an early stop would restore
                    flat.update({f"good.{k}": v.contiguous() for k, v in s["good"].items()})
                flat["gen_cpu"], flat["gen_dev"] = s["gen_cpu"], s["gen_dev"].cpu()
                state_dir.mkdir(parents=True, exist_ok=True)
                tmp = state_dir / "state.tmp.safetensors"
                save_file(flat, str(tmp))
                tmp.replace(state_dir / "state.safetensors")
                torch.save(s["optimizer"], state_dir / "optimizer.tmp.pt")
                (state_dir / "optimizer.tmp.pt").replace(state_dir / "optimizer.pt")
                write_json(state_dir / "state.json", {"key": key, "epoch": s["epoch"], "best_ca": s["best_ca"],
                                                      "best_epoch": s["best_epoch"], "streak": s.get("streak", 0), "scheduler": s["scheduler"], "rows": rows,
                                                      "batch_rows": batch_rows})
                ctx.check_stop()
        if ev["kind"] == "done":
            summary = {"before": {k: rows[0][k] for k in ("ca", "asr", "ra")} if rows and rows[0]["epoch"] == 0 else None,
                       "after": ev["final"], "best_epoch": ev["best_epoch"], "stopped_early": ev["stopped_early"],
                       "clean_size": int(len(np.unique(clean_idx))), "clean_oversampled": int(len(clean_idx)),
                       "suspect_size": int(len(suspect_idx))}
    rep.close()
    save_checkpoint(model, run.path("models", "repaired.safetensors"), meta["arch"], d.train.classes,
                    repaired_from="models/victim.safetensors", retrain=rcfg.to_dict())
    run.update_run(summary=summary)
    run.mark_stage("retrain", key, time.perf_counter() - t0)
    ctx.emit({"kind": "summary", **summary})
    return key


def export_indices(run: RunDir, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write clean/suspect index lists (JSON with provenance, CSV with a provenance header) and
    the per-sample scores table; returns the written paths. Indices are unique and sorted."""
    import pandas as pd

    out = Path(out_dir) if out_dir else run.path("exports")
    out.mkdir(parents=True, exist_ok=True)
    df = pd.read_parquet(run.path("scores.parquet"))
    info = run.read_run()
    cfg = info.get("config", {})
    sep = read_json(run.path("separation.json"), {})
    prov = {"tool": f"cgd {__version__}", "created": utcnow(), "run": str(run.root),
            "dataset": info.get("dataset", {}).get("spec"), "dataset_fingerprint": info.get("dataset", {}).get("fingerprint"),
            "sigma1": sep.get("config", {}).get("sigma1"), "sigma2": sep.get("config", {}).get("sigma2"),
            "sigma3": sep.get("config", {}).get("sigma3", 0.0),
            "rank_mode": sep.get("config", {}).get("rank_mode"), "manual_overrides": sep.get("overrides", 0),
            "reference": info.get("reference", {}).get("model") or info.get("reference", {}).get("checkpoint"),
            "reference_pretrained": info.get("reference", {}).get("pretrained"), "seed": cfg.get("seed"),
            "index_base": "0-based position in the run's training set; source_index = position in the original dataset"}
    paths = {}
    from .runs import atomic_write_text

    for polarity, meaning in (("clean", "samples kept as clean: safe to train on"),
                              ("suspect", "samples flagged as possibly poisoned: remove or inspect")):
        sel = df[df["subset"].astype(str) == polarity].sort_values("index")
        doc = {"polarity": polarity, "meaning": meaning, "count": int(len(sel)), "provenance": prov,
               "indices": sel["index"].astype(int).tolist(), "source_indices": sel["source_index"].astype(int).tolist()}
        paths[f"{polarity}_json"] = write_json(out / f"{polarity}_indices.json", doc)
        lines = [f"# {polarity} indices ({meaning}); " + "; ".join(f"{k}={v}" for k, v in prov.items())]
        lines.append("index,source_index,label")
        lines += [f"{i},{s},{l}" for i, s, l in zip(sel["index"], sel["source_index"], sel["label"])]
        paths[f"{polarity}_csv"] = atomic_write_text(out / f"{polarity}_indices.csv", "\n".join(lines) + "\n")
    paths["scores_csv"] = atomic_write_text(out / "scores.csv", df.to_csv(index=False))
    return paths


def _stage_export(ctx: _Ctx, sep_key: str) -> str:
    key = _key("export", sep_key)
    if ctx.run.stage_done("export", key, ["exports/clean_indices.json", "exports/suspect_indices.json"]):
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

    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; expected some of {', '.join(STAGES)}")
    if not cfg.out:
        raise ValueError("RunConfig.out (the run folder) is required")
    run = RunDir(cfg.out)
    emit = on_event or (lambda e: None)
    with run.lock():
        run.path("STOP").unlink(missing_ok=True)
        from .runs import remove_stale_temps

        remove_stale_temps(run.root, recursive=True)  # left by a killed job (we hold the lock)
        info = run.read_run()
        if not info:
            info = {"created": utcnow(), "format": "cgd-run-1"}
        info.update(config=cfg.to_dict(), versions=_versions(), updated=utcnow())
        write_json(run.run_json, info)
        seed_everything(cfg.seed)
        ctx = _Ctx(cfg, run, emit, progress_bars)
        run.update_run(device=device_info(ctx.device))
        wanted = [s for s in STAGES if s in stages]
        last = max(STAGES.index(s) for s in wanted)
        need = STAGES[: last + 1]
        t_start = time.perf_counter()
        try:
            run.write_status("running", "data", 0.0)
            k_data = _stage_data(ctx)
            needs_victim = "retrain" in need or "victim" in wanted or cfg.suspicious == "victim"
            k_vic = _stage_victim(ctx, k_data) if "victim" in need and needs_victim else None
            k_ref = _stage_reference(ctx, k_data) if "reference" in need else None
            k_susp = _stage_suspicious(ctx, k_data, k_vic) if "suspicious" in need else None
            k_sep = _stage_separate(ctx, k_ref, k_susp) if "separate" in need else None
            if "retrain" in need:
                _stage_retrain(ctx, k_sep, k_vic)
            if "export" in need:
                _stage_export(ctx, k_sep)
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
