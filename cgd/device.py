"""Device and precision choices shared by scoring and training."""
from __future__ import annotations

import contextlib
from functools import lru_cache

import torch

__all__ = ["resolve_device", "resolve_precision", "autocast", "bf16_fast_on_cpu", "bf16_faster_on_cpu", "WORKLOADS", "device_info", "seed_everything",
           "tune_cpu_allocator"]

_ALLOCATOR_TUNED: bool | None = None


def tune_cpu_allocator() -> bool:
    """Keep glibc malloc from handing activation buffers back to the kernel after every step.

    By default glibc serves blocks above a (dynamic) threshold with fresh ``mmap`` pages and trims
    the heap when its free top grows; a CPU training step allocates and frees tens of MB of
    activations, so every step page-faults that memory in again (measured: 1.5 M minor faults
    and ~25% of the time in one small-CNN epoch of 10,240 images). Raising the mmap threshold to
    glibc's maximum (32 MiB) and turning off trimming keeps those blocks in the heap: the same
    epoch ran 1,881 -> 2,714 img/s. The process keeps its peak heap instead of returning it.

    Idempotent; does nothing off glibc or with ``CGD_MALLOC_TUNE=0``. Returns True when applied.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED is not None:
        return _ALLOCATOR_TUNED
    import ctypes
    import os
    import sys

    _ALLOCATOR_TUNED = False
    if os.environ.get("CGD_MALLOC_TUNE", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024) == 1
        ok &= libc.mallopt(m_trim_threshold, 2**31 - 1) == 1  # int argument: ~2 GiB, i.e. effectively never
        ok &= libc.mallopt(m_top_pad, 64 * 1024 * 1024) == 1
        _ALLOCATOR_TUNED = bool(ok)
    except (OSError, AttributeError):
        pass
    return _ALLOCATOR_TUNED


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU; ``"cuda"`` without CUDA raises a clear error."""
    if isinstance(device, torch.device):
        dev = device
    elif device in (None, "auto"):
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    if dev.type == "cpu":
        tune_cpu_allocator()  # host-side compute: keep activation buffers resident (see its docstring)
    return dev


@lru_cache(maxsize=1)
def bf16_fast_on_cpu() -> bool:
    """True when the CPU has bf16 instructions (AVX512-BF16 or AMX); whether they are *faster*
    than fp32 is a separate, measured question (:func:`bf16_faster_on_cpu`)."""
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        return False
    if cap not in ("AVX512", "AMX"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


# What a CPU precision choice is measured on: the two shapes of work cgd runs.
WORKLOADS = ("conv_train", "matmul_infer")


def _bench_workload(workload: str, dtype: torch.dtype | None, reps: int) -> float:
    """Seconds for ``reps`` runs of a small representative kernel (after one warm-up run).

    conv_train: forward + backward of a 3x3 convolution (64 -> 128 channels, 16x16 maps, batch 64,
    channels_last) under autocast, as in the small-CNN training steps. matmul_infer: a ViT-B MLP
    matrix product (1024 x 768 @ 768 x 3072) with weights and activations in ``dtype``, as in CLIP
    scoring. ``dtype`` None = fp32. Runs with autograd on whatever the caller's mode: the first
    ``auto`` choice is often made inside ``predict``, under ``torch.no_grad``/``inference_mode``.
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _bench_workload_timed(workload, dtype, reps)


def _bench_workload_timed(workload: str, dtype: torch.dtype | None, reps: int) -> float:
    import time

    g = torch.Generator().manual_seed(0)
    if workload == "conv_train":
        conv = torch.nn.Conv2d(64, 128, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
        x = torch.randn(64, 64, 16, 16, generator=g).contiguous(memory_format=torch.channels_last)

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                y = conv(x)
            y.float().square().mean().backward()
    elif workload == "matmul_infer":
        dt = dtype or torch.float32
        a = torch.randn(1024, 768, generator=g).to(dt)
        w = torch.randn(768, 3072, generator=g).to(dt)

        def step() -> None:
            with torch.inference_mode():
                torch.matmul(a, w)
    else:
        raise ValueError(f"unknown workload {workload!r}; expected one of {', '.join(WORKLOADS)}")
    step()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    return time.perf_counter() - t0


BF16_MIN_GAIN = 0.85  # bf16 is chosen only when it takes at most this fraction of fp32's time


def _timed_pair(workload: str, rounds: int = 5, reps: int = 6) -> tuple[float, float, float]:
    """(fp32 s, bf16 s, median bf16/fp32 ratio) over ``rounds`` interleaved rounds of ``reps`` runs.

    Interleaving makes load from other processes hit both alike: timed in two blocks, a 2-core VM
    shared with a test run once measured bf16 1.2x *faster* where it is 1.5x slower when quiet, and
    the demo then trained in bf16 (other figures for the same seed). The median of per-round ratios
    ignores a round that a burst of load hit."""
    import statistics

    t32s, t16s = [], []
    for _ in range(rounds):
        t32s.append(_bench_workload(workload, None, reps))
        t16s.append(_bench_workload(workload, torch.bfloat16, reps))
    ratio = statistics.median(b / a for a, b in zip(t32s, t16s))
    return min(t32s), min(t16s), ratio


def _cpu_fingerprint() -> str:
    """CPU model, flags, thread count and torch version: a measured choice holds for these."""
    import hashlib

    try:
        with open("/proc/cpuinfo") as f:
            info = [ln for ln in f.read().splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        info = []
    txt = "|".join(info + [str(torch.get_num_threads()), torch.__version__])
    return hashlib.sha256(txt.encode()).hexdigest()[:16]


def _precision_cache_file():
    import os
    from pathlib import Path

    return Path(os.environ.get("CGD_CACHE", Path.home() / ".cache" / "cgd")) / "cpu-precision.json"


@lru_cache(maxsize=None)
def bf16_faster_on_cpu(workload: str = "conv_train") -> bool:
    """Whether bf16 beats fp32 for ``workload`` (one of :data:`WORKLOADS`) on this CPU, measured.

    CPUs differ: bf16 instructions exist on AMX parts (where bf16 is several times faster), on
    AVX512-BF16 parts (faster on some, 1.5-2x *slower* on others: seen on a 2-core Intel Xeon
    VM, small-CNN training 1,000 -> 680 img/s and ViT-B-32 scoring 31.5 -> 16.4 img/s) and not at
    all on AVX2 parts (emulated bf16, 10-20x slower). So ``auto`` times both on a small kernel of
    the workload once (about a second) and keeps the answer in ``$CGD_CACHE/cpu-precision.json``
    for this CPU model, flag set, thread count and torch version. ``CGD_CPU_BF16=1``/``0`` overrides.
    """
    import json
    import os

    env = os.environ.get("CGD_CPU_BF16")
    if env is not None and env.strip():
        return env.strip().lower() in ("1", "true", "yes", "on")
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; expected one of {', '.join(WORKLOADS)}")
    if not bf16_fast_on_cpu():
        return False
    key = f"{_cpu_fingerprint()}:{workload}"
    path = _precision_cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached, dict) and isinstance(cached.get(key), dict) and "bf16" in cached[key]:
        return bool(cached[key]["bf16"])
    t32, t16, ratio = _timed_pair(workload)
    faster = ratio < BF16_MIN_GAIN  # bf16 changes the numbers: take it only for a clear gain
    cached = cached if isinstance(cached, dict) else {}
    cached[key] = {"bf16": faster, "fp32_s": round(t32, 4), "bf16_s": round(t16, 4), "ratio": round(ratio, 3),
                   "torch": torch.__version__}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(cached, indent=2))
        os.replace(tmp, path)
    except OSError:
        pass
    return faster


def resolve_precision(precision: str, device: torch.device, workload: str = "conv_train") -> str:
    """``"auto"`` -> ``"bf16"`` on CUDA GPUs that support it; on a CPU, ``"bf16"`` only where it was
    measured faster than fp32 for ``workload`` (:func:`bf16_faster_on_cpu`), else ``"fp32"``.
    ``"int8"`` stays ``"int8"`` for CPU ``matmul_infer`` (CLIP scoring, see :class:`cgd.reference.
    ClipReference`) and means ``"fp32"`` everywhere else. It is never chosen by ``"auto"``: dynamic
    quantisation scales each batch's activations together, so a sample's scores depend (slightly) on
    its batch-mates, which the resumable, sharded scoring must not."""
    if precision not in ("auto", "bf16", "fp32", "int8"):
        raise ValueError(f"precision must be one of auto, bf16, fp32, int8; got {precision!r}")
    if precision == "int8":  # int8 exists for CPU inference of linear layers (CLIP scoring) only
        return "int8" if device.type == "cpu" and workload == "matmul_infer" else "fp32"
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if bf16_faster_on_cpu(workload) else "fp32"


def autocast(device: torch.device, precision: str):
    """A bf16 autocast context on ``device`` for ``precision == "bf16"``, else a no-op."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_info(device: torch.device) -> dict:
    """Facts about the device for run records: name, torch version, threads, capability."""
    info = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu_threads"] = torch.get_num_threads()
        try:
            info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        except Exception:
            pass
    return info


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
