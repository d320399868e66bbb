"""The trigger estimate (cgd.trigger) and stamping during retraining."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from cgd.config import RetrainConfig
from cgd.separation import Subset
from cgd.trigger import estimate_trigger, plan_trigger_repair, stamp


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


def test_shrink_quiets_the_noise_of_an_estimate_from_few_suspects():
    """30 poisons (every target-class image of a small class, as GTSRB LC at 10,000 images): the mean
    difference carries tens of pixel units of sampling noise; shrinking by the standard error removes
    most of it and keeps most of the patch. From 1,500 poisons the standard error is below the floor and
    nothing changes."""
    x, y, poison = _patch_set(n=3000, rate=0.01, seed=3)
    assert 20 <= poison.sum() <= 45
    inside = np.zeros((32, 32), bool)
    inside[-4:-1, -4:-1] = True
    raw = estimate_trigger(x, y, poison, target=0)
    shrunk = estimate_trigger(x, y, poison, target=0, shrink=3.0)
    assert np.abs(raw[~inside]).mean() > 8  # uniform noise images: the SE of a mean of ~30 is ~14 per pixel
    assert np.abs(shrunk[~inside]).mean() < 0.5 * np.abs(raw[~inside]).mean()
    assert np.abs(shrunk[inside]).mean() > 0.6 * np.abs(raw[inside]).mean()
    x, y, poison = _patch_set(n=6000, rate=0.5, seed=4)
    many = poison & (np.arange(len(y)) % 2 == 0)
    np.testing.assert_array_equal(estimate_trigger(x, y, many, 0, shrink=3.0), estimate_trigger(x, y, many, 0))


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

    write_json(run.path("verdict.json"), {**verdict, "poisoned": True, "targets": [0], "family": "dirty-label"})
    said = notes(cfg.updated({"stamp": 0.5}))
    assert "stamping the estimated trigger (target 0)" in said
    key_stamped = run.stage_record("retrain")["key"]
    # the target split reads the model's features of the target-labelled samples (applied or skipped, it says so)
    write_json(run.path("verdict.json"), {**verdict, "poisoned": True, "targets": [0], "family": "dirty-label",
                                          "mode": "all-to-one"})
    assert "target split" in notes(cfg.updated({"stamp": 0.5, "split_target": "leave"}))
    # the same settings under a verdict that now says clean-label: the retraining is redone, not reused
    write_json(run.path("verdict.json"), {**verdict, "poisoned": True, "targets": [0], "family": "clean-label"})
    assert "trained as clean with the estimated trigger subtracted" in notes(cfg.updated({"stamp": 0.5}))
    assert run.stage_record("retrain")["key"] != key_stamped
    write_json(run.path("verdict.json"), {**verdict, "poisoned": False, "targets": []})
    assert "trigger estimate skipped" in notes(cfg.updated({"stamp": 0.3}))
    assert run.stage_record("retrain")["key"] != key_stamped
    assert run.repaired_path.is_file() and run.read_run()["summary"]["outcome"]["status"]


def _verdict(family, targets=(0,), poisoned=True, mode=None):
    mode = mode or ("all-to-one" if poisoned and targets else "none")
    return {"poisoned": poisoned, "targets": list(targets), "family": family, "mode": mode}


def test_plan_on_a_clean_label_verdict_subtracts_and_stamps():
    """Clean-label: every sample labelled with the target becomes clean (its label is right) with the
    trigger subtracted, and the clean-label share is stamped; the suspects of other classes stay suspects
    under the paper's rule (outside_targets "unlearn") and are trained as clean by default."""
    x, y, poison = _patch_set()
    sub = np.where(poison, Subset.SUSPECT, Subset.CLEAN).astype(np.int8)
    other_suspect = np.flatnonzero((y != 0) & ~poison)[:30]
    sub[other_suspect] = Subset.SUSPECT
    plan = plan_trigger_repair(x, y, sub, _verdict("clean-label"), RetrainConfig(outside_targets="unlearn"))
    assert plan.target == 0 and plan.trigger is not None and plan.config.stamp == RetrainConfig().stamp_clean_label > 0
    assert (plan.unstamp == (y == 0)).all()
    assert (plan.subsets[y == 0] == Subset.CLEAN).all() and (plan.subsets[other_suspect] == Subset.SUSPECT).all()
    assert (plan_trigger_repair(x, y, sub, _verdict("clean-label"), RetrainConfig()).subsets == Subset.CLEAN).all()
    assert (sub[poison] == Subset.SUSPECT).all()  # the caller's array is left as it was
    assert any("trained as clean" in n for n in plan.notes)


def test_plan_on_a_dirty_label_verdict_stamps_and_subtracts_nothing():
    """Dirty-label: the default stamps the estimated trigger on half of the other classes' clean samples;
    nothing is subtracted and no subset changes (the poisons' labels are wrong, they stay suspects)."""
    x, y, poison = _patch_set()
    sub = np.where(poison, Subset.SUSPECT, Subset.CLEAN).astype(np.int8)
    plan = plan_trigger_repair(x, y, sub, _verdict("dirty-label"), RetrainConfig())
    assert plan.trigger is not None and plan.target == 0 and plan.config.stamp == RetrainConfig().stamp == 0.5
    assert plan.unstamp is None and (plan.subsets == sub).all()
    plan = plan_trigger_repair(x, y, sub, _verdict("dirty-label"), RetrainConfig(stamp=0))
    assert plan.trigger is None and plan.unstamp is None and plan.config.stamp == 0 and (plan.subsets == sub).all()
    plan = plan_trigger_repair(x, y, sub, _verdict("dirty-label"), RetrainConfig(stamp=0.3))
    assert plan.trigger is not None and plan.config.stamp == 0.3 and plan.unstamp is None
    # the paper preset: no stamping, no subtraction, whatever the family
    from cgd.config import apply_preset

    paper = apply_preset(RetrainConfig(), "paper")
    plan = plan_trigger_repair(x, y, sub, _verdict("clean-label"), paper)
    assert plan.trigger is None and plan.unstamp is None and (plan.subsets == sub).all()


def test_plan_on_a_dirty_label_verdict_leaves_out_disputed_target_samples():
    """Dirty-label: clean-subset samples labelled with the target that the reference puts in another
    class (poisons that slipped through, and target images the reference gets wrong) are left out;
    nothing else moves, and nothing moves without a dirty-label verdict, a reference or under the paper."""
    x, y, poison = _patch_set()
    rng = np.random.default_rng(2)
    sub = np.where(poison, Subset.SUSPECT, Subset.CLEAN).astype(np.int8)
    slipped = np.flatnonzero(poison)[:20]
    sub[slipped] = Subset.CLEAN  # poisons the rank rule let into the clean subset
    orig = np.where(poison, rng.integers(1, 10, len(y)), y)
    ref_pred = orig.copy()  # the reference sees the true class ...
    wrong = np.flatnonzero((y == 0) & ~poison)[:15]
    ref_pred[wrong] = 3  # ... and gets some target images wrong
    plan = plan_trigger_repair(x, y, sub, _verdict("dirty-label"), RetrainConfig(), ref_pred)
    moved = (sub != plan.subsets)
    assert set(np.flatnonzero(moved)) == set(slipped) | set(wrong)
    assert (plan.subsets[moved] == Subset.UNUSED).all()
    assert any("35 clean-subset samples labelled 0" in n for n in plan.notes)
    assert ((sub == Subset.CLEAN) & poison).sum() == 20  # the caller's array is left as it was
    from cgd.config import apply_preset

    for v, cfg, rp in ((_verdict("clean-label"), RetrainConfig(subtract_trigger=False, stamp_clean_label=0), ref_pred),
                       (_verdict("dirty-label", poisoned=False), RetrainConfig(), ref_pred),
                       (_verdict("dirty-label"), RetrainConfig(), None),
                       (_verdict("dirty-label"), apply_preset(RetrainConfig(), "paper"), ref_pred)):
        assert (plan_trigger_repair(x, y, sub, v, cfg, rp).subsets == sub).all()


def test_plan_spares_suspects_outside_the_named_targets():
    """outside_targets: suspects labelled with no target class (clean samples, under an all-to-one
    verdict) get the distillation term only ("distill") or are trained as clean ("clean"); the
    target-labelled suspects are unlearnt as before; nothing changes under "unlearn" (the paper), on a
    set judged clean or under an all-to-all verdict."""
    x, y, poison = _patch_set()
    sub = np.where(poison, Subset.SUSPECT, Subset.CLEAN).astype(np.int8)
    hard = np.flatnonzero((y != 0) & ~poison)[:40]
    sub[hard] = Subset.SUSPECT  # clean samples of other classes that the rank rule flagged
    for family in ("dirty-label", "clean-label"):
        plan = plan_trigger_repair(x, y, sub, _verdict(family), RetrainConfig(outside_targets="distill", stamp=0,
                                                                                 stamp_clean_label=0,
                                                                                 subtract_trigger=False))
        assert (plan.subsets == sub).all()
        assert not plan.unlearn[hard].any() and plan.unlearn[poison].all()
        assert any("40 suspect samples labelled other than 0" in n for n in plan.notes)
    plan = plan_trigger_repair(x, y, sub, _verdict("dirty-label"), RetrainConfig(outside_targets="clean"))
    assert (plan.subsets[hard] == Subset.CLEAN).all() and (plan.subsets[poison] == Subset.SUSPECT).all()
    assert plan.unlearn is None and (sub[hard] == Subset.SUSPECT).all()  # the caller's array is left as it was
    # "agreed": the ones the reference assigns to another class are left out, not trained as clean
    ref_pred = y.copy()
    ref_pred[hard[:15]] = (y[hard[:15]] + 1) % 10
    plan = plan_trigger_repair(x, y, sub, _verdict("dirty-label"), RetrainConfig(outside_targets="agreed"), ref_pred)
    assert (plan.subsets[hard[:15]] == Subset.UNUSED).all() and (plan.subsets[hard[15:]] == Subset.CLEAN).all()
    assert (plan.subsets[poison] == Subset.SUSPECT).all() and plan.unlearn is None
    assert any("15 it assigns elsewhere are left out" in n for n in plan.notes)
    plan = plan_trigger_repair(x, y, sub, _verdict("dirty-label"), RetrainConfig(outside_targets="agreed"))
    assert (plan.subsets[hard] == Subset.CLEAN).all()  # no reference predictions: as "clean"
    plan = plan_trigger_repair(x, y, sub, _verdict("clean-label"), RetrainConfig(outside_targets="agreed"), ref_pred)
    assert (plan.subsets[hard] == Subset.CLEAN).all()  # clean-label: every label is right, as "clean"
    for v, cfg in ((_verdict("dirty-label"), RetrainConfig(outside_targets="unlearn")),
                   (_verdict("dirty-label", poisoned=False), RetrainConfig(outside_targets="clean")),
                   (_verdict("dirty-label", poisoned=False), RetrainConfig(outside_targets="agreed")),
                   (_verdict("dirty-label", targets=(), mode="all-to-all"), RetrainConfig(outside_targets="clean"))):
        plan = plan_trigger_repair(x, y, sub, v, cfg)
        assert plan.unlearn is None and (plan.subsets == sub).all()


def test_unlearn_mask_limits_the_unlearning_term():
    """guided_losses: a suspect outside ``unlearn_mask`` adds to the distillation term only."""
    import torch

    from cgd.retrain import guided_losses

    g = torch.Generator().manual_seed(0)
    student, ref = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    susp = torch.tensor([False, False, True, True, True, True, False, False])
    full = guided_losses(student, ref, y, susp, unlearn_floor=0.0)
    mask = torch.tensor([True] * 4 + [False] * 4)  # suspects 2, 3 unlearnt; 4, 5 distilled only
    part = guided_losses(student, ref, y, susp, unlearn_floor=0.0, unlearn_mask=mask)
    logp = torch.log_softmax(student, 1).gather(1, y[:, None]).squeeze(1)
    assert torch.allclose(full["unlearn"], logp[2:6].mean()) and torch.allclose(part["unlearn"], logp[2:4].mean())
    assert torch.allclose(full["kl"], part["kl"]) and torch.allclose(full["ce"], part["ce"])


def test_plan_without_one_named_target_says_why():
    x, y, poison = _patch_set()
    sub = np.where(poison, Subset.SUSPECT, Subset.CLEAN).astype(np.int8)
    for v in (_verdict("clean-label", poisoned=False), _verdict("clean-label", targets=(0, 1)), None):
        plan = plan_trigger_repair(x, y, sub, v, RetrainConfig(stamp=0.5))
        assert plan.trigger is None and plan.unstamp is None and plan.config.stamp == 0
    assert "no single target" in " ".join(plan_trigger_repair(x, y, sub, _verdict("clean-label", targets=()),
                                                              RetrainConfig()).notes)


def _seen_model(k: int):
    """A real linear classifier over 8x8 RGB images with ``k`` classes that also keeps the batches it was given."""
    import torch

    class Seen(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 8 * 8, k)
            self.seen = []

        def forward(self, x):
            self.seen.append(x.detach().float().clone())
            return self.fc(x.flatten(1))

    return Seen()


def test_retraining_sees_the_subtracted_and_stamped_images():
    """guided_retrain takes the trigger off the ``unstamp`` samples (before augmentation, in pixel units)
    and stamps it, scaled by [1, stamp_gain], on the given share of clean samples of other classes."""
    from cgd.retrain import guided_retrain

    n = 60
    y = np.arange(n) % 3
    grey = np.array([128, 200, 30])  # one grey level per class, so a seen image tells its class
    x = np.broadcast_to(grey[y][:, None, None, None], (n, 8, 8, 3)).astype(np.uint8).copy()
    delta = np.full((8, 8, 3), 20.0, np.float32)
    m = _seen_model(3)
    cfg = RetrainConfig(epochs=1, min_batches=0, max_batches=4, batch_size=n, augment=False, precision="fp32",
                        channels_last=False, stamp=0.5, stamp_gain=2.0, log_every=0)
    ev = guided_retrain(m, x, y, np.arange(n), np.zeros(0, np.int64), np.zeros((n, 3), np.float32),
                        lambda _: {"ca": 50.0, "asr": 0.0, "ra": 0.0}, cfg, "cpu", trigger=delta, target=0,
                        unstamp=(y == 0))
    list(ev)
    px = np.concatenate([b.mean(dim=(1, 2, 3)).numpy() for b in m.seen]) * 255  # each image is one grey level
    near = lambda v: np.abs(px - v) < 0.01  # noqa: E731
    assert near(108).sum() == n // 3 and not near(128).any()  # the target class: 128 - 20, never unsubtracted
    for g in (200, 30):  # other classes: plain, or + 20 x a gain in [1, 2]
        stamped = px[(px > g + 19.99) & (px < g + 40.01)]
        assert near(g).sum() + len(stamped) == n // 3
        assert 0 < len(stamped) < n // 3 and stamped.max() > g + 22


def test_clean_label_gain_range_reaches_half_the_stamps_under_a_clean_label_verdict_only():
    """stamp_gain_clean_label: under a clean-label verdict the plan keeps it (half of the stamps get that
    range); under a dirty-label verdict it is set to stamp_gain, so every stamp gets [1, stamp_gain]."""
    x, y, poison = _patch_set()
    sub = np.where(poison, Subset.SUSPECT, Subset.CLEAN).astype(np.int8)
    cfg = RetrainConfig(stamp_gain=1.0, stamp_gain_clean_label=3.0)
    plan = plan_trigger_repair(x, y, sub, _verdict("clean-label"), cfg)
    assert plan.config.stamp_gain == 1.0 and plan.config.stamp_gain_clean_label == 3.0
    assert any("half of them scaled x1-3 and half unscaled" in n for n in plan.notes)
    plan = plan_trigger_repair(x, y, sub, _verdict("dirty-label"), cfg)
    assert plan.config.stamp_gain == plan.config.stamp_gain_clean_label == 1.0
    assert not any("scaled" in n for n in plan.notes)


def test_retraining_scales_half_the_stamps_by_the_clean_label_range():
    """With stamp_gain 1 and stamp_gain_clean_label 3, about half of the stamped images get the trigger
    exactly once (+20) and the rest + 20 x a gain in [1, 3] (up to +60)."""
    from cgd.retrain import guided_retrain

    n = 400
    y = np.arange(n) % 2
    x = np.where(y[:, None, None, None] == 0, 30, 100).astype(np.uint8) * np.ones((n, 8, 8, 3), np.uint8)
    m = _seen_model(2)
    cfg = RetrainConfig(epochs=1, min_batches=0, max_batches=1, batch_size=n, augment=False, precision="fp32",
                        channels_last=False, stamp=1.0, stamp_gain=1.0, stamp_gain_clean_label=3.0, log_every=0)
    list(guided_retrain(m, x, y, np.arange(n), np.zeros(0, np.int64), np.zeros((n, 2), np.float32),
                        lambda _: {"ca": 50.0, "asr": 0.0, "ra": 0.0}, cfg, "cpu",
                        trigger=np.full((8, 8, 3), 20.0, np.float32), target=0))
    px = m.seen[0].mean(dim=(1, 2, 3)).numpy() * 255
    other = px[px > 99]  # class 1 (grey 100), every one stamped
    assert len(other) == n // 2
    once = np.abs(other - 120) < 0.01
    assert 0.3 < once.mean() < 0.7  # about half exactly once ...
    rest = other[~once]
    assert rest.min() > 120 and rest.max() <= 160.01 and rest.max() > 140  # ... the rest scaled by up to 3


def test_plan_on_an_all_to_all_verdict_leaves_out_disputed_samples_of_every_class():
    """All-to-all: relabelled samples sit under every label, so every class counts as a target; the
    clean-subset samples the reference assigns to another class are left out, nothing is stamped."""
    x, y, _ = _patch_set()
    sub = np.full(len(y), Subset.CLEAN, np.int8)
    ref_pred = y.copy()
    disputed = np.flatnonzero(np.isin(y, [2, 5, 7]))[::4]
    ref_pred[disputed] = (y[disputed] + 1) % 10
    v = _verdict("dirty-label", targets=(), mode="all-to-all")
    plan = plan_trigger_repair(x, y, sub, v, RetrainConfig(), ref_pred)
    assert set(np.flatnonzero(plan.subsets == Subset.UNUSED)) == set(disputed)
    assert plan.trigger is None and any(f"all-to-all, {len(disputed)} clean-subset samples" in n for n in plan.notes)
    assert (plan_trigger_repair(x, y, sub, v, RetrainConfig(drop_disputed=False), ref_pred).subsets == sub).all()


def test_unlearn_budget_keeps_the_most_suspicious_target_suspects():
    """unlearn_budget: under a dirty-label all-to-one verdict at most budget x the estimated poison count of the
    target-labelled suspects stay suspects, the most suspicious first; the rest are left out, never trained as clean."""
    x, y, poison = _patch_set()
    sub = np.where(poison, Subset.SUSPECT, Subset.CLEAN).astype(np.int8)
    extra = np.flatnonzero((y == 0) & ~poison)[:30]
    sub[extra] = Subset.SUSPECT  # clean target-class samples the rank rule flagged
    suspicion = np.where(poison, 2.0, 0.0) + np.linspace(0, 1, len(y))  # poisons rank above the clean ones
    n_p = int(poison.sum())
    v = {**_verdict("dirty-label"), "estimated_poisons": n_p}
    cfg = RetrainConfig(unlearn_budget=1.0, stamp=0, outside_targets="unlearn")
    plan = plan_trigger_repair(x, y, sub, v, cfg, suspicion=suspicion)
    assert (plan.subsets[poison] == Subset.SUSPECT).all() and (plan.subsets[extra] == Subset.UNUSED).all()
    assert any(f"{n_p + 30} suspect samples labelled 0" in n and "30 left out" in n for n in plan.notes)
    plan = plan_trigger_repair(x, y, sub, {**v, "estimated_poisons": n_p - 5}, cfg, suspicion=suspicion)
    assert (plan.subsets == Subset.SUSPECT).sum() == int(np.ceil(n_p - 5)) and (plan.subsets[extra] == Subset.UNUSED).all()
    # within budget, or no suspicion, a clean-label verdict, no estimate or budget 0: nothing moves
    for vv, cc, s in (({**v, "estimated_poisons": n_p + 30}, cfg, suspicion), (v, cfg, None),
                      ({**v, "family": "clean-label"}, replace(cfg, subtract_trigger=False, stamp_clean_label=0), suspicion),
                      ({**v, "estimated_poisons": None}, cfg, suspicion), (v, replace(cfg, unlearn_budget=0.0), suspicion)):
        assert (plan_trigger_repair(x, y, sub, vv, cc, suspicion=s).subsets == sub).all()


def test_take_unused_trains_samples_of_other_classes_as_clean():
    """take_unused: under an all-to-one verdict the samples the thresholds left unused and labelled with another class
    are trained as clean ("others"); "agreed" adds the target-labelled ones the reference assigns to the target."""
    x, y, poison = _patch_set()
    sub = np.where(poison, Subset.SUSPECT, Subset.CLEAN).astype(np.int8)
    others = np.flatnonzero((y != 0) & ~poison)[:25]
    own = np.flatnonzero((y == 0) & ~poison)[:10]
    sub[others] = Subset.UNUSED
    sub[own] = Subset.UNUSED
    ref_pred = y.copy()
    ref_pred[own[:4]] = 1  # the reference disputes four of the target-labelled ones
    base = RetrainConfig(stamp=0, drop_disputed=False)
    plan = plan_trigger_repair(x, y, sub, _verdict("dirty-label"), replace(base, take_unused="others"), ref_pred)
    assert (plan.subsets[others] == Subset.CLEAN).all() and (plan.subsets[own] == Subset.UNUSED).all()
    assert any("25 samples left unused" in n for n in plan.notes)
    plan = plan_trigger_repair(x, y, sub, _verdict("dirty-label"), replace(base, take_unused="agreed"), ref_pred)
    assert (plan.subsets[others] == Subset.CLEAN).all() and (plan.subsets[own[4:]] == Subset.CLEAN).all()
    assert (plan.subsets[own[:4]] == Subset.UNUSED).all() and (plan.subsets[poison] == Subset.SUSPECT).all()
    # a sample drop_disputed left out is not taken back
    disputed = np.flatnonzero((y == 0) & ~poison & (sub == Subset.CLEAN))[:5]
    ref2 = ref_pred.copy()
    ref2[disputed] = 2
    plan = plan_trigger_repair(x, y, sub, _verdict("dirty-label"), replace(base, take_unused="agreed", drop_disputed=True), ref2)
    assert (plan.subsets[disputed] == Subset.UNUSED).all()
    for v, cfg in ((_verdict("dirty-label", poisoned=False), replace(base, take_unused="others")),
                   (_verdict("dirty-label", targets=(), mode="all-to-all"), replace(base, take_unused="others")),
                   (_verdict("dirty-label"), replace(base, take_unused="none"))):
        assert (plan_trigger_repair(x, y, sub, v, cfg, ref_pred).subsets == sub).all()
