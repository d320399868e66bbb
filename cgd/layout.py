"""The run folder's file names, defined once (:class:`cgd.runs.RunDir` exposes them as accessors).

No imports beyond the standard library: pages, the CLI and the pipeline all read these names.
"""
from __future__ import annotations

__all__ = ["RUN_JSON", "STATUS_JSON", "OVERRIDES_JSON", "SEPARATION_JSON", "VERDICT_JSON", "SCORES", "CLIP_LOGITS",
           "EMBEDDINGS", "MODEL_LOGITS", "CLIP_LOGITS_TEST", "EMBEDDINGS_TEST", "MODEL_LOGITS_TEST", "METRICS_CSV", "METRICS_BATCHES_CSV", "EMBEDDING_MAP", "DATA", "MODELS",
           "EXPORTS", "CHUNKS", "VICTIM", "REPAIRED", "STOP", "LOCK", "JOB_JSON", "JOB_LOG", "data_file", "suspicious_model",
           "EXPORT_FILES", "CLASSES_JSON", "FILES_JSON", "DATA_INFO_JSON", "PROVENANCE_JSON"]

RUN_JSON = "run.json"  # config (flat view), versions, dataset facts, per-stage keys and timings, summary
STATUS_JSON = "status.json"  # live state of the running job
OVERRIDES_JSON = "overrides.json"  # manual subset moves {index: code}
SEPARATION_JSON = "separation.json"  # thresholds, subset sizes, detection metrics
VERDICT_JSON = "verdict.json"  # the audit verdict (cgd.verdict)
SCORES = "scores.parquet"  # one row per training sample (cgd.scores)
CLIP_LOGITS = "clip_logits.npy"  # (N, K) reference logits (CLIP or a classifier)
EMBEDDINGS = "embeddings.npy"  # (N, D) L2-normalised reference embeddings
MODEL_LOGITS = "model_logits.npy"  # (N, K) suspicious-model logits
CLIP_LOGITS_TEST = "clip_logits_test.npy"  # (M, K) reference logits of the clean test split (the verdict's baseline)
EMBEDDINGS_TEST = "embeddings_test.npy"  # (M, D)
MODEL_LOGITS_TEST = "model_logits_test.npy"  # (M, K) suspicious-model logits of the test split
METRICS_CSV = "metrics.csv"  # CA / ASR / RA per retraining epoch (epoch 0 = before repair)
METRICS_BATCHES_CSV = "metrics_batches.csv"  # losses every few batches
EMBEDDING_MAP = "embedding_map.npz"  # 2-D map of the embeddings (cgd umap)
DATA = "data"  # the dataset as the run saw it
MODELS = "models"  # safetensors checkpoints with JSON sidecars
EXPORTS = "exports"  # index lists and the scores table
CHUNKS = "chunks"  # resumable partial work
VICTIM = "models/victim.safetensors"  # the model to repair
REPAIRED = "models/repaired.safetensors"  # the retrained model
STOP = "STOP"  # a stop request
LOCK = ".lock"  # held by the process working on the run
JOB_JSON = "job.json"  # the background job's record (cgd.jobs)
JOB_LOG = "job.log"  # its output
CLASSES_JSON = "data/classes.json"  # class names, in label order
FILES_JSON = "data/files.json"  # image folders: {"root": dataset root, "files": relative path per sample}
DATA_INFO_JSON = "data/info.json"  # what the data stage found (sizes, notes, skipped files)
PROVENANCE_JSON = "exports/provenance.json"  # how the exports were made

# files written by cgd export, in the order the pages list them: (name, what)
EXPORT_FILES = (
    ("clean_indices.csv", "clean subset: index, source index, label, file"),
    ("suspect_indices.csv", "suspect subset: index, source index, label, file"),
    ("clean_indices.json", "clean subset with provenance"),
    ("suspect_indices.json", "suspect subset with provenance"),
    ("scores.csv", "every sample's scores"),
    ("provenance.json", "how the lists were made"),
)


def data_file(name: str) -> str:
    """``data/<name>.npy``: one array of the dataset (train_x, train_y, poison_mask, test_x, bd_x, ...)."""
    return f"{DATA}/{name}.npy"


def suspicious_model(i: int) -> str:
    """Checkpoint of suspicious model ``i``."""
    return f"{MODELS}/suspicious_{i}.safetensors"
