"""Attack efficacy table: CA / ASR / RA of a small-CNN victim trained on each poisoned set.

For each attack: poison (a seeded subset of) the real CIFAR-10 training set at rate 0.1, target 0
(clean-label attacks poison target-class images only), train ``small-cnn`` with
``TrainConfig(epochs=E, lr=2e-3, schedule='cosine')``, and measure clean accuracy (CA) on the test
set and attack success rate (ASR) / robust accuracy (RA) on ``attack.backdoor_test(test, 0)``. The
same model trained on the clean subset gives the CA reference (computed once per configuration and
reused from ``OUT/clean-<config>.json``). Goal (issue 7): ASR >= 90 % (clean-label >= 70 %) with CA
within 2 points of the clean model.

Rows accumulate per configuration in ``OUT/attack_table-<config>.csv`` and ``.md``, so attacks can
be run one at a time::

    python bench/attack_table.py --n-train 20000 --epochs 8 --attacks badnets
    python bench/attack_table.py --n-train 20000 --epochs 8 --attacks sig,lc

Data: ``--data`` (default ``$CGD_BENCH_DATA`` or ``imagefolder:/tmp/assets/CIFAR-10-images``).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COLUMNS = ["attack", "category", "n_poisoned", "n_noise", "psnr", "ca", "asr", "ra", "ca_clean", "ca_clean_sd", "d_ca", "asr_goal",
           "goal_met", "n_bd", "poison_s", "train_s", "params"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from cgd import attacks

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("CGD_BENCH_DATA", "imagefolder:/tmp/assets/CIFAR-10-images"),
                   help="dataset spec KIND:PATH with train and test splits")
    p.add_argument("--n-train", type=int, default=None, help="seeded subset of the training set (default: all)")
    p.add_argument("--n-test", type=int, default=None, help="seeded subset of the test set (default: all)")
    p.add_argument("--epochs", type=int, default=8, help="victim training epochs")
    p.add_argument("--attacks", default="all", help=f"comma-separated names or 'all' ({','.join(attacks.available())})")
    p.add_argument("--rate", type=float, default=0.1, help="poison rate")
    p.add_argument("--target", type=int, default=0, help="target class")
    p.add_argument("--seed", type=int, default=0, help="seed of the data subset, the poison selection and the victim's training")
    p.add_argument("--clean-seeds", type=int, default=1,
                   help="train the clean reference with this many training seeds (seed, seed+1, ...) on the same data; "
                        "CA clean is their mean, its spread is reported (victims differ from run to run by a few points)")
    p.add_argument("--param", action="append", default=[], metavar="ATTACK.KEY=VALUE",
                   help="override an attack parameter, e.g. wanet.s=1.0 (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the CSV / Markdown tables")
    args = p.parse_args(argv)
    names = attacks.available() if args.attacks == "all" else [a.strip().lower() for a in args.attacks.split(",") if a.strip()]
    bad = [n for n in names if n not in attacks.available()]
    if bad:
        p.error(f"--attacks: unknown {bad}; available: {', '.join(attacks.available())}")
    args.names = names
    args.overrides = {}
    for kv in args.param:
        if "=" not in kv or "." not in kv.split("=", 1)[0]:
            p.error(f"--param expects ATTACK.KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        a, key = k.split(".", 1)
        try:
            val = json.loads(v)
        except json.JSONDecodeError:
            val = v
        args.overrides.setdefault(a.lower(), {})[key] = val
    return args


def config_key(args: argparse.Namespace) -> str:
    s = f"{args.data}|{args.n_train}|{args.n_test}|{args.epochs}|{args.seed}"
    return f"n{args.n_train or 'all'}-e{args.epochs}-s{args.seed}-" + hashlib.sha256(s.encode()).hexdigest()[:6]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean PSNR in dB between (N, H, W, 3) uint8 image sets (inf where identical)."""
    if len(a) == 0:
        return float("nan")
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        vals = 10 * np.log10(255.0 ** 2 / mse)
    return float(np.mean(vals)) if np.isfinite(vals).all() else float("inf")


def train_victim(images: np.ndarray, labels: np.ndarray, num_classes: int, epochs: int, seed: int):
    import torch

    from cgd.models import build_model
    from cgd.train import TrainConfig, train_classifier

    torch.manual_seed(seed)
    model = build_model("small-cnn", num_classes)
    train_classifier(model, images, labels, TrainConfig(epochs=epochs, lr=2e-3, schedule="cosine", seed=seed))
    return model


def write_tables(rows: list[dict], out: Path, key: str, header: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / f"attack_table-{key}.csv", out / f"attack_table-{key}.md"
    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in COLUMNS})
    os.replace(tmp, csv_path)
    lines = [header, "", "| attack | category | poisoned | PSNR dB | CA | ASR | RA | CA clean (sd) | dCA | goal |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['attack']} | {r['category']} | {r['n_poisoned']} | {float(r.get('psnr') or 'nan'):.1f} | {float(r['ca']):.2f} | {float(r['asr']):.2f} | "
                     f"{float(r['ra']):.2f} | {float(r['ca_clean']):.2f} ({float(r.get('ca_clean_sd') or 0):.2f}) | {float(r['d_ca']):+.2f} | "
                     f"{'yes' if str(r['goal_met']) == 'True' else 'no'} (ASR>={r['asr_goal']}) |")
    tmp = md_path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, md_path)
    return csv_path, md_path


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from cgd import attacks
    from cgd.data import load_splits, seeded_subset
    from cgd.evaluation import evaluate_model

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    key = config_key(args)
    train, test = load_splits(args.data)
    if test is None:
        raise SystemExit(f"{args.data}: no test split")
    train = seeded_subset(train, args.n_train, args.seed)
    test = seeded_subset(test, args.n_test, args.seed)
    header = (f"Attack table: {args.data}, {len(train)} train / {len(test)} test images, small-cnn victim, "
              f"{args.epochs} epochs (Adam lr 2e-3, cosine), rate {args.rate}, target {args.target}, seed {args.seed}")
    print(header, flush=True)

    clean_json = out / f"clean-{key}.json"
    clean = json.loads(clean_json.read_text()) if clean_json.is_file() else {"runs": {}}
    clean.setdefault("runs", {})
    if "ca" in clean and not clean["runs"]:  # an older single-run file
        clean["runs"][str(args.seed)] = {"ca": clean["ca"], "train_s": clean.get("train_s", 0.0)}
    for s in range(args.seed, args.seed + max(1, args.clean_seeds)):
        if str(s) in clean["runs"]:
            continue
        t0 = time.perf_counter()
        model = train_victim(train.images, train.labels, train.num_classes, args.epochs, s)
        clean["runs"][str(s)] = {"ca": evaluate_model(model, test.images, test.labels)["ca"], "train_s": time.perf_counter() - t0}
        print(f"clean reference, training seed {s}: CA {clean['runs'][str(s)]['ca']:.2f} "
              f"({clean['runs'][str(s)]['train_s']:.0f} s)", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        clean_json.write_text(json.dumps(clean))
    cas = [clean["runs"][str(s)]["ca"] for s in range(args.seed, args.seed + max(1, args.clean_seeds))]
    clean["ca"], clean["sd"] = float(np.mean(cas)), float(np.std(cas))
    print(f"clean reference: CA {clean['ca']:.2f} +- {clean['sd']:.2f} over training seeds {list(range(args.seed, args.seed + len(cas)))}",
          flush=True)

    csv_path = out / f"attack_table-{key}.csv"
    rows = {r["attack"]: r for r in read_rows(csv_path)}
    for name in args.names:
        atk = attacks.make_attack(name, image_size=train.image_size, seed=args.seed, **args.overrides.get(name, {}))
        atk.cache_dir = out / "cache" / key
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # clean-label rates capped at the class size
            poisoned = atk.poison(train, args.rate, args.target, seed=args.seed)
        bd = atk.backdoor_test(test, args.target)
        poison_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = train_victim(poisoned.images, poisoned.labels, train.num_classes, args.epochs, args.seed)
        train_s = time.perf_counter() - t0
        m = evaluate_model(model, test.images, test.labels, bd)
        goal = 70.0 if atk.category == "clean-label" else 90.0
        row = {"attack": name, "category": atk.category, "n_poisoned": int(poisoned.poison_mask.sum()),
               "n_noise": int(poisoned.meta["attack"].get("n_noise", 0)),
               "psnr": round(psnr(poisoned.images[poisoned.poison_mask], train.images[poisoned.poison_mask]), 2),
               "ca": round(m["ca"], 2),
               "asr": round(m["asr"], 2), "ra": round(m["ra"], 2), "ca_clean": round(clean["ca"], 2), "ca_clean_sd": round(clean["sd"], 2),
               "d_ca": round(m["ca"] - clean["ca"], 2), "asr_goal": goal,
               "goal_met": bool(m["asr"] >= goal and m["ca"] >= clean["ca"] - 2.0), "n_bd": len(bd),
               "poison_s": round(poison_s, 1), "train_s": round(train_s, 1), "params": json.dumps(atk.params)}
        rows[name] = row
        print(f"{name:12s} {atk.category:12s} poisoned {row['n_poisoned']:5d}  CA {row['ca']:6.2f}  ASR {row['asr']:6.2f}  "
              f"RA {row['ra']:6.2f}  dCA {row['d_ca']:+6.2f}  goal {'met' if row['goal_met'] else 'MISSED'}  "
              f"(poison {poison_s:.0f} s, train {train_s:.0f} s)", flush=True)
        order = attacks.available()
        write_tables(sorted(rows.values(), key=lambda r: order.index(r["attack"]) if r["attack"] in order else 99),
                     out, key, header)
    c, md = out / f"attack_table-{key}.csv", out / f"attack_table-{key}.md"
    if md.is_file():
        print()
        print(md.read_text())
        print(f"wrote {c} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
