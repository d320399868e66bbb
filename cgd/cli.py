"""The ``cgd`` command line: every stage alone, and ``cgd run`` for all of them.

    cgd run      --data SPEC --out RUN [--attack badnets] --reference clip:ViT-B-32 [--checkpoint F] ...
    cgd attack   --data SPEC --attack NAME --out poisoned.npz      (or --list)
    cgd train    --data SPEC --arch small-cnn --out model.safetensors [--split test --trusted-fraction 0.5]
    cgd score    --out RUN [reference flags]         (data, victim when needed, reference, suspicious)
    cgd separate --out RUN [--sigma1 --sigma2 --sigma3]
    cgd retrain  --out RUN [--epochs --lr --alpha --beta ...]
    cgd export   --out RUN [--to DIR]
    cgd status   --out RUN
    cgd umap     --out RUN                         (2-D map of the reference embeddings, cached)

Stage commands on an existing run folder reuse its recorded configuration; flags given override it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser"]


def _add_run_flags(p: argparse.ArgumentParser, required: bool) -> None:
    """One flag per user-settable leaf of the config tree (cgd.config), grouped by section; defaults,
    help and choices come from the fields. Every flag defaults to None: "not given", so the run's
    recorded configuration (or the preset) decides."""
    from .config import PRESETS, flat_fields

    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in flat_fields():
        if f.cli is None:
            continue
        g = groups.get(f.section) or groups.setdefault(f.section, p.add_argument_group(f.section))
        default = "" if f.default in (None, "", {}) else f" (default: {f.default})"
        kw: dict[str, Any] = {"default": None, "help": f.help + default, "dest": f.name}
        if f.cli == "lines":
            kw["metavar"] = "FILE"
        elif f.cli == "key=value":
            kw.update(action="append", metavar=f.metavar or "KEY=VALUE")
        elif f.kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            if f.choices:
                kw["choices"] = list(f.choices)
            if f.kind.startswith(("int", "float")):
                kw["type"] = int if f.kind.startswith("int") else float
            if f.metavar:
                kw["metavar"] = f.metavar
        if f.name == "data":
            kw["required"] = required
        g.add_argument(f.flag, **kw)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="recipe: cgd (default: this tool's measured defaults) or paper (the CGD paper's code: retraining lr "
                        "0.01, no unlearning floor, no minimum batch count, a fixed 1-point tolerance, patience 1, sigma3 0); "
                        "flags given explicitly win over the preset")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")


def _parse_value(v: str) -> Any:
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def _lines(path: str | None) -> list[str] | None:
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"cgd: {p}: file not found")
    return [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]


def config_from_args(args: argparse.Namespace):
    """A RunConfig: the run folder's recorded config (if any), then the preset, then the given flags."""
    from .config import ConfigError, RunConfig, apply_preset, flat_fields
    from .runs import RunDir

    run = RunDir(args.out)
    base = RunConfig.from_dict(run.read_run().get("config", {})) if run.exists() else RunConfig()
    if getattr(args, "preset", None):
        base = apply_preset(base, args.preset)
    upd: dict[str, Any] = {}
    for f in flat_fields():
        v = getattr(args, f.name, None)
        if v is None:
            continue
        if f.cli == "lines":
            v = _lines(v)
        elif f.cli == "key=value":
            bad = [kv for kv in v if "=" not in kv]
            if bad:
                raise ConfigError(f"{f.flag}: expected KEY=VALUE, got {bad[0]!r}")
            v = {kv.split("=", 1)[0]: _parse_value(kv.split("=", 1)[1]) for kv in v}
        upd[f.name] = v
    cfg = base.updated({**upd, "out": str(args.out)})
    if not cfg.data:
        raise SystemExit(f"cgd: --data is required (no run with a recorded dataset at {args.out})")
    cfg.check()
    return cfg


def _printer(quiet: bool):
    def emit(ev: dict) -> None:
        if quiet:
            return
        kind = ev.get("kind")
        if kind == "note":
            print(f"note: {ev['message']}", file=sys.stderr)
        elif kind == "separation":
            msg = f"separation: clean {ev['clean']}, suspect {ev['suspect']}, unused {ev['unused']} of {ev['n']}"
            det = ev.get("detection")
            if det:
                msg += (f" | suspect TPR {100 * det['suspect']['tpr']:.1f}% FPR {100 * det['suspect']['fpr']:.1f}%"
                        f", poisons in clean {det['poison_in_clean']}, AUROC clip {det.get('auroc_clip', float('nan')):.3f}"
                        f" model {det.get('auroc_model', float('nan')):.3f}")
            print(msg, file=sys.stderr)
        elif kind == "verdict":
            print(f"verdict: {ev['summary']}", file=sys.stderr)
        elif kind == "epoch":
            print(f"retrain epoch {ev['epoch']:>2}: loss {ev['loss']:.4f}  CA {ev['ca']:.2f}  ASR {ev['asr']:.2f}  RA {ev['ra']:.2f}"
                  + (f"  (early stop: CA dropped, weights of epoch {ev.get('restored_epoch')} restored)"
                     if ev.get("early_stop") else ""), file=sys.stderr)
    return emit


def print_summary(info: dict, file=sys.stdout) -> None:
    """A plain-text table of stage times and results."""
    rows = [("stage", "seconds", "notes")]
    for name, rec in info.get("stages", {}).items():
        note = ""
        if name == "reference" and "images_per_s" in rec:
            note = f"{rec['images_per_s']:.0f} img/s, zero-shot acc {100 * rec.get('zero_shot_acc', float('nan')):.1f}%"
        rows.append((name, f"{rec.get('seconds', 0):.1f}", note))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)), file=file)
    v = info.get("verdict")
    out = (info.get("config") or {}).get("out")
    if v and out:  # verdict.json as written, or judged again when an older verdict wrote it
        from .runs import RunDir
        from .verdict import current_verdict

        v = current_verdict(RunDir(out)) or v
    if v:
        print(f"\nverdict: {v.get('summary', '')}", file=file)
    s = info.get("summary")
    if s:
        b, a = s.get("before") or {}, s.get("after") or {}
        print("\n          CA      ASR     RA", file=file)
        if b:
            print(f"before  {b['ca']:6.2f}  {b['asr']:6.2f}  {b['ra']:6.2f}", file=file)
        print(f"after   {a['ca']:6.2f}  {a['asr']:6.2f}  {a['ra']:6.2f}", file=file)
        kept = s.get("kept_epoch")
        if kept is not None:
            print(f"after = epoch {kept} of {s.get('epochs')}" + (" (weights restored after a CA drop" + (
                f"; stopped after epoch {s.get('epochs_run')})" if s.get("stopped_early") else ")") if s.get("restored") else ""),
                file=file)
        print(f"clean subset {s['clean_size']} (oversampled to {s['clean_oversampled']}), suspect subset {s['suspect_size']}", file=file)
        o = s.get("outcome")
        if o:
            print(f"\n{'' if o.get('ok') else 'WARNING: '}{o['message']}", file=file)
            print(f"checkpoint: {o['label']}", file=file)
            for tip in o.get("suggestions") or []:
                print(f"  try: {tip}", file=file)


def _cmd_pipeline(args: argparse.Namespace, stages: Sequence[str]) -> int:
    from .pipeline import run_pipeline

    cfg = config_from_args(args)
    info = run_pipeline(cfg, stages, on_event=_printer(args.quiet), progress_bars=not args.quiet)
    if args.json:
        print(json.dumps({"stages": info.get("stages"), "summary": info.get("summary")}, indent=2, default=str))
    else:
        print_summary(info)
    return 0


def _cmd_attack(args: argparse.Namespace) -> int:
    from . import attacks
    from .data import load_splits, save_npz

    if args.list:
        for d in attacks.describe_all():
            print(f"{d['name']:<16} {d['category']:<12} {json.dumps(d['defaults'])}")
        return 0
    if not (args.data and args.attack and args.out):
        raise SystemExit("cgd attack: --data, --attack and --out are required (or --list)")
    train, test = load_splits(args.data)
    params = {kv.split("=", 1)[0]: _parse_value(kv.split("=", 1)[1]) for kv in (args.attack_param or [])}
    atk = attacks.make_attack(args.attack, image_size=train.image_size, seed=args.seed, **params)
    poisoned = atk.poison(train, args.poison_rate, args.target, seed=args.seed)
    extra = {}
    if test is not None:
        bd = atk.backdoor_test(test, args.target)
        extra = {"x_test_bd": bd.images, "y_test_bd": bd.true_labels, "target_test_bd": bd.target_labels}
    save_npz(args.out, poisoned, test, attack=json.dumps(atk.describe()), **extra)
    print(f"wrote {args.out}: {int(poisoned.poison_mask.sum())} of {len(poisoned)} samples poisoned with {args.attack} (target {args.target})")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .data import load_dataset
    from .evaluation import evaluate_model
    from .models import build_model, save_checkpoint
    from .train import TrainConfig, train_classifier

    s = load_dataset(args.data, args.split)
    s.images = np.array(s.images)  # training holds the set in memory anyway (the loader may memory-map it)
    # the split's fingerprint lets a run recognise these images wherever the dataset lies later (cgd.rundata)
    info: dict = {"data": args.data, "split": args.split, "split_fingerprint": s.fingerprint()}
    if args.trusted_fraction is not None:
        if not 0 < args.trusted_fraction <= 1:
            raise SystemExit("cgd train: --trusted-fraction must lie in (0, 1]")
        n = int(round(len(s) * args.trusted_fraction))
        idx = np.sort(np.random.default_rng(args.seed).permutation(len(s))[:n])  # seeded sample, any file order
        info.update(trusted_fraction=args.trusted_fraction, seed=args.seed, indices=idx.tolist())
        s = s.subset(idx)
    torch.manual_seed(args.seed)
    model = build_model(args.arch, s.num_classes)
    from .train import resolve_flip

    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, optimizer="adam", schedule="cosine", seed=args.seed,
                      precision=args.precision or "auto", flip=resolve_flip(args.flip, s.classes))
    report = None
    if args.progress_run:  # a job's setup step: show its progress in that run's status
        from .runs import Reporter, RunDir

        report = Reporter(RunDir(args.progress_run), "training the reference classifier", cfg.epochs, "epoch", bar=False)
        report(0)

    def on_epoch(h: dict) -> None:
        if report is not None:
            report(h["epoch"], train_acc=h["train_acc"])
        if not args.quiet:
            print(f"epoch {h['epoch']}: loss {h['loss']:.4f} train acc {100 * h['train_acc']:.1f}% ({h['images_per_s']:.0f} img/s)",
                  file=sys.stderr)

    hist = train_classifier(model, s.images, s.labels, cfg, args.device or "auto", progress=not args.quiet, desc="train",
                            on_epoch=on_epoch)
    save_checkpoint(model, args.out, args.arch, s.classes, trained_on=info, train=cfg.to_dict(), history=hist)
    msg = f"wrote {args.out} ({args.arch}, {len(s)} images, {args.epochs} epochs)"
    if args.eval:
        test = load_dataset(args.data, "test")
        test.images = np.array(test.images)
        if args.split == "test" and args.trusted_fraction is not None:
            test = test.subset(np.setdiff1d(np.arange(len(test)), info["indices"]))
        m = evaluate_model(model, test.images, test.labels, device=args.device or "auto")
        msg += f"; test accuracy {m['ca']:.2f}% on {len(test)} images"
    print(msg)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_indices
    from .runs import RunDir

    run = RunDir(args.out)
    if not run.has("scores.parquet"):
        raise SystemExit(f"cgd export: {args.out} has no scores yet; run `cgd score` and `cgd separate` first")
    for k, p in export_indices(run, args.to).items():
        print(f"{k}: {p}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from .runs import RunDir

    run = RunDir(args.out)
    if not run.exists():
        raise SystemExit(f"cgd status: {args.out} is not a run folder (no run.json)")
    print(json.dumps(run.read_status(), indent=2))
    print_summary(run.read_run())
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    from .runs import RunDir

    RunDir(args.out).path("STOP").touch()
    print(f"stop requested for {args.out}")
    return 0


def _cmd_umap(args: argparse.Namespace) -> int:
    from .embedding_map import MapConfig, compute_embedding_map
    from .runs import RunDir

    run = RunDir(args.out)
    if not run.has("embeddings.npy"):
        raise SystemExit(f"cgd umap: {args.out} has no reference embeddings yet; run `cgd score` first")
    cfg = MapConfig(method=args.method, max_points=args.max_points, seed=args.seed)
    with run.lock():
        run.write_status("running", "umap", 0.0)
        try:
            m = compute_embedding_map(run, cfg, force=args.force)
        except BaseException as e:
            run.write_status("failed", "umap", 0.0, error=f"{e.__class__.__name__}: {e}")
            raise
        run.write_status("done", "", 1.0, message=f"embedding map of {len(m.index)} of {m.n_total} samples")
    print(f"wrote {run.path('embedding_map.npz')} ({cfg.method}, {len(m.index)} of {m.n_total} samples)")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from .score_cache import cache_main

    return cache_main(list(args.cache_args))


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from .serve import main as serve_main

    return serve_main(list(args.serve_args))


def build_parser() -> argparse.ArgumentParser:
    from .config import ARCHITECTURES, FLIP_CHOICES

    p = argparse.ArgumentParser(prog="cgd", description="Audit a training set for backdoor poisoning and repair the model (CLIP-Guided Defense).")
    from . import __version__

    p.add_argument("--version", action="version", version=f"cgd {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("run", "the whole pipeline"), ("score", "reference and suspicious-model scores"),
                        ("separate", "split into clean / suspect / unused"), ("retrain", "CLIP-guided retraining")):
        sp = sub.add_parser(name, help=help_)
        _add_run_flags(sp, required=False)
    a = sub.add_parser("attack", help="poison a clean dataset (keeps the ground-truth mask)")
    a.add_argument("--list", action="store_true", help="list every attack with its category and defaults")
    a.add_argument("--data")
    a.add_argument("--attack")
    a.add_argument("--out", help="output .npz")
    a.add_argument("--poison-rate", type=float, default=0.1)
    a.add_argument("--target", type=int, default=0)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--attack-param", action="append", metavar="KEY=VALUE")
    t = sub.add_parser("train", help="train a classifier (e.g. a trusted reference on a clean split)")
    t.add_argument("--data", required=True)
    t.add_argument("--split", default="train", choices=["train", "test"])
    t.add_argument("--trusted-fraction", type=float, default=None,
                   help="train on a seeded random fraction F of the split only (recorded, and kept out of evaluation by `cgd run`)")
    t.add_argument("--arch", default="small-cnn", choices=list(ARCHITECTURES))
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None)
    t.add_argument("--precision", default=None, choices=["auto", "bf16", "fp32", "int8"])
    t.add_argument("--flip", default="auto", choices=list(FLIP_CHOICES),
                   help="random horizontal flips: auto = on unless class names come in left/right pairs (GTSRB)")
    t.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    t.add_argument("--eval", action="store_true", help="report accuracy on the test split afterwards")
    t.add_argument("--quiet", action="store_true")
    t.add_argument("--progress-run", default=None, metavar="RUN",
                   help="also report progress in RUN/status.json (used when a dashboard job trains a reference first)")
    e = sub.add_parser("export", help="write clean / suspect index lists and the scores table")
    e.add_argument("--out", required=True, help="run folder")
    e.add_argument("--to", default=None, help="folder for the files (default RUN/exports)")
    s = sub.add_parser("status", help="show a run's status and stage times")
    s.add_argument("--out", required=True)
    st = sub.add_parser("stop", help="ask a running job on a run folder to stop")
    st.add_argument("--out", required=True)
    u = sub.add_parser("umap", help="2-D map (UMAP) of a run's reference embeddings, cached in the run folder")
    u.add_argument("--out", required=True, help="run folder")
    u.add_argument("--method", default="umap", choices=["umap", "pca"])
    u.add_argument("--max-points", type=int, default=20000, help="map a seeded subsample above this many samples")
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--force", action="store_true", help="recompute even when a cached map is current")
    u.add_argument("--quiet", action="store_true")
    c = sub.add_parser("cache", help="the shared reference-score cache: `cgd cache ls`, `cgd cache clear [KEY...]`",
                       add_help=False)
    c.add_argument("cache_args", nargs=argparse.REMAINDER)
    d = sub.add_parser("dashboard", help="serve the dashboard on this machine (loopback only unless --allow-remote)",
                       add_help=False)
    d.add_argument("serve_args", nargs=argparse.REMAINDER)
    return p


STAGES_FOR = {"run": ("data", "victim", "reference", "suspicious", "separate", "retrain", "export"),
              "score": ("data", "reference", "suspicious"),
              "separate": ("separate",), "retrain": ("retrain",)}


_PASS_THROUGH = ("cache", "dashboard")  # subcommands with their own argument parser


def main(argv: Sequence[str] | None = None) -> int:
    from .data import DatasetError
    from .models import CheckpointError
    from .pipeline import PipelineStopped
    from .reference import ReferenceError
    from .runs import RunLockedError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _PASS_THROUGH:  # their own parsers take every argument (argparse's REMAINDER
        rest = argv[1:]                    # would hand leading --flags to the top-level parser)
        args = argparse.Namespace(cmd=argv[0], cache_args=rest, serve_args=rest)
    else:
        args = build_parser().parse_args(argv)
    try:
        if args.cmd in STAGES_FOR:
            return _cmd_pipeline(args, STAGES_FOR[args.cmd])
        return {"attack": _cmd_attack, "train": _cmd_train, "export": _cmd_export, "status": _cmd_status,
                "stop": _cmd_stop, "umap": _cmd_umap, "cache": _cmd_cache, "dashboard": _cmd_dashboard}[args.cmd](args)
    except (DatasetError, CheckpointError, ReferenceError, RunLockedError, OSError, ValueError) as e:
        msg = " ".join(str(e).split("\n"))  # one line, whatever the underlying library said
        print(f"cgd: error: {msg}", file=sys.stderr)
        return 2
    except PipelineStopped:
        print("cgd: stopped by request; run the same command again to resume", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("cgd: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
