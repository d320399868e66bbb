"""The reference pass of a run: prompts, resumable chunked scoring, and the shared score cache.

:func:`score_reference` scores a run's training images with a reference model chunk by chunk (each
chunk saved, so a killed job resumes), streams the chunks into ``clip_logits.npy`` and
``embeddings.npy`` in constant memory, and keeps the result in the content-addressed
:class:`~cgd.score_cache.ScoreCache`: a second run over the same images with the same model,
weights, prompts and precision reads it back without one forward pass.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from . import layout
from .config import RunConfig
from .runs import NpyWriter, RunDir, read_json, write_json

__all__ = ["classnames_templates", "score_reference", "ScoreResult", "check_finite_logits"]

CIFAR10_FOLDER_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def classnames_templates(cfg: RunConfig, dataset_kind: str, classes: list[str]) -> tuple[list[str], list[str]]:
    """Prompt class names and templates: the configured ones, else the dataset's defaults (an image
    folder with CIFAR-10's class folders gets CIFAR-10's readable names)."""
    from .zero_shot_metadata import default_classnames, default_templates

    kind = dataset_kind if dataset_kind != "imagefolder" else ""
    if dataset_kind == "imagefolder" and list(classes) == CIFAR10_FOLDER_CLASSES:
        kind = "cifar10"
    names = list(cfg.reference.classnames or default_classnames(kind, classes))
    if len(names) != len(classes):
        raise ValueError(f"--classnames: {len(names)} given, the dataset has {len(classes)} classes")
    return names, list(cfg.reference.templates or default_templates(dataset_kind))


def check_finite_logits(lg: np.ndarray, what: str, start: int = 0) -> None:
    """Raise ValueError naming ``what`` and the first sample whose logits are NaN or infinite."""
    bad = ~np.isfinite(lg).all(axis=1)
    if bad.any():
        raise ValueError(f"{what}: NaN or infinite logits for {int(bad.sum())} of {len(lg)} images "
                         f"(first: sample {start + int(np.flatnonzero(bad)[0])}); the model's weights are broken")


class ScoreResult(dict):
    """{"n", "correct", "cached", "forward_images"}: what :func:`score_reference` did."""


def score_reference(run: RunDir, make_ref: Callable[[], object], images: np.ndarray, true_labels: np.ndarray,
                    key: str, chunk_size: int, what: str, progress: Callable[[int], None] = lambda done: None,
                    check_stop: Callable[[], None] = lambda: None, cache_key: str | None = None,
                    split: str = "train") -> ScoreResult:
    """Reference logits (N, K) and embeddings (N, D) of ``images`` into the run folder.

    make_ref: builds the reference (called only when some chunk must really be scored).
    images: (N, H, W, 3) uint8, may be memory-mapped; true_labels: (N,) for the accuracy count.
    key: the stage key (chunks of another key are discarded). cache_key: a
    :func:`cgd.score_cache.score_key` for the shared cache, or None to bypass it. split: "train"
    writes clip_logits.npy / embeddings.npy, "test" the test split's clip_logits_test.npy /
    embeddings_test.npy (what the verdict compares the training set against).
    """
    names = _OUTPUTS[split]
    from .data import release_pages
    from .reference import ReferenceError

    n = len(images)
    if cache_key is not None:
        hit = _from_cache(run, cache_key, n, true_labels, names)
        if hit is not None:
            progress(n)
            return hit
    chunk_dir = run.path(layout.CHUNKS, "reference" if split == "train" else f"reference-{split}")
    chunk_dir.mkdir(parents=True, exist_ok=True)
    if (read_json(chunk_dir / "key.json", {}) or {}).get("key") != key:
        for f in chunk_dir.glob("*.npz"):
            f.unlink()
        write_json(chunk_dir / "key.json", {"key": key})
    starts = list(range(0, n, chunk_size))
    ref = None
    forward = 0
    for start in starts:  # pass 1: every chunk scored and saved (a killed job resumes here)
        stop = min(start + chunk_size, n)
        cf = chunk_dir / f"{start:09d}.npz"
        if not cf.exists():
            check_stop()
            if ref is None:
                ref = make_ref()
                write_json(chunk_dir / "describe.json", ref.describe())
            part = images[start:stop]
            with warnings.catch_warnings():  # read-only memory map: the reference only reads it
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                r = ref.score(part, progress=lambda done, tot, s=start: progress(s + done))
            release_pages(part)
            forward += stop - start
            try:
                check_finite_logits(r.logits, what, start)
            except ValueError as e:
                raise ReferenceError(str(e)) from None
            tmp = cf.with_name(cf.stem + ".tmp.npz")
            np.savez(tmp, logits=r.logits, embeddings=r.embeddings)
            tmp.replace(cf)
        progress(stop)
    correct = _assemble(run, chunk_dir, starts, n, chunk_size, true_labels, names)
    describe = ref.describe() if ref is not None else read_json(chunk_dir / "describe.json", None)
    out = ScoreResult(n=n, correct=correct, cached=False, forward_images=forward, describe=describe)
    if cache_key is not None:
        _to_cache(run, cache_key, out["describe"], names)
    return out


_OUTPUTS = {"train": (layout.CLIP_LOGITS, layout.EMBEDDINGS), "test": (layout.CLIP_LOGITS_TEST, layout.EMBEDDINGS_TEST)}


def _assemble(run: RunDir, chunk_dir: Path, starts: list[int], n: int, chunk_size: int, true_labels: np.ndarray,
              names: tuple[str, str]) -> int:
    """Pass 2: stream the chunks into the two arrays (never all in memory at once); returns top-1 hits."""
    correct = 0
    emb_dtype = np.float16 if n > 200_000 else np.float32
    writers: dict[str, NpyWriter] = {}
    try:
        for start in starts:
            stop = min(start + chunk_size, n)
            with np.load(chunk_dir / f"{start:09d}.npz", allow_pickle=False) as z:
                lg, em = z["logits"].astype(np.float32, copy=False), z["embeddings"].astype(emb_dtype, copy=False)
            if not writers:
                writers = {"lg": NpyWriter(run.path(names[0]), (n, lg.shape[1]), np.float32),
                           "em": NpyWriter(run.path(names[1]), (n, em.shape[1]), emb_dtype)}
            writers["lg"].write(lg)
            writers["em"].write(em)
            correct += int((lg.argmax(1) == true_labels[start:stop]).sum())
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for w in writers.values():
        w.commit()
    return correct


def _cache():
    """The shared score cache, or None when its settings are unusable (a warning says why)."""
    from .score_cache import ScoreCache

    try:
        cache = ScoreCache()
    except ValueError as e:
        warnings.warn(f"score cache off: {e}", RuntimeWarning)
        return None
    return cache if cache.max_bytes > 0 else None  # CGD_SCORE_CACHE_MB=0: off


def _from_cache(run: RunDir, cache_key: str, n: int, true_labels: np.ndarray, names: tuple[str, str]) -> ScoreResult | None:
    cache = _cache()
    got = cache.get(cache_key) if cache is not None else None
    if got is None:
        return None
    logits, emb, meta = got
    if len(logits) != n or len(emb) != n:
        return None
    run.save_array(names[0], np.asarray(logits, np.float32))
    run.save_array(names[1], np.asarray(emb))
    correct = int((np.asarray(logits).argmax(1) == true_labels).sum())
    return ScoreResult(n=n, correct=correct, cached=True, forward_images=0, describe=meta.get("describe"))


def _to_cache(run: RunDir, cache_key: str, describe: dict | None, names: tuple[str, str]) -> None:
    cache = _cache()
    if cache is None:
        return
    try:
        cache.put(cache_key, run.load_array(names[0], mmap=True), run.load_array(names[1], mmap=True),
                         {"run": str(run.root), "describe": describe, "model": (describe or {}).get("model"),
                          "weights": (describe or {}).get("pretrained") or (describe or {}).get("checkpoint")})
    except OSError as e:  # a full or read-only cache never fails the run
        warnings.warn(f"could not store the reference scores in the score cache ({e})", RuntimeWarning)
