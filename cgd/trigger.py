"""An estimate of the backdoor's trigger, from the samples that separation flagged.

Most triggers add (or blend in) one fixed pattern: a patch, an image, a sinusoid, an optimised
perturbation. Averaged over the suspect samples of the target class, that pattern survives while
image content averages out; the mean of the other, unflagged samples gives what content alone
averages to. Their difference estimates the trigger as an additive pattern ``delta``. For a
clean-label attack the suspect samples are all images of the target class, so the difference also
holds the target class's mean look; its smooth part is removed (a high-pass: the difference minus
its Gaussian blur), which keeps patches, sinusoids and noise-like patterns and drops large blobs.

Retraining stamps ``delta`` on clean samples of other classes, labelled with their own classes, so
that the trigger stops predicting the target (:mod:`cgd.retrain`).
"""
from __future__ import annotations

import numpy as np

__all__ = ["estimate_trigger", "stamp"]


def _gauss_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """(H, W, C) float blurred along H and W with a normalised Gaussian (edge-replicated)."""
    r = max(1, int(round(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(img, ((r, r), (r, r), (0, 0)), mode="edge")
    rows = sum(k[i] * pad[i:i + img.shape[0], :, :] for i in range(2 * r + 1))
    return sum(k[i] * rows[:, i:i + img.shape[1], :] for i in range(2 * r + 1))


def _mean_rows(images: np.ndarray, idx: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Mean over ``images[idx]`` as float64 (H, W, C), read in chunks (images may be memory-mapped)."""
    acc = np.zeros(images.shape[1:], np.float64)
    for i in range(0, len(idx), chunk):
        acc += np.asarray(images[np.sort(idx[i:i + chunk])], np.float64).sum(0)
    return acc / max(len(idx), 1)


def estimate_trigger(images: np.ndarray, labels: np.ndarray, suspect: np.ndarray, target: int,
                     blur_sigma: float | None = None, min_samples: int = 10) -> np.ndarray | None:
    """The additive trigger estimate ``delta``: (H, W, 3) float32 in pixel units (0-255 scale).

    images: (N, H, W, 3) uint8; labels: (N,) given labels; suspect: (N,) bool (the suspect subset);
    target: the target class. blur_sigma: width (pixels) of the smooth part removed; default H / 8.
    Returns None when fewer than ``min_samples`` suspect samples carry the target label.
    """
    labels, suspect = np.asarray(labels), np.asarray(suspect, bool)
    s_idx = np.flatnonzero(suspect & (labels == target))
    c_idx = np.flatnonzero(~suspect & (labels != target))
    if len(s_idx) < min_samples or len(c_idx) < min_samples:
        return None
    diff = _mean_rows(images, s_idx) - _mean_rows(images, c_idx)
    sigma = blur_sigma if blur_sigma is not None else max(1.0, images.shape[1] / 8)
    delta = diff - _gauss_blur(diff, sigma)
    return delta.astype(np.float32)


def stamp(x: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``x`` (..., H, W, 3) uint8 with ``delta`` added and clipped to [0, 255]."""
    return np.clip(np.asarray(x, np.float32) + delta, 0, 255).astype(np.uint8)
