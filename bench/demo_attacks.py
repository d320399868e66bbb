"""Every attack on the built-in demo, with the demo's defaults: the verdict, the detection and the repair.

The demo (``cgd.demo``: 8,000 real CIFAR-10 training images, tiny-cnn victims, a reference classifier
trained on a trusted half of the sample's test split) is what a new user runs first. This script
poisons it with each attack at the teaching rate (10 %, all-to-one, target 0), runs the whole
pipeline with every default and writes one JSON line per row: the verdict (poisoned or not, target
named, family, score), the detection (suspect TPR/FPR, poisons left in the clean subset), the model
before and after repair (CA, ASR, ASR of the model's ordinary mistakes) and the judged outcome. A
clean row (no attack) checks that the verdict raises no alarm.

``--variants`` re-runs only the retraining of the rows it names with other settings (same victim,
scores and separation), for measuring a candidate default, e.g.::

    python bench/demo_attacks.py --attacks sig,lc,narcissus,wanet --variants '[{"stamp": 0.5}]'

Each run folder is kept under ``--out``/runs; a re-run resumes (finished stages are reused).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (puts the repository root on sys.path)

ALL = ("none", "badnets", "blended", "trojan", "wanet", "ssba", "inputaware", "lowfreq", "bpp", "sig", "lc", "narcissus",
       "cleanimage")


def _r(x, nd=2):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), nd)


def row(run_dir: Path, attack: str, variant: dict, seconds: float, target: int | None = 0) -> dict:
    """One JSON row of a finished run; ``target`` None = an all-to-all attack (then "target_named" says whether
    the verdict read the attack as all-to-all)."""
    from cgd.runs import RunDir

    run = RunDir(run_dir)
    info = run.read_run()
    s = info.get("summary") or {}
    v = run.read_verdict() or {}
    det = (run.read_separation() or {}).get("detection") or {}
    before, after = s.get("before") or {}, s.get("after") or {}
    named = None if attack == "none" else (v.get("targets") == [target] if target is not None else v.get("mode") == "all-to-all")
    return {"attack": attack, "variant": variant, "verdict": "poisoned" if v.get("poisoned") else "clean",
            "verdict_score": _r(v.get("score"), 1), "targets": v.get("targets"), "target_named": named,
            "family": v.get("family"), "mode": v.get("mode"),
            "estimated_poisons": v.get("estimated_poisons"), "true_poisons": det.get("n_poison"),
            "det_tpr": _r(100 * det["suspect"]["tpr"], 1) if det.get("suspect") else None,
            "det_fpr": _r(100 * det["suspect"]["fpr"], 1) if det.get("suspect") else None,
            "poison_in_clean": det.get("poison_in_clean"), "auroc_model": _r(det.get("auroc_model"), 3),
            "ca_before": _r(before.get("ca")), "asr_before": _r(before.get("asr")), "ca_after": _r(after.get("ca")),
            "asr_after": _r(after.get("asr")), "asr_base": _r(after.get("asr_base")),
            "outcome": (s.get("outcome") or {}).get("status"), "seconds": round(seconds, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--attacks", default=",".join(ALL), help="comma-separated; 'none' = the clean row")
    ap.add_argument("--variants", default="[]", help="JSON list of flat retraining settings to try per row, after the default")
    ap.add_argument("--skip-default", action="store_true", help="run only the --variants (the default row was measured before)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--poison-rate", type=float, default=0.1, help="share of the training set poisoned (default 0.1)")
    ap.add_argument("--target", type=int, default=0, help="the attack's target class (default 0)")
    ap.add_argument("--all-to-all", action="store_true", help="poison all-to-all (label y -> y + 1 mod K) instead of "
                    "all-to-one; --target is then unused")
    ap.add_argument("--out", default="bench/results/demo-attacks")
    args = ap.parse_args(argv)
    import subprocess

    from cgd import demo
    from cgd.pipeline import run_pipeline
    from cgd.runs import RunDir

    if not demo.available():
        print("the demo sample assets/demo/cifar10 is absent", file=sys.stderr)
        return 2
    if not demo.reference_ready():
        subprocess.run(demo.reference_command(), check=True)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    variants = json.loads(args.variants)
    for attack in [a.strip() for a in args.attacks.split(",") if a.strip()]:
        atk = {} if attack == "none" else {"attack": attack, "poison_rate": args.poison_rate, "target": args.target}
        other = "" if (args.poison_rate, args.target) == (0.1, 0) or attack == "none" else f"-r{args.poison_rate:g}-t{args.target}"
        if args.all_to_all and attack != "none":
            atk["attack_params"] = {"all_to_all": True}
            other = f"-r{args.poison_rate:g}-all2all"
        run_dir = out / "runs" / f"{attack}{other}-s{args.seed}"
        cfg = demo.run_config(str(run_dir), attack=atk, seed=args.seed)
        for variant in ([] if args.skip_default else [{}]) + variants:
            if (variant.get("stamp") or variant.get("subtract_trigger")) and variant:
                v = RunDir(run_dir).read_verdict() or {}
                if not (v.get("poisoned") and len(v.get("targets") or []) == 1):
                    continue  # stamping needs one named target: this variant would repeat the default
            t0 = time.perf_counter()
            run_pipeline(cfg.updated(variant) if variant else cfg, progress_bars=False)
            r = row(run_dir, attack, variant, time.perf_counter() - t0, None if args.all_to_all else args.target)
            with open(rows_path, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
