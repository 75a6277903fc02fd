"""End-to-end wall time of a short one-worker `alphadpo-ray train` against a hand-rolled TRL script.

Three commands, each a fresh process in a fresh working directory (so each computes its reference
log-probs, as TRL's `precompute_ref_log_probs` does on every run; the built-in task's SFT model comes
from the shared cache, built beforehand), interleaved per repetition:

* ``in-process``  `alphadpo-ray train` with one worker (the default path: trained in the CLI's process,
                  reference scored in it, no Ray started — `alphadpo_ray/training/in_process.py`);
* ``ray-train``   the same command with ``ray.in_process_single_worker=false``: Ray started, the
                  reference scored by a Ray task, a `TorchTrainer` controller and worker (the path every
                  one-worker run took before);
* ``trl``         `benchmarks/trl_train_script.py`: TRL `DPOTrainer` with a precomputed reference on
                  the same data, model, batch and number of steps.

The project's runs also log to a local MLflow store and evaluate the held-out pairs at step 0 and at the
end (``data.max_eval_samples`` of them); `summary.json` splits their time into setup / steps /
evaluation, the rest being start, preparation, reference scoring, checkpoint and export. Every command
first runs once untimed (one step), so both sides start warm; then --repeats (>= 3) interleaved rounds,
medians. Target: in-process wall / TRL wall <= 1.2. Needs the `bench` extra (TRL). ~6-8 min on 2 cores with
the defaults (`--skip ray-train`: ~3 min).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_logprobs import _cpu_model  # this folder is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.2
CONFIG = ROOT / "experiments" / "quickstart.yaml"


def _overrides(steps: int, eval_samples: int) -> list[str]:
    """The run both sides share (the TRL script reads the same config and overrides)."""
    return ["ray.num_workers=1", f"training.max_steps={steps}", "training.eval_steps=100000",
            "training.generation_eval_samples=0", "training.sampled_kl_samples=0",
            f"data.max_eval_samples={eval_samples}", "deepspeed.zero_stage=0"]


def _project_command(steps: int, eval_samples: int, in_process: bool) -> list[str]:
    sets = [*_overrides(steps, eval_samples), f"ray.in_process_single_worker={'true' if in_process else 'false'}"]
    return [sys.executable, "-m", "alphadpo_ray", "train", str(CONFIG), *[a for s in sets for a in ("--set", s)]]


def _trl_command(steps: int, eval_samples: int) -> list[str]:
    sets = _overrides(steps, eval_samples)
    return [sys.executable, str(ROOT / "benchmarks" / "trl_train_script.py"), "--steps", str(steps),
            "--config", str(CONFIG), *[a for s in sets for a in ("--set", s)]]


def _run(kind: str, command: list[str], log: Path) -> dict:
    """Run `command` in a fresh directory: its wall time and the time of its training steps (the project's
    summary.json split; the TRL script's printed train phase)."""
    with tempfile.TemporaryDirectory(prefix=f"fixed-cost-{kind}-") as work:
        start = time.perf_counter()
        # TRL keeps its precomputed reference log-probs in the datasets cache: a fresh one per run, as the
        # project's runs get a fresh run storage (both score the reference every run)
        env = {**os.environ, "HF_DATASETS_CACHE": str(Path(work) / "hf-datasets")}
        done = subprocess.run(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        wall = time.perf_counter() - start
        with open(log, "a") as out:
            out.write(f"\n=== {kind} ({wall:.1f} s): {' '.join(command)}\n{done.stdout}")
        if done.returncode != 0:
            raise SystemExit(f"{kind} failed (exit {done.returncode}); see {log}")
        result = {"kind": kind, "wall": wall}
        summaries = list(Path(work).glob("outputs/*/summary.json"))
        if summaries:
            seconds = json.loads(summaries[0].read_text()).get("seconds") or {}
            result.update({k: seconds.get(k) for k in ("setup", "steps", "evaluation")})
        trained = re.search(r"train ([0-9.]+) s", done.stdout)
        if kind.endswith("trl") and trained:
            result.update({"steps": float(trained.group(1)), "evaluation": 0.0})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of 16 pairs (default 12)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each command; the median is "
                        "reported (default 3, at least 3)")
    parser.add_argument("--eval-samples", type=int, default=16, help="the project's held-out pairs (default 16)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["in-process", "ray-train", "trl"])
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error(f"--repeats {args.repeats}: a median needs at least 3 runs of each command")

    began = time.time()
    log = Path(tempfile.gettempdir()) / f"bench_fixed_cost-{os.getpid()}.log"
    print(f"machine: {_cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"settings: {args.steps} steps × 16 pairs, built-in task (quickstart.yaml), 1 worker, ZeRO-0, "
          f"{args.eval_samples} held-out pairs evaluated twice; repeats {args.repeats}; command output: {log}")
    kinds = [k for k in ("in-process", "ray-train", "trl") if k not in args.skip]
    commands = {"in-process": _project_command(args.steps, args.eval_samples, True),
                "ray-train": _project_command(args.steps, args.eval_samples, False),
                "trl": _trl_command(args.steps, args.eval_samples)}
    # one untimed 1-step run of every command first, so each side starts warm (page cache of its imports,
    # compiled bytecode, the project's MLflow template and the built-in task's SFT model in the cache)
    warm_up = {"in-process": _project_command(1, args.eval_samples, True),
               "ray-train": _project_command(1, args.eval_samples, False), "trl": _trl_command(1, args.eval_samples)}
    for kind in kinds:
        _run(f"warm-up {kind}", warm_up[kind], log)
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    for _ in range(args.repeats):
        for kind in kinds:
            results[kind].append(_run(kind, commands[kind], log))

    print(f"\n{'command':<12}{'wall s':>9}{'steps s':>9}{'fixed s':>9}{'setup s':>9}{'eval s':>8}   runs (wall s)")
    medians = {}
    for kind, runs in results.items():
        m = {k: statistics.median(r[k] for r in runs) if all(r.get(k) is not None for r in runs) else None
             for k in ("wall", "setup", "steps", "evaluation")}
        medians[kind] = m
        cell = lambda v, w=9: f"{v:>{w}.1f}" if v is not None else f"{'-':>{w}}"  # noqa: E731
        fixed = m["wall"] - m["steps"] if m["steps"] is not None else None
        print(f"{kind:<12}{cell(m['wall'])}{cell(m['steps'])}{cell(fixed)}{cell(m['setup'])}{cell(m['evaluation'], 8)}"
              "   " + ", ".join(f"{r['wall']:.1f}" for r in runs))
    print("fixed = wall - steps: process start, imports, data, reference pass, Ray (ray-train), engine/model setup, "
          "evaluation (project: step 0 and the end), checkpoint, export, MLflow")
    print(f"load after: {os.getloadavg()[0]:.2f}; took {time.time() - began:.0f} s")
    if "in-process" in medians and "ray-train" in medians:
        print(f"in-process / ray-train wall = {medians['in-process']['wall'] / medians['ray-train']['wall']:.2f}")
    if "in-process" in medians and "trl" in medians:
        ratio = medians["in-process"]["wall"] / medians["trl"]["wall"]
        print(f"in-process / TRL script wall = {ratio:.2f} (target <= {TARGET}): {'PASS' if ratio <= TARGET else 'MISS'}")


if __name__ == "__main__":
    main()
