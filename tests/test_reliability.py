"""Reliability: corrupt or hostile input end to end through the CLI, property tests of the loss and
score functions, and SIGKILL during the data stage and during suspicious training.

Every refused input must end with exit code 2 and one ``cgd: error:`` line naming the file or
field, a run folder whose run.json / status.json parse (status ``failed`` with the error), and no
temp file or partial array anywhere (run folder or decode cache).
"""
from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cgd.cli import main
from cgd.runs import RunDir

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "data" / "tiny-clip.json")
TEMP = re.compile(r"\.tmp\d*(\.[A-Za-z0-9]+)?$")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def _img(path: Path, arr: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def _folder(root: Path, n_train: int = 6, n_test: int = 3, size: int = 16) -> Path:
    """root/{train,test}/{a,b}/*.png: two colour classes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, colour in (("a", (200, 40, 40)), ("b", (40, 40, 200))):
            for j in range(n):
                x = np.clip(np.array(colour) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
                _img(root / split / c / f"{j}.png", x)
    return root


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h RGB pixels (no pixel data worth the name): cheap oversize input."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


SCORE = ["--reference", "clip:tiny-clip", "--clip-config", TINY, "--pretrained", "none", "--device", "cpu",
         "--precision", "fp32", "--arch", "small-cnn", "--suspicious-runs", "1", "--suspicious-epochs", "1", "--quiet"]
RUN = SCORE + ["--train-epochs", "1", "--epochs", "1", "--max-batches", "1"]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("CGD_CACHE", str(d))
    return d


def _cli(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _assert_refused(rc: int, err: str, out: Path, cache: Path, *needles: str) -> str:
    """Exit 2, one error line naming the culprit, a readable run folder marked failed, nothing half-written."""
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("cgd: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    if out.exists():
        json.loads((out / "run.json").read_text())
        status = json.loads((out / "status.json").read_text())
        assert status["state"] == "failed" and lines[0].split("cgd: error: ", 1)[1][:60] in status["error"]
    _assert_nothing_half_written(out, cache)
    return lines[0]


def _assert_nothing_half_written(*folders: Path) -> None:
    for folder in folders:
        if not folder.exists():
            continue
        temps = [p for p in folder.rglob("*") if TEMP.search(p.name) or ".partial" in p.name]
        assert not temps, temps
        for f in folder.rglob("*.npy"):  # every array present is complete
            np.load(f, mmap_mode="r")
        for f in folder.rglob("*.json"):
            json.loads(f.read_text())


# ------------------------------------------------------------------------------------------------
# corrupt and hostile input, end to end
# ------------------------------------------------------------------------------------------------

def _truncated(kind: str):
    def make(f: Path) -> Path:
        f = _img(f.with_suffix("." + kind), np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8))
        f.write_bytes(f.read_bytes()[:-40])  # the header intact, the pixel data cut short
        return f
    return make


BAD_IMAGES = {
    "truncated-jpeg": (_truncated("jpg"), "cannot decode image"),
    "truncated-png": (_truncated("png"), "cannot decode image"),
    "zero-bytes": (lambda f: (f.with_suffix(".jpg").write_bytes(b""), f.with_suffix(".jpg"))[1], "empty file (0 bytes)"),
    "one-pixel": (lambda f: _img(f.with_suffix(".png"), np.zeros((1, 1, 3), np.uint8)), "1x1 pixels is too small"),
    "oversize": (lambda f: (f.with_suffix(".png").write_bytes(_png_header_only(10000, 10000)), f.with_suffix(".png"))[1],
                 "10000x10000 pixels exceeds the limit"),
    "not-an-image": (lambda f: (f.with_suffix(".jpg").write_bytes(b"<html>not a jpeg</html>"), f.with_suffix(".jpg"))[1],
                     "bad.jpg"),
}


@pytest.mark.parametrize("fault", sorted(BAD_IMAGES))
def test_bad_image_file_is_refused_by_name(fault, tmp_path, cache, capsys):
    root = _folder(tmp_path / "ds")
    make, needle = BAD_IMAGES[fault]
    bad = make(root / "train" / "a" / "bad")
    out = tmp_path / "run"
    rc, err = _cli(capsys, "score", "--data", f"imagefolder:{root}", "--out", out, *SCORE)
    _assert_refused(rc, err, out, cache, str(bad), needle)
    assert not (out / "data").exists()  # the data stage wrote nothing


def test_bad_image_through_the_real_command(tmp_path):
    """The same as a user sees it: a process, exit status 2, one line, no traceback."""
    root = _folder(tmp_path / "ds")
    bad = _truncated("jpg")(root / "train" / "b" / "bad")
    out = tmp_path / "run"
    env = {**os.environ, "CGD_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "cgd", "score", "--data", f"imagefolder:{root}", "--out", str(out), *SCORE],
                       capture_output=True, text=True, env=env, timeout=300)
    _assert_refused(r.returncode, r.stderr, out, tmp_path / "cache", str(bad), "cannot decode image")
    assert r.stderr.strip().splitlines()[-1].startswith("cgd: error:")


def test_unusual_image_modes_are_converted_and_the_run_succeeds(tmp_path, cache, capsys):
    root = _folder(tmp_path / "ds")
    a = root / "train" / "a"
    _img(a / "grey.png", np.full((16, 16), 90, np.uint8))  # L
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = (10, 20, 30), 128
    _img(a / "rgba.png", rgba)  # RGBA
    _img(a / "sixteen.png", np.full((16, 16), 65535, np.uint16))  # 16-bit greyscale, full range
    _img(a / "palette.gif", np.full((16, 16, 3), (200, 40, 40), np.uint8))
    Image.fromarray(np.full((16, 16, 3), 77, np.uint8)).convert("CMYK").save(a / "cmyk.jpg", quality=95)
    _img(a / "large.png", np.full((48, 40, 3), 120, np.uint8))  # other size: resized
    (a / "notes.txt").write_text("not an image")
    (root / "test" / "b" / "Thumbs.db").write_bytes(b"\0\1\2")
    out = tmp_path / "run"
    rc, err = _cli(capsys, "score", "--data", f"imagefolder:{root}", "--out", out, *SCORE)
    assert rc == 0, err
    run = RunDir(out)
    x = run.load_array("data/train_x.npy")
    assert x.shape == (18, 16, 16, 3)
    names = sorted(p.name for p in a.iterdir() if p.suffix != ".txt")
    row = {n: x[i] for i, n in enumerate(names)}
    assert (row["grey.png"] == 90).all() and (row["sixteen.png"] == 255).all() and (row["large.png"] == 120).all()
    assert (row["rgba.png"] == (10, 20, 30)).all() and abs(int(row["cmyk.jpg"].mean()) - 77) <= 2
    assert np.isfinite(run.load_array("clip_logits.npy")).all()
    notes = run.read_run()["dataset"]["notes"]
    assert any("skipped non-image files: 1 in train, 1 in test" in n for n in notes), notes
    assert json.loads((out / "status.json").read_text())["state"] == "done"
    _assert_nothing_half_written(out, cache)
    # the same folder, refusing stray files
    out2 = tmp_path / "run2"
    rc, err = _cli(capsys, "score", "--data", f"imagefolder:{root}", "--out", out2, "--on-bad-files", "error", *SCORE)
    _assert_refused(rc, err, out2, cache, str(a / "notes.txt"), "not an image file")


def test_npz_labels_out_of_range(tmp_path, cache, capsys):
    x = np.random.default_rng(0).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    y = np.arange(20) % 2
    y[7] = 5
    f = tmp_path / "d.npz"
    np.savez(f, x=x, y=y, classes=np.array(["a", "b"]), x_test=x[:6], y_test=y[:6] % 2)
    rc, err = _cli(capsys, "score", "--data", f"npz:{f}", "--out", tmp_path / "run", *SCORE)
    _assert_refused(rc, err, tmp_path / "run", cache, f"{f}[y]", "label 5 out of range [0, 2)")
    y[7] = -1
    np.savez(f, x=x, y=y, x_test=x[:6], y_test=y[:6] % 2)
    rc, err = _cli(capsys, "score", "--data", f"npz:{f}", "--out", tmp_path / "run2", *SCORE)
    _assert_refused(rc, err, tmp_path / "run2", cache, f"{f}[y]", "label -1 out of range")


@pytest.fixture()
def npz_data(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    x = np.clip(np.where(y[:, None, None, None] == 0, 60, 190) + rng.normal(0, 20, (40, 16, 16, 3)), 0, 255).astype(np.uint8)
    f = tmp_path / "d.npz"
    np.savez(f, x=x, y=y, classes=np.array(["a", "b"]), x_test=x[:10], y_test=y[:10])
    return f


def _small_cnn_checkpoint(path: Path, k: int = 2, edit=None) -> Path:
    from safetensors.torch import load_file, save_file

    from cgd.models import build_model, save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(build_model("small-cnn", k), path, "small-cnn", [str(i) for i in range(k)])
    if edit is not None:
        state = load_file(str(path))
        edit(state)
        save_file(state, str(path), metadata={"arch": "small-cnn", "num_classes": str(k)})
    return path


def _nan_first_conv(state):
    name = next(n for n, t in state.items() if t.ndim == 4)
    state[name][0, 0, 0, 0] = float("nan")


CHECKPOINTS = {
    "nan-weights": (lambda p: _small_cnn_checkpoint(p, edit=_nan_first_conv), "hold NaN or infinite values"),
    "wrong-class-count": (lambda p: _small_cnn_checkpoint(p, k=3), "checkpoint has 3 classes, the dataset has 2"),
    "wrong-shape": (lambda p: _small_cnn_checkpoint(p, edit=lambda s: s.__setitem__("linear.weight", torch.zeros(2, 7))),
                    "wrong shapes: linear.weight (2, 7)"),
    "not-a-checkpoint": (lambda p: (p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage"), p)[1], "model.safetensors"),
}


@pytest.mark.parametrize("fault", sorted(CHECKPOINTS))
def test_bad_model_to_repair_is_refused(fault, npz_data, tmp_path, cache, capsys):
    make, needle = CHECKPOINTS[fault]
    ckpt = make(tmp_path / "model.safetensors")
    out = tmp_path / "run"
    rc, err = _cli(capsys, "run", "--data", f"npz:{npz_data}", "--model", ckpt, "--out", out, *RUN)
    _assert_refused(rc, err, out, cache, str(ckpt), needle)
    assert not (out / "models" / "victim.safetensors").exists()
    assert RunDir(out).load_array("data/train_x.npy").shape == (40, 16, 16, 3)  # the data stage before it is whole


def test_nan_reference_logits_are_refused(npz_data, tiny_clip, tmp_path, cache, capsys):
    """A CLIP checkpoint with NaN weights: the reference stage stops before saving a single chunk."""
    import open_clip
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in open_clip.create_model(tiny_clip).state_dict().items()}
    state["visual.proj"] = torch.full_like(state["visual.proj"], float("nan"))
    ckpt = tmp_path / "clip-nan.safetensors"
    save_file(state, str(ckpt))
    out = tmp_path / "run"
    rc, err = _cli(capsys, "score", "--data", f"npz:{npz_data}", "--checkpoint", ckpt, "--out", out, *SCORE)
    _assert_refused(rc, err, out, cache, str(ckpt), "NaN or infinite logits for 40 of 40 images")
    assert not list((out / "chunks" / "reference").glob("*.npz")) and not (out / "clip_logits.npy").exists()


def test_data_root_flag_reaches_the_loader(tmp_path, cache, capsys, monkeypatch):
    """A BackdoorBench record moved away from its clean data: refused by name, then found with --data-root."""
    from test_backdoorbench import make_cifar_record

    monkeypatch.delenv("CGD_DATA_ROOT", raising=False)
    rec_dir, d = make_cifar_record(tmp_path)
    moved = tmp_path / "elsewhere" / "record"
    moved.parent.mkdir()
    rec_dir.rename(moved)
    clean = tmp_path / "BackdoorBench" / "data" / "cifar10"
    rc, err = _cli(capsys, "score", "--data", f"backdoorbench:{moved}", "--out", tmp_path / "run", *SCORE)
    _assert_refused(rc, err, tmp_path / "run", cache, "cifar10", "CGD_DATA_ROOT")
    out = tmp_path / "run2"
    rc, err = _cli(capsys, "score", "--data", f"backdoorbench:{moved}", "--data-root", clean, "--out", out, *SCORE)
    assert rc == 0, err
    info = RunDir(out).read_run()
    assert info["config"]["data_root"] == str(clean) and info["dataset"]["n_train"] == 40
    np.testing.assert_array_equal(RunDir(out).load_array("data/poison_mask.npy").nonzero()[0], d["p_idx"])
    # the data stage's key follows the clean-data folder
    from cgd.pipeline import RunConfig

    assert RunConfig().data_root is None and RunConfig().on_bad_files == "skip"


def test_stale_temp_files_are_removed_when_a_job_starts(npz_data, tmp_path):
    """Temp files of a killed writer go when the next job takes the run lock; a live writer's stay."""
    from cgd.pipeline import RunConfig, run_pipeline
    from cgd.runs import remove_stale_temps

    run = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [run / "data" / f".train_x.npy.tmp{dead.pid}", run / "chunks" / "reference" / "000000000.tmp.npz",
             run / "models" / f"victim.safetensors.tmp{dead.pid}", run / f".run.json.tmp{dead.pid}"]
    live = run / "exports" / f".scores.csv.tmp{os.getppid()}"  # a live process's temp file is kept
    for f in stale + [live]:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"partial")
    run_pipeline(RunConfig.from_flat(data=f"npz:{npz_data}", out=str(run), device="cpu"), stages=("data",), progress_bars=False)
    assert not any(f.exists() for f in stale) and live.exists()
    assert RunDir(run).load_array("data/train_x.npy").shape == (40, 16, 16, 3)
    assert remove_stale_temps(run, recursive=True) == []  # idempotent; the live one still kept


# ------------------------------------------------------------------------------------------------
# properties of the loss and score functions
# ------------------------------------------------------------------------------------------------

@st.composite
def _batches(draw):
    b, k = draw(st.integers(1, 24)), draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0, 300.0]))
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, k, generator=g) * scale
    reference = torch.randn(b, k, generator=g) * draw(st.sampled_from([0.1, 1.0, 30.0, 100.0]))
    labels = torch.randint(0, k, (b,), generator=g)
    mode = draw(st.sampled_from(["mixed", "all_clean", "all_suspect"]))
    suspect = {"mixed": torch.rand(b, generator=g) < 0.5, "all_clean": torch.zeros(b, dtype=torch.bool),
               "all_suspect": torch.ones(b, dtype=torch.bool)}[mode]
    return student, reference, labels, suspect


@settings(max_examples=80, deadline=None)
@given(batch=_batches(), t=st.floats(0.5, 10.0), alpha=st.floats(0.0, 1.0), beta=st.floats(0.0, 1.0))
def test_guided_losses_properties(batch, t, alpha, beta):
    from cgd.retrain import guided_losses

    student, reference, labels, suspect = batch
    out = guided_losses(student, reference, labels, suspect, temperature=t, alpha=alpha, beta=beta)
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values()), out
    expect = out["ce"] + alpha * out["kl"] + beta * out["unlearn"]
    assert torch.allclose(out["total"], expect, rtol=1e-5, atol=1e-5)
    assert out["ce"] >= 0
    assert out["kl"] >= -1e-4 * max(1.0, float(out["kl"].abs()))  # a divergence (rounding aside)
    assert out["unlearn"] <= 0  # mean log-probability
    if not suspect.any():
        assert out["kl"] == 0 and out["unlearn"] == 0
    if suspect.all():
        assert out["ce"] == 0
    if suspect.any() and torch.equal(student[suspect], reference[suspect]):
        assert abs(float(out["kl"])) < 1e-4
    # gradients exist and are finite for every sample that takes part
    s = student.clone().requires_grad_(True)
    guided_losses(s, reference, labels, suspect, temperature=t, alpha=alpha, beta=beta)["total"].backward()
    assert torch.isfinite(s.grad).all()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 40), k=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_label_nll_properties(n, k, seed, scale):
    from cgd.separation import label_nll

    rng = np.random.default_rng(seed)
    logits = rng.normal(0, scale, (n, k))
    y = rng.integers(0, k, n)
    nll = label_nll(logits, y)
    assert nll.shape == (n,) and np.isfinite(nll).all() and (nll >= 0).all()
    if k == 1:  # a single class: probability 1
        np.testing.assert_allclose(nll, 0.0, atol=1e-12)
    # shifting every logit of a sample by a constant changes nothing
    np.testing.assert_allclose(label_nll(logits + rng.normal(0, 50, (n, 1)), y), nll, atol=1e-6 * max(1.0, scale))
    # probabilities of the label, summed over the labels, are 1
    if n:
        total = sum(np.exp(-label_nll(logits, np.full(n, c))) for c in range(k))
        np.testing.assert_allclose(total, 1.0, rtol=1e-9)


def test_label_nll_one_sample_and_empty():
    from cgd.separation import label_nll

    np.testing.assert_allclose(label_nll(np.array([[0.0, 0.0]]), np.array([1])), [np.log(2)])
    assert label_nll(np.zeros((0, 3)), np.zeros(0, np.int64)).shape == (0,)
    with pytest.raises(ValueError, match="labels must lie in"):
        label_nll(np.zeros((1, 1)), np.array([1]))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), k=st.integers(1, 5), frac=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_oversample_properties(n, k, frac, seed):
    from cgd.separation import oversample_per_class

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    idx = np.sort(rng.permutation(n)[: int(round(frac * n))])
    out = oversample_per_class(idx, labels, seed)
    np.testing.assert_array_equal(out, oversample_per_class(idx, labels, seed))  # seeded
    if len(idx) == 0:  # every sample suspect: no clean subset at all
        assert len(out) == 0
        return
    present, counts = np.unique(labels[idx], return_counts=True)
    assert set(np.unique(out)) == set(idx)  # every clean sample kept, nothing else added
    got = np.bincount(labels[out], minlength=k)
    assert (got[present] == counts.max()).all() and got.sum() == len(present) * counts.max()
    for c in present:  # within a class, repeats differ by at most one
        reps = np.bincount(out[labels[out] == c])
        reps = reps[reps > 0]
        assert reps.max() - reps.min() <= 1


def test_oversample_one_sample_and_single_class():
    from cgd.separation import oversample_per_class

    np.testing.assert_array_equal(oversample_per_class(np.array([3]), np.zeros(5, np.int64)), [3])
    out = oversample_per_class(np.array([0, 2, 4]), np.zeros(5, np.int64), seed=1)
    assert sorted(out) == [0, 2, 4]


def test_retraining_with_every_sample_suspect(tmp_path):
    """An empty clean subset: the clean term is 0 throughout and retraining still runs."""
    from cgd.models import build_model
    from cgd.retrain import RetrainConfig, guided_retrain

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
    y = np.arange(32) % 2
    torch.manual_seed(0)
    model = build_model("small-cnn", 2)
    ref = rng.normal(0, 1, (32, 2)).astype(np.float32)
    cfg = RetrainConfig(epochs=1, max_batches=2, batch_size=16, precision="fp32", log_every=1)
    evs = list(guided_retrain(model, x, y, np.zeros(0, np.int64), np.arange(32), ref, lambda m: {"ca": 50.0, "asr": 0.0, "ra": 0.0},
                              cfg, "cpu"))
    batches = [e for e in evs if e["kind"] == "batch"]
    assert batches and all(e["ce"] == 0 and np.isfinite(e["loss"]) and e["unlearn"] <= 0 for e in batches)


# ------------------------------------------------------------------------------------------------
# SIGKILL during the data stage and during suspicious training
# ------------------------------------------------------------------------------------------------

def _score_cmd(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "cgd", "score", "--data", f"imagefolder:{data}", "--subset", "300", "--out", str(out),
            "--reference", "clip:tiny-clip", "--clip-config", TINY, "--pretrained", "none", "--chunk-size", "100",
            "--device", "cpu", "--precision", "fp32", "--arch", "small-cnn", "--suspicious-runs", "2",
            "--suspicious-epochs", "2", "--quiet"]


def _env(cache: Path) -> dict:
    return {**os.environ, "CGD_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def _kill_when(cmd, env, out: Path, predicate, timeout: float = 300) -> tuple[bool, int]:
    """Run cmd; SIGKILL it as soon as predicate() holds. Meanwhile run.json / status.json must
    parse on every look. Returns (killed, number of looks at a present run.json)."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    looks, t0 = 0, time.time()
    try:
        while p.poll() is None and time.time() - t0 < timeout:
            for name in ("run.json", "status.json"):
                try:
                    text = (out / name).read_text()
                except FileNotFoundError:
                    continue
                json.loads(text)  # never half-written
                looks += 1
            if predicate():
                p.send_signal(signal.SIGKILL)
                p.wait()
                return True, looks
            time.sleep(0.002)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
    return False, looks


def _finish(cmd, env):
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def kill_data():
    from test_memory import shared_imagefolder

    return shared_imagefolder()  # 10,000 JPEGs: decoding them takes long enough to be interrupted


def _same_results(a: Path, b: Path) -> None:
    for name in ("data/train_x.npy", "data/train_y.npy", "data/test_x.npy", "clip_logits.npy", "embeddings.npy",
                 "model_logits.npy"):
        np.testing.assert_array_equal(np.load(a / name), np.load(b / name), err_msg=name)
    ra, rb = RunDir(a).read_run(), RunDir(b).read_run()
    assert ra["dataset"]["fingerprint"] == rb["dataset"]["fingerprint"]
    assert {k: v["key"] for k, v in ra["stages"].items()} == {k: v["key"] for k, v in rb["stages"].items()}


def test_kill_during_data_stage_and_suspicious_training_then_resume(kill_data, tmp_path, monkeypatch):
    """`cgd score` SIGKILLed while decoding the images, run again and SIGKILLed while training the second
    suspicious model, run a third time: the results equal an uninterrupted run's, bit for bit."""
    out, cache = tmp_path / "killed", tmp_path / "cache"  # a fresh cache: the data stage decodes every file
    cmd, env = _score_cmd(kill_data, out), _env(cache)

    def decoding():
        return cache.is_dir() and any(TEMP.search(p.name) for p in cache.iterdir())

    killed, looks = _kill_when(cmd, env, out, decoding)
    assert killed, "the job finished before it could be killed"
    assert looks > 0
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "running" and status["stage"] == "data"
    assert "data" not in RunDir(out).read_run().get("stages", {})
    assert not (out / "data" / "train_x.npy").exists()
    assert [p for p in cache.iterdir() if TEMP.search(p.name)], "the kill should have left a partial decode behind"

    first = out / "models" / "suspicious_0.safetensors"
    sidecar = out / "models" / "suspicious_0.json"  # written after the weights: the first model is complete
    killed, _ = _kill_when(cmd, env, out, lambda: sidecar.exists())
    assert killed, "the job finished before it could be killed"
    assert not (out / "model_logits.npy").exists() and not (out / "models" / "suspicious_1.safetensors").exists()
    assert RunDir(out).read_run()["stages"]["data"]["done"]  # the data stage was redone, whole
    assert json.loads((out / "status.json").read_text())["state"] == "running"
    assert not [p for p in cache.iterdir() if TEMP.search(p.name)]  # the partial decode was removed, never read
    mtime = first.stat().st_mtime_ns
    _finish(cmd, env)
    assert first.stat().st_mtime_ns == mtime  # the finished suspicious model was reused, not retrained
    assert json.loads((out / "status.json").read_text())["state"] == "done"
    _assert_nothing_half_written(out, cache)

    # the uninterrupted run, in this process (one thread, as the jobs above)
    ref = tmp_path / "uninterrupted"
    monkeypatch.setenv("CGD_CACHE", str(tmp_path / "cache2"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([str(a) for a in _score_cmd(kill_data, ref)[3:]]) == 0
    finally:
        torch.set_num_threads(threads)
    _same_results(out, ref)
