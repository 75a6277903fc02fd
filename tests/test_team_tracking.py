"""A team tracking server, for real: `mlflow server` with its runs in PostgreSQL, its artifacts in an
S3-compatible bucket (`moto`) and MLflow's basic-auth app on. A sweep whose driver has the credentials
only in ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` logs every trial there, and neither the
password nor the object store's secret key appears in anything the sweep wrote: its output and working
directories, Ray's storage and the artifacts (the whole bucket), Ray's session logs, its console, and
the params, tags and artifacts MLflow holds."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import small_config
from services import BIN, mlflow_server, postgres_server, s3_server, stop_tree

pytestmark = pytest.mark.slow


def _files_holding(secret: bytes, roots: list[Path]) -> list[str]:
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                try:
                    if secret in path.read_bytes():
                        found.append(str(path))
                except OSError:  # a socket or a file removed meanwhile
                    continue
    return found


def test_sweep_logs_to_authenticated_server_with_postgres_and_s3(builtin_task, tmp_path, short_tmp,
                                                                  monkeypatch):
    from mlflow.tracking import MlflowClient

    from alphadpo_ray.services.tracking import TrackingUnavailable, check_tracking

    password = f"team-{uuid.uuid4().hex}"
    with s3_server(tmp_path / "s3") as s3, postgres_server(tmp_path / "pg", ("mlflow", "mlflow_auth")) as pg, \
            mlflow_server(tmp_path / "server", backend_store_uri=f"{pg}/mlflow",
                          artifacts_destination=s3.uri("mlflow"), env=s3.env, admin=("admin", password),
                          auth_database_uri=f"{pg}/mlflow_auth") as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
        with pytest.raises(TrackingUnavailable, match="answered 401 .*credentials given were refused"):
            check_tracking(uri)  # the server really checks: a wrong password is refused before anything starts

        config = small_config(
            tmp_path, name="team", ray={"num_workers": 1, "storage_path": s3.uri("ray")},
            deepspeed={"zero_stage": 0},
            training={"per_device_train_batch_size": 8, "total_batch_size": 8, "max_steps": 4, "eval_steps": 2,
                      "logging_steps": 2, "save_steps": 2},
            sweep={"name": "team", "num_samples": 2, "max_concurrent_trials": 1},
            tracking={"tracking_uri": uri, "experiment_name": "team"},
        )
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump(config.to_dict()))
        ray_tmp, work = short_tmp(), tmp_path / "work"
        work.mkdir()
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **s3.env, "RAY_TMPDIR": str(ray_tmp),
               "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
        log = tmp_path / "driver.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(BIN / "alphadpo-ray"), "sweep", str(path)], cwd=work, env=env,
                                    stdout=out, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=900)
        finally:
            stop_tree(proc)
        assert code == 0, log.read_text(errors="replace")[-4000:]

        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("team")
        runs = client.search_runs([experiment.experiment_id])
        trials = [r for r in runs if r.data.tags.get("alphadpo.kind") == "trial"]
        assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
        assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in runs)  # proxied by the server
        results = json.loads((config.run_dir.parent / "team" / "results.json").read_text())
        assert results["tracking_uri"] == uri
        parent = client.get_run(results["mlflow_parent_run_id"])
        # what the UI shows: the runs table (model training), grouping params, data inputs, each metric step once;
        # the console has no MLflow "View run" lines and ends with the page to open
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        for trial in trials:
            assert (trial.data.params["method"], trial.data.params["phase"]) == ("alpha-dpo", "search")
            assert sorted(i.dataset.name for i in trial.inputs.dataset_inputs) == ["held-out", "train"]
            assert "objective/score" in trial.data.metrics
            for key in trial.data.metrics:
                steps = [m.step for m in client.get_metric_history(trial.info.run_id, key)]
                assert len(steps) == len(set(steps)), (key, steps)
        console = log.read_text(errors="replace")
        assert "View run" not in console and f"open {uri}/#/experiments/{experiment.experiment_id}/runs" in console
        stored = s3.keys("mlflow/")
        for name in ("trials.csv", "config.json", "search_space.json"):
            key = f"mlflow/{experiment.experiment_id}/{parent.info.run_id}/artifacts/{name}"
            assert key in stored, stored

        secrets = {"MLflow password": password, "object store secret key": s3.env["AWS_SECRET_ACCESS_KEY"]}
        logged = json.dumps([[r.data.params, r.data.tags, r.data.metrics] for r in runs])
        for what, secret in secrets.items():
            assert secret not in logged, f"the {what} is in MLflow params/tags"
            leaked_files = _files_holding(secret.encode(), [tmp_path / "outputs", work, ray_tmp])
            assert not leaked_files, f"the {what} is in {leaked_files}"
            assert secret not in log.read_text(errors="replace"), f"the {what} is in the driver's console"
            leaked_keys = [k for k in s3.keys() if secret.encode() in s3.read(k)]
            assert not leaked_keys, f"the {what} is in the bucket: {leaked_keys}"
