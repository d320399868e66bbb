"""Hardening round 2, the items on the command line, the configuration and checkpoints: each input
that used to give a traceback, a silent wrong result or a huge allocation now stops with one line
naming the input and what was expected."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from cgd.cli import main
from cgd.models import CheckpointError, build_model, load_checkpoint, save_checkpoint
from cgd.runs import RunDir

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "data" / "tiny-clip.json")


def _npz(path: Path, shift: int = 0) -> Path:
    rng = np.random.default_rng(shift)
    y = np.repeat(np.arange(3), 20)
    x = rng.integers(0, 256, (60, 12, 12, 3), dtype=np.uint8)
    np.savez(path, x=x, y=y, x_test=x[:30], y_test=y[:30], classes=np.array(["a", "b", "c"]))
    return path


def _run(capsys, *args) -> tuple[int, str]:
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("flag, value, needle", [
    ("--subset", "-5", "subset (--subset): expected a value >= 1, got -5"),
    ("--batch-size", "0", "batch_size (--batch-size): expected a value >= 1, got 0"),
    ("--chunk-size", "0", "chunk_size (--chunk-size): expected a value >= 1, got 0"),
    ("--score-batch-size", "0", "score_batch_size (--score-batch-size): expected a value >= 1"),
    ("--sigma1", "1.5", "sigma1 (--sigma1): expected a value < 1.0"),
    ("--poison-rate", "0", "poison_rate (--poison-rate): expected a value > 0.0"),
])
def test_out_of_range_settings_stop_with_one_line_naming_the_flag(tmp_path, capsys, flag, value, needle):
    rc, err = _run(capsys, "run", "--data", f"npz:{_npz(tmp_path / 'd.npz')}", "--out", tmp_path / "r", "--quiet", flag, value)
    assert rc == 2 and needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_template_with_two_placeholders_is_refused(tmp_path, capsys):
    tpl = tmp_path / "t.txt"
    tpl.write_text("a photo of a {}.\na {} and a {}.\n")
    rc, err = _run(capsys, "score", "--data", f"npz:{_npz(tmp_path / 'd.npz')}", "--templates", tpl, "--out", tmp_path / "r",
                   "--reference", "clip:tiny-clip", "--clip-config", TINY, "--pretrained", "none", "--quiet")
    assert rc == 2 and "--templates: each template needs exactly one {}" in err and "a {} and a {}" in err


def _tiny_ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "m.safetensors"
    save_checkpoint(build_model("small-cnn", 3, width=8), path, "small-cnn", ["a", "b", "c"])
    return path


def test_a_sidecar_with_unknown_model_kwargs_is_refused_by_name(tmp_path):
    path = _tiny_ckpt(tmp_path)
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "model_kwargs": {"width": 8, "dropout": 0.5}}))
    with pytest.raises(CheckpointError, match=r"model_kwargs\.dropout is not a setting of small-cnn"):
        load_checkpoint(path)


def test_a_sidecar_asking_for_a_huge_model_is_refused_before_building_it(tmp_path):
    path = _tiny_ckpt(tmp_path)
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "model_kwargs": {"width": 60000}}))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"model_kwargs\.width = 60000 is out of range"):
        load_checkpoint(path)
    assert time.perf_counter() - t0 < 5  # nothing of 259 GB was allocated
    side.write_text(json.dumps({**meta, "model_kwargs": {"width": 16}}))
    with pytest.raises(CheckpointError, match="first convolution has 8 channels"):
        load_checkpoint(path)
    side.write_text(json.dumps({**meta, "num_classes": 10**9}))
    with pytest.raises(CheckpointError, match="classes is out of range"):
        load_checkpoint(path)


def test_disk_full_while_saving_a_model_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def full(*a, **k):
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                          "message: \"No space left on device\" })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(CheckpointError, match=r"m\.safetensors: could not write the checkpoint \(the disk is full\)"):
        save_checkpoint(build_model("small-cnn", 3, width=8), tmp_path / "m.safetensors", "small-cnn", ["a", "b", "c"])
    assert list(tmp_path.iterdir()) == []


def test_a_replaced_dataset_file_is_read_again(tmp_path, capsys):
    """The data stage's key follows the source's content, not its spec string."""
    data = _npz(tmp_path / "d.npz")
    out = tmp_path / "r"
    args = ("score", "--data", f"npz:{data}", "--out", out, "--reference", "clip:tiny-clip", "--clip-config", TINY,
            "--pretrained", "none", "--arch", "tiny-cnn", "--suspicious-runs", "1", "--suspicious-epochs", "1",
            "--device", "cpu", "--quiet")
    assert _run(capsys, *args)[0] == 0
    first = RunDir(out).read_run()
    assert _run(capsys, *args)[0] == 0  # unchanged source: nothing recomputed
    assert RunDir(out).read_run()["stages"]["data"]["finished"] == first["stages"]["data"]["finished"]
    _npz(data, shift=1)  # the same path, other images
    assert _run(capsys, *args)[0] == 0
    again = RunDir(out).read_run()
    assert again["stages"]["data"]["key"] != first["stages"]["data"]["key"]
    assert again["dataset"]["fingerprint"] != first["dataset"]["fingerprint"]
    assert again["stages"]["reference"]["key"] != first["stages"]["reference"]["key"]  # re-scored (timestamps have 1-s resolution)


def test_move_by_hand_ranges_are_bounded_by_the_set_before_expanding():
    from cgd.drafts import parse_indices

    t0 = time.perf_counter()
    idx, bad = parse_indices("0-500000000, 7, x, 60000", 50_000)
    assert time.perf_counter() - t0 < 2
    assert len(idx) == 50_000 and idx[-1] == 49_999
    assert "x" in bad and "60000" in bad and any("clipped to 0-49999" in b for b in bad)
