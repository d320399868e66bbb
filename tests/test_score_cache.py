"""The shared reference-score cache (cgd.score_cache): digests, keys, entries on disk, LRU, CLI."""
from __future__ import annotations

import multiprocessing as mp
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from cgd.score_cache import (STALE_TEMP_S, ScoreCache, cache_main, file_digest, image_digest, score_key,
                             validate_key)

NAMES = ["airplane", "automobile", "bird"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}."]


def _images(n: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def _scores(n: int = 64, k: int = 3, d: int = 16, seed: int = 0, emb_dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    return r.normal(size=(n, k)).astype(np.float32), r.normal(size=(n, d)).astype(emb_dtype)


def _key(i: int = 0, **kw) -> str:
    args = dict(images_digest=image_digest(_images(seed=i)), model="ViT-B-32", weights="laion2b_s34b_b79k",
                classnames=NAMES, templates=TEMPLATES, precision="bf16", extra={"kind": "clip"})
    args.update(kw)
    return score_key(**args)


# ---------------------------------------------------------------------------- digests and keys

def test_image_digest_sees_one_pixel_and_the_shape():
    x = _images()
    d = image_digest(x)
    assert d == image_digest(x.copy()) and len(d) == 32 and validate_key(d) == d
    y = x.copy()
    y[17, 3, 5, 2] ^= 1
    assert image_digest(y) != d
    assert image_digest(x.reshape(32, 16, 8, 3)) != d  # same bytes, other shape
    assert image_digest(x[::-1]) != d  # order matters (scores are per row)
    assert image_digest(x[:, ::2]) == image_digest(x[:, ::2].copy())  # a strided view hashes as its copy


def test_image_digest_of_a_memory_map_equals_in_memory(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (3000, 32, 32, 3), dtype=np.uint8)  # 9 MB
    np.save(tmp_path / "x.npy", x)
    m = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert isinstance(m, np.memmap)
    assert image_digest(m) == image_digest(x)
    import cgd.score_cache as sc
    old = sc._HASH_CHUNK
    try:  # many chunks (pages released between them) give the same digest
        sc._HASH_CHUNK = 100 * 32 * 32 * 3 + 7
        assert image_digest(m) == image_digest(x)
    finally:
        sc._HASH_CHUNK = old


def test_file_digest_follows_content(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.bin"
    data = os.urandom(3 << 20)
    a.write_bytes(data)
    b.write_bytes(data)
    assert file_digest(a) == file_digest(b)
    b.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert file_digest(a) != file_digest(b)
    with pytest.raises(OSError, match="missing.pt"):
        file_digest(tmp_path / "missing.pt")


def test_keys_differ_for_everything_that_changes_the_numbers():
    base = _key()
    assert base == _key() and validate_key(base) == base
    assert _key(extra={"kind": "clip"}) == _key(extra=dict([("kind", "clip")]))
    variants = [
        _key(1),
        _key(model="ViT-B-16"),
        _key(weights="openai"),
        _key(weights=file_digest(__file__)),
        _key(classnames=NAMES[::-1]),  # column order
        _key(classnames=NAMES + ["cat"]),
        _key(templates=TEMPLATES[:1]),
        _key(precision="fp32"),
        _key(extra={"kind": "classifier"}),
        _key(extra={"kind": "clip", "clip_config": "ab" * 16}),
        _key(weights="random", extra={"seed": 0}),
        _key(weights="random", extra={"seed": 1}),
    ]
    assert len(set(variants + [base])) == len(variants) + 1


def test_key_refuses_ambiguous_inputs():
    with pytest.raises(ValueError, match="seed"):
        _key(weights="random", extra={})
    with pytest.raises(ValueError, match="seed"):
        _key(weights=None, extra=None)
    with pytest.raises(ValueError, match="resolved"):
        _key(precision="auto")


@pytest.mark.parametrize("bad", ["../x", "..", "", "ABCDEF0123456789", "0123456789abcdef/..", "0123456789abcde",
                                 "/etc/passwd", "0123456789abcdeg"])
def test_key_validation_refuses_paths(tmp_path, bad):
    c = ScoreCache(tmp_path / "c", max_bytes=1 << 20)
    logits, emb = _scores()
    with pytest.raises(ValueError, match="invalid score-cache key"):
        c.get(bad)
    with pytest.raises(ValueError, match="invalid score-cache key"):
        c.put(bad, logits, emb, {})
    with pytest.raises(ValueError, match="invalid score-cache key"):
        c.clear([bad])
    assert not (tmp_path / "c").exists() and not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------- entries

def test_round_trip_and_miss(tmp_path):
    c = ScoreCache(tmp_path / "c", max_bytes=10 << 20)
    key = _key()
    assert c.get(key) is None and c.entries() == [] and c.total_bytes() == 0
    logits, emb = _scores(emb_dtype=np.float16)
    meta = {"model": "ViT-B-32", "weights": "laion2b_s34b_b79k", "describe": {"templates": TEMPLATES}, "path": tmp_path}
    path = c.put(key, logits.astype(np.float64), emb, meta)
    assert path == tmp_path / "c" / key and path.is_dir()
    got_logits, got_emb, got_meta = c.get(key)
    assert got_logits.dtype == np.float32 and got_emb.dtype == np.float16
    np.testing.assert_array_equal(got_logits, logits)
    np.testing.assert_array_equal(got_emb, emb)
    assert got_meta["describe"] == {"templates": TEMPLATES} and got_meta["path"] == str(tmp_path)
    assert not got_logits.flags.writeable  # read-only memory map
    l2, e2, _ = c.get(key, mmap=False)
    np.testing.assert_array_equal(l2, logits)
    assert type(l2) is np.ndarray
    [entry] = c.entries()
    assert entry["key"] == key and (entry["n"], entry["k"], entry["d"]) == (64, 3, 16)
    assert (entry["model"], entry["weights"]) == ("ViT-B-32", "laion2b_s34b_b79k")
    assert entry["bytes"] == c.total_bytes() == sum(f.stat().st_size for f in path.iterdir())
    assert entry["created"] <= entry["last_used"] + 1
    assert [p.name for p in (tmp_path / "c").iterdir()] == [key]  # no temp folders left
    assert c.clear() == entry["bytes"] and c.get(key) is None


def test_put_streams_a_memory_map_and_checks_arrays(tmp_path):
    logits, emb = _scores(n=500)
    np.save(tmp_path / "l.npy", logits)
    np.save(tmp_path / "e.npy", emb)
    c = ScoreCache(tmp_path / "c", max_bytes=10 << 20)
    key = _key()
    c.put(key, np.load(tmp_path / "l.npy", mmap_mode="r"), np.load(tmp_path / "e.npy", mmap_mode="r"), {})
    got_logits, got_emb, _ = c.get(key)
    np.testing.assert_array_equal(got_logits, logits)
    np.testing.assert_array_equal(got_emb, emb)
    with pytest.raises(ValueError, match="same N"):
        c.put(_key(1), logits, emb[:-1], {})
    with pytest.raises(ValueError, match="same N"):
        c.put(_key(1), logits[:, 0], emb, {})
    assert [e["key"] for e in c.entries()] == [key]


def test_put_of_an_existing_key_keeps_one_entry(tmp_path):
    c = ScoreCache(tmp_path / "c", max_bytes=10 << 20)
    key = _key()
    logits, emb = _scores()
    c.put(key, logits, emb, {"model": "a"})
    c.put(key, logits, emb, {"model": "a"})
    assert [e["key"] for e in c.entries()] == [key]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [key]


def _racer(root: str, key: str, barrier) -> None:
    logits, emb = _scores(n=2000, d=64)
    barrier.wait()
    ScoreCache(Path(root), max_bytes=64 << 20).put(key, logits, emb, {"model": "race"})


def test_concurrent_puts_of_one_key_leave_one_whole_entry(tmp_path):
    ctx = mp.get_context("fork")
    key = _key()
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_racer, args=(str(tmp_path / "c"), key, barrier)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    got = ScoreCache(tmp_path / "c", max_bytes=64 << 20).get(key)
    assert got is not None
    logits, emb = _scores(n=2000, d=64)
    np.testing.assert_array_equal(got[0], logits)
    np.testing.assert_array_equal(got[1], emb)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [key]


def test_lru_eviction_keeps_the_most_recent(tmp_path):
    logits, emb = _scores(n=1000, d=64)  # 12 + 256 KB per entry
    c = ScoreCache(tmp_path / "c", max_bytes=10 << 20)
    keys = [_key(i) for i in range(4)]
    one = None
    for k in keys[:2]:
        c.put(k, logits, emb, {"model": "m"})
        one = one or c.total_bytes()
        time.sleep(0.02)
    small = ScoreCache(tmp_path / "c", max_bytes=int(2.5 * one))  # room for two entries
    assert small.get(keys[0]) is not None  # keys[0] is now more recent than keys[1]
    time.sleep(0.02)
    small.put(keys[2], logits, emb, {"model": "m"})
    assert {e["key"] for e in small.entries()} == {keys[0], keys[2]}
    assert small.entries()[0]["key"] == keys[2]  # most recent first
    assert small.total_bytes() <= small.max_bytes
    time.sleep(0.02)
    small.put(keys[3], logits, emb, {"model": "m"})
    assert {e["key"] for e in small.entries()} == {keys[2], keys[3]}
    # the entry just written survives even when it alone nearly fills the cache
    tight = ScoreCache(tmp_path / "c", max_bytes=one + 10)
    time.sleep(0.02)
    assert tight.get(keys[2]) is not None  # most recent, but the new one must stay
    tight.put(keys[0], logits, emb, {"model": "m"})
    assert [e["key"] for e in tight.entries()] == [keys[0]]


def test_an_entry_larger_than_the_cache_is_not_stored(tmp_path):
    c = ScoreCache(tmp_path / "c", max_bytes=4096)
    logits, emb = _scores(n=1000, d=64)
    with pytest.warns(RuntimeWarning, match="exceeds the cache limit"):
        assert c.put(_key(), logits, emb, {}) is None
    assert c.get(_key()) is None and c.entries() == []
    with pytest.warns(RuntimeWarning):
        assert ScoreCache(tmp_path / "c", max_bytes=0).put(_key(), logits[:1], emb[:1], {}) is None


def _corrupt_truncated(p: Path) -> None:
    f = p / "embeddings.npy"
    f.write_bytes(f.read_bytes()[:-100])


def _corrupt_json(p: Path) -> None:
    (p / "meta.json").write_text('{"format": 1, "key": ')


def _corrupt_pickle(p: Path) -> None:
    np.save(p / "logits.npy", np.array([{"a": 1}] * 64, dtype=object).reshape(64, 1), allow_pickle=True)


def _corrupt_shape(p: Path) -> None:
    np.save(p / "logits.npy", np.zeros((63, 3), np.float32))


def _corrupt_missing(p: Path) -> None:
    (p / "logits.npy").unlink()


@pytest.mark.parametrize("corrupt", [_corrupt_truncated, _corrupt_json, _corrupt_pickle, _corrupt_shape, _corrupt_missing])
def test_a_corrupt_entry_is_a_miss_and_is_removed(tmp_path, corrupt):
    c = ScoreCache(tmp_path / "c", max_bytes=10 << 20)
    key, other = _key(0), _key(1)
    logits, emb = _scores()
    c.put(key, logits, emb, {})
    c.put(other, logits, emb, {})
    corrupt(c.path(key))
    with pytest.warns(RuntimeWarning, match="corrupt entry"):
        assert c.get(key) is None
    assert not c.path(key).exists()
    assert [e["key"] for e in c.entries()] == [other] and c.get(other) is not None
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [other]
    c.put(key, logits, emb, {})  # and can be stored again
    np.testing.assert_array_equal(c.get(key)[0], logits)


def test_a_corrupt_entry_is_replaced_by_put(tmp_path):
    c = ScoreCache(tmp_path / "c", max_bytes=10 << 20)
    key = _key()
    logits, emb = _scores()
    c.put(key, logits, emb, {})
    _corrupt_truncated(c.path(key))
    c.put(key, logits, emb, {"model": "again"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = c.get(key)
    np.testing.assert_array_equal(got[1], emb)
    assert got[2] == {"model": "again"}


def test_a_partial_temp_folder_is_never_returned(tmp_path):
    c = ScoreCache(tmp_path / "c", max_bytes=10 << 20)
    key = _key()
    logits, emb = _scores()
    c.put(key, logits, emb, {})
    # a writer killed before its rename: a complete-looking temp folder, the entry itself absent
    tmp = tmp_path / "c" / f".tmp-{key}-999-deadbeef"
    os.rename(c.path(key), tmp)
    assert c.get(key) is None and c.entries() == [] and c.total_bytes() == 0
    assert tmp.exists()  # a fresh one may be a write in progress: left alone
    old = time.time() - STALE_TEMP_S - 60
    os.utime(tmp, (old, old))
    c.entries()
    assert not tmp.exists()  # a stale one is cleaned up


# ---------------------------------------------------------------------------- environment and CLI

def test_defaults_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CGD_CACHE", str(tmp_path / "base"))
    monkeypatch.delenv("CGD_SCORE_CACHE_MB", raising=False)
    c = ScoreCache()
    assert c.root == tmp_path / "base" / "scores" and c.max_bytes == 4096 << 20
    monkeypatch.setenv("CGD_SCORE_CACHE_MB", "1.5")
    assert ScoreCache().max_bytes == int(1.5 * (1 << 20))
    monkeypatch.setenv("CGD_SCORE_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="CGD_SCORE_CACHE_MB"):
        ScoreCache()


def test_cache_main_ls_and_clear(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CGD_CACHE", str(tmp_path / "base"))
    monkeypatch.setenv("CGD_SCORE_CACHE_MB", "8")
    assert cache_main(["ls"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"total 0 B in 0 entries (limit 8.0 MB) at {tmp_path / 'base' / 'scores'}"]

    c = ScoreCache()
    k1, k2 = _key(0), _key(1)
    logits, emb = _scores(n=1000, d=64)
    c.put(k1, logits, emb, {"model": "ViT-B-32", "weights": "laion2b_s34b_b79k"})
    time.sleep(0.02)
    c.put(k2, logits[:10], emb[:10], {"model": "classifier", "weights": "ab12"})
    assert cache_main(["ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(k2) and "classifier/ab12" in lines[0] and "n=10" in lines[0]
    assert lines[1].startswith(k1) and "ViT-B-32/laion2b_s34b_b79k" in lines[1] and "n=1000" in lines[1]
    assert "KB" in lines[1] and " ago" in lines[1]
    assert lines[2].startswith("total ") and "in 2 entries" in lines[2] and "limit 8.0 MB" in lines[2]

    size1 = next(e["bytes"] for e in c.entries() if e["key"] == k1)
    assert cache_main(["clear", k1[:10]]) == 0  # a unique prefix is enough
    assert f"({size1} bytes) from 1 entries" in capsys.readouterr().out
    assert [e["key"] for e in c.entries()] == [k2]
    assert cache_main(["clear"]) == 0
    assert "freed" in capsys.readouterr().out and c.entries() == []


@pytest.mark.parametrize("argv, msg", [([], "expected a command"), (["rm"], "unknown command"),
                                       (["clear", "../x"], "invalid key"), (["clear", "0123456789abcdef"], "no cache entry"),
                                       (["ls", "extra"], "no arguments")])
def test_cache_main_errors_are_one_line(tmp_path, monkeypatch, capsys, argv, msg):
    monkeypatch.setenv("CGD_CACHE", str(tmp_path / "base"))
    assert cache_main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1 and err.startswith("cgd cache: error: ")


def test_cache_main_bad_limit_and_help(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CGD_CACHE", str(tmp_path / "base"))
    monkeypatch.setenv("CGD_SCORE_CACHE_MB", "-3")
    assert cache_main(["ls"]) == 2
    assert "CGD_SCORE_CACHE_MB" in capsys.readouterr().err
    assert cache_main(["--help"]) == 0
    assert "cgd cache ls" in capsys.readouterr().out


def test_a_second_audit_of_the_same_images_scores_nothing_and_a_changed_image_scores_again(tmp_path, monkeypatch):
    """Pipeline integration: the reference stage reads the shared cache by image content, not by path."""
    from cgd.pipeline import RunConfig, run_pipeline

    monkeypatch.setenv("CGD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CGD_SCORE_CACHE_MB", "100")
    tiny = str(Path(__file__).parent / "data" / "tiny-clip.json")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (120, 16, 16, 3), dtype=np.uint8), np.repeat(np.arange(4), 30)
    arrays = dict(x=x, y=y, x_test=x[:40], y_test=y[:40], classes=np.array(list("abcd")))
    np.savez(tmp_path / "a.npz", **arrays)
    np.savez(tmp_path / "b.npz", **arrays)  # the same images under another name
    x2 = x.copy()
    x2[7, 3, 3, 0] ^= 1  # one pixel of one image
    np.savez(tmp_path / "c.npz", **{**arrays, "x": x2})

    def score(name: str) -> dict:
        cfg = RunConfig.from_flat(data=f"npz:{tmp_path / name}", out=str(tmp_path / f"run-{name}"), reference="clip:tiny-clip",
                                  clip_config=tiny, pretrained="none", device="cpu", precision="fp32")
        return run_pipeline(cfg, stages=("data", "reference"), progress_bars=False)["stages"]["reference"]

    first, second, changed = score("a.npz"), score("b.npz"), score("c.npz")
    assert first["forward_images"] == 120 and not first["from_cache"]
    assert second["forward_images"] == 0 and second["from_cache"]
    assert changed["forward_images"] == 120 and not changed["from_cache"]
    a = np.load(tmp_path / "run-a.npz" / "clip_logits.npy")
    np.testing.assert_array_equal(a, np.load(tmp_path / "run-b.npz" / "clip_logits.npy"))
    assert [ln for ln in _ls_lines(tmp_path) if ln.strip()]


def _ls_lines(tmp_path: Path) -> list[str]:
    import contextlib
    import io

    from cgd.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["cache", "ls"]) == 0
    return buf.getvalue().splitlines()
