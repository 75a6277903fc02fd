"""Which tests spend the suite's CPU: run a command (the suite) and charge every process's CPU time to the
test running in its pytest worker at the time.

    python scripts/test_cpu.py OUT.json -- make test

`tests/conftest.py` writes each pytest worker's pid and current test to ``$ALPHADPO_RAY_TEST_CPU/<worker>``
(this script sets the variable). Every 0.5 s the script reads utime + stime of every process
(``/proc/PID/stat``) and charges the growth to the test of the pytest worker the process descends from: the
worker itself, or any process carrying its ``PYTEST_XDIST_WORKER`` in its environment (Ray's raylet, workers
and actors, a CLI subprocess, a loopback cluster's nodes all inherit it). A process first seen is charged all
its CPU so far. What a process spends in its last half second before exiting, and processes living under
half a second, are missed: the script prints how much of the machine's busy CPU it charged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
INTERVAL_S = 0.5


def _busy() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:3]) + sum(fields[5:8])) / TICK


def _cpu_and_start(pid: str) -> tuple[float, str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = stat.rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / TICK, rest[19]  # utime, stime; starttime (pid reuse)


def _worker_of(pid: str) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in environ:
        if entry.startswith(b"PYTEST_XDIST_WORKER="):
            return entry.split(b"=", 1)[1].decode()
    return None


def main(out: str, command: list[str]) -> int:
    marks = Path(tempfile.mkdtemp(prefix="test-cpu-"))
    process = subprocess.Popen(command, env={**os.environ, "ALPHADPO_RAY_TEST_CPU": str(marks)})
    seen: dict[tuple[str, str], tuple[float, str | None]] = {}  # (pid, start) -> (cpu so far, worker)
    charged: dict[str, float] = defaultdict(float)
    busy0 = _busy()
    while process.poll() is None:
        time.sleep(INTERVAL_S)
        current = {}  # worker -> (its pid, its test)
        for mark in marks.iterdir():
            try:
                pid, _, test = mark.read_text().partition("\t")
                current[mark.name] = (pid, test)
            except OSError:
                continue
        worker_pids = {pid: worker for worker, (pid, _) in current.items()}
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            sample = _cpu_and_start(pid)
            if sample is None:
                continue
            cpu, start = sample
            key = (pid, start)
            before, worker = seen.get(key, (0.0, None))
            if key not in seen:
                worker = _worker_of(pid)
            worker = worker or worker_pids.get(pid)  # a pytest worker is known once it has started a test
            seen[key] = (cpu, worker)
            if worker in current and cpu > before:
                charged[current[worker][1] or "(between tests)"] += cpu - before
    busy = _busy() - busy0
    total = sum(charged.values())
    Path(out).write_text(json.dumps(dict(sorted(charged.items(), key=lambda kv: -kv[1])), indent=0) + "\n")
    modules: dict[str, float] = defaultdict(float)
    for test, cpu in charged.items():
        modules[test.split("::", 1)[0]] += cpu
    print(f"\n[test_cpu] charged {total:.0f} of {busy:.0f} busy CPU-s ({100 * total / max(busy, 1):.0f} %) -> {out}")
    for test, cpu in sorted(charged.items(), key=lambda kv: -kv[1])[:40]:
        print(f"{cpu:8.1f}  {test}")
    print()
    for module, cpu in sorted(modules.items(), key=lambda kv: -kv[1])[:25]:
        print(f"{cpu:8.1f}  {module}")
    return process.returncode


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[3:]))
