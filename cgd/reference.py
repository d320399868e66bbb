"""Reference models: images -> logits (+ embeddings), behind one interface.

* :class:`ClipReference` — CLIP zero-shot over open_clip: any model name with a ``pretrained`` tag
  (downloaded by open_clip) or a local checkpoint file (safetensors, or a torch file read with
  ``weights_only=True``). Text classifier = mean of L2-normalised prompt embeddings over a template
  ensemble, re-normalised; logits = ``logit_scale.exp() * cos(image, class)``.
* :class:`ClassifierReference` — a cgd classifier checkpoint (for example one trained on a trusted
  clean split); embeddings are its L2-normalised penultimate features.

Images stay uint8 until they reach the device; resize (the model's interpolation, shortest side +
centre crop) and normalisation (the model's mean/std) run there, in bf16 where chosen.
"""
from __future__ import annotations

import difflib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .device import resolve_device, resolve_precision

__all__ = [
    "ReferenceScores",
    "Reference",
    "ClipReference",
    "ClassifierReference",
    "ReferenceError",
    "build_text_classifier",
    "gpu_preprocess",
    "parse_reference",
    "make_reference",
]

ProgressFn = Callable[[int, int], None]


class ReferenceError(ValueError):
    """A reference model cannot be built (unknown name, missing weights, wrong checkpoint)."""


@dataclass
class ReferenceScores:
    """logits: (N, K) float32; embeddings: (N, D) float32 L2-normalised, or None."""

    logits: np.ndarray
    embeddings: np.ndarray | None = None
    seconds: float = 0.0
    info: dict = field(default_factory=dict)


class Reference(Protocol):
    def score(self, images: np.ndarray, progress: ProgressFn | None = None) -> ReferenceScores: ...
    def describe(self) -> dict: ...


def gpu_preprocess(x_u8: torch.Tensor, size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                   interpolation: str = "bicubic", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 3, h, w) uint8 on the device -> (B, 3, *size) normalised float of ``dtype``.

    Resizes the shortest side to the target with antialiasing, centre-crops, then normalises.
    """
    x = x_u8.float().div_(255.0)
    th, tw = size
    h, w = x.shape[-2:]
    if (h, w) != (th, tw):
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        mode = interpolation if interpolation in ("bicubic", "bilinear") else "bilinear"
        x = F.interpolate(x, size=(nh, nw), mode=mode, align_corners=False, antialias=True)
        top, left = (nh - th) // 2, (nw - tw) // 2
        x = x[..., top:top + th, left:left + tw]
        if mode == "bicubic":
            x = x.clamp_(0.0, 1.0)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return ((x - m) / s).to(dtype)


@torch.no_grad()
def build_text_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence[str],
                          device: torch.device) -> torch.Tensor:
    """(D, K) float32 matrix: per class, the mean of normalised template embeddings, re-normalised."""
    if not classnames:
        raise ReferenceError("no class names given for the zero-shot classifier")
    if not templates or any("{}" not in t for t in templates):
        raise ReferenceError("every prompt template must contain '{}' where the class name goes")
    texts = [t.format(c) for c in classnames for t in templates]
    tokens = tokenizer(texts).to(device)
    emb = []
    for i in range(0, len(tokens), 512):
        emb.append(model.encode_text(tokens[i:i + 512]).float())
    e = F.normalize(torch.cat(emb), dim=-1).view(len(classnames), len(templates), -1).mean(1)
    return F.normalize(e, dim=-1).T.contiguous()


class ClipReference:
    """CLIP zero-shot scorer.

    Parameters
    ----------
    model_name : open_clip architecture name (``open_clip.list_models()``), e.g. ``"ViT-B-32"``.
    classnames, templates : prompt ingredients; templates contain ``{}``.
    pretrained : open_clip pretrained tag (downloads weights), or None.
    checkpoint : local weights file; wins over ``pretrained``. Neither: random weights (tests only).
    device, precision : ``"auto"`` picks CUDA / bf16 where available. bf16 casts the weights.
    batch_size : images per forward pass.
    """

    def __init__(self, model_name: str, classnames: Sequence[str], templates: Sequence[str],
                 pretrained: str | None = None, checkpoint: str | Path | None = None,
                 device: str | torch.device = "auto", precision: str = "auto", batch_size: int = 256):
        import open_clip

        self.model_name = model_name
        self.pretrained = pretrained
        self.checkpoint = str(checkpoint) if checkpoint else None
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.batch_size = int(batch_size)
        self.classnames = list(classnames)
        self.templates = list(templates)
        known = open_clip.list_models()
        if model_name not in known and not model_name.startswith(("hf-hub:", "local-dir:")):
            close = difflib.get_close_matches(model_name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ReferenceError(f"unknown open_clip model {model_name!r}{hint} (see open_clip.list_models())")
        source = self.checkpoint or pretrained
        if self.checkpoint and not Path(self.checkpoint).is_file():
            raise ReferenceError(f"{self.checkpoint}: CLIP checkpoint file not found")
        try:
            model = open_clip.create_model(model_name, pretrained=source, device="cpu", weights_only=True)
        except RuntimeError as e:
            if self.checkpoint:
                raise ReferenceError(f"{self.checkpoint}: does not fit open_clip model {model_name!r} ({str(e).splitlines()[0]})") from None
            raise ReferenceError(f"cannot build {model_name!r} with pretrained={pretrained!r}: {e}") from None
        except Exception as e:
            if self.checkpoint:
                raise ReferenceError(f"{self.checkpoint}: cannot load as weights for {model_name!r} ({e.__class__.__name__}: {e})") from None
            if pretrained:
                raise ReferenceError(
                    f"cannot get pretrained weights {model_name}/{pretrained} ({e.__class__.__name__}: {e}). "
                    "Offline? Download the weights elsewhere and pass them with --checkpoint FILE."
                ) from None
            raise
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        self.input_size = (size, size) if isinstance(size, int) else tuple(size)
        self.interpolation = cfg.get("interpolation", "bicubic")
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        model = model.to(self.device).eval()
        tokenizer = open_clip.get_tokenizer(model_name)
        self.text_classifier = build_text_classifier(model, tokenizer, self.classnames, self.templates, self.device)
        self.logit_scale = float(model.logit_scale.exp().clamp(max=100).item())
        self.model = model.to(self.dtype)

    def describe(self) -> dict:
        return {"kind": "clip", "model": self.model_name, "pretrained": self.pretrained,
                "checkpoint": self.checkpoint, "precision": self.precision, "device": str(self.device),
                "input_size": list(self.input_size), "templates": self.templates, "classnames": self.classnames,
                "logit_scale": self.logit_scale}

    @torch.no_grad()
    def encode_images(self, x_u8: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) uint8 on the device -> (B, D) float32 L2-normalised embeddings."""
        x = gpu_preprocess(x_u8, self.input_size, self.mean, self.std, self.interpolation, self.dtype)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def score(self, images: np.ndarray, progress: ProgressFn | None = None) -> ReferenceScores:
        """Zero-shot logits (N, K) and embeddings (N, D) for (N, H, W, 3) uint8 images."""
        t0 = time.perf_counter()
        n = len(images)
        logits, embs = [], []
        for i in range(0, n, self.batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(images[i:i + self.batch_size])).to(self.device, non_blocking=True)
            e = self.encode_images(xb.permute(0, 3, 1, 2))
            embs.append(e.cpu())
            logits.append((self.logit_scale * e @ self.text_classifier).cpu())
            if progress is not None:
                progress(min(i + self.batch_size, n), n)
        d = self.text_classifier.shape[0]
        lg = torch.cat(logits).numpy() if logits else np.zeros((0, len(self.classnames)), np.float32)
        em = torch.cat(embs).numpy() if embs else np.zeros((0, d), np.float32)
        return ReferenceScores(lg.astype(np.float32), em.astype(np.float32), time.perf_counter() - t0, self.describe())


class ClassifierReference:
    """A trained classifier checkpoint as reference: logits and normalised penultimate features."""

    def __init__(self, checkpoint: str | Path, num_classes: int | None = None,
                 device: str | torch.device = "auto", precision: str = "auto", batch_size: int = 1024):
        from .models import load_checkpoint

        self.checkpoint = str(checkpoint)
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.batch_size = batch_size
        self.model, self.meta = load_checkpoint(checkpoint, num_classes=num_classes, device=self.device)

    def describe(self) -> dict:
        return {"kind": "classifier", "checkpoint": self.checkpoint, "arch": self.meta.get("arch"),
                "precision": self.precision, "device": str(self.device),
                "trained_on": self.meta.get("trained_on")}

    def score(self, images: np.ndarray, progress: ProgressFn | None = None) -> ReferenceScores:
        from .train import predict

        t0 = time.perf_counter()
        logits, feats = [], []
        n = len(images)
        for i in range(0, n, self.batch_size):
            lg, ft = predict(self.model, images[i:i + self.batch_size], self.device, self.batch_size, self.precision, features=True)
            logits.append(lg)
            feats.append(ft)
            if progress is not None:
                progress(min(i + self.batch_size, n), n)
        lg = np.concatenate(logits) if logits else np.zeros((0, 0), np.float32)
        ft = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
        ft = ft / np.maximum(np.linalg.norm(ft, axis=1, keepdims=True), 1e-12)
        return ReferenceScores(lg.astype(np.float32), ft.astype(np.float32), time.perf_counter() - t0, self.describe())


def parse_reference(spec: str) -> tuple[str, str]:
    """``clip:MODEL`` or ``classifier:CKPT`` -> (kind, value)."""
    if ":" not in spec:
        raise ReferenceError(f"reference {spec!r}: expected clip:MODEL or classifier:CHECKPOINT")
    kind, value = spec.split(":", 1)
    if kind not in ("clip", "classifier") or not value:
        raise ReferenceError(f"reference {spec!r}: expected clip:MODEL or classifier:CHECKPOINT")
    return kind, value


def make_reference(spec: str, classnames: Sequence[str], templates: Sequence[str], pretrained: str | None = None,
                   checkpoint: str | None = None, device: str | torch.device = "auto", precision: str = "auto",
                   batch_size: int = 256) -> Reference:
    """Build a reference from a spec string (see :func:`parse_reference`)."""
    kind, value = parse_reference(spec)
    if kind == "clip":
        return ClipReference(value, classnames, templates, pretrained=pretrained, checkpoint=checkpoint,
                             device=device, precision=precision, batch_size=batch_size)
    return ClassifierReference(value, num_classes=len(classnames), device=device, precision=precision,
                               batch_size=max(batch_size, 512))
