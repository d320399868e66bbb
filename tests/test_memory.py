"""Scoring runs in bounded memory: ImageFolder -> memory-mapped decode cache -> run folder -> reference logits.

The fast tests check, at a small scale, that the images come back memory-mapped and that the
streamed results equal the in-memory path. The slow test scores 200,000 JPEGs with the tiny CLIP in
a subprocess and asserts that its peak resident memory stays far below the size of the decoded set.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cgd.data import ImageSet, decode_images, iter_row_chunks, load_splits, release_pages
from cgd.pipeline import RunConfig, load_run_data, run_pipeline
from cgd.runs import NpyWriter, RunDir, save_npy

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "data" / "tiny-clip.json")


def make_imagefolder(root: Path, n_train: int, n_test: int, size: int, classes: int = 10, seed: int = 0) -> Path:
    """``root/{train,test}/c<k>/<i>.jpg``: a class colour plus per-image noise, ``size`` x ``size``.

    Written once: a marker file records the parameters, and a folder with other parameters (or an
    unfinished one) is rebuilt. JPEG encoding runs in a thread pool (PIL releases the GIL)."""
    import shutil

    params = {"n_train": n_train, "n_test": n_test, "size": size, "classes": classes, "seed": seed}
    marker = root / ".complete.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    final, root = root, root.with_name(f"{root.name}.partial{os.getpid()}")  # built aside, renamed when complete
    shutil.rmtree(root, ignore_errors=True)
    base = np.random.default_rng(seed).integers(40, 216, (classes, 3))
    jobs = []
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
        jobs += [(split, lo, min(lo + 2000, n)) for lo in range(0, n, 2000)]

    def work(job):
        split, lo, hi = job
        rng = np.random.default_rng([seed, lo, split == "test"])
        noise = rng.integers(-40, 41, (hi - lo, size, size, 3))
        for i in range(lo, hi):
            c = i % classes
            img = np.clip(base[c] + noise[i - lo], 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / split / f"c{c}" / f"{i:07d}.jpg", quality=90)

    with ThreadPoolExecutor(4) as ex:
        list(ex.map(work, jobs))
    (root / ".complete.json").write_text(json.dumps(params))
    shutil.rmtree(final, ignore_errors=True)
    try:
        root.rename(final)
    except OSError:  # another process finished the same folder first
        shutil.rmtree(root, ignore_errors=True)
    return final


def generated_data_dir() -> Path:
    """Write-once folder for generated test images, outside the repository ($CGD_TEST_DATA)."""
    return Path(os.environ.get("CGD_TEST_DATA", Path(tempfile.gettempdir()) / "cgd-test-data"))


def shared_imagefolder(n_train: int = 10_000, n_test: int = 200, size: int = 16) -> Path:
    """A generated ImageFolder (10 classes) in :func:`generated_data_dir`, made once and reused."""
    return make_imagefolder(generated_data_dir() / f"imagefolder-{n_train}-{n_test}-{size}px", n_train, n_test, size)


def _files(split_root: Path) -> list[Path]:
    return [f for c in sorted(d for d in split_root.iterdir() if d.is_dir()) for f in sorted(c.iterdir())]


def test_loader_returns_memmap_equal_to_in_memory_decode(tmp_path, monkeypatch):
    monkeypatch.setenv("CGD_CACHE", str(tmp_path / "cache"))
    folder = shared_imagefolder()
    train, test = load_splits(f"imagefolder:{folder}")
    assert isinstance(train.images, np.memmap) and train.images.mode == "r" and not train.images.flags.writeable
    assert isinstance(test.images, np.memmap) and train.images.shape == (10_000, 16, 16, 3)
    files = _files(folder / "train")
    for i in range(0, len(files), 997):  # the old path: PIL straight into memory
        np.testing.assert_array_equal(train.images[i], np.asarray(Image.open(files[i]).convert("RGB")))
    in_memory = np.array(train.images)
    assert not isinstance(in_memory, np.memmap)
    np.testing.assert_array_equal(decode_images(files[:500]), in_memory[:500])
    assert train.fingerprint() == ImageSet(in_memory, train.labels, train.classes).fingerprint()
    cache = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert all(not n.startswith(".") and ".tmp" not in n for n in cache), cache  # no temp file left behind
    assert sum(n.endswith(".x.npy") for n in cache) == 2  # train and test pixels

    # the data stage copies it into the run folder in chunks; the run's images load memory-mapped
    run_pipeline(RunConfig.from_flat(data=f"imagefolder:{folder}", out=str(tmp_path / "run"), device="cpu"),
                 stages=("data",), progress_bars=False)
    d = load_run_data(RunDir(tmp_path / "run"))
    assert isinstance(d.train.images, np.memmap)
    np.testing.assert_array_equal(np.asarray(d.train.images), in_memory)
    assert RunDir(tmp_path / "run").read_run()["dataset"]["fingerprint"] == train.fingerprint()


def test_large_subsets_of_a_memmap_stay_on_disk(tmp_path, monkeypatch):
    """A root without train/ and test/: the held-out split and the rest are gathered into unlinked
    temp files, not memory, and the run holds exactly the rows the in-memory path would."""
    import cgd.data as data

    monkeypatch.setenv("CGD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SPILL_BYTES", 256 * 768)  # small here; 64 MiB by default
    root = shared_imagefolder() / "train"
    full, _ = load_splits(f"imagefolder:{root}")
    idx = np.random.default_rng(0).permutation(len(full))[:3000]
    sub = full.subset(idx)
    assert isinstance(sub.images, np.memmap) and sub.images.filename is None
    np.testing.assert_array_equal(np.asarray(sub.images), np.asarray(full.images)[idx])
    assert isinstance(full.subset(idx[:200]).images, np.memmap) is False  # small: plain indexing
    run_pipeline(RunConfig.from_flat(data=f"imagefolder:{root}", out=str(tmp_path / "run"), device="cpu", subset=5000),
                 stages=("data",), progress_bars=False)
    d = load_run_data(RunDir(tmp_path / "run"))
    assert len(d.train) == 5000 and len(d.test) == 1000  # holdout 10 %, then --subset
    np.testing.assert_array_equal(np.asarray(d.train.images), np.asarray(full.images)[d.source_index])
    np.testing.assert_array_equal(d.train.labels, full.labels[d.source_index])
    assert not [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # nothing named left


def test_scoring_streams_and_equals_in_memory_path(tiny_clip, tmp_path, monkeypatch):
    """data + reference on a memory-mapped set == the reference scoring the whole set in memory."""
    import torch

    from cgd.scoring import classnames_templates
    from cgd.reference import make_reference

    monkeypatch.setenv("CGD_CACHE", str(tmp_path / "cache"))
    root = make_imagefolder(tmp_path / "f", 600, 100, 16)
    cfg = RunConfig.from_flat(data=f"imagefolder:{root}", out=str(tmp_path / "run"), reference=f"clip:{tiny_clip}", clip_config=TINY,
                    pretrained="none", device="cpu", precision="fp32", chunk_size=256, score_batch_size=64)
    info = run_pipeline(cfg, stages=("data", "reference"), progress_bars=False)
    assert set(info["stages"]) == {"data", "reference"}  # scoring needs no trained model
    run = RunDir(cfg.out)
    d = load_run_data(run)
    x = decode_images(_files(root / "train"))  # the old path: everything in memory
    names, templates = classnames_templates(cfg, d.dataset_kind, d.train.classes)
    torch.manual_seed(cfg.seed)
    ref = make_reference(cfg.reference.spec, names, templates, pretrained=None, device="cpu", precision="fp32", batch_size=64)
    want = ref.score(x)
    np.testing.assert_allclose(run.load_array("clip_logits.npy"), want.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run.load_array("embeddings.npy"), want.embeddings, rtol=1e-5, atol=1e-6)
    assert run.load_array("clip_logits.npy").dtype == np.float32
    zs = float((want.logits.argmax(1) == d.train.labels).mean())
    assert info["stages"]["reference"]["zero_shot_acc"] == pytest.approx(zs)


def test_npy_writer_streams_and_is_atomic(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (1000, 8, 8, 3), dtype=np.uint8)
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    save_npy(tmp_path / "a.npy", a)
    assert (tmp_path / "a.npy").read_bytes() == buf.getvalue()  # byte-for-byte np.save
    # from a memory map, in chunks, rows written out of order by write_at
    m = np.load(tmp_path / "a.npy", mmap_mode="r")
    with NpyWriter(tmp_path / "b.npy", m.shape, m.dtype) as w:
        for start, stop, block in reversed(list(iter_row_chunks(m, max_bytes=64 * 192))):
            w.write_at(start, block)
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), a)
    # an error half way leaves neither the target nor a temp file; the old target stays intact
    with pytest.raises(RuntimeError):
        with NpyWriter(tmp_path / "a.npy", (10, 3), np.float32) as w:
            w.write(np.zeros((5, 3), np.float32))
            raise RuntimeError("boom")
    with pytest.raises(ValueError, match="5 of 10 rows written"):
        with NpyWriter(tmp_path / "a.npy", (10, 3), np.float32) as w:
            w.write(np.zeros((5, 3), np.float32))
    with pytest.raises(ValueError, match="rows of shape"):
        with NpyWriter(tmp_path / "c.npy", (10, 3), np.float32) as w:
            w.write(np.zeros((5, 4), np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "b.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), a)
    release_pages(a)  # in-memory arrays: a no-op, the data stays
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), a)


def _vm(pid_status: str, key: str) -> int:
    for line in pid_status.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def test_released_pages_leave_resident_memory_flat(tmp_path):
    """Walking a 256 MiB memory map with iter_row_chunks keeps RSS flat (the pages are released)."""
    script = textwrap.dedent(f"""
        import json, numpy as np
        from cgd.data import iter_row_chunks
        from cgd.runs import NpyWriter
        n = 4096
        with NpyWriter({str(tmp_path / 'big.npy')!r}, (n, 256, 256), np.uint8) as w:
            for i in range(0, n, 256):
                w.write(np.full((256, 256, 256), i // 256, np.uint8))
        st = lambda: open("/proc/self/status").read()
        rss = lambda k: int(next(l for l in st().splitlines() if l.startswith(k + ":")).split()[1]) * 1024
        base = rss("VmRSS")
        m = np.load({str(tmp_path / 'big.npy')!r}, mmap_mode="r")
        total = sum(int(b[:, 0, 0].sum()) for _, _, b in iter_row_chunks(m, max_bytes=16 << 20))
        for _, _, b in iter_row_chunks(m):
            b.max()
        print(json.dumps({{"base": base, "hwm": rss("VmHWM"), "total": total}}))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["total"] == sum((i // 256) * 256 for i in range(0, 4096, 256))
    assert out["hwm"] - out["base"] < 96 << 20, out  # the whole map is 256 MiB


# ------------------------------------------------------------------------------------------------
# 200,000 images (slow)
# ------------------------------------------------------------------------------------------------

_MEASURE = """
import json, os, sys, time
import open_clip
from cgd.pipeline import RunConfig, run_pipeline

def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

open_clip.add_model_config(sys.argv[3])
base = rss("VmRSS")
t0 = time.time()
cfg = RunConfig.from_flat(data="imagefolder:" + sys.argv[1], out=sys.argv[2], reference="clip:tiny-clip", clip_config=sys.argv[3],
                pretrained="none", device="cpu", precision="fp32")
info = run_pipeline(cfg, stages=("data", "reference"), progress_bars=False)
print(json.dumps({"base": base, "hwm": rss("VmHWM"), "seconds": time.time() - t0,
                  "stages": {k: v["seconds"] for k, v in info["stages"].items()}}))
"""


@pytest.mark.slow
def test_scoring_200k_images_in_bounded_memory(tmp_path):
    """Peak RSS of data+reference on 200,000 images minus that on 8,192 images (same code paths, the
    reference compiled in both when it compiles at all) must stay far below the decoded set's size."""
    n, size = 200_000, 32
    raw = n * size * size * 3  # the decoded training set: 614 MB

    def measure(root: Path, name: str) -> dict:
        env = {**os.environ, "CGD_CACHE": str(tmp_path / f"cache-{name}"),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        r = subprocess.run([sys.executable, "-c", _MEASURE, str(root), str(tmp_path / f"run-{name}"), TINY],
                           capture_output=True, text=True, env=env, timeout=3600)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    small = measure(shared_imagefolder(8_192, 1_000, size), "small")
    big = measure(shared_imagefolder(n, 1_000, size), "big")
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    print(f"\ndata+reference stages, tiny CLIP, {size}x{size} JPEGs (decoded 200k set: {mib(raw)}):"
          f"\n  200,000 images: peak RSS {mib(big['hwm'])} (after imports {mib(big['base'])}), {big['seconds']:.0f} s {big['stages']}"
          f"\n    8,192 images: peak RSS {mib(small['hwm'])} (after imports {mib(small['base'])}), {small['seconds']:.0f} s"
          f"\n  growth with N: {mib(big['hwm'] - small['hwm'])}")
    run = RunDir(tmp_path / "run-big")
    lg = run.load_array("clip_logits.npy", mmap=True)
    assert lg.shape == (n, 10) and np.isfinite(lg[::997]).all()
    assert run.load_array("data/train_x.npy", mmap=True).shape == (n, size, size, 3)
    # an in-memory load alone would add the whole decoded set (the old path held 2-3 copies); what
    # grows with N here is the list of file names and labels (~100 bytes per image)
    assert big["hwm"] - small["hwm"] < raw / 5, (small, big)
    assert big["hwm"] - big["base"] < raw / 2, big  # reference model, compiled graph, one chunk: constant
