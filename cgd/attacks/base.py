"""The attack interface: poison a clean ImageSet with known ground truth, trigger test images."""
from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np

from ..data import ImageSet
from ..evaluation import BackdoorTest

__all__ = ["Attack", "CATEGORIES", "select_poison_indices"]

CATEGORIES = ("dirty-label", "clean-label", "clean-image")


def select_poison_indices(labels: np.ndarray, rate: float, target: int, seed: int,
                          clean_label: bool = False, all_to_all: bool = False) -> np.ndarray:
    """Sorted indices of the samples to poison: exactly ``round(rate * N)`` of them.

    Dirty-label all-to-one attacks draw from non-target samples; clean-label attacks from the
    target class only (capped at its size, with a warning); all-to-all from every sample.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"poison rate must lie in [0, 1], got {rate}")
    n = len(labels)
    k = int(round(rate * n))
    if clean_label:
        pool = np.flatnonzero(labels == target)
    elif all_to_all:
        pool = np.arange(n)
    else:
        pool = np.flatnonzero(labels != target)
    if k > len(pool):
        warnings.warn(f"poison rate {rate} asks for {k} samples but only {len(pool)} are eligible; poisoning {len(pool)}")
        k = len(pool)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(pool, size=k, replace=False)) if k else np.zeros(0, np.int64)


class Attack:
    """Base class. Subclasses set ``name``, ``category``, ``defaults`` and implement ``_trigger``.

    An attack instance is fully determined by (params, seed, image size): its trigger is made by
    code, seeded, so the same arguments rebuild the same trigger for test-time ASR.
    """

    name: ClassVar[str] = ""
    category: ClassVar[str] = "dirty-label"
    defaults: ClassVar[dict[str, Any]] = {}
    paper: ClassVar[str] = ""
    all_to_all: bool = False

    def __init__(self, image_size: tuple[int, int] = (32, 32), seed: int = 0, **params: Any):
        unknown = set(params) - set(self.defaults) - {"all_to_all"}
        if unknown:
            raise ValueError(f"attack {self.name!r}: unknown parameters {sorted(unknown)}; accepted: {sorted(self.defaults)}")
        self.params = {**self.defaults, **{k: v for k, v in params.items() if k != "all_to_all"}}
        self.all_to_all = bool(params.get("all_to_all", False))
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.seed = int(seed)

    # -- to implement -------------------------------------------------------------------------
    def _trigger(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> triggered (N, H, W, 3) uint8."""
        raise NotImplementedError

    def prepare(self, clean: ImageSet, target: int, **kwargs: Any) -> None:
        """Hook for attacks that need the clean data first (surrogate models, optimised triggers)."""

    # -- public -------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "category": self.category, "params": dict(self.params),
                "all_to_all": self.all_to_all, "seed": self.seed, "image_size": list(self.image_size)}

    def target_labels(self, labels: np.ndarray, target: int, num_classes: int) -> np.ndarray:
        """The label each poisoned sample is given / the class its triggered version should hit."""
        if self.all_to_all:
            return (labels + 1) % num_classes
        return np.full_like(labels, target)

    def apply_trigger(self, images: np.ndarray) -> np.ndarray:
        """Add the trigger to (N, H, W, 3) uint8 images; returns a new array of the same shape."""
        images = np.asarray(images)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"apply_trigger expects (N, H, W, 3) uint8 images, got {images.shape} {images.dtype}")
        if tuple(images.shape[1:3]) != self.image_size:
            raise ValueError(f"attack {self.name!r} was built for {self.image_size} images, got {tuple(images.shape[1:3])}")
        if len(images) == 0:
            return images.copy()
        return self._trigger(images)

    def poison(self, clean: ImageSet, rate: float = 0.1, target: int = 0, seed: int | None = None) -> ImageSet:
        """A poisoned copy of ``clean`` with ``poison_mask`` and ``original_labels`` set.

        Exactly ``round(rate * N)`` samples are poisoned (fewer for clean-label attacks when the
        target class is smaller), chosen with ``seed`` (default: the attack's seed).
        """
        if not 0 <= target < clean.num_classes:
            raise ValueError(f"target class {target} out of range [0, {clean.num_classes})")
        seed = self.seed if seed is None else seed
        self.prepare(clean, target)
        idx = select_poison_indices(clean.labels, rate, target, seed,
                                    clean_label=self.category == "clean-label", all_to_all=self.all_to_all)
        images = clean.images.copy()
        labels = clean.labels.copy()
        if len(idx):
            images[idx] = self._poison_images(clean.images[idx], idx)
            labels[idx] = self._poison_labels(clean.labels[idx], target, clean.num_classes)
        mask = np.zeros(len(clean), bool)
        mask[idx] = True
        out = replace(clean, images=images, labels=labels, poison_mask=mask,
                      original_labels=clean.true_labels().copy(), name=f"{clean.name}+{self.name}",
                      meta={**clean.meta, "attack": {**self.describe(), "rate": rate, "target": target}})
        return out

    def _poison_images(self, images: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return self.apply_trigger(images)

    def _poison_labels(self, labels: np.ndarray, target: int, num_classes: int) -> np.ndarray:
        if self.category in ("clean-label",):
            return labels
        return self.target_labels(labels, target, num_classes)

    def backdoor_test(self, test: ImageSet, target: int) -> BackdoorTest:
        """Triggered test images whose true class differs from their target (for ASR and RA)."""
        tl = self.target_labels(test.labels, target, test.num_classes)
        keep = np.flatnonzero(test.labels != tl)
        return BackdoorTest(self.apply_trigger(test.images[keep]), test.labels[keep], tl[keep])

    def preview(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(clean, poisoned, |difference| amplified to full range) for one (H, W, 3) uint8 image."""
        clean = np.asarray(image, np.uint8)
        poisoned = self.apply_trigger(clean[None])[0]
        diff = np.abs(poisoned.astype(np.int16) - clean.astype(np.int16)).astype(np.float32)
        if diff.max() > 0:
            diff = diff / diff.max() * 255.0
        return clean, poisoned, diff.astype(np.uint8)
