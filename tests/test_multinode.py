"""A sweep on a real multi-node Ray cluster (`ray start` head on 127.0.0.1 + nodes on 127.0.0.2 and
127.0.0.3, token auth on), driven as a user would: `alphadpo-ray sweep --address` and `ray job submit`;
and the check that keeps a submitted job's results out of Ray's temporary working-dir copy.

Where things ran is read from Ray's state API after the sweep (actors and tasks keep their node id),
so the recipe needs no node bookkeeping of its own."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import small_config
from ray_cluster import VENV_BIN, LocalCluster
from services import mlflow_server

HEAD, NODE_B, NODE_C = "127.0.0.1", "127.0.0.2", "127.0.0.3"
# The head runs the drivers, Tune's trial actors and Train controllers (fractional CPUs) and has room for
# one worker; each other node fits two workers.
NODES = [{"ip": HEAD, "num_cpus": 1},
         {"ip": NODE_B, "num_cpus": 2, "resources": {"node_b": 1}},
         {"ip": NODE_C, "num_cpus": 2, "resources": {"node_c": 1}}]

# Ray's state API from a driver subprocess: every Train worker and reference task, with its node.
_PLACEMENTS = """
import json, sys
from ray.util.state import list_actors, list_tasks
dashboard = sys.argv[1]
workers = [{"node": a.node_id, "group": a.placement_group_id, "job": a.job_id} for a in list_actors(
    address=dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=10000)]
tasks = [{"node": t.node_id, "job": t.job_id} for t in list_tasks(
    address=dashboard, filters=[("name", "=", "reference_logps")], detail=True, limit=10000)]
print("PLACEMENTS " + json.dumps({"workers": workers, "reference_tasks": tasks}))
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("cluster"), NODES) as local:
        yield local


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Storage and MLflow store every sweep of this module uses (as a team's cluster would)."""
    return tmp_path_factory.mktemp("shared")


def sweep_config(tmp_path: Path, shared: Path, name: str, **sections) -> dict:
    """A 2-trial sweep of 2-worker trials (workers spread over nodes), 4 steps each, as a dict."""
    config = small_config(
        tmp_path, name=name, output_dir=str(tmp_path / "outputs"), deepspeed={"zero_stage": 0},
        training={"per_device_train_batch_size": 4, "total_batch_size": 8, "max_steps": 4, "eval_steps": 4,
                  "logging_steps": 2, "save_steps": 4},
        ray={"num_workers": 2, "storage_path": str(shared / "storage"), "placement_strategy": "SPREAD"},
        tracking={"tracking_uri": f"sqlite:///{shared / 'mlflow.db'}", "experiment_name": "multinode",
                  **sections.pop("tracking", {})},
        sweep={"name": name, "num_samples": 2, "max_concurrent_trials": 2}, **sections)
    return config.to_dict()


def _run(args: list[str], env: dict, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _placements(cluster: LocalCluster) -> dict:
    out = _run([sys.executable, "-c", _PLACEMENTS, cluster.dashboard_url], cluster.client_env(), cluster.root, 300)
    line = next((x for x in out.stdout.splitlines() if x.startswith("PLACEMENTS ")), None)
    assert line, out.stdout[-2000:] + out.stderr[-3000:]
    return json.loads(line.removeprefix("PLACEMENTS "))


def _children(uri: str, sweep: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("multinode")
    return client.search_runs([experiment.experiment_id],
                              f"tags.`alphadpo.kind` = 'trial' and tags.`alphadpo.sweep` = '{sweep}'")


def _job(cluster: LocalCluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return _run([str(VENV_BIN / "ray"), "job", *args], cluster.client_env(), cluster.root, timeout)


def test_job_outputs_check_refuses_places_inside_the_working_dir_copy(tmp_path, monkeypatch):
    """As a Ray job's driver (Ray's job config in the environment, started in the unpacked working dir),
    relative places are refused by name; absolute ones and a tracking server pass; outside a job,
    relative places are the user's choice."""
    from alphadpo_ray.errors import ConfigError
    from alphadpo_ray.training.preflight import check_job_outputs

    copy = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    (copy / "configs").mkdir(parents=True)
    monkeypatch.chdir(copy / "configs")  # an entrypoint may start in a subdirectory of the copy
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    relative = small_config(tmp_path, output_dir="outputs", ray={"storage_path": str(tmp_path / "storage")},
                            tracking={"tracking_uri": None})
    check_job_outputs(relative)  # not a job
    job_config = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job_config))
    with pytest.raises(ConfigError) as refused:
        check_job_outputs(relative)
    text = str(refused.value)
    assert f"({copy})" in text and "output_dir -> ./configs/outputs;" in text
    assert "tracking.tracking_uri (default ./mlflow.db) -> ./configs/mlflow.db" in text
    assert "MLflow artifacts of experiment 'tests' -> ./configs/mlruns" in text and "ray.storage_path ->" not in text
    check_job_outputs(small_config(tmp_path, tracking={"tracking_uri": "http://127.0.0.1:5000"}))


@pytest.mark.slow
def test_sweep_runs_across_nodes(cluster, shared, tmp_path):
    """`alphadpo-ray sweep --address`: trials on several nodes, each trial's two Train workers on two
    nodes (gloo across nodes), the reference log-probs computed once for all, one MLflow child per trial."""
    config = sweep_config(tmp_path, shared, "multinode")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.monotonic()
    out = _run([str(VENV_BIN / "alphadpo-ray"), "sweep", str(path), "--address", cluster.address],
               cluster.client_env(), tmp_path)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    print(f"sweep on 3 nodes: {time.monotonic() - started:.0f} s")

    placements = _placements(cluster)
    ip_of = {cluster.node_id(ip): ip for ip in (HEAD, NODE_B, NODE_C)}
    by_trial: dict[str, set[str]] = {}
    for worker in placements["workers"]:
        by_trial.setdefault(worker["group"], set()).add(ip_of[worker["node"]])
    print("Train workers per trial:", {group[:8]: sorted(ips) for group, ips in by_trial.items()})
    assert len(by_trial) == 2 and all(len(ips) == 2 for ips in by_trial.values()), by_trial
    assert len(set().union(*by_trial.values())) >= 2

    # computed once (one cache entry, one set of reference tasks in one job), read by every trial's
    # workers on every node (the prepared training table carries the cached columns)
    cache_files = list((shared / "storage" / "reference_cache").rglob("*.parquet"))
    assert len(cache_files) == 1, cache_files
    assert log.count("[reference] log-probs computed") == 1, log[-3000:]
    assert len({t["job"] for t in placements["reference_tasks"]}) == 1

    children = _children(config["tracking"]["tracking_uri"], "multinode")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.tags["alphadpo.workers"] == "2" for c in children)


@pytest.mark.slow
def test_sweep_without_or_with_a_wrong_token_is_one_clear_error(cluster, shared, tmp_path):
    """`--address` to a token-auth cluster without RAY_AUTH_MODE=token, or with a wrong token: one
    message naming the fix, no traceback, no page of `Unauthenticated` lines."""
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_config(tmp_path, shared, "noauth")))
    without = {k: v for k, v in cluster.client_env().items() if not k.startswith("RAY_AUTH_")}
    wrong = {**cluster.client_env(), "RAY_AUTH_TOKEN": "0" * 64}
    for env, says in ((without, "RAY_AUTH_MODE is not 'token'"), (wrong, "rejected this process's auth token")):
        started = time.monotonic()
        out = _run([str(VENV_BIN / "alphadpo-ray"), "sweep", str(path), "--address", cluster.address], env, tmp_path,
                   300)
        seconds = time.monotonic() - started
        text = out.stdout + out.stderr
        assert out.returncode == 2, text[-3000:]
        assert says in out.stderr and "export RAY_AUTH_MODE=token" in out.stderr, out.stderr
        assert "RAY_AUTH_TOKEN_PATH" in out.stderr and "~/.ray/auth_token" in out.stderr
        assert "Traceback" not in text and "Unauthenticated" not in text
        assert len(out.stderr.strip().splitlines()) <= 2, out.stderr
        assert "0" * 64 not in text  # a token is never printed
        print(f"auth error after {seconds:.1f} s: {out.stderr.strip()[:200]}")


@pytest.mark.slow
def test_job_writing_into_its_working_dir_copy_fails_fast(cluster, shared, tmp_path):
    """A submitted job whose outputs, storage and MLflow store are relative (so inside Ray's temporary
    working-dir copy) is refused before any Ray work, with a message naming the keys and the fix."""
    work = tmp_path / "work"
    work.mkdir()
    config = sweep_config(tmp_path, shared, "relative")
    config["output_dir"], config["ray"]["storage_path"] = "outputs", "outputs/ray"
    config["tracking"].pop("tracking_uri")
    (work / "sweep.yaml").write_text(yaml.safe_dump(config))
    started = time.monotonic()
    submit = _job(cluster, "submit", "--address", cluster.dashboard_url, "--submission-id", "relative-outputs",
                  "--working-dir", str(work), "--", "python", "-m", "alphadpo_ray", "sweep", "sweep.yaml", timeout=300)
    seconds = time.monotonic() - started
    status = _job(cluster, "status", "--address", cluster.dashboard_url, "relative-outputs")
    logs = _job(cluster, "logs", "--address", cluster.dashboard_url, "relative-outputs").stdout
    assert submit.returncode != 0 and "job 'relative-outputs' failed" in status.stdout.lower(), status.stdout
    for words in ("temporary copy of --working-dir", "output_dir -> ./outputs;", "ray.storage_path -> ./outputs/ray;",
                  "tracking.tracking_uri (default ./mlflow.db) -> ./mlflow.db;", "MLflow artifacts of experiment",
                  "Nothing was started", "s3://", "tracking server"):
        assert words in logs, logs[-3000:]
    assert "Traceback" not in logs and "[reference]" not in logs
    print(f"refused job: {seconds:.0f} s from submit to FAILED")


@pytest.mark.slow
def test_two_studies_submitted_as_documented_jobs_share_the_cluster(cluster, shared, tmp_path):
    """docs/cluster.md's submission, as written, for two studies at once (a team's case): Ray started from the
    project's environment, `python -m alphadpo_ray` as the entrypoint, absolute output_dir / storage_path, one
    MLflow server. Each study holds its `sweep.max_concurrent_trials` (2) trial slots at the same time as the
    other — every trial waits at step 2 until all four run, so neither study waited for the other's — then
    both jobs reach SUCCEEDED, `ray job logs` returns each one's output, each study has its own MLflow parent,
    its own two trial runs and its own results, nothing lands in the working-dir copy, and the reference
    log-probs the cluster computed before are reused (still one cache entry)."""
    from mlflow.tracking import MlflowClient

    from held import held_plugin

    work, names = tmp_path / "work", ("as-job", "as-job-2")
    work.mkdir()
    plugin = held_plugin(tmp_path / "plugin", "held-jobs-dpo", step=2, action="wait", loss="dpo")
    with mlflow_server(tmp_path / "mlflow") as tracking_uri:
        for name in names:  # one-worker trials: each trains in its Tune trial actor on a node
            config = sweep_config(tmp_path, shared, name, tracking={"tracking_uri": tracking_uri},
                                  plugins=[str(plugin)], method={"name": "held-jobs-dpo", "beta": 0.1})
            config["ray"]["num_workers"], config["training"]["per_device_train_batch_size"] = 1, 8
            (work / f"{name}.yaml").write_text(yaml.safe_dump(config))
        started = time.monotonic()
        submits = [subprocess.Popen(
            [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url, "--submission-id", name,
             "--working-dir", str(work), "--", "python", "-m", "alphadpo_ray", "sweep", f"{name}.yaml"],
            env=cluster.client_env(), cwd=cluster.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name in names]
        client, running, deadline = MlflowClient(tracking_uri), {}, time.monotonic() + 600
        try:
            while time.monotonic() < deadline and not all(len(running.get(n, ())) == 2 for n in names):
                if any(p.poll() is not None for p in submits):  # a job ended before its trials all ran
                    break
                if client.get_experiment_by_name("multinode") is not None:  # made by the first driver
                    running = {n: [c for c in _children(tracking_uri, n) if c.info.status == "RUNNING"] for n in names}
                time.sleep(1)
            held = {n: len(running.get(n, ())) for n in names}
            (plugin.parent / "release").touch()  # all four trials ran at once: let them finish
            outputs = [p.communicate(timeout=900)[0] for p in submits]
        finally:
            for p in submits:  # the `ray job submit` processes this test started, if anything above failed
                if p.poll() is None:
                    p.kill()
                    p.wait()
        seconds = time.monotonic() - started
        children = {name: _children(tracking_uri, name) for name in names}
        parents = {name: client.get_run(json.loads((tmp_path / "outputs" / name / "results.json").read_text())[
            "mlflow_parent_run_id"]) for name in names}
    assert held == {"as-job": 2, "as-job-2": 2}, (held, [o[-3000:] for o in outputs])
    copies = list(cluster.node_temp_dir(HEAD).glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*"))
    for name, submit, output in zip(names, submits, outputs):
        status = _job(cluster, "status", "--address", cluster.dashboard_url, name)
        logs = _job(cluster, "logs", "--address", cluster.dashboard_url, name).stdout
        assert submit.returncode == 0 and f"job '{name}' succeeded" in status.stdout.lower(), \
            status.stdout + output[-2000:] + logs[-4000:]
        assert "results:" in logs and "[trial" in logs
        assert "[reference] log-probs" in logs and "Found multiple active Ray instances" not in logs, logs[-3000:]
        results = json.loads((tmp_path / "outputs" / name / "results.json").read_text())
        assert results["summary"]["trials"] == 2 and results["summary"]["failed"] == 0
        assert len(children[name]) == 2 and all(c.info.status == "FINISHED" for c in children[name])
        assert {c.data.tags["mlflow.parentRunId"] for c in children[name]} == {parents[name].info.run_id}
        assert parents[name].info.status == "FINISHED" and parents[name].data.tags["alphadpo.sweep"] == name
    assert parents["as-job"].info.run_id != parents["as-job-2"].info.run_id
    assert len(list((shared / "storage" / "reference_cache").rglob("*.parquet"))) == 1
    assert sorted(p.name for p in work.iterdir()) == ["as-job-2.yaml", "as-job.yaml"]
    assert not [p for copy in copies for p in copy.rglob("*")
                if p.name in ("mlflow.db", "outputs", "results.json", "mlruns", "ray")], copies
    print(f"two studies as Ray jobs: {seconds:.0f} s from submit to both SUCCEEDED")
