"""CLIP zero-shot scorer (tiny open_clip config, random weights) and the classifier reference."""
import numpy as np
import pytest
import torch

from cgd.reference import ClassifierReference, ClipReference, ReferenceError, gpu_preprocess, make_reference

TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}."]


def _images(n=12, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_clip_scores_shapes_and_normalised_embeddings(tiny_clip):
    ref = ClipReference(tiny_clip, ["cat", "dog", "ship"], TEMPLATES, device="cpu", precision="fp32", batch_size=5)
    calls = []
    out = ref.score(_images(), progress=lambda d, t: calls.append((d, t)))
    assert out.logits.shape == (12, 3) and out.logits.dtype == np.float32
    assert out.embeddings.shape == (12, 64)
    np.testing.assert_allclose(np.linalg.norm(out.embeddings, axis=1), 1.0, atol=1e-5)
    assert calls[-1] == (12, 12) and len(calls) == 3
    # logits are the scaled cosine similarity with the text classifier
    txt = ref.text_classifier.numpy()
    np.testing.assert_allclose(np.linalg.norm(txt, axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(out.logits, ref.logit_scale * out.embeddings @ txt, rtol=1e-4, atol=1e-4)


def test_text_classifier_averages_templates(tiny_clip):
    import open_clip
    import torch.nn.functional as F

    ref = ClipReference(tiny_clip, ["cat", "dog"], TEMPLATES, device="cpu", precision="fp32")
    tok = open_clip.get_tokenizer(tiny_clip)
    with torch.no_grad():
        e = F.normalize(ref.model.float().encode_text(tok([t.format("dog") for t in TEMPLATES])), dim=-1).mean(0)
    np.testing.assert_allclose(ref.text_classifier[:, 1].numpy(), F.normalize(e, dim=0).numpy(), atol=1e-5)


def test_checkpoint_round_trip_safetensors_and_torch(tiny_clip, tmp_path):
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(123)
    m = open_clip.create_model(tiny_clip)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pt")
    imgs = _images(6)
    a = ClipReference(tiny_clip, ["a", "b"], TEMPLATES, checkpoint=tmp_path / "w.safetensors", device="cpu", precision="fp32").score(imgs)
    b = ClipReference(tiny_clip, ["a", "b"], TEMPLATES, checkpoint=tmp_path / "w.pt", device="cpu", precision="fp32").score(imgs)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)
    # different weights give different scores: the checkpoint was really loaded
    torch.manual_seed(7)
    c = ClipReference(tiny_clip, ["a", "b"], TEMPLATES, device="cpu", precision="fp32").score(imgs)
    assert not np.allclose(a.embeddings, c.embeddings, atol=1e-3)


def test_bf16_ranks_like_fp32(tiny_clip, tmp_path):
    from scipy.stats import spearmanr

    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(5)
    save_file({k: v.contiguous() for k, v in open_clip.create_model(tiny_clip).state_dict().items()}, str(tmp_path / "w.safetensors"))
    imgs = _images(64, seed=3)
    labels = np.arange(64) % 3
    from cgd.separation import label_nll

    out = {}
    for prec in ("fp32", "bf16"):
        r = ClipReference(tiny_clip, ["a", "b", "c"], TEMPLATES, checkpoint=tmp_path / "w.safetensors", device="cpu", precision=prec)
        out[prec] = label_nll(r.score(imgs).logits, labels)
    assert spearmanr(out["fp32"], out["bf16"]).statistic >= 0.95


def test_unknown_model_and_bad_checkpoint(tiny_clip, tmp_path):
    with pytest.raises(ReferenceError, match="unknown open_clip model 'ViT-B-33'.*ViT-B-32"):
        ClipReference("ViT-B-33", ["a", "b"], TEMPLATES, device="cpu")
    with pytest.raises(ReferenceError, match="not found"):
        ClipReference(tiny_clip, ["a", "b"], TEMPLATES, checkpoint=tmp_path / "missing.pt", device="cpu")
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"visual.conv1.weight": torch.zeros(3, 3)}, str(bad))
    with pytest.raises(ReferenceError, match="bad.safetensors"):
        ClipReference(tiny_clip, ["a", "b"], TEMPLATES, checkpoint=bad, device="cpu")
    with pytest.raises(ReferenceError, match=r"\{\}"):
        ClipReference(tiny_clip, ["a", "b"], ["no placeholder"], device="cpu")


def test_malicious_torch_checkpoint_is_refused(tiny_clip, tmp_path):
    import os

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ReferenceError):
        ClipReference(tiny_clip, ["a", "b"], TEMPLATES, checkpoint=tmp_path / "evil.pt", device="cpu")
    assert not marker.exists()


def test_gpu_preprocess_matches_torchvision():
    from torchvision.transforms import v2 as T

    imgs = _images(4, 32)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    mean, std = (0.48, 0.45, 0.40), (0.26, 0.26, 0.27)
    ours = gpu_preprocess(x, (64, 64), mean, std, "bicubic")
    tv = T.Compose([T.ToDtype(torch.float32, scale=True), T.Resize(64, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                    T.CenterCrop(64), T.Normalize(mean, std)])
    ref = torch.stack([tv(xi) for xi in x])
    assert ours.shape == (4, 3, 64, 64)
    assert (ours - ref.clamp(min=((0 - torch.tensor(mean)) / torch.tensor(std)).min())).abs().mean() < 0.05
    # non-square input: shortest side resized, centre crop
    wide = torch.zeros(1, 3, 32, 64, dtype=torch.uint8)
    assert gpu_preprocess(wide, (48, 48), mean, std).shape == (1, 3, 48, 48)


def test_classifier_reference_and_spec(tmp_path):
    from cgd.models import build_model, save_checkpoint

    torch.manual_seed(0)
    m = build_model("small-cnn", 3, width=8)
    save_checkpoint(m, tmp_path / "r.safetensors", "small-cnn", ["a", "b", "c"])
    ref = make_reference(f"classifier:{tmp_path / 'r.safetensors'}", ["a", "b", "c"], TEMPLATES, device="cpu", precision="fp32")
    assert isinstance(ref, ClassifierReference)
    out = ref.score(_images(10))
    assert out.logits.shape == (10, 3)
    np.testing.assert_allclose(np.linalg.norm(out.embeddings, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ReferenceError, match="clip:MODEL or classifier"):
        make_reference("vit:foo", ["a"], TEMPLATES)
    from cgd.models import CheckpointError

    with pytest.raises(CheckpointError, match="3 classes.*5"):
        ClassifierReference(tmp_path / "r.safetensors", num_classes=5, device="cpu")


def test_int8_scoring_on_cpu_agrees_with_fp32(tiny_clip):
    """--precision int8 quantises the image tower's linear layers (CPU only); scores stay close to
    fp32's, the description says int8, and training workloads read int8 as fp32."""
    import torch

    from cgd.device import resolve_precision
    from cgd.reference import ClipReference

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
    names = ["cat", "dog", "ship", "car"]
    torch.manual_seed(0)
    fp = ClipReference(tiny_clip, names, TEMPLATES, device="cpu", precision="fp32").score(imgs)
    torch.manual_seed(0)
    ref8 = ClipReference(tiny_clip, names, TEMPLATES, device="cpu", precision="int8")
    assert any("quantized" in type(m).__module__ for m in ref8.model.visual.modules())
    q = ref8.score(imgs)
    assert q.info["precision"] == "int8"
    cos = (fp.embeddings * q.embeddings).sum(1)
    assert cos.min() > 0.99, cos.min()
    assert resolve_precision("int8", torch.device("cpu"), "conv_train") == "fp32"
    assert resolve_precision("int8", torch.device("cpu"), "matmul_infer") == "int8"
    assert resolve_precision("auto", torch.device("cpu"), "matmul_infer") in ("bf16", "fp32")  # never int8 by itself
