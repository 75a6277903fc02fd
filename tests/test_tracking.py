"""`alphadpo_ray.services.tracking` with real processes and a real store: several runs creating the same new
experiment at the same moment (embedded SQLite and a real `mlflow server` on 127.0.0.1)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from held import held_plugin
from services import mlflow_server

RACERS = 6

RACE = """
import sys, pathlib, time
from mlflow.tracking import MlflowClient
from alphadpo_ray.services import tracking
uri, here, i = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
MlflowClient(uri).search_experiments(max_results=1)  # imported and connected before the start
(here / f"ready-{i}").touch()
while not (here / "go").exists():
    time.sleep(0.001)
run_id, _ = tracking.start_or_resume_run(uri, "shared-new", f"run{i}", f"key{i}", {"i": i})
print("RUN", run_id, flush=True)
"""


def _race(uri: str, here: Path, deadline_s: float = 300) -> list[str]:
    """RACERS processes that each start a run in the same new experiment, released at once; their outputs."""
    here.mkdir(parents=True, exist_ok=True)
    procs = [subprocess.Popen([sys.executable, "-c", RACE, uri, str(here), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for i in range(RACERS)]
    try:
        deadline = time.time() + deadline_s
        while len(list(here.glob("ready-*"))) < RACERS and time.time() < deadline:
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.05)
        (here / "go").touch()
        return [p.communicate(timeout=deadline_s)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _check_race(uri: str, outputs: list[str]) -> None:
    from mlflow.tracking import MlflowClient

    assert all("RUN " in o for o in outputs), "\n-----\n".join(o[-3000:] for o in outputs)
    client = MlflowClient(uri)
    shared = [e for e in client.search_experiments() if e.name == "shared-new"]
    assert len(shared) == 1
    runs = client.search_runs([shared[0].experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(f"run{i}" for i in range(RACERS))


def test_same_new_experiment_created_by_several_processes_sqlite(tmp_path):
    """Six processes start a run in the same new experiment of one embedded SQLite store at once: every
    one gets its run, in the one experiment (before: all but one crashed with `already exists`)."""
    from alphadpo_ray.services import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.create_sqlite_store(uri)
    _check_race(uri, _race(uri, tmp_path / "race"))


@pytest.mark.slow
def test_same_new_experiment_created_by_several_processes_server(tmp_path):
    """The same against a real `mlflow server` on 127.0.0.1 (its own SQLite store)."""
    with mlflow_server(tmp_path / "server") as uri:
        _check_race(uri, _race(uri, tmp_path / "race"))


# ------------------------------------------------------------------------------------------------
# A run's way out: Ctrl-C, an error, a resume after an outage


def _held_config(tmp_path: Path, name: str):
    from conftest import small_config

    plugin = held_plugin(tmp_path, name, step=4)  # waits at step 4 until killed
    return small_config(tmp_path, name=name, plugins=[str(plugin)], method={"name": name, "beta": 2.0},
                        ray={"num_workers": 1}, deepspeed={"zero_stage": 0},
                        training={"max_steps": 6, "save_steps": 2, "logging_steps": 1, "eval_steps": 100,
                                  "per_device_train_batch_size": 8})


def _train_steps(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))


@pytest.mark.slow
def test_ctrl_c_marks_the_run_killed_and_prints_the_resume_command(builtin_task, tmp_path):
    """A real SIGINT to a real `train` once step 3 is in MLflow (and the run waits at step 4): the MLflow
    run is KILLED (before: left RUNNING), the console has one line with the command that resumes, and that
    command, run as printed, continues the same MLflow run to FINISHED."""
    import shlex
    import signal

    import yaml
    from mlflow.tracking import MlflowClient
    from services import stop_tree

    name = f"sigint-{tmp_path.name[-6:]}"
    config = _held_config(tmp_path, name)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    client = MlflowClient(config.tracking.tracking_uri)
    log = tmp_path / "cli.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "alphadpo_ray", "train", str(path)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=tmp_path)
    run_id = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            try:
                runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
                run_id = runs[0].info.run_id if runs else None
                if run_id and 3 in _train_steps(client, run_id) and (tmp_path / "held").exists():
                    break
            except Exception:  # noqa: BLE001 - the store, experiment or run may not exist yet
                pass
            time.sleep(0.2)
        assert run_id and (tmp_path / "held").exists(), log.read_text()[-3000:]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=180)
    finally:
        stop_tree(proc, signal.SIGKILL)
    text = log.read_text()
    assert proc.returncode == 130, text[-3000:]
    assert client.get_run(run_id).info.status == "KILLED", text[-3000:]
    hints = [line for line in text.splitlines() if line.startswith("interrupted; to resume: ")]
    assert hints == [f"interrupted; to resume: {shlex.join([sys.executable, '-m', 'alphadpo_ray', 'train', str(path)])}"], \
        text[-3000:]
    again = subprocess.run(shlex.split(hints[0].removeprefix("interrupted; to resume: ")), cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert _train_steps(client, run_id) == list(range(1, 7))


@pytest.mark.slow
def test_error_after_training_marks_the_run_failed(builtin_task, tmp_path):
    """An error on the way to the end (here `summary.json` cannot be written, as on a full disk): the MLflow
    run is FAILED (before: left RUNNING, and the OSError came out as a bare traceback)."""
    from mlflow.tracking import MlflowClient

    from alphadpo_ray.training.launch import TrainingFailed, train

    name = f"fail-{tmp_path.name[-6:]}"
    config = _held_config(tmp_path, name)
    (tmp_path / "hold").unlink()
    (config.run_dir / "summary.json").mkdir(parents=True)  # writing it fails, as a full disk would
    lines: list[str] = []
    with pytest.raises(TrainingFailed, match="IsADirectoryError"):
        train(config, log=lambda *a: lines.append(" ".join(map(str, a))))
    client = MlflowClient(config.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"], lines


def test_resume_line_says_which_steps_mlflow_holds_and_which_were_pending(tmp_path):
    """A run resumed after an outage: MLflow holds steps 1-3, steps 4-6 wait in the run's pending file.
    The resume line says so and sends them (before: "steps up to 6 already logged")."""
    from mlflow.tracking import MlflowClient

    from alphadpo_ray.training import launch

    from alphadpo_ray.services import secrets, tracking
    from conftest import small_config

    config = small_config(tmp_path, name="resumed")
    uri = config.tracking.tracking_uri
    tracking.create_sqlite_store(uri)
    key = tracking.run_key(config.storage_path(), config.run_name)
    run_id, _ = tracking.start_or_resume_run(uri, "tests", config.run_name, key, {})
    client = MlflowClient(uri)
    for step in (1, 2, 3):
        tracking.log_metrics(client, run_id, {"train/loss": 1.0 / step}, step)
    path = launch._pending_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    pending = tracking.PendingMetrics(uri, path)
    for step in (4, 5, 6):
        pending.add({"run_id": run_id, "step": step, "ts": int(time.time() * 1000), "metrics": {"train/loss": 0.1}})
    identity = launch.RunIdentity(uri="x", fingerprint="f", settings={}, fresh=False,
                                  previous={"mlflow_run_id": run_id, "tracking_uri": secrets.redact(uri)})
    lines: list[str] = []
    assert launch._start_tracking(config, uri, identity, lines.append) == (run_id, 6)
    assert f"steps up to 3 in MLflow, 4–6 pending on disk ({path}), sent now" in lines[-1], lines
    assert "already logged" not in lines[-1]
    assert _train_steps(client, run_id) == [1, 2, 3, 4, 5, 6] and not path.exists()


def test_finish_with_store_gone_says_the_run_stays_running(tmp_path):
    """The end of a run (or its way out) with the store unreachable: one line saying the run stays RUNNING
    in the store and where its pending metrics wait."""
    from services import free_port

    from alphadpo_ray.services import tracking

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    lines: list[str] = []
    pending = tracking.PendingMetrics(uri, tmp_path / "pending.jsonl")
    assert tracking.close_on_exit(uri, "abc", KeyboardInterrupt(), pending=pending, wait_s=0, log=lines.append) is False
    assert any("stays RUNNING in the store" in line and str(pending.path) in line and "(KILLED)" in line
               for line in lines), lines


def test_flush_groups_interleaved_runs_one_batch_per_run(tmp_path, monkeypatch):
    """Reports of 8 runs interleaved in one pending file (a sweep's trials) are sent as one `log_batch` per
    run, not one per report; each run's steps keep their order, its end comes after its metrics, and a run
    whose floor is known (created by this process) is not read back from the store."""
    from mlflow.tracking import MlflowClient

    from alphadpo_ray.services import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.create_sqlite_store(uri)
    client = MlflowClient(uri)
    experiment_id = tracking.get_or_create_experiment(client, "tests")
    runs = [client.create_run(experiment_id).info.run_id for _ in range(8)]
    pending = tracking.PendingMetrics(uri, tmp_path / "pending.jsonl")
    for run_id in runs:
        pending.floors[run_id] = -1
    for step in range(1, 21):
        for run_id in runs:
            pending.add({"run_id": run_id, "step": step, "ts": 1, "metrics": {"train/loss": 1.0 / step}})
    for run_id in runs:
        pending.add({"run_id": run_id, "finish": "FINISHED", "tags": {"alphadpo.status": "finished"}})
    calls = {"metrics": 0, "history": 0}
    log_batch, history = MlflowClient.log_batch, MlflowClient.get_metric_history

    def counted_log_batch(self, run_id, metrics=(), *args, **kwargs):
        calls["metrics"] += bool(metrics)
        return log_batch(self, run_id, metrics, *args, **kwargs)

    def counted_history(self, *args, **kwargs):
        calls["history"] += 1
        return history(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", counted_log_batch)
    monkeypatch.setattr(MlflowClient, "get_metric_history", counted_history)
    assert pending.flush(), pending.error
    assert calls == {"metrics": 8, "history": 0}  # before: 160 batches (one per report), 8 history reads
    monkeypatch.undo()
    for run_id in runs:
        assert _train_steps(client, run_id) == list(range(1, 21))
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["alphadpo.status"] == "finished"
    assert not pending.path.exists()


def test_runs_created_through_the_pending_file_once_even_when_the_line_outlives_its_process(tmp_path):
    """A run created by the pending file's sender (a sweep's trial: whoever appends never waits for the store):
    its tags, params and dataset inputs are set, and the reports naming it by its `new_run_key` land in it.
    A later process (a resumed driver) that finds the creation still in the file — its sender died after
    creating the run, before removing the line — finds that run instead of creating a second, and sends
    the rest of the reports there, each step once."""
    from mlflow.tracking import MlflowClient

    from alphadpo_ray.services import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.create_sqlite_store(uri)
    client = MlflowClient(uri)
    experiment_id = tracking.get_or_create_experiment(client, "tests")
    key = tracking.new_run_key(experiment_id, {"alphadpo.sweep": "sw", "alphadpo.trial_id": "t1"})
    create = {"run_id": key, "create": {"run_name": "alpha-dpo-t1", "tags": {"alphadpo.kind": "trial"},
                                        "params": {"alpha": 0.1, "method": "alpha-dpo"},
                                        "data": {"train_uri": "/data/train.parquet", "train_pairs": 64}}}
    first = tracking.PendingMetrics(uri, tmp_path / "pending.jsonl")
    first.add(create)
    for step in (1, 2):
        first.add({"run_id": key, "step": step, "ts": 1, "metrics": {"train/loss": 1.0 / step}})
    assert first.run_id(key) is None  # nothing sent yet
    assert first.flush(), first.error
    run_id = first.run_id(key)
    run = client.get_run(run_id)
    assert run.info.run_name == "alpha-dpo-t1" and run.data.params == {"alpha": "0.1", "method": "alpha-dpo"}
    assert {k: run.data.tags[k] for k in ("alphadpo.kind", "alphadpo.sweep", "alphadpo.trial_id")} == {
        "alphadpo.kind": "trial", "alphadpo.sweep": "sw", "alphadpo.trial_id": "t1"}
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["train"]
    assert _train_steps(client, run_id) == [1, 2]

    left = [create] + [{"run_id": key, "step": step, "ts": 1, "metrics": {"train/loss": 1.0 / step}}
                       for step in (2, 3)]  # 2 sent but not removed either, 3 never sent
    (tmp_path / "pending.jsonl").write_text("".join(json.dumps(event) + "\n" for event in left))
    later = tracking.PendingMetrics(uri, tmp_path / "pending.jsonl")  # a new process: knows no run of the file
    assert later.flush(), later.error
    assert later.run_id(key) == run_id  # found, not created again
    assert len(client.search_runs([experiment_id])) == 1
    assert _train_steps(client, run_id) == [1, 2, 3]
    assert [d.dataset.name for d in client.get_run(run_id).inputs.dataset_inputs] == ["train"]  # not twice
