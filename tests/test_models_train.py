"""Architectures, checkpoints (safetensors + sidecar), the device-resident trainer and metrics."""
import json

import numpy as np
import pytest
import torch

from cgd.evaluation import BackdoorTest, evaluate_model, model_metrics
from cgd.models import CheckpointError, build_model, load_checkpoint, read_checkpoint_meta, save_checkpoint
from cgd.train import TrainConfig, augment_batch, predict, train_classifier


@pytest.mark.parametrize("arch", ["small-cnn", "preact-resnet18"])
def test_architectures_forward(arch):
    m = build_model(arch, 7)
    x = torch.rand(2, 3, 32, 32)
    assert m(x).shape == (2, 7)
    assert m.features(x).shape[0] == 2


def test_build_model_rejects_unknown():
    with pytest.raises(ValueError, match="unknown architecture 'resnet50'.*small-cnn"):
        build_model("resnet50", 10)


def test_checkpoint_round_trip_and_sidecar(tmp_path):
    torch.manual_seed(0)
    m = build_model("small-cnn", 4, width=8)
    p = save_checkpoint(m, tmp_path / "m.safetensors", "small-cnn", list("abcd"), note="hello")
    meta = read_checkpoint_meta(p)
    assert meta["arch"] == "small-cnn" and meta["classes"] == list("abcd") and meta["note"] == "hello"
    assert json.loads((tmp_path / "m.json").read_text())["num_classes"] == 4
    m2, meta2 = load_checkpoint(p)
    x = torch.rand(3, 3, 32, 32)
    m.eval()
    assert torch.allclose(m(x), m2(x))
    assert not list(tmp_path.glob("*.tmp*"))  # atomic: no temp files left


def test_checkpoint_errors(tmp_path):
    m = build_model("small-cnn", 4, width=8)
    p = save_checkpoint(m, tmp_path / "m.safetensors", "small-cnn", list("abcd"))
    with pytest.raises(CheckpointError, match="4 classes, the dataset has 10"):
        load_checkpoint(p, num_classes=10)
    with pytest.raises(CheckpointError, match="is a 'small-cnn', expected 'preact-resnet18'"):
        load_checkpoint(p, arch="preact-resnet18")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors", arch="small-cnn")
    # a plain state dict of the wrong architecture, no sidecar
    torch.save(build_model("preact-resnet18", 4).state_dict(), tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not fit small-cnn"):
        load_checkpoint(tmp_path / "other.pt", arch="small-cnn", num_classes=4)
    # garbage bytes under a .safetensors name, no sidecar: named, not a library traceback
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01not a safetensors file" * 10)
    with pytest.raises(CheckpointError, match="junk.safetensors: not a readable safetensors file"):
        read_checkpoint_meta(junk)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_checkpoint(junk, arch="small-cnn", num_classes=4)


def test_malicious_pickle_checkpoint_refused(tmp_path):
    import os

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(tmp_path / "evil.pt", arch="small-cnn", num_classes=4)
    assert not marker.exists()


def test_augment_batch_crops_and_flips():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, g, pad=2)
    assert out.shape == x.shape
    for i in range(2):
        o = out[i]
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        found = False
        for dy in range(5):
            for dx in range(5):
                win = padded[:, dy:dy + 8, dx:dx + 8]
                if torch.equal(o, win) or torch.equal(o, win.flip(2)):
                    found = True
        assert found, "each output must be a (possibly flipped) window of the zero-padded input"
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(augment_batch(x, g1), augment_batch(x, g2))


def test_trainer_learns_and_is_seeded(synthetic_set):
    s = synthetic_set
    cfg = TrainConfig(epochs=8, lr=1e-2, batch_size=64, precision="fp32", seed=1, augment=False)

    def fit():
        torch.manual_seed(0)
        m = build_model("small-cnn", 4, width=8)
        hist = train_classifier(m, s.images, s.labels, cfg, "cpu")
        return m, hist

    m1, h1 = fit()
    m2, h2 = fit()
    assert [h["loss"] for h in h1] == [h["loss"] for h in h2]
    assert h1[-1]["loss"] < h1[0]["loss"]
    acc = (predict(m1, s.images, "cpu", precision="fp32").argmax(1) == s.labels).mean()
    assert acc > 0.9
    logits, feats = predict(m1, s.images[:5], "cpu", precision="fp32", features=True)
    assert logits.shape == (5, 4) and feats.shape[0] == 5


def test_bf16_training_runs(synthetic_set):
    m = build_model("small-cnn", 4, width=8)
    h = train_classifier(m, synthetic_set.images, synthetic_set.labels, TrainConfig(epochs=1, precision="bf16", batch_size=64), "cpu")
    assert np.isfinite(h[0]["loss"])


def test_model_metrics():
    clean_logits = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    bd = BackdoorTest(np.zeros((4, 2, 2, 3), np.uint8), np.array([1, 1, 1, 0]), np.array([0, 0, 0, 1]))
    bd_logits = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    m = model_metrics(clean_logits, np.array([0, 1, 1]), bd_logits, bd)
    assert m["ca"] == pytest.approx(200 / 3) and m["asr"] == 50.0 and m["ra"] == 50.0
    assert np.isnan(model_metrics(clean_logits, np.array([0, 1, 1]))["asr"])


def test_evaluate_model(synthetic_set):
    m = build_model("small-cnn", 4, width=8)
    out = evaluate_model(m, synthetic_set.images, synthetic_set.labels, device="cpu", precision="fp32")
    assert 0 <= out["ca"] <= 100
