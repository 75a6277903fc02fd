"""The distributed seam: every collective on the backend's device, and no collective anywhere else."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import alphadpo_ray
from alphadpo_ray.ml import distributed

PACKAGE = Path(alphadpo_ray.__file__).parent
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "barrier", "gather",
               "scatter", "all_to_all", "send", "recv", "init_process_group"}


# ------------------------------------------------------------------------------ device choice


@pytest.mark.parametrize("backend,expected", [
    ("gloo", "cpu"), ("nccl", "cuda:3"), ("cpu:gloo,cuda:nccl", "cpu"), ("NCCL", "cuda:3"), (None, "cpu"),
])
def test_device_for_backend(monkeypatch, backend, expected):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert str(distributed.device_for_backend(backend)) == expected


def test_collective_device_follows_the_process_groups_backend(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert distributed.collective_device() == torch.device("cuda", 1)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert distributed.collective_device() == torch.device("cpu")


class _Reached(Exception):
    pass


@pytest.fixture
def fake_nccl_group(monkeypatch):
    """A 2-worker "NCCL" group whose collectives record where their tensors are, then stop the call.

    These machines have no GPU, so the collective device is replaced by the meta device: a tensor
    that reaches a collective on the CPU (what NCCL rejects) fails the test."""
    seen: list[torch.device] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(distributed, "collective_device", lambda: torch.device("meta"))

    def record(*args, **kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
        seen.extend(t.device for t in tensors)
        raise _Reached

    for name in ("all_reduce", "all_gather", "barrier"):
        monkeypatch.setattr(dist, name, record)
    return seen


@pytest.mark.parametrize("call", [
    lambda: distributed.all_reduce(torch.ones(3)),
    lambda: distributed.all_reduce(torch.ones(3), "max"),
    lambda: distributed.mean_over_workers({"loss": 1.0, "acc": 0.5}),
    lambda: distributed.any_worker(True),
    lambda: distributed.max_over_workers(7),
    lambda: distributed.all_gather_1d(torch.arange(4, dtype=torch.float64)),
], ids=["all_reduce", "all_reduce_max", "mean_over_workers", "any_worker", "max_over_workers", "all_gather_1d"])
def test_every_collective_puts_its_tensors_on_the_collective_device(fake_nccl_group, call):
    with pytest.raises(_Reached):
        call()
    assert fake_nccl_group and all(d.type == "meta" for d in fake_nccl_group), fake_nccl_group


def test_without_a_process_group_everything_is_local():
    """In a fresh process: this one may hold the single-process group of an in-process run (a test's)."""
    mp.spawn(_local_worker, nprocs=1, join=True)


def _local_worker(_rank: int) -> None:
    assert not dist.is_initialized()
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(distributed.all_reduce(x), x) and distributed.all_reduce(x) is not x
    assert distributed.mean_over_workers({"a": 2.0}) == {"a": 2.0}
    assert distributed.any_worker(False) is False and distributed.max_over_workers(5) == 5
    assert distributed.all_gather_1d(x) is x
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.backend() is None
    distributed.barrier()


# ------------------------------------------------------------------------------ two real gloo workers


def _worker(rank: int, world: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        out = {
            "sum": distributed.all_reduce(torch.tensor([rank + 1.0])).item(),
            "max": distributed.all_reduce(torch.tensor([rank * 10]), "max").item(),
            "mean": distributed.mean_over_workers({"x": float(rank)}),
            "any": distributed.any_worker(rank == 1),
            "none": distributed.any_worker(False),
            "most": distributed.max_over_workers(3 - rank),
            "gathered": distributed.all_gather_1d(torch.arange(rank + 1, dtype=torch.float64)).tolist(),
        }
        distributed.barrier()
        torch.save(out, f"{tmp}/out{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_workers(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        out = torch.load(tmp_path / f"out{rank}.pt")
        assert out == {"sum": 3.0, "max": 10, "mean": {"x": 0.5}, "any": True, "none": False, "most": 3,
                       "gathered": [0.0, 0.0, 1.0]}


def _deepspeed_worker(rank: int, world: int, tmp: str) -> None:
    import os

    os.environ["TORCH_EXTENSIONS_DIR"] = f"{tmp}/torch-extensions"  # where a JIT build would land
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        distributed.init_process_group(use_gpu=False)
        from deepspeed.comm import comm  # its module global `cdb` is the backend init created

        summed = torch.tensor([rank + 1.0])
        comm.all_reduce(summed)
        torch.save({"shm_op": comm.cdb.shm_comm_op, "sum": summed.item()}, f"{tmp}/ds{rank}.pt")
        dist.barrier()  # both ranks done with the group before either tears it down (seen once: a rank aborted
        # with "terminate called without an active exception" as the other destroyed the group under it)
    finally:
        dist.destroy_process_group()


def test_deepspeed_comm_builds_no_cpu_op(tmp_path):
    """DeepSpeed's communication layer on CPU goes through gloo: its shared-memory op is never
    JIT-compiled (no build in the extensions directory, no op), and its all-reduce still works."""
    mp.spawn(_deepspeed_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert torch.load(tmp_path / f"ds{rank}.pt", weights_only=False) == {"shm_op": None, "sum": 3.0}
    assert not (tmp_path / "torch-extensions").exists()


def test_runs_get_this_environments_own_extensions_directory(tmp_path, monkeypatch):
    """Ray workers and in-process runs JIT-build DeepSpeed ops (if any) into a directory of this Python
    environment under the project's cache, not the machine-wide ~/.cache/torch_extensions that other
    environments rebuild; a user's own TORCH_EXTENSIONS_DIR wins."""
    import sys

    from alphadpo_ray.config.experiment import config_from_dict
    from alphadpo_ray.training.launch import worker_env

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("ALPHADPO_RAY_CACHE", str(tmp_path))
    ours = Path(worker_env(config_from_dict({}))["TORCH_EXTENSIONS_DIR"])
    assert ours.parent == tmp_path / "torch_extensions" and ours.name != ""
    monkeypatch.setattr(sys, "prefix", "/another/env")
    assert Path(worker_env(config_from_dict({}))["TORCH_EXTENSIONS_DIR"]) != ours
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert worker_env(config_from_dict({}))["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "mine")


# ------------------------------------------------------------------------------ one seam


def _distributed_uses(path: Path) -> list[str]:
    """Imports of torch.distributed and calls of collectives in one module."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names):
            found.append(f"line {node.lineno}: import torch.distributed")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "distributed" for a in node.names):
            found.append(f"line {node.lineno}: from torch import distributed")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id in ("dist", "torch_dist"):
                found.append(f"line {node.lineno}: {owner.id}.{node.func.attr}(...)")
    return found


def test_no_module_but_the_seam_touches_torch_distributed():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "ml" / "distributed.py":
            continue
        uses = _distributed_uses(path)
        if uses:
            offenders[str(path.relative_to(PACKAGE))] = uses
    assert offenders == {}, f"collectives outside alphadpo_ray/ml/distributed.py: {offenders}"
    assert _distributed_uses(PACKAGE / "ml" / "distributed.py")  # the check does see the seam's own calls


def test_a_group_of_one_listens_on_no_port():
    """The direct sweep path's group of one uses an in-process store: no TCP store on a port found free
    earlier, which another process can take first (CI saw ``EADDRINUSE`` there on a busy machine)."""
    import subprocess
    import sys

    script = """
import psutil
from alphadpo_ray.ml import distributed
distributed.init_process_group(False, single_process=True)
import torch, torch.distributed as dist
t = torch.ones(3); dist.all_reduce(t)
import os
listening = {c.laddr.port for c in psutil.Process().net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
print("OK", dist.get_world_size(), t.tolist(), int(os.environ["MASTER_PORT"]) in listening)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # gloo's own listener binds a port the OS picks (no race); MASTER_PORT is never bound
    assert proc.stdout.strip().splitlines()[-1] == "OK 1 [1.0, 1.0, 1.0] False"
