"""Judging a repair (cgd.repair): the status, the checkpoint's label, a summary that agrees with itself."""
from __future__ import annotations

import math

import pytest

from cgd.config import RetrainConfig
from cgd.repair import STATUSES, asr_limit, judge, repair_outcome

CFG = RetrainConfig()


@pytest.mark.parametrize("before,after,status", [
    ({"ca": 65.0, "asr": 99.9, "asr_base": 3.5}, {"ca": 65.5, "asr": 2.7, "asr_base": 3.5}, "repaired"),
    ({"ca": 65.0, "asr": 99.9, "asr_base": 3.5}, {"ca": 65.0, "asr": 77.0, "asr_base": 3.5}, "backdoor_remains"),
    ({"ca": 65.0, "asr": 99.9, "asr_base": 3.5}, {"ca": 55.0, "asr": 2.0, "asr_base": 3.5}, "ca_lost"),
    ({"ca": 65.0, "asr": 99.9, "asr_base": 3.5}, {"ca": 55.0, "asr": 90.0, "asr_base": 3.5}, "failed"),
    ({"ca": 65.0, "asr": 4.0, "asr_base": 3.5}, {"ca": 65.2, "asr": 3.0, "asr_base": 3.5}, "no_backdoor_effect"),
    ({"ca": 65.0, "asr": math.nan}, {"ca": 65.2, "asr": math.nan}, "unverified"),
])
def test_judge(before, after, status):
    assert judge(before, after, CFG, n_test=1500, n_bd=1350)[0] == status


def test_asr_limit_is_the_models_own_mistakes_plus_noise():
    assert asr_limit(3.5, 1350) == pytest.approx(3.5 + 2 + 2 * 100 * math.sqrt(0.035 * 0.965 / 1350))
    assert asr_limit(float("nan"), None) == 2.0


def _rows(asrs, cas):
    return [{"epoch": i, "ca": c, "asr": a, "ra": 0.0, "asr_base": 3.5, "n_test": 1500} for i, (a, c) in enumerate(zip(asrs, cas))]


def test_summary_agrees_with_itself_and_labels_the_checkpoint():
    rows = _rows([99.9, 50.0, 3.0, 2.5], [65.0, 66.0, 65.5, 65.6])
    done = {"final": {k: rows[3][k] for k in ("ca", "asr", "ra", "asr_base")}, "best_epoch": 1, "kept_epoch": 3,
            "epochs_run": 3, "restored": False, "stopped_early": False}
    s = repair_outcome(rows, done, RetrainConfig(epochs=3), clean_size=100, clean_oversampled=120, suspect_size=20)
    assert s["after"]["asr"] == 2.5 and s["kept_epoch"] == 3 and not s["stopped_early"]
    assert s["outcome"]["status"] == "repaired" and s["outcome"]["label"] == STATUSES["repaired"][1] == "Repaired model"
    assert "ASR 99.9 -> 2.5 %" in s["outcome"]["message"]


def test_a_failed_repair_says_so_and_suggests_something():
    rows = _rows([87.3, 80.0, 78.0, 77.2], [61.3, 61.0, 60.5, 60.1])
    done = {"final": {k: rows[3][k] for k in ("ca", "asr", "ra", "asr_base")}, "kept_epoch": 3, "epochs_run": 3}
    for verdict in (None, {"family": "clean-label"}):
        s = repair_outcome(rows, done, RetrainConfig(epochs=3, min_batches=300), 100, 120, 20, verdict=verdict)
        o = s["outcome"]
        assert o["status"] == "backdoor_remains" and not o["ok"]
        assert "repaired" not in o["label"].lower() and "backdoor still active" in o["label"]
        assert o["message"].startswith("Repair failed") and o["suggestions"]
    assert any("--alpha 0.1" in t for t in o["suggestions"]) and any("--stamp-gain 3" in t for t in o["suggestions"])
    # the paper's recipe has no clean-label repair: the suggestion is to turn the defaults' one on
    from cgd.config import apply_preset

    paper = apply_preset(RetrainConfig(epochs=3, min_batches=300), "paper")
    o = repair_outcome(rows, done, paper, 100, 120, 20, verdict={"family": "clean-label"})["outcome"]
    assert any("--stamp-clean-label 0.5 --subtract-trigger" in t for t in o["suggestions"])
    # a dirty-label verdict with one target: stamping the estimated trigger is suggested, unless it is on already
    dirty = {"family": "dirty-label", "targets": [2]}
    o = repair_outcome(rows, done, RetrainConfig(epochs=3, min_batches=300, stamp=0), 100, 120, 20, verdict=dirty)["outcome"]
    assert any("--stamp 0.5" in t for t in o["suggestions"])
    o = repair_outcome(rows, done, RetrainConfig(epochs=3, min_batches=300), 100, 120, 20, verdict=dirty)["outcome"]
    assert not any("--stamp 0.5" in t for t in o["suggestions"])  # on by default
    # an all-to-one verdict: training the other classes' suspects as clean is suggested where it is off
    one = {**dirty, "mode": "all-to-one"}
    o = repair_outcome(rows, done, paper, 100, 120, 20, verdict=one)["outcome"]
    assert any("--outside-targets clean" in t for t in o["suggestions"])
    assert not any("--outside-targets unlearn" in t for t in o["suggestions"])
    # where it is on (the default), going back to the paper's rule is suggested: the verdict may have read an
    # all-to-all attack as all-to-one
    o = repair_outcome(rows, done, RetrainConfig(epochs=3, min_batches=300), 100, 120, 20, verdict=one)["outcome"]
    assert any("--outside-targets unlearn" in t for t in o["suggestions"])
    assert any("--outside-targets agreed" in t for t in o["suggestions"])
    assert not any("--outside-targets clean" in t for t in o["suggestions"])
    # under "agreed", only the paper's rule is left to suggest
    o = repair_outcome(rows, done, RetrainConfig(epochs=3, min_batches=300, outside_targets="agreed"), 100, 120, 20,
                       verdict=one)["outcome"]
    assert any("--outside-targets unlearn" in t for t in o["suggestions"])
    assert not any("--outside-targets clean" in t or "--outside-targets agreed" in t for t in o["suggestions"])
    o = repair_outcome(rows, done, paper, 100, 120, 20, verdict={**one, "mode": "all-to-all"})["outcome"]
    assert not any("--outside-targets" in t for t in o["suggestions"])


def test_a_clean_accuracy_loss_suggests_holding_the_model_before_repair():
    rows = _rows([99.9, 3.0, 2.5], [65.0, 61.0, 60.5])
    done = {"final": {k: rows[2][k] for k in ("ca", "asr", "ra", "asr_base")}, "kept_epoch": 2, "epochs_run": 2}
    one = {"family": "dirty-label", "targets": [0], "mode": "all-to-one"}
    o = repair_outcome(rows, done, RetrainConfig(epochs=2, take_unused="none"), 100, 120, 20, verdict=one)["outcome"]
    assert o["status"] == "ca_lost"
    assert any("--keep 0.3" in t for t in o["suggestions"]) and any("--take-unused others" in t for t in o["suggestions"])
    o = repair_outcome(rows, done, RetrainConfig(epochs=2, keep=0.3), 100, 120, 20, verdict=one)["outcome"]
    assert not any("--keep 0.3" in t or "--take-unused" in t for t in o["suggestions"])  # both in use already
    assert not any("--split-target" in t for t in o["suggestions"])  # the default splits already
    o = repair_outcome(rows, done, RetrainConfig(epochs=2, split_target="none"), 100, 120, 20, verdict=one)["outcome"]
    assert any("--split-target leave" in t for t in o["suggestions"])
    o = repair_outcome(rows, done, RetrainConfig(epochs=2, split_target="none"), 100, 120, 20,
                       verdict={**one, "family": "clean-label"})["outcome"]
    assert not any("--split-target" in t for t in o["suggestions"])  # the split is for dirty-label poisons
