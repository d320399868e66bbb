"""The target class split in two by the suspicious model's own features (activation clustering).

A dirty-label poison is an image of some other class that carries the trigger and the target's
label. The suspicious model learnt to send it to the target through the trigger, not through what
the image shows, so in the model's penultimate features the target-labelled samples fall into two
groups: the real target-class images and the poisons (Chen et al., "Detecting Backdoor Attacks on
Deep Neural Networks by Activation Clustering", 2018). The rank rule cannot make this split when the
reference is weak on the target class: on the demo's Blended row (the reference 21 % right on clean
birds) 260 of the 800 clean birds were suspects and had their label unlearnt, and bird recall fell
from 61 to 34 %. Two-means in the features' top principal components puts 396 of the 397 poison
suspects in one cluster and 254 of the 260 clean ones in the other (bench/README.md).

Which cluster holds the poisons is read from the joint suspicion (the reference's rank minus the
model's, per sample): the poisons' cluster has the higher mean. A warping trigger gives no clean
split: WaNet's warped images sit among the clean ones in feature space (silhouette 0.16 on the demo
and on full-size CIFAR-10, where 1,279 of the 5,000 poisons fell in the "clean" cluster; the
dirty-label rows that split well: 0.21-0.53) and their two mean suspicions differ little (0.02 and
0.11; 0.18-0.85 elsewhere). So a split is trusted only with a silhouette of at least
:data:`MIN_SILHOUETTE` and a gap of at least :data:`MIN_GAP`; otherwise nothing changes.
"""
from __future__ import annotations

import numpy as np

__all__ = ["MIN_GAP", "MIN_SILHOUETTE", "silhouette", "split_target", "two_means"]

MIN_GAP = 0.15  # least difference of the clusters' mean suspicion (rank units, in [-1, 1]) to trust a split
MIN_SILHOUETTE = 0.18  # least mean silhouette of the two clusters to trust a split
SILHOUETTE_SAMPLE = 2000  # silhouette on at most this many samples (seeded), which keeps it O(2000^2)
MIN_SAMPLES = 20  # fewer target-labelled samples than this: no split
N_COMPONENTS = 10  # principal components of the features the clusters are found in


def two_means(z: np.ndarray, seed: int = 0, n_init: int = 10, iters: int = 100) -> np.ndarray:
    """Two-means clustering of the rows of ``z`` (M, d): (M,) int labels in {0, 1}.

    k-means++ seeding, ``n_init`` restarts from ``seed``, the lowest within-cluster sum of squares kept.
    """
    z = np.asarray(z, np.float64)
    rng = np.random.default_rng(seed)
    best, best_cost = np.zeros(len(z), np.int64), np.inf
    for _ in range(n_init):
        c0 = z[rng.integers(len(z))]
        d0 = ((z - c0) ** 2).sum(1)
        p = d0 / d0.sum() if d0.sum() > 0 else np.full(len(z), 1 / len(z))
        centres = np.stack([c0, z[rng.choice(len(z), p=p)]])
        lab = np.zeros(len(z), np.int64)
        for it in range(iters):
            d = ((z[:, None, :] - centres[None]) ** 2).sum(2)
            new = d.argmin(1)
            if it and (new == lab).all():
                break
            lab = new
            for k in (0, 1):
                if (lab == k).any():
                    centres[k] = z[lab == k].mean(0)
        cost = ((z - centres[lab]) ** 2).sum()
        if cost < best_cost:
            best, best_cost = lab.copy(), cost
    return best


def silhouette(z: np.ndarray, lab: np.ndarray, seed: int = 0) -> float:
    """Mean silhouette (in [-1, 1]; higher = better separated) of a two-cluster labelling ``lab`` (M,) of ``z``
    (M, d), on a seeded sample of at most :data:`SILHOUETTE_SAMPLE` rows."""
    z, lab = np.asarray(z, np.float64), np.asarray(lab)
    if len(z) > SILHOUETTE_SAMPLE:
        keep = np.random.default_rng(seed).choice(len(z), SILHOUETTE_SAMPLE, replace=False)
        z, lab = z[keep], lab[keep]
    sq = (z * z).sum(1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None] - 2 * z @ z.T, 0.0))
    own = lab[:, None] == lab[None]
    n_own = own.sum(1) - 1
    if (n_own < 1).any() or (~own).sum(1).min() < 1:
        return -1.0
    a = (d * own).sum(1) / n_own
    b = (d * ~own).sum(1) / (~own).sum(1)
    return float(np.mean((b - a) / np.maximum(np.maximum(a, b), 1e-12)))


def split_target(features: np.ndarray, suspicion: np.ndarray, seed: int = 0) -> np.ndarray | None:
    """Which target-labelled samples look like poisons: (M,) bool, or None when no split is trusted.

    features: (M, D) the suspicious model's penultimate features of the samples labelled with the
    target class; suspicion: (M,) the reference's rank minus the model's for the same samples (higher
    = the reference doubts the label while the model learnt it easily). The features are centred and
    projected on their top :data:`N_COMPONENTS` principal components, split by :func:`two_means`, and
    the cluster with the higher mean suspicion is returned as True. None when M < :data:`MIN_SAMPLES`,
    one cluster is empty, the clusters' silhouette is below :data:`MIN_SILHOUETTE` or their mean
    suspicions differ by less than :data:`MIN_GAP`.
    """
    f = np.asarray(features, np.float64)
    s = np.asarray(suspicion, np.float64)
    if f.ndim != 2 or len(f) != len(s):
        raise ValueError(f"features (M, D) and suspicion (M,) must have the same M; got {f.shape} and {s.shape}")
    if len(f) < MIN_SAMPLES:
        return None
    f = f - f.mean(0)
    _, _, vt = np.linalg.svd(f, full_matrices=False)
    z = f @ vt[:N_COMPONENTS].T
    lab = two_means(z, seed)
    if lab.min() == lab.max() or silhouette(z, lab, seed) < MIN_SILHOUETTE:
        return None
    means = np.array([s[lab == 0].mean(), s[lab == 1].mean()])
    if abs(means[1] - means[0]) < MIN_GAP:
        return None
    return lab == int(means.argmax())
