"""The attack simulator: poison a clean set with a known ground truth, for demos and benchmarks.

>>> from cgd import attacks
>>> atk = attacks.make_attack("badnets", image_size=(32, 32), seed=0)
>>> poisoned = atk.poison(clean_set, rate=0.1, target=0)          # ImageSet with poison_mask
>>> bd = atk.backdoor_test(test_set, target=0)                     # triggered test images for ASR
"""
from __future__ import annotations

from typing import Any

from .base import CATEGORIES, Attack, select_poison_indices
from .blend import Blended
from .patch import BadNets

__all__ = ["Attack", "CATEGORIES", "REGISTRY", "available", "make_attack", "describe_all", "select_poison_indices"]

REGISTRY: dict[str, type[Attack]] = {}


def register(cls: type[Attack]) -> type[Attack]:
    """Add an Attack subclass to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    REGISTRY[cls.name] = cls
    return cls


for _cls in (BadNets, Blended):
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
    """One dict per attack: name, category, defaults, paper."""
    return [{"name": c.name, "category": c.category, "defaults": dict(c.defaults), "paper": c.paper} for c in REGISTRY.values()]
