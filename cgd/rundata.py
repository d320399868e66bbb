"""The dataset as a run sees it: prepared once by the data stage, written under ``RUN/data/``.

:func:`prepare_dataset` loads the source, carves a test split where there is none, keeps the test
images that trained a classifier reference out of evaluation, takes the seeded subset and applies
the attack simulator; :func:`write_dataset` stores the result and :func:`load_run_data` reads it
back (images memory-mapped). :func:`source_signature` identifies the source's content, so a
replaced dataset file is read again instead of being reused.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import layout
from .config import RunConfig
from .data import BackdoorTest, DatasetError, ImageSet, load_splits, parse_spec, seeded_subset
from .runs import RunDir, read_json, write_json

__all__ = ["RunData", "PreparedData", "prepare_dataset", "write_dataset", "load_run_data", "source_signature"]


@dataclass
class RunData:
    """What the data stage wrote: train and test sets, the triggered test set, index maps, target."""

    train: ImageSet
    test: ImageSet | None
    bd: BackdoorTest | None
    source_index: np.ndarray | None
    target: int | None
    dataset_kind: str
    info: dict = field(default_factory=dict)


@dataclass
class PreparedData:
    train: ImageSet
    test: ImageSet | None
    bd: BackdoorTest | None
    target: int | None
    kind: str
    notes: list[str]
    files: list[str] | None = None  # image files of the training set, relative to files_root, in row order
    files_root: str | None = None


def source_signature(spec: str, data_root: str | None = None) -> str:
    """A signature of the dataset source's content: SHA-256 of a single file's bytes; for a folder,
    of every file's relative path, size and modification time (a replaced or edited file changes
    it). 16 hex digits."""
    _, path = parse_spec(spec)
    h = hashlib.sha256(spec.split(":", 1)[0].encode())
    roots = [Path(path)] + ([Path(data_root)] if data_root else [])
    for root in roots:
        if root.is_file():
            with open(root, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
        elif root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                for name in sorted(filenames):
                    p = Path(dirpath) / name
                    try:
                        st = p.stat()
                    except OSError:
                        continue
                    h.update(f"{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        else:
            h.update(b"missing")
    return h.hexdigest()[:16]


def prepare_dataset(cfg: RunConfig, attack_cache: Path | None = None) -> PreparedData:
    """Load ``cfg.data`` and shape it into the run's train / test / triggered-test sets."""
    kind, _ = parse_spec(cfg.data)
    train, test = load_splits(cfg.data, data_root=cfg.data_root, on_bad_files=cfg.on_bad_files)
    notes = _load_notes(train, test)
    files0, files_root = train.meta.get("files"), train.meta.get("files_root")
    if test is None:
        perm = np.random.default_rng(cfg.seed + 7).permutation(len(train))
        n_test = max(1, int(round(len(train) * cfg.holdout_fraction)))
        test, train = train.subset(np.sort(perm[:n_test]), "holdout"), train.subset(np.sort(perm[n_test:]))
        train.meta["source_index"] = np.sort(perm[n_test:])
        notes.append(f"no test split: held out {n_test} training images (seeded) for evaluation")
    if cfg.reference.kind == "classifier":
        test, note = _drop_reference_training_images(cfg, test)
        notes += [note] if note else []
    train = seeded_subset(train, cfg.subset, cfg.seed)
    test = seeded_subset(test, cfg.subset, cfg.seed) if test is not None else None
    bd = test.meta.get("bd_test") if test is not None else None
    target = None
    if cfg.attack:
        from .attacks import make_attack

        if train.poison_mask is not None and train.poison_mask.any():
            raise DatasetError(f"{cfg.data}: already carries poisoned samples; do not apply --attack on top")
        atk = make_attack(cfg.attack, image_size=train.image_size, seed=cfg.seed, **cfg.attack_params)
        atk.cache_dir = attack_cache
        train = atk.poison(train, cfg.poison_rate, cfg.target, seed=cfg.seed)
        bd = atk.backdoor_test(test, cfg.target) if test is not None else None
        target = cfg.target
        notes.append(f"attack {cfg.attack}: {int(train.poison_mask.sum())} of {len(train)} samples poisoned, target {cfg.target}")
    elif bd is not None:
        tl = np.unique(bd.target_labels)
        target = int(tl[0]) if len(tl) == 1 else None
    files = None
    if files0 is not None:
        src = train.meta.get("source_index")
        files = [files0[int(i)] for i in src] if src is not None else list(files0)
    return PreparedData(train, test, bd, target, kind, notes, files, files_root)


def _load_notes(train: ImageSet, test: ImageSet | None) -> list[str]:
    """What the loaders skipped or changed, as sentences for the run's dataset notes."""
    notes = []
    splits = [(n, s) for n, s in (("train", train), ("test", test)) if s is not None]
    skipped = {n: s.meta.get("skipped_files", 0) for n, s in splits}
    if any(skipped.values()):
        notes.append("skipped non-image files: " + ", ".join(f"{v} in {n}" for n, v in skipped.items() if v)
                     + " (use --on-bad-files error to refuse them)")
    links = {n: s.meta.get("skipped_links", 0) for n, s in splits}
    if any(links.values()):
        notes.append("skipped symbolic links that lead outside the dataset folder or nowhere: "
                     + ", ".join(f"{v} in {n}" for n, v in links.items() if v))
    for n, s in splits:
        if s.meta.get("resized_files"):
            size = s.meta.get("resized_to") or list(s.image_size)
            notes.append(f"{n}: {s.meta['resized_files']} images of another size were resized to {size[0]}x{size[1]}")
    return notes


def _drop_reference_training_images(cfg: RunConfig, test: ImageSet | None) -> tuple[ImageSet | None, str | None]:
    """A classifier reference trained on part of this dataset's test split: keep those images out of evaluation."""
    from .models import read_checkpoint_meta

    tr_on = read_checkpoint_meta(cfg.reference.target).get("trained_on") or {}
    if test is None or tr_on.get("split") != "test" or not tr_on.get("indices"):
        return test, None
    if tr_on.get("data") != cfg.data:
        # the same images under another path (a copied or moved dataset) are recognised by their fingerprint
        if not tr_on.get("split_fingerprint"):
            return test, (f"the reference classifier was trained on test images of {tr_on.get('data')}, not of {cfg.data}; "
                          "no test images were excluded (its checkpoint records no fingerprint to recognise them by: "
                          "if this is the same dataset moved elsewhere, retrain the reference with this version's `cgd train`)")
        if tr_on["split_fingerprint"] != test.fingerprint():
            return test, None
    used = np.asarray(tr_on.get("indices", []), np.int64)
    if len(used) and (used.min() < 0 or used.max() >= len(test)):
        raise DatasetError(f"{cfg.reference.target}: its recorded trusted indices do not fit the {len(test)} test images of {cfg.data}")
    keep = np.setdiff1d(np.arange(len(test)), used)
    return test.subset(keep), f"excluded {len(used)} test images that trained the reference classifier"


def write_dataset(run: RunDir, cfg: RunConfig, p: PreparedData) -> dict:
    """Write the prepared sets under ``RUN/data/`` (arrays atomically) and return the dataset facts."""
    sa, train, test, bd = run.save_array, p.train, p.test, p.bd
    sa(layout.data_file("train_x"), train.images)
    sa(layout.data_file("train_y"), train.labels)
    for name in ("poison_mask", "original_labels"):
        if getattr(train, name) is not None:
            sa(layout.data_file(name), getattr(train, name))
        else:
            run.path(layout.data_file(name)).unlink(missing_ok=True)
    if train.meta.get("source_index") is not None:
        sa(layout.data_file("source_index"), np.asarray(train.meta["source_index"], np.int64))
    if test is not None:
        sa(layout.data_file("test_x"), test.images)
        sa(layout.data_file("test_y"), test.labels)
    for n in ("bd_x", "bd_true", "bd_target"):
        run.path(layout.data_file(n)).unlink(missing_ok=True)
    if bd is not None and len(bd):
        sa(layout.data_file("bd_x"), bd.images)
        sa(layout.data_file("bd_true"), bd.true_labels)
        sa(layout.data_file("bd_target"), bd.target_labels)
    write_json(run.path(layout.CLASSES_JSON), train.classes)
    info = {"name": train.name, "spec": cfg.data, "dataset_kind": p.kind, "n_train": len(train),
            "n_test": len(test) if test is not None else 0, "n_bd_test": len(bd) if bd is not None else 0,
            "image_size": list(train.image_size), "num_classes": train.num_classes, "fingerprint": train.fingerprint(),
            "has_ground_truth": train.has_ground_truth, "target": p.target, "notes": p.notes,
            "attack": train.meta.get("attack")}
    if p.files is not None:  # image files, relative to their root: the exports name them
        write_json(run.path(layout.FILES_JSON), {"root": p.files_root, "files": p.files})
    else:
        run.path(layout.FILES_JSON).unlink(missing_ok=True)
    write_json(run.path(layout.DATA_INFO_JSON), info)
    return info


def load_run_data(run: RunDir, mmap: bool = True) -> RunData:
    """The dataset the data stage wrote into the run folder (images memory-mapped when ``mmap``)."""
    classes = read_json(run.path(layout.CLASSES_JSON))
    if classes is None:
        raise FileNotFoundError(f"{run.path(layout.DATA)}: no dataset in this run yet (run the data stage)")
    info = read_json(run.path(layout.DATA_INFO_JSON), {}) or {}

    def opt(n: str) -> np.ndarray | None:
        return run.load_array(layout.data_file(n)) if run.has(layout.data_file(n)) else None

    la = run.load_array
    train = ImageSet(la(layout.data_file("train_x"), mmap=mmap), la(layout.data_file("train_y")), classes,
                     poison_mask=opt("poison_mask"), original_labels=opt("original_labels"), name=info.get("name", "train"))
    test = None
    if run.has(layout.data_file("test_x")):
        test = ImageSet(la(layout.data_file("test_x"), mmap=mmap), la(layout.data_file("test_y")), classes, name="test")
    bd = None
    if run.has(layout.data_file("bd_x")):
        bd = BackdoorTest(la(layout.data_file("bd_x"), mmap=mmap), la(layout.data_file("bd_true")), la(layout.data_file("bd_target")))
    return RunData(train, test, bd, opt("source_index"), info.get("target"), info.get("dataset_kind", ""), info)
