"""Patch triggers: BadNets (Gu et al. 2017) and TrojanNN-style optimised patches (Liu et al. 2018)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..data import ImageSet
from .base import Attack
from .surrogate import SurrogateSpec, attack_device, to_float, train_surrogate

__all__ = ["BadNets", "TrojanNN", "SurrogateMixin"]


class SurrogateMixin:
    """Parameters ``surrogate_epochs``, ``surrogate_n``, ``surrogate_width`` and a cached surrogate."""

    SURROGATE_DEFAULTS = {"surrogate_epochs": 4, "surrogate_n": 10000, "surrogate_width": 32}

    def _surrogate(self, clean: ImageSet) -> torch.nn.Module:
        p = self.params  # type: ignore[attr-defined]
        spec = SurrogateSpec(p["surrogate_epochs"], p["surrogate_n"], p["surrogate_width"], self.seed)  # type: ignore[attr-defined]
        return train_surrogate(clean, spec, self.cache_dir)  # type: ignore[attr-defined]

    def _validate_surrogate(self) -> None:
        self._num("surrogate_epochs", 1, None, integer=True)  # type: ignore[attr-defined]
        self._num("surrogate_n", 10, None, integer=True)  # type: ignore[attr-defined]
        self._num("surrogate_width", 4, None, integer=True)  # type: ignore[attr-defined]


class _CornerPatch(Attack):
    """A square patch pasted at the bottom-right corner, ``margin`` pixels from the border."""

    def region(self) -> tuple[slice, slice]:
        """The (rows, cols) the trigger occupies: pixels outside it are never changed."""
        h, w = self.image_size
        s, m = int(self.params["patch_size"]), int(self.params["margin"])
        return slice(h - m - s, h - m), slice(w - m - s, w - m)

    def validate(self) -> None:
        s = self._num("patch_size", 1, min(self.image_size), integer=True)
        self._num("margin", 0, min(self.image_size) - s, integer=True)

    def trigger_mask(self) -> np.ndarray:
        """(H, W) bool: True where the trigger may change pixels."""
        m = np.zeros(self.image_size, bool)
        rs, cs = self.region()
        m[rs, cs] = True
        return m

    def _pattern(self) -> np.ndarray:
        raise NotImplementedError

    def _trigger(self, images: np.ndarray) -> np.ndarray:
        out = images.copy()
        rs, cs = self.region()
        out[:, rs, cs, :] = self._pattern()
        return out


class BadNets(_CornerPatch):
    """BadNets: a small black-and-white checkerboard patch in the bottom-right corner, label set to
    the target. Defaults follow BackdoorBench's CIFAR setting: a 3x3 patch, 1 pixel from the border.

    Differs from the paper: the paper's MNIST/traffic-sign triggers (single pixel, pattern, yellow
    sticker) are replaced by the checkerboard square BackdoorBench uses on CIFAR.
    """

    name = "badnets"
    category = "dirty-label"
    paper = "Gu et al., BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply Chain, 2017"
    defaults = {"patch_size": 3, "margin": 1}

    def _pattern(self) -> np.ndarray:
        """(s, s, 3) uint8 white/black checkerboard."""
        s = int(self.params["patch_size"])
        yy, xx = np.mgrid[0:s, 0:s]
        cb = ((yy + xx) % 2 == 0).astype(np.uint8) * 255
        return np.repeat(cb[..., None], 3, axis=-1)


class TrojanNN(SurrogateMixin, _CornerPatch):
    """TrojanNN-style patch: a square trigger whose pixels are optimised to over-activate one
    strongly connected neuron of a model, then stamped on poisoned samples relabelled to the target.

    Method (Liu et al., NDSS 2018): choose the neuron of an internal layer with the largest total
    incoming weight (here: the channel of the surrogate's last conv layer with the largest sum of
    |weights|), and optimise the pixels inside the trigger mask by gradient ascent so that neuron's
    activation becomes large. Defaults: a 5x5 square mask, 1 pixel from the bottom-right border,
    200 Adam steps (lr 0.1 on the patch logits), 1 neuron.

    Differs from the paper: (1) the model is a small CNN trained here on the clean data (the paper
    attacks a given pretrained model); (2) the trigger is optimised on clean images with the patch
    pasted (the paper starts from a blank input), which makes it effective on real inputs; (3) the
    backdoor is then planted by data poisoning (the paper retrains the model on reverse-engineered
    data), so the victim is trained from scratch on the poisoned set.
    """

    name = "trojan"
    category = "dirty-label"
    paper = "Liu et al., Trojaning Attack on Neural Networks, NDSS 2018"
    needs_data = True
    defaults = {"patch_size": 5, "margin": 1, "steps": 200, "lr": 0.1, "num_neurons": 1,
                **SurrogateMixin.SURROGATE_DEFAULTS}

    def validate(self) -> None:
        super().validate()
        self._num("steps", 1, None, integer=True)
        self._num("lr", 0, None, lo_open=True)
        self._num("num_neurons", 1, None, integer=True)
        self._validate_surrogate()

    def prepare(self, clean: ImageSet, target: int, **kwargs: Any) -> None:
        super().prepare(clean, target)
        key = self.cache_key(clean.fingerprint())
        arr = self.cached_arrays(key, lambda: {"pattern": self._optimise(clean)})
        self._memo["pattern"] = arr["pattern"]

    def _optimise(self, clean: ImageSet) -> np.ndarray:
        model = self._surrogate(clean)
        dev = attack_device()
        last_conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        strength = last_conv.weight.detach().abs().sum(dim=(1, 2, 3))
        neurons = torch.argsort(strength, descending=True)[: int(self.params["num_neurons"])]
        g = torch.Generator().manual_seed(self.seed)
        s = int(self.params["patch_size"])
        theta = (torch.randn(1, 3, s, s, generator=g) * 0.5).to(dev).requires_grad_(True)
        opt = torch.optim.Adam([theta], lr=float(self.params["lr"]))
        rng = np.random.default_rng(self.seed)
        rs, cs = self.region()
        for _ in range(int(self.params["steps"])):
            batch = clean.images[rng.choice(len(clean), size=min(64, len(clean)), replace=False)]
            x = to_float(batch, dev)
            patch = torch.sigmoid(theta)
            x = x.clone()
            x[:, :, rs, cs] = patch.expand(len(x), -1, -1, -1)
            act = model.features(x)[:, neurons]  # global max-pooled activations of the chosen channels
            loss = -act.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        pat = torch.sigmoid(theta.detach())[0].permute(1, 2, 0).mul(255).round().clamp(0, 255)
        return pat.to(torch.uint8).cpu().numpy()

    def _pattern(self) -> np.ndarray:
        """(s, s, 3) uint8 optimised patch (after :meth:`prepare`)."""
        return self._require("pattern")
