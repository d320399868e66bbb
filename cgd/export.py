"""Exports of a run's separation: clean / suspect index lists, the scores table, their provenance.

Written under ``RUN/exports/`` (or another folder) by :func:`export_indices`:

* ``clean_indices.csv`` / ``suspect_indices.csv`` — plain CSV (one header row, no comments), one row
  per sample: ``index`` (0-based position in the run's training set), ``source_index`` (position in
  the original dataset), ``label``, ``label_name`` and, for image-folder datasets, ``file`` (the
  image's path relative to the dataset folder);
* ``clean_indices.json`` / ``suspect_indices.json`` — the same lists with their provenance;
* ``scores.csv`` — every sample's scores (see :mod:`cgd.scores`), subsets by name;
* ``provenance.json`` — how the lists were made (tool, run, dataset and its fingerprint, thresholds,
  manual moves, reference, seed), the file the CSVs are described by.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from . import __version__, layout
from .runs import RunDir, atomic_write_text, read_json, utcnow, write_json
from .scores import read_scores
from .separation import Subset

__all__ = ["export_indices", "provenance"]


def provenance(run: RunDir) -> dict:
    """Where a run's lists come from: tool, run, dataset, thresholds, reference, seed."""
    info = run.read_run()
    cfg = info.get("config", {})
    sep = run.read_separation() or {}
    sc = sep.get("config", {})
    ref = info.get("reference", {})
    files = read_json(run.path(layout.FILES_JSON), None)
    return {"tool": f"cgd {__version__}", "created": utcnow(), "run": str(run.root),
            "dataset": info.get("dataset", {}).get("spec"), "dataset_fingerprint": info.get("dataset", {}).get("fingerprint"),
            "files_root": files.get("root") if files else None,
            "sigma1": sc.get("sigma1"), "sigma2": sc.get("sigma2"), "sigma3": sc.get("sigma3", 0.0),
            "rank_mode": sc.get("rank_mode"), "manual_overrides": sep.get("overrides", 0),
            "reference": ref.get("model") or ref.get("checkpoint"), "reference_kind": ref.get("kind"),
            "reference_pretrained": ref.get("pretrained"), "seed": cfg.get("seed"),
            "index_base": "0-based position in the run's training set; source_index = position in the original dataset"}


def _csv(rows: list[list], header: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def export_indices(run: RunDir, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write the files listed in the module docstring; returns {name: path}. Indices are unique and sorted."""
    out = Path(out_dir) if out_dir else run.path(layout.EXPORTS)
    out.mkdir(parents=True, exist_ok=True)
    df = read_scores(run)
    prov = provenance(run)
    classes = read_json(run.path(layout.CLASSES_JSON), []) or []
    files_doc = read_json(run.path(layout.FILES_JSON), None)
    files = files_doc["files"] if files_doc and len(files_doc.get("files", [])) == len(df) else None
    names = np.array(classes + ["?"])[np.minimum(df["label"].to_numpy(), len(classes))] if classes else df["label"].astype(str).to_numpy()
    paths = {"provenance": write_json(out / "provenance.json", prov)}
    for code, meaning in ((Subset.CLEAN, "samples kept as clean: safe to train on"),
                          (Subset.SUSPECT, "samples flagged as possibly poisoned: remove or inspect")):
        sel = np.flatnonzero(df["subset"].to_numpy() == int(code))
        idx, src, lab = df["index"].to_numpy()[sel], df["source_index"].to_numpy()[sel], df["label"].to_numpy()[sel]
        header = ["index", "source_index", "label", "label_name"] + (["file"] if files else [])
        rows = [[int(i), int(s), int(y), str(names[k])] + ([files[int(i)]] if files else [])
                for k, i, s, y in zip(sel, idx, src, lab)]
        paths[f"{code.label}_csv"] = atomic_write_text(out / f"{code.label}_indices.csv", _csv(rows, header))
        doc = {"polarity": code.label, "meaning": meaning, "count": int(len(sel)), "provenance": prov,
               "indices": idx.astype(int).tolist(), "source_indices": src.astype(int).tolist()}
        if files:
            doc["files"] = [files[int(i)] for i in idx]
        paths[f"{code.label}_json"] = write_json(out / f"{code.label}_indices.json", doc)
    table = df.assign(subset=[Subset(int(c)).label for c in df["subset"].to_numpy()])
    if files:
        table = table.assign(file=files)
    paths["scores_csv"] = atomic_write_text(out / "scores.csv", table.to_csv(index=False))
    return paths
