"""The built-in demo, end to end with every default, the way the dashboard runs it: a run created
with the demo's settings, a scoring job (the demo's reference classifier trained first), a
retraining job. The promise the demo makes to a new user is asserted here, so no later change of a
default can break it silently:

* the model to repair is worth repairing: CA >= 60 %, ASR >= 90 %;
* after repair the backdoor is gone: ASR <= 5 %, and CA is not lower than before by more than 2 points
  (3 for the low-rate Trojan at target 9);
* the verdict names the target class, and the outcome is reported as a repair (the low-rate Trojan
  may instead be judged "clean accuracy lost", which the pages say plainly).

The wall time from the first job's start to the end of retraining is printed (the issue's budget is
6 minutes on a 2-core CPU); it is not asserted, because CI machines differ.
"""
from __future__ import annotations

import time

import pytest

from cgd import demo, jobs
from cgd.runs import RunDir

pytestmark = pytest.mark.slow


def test_the_demo_removes_the_backdoor_with_every_default(tmp_path, monkeypatch, capsys):
    if not demo.available():
        pytest.skip("the demo sample assets/demo/cifar10 is absent (python scripts/make_demo.py)")
    monkeypatch.setenv("CGD_CACHE", str(tmp_path / "cache"))  # the demo reference is trained, as on a first visit
    run = tmp_path / "runs" / "demo-badnets"
    jobs.write_config(run, {**demo.run_settings(), "subset": None, "seed": 0})
    t0 = time.time()
    jobs.start_job(run, "separate", label="scoring", pre=[demo.reference_command()])
    s = jobs.wait_job(run, 1800, poll_s=2.0)
    assert s.state == "done", (s.state, s.error, jobs.tail_log(run, 40))
    t_score = time.time() - t0
    jobs.start_job(run, "retrain", label="retraining")
    s = jobs.wait_job(run, 1800, poll_s=2.0)
    assert s.state == "done", (s.state, s.error, jobs.tail_log(run, 40))
    elapsed = time.time() - t0
    info = RunDir(run).read_run()
    summary, verdict = info["summary"], info["verdict"]
    before, after = summary["before"], summary["after"]
    with capsys.disabled():
        print(f"\ndemo flow: {elapsed:.0f} s ({t_score:.0f} s scoring incl. the reference classifier, "
              f"{elapsed - t_score:.0f} s repair); stages "
              + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in info["stages"].items())
              + f"; CA {before['ca']:.1f} -> {after['ca']:.1f}, ASR {before['asr']:.1f} -> {after['asr']:.1f}")
    assert before["ca"] >= 60.0 and before["asr"] >= 90.0, before
    assert after["asr"] <= 5.0, (before, after)
    assert before["ca"] - after["ca"] <= 2.0, (before, after)
    assert summary["outcome"]["status"] == "repaired" and summary["outcome"]["label"] == "Repaired model"
    assert verdict["poisoned"] and verdict["targets"] == [0] and verdict["family"] == "dirty-label"


def test_the_verdict_raises_no_alarm_on_the_never_poisoned_demo_sample(tmp_path, monkeypatch):
    """The same real CIFAR-10 sample, models and reference without any attack: the rank rule still
    flags its tails, but the verdict must say no poisoning was found (the other half of the promise
    the BadNets test above checks: there the verdict names target 0)."""
    if not demo.available():
        pytest.skip("the demo sample assets/demo/cifar10 is absent")
    from cgd.pipeline import run_pipeline

    monkeypatch.setenv("CGD_CACHE", str(tmp_path / "cache"))
    import subprocess

    subprocess.run(demo.reference_command(), check=True)
    cfg = demo.run_config(str(tmp_path / "clean"), attack={})
    info = run_pipeline(cfg, stages=("data", "reference", "suspicious", "separate"), progress_bars=False)
    v = info["verdict"]
    assert not v["poisoned"], v["summary"]
    assert v["score"] < v["threshold"] / 2, v  # clean sets score ~1: far from the alarm, not just under it
    assert RunDir(cfg.out).read_separation()["suspect"] > 0  # the tails are still there, named as such


def _whole_demo_run(tmp_path, monkeypatch, capsys, name: str, attack: dict) -> tuple[dict, dict, dict, dict]:
    """The demo poisoned with ``attack``, every stage with every default (the demo reference trained
    first, as on a first visit); prints one line with the figures. Returns (summary, verdict, before, after)."""
    if not demo.available():
        pytest.skip("the demo sample assets/demo/cifar10 is absent")
    import subprocess

    from cgd.pipeline import run_pipeline

    monkeypatch.setenv("CGD_CACHE", str(tmp_path / "cache"))
    subprocess.run(demo.reference_command(), check=True)
    cfg = demo.run_config(str(tmp_path / name), attack=attack)
    t0 = time.time()
    info = run_pipeline(cfg, progress_bars=False)
    summary, verdict = info["summary"], info["verdict"]
    before, after = summary["before"], summary["after"]
    with capsys.disabled():
        print(f"\ndemo {name}: {time.time() - t0:.0f} s; verdict {verdict['family']} {verdict['targets']} (score "
              f"{verdict['score']:.1f}); CA {before['ca']:.1f} -> {after['ca']:.1f}, ASR {before['asr']:.1f} -> "
              f"{after['asr']:.1f}")
    return summary, verdict, before, after


def test_the_demo_repairs_a_clean_label_attack_with_every_default(tmp_path, monkeypatch, capsys):
    """SIG, the clean-label teaching attack: every target-class training image carries the sinusoid and
    keeps its right label. With the defaults the verdict must say clean-label and name the target,
    and retraining (target class trained with the estimated trigger subtracted, the trigger stamped
    on other classes) must remove the backdoor without costing clean accuracy. Measured by this test:
    CA 61.3 -> 63.3, ASR 87.3 -> 1.8 (the paper's recipe: 77.2 %, a model never poisoned: 0.6 %)."""
    summary, verdict, before, after = _whole_demo_run(tmp_path, monkeypatch, capsys, "sig",
                                                      {"attack": "sig", "poison_rate": 0.1, "target": 0})
    assert verdict["poisoned"] and verdict["targets"] == [0] and verdict["family"] == "clean-label", verdict
    assert before["asr"] >= 70.0, before
    assert after["asr"] <= 5.0 and before["ca"] - after["ca"] <= 1.5, (before, after)
    assert summary["outcome"]["status"] == "repaired", summary["outcome"]


def test_the_demo_repairs_a_low_rate_attack_on_another_target_with_every_default(tmp_path, monkeypatch, capsys):
    """Trojan at 3 % with target 9: neither the rate nor the target is the teaching attack's. With the
    defaults the verdict must name target 9 (dirty-label) and the backdoor must go. Measured (retraining
    only, bench/README.md): the paper's unlearning of every suspect left 81.7 % ASR; the defaults
    (the other classes' suspects trained as clean, the estimated trigger stamped) CA 66.5 -> 64.2, ASR
    99.9 -> 0.7; this test's whole run: CA 66.1 -> 63.9, ASR 99.9 -> 0.5. On the demo's weak reference the target class loses accuracy (its clean images that
    the reference gets wrong are left out), hence a 3-point CA allowance here."""
    summary, verdict, before, after = _whole_demo_run(tmp_path, monkeypatch, capsys, "trojan-3pc-t9",
                                                      {"attack": "trojan", "poison_rate": 0.03, "target": 9})
    assert verdict["poisoned"] and verdict["targets"] == [9] and verdict["family"] == "dirty-label", verdict
    assert before["asr"] >= 90.0, before
    assert after["asr"] <= 5.0 and before["ca"] - after["ca"] <= 3.0, (before, after)
    assert summary["outcome"]["status"] in ("repaired", "ca_lost"), summary["outcome"]
