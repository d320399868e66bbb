"""The attack interface: poison a clean ImageSet with known ground truth, trigger test images.

Every attack is fully determined by (class, params, seed, image size) and, for attacks that
optimise their trigger against a surrogate model, by the clean data handed to :meth:`Attack.poison`
(or :meth:`Attack.prepare`). Anything an attack needs (trigger image, perturbation, generator,
surrogate weights) is made by code here, seeded, and cached under ``attack.cache_dir`` when set
(the pipeline points it at ``RUN/attack``), else kept in memory.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from ..data import ImageSet
from ..data import BackdoorTest

__all__ = ["Attack", "CATEGORIES", "select_poison_indices", "AttackNotPreparedError"]

CATEGORIES = ("dirty-label", "clean-label", "clean-image")


class AttackNotPreparedError(RuntimeError):
    """The attack's trigger depends on the clean data and neither poison() nor prepare() ran yet."""


def select_poison_indices(labels: np.ndarray, rate: float, target: int, seed: int,
                          clean_label: bool = False, all_to_all: bool = False) -> np.ndarray:
    """Sorted indices of the samples to poison: exactly ``round(rate * N)`` of them.

    Dirty-label all-to-one attacks draw from non-target samples; clean-label attacks from the
    target class only (capped at its size, with a warning); all-to-all from every sample.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"poison rate must lie in [0, 1], got {rate}")
    n = len(labels)
    k = int(round(rate * n))
    if clean_label:
        pool = np.flatnonzero(labels == target)
    elif all_to_all:
        pool = np.arange(n)
    else:
        pool = np.flatnonzero(labels != target)
    if k > len(pool):
        warnings.warn(f"poison rate {rate} asks for {k} samples but only {len(pool)} are eligible; poisoning {len(pool)}")
        k = len(pool)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(pool, size=k, replace=False)) if k else np.zeros(0, np.int64)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


class Attack:
    """Base class. Subclasses set ``name``, ``category``, ``defaults``, ``paper`` and implement ``_trigger``.

    Class attributes
    ----------------
    name : registry key (lower case).
    category : one of :data:`CATEGORIES`.
    defaults : parameter name -> default value (the paper's setting unless the docstring says why not).
    paper : citation of the attack's paper.
    supports_all_to_all : whether ``all_to_all=True`` is defined for the attack (label y -> y + 1 mod K).
    needs_data : whether the trigger is optimised on the clean data (then :meth:`apply_trigger`
        needs :meth:`poison` or :meth:`prepare` first).

    Instance attributes
    -------------------
    params : the effective parameters (defaults updated with the constructor's keywords).
    seed : the seed of the trigger (and the default seed of the poison selection).
    image_size : (H, W) the attack was built for.
    cache_dir : folder for cached artefacts (trigger arrays, surrogate weights) or ``None`` (memory only).
    """

    name: ClassVar[str] = ""
    category: ClassVar[str] = "dirty-label"
    defaults: ClassVar[dict[str, Any]] = {}
    paper: ClassVar[str] = ""
    supports_all_to_all: ClassVar[bool] = True
    needs_data: ClassVar[bool] = False
    all_to_all: bool = False

    def __init__(self, image_size: tuple[int, int] = (32, 32), seed: int = 0, **params: Any):
        self.params: dict[str, Any] = dict(self.defaults)
        self._check_params(params)
        self.params.update({k: v for k, v in params.items() if k != "all_to_all"})
        self.all_to_all = bool(params.get("all_to_all", False))
        if self.all_to_all and not self.supports_all_to_all:
            raise ValueError(f"attack {self.name!r} ({self.category}) has no all-to-all form; use all_to_all=False")
        if len(image_size) != 2 or min(int(image_size[0]), int(image_size[1])) < 8:
            raise ValueError(f"attack {self.name!r}: image_size must be (H, W) with H, W >= 8, got {tuple(image_size)}")
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.seed = int(seed)
        self.cache_dir: str | os.PathLike | None = None
        self._memo: dict[str, Any] = {}
        self._target: int | None = None
        self.validate()

    # -- parameters ---------------------------------------------------------------------------
    def _check_params(self, params: dict[str, Any]) -> None:
        unknown = set(params) - set(self.defaults) - {"all_to_all"}
        if unknown:
            raise ValueError(f"attack {self.name!r}: unknown parameters {sorted(unknown)}; accepted: {sorted(self.defaults)}")

    def validate(self) -> None:
        """Check ``self.params``; subclasses raise a ValueError naming the parameter and the range."""

    def _num(self, key: str, lo: float | None = None, hi: float | None = None, integer: bool = False,
             lo_open: bool = False) -> float:
        """``self.params[key]`` as a number, checked against [lo, hi] (or (lo, hi] with lo_open)."""
        v = self.params[key]
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ValueError(f"attack {self.name!r}: parameter {key!r} must be a number, got {v!r}")
        if integer and float(v) != int(v):
            raise ValueError(f"attack {self.name!r}: parameter {key!r} must be an integer, got {v!r}")
        bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
        if bad_lo or (hi is not None and v > hi):
            rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise ValueError(f"attack {self.name!r}: parameter {key!r} must lie in {rng}, got {v!r}")
        return int(v) if integer else float(v)

    def set_params(self, **params: Any) -> None:
        """Update parameters (validated); drops cached triggers that depended on the old ones."""
        self._check_params(params)
        if "all_to_all" in params:
            a2a = bool(params["all_to_all"])
            if a2a and not self.supports_all_to_all:
                raise ValueError(f"attack {self.name!r} ({self.category}) has no all-to-all form; use all_to_all=False")
            self.all_to_all = a2a
        self.params.update({k: v for k, v in params.items() if k != "all_to_all"})
        self.validate()
        self._memo.clear()

    # -- to implement -------------------------------------------------------------------------
    def _trigger(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> triggered (N, H, W, 3) uint8 (the test-time trigger)."""
        raise NotImplementedError

    def prepare(self, clean: ImageSet, target: int, **kwargs: Any) -> None:
        """Hook for attacks that need the clean data first (surrogate models, optimised triggers).

        Called by :meth:`poison` before the samples are chosen; call it yourself to use
        :meth:`apply_trigger` of a data-dependent attack without poisoning.
        """
        self._target = int(target)

    # -- caching ------------------------------------------------------------------------------
    def cache_key(self, *parts: Any) -> str:
        """A short hex key from the attack's identity (name, params, seed, size) and ``parts``."""
        ident = {"name": self.name, "params": {k: _jsonable(v) for k, v in sorted(self.params.items())},
                 "seed": self.seed, "size": list(self.image_size), "parts": [_jsonable(p) for p in parts]}
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def cached_arrays(self, key: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Arrays stored under ``key``: from memory, else from ``cache_dir/<name>-<key>.npz``, else built.

        Built arrays are kept in memory and, when ``cache_dir`` is set, written atomically (no pickle).
        """
        if key in self._memo:
            return self._memo[key]
        path = Path(self.cache_dir) / f"{self.name}-{key}.npz" if self.cache_dir is not None else None
        if path is not None and path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
                self._memo[key] = arrays
                return arrays
            except Exception:  # a corrupt cache entry is rebuilt
                path.unlink(missing_ok=True)
        arrays = build()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        self._memo[key] = arrays
        return arrays

    def _require(self, key: str) -> Any:
        """A data-dependent artefact made by :meth:`prepare`; a clear error when it is missing."""
        if key not in self._memo:
            raise AttackNotPreparedError(
                f"attack {self.name!r} optimises its trigger on the clean data: call poison(clean, ...) or "
                f"prepare(clean, target) before apply_trigger/backdoor_test/preview")
        return self._memo[key]

    # -- public -------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """JSON-able identity: name, category, params, all_to_all, seed, image_size."""
        return {"name": self.name, "category": self.category, "params": {k: _jsonable(v) for k, v in self.params.items()},
                "all_to_all": self.all_to_all, "seed": self.seed, "image_size": list(self.image_size)}

    def target_labels(self, labels: np.ndarray, target: int, num_classes: int) -> np.ndarray:
        """The label each poisoned sample is given / the class its triggered version should hit."""
        if self.all_to_all:
            return (labels + 1) % num_classes
        return np.full_like(labels, target)

    def _check_images(self, images: np.ndarray, what: str) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"{what} expects (N, H, W, 3) uint8 images, got {images.shape} {images.dtype}")
        if tuple(images.shape[1:3]) != self.image_size:
            raise ValueError(f"attack {self.name!r} was built for {self.image_size} images, got {tuple(images.shape[1:3])}")
        return images

    def apply_trigger(self, images: np.ndarray) -> np.ndarray:
        """Add the test-time trigger to (N, H, W, 3) uint8 images; returns a new array of the same shape."""
        images = self._check_images(images, "apply_trigger")
        if len(images) == 0:
            return images.copy()
        return self._trigger(images)

    def poison(self, clean: ImageSet, rate: float = 0.1, target: int = 0, seed: int | None = None,
               **params: Any) -> ImageSet:
        """A poisoned copy of ``clean`` with ``poison_mask`` and ``original_labels`` set.

        Exactly ``round(rate * N)`` samples are poisoned (fewer for clean-label attacks when the
        target class is smaller), chosen with ``seed`` (default: the attack's seed). ``params``
        update the attack's parameters first (as :meth:`set_params`). Attacks with a noise /
        cross mode (WaNet, input-aware) also modify other samples without changing their labels;
        those are not backdoor samples: ``meta['attack_noise_mask']`` marks them.
        """
        if params:
            self.set_params(**params)
        if not 0 <= target < clean.num_classes:
            raise ValueError(f"target class {target} out of range [0, {clean.num_classes})")
        if tuple(clean.image_size) != self.image_size:
            raise ValueError(f"attack {self.name!r} was built for {self.image_size} images, the set has {clean.image_size}")
        seed = self.seed if seed is None else int(seed)
        self.prepare(clean, target)
        self._target = int(target)
        idx = self._select(clean, rate, target, seed)
        images = clean.images.copy()
        labels = clean.labels.copy()
        if len(idx):
            images[idx] = self._poison_images(clean.images[idx], idx)
            labels[idx] = self._poison_labels(clean.labels[idx], target, clean.num_classes)
        mask = np.zeros(len(clean), bool)
        mask[idx] = True
        noise = self._side_effects(clean, images, mask, seed)
        info = {**self.describe(), "rate": rate, "target": target, "poison_seed": seed, "n_poisoned": int(mask.sum())}
        meta = {**clean.meta, "attack": info}
        if noise is not None:
            info["n_noise"] = int(noise.sum())
            meta["attack_noise_mask"] = noise
        return replace(clean, images=images, labels=labels, poison_mask=mask,
                       original_labels=clean.true_labels().copy(), name=f"{clean.name}+{self.name}", meta=meta)

    def _select(self, clean: ImageSet, rate: float, target: int, seed: int) -> np.ndarray:
        """Indices to poison; clean-label attacks draw from the target class."""
        return select_poison_indices(clean.labels, rate, target, seed,
                                     clean_label=self.category == "clean-label", all_to_all=self.all_to_all)

    def _poison_images(self, images: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """The training-time version of the chosen samples (default: the test-time trigger)."""
        return self.apply_trigger(images)

    def _poison_labels(self, labels: np.ndarray, target: int, num_classes: int) -> np.ndarray:
        if self.category in ("clean-label",):
            return labels
        return self.target_labels(labels, target, num_classes)

    def _side_effects(self, clean: ImageSet, images: np.ndarray, mask: np.ndarray, seed: int) -> np.ndarray | None:
        """Hook for noise / cross modes: modify non-poisoned ``images`` in place (labels kept) and
        return their (N,) bool mask, or ``None`` when the attack has no such mode."""
        return None

    def backdoor_test(self, test: ImageSet, target: int) -> BackdoorTest:
        """Triggered test images whose true class differs from their target (for ASR and RA)."""
        if tuple(test.image_size) != self.image_size:
            raise ValueError(f"attack {self.name!r} was built for {self.image_size} images, the test set has {test.image_size}")
        tl = self.target_labels(test.labels, target, test.num_classes)
        keep = np.flatnonzero(test.labels != tl)
        return BackdoorTest(self.apply_trigger(test.images[keep]), test.labels[keep], tl[keep])

    def preview(self, image: np.ndarray, training: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(clean, poisoned, |difference| amplified to full range) for one (H, W, 3) uint8 image.

        ``training=False`` shows the test-time trigger, ``training=True`` the training-time
        poisoned version where it differs (label-consistent adversarial perturbation, Narcissus'
        unamplified trigger). The difference is all zeros for the clean-image attack.
        """
        clean = np.asarray(image)
        if clean.ndim != 3 or clean.shape[-1] != 3 or clean.dtype != np.uint8:
            raise ValueError(f"preview expects one (H, W, 3) uint8 image, got {clean.shape} {clean.dtype}")
        batch = self._check_images(clean[None], "preview")
        poisoned = (self._poison_images(batch, np.zeros(1, np.int64)) if training else self.apply_trigger(batch))[0]
        diff = np.abs(poisoned.astype(np.int16) - clean.astype(np.int16)).astype(np.float32)
        if diff.max() > 0:
            diff = diff / diff.max() * 255.0
        return clean, poisoned, diff.astype(np.uint8)
