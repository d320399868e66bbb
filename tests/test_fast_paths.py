"""The speed paths keep results: exact matmul resize, bf16 ranks like fp32 on real images, batch size
and micro-batching do not change scores, fast SmallCNN trains."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cgd.reference import ClipReference, gpu_preprocess

TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}."]
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _interpolate_path(x_u8, size, mode):
    """The straightforward implementation: float, F.interpolate (antialias), crop, clamp, normalise."""
    x = x_u8.float() / 255
    th, tw = size
    h, w = x.shape[-2:]
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode=mode, align_corners=False, antialias=True)
    top, left = (nh - th) // 2, (nw - tw) // 2
    x = x[..., top:top + th, left:left + tw]
    if mode == "bicubic":
        x = x.clamp(0, 1)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("shape,size,mode", [
    ((3, 3, 32, 32), (224, 224), "bicubic"),   # CIFAR -> ViT: upscale
    ((2, 3, 40, 30), (224, 224), "bicubic"),   # non-square: shortest side, centre crop
    ((2, 3, 300, 200), (224, 224), "bilinear"),  # downscale with antialiasing
    ((2, 3, 64, 48), (32, 32), "bicubic"),
])
def test_matmul_resize_equals_interpolate(shape, size, mode):
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
    ours = gpu_preprocess(x, size, MEAN, STD, mode)
    ref = _interpolate_path(x, size, mode)
    assert ours.shape == (shape[0], 3, *size) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)
    # bf16 output is the fp32 result rounded once
    b = gpu_preprocess(x, size, MEAN, STD, mode, dtype=torch.bfloat16)
    assert b.dtype == torch.bfloat16
    torch.testing.assert_close(b.float(), ref, atol=0.02, rtol=0.01)


def test_same_size_input_is_only_normalised():
    x = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 3, 16, 16), dtype=np.uint8))
    out = gpu_preprocess(x, (16, 16), MEAN, STD)
    ref = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_scores_do_not_depend_on_batch_size(tiny_clip):
    imgs = np.random.default_rng(2).integers(0, 256, (70, 32, 32, 3), dtype=np.uint8)
    torch.manual_seed(0)
    a = ClipReference(tiny_clip, ["a", "b", "c"], TEMPLATES, device="cpu", precision="fp32", batch_size=256)
    assert a.forward_batch_size == ClipReference.cpu_forward_batch  # CPU: cache-sized micro-batches
    torch.manual_seed(0)
    b = ClipReference(tiny_clip, ["a", "b", "c"], TEMPLATES, device="cpu", precision="fp32", batch_size=7)
    assert b.forward_batch_size == 7
    sa, sb = a.score(imgs), b.score(imgs)
    np.testing.assert_allclose(sa.logits, sb.logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sa.embeddings, sb.embeddings, rtol=1e-4, atol=1e-5)


def test_bf16_ranks_like_fp32_on_real_images(tiny_clip, cifar_small, tmp_path):
    """The precision option: bf16 and fp32 rank the samples alike (Spearman >= 0.99 of the label NLL)."""
    import open_clip
    from safetensors.torch import save_file
    from scipy.stats import spearmanr

    from cgd.separation import label_nll

    train, _ = cifar_small
    imgs, labels = train.images[:256], train.labels[:256]
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in open_clip.create_model(tiny_clip).state_dict().items()}, str(tmp_path / "w.safetensors"))
    nll = {}
    for prec in ("fp32", "bf16"):
        ref = ClipReference(tiny_clip, train.classes, TEMPLATES, checkpoint=tmp_path / "w.safetensors", device="cpu", precision=prec)
        assert ref.dtype == (torch.bfloat16 if prec == "bf16" else torch.float32)
        nll[prec] = label_nll(ref.score(imgs).logits, labels)
    assert not np.allclose(nll["fp32"], nll["bf16"])  # the precisions really differ...
    assert spearmanr(nll["fp32"], nll["bf16"]).statistic >= 0.99  # ...but rank the samples alike


def test_predict_leaves_model_trainable():
    """predict() runs under inference_mode but must not turn the parameters into inference tensors."""
    from cgd.models import build_model
    from cgd.train import TrainConfig, predict, train_classifier

    torch.manual_seed(0)
    m = build_model("small-cnn", 3, width=8)
    x = np.random.default_rng(3).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    y = np.arange(24) % 3
    p1 = predict(m, x, "cpu", precision="fp32")
    assert p1.shape == (24, 3)
    train_classifier(m, x, y, TrainConfig(epochs=1, batch_size=8, precision="fp32"), "cpu")
    assert not np.allclose(predict(m, x, "cpu", precision="fp32"), p1)


def _guided_losses_indexed(student, reference, labels, suspect, t, alpha, beta):
    """The loss maths written with boolean indexing (the paper code's form), for comparison."""
    student = student.float()
    zero = student.new_zeros(())
    clean = ~suspect
    ce = F.cross_entropy(student[clean], labels[clean]) if clean.any() else zero
    if suspect.any():
        s = student[suspect]
        kl = F.kl_div(F.log_softmax(s / t, 1), F.softmax(reference[suspect].float() / t, 1), reduction="batchmean") * t * t
        unlearn = F.log_softmax(s, 1).gather(1, labels[suspect, None]).mean()
    else:
        kl, unlearn = zero, zero
    return ce + alpha * kl + beta * unlearn, ce, kl, unlearn


@pytest.mark.parametrize("n_susp", [0, 1, 7, 32])
def test_sync_free_guided_losses_equal_indexed_form(n_susp):
    """guided_losses (masked sums, no host sync) computes the same values and gradients."""
    from cgd.retrain import guided_losses

    g = torch.Generator().manual_seed(n_susp)
    s = torch.randn(32, 10, generator=g, requires_grad=True)
    r = torch.randn(32, 10, generator=g) * 3
    y = torch.randint(0, 10, (32,), generator=g)
    susp = torch.zeros(32, dtype=torch.bool)
    susp[torch.randperm(32, generator=g)[:n_susp]] = True
    out = guided_losses(s, r, y, susp, 3.0, 0.3, 0.2)
    ref = _guided_losses_indexed(s, r, y, susp, 3.0, 0.3, 0.2)
    for k, v in zip(("total", "ce", "kl", "unlearn"), ref):
        torch.testing.assert_close(out[k], v, atol=1e-6, rtol=1e-5)
    ga = torch.autograd.grad(out["total"], s)[0]
    gb = torch.autograd.grad(ref[0], s)[0]
    torch.testing.assert_close(ga, gb, atol=1e-7, rtol=1e-5)


def test_compiled_scoring_matches_eager(tiny_clip):
    """compile=True (torch.compile, frozen weights, padded last batch) scores like eager mode."""
    imgs = np.random.default_rng(4).integers(0, 256, (21, 32, 32, 3), dtype=np.uint8)  # 21: last batch padded
    torch.manual_seed(0)
    eager = ClipReference(tiny_clip, ["a", "b", "c"], TEMPLATES, device="cpu", precision="fp32", batch_size=8, compile=False)
    torch.manual_seed(0)
    comp = ClipReference(tiny_clip, ["a", "b", "c"], TEMPLATES, device="cpu", precision="fp32", batch_size=8, compile=True)
    a, b = eager.score(imgs), comp.score(imgs)
    assert eager._compiled is None  # never tried
    assert comp._compiled is not None  # compiled, or False after a warned fallback (no C++ compiler)
    assert b.logits.shape == (21, 3)
    np.testing.assert_allclose(b.logits, a.logits, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(b.embeddings, a.embeddings, rtol=1e-3, atol=1e-4)


def test_cpu_allocator_tuning_is_applied_once_and_can_be_turned_off(monkeypatch):
    import sys

    import cgd.device as d

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc mallopt only")
    d.resolve_device("cpu")
    assert d.tune_cpu_allocator() is True  # applied by resolve_device, idempotent afterwards
    monkeypatch.setattr(d, "_ALLOCATOR_TUNED", None)
    monkeypatch.setenv("CGD_MALLOC_TUNE", "0")
    assert d.tune_cpu_allocator() is False


def test_bf16_choice_is_measured_interleaved_and_cached(tmp_path, monkeypatch):
    """auto's CPU bf16 choice: interleaved rounds (load hits both alike), a clear-gain margin, one
    measurement per machine kept in $CGD_CACHE/cpu-precision.json, and CGD_CPU_BF16 overriding it."""
    import json

    from cgd import device

    monkeypatch.setenv("CGD_CACHE", str(tmp_path))
    monkeypatch.delenv("CGD_CPU_BF16", raising=False)
    monkeypatch.setattr(device, "bf16_fast_on_cpu", lambda: True)
    order = []

    def fake(workload, dtype, reps):  # bf16 10 % faster: below the margin, so not taken
        order.append("bf16" if dtype is not None else "fp32")
        return 0.9 if dtype is not None else 1.0

    monkeypatch.setattr(device, "_bench_workload", fake)
    device.bf16_faster_on_cpu.cache_clear()
    assert device.bf16_faster_on_cpu("conv_train") is False
    assert order[:4] == ["fp32", "bf16", "fp32", "bf16"]  # interleaved
    rec = next(iter(json.loads((tmp_path / "cpu-precision.json").read_text()).values()))
    assert rec["bf16"] is False and rec["ratio"] == 0.9
    n = len(order)
    device.bf16_faster_on_cpu.cache_clear()
    assert device.bf16_faster_on_cpu("conv_train") is False and len(order) == n  # read back, not measured again
    monkeypatch.setenv("CGD_CPU_BF16", "1")
    device.bf16_faster_on_cpu.cache_clear()
    assert device.bf16_faster_on_cpu("conv_train") is True
    device.bf16_faster_on_cpu.cache_clear()


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_precision_benchmark_runs_inside_no_grad(mode):
    """The first ``auto`` choice is often measured inside ``predict`` (decorated with no_grad): the
    conv_train kernel's backward must still run there (it raised "does not require grad" once)."""
    from cgd import device

    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        for dtype in (None, torch.bfloat16):
            assert device._bench_workload("conv_train", dtype, reps=1) > 0
        assert torch.is_grad_enabled() is False  # the caller's mode is left as it was
