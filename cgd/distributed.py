"""Multi-process scoring and training with ``torch.distributed`` (launched by ``torchrun``).

Launched as ``torchrun --nproc_per_node N ...``, every process runs the same code; these helpers
let the library split the work without changing anything for a plain single-process run:

* scoring (:class:`cgd.reference.ClipReference`, :class:`cgd.reference.ClassifierReference`)
  gives each rank a contiguous slice of the index range (:func:`shard_range`) and reassembles the
  slices in index order on every rank (:func:`gather_in_order`);
* training (:func:`cgd.train.train_classifier`) wraps the model in DistributedDataParallel
  (:func:`wrap_ddp`) and gives each rank its share of every global batch.

The process group is created on first use from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``): NCCL on CUDA, gloo on CPU (override with
``CGD_DIST_BACKEND``; ``CGD_DISTRIBUTED=0`` turns the whole thing off). With no such environment,
or a world of one process, every helper is a no-op: :func:`is_distributed` is False,
:func:`shard_range` covers everything, :func:`gather_in_order` returns its input.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    "is_distributed",
    "shutdown",
    "init_from_env",
    "rank",
    "world_size",
    "local_rank",
    "is_main_process",
    "shard_range",
    "gather_in_order",
    "all_reduce_sum",
    "wrap_ddp",
    "unwrap",
    "barrier",
]


def _env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_env(backend: str | None = None) -> bool:
    """Create the default process group from torchrun's environment if there is one.

    Returns True when a group of more than one process is (now) initialised. Safe to call many
    times. On CUDA the process's current device becomes ``cuda:LOCAL_RANK``.
    """
    import torch.distributed as dist

    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if os.environ.get("CGD_DISTRIBUTED", "1") == "0" or _env_world() <= 1 or "MASTER_ADDR" not in os.environ:
        return False
    backend = backend or os.environ.get("CGD_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    import atexit

    atexit.register(shutdown)  # a group left alive at interpreter exit can abort the process (gloo threads)
    return dist.get_world_size() > 1


def is_distributed() -> bool:
    """True inside a process group of more than one process (initialising it from torchrun's
    environment on first call)."""
    return init_from_env()


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    import torch.distributed as dist

    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """Rank on this machine (``LOCAL_RANK``; 0 when not set)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def is_main_process() -> bool:
    """True on rank 0 (and always when not distributed): the process that writes files."""
    return rank() == 0


def shard_range(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """The contiguous slice ``[start, stop)`` of ``range(n)`` this rank handles.

    Slices are balanced (sizes differ by at most one), ordered by rank and cover ``range(n)``
    exactly once, so concatenating them in rank order restores the original order.
    """
    r = rank() if rank_ is None else int(rank_)
    w = world_size() if world is None else int(world)
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"shard_range: rank {r} is outside a world of {w}")
    if n < 0:
        raise ValueError(f"shard_range: n must be >= 0, got {n}")
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def _comm_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_in_order(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """Concatenate every rank's ``array`` (rows = that rank's :func:`shard_range` slice) in rank
    order, on every rank. Row counts may differ between ranks; the other dimensions and the dtype
    must agree. Returns a numpy array; without a process group, ``array`` itself (as numpy)."""
    import torch.distributed as dist

    a = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if not is_distributed():
        return a
    dev = _comm_device()
    w = dist.get_world_size()
    counts = torch.tensor([a.shape[0] if a.ndim else 1], dtype=torch.long, device=dev)
    all_counts = [torch.zeros_like(counts) for _ in range(w)]
    dist.all_gather(all_counts, counts)
    sizes = [int(c.item()) for c in all_counts]
    rows = max(sizes) if sizes else 0
    t = torch.from_numpy(np.ascontiguousarray(a)).reshape(a.shape[0] if a.ndim else 1, *a.shape[1:])
    pad = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype)
    pad[: t.shape[0]] = t
    pad = pad.to(dev)
    bufs = [torch.empty_like(pad) for _ in range(w)]
    dist.all_gather(bufs, pad)
    out = torch.cat([b[:s].cpu() for b, s in zip(bufs, sizes)])
    return out.numpy()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks (in place on a copy moved to the communication device); returns it on
    ``t``'s device. Without a process group, returns ``t``."""
    import torch.distributed as dist

    if not is_distributed():
        return t
    dev = t.device
    x = t.detach().clone().to(_comm_device())
    dist.all_reduce(x)
    return x.to(dev)


def wrap_ddp(model: nn.Module, device: torch.device | None = None) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when distributed, else ``model`` unchanged.

    The model must already sit on ``device`` (its CUDA index is used for ``device_ids``).
    """
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if device is not None and device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return DDP(model, device_ids=[idx], output_device=idx)
    return DDP(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or ``model`` itself)."""
    return getattr(model, "module", model)


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    import torch.distributed as dist

    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Destroy the default process group if one exists (idempotent; called at exit by cgd)."""
    import torch.distributed as dist

    try:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at shutdown
        pass
