"""A fast, device-resident classifier trainer and batched inference.

The whole image set sits on the device as one uint8 tensor (N, 3, H, W); batches are index slices
of a seeded permutation; augmentation (random crop with zero padding 4, horizontal flip) runs on the
batch on the device; the forward/backward pass runs in bf16 autocast with channels_last memory.
No DataLoader, no per-sample Python.

Under ``torchrun`` (see :mod:`cgd.distributed`) :func:`train_classifier` trains with
DistributedDataParallel: every rank draws the same seeded permutation, takes its contiguous share
of each global batch of ``batch_size`` and augments it with its own random stream; gradients are
averaged across ranks and the epoch statistics are summed over them.
"""
from __future__ import annotations

import math
import re
import time
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import FLIP_CHOICES, TrainConfig
from .device import autocast, resolve_device, resolve_precision

__all__ = [
    "TrainConfig",
    "to_device_u8",
    "augment_batch",
    "mirror_pairs",
    "resolve_flip",
    "FLIP_CHOICES",
    "u8_to_float",
    "iterate_batches",
    "train_classifier",
    "predict",
    "make_optimizer",
]


def to_device_u8(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N, H, W, 3) uint8 array -> (N, 3, H, W) uint8 tensor on ``device`` (one copy)."""
    t = torch.as_tensor(images) if not isinstance(images, torch.Tensor) else images
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {t.dtype}")
    if t.ndim != 4:
        raise ValueError(f"expected (N, H, W, 3) images, got {tuple(t.shape)}")
    if t.shape[-1] == 3:
        t = t.permute(0, 3, 1, 2)
    return t.to(device, non_blocking=True).contiguous()


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def mirror_pairs(classes: list[str] | tuple[str, ...]) -> list[tuple[int, int]]:
    """Pairs ``(i, j)`` of classes whose names differ only by "left" <-> "right" (i < j).

    A horizontal flip turns an image of one such class into an image of the other (GTSRB's "keep
    left" / "keep right", "turn left ahead" / "turn right ahead"), so flipping as augmentation
    teaches the model to confuse them.
    """
    index = {c.strip().lower(): i for i, c in enumerate(classes)}
    pairs = set()
    for i, c in enumerate(classes):
        name = c.strip().lower()
        if not _LEFT_RIGHT.search(name):
            continue
        mirrored = _LEFT_RIGHT.sub(lambda m: "right" if m.group(1).lower() == "left" else "left", name)
        j = index.get(mirrored)
        if j is not None and j != i:
            pairs.add((min(i, j), max(i, j)))
    return sorted(pairs)


def resolve_flip(setting: str, classes: list[str] | tuple[str, ...]) -> bool:
    """Whether training augments with random horizontal flips: ``"on"`` / ``"off"`` as said;
    ``"auto"``: on unless some classes are mirror images of each other (:func:`mirror_pairs`)."""
    if setting not in FLIP_CHOICES:
        raise ValueError(f"flip: expected one of {', '.join(FLIP_CHOICES)}, got {setting!r}")
    if setting == "auto":
        return not mirror_pairs(classes)
    return setting == "on"


def augment_batch(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and random horizontal flip, batched on the device.

    x: (B, C, H, W) any dtype; returns the same shape and dtype. One random offset and flip per sample.
    """
    b, c, h, w = x.shape
    dev = x.device
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
        ox = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
        rows = (oy[:, None] + torch.arange(h, device=dev)[None, :])  # (B, H)
        cols = (ox[:, None] + torch.arange(w, device=dev)[None, :])  # (B, W)
        if flip:
            f = torch.rand(b, device=dev, generator=generator) < 0.5
            cols = torch.where(f[:, None], cols.flip(1), cols)
        bi = torch.arange(b, device=dev)[:, None, None]
        out = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        return out.permute(0, 3, 1, 2)
    if flip:
        f = torch.rand(b, device=dev, generator=generator) < 0.5
        return torch.where(f[:, None, None, None], x.flip(3), x)
    return x


def u8_to_float(x: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [0, 1], channels_last memory when asked."""
    y = x.float().div_(255.0)
    return y.contiguous(memory_format=torch.channels_last) if channels_last else y


def iterate_batches(n: int, batch_size: int, generator: torch.Generator | None, device: torch.device,
                    shuffle: bool = True, max_batches: int | None = None, drop_last: bool = False) -> Iterator[torch.Tensor]:
    """Index tensors of one epoch: a seeded permutation of ``range(n)`` cut into batches."""
    idx = torch.randperm(n, generator=generator, device="cpu").to(device) if shuffle else torch.arange(n, device=device)
    nb = n // batch_size if drop_last else math.ceil(n / batch_size)
    if max_batches is not None:
        nb = min(nb, max_batches)
    for i in range(nb):
        yield idx[i * batch_size:(i + 1) * batch_size]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {cfg.optimizer!r}")


def train_classifier(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    cfg: TrainConfig = TrainConfig(),
    device: str | torch.device = "auto",
    on_epoch: Callable[[dict], None] | None = None,
    progress: bool = False,
    desc: str = "train",
) -> list[dict]:
    """Train ``model`` in place with cross-entropy on (images, labels); returns per-epoch stats.

    images: (N, H, W, 3) uint8 (numpy) or an (N, 3, H, W) uint8 tensor already on the device.
    labels: (N,) int64. Each stats dict holds epoch, loss (mean CE), train_acc, seconds, images_per_s.
    """
    from .distributed import all_reduce_sum, is_distributed, rank, shard_range, world_size, wrap_ddp

    dev = resolve_device(device)
    dist = is_distributed()
    prec = resolve_precision(cfg.precision, dev)
    x_all = images if (isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] == 3) else to_device_u8(images, dev)
    x_all = x_all.to(dev)
    y_all = torch.as_tensor(labels, dtype=torch.long).to(dev)
    n = len(y_all)
    if n == 0:
        raise ValueError("cannot train on an empty set")
    model.to(dev)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    net = wrap_ddp(model, dev) if dist else model
    opt = make_optimizer(model, cfg)
    steps_per_epoch = math.ceil(n / cfg.batch_size) if cfg.max_batches is None else min(cfg.max_batches, math.ceil(n / cfg.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * steps_per_epoch)) if cfg.schedule == "cosine" else None
    gen_cpu = torch.Generator().manual_seed(cfg.seed)
    # each rank augments with its own stream; a single process keeps the historical seed
    gen_dev = torch.Generator(device=dev).manual_seed(cfg.seed + 1 + (7919 * rank() if dist else 0))
    history = []
    bar = None
    if progress and (not dist or rank() == 0):
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=desc, unit="batch", leave=False)
    for epoch in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        tot_loss = torch.zeros((), device=dev)
        correct = torch.zeros((), device=dev, dtype=torch.long)
        seen = 0
        for bidx in iterate_batches(n, cfg.batch_size, gen_cpu, dev, max_batches=cfg.max_batches):
            if dist:  # every rank sees the same global batch; keep this rank's share
                if len(bidx) < world_size():
                    continue  # a last batch too small to split: skipped by every rank alike
                lo, hi = shard_range(len(bidx))
                bidx = bidx[lo:hi]
            xb = x_all[bidx]
            if cfg.augment:
                xb = augment_batch(xb, gen_dev, flip=cfg.flip)
            xb = u8_to_float(xb, cfg.channels_last)
            yb = y_all[bidx]
            with autocast(dev, prec):
                out = net(xb)
                loss = F.cross_entropy(out.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            tot_loss += loss.detach() * len(bidx)
            correct += (out.argmax(1) == yb).sum()
            seen += len(bidx)
            if bar is not None:
                bar.update(1)
        if dist:
            seen_t = all_reduce_sum(torch.tensor(float(seen), device=dev))
            tot_loss, correct, seen = all_reduce_sum(tot_loss), all_reduce_sum(correct), int(seen_t.item())
        dt = time.perf_counter() - t0
        stats = {"epoch": epoch + 1, "loss": float(tot_loss) / seen, "train_acc": float(correct) / seen,
                 "seconds": dt, "images_per_s": seen / dt}
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
    if bar is not None:
        bar.close()
    model.eval()
    return history


@torch.no_grad()
def predict(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    device: str | torch.device = "auto",
    batch_size: int = 1024,
    precision: str = "auto",
    features: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Logits (N, K) float32 of ``model`` on uint8 images (N, H, W, 3); with ``features=True`` also
    the penultimate features (N, D) float32. Batched on the device, bf16 autocast where chosen."""
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    model.eval().to(dev)  # outside inference mode: moved parameters must stay trainable
    outs, feats = [], []
    with torch.inference_mode():
        _predict_batches(model, images, dev, batch_size, prec, features, outs, feats)
    k = getattr(getattr(model, "linear", None), "out_features", 0)
    logits = torch.cat(outs).numpy() if outs else np.zeros((0, k), np.float32)
    if features:
        return logits, (torch.cat(feats).numpy() if feats else np.zeros((0, 0), np.float32))
    return logits


def _predict_batches(model: nn.Module, images, dev: torch.device, batch_size: int, prec: str, features: bool,
                     outs: list, feats: list) -> None:
    n = len(images)
    for i in range(0, n, batch_size):
        xb = to_device_u8(images[i:i + batch_size], dev) if not isinstance(images, torch.Tensor) or images.shape[1] != 3 else images[i:i + batch_size].to(dev)
        xb = u8_to_float(xb, channels_last=True)
        with autocast(dev, prec):
            if features:
                f = model.features(xb)
                outs.append(model.linear(f).float().cpu())
                feats.append(f.float().cpu())
            else:
                outs.append(model(xb).float().cpu())
