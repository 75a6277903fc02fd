"""Failures at scale, at the suite's scale: one Optuna sweep of real (single-worker, direct-path) trials on a
loopback cluster of one-CPU nodes while a node is killed without notice, another is drained for preemption
(`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`) and reclaimed at its deadline, and the driver is
SIGKILLed and started again with ``--resume`` — the shape of `benchmarks/bench_sweep_scale.py --chaos`
(2,000 trials on 16 nodes, figures in benchmarks/README.md §4) with real training.

Afterwards: exactly N trials in the results, all finished; exactly N trial runs in MLflow, one per trial id,
all FINISHED, each with its steps once; one parent run; no trial the first driver saw finish trained again
under the resumed one. The trials' training steps are logged by a plugin method (trial id, Ray job, node) so the
re-run work is counted, not guessed, and a node to take away is one where a trial trains."""

from __future__ import annotations

import contextlib
import csv
import json
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import small_config
from ray_cluster import VENV_BIN, LocalCluster

N, CONCURRENCY, STEPS = 16, 4, 3
STEP_S = 1.5  # each training step sleeps this long (no CPU): time for the test to act while trials run
HEAD = "127.0.0.1"
NODES = [f"127.0.0.{i}" for i in range(2, 7)]  # 5 one-CPU nodes: 1 killed, 1 drained, 3 left for the rest
DEADLINE_S = 5  # the drain's reclaim deadline
WAIT_S = 900.0

# SimPO (γ = 0) that writes one line per training step (the Tune trial it ran in, the Ray job, i.e. the driver,
# that ran it, and the node) and takes STEP_S longer.
LOGGED_METHOD = """
import os
import time

import ray
import torch
from ray import tune
from ray.util import get_node_ip_address

from alphadpo_ray.ml.losses import Hyperparameter, LossOutput, register_method

LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "steps.log")


def logged_simpo(pc, pj, rc, rj, lc, lj, *, beta):
    \"\"\"SimPO with γ = 0, −log σ(β(log π(y_w)/|y_w| − log π(y_l)/|y_l|)), logging each training step.\"\"\"
    if torch.is_grad_enabled():
        trial = tune.get_context().get_trial_id()
        with open(LOG, "a") as log:
            log.write(f"{trial} {ray.get_runtime_context().get_job_id()} {get_node_ip_address()}\\n")
        time.sleep(STEP_S)
    nc, nj = pc / lc, pj / lj
    losses = -torch.nn.functional.logsigmoid(beta * (nc - nj))
    return LossOutput(losses.mean(), beta * nc.detach(), beta * nj.detach(), losses)


register_method("chaos-simpo", logged_simpo, needs_reference=False, implicit_reward="β·π̄",
                hyperparameters={"beta": Hyperparameter(2.0, low=0.5, high=4.0, low_open=True)})
""".replace("STEP_S", str(STEP_S))


def _done(text: str) -> list[str]:
    """Trial ids the driver printed as done (``[trial ID] done (k/N): ...``)."""
    return re.findall(r"^\[trial (\S+)\] done \(", text, re.M)


@pytest.mark.slow
def test_sweep_survives_node_loss_a_preemption_and_a_killed_driver(builtin_task, tmp_path):
    from mlflow.tracking import MlflowClient

    from alphadpo_ray.services.tracking import create_sqlite_store, search_all_runs

    plugin_dir = tmp_path / "plugin"
    plugin_dir.mkdir()
    (plugin_dir / "chaos_method.py").write_text(LOGGED_METHOD)
    steps_log = plugin_dir / "steps.log"
    steps_log.touch()
    name = f"chaos-{tmp_path.name[-6:]}"
    config = small_config(
        tmp_path, name=name, plugins=[str(plugin_dir / "chaos_method.py")], method={"name": "chaos-simpo", "beta": 2.0},
        deepspeed={"zero_stage": 0}, ray={"num_workers": 1},
        training={"per_device_train_batch_size": 8, "total_batch_size": 8, "max_steps": STEPS, "eval_steps": STEPS,
                  "logging_steps": 1, "save_steps": 1},
        sweep={"name": name, "num_samples": N, "max_concurrent_trials": CONCURRENCY, "max_failures": 3,
               "points_to_evaluate": False, "search_space": {"beta": {"type": "uniform", "low": 1.0, "high": 3.0}}})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    create_sqlite_store(config.tracking.tracking_uri)

    specs = [{"ip": HEAD, "num_cpus": 1}] + [{"ip": ip, "num_cpus": 1} for ip in NODES]
    drivers: list[subprocess.Popen] = []  # the sweep drivers this test started: stopped by PID if it fails
    with LocalCluster(tmp_path / "cluster", specs) as cluster, contextlib.ExitStack() as cleanup:
        cleanup.callback(lambda: [(p.kill(), p.wait()) for p in drivers if p.poll() is None])

        def launch(log_name: str, *extra: str) -> tuple[subprocess.Popen, Path]:
            out = tmp_path / log_name
            with open(out, "w") as handle:
                process = subprocess.Popen([str(VENV_BIN / "alphadpo-ray"), "sweep", str(path), "--address",
                                            cluster.address, *extra], cwd=tmp_path, env=cluster.client_env(),
                                           stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            drivers.append(process)
            return process, out

        def wait_done(process: subprocess.Popen, out: Path, count: int) -> None:
            deadline = time.monotonic() + WAIT_S
            while len(_done(out.read_text(errors="replace"))) < count:
                assert process.poll() is None and time.monotonic() < deadline, out.read_text(errors="replace")[-6000:]
                time.sleep(0.5)

        def busy_node(exclude: set[str]) -> str:
            """The worker node (not the head) where a trial trained most recently, from the steps log."""
            for line in reversed(steps_log.read_text().splitlines()):
                ip = line.split()[-1]
                if ip in NODES and ip not in exclude:
                    return ip
            raise AssertionError(f"no trial has trained on a worker node:\n{steps_log.read_text()[-2000:]}")

        started = time.monotonic()
        driver, first_log = launch("driver.log")
        events = []
        wait_done(driver, first_log, N // 4)
        killed = busy_node(set())
        cluster.kill_node(killed)
        events.append(f"node {killed} killed at {len(_done(first_log.read_text()))} done")
        wait_done(driver, first_log, 2 * N // 5)
        drained = busy_node({killed})
        subprocess.run([str(VENV_BIN / "ray"), "drain-node", "--address", cluster.address, "--node-id",
                        cluster.node_id(drained), "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot",
                        "--deadline-remaining-seconds", str(DEADLINE_S)],
                       env=cluster.client_env(), check=True, capture_output=True, timeout=120)
        at_drain = len(_done(first_log.read_text()))
        time.sleep(DEADLINE_S)  # the reclaim comes at the deadline, as the cloud's does
        cluster.kill_node(drained)
        events.append(f"node {drained} drained at {at_drain} done, reclaimed at {len(_done(first_log.read_text()))}")
        wait_done(driver, first_log, N // 2 + 1)
        driver.kill()
        driver.wait()
        finished_before = set(_done(first_log.read_text()))
        events.append(f"driver SIGKILLed at {len(finished_before)} done")
        resumed, second_log = launch("resumed.log", "--resume")
        resumed.wait(timeout=WAIT_S)
        second = second_log.read_text(errors="replace")
        assert resumed.returncode == 0, second[-6000:]
        wall = time.monotonic() - started
    consoles = first_log.read_text(errors="replace") + second  # one [failure] line per retry, no Ray paragraph
    assert not re.search(r"Traceback|RpcError|Error in training function", consoles), consoles[-6000:]
    failures = re.findall(r"^\[failure\] .*$", consoles, re.M)
    assert all(re.search(r"failed at step \d+ \((its process died|its node was lost or cannot be reached|its process "
                         r"or node was lost)\);", line) for line in failures), failures

    results = Path(config.output_dir) / name
    summary = json.loads((results / "results.json").read_text())["summary"]
    assert summary["trials"] == N and summary["failed"] == 0 and summary["stopped"] == 0, summary
    with open(results / "trials.csv") as table:
        rows = list(csv.DictReader(table))
    assert len({r["trial_id"] for r in rows}) == len(rows) == N, [r["trial_id"] for r in rows]
    assert all(r["status"] == "finished" and r["steps"] == str(STEPS) for r in rows)

    client = MlflowClient(config.tracking.tracking_uri)
    experiment = client.get_experiment_by_name("tests").experiment_id
    runs = list(search_all_runs(client, [experiment], f"tags.`alphadpo.sweep` = '{name}'"))
    trials = [r for r in runs if r.data.tags.get("alphadpo.kind") == "trial"]
    parents = [r for r in runs if r.data.tags.get("alphadpo.kind") != "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    ids = Counter(r.data.tags.get("alphadpo.trial_id") for r in trials)
    assert len(trials) == N and len(ids) == N and all(r.info.status == "FINISHED" for r in trials), ids
    for run in trials:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
        assert steps == list(range(1, STEPS + 1)), (run.data.tags.get("alphadpo.trial_id"), steps)

    lines = [line.split()[:2] for line in steps_log.read_text().splitlines() if line.strip()]
    jobs = list(dict.fromkeys(job for _, job in lines))  # in order of first appearance
    assert len(jobs) == 2, jobs  # the first driver's job, then the resumed one's
    after_resume = Counter(trial for trial, job in lines if job == jobs[1])
    assert not finished_before & set(after_resume), sorted(finished_before & set(after_resume))
    trained = Counter(trial for trial, _ in lines)
    retrained = sum(count - STEPS for count in trained.values())
    print(f"\n[figures] chaos sweep: N={N} trials, {CONCURRENCY} at once, {len(NODES)} one-CPU nodes + head; "
          f"{'; '.join(events)}; resumed; {wall:.0f} s in all; training steps {sum(trained.values())} for "
          f"{N * STEPS} ({retrained} re-run after failures, in {sum(c > STEPS for c in trained.values())} trials); "
          f"trials re-run after the resume: {len(after_resume)} (none the first driver saw finish)")
