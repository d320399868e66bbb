"""The target class split by the suspicious model's features (cgd.target_split) and its use in the trigger plan."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cgd.config import RetrainConfig
from cgd.separation import Subset
from cgd.target_split import (
    MIN_GAP,
    MIN_SAMPLES,
    MIN_SILHOUETTE,
    silhouette,
    split_target,
    two_means,
)
from cgd.trigger import plan_trigger_repair


def _blobs(n_a=300, n_b=150, d=64, sep=3.0, seed=0):
    """Two Gaussian groups in d dimensions: (n_a + n_b, d) features and (n,) bool, True for group b."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=d)
    centre *= sep / np.linalg.norm(centre)
    f = rng.normal(size=(n_a + n_b, d)) * 0.5
    b = np.zeros(n_a + n_b, bool)
    b[n_a:] = True
    f[b] += centre
    perm = rng.permutation(len(f))
    return f[perm].astype(np.float32), b[perm]


def test_two_means_recovers_two_groups_and_is_seeded():
    f, b = _blobs()
    lab = two_means(f, seed=3)
    agree = max(np.mean(lab == b), np.mean(lab != b))
    assert agree > 0.98
    assert (two_means(f, seed=3) == lab).all()


def test_split_names_the_more_suspicious_group():
    f, b = _blobs()
    rng = np.random.default_rng(1)
    suspicion = np.where(b, 0.6, 0.1) + rng.normal(0, 0.1, len(b))
    got = split_target(f, suspicion)
    assert got is not None and np.mean(got == b) > 0.98
    # the same groups with the suspicion the other way round: the other group is named
    assert np.mean(split_target(f, -suspicion) == ~b) > 0.98


def test_split_is_not_trusted_when_the_groups_are_equally_suspicious():
    f, b = _blobs()
    rng = np.random.default_rng(2)
    suspicion = rng.uniform(0, 0.5, len(b)) + np.where(b, MIN_GAP / 4, 0.0)
    assert split_target(f, suspicion) is None
    assert split_target(f[:MIN_SAMPLES - 1], suspicion[:MIN_SAMPLES - 1]) is None
    with pytest.raises(ValueError, match="same M"):
        split_target(f, suspicion[:-1])


def test_silhouette_by_hand_and_overlapping_groups_are_not_split():
    # four points on a line, two pairs: a = 1 within a pair, b = mean distance to the other pair
    z = np.array([[0.0], [1.0], [10.0], [11.0]])
    lab = np.array([0, 0, 1, 1])
    b = np.array([10.5, 9.5, 9.5, 10.5])
    assert silhouette(z, lab) == pytest.approx(np.mean((b - 1) / b))
    assert silhouette(z, np.array([0, 1, 0, 1])) < 0  # a labelling across the pairs
    f, b_mask = _blobs(sep=0.8)  # groups closer than their spread: any two-means cut is poor
    lab = two_means(f)
    assert silhouette(f, lab) < MIN_SILHOUETTE
    assert split_target(f, np.where(b_mask, 0.9, 0.0)) is None  # not trusted, however suspicious one group is


def _plan_set(seed=0):
    """A dirty-label all-to-one set with target 0: features that separate poisons from clean target images,
    and subsets as a weak reference leaves them (clean target images among the suspects, a poison in the clean subset,
    clean target images unused or dropped as disputed)."""
    rng = np.random.default_rng(seed)
    n = 1000
    y = rng.integers(1, 10, n)
    y[:200] = 0  # clean target-class images
    poison = np.zeros(n, bool)
    poison[200:300] = True
    y[poison] = 0
    at = np.flatnonzero(y == 0)
    centre = rng.normal(size=64)
    centre *= 3.0 / np.linalg.norm(centre)
    feats = rng.normal(size=(len(at), 64)).astype(np.float32) * 0.5
    feats[poison[at]] += centre  # (300, 64): the poisons form their own group
    suspicion = np.zeros(n)
    suspicion[poison] = 0.7
    suspicion[:200] = rng.uniform(-0.2, 0.4, 200)
    sub = np.full(n, Subset.CLEAN, np.int8)
    sub[poison] = Subset.SUSPECT
    sub[299] = Subset.CLEAN  # a poison that slipped into the clean subset
    sub[:60] = Subset.SUSPECT  # clean target images the rank rule flagged
    sub[60:90] = Subset.UNUSED  # and some it left between the thresholds
    ref_pred = y.copy()
    ref_pred[poison] = rng.integers(1, 10, poison.sum())
    ref_pred[90:130] = 5  # clean target images the weak reference gets wrong: dropped as disputed
    verdict = {"poisoned": True, "targets": [0], "family": "dirty-label", "mode": "all-to-one"}
    return y, poison, sub, ref_pred, suspicion, feats, verdict


@pytest.mark.parametrize("mode", ["leave", "train"])
def test_plan_split_spares_the_clean_target_images(mode):
    y, _poison, sub, ref_pred, suspicion, feats, verdict = _plan_set()
    x = np.zeros((len(y), 8, 8, 3), np.uint8)
    cfg = RetrainConfig(stamp=0, split_target=mode)
    base = plan_trigger_repair(x, y, sub, verdict, replace(cfg, split_target="none"), ref_pred, suspicion, feats)
    assert (base.subsets[:60] == Subset.SUSPECT).all() and (base.subsets[90:130] == Subset.UNUSED).all()
    plan = plan_trigger_repair(x, y, sub, verdict, cfg, ref_pred, suspicion, feats)
    spared = Subset.CLEAN if mode == "train" else Subset.UNUSED
    assert (plan.subsets[:60] == spared).all()  # clean target suspects: no unlearning
    assert (plan.subsets[60:200] == Subset.CLEAN).all()  # unused and disputed clean target images are trained
    assert (plan.subsets[200:299] == Subset.SUSPECT).all()  # the poisons are still unlearnt
    assert plan.subsets[299] == Subset.UNUSED  # the leaked poison leaves the clean subset
    assert (plan.subsets[y != 0] == base.subsets[y != 0]).all()  # other classes as before
    assert any("target split" in n and "100 of the 300 samples labelled 0 look like poisons" in n for n in plan.notes)


def test_plan_split_needs_a_dirty_label_all_to_one_verdict_and_a_trusted_split():
    y, _poison, sub, ref_pred, suspicion, feats, verdict = _plan_set()
    x = np.zeros((len(y), 8, 8, 3), np.uint8)
    cfg = RetrainConfig(stamp=0, stamp_clean_label=0, subtract_trigger=False, split_target="leave", drop_disputed=False)
    none = replace(cfg, split_target="none")
    for v in ({**verdict, "family": "clean-label"}, {**verdict, "poisoned": False, "targets": [], "mode": "none"},
              {**verdict, "mode": "all-to-all", "targets": []}):
        assert (plan_trigger_repair(x, y, sub, v, cfg, ref_pred, suspicion, feats).subsets
                == plan_trigger_repair(x, y, sub, v, none, ref_pred, suspicion, feats).subsets).all()
    flat = np.full(len(y), 0.3)  # both groups equally suspicious: the split is not trusted
    plan = plan_trigger_repair(x, y, sub, verdict, cfg, ref_pred, flat, feats)
    assert (plan.subsets == plan_trigger_repair(x, y, sub, verdict, none, ref_pred, flat, feats).subsets).all()
    assert any("target split skipped" in n for n in plan.notes)
    with pytest.raises(ValueError, match="target_features has 10 rows"):
        plan_trigger_repair(x, y, sub, verdict, cfg, ref_pred, suspicion, feats[:10])
