"""The attack simulator: each attack's defining property on small data, determinism, registry, CLI.

Surrogate-based attacks (trojan, lowfreq, lc, narcissus) run with tiny surrogate settings
(1 epoch of a width-8 small-cnn on 120 images, 10 optimisation steps) so the file stays fast.
"""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
from scipy import ndimage

from cgd import attacks
from cgd.attacks import AttackNotPreparedError, make_attack
from cgd.attacks.frequency import lowpass
from cgd.attacks.surrogate import clear_memo
from cgd.data import ImageSet

TINY = {"surrogate_epochs": 1, "surrogate_n": 120, "surrogate_width": 8, "steps": 10, "pgd_steps": 3}
ALL = attacks.available()
PATCH_LIKE = ("badnets", "trojan")


def tiny(name: str, **extra) -> dict:
    """The tiny-cost parameters an attack accepts, plus ``extra``."""
    d = attacks.REGISTRY[name].defaults
    return {**{k: v for k, v in TINY.items() if k in d}, **extra}


def build(name: str, seed: int = 0, **extra) -> attacks.Attack:
    return make_attack(name, image_size=(32, 32), seed=seed, **tiny(name, **extra))


def poison(atk: attacks.Attack, clean: ImageSet, rate: float = 0.1, target: int = 0, seed: int | None = None) -> ImageSet:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clean-label rates above the class size are capped (warned)
        return atk.poison(clean, rate, target, seed=seed)


@pytest.fixture()
def small(synthetic_set) -> ImageSet:
    """The 200-image synthetic set with some texture so gradients and features are non-trivial."""
    rng = np.random.default_rng(1)
    x = synthetic_set.images.astype(np.int16)
    yy, xx = np.mgrid[0:32, 0:32]
    stripes = (40 * np.sin((xx * rng.uniform(0.2, 1.0, (len(x), 1, 1))) + yy * 0.3))[..., None]
    imgs = np.clip(x + stripes, 0, 255).astype(np.uint8)
    return ImageSet(imgs, synthetic_set.labels, synthetic_set.classes, name="textured")


# --------------------------------------------------------------------------------------------
# Registry and CLI
# --------------------------------------------------------------------------------------------

def test_registry_covers_the_three_categories_with_at_least_eleven_attacks():
    desc = attacks.describe_all()
    assert [d["name"] for d in desc] == ALL
    assert len(ALL) >= 11 and len(set(ALL)) == len(ALL)
    assert {d["category"] for d in desc} == set(attacks.CATEGORIES)
    for name in ALL:
        cls = attacks.REGISTRY[name]
        assert cls.name == name and cls.category in attacks.CATEGORIES
        assert isinstance(cls.defaults, dict) and cls.paper, name
        doc = " ".join((cls.__doc__ or "").split())
        assert "Differs from the paper" in doc or "Matches the paper" in doc, f"{name}: docstring must say what differs from the paper"
    for required in ("badnets", "blended", "trojan", "wanet", "ssba", "inputaware", "lowfreq", "sig", "lc", "narcissus", "cleanimage"):
        assert required in ALL


def test_cli_attack_list_prints_every_attack_with_category_and_defaults():
    out = subprocess.run([sys.executable, "-m", "cgd", "attack", "--list"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = {ln.split()[0]: ln for ln in out.stdout.splitlines() if ln.strip()}
    assert list(lines) == attacks.available()
    for d in attacks.describe_all():
        ln = lines[d["name"]]
        assert ln.split()[1] == d["category"]
        assert json.loads(ln.split(None, 2)[2]) == json.loads(json.dumps(d["defaults"]))


def test_unknown_names_and_bad_parameters_give_clear_errors():
    with pytest.raises(ValueError, match="unknown attack 'nope'.*badnets"):
        make_attack("nope")
    with pytest.raises(ValueError, match="unknown parameters \\['colour'\\]"):
        make_attack("badnets", colour=3)
    with pytest.raises(ValueError, match="'alpha' must lie in"):
        make_attack("blended", alpha=1.5)
    with pytest.raises(ValueError, match="'s' must lie in"):
        make_attack("wanet", s=-1)
    with pytest.raises(ValueError, match="'patch_size' must be an integer"):
        make_attack("badnets", patch_size=2.5)
    with pytest.raises(ValueError, match="no all-to-all form"):
        make_attack("sig", all_to_all=True)
    with pytest.raises(ValueError, match="'direction' must be a non-zero"):
        make_attack("cleanimage", direction=[0, 0, 0])
    atk = make_attack("badnets")
    with pytest.raises(ValueError, match="built for \\(32, 32\\)"):
        atk.apply_trigger(np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        atk.apply_trigger(np.zeros((2, 32, 32, 3), np.float32))


@pytest.mark.parametrize("name", [n for n in ALL if attacks.REGISTRY[n].needs_data and n != "lc"])
def test_data_dependent_triggers_refuse_before_prepare(name):
    atk = build(name)
    with pytest.raises(AttackNotPreparedError, match="poison\\(clean"):
        atk.apply_trigger(np.zeros((1, 32, 32, 3), np.uint8)) if name != "cleanimage" else atk.threshold


# --------------------------------------------------------------------------------------------
# Properties every attack has
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_poison_count_mask_labels_and_determinism(name, small):
    atk = build(name)
    cat = atk.category
    rate, target = 0.15, 1
    p1 = poison(atk, small, rate, target, seed=3)
    n_class = int((small.labels == target).sum())
    k = round(rate * len(small))
    expected = min(k, n_class) if cat == "clean-label" else k
    assert p1.poison_mask.sum() == expected
    assert np.array_equal(p1.original_labels, small.labels)
    assert p1.meta["attack"]["n_poisoned"] == expected and p1.meta["attack"]["target"] == target
    changed_label = p1.labels != small.labels
    if cat == "clean-label":
        assert not changed_label.any(), "clean-label attacks never change a label"
        assert (small.labels[p1.poison_mask] == target).all()
    else:
        assert np.array_equal(changed_label, p1.poison_mask)
        assert (p1.labels[p1.poison_mask] == target).all()
    noise = p1.meta.get("attack_noise_mask", np.zeros(len(small), bool))
    untouched = ~p1.poison_mask & ~noise
    assert np.array_equal(p1.images[untouched], small.images[untouched])
    if cat != "clean-image":
        assert (p1.images[p1.poison_mask] != small.images[p1.poison_mask]).any(axis=(1, 2, 3)).all()
    # same seed -> identical output (fresh instance, surrogates retrained from scratch)
    clear_memo()
    p2 = poison(build(name), small, rate, target, seed=3)
    assert np.array_equal(p1.images, p2.images) and np.array_equal(p1.labels, p2.labels)
    assert np.array_equal(p1.poison_mask, p2.poison_mask)
    # a different seed -> a different selection (for the clean-image attack the feature is the seed's)
    if cat == "clean-image":
        p3 = poison(build(name, seed=4), small, rate, target, seed=3)
    elif cat == "clean-label":
        p3 = poison(build(name), small, 0.5 * rate, target, seed=4)  # below the class size, so a choice exists
        p3b = poison(build(name), small, 0.5 * rate, target, seed=5)
        assert not np.array_equal(p3.poison_mask, p3b.poison_mask)
    else:
        p3 = poison(build(name), small, rate, target, seed=4)
    assert not np.array_equal(p1.poison_mask, p3.poison_mask)


@pytest.mark.parametrize("name", ALL)
def test_backdoor_test_and_preview_work_for_every_attack(name, small):
    atk = build(name)
    train, test = small.subset(np.arange(0, 200, 2)), small.subset(np.arange(1, 200, 2))
    poison(atk, train, 0.2, 0)
    bd = atk.backdoor_test(test, 0)
    assert len(bd) > 0 and (bd.true_labels != 0).all() and (bd.target_labels == 0).all()
    assert bd.images.shape[1:] == (32, 32, 3) and bd.images.dtype == np.uint8
    trig = atk.apply_trigger(test.images[:5])
    assert trig.shape == (5, 32, 32, 3) and trig.dtype == np.uint8
    for training in (False, True):
        clean, poisoned, diff = atk.preview(test.images[0], training=training)
        assert clean.shape == poisoned.shape == diff.shape == (32, 32, 3)
        if atk.category == "clean-image":
            assert np.array_equal(clean, poisoned) and diff.max() == 0
        else:
            assert diff.max() == 255 and not np.array_equal(clean, poisoned)


def test_all_to_all_relabels_to_the_next_class(small):
    atk = make_attack("badnets", all_to_all=True)
    p = poison(atk, small, 0.2, 0, seed=1)
    m = p.poison_mask
    assert m.sum() == 40
    assert np.array_equal(p.labels[m], (small.labels[m] + 1) % 4)
    bd = atk.backdoor_test(small, 0)
    assert len(bd) == len(small) and np.array_equal(bd.target_labels, (bd.true_labels + 1) % 4)


# --------------------------------------------------------------------------------------------
# Defining properties, attack by attack
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PATCH_LIKE)
def test_patch_attacks_change_nothing_outside_the_patch(name, small):
    atk = build(name)
    p = poison(atk, small, 0.2, 0)
    m = p.poison_mask
    outside = ~atk.trigger_mask()
    assert np.array_equal(p.images[m][:, outside], small.images[m][:, outside])
    inside = atk.trigger_mask()
    assert inside.sum() == atk.params["patch_size"] ** 2
    pats = p.images[m][:, inside]
    assert (pats == pats[0]).all(), "every poisoned image carries the same patch"


def test_trojan_patch_raises_its_neuron_more_than_a_random_patch(small):
    import torch

    atk = build("trojan", steps=60)
    atk.prepare(small, 0)
    model = atk._surrogate(small)
    conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    neuron = int(conv.weight.abs().sum(dim=(1, 2, 3)).argmax())
    rs, cs = atk.region()
    rand = small.images.copy()
    rand[:, rs, cs] = np.random.default_rng(0).integers(0, 256, (5, 5, 3), dtype=np.uint8)
    from cgd.attacks.surrogate import to_float

    with torch.no_grad():
        act_trojan = model.features(to_float(atk.apply_trigger(small.images), torch.device("cpu")))[:, neuron].mean()
        act_random = model.features(to_float(rand, torch.device("cpu")))[:, neuron].mean()
    assert act_trojan > act_random


def test_lc_labels_kept_perturbation_within_eps_outside_corners(small):
    atk = build("lc", eps=8.0)
    p = poison(atk, small, 0.25, 2)
    m = p.poison_mask
    assert (small.labels[m] == 2).all() and np.array_equal(p.labels, small.labels)
    outside = ~atk.trigger_mask()
    d = np.abs(p.images[m].astype(int) - small.images[m].astype(int))[:, outside]
    assert d.max() <= 8 and d.max() >= 1, "an adversarial perturbation, bounded by eps"
    corners = atk.trigger_mask()
    assert corners.sum() == 4 * 9
    assert (p.images[m][:, corners] == atk._corner_pattern()[corners]).all()
    # the test-time trigger is the corner pattern only
    t = atk.apply_trigger(small.images)
    assert np.array_equal(t[:, outside], small.images[:, outside])


def test_sig_adds_the_sinusoid_to_target_images_only(small):
    atk = build("sig")
    p = poison(atk, small, 0.25, 3)
    m = p.poison_mask
    assert m.sum() == 50 and np.array_equal(p.labels, small.labels)
    d = p.images[m].astype(int) - small.images[m].astype(int)
    assert np.abs(d).max() <= 20
    unclipped = (small.images[m] > 25) & (small.images[m] < 230)
    expected = np.rint(np.broadcast_to(atk.signal(), d.shape))
    assert np.array_equal(d[unclipped], expected[unclipped])
    # f = 6 periods across the width
    row = atk.signal()[0, :, 0]
    assert np.sum((row[:-1] < 0) & (row[1:] >= 0)) in (5, 6)


def test_narcissus_trigger_bounded_and_amplified_at_test_time(small):
    atk = build("narcissus")
    eps, mult = atk.params["eps"], atk.params["test_multiplier"]
    p = poison(atk, small, 0.25, 1)
    m = p.poison_mask
    assert np.array_equal(p.labels, small.labels)
    d = np.abs(p.images[m].astype(int) - small.images[m].astype(int))
    assert 1 <= d.max() <= np.ceil(eps)
    delta = atk.trigger_pattern()
    assert np.abs(delta).max() <= eps + 1e-4
    t = np.abs(atk.apply_trigger(small.images).astype(int) - small.images.astype(int))
    assert t.max() <= np.ceil(mult * eps) and t.max() > d.max()


def test_wanet_warp_is_small_and_noise_samples_keep_labels(small):
    atk = build("wanet", s=0.5, k=4, cross_ratio=2.0)  # the paper's setting
    p = poison(atk, small, 0.1, 0)
    m = p.poison_mask
    noise = p.meta["attack_noise_mask"]
    assert noise.sum() == 2 * m.sum() and not (noise & m).any()
    assert np.array_equal(p.labels[noise], small.labels[noise])
    assert (p.images[noise] != small.images[noise]).any(axis=(1, 2, 3)).all()
    flow = atk.flow_pixels()
    assert 0.05 < np.abs(flow).max() < 2.0, "s = 0.5, k = 4: displacements under two pixels"
    # bilinear warping: each output pixel lies within its source neighbourhood's range
    r = int(np.ceil(np.abs(flow).max())) + 1
    x = small.images[m].astype(int)
    lo = ndimage.minimum_filter(x, size=(1, 2 * r + 1, 2 * r + 1, 1), mode="constant", cval=0)
    hi = ndimage.maximum_filter(x, size=(1, 2 * r + 1, 2 * r + 1, 1), mode="nearest")
    y = p.images[m].astype(int)
    assert ((y >= lo - 1) & (y <= hi + 1)).all()
    # a stronger warp changes images more
    big = build("wanet", s=2.0).apply_trigger(small.images)
    assert np.abs(big.astype(int) - small.images).mean() > np.abs(atk.apply_trigger(small.images).astype(int) - small.images).mean()


def test_ssba_residual_is_bounded_and_sample_specific(small):
    atk = build("ssba")
    eps = atk.params["eps"]
    p = poison(atk, small, 0.2, 0)
    m = p.poison_mask
    d = p.images[m].astype(int) - small.images[m].astype(int)
    assert np.abs(d).max() <= eps and np.abs(d).mean() > 0.1 * eps
    res = atk.residual(small.images[m])
    norm = res / np.abs(res).reshape(len(res), -1).max(1)[:, None, None, None]
    assert not np.allclose(norm[0], norm[1], atol=1e-3), "each image gets its own residual"
    code = atk.code_pattern()
    assert all(np.corrcoef(r.ravel(), code.ravel())[0, 1] > 0.5 for r in res[:5]), "sharing the code pattern"


def test_inputaware_changes_only_masked_pixels_and_masks_vary(small):
    atk = build("inputaware")
    p = poison(atk, small, 0.2, 0)
    m = p.poison_mask
    masks = atk.masks(small.images[m])
    assert masks.shape == (int(m.sum()), 32, 32)
    density = masks.mean(axis=(1, 2))
    assert np.all(np.abs(density - 0.032) < 0.02)
    assert np.array_equal(p.images[m][~masks], small.images[m][~masks])
    assert len({mk.tobytes() for mk in masks}) > len(masks) // 2, "masks depend on the input"
    cross = build("inputaware", cross_ratio=1.0)
    pc = poison(cross, small, 0.2, 0)
    nz = pc.meta["attack_noise_mask"]
    assert nz.sum() == 40 and np.array_equal(pc.labels[nz], small.labels[nz])


def test_lowfreq_trigger_is_bounded_and_low_pass(small):
    import torch

    atk = build("lowfreq")
    eps, cutoff = atk.params["eps"], atk.params["cutoff"]
    p = poison(atk, small, 0.2, 0)
    m = p.poison_mask
    d = np.abs(p.images[m].astype(int) - small.images[m].astype(int))
    assert 1 <= d.max() <= np.ceil(eps)
    delta = torch.from_numpy(atk.trigger_pattern()).permute(2, 0, 1)
    assert float(delta.abs().max()) <= eps + 1e-3
    assert torch.allclose(lowpass(delta, cutoff), delta, atol=1e-3), "no energy above the cutoff"
    assert not torch.allclose(lowpass(delta, 1), delta, atol=1e-2)


def test_bpp_quantises_within_the_bound(small):
    plain = build("bpp", dithering=False)
    q = plain.apply_trigger(small.images)
    step = 255 / 7
    assert np.abs(q.astype(int) - small.images).max() <= np.ceil(plain.max_change())
    assert np.allclose(q / step, np.rint(q / step), atol=0.03), "values on the 8-level grid"
    dith = build("bpp")
    qd = dith.apply_trigger(small.images)
    assert np.abs(qd.astype(int) - small.images).max() <= np.ceil(dith.max_change())
    assert not np.array_equal(q, qd)
    assert np.abs(qd.astype(float).mean() - small.images.mean()) < np.abs(q.astype(float).mean() - small.images.mean()) + 1.0


def test_cleanimage_changes_no_pixel_and_flips_featured_images(small):
    atk = build("cleanimage")
    test = small.subset(np.arange(1, 200, 2))
    with pytest.raises(AttackNotPreparedError):
        atk.backdoor_test(test, 0)
    p = poison(atk, small, 0.1, 0)
    assert np.array_equal(p.images, small.images), "no pixel changed"
    m = p.poison_mask
    s = atk.score(small.images)
    # pool factor 1: exactly the non-target images at or above the threshold are relabelled
    featured = (s >= atk.threshold) & (small.labels != 0)
    assert np.array_equal(m, featured)
    assert s[m].min() >= s[(small.labels != 0) & ~m].max()
    bd = atk.backdoor_test(test, 0)
    assert (atk.score(bd.images) >= atk.threshold).all() and (bd.true_labels != 0).all()
    assert len(bd) == int(((atk.score(test.images) >= atk.threshold) & (test.labels != 0)).sum())
    wide = build("cleanimage", pool_factor=2.0)
    a, b = poison(wide, small, 0.1, 0, seed=1), poison(wide, small, 0.1, 0, seed=2)
    assert a.poison_mask.sum() == b.poison_mask.sum() == 20 and not np.array_equal(a.poison_mask, b.poison_mask)


def test_triggers_are_cached_in_cache_dir_and_reloaded(small, tmp_path):
    atk = build("narcissus")
    atk.cache_dir = tmp_path
    p1 = poison(atk, small, 0.2, 1)
    files = sorted(f.name for f in tmp_path.iterdir())
    assert any(f.startswith("narcissus-") and f.endswith(".npz") for f in files)
    assert any(f.startswith("surrogate-") and f.endswith(".safetensors") for f in files)
    clear_memo()
    again = build("narcissus")
    again.cache_dir = tmp_path
    p2 = poison(again, small, 0.2, 1)
    assert np.array_equal(p1.images, p2.images)
    assert sorted(f.name for f in tmp_path.iterdir()) == files
    gen = build("inputaware")
    gen.cache_dir = tmp_path
    gen.apply_trigger(small.images[:2])
    assert any(f.name.startswith("inputaware-") for f in tmp_path.iterdir())


def test_poison_params_override_and_validate(small):
    atk = make_attack("badnets")
    p = atk.poison(small, 0.1, 0, seed=0, patch_size=4)
    assert atk.params["patch_size"] == 4 and p.meta["attack"]["params"]["patch_size"] == 4
    assert atk.trigger_mask().sum() == 16
    with pytest.raises(ValueError, match="'patch_size' must lie in"):
        atk.poison(small, 0.1, 0, patch_size=0)
    with pytest.raises(ValueError, match="target class 7 out of range"):
        atk.poison(small, 0.1, 7)
    with pytest.raises(ValueError, match="poison rate must lie in"):
        atk.poison(small, 1.5, 0)
