"""Patch triggers: BadNets (Gu et al. 2017)."""
from __future__ import annotations

import numpy as np

from .base import Attack


class BadNets(Attack):
    """BadNets: a small black-and-white checkerboard patch in the bottom-right corner, label set to
    the target. Defaults follow BackdoorBench's CIFAR setting: a 3x3 patch, 1 pixel from the border."""

    name = "badnets"
    category = "dirty-label"
    paper = "Gu et al., BadNets, 2017"
    defaults = {"patch_size": 3, "margin": 1}

    def _pattern(self) -> np.ndarray:
        s = int(self.params["patch_size"])
        yy, xx = np.mgrid[0:s, 0:s]
        cb = ((yy + xx) % 2 == 0).astype(np.uint8) * 255  # white/black checkerboard
        return np.repeat(cb[..., None], 3, axis=-1)

    def region(self) -> tuple[slice, slice]:
        """The (rows, cols) the trigger occupies: pixels outside it are never changed."""
        h, w = self.image_size
        s, m = int(self.params["patch_size"]), int(self.params["margin"])
        return slice(h - m - s, h - m), slice(w - m - s, w - m)

    def _trigger(self, images: np.ndarray) -> np.ndarray:
        out = images.copy()
        rs, cs = self.region()
        out[:, rs, cs, :] = self._pattern()
        return out
