"""`SweepMLflowCallback` driven directly, as Tune's controller calls it, against a real MLflow store: a
trial's metrics and end go through the sweep's pending file and a background sender, every step of every
trial arrives exactly once (interleaved trials, a driver killed with events unsent, a store that is down),
and Tune's thread never waits on the store."""

from __future__ import annotations

import pickle
import tempfile
import time
from types import SimpleNamespace

import pytest

from alphadpo_ray.services import tracking
from alphadpo_ray.sweep.nested_runs import STATUS_TAG, SweepMLflowCallback, send_sweep_pending, sweep_pending


@pytest.fixture(autouse=True)
def _pending_under_tmp(tmp_path, monkeypatch):
    """The sweeps' pending files (`default_pending_path`: under the temp dir) in this test's folder."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()


def _trial(trial_id: str, result: dict | None = None):
    return SimpleNamespace(trial_id=trial_id, config={"alpha": 0.1, "seed": 1}, last_result=result,
                           error_file=None, get_error=lambda: "RuntimeError: boom")


def _report(step: int, total: int) -> dict:
    return {"step": step, "total_steps": total, "train/loss": 1.0 / step, "eval/accuracy": 0.5 + step / 1000,
            "training_iteration": step}


def _sweep(uri: str) -> SweepMLflowCallback:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment_id = tracking.get_or_create_experiment(client, "tests")
    parent = client.create_run(experiment_id, run_name="sweep").info.run_id
    return SweepMLflowCallback(uri, experiment_id, parent, "sweep", "alphadpo")


def _steps(client, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _sqlite(tmp_path) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.create_sqlite_store(uri)
    return uri


def test_interleaved_trials_reach_mlflow_once_each_step(tmp_path):
    """16 trials report 30 steps each, interleaved as Tune delivers them: every step of every trial is in
    its run once (both metrics), each run is closed with its status, and the sweep's file is gone."""
    from mlflow.tracking import MlflowClient

    uri = _sqlite(tmp_path)
    callback = _sweep(uri)
    trials = [_trial(f"t{i:02d}") for i in range(16)]
    for trial in trials:
        callback.on_trial_start(0, trials, trial)
    for step in range(1, 31):
        for trial in trials:
            callback.on_trial_result(0, trials, trial, _report(step, 30))
    for trial in trials[:15]:
        trial.last_result = _report(30, 30)
        callback.on_trial_complete(0, trials, trial)
    callback.on_trial_error(0, trials, trials[15])
    assert send_sweep_pending(uri, callback.parent_run_id, wait_s=30)
    client = MlflowClient(uri)
    for trial in trials:
        run = client.get_run(callback.mlflow_run_id(trial.trial_id))
        assert _steps(client, run.info.run_id) == list(range(1, 31))
        assert _steps(client, run.info.run_id, "eval/accuracy") == list(range(1, 31))
        failed = trial is trials[15]
        assert run.info.status == ("FAILED" if failed else "FINISHED")
        assert run.data.tags[STATUS_TAG] == ("failed" if failed else "finished")
    assert not sweep_pending(uri, callback.parent_run_id).path.exists()


_KILLED_DRIVER = """
import os, pickle, sys, time
from types import SimpleNamespace
from alphadpo_ray.sweep.nested_runs import SweepMLflowCallback, send_sweep_pending, sweep_pending, sweep_sender

uri, experiment_id, parent, out = sys.argv[1:]
callback = SweepMLflowCallback(uri, experiment_id, parent, "sweep", "alphadpo")
trial = SimpleNamespace(trial_id="t00", config={"alpha": 0.1, "seed": 1}, last_result=None)
callback.on_trial_start(0, [trial], trial)
for step in range(1, 6):
    callback.on_trial_result(0, [trial], trial, {"step": step, "total_steps": 10, "train/loss": 1.0 / step,
                                                 "eval/accuracy": 0.5 + step / 1000})
assert send_sweep_pending(uri, parent, wait_s=30)
open(out, "wb").write(pickle.dumps(callback))  # Tune's saved experiment state
sweep_sender(uri, parent).stop()  # dies before its sender sends what follows (it wakes every 2 s on its own)
left = sweep_pending(uri, parent)
for step in range(4, 9):
    left.add({"run_id": callback.mlflow_run_id("t00"), "step": step, "ts": int(time.time() * 1000),
              "metrics": {"train/loss": 1.0 / step, "eval/accuracy": 0.5 + step / 1000}})
os._exit(0)  # killed: its sender thread never sends these
"""


def test_driver_killed_with_events_unsent_then_resume_sends_each_step_once(tmp_path):
    """A driver killed mid-sweep (a process that exits at once): its trial's run holds steps 1-5 and the sweep's
    file still holds steps 4-8 (4 and 5 sent but not yet removed when it died, 6-8 never sent). The resumed
    sweep's callback (unpickled from the saved state, as `Tuner.restore` makes it) sends the file first, as
    `run_method_sweep` does, then the trial replays steps 7-10 from its checkpoint: steps 1-10 are in the run
    once each, and the run is closed."""
    import os
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    uri = _sqlite(tmp_path)
    client = MlflowClient(uri)
    experiment_id = tracking.get_or_create_experiment(client, "tests")
    parent = client.create_run(experiment_id, run_name="sweep").info.run_id
    state = tmp_path / "callback.pkl"
    subprocess.run([sys.executable, "-c", _KILLED_DRIVER, uri, experiment_id, parent, str(state)], check=True,
                   env={**os.environ, "TMPDIR": str(tmp_path / "tmp")}, timeout=300)
    resumed = pickle.loads(state.read_bytes())
    run_id = resumed.runs["t00"]
    assert _steps(client, run_id) == [1, 2, 3, 4, 5] and len(sweep_pending(uri, parent).events()) == 5

    assert send_sweep_pending(uri, parent, wait_s=30)
    trial = _trial("t00")
    for step in range(7, 11):
        resumed.on_trial_result(0, [trial], trial, _report(step, 10))
    trial.last_result = _report(10, 10)
    resumed.on_trial_complete(0, [trial], trial)
    assert send_sweep_pending(uri, parent, wait_s=30)
    history = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(history) == list(range(1, 11)), history
    assert _steps(client, run_id, "eval/accuracy") == list(range(1, 11))
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_store_down_never_blocks_tunes_thread(tmp_path, capsys):
    """A real `mlflow server`, stopped while 4 trials report and a fifth starts: each `on_trial_start` and
    `on_trial_result` returns at once (a local append; the MLflow client's own retries would take minutes),
    the fifth trial's run creation and every report wait in the sweep's file and the outage is said once. The
    server comes back on the same port and store: the fifth run is created, every step arrives once."""
    from mlflow.tracking import MlflowClient
    from services import free_port, mlflow_server

    root, port = tmp_path / "server", free_port()
    with mlflow_server(root, port=port) as uri:
        callback = _sweep(uri)
        trials = [_trial(f"t{i}") for i in range(4)]
        for trial in trials:
            callback.on_trial_start(0, trials, trial)
            callback.on_trial_result(0, trials, trial, _report(1, 20))
        assert send_sweep_pending(uri, callback.parent_run_id, wait_s=30)
    slowest, late = 0.0, _trial("late")  # `late` starts during the outage: its run is created once the store is back
    start = time.perf_counter()
    callback.on_trial_start(0, trials, late)
    callback.on_trial_result(0, trials, late, _report(1, 20))
    slowest = time.perf_counter() - start
    trials.append(late)
    for step in range(2, 21):
        for trial in trials:
            start = time.perf_counter()
            callback.on_trial_result(0, trials, trial, _report(step, 20))
            slowest = max(slowest, time.perf_counter() - start)
    assert slowest < 0.5, slowest
    pending = sweep_pending(uri, callback.parent_run_id)
    time.sleep(2 * tracking.RETRY_S)  # the sender tries the store at least once meanwhile
    assert len(pending.events()) >= 1 + 5 * 19 + 1
    assert capsys.readouterr().out.count("tracking store unavailable") == 1
    with mlflow_server(root, port=port):
        for trial in trials:
            trial.last_result = _report(20, 20)
            callback.on_trial_complete(0, trials, trial)
        assert send_sweep_pending(uri, callback.parent_run_id, wait_s=60)
        client = MlflowClient(uri)
        for trial in trials:
            run_id = callback.mlflow_run_id(trial.trial_id)
            assert _steps(client, run_id) == list(range(1, 21)), trial.trial_id
            assert client.get_run(run_id).info.status == "FINISHED"
    assert not pending.path.exists()


def test_callback_stays_picklable_with_its_sender_running(tmp_path):
    """Tune pickles its callbacks into the experiment state while the sender thread runs; the trial → run ids
    it saves are MLflow's, never a run still to be created."""
    uri = _sqlite(tmp_path)
    callback = _sweep(uri)
    trial = _trial("t0")
    callback.on_trial_start(0, [trial], trial)
    callback.on_trial_result(0, [trial], trial, _report(1, 2))
    restored = pickle.loads(pickle.dumps(callback))
    # only runs that exist travel (a run the sender has not created yet is found, or created, again)
    assert all(not run.startswith(tracking.NEW_RUN) for run in restored.runs.values()), restored.runs
    assert send_sweep_pending(uri, callback.parent_run_id, wait_s=30)
    assert sweep_pending(uri, callback.parent_run_id).events() == []
    assert pickle.loads(pickle.dumps(callback)).runs == {"t0": callback.mlflow_run_id("t0")}
