"""Horizontal flips in training: off where a flip turns one class into another (GTSRB's mirrored signs)."""
import numpy as np
import pytest
import torch

from cgd.config import RunConfig
from cgd.models import build_model
from cgd.pipeline import _Ctx
from cgd.runs import RunDir, write_json
from cgd.train import TrainConfig, augment_batch, mirror_pairs, predict, resolve_flip, train_classifier
from cgd.zero_shot_metadata import GTSRB_CLASSNAMES

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_mirror_pairs_finds_gtsrbs_mirrored_signs_and_nothing_in_cifar():
    pairs = mirror_pairs(list(GTSRB_CLASSNAMES))
    assert pairs == [(19, 20), (33, 34), (36, 37), (38, 39)]  # curves, turn ahead, straight-or-turn, keep right/left
    assert "keep right" in GTSRB_CLASSNAMES[38] and "keep left" in GTSRB_CLASSNAMES[39]
    assert mirror_pairs(CIFAR10) == []
    assert mirror_pairs(["Turn LEFT", "turn right", "left"]) == [(0, 1)]  # whole words, any case; "left" alone has no twin
    assert mirror_pairs(["leftover", "rightover"]) == []


def test_resolve_flip_settings():
    assert resolve_flip("auto", CIFAR10) is True
    assert resolve_flip("auto", list(GTSRB_CLASSNAMES)) is False
    assert resolve_flip("on", list(GTSRB_CLASSNAMES)) is True and resolve_flip("off", CIFAR10) is False
    with pytest.raises(ValueError, match="flip"):
        resolve_flip("sometimes", CIFAR10)


def test_augment_batch_without_flip_only_crops():
    # every pixel holds its column number + 1: an unflipped crop reads increasing along each row (zeros are padding)
    b, h, w = 64, 8, 8
    x = torch.arange(1, w + 1, dtype=torch.uint8).expand(b, 3, h, w).contiguous()
    g = torch.Generator().manual_seed(0)

    def flipped(out: torch.Tensor) -> torch.Tensor:
        row = out[:, 0, h // 2].float()  # (B, W)
        nz = row.masked_fill(row == 0, float("nan"))
        d = nz[:, 1:] - nz[:, :-1]
        return (d.nan_to_num(0) < 0).any(1)

    assert not flipped(augment_batch(x, g, flip=False)).any()
    assert flipped(augment_batch(x, g, flip=True)).float().mean().item() == pytest.approx(0.5, abs=0.2)
    assert torch.equal(augment_batch(x, g, pad=0, flip=False), x)


def test_training_without_flips_tells_mirrored_classes_apart():
    # class 0: a bright bar on the left, class 1: the same bar on the right; a flip swaps them
    rng = np.random.default_rng(0)
    n, s = 256, 16
    x = rng.integers(0, 60, (n, s, s, 3), dtype=np.uint8)
    y = np.arange(n) % 2
    x[y == 0, :, 2:5] = 255
    x[y == 1, :, s - 5:s - 2] = 255
    acc = {}
    for flip in (True, False):
        torch.manual_seed(0)
        m = build_model("tiny-cnn", 2)
        train_classifier(m, x, y, TrainConfig(epochs=6, lr=3e-3, batch_size=64, flip=flip, precision="fp32"), "cpu")
        acc[flip] = float((np.asarray(predict(m, x, "cpu")).argmax(1) == y).mean())
    assert acc[False] >= 0.95, acc
    assert acc[True] <= 0.8, acc  # flipped half the time, the bar's side says nothing about the label


def test_run_flip_setting_and_stage_keys(tmp_path):
    notes = []

    def ctx_for(classes, flip):
        run = RunDir(tmp_path / f"r{len(notes)}-{flip}-{len(classes)}")
        run.root.mkdir(parents=True, exist_ok=True)
        write_json(run.path("data/classes.json"), classes)
        return _Ctx(RunConfig.from_flat(flip=flip, device="cpu"), run, notes.append, False)

    gtsrb = ctx_for(list(GTSRB_CLASSNAMES), "auto")
    assert gtsrb.flip is False and gtsrb.flip_key() == (("flip", False),)
    assert len(notes) == 1 and "without horizontal flips" in notes[0]["message"] and "keep" in notes[0]["message"]
    assert gtsrb.flip is False and len(notes) == 1  # said once
    assert ctx_for(list(GTSRB_CLASSNAMES), "on").flip is True
    cifar = ctx_for(CIFAR10, "auto")
    assert cifar.flip is True and cifar.flip_key() == ()  # flipping keeps the stage keys of runs made before the option
    assert ctx_for(CIFAR10, "off").flip_key() == (("flip", False),)
    assert len(notes) == 1
    # a run recorded before the option resumes as it was made (flips on); new runs decide by class names
    assert RunConfig.from_dict({}).flip == "on" and RunConfig().flip == "auto"
    assert RunConfig().victim_config(flip=False).flip is False and RunConfig().retrain_config().flip is True
