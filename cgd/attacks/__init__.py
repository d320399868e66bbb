"""The attack simulator: poison a clean set with a known ground truth, for demos and benchmarks.

Twelve attacks in the three categories the CGD paper evaluates (``cgd attack --list``):

* dirty-label: ``badnets``, ``blended``, ``trojan`` (patches and blends); ``wanet``, ``ssba``,
  ``inputaware``, ``lowfreq``, ``bpp`` (invisible / sample-specific triggers);
* clean-label: ``sig``, ``lc`` (label-consistent, PGD on a surrogate), ``narcissus``;
* clean-image: ``cleanimage`` (labels flipped on images with a natural colour feature).

Nothing is read from resource files: triggers, perturbations, generators and surrogate models are
made by code, seeded, and cached under ``attack.cache_dir`` when set.

>>> from cgd import attacks
>>> atk = attacks.make_attack("badnets", image_size=(32, 32), seed=0)
>>> poisoned = atk.poison(clean_set, rate=0.1, target=0)          # ImageSet with poison_mask
>>> bd = atk.backdoor_test(test_set, target=0)                     # triggered test images for ASR
"""
from __future__ import annotations

from typing import Any

from .base import CATEGORIES, Attack, AttackNotPreparedError, select_poison_indices
from .blend import Blended
from .clean_image import CleanImage
from .clean_label import SIG, LabelConsistent, Narcissus
from .frequency import Bpp, LowFrequency
from .patch import BadNets, TrojanNN
from .sample_specific import SSBA, InputAware
from .warp import WaNet

__all__ = ["Attack", "AttackNotPreparedError", "CATEGORIES", "REGISTRY", "available", "make_attack", "describe_all", "select_poison_indices"]

REGISTRY: dict[str, type[Attack]] = {}


def register(cls: type[Attack]) -> type[Attack]:
    """Add an Attack subclass to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.category not in CATEGORIES:
        raise ValueError(f"{cls.__name__}.category must be one of {CATEGORIES}, got {cls.category!r}")
    REGISTRY[cls.name] = cls
    return cls


for _cls in (BadNets, Blended, TrojanNN, WaNet, SSBA, InputAware, LowFrequency, Bpp,
             SIG, LabelConsistent, Narcissus, CleanImage):
    register(_cls)


def available() -> list[str]:
    """Names of every attack, in registry order."""
    return list(REGISTRY)


def make_attack(name: str, image_size: tuple[int, int] = (32, 32), seed: int = 0, **params: Any) -> Attack:
    """An attack instance by name; unknown names raise a ValueError listing the valid ones."""
    key = name.lower()
    if key not in REGISTRY:
        raise ValueError(f"unknown attack {name!r}; available: {', '.join(available())}")
    return REGISTRY[key](image_size=image_size, seed=seed, **params)


def describe_all() -> list[dict[str, Any]]:
    """One dict per attack: name, category, defaults, paper, all_to_all (whether it is defined)."""
    return [{"name": c.name, "category": c.category, "defaults": dict(c.defaults), "paper": c.paper,
             "all_to_all": c.supports_all_to_all} for c in REGISTRY.values()]
