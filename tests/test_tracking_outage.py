"""Tracking outages never kill training, for real: a `mlflow server` on 127.0.0.1 started by the test,
killed by PID mid-run and restarted on the same port and store; a run's end with the server still
gone; a killed driver's RUNNING run closed by the next start; a fresh SQLite store created by
several processes at once."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import small_config
from held import held_plugin
from services import MLFLOW_SERVER_ENV, mlflow_server_command

pytestmark = pytest.mark.slow


class MLflowServer:
    """A real `mlflow server` (own SQLite store and artifact root) that the test stops and restarts."""

    def __init__(self, root: Path):
        self.root = root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        self.proc = subprocess.Popen(mlflow_server_command(self.root, self.port), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True,
                                     env={**os.environ, **MLFLOW_SERVER_ENV})
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        pytest.fail("mlflow server did not start")

    def stop(self) -> None:
        """SIGKILL the server's own process group (it was started in a new session), by its PID."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def server(tmp_path):
    server = MLflowServer(tmp_path / "mlflow-server")
    server.start()
    yield server
    server.stop()


def _steps(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))


def test_server_killed_mid_run_loses_nothing(ray_session, builtin_task, tmp_path, server, capfd):
    """Steps 1-5 reach the server, then it is killed (by PID) and steps 6-8 are trained and reported
    while it is gone; it comes back on the same port and store: training never stopped, the outage was
    reported once, every step arrives exactly once, and the run ends FINISHED."""
    from mlflow.tracking import MlflowClient

    from alphadpo_ray.training.launch import train

    name = f"outage-{tmp_path.name[-6:]}"
    plugin = held_plugin(tmp_path, name, step=6, action="wait")  # step 6 waits for `release`
    config = small_config(tmp_path, name=name, plugins=[str(plugin)], method={"name": name, "beta": 2.0},
                          ray={"num_workers": 1}, deepspeed={"zero_stage": 0},
                          training={"max_steps": 8, "save_steps": 8, "logging_steps": 1, "eval_steps": 100,
                                    "per_device_train_batch_size": 8},
                          tracking={"tracking_uri": server.uri, "experiment_name": "outage"})
    client = MlflowClient(server.uri)
    state: dict = {}

    def outage():
        deadline = time.time() + 300
        while time.time() < deadline and not (tmp_path / "waiting").exists():
            time.sleep(0.05)
        while time.time() < deadline:  # step 5 has reached the server
            try:
                runs = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
                if runs and 5 in _steps(client, runs[0].info.run_id):
                    break
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.1)
        server.stop()
        state["killed"] = time.time()
        (tmp_path / "release").touch()  # steps 6-8 now train while the server is gone
        while time.time() < deadline and not any("waiting up to" in line for line in lines):
            time.sleep(0.1)  # the run has ended and waits for the server to close it
        state["waited"] = time.time()
        server.start()
        state["back"] = time.time()

    lines: list[str] = []
    killer = threading.Thread(target=outage, daemon=True)
    killer.start()
    summary = train(config, log=lambda *a: lines.append(" ".join(map(str, a))))
    killer.join(timeout=300)
    assert {"killed", "waited", "back"} <= set(state), (state, lines)
    assert summary["status"] == "finished" and summary["steps"] == 8
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert _steps(client, run.info.run_id) == list(range(1, 9))
    assert {"summary.json", "config.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert not (Path(config.run_dir) / "mlflow-pending.jsonl").exists()  # nothing left behind
    assert any("closed as FINISHED" in line for line in lines), lines
    console, deadline = capfd.readouterr().out, time.time() + 60
    while "tracking store unavailable" not in console and time.time() < deadline:  # forwarded with a delay
        time.sleep(0.2)
        console += capfd.readouterr().out
    assert console.count("tracking store unavailable") == 1, console[-3000:]


def test_server_gone_at_the_end_then_next_start_sends_the_rest(tmp_path, server, caplog):
    """The end of a run with the server down: nothing raises, what is left stays on disk with a message,
    and the next start sends it (metrics, then the final status)."""
    from mlflow.tracking import MlflowClient

    from alphadpo_ray.services import tracking

    run_id, _ = tracking.start_or_resume_run(server.uri, "outage-end", "r", "key-1", {"a": "1"})
    pending = tracking.PendingMetrics(server.uri, tmp_path / "pending.jsonl")
    for step in (1, 2):
        pending.add({"run_id": run_id, "step": step, "ts": int(time.time() * 1000),
                     "metrics": {"train/loss": 1.0 / step}})
    assert pending.flush()
    server.stop()
    pending.add({"run_id": run_id, "step": 3, "ts": int(time.time() * 1000), "metrics": {"train/loss": 0.3}})
    lines: list[str] = []
    with caplog.at_level(logging.DEBUG, logger="urllib3"):
        assert tracking.finish_run(server.uri, run_id, "FINISHED", {"ok": True}, pending=pending, wait_s=1,
                                   log=lines.append) is False
    # a probe, not the MLflow client's minutes of retries (urllib3 logs each retry it makes)
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()], caplog.text[-2000:]
    assert any("kept in" in line and str(pending.path) in line for line in lines)
    assert len(pending.events()) == 2  # step 3 and the final status

    server.start()
    again = tracking.PendingMetrics(server.uri, tmp_path / "pending.jsonl")  # the next start
    assert again.flush() and not again.path.exists()
    client = MlflowClient(server.uri)
    assert _steps(client, run_id) == [1, 2, 3]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert "summary.json" in {a.path for a in client.list_artifacts(run_id)}


def test_killed_driver_run_is_closed_by_the_next_fresh_start(tmp_path):
    """A run left RUNNING by a killed driver: a fresh start (nothing in storage to continue) closes it
    as KILLED and gets a new run; a resume continues the recorded run."""
    from mlflow.tracking import MlflowClient

    from alphadpo_ray.services import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.create_sqlite_store(uri)
    left, resumed = tracking.start_or_resume_run(uri, "e", "r", "key", {})  # its driver was killed
    assert resumed is False
    again, resumed = tracking.start_or_resume_run(uri, "e", "r", "key", {}, resume=True, run_id=left)
    assert (again, resumed) == (left, True)
    fresh, resumed = tracking.start_or_resume_run(uri, "e", "r", "key", {}, resume=False)
    assert fresh != left and resumed is False
    client = MlflowClient(uri)
    assert client.get_run(left).info.status == "KILLED" and client.get_run(fresh).info.status == "RUNNING"


def test_new_sqlite_stores_are_copies_of_a_migrated_template(tmp_path, monkeypatch):
    """The first new store of an MLflow version makes the template (migrated once, no experiment in it);
    later ones are copies, each with its own Default experiment, as if MLflow had made them there."""
    import contextlib
    import sqlite3

    import mlflow
    from mlflow.tracking import MlflowClient

    from alphadpo_ray.services import tracking

    monkeypatch.setenv("ALPHADPO_RAY_CACHE", str(tmp_path / "cache"))
    template = tmp_path / "cache" / "mlflow-sqlite" / f"{mlflow.__version__}.db"
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        uri = f"sqlite:///{tmp_path / name / 'mlflow.db'}"
        tracking.create_sqlite_store(uri)
        assert template.exists()
        client = MlflowClient(uri)
        default = client.get_experiment("0")
        assert default.name == "Default" and default.artifact_location == str(tmp_path / name / "mlruns" / "0")
        run = client.create_run(client.create_experiment("e"))
        client.log_metric(run.info.run_id, "m", 1.0, step=1)
        assert [m.value for m in client.get_metric_history(run.info.run_id, "m")] == [1.0]
        with contextlib.closing(sqlite3.connect(template)) as db:  # (an MLflow client would add Default)
            assert db.execute("SELECT COUNT(*) FROM experiments").fetchone() == (0,)


def test_fresh_sqlite_store_created_by_several_processes_at_once(tmp_path):
    """Three processes create the same fresh store at the same moment: all succeed, and it works after."""
    from mlflow.tracking import MlflowClient

    db = tmp_path / "fresh" / "mlflow.db"
    uri = f"sqlite:///{db}"
    go = tmp_path / "go"
    script = (
        "import sys, time, pathlib\n"
        "from alphadpo_ray.services import tracking\n"
        "from mlflow.tracking import MlflowClient\n"
        "go = pathlib.Path(sys.argv[2])\n"
        "go.with_name('ready' + sys.argv[3]).touch()\n"
        "while not go.exists(): time.sleep(0.01)\n"
        "tracking.create_sqlite_store(sys.argv[1])\n"
        "tracking.check_tracking(sys.argv[1])\n"
        "MlflowClient(sys.argv[1]).create_experiment('e' + sys.argv[3])\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, uri, str(go), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for i in range(3)]
    deadline = time.time() + 300  # all three imported and waiting, then released together
    while not all((tmp_path / f"ready{i}").exists() for i in range(3)) and time.time() < deadline:
        if any(p.poll() is not None for p in procs):  # one died before it was ready: say why now
            break
        time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=180)[0].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[-2000:] for o in outputs)
    names = {e.name for e in MlflowClient(uri).search_experiments()}
    assert {"e0", "e1", "e2"} <= names
