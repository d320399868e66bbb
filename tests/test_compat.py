"""Run folders written by an earlier cgd (commit 81dce48, before the config tree) resume with every
stage reused: same stage keys, nothing recomputed."""
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cgd.cli import main
from cgd.runs import RunDir

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "data" / "tiny-clip.json")
OLD = "81dce48"


@pytest.fixture(scope="module")
def old_cgd(tmp_path_factory) -> Path:
    """The cgd package as it was at 81dce48, unpacked from this repository's history."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    dest = tmp_path_factory.mktemp("old")
    tar = dest / "old.tar"
    r = subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(tar), OLD, "cgd"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"commit {OLD} is not in this checkout's history ({r.stderr.strip()})")
    with tarfile.open(tar) as tf:
        tf.extractall(dest, filter="data")
    return dest


def _npz(path: Path) -> Path:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 50)
    x = (rng.integers(0, 60, (200, 16, 16, 3)) + 40 * y[:, None, None, None]).astype(np.uint8)
    yt = np.repeat(np.arange(4), 20)
    xt = (rng.integers(0, 60, (80, 16, 16, 3)) + 40 * yt[:, None, None, None]).astype(np.uint8)
    np.savez(path, x=x, y=y, x_test=xt, y_test=yt, classes=np.array(["a", "b", "c", "d"]))
    return path


def test_a_run_folder_from_81dce48_resumes_without_recomputing(old_cgd, tmp_path):
    data = _npz(tmp_path / "d.npz")
    out = tmp_path / "run"
    args = ["run", "--data", f"npz:{data}", "--attack", "badnets", "--reference", "clip:tiny-clip", "--clip-config", TINY,
            "--pretrained", "none", "--arch", "small-cnn", "--train-epochs", "1", "--suspicious-runs", "1",
            "--suspicious-epochs", "1", "--epochs", "2", "--max-batches", "2", "--device", "cpu", "--out", str(out), "--quiet"]
    code = f"import sys; from cgd.cli import main; sys.exit(main({args!r}))"
    r = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(old_cgd), "PATH": "/usr/bin:/bin",
                                                          "CGD_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path)},
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    old = RunDir(out).read_run()
    assert "min_batches" not in old["config"]  # really written by the old version
    # the RunDir accessors read the old folder's artefacts (provenance inside the JSON list, then)
    rd = RunDir(out)
    assert rd.read_classes() and len(rd.read_classes()) == 4
    prov = rd.read_provenance()
    assert prov is not None and prov.get("sigma1") == 0.2
    assert rd.read_separation()["clean"] > 0 and rd.scores_path.is_file() and rd.repaired_path.is_file()
    assert main(["run", "--out", str(out), "--quiet"]) == 0
    new = RunDir(out).read_run()
    for name, rec in old["stages"].items():
        assert new["stages"][name]["key"] == rec["key"], name
        assert new["stages"][name]["finished"] == rec["finished"], f"stage {name} was recomputed"
    # a changed threshold reruns the separation and what follows it, and nothing before it
    assert main(["separate", "--out", str(out), "--sigma1", "0.3", "--quiet"]) == 0
    after = RunDir(out).read_run()["stages"]
    assert after["separate"]["finished"] != old["stages"]["separate"]["finished"]
    assert all(after[s]["finished"] == old["stages"][s]["finished"] for s in ("data", "victim", "reference", "suspicious"))
