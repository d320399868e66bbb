"""Shared pieces of the speed benchmarks: hardware facts, timing, FLOP counting, result lines.

Every benchmark runs a *reference pattern* (how the paper's code does the job) and cgd's path in
the same process, on the same data and device, interleaved round by round, and reports images/s
for both, their ratio (median of the per-round ratios, robust to a busy machine), achieved
TFLOP/s and the fraction of the bare-model ceiling. One JSON line per run is appended to
``bench/results/<bench>.jsonl`` (gitignored).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from a checkout without installing
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def add_common_args(p) -> None:
    """Flags every benchmark takes."""
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default: cuda when present)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32", "int8"],
                   help="cgd's precision (default auto: bf16 on CUDA and on CPUs with bf16 units)")
    p.add_argument("--n", type=int, default=None, help="images per pass")
    p.add_argument("--data", default=None,
                   help="dataset spec (e.g. imagefolder:/path/CIFAR-10-images); default: seeded synthetic 32x32 images")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds (reference, cgd, ceiling in turn)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(RESULTS_DIR), help="folder for the <bench>.jsonl result lines")
    p.add_argument("--tag", default="", help="free text stored with the result line")


def setup_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))


def load_images(spec: str | None, n: int, seed: int = 0, split: str = "train") -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """(images (n, H, W, 3) uint8, labels (n,), class names, description).

    With a dataset spec, a seeded subset of its ``split``; without, seeded synthetic CIFAR-sized
    images (smooth random blobs, so a resize has real work to do) with 10 classes.
    """
    if spec:
        from cgd.data import load_splits, seeded_subset

        train, test = load_splits(spec)
        s = train if split == "train" or test is None else test
        if n > len(s):
            reps = -(-n // len(s))
            idx = np.tile(np.arange(len(s)), reps)[:n]
            s = s.subset(idx)
        else:
            s = seeded_subset(s, n, seed)
        return s.images, s.labels.astype(np.int64), list(s.classes), f"{spec} ({split}, {n} images)"
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    x = torch.from_numpy(low).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x + torch.from_numpy(rng.normal(0, 12, (n, 3, 32, 32)).astype(np.float32))).clamp(0, 255)
    images = x.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    labels = rng.integers(0, 10, n).astype(np.int64)
    return images, labels, list(CIFAR10_CLASSES), f"synthetic 32x32 ({n} images)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``fn()`` (device work included)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(paths: dict[str, tuple[Callable[[], object], int]], device: torch.device, repeats: int,
                log: Callable[[str], None] = print) -> dict[str, dict]:
    """Time each path (``name -> (fn, images per call)``) ``repeats`` times, round-robin.

    Returns ``name -> {"images_per_s": median, "best": max, "rounds": [...], "peak_mem_gib": ...}``.
    Interleaving puts the baseline and cgd side by side in time, so load from other processes hits
    both alike; :func:`ratio` takes the median of per-round ratios.
    """
    rates: dict[str, list[float]] = {k: [] for k in paths}
    peaks: dict[str, float] = {}
    for r in range(repeats):
        for name, (fn, images) in paths.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            dt = run_timed(fn, device)
            rates[name].append(images / dt)
            if device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
            log(f"  round {r + 1}/{repeats}  {name:<10} {images / dt:10.1f} img/s  ({dt:.2f} s)")
    out = {}
    for k, v in rates.items():
        out[k] = {"images_per_s": statistics.median(v), "best": max(v), "rounds": [round(a, 2) for a in v]}
        if k in peaks:
            out[k]["peak_mem_gib"] = round(peaks[k], 3)
    return out


def ratio(res: dict[str, dict], num: str, den: str) -> float:
    """Median over rounds of ``num``'s rate divided by ``den``'s rate in the same round."""
    a, b = res[num]["rounds"], res[den]["rounds"]
    return statistics.median([x / y for x, y in zip(a, b)]) if a and b else float("nan")


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (multiply-add = 2) that ``fn()`` runs, counted by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> dict:
    """Facts about the machine and software for the result line."""
    from cgd.device import bf16_fast_on_cpu

    info = {"platform": platform.platform(), "cpu": _cpu_model(), "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    try:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:
        pass
    info["cpu_bf16"] = bf16_fast_on_cpu()
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    gpu_count=torch.cuda.device_count())
    return info


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for mod in ("torchvision", "open_clip", "cgd"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    return out


def append_result(bench: str, record: dict, results_dir: str | Path = RESULTS_DIR) -> Path:
    """Append one JSON line to ``<results_dir>/<bench>.jsonl``; returns the file."""
    d = Path(results_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{bench}.jsonl"
    line = json.dumps({"bench": bench, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **record},
                      default=str)
    with open(path, "a") as f:
        f.write(line + "\n")
    return path


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two 1-D arrays (average ranks for ties)."""
    ra, rb = _average_ranks(np.asarray(a, np.float64)), _average_ranks(np.asarray(b, np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def _average_ranks(x: np.ndarray) -> np.ndarray:
    sorter = np.argsort(x, kind="mergesort")
    inv = np.empty_like(sorter)
    inv[sorter] = np.arange(len(x))
    xs = x[sorter]
    obs = np.r_[True, xs[1:] != xs[:-1]]
    dense = obs.cumsum()[inv]
    count = np.r_[np.nonzero(obs)[0], len(obs)]
    return 0.5 * (count[dense] + count[dense - 1] + 1)


def print_summary(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n== {title}")
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
