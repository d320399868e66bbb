"""Warping triggers: WaNet (Nguyen & Tran, ICLR 2021)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data import ImageSet
from .base import Attack
from .surrogate import to_float, to_uint8

__all__ = ["WaNet"]


class WaNet(Attack):
    """WaNet: an imperceptible elastic warp as the trigger, plus a "noise mode".

    The warping field is the paper's: a (2, k, k) uniform random control grid in [-1, 1], normalised
    by its mean absolute value, upsampled bicubically to (H, W), scaled by ``s / H`` and added to the
    identity sampling grid (normalised coordinates, clamped to [-1, 1]; ``grid_rescale`` multiplies
    it as in the paper's code). Poisoned samples are warped and relabelled to the target. Noise mode:
    ``cross_ratio`` x (number poisoned) further samples are warped with the same field plus a fresh
    per-sample random offset in [-1, 1] / H and keep their true labels (the paper's "noise" samples,
    which force the model to learn the exact warp); they are marked in ``meta['attack_noise_mask']``
    and are not backdoor samples. Defaults follow the paper: k = 4, s = 0.5, grid_rescale 1, cross
    ratio 2.

    Differs from the paper: WaNet re-warps each training batch on the fly under the attacker's
    control of training; here it is a data-poisoning attack, so the warp (and each noise sample's
    random offset) is fixed once and stored in 8-bit pixels, and the victim's own crop/flip
    augmentation shifts the warp relative to the image. Max pixel displacement is about
    ``s * max|grid| / 2`` pixels (under a pixel at the defaults), see :meth:`flow_pixels`.
    """

    name = "wanet"
    category = "dirty-label"
    paper = "Nguyen & Tran, WaNet - Imperceptible Warping-based Backdoor Attack, ICLR 2021"
    defaults = {"k": 4, "s": 0.5, "grid_rescale": 1.0, "cross_ratio": 2.0}

    def validate(self) -> None:
        self._num("k", 2, min(self.image_size), integer=True)
        self._num("s", 0.0, None, lo_open=True)
        self._num("grid_rescale", 0.0, None, lo_open=True)
        self._num("cross_ratio", 0.0, None)

    def _identity(self) -> torch.Tensor:
        h, w = self.image_size
        ys = torch.linspace(-1, 1, steps=h)
        xs = torch.linspace(-1, 1, steps=w)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack((xx, yy), 2)[None]  # (1, H, W, 2), (x, y) order as grid_sample expects

    def grid(self) -> torch.Tensor:
        """(1, H, W, 2) float32 sampling grid of the trigger (normalised coordinates)."""
        h, w = self.image_size
        k = int(self.params["k"])
        g = torch.Generator().manual_seed(self.seed)
        ins = torch.rand(1, 2, k, k, generator=g) * 2 - 1
        ins = ins / ins.abs().mean()
        noise_grid = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        grid = (self._identity() + float(self.params["s"]) * noise_grid / h) * float(self.params["grid_rescale"])
        return grid.clamp(-1, 1)

    def flow_pixels(self) -> np.ndarray:
        """(H, W, 2) float32 displacement of the trigger's sampling grid, in pixels (x, y)."""
        h, w = self.image_size
        d = (self.grid() - self._identity())[0]
        scale = torch.tensor([(w - 1) / 2.0, (h - 1) / 2.0])
        return (d * scale).numpy().astype(np.float32)

    def _warp(self, images: np.ndarray, grid: torch.Tensor) -> np.ndarray:
        out = np.empty_like(images)
        for i in range(0, len(images), 2048):
            x = to_float(images[i:i + 2048], torch.device("cpu"))
            gb = grid.expand(len(x), -1, -1, -1) if grid.shape[0] == 1 else grid[i:i + 2048]
            out[i:i + 2048] = to_uint8(F.grid_sample(x, gb, mode="bilinear", padding_mode="zeros", align_corners=True))
        return out

    def _trigger(self, images: np.ndarray) -> np.ndarray:
        return self._warp(images, self.grid())

    def _side_effects(self, clean: ImageSet, images: np.ndarray, mask: np.ndarray, seed: int) -> np.ndarray | None:
        n_noise = int(round(float(self.params["cross_ratio"]) * int(mask.sum())))
        pool = np.flatnonzero(~mask)
        n_noise = min(n_noise, len(pool))
        noise = np.zeros(len(mask), bool)
        if n_noise == 0:
            return noise
        rng = np.random.default_rng([seed, 1])
        idx = np.sort(rng.choice(pool, size=n_noise, replace=False))
        h, w = self.image_size
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        offsets = (torch.rand(n_noise, h, w, 2, generator=g) * 2 - 1) / h
        grid = (self.grid() + offsets).clamp(-1, 1)
        images[idx] = self._warp(images[idx], grid)
        noise[idx] = True
        return noise
