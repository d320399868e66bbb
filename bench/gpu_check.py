"""One-command GPU check: the GPU tests, then every speed figure cgd lacks on a GPU, in a time budget.

Called by ``bench/gpu_check.sh`` (which finds the venv's python). Steps, each in its own process
with a timeout taken from the remaining budget, so a hung or slow step cannot eat the others' time:

1. ``gpu-tests``        ``python -m pytest -q -m gpu -p no:cacheprovider``
2. ``score-vit-b-32``   ViT-B-32 scoring, 50,000 CIFAR-size images, random weights
                        (``bench/score_speed.py``: cgd vs the paper's pattern vs the bare bf16 ceiling)
3. ``score-rn50``       RN50 scoring, 10,000 images (same script)
4. ``score-vit-b-16``   ViT-B-16 scoring, 10,000 images (same script)
5. ``train-preact-resnet18``  PreAct-ResNet18 training, cgd's trainer vs the DataLoader loop
                        (``bench/train_speed.py``, both loops)
6. ``full-run``         ``cgd run`` on a synthetic 50,000-image CIFAR-size ``.npz`` (BadNets, ViT-B-32
                        with random weights, PreAct-ResNet18), every stage's seconds from run.json

It prints one table (result, ratio vs baseline, fraction of the ceiling, peak GPU memory, target
pass/fail) and appends one JSON line per step, with hardware facts, to ``OUT/gpu_check.jsonl``
(the scripts' own lines go to ``OUT/raw/``, each step's log to ``OUT/logs/``).

``--dry-run`` (automatic without CUDA) runs the same steps on the CPU at tiny sizes (tiny open_clip
configs, small-cnn, a few hundred images, one epoch), so CI exercises every code path; its target
column says ``dry-run``. Exit status: 0 when every step ran to completion (targets missed or not),
1 when a step failed, timed out or was skipped for lack of budget, 2 on bad arguments.

    bash bench/gpu_check.sh [--out DIR] [--budget-s 480] [--dry-run]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)

ROOT = common.ROOT
DEFAULT_OUT = ROOT / "bench" / "results" / "gpu_check"
DEFAULT_BUDGET_S = 480.0
TINY_CLIP = ROOT / "tests" / "data" / "tiny-clip.json"
# a tiny open_clip ModifiedResNet (the RN50 family's tower, channels_last path) for the dry run
TINY_RN = {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}

# (name, seconds of the default 480-s budget). Each step must end by its cumulative deadline
# (scaled to --budget-s); time a step leaves unused passes to the next one. The last 10 s of the
# budget are kept for the table.
PLAN: list[tuple[str, float]] = [("gpu-tests", 40), ("score-vit-b-32", 90), ("score-rn50", 45),
                                 ("score-vit-b-16", 45), ("train-preact-resnet18", 80), ("full-run", 170)]
STEPS = [name for name, _ in PLAN]
MIN_STEP_S = {"gpu": 20.0, "dry-run": 3.0}  # a step is skipped when less than this is left for it

# targets: step -> ((metric, op, threshold, how it reads), ...); train targets apply to each loop
TARGETS: dict[str, tuple[tuple[str, str, float, str], ...]] = {
    "gpu-tests": (("failures", "==", 0, "no failures"),),
    "score-vit-b-32": (("speedup_vs_reference", ">=", 2.0, ">=2.0x paper"), ("ceiling_fraction", ">=", 0.9, ">=0.90 ceil")),
    "train-preact-resnet18": (("speedup_vs_reference", ">=", 3.0, ">=3x loader"),),
    "full-run": (("total_seconds", "<", 90.0, "<90 s"),),
}
_OPS = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
        "==": lambda a, b: a == b}


# ------------------------------------------------------------------------------------------------
# Settings of each step (GPU and dry run)
# ------------------------------------------------------------------------------------------------

def score_argv(step: str, dry: bool, work: Path, raw: Path) -> list[str]:
    """``bench/score_speed.py`` arguments for a scoring step."""
    common_args = ["--results", str(raw), "--seed", "0", "--tag", f"gpu_check {step}"]
    if dry:
        model, cfg, n, ref_n = {"score-vit-b-32": ("tiny-clip", str(TINY_CLIP), 256, 64),
                                "score-rn50": ("tiny-rn", str(work / "tiny-rn.json"), 32, 16),
                                "score-vit-b-16": ("tiny-clip", str(TINY_CLIP), 64, 32)}[step]
        return ["--device", "cpu", "--model", model, "--model-config", cfg, "--n", str(n), "--ref-n", str(ref_n),
                "--batch-size", "64", "--repeats", "1", "--compile", "off", *common_args]
    # ViT-B-32 carries the targets: a third round steadies the median ratios
    model, n, ref_n, repeats = {"score-vit-b-32": ("ViT-B-32", 50000, 5000, 3), "score-rn50": ("RN50", 10000, 2000, 2),
                                "score-vit-b-16": ("ViT-B-16", 10000, 2000, 2)}[step]
    return ["--device", "cuda", "--precision", "bf16", "--model", model, "--n", str(n), "--ref-n", str(ref_n),
            "--batch-size", "1024", "--repeats", str(repeats), *common_args]


def train_argv(dry: bool, raw: Path) -> list[str]:
    """``bench/train_speed.py`` arguments for the training step."""
    tail = ["--loop", "both", "--epochs", "1", "--results", str(raw), "--seed", "0", "--tag", "gpu_check train"]
    if dry:
        return ["--device", "cpu", "--model", "small-cnn", "--n", "64", "--batch-size", "32", "--workers", "1",
                "--repeats", "1", *tail]
    return ["--device", "cuda", "--precision", "bf16", "--model", "preact-resnet18", "--n", "20480", "--batch-size", "256",
            "--workers", "2", "--repeats", "2", *tail]


def full_run_settings(dry: bool, npz: Path, run_dir: Path) -> tuple[int, int, list[str]]:
    """(training images, test images, ``cgd`` argv) of the full-run step."""
    argv = ["run", "--data", f"npz:{npz}", "--attack", "badnets", "--pretrained", "none", "--out", str(run_dir), "--quiet"]
    if dry:
        return 256, 64, argv + ["--reference", "clip:tiny-clip", "--clip-config", str(TINY_CLIP), "--arch", "small-cnn",
                                "--device", "cpu", "--train-epochs", "1", "--suspicious-runs", "1", "--suspicious-epochs", "1",
                                "--epochs", "1", "--min-batches", "0", "--batch-size", "64", "--train-batch-size", "64",
                                "--score-batch-size", "64"]
    return 50000, 10000, argv + ["--reference", "clip:ViT-B-32", "--arch", "preact-resnet18", "--device", "cuda"]


def step_label(step: str, dry: bool) -> str:
    if dry:
        return {"gpu-tests": "GPU tests (-m gpu)", "score-vit-b-32": "score ViT-B-32 [tiny-clip x256]",
                "score-rn50": "score RN50 [tiny-rn x32]", "score-vit-b-16": "score ViT-B-16 [tiny-clip x64]",
                "train-preact-resnet18": "train PreAct-RN18 [small-cnn x64]", "full-run": "cgd run [x256]"}[step]
    return {"gpu-tests": "GPU tests (-m gpu)", "score-vit-b-32": "score ViT-B-32 x50000", "score-rn50": "score RN50 x10000",
            "score-vit-b-16": "score ViT-B-16 x10000", "train-preact-resnet18": "train PreAct-RN18 x20480",
            "full-run": "cgd run x50000"}[step]


def step_timeout(budget_s: float, elapsed_s: float, index: int) -> float:
    """Seconds step ``index`` may run when it starts ``elapsed_s`` into a ``budget_s`` budget: up to
    its cumulative deadline (the plan's shares scaled to the budget)."""
    total = DEFAULT_BUDGET_S
    deadline = budget_s * sum(s for _, s in PLAN[:index + 1]) / total
    return max(0.0, deadline - elapsed_s)


# ------------------------------------------------------------------------------------------------
# Targets and the table
# ------------------------------------------------------------------------------------------------

def judge(step: str, metrics: dict | None, dry: bool, status: str = "ok") -> tuple[str, list[dict]]:
    """(verdict, per-target details) of one table row. Verdict: ``-`` (no target), ``dry-run``,
    ``pass``, ``FAIL: ...`` or ``n/a`` (the figure is missing)."""
    targets = TARGETS.get(step.split("/")[0], ())
    if not targets:
        return "-", []
    details = []
    for metric, op, thr, text in targets:
        v = (metrics or {}).get(metric)
        ok = None if v is None or (isinstance(v, float) and not math.isfinite(v)) else bool(_OPS[op](v, thr))
        details.append({"metric": metric, "op": op, "threshold": thr, "value": v, "met": ok, "text": text})
    if dry:
        return "dry-run", details
    if step == "full-run" and status == "timeout" and (metrics or {}).get("elapsed_seconds", 0) >= 90.0:
        details[0]["met"] = False
        return "FAIL: not done in 90 s", details
    if any(d["met"] is None for d in details):
        return "n/a", details
    missed = [d for d in details if not d["met"]]
    if not missed:
        return "pass (" + ", ".join(d["text"] for d in details) + ")", details
    return "FAIL: " + ", ".join(f"{_fmt_metric(d['metric'], d['value'])} vs {d['text']}" for d in missed), details


def _fmt_metric(metric: str, v) -> str:
    if metric == "speedup_vs_reference":
        return f"{v:.2f}x"
    if metric == "ceiling_fraction":
        return f"{v:.2f}"
    if metric.endswith("seconds"):
        return f"{v:.1f} s"
    return str(v)


def _num(v, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _status_text(rec: dict) -> str:
    st = rec.get("status")
    if st == "timeout":
        return f"TIMEOUT ({rec.get('timeout_s', 0):.0f} s)"
    if st == "skipped":
        return "skipped (budget)"
    if st in ("failed", "interrupted"):
        return st.upper()
    return ""


def table_rows(records: list[dict], dry: bool) -> list[tuple[str, ...]]:
    """One row per figure: (step, result, vs baseline, of ceiling, peak GiB, target)."""
    rows: list[tuple[str, ...]] = []
    for rec in records:
        step, m, st = rec["step"], rec.get("metrics") or {}, rec.get("status", "failed")
        label = rec.get("label") or step
        bad = _status_text(rec)
        peak = _num(rec.get("peak_gib"), ".2f")
        if step == "gpu-tests":
            res = (m.get("summary") or "-") + (f" ({bad})" if bad else "")
            verdict = judge(step, m if "failures" in m else None, dry)[0]
            if st == "failed" and not m.get("failures"):  # pytest itself failed (usage, collection, crash)
                res = f"pytest exit {rec.get('returncode')}"
                verdict = "dry-run" if dry else f"FAIL: pytest exit {rec.get('returncode')}"
            rows.append((label, res, "-", "-", "-", verdict))
        elif step.startswith("score-"):
            res = f"{m['images_per_s']:,.0f} img/s" if st == "ok" and "images_per_s" in m else bad
            rows.append((label, res, _num(m.get("speedup_vs_reference"), ".2f") + ("x" if "speedup_vs_reference" in m else ""),
                         _num(m.get("ceiling_fraction"), ".2f"), peak, judge(step, m if st == "ok" else None, dry)[0]))
        elif step.startswith("train-"):
            loops = m.get("loops") or {}
            if st != "ok" or not loops:
                rows.append((label, bad or "-", "-", "-", peak, judge(step, None, dry)[0]))
            for loop, lm in loops.items():
                rows.append((f"{label} {loop}", f"{lm['images_per_s']:,.0f} img/s",
                             _num(lm.get("speedup_vs_reference"), ".2f") + "x", _num(lm.get("ceiling_fraction"), ".2f"),
                             _num(lm.get("peak_gib"), ".2f"), judge(step, lm, dry)[0]))
        elif step == "full-run":
            for name, sec in (m.get("stages") or {}).items():
                rows.append((f"{label}: {name}", f"{sec:.1f} s", "-", "-", "-", "-"))
            total = m.get("total_seconds")
            res = f"{total:.1f} s" if st == "ok" and total is not None else (
                f"{bad}, {m.get('elapsed_seconds', 0):.0f} s in" if bad and m.get("elapsed_seconds") else bad or "-")
            rows.append((f"{label}: total", res, "-", "-", peak, judge(step, m, dry, st)[0]))
        else:
            rows.append((label, bad or "-", "-", "-", peak, "-"))
    return rows


def render_table(rows: list[tuple[str, ...]]) -> str:
    head = ("step", "result", "vs baseline", "of ceiling", "peak GiB", "target")
    allr = [head, *rows]
    w = [max(len(r[i]) for r in allr) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w[i]) if i in (0, 1, 5) else c.rjust(w[i]) for i, c in enumerate(r)).rstrip()  # noqa: E731
    return "\n".join([line(head), "  ".join("-" * x for x in w), *(line(r) for r in rows)])


# ------------------------------------------------------------------------------------------------
# Workers (one process per step)
# ------------------------------------------------------------------------------------------------

def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _peak(results: dict) -> float | None:
    """Largest ``peak_mem_gib`` over a benchmark's paths (present on CUDA only)."""
    peaks = [v["peak_mem_gib"] for v in results.values() if "peak_mem_gib" in v]
    return max(peaks) if peaks else None


def _path_figures(results: dict, speedup: float, ceil_frac: float) -> dict:
    return {"images_per_s": results["cgd"]["images_per_s"], "reference_images_per_s": results["reference"]["images_per_s"],
            "ceiling_images_per_s": results["ceiling"]["images_per_s"], "tflops": results["cgd"].get("tflops"),
            "speedup_vs_reference": speedup, "ceiling_fraction": ceil_frac, "peak_gib": _peak(results),
            "peak_gib_by_path": {k: v.get("peak_mem_gib") for k, v in results.items()}}


def device_peak_gib(device) -> float | None:
    """Peak GPU memory allocated by this process (GiB); None off CUDA (no CUDA call is made there)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(dev) / 2**30


def synthetic_npz(path: Path, n: int, n_test: int, seed: int = 0) -> Path:
    """A CIFAR-size ``.npz`` (x, y, x_test, y_test, classes): ``common.load_images``' smooth blobs
    plus a per-class colour shift, so the models have something to learn."""
    import numpy as np

    from cgd.data import ImageSet, save_npz

    def make(k: int, s: int):
        x, y, classes, _ = common.load_images(None, k, s)
        tint = np.random.default_rng(1234).integers(-40, 41, (len(classes), 1, 1, 3))
        return np.clip(x.astype(np.int16) + tint[y], 0, 255).astype(np.uint8), y, classes

    x, y, classes = make(n, seed)
    xt, yt, _ = make(n_test, seed + 1)
    return save_npz(path, ImageSet(x, y, classes, name="gpu_check"), ImageSet(xt, yt, classes, name="gpu_check:test"))


def run_worker(step: str, out: Path, run_id: str, dry: bool) -> dict:
    """Run one step in this process; returns (and writes to OUT/steps/STEP.json) its record."""
    work, raw = out / "work" / run_id, out / "raw"
    work.mkdir(parents=True, exist_ok=True)
    rec: dict = {"step": step, "status": "ok"}
    if step.startswith("score-"):
        if dry and step == "score-rn50":
            (work / "tiny-rn.json").write_text(json.dumps(TINY_RN))
        import score_speed

        argv = score_argv(step, dry, work, raw)
        res = score_speed.main(argv)
        rec["settings"] = {"argv": argv}
        rec["metrics"] = {"model": res["model"], "n": res["n"], "ref_n": res["ref_n"], "precision": res["precision"],
                          "device": res["device"], "gflop_per_image": res["gflop_per_image"],
                          **_path_figures(res["results"], res["speedup_vs_reference"], res["ceiling_fraction"]),
                          "top1_agreement_vs_reference": res["top1_agreement_vs_reference"]}
        rec["peak_gib"] = rec["metrics"]["peak_gib"]
    elif step.startswith("train-"):
        import train_speed

        argv = train_argv(dry, raw)
        res = train_speed.main(argv)
        loops = {k: {**_path_figures(v["results"], v["speedup_vs_reference"], v["ceiling_fraction"]),
                     "gflop_per_image_step": v["gflop_per_image_step"]} for k, v in res["loops"].items()}
        peaks = [v["peak_gib"] for v in loops.values() if v["peak_gib"] is not None]
        rec["settings"] = {"argv": argv}
        rec["metrics"] = {"model": res["model"], "n": res["n"], "precision": res["precision"], "device": res["device"],
                          "loops": loops}
        rec["peak_gib"] = max(peaks) if peaks else None
    elif step == "full-run":
        import torch

        from cgd.cli import main as cgd_main

        npz, run_dir = work / "synthetic-cifar.npz", work / "run"
        n, n_test, argv = full_run_settings(dry, npz, run_dir)
        t0 = time.perf_counter()
        synthetic_npz(npz, n, n_test)
        npz_s = time.perf_counter() - t0
        dev = "cpu" if dry else "cuda"
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        print("cgd " + " ".join(argv), flush=True)
        t0 = time.perf_counter()
        rc = cgd_main(argv)
        wall = time.perf_counter() - t0
        if rc:
            raise SystemExit(f"cgd run exited with status {rc}")
        info = json.loads((run_dir / "run.json").read_text())
        rec["settings"] = {"argv": argv, "n_train": n, "n_test": n_test}
        rec["metrics"] = {"stages": {k: v.get("seconds") for k, v in info.get("stages", {}).items()},
                          "total_seconds": info.get("total_seconds"), "wall_seconds": wall, "npz_seconds": npz_s,
                          "device": (info.get("device") or {}), "n_train": n}
        rec["peak_gib"] = device_peak_gib(dev)
        npz.unlink(missing_ok=True)
    else:
        raise SystemExit(f"gpu_check: unknown worker step {step!r}")
    _write_json(out / "steps" / f"{step}.json", rec)
    return rec


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------

def _run_with_timeout(cmd: list[str], log: Path, timeout_s: float, env: dict) -> tuple[str, int | None, float]:
    """Run ``cmd`` in its own process group, output to ``log``. Returns (status, rc, seconds) with
    status ``ok``, ``failed`` or ``timeout`` (the whole group is terminated, then killed)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            return "timeout", None, time.perf_counter() - t0
        except KeyboardInterrupt:  # the step runs in its own session: Ctrl-C reaches only us
            _stop_group(proc)
            raise
    return ("ok" if rc == 0 else "failed"), rc, time.perf_counter() - t0


def _stop_group(proc: subprocess.Popen) -> None:
    """Terminate the step's process group (the step and e.g. its DataLoader workers), then kill it."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def parse_pytest_summary(text: str) -> dict:
    """Counts from pytest's last summary line ("3 passed, 1 skipped, 290 deselected in 4.1s")."""
    counts = {k: 0 for k in ("passed", "failed", "skipped", "errors", "deselected", "xfailed", "xpassed")}
    lines = [ln for ln in text.strip().splitlines() if re.search(r"\b(passed|failed|skipped|deselected|errors?|no tests ran)\b", ln)]
    last = lines[-1] if lines else ""
    for num, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", last):
        counts["errors" if word.startswith("error") else word] += int(num)
    counts["failures"] = counts["failed"] + counts["errors"]
    counts["summary"] = (f"{counts['passed']} passed, {counts['failed'] + counts['errors']} failed, {counts['skipped']} skipped"
                         if any(counts[k] for k in ("passed", "failed", "errors", "skipped")) else "no GPU-marked tests")
    return counts


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_step(step: str, index: int, args, run_id: str, t_start: float, env: dict) -> dict:
    mode = "dry-run" if args.dry_run else "gpu"
    out: Path = args.out
    log = out / "logs" / f"{step}.log"
    timeout = step_timeout(args.budget_s, time.perf_counter() - t_start, index)
    rec: dict = {"step": step, "label": step_label(step, args.dry_run), "mode": mode, "timeout_s": round(timeout, 1),
                 "log": str(log), "metrics": {}, "peak_gib": None}
    if timeout < MIN_STEP_S[mode]:
        rec.update(status="skipped", seconds=0.0, error=f"{timeout:.0f} s of the {args.budget_s:.0f}-s budget left for it")
        print(f"[{index + 1}/{len(STEPS)}] {step}: skipped ({rec['error']})", flush=True)
        return rec
    print(f"[{index + 1}/{len(STEPS)}] {step} (timeout {timeout:.0f} s, log {log}) ...", flush=True)
    if step == "gpu-tests":
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
        status, rc, sec = _run_with_timeout(cmd, log, timeout, env)
        rec["settings"] = {"argv": cmd[1:]}
        if status != "timeout":
            counts = parse_pytest_summary(log.read_text(errors="replace"))
            rec["metrics"] = counts
            # rc 5: nothing selected (no GPU-marked tests in this checkout) is not a failure
            status = "ok" if rc in (0, 5) and not (counts["failed"] or counts["errors"]) else "failed"
            rec["returncode"] = rc
    else:
        steps_json = out / "steps" / f"{step}.json"
        steps_json.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", step, "--out", str(out), "--run-id", run_id]
        if args.dry_run:
            cmd.append("--dry-run")
        if step == "full-run":  # a fresh cgd cache: no reference scores reused from an earlier run
            env = {**env, "CGD_CACHE": str(out / "work" / run_id / "cgd-cache")}
        status, rc, sec = _run_with_timeout(cmd, log, timeout, env)
        if status == "ok" and steps_json.is_file():
            w = json.loads(steps_json.read_text())
            rec.update(settings=w.get("settings"), metrics=w.get("metrics") or {}, peak_gib=w.get("peak_gib"))
        elif status == "ok":
            status = "failed"
        if step == "full-run":
            run_dir = out / "work" / run_id / "run"
            if status != "ok":  # what finished before the timeout or failure
                try:
                    info = json.loads((run_dir / "run.json").read_text())
                    rec["metrics"] = {"stages": {k: v.get("seconds") for k, v in info.get("stages", {}).items()
                                                 if v.get("done")}, "total_seconds": None, "elapsed_seconds": sec}
                except (OSError, ValueError):
                    rec["metrics"] = {"elapsed_seconds": sec}
            else:  # keep run.json, drop the 50,000-image run folder
                shutil.copyfile(run_dir / "run.json", out / f"full-run-{run_id}.run.json")
                shutil.rmtree(out / "work" / run_id, ignore_errors=True)
    rec.update(status=status, seconds=round(sec, 2))
    if status != "ok":
        rec["error"] = _tail(log)
        print(f"    {status} after {sec:.1f} s; last lines of {log}:\n" + "\n".join("    | " + ln for ln in rec["error"].splitlines()),
              flush=True)
    else:
        print(f"    done in {sec:.1f} s", flush=True)
    return rec


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"results folder (default {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="seconds for all steps (default 480)")
    p.add_argument("--dry-run", action="store_true", help="tiny CPU versions of every step (automatic without CUDA)")
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of the steps (default: all)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.out = Path(a.out).resolve()
    if a.budget_s <= 0:
        p.error("--budget-s must be positive")
    a.steps = [s.strip() for s in a.steps.split(",") if s.strip()]
    bad = [s for s in a.steps if s not in STEPS]
    if bad:
        p.error(f"--steps: unknown {', '.join(bad)}; expected some of {', '.join(STEPS)}")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.out, args.run_id, args.dry_run)
        return 0
    import torch

    t_start = time.perf_counter()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False): running the DRY RUN on the CPU instead "
              "(tiny sizes, no GPU figures, targets not judged)", flush=True)
        args.dry_run = True
    mode = "dry-run" if args.dry_run else "gpu"
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.dry_run:  # one thread per step: quick, and immune to a busy shared CPU (threads spinning on taken cores)
        env.setdefault("OMP_NUM_THREADS", "1")
    print(f"gpu_check ({mode}): budget {args.budget_s:.0f} s, results in {args.out}, python {sys.executable}", flush=True)
    records = []
    for i, step in enumerate(STEPS):
        if step not in args.steps:
            continue
        try:
            records.append(run_step(step, i, args, run_id, t_start, env))
        except KeyboardInterrupt:
            print(f"\ngpu_check: interrupted during {step}; the table shows what finished", flush=True)
            records.append({"step": step, "label": step_label(step, args.dry_run), "mode": mode, "status": "interrupted",
                            "metrics": {}, "peak_gib": None})
            break
        except Exception as e:  # a bug or an unreadable result: record it, go on with the next step
            records.append({"step": step, "label": step_label(step, args.dry_run), "mode": mode, "status": "failed",
                            "metrics": {}, "peak_gib": None, "error": f"{e.__class__.__name__}: {e}"})
    dev = torch.device("cpu" if args.dry_run else "cuda")
    try:
        hw = common.hardware(dev)
    except Exception as e:  # a broken CUDA setup must not cost the table
        hw = {**common.hardware(torch.device("cpu")), "error": f"{e.__class__.__name__}: {e}"}
    ver = common.versions()
    for rec in records:
        verdict, details = judge(rec["step"], rec.get("metrics"), args.dry_run, rec.get("status", "ok"))
        if rec["step"] == "train-preact-resnet18":
            loops = (rec.get("metrics") or {}).get("loops") or {}
            per = {k: judge(rec["step"], v, args.dry_run) for k, v in loops.items()}
            details = {k: d for k, (_, d) in per.items()}
            verdicts = [v for v, _ in per.values()]
            verdict = (verdicts[0] if len(set(verdicts)) == 1 else "; ".join(f"{k}: {v}" for k, (v, _) in per.items())) \
                if per else "n/a"
        rec.update(run_id=run_id, budget_s=args.budget_s, verdict=verdict, targets=details, hardware=hw, versions=ver)
        path = common.append_result("gpu_check", rec, args.out)
    total = time.perf_counter() - t_start
    title = f"gpu_check ({mode}) on {hw.get('gpu', hw.get('cpu'))}, {total:.0f} s of a {args.budget_s:.0f}-s budget"
    print(f"\n== {title}")
    print(render_table(table_rows(records, args.dry_run)))
    if records:
        print(f"\n{len(records)} JSON lines appended to {path}; logs in {args.out / 'logs'}")
    if args.dry_run:
        print("dry run: tiny CPU sizes, so the target column is not judged; run on a CUDA machine for the GPU figures")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
