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
import os
import time
from functools import lru_cache
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .clip_config import ClipConfigError, check_clip_model_name, register_clip_config, validate_clip_config
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
    "ClipConfigError",
    "validate_clip_config",
    "register_clip_config",
    "check_clip_model_name",
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


@lru_cache(maxsize=64)
def _resize_weights(n_in: int, n_out: int, mode: str) -> torch.Tensor:
    """(n_out, n_in) float64 matrix ``A`` with ``A @ v`` == 1-D antialiased ``mode`` resize of ``v``.

    Built by resizing the identity with :func:`torch.nn.functional.interpolate` itself, so the
    weights are exactly PyTorch's (PIL-style bicubic a=-0.5 / bilinear, antialiased when shrinking).
    Every row sums to 1.
    """
    eye = torch.eye(n_in, dtype=torch.float32)[None, None]  # (1, 1, n_in, n_in): resize the rows only
    out = F.interpolate(eye, size=(n_out, n_in), mode=mode, align_corners=False, antialias=True)
    return out[0, 0].double()


_RESIZE_CACHE: dict = {}


def _resize_matrices(h: int, w: int, size: tuple[int, int], mode: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column matrices (th, h), (w, tw) float32 on ``device`` for shortest-side resize to
    ``size`` followed by a centre crop."""
    key = (h, w, tuple(size), mode, str(device))
    hit = _RESIZE_CACHE.get(key)
    if hit is None:
        th, tw = size
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        top, left = (nh - th) // 2, (nw - tw) // 2
        a_h = _resize_weights(h, nh, mode)[top:top + th]
        a_w = _resize_weights(w, nw, mode)[left:left + tw]
        hit = (a_h.float().to(device), a_w.T.contiguous().float().to(device))
        if len(_RESIZE_CACHE) > 64:
            _RESIZE_CACHE.clear()
        _RESIZE_CACHE[key] = hit
    return hit


def gpu_preprocess(x_u8: torch.Tensor, size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                   interpolation: str = "bicubic", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 3, h, w) uint8 on the device -> (B, 3, *size) normalised float of ``dtype``.

    Resizes the shortest side to the target with antialiasing, centre-crops, then normalises —
    the same result as ``F.interpolate(..., antialias=True)`` + crop + clamp to [0, 1] (bicubic)
    + ``(x - mean) / std``, computed as two small fp32 matrix products (rows, then columns) with
    the interpolation weights: several times faster than ``F.interpolate`` on a CPU, and a
    negligible cost on a GPU. Normalisation runs first, on the small image (exact, because each
    row of weights sums to 1); the bicubic overshoot is clamped to the image of [0, 1].
    """
    if x_u8.ndim != 4 or x_u8.shape[1] != 3:
        raise ValueError(f"gpu_preprocess: expected (B, 3, h, w) images, got {tuple(x_u8.shape)}")
    dev = x_u8.device
    m = torch.tensor(mean, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    # (x / 255 - m) / s  ==  x * (1 / (255 s)) - m / s
    x = torch.addcmul(-m / s, x_u8.float(), 1.0 / (255.0 * s))
    th, tw = size
    h, w = x.shape[-2:]
    if (h, w) != (th, tw):
        mode = interpolation if interpolation in ("bicubic", "bilinear") else "bilinear"
        a_h, a_wt = _resize_matrices(h, w, (th, tw), mode, dev)
        x = torch.matmul(a_h, torch.matmul(x, a_wt))  # (B, 3, th, tw)
        if mode == "bicubic":
            x = x.clamp_(min=-m / s, max=(1.0 - m) / s)
    return x.to(dtype)


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


def quantize_image_tower(visual: torch.nn.Module) -> torch.nn.Module:
    """``visual`` with every ``nn.Linear`` replaced by a dynamically quantised int8 one (weights int8
    per tensor, activations quantised per batch on the fly; fbgemm/x86 kernels). On a 2-core Xeon with
    AVX512-BF16 but no AMX, ViT-B-32's image tower ran 1.53x faster than fp32 (1.65x with the ISA
    capped at AVX2), embeddings at cosine 0.9998 to fp32's (bench/README.md)."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        return quantize_dynamic(visual, {torch.nn.Linear}, dtype=torch.qint8)


class ClipReference:
    """CLIP zero-shot scorer.

    Parameters
    ----------
    model_name : open_clip architecture name (``open_clip.list_models()``), e.g. ``"ViT-B-32"``.
    classnames, templates : prompt ingredients; templates contain ``{}``.
    pretrained : open_clip pretrained tag (downloads weights), or None.
    checkpoint : local weights file; wins over ``pretrained``. Neither: random weights (tests only).
    device, precision : ``"auto"`` picks CUDA / bf16 where available. bf16 casts the weights.
    batch_size : images per forward pass on a GPU. On a CPU the forward pass runs in micro-batches
        of at most :attr:`cpu_forward_batch` (64) images whatever ``batch_size`` says: a ViT's
        activations for 32-64 images stay in the caches; 128-256 run ~25% slower per image.
    compile : compile the image tower with ``torch.compile`` (inductor, weights frozen as
        constants: fused epilogues, prepacked oneDNN weights; ~10% faster on a CPU, ~10-30 s to
        compile). ``None`` (default): the ``CGD_COMPILE`` environment variable (``1``/``0``) if set,
        else on for CPU jobs of at least :attr:`compile_min_images` images in one ``score`` call.
        Any compile failure falls back to eager mode with a warning.

    Speed notes: images move to the device as uint8 and are resized/normalised there by
    :func:`gpu_preprocess` (two small matrix products); the forward pass runs under
    ``torch.inference_mode`` with bf16 weights where chosen; ResNet towers use channels_last.
    Under ``torchrun`` each process scores a contiguous slice of the images and the results are
    gathered in order (:mod:`cgd.distributed`).
    """

    cpu_forward_batch = 64
    compile_min_images = 4096

    def __init__(self, model_name: str, classnames: Sequence[str], templates: Sequence[str],
                 pretrained: str | None = None, checkpoint: str | Path | None = None,
                 device: str | torch.device = "auto", precision: str = "auto", batch_size: int = 256,
                 compile: bool | None = None):
        import open_clip

        self.compile = compile
        self._compiled = None  # the compiled encode_image, once built

        self.model_name = model_name
        self.pretrained = pretrained
        self.checkpoint = str(checkpoint) if checkpoint else None
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device, "matmul_infer")
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
        if self.precision == "int8":  # CPU only (resolve_precision): the image tower's linear layers in int8
            model.visual = quantize_image_tower(model.visual)
            if self.compile is None:
                self.compile = False  # inductor gains nothing over fbgemm's int8 kernels here
        tokenizer = open_clip.get_tokenizer(model_name)
        self.text_classifier = build_text_classifier(model, tokenizer, self.classnames, self.templates, self.device)
        self.logit_scale = float(model.logit_scale.exp().clamp(max=100).item())
        self.model = model.to(self.dtype)
        # convolutional towers (open_clip ModifiedResNet, timm CNNs) run faster in channels_last;
        # a ViT's only convolution is its patch embedding, where the layout does not matter
        self.channels_last = not hasattr(model.visual, "transformer")
        if self.channels_last:
            self.model.visual.to(memory_format=torch.channels_last)

    def _want_compile(self, n: int) -> bool:
        if self._compiled is False:  # tried and failed
            return False
        if self._compiled is not None and self.compile is not False:  # built already: keep using it
            return True
        if self.compile is not None:
            return bool(self.compile)
        env = os.environ.get("CGD_COMPILE")
        if env is not None:
            return env.strip().lower() in ("1", "true", "yes", "on")
        return self.device.type == "cpu" and n >= self.compile_min_images

    def _encoder(self, n: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """encode_image, compiled when :meth:`_want_compile` says so (built once, then reused)."""
        if not self._want_compile(n):
            return self.model.encode_image
        if self._compiled is None:
            try:
                fn = torch.compile(self.model.encode_image, dynamic=False, options={"freezing": True})
                with torch.inference_mode():  # compile now, on a full-size batch, so a failure shows here
                    x = torch.zeros((self.forward_batch_size, 3, *self.input_size), dtype=self.dtype, device=self.device)
                    fn(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)
                self._compiled = fn
            except Exception as e:  # no C++ compiler, unsupported op, ...: eager is always correct
                import warnings

                warnings.warn(f"torch.compile of {self.model_name} failed, scoring in eager mode "
                              f"({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})", RuntimeWarning)
                self._compiled = False
                return self.model.encode_image
        return self._compiled

    @property
    def forward_batch_size(self) -> int:
        """Images per forward pass on this device (see the class docstring)."""
        if self.device.type == "cpu":
            return max(1, min(self.batch_size, self.cpu_forward_batch))
        return max(1, self.batch_size)

    def describe(self) -> dict:
        return {"kind": "clip", "model": self.model_name, "pretrained": self.pretrained,
                "checkpoint": self.checkpoint, "precision": self.precision, "device": str(self.device),
                "input_size": list(self.input_size), "templates": self.templates, "classnames": self.classnames,
                "logit_scale": self.logit_scale}

    @torch.no_grad()
    def encode_images(self, x_u8: torch.Tensor, encoder: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """(B, 3, h, w) uint8 on the device -> (B, D) float32 L2-normalised embeddings."""
        x = gpu_preprocess(x_u8, self.input_size, self.mean, self.std, self.interpolation, self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return F.normalize((encoder or self.model.encode_image)(x).float(), dim=-1)

    def score(self, images: np.ndarray, progress: ProgressFn | None = None) -> ReferenceScores:
        """Zero-shot logits (N, K) and embeddings (N, D) for (N, H, W, 3) uint8 images."""
        from .distributed import gather_in_order, is_distributed, shard_range

        t0 = time.perf_counter()
        n = len(images)
        dist = is_distributed()
        lo, hi = shard_range(n) if dist else (0, n)
        d, k = self.text_classifier.shape
        # results stay on the device until the end: no per-batch device->host synchronisation
        em = torch.empty((hi - lo, d), dtype=torch.float32, device=self.device)
        step = self.forward_batch_size
        encoder = self._encoder(hi - lo)
        compiled = encoder is not self.model.encode_image
        with torch.inference_mode():
            for i in range(lo, hi, step):
                j = min(i + step, hi)
                xb = torch.from_numpy(np.ascontiguousarray(images[i:j]))
                if xb.ndim != 4 or xb.shape[-1] != 3 or xb.dtype != torch.uint8:
                    raise ValueError(f"expected (N, H, W, 3) uint8 images, got {tuple(xb.shape)} {xb.dtype}")
                if compiled and j - i < step:  # a compiled graph has one batch size: pad the last batch
                    xb = torch.cat([xb, xb.new_zeros((step - (j - i), *xb.shape[1:]))])
                e = self.encode_images(xb.to(self.device, non_blocking=True).permute(0, 3, 1, 2), encoder)
                em[i - lo:j - lo] = e[:j - i]
                if progress is not None:
                    progress((j - lo) * n // max(hi - lo, 1) if dist else j, n)  # this rank's share, scaled
            lg = (self.logit_scale * em @ self.text_classifier).cpu().numpy()
            emb = em.cpu().numpy()
        if dist:
            lg, emb = gather_in_order(lg), gather_in_order(emb)
        return ReferenceScores(lg.astype(np.float32, copy=False), emb.astype(np.float32, copy=False),
                               time.perf_counter() - t0, self.describe())


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
        from .distributed import gather_in_order, is_distributed, shard_range
        from .train import predict

        t0 = time.perf_counter()
        logits, feats = [], []
        dist = is_distributed()
        n_all = len(images)
        lo, hi = shard_range(n_all) if dist else (0, n_all)
        images = images[lo:hi]
        n = len(images)
        for i in range(0, n, self.batch_size):
            lg, ft = predict(self.model, images[i:i + self.batch_size], self.device, self.batch_size, self.precision, features=True)
            logits.append(lg)
            feats.append(ft)
            if progress is not None:
                done = min(i + self.batch_size, n)
                progress(done * n_all // max(n, 1) if dist else done, n_all)
        k = self.model.linear.out_features
        lg = np.concatenate(logits) if logits else np.zeros((0, k), np.float32)
        ft = np.concatenate(feats) if feats else np.zeros((0, self.model.linear.in_features), np.float32)
        if dist:
            lg, ft = gather_in_order(lg.astype(np.float32)), gather_in_order(ft.astype(np.float32))
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
