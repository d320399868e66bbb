#!/usr/bin/env python
"""Build the dashboard's built-in demo sample: a small, stratified, seeded copy of real CIFAR-10.

    python scripts/make_demo.py [--archive ../shared/assets/cifar10-jpeg.tar.xz] [--out assets/demo]
                                [--train-per-class 800] [--test-per-class 300] [--seed 0]

The original JPEG files (CIFAR-10 stored as JPEG quality 75) are copied byte for byte into an
ImageFolder layout ``OUT/cifar10/{train,test}/<class>/NNNN.jpg`` (file names kept, so every image
can be traced to its position in the official batch order). ``OUT/README.md`` records the source,
licence note and selection; ``OUT/MANIFEST.csv`` lists every file with its SHA-256.
Re-running with the same arguments rebuilds the same files.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARCHIVE = ROOT.parent / "shared" / "assets" / "cifar10-jpeg.tar.xz"
PREFIX = "CIFAR-10-images/"

README = """# Built-in demo sample: CIFAR-10 (small, real)

This folder holds a small stratified sample of the real **CIFAR-10** dataset for the dashboard's
offline demo (`streamlit run dashboard/app.py`, Dataset page, "Built-in demo").

* Source: CIFAR-10, A. Krizhevsky, *Learning Multiple Layers of Features from Tiny Images*, 2009
  (https://www.cs.toronto.edu/~kriz/cifar.html). Cite it when you report results on this sample.
* These files are copies of a JPEG (quality 75) export of CIFAR-10 (about 6/255 mean absolute
  pixel error against the official pickles); labels are exact. File names `NNNN.jpg` are the
  image's position within its class in the official batch order.
* Licence: CIFAR-10 is distributed by its authors for research and teaching without a formal
  licence; it is a labelled subset of the 80 Million Tiny Images collection. Keep this note with
  the files; do not redistribute the sample as a dataset of its own.
* Selection: {train_per_class} training and {test_per_class} test images per class (10 classes:
  {n_train} train, {n_test} test), drawn without replacement with `numpy.random.default_rng({seed})`
  from each class's sorted file list; made by `scripts/make_demo.py` from `{archive}`.
* `MANIFEST.csv` lists every file with its size and SHA-256.

Layout: `cifar10/{{train,test}}/<class>/NNNN.jpg` (an ImageFolder with train/ and test/ splits;
dataset spec `imagefolder:assets/demo/cifar10`).
"""


def select(names_by_split_class: dict[tuple[str, str], list[str]], split: str, per_class: int, seed: int) -> list[str]:
    out = []
    classes = sorted(c for s, c in names_by_split_class if s == split)
    for ci, c in enumerate(classes):
        names = sorted(names_by_split_class[(split, c)])
        if per_class > len(names):
            raise SystemExit(f"make_demo: class {c!r} of {split} has only {len(names)} images, asked for {per_class}")
        rng = np.random.default_rng([seed, ci, 0 if split == "train" else 1])
        pick = rng.choice(len(names), size=per_class, replace=False)
        out += [names[i] for i in sorted(pick)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    ap.add_argument("--out", type=Path, default=ROOT / "assets" / "demo")
    ap.add_argument("--train-per-class", type=int, default=800)
    ap.add_argument("--test-per-class", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if not a.archive.is_file():
        print(f"make_demo: {a.archive}: archive not found", file=sys.stderr)
        return 2
    with tarfile.open(a.archive, "r:xz") as tf:
        members = {m.name: m for m in tf.getmembers() if m.isfile() and m.name.endswith(".jpg")}
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name in members:
        parts = name[len(PREFIX):].split("/")
        if name.startswith(PREFIX) and len(parts) == 3 and parts[0] in ("train", "test"):
            groups[(parts[0], parts[1])].append(name)
    chosen = set(select(groups, "train", a.train_per_class, a.seed)) | set(select(groups, "test", a.test_per_class, a.seed))
    dest = a.out / "cifar10"
    tmp = a.out / "cifar10.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    rows = ["path,bytes,sha256"]
    with tarfile.open(a.archive, "r:xz") as tf:  # one sequential pass over the stream
        for m in tf:
            if m.name not in chosen:
                continue
            rel = m.name[len(PREFIX):]
            data = tf.extractfile(m).read()
            p = tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            rows.append(f"cifar10/{rel},{len(data)},{hashlib.sha256(data).hexdigest()}")
    if len(rows) - 1 != len(chosen):
        raise SystemExit(f"make_demo: copied {len(rows) - 1} files, expected {len(chosen)}")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    head, body = rows[0], sorted(rows[1:])
    (a.out / "MANIFEST.csv").write_text("\n".join([head, *body]) + "\n")
    try:
        archive_name = a.archive.resolve().relative_to(ROOT.parent).as_posix()
        archive_name = f"../{archive_name}"
    except ValueError:
        archive_name = a.archive.name
    (a.out / "README.md").write_text(README.format(train_per_class=a.train_per_class, test_per_class=a.test_per_class,
                                                   n_train=10 * a.train_per_class, n_test=10 * a.test_per_class,
                                                   seed=a.seed, archive=archive_name))
    total = sum(int(r.split(",")[1]) for r in body)
    print(f"wrote {len(body)} images ({total / 1e6:.1f} MB) to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
