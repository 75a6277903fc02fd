"""`ray.storage_path: s3://…` end to end against a real S3-compatible server (`moto` on 127.0.0.1): a
training run and a sweep put everything they share and resume from into the bucket, and continue from
it after their driver (with its Ray) is killed — the sweep from a second driver in another working
directory that has nothing but the bucket. Drivers are `alphadpo-ray` processes, as a user runs them,
each with its own local Ray, the endpoint and dummy credentials in their environment only."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import small_config
from held import held_plugin
from services import BIN, s3_server, stop_tree

STORAGE = "ray"  # the bucket's prefix both tests use as ray.storage_path (data and reference cache shared)

@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3")) as store:
        yield store


@pytest.fixture
def driver():
    """Starts `alphadpo-ray ARGS` in `cwd` with output to `log`; every driver started is stopped with all
    its processes (its Ray included) when the test ends, however it ends."""
    started: list[subprocess.Popen] = []

    def start(args: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
        cwd.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            started.append(subprocess.Popen([str(BIN / "alphadpo-ray"), *args], cwd=cwd, env=env, stdout=out,
                                            stderr=subprocess.STDOUT))
        return started[-1]

    yield start
    for proc in started:
        stop_tree(proc, signal.SIGKILL)


def _env(s3, ray_tmp: Path) -> dict:
    """The driver's environment: the bucket's endpoint and credentials, its own Ray temp dir (short:
    Ray's socket paths must fit in 107 bytes), never the test session's Ray."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, **s3.env, "RAY_TMPDIR": str(ray_tmp)}


def _wait(condition, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"{what}: not reached (exit {proc.poll()}):\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.3)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    code = proc.wait(timeout=timeout)
    stop_tree(proc, signal.SIGKILL)  # anything the driver left behind
    text = log.read_text(errors="replace")
    assert code == 0, text[-4000:]
    return text


def test_storage_helpers_sweep_lock_and_worker_env_on_the_bucket(s3, monkeypatch):
    """The package's own use of an object store, with the endpoint given either way pyarrow takes it: in
    the URI's query (nothing in the environment) or as ``AWS_ENDPOINT_URL``, which workers get too —
    credentials never, and never in the storage path."""
    import pyarrow as pa

    from alphadpo_ray.services import storage
    from alphadpo_ray.config.experiment import config_from_dict
    from alphadpo_ray.errors import ConfigError
    from alphadpo_ray.training.launch import worker_env
    from alphadpo_ray.training.preflight import check_storage_uri
    from alphadpo_ray.sweep.run import SweepRunning, sweep_lock

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, s3.env[name])
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    by_query = f"s3://{s3.bucket}/helpers?endpoint_override={s3.endpoint.removeprefix('http://')}&scheme=http"
    table = pa.table({"x": [1, 2]})
    storage.write_table(storage.join(by_query, "q", "t.parquet"), table)
    assert storage.read_table(storage.join(by_query, "q", "t.parquet")).equals(table)
    check_storage_uri(by_query)  # an endpoint is no secret
    secret = s3.env["AWS_SECRET_ACCESS_KEY"]
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY") as refused:
        check_storage_uri(f"{by_query}&secret_key={secret}")
    assert secret not in str(refused.value)

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    base = s3.uri("helpers")
    storage.write_json(storage.join(base, "e", "a.json"), {"a": 1})
    assert storage.exists(storage.join(base, "e", "a.json"))
    files = [k for k in s3.keys("helpers/") if not k.endswith("/")]  # pyarrow also keeps folder markers
    assert files == ["helpers/e/a.json", "helpers/q/t.parquet"]  # no temporary names left
    with sweep_lock(base, "held"):
        assert "helpers/held.lock" in s3.keys("helpers/")
        with pytest.raises(SweepRunning, match="already running"), sweep_lock(base, "held"):
            pass
    assert "helpers/held.lock" not in s3.keys("helpers/")
    env = worker_env(config_from_dict({}))
    assert env["AWS_ENDPOINT_URL"] == s3.endpoint and env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)


@pytest.mark.slow
def test_train_run_writes_to_the_bucket_and_resumes_from_it(s3, driver, builtin_task, tmp_path, short_tmp):
    """Prepared data, the reference cache, checkpoints and the run's identity land in the bucket; the
    driver (and its Ray) is killed at step 6, after the step-4 checkpoint; the same command continues
    from that checkpoint in the bucket and finishes, exporting the policy from there, continuing the same
    MLflow run (each step once), with a console free of the libraries' routine announcements."""
    plugin = held_plugin(tmp_path / "plugin", "held-s3-dpo", loss="dpo")  # the driver is killed at step 6
    config = small_config(tmp_path, name="s3train", plugins=[str(plugin)],
                          method={"name": "held-s3-dpo", "beta": 0.1}, ray={"storage_path": s3.uri(STORAGE)},
                          training={"max_steps": 8, "save_steps": 4, "logging_steps": 2, "eval_steps": 100})
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    env = _env(s3, short_tmp())
    run = f"{STORAGE}/s3train"

    def checkpointed_and_held() -> bool:
        snapshot = f"{run}/checkpoint_manager_snapshot.json"
        return plugin.with_name("held").exists() and snapshot in s3.keys(run) and \
            "checkpoint_" in s3.read(snapshot).decode()

    first = driver(["train", str(path)], tmp_path / "work", env, tmp_path / "first.log")
    _wait(checkpointed_and_held, first, tmp_path / "first.log", 600, "step-4 checkpoint in the bucket, run at step 6")
    stop_tree(first, signal.SIGKILL)  # the driver, its Ray and its workers: a lost driver machine

    keys = s3.keys(STORAGE)
    assert any(re.fullmatch(rf"{STORAGE}/prepared/[0-9a-f]+/train\.parquet", k) for k in keys), keys
    assert any(re.fullmatch(rf"{STORAGE}/prepared/[0-9a-f]+/eval\.parquet", k) for k in keys), keys
    assert any(re.fullmatch(rf"{STORAGE}/reference_cache/[0-9a-f]+\.parquet", k) for k in keys), keys
    assert f"{run}/alphadpo_run.json" in keys
    assert any(k.startswith(f"{run}/checkpoint_") for k in keys)
    assert not list((tmp_path / "work").rglob("checkpoint_*"))  # nothing of the run is kept locally

    second = driver(["train", str(path)], tmp_path / "work", env, tmp_path / "second.log")
    text = _finish(second, tmp_path / "second.log")
    assert "[resume] continuing from step 4 of 8" in text, text[-4000:]
    summary = json.loads((config.run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 8
    assert summary["checkpoint"].startswith(f"s3://{s3.bucket}/{run}/checkpoint_")
    assert (Path(summary["policy"]) / "model.safetensors").exists()  # exported from the bucket
    assert s3.env["AWS_SECRET_ACCESS_KEY"] not in json.dumps(summary)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(config.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]  # one run, continued
    assert runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(summary["mlflow_run_id"], "train/loss")]
    assert steps == [2, 4, 6, 8]  # each step once across the kill
    # The console holds the project's own lines, not the libraries' routine announcements.
    for noise in ("Token authentication is enabled", "Setting accelerator to CPU", "shm_comm_op built successfully",
                  "PreemptionWatcher", "Creating initial MLflow database tables", "Loading weights", "tensorboard"):
        assert noise not in text, noise


@pytest.mark.slow
def test_sweep_resumes_from_the_bucket_in_another_working_directory(s3, driver, builtin_task, tmp_path,
                                                                    short_tmp):
    """A sweep's Tune experiment, trials, checkpoints and trial journal live in the bucket. Its driver is
    killed once the journal there records a finished trial, with the next one running (Tune's full state
    is saved every 30 s, so it is older); a driver started in another, empty working directory with its
    own Ray resumes it with `--resume` from the bucket alone: exactly ``num_samples`` trials, finished
    ones not run again, the rest finish, results land in that directory, and MLflow holds exactly one
    finished child run per trial with each step once."""
    config = small_config(
        tmp_path, name="s3sweep", output_dir="outputs", ray={"num_workers": 1, "storage_path": s3.uri(STORAGE)},
        deepspeed={"zero_stage": 0},
        training={"per_device_train_batch_size": 8, "total_batch_size": 8, "max_steps": 6, "eval_steps": 3,
                  "logging_steps": 3, "save_steps": 3},
        sweep={"name": "s3sweep", "num_samples": 3, "max_concurrent_trials": 1},
    )
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    experiment = f"{STORAGE}/s3sweep"

    def journaled(status: str) -> set[str]:
        """Trial ids the trial journal in the bucket records with `status`."""
        ids = set()
        for key in s3.keys(f"{experiment}/trial_journal/"):
            try:
                entry = json.loads(s3.read(key))
            except Exception:  # noqa: BLE001 - being written meanwhile
                continue
            if entry.get("status") == status:
                ids.add(entry["trial_id"])
        return ids

    first = driver(["sweep", str(path)], tmp_path / "a", _env(s3, short_tmp()),
                    tmp_path / "first.log")
    _wait(lambda: journaled("TERMINATED") and journaled("RUNNING"), first, tmp_path / "first.log", 600,
          "a finished trial and a running one in the bucket's journal")
    stop_tree(first, signal.SIGKILL)
    finished_before = journaled("TERMINATED")
    assert 1 <= len(finished_before) < 3, finished_before

    keys = s3.keys(experiment)
    assert f"{experiment}/tuner.pkl" in keys and any("/checkpoint_" in k for k in keys), keys
    second = driver(["sweep", str(path), "--resume"], tmp_path / "b", _env(s3, short_tmp()),
                     tmp_path / "second.log")
    text = _finish(second, tmp_path / "second.log")
    assert f"resuming s3sweep from s3://{s3.bucket}/{experiment}" in text, text[-4000:]
    assert "Failed to fetch metrics" not in text  # a just-started trial: no results yet
    for trial in finished_before:
        assert f"[trial {trial}] started" not in text, f"finished trial {trial} ran again"
    assert len(re.findall(r"\[trial \w+\] started", text)) == 3 - len(finished_before), text[-4000:]
    results = json.loads((tmp_path / "b" / "outputs" / "s3sweep" / "results.json").read_text())
    assert results["summary"]["trials"] == 3 and results["summary"]["failed"] == 0, results["summary"]
    assert not (tmp_path / "b" / "outputs" / "ray").exists()
    assert f"{STORAGE}/s3sweep.lock" not in s3.keys(STORAGE)  # the resumed driver took over and released it

    from mlflow.tracking import MlflowClient  # one child run per trial, all closed, each step logged once

    client = MlflowClient(config.tracking.tracking_uri)
    children = client.search_runs([client.get_run(results["mlflow_parent_run_id"]).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{results['mlflow_parent_run_id']}'")
    trial_ids = {c.data.tags["alphadpo.trial_id"] for c in children}
    assert len(children) == len(trial_ids) == 3 and finished_before <= trial_ids
    assert all(c.info.status == "FINISHED" for c in children)
    for child in children:  # even for the trial cut off mid-run
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
        assert sorted(steps) == [3, 6], (child.data.tags["alphadpo.trial_id"], steps)
