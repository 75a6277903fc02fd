"""The one place that talks to `torch.distributed`: process-group setup and every collective.

Why one place: a collective's tensors must sit on the device its backend serves. NCCL (the
process group Ray Train starts with ``TorchConfig(backend="nccl")`` on GPUs) registers for CUDA
tensors only; gloo for CPU tensors. So every collective here moves its input to
``collective_device()`` — ``cuda:<current device>`` for an NCCL-only group, the CPU for gloo or a
mixed ``cpu:gloo,cuda:nccl`` group — and moves the result back to where the caller's tensor was.
No other module of the package imports `torch.distributed` (``tests/test_distributed.py`` checks).

Without an initialised process group (or with one worker) every function is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import compat

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def is_distributed() -> bool:
    """True inside an initialised process group of more than one worker."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def backend() -> str | None:
    """The default group's backend string ('gloo', 'nccl', 'cpu:gloo,cuda:nccl', ...), None without one."""
    return str(dist.get_backend()) if is_initialized() else None


def device_for_backend(name: str | None) -> torch.device:
    """Where a collective's tensors must live for backend `name`: the CPU when gloo serves CPU tensors
    (gloo alone, or a mixed group), the current CUDA device for an NCCL-only group."""
    parts = {p.split(":")[-1] for p in (name or "gloo").lower().split(",")}
    if "gloo" in parts or "nccl" not in parts:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def collective_device() -> torch.device:
    """The device the default process group's collectives take tensors on (see `device_for_backend`)."""
    return device_for_backend(backend())


def init_process_group(use_gpu: bool, *, single_process: bool = False) -> None:
    """Set up the process group and DeepSpeed's communication layer on it: NCCL on GPUs, gloo on CPUs.

    Ray Train's workers already have the default group (`TorchConfig`). `single_process`: first a
    group of one for this process (the direct single-worker sweep path, no Ray Train), once per
    process and never destroyed, so a reused Tune actor keeps it for every later trial. Its store is
    in-process (`HashStore`): a group of one needs no TCP rendezvous, and the old one (a port found
    free, then bound by the store) lost that port to another process on a busy machine
    (``EADDRINUSE``, seen in CI). Its variables (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE) stay in `os.environ` on purpose: a process group is process-wide, and DeepSpeed
    reads them when it sets up its communication layer.
    """
    import os

    if single_process and not dist.is_initialized():
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        dist.init_process_group("nccl" if use_gpu else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    import deepspeed

    if not use_gpu:
        skip_cpu_comm_ops()
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", verbose=False)


def skip_cpu_comm_ops() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU communication ops (``deepspeed_shm_comm``,
    ``deepspeed_ccl_comm``) when it creates its communication layer. It builds them with ninja into the
    torch-extensions cache that every environment on the machine shares: 30-50 s per build, rebuilt
    whenever another environment built it last, and a process killed mid-build leaves a lock file on
    which every later worker on the machine waits forever. Marked incompatible, DeepSpeed's collectives
    go through torch.distributed (gloo), like this module's own; GPU accelerators never use these ops."""
    compat.mark_cpu_comm_ops_incompatible()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A new tensor: `tensor` reduced over all workers with `op` ('sum', 'max', 'min'), on `tensor`'s device."""
    if not is_distributed():
        return tensor.clone()
    work = tensor.detach().to(collective_device(), copy=True)
    dist.all_reduce(work, op=_OPS[op])
    return work.to(tensor.device)


def mean_over_workers(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over all workers (one all-reduce in float64)."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    total = all_reduce(torch.tensor([values[k] for k in keys], dtype=torch.float64))
    return dict(zip(keys, (total / world_size()).tolist()))


def any_worker(flag: bool) -> bool:
    """True on every worker when `flag` is true on any."""
    if not is_distributed():
        return bool(flag)
    return bool(all_reduce(torch.tensor([1.0 if flag else 0.0]), "max").item())


def max_over_workers(value: int) -> int:
    """The largest of each worker's `value`, on every worker."""
    if not is_distributed():
        return int(value)
    return int(all_reduce(torch.tensor([int(value)], dtype=torch.long), "max").item())


def all_gather_1d(x: torch.Tensor) -> torch.Tensor:
    """`x` (1-D, sizes may differ per worker) concatenated over all workers in rank order, on `x`'s device."""
    if not is_distributed():
        return x
    world, device = world_size(), collective_device()
    local = x.detach().to(device)
    size = torch.tensor([local.numel()], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(counts), dtype=local.dtype, device=device)
    padded[: local.numel()] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)]).to(x.device)


def barrier() -> None:
    """Wait for every worker (on NCCL, on the current CUDA device)."""
    if not is_distributed():
        return
    if collective_device().type == "cuda":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


__all__ = [
    "is_distributed", "is_initialized", "world_size", "rank", "backend", "device_for_backend", "collective_device",
    "init_process_group", "all_reduce", "mean_over_workers", "any_worker", "max_over_workers", "all_gather_1d",
    "barrier",
]
