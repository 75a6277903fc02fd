"""What one short Ray Train run costs the machine, by process: the fixed cost every `train` (and every
multi-worker trial, and most scenario tests) pays before and around its few steps.

In one process with one local Ray instance (as the test suite's shared session), --runs short runs of the
built-in task (--steps steps, ZeRO-2, a SQLite MLflow store) for each --workers count, then the same run in
process (one worker, no Ray Train) as the floor. Per run it prints wall seconds and the machine's CPU
seconds (/proc/stat: every process, Ray's included); while they run a sampler reads every process's CPU
time (/proc/PID/stat, every 0.2 s) and sums it by Ray's process title (``ray::TrainController``,
``ray::RayTrainWorker``, ...), so the table shows where a run's CPU goes. The first run of each kind
warms caches (reference log-probs, compiled files) and is left out of the medians.

    ALPHADPO_RAY_CACHE=/tmp/alphadpo-ray-test-cache .venv/bin/python benchmarks/bench_fit_overhead.py
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HZ = os.sysconf("SC_CLK_TCK")


def machine_cpu() -> float:
    """Busy CPU seconds of the whole machine since boot (user, nice, system, irq, softirq, steal)."""
    values = list(map(int, open("/proc/stat").readline().split()[1:9]))
    return (sum(values) - values[3] - values[4]) / HZ


class Sampler:
    """CPU seconds of every process alive while it runs, summed by process kind (Ray's title, else the
    program), counting only what each process spent after the sampler first saw it."""

    def __init__(self, every_s: float = 0.2):
        self.every_s, self.first, self.last, self.kind = every_s, {}, {}, {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    stat = open(f"/proc/{pid}/stat").read()
                    fields = stat[stat.rfind(")") + 2:].split()
                    key, cpu = (pid, fields[19]), (int(fields[11]) + int(fields[12])) / HZ
                    if key not in self.kind or self.kind[key] in ("ray::IDLE", "ray: worker starting"):
                        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
                        self.kind[key] = self._kind(cmd)
                    self.first.setdefault(key, cpu)
                    self.last[key] = cpu
                except (OSError, IndexError, ValueError):
                    continue
            self.stop.wait(self.every_s)

    @staticmethod
    def _kind(cmd: str) -> str:
        if cmd.startswith("ray::"):  # a worker, titled by what it runs
            return cmd.split()[0].split(".")[0]
        if "default_worker.py" in cmd:  # not titled yet
            return "ray: worker starting"
        for name in ("gcs_server", "raylet", "dashboard/agent.py", "dashboard/dashboard.py", "log_monitor",
                     "runtime_env/agent", "monitor.py"):
            if name in cmd:
                return f"ray: {name}"
        return "other: " + " ".join(Path(p).name for p in cmd.split()[:2])[:50]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def by_kind(self) -> dict[str, float]:
        out: collections.Counter = collections.Counter()
        for key, cpu in self.last.items():
            out[self.kind[key]] += cpu - self.first[key]
        return dict(out)


def run_once(workers: int | None, steps: int, root: Path, index: int) -> tuple[float, float]:
    """(wall s, machine CPU s) of one run; `workers` None: one worker in this process."""
    from alphadpo_ray.config.experiment import config_from_dict
    from alphadpo_ray.training.launch import train

    where = root / f"{workers or 'in-process'}-{index}"
    n = workers or 1
    config = config_from_dict({
        "name": where.name, "output_dir": str(where / "out"),
        "data": {"source": "builtin", "max_eval_samples": 24},
        "method": {"name": "alpha-dpo", "beta": 2.5, "gamma_beta_ratio": 0.3, "alpha": 0.2},
        "training": {"learning_rate": 2e-4, "per_device_train_batch_size": 8 // n, "total_batch_size": 8,
                     "max_steps": steps, "eval_steps": 100, "logging_steps": 1, "save_steps": steps,
                     "generation_eval_samples": 0, "per_device_eval_batch_size": 24},
        "deepspeed": {"zero_stage": 2},
        "ray": {"num_workers": n, "storage_path": str(root / "storage"),
                "in_process_single_worker": workers is None},
        "tracking": {"tracking_uri": f"sqlite:///{where / 'mlflow.db'}", "experiment_name": "bench"}})
    cpu, start = machine_cpu(), time.monotonic()
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # its progress lines
        summary = train(config, log=lambda *_: None)
    wall = time.monotonic() - start
    time.sleep(1.0)  # the run's actors exit: their last CPU seconds count
    assert summary["status"] == "finished", summary.get("message")
    return wall, machine_cpu() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=4, help="runs of each kind, the first a warm-up (default 4)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (default 4)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray Train worker counts (1 2)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    import torch

    from alphadpo_ray.config.experiment import config_from_dict
    from alphadpo_ray.training.launch import worker_env
    from alphadpo_ray.training.sft import prepare_builtin_task

    torch.set_num_threads(1)
    prepare_builtin_task(progress=False)
    env = worker_env(config_from_dict({}))
    os.environ.update(env)
    print(f"load before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; {args.runs} runs of {args.steps} steps "
          "each (first: warm-up)", flush=True)
    ray.init(num_cpus=4, runtime_env={"env_vars": env}, logging_level="error", log_to_driver=False)
    root = Path(tempfile.mkdtemp(prefix="fit-overhead-"))
    rows = []
    for workers in [*args.workers, None]:
        label = f"Ray Train, {workers} worker(s)" if workers else "in process (floor)"
        walls, cpus = [], []
        with Sampler() as sampler:
            for index in range(args.runs):
                wall, cpu = run_once(workers, args.steps, root, index)
                if index:
                    walls.append(wall)
                    cpus.append(cpu)
                print(f"  {label:<26} run {index}: wall {wall:5.1f} s  machine CPU {cpu:5.1f} s"
                      + ("  (warm-up)" if not index else ""), flush=True)
        rows.append((label, statistics.median(walls), statistics.median(cpus)))
        kinds = sorted(sampler.by_kind().items(), key=lambda kv: -kv[1])
        print(f"  CPU by process over its {args.runs} runs (s): "
              + ", ".join(f"{kind} {cpu:.1f}" for kind, cpu in kinds if cpu >= 0.5), flush=True)
    print("\n| run | wall (median) | machine CPU (median) |\n|---|---|---|")
    for label, wall, cpu in rows:
        print(f"| {label} | {wall:.1f} s | {cpu:.1f} s |")
    print(f"load after: {os.getloadavg()[0]:.2f}")
    ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
