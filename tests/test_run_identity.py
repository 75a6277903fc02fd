"""A run's identity, for real (Ray Train × DeepSpeed × MLflow at toy scale): a stored run continues only
under the settings it was started with, a fresh start gets a fresh MLflow run, each step is logged
once across resumes, and a sweep never adds to another of the same name."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import small_config
from held import held_plugin

pytestmark = pytest.mark.slow


ONE_WORKER = {"ray": {"num_workers": 1}, "deepspeed": {"zero_stage": 0}}  # the cheapest real run


def _quiet(*_):
    pass


def _steps(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))


def test_changed_settings_refuse_restart_and_deleted_storage_start_fresh_runs(ray_session, builtin_task, tmp_path,
                                                                             monkeypatch):
    """Re-running with other hyperparameters refuses before anything starts, naming the changed keys;
    ``--restart`` and a deleted storage each start over with a fresh MLflow run, leaving the old ones."""
    from mlflow.tracking import MlflowClient

    from alphadpo_ray.cli import build_parser
    from alphadpo_ray.config.experiment import config_from_dict
    from alphadpo_ray.training.launch import IDENTITY_FILE, RunConfigChanged, train

    config = small_config(tmp_path, name=f"identity-{tmp_path.name[-6:]}", **ONE_WORKER,
                          training={"max_steps": 4, "save_steps": 4, "logging_steps": 1,
                                    "per_device_train_batch_size": 8})
    client = MlflowClient(config.tracking.tracking_uri)
    first = train(config, log=_quiet)
    run_dir = Path(config.storage_path()) / config.run_name
    record = json.loads((run_dir / IDENTITY_FILE).read_text())
    assert record["mlflow_run_id"] == first["mlflow_run_id"] and record["settings"]["method.beta"] == 2.5

    # other hyperparameters (and settings that do not change the result, which must not count)
    changed = config_from_dict(config.to_dict(), "changed", ["training.learning_rate=1e-3", "method.beta=10",
                                                              "ray.max_failures=1", "training.logging_steps=2"])
    experiment = client.get_experiment_by_name("tests").experiment_id
    from alphadpo_ray.training import launch, prepare

    prepared, real_prepare = [], prepare.prepare_run
    monkeypatch.setattr(prepare, "prepare_run", lambda *a, **k: prepared.append(a) or real_prepare(*a, **k))
    monkeypatch.setattr(launch, "init_ray", lambda *a, **k: prepared.append("ray"))
    with pytest.raises(RunConfigChanged) as refused:
        train(changed, log=_quiet)
    assert prepared == []  # refused before preparing data or starting Ray
    monkeypatch.undo()
    message = str(refused.value)
    assert "method.beta: 2.5 → 10.0" in message
    assert "training.learning_rate: 0.0002 → 0.001" in message
    assert "max_failures" not in message and "logging_steps" not in message
    assert "--restart" in message and "--set name=" in message and "tracking.run_name" in message
    assert [r.info.run_id for r in client.search_runs([experiment])] == [first["mlflow_run_id"]]
    assert json.loads((Path(config.run_dir) / "summary.json").read_text())["hyperparameters"]["beta"] == 2.5

    # --restart: the old storage is set aside, a new MLflow run, the old one left as it was
    assert build_parser().parse_args(["train", "run.yaml", "--restart"]).restart is True
    restarted = train(changed, log=_quiet, restart=True)
    assert restarted["mlflow_run_id"] != first["mlflow_run_id"]
    assert restarted["hyperparameters"]["beta"] == 10.0 and restarted["steps"] == 4
    assert list(run_dir.parent.glob(f"{config.run_name}.replaced-*"))
    old, new = client.get_run(first["mlflow_run_id"]), client.get_run(restarted["mlflow_run_id"])
    assert old.info.status == new.info.status == "FINISHED"
    assert float(old.data.params["method.beta"]) == 2.5 and float(new.data.params["method.beta"]) == 10.0
    assert _steps(client, first["mlflow_run_id"]) == [1, 2, 3, 4]
    assert _steps(client, restarted["mlflow_run_id"]) == [2, 4]  # logging_steps 2

    # the storage deleted: the same command starts over with a fresh MLflow run (no second history)
    shutil.rmtree(run_dir)
    again = train(changed, log=_quiet)
    assert again["mlflow_run_id"] not in (first["mlflow_run_id"], restarted["mlflow_run_id"])
    assert client.get_run(again["mlflow_run_id"]).info.status == "FINISHED"
    assert _steps(client, restarted["mlflow_run_id"]) == _steps(client, again["mlflow_run_id"]) == [2, 4]
    assert len(client.search_runs([experiment])) == 3


def _actor_pids(class_name: str) -> list[int]:
    """PIDs of live `class_name` actors of this test session's Ray (whose processes descend from this
    one), never another Ray's on the same machine."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if any(part.startswith(f"ray::{class_name}") for part in proc.cmdline()):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def _held_run(tmp_path: Path, name: str, action: str = "sleep", **sections):
    """A run (8 steps, checkpoints every 4) whose worker stops at step 6 until killed (or fails there once,
    ``action="fail"``): step 5 is logged, so a restart from the step-4 checkpoint replays a logged step."""
    folder = tmp_path / name
    plugin = held_plugin(folder, name, step=6, action=action)
    training = {"max_steps": 8, "save_steps": 4, "logging_steps": 1, "eval_steps": 100,
                "per_device_train_batch_size": 8, **sections.pop("training", {})}
    return small_config(folder, name=name, plugins=[str(plugin)], method={"name": name, "beta": 2.0},
                        training=training, **sections)


def _kill_when_logged(uri: str, run_name: str, step: int, class_name: str, killed: threading.Event,
                      stop: threading.Event, ignore: set[int]):
    """SIGKILL this session's live `class_name` actor once the run's MLflow history reaches `step`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    deadline = time.time() + 240
    while time.time() < deadline and not stop.is_set():
        try:
            found = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                                       f"attributes.run_name = '{run_name}'")
            pids = [p for p in _actor_pids(class_name) if p not in ignore]
            if found and pids and max(_steps(client, found[0].info.run_id), default=0) >= step:
                os.kill(pids[-1], signal.SIGKILL)
                killed.set()
                return
        except Exception:  # noqa: BLE001 - the experiment, run or actor may not exist yet
            pass
        time.sleep(0.2)


def _train_and_kill(config, step: int, class_name: str):
    """train(config) while a thread kills a `class_name` actor once `step` is logged: (summary or the
    exception raised, whether the kill happened)."""
    from alphadpo_ray.training.launch import train

    killed, stop = threading.Event(), threading.Event()
    earlier = set(_actor_pids(class_name))  # another run's, still shutting down
    killer = threading.Thread(target=_kill_when_logged, daemon=True,
                              args=(config.tracking.tracking_uri, config.run_name, step, class_name,
                                    killed, stop, earlier))
    killer.start()
    try:
        outcome = train(config, log=_quiet)
    except Exception as err:  # noqa: BLE001 - returned for the test to check
        outcome = err
    finally:
        stop.set()
        killer.join(timeout=10)
    return outcome, killed.is_set()


def test_resumes_log_each_step_once(ray_session, builtin_task, tmp_path):
    """A worker killed at step 6 with checkpoints every 4 (step 5 logged): the worker group restarts from
    step 4 and replays step 5, which is not logged again. Then the Train controller killed at the same
    point (the driver side fails, the run is closed FAILED) and the same command re-run: it resumes the
    same MLflow run from its checkpoint and again logs each step once."""
    from mlflow.tracking import MlflowClient

    from alphadpo_ray.training.launch import TrainingFailed, train

    suffix = tmp_path.name[-6:]
    ray_train = {"num_workers": 1, "in_process_single_worker": False}  # these kills need Ray Train's actors
    config = _held_run(tmp_path, f"held-worker-{suffix}", ray={**ray_train, "max_failures": 1},
                       deepspeed={"zero_stage": 0})
    summary, killed = _train_and_kill(config, 5, "RayTrainWorker")
    assert killed, "no worker was killed; the test did not exercise a restart"
    assert not (tmp_path / config.name / "hold").exists()  # the worker really stopped at step 6
    assert summary["status"] == "finished"
    client = MlflowClient(config.tracking.tracking_uri)
    assert _steps(client, summary["mlflow_run_id"]) == list(range(1, 9))  # each step once, none missing
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"

    second = _held_run(tmp_path, f"held-driver-{suffix}", ray=ray_train, deepspeed={"zero_stage": 0})
    failed, killed = _train_and_kill(second, 5, "TrainController")
    assert killed and isinstance(failed, TrainingFailed), failed
    client = MlflowClient(second.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FAILED"  # closed honestly, not left RUNNING
    assert _steps(client, runs[0].info.run_id) == [1, 2, 3, 4, 5]
    resumed = train(second, log=_quiet)
    assert resumed["mlflow_run_id"] == runs[0].info.run_id  # the same run, continued from its checkpoint
    assert _steps(client, resumed["mlflow_run_id"]) == list(range(1, 9))
    assert client.get_run(resumed["mlflow_run_id"]).info.status == "FINISHED"
    # the data inputs and the exported policy as a logged model, once each after the resume
    run = client.get_run(resumed["mlflow_run_id"])
    assert sorted(i.dataset.name for i in run.inputs.dataset_inputs) == ["held-out", "train"]
    models = client.search_logged_models([run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [m.name for m in models] == ["policy"] and models[0].tags["alphadpo.policy_path"] == resumed["policy"]
    assert {"config.json", "alphadpo_config.json"} <= {a.path for a in client.list_logged_model_artifacts(
        models[0].model_id)}


def test_in_process_run_killed_resumes_under_ray_train(ray_session, builtin_task, tmp_path):
    """A one-worker run trains in the CLI's own process (no Ray started). Killed at step 6 with checkpoints
    every 4 (step 5 logged), the same run continues under Ray Train with two workers: Ray Train reads the
    checkpoints the in-process run registered, resumes from step 4, and each step reaches MLflow once."""
    import sys

    import psutil
    import yaml
    from mlflow.tracking import MlflowClient
    from services import stop_tree

    from alphadpo_ray.config.experiment import config_from_dict
    from alphadpo_ray.training.launch import train

    config = _held_run(tmp_path, f"held-local-{tmp_path.name[-6:]}", **ONE_WORKER)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    log = tmp_path / "cli.log"
    client = MlflowClient(config.tracking.tracking_uri)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "alphadpo_ray", "train", str(path)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline, logged, ray_processes = time.time() + 240, [], []
        while time.time() < deadline and proc.poll() is None:
            try:
                runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
                logged = _steps(client, runs[0].info.run_id) if runs else []
            except Exception:  # noqa: BLE001 - the store or run may not exist yet
                logged = []
            ray_processes += [c.name() for c in psutil.Process(proc.pid).children(recursive=True)
                              if "ray" in c.name() or "gcs" in c.name()]
            if max(logged, default=0) >= 5 and (tmp_path / config.name / "held").exists():
                break
            time.sleep(0.3)
    finally:
        stop_tree(proc, signal.SIGKILL)
    assert logged and max(logged) == 5, (logged, log.read_text()[-3000:])
    assert "1 worker in this process" in log.read_text() and not ray_processes, ray_processes

    two_workers = config_from_dict(config.to_dict(), "resume", [
        "ray.num_workers=2", "ray.in_process_single_worker=false", "training.per_device_train_batch_size=4"])
    resumed = train(two_workers, log=_quiet)
    assert resumed["status"] == "finished" and len(resumed["history"]) == 8
    assert _steps(client, resumed["mlflow_run_id"]) == list(range(1, 9))  # 5 not logged again
    assert client.get_run(resumed["mlflow_run_id"]).info.status == "FINISHED"


def test_in_process_run_retries_from_its_checkpoint(ray_session, builtin_task, tmp_path):
    """An in-process run whose step 6 fails once restarts from its step-4 checkpoint within
    ``ray.max_failures`` (as Ray Train restarts a worker group), logging each step once, and says so in one
    line; failing before its first checkpoint it says it starts over and how many steps are lost; with
    max_failures 0 the same failure fails the run, its MLflow run closed FAILED."""
    from mlflow.tracking import MlflowClient

    from alphadpo_ray.training.launch import TrainingFailed, train

    suffix = tmp_path.name[-6:]
    config = _held_run(tmp_path, f"retry-{suffix}", action="fail", ray={"num_workers": 1, "max_failures": 1},
                       deepspeed={"zero_stage": 0})
    lines = []
    summary = train(config, log=lines.append)
    assert summary["status"] == "finished" and len(summary["history"]) == 8
    failures = [line for line in lines if line.startswith("[failure]")]
    assert failures == ["[failure] worker 0 failed at step 5 (RuntimeError: injected failure at step 6); "
                        "resuming from step 4 (1 step lost)"], lines
    client = MlflowClient(config.tracking.tracking_uri)
    assert _steps(client, summary["mlflow_run_id"]) == list(range(1, 9))

    early = _held_run(tmp_path, f"early-{suffix}", action="fail", ray={"num_workers": 1, "max_failures": 1},
                      deepspeed={"zero_stage": 0}, training={"save_steps": 8})  # no checkpoint before step 6
    lines = []
    assert train(early, log=lines.append)["status"] == "finished"
    failures = [line for line in lines if line.startswith("[failure]")]
    assert failures == ["[failure] worker 0 failed at step 5 (RuntimeError: injected failure at step 6); "
                        "no checkpoint yet: starting over, 5 steps lost"], lines

    no_retry = _held_run(tmp_path, f"noretry-{suffix}", action="fail", **ONE_WORKER)
    lines = []
    with pytest.raises(TrainingFailed, match="injected failure"):
        train(no_retry, log=lines.append)
    assert [line for line in lines if line.startswith("[failure]")] == [
        "[failure] worker 0 failed at step 5 (RuntimeError: injected failure at step 6); no failures left "
        "(ray.max_failures 0): the run stops"], lines
    client = MlflowClient(no_retry.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FAILED"


def _sweep_config(tmp_path, name: str):
    return small_config(tmp_path, name="swid", ray={"num_workers": 1}, deepspeed={"zero_stage": 0},
                        training={"per_device_train_batch_size": 8, "total_batch_size": 8, "max_steps": 4,
                                  "eval_steps": 4, "logging_steps": 2, "save_steps": 4},
                        sweep={"name": name, "num_samples": 1, "max_concurrent_trials": 1})


def test_sweep_name_is_held_and_never_reused_without_resume(ray_session, builtin_task, tmp_path):
    """A sweep whose name is held by a live process refuses; a stale lock (dead pid) is taken over; a
    finished sweep re-run without --resume refuses, pointing at --resume, and MLflow gets nothing new."""
    from mlflow.tracking import MlflowClient

    from alphadpo_ray.sweep.run import SweepExists, SweepRunning, run_sweep, sweep_lock

    name = f"idsweep-{tmp_path.name[-6:]}"
    config = _sweep_config(tmp_path, name)
    storage = config.storage_path()
    with sweep_lock(storage, name) as lock:  # another sweep of that name is running
        assert json.loads(Path(lock).read_text())["pid"] == os.getpid()
        with pytest.raises(SweepRunning, match="already running"):
            run_sweep(config, log=_quiet)
    assert not Path(lock).exists()

    dead = subprocess.Popen(["true"])
    dead.wait()
    Path(lock).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "since": "earlier"}))
    result = run_sweep(config, log=_quiet)  # a killed holder's lock is taken over
    assert [r["status"] for r in result.rows] == ["finished"]
    assert not Path(lock).exists()

    client = MlflowClient(config.tracking.tracking_uri)
    experiment = client.get_experiment_by_name("tests").experiment_id
    before = sorted(r.info.run_id for r in client.search_runs([experiment]))
    with pytest.raises(SweepExists, match="--resume") as refused:
        run_sweep(config, log=_quiet)
    assert name in str(refused.value) and result.parent_run_id in str(refused.value)
    assert sorted(r.info.run_id for r in client.search_runs([experiment])) == before
    assert not Path(lock).exists()


def test_compare_with_an_existing_mlflow_parent_refuses(builtin_task, tmp_path):
    """Without --resume a compare whose name has an MLflow parent refuses before Ray starts."""
    from mlflow.tracking import MlflowClient

    from alphadpo_ray.sweep.run import SweepExists, run_compare
    from alphadpo_ray.sweep.nested_runs import KIND_TAG, SWEEP_TAG

    name = f"idcompare-{tmp_path.name[-6:]}"
    config = _sweep_config(tmp_path, name)
    client = MlflowClient(config.tracking.tracking_uri)
    experiment = client.create_experiment("tests")
    parent = client.create_run(experiment, run_name=name, tags={KIND_TAG: "compare", SWEEP_TAG: name})
    with pytest.raises(SweepExists, match="cannot be resumed") as refused:
        run_compare(config, log=_quiet)
    assert parent.info.run_id in str(refused.value)
