"""Classifier architectures and their checkpoints (safetensors + JSON sidecar).

Every model here takes float images in [0, 1], shape (B, 3, H, W), and normalises them itself
with the mean/std it was built with, so a checkpoint is self-contained. ``features(x)`` returns the
penultimate (B, D) features, ``forward(x)`` the (B, K) logits.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ARCHITECTURES as ARCHITECTURE_NAMES

__all__ = [
    "ARCHITECTURES",
    "build_model",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint_meta",
    "CheckpointError",
    "PreActResNet18",
    "SmallCNN",
]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class CheckpointError(ValueError):
    """A checkpoint is missing, unsafe, or does not fit the expected architecture."""


class _Normalise(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class _PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


class PreActResNet18(nn.Module):
    """PreAct-ResNet18 (He et al. 2016) as used by BackdoorBench, for 32x32 (or larger) inputs."""

    def __init__(self, num_classes: int = 10, mean=CIFAR_MEAN, std=CIFAR_STD):
        super().__init__()
        self.norm = _Normalise(mean, std)
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        layers, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(_PreActBlock(in_planes, planes, stride), _PreActBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.norm(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


def _conv_pool_bn(cin: int, cout: int) -> list[nn.Module]:
    # pooling before BN/ReLU: the elementwise work runs at a quarter of the resolution
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head, built for CPU demos and benchmarks.

    Each block is conv 3x3 -> max-pool 2 -> BatchNorm -> ReLU, with ``width``, 2x and 4x channels
    (32x32 input: 16x16, 8x8, 4x4 maps), then a global max-pool gives the (B, 4 * width) features.
    With the default width 64: 79 MFLOP per 32x32 image forward; about 80% clean CIFAR-10 accuracy
    after 11-12 epochs of the cgd recipe (Adam 1e-3, cosine, crop + flip, batch 256), several times
    faster to train on a CPU than two convolutions per block at full resolution.
    """

    def __init__(self, num_classes: int = 10, width: int = 64, mean=CIFAR_MEAN, std=CIFAR_STD):
        super().__init__()
        self.norm = _Normalise(mean, std)
        w = width
        self.blocks = nn.Sequential(*_conv_pool_bn(3, w), *_conv_pool_bn(w, 2 * w), *_conv_pool_bn(2 * w, 4 * w))
        self.linear = nn.Linear(4 * w, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.norm(x))
        return F.adaptive_max_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


_CONSTRUCTORS: dict[str, Callable[..., nn.Module]] = {
    "preact-resnet18": PreActResNet18,
    "small-cnn": SmallCNN,
    "tiny-cnn": functools.partial(SmallCNN, width=32),
}
# the names (and their descriptions) live in cgd.config, which the CLI and the pages read without torch
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {name: _CONSTRUCTORS[name] for name in ARCHITECTURE_NAMES}


def build_model(arch: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """A fresh model of architecture ``arch`` (one of :data:`ARCHITECTURES`) with ``num_classes`` outputs."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    model = ARCHITECTURES[arch](num_classes=num_classes, **kwargs)
    model.cgd_kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}  # saved in checkpoints
    return model


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json") if path.suffix != ".safetensors" else path.with_suffix(".json")


def save_checkpoint(model: nn.Module, path: str | os.PathLike, arch: str, classes: list[str], **meta: Any) -> Path:
    """Write ``model``'s weights as safetensors plus a JSON sidecar (arch, classes, meta); atomic.

    ``path`` should end in ``.safetensors``; the sidecar is the same name with ``.json``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous() for k, v in model.state_dict().items()}
    side = {"arch": arch, "num_classes": len(classes), "classes": list(classes), "format": "cgd-checkpoint-1",
            "model_kwargs": getattr(model, "cgd_kwargs", {}), **meta}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    sc = _sidecar(path)
    tmp_sc = sc.with_name(sc.name + f".tmp{os.getpid()}")
    try:
        save_file(state, str(tmp), metadata={"arch": arch, "num_classes": str(len(classes))})
        tmp_sc.write_text(json.dumps(side, indent=2, default=str))
        os.replace(tmp, path)
        os.replace(tmp_sc, sc)
    except Exception as e:  # disk full, read-only folder: one line naming the file, nothing half-written left
        tmp.unlink(missing_ok=True)
        tmp_sc.unlink(missing_ok=True)
        why = "the disk is full" if "No space left" in str(e) or getattr(e, "errno", None) == 28 else f"{e.__class__.__name__}: {e}"
        raise CheckpointError(f"{path}: could not write the checkpoint ({why})") from None
    return path


# model_kwargs a sidecar may carry, per architecture: name -> check of the value (bounds the memory
# a crafted sidecar can make build_model allocate)
def _is_stats(v: Any) -> bool:
    return (isinstance(v, (list, tuple)) and len(v) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 255 for x in v))


MODEL_KWARGS: dict[str, dict[str, Callable[[Any], bool]]] = {
    "preact-resnet18": {"mean": _is_stats, "std": _is_stats},
    "small-cnn": {"mean": _is_stats, "std": _is_stats,
                  "width": lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1024},
    "tiny-cnn": {"mean": _is_stats, "std": _is_stats},
}
MAX_CLASSES = 100_000


def _check_model_kwargs(path: Path, arch: str, kwargs: Any) -> dict:
    allowed = MODEL_KWARGS.get(arch, {})
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{_sidecar(path)}: model_kwargs must be an object, got {type(kwargs).__name__}")
    for k, v in kwargs.items():
        if k not in allowed:
            raise CheckpointError(f"{_sidecar(path)}: model_kwargs.{k} is not a setting of {arch} "
                                  f"(expected some of: {', '.join(allowed) or 'none'})")
        if not allowed[k](v):
            raise CheckpointError(f"{_sidecar(path)}: model_kwargs.{k} = {v!r} is out of range for {arch}")
    return dict(kwargs)


def read_checkpoint_meta(path: str | os.PathLike) -> dict:
    """The JSON sidecar of a checkpoint, or the safetensors header metadata when there is none."""
    path = Path(path)
    sc = _sidecar(path)
    if sc.is_file():
        try:
            return json.loads(sc.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{sc}: not valid JSON ({e})") from None
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                md = f.metadata() or {}
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        if "arch" in md:
            return {"arch": md["arch"], "num_classes": int(md.get("num_classes", 0))}
    return {}


def load_state_dict_safely(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read tensors from ``.safetensors`` or a torch file with ``weights_only=True`` (never runs code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: refused or unreadable torch file; only plain tensors are loaded (weights_only=True), "
            f"never pickled code ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_checkpoint(
    path: str | os.PathLike,
    arch: str | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict]:
    """Load a classifier checkpoint; returns (model in eval mode on ``device``, sidecar dict).

    ``arch`` / ``num_classes`` default to the sidecar's; when given they must agree with it, and the
    tensors must fit the architecture exactly, else a :class:`CheckpointError` says what differs.
    """
    path = Path(path)
    meta = read_checkpoint_meta(path)
    arch = arch or meta.get("arch")
    if arch is None:
        raise CheckpointError(f"{path}: architecture unknown (no sidecar {_sidecar(path).name}); pass arch=")
    if meta.get("arch") and meta["arch"] != arch:
        raise CheckpointError(f"{path}: checkpoint is a {meta['arch']!r}, expected {arch!r}")
    k_meta = meta.get("num_classes")
    if num_classes is not None and k_meta and int(k_meta) != num_classes:
        raise CheckpointError(f"{path}: checkpoint has {k_meta} classes, the dataset has {num_classes}")
    state = load_state_dict_safely(path)
    k = num_classes or (int(k_meta) if k_meta else None)
    if k is None:
        w = state.get("linear.weight")
        if w is None:
            raise CheckpointError(f"{path}: cannot infer the class count (no linear.weight)")
        k = int(w.shape[0])
    if not 2 <= k <= MAX_CLASSES:
        raise CheckpointError(f"{path}: {k} classes is out of range (expected 2 to {MAX_CLASSES:,})")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    kwargs = _check_model_kwargs(path, arch, meta.get("model_kwargs") or {})
    w = state.get("linear.weight")
    if w is not None and w.ndim == 2 and int(w.shape[0]) != k:
        raise CheckpointError(f"{path}: its linear layer has {int(w.shape[0])} outputs, expected {k} classes")
    first = state.get("blocks.0.weight")
    if "width" in kwargs and first is not None and int(first.shape[0]) != kwargs["width"]:
        raise CheckpointError(f"{_sidecar(path)}: model_kwargs.width = {kwargs['width']} but the first convolution "
                              f"has {int(first.shape[0])} channels")
    model = build_model(arch, k, **kwargs)
    own = model.state_dict()
    missing = [n for n in own if n not in state]
    unexpected = [n for n in state if n not in own]
    wrong = [f"{n} {tuple(state[n].shape)} != {tuple(own[n].shape)}" for n in own if n in state and state[n].shape != own[n].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("wrong shapes: " + "; ".join(wrong[:3]))
        if missing:
            parts.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        raise CheckpointError(f"{path}: does not fit {arch} with {k} classes: " + ", ".join(parts))
    model.load_state_dict(state)
    meta.setdefault("arch", arch)
    meta.setdefault("num_classes", k)
    return model.to(device).eval(), meta
