"""Clean-label attacks: SIG (Barni et al. 2019), label-consistent (Turner et al. 2019) and
Narcissus (Zeng et al. 2023). Only target-class images are poisoned and no label changes."""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data import ImageSet
from ..train import augment_batch
from .base import Attack
from .patch import SurrogateMixin
from .surrogate import attack_device, to_float, to_uint8

__all__ = ["SIG", "LabelConsistent", "Narcissus"]


class SIG(Attack):
    """SIG: a horizontal sinusoidal signal added to target-class training images, labels untouched.

    x'[i, j] = clip(x[i, j] + delta * sin(2 pi j f / W)) on every row and channel (Barni et al.,
    ICIP 2019). Defaults from the paper: delta = 20 (pixel units), f = 6. At test time the same
    signal is added with amplitude ``test_delta`` (default: delta, as BackdoorBench does; the paper
    also reports a stronger test-time signal). Matches the paper up to 8-bit rounding.
    """

    name = "sig"
    category = "clean-label"
    paper = "Barni et al., A New Backdoor Attack in CNNs by Training Set Corruption without Label Poisoning, ICIP 2019"
    supports_all_to_all = False
    defaults = {"delta": 20.0, "f": 6.0, "test_delta": None}

    def validate(self) -> None:
        self._num("delta", 0, 255, lo_open=True)
        self._num("f", 0, None, lo_open=True)
        if self.params["test_delta"] is not None:
            self._num("test_delta", 0, 255, lo_open=True)

    def signal(self, delta: float | None = None) -> np.ndarray:
        """(H, W, 3) float32 sinusoid in pixel units with amplitude ``delta`` (default: the training one)."""
        h, w = self.image_size
        d = float(self.params["delta"] if delta is None else delta)
        row = d * np.sin(2 * np.pi * np.arange(w) * float(self.params["f"]) / w)
        return np.broadcast_to(row[None, :, None], (h, w, 3)).astype(np.float32)

    def _add(self, images: np.ndarray, delta: float) -> np.ndarray:
        return np.clip(np.rint(images.astype(np.float32) + self.signal(delta)), 0, 255).astype(np.uint8)

    def _trigger(self, images: np.ndarray) -> np.ndarray:
        td = self.params["test_delta"]
        return self._add(images, float(self.params["delta"] if td is None else td))

    def _poison_images(self, images: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return self._add(images, float(self.params["delta"]))


class LabelConsistent(SurrogateMixin, Attack):
    """Label-consistent backdoor: target-class images made hard by an adversarial perturbation,
    then stamped with a corner trigger; labels untouched.

    Turner et al. (2019): perturb each poisoned target-class image with PGD (L_inf ball of radius
    ``eps``, untargeted, away from its true class) so the victim cannot fit it from its content and
    leans on the trigger instead; then stamp a 3x3 black/white checkerboard in all four corners (so it
    survives flips and crops), at full amplitude. Test-time trigger: the four corner patches alone.
    PGD: ``pgd_steps`` steps of size 2.5 eps / steps from a seeded random start (Madry et al.).

    Defaults: eps 16 (pixel units, the paper's strongest L_inf setting), 10 PGD steps, patch 3,
    margin 1; surrogate small-cnn (width 32), 4 epochs on <= 10,000 samples. Differs from the paper:
    the perturbation comes from a small CNN trained here with standard training (the paper uses an
    adversarially trained model, or GAN interpolation, and a ResNet).
    """

    name = "lc"
    category = "clean-label"
    paper = "Turner et al., Label-Consistent Backdoor Attacks, arXiv:1912.02771, 2019"
    supports_all_to_all = False
    needs_data = True
    defaults = {"eps": 16.0, "pgd_steps": 10, "patch_size": 3, "margin": 1, **SurrogateMixin.SURROGATE_DEFAULTS}

    def validate(self) -> None:
        self._num("eps", 0, 255)
        self._num("pgd_steps", 0, None, integer=True)
        s = self._num("patch_size", 1, min(self.image_size) // 2, integer=True)
        self._num("margin", 0, min(self.image_size) // 2 - s, integer=True)
        self._validate_surrogate()

    def trigger_mask(self) -> np.ndarray:
        """(H, W) bool: the four corner patches."""
        h, w = self.image_size
        s, m = int(self.params["patch_size"]), int(self.params["margin"])
        mask = np.zeros((h, w), bool)
        for rs in (slice(m, m + s), slice(h - m - s, h - m)):
            for cs in (slice(m, m + s), slice(w - m - s, w - m)):
                mask[rs, cs] = True
        return mask

    def _corner_pattern(self) -> np.ndarray:
        """(H, W, 3) uint8 checkerboards in the four corners (mirrored so each corner reads alike)."""
        h, w = self.image_size
        s, m = int(self.params["patch_size"]), int(self.params["margin"])
        yy, xx = np.mgrid[0:s, 0:s]
        cb = ((yy + xx) % 2 == 0).astype(np.uint8) * 255
        pat = np.zeros((h, w, 3), np.uint8)
        pat[m:m + s, m:m + s] = cb[..., None]
        pat[m:m + s, w - m - s:w - m] = cb[:, ::-1, None]
        pat[h - m - s:h - m, m:m + s] = cb[::-1, :, None]
        pat[h - m - s:h - m, w - m - s:w - m] = cb[::-1, ::-1, None]
        return pat

    def _trigger(self, images: np.ndarray) -> np.ndarray:
        out = images.copy()
        mask = self.trigger_mask()
        out[:, mask] = self._corner_pattern()[mask]
        return out

    def prepare(self, clean: ImageSet, target: int, **kwargs: Any) -> None:
        super().prepare(clean, target)
        self._memo["model"] = self._surrogate(clean)
        self._memo["fingerprint"] = clean.fingerprint()

    def adversarial(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """PGD-perturbed copies of (N, H, W, 3) uint8 ``images`` (true ``labels``), |x' - x| <= eps."""
        model = self._require("model")
        dev = attack_device()
        eps = float(self.params["eps"]) / 255.0
        steps = int(self.params["pgd_steps"])
        if steps == 0 or eps == 0:
            return images.copy()
        alpha = 2.5 * eps / steps
        out = np.empty_like(images)
        g = torch.Generator().manual_seed(self.seed + 17)
        for i in range(0, len(images), 256):
            x0 = to_float(images[i:i + 256], dev)
            y = torch.as_tensor(labels[i:i + 256], dtype=torch.long, device=dev)
            d = ((torch.rand(x0.shape, generator=g) * 2 - 1) * eps).to(dev)
            for _ in range(steps):
                d.requires_grad_(True)
                loss = F.cross_entropy(model((x0 + d).clamp(0, 1)), y)
                (grad,) = torch.autograd.grad(loss, d)
                d = (d.detach() + alpha * grad.sign()).clamp(-eps, eps)
            xa = to_uint8((x0 + d).clamp(0, 1))
            # 8-bit rounding may step one level past eps: clip back into the ball.
            lo = np.clip(images[i:i + 256].astype(np.int16) - int(np.floor(eps * 255)), 0, 255)
            hi = np.clip(images[i:i + 256].astype(np.int16) + int(np.floor(eps * 255)), 0, 255)
            out[i:i + 256] = np.clip(xa.astype(np.int16), lo, hi).astype(np.uint8)
        return out

    def _poison_images(self, images: np.ndarray, idx: np.ndarray) -> np.ndarray:
        target = self._target if self._target is not None else 0
        digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]
        key = self.cache_key("adv", self._memo.get("fingerprint", ""), target, digest)
        labels = np.full(len(images), target, np.int64)
        adv = self.cached_arrays(key, lambda: {"x": self.adversarial(images, labels)})["x"]
        return self._trigger(adv)


class Narcissus(SurrogateMixin, Attack):
    """Narcissus: a clean-label trigger optimised to be the most "target-like" feature.

    Zeng et al. (CCS 2023) train a surrogate on public out-of-distribution data plus the target class,
    then optimise a universal trigger delta (L_inf <= eps = 16/255) that minimises the surrogate's
    loss towards the target class on augmented target-class images (RAdam, lr 0.01), add it to a few
    target-class training images (labels untouched) and, at test time, add it magnified x3.

    Here: the surrogate is a small CNN trained on the given clean data; delta is optimised with Adam
    (lr ``lr``) for ``steps`` batches of 64 target-class images under the victim's crop/flip
    augmentation, clipped to [-eps, eps] after each step. Training images: x + delta; test images:
    x + ``test_multiplier`` * delta. Defaults (paper): eps 16, test multiplier 3; steps 300.
    Differs from the paper: no POOD dataset or pretrained large surrogate (the surrogate sees the
    whole clean training set, a stronger attacker than the paper's), no surrogate fine-tuning step.
    """

    name = "narcissus"
    category = "clean-label"
    paper = "Zeng et al., Narcissus: A Practical Clean-Label Backdoor Attack with Limited Information, CCS 2023"
    supports_all_to_all = False
    needs_data = True
    defaults = {"eps": 16.0, "steps": 300, "lr": 0.01, "test_multiplier": 3.0, **SurrogateMixin.SURROGATE_DEFAULTS}

    def validate(self) -> None:
        self._num("eps", 0, 255, lo_open=True)
        self._num("steps", 1, None, integer=True)
        self._num("lr", 0, None, lo_open=True)
        self._num("test_multiplier", 0, None, lo_open=True)
        self._validate_surrogate()

    def prepare(self, clean: ImageSet, target: int, **kwargs: Any) -> None:
        super().prepare(clean, target)
        key = self.cache_key(clean.fingerprint(), int(target))
        self._memo["delta"] = self.cached_arrays(key, lambda: {"delta": self._optimise(clean, int(target))})["delta"]

    def _optimise(self, clean: ImageSet, target: int) -> np.ndarray:
        pool = np.flatnonzero(clean.labels == target)
        if len(pool) == 0:
            raise ValueError(f"attack 'narcissus': the clean set has no images of target class {target}")
        model = self._surrogate(clean)
        dev = attack_device()
        eps = float(self.params["eps"]) / 255.0
        delta = torch.zeros(1, 3, *self.image_size, device=dev, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=float(self.params["lr"]))
        rng = np.random.default_rng([self.seed, 5])
        gen = torch.Generator(device=dev).manual_seed(self.seed + 5)
        bs = min(64, len(pool))
        y = torch.full((bs,), target, device=dev)
        for _ in range(int(self.params["steps"])):
            x = to_float(clean.images[rng.choice(pool, size=bs, replace=False)], dev)
            xb = augment_batch((x + delta).clamp(0, 1), gen)
            loss = F.cross_entropy(model(xb), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                delta.clamp_(-eps, eps)
        return (delta.detach()[0].permute(1, 2, 0) * 255.0).cpu().numpy().astype(np.float32)

    def trigger_pattern(self) -> np.ndarray:
        """(H, W, 3) float32 trigger in pixel units, |delta| <= eps (after prepare)."""
        return self._require("delta")

    def _add(self, images: np.ndarray, scale: float) -> np.ndarray:
        return np.clip(np.rint(images.astype(np.float32) + scale * self.trigger_pattern()), 0, 255).astype(np.uint8)

    def _trigger(self, images: np.ndarray) -> np.ndarray:
        return self._add(images, float(self.params["test_multiplier"]))

    def _poison_images(self, images: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return self._add(images, 1.0)
