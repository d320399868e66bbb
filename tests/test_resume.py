"""Interruptions lose nothing: SIGKILL a job mid-stage, rerun the same command, same final results."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cgd.runs import RunDir, RunLockedError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "data" / "tiny-clip.json")


def _cmd(cifar_root, out):
    return [sys.executable, "-m", "cgd", "run", "--data", f"imagefolder:{cifar_root}", "--subset", "400", "--attack", "blended",
            "--reference", "clip:tiny-clip", "--clip-config", TINY, "--pretrained", "none", "--chunk-size", "48",
            "--score-batch-size", "16", "--arch", "small-cnn", "--train-epochs", "1", "--suspicious-runs", "1",
            "--suspicious-epochs", "1", "--epochs", "4", "--max-batches", "3", "--tolerance", "100", "--device", "cpu", "--precision", "fp32",
            "--out", str(out), "--quiet"]


def _run_until(cmd, out, predicate, timeout=240):
    """Start cmd, SIGKILL it as soon as predicate(run_dir) holds; return whether it was killed mid-way."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < timeout:
        try:
            if predicate(RunDir(out)):
                p.send_signal(signal.SIGKILL)
                p.wait()
                return True
        except Exception:
            pass
        time.sleep(0.05)
    p.wait()
    return False


def _finish(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.fixture(scope="module")
def reference_run(cifar_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "uninterrupted"
    _finish(_cmd(cifar_root, out))
    return out


def _reference_chunks(run):
    return len(list(run.path("chunks", "reference").glob("*.npz")))


def test_kill_during_scoring_then_resume(cifar_root, reference_run, tmp_path):
    out = tmp_path / "killed"
    killed = _run_until(_cmd(cifar_root, out), out, lambda r: _reference_chunks(r) >= 4)
    assert killed, "the job finished before it could be killed"
    run = RunDir(out)
    assert run.read_run()  # run.json is still readable JSON
    n_before = _reference_chunks(run)
    assert n_before >= 4  # killed after at least 4 finished chunks (timing decides how many more)
    _finish(_cmd(cifar_root, out))
    np.testing.assert_array_equal(np.load(out / "clip_logits.npy"), np.load(reference_run / "clip_logits.npy"))
    np.testing.assert_array_equal(np.load(out / "model_logits.npy"), np.load(reference_run / "model_logits.npy"))
    assert (out / "exports" / "clean_indices.json").read_text().split('"indices"')[1] == \
        (reference_run / "exports" / "clean_indices.json").read_text().split('"indices"')[1]


def test_kill_during_retraining_then_resume(cifar_root, reference_run, tmp_path):
    out = tmp_path / "killed"

    def in_retrain(r):
        st = json.loads(r.path("chunks", "retrain", "state.json").read_text())
        return st["epoch"] >= 2

    assert _run_until(_cmd(cifar_root, out), out, in_retrain), "the job finished before it could be killed"
    assert not (out / "models" / "repaired.safetensors").exists()
    _finish(_cmd(cifar_root, out))
    def rows(run_dir):  # NaN-safe comparison of every column but wall time
        return [{k: repr(v) for k, v in r.items() if k != "seconds"} for r in RunDir(run_dir).read_metrics()]

    assert rows(out) == rows(reference_run)
    assert len(rows(out)) == 5
    from safetensors.torch import load_file

    wa, wb = load_file(str(out / "models" / "repaired.safetensors")), load_file(str(reference_run / "models" / "repaired.safetensors"))
    assert all((wa[k] == wb[k]).all() for k in wa)


def test_second_job_on_same_run_is_refused(tmp_path):
    run = RunDir(tmp_path / "r")
    with run.lock():
        assert run.is_locked()
        with pytest.raises(RunLockedError, match="in use by pid"):
            with RunDir(tmp_path / "r").lock():
                pass
        r = subprocess.run([sys.executable, "-m", "cgd", "separate", "--data", "npz:x.npz", "--out", str(tmp_path / "r")],
                           capture_output=True, text=True)
        assert r.returncode == 2 and "in use by pid" in r.stderr
    assert not run.is_locked()
