"""bench/gpu_check.sh: the dry run exercises every step end to end on the CPU, and the budget,
target and table logic that only a GPU run would otherwise reach is checked directly.

No timing is asserted: only that every step ran, printed its row and wrote its JSON line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402

STAGES = ("data", "victim", "reference", "suspicious", "separate", "retrain", "export")
LINE_KEYS = {"bench", "time", "run_id", "step", "label", "mode", "status", "seconds", "timeout_s", "budget_s", "metrics",
             "peak_gib", "verdict", "targets", "settings", "log", "hardware", "versions"}


def _sh(args: list[str], timeout: float = 420) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    t0 = time.perf_counter()
    proc = _sh(["--dry-run", "--out", str(out)])
    return proc, out, time.perf_counter() - t0


def test_dry_run_exits_0_and_prints_every_step(dry_run):
    proc, out, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = proc.stdout.split("\n== gpu_check (dry-run)", 1)[1]
    assert "step" in table and "vs baseline" in table and "of ceiling" in table and "peak GiB" in table
    for label in ("GPU tests (-m gpu)", "score ViT-B-32", "score RN50", "score ViT-B-16", "train PreAct-RN18",
                  "suspicious", "retrain", "cgd run", "cgd run [x256]: total"):
        assert label in table, label
    for stage in STAGES:
        assert f": {stage} " in table, stage
    # targets are not judged on the CPU
    rows = [ln for ln in table.splitlines() if ln.startswith(("score ViT-B-32", "train PreAct-RN18", "cgd run [x256]: total"))]
    assert len(rows) == 4 and all(ln.rstrip().endswith("dry-run") for ln in rows), rows
    assert "pass" not in table and "FAIL" not in table


def test_dry_run_writes_a_json_line_per_step(dry_run):
    proc, out, _ = dry_run
    lines = [json.loads(ln) for ln in (out / "gpu_check.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == gpu_check.STEPS
    assert len({r["run_id"] for r in lines}) == 1
    for r in lines:
        assert LINE_KEYS <= set(r), LINE_KEYS - set(r)
        assert r["bench"] == "gpu_check" and r["mode"] == "dry-run" and r["status"] == "ok", (r["step"], r.get("error"))
        assert r["hardware"]["device"] == "cpu" and r["hardware"]["logical_cpus"] >= 1 and r["versions"]["torch"]
        assert r["peak_gib"] is None  # no CUDA call on the CPU
        assert Path(r["log"]).is_file()
    by = {r["step"]: r for r in lines}
    assert by["gpu-tests"]["metrics"]["failures"] == 0 and by["gpu-tests"]["settings"]["argv"][-4:] == ["-m", "gpu", "-p", "no:cacheprovider"]
    for step in ("score-vit-b-32", "score-rn50", "score-vit-b-16"):
        m = by[step]["metrics"]
        assert m["images_per_s"] > 0 and m["reference_images_per_s"] > 0 and m["ceiling_images_per_s"] > 0
        assert m["speedup_vs_reference"] > 0 and 0 < m["ceiling_fraction"] and m["device"] == "cpu"
    assert by["score-rn50"]["metrics"]["model"] == "tiny-rn"
    loops = by["train-preact-resnet18"]["metrics"]["loops"]
    assert set(loops) == {"suspicious", "retrain"} and all(v["speedup_vs_reference"] > 0 for v in loops.values())
    fr = by["full-run"]["metrics"]
    assert set(fr["stages"]) == set(STAGES) and fr["total_seconds"] > 0 and fr["n_train"] == 256
    for step in ("score-vit-b-32", "train-preact-resnet18", "full-run"):
        assert by[step]["verdict"] == "dry-run" and by[step]["targets"]
    # the run folder is cleaned up, its run.json kept; the scripts' own result lines are kept too
    assert not (out / "work" / lines[0]["run_id"]).exists()
    assert (out / f"full-run-{lines[0]['run_id']}.run.json").is_file()
    assert (out / "raw" / "score_speed.jsonl").is_file() and (out / "raw" / "train_speed.jsonl").is_file()


def test_dry_run_took(dry_run):
    """Not a timing assertion: records how long the dry run takes, for the report."""
    print(f"dry run: {dry_run[2]:.1f} s")


def test_out_of_budget_steps_are_skipped_and_the_table_still_prints(tmp_path):
    proc = _sh(["--dry-run", "--out", str(tmp_path), "--budget-s", "1", "--steps", "gpu-tests,full-run"], timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "skipped (budget)" in proc.stdout and "cgd run [x256]: total" in proc.stdout
    lines = [json.loads(ln) for ln in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert [(r["step"], r["status"]) for r in lines] == [("gpu-tests", "skipped"), ("full-run", "skipped")]


def test_bad_arguments_are_refused():
    proc = _sh(["--steps", "nope"], timeout=60)
    assert proc.returncode == 2 and "unknown nope" in proc.stderr


# ---- pieces a GPU run depends on, checked without one ----------------------------------------

def test_step_timeouts_follow_cumulative_deadlines():
    shares = [s for _, s in gpu_check.PLAN]
    assert sum(shares) < gpu_check.DEFAULT_BUDGET_S  # room for the table
    assert gpu_check.step_timeout(480, 0, 0) == pytest.approx(shares[0])
    # time the first step leaves unused passes to the second
    assert gpu_check.step_timeout(480, 10, 1) == pytest.approx(shares[0] + shares[1] - 10)
    # the plan scales with the budget; a late start leaves nothing
    assert gpu_check.step_timeout(240, 0, 5) == pytest.approx(sum(shares) / 2)
    assert gpu_check.step_timeout(480, 479, 0) == 0.0


def test_gpu_settings_are_the_issue_sizes(tmp_path):
    a = gpu_check.score_argv("score-vit-b-32", False, tmp_path, tmp_path)
    get = lambda argv, flag: argv[argv.index(flag) + 1]  # noqa: E731
    assert get(a, "--device") == "cuda" and get(a, "--precision") == "bf16" and get(a, "--model") == "ViT-B-32"
    assert get(a, "--n") == "50000" and int(get(a, "--ref-n")) < 50000 and "--model-config" not in a
    for step, model in (("score-rn50", "RN50"), ("score-vit-b-16", "ViT-B-16")):
        a = gpu_check.score_argv(step, False, tmp_path, tmp_path)
        assert get(a, "--model") == model and get(a, "--n") == "10000" and get(a, "--device") == "cuda"
    t = gpu_check.train_argv(False, tmp_path)
    assert get(t, "--model") == "preact-resnet18" and get(t, "--device") == "cuda" and get(t, "--precision") == "bf16"
    n, n_test, argv = gpu_check.full_run_settings(False, tmp_path / "d.npz", tmp_path / "run")
    assert n == 50000 and n_test > 0 and argv[0] == "run"
    for flag, value in (("--attack", "badnets"), ("--reference", "clip:ViT-B-32"), ("--pretrained", "none"),
                        ("--arch", "preact-resnet18"), ("--device", "cuda"), ("--data", f"npz:{tmp_path / 'd.npz'}")):
        assert get(argv, flag) == value
    # the GPU run trains with the defaults (no dry-run shortcuts)
    assert not {"--train-epochs", "--epochs", "--suspicious-runs", "--min-batches"} & set(argv)


def test_synthetic_npz_loads_with_cgd(tmp_path):
    from cgd.data import load_npz

    gpu_check.synthetic_npz(tmp_path / "s.npz", 40, 12)
    train, test = load_npz(tmp_path / "s.npz")
    assert train.images.shape == (40, 32, 32, 3) and train.images.dtype.name == "uint8"
    assert test is not None and len(test) == 12 and len(train.classes) == 10


def test_peak_memory_makes_no_cuda_call_on_cpu(monkeypatch):
    import torch

    def boom(*a, **k):
        raise AssertionError("CUDA API called on the CPU path")

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", boom)
    assert gpu_check.device_peak_gib("cpu") is None
    assert gpu_check._peak({"cgd": {"images_per_s": 1.0}}) is None
    assert gpu_check._peak({"cgd": {"peak_mem_gib": 2.5}, "reference": {"peak_mem_gib": 3.0}}) == 3.0


def test_judge_targets():
    j = lambda step, m, dry=False, st="ok": gpu_check.judge(step, m, dry, st)[0]  # noqa: E731
    assert j("score-vit-b-32", {"speedup_vs_reference": 2.4, "ceiling_fraction": 0.93}).startswith("pass")
    v = j("score-vit-b-32", {"speedup_vs_reference": 1.8, "ceiling_fraction": 0.95})
    assert v.startswith("FAIL") and "1.80x" in v and "ceil" not in v.split("vs")[0]
    assert j("score-vit-b-32", {"speedup_vs_reference": 2.4, "ceiling_fraction": 0.85}).startswith("FAIL")
    assert j("score-vit-b-32", {"speedup_vs_reference": 2.4, "ceiling_fraction": 0.85}, dry=True) == "dry-run"
    assert j("score-vit-b-32", None) == "n/a" and j("score-vit-b-32", {"speedup_vs_reference": float("nan"),
                                                                         "ceiling_fraction": 0.95}) == "n/a"
    assert j("score-rn50", {"speedup_vs_reference": 0.5}) == "-"  # no target
    assert j("train-preact-resnet18", {"speedup_vs_reference": 3.1}).startswith("pass")
    assert j("train-preact-resnet18", {"speedup_vs_reference": 2.9}).startswith("FAIL")
    assert j("full-run", {"total_seconds": 89.0}).startswith("pass")
    assert j("full-run", {"total_seconds": 90.0}).startswith("FAIL")
    assert j("full-run", {"elapsed_seconds": 150.0}, st="timeout").startswith("FAIL")
    assert j("full-run", {"elapsed_seconds": 40.0}, st="timeout") == "n/a"  # budget ran out before 90 s
    assert j("gpu-tests", {"failures": 0}).startswith("pass") and j("gpu-tests", {"failures": 2}).startswith("FAIL")


def test_table_rows_for_unfinished_steps():
    recs = [{"step": "score-vit-b-32", "label": "score ViT-B-32 x50000", "status": "timeout", "timeout_s": 90.0, "metrics": {}},
            {"step": "train-preact-resnet18", "label": "train", "status": "skipped", "metrics": {}},
            {"step": "full-run", "label": "cgd run", "status": "timeout", "timeout_s": 170.0, "peak_gib": None,
             "metrics": {"stages": {"data": 1.0, "victim": 60.5}, "total_seconds": None, "elapsed_seconds": 170.0}},
            {"step": "gpu-tests", "label": "GPU tests", "status": "failed", "returncode": 2,
             "metrics": gpu_check.parse_pytest_summary("ERROR: usage\n")}]
    rows = gpu_check.table_rows(recs, dry=False)
    assert rows[0][1] == "TIMEOUT (90 s)" and rows[0][5] == "n/a"
    assert rows[1][1] == "skipped (budget)"
    assert ("cgd run: victim", "60.5 s") == rows[3][:2] and rows[4][0] == "cgd run: total"
    assert rows[4][1].startswith("TIMEOUT") and rows[4][5].startswith("FAIL")
    assert rows[5][5] == "FAIL: pytest exit 2"
    text = gpu_check.render_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["step", "result", "vs", "baseline", "of", "ceiling", "peak", "GiB", "target"]
    assert len(lines) == len(rows) + 2


def test_parse_pytest_summary():
    c = gpu_check.parse_pytest_summary("....\n3 passed, 1 failed, 2 skipped, 290 deselected in 4.10s\n")
    assert (c["passed"], c["failed"], c["skipped"], c["deselected"], c["failures"]) == (3, 1, 2, 290, 1)
    c = gpu_check.parse_pytest_summary("291 deselected in 3.89s\n")
    assert c["failures"] == 0 and c["summary"] == "no GPU-marked tests"
    assert gpu_check.parse_pytest_summary("1 passed, 1 error in 2s")["failures"] == 1


def test_a_step_past_its_timeout_is_stopped(tmp_path):
    t0 = time.perf_counter()
    status, rc, sec = gpu_check._run_with_timeout([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                                                  tmp_path / "log.txt", 2.0, dict(os.environ))
    assert status == "timeout" and rc is None and time.perf_counter() - t0 < 30
    assert "started" in (tmp_path / "log.txt").read_text()
    status, rc, _ = gpu_check._run_with_timeout([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "l2.txt", 30,
                                                dict(os.environ))
    assert (status, rc) == ("failed", 3)
