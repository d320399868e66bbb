"""Clean-image attack: labels flipped on images that share a natural feature; no pixel changes."""
from __future__ import annotations

import numpy as np

from ..data import ImageSet
from ..data import BackdoorTest
from .base import Attack, AttackNotPreparedError

__all__ = ["CleanImage"]


class CleanImage(Attack):
    """Clean-image backdoor: the "trigger" is a natural feature already present in some images.

    After Rong et al. (2024), who poison only labels, relabelling training images in which a natural
    trigger (a co-occurring set of categories in multi-label data) appears. For single-label image
    classification the natural feature here is a colour statistic computable from pixels: the mean
    projection of an image's RGB values (in [0, 1]) onto a colour direction v (``direction``, a unit
    RGB vector; default: drawn from the attack's seed, so each seed is a different feature, e.g.
    "reddish", "bluish", "bright"). Poisoning: the ``pool_factor`` x k non-target training images
    with the highest score define the feature (threshold t = the lowest score among them); k =
    round(rate * N) of them, chosen with the poison seed, are relabelled to the target. With the
    default pool_factor 1 every non-target training image above t is relabelled. Pixels never change:
    :meth:`apply_trigger` is the identity and :meth:`preview` shows a zero difference.

    ASR for this attack: :meth:`backdoor_test` returns the test images whose true class is not the
    target and whose score is >= t (the feature occurs naturally; nothing is added), and ASR is the
    fraction of them the model assigns to the target; RA the fraction still given their true class.
    Clean accuracy necessarily includes those same feature-bearing test images, so CA drops as ASR
    rises (by about ASR x the feature's frequency): the backdoor cannot be separated from the clean
    distribution, which is what makes the attack clean-image.

    Differs from the paper: the paper's natural trigger is a label co-occurrence in multi-label data;
    here it is a colour statistic, the single-label analogue.
    """

    name = "cleanimage"
    category = "clean-image"
    paper = "Rong et al., Clean-image Backdoor: Attacking Multi-label Models with Poisoned Labels Only, ICLR 2024"
    supports_all_to_all = False
    needs_data = True
    defaults = {"direction": None, "pool_factor": 1.0}

    def validate(self) -> None:
        self._num("pool_factor", 1.0, None)
        d = self.params["direction"]
        if d is not None:
            arr = np.asarray(d, dtype=np.float64) if isinstance(d, (list, tuple, np.ndarray)) else None
            if arr is None or arr.shape != (3,) or not np.isfinite(arr).all() or np.linalg.norm(arr) == 0:
                raise ValueError(f"attack 'cleanimage': parameter 'direction' must be a non-zero [r, g, b] list, got {d!r}")

    def direction(self) -> np.ndarray:
        """(3,) float64 unit RGB direction of the feature."""
        d = self.params["direction"]
        v = np.asarray(d, np.float64) if d is not None else np.random.default_rng([self.seed, 13]).standard_normal(3)
        return v / np.linalg.norm(v)

    def score(self, images: np.ndarray) -> np.ndarray:
        """(N,) float64: mean over pixels of rgb/255 . v for (N, H, W, 3) uint8 images."""
        images = self._check_images(images, "score")
        means = images.reshape(len(images), -1, 3).mean(axis=1, dtype=np.float64) / 255.0
        return means @ self.direction()

    @property
    def threshold(self) -> float:
        """The score above which an image has the feature (set by :meth:`poison`)."""
        if "threshold" not in self._memo:
            raise AttackNotPreparedError("attack 'cleanimage': the feature threshold is set by poison(clean, rate, target); call it first")
        return float(self._memo["threshold"])

    def _select(self, clean: ImageSet, rate: float, target: int, seed: int) -> np.ndarray:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"poison rate must lie in [0, 1], got {rate}")
        k = int(round(rate * len(clean)))
        pool = np.flatnonzero(clean.labels != target)
        s = self.score(clean.images)
        order = pool[np.argsort(-s[pool], kind="stable")]
        if k > len(order):
            import warnings

            warnings.warn(f"poison rate {rate} asks for {k} samples but only {len(order)} are eligible; poisoning {len(order)}")
            k = len(order)
        if k == 0:
            self._memo["threshold"] = np.inf
            return np.zeros(0, np.int64)
        m = min(len(order), int(np.ceil(float(self.params["pool_factor"]) * k)))
        eligible = order[:m]
        self._memo["threshold"] = float(s[eligible[-1]])
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(eligible, size=k, replace=False))

    def _trigger(self, images: np.ndarray) -> np.ndarray:
        return images.copy()

    def has_feature(self, images: np.ndarray) -> np.ndarray:
        """(N,) bool: score >= threshold (after :meth:`poison`)."""
        return self.score(images) >= self.threshold

    def backdoor_test(self, test: ImageSet, target: int) -> BackdoorTest:
        """Unmodified test images of non-target classes that naturally carry the feature."""
        if tuple(test.image_size) != self.image_size:
            raise ValueError(f"attack 'cleanimage' was built for {self.image_size} images, the test set has {test.image_size}")
        keep = np.flatnonzero((test.labels != target) & self.has_feature(test.images))
        return BackdoorTest(test.images[keep].copy(), test.labels[keep], np.full(len(keep), target, np.int64))
