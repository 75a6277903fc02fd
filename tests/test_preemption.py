"""Spot preemption and node loss on a real multi-node Ray cluster (`ray_cluster.LocalCluster`): a head
and four more nodes on 127.0.0.x, each with one ``slot`` (the custom resource every Train worker asks
for, so two workers always sit on two nodes and a spare exists).

* A train run: a node hosting a worker is drained with reason preemption and a deadline (`ray
  drain-node`, what the autoscaler does on a spot reclaim), and killed as soon as the recipe's
  just-in-time checkpoint is in: the run resumes from the notice's step on the remaining nodes and
  counts one preemption. Later a node is killed with no notice: the run resumes from the latest
  periodic checkpoint (``ray.max_failures``). The MLflow run holds each step once.
* A sweep trial (two Train workers) whose node is drained and reclaimed at its deadline: Ray Train
  restarts the workers then, as a preemption, from the just-in-time checkpoint — the same Tune trial,
  the same MLflow child run, each step once.

The runs are `alphadpo-ray` subprocesses driven against the cluster as a user would; steps are slowed
by a plugin method (`SLOW_METHOD`) so the test can act mid-run. The cluster is shared by the module:
each preemption or node loss removes a node (the sweep's one, then two in the train run)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import small_config
from ray_cluster import LocalCluster

HEAD = "127.0.0.1"
WORKER_IPS = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
DEADLINE_S = 20  # the drain's reclaim deadline: Ray Train restarts the group then at the latest
WAIT_S = 600.0  # generous: a worker group start on a busy 2-core machine can take minutes

SLOW_METHOD = """
import time

import torch

from alphadpo_ray.ml.losses import Hyperparameter, LossOutput, register_method


def slow_simpo(pc, pj, rc, rj, lc, lj, *, beta):
    \"\"\"SimPO (gamma 0) whose training steps take a second more: time for the test to act mid-run.\"\"\"
    if torch.is_grad_enabled():
        time.sleep(1.0)
    nc, nj = pc / lc, pj / lj
    losses = -torch.nn.functional.logsigmoid(beta * (nc - nj))
    return LossOutput(losses.mean(), beta * nc.detach(), beta * nj.detach(), losses)


register_method("METHOD", slow_simpo, needs_reference=False, implicit_reward="β·π̄",
                hyperparameters={"beta": Hyperparameter(2.0, low=0, low_open=True)})
"""

# The nodes of the cluster's live Ray Train workers and of the actors that drive them (Train controllers,
# Tune trials), through the dashboard's state API, from a subprocess (the test process may hold a Ray
# instance of its own): waits until `count` workers are alive.
_ACTOR_NODES = """
import json, sys, time
from ray.util.state import list_actors
deadline = time.monotonic() + float(sys.argv[3])
while True:
    actors = list_actors(address=sys.argv[1], limit=1000, filters=[("state", "=", "ALIVE")])
    workers = [a for a in actors if a.class_name == "RayTrainWorker"]
    if len(workers) >= int(sys.argv[2]) or time.monotonic() > deadline:
        break
    time.sleep(0.5)
drivers = [a for a in actors if a.class_name in ("TrainController", "ImplicitFunc")]
print("NODES " + json.dumps([sorted({a.node_id for a in workers}), sorted({a.node_id for a in drivers})]))
"""


def test_each_notice_gets_one_checkpoint_and_a_resume_after_one_counts_a_preemption():
    """The recipe's bookkeeping, without a cluster: a notice is new once (so one just-in-time
    checkpoint), a changed notice (another node) is new again, and a resume from a state written after
    a notice counts one recovered preemption and clears it; a state from before this count starts at 0."""
    from types import SimpleNamespace

    from ray.train import PreemptionInfo

    from alphadpo_ray.training.recipe import _recovered_preemption, preemption_notice

    notices = iter([None, PreemptionInfo(1000, {"a": [1]}), PreemptionInfo(1000, {"a": [1]}),
                    PreemptionInfo(900, {"a": [1], "b": [0]})])
    worker = SimpleNamespace(rank=1, session=SimpleNamespace(preemption_notice=lambda: next(notices)))
    state = {"preemptions": {"recovered": 0, "pending": None}}
    assert [preemption_notice(worker, state, step) for step in (1, 2, 3, 4)] == [False, True, False, True]
    assert state["preemptions"]["pending"] == {"step": 4, "deadline_ms": 900, "nodes": ["a", "b"]}

    resumed = json.loads(json.dumps(state))  # as trainer_state.json holds it
    assert _recovered_preemption(resumed) == {"step": 4, "deadline_ms": 900, "nodes": ["a", "b"]}
    assert resumed["preemptions"] == {"recovered": 1, "pending": None}
    assert _recovered_preemption(resumed) is None and resumed["preemptions"]["recovered"] == 1
    older = {"step": 3}
    assert _recovered_preemption(older) is None and older["preemptions"] == {"recovered": 0, "pending": None}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    nodes = [{"ip": HEAD, "num_cpus": 4, "resources": {"slot": 1}}]
    nodes += [{"ip": ip, "num_cpus": 1, "resources": {"slot": 1}} for ip in WORKER_IPS]
    # Ray Train's preemption watcher polls the drain state every second instead of every 5.
    with LocalCluster(tmp_path_factory.mktemp("preemption-cluster"), nodes=nodes,
                      env={"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}) as running:
        yield running


class RunLog:
    """A subprocess's combined output, in a file, searched as it grows."""

    def __init__(self, path: Path, process: subprocess.Popen):
        self.path, self.process = path, process

    def text(self) -> str:
        return self.path.read_text(errors="replace")

    def wait_for(self, pattern: str, after: int = 0, timeout: float = WAIT_S) -> re.Match:
        """The first match of `pattern` at or after offset `after`, waiting for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.compile(pattern, re.M).search(self.text(), after)
            if match:
                return match
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} in the output (exit {self.process.poll()}):\n{self.text()[-6000:]}")


def _write_config(tmp_path: Path, name: str, cluster: LocalCluster, **sections) -> tuple[Path, object]:
    """The run's YAML (and its MLflow store): 2 workers of 1 CPU and 1 slot each, the slow method under
    a name of this run's own (the test process registers it too, once per name)."""
    from alphadpo_ray.services.tracking import create_sqlite_store

    method = f"slow-{name}"
    plugin = tmp_path / "slow_method.py"
    plugin.write_text(SLOW_METHOD.replace("METHOD", method))
    ray = {"num_workers": 2, "resources_per_worker": {"CPU": 1, "slot": 1}, "address": cluster.address,
           **sections.pop("ray", {})}
    config = small_config(tmp_path, name=name, plugins=[str(plugin)], method={"name": method, "beta": 2.0},
                          deepspeed={"zero_stage": 0}, ray=ray, **sections)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    create_sqlite_store(config.tracking.tracking_uri)  # now, under its lock: the test reads it while the run writes
    return path, config


def _start(cluster: LocalCluster, tmp_path: Path, args: list[str]) -> RunLog:
    """`alphadpo-ray ARGS` against the cluster; every worker line kept (Ray folds similar lines of
    several workers into one by default)."""
    out = tmp_path / "run.log"
    with open(out, "w") as handle:
        process = subprocess.Popen([str(Path(sys.executable).parent / "alphadpo-ray"), *args], cwd=tmp_path,
                                   env={**cluster.client_env(), "RAY_DEDUP_LOGS": "0"}, stdout=handle,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return RunLog(out, process)


def _finish(log: RunLog, timeout: float = WAIT_S) -> None:
    try:
        log.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.process.kill()
        log.process.wait()
    assert log.process.returncode == 0, log.text()[-6000:]


def _victim(cluster: LocalCluster) -> str:
    """A node to take away from the run: one hosting a Train worker, but neither the head nor a node
    running the Train controller or the Tune trial (their loss is not a worker-node loss)."""
    result = subprocess.run([sys.executable, "-c", _ACTOR_NODES, cluster.dashboard_url, "2", "120"],
                            env=cluster.client_env(), capture_output=True, text=True, timeout=300)
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("NODES ")), None)
    assert line, f"cannot list the Train workers:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    workers, drivers = (set(ids) for ids in json.loads(line[len("NODES "):]))
    candidates = [ip for ip in WORKER_IPS if cluster.node_id(ip) in workers - drivers]
    assert candidates, f"no worker node to take away (workers on {workers}, controllers/trials on {drivers})"
    return candidates[0]


def _drain(cluster: LocalCluster, ip: str) -> None:
    """Announce a spot reclaim of `ip` in DEADLINE_S seconds, as the autoscaler does."""
    subprocess.run([str(Path(sys.executable).parent / "ray"), "drain-node", "--address", cluster.address,
                    "--node-id", cluster.node_id(ip), "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                    "--reason-message", "spot", "--deadline-remaining-seconds", str(DEADLINE_S)],
                   env=cluster.client_env(), check=True, capture_output=True, timeout=120)


def _duplicate_steps(client, run_id: str) -> dict[str, list[int]]:
    """{metric: steps logged more than once} over every metric of the run."""
    duplicates = {}
    for key in client.get_run(run_id).data.metrics:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        repeated = sorted({s for s in steps if steps.count(s) > 1})
        if repeated:
            duplicates[key] = repeated
    return duplicates


def _last_step_before(text: str, end: int) -> int:
    return max((int(s) for s in re.findall(r"^.*?step (\d+)/\d+  loss", text[:end], re.M)), default=0)


@pytest.mark.slow
def test_sweep_trial_hit_by_preemption_resumes_as_the_same_trial(cluster, builtin_task, tmp_path):
    """A two-worker trial whose worker node is drained for preemption: the recipe writes a just-in-time
    checkpoint at once and trains on; at the reclaim deadline Ray Train stops the workers, counts a
    preemption (``ray.max_failures`` is 0: a failure would end the trial) and restarts them on the spare
    node from that checkpoint; then the node goes. One Tune trial, one MLflow child run (the same one),
    one preemption counted, each step logged once."""
    from mlflow.tracking import MlflowClient

    name = f"presweep-{tmp_path.name[-6:]}"
    sweep = {"name": name, "num_samples": 1, "points_to_evaluate": False, "direct_single_worker": False,
             "search_space": {"beta": {"type": "uniform", "low": 1.5, "high": 2.5}}}
    # Long enough to outlast the deadline after the notice (steps take > 1 s), no periodic checkpoint before it.
    training = {"max_steps": 30, "save_steps": 28, "logging_steps": 1, "eval_steps": 100,
                "per_device_train_batch_size": 4}
    path, config = _write_config(tmp_path, "presweep", cluster, training=training, sweep=sweep,
                                 ray={"max_failures": 0, "max_preemption_failures": 1})
    log = _start(cluster, tmp_path, ["sweep", str(path), "--address", cluster.address])
    client = MlflowClient(config.tracking.tracking_uri)
    trial_runs = _wait_for_trial_step(client, name, 1, log)
    victim = _victim(cluster)
    _drain(cluster, victim)
    notice = log.wait_for(r"\[preemption\] notice at step (\d+)")
    notice_step = int(notice.group(1))
    resumed = log.wait_for(r"\[resume\] continuing from step (\d+)", notice.end())  # Ray Train, at the deadline
    lost = max(_trial_steps(client, trial_runs[0])) - notice_step
    cluster.kill_node(victim)  # the reclaim itself
    _finish(log)

    children = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                                  filter_string=f"tags.`alphadpo.sweep` = '{name}' and tags.`alphadpo.kind` = 'trial'")
    assert [c.info.run_id for c in children] == trial_runs  # no extra child run: the same trial throughout
    run = client.get_run(trial_runs[0])
    assert run.info.status == "FINISHED" and run.data.tags.get("alphadpo.status") == "finished"
    assert int(resumed.group(1)) == notice_step
    assert _trial_steps(client, trial_runs[0]) == list(range(1, 31))
    duplicates = _duplicate_steps(client, trial_runs[0])
    assert not duplicates
    assert run.data.metrics["run/preemptions"] == 1
    output = log.text()  # the notice and the resume once each, no Ray, Train or gloo trace
    assert not re.search(r"Traceback|Error in training function|Graceful shutdown", output), output[-8000:]
    assert len(re.findall(r"\[preemption\] notice", output)) == 1 and len(re.findall(r"\[resume\]", output)) == 1
    print(f"\n[figures] sweep trial: notice step {notice_step}, resumed from step {resumed.group(1)}, "
          f"steps lost {lost}, preemptions 1, MLflow duplicates {len(duplicates)}")


def _trial_steps(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))


def _wait_for_trial_step(client, sweep: str, step: int, log: RunLog) -> list[str]:
    """The sweep's trial run ids once one has logged `step`."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            experiment = client.get_experiment_by_name("tests")
            runs = client.search_runs([experiment.experiment_id], filter_string=(
                f"tags.`alphadpo.sweep` = '{sweep}' and tags.`alphadpo.kind` = 'trial'")) if experiment else []
            if runs and max(_trial_steps(client, runs[0].info.run_id), default=0) >= step:
                return [r.info.run_id for r in runs]
        except Exception:  # noqa: BLE001 - the store may not be created yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"sweep {sweep}: no trial reached step {step}:\n{log.text()[-6000:]}")


@pytest.mark.slow
def test_train_run_resumes_after_preemption_and_after_node_loss(cluster, builtin_task, tmp_path):
    """16 steps, periodic checkpoints every 12. A worker node is drained for preemption early on and
    killed as soon as the just-in-time checkpoint is in (a reclaim before its deadline: Ray 2.60 sees a
    node that died, not one it watched go, and charges ``ray.max_failures``): the run resumes from the
    notice's step. After the step-12 checkpoint a worker node is killed with no notice: the run resumes
    from step 12. It finishes, counts one preemption, and MLflow holds every step once. The console says
    each once — the notice, then per loss ``[failure] node IP lost at step N; resuming from step M (K steps
    lost)`` and ``[resume]`` — with no Ray, Train or gloo trace (those stay in Ray's log files)."""
    from mlflow.tracking import MlflowClient

    training = {"max_steps": 16, "save_steps": 12, "logging_steps": 1, "eval_steps": 100,
                "per_device_train_batch_size": 4}
    path, config = _write_config(tmp_path, f"preempt-{tmp_path.name[-6:]}", cluster, training=training,
                                 ray={"max_failures": 2, "max_preemption_failures": 1})
    log = _start(cluster, tmp_path, ["train", str(path)])

    log.wait_for(r"step 1/16  loss")
    victim = _victim(cluster)
    _drain(cluster, victim)
    notice = log.wait_for(r"\[preemption\] notice at step (\d+)")
    notice_step = int(notice.group(1))
    log.wait_for(rf"step {notice_step}/16 .*\[checkpoint\]")  # the controller's line may come first
    cluster.kill_node(victim)
    first = log.wait_for(r"\[resume\] continuing from step (\d+).*$", notice.end())
    lost_notice = _last_step_before(log.text(), first.start()) - notice_step

    loss_victim = _victim(cluster)
    ticked = log.wait_for(r"step 13/16  loss", first.end())
    cluster.kill_node(loss_victim)
    second = log.wait_for(r"\[resume\] continuing from step (\d+)", ticked.end())
    lost_loss = _last_step_before(log.text(), second.start()) - int(second.group(1))
    _finish(log)

    assert 0 < notice_step < 12 and int(first.group(1)) == notice_step  # the just-in-time checkpoint
    assert f"after the preemption noticed at step {notice_step}" in first.group(0)
    assert int(second.group(1)) == 12  # no notice: the latest periodic checkpoint

    output = log.text()
    assert not re.search(r"Traceback|Error in training function|Graceful shutdown|marked dead|Failed to remove",
                         output), output[-8000:]
    failures = re.findall(r"\[failure\] (.*)$", output, re.M)
    assert len(failures) == 2, output[-8000:]
    lost = [re.fullmatch(r"node (\S+) lost at step (\d+); resuming from step (\d+) \((\d+) steps? lost\)", f)
            for f in failures]
    assert all(lost), failures
    assert [(m.group(1), int(m.group(3))) for m in lost] == [(victim, notice_step), (loss_victim, 12)], failures
    assert all(int(m.group(2)) - int(m.group(3)) == int(m.group(4)) for m in lost), failures
    assert len(re.findall(r"\[preemption\] notice", output)) == 1 and len(re.findall(r"\[resume\]", output)) == 2
    own = [ln for ln in output.splitlines() if ln.strip() and not re.search(r"step \d+/16  loss", ln)]
    summary = json.loads((config.run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 16
    assert summary["preemptions"] == 1
    client = MlflowClient(config.tracking.tracking_uri)
    run_id = summary["mlflow_run_id"]
    assert _trial_steps(client, run_id) == list(range(1, 17))
    duplicates = _duplicate_steps(client, run_id)
    assert not duplicates
    assert client.get_run(run_id).data.metrics["run/preemptions"] == 1
    print(f"\n[figures] train, preemption: notice step {notice_step}, resumed from step {first.group(1)}, "
          f"steps lost {lost_notice}; node loss without notice: resumed from step {second.group(1)}, steps lost "
          f"{lost_loss}; preemptions {summary['preemptions']}, MLflow duplicates {len(duplicates)}; console lines "
          f"besides progress {len(own)}:\n" + "\n".join(own))
