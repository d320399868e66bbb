"""Model metrics: clean accuracy (CA), attack success rate (ASR), robust accuracy (RA)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .train import predict

__all__ = ["BackdoorTest", "evaluate_model", "model_metrics"]


@dataclass
class BackdoorTest:
    """Triggered test images for ASR/RA.

    images : (M, H, W, 3) uint8, test images with the trigger applied (only samples whose true
        label differs from their target).
    true_labels : (M,) int64, the images' real classes.
    target_labels : (M,) int64, the class the attacker wants (all equal for all-to-one).
    """

    images: np.ndarray
    true_labels: np.ndarray
    target_labels: np.ndarray

    def __post_init__(self) -> None:
        self.true_labels = np.asarray(self.true_labels, np.int64)
        self.target_labels = np.asarray(self.target_labels, np.int64)
        if not (len(self.images) == len(self.true_labels) == len(self.target_labels)):
            raise ValueError("BackdoorTest: images, true_labels and target_labels must have equal lengths")

    def __len__(self) -> int:
        return len(self.true_labels)


def model_metrics(clean_logits: np.ndarray | None, clean_labels: np.ndarray | None,
                  bd_logits: np.ndarray | None = None, bd: BackdoorTest | None = None) -> dict[str, float]:
    """CA, ASR, RA in percent from precomputed logits (NaN where the data is absent)."""
    out = {"ca": float("nan"), "asr": float("nan"), "ra": float("nan")}
    if clean_logits is not None and len(clean_labels):
        out["ca"] = 100.0 * float((clean_logits.argmax(1) == clean_labels).mean())
    if bd is not None and bd_logits is not None and len(bd):
        pred = bd_logits.argmax(1)
        out["asr"] = 100.0 * float((pred == bd.target_labels).mean())
        out["ra"] = 100.0 * float((pred == bd.true_labels).mean())
    return out


def evaluate_model(model: nn.Module, clean_images: np.ndarray | None, clean_labels: np.ndarray | None,
                   bd: BackdoorTest | None = None, device: str | torch.device = "auto",
                   batch_size: int = 1024, precision: str = "auto") -> dict[str, float]:
    """CA on (clean_images, clean_labels) and ASR/RA on ``bd``, in percent."""
    cl = predict(model, clean_images, device, batch_size, precision) if clean_images is not None else None
    bl = predict(model, bd.images, device, batch_size, precision) if bd is not None and len(bd) else None
    return model_metrics(cl, clean_labels, bl, bd)
