"""cgd: audit an image-classification training set for backdoor poisoning and repair the model
trained on it, with CLIP-Guided backdoor Defense (CGD, arXiv 2507.05113).

The modules, in the order the data flows through them:

========================  ====================================================================
``config``                every setting, once: RunConfig and its sections, presets, the flat view
``data``                  datasets as uint8 arrays (ImageSet), the dataset-kind registry, loaders
``attacks``               the attack simulator (teaching, benchmarks) with ground truth
``rundata``               the dataset as a run sees it (RUN/data)
``models``, ``train``     classifiers, a device-resident trainer
``reference``             CLIP zero-shot and classifier references; ``clip_config``: custom CLIP
                          architectures checked against an allowlist
``scoring``               the reference pass of a run, chunked and cached (``score_cache``)
``separation``            NLL -> rank -> flag: clean / suspect / unused (Subset codes)
``scores``                the per-sample scores table of a run
``verdict``               is the set poisoned, which target, what kind of attack
``retrain``               CLIP-guided retraining; ``repair`` judges its outcome
``export``                index lists and provenance
``pipeline``              the resumable stages over a run folder; ``runs`` and ``layout``: the folder
``jobs``                  background jobs on a run folder; ``drafts``: unsaved separations
``viz``, ``catalog``,     figures, the reference choices, the built-in demo (for the dashboard)
``demo``
========================  ====================================================================

Everything a client (the dashboard, a notebook) needs is importable from here: ``cgd.RunConfig``,
``cgd.read_scores``, ``cgd.jobs``, ... (loaded on first use, so ``import cgd`` stays light).
"""
__version__ = "0.1.0"

import importlib

# public name -> the module that defines it
_API = {
    **dict.fromkeys(("RunConfig", "SeparationConfig", "RetrainConfig", "TrainConfig", "ReferenceConfig", "PRESETS",
                     "apply_preset", "flat_fields", "flat_field", "help_for", "ARCHITECTURES", "DEFAULT_PRETRAINED",
                     "ConfigError"), "config"),
    **dict.fromkeys(("ImageSet", "DatasetError", "load_dataset", "load_splits", "DATASET_KINDS"), "data"),
    **dict.fromkeys(("Subset", "label_nll", "rank_normalise", "flag_subsets", "separate", "apply_overrides",
                     "oversample_per_class", "detection_metrics", "auroc", "roc_curve", "threshold_sweep", "subset_counts"),
                    "separation"),
    **dict.fromkeys(("read_scores", "read_subsets", "ranks", "subsets", "top_k", "compute_scores"), "scores"),
    **dict.fromkeys(("audit_verdict", "Verdict", "VerdictConfig"), "verdict"),
    **dict.fromkeys(("repair_outcome", "Outcome"), "repair"),
    **dict.fromkeys(("RunDir", "RunLockedError", "list_runs", "read_json", "write_json"), "runs"),
    **dict.fromkeys(("RunData", "load_run_data"), "rundata"),
    **dict.fromkeys(("run_pipeline", "STAGES", "PipelineStopped", "scores_table"), "pipeline"),
    **dict.fromkeys(("export_indices", "provenance"), "export"),
    **dict.fromkeys(("guided_retrain", "guided_losses"), "retrain"),
    **dict.fromkeys(("ClipReference", "ClassifierReference", "make_reference"), "reference"),
    **dict.fromkeys(("Draft",), "drafts"),
    **dict.fromkeys(("validate_clip_config", "check_clip_model_name", "ClipConfigError"), "clip_config"),
}
_MODULES = ("config", "data", "attacks", "rundata", "models", "train", "reference", "scoring", "score_cache", "separation",
            "scores", "verdict", "retrain", "repair", "export", "pipeline", "runs", "layout", "jobs", "drafts", "viz",
            "catalog", "demo", "embedding_map", "evaluation", "device", "clip_config", "serve", "zero_shot_metadata")

__all__ = ["__version__", *_API, *_MODULES]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'cgd' has no attribute {name!r}")
