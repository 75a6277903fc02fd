"""`alphadpo_ray.tracking` with real processes and a real store: several runs creating the same new
experiment at the same moment (embedded SQLite and a real `mlflow server` on 127.0.0.1)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from services import mlflow_server

RACERS = 6

RACE = """
import sys, pathlib, time
from mlflow.tracking import MlflowClient
from alphadpo_ray import tracking
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
    from alphadpo_ray import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.create_sqlite_store(uri)
    _check_race(uri, _race(uri, tmp_path / "race"))


@pytest.mark.slow
def test_same_new_experiment_created_by_several_processes_server(tmp_path):
    """The same against a real `mlflow server` on 127.0.0.1 (its own SQLite store)."""
    with mlflow_server(tmp_path / "server") as uri:
        _check_race(uri, _race(uri, tmp_path / "race"))
