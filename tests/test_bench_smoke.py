"""The speed benchmarks run end to end on tiny inputs and append their JSON result line.

No timing is asserted: only that both scripts run as a user runs them, print the comparison and
record hardware, versions, settings and figures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_CLIP_CONFIG = ROOT / "tests" / "data" / "tiny-clip.json"


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: quick and immune to a busy shared machine
    proc = subprocess.run([sys.executable, *args, "--results", str(tmp_path), "--device", "cpu", "--repeats", "1", "--threads", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _last_line(path: Path) -> dict:
    lines = path.read_text().strip().splitlines()
    return json.loads(lines[-1])


def test_score_speed_smoke(tmp_path):
    proc = _run(["bench/score_speed.py", "--model", "tiny-clip", "--model-config", str(TINY_CLIP_CONFIG), "--n", "12",
                 "--batch-size", "8", "--spearman", "--tag", "smoke"], tmp_path)
    assert "speed-up vs reference" in proc.stdout and "fraction of ceiling" in proc.stdout
    rec = _last_line(tmp_path / "score_speed.jsonl")
    assert rec["bench"] == "score_speed" and rec["settings"]["tag"] == "smoke" and rec["model"] == "tiny-clip"
    assert rec["hardware"]["device"] == "cpu" and rec["versions"]["torch"] and rec["versions"]["open_clip"]
    for path in ("reference", "cgd", "ceiling"):
        r = rec["results"][path]
        assert r["images_per_s"] > 0 and len(r["rounds"]) == 1 and r["tflops"] > 0
    assert rec["speedup_vs_reference"] > 0 and rec["ceiling_fraction"] > 0 and rec["gflop_per_image"] > 0
    # cgd scores what the paper's pattern scores (same weights): the predictions agree
    assert rec["top1_agreement_vs_reference"] >= 0.8
    assert -1.0 <= rec["spearman_bf16_fp32"] <= 1.0


def test_train_speed_smoke(tmp_path):
    proc = _run(["bench/train_speed.py", "--model", "small-cnn", "--loop", "both", "--n", "96", "--batch-size", "32",
                 "--workers", "1"], tmp_path)
    assert "[suspicious] speed-up vs reference" in proc.stdout and "[retrain] fraction of ceiling" in proc.stdout
    rec = _last_line(tmp_path / "train_speed.jsonl")
    assert rec["bench"] == "train_speed" and rec["settings"]["loop"] == "both" and rec["model"] == "small-cnn"
    assert set(rec["loops"]) == {"suspicious", "retrain"}
    for loop in rec["loops"].values():
        for path in ("reference", "cgd", "ceiling"):
            assert loop["results"][path]["images_per_s"] > 0
        assert loop["speedup_vs_reference"] > 0 and loop["gflop_per_image_step"] > 0
    assert rec["hardware"]["logical_cpus"] >= 1 and "cpu_bf16" in rec["hardware"]
