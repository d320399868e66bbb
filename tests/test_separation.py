"""The separation rule, ranks, oversampling and detection metrics on hand-made arrays."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cgd.separation import (CLEAN, SUSPECT, UNUSED, SeparationConfig, apply_overrides, auroc, detection_metrics,
                            label_nll, oversample_per_class, rank_normalise, roc_curve, separate, threshold_sweep)


def test_label_nll_matches_log_softmax():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 3.0, 1.0]])
    labels = np.array([0, 2, 0])
    expected = -np.log(np.exp(logits[np.arange(3), labels]) / np.exp(logits).sum(1))
    np.testing.assert_allclose(label_nll(logits, labels), expected, rtol=1e-12)
    assert label_nll(logits, labels)[1] == pytest.approx(np.log(3))


def test_label_nll_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0], [0.0, 1e4]])
    out = label_nll(logits, np.array([0, 0]))
    assert out[0] == pytest.approx(0.0) and out[1] == pytest.approx(1e4)


def test_label_nll_rejects_nan_and_bad_labels():
    with pytest.raises(ValueError, match="NaN"):
        label_nll(np.array([[np.nan, 1.0]]), np.array([0]))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        label_nll(np.zeros((2, 2)), np.array([0, 2]))
    with pytest.raises(ValueError, match="labels must be"):
        label_nll(np.zeros((2, 2)), np.array([0]))


def test_rank_normalise_ascending_in_unit_interval():
    r = rank_normalise(np.array([0.3, 0.1, 0.9, 0.5]))
    np.testing.assert_allclose(r, [0.5, 0.25, 1.0, 0.75])


def test_rank_normalise_ties_share_average_rank():
    r = rank_normalise(np.array([1.0, 1.0, 2.0, 0.0]))
    np.testing.assert_allclose(r, [2.5 / 4, 2.5 / 4, 1.0, 0.25])


def test_rank_normalise_per_class():
    v = np.array([5.0, 1.0, 3.0, 0.1, 0.2])
    g = np.array([0, 0, 0, 1, 1])
    np.testing.assert_allclose(rank_normalise(v, g), [1.0, 1 / 3, 2 / 3, 0.5, 1.0])


def test_separate_rule_by_hand():
    clip_rank = np.array([0.10, 0.80, 0.85, 0.95, 0.50, 0.50, 0.50])
    model_rank = np.array([0.50, 0.50, 0.50, 0.50, 0.05, 0.15, 0.20])
    sub = separate(clip_rank, model_rank, sigma1=0.2, sigma2=0.1, sigma3=0.0)
    # 0: clean; 1: clip 0.80 <= 0.8 -> clean; 2: clip 0.85 > 0.8 not clean, not > 0.9 -> unused;
    # 3: clip 0.95 > 0.9 -> suspect; 4: model 0.05 < 0.1 -> suspect; 5: 0.1 <= 0.15 < 0.2 -> unused;
    # 6: model 0.20 >= 0.2 -> clean
    assert sub.tolist() == [CLEAN, CLEAN, UNUSED, SUSPECT, SUSPECT, UNUSED, CLEAN]


def test_separate_suspect_wins_when_sigmas_overlap():
    # sigma2 > sigma1 lets both rules fire; the sample must be suspect
    sub = separate(np.array([0.75]), np.array([0.5]), sigma1=0.1, sigma2=0.3)
    assert sub.tolist() == [SUSPECT]


def test_joint_tail_flags_samples_suspicious_on_both_axes():
    """sigma3: the top sigma3 of rank(clip_rank - model_rank) is suspect too; sigma3 = 0 is the paper's rule."""
    rng = np.random.default_rng(0)
    n = 1000
    clip_rank = rng.permutation(n) / n + 1 / n
    model_rank = rng.permutation(n) / n + 1 / n
    both = np.arange(20)  # in neither axis's own top 10 %, but high on one and low on the other
    clip_rank[both], model_rank[both] = 0.85, 0.15
    paper = separate(clip_rank, model_rank, 0.2, 0.1, sigma3=0.0)
    joint = separate(clip_rank, model_rank, 0.2, 0.1, sigma3=0.1)
    assert (paper[both] == UNUSED).all() and (joint[both] == SUSPECT).all()
    # the joint tail only adds suspects: every paper suspect stays one, clean samples can only turn suspect
    assert (joint[paper == SUSPECT] == SUSPECT).all()
    changed = paper != joint
    assert (joint[changed] == SUSPECT).all()
    jr = rank_normalise(clip_rank - model_rank)
    assert ((jr > 0.9) <= (joint == SUSPECT)).all()
    assert changed.sum() <= int(0.1 * n)
    with pytest.raises(ValueError, match="sigma3"):
        separate(clip_rank, model_rank, 0.2, 0.1, sigma3=1.0)


def test_separation_presets():
    from cgd.separation import SEPARATION_PRESETS

    assert SEPARATION_PRESETS["paper"].sigma3 == 0.0 and SEPARATION_PRESETS["cgd"].sigma3 == SeparationConfig().sigma3 > 0


def test_separation_config_validates():
    with pytest.raises(ValueError, match="sigma1"):
        SeparationConfig(sigma1=1.2)
    with pytest.raises(ValueError, match="rank_mode"):
        SeparationConfig(rank_mode="nope")


def test_oversample_balances_and_is_seeded():
    labels = np.array([0] * 10 + [1] * 4 + [2] * 7)
    clean = np.array([0, 1, 2, 3, 4, 5, 10, 11, 14, 15, 16])  # class 0: 6, class 1: 2, class 2: 3
    a = oversample_per_class(clean, labels, seed=3)
    b = oversample_per_class(clean, labels, seed=3)
    c = oversample_per_class(clean, labels, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    counts = np.bincount(labels[a], minlength=3)
    assert counts.tolist() == [6, 6, 6]
    assert set(a.tolist()) == set(clean.tolist())  # every clean sample kept, nothing else added
    for k in (1, 2):  # each own sample appears floor or ceil times
        own = clean[labels[clean] == k]
        reps = np.array([np.sum(a == i) for i in own])
        assert reps.max() - reps.min() <= 1


def test_oversample_empty():
    assert len(oversample_per_class(np.array([], np.int64), np.array([0, 1]))) == 0


def test_auroc_and_roc():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    pos = np.array([False, False, True, True])
    assert auroc(scores, pos) == pytest.approx(0.75)
    assert auroc(np.arange(10.0), np.arange(10) >= 5) == 1.0
    assert np.isnan(auroc(scores, np.zeros(4, bool)))
    fpr, tpr = roc_curve(scores, pos)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_detection_metrics_counts():
    truth = np.array([True, True, False, False, False])
    sub = np.array([SUSPECT, CLEAN, SUSPECT, CLEAN, UNUSED])
    m = detection_metrics(sub, truth, clip_nll=np.array([5.0, 4.0, 1.0, 0.5, 0.2]), model_nll=np.array([0.0, 0.1, 1, 1, 1]))
    assert m["suspect"]["tpr"] == 0.5 and m["suspect"]["fpr"] == pytest.approx(1 / 3)
    assert m["suspect"]["precision"] == 0.5
    assert m["poison_in_clean"] == 1
    assert m["clean"]["tp"] == 1 and m["clean"]["fp"] == 1  # clean subset: positives are clean samples
    assert m["auroc_clip"] == 1.0 and m["auroc_model"] == 1.0


def test_overrides_and_sweep():
    sub = np.array([CLEAN, CLEAN, SUSPECT])
    out = apply_overrides(sub, {0: SUSPECT, 2: UNUSED})
    assert out.tolist() == [SUSPECT, CLEAN, UNUSED] and sub.tolist() == [CLEAN, CLEAN, SUSPECT]
    with pytest.raises(ValueError, match="out of range"):
        apply_overrides(sub, {5: CLEAN})
    rng = np.random.default_rng(0)
    rows = threshold_sweep(rng.random(100), rng.random(100), rng.random(100) < 0.1)
    assert all(r["clean"] + r["suspect"] + r["unused"] == 100 for r in rows)
    assert rows[0]["suspect"] <= rows[-1]["suspect"]  # larger sigmas flag more


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(2, 8), seed=st.integers(0, 2**31 - 1),
       s1=st.floats(0, 0.95), s2=st.floats(0, 0.95), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_separation_invariants(n, k, seed, s1, s2, scale):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    a = label_nll(rng.normal(0, scale, (n, k)).astype(np.float32), labels)
    b = label_nll(rng.normal(0, scale, (n, k)), labels)
    assert (a >= 0).all() and (b >= 0).all()
    ra, rb = rank_normalise(a), rank_normalise(b, labels)
    for r in (ra, rb):
        assert (r > 0).all() and (r <= 1).all()
    sub = separate(ra, rb, s1, s2)
    assert set(np.unique(sub)) <= {UNUSED, CLEAN, SUSPECT}
    counts = [(sub == c).sum() for c in (UNUSED, CLEAN, SUSPECT)]
    assert sum(counts) == n
    clean = np.flatnonzero(sub == CLEAN)
    over = oversample_per_class(clean, labels, seed)
    np.testing.assert_array_equal(over, oversample_per_class(clean, labels, seed))
    if len(clean):
        c = np.bincount(labels[over], minlength=k)
        present = np.unique(labels[clean])
        assert len(set(c[present].tolist())) == 1 and c[present][0] == np.bincount(labels[clean]).max()


@settings(max_examples=30, deadline=None)
@given(x=hnp.arrays(np.float64, st.integers(1, 50), elements=st.floats(-1e6, 1e6)))
def test_rank_normalise_property(x):
    r = rank_normalise(x)
    assert (r > 0).all() and (r <= 1).all()
    # order preserved: larger value never gets a smaller rank
    o = np.argsort(x, kind="stable")
    assert np.all(np.diff(r[o]) >= -1e-12)
