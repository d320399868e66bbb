"""Surrogate classifiers and tensor helpers for attacks that optimise against a model.

Label-consistent (PGD perturbations), Narcissus (optimised trigger), TrojanNN (neuron-maximising
patch) and the low-frequency trigger (low-pass universal perturbation) need a model of the task.
The papers use large pretrained or adversarially trained networks; offline we train a small CNN
(``cgd.models.build_model('small-cnn')``) with :func:`cgd.train.train_classifier` on a seeded subset
of the clean data handed to the attack. Weights are cached as safetensors under the attack's
``cache_dir`` and in a small per-process memo, keyed by the data fingerprint and the recipe.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..data import ImageSet, seeded_subset
from ..device import resolve_device

__all__ = ["SurrogateSpec", "train_surrogate", "to_float", "to_uint8", "attack_device"]

_MEMO: "OrderedDict[str, dict[str, torch.Tensor]]" = OrderedDict()
_MEMO_MAX = 4


def attack_device() -> torch.device:
    """The device attack optimisation runs on: CUDA when present, else CPU."""
    return resolve_device("auto")


def to_float(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1] on ``device``."""
    return torch.as_tensor(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [0, 1] -> (N, H, W, 3) uint8 (rounded, clipped) numpy array."""
    return x.detach().float().clamp(0, 1).mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class SurrogateSpec:
    """Recipe of a surrogate: ``epochs`` over at most ``n`` seeded samples, small-cnn of ``width``."""

    def __init__(self, epochs: int, n: int, width: int, seed: int):
        if int(epochs) < 1:
            raise ValueError(f"surrogate_epochs must be >= 1, got {epochs}")
        if int(n) < 10:
            raise ValueError(f"surrogate_n must be >= 10 samples, got {n}")
        if int(width) < 4:
            raise ValueError(f"surrogate_width must be >= 4, got {width}")
        self.epochs, self.n, self.width, self.seed = int(epochs), int(n), int(width), int(seed)

    def key(self, clean: ImageSet) -> str:
        h = hashlib.sha256(f"{clean.fingerprint()}|{self.epochs}|{self.n}|{self.width}|{self.seed}".encode())
        return h.hexdigest()[:16]


def train_surrogate(clean: ImageSet, spec: SurrogateSpec, cache_dir: str | os.PathLike | None = None) -> nn.Module:
    """A small-cnn trained on (a seeded subset of) ``clean``; eval mode, fp32, on :func:`attack_device`.

    Training: Adam lr 2e-3, cosine schedule, crop+flip augmentation, ``spec.epochs`` epochs, seeded.
    Cached as ``cache_dir/surrogate-<key>.safetensors`` when ``cache_dir`` is set.
    """
    from ..models import build_model
    from ..train import TrainConfig, train_classifier

    dev = attack_device()
    key = spec.key(clean)
    model = build_model("small-cnn", clean.num_classes, width=spec.width)
    state = _MEMO.get(key)
    path = Path(cache_dir) / f"surrogate-{key}.safetensors" if cache_dir is not None else None
    if state is None and path is not None and path.is_file():
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception:  # corrupt cache entry: retrain
            path.unlink(missing_ok=True)
            state = None
    if state is None:
        sub = seeded_subset(clean, spec.n, spec.seed)
        torch.manual_seed(spec.seed)
        model = build_model("small-cnn", clean.num_classes, width=spec.width)
        cfg = TrainConfig(epochs=spec.epochs, lr=2e-3, schedule="cosine", seed=spec.seed, batch_size=128)
        train_classifier(model, sub.images, sub.labels, cfg, device=dev)
        state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
                 for k, v in model.state_dict().items()}
    if path is not None and not path.is_file():
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_file(state, str(tmp))
        os.replace(tmp, path)
    _MEMO[key] = state
    _MEMO.move_to_end(key)
    while len(_MEMO) > _MEMO_MAX:
        _MEMO.popitem(last=False)
    model.load_state_dict(state)
    model = model.to(dev).to(memory_format=torch.contiguous_format).float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def clear_memo() -> None:
    """Forget surrogates trained in this process (tests use it to check determinism from scratch)."""
    _MEMO.clear()
