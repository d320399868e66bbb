"""Blended triggers: Blended (Chen et al. 2017)."""
from __future__ import annotations

import numpy as np

from .base import Attack

__all__ = ["Blended"]


class Blended(Attack):
    """Blended: x' = (1 - alpha) x + alpha * pattern, label set to the target; alpha 0.2 as in
    BackdoorBench's CIFAR setting (the paper uses 0.2 for training poison).

    Differs from the paper: the paper blends a Hello Kitty photo (or random noise); with no external
    files the pattern is the paper's random-noise variant, a fixed uniform-noise image made from the
    attack's seed.
    """

    name = "blended"
    category = "dirty-label"
    paper = "Chen et al., Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning, 2017"
    defaults = {"alpha": 0.2}

    def validate(self) -> None:
        self._num("alpha", 0.0, 1.0, lo_open=True)

    def pattern(self) -> np.ndarray:
        """(H, W, 3) uint8 noise pattern, deterministic for the seed."""
        rng = np.random.default_rng(10_000 + self.seed)
        return rng.integers(0, 256, size=(*self.image_size, 3), dtype=np.uint8)

    def _trigger(self, images: np.ndarray) -> np.ndarray:
        a = float(self.params["alpha"])
        out = (1.0 - a) * images.astype(np.float32) + a * self.pattern().astype(np.float32)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
