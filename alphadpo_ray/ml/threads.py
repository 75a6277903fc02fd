"""CPU threads for torch on a machine that may be busy.

OpenMP threads that outnumber the free cores spin-wait for each other: on 2 cores the built-in task's
SFT build took 10 min 43 s at load 5–8 against 47 s quiet (issue 20). The policy, for the SFT build, the
reference pass and every training worker: never more threads than the cores this process may run on
(`os.sched_getaffinity`) or than it was given (a worker's CPUs), fewer when other work already keeps cores
busy (cores − ⌊1-minute load average⌋, at least 1); and OpenMP's idle threads sleep instead of spinning
(``OMP_WAIT_POLICY=PASSIVE``, set in ``alphadpo_ray/__init__.py`` before torch loads its OpenMP runtime,
and passed to Ray's workers). ``ALPHADPO_RAY_THREADS=N`` fixes the count (still at most the cores).
"""

from __future__ import annotations

import os

def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset), else os.cpu_count()."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cpu_threads(requested: float | None = None, load: float | None = None) -> int:
    """Torch intra-op threads for this process: min(requested, cores, cores − ⌊load⌋), at least 1."""
    cores = available_cores()
    fixed = os.environ.get("ALPHADPO_RAY_THREADS", "").strip()
    if fixed.isdigit() and int(fixed) > 0:
        return min(int(fixed), cores)
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
    want = cores if requested is None else max(1, int(requested))
    return max(1, min(want, cores, cores - int(load)))


def set_cpu_threads(requested: float | None = None) -> int:
    """`torch.set_num_threads(cpu_threads(requested))`; returns the count set."""
    import torch

    threads = cpu_threads(requested)
    torch.set_num_threads(threads)
    return threads
