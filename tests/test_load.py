"""Under load: 20 concurrent dashboard sessions browse a 50,000-sample run over the real protocol.

Slow (a few minutes): builds a real run on all 50,000 CIFAR-10 training images with cheap stages
(tiny random CLIP, one epoch each), serves the dashboard on loopback and drives it with
``bench/dashboard_load.py``. It asserts that every page load finishes without an exception or a
timeout; the latencies are printed (and appended to the benchmark's JSON lines), never asserted.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cgd.pipeline import RunConfig, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "data" / "tiny-clip.json")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def big_run(cifar_root, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    cfg = RunConfig.from_flat(data=f"imagefolder:{cifar_root}", out=str(runs / "cifar50k"), device="cpu", attack="badnets",
                    poison_rate=0.1, target=0, reference="clip:tiny-clip", clip_config=TINY, pretrained="none",
                    arch="small-cnn", train_epochs=1, suspicious_runs=1, suspicious_epochs=1, epochs=1, max_batches=5)
    run_pipeline(cfg, progress_bars=False)
    meta = json.loads((runs / "cifar50k" / "run.json").read_text())
    assert meta["dataset"]["n_train"] == 50000
    return runs


def test_twenty_sessions_browse_a_50k_run(big_run, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import dashboard_load

    rc = dashboard_load.main(["--runs-root", str(big_run), "--run", "cifar50k", "--sessions", "20", "--rounds", "2",
                              "--think", "1,3", "--timeout", "60", "--results", str(tmp_path), "--tag", "test"])
    out = capsys.readouterr().out
    print(out)
    line = json.loads((tmp_path / "dashboard_load.jsonl").read_text().splitlines()[-1])
    pages = line["pages"]
    assert rc == 0, f"failed page loads: {line['errors']}"
    assert pages["all"]["loads"] == 20 * 2 * 5
    assert pages["all"]["failures"] == 0
    assert set(pages) == {"dataset", "score", "inspect", "separate", "retrain", "all"}
    # every page drew something for a 50k run (not an empty "no run selected" frame)
    assert min(p["mean_kb"] for p in pages.values()) > 1.0
