"""Model metrics: clean accuracy (CA), attack success rate (ASR), robust accuracy (RA)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .data import BackdoorTest
from .train import predict

__all__ = ["BackdoorTest", "evaluate_model", "model_metrics"]


def model_metrics(clean_logits: np.ndarray | None, clean_labels: np.ndarray | None,
                  bd_logits: np.ndarray | None = None, bd: BackdoorTest | None = None) -> dict[str, float]:
    """CA, ASR, RA in percent from precomputed logits (NaN where the data is absent)."""
    out = {"ca": float("nan"), "asr": float("nan"), "ra": float("nan")}
    if clean_logits is not None and len(clean_labels):
        out["ca"] = 100.0 * float((clean_logits.argmax(1) == clean_labels).mean())
        out["n_test"] = int(len(clean_labels))
    if bd is not None and bd_logits is not None and len(bd):
        pred = bd_logits.argmax(1)
        out["asr"] = 100.0 * float((pred == bd.target_labels).mean())
        out["ra"] = 100.0 * float((pred == bd.true_labels).mean())
        if clean_logits is not None and len(clean_labels):
            out["asr_base"] = asr_baseline(clean_logits.argmax(1), np.asarray(clean_labels), bd)
    return out


def asr_baseline(clean_pred: np.ndarray, clean_labels: np.ndarray, bd: BackdoorTest) -> float:
    """The ASR that ordinary mistakes alone give, in percent: the share of *untriggered* test images
    that the model sends to the class the attacker wants for them, weighted by class as in ``bd``.

    clean_pred, clean_labels: (M,) predicted and true classes of the clean test set. Defined when
    the target is a function of the true class (all-to-one, all-to-all y -> y+1); NaN otherwise.
    A repaired model whose ASR is near this value no longer reacts to the trigger.
    """
    pairs = np.unique(np.stack([bd.true_labels, bd.target_labels], 1), axis=0)
    if len(pairs) == 0 or len(np.unique(pairs[:, 0])) != len(pairs):
        return float("nan")
    weights = np.bincount(bd.true_labels)
    num = den = 0.0
    for c, t in pairs:
        m = clean_labels == c
        if m.any():
            num += weights[c] * float((clean_pred[m] == t).mean())
            den += weights[c]
    return 100.0 * num / den if den else float("nan")


def evaluate_model(model: nn.Module, clean_images: np.ndarray | None, clean_labels: np.ndarray | None,
                   bd: BackdoorTest | None = None, device: str | torch.device = "auto",
                   batch_size: int = 1024, precision: str = "auto") -> dict[str, float]:
    """CA on (clean_images, clean_labels) and ASR/RA on ``bd``, in percent."""
    cl = predict(model, clean_images, device, batch_size, precision) if clean_images is not None else None
    bl = predict(model, bd.images, device, batch_size, precision) if bd is not None and len(bd) else None
    return model_metrics(cl, clean_labels, bl, bd)
