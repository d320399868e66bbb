"""The built-in demo: a real CIFAR-10 sample shipped in ``assets/demo`` and the settings that make the
whole audit -- poison, score, separate, repair -- run on a 2-core CPU in a few minutes.

Measured on the sample (8,000 training and 3,000 test images, BadNets 10 %, target 0, CPU, seeds
0-2): the model to repair reaches CA 66-68 % with ASR 100 %, and after repair ASR 2.3-3.6 % (what
a never-poisoned model's ordinary mistakes give: 2.7-3.3 %) with CA within 1.4 points. Those figures
need a model that trains fast enough to see the data 16 times (``tiny-cnn``, Adam 5e-3, batch 128)
and a retraining long enough to unlearn (the default ``min_batches``: see
:class:`cgd.config.RetrainConfig`). ``tests/test_demo.py`` runs this flow with these settings and
asserts those targets.

No CLIP weights exist offline, so the demo's reference is a small classifier trained on a trusted
half of the sample's test images (:func:`reference_command`); the pipeline then keeps those images
out of every evaluation.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .config import RunConfig

__all__ = ["DEMO_ROOT", "DEMO_DATA", "DEMO_SPEC", "DEMO_SETTINGS", "TEACHING_ATTACK", "REFERENCE_ARCH", "REFERENCE_EPOCHS",
           "TRUSTED_FRACTION", "available", "run_settings", "run_config", "reference_path", "reference_ready", "reference_command",
           "is_demo"]

DEMO_ROOT = Path(os.environ.get("CGD_DEMO_ROOT") or Path(__file__).resolve().parents[1] / "assets" / "demo")
DEMO_DATA = DEMO_ROOT / "cifar10"
DEMO_SPEC = f"imagefolder:{DEMO_DATA}"

# the model to repair and the suspicious models (flat RunConfig settings)
DEMO_SETTINGS: dict = {"arch": "tiny-cnn", "train_epochs": 16, "train_lr": 5e-3, "train_batch_size": 128,
                       "suspicious_runs": 2, "suspicious_epochs": 3}
# teaching mode's default attack
TEACHING_ATTACK: dict = {"attack": "badnets", "poison_rate": 0.1, "target": 0}
# the reference classifier, trained on a trusted share of the sample's test images
REFERENCE_ARCH, REFERENCE_EPOCHS, TRUSTED_FRACTION = "tiny-cnn", 30, 0.5


def available() -> bool:
    """Whether the demo sample is on disk."""
    return (DEMO_DATA / "train").is_dir() and (DEMO_DATA / "test").is_dir()


def is_demo(spec: str | None) -> bool:
    return bool(spec) and spec == DEMO_SPEC


def reference_path() -> Path:
    """Where the demo's reference classifier is cached (``$CGD_CACHE/demo-reference.safetensors``)."""
    from .data import cache_dir

    return cache_dir() / "demo-reference.safetensors"


def reference_ready(path: Path | None = None) -> bool:
    """The cached demo reference exists and was trained, with today's recipe, on this sample's test split."""
    path = path or reference_path()
    if not path.is_file():
        return False
    try:
        from .models import read_checkpoint_meta

        meta = read_checkpoint_meta(path)
    except Exception:  # noqa: BLE001 - an unreadable cache entry is simply not ready
        return False
    tr = meta.get("trained_on") or {}
    return (tr.get("data") == DEMO_SPEC and tr.get("split") == "test" and bool(tr.get("indices"))
            and meta.get("arch") == REFERENCE_ARCH and (meta.get("train") or {}).get("epochs") == REFERENCE_EPOCHS)


def reference_command(path: Path | None = None, python: str | None = None) -> list[str]:
    """The ``cgd train`` command that builds the demo's reference classifier."""
    return [python or sys.executable, "-m", "cgd", "train", "--data", DEMO_SPEC, "--split", "test", "--trusted-fraction",
            str(TRUSTED_FRACTION), "--arch", REFERENCE_ARCH, "--epochs", str(REFERENCE_EPOCHS), "--out",
            str(path or reference_path()), "--quiet"]


def run_settings(attack: dict | None = None) -> dict:
    """The flat settings of a demo run (what the dashboard's Dataset page records): the sample, the
    teaching attack (or ``attack``; ``{}`` for none), the demo's models and its reference classifier."""
    atk = TEACHING_ATTACK if attack is None else attack
    return {"data": DEMO_SPEC, "reference": f"classifier:{reference_path()}", **DEMO_SETTINGS, **atk}


def run_config(out: str, attack: dict | None = None, **overrides) -> RunConfig:
    """The demo's RunConfig (:func:`run_settings`) for run folder ``out``; ``overrides`` are further flat settings."""
    return RunConfig.from_flat(out=str(out), **run_settings(attack), **overrides)
