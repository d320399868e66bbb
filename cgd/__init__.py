"""cgd: audit an image-classification training set for backdoor poisoning and repair the model
trained on it, with CLIP-Guided backdoor Defense (CGD, arXiv 2507.05113).

The public API (the dashboard imports only this):

* data: :class:`ImageSet`, :func:`load_dataset`, :func:`load_splits`
* attacks: :mod:`cgd.attacks` (``make_attack``, ``available``)
* references: :class:`ClipReference`, :class:`ClassifierReference`
* separation: :func:`label_nll`, :func:`rank_normalise`, :func:`separate`, :func:`oversample_per_class`,
  :func:`detection_metrics`
* retraining: :func:`guided_retrain`, :class:`RetrainConfig`
* runs: :class:`RunConfig`, :func:`run_pipeline`, :class:`RunDir`
"""
__version__ = "0.1.0"

from .data import DatasetError, ImageSet, load_dataset, load_splits  # noqa: E402
from .separation import (SeparationConfig, detection_metrics, label_nll, oversample_per_class,  # noqa: E402
                         rank_normalise, separate)

__all__ = [
    "__version__", "ImageSet", "DatasetError", "load_dataset", "load_splits",
    "SeparationConfig", "label_nll", "rank_normalise", "separate", "oversample_per_class", "detection_metrics",
    "ClipReference", "ClassifierReference", "guided_retrain", "RetrainConfig", "RunConfig", "run_pipeline", "RunDir",
]


def __getattr__(name: str):  # lazy: keep `import cgd` light (no torch import until needed)
    if name in ("ClipReference", "ClassifierReference"):
        from . import reference

        return getattr(reference, name)
    if name in ("guided_retrain", "RetrainConfig"):
        from . import retrain

        return getattr(retrain, name)
    if name in ("RunConfig", "run_pipeline"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "RunDir":
        from .runs import RunDir

        return RunDir
    raise AttributeError(f"module 'cgd' has no attribute {name!r}")
