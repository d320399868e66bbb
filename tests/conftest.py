"""Shared fixtures: small real data (from ../shared/assets when present), a tiny open_clip model."""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_ASSETS = Path(os.environ.get("CGD_SHARED_ASSETS", ROOT.parent / "shared" / "assets"))
TINY_CLIP_CONFIG = Path(__file__).parent / "data" / "tiny-clip.json"
TINY_CLIP = "tiny-clip"  # registered with open_clip from tests/data/tiny-clip.json


def pytest_configure(config):
    os.environ.setdefault("CGD_CACHE", str(_cache_root() / "arrays"))
    # the shared reference-score cache stays off: a test that scores must really score (the cache's
    # own tests turn it on in a folder of their own)
    os.environ.setdefault("CGD_SCORE_CACHE_MB", "0")


def _cache_root() -> Path:
    d = Path(os.environ.get("CGD_TEST_CACHE", ROOT / ".cache" / "tests"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _extract(archive: Path, marker: str) -> Path:
    dest = _cache_root() / archive.name.split(".")[0]
    if not (dest / marker).exists():
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if shutil.which("tar"):
            subprocess.run(["tar", "-xJf", str(archive), "-C", str(tmp)], check=True)
        else:  # pragma: no cover
            with tarfile.open(archive) as t:
                t.extractall(tmp, filter="data")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    return dest


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """The real CIFAR-10 JPEGs as an ImageFolder root with train/ and test/ (skips without assets)."""
    archive = SHARED_ASSETS / "cifar10-jpeg.tar.xz"
    if not archive.is_file():
        pytest.skip(f"real CIFAR-10 assets absent ({archive})")
    return _extract(archive, "CIFAR-10-images/test") / "CIFAR-10-images"


@pytest.fixture(scope="session")
def gtsrb_root() -> Path:
    """The real GTSRB images (official layout) resized to 32 px (skips without assets)."""
    archive = SHARED_ASSETS / "gtsrb-32px.tar.xz"
    if not archive.is_file():
        pytest.skip(f"real GTSRB assets absent ({archive})")
    return _extract(archive, "gtsrb/GTSRB/Final_Test") / "gtsrb"


@pytest.fixture(scope="session")
def cifar_small(cifar_root):
    """(train, test): 2,000 + 1,000 real CIFAR-10 images, seeded, as ImageSets."""
    from cgd.data import load_splits, seeded_subset

    train, test = load_splits(f"imagefolder:{cifar_root}")
    return seeded_subset(train, 2000, 0), seeded_subset(test, 1000, 0)


@pytest.fixture(scope="session")
def tiny_clip() -> str:
    """Register the tiny open_clip config (random weights) and return its name."""
    import open_clip

    if TINY_CLIP not in open_clip.list_models():
        open_clip.add_model_config(TINY_CLIP_CONFIG)
    return TINY_CLIP


@pytest.fixture()
def synthetic_set():
    """A seeded 200-image, 4-class synthetic ImageSet (32x32) whose classes differ in colour."""
    from cgd.data import ImageSet

    rng = np.random.default_rng(0)
    n, k = 200, 4
    y = np.arange(n) % k
    base = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]], np.float32)
    x = base[y][:, None, None, :] + rng.normal(0, 25, (n, 32, 32, 3))
    return ImageSet(np.clip(x, 0, 255).astype(np.uint8), y, ["red", "green", "blue", "yellow"], name="synthetic")


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


gpu = pytest.mark.skipif(not has_cuda(), reason="needs a CUDA GPU")
