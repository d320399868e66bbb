"""The run folder: every artefact of one audit, written atomically, readable by the dashboard.

Layout of ``RUN/``::

    run.json            config, versions, seeds, dataset fingerprint, device, per-stage keys and timings
    status.json         state (queued|running|done|failed|stopped), stage, progress, rate, eta, error
    data/               train_x.npy (N,H,W,3) uint8, train_y.npy, poison_mask.npy, original_labels.npy,
                        test_x.npy, test_y.npy, bd_x.npy, bd_true.npy, bd_target.npy, classes.json
    models/             victim.safetensors (+ .json), suspicious_<i>.safetensors, repaired.safetensors
    clip_logits.npy     (N, K) reference logits;  embeddings.npy (N, D) L2-normalised
    model_logits.npy    (N, K) suspicious-model logits (mean over runs)
    scores.parquet      one row per sample (see :func:`cgd.pipeline.scores_table`)
    separation.json     thresholds and subset sizes;  overrides.json  manual moves {index: subset}
    metrics.csv         one row per retraining epoch (epoch 0 = before repair); metrics_batches.csv every N batches
    exports/            clean_indices.{json,csv}, suspect_indices.{json,csv}, scores.csv
"""
from __future__ import annotations

import csv
import io
import os
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np

# generic array/JSON/atomic-file I/O lives in cgd.arrays; re-exported so cgd.runs.save_npy etc. keep working
from . import layout
from .arrays import (  # noqa: F401
    NpyWriter,
    _json_default,
    _pid_alive,
    _TEMP_NAME,
    atomic_write_bytes,
    atomic_write_text,
    read_json,
    remove_stale_temps,
    save_npy,
    write_json,
)

__all__ = ["RunDir", "RunLockedError", "atomic_write_bytes", "atomic_write_text", "write_json", "read_json",
           "save_npy", "NpyWriter", "remove_stale_temps", "utcnow", "list_runs"]


class RunLockedError(RuntimeError):
    """Another process holds the run folder."""


def utcnow(timespec: str = "seconds") -> str:
    return datetime.now(timezone.utc).isoformat(timespec=timespec)



class RunDir:
    """Paths and atomic readers/writers for one run folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # -- paths --------------------------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def run_json(self) -> Path:
        return self.path(layout.RUN_JSON)

    @property
    def status_json(self) -> Path:
        return self.path(layout.STATUS_JSON)

    # the artefacts, by what they hold (names from cgd.layout)
    @property
    def scores_path(self) -> Path:
        return self.path(layout.SCORES)

    @property
    def exports_dir(self) -> Path:
        return self.path(layout.EXPORTS)

    @property
    def models_dir(self) -> Path:
        return self.path(layout.MODELS)

    @property
    def victim_path(self) -> Path:
        return self.path(layout.VICTIM)

    @property
    def repaired_path(self) -> Path:
        return self.path(layout.REPAIRED)

    @property
    def metrics_path(self) -> Path:
        return self.path(layout.METRICS_CSV)

    def read_classes(self) -> list[str] | None:
        """Class names written by the data stage, or None before it ran."""
        return read_json(self.path(layout.CLASSES_JSON), None)

    def read_files(self) -> dict | None:
        """Image folders: {"root": ..., "files": [relative path per training sample]}; else None."""
        return read_json(self.path(layout.FILES_JSON), None)

    def read_data_info(self) -> dict:
        return read_json(self.path(layout.DATA_INFO_JSON), {}) or {}

    def read_provenance(self) -> dict | None:
        """How the current exports were made (``exports/provenance.json``; older runs: inside the
        JSON index list), or None when nothing was exported."""
        prov = read_json(self.path(layout.PROVENANCE_JSON), None)
        if prov is None:
            old = read_json(self.path(layout.EXPORTS, "clean_indices.json"), None)
            prov = old.get("provenance") if isinstance(old, dict) else None
        return prov

    def read_separation(self) -> dict | None:
        return read_json(self.path(layout.SEPARATION_JSON), None)

    def read_verdict(self) -> dict | None:
        return read_json(self.path(layout.VERDICT_JSON), None)

    def exists(self) -> bool:
        return self.run_json.is_file()

    # -- run.json -----------------------------------------------------------------------------
    def read_run(self) -> dict:
        return read_json(self.run_json, default={}) or {}

    def update_run(self, **fields: Any) -> dict:
        run = self.read_run()
        run.update(fields)
        write_json(self.run_json, run)
        return run

    def stage_record(self, name: str) -> dict | None:
        return self.read_run().get("stages", {}).get(name)

    def stage_done(self, name: str, key: str, files: list[str] = ()) -> bool:
        """True when stage ``name`` finished with input key ``key`` and its files exist."""
        rec = self.stage_record(name)
        return bool(rec and rec.get("key") == key and rec.get("done") and all(self.path(f).exists() for f in files))

    def mark_stage(self, name: str, key: str, seconds: float, **extra: Any) -> None:
        run = self.read_run()
        run.setdefault("stages", {})[name] = {"key": key, "done": True, "seconds": round(seconds, 3),
                                             "finished": utcnow("milliseconds"), **extra}
        write_json(self.run_json, run)

    def invalidate_from(self, names: list[str]) -> None:
        run = self.read_run()
        for n in names:
            run.get("stages", {}).pop(n, None)
        write_json(self.run_json, run)

    # -- status.json --------------------------------------------------------------------------
    def write_status(self, state: str, stage: str = "", progress: float = 0.0, **extra: Any) -> None:
        write_json(self.status_json, {"state": state, "stage": stage, "progress": float(progress),
                                      "updated_at": utcnow(), "pid": os.getpid(), **extra})

    def read_status(self) -> dict:
        try:
            return read_json(self.status_json, default={}) or {}
        except ValueError:
            return {}

    # -- arrays -------------------------------------------------------------------------------
    def save_array(self, name: str, arr: np.ndarray) -> Path:
        return save_npy(self.path(name), arr)

    def load_array(self, name: str, mmap: bool = False) -> np.ndarray:
        p = self.path(name)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing (has the stage that writes it run?)")
        return np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)

    def has(self, name: str) -> bool:
        return self.path(name).exists()

    # -- manual overrides ---------------------------------------------------------------------
    def read_overrides(self) -> dict[int, int]:
        """Manual subset moves {sample index: code (0 unused, 1 clean, 2 suspect)} from overrides.json."""
        return {int(k): int(v) for k, v in (read_json(self.path(layout.OVERRIDES_JSON), {}) or {}).items()}

    def save_overrides(self, overrides: dict[int, int]) -> Path:
        """Write overrides.json (read by the pipeline's separate stage); an empty dict removes it."""
        p = self.path(layout.OVERRIDES_JSON)
        if not overrides:
            p.unlink(missing_ok=True)
            return p
        bad = {k: v for k, v in overrides.items() if int(v) not in (0, 1, 2) or int(k) < 0}
        if bad:
            raise ValueError(f"overrides: codes must be 0, 1 or 2 and indices >= 0, got {bad}")
        return write_json(p, {str(int(k)): int(v) for k, v in sorted(overrides.items())})

    # -- lock ---------------------------------------------------------------------------------
    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock on the run folder (released when the process dies)."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        lp = self.path(".lock")
        f = open(lp, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunLockedError(f"run folder {self.root} is in use by {holder}; wait for that job or stop it first") from None
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()}")
            f.flush()
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            f.close()

    def is_locked(self) -> bool:
        import fcntl

        lp = self.path(".lock")
        if not lp.exists():
            return False
        with open(lp, "a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            return False

    # -- csv ----------------------------------------------------------------------------------
    def write_csv(self, name: str, rows: list[dict], header_lines: list[str] = ()) -> Path:
        buf = io.StringIO()
        for line in header_lines:
            buf.write(f"# {line}\n")
        if rows:
            w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        return atomic_write_text(self.path(name), buf.getvalue())

    def read_metrics(self) -> list[dict]:
        p = self.metrics_path
        if not p.is_file():
            return []
        return read_csv_rows(p)


def read_csv_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a CSV written by :meth:`RunDir.write_csv` ('#' provenance lines skipped), numbers parsed."""
    with open(path, newline="") as f:
        lines = [ln for ln in f if not ln.startswith("#")]
    return [{k: _num(v) for k, v in r.items()} for r in csv.DictReader(lines)]


def _num(v: str) -> Any:
    try:
        f = float(v)
        return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() and v.lower() != "nan" else f
    except (TypeError, ValueError):
        return v


def list_runs(root: str | os.PathLike) -> list[RunDir]:
    """Run folders directly under ``root`` (those holding a run.json), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [RunDir(p) for p in root.iterdir() if (p / layout.RUN_JSON).is_file()]
    return sorted(runs, key=lambda r: r.run_json.stat().st_mtime, reverse=True)


class Reporter:
    """Throttled progress writer: status.json at most every ``every`` seconds, plus a tqdm bar."""

    def __init__(self, run: RunDir, stage: str, total: int, unit: str = "img", every: float = 0.5, bar: bool = True):
        self.run, self.stage, self.total, self.unit, self.every = run, stage, max(int(total), 1), unit, every
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.bar = None
        if bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=stage, unit=unit, leave=False)
        self._done = 0

    def __call__(self, done: int, total: int | None = None, **extra: Any) -> None:
        if total:
            self.total = max(int(total), 1)
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.update(max(0, done - self._done))
        self._done = done
        now = time.perf_counter()
        if now - self.last < self.every and done < self.total:
            return
        self.last = now
        el = now - self.t0
        rate = done / el if el > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else None
        self.run.write_status("running", self.stage, done / self.total, done=done, total=self.total,
                              rate=rate, unit=self.unit, eta_s=eta, elapsed_s=el, **extra)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
