"""The trigger estimate (cgd.trigger) and stamping during retraining."""
from __future__ import annotations


import numpy as np

from cgd.trigger import estimate_trigger, stamp


def _patch_set(n=2000, rate=0.1, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, n)
    poison = rng.random(n) < rate
    x[poison, -4:-1, -4:-1] = 255
    y[poison] = 0
    return x, y, poison


def test_estimate_finds_a_patch():
    x, y, poison = _patch_set()
    # a separation with some mistakes: 10 % of the poisons missed, 50 clean samples flagged
    rng = np.random.default_rng(1)
    suspect = poison & (rng.random(len(y)) > 0.1)
    suspect[rng.choice(np.flatnonzero(~poison), 50, replace=False)] = True
    delta = estimate_trigger(x, y, suspect, target=0)
    assert delta is not None and delta.shape == (32, 32, 3)
    inside = np.zeros((32, 32), bool)
    inside[-4:-1, -4:-1] = True
    mag = np.abs(delta).mean(-1)
    assert mag[inside].min() > 4 * mag[~inside].mean()  # the patch stands out of the content's noise
    stamped = stamp(x[:5], delta)
    assert stamped.dtype == np.uint8 and (stamped[:, -3, -3] >= x[:5, -3, -3]).all()
    assert stamped[:, -3, -3].mean() > x[:5, -3, -3].mean() + 20


def test_too_few_suspects_gives_none():
    x, y, poison = _patch_set(n=300, rate=0.01)
    assert estimate_trigger(x, y, np.zeros(len(y), bool), target=0) is None


def test_pipeline_stamps_when_the_verdict_names_a_target(cifar_root, tmp_path, tiny_clip):
    """With --stamp the retrain stage estimates the trigger for the verdict's single target and says so;
    without a named target it says why it does not stamp. (Whether stamping helps is measured in
    bench/README.md, not asserted here.)"""
    from cgd.config import RunConfig
    from cgd.pipeline import run_pipeline
    from cgd.runs import RunDir, write_json
    from cgd.separation import Subset

    cfg = RunConfig.from_flat(data=f"imagefolder:{cifar_root}", subset=400, attack="badnets", poison_rate=0.1, target=0,
                              reference=f"clip:{tiny_clip}", pretrained="none", arch="small-cnn", train_epochs=1,
                              suspicious_runs=1, suspicious_epochs=1, epochs=1, max_batches=2, min_batches=0,
                              device="cpu", precision="fp32", out=str(tmp_path / "run"))
    run_pipeline(cfg, stages=("data", "reference", "suspicious", "separate"), progress_bars=False)
    run = RunDir(cfg.out)
    # a random-weight CLIP separates little: move the poisons into the suspect subset by hand (the analyst's way)
    poison = np.flatnonzero(run.load_array("data/poison_mask.npy"))
    run.save_overrides({int(i): int(Subset.SUSPECT) for i in poison})
    run_pipeline(cfg, stages=("separate",), progress_bars=False)
    verdict = run.read_verdict()
    assert verdict is not None

    def notes(c):
        got = []
        run_pipeline(c, stages=("retrain",), on_event=lambda e: got.append(e.get("message", "")) if e.get("kind") == "note" else None,
                     progress_bars=False)
        return " ".join(got)

    write_json(run.path("verdict.json"), {**verdict, "poisoned": True, "targets": [0]})
    said = notes(cfg.updated({"stamp": 0.5}))
    assert "stamping the estimated trigger (target 0)" in said
    key_stamped = run.stage_record("retrain")["key"]
    write_json(run.path("verdict.json"), {**verdict, "poisoned": False, "targets": []})
    assert "stamping skipped" in notes(cfg.updated({"stamp": 0.3}))
    assert run.stage_record("retrain")["key"] != key_stamped
    assert run.repaired_path.is_file() and run.read_run()["summary"]["outcome"]["status"]
