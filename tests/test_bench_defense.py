"""bench/defense.py's table logic: the issue's targets per row, the per-seed aggregation, the written tables."""
import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def defense():
    spec = importlib.util.spec_from_file_location("bench_defense", ROOT / "bench" / "defense.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(**kw):
    base = {"dataset": "cifar10", "attack": "badnets", "reference": "classifier", "seed": 0, "category": "dirty-label",
            "ca_before": 70.0, "asr_before": 100.0, "ca_after": 69.5, "asr_after": 1.0, "ra_after": 60.0, "ca_drop": 0.5,
            "det_tpr": 99.0, "det_fpr": 4.0, "seconds": 100.0}
    return {**base, **kw}


def test_targets_name_each_miss(defense):
    assert defense.check_targets(_row()) == "met"
    assert defense.check_targets(_row(asr_after=2.0)) == "missed: ASR"
    assert defense.check_targets(_row(ca_drop=1.01, det_tpr=90.0)) == "missed: CA drop, TPR"
    # TPR is a target for dirty-label attacks only; a clean row has no ASR
    assert defense.check_targets(_row(category="clean-label", det_tpr=40.0)) == "met"
    assert defense.check_targets(_row(category="clean", asr_after=math.nan, det_tpr=math.nan, ca_drop=-0.3)) == "met"
    assert defense.check_targets(_row(category="clean", asr_after=math.nan, det_tpr=math.nan, ca_drop=1.2)) == "missed: CA drop"
    assert defense.check_targets(_row(asr_after=math.nan)) == "missed: ASR"  # a missing measurement is not a pass
    # with the never-poisoned model's ASR on the same triggers measured, the target is that + 2 points (issue 16)
    assert defense.check_targets(_row(asr_after=5.6, asr_clean_model=3.6)) == "met"
    assert defense.check_targets(_row(asr_after=5.7, asr_clean_model=3.6)) == "missed: ASR"
    assert defense.check_targets(_row(asr_after=1.9, asr_clean_model=math.nan)) == "met"


def test_aggregate_mean_spread_and_table(defense, tmp_path):
    rows = [_row(seed=0, asr_after=0.5, ca_drop=0.2), _row(seed=1, asr_after=2.5, ca_drop=0.4),
            _row(attack="none (clean)", category="clean", asr_before=math.nan, asr_after=math.nan, ra_after=math.nan,
                 det_tpr=math.nan, det_fpr=math.nan, ca_drop=-0.1)]
    aggs = defense.aggregate(rows)
    bad = next(a for a in aggs if a["attack"] == "badnets")
    assert bad["n_seeds"] == 2 and bad["asr_after"] == pytest.approx(1.5) and bad["asr_after_std"] == pytest.approx(1.0)
    assert bad["targets"] == "met"  # judged on the mean over seeds
    clean = next(a for a in aggs if a["attack"] == "none (clean)")
    assert clean["targets"] == "met" and math.isnan(clean["asr_after"])
    text = defense.write_tables(aggs, rows, tmp_path, "header")
    assert "| cifar10 | badnets | classifier |" in text and "1.50 ± 1.00" in text
    assert (tmp_path / "defense.csv").read_text().count("\n") == 4  # header + 3 rows


def test_render_merges_folders_newest_row_wins(defense, tmp_path):
    import json

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    old = _row(asr_after=9.0, preset="cgd")
    (a / "rows.jsonl").write_text(json.dumps(old) + "\n" + json.dumps(_row(dataset="gtsrb", preset="cgd")) + "\n")
    (b / "rows.jsonl").write_text(json.dumps(_row(asr_after=0.5, preset="cgd")) + "\n")
    assert defense.main(["--render", str(a), str(b), "--out", str(tmp_path / "m")]) == 0
    md = (tmp_path / "m" / "defense.md").read_text()
    assert md.count("| cifar10 | badnets |") == 1 and "| 0.50 |" in md and "9.00" not in md
    assert "| gtsrb | badnets |" in md
    (b / "rows.jsonl").write_text("{not json\n")
    with pytest.raises(SystemExit, match="rows.jsonl:1"):
        defense.main(["--render", str(b), "--out", str(tmp_path / "m2")])


SHARED = ROOT.parent / "shared" / "assets"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "cifar10-jpeg.tar.xz").is_file(), reason="needs ../shared/assets/cifar10-jpeg.tar.xz")
def test_defense_quick_end_to_end(tmp_path):
    """`bench/defense.py --quick` on real CIFAR-10 images: a clean row and a BadNets row, both tables written."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "defense"
    proc = subprocess.run([sys.executable, "bench/defense.py", "--quick", "--subset", "600", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [r["attack"] for r in rows] == ["none (clean)", "badnets"]
    bad = rows[1]
    # --quick is a smoke run (600 images, 2 short retraining epochs): the figures are checked for range, not quality
    for k in ("ca_before", "asr_before", "ca_after", "asr_after", "ra_after", "det_tpr", "det_fpr"):
        assert 0 <= bad[k] <= 100, k
    assert bad["targets"] == "met" or bad["targets"].startswith("missed: ")
    assert 0 <= bad["asr_clean_model"] <= 100 and math.isnan(rows[0]["asr_clean_model"])
    assert bad["seconds"] == pytest.approx(sum(v for k, v in bad.items() if k.startswith("t_")), rel=1e-6)
    md = (out / "defense.md").read_text()
    assert "| cifar10 | badnets | classifier |" in md and "sigma1/2/3 0.2/0.1/0.1" in md


def test_all_to_all_rows_are_named_apart_and_judged_on_the_mode(defense):
    assert defense.run_name("cifar10", "badnets", 1, all_to_all=True) == "cifar10-badnets-all2all-s1"
    assert defense.run_name("cifar10", None, 1, all_to_all=True) == "cifar10-clean-s1"  # the clean row is shared
    # an all-to-all row's "target named" is whether the verdict read the attack as all-to-all
    assert defense.verdict_columns({"poisoned": True, "mode": "all-to-all", "targets": []}, "badnets", True)["target_named"] == "yes"
    assert defense.verdict_columns({"poisoned": True, "mode": "all-to-one", "targets": [0]}, "badnets", True)["target_named"] == "no"
    assert defense.verdict_columns({"poisoned": True, "mode": "all-to-one", "targets": [0]}, "badnets")["target_named"] == "yes"
