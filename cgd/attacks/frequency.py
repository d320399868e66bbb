"""Frequency-domain triggers: the low-frequency trigger (Zeng et al., ICCV 2021) and BppAttack's
colour-depth squeezing with dithering (Wang et al., CVPR 2022)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data import ImageSet
from .base import Attack
from .patch import SurrogateMixin
from .surrogate import attack_device, to_float

__all__ = ["LowFrequency", "Bpp", "lowpass"]


def lowpass(x: torch.Tensor, cutoff: int) -> torch.Tensor:
    """Keep the 2-D Fourier components of (..., H, W) ``x`` with |f_y|, |f_x| <= cutoff cycles per image."""
    h, w = x.shape[-2:]
    fy = torch.fft.fftfreq(h, d=1.0 / h, device=x.device).abs()
    fx = torch.fft.fftfreq(w, d=1.0 / w, device=x.device).abs()
    keep = ((fy[:, None] <= cutoff) & (fx[None, :] <= cutoff)).to(x.dtype)
    return torch.fft.ifft2(torch.fft.fft2(x) * keep).real


class LowFrequency(SurrogateMixin, Attack):
    """Low-frequency trigger: a smooth universal perturbation, invisible to frequency-based detectors.

    Zeng et al. (ICCV 2021) show that common triggers carry high-frequency artefacts and build a
    "smooth" trigger instead: a universal adversarial perturbation towards the target class found on
    a clean model under a low-pass constraint, added to poisoned images (relabelled to the target).
    Here the perturbation delta (3, H, W) is optimised with Adam (lr 0.01, ``steps`` batches of 64
    non-target images) to minimise the surrogate's cross-entropy to the target; after each step it is
    projected by a Fourier low-pass keeping |f| <= ``cutoff`` cycles per image in each axis and
    rescaled so max|delta| <= ``eps`` (pixel units; rescaling keeps it low-pass, unlike clipping).

    Defaults: eps 32, cutoff 4, 300 steps; surrogate: small-cnn (width 32), 4 epochs on <= 10,000
    samples. eps is the peak of a smooth pattern (mean PSNR of poisoned CIFAR-10 images about 27 dB);
    with eps 12 / 20 / 24 a small-CNN victim (10k images, 6 epochs) reached only 34 / 61 / 90 % ASR,
    with 32 99 %. Differs from the paper: the clean model is a small CNN trained here on the given data,
    and the low-pass filter is an ideal square Fourier window (the paper uses a Gaussian / ideal
    low-pass filter on a pretrained model's UAP). all-to-all is not defined (the UAP is targeted).
    """

    name = "lowfreq"
    category = "dirty-label"
    paper = "Zeng et al., Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective, ICCV 2021"
    supports_all_to_all = False
    needs_data = True
    defaults = {"eps": 32.0, "cutoff": 4, "steps": 300, "lr": 0.01, **SurrogateMixin.SURROGATE_DEFAULTS}

    def validate(self) -> None:
        self._num("eps", 0, 255, lo_open=True)
        self._num("cutoff", 0, max(self.image_size) // 2, integer=True)
        self._num("steps", 1, None, integer=True)
        self._num("lr", 0, None, lo_open=True)
        self._validate_surrogate()

    def prepare(self, clean: ImageSet, target: int, **kwargs: Any) -> None:
        super().prepare(clean, target)
        key = self.cache_key(clean.fingerprint(), int(target))
        self._memo["delta"] = self.cached_arrays(key, lambda: {"delta": self._optimise(clean, int(target))})["delta"]

    def _project(self, d: torch.Tensor) -> torch.Tensor:
        d = lowpass(d, int(self.params["cutoff"]))
        m = d.abs().max().clamp_min(1e-12)
        return d * torch.clamp(float(self.params["eps"]) / 255.0 / m, max=1.0)

    def _optimise(self, clean: ImageSet, target: int) -> np.ndarray:
        model = self._surrogate(clean)
        dev = attack_device()
        pool = np.flatnonzero(clean.labels != target)
        if len(pool) == 0:
            raise ValueError(f"attack 'lowfreq': the clean set has no images outside target class {target}")
        g = torch.Generator().manual_seed(self.seed)
        d0 = (torch.rand(1, 3, *self.image_size, generator=g) * 2 - 1) * float(self.params["eps"]) / 255.0
        delta = self._project(d0.to(dev)).requires_grad_(True)
        opt = torch.optim.Adam([delta], lr=float(self.params["lr"]))
        rng = np.random.default_rng([self.seed, 3])
        y = torch.full((min(64, len(pool)),), target, device=dev)
        for _ in range(int(self.params["steps"])):
            x = to_float(clean.images[rng.choice(pool, size=len(y), replace=False)], dev)
            loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                delta.copy_(self._project(delta))
        return (delta.detach()[0].permute(1, 2, 0) * 255.0).cpu().numpy().astype(np.float32)

    def trigger_pattern(self) -> np.ndarray:
        """(H, W, 3) float32 perturbation in pixel units, |delta| <= eps, low-pass (after prepare)."""
        return self._require("delta")

    def _trigger(self, images: np.ndarray) -> np.ndarray:
        d = self.trigger_pattern()
        return np.clip(np.rint(images.astype(np.float32) + d), 0, 255).astype(np.uint8)


class Bpp(Attack):
    """BppAttack: the trigger is colour-depth squeezing to ``squeeze_num`` levels per channel with
    Floyd-Steinberg dithering (Wang et al., CVPR 2022); poisoned samples are relabelled.

    Each channel value v in [0, 255] becomes round(v / 255 * (m - 1)) / (m - 1) * 255 with m =
    squeeze_num, the quantisation error diffused to the right / lower neighbours (7/16, 3/16, 5/16,
    1/16) when ``dithering`` is true. Change per pixel: at most 255 / (m - 1) / 2 without dithering,
    255 / (m - 1) with it. Defaults follow the paper / BackdoorBench: m = 8, dithering on.

    Differs from the paper: BppAttack also trains the victim with adversarial "negative" samples
    (contrastive adversarial training under the attacker's control); as a data-poisoning attack
    only the quantised samples are planted.
    """

    name = "bpp"
    category = "dirty-label"
    paper = "Wang et al., BppAttack: Stealthy and Efficient Trojan Attacks against DNNs via Image Quantization and Contrastive Adversarial Learning, CVPR 2022"
    defaults = {"squeeze_num": 8, "dithering": True}

    def validate(self) -> None:
        self._num("squeeze_num", 2, 256, integer=True)
        if not isinstance(self.params["dithering"], (bool, np.bool_)):
            raise ValueError(f"attack 'bpp': parameter 'dithering' must be true or false, got {self.params['dithering']!r}")

    def max_change(self) -> float:
        """Largest possible |x' - x| in pixel units for the current parameters."""
        step = 255.0 / (int(self.params["squeeze_num"]) - 1)
        return step if self.params["dithering"] else step / 2

    def _trigger(self, images: np.ndarray) -> np.ndarray:
        m = int(self.params["squeeze_num"]) - 1
        step = 255.0 / m
        x = images.astype(np.float32)
        if not self.params["dithering"]:
            return np.clip(np.rint(np.rint(x / step) * step), 0, 255).astype(np.uint8)
        # Floyd-Steinberg, vectorised over images and channels, sequential over pixels.
        n, h, w, _ = x.shape
        buf = np.zeros((n, h + 1, w + 2, 3), np.float32)
        buf[:, :h, 1:w + 1] = x
        out = np.empty_like(x)
        for r in range(h):
            for c in range(w):
                old = buf[:, r, c + 1]
                new = np.clip(np.rint(old / step), 0, m) * step
                out[:, r, c] = new
                err = old - new
                buf[:, r, c + 2] += err * (7 / 16)
                buf[:, r + 1, c] += err * (3 / 16)
                buf[:, r + 1, c + 1] += err * (5 / 16)
                buf[:, r + 1, c + 2] += err * (1 / 16)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
