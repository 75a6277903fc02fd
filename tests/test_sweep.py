"""Sweeps and comparisons for real: Ray Tune + Optuna trials that are training runs, MLflow nesting
(embedded SQLite and a real `mlflow server` on 127.0.0.1), failure isolation, resume and compare."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
import services
from conftest import small_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def sweep_config(tmp_path, sweep: dict, **sections):
    """A short 1-worker trial on the built-in task (the direct path) with a sweep section."""
    training = {"per_device_train_batch_size": 8, "total_batch_size": 8, "max_steps": 6, "eval_steps": 3,
                "logging_steps": 3, "save_steps": 3, "generation_eval_samples": 0, **sections.pop("training", {})}
    return small_config(tmp_path, name="sw", ray={"num_workers": 1, **sections.pop("ray", {})},
                        deepspeed={"zero_stage": 0}, training=training,
                        sweep={"max_concurrent_trials": 2, **sweep}, **sections)


def _children(uri: str, parent_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def _check_sweep_runs(uri: str, result, method: str, trials: int, hyperparameters: set[str]):
    from mlflow.tracking import MlflowClient

    parent = MlflowClient(uri).get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["alphadpo.kind"] == "sweep" and parent.data.tags["method"] == method
    children = _children(uri, result.parent_run_id)
    assert len(children) == trials
    by_trial = {c.data.tags["alphadpo.trial_id"]: c for c in children}
    for row in result.rows:
        child = by_trial[row["trial_id"]]
        assert child.data.tags["alphadpo.sweep"] == result.name and child.data.tags["method"] == method
        assert hyperparameters <= set(child.data.params)
        for name in hyperparameters:
            assert float(child.data.params[name]) == pytest.approx(float(row[name]))
        if row["status"] == "finished":
            assert child.info.status == "FINISHED"
            assert child.data.metrics["eval/accuracy"] == pytest.approx(row["accuracy"])
            assert child.data.metrics["eval/kl"] == pytest.approx(row["kl"])
    return children


def test_multi_objective_sweep_gives_pareto_set_and_nested_runs(ray_session, builtin_task, tmp_path):
    from alphadpo_ray.sweep.run import run_sweep

    config = sweep_config(tmp_path, {"name": "pareto4", "num_samples": 4})
    result = run_sweep(config, log=lambda *_: None)

    assert len(result.rows) == 4 and all(r["status"] == "finished" for r in result.rows)
    front = [r for r in result.rows if r["pareto"]]
    assert front, "a multi-objective sweep always has a non-empty Pareto set"
    for r in front:  # nothing else dominates a Pareto trial
        assert not any(o["accuracy"] >= r["accuracy"] and o["kl"] <= r["kl"] and
                       (o["accuracy"] > r["accuracy"] or o["kl"] < r["kl"]) for o in result.rows)
    # the papers' settings were evaluated first (Llama-3 and Mistral AlphaDPO points)
    assert {(r["alpha"], r["gamma_beta_ratio"]) for r in result.rows} >= {(0.2, 0.6), (0.05, 0.15)}
    _check_sweep_runs(config.tracking.tracking_uri, result, "alpha-dpo", 4,
                      {"alpha", "beta", "gamma_beta_ratio", "learning_rate"})
    for name in ("trials.csv", "trials.json", "pareto.png", "alpha_sensitivity.png", "results.json"):
        assert (result.directory / name).exists(), name

    # the report rebuilds the same table from MLflow alone
    from alphadpo_ray.sweep.report import report

    rebuilt = report("pareto4", tracking_uri=config.tracking.tracking_uri, output_dir=str(tmp_path / "report"))
    key = lambda r: r["trial_id"]  # noqa: E731
    for a, b in zip(sorted(result.rows, key=key), sorted(rebuilt["rows"], key=key)):
        assert (a["trial_id"], a["status"], a["pareto"]) == (b["trial_id"], b["status"], b["pareto"])
        assert a["accuracy"] == pytest.approx(b["accuracy"]) and a["kl"] == pytest.approx(b["kl"])
    assert (tmp_path / "report" / "pareto.png").exists()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (its own SQLite store and artifact root), for the one test that uses
    it (function scope: the module's other tests stay free to run on either pytest worker)."""
    with services.mlflow_server(tmp_path / "mlflow-server") as uri:
        yield uri


def test_concurrent_multi_worker_trials_log_to_mlflow_server(ray_session, builtin_task, tmp_path, mlflow_server):
    """Two trials at once, each a nested 2-worker TorchTrainer; every metric lands in its own child run."""
    from mlflow.tracking import MlflowClient

    from alphadpo_ray.sweep.run import run_sweep

    config = sweep_config(
        tmp_path, {"name": "server2", "num_samples": 2, "max_concurrent_trials": 2},
        ray={"num_workers": 2}, training={"per_device_train_batch_size": 4},
        tracking={"tracking_uri": mlflow_server, "experiment_name": "server-tests"},
    )
    result = run_sweep(config, log=lambda *_: None)
    assert [r["status"] for r in result.rows] == ["finished", "finished"]
    children = _check_sweep_runs(mlflow_server, result, "alpha-dpo", 2, {"alpha", "beta", "learning_rate"})
    client = MlflowClient(mlflow_server)
    for child in children:  # every training report of that trial, none of the other's
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
        assert sorted(steps) == [3, 6]
        assert child.data.tags["alphadpo.workers"] == "2"
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"trials.csv", "pareto.png", "search_space.json", "config.json"} <= artifacts
    # the trials really ran as Ray Train runs of their own, resumable by a stable name
    assert sorted(p.name for p in (Path(config.storage_path()) / "server2-trainers").iterdir()) == sorted(
        f"server2_{r['trial_id']}" for r in result.rows)


def test_nan_trial_fails_alone_and_optuna_is_told(ray_session, builtin_task, tmp_path):
    from alphadpo_ray.sweep.run import run_sweep

    config = sweep_config(
        tmp_path,
        {"name": "nan3", "num_samples": 3, "max_concurrent_trials": 1,
         "search_space": {"learning_rate": {"type": "loguniform", "low": 1e-5, "high": 1e31}},
         "points_to_evaluate": [{"learning_rate": 1e30}, {"learning_rate": 1e-4}]},
    )
    result = run_sweep(config, log=lambda *_: None)
    failed = [r for r in result.rows if r["status"] == "failed"]
    assert len(failed) >= 1 and any(r["learning_rate"] == 1e30 for r in failed)
    assert all("non-finite loss" in r["error"] for r in failed)
    assert any(r["status"] == "finished" for r in result.rows)
    assert len(result.rows) == 3
    child = next(c for c in _children(config.tracking.tracking_uri, result.parent_run_id)
                 if c.data.tags["alphadpo.trial_id"] == failed[0]["trial_id"])
    assert child.info.status == "FAILED" and "non-finite loss" in child.data.tags["alphadpo.error"]


def test_safe_optuna_search_fails_errored_and_nan_trials():
    """A failed trial's last (stale or NaN) metrics never reach Optuna: it is told FAIL."""
    import optuna

    from alphadpo_ray.config.sweep_settings import SweepConfig
    from alphadpo_ray.sweep.run import _searcher

    from alphadpo_ray.sweep.run import tune_domains

    searcher = _searcher(SweepConfig(), [])
    searcher.set_search_properties(None, None, tune_domains({"alpha": {"type": "uniform", "low": 0.0, "high": 1.0}}, True))
    for trial_id in ("ok", "errored", "nan"):
        assert searcher.suggest(trial_id) is not None
    searcher.on_trial_complete("ok", {"eval/accuracy": 0.9, "eval/kl": 0.1})
    searcher.on_trial_complete("errored", {"eval/accuracy": 0.95, "eval/kl": 0.01}, error=True)
    searcher.on_trial_complete("nan", {"eval/accuracy": math.nan, "eval/kl": 0.2})
    states = [t.state for t in searcher._ot_study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.FAIL]
    assert searcher._ot_study.trials[0].values == [0.9, 0.1]


def test_journal_reconciles_a_stale_snapshot_and_searcher():
    """After a kill, Tune's saved state is older than the trial journal: trials the snapshot shows running
    but the journal ended are ended, trials it lacks are added, and the restored Optuna searcher is made to
    agree — ended trials told, unknown ones registered, a suggestion no trial carries failed."""
    import json

    import optuna

    from alphadpo_ray.sweep.journal import merge_trials, reconcile_searcher
    from alphadpo_ray.sweep.run import _searcher, tune_domains
    from alphadpo_ray.config.sweep_settings import SweepConfig

    def data(trial_id, status):
        return [json.dumps({"trial_id": trial_id, "status": status}), "{}"]

    def record(trial_id, status, t):
        return {"trial_id": trial_id, "status": status, "time": t, "trial_data": data(trial_id, status)}

    snapshot = [data("a", "TERMINATED"), data("b", "RUNNING")]
    journal = {"a": record("a", "TERMINATED", 1), "b": record("b", "TERMINATED", 3),
               "d": record("d", "RUNNING", 4), "e": record("e", "TERMINATED", 2)}
    merged, ended = merge_trials(snapshot, journal, add=set(journal))
    assert [(json.loads(s)["trial_id"], json.loads(s)["status"]) for s, _ in merged] == \
        [("a", "TERMINATED"), ("b", "TERMINATED"), ("e", "TERMINATED"), ("d", "RUNNING")]
    assert [r["trial_id"] for r in ended] == ["b", "e"]
    assert len(merge_trials(snapshot, journal, add=set())[0]) == 2  # nothing to add: nothing added

    searcher = _searcher(SweepConfig(), [])
    searcher.set_search_properties(None, None, tune_domains({"alpha": {"type": "uniform", "low": 0.0, "high": 1.0}}, True))
    for trial_id in ("a", "b", "c"):
        searcher.suggest(trial_id)
    searcher.on_trial_complete("a", {"eval/accuracy": 0.6, "eval/kl": 0.2})
    good = {"eval/accuracy": 0.9, "eval/kl": 0.1}
    reconcile_searcher(searcher, {"a": ("TERMINATED", {}, {}), "b": ("TERMINATED", {}, good),
                                  "d": ("RUNNING", {"alpha": 0.25}, {}), "e": ("TERMINATED", {"alpha": 0.75}, good)})
    states = {t: searcher._ot_study.trials[searcher._ot_trials[t].number].state for t in "abcde"}
    state = optuna.trial.TrialState
    assert states == {"a": state.COMPLETE, "b": state.COMPLETE, "c": state.FAIL, "d": state.RUNNING,
                      "e": state.COMPLETE}
    assert searcher._ot_study.trials[searcher._ot_trials["e"].number].params == {"alpha": 0.75}
    searcher.on_trial_complete("d", good)  # the resumed trial ends: Optuna hears of it
    assert searcher._ot_study.trials[searcher._ot_trials["d"].number].state == state.COMPLETE


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random"])
def test_each_sampler_survives_the_tuners_pickle_and_the_journal(sampler):
    """A sweep's searcher is pickled with the Tuner (Ray's cloudpickle) and by the trial journal: with every
    `sweep.sampler` both round trips work and the loaded searcher goes on suggesting (a ``sampler: nsga2``
    sweep failed at Tuner creation: Optuna's NSGA-II sampler holds a lock)."""
    import ray.cloudpickle

    from alphadpo_ray import compat
    from alphadpo_ray.config.sweep_settings import SweepConfig
    from alphadpo_ray.sweep.run import _searcher, tune_domains

    space = tune_domains({"alpha": {"type": "uniform", "low": 0.0, "high": 1.0}}, True)
    searcher = _searcher(SweepConfig(sampler=sampler, nsga2_population=2), [])
    searcher.set_search_properties(None, None, space)
    for i in range(3):
        searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", {"eval/accuracy": 0.5 + i / 10, "eval/kl": 0.1 * i})
    loaded = ray.cloudpickle.loads(ray.cloudpickle.dumps(searcher))
    restored = _searcher(SweepConfig(sampler=sampler, nsga2_population=2), [])
    restored.set_search_properties(None, None, space)
    compat.load_optuna_searcher(restored, compat.dump_optuna_searcher(searcher))
    for copy in (loaded, restored):
        suggestion = copy.suggest("t3")
        assert 0.0 <= suggestion["alpha"] <= 1.0


def _run_cli(args, env, log):
    return subprocess.Popen([str(Path(sys.executable).with_name("alphadpo-ray")), *args], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_grid_sweep_killed_and_resumed_runs_nothing_twice(builtin_task, tmp_path):
    """`kill -9` of the sweep driver mid-way, then `--resume`: finished trials are not re-run, the rest
    finish, and MLflow holds exactly one child run per trial, all finished, each step once. The driver dies at
    the worst moment for the third trial: it has saved its step-2 checkpoint, and the driver (stopped) never took
    that report — so Tune never registered it; the resumed trial starts from it, trains steps 1–2 not again (was:
    from step 0) and reports step 2 again, which MLflow would otherwise never get (test_chaos saw a trial's
    steps [1, 3]). A grid sweep: its trials come from Tune's saved variant generator, advanced past those the
    journal holds (an Optuna sweep, its searcher restored from the journal: test_object_storage's sweep resumed
    from the bucket)."""
    import json

    from mlflow.tracking import MlflowClient

    from alphadpo_ray.training.recipe import verify_checkpoint
    from held import held_plugin

    name = "resume-grid"  # the Ray storage is shared by the tests of a session
    plugin_dir = tmp_path / "plugin"
    plugin = held_plugin(plugin_dir, "held-grid", step=2, action="wait", trial=3)  # the 3rd trial's first save
    sweep = {"name": name, "num_samples": 1, "max_concurrent_trials": 1, "search": "grid", "points_to_evaluate": False,
             "search_space": {"beta": {"type": "grid", "values": [1.5, 2.0, 2.5, 3.0]}}}
    config = sweep_config(tmp_path, sweep, plugins=[str(plugin)], method={"name": "held-grid", "beta": 2.0},
                          training={"max_steps": 4, "eval_steps": 2, "save_steps": 2, "logging_steps": 1})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    storage = Path(config.storage_path()) / name

    def trial_runs() -> dict:
        """Trial id → its MLflow child run. Nothing before the driver has made its store: a client opening a
        missing SQLite file creates and migrates it, racing the driver."""
        if not Path(config.tracking.tracking_uri.removeprefix("sqlite:///")).exists():
            return {}
        client = MlflowClient(config.tracking.tracking_uri)
        experiment = client.get_experiment_by_name(config.tracking.experiment_name)
        if experiment is None:
            return {}
        runs = client.search_runs([experiment.experiment_id], "tags.`alphadpo.kind` = 'trial'")
        return {r.data.tags["alphadpo.trial_id"]: r for r in runs}

    def loss_steps(run) -> list[int]:
        return sorted(m.step for m in MlflowClient(config.tracking.tracking_uri).get_metric_history(
            run.info.run_id, "train/loss"))

    def wait_until(what: str, ready, process, log: Path, timeout: float = 600):
        deadline = time.time() + timeout
        while time.time() < deadline and process.poll() is None:
            value = ready()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"{what}: not within {timeout} s (exit {process.poll()}):\n{log.read_text()[-3000:]}")

    with open(tmp_path / "first.log", "wb") as log:
        # its own local Ray (started by the driver, fate-shared with it: killing the driver's process
        # group takes that Ray down too, like a machine losing the driver)
        first = _run_cli(["sweep", str(path), "--address", "local"], env, log)
        try:
            wait_until("the third trial at step 2", lambda: (plugin_dir / "waiting").exists(), first,
                       tmp_path / "first.log")
            third = (plugin_dir / "trials.log").read_text().split()[2]
            wait_until("its step 1 in MLflow", lambda: third in trial_runs() and loss_steps(trial_runs()[third])
                       == [1], first, tmp_path / "first.log")
            os.kill(first.pid, signal.SIGSTOP)  # the driver takes no more reports
            (plugin_dir / "release").touch()

            def step_2_checkpoint():  # complete (its manifest verifies: every file whole) before it is read
                for folder in sorted((storage / third).glob("checkpoint_*")):
                    if verify_checkpoint(folder) is None and \
                            json.loads((folder / "trainer_state.json").read_text()).get("step") == 2:
                        return folder
                return None

            saved = wait_until("the third trial's step-2 checkpoint", step_2_checkpoint, first, tmp_path / "first.log")
            calls_before = (plugin_dir / "calls.log").read_text()
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    finished_before = {t for t, r in trial_runs().items() if r.info.status == "FINISHED"}
    assert len(finished_before) == 2 and third not in finished_before

    with open(tmp_path / "second.log", "wb") as log:
        second = _run_cli(["sweep", str(path), "--resume", "--address", "local"], env, log)
        assert second.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-3000:]
    console = (tmp_path / "second.log").read_text()
    assert "Failed to fetch metrics" not in console  # a just-started trial: no results yet
    assert f"[resume] {saved.name} of this trial was saved but never registered" in console, console[-3000:]
    assert "[resume] continuing from step 2 of 4" in console, console[-3000:]
    assert "Restored on" not in console  # Tune's own restore line: the [resume] line says it
    trained = [line for line in (plugin_dir / "calls.log").read_text()[len(calls_before):].splitlines()
               if line.startswith(f"{third} ")]
    assert len(trained) == 2, f"the third trial trained {trained} after the resume (steps 3 and 4 only)"

    results = json.loads((Path(config.run_dir).parent / name / "results.json").read_text())
    assert results["summary"]["trials"] == 4 and results["summary"]["failed"] == 0
    for trial in finished_before | {third}:  # not re-run: exactly one result per reported step
        lines = [json.loads(x) for x in (storage / trial / "result.json").read_text().splitlines() if x.strip()]
        steps = [x["step"] for x in lines if "step" in x]
        assert len(steps) == len(set(steps)) and max(steps) == 4, (trial, steps)
    assert not list(storage.glob("*/events.out.tfevents*"))  # no TensorBoard files (`NoTensorBoardLogs`)
    children = _children(config.tracking.tracking_uri, results["mlflow_parent_run_id"])
    assert len(children) == 4
    assert len({c.data.tags["alphadpo.trial_id"] for c in children}) == 4
    assert all(c.info.status == "FINISHED" for c in children)
    for child in children:  # one metric point per reported step, the trial cut off at its end included
        assert loss_steps(child) == [1, 2, 3, 4], (child.data.tags["alphadpo.trial_id"], loss_steps(child))


def test_restore_drops_only_the_no_results_yet_warning():
    """On `--resume`, Tune warns "Failed to fetch metrics" for a trial the killed driver had just started (no
    result.json yet): dropped. Any other failure to read a trial's results is still shown."""
    import logging

    from alphadpo_ray.sweep.run import _no_missing_results_warning

    def shown(message: str) -> bool:
        return _no_missing_results_warning(logging.LogRecord("t", logging.WARNING, "", 0, message, None, None))

    missing = "- run_trial_c7301_00002: FileNotFoundError('… both result.json and progress.csv were not found at /x')"
    assert not shown(f"Failed to fetch metrics for 1 trial(s):\n{missing}")
    assert shown(f"Failed to fetch metrics for 2 trial(s):\n{missing}\n- run_trial_c7301_00003: ValueError('bad json')")
    assert shown("Some other warning")


def test_a_retried_trials_reason_says_its_process_died_or_its_node_was_lost():
    """The [failure] line's reason for Ray's paragraphs about a trial actor that is gone (seen in test_chaos: a
    node SIGKILLed under a trial gave ActorUnavailableError with an RPC code; a drained one an ActorDiedError
    whose last line is its actor id); other errors keep their telling line, cut at 160 characters."""
    from alphadpo_ray.sweep.run import _failure_reason

    unavailable = ("Traceback (most recent call last):\nray.exceptions.ActorUnavailableError: The actor 9d0abf147b41 is "
                   "unavailable: The actor is temporarily unavailable: RpcError: RPC error: Socket closed rpc_code: 14. "
                   "The task may or may not have been executed on the actor.")
    assert _failure_reason(unavailable) == "its node was lost or cannot be reached"
    node = "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.\n\tclass_name: " \
           "ImplicitFunc\n\tactor_id: 79b08c2f\nThe actor died because its node has died. Node Id: 4f2a"
    assert _failure_reason(node) == "its node was lost or cannot be reached"
    drained = "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.\n" \
              "\tclass_name: ImplicitFunc\n\tactor_id: 79b08c2f45f74af39bdf1bc002000000"
    assert _failure_reason(drained) == "its process or node was lost"
    killed = "The actor died unexpectedly before finishing this task.\n\tactor_id: 1\nThe actor is dead because its " \
             "worker process has died. Worker exit type: SYSTEM_ERROR"
    assert _failure_reason(killed) == "its process died"
    assert _failure_reason("Traceback:\n  ...\nValueError: bad beta") == "ValueError: bad beta"
    assert _failure_reason("x" * 300) == "x" * 160 + "…"
    oom = "The actor died unexpectedly before finishing this task.\nRuntimeError: CUDA out of memory. Tried 2 GiB"
    assert _failure_reason(oom) == "out of memory. Tried 2 GiB"


def test_direct_path_trial_killed_resumes_from_its_checkpoint(ray_session, builtin_task, tmp_path, capfd):
    """The single-worker direct path checkpoints and resumes like the multi-worker path: a trial whose
    process is SIGKILLed after its first checkpoint restarts from it and ends on the same losses. The
    console says so in one ``[failure]`` line (was: Tune's "Trial task failed" with a full traceback)."""
    import threading

    from alphadpo_ray.sweep.run import run_sweep

    grid = {"search": "grid", "num_samples": 1, "points_to_evaluate": False,
            "search_space": {"alpha": {"type": "grid", "values": [0.1]}, "beta": {"type": "grid", "values": [2.5]},
                             "gamma_beta_ratio": {"type": "grid", "values": [0.3]},
                             "learning_rate": {"type": "grid", "values": [2e-4]}}}
    training = {"max_steps": 24, "save_steps": 4, "eval_steps": 8, "logging_steps": 2}
    clean = run_sweep(sweep_config(tmp_path / "a", {**grid, "name": "clean"}, training=training), log=lambda *_: None)

    config = sweep_config(tmp_path / "b", {**grid, "name": "killed", "max_failures": 2}, training=training)
    storage, killed = Path(config.storage_path()) / "killed", threading.Event()

    from test_training import _kill_after_first_checkpoint

    killer = threading.Thread(target=_kill_after_first_checkpoint, args=(storage, "", "ImplicitFunc", killed),
                              daemon=True)
    capfd.readouterr()
    killer.start()
    resumed = run_sweep(config, log=lambda *_: None)
    killer.join(timeout=5)
    assert killed.is_set(), "the trial was never killed"
    # This test's trial runs in its own process, no Ray Train actor: lines forwarded from Ray Train workers or
    # controllers belong to an earlier test of this Ray session (Ray's log monitor forwards them seconds late;
    # seen: a disk-full test's worker traceback arriving here).
    console = "".join(line for line in "".join(capfd.readouterr()).splitlines(keepends=True)
                      if not re.search(r"\((RayTrainWorker|TrainController) pid=\d+", line))
    failures = [line for line in console.splitlines() if line.startswith("[failure]")]
    assert len(failures) == 1, console[-6000:]
    # killed once its first checkpoint is on disk: Tune may not have registered it yet, and then says so
    assert re.fullmatch(r"\[failure\] trial \S+ failed at step \d+ \(its process died\); (retrying from its "
                        r"checkpoint of step \d+|no checkpoint yet: retrying from step 0 \(\d+ steps? lost\)) "
                        r"\(failure 1 of sweep\.max_failures 2; traceback in \S+error\.txt\)", failures[0]), failures[0]
    assert "Trial task failed" not in console and "Traceback" not in console, console[-6000:]
    assert resumed.rows[0]["status"] == "finished"
    for key in ("accuracy", "kl"):
        assert resumed.rows[0][key] == pytest.approx(clean.rows[0][key], rel=1e-4, abs=1e-6)


def test_compare_two_methods_produces_table_and_plots(ray_session, builtin_task, tmp_path):
    from alphadpo_ray.sweep.run import run_compare

    config = sweep_config(tmp_path, {"name": "cmp", "methods": ["alpha-dpo", "simpo"], "num_samples": 2, "seeds": 0})
    summary = run_compare(config, log=lambda *_: None)
    directory = Path(summary["files"]["methods"]).parent
    for name in ("methods.json", "trials.csv", "pareto.png", "alpha_sensitivity.png", "results.json"):
        assert (directory / name).exists(), name
    methods = {s["method"]: s for s in summary["methods"]}
    assert set(methods) == {"alpha-dpo", "simpo"}
    assert {s["trials"] for s in methods.values()} == {2}  # the same budget for each method
    assert {s["steps"] for s in methods.values()} == {12}
    assert all(s["best_accuracy_logratio"] is not None for s in methods.values())

    from mlflow.tracking import MlflowClient

    uri = config.tracking.tracking_uri
    compare = MlflowClient(uri).get_run(summary["mlflow_compare_run_id"])
    assert compare.data.tags["alphadpo.kind"] == "compare" and compare.info.status == "FINISHED"
    method_runs = _children(uri, compare.info.run_id)
    assert sorted(r.data.tags["method"] for r in method_runs) == ["alpha-dpo", "simpo"]
    for run in method_runs:
        assert len(_children(uri, run.info.run_id)) == 2


def test_asha_stops_weak_trials_early(ray_session, builtin_task, tmp_path):
    """Early stopping acts on the periodic held-out reports: with ASHA a trial that reports a clearly worse
    value at a rung ends before max_steps, recorded as "stopped early" with the step it stopped at (in the
    rows, in MLflow and in the report), kept off the Pareto set unless `pareto_includes_stopped`, and
    counted in the method summary.

    Deterministic by construction, whatever the machine's speed or rounding: one trial at a time in grid
    order, the first with a learning rate too small to move the policy (exact KL ≈ 0 at every rung, so it
    runs to max_steps: ASHA never stops the first result at a rung), the others with learning rates that
    move it by orders of magnitude more (KL far above the first trial's at the first rung → stopped there)."""
    import json

    from alphadpo_ray.sweep import results as res
    from alphadpo_ray.sweep.run import run_sweep

    config = sweep_config(
        tmp_path,
        {"name": "asha4", "search": "grid", "max_concurrent_trials": 1, "points_to_evaluate": False,
         "search_space": {"learning_rate": {"type": "grid", "values": [1e-9, 5e-3, 1e-2, 2e-2]}},
         "scheduler": {"type": "asha", "metric": "eval/kl", "mode": "min", "grace_period": 3,
                       "reduction_factor": 2}},
        training={"max_steps": 12, "eval_steps": 3, "logging_steps": 3, "save_steps": 3},
    )
    result = run_sweep(config, log=lambda *_: None)
    by_lr = {r["learning_rate"]: r for r in result.rows}
    assert by_lr[1e-9]["steps"] == 12 and by_lr[1e-9]["status"] == "finished", result.rows
    assert all(by_lr[lr]["steps"] == 3 for lr in (5e-3, 1e-2, 2e-2)), result.rows
    # a trial the scheduler stopped is "stopped early" with its step, never "finished", and off the front
    stopped = [r for r in result.rows if r["status"] == "stopped early"]
    assert stopped and {r["status"] for r in result.rows} <= {"finished", "stopped early"}
    for r in result.rows:
        assert r["total_steps"] == 12 and (r["steps"] < 12) == (r["status"] == "stopped early"), r
    assert not any(r["pareto"] for r in stopped)
    assert all(r["status"] == "finished" for r in res.pareto_front(result.rows, "accuracy"))
    summary = json.loads((result.directory / "results.json").read_text())
    assert summary["summary"]["stopped"] == len(stopped) and summary["summary"]["trials"] == 4
    assert {r["trial_id"] for r in summary["pareto"]} == {r["trial_id"] for r in result.rows if r["pareto"]}
    # with sweep.pareto_includes_stopped the stopped trials compete (the front of both statuses)
    both = res.mark_pareto(result.rows, "accuracy", include_stopped=True)
    assert {r["trial_id"] for r in both if r["pareto"]} == {
        r["trial_id"] for r in res.pareto_front(result.rows, "accuracy", include_stopped=True)}

    # MLflow tags the stopped child runs, so the report rebuilds the same statuses and front from it alone
    from mlflow.tracking import MlflowClient

    from alphadpo_ray.sweep.report import report

    client = MlflowClient(config.tracking.tracking_uri)
    for r in stopped:
        child = _children(config.tracking.tracking_uri, result.parent_run_id)
        tags = next(c.data.tags for c in child if c.data.tags["alphadpo.trial_id"] == r["trial_id"])
        assert (tags["alphadpo.status"], int(tags["alphadpo.steps"])) == ("stopped early", r["steps"])
        assert client.get_run(next(c.info.run_id for c in child
                                   if c.data.tags["alphadpo.trial_id"] == r["trial_id"])).info.status == "FINISHED"
    rebuilt = report("asha4", tracking_uri=config.tracking.tracking_uri, output_dir=str(tmp_path / "report"))
    key = lambda r: r["trial_id"]  # noqa: E731
    for a, b in zip(sorted(result.rows, key=key), sorted(rebuilt["rows"], key=key)):
        assert (a["trial_id"], a["status"], a["steps"], a["pareto"]) == (b["trial_id"], b["status"], b["steps"], b["pareto"])
    assert rebuilt["methods"][0]["stopped"] == len(stopped)


def _fake_grid(trials: list[tuple]) -> list:
    """Stand-ins for Tune `Result`s: (trial_id, step, total_steps, accuracy, kl, error)."""
    from types import SimpleNamespace

    grid = []
    for trial_id, step, total, accuracy, kl, error in trials:
        metrics = {"trial_id": trial_id, "step": step, "eval/accuracy": accuracy, "eval/kl": kl, "time_total_s": 1.0}
        if total is not None:
            metrics["total_steps"] = total
        grid.append(SimpleNamespace(metrics=metrics, error=error, config={"alpha": 0.1}, path=f"/x/{trial_id}"))
    return grid


TRIALS = [  # (trial_id, step, total_steps, accuracy, kl, error)
    ("full_a", 12, 12, 0.80, 0.50, None),
    ("full_b", 12, 12, 0.70, 0.30, None),
    ("stop_lowkl", 3, 12, 0.65, 0.02, None),  # would be on the front only because it trained less
    ("stop_weak", 6, 12, 0.50, 0.60, None),
    ("broken", 2, 12, None, None, RuntimeError("x\nnon-finite loss at step 2")),
    ("legacy", 12, None, 0.60, 0.40, None),  # no total_steps reported: nothing says it stopped
]


def test_stopped_trials_rows_and_pareto_without_ray(tmp_path):
    """Row status, Pareto membership (with and without the flag), summaries and tables on fake results."""
    import csv

    from alphadpo_ray.sweep import results as res

    rows = res.rows_from_result_grid(_fake_grid(TRIALS), "alpha-dpo", workers=1)
    by_id = {r["trial_id"]: r for r in rows}
    assert {k: (r["status"], r["steps"]) for k, r in by_id.items()} == {
        "full_a": ("finished", 12), "full_b": ("finished", 12), "stop_lowkl": ("stopped early", 3),
        "stop_weak": ("stopped early", 6), "broken": ("failed", 2), "legacy": ("finished", 12)}
    assert by_id["broken"]["error"] == "non-finite loss at step 2"
    assert res.status_text(by_id["stop_lowkl"]) == "stopped early @ step 3/12"

    ids = lambda front: [r["trial_id"] for r in front]  # noqa: E731
    assert ids(res.pareto_front(rows, "accuracy")) == ["full_b", "full_a"]
    assert ids(res.pareto_front(rows, "accuracy", include_stopped=True)) == ["stop_lowkl", "full_b", "full_a"]
    marked = res.mark_pareto(rows, "accuracy")
    assert [r["trial_id"] for r in marked if r["pareto"]] == ["full_a", "full_b"]
    flagged = res.mark_pareto(rows, "accuracy", include_stopped=True)
    assert ids(res.pareto_front(flagged, "accuracy")) == ["stop_lowkl", "full_b", "full_a"]  # marks are kept

    summary = res.method_summary(marked, "accuracy")
    assert (summary["trials"], summary["stopped"], summary["failed"], summary["pareto_size"]) == (6, 2, 1, 2)
    assert summary["best_accuracy"] == 0.80 and summary["kl_at_best"] == 0.50
    assert summary["steps"] == 12 + 12 + 3 + 6 + 2 + 12  # stopped trials' compute counts too
    assert res.method_summary(flagged, "accuracy")["pareto_size"] == 3

    files = res.write_tables(marked, tmp_path)
    table = {r["trial_id"]: r for r in csv.DictReader(files["csv"].open())}
    assert (table["stop_lowkl"]["status"], table["stop_lowkl"]["steps"], table["stop_lowkl"]["pareto"]) == (
        "stopped early", "3", "False")
    from rich.console import Console

    console = Console(record=True, width=200)
    marked = [{**r, "error": "RuntimeError: [/__w/pytorch/aten/src] bad [/x]"} if r["trial_id"] == "broken" else r
              for r in marked]  # an error text that rich would read as (invalid) markup
    res.print_trials(marked, "accuracy", "t", console=console)
    res.print_methods([summary], "accuracy", "m", console=console)
    text = console.export_text()
    assert "stopped early @ step 3/12" in text and "stopped" in text
    assert "trial broken failed: RuntimeError: [/__w/pytorch/aten/src] bad [/x]" in text
    from alphadpo_ray.sweep import plots

    assert plots.plot_pareto({"alpha-dpo": marked}, "accuracy", tmp_path / "pareto.png").exists()


def test_stopped_trials_tagged_in_mlflow_and_rebuilt_by_report(tmp_path, monkeypatch):
    """The MLflow callback tags a trial that completed before total_steps; `report` rebuilds its status
    and step from MLflow alone and honours the sweep's logged `pareto_includes_stopped`. Searches page
    (two runs a page here): every trial comes back, not the first page."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from alphadpo_ray.services import tracking

    monkeypatch.setattr(tracking, "SEARCH_PAGE", 2)

    from alphadpo_ray.sweep.report import report
    from alphadpo_ray.sweep.nested_runs import KIND_TAG, METHOD_TAG, SWEEP_TAG, SweepMLflowCallback, send_sweep_pending

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("stopped")
    for name, include in (("sw-default", False), ("sw-flag", True)):
        parent = client.create_run(experiment, run_name=name, tags={KIND_TAG: "sweep", SWEEP_TAG: name,
                                                                    METHOD_TAG: "alpha-dpo"}).info.run_id
        client.log_dict(parent, {"sweep": {"pareto_includes_stopped": include}}, "config.json")
        callback = SweepMLflowCallback(uri, experiment, parent, name, "alpha-dpo")
        for trial_id, step, total, accuracy, kl, error in TRIALS:
            trial = SimpleNamespace(trial_id=trial_id, config={"alpha": 0.1}, error_file=None,
                                    get_error=lambda error=error: error)
            callback.on_trial_start(0, [], trial)
            result = {"step": step, "eval/accuracy": accuracy, "eval/kl": kl, "time_total_s": 1.0,
                      **({"total_steps": total} if total is not None else {})}
            callback.on_trial_result(0, [], trial, result)
            trial.last_result = result
            (callback.on_trial_error if error else callback.on_trial_complete)(0, [], trial)
        assert send_sweep_pending(uri, parent)  # the sweep's end (`run_method_sweep`): its trials' pending file sent
        client.set_terminated(parent, "FINISHED")

        rebuilt = report(name, tracking_uri=uri, output_dir=str(tmp_path / name))
        by_id = {r["trial_id"]: r for r in rebuilt["rows"]}
        assert {k: (r["status"], r["steps"]) for k, r in by_id.items()} == {
            "full_a": ("finished", 12), "full_b": ("finished", 12), "stop_lowkl": ("stopped early", 3),
            "stop_weak": ("stopped early", 6), "broken": ("failed", None), "legacy": ("finished", 12)}
        assert by_id["stop_lowkl"]["total_steps"] == 12
        assert by_id["stop_weak"]["curve"] == {"step": [6], "accuracy": [by_id["stop_weak"]["accuracy"]],
                                               "kl": [by_id["stop_weak"]["kl"]]}  # the metrics it logged
        assert by_id["stop_lowkl"]["pareto"] is include and by_id["full_b"]["pareto"] and by_id["full_a"]["pareto"]
        assert rebuilt["methods"][0]["stopped"] == 2
        assert "stopped early" in (tmp_path / name / "trials.csv").read_text()
    whole = report("stopped", tracking_uri=uri, output_dir=str(tmp_path / "experiment"))  # by experiment name
    assert sorted(r["trial_id"] for r in whole["rows"]) == sorted(2 * [t[0] for t in TRIALS])  # both sweeps' trials


def test_sweep_callback_finds_earlier_runs_with_one_search_and_logs_each_step_once(tmp_path):
    """A driver that died mid-sweep left child runs; the resumed driver's callback (a new instance, its
    saved state lost) continues them — found by one search for the whole sweep, not one per trial (a tag
    search scans the store) — logs only the steps they lack, and creates runs for new trials without
    reading anything back."""
    import pickle
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from alphadpo_ray.sweep.nested_runs import KIND_TAG, SWEEP_TAG, SweepMLflowCallback, send_sweep_pending

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("resumed")
    parent = client.create_run(experiment, run_name="sw", tags={KIND_TAG: "sweep", SWEEP_TAG: "sw"}).info.run_id
    trials = {t: SimpleNamespace(trial_id=t, config={"alpha": 0.1}) for t in ("t1", "t2", "t3")}

    def report(callback, trial_id, step):
        callback.on_trial_result(0, [], trials[trial_id], {"step": step, "train/loss": 1.0 / step})

    first = SweepMLflowCallback(uri, experiment, parent, "sw", "alpha-dpo")
    for trial_id in ("t1", "t2"):
        first.on_trial_start(0, [], trials[trial_id])
        report(first, trial_id, 1)
    report(first, "t1", 2)  # then the driver died

    assert send_sweep_pending(uri, parent)  # the resumed sweep sends what the dead driver left first
    second = pickle.loads(pickle.dumps(SweepMLflowCallback(uri, experiment, parent, "sw", "alpha-dpo")))
    calls = []
    real = second.client.search_runs
    second.client.search_runs = lambda *a, **k: calls.append(a) or real(*a, **k)
    for trial_id in ("t1", "t2", "t3"):
        second.on_trial_start(0, [], trials[trial_id])
        for step in (1, 2, 3):  # replayed from each trial's start (no checkpoint)
            report(second, trial_id, step)
    assert len(calls) == 1  # one search for the sweep's runs, whatever the number of trials
    assert second.runs["t1"] == first.mlflow_run_id("t1") and second.runs["t2"] == first.mlflow_run_id("t2")
    assert send_sweep_pending(uri, parent)  # the sweep's end
    for trial_id in ("t1", "t2", "t3"):
        history = client.get_metric_history(second.mlflow_run_id(trial_id), "train/loss")
        assert sorted(m.step for m in history) == [1, 2, 3], trial_id  # each step once
    assert client.get_run(second.runs["t1"]).info.status == "RUNNING"


def test_report_shows_a_stale_running_trial_as_stale(tmp_path):
    """A trial run MLflow still holds RUNNING whose last activity (start, last metric) is older than
    `report.STALE_AFTER_S` — its driver is gone — is shown as stale, not running; a live one as running."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from alphadpo_ray.sweep import report as report_module
    from alphadpo_ray.sweep.nested_runs import KIND_TAG, METHOD_TAG, PARENT_TAG, SWEEP_TAG, TRIAL_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("stale")
    parent = client.create_run(experiment, run_name="sw-stale", tags={KIND_TAG: "sweep", SWEEP_TAG: "sw-stale",
                                                                        METHOD_TAG: "alpha-dpo"}).info.run_id
    now_ms = int(time.time() * 1000)
    for trial_id, age_s in (("gone", 3 * 3600), ("live", 0)):
        start = now_ms - int(age_s * 1000)
        run = client.create_run(experiment, start_time=start, tags={
            PARENT_TAG: parent, KIND_TAG: "trial", SWEEP_TAG: "sw-stale", TRIAL_TAG: trial_id,
            METHOD_TAG: "alpha-dpo"}).info.run_id
        client.log_batch(run, metrics=[Metric("eval/accuracy", 0.6, start + 1000, 2),
                                       Metric("eval/kl", 0.1, start + 1000, 2)])
    client.set_terminated(parent, "KILLED")
    rows = {r["trial_id"]: r for r in report_module.report("sw-stale", tracking_uri=uri,
                                                             output_dir=str(tmp_path / "out"))["rows"]}
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime((now_ms - 3 * 3600 * 1000 + 1000) / 1000))
    assert rows["gone"]["status"] == f"stale (RUNNING in MLflow, no activity since {when})"
    assert rows["live"]["status"] == "running"


def test_ctrl_c_mid_sweep_says_interrupted_and_resumes_with_the_printed_command(builtin_task, tmp_path):
    """A real SIGINT to a real `sweep` while its first trial is held at step 4 (step 3 reported): Tune stops
    the sweep and `fit` returns, and the command ends as interrupted (before: closed as finished, with Tune's
    `Tuner.restore(...)` advice): exit 130, one `--resume` line and no Tuner.restore, the parent MLflow run
    KILLED, the table marking the unfinished trial "interrupted". The printed command then completes the
    sweep with exactly num_samples trials."""
    import json
    import shlex

    from mlflow.tracking import MlflowClient
    from held import held_plugin
    from services import stop_tree

    name = f"held-{tmp_path.name[-6:]}"
    plugin = held_plugin(tmp_path, name, step=4)  # sleeps at step 4 while the `hold` file exists
    config = sweep_config(tmp_path, {"name": "ctrlc", "num_samples": 2, "max_concurrent_trials": 1,
                                     "search_space": {"beta": {"type": "choice", "values": [1.5, 2.5]}}},
                          plugins=[str(plugin)], method={"name": name, "beta": 2.0})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    client = MlflowClient(config.tracking.tracking_uri)

    def trial_runs():
        experiment = client.get_experiment_by_name(config.tracking.experiment_name)
        return client.search_runs([experiment.experiment_id], "tags.`alphadpo.kind` = 'trial'") if experiment else []

    command = [sys.executable, "-m", "alphadpo_ray", "sweep", str(path), "--address", "local"]
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            try:
                if (tmp_path / "held").exists() and any(r.data.metrics for r in trial_runs()):
                    break
            except Exception:  # noqa: BLE001 - the store or experiment may not exist yet
                pass
            time.sleep(0.2)
        assert proc.poll() is None and (tmp_path / "held").exists(), log.read_text()[-3000:]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
    finally:
        stop_tree(proc, signal.SIGKILL)
    text = log.read_text()
    assert proc.returncode == 130, text[-3000:]
    assert "Tuner.restore" not in text, text[-3000:]
    hints = [line for line in text.splitlines() if "to resume:" in line]
    assert hints == [f"interrupted; to resume: {shlex.join([*command, '--resume'])}"], text[-3000:]
    parents = [r for r in client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                                             "tags.`alphadpo.kind` = 'sweep'")]
    assert [p.info.status for p in parents] == ["KILLED"], text[-3000:]
    rows = json.loads((Path(config.run_dir).parent / "ctrlc" / "trials.json").read_text())
    assert "interrupted" in [r["status"] for r in rows] and "finished" not in [r["status"] for r in rows], rows
    assert "interrupted" in text

    again = subprocess.run(shlex.split(hints[0].removeprefix("interrupted; to resume: ")), cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    results = json.loads((Path(config.run_dir).parent / "ctrlc" / "results.json").read_text())
    assert results["summary"]["trials"] == 2 and results["summary"]["failed"] == 0, results["summary"]
    assert client.get_run(parents[0].info.run_id).info.status == "FINISHED"
    assert len(_children(config.tracking.tracking_uri, parents[0].info.run_id)) == 2


def test_the_sweeps_scheduler_chooses_as_tunes_fifo_without_walking_ended_trials():
    """`SkipsEndedTrials` picks the trial Tune's own FIFOScheduler picks (first PENDING, else first PAUSED) at
    every step of a sweep's life — trials added, started, paused, ended out of order — and a new controller (a
    resumed sweep) starts over from the top."""
    import pickle
    import random

    from ray import tune
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import FIFOScheduler

    from alphadpo_ray.sweep.run import FifoScheduler

    tune.register_trainable("fifo_choice", lambda config: None)

    class Controller:  # the one method a scheduler's choice reads
        def __init__(self, trials):
            self.trials = trials

        def get_trials(self):
            return self.trials

    class Wrapper:  # as Tune's `TuneController._wrapped()`: a new wrapper of the same controller at every call
        def __init__(self, controller):
            self.get_trials = controller.get_trials

    rng, ours, tunes = random.Random(0), FifoScheduler(), FIFOScheduler()
    controller = Controller([])
    for step in range(400):
        if rng.random() < 0.3:
            controller.trials.append(Trial("fifo_choice", config={}))
        live = [t for t in controller.trials if t.status not in (Trial.TERMINATED, Trial.ERROR)]
        if live:
            rng.choice(live).set_status(rng.choice([Trial.RUNNING, Trial.PAUSED, Trial.PENDING, Trial.TERMINATED,
                                                    Trial.ERROR]))
        assert ours.choose_trial_to_run(Wrapper(controller)) is tunes.choose_trial_to_run(controller), step
    # the ended prefix is remembered across calls (and wrappers): a trial in it is not looked at again (were one
    # to come back — which Tune never does — only Tune's walk would see it)
    ended = [Trial("fifo_choice", config={}) for _ in range(50)]
    for trial in ended:
        trial.set_status(Trial.TERMINATED)
    waiting = Trial("fifo_choice", config={})
    controller = Controller([*ended, waiting])
    assert ours.choose_trial_to_run(Wrapper(controller)) is waiting
    ended[0].set_status(Trial.PENDING)
    assert ours.choose_trial_to_run(Wrapper(controller)) is waiting
    assert tunes.choose_trial_to_run(controller) is ended[0]
    resumed = Controller([Trial("fifo_choice", config={})])  # another controller's list: walked from the top
    assert ours.choose_trial_to_run(Wrapper(resumed)) is resumed.trials[0]
    assert "_ended_prefix" not in pickle.loads(pickle.dumps(ours)).__dict__  # never pickled with the trials


def test_a_trial_resumes_from_the_newest_intact_checkpoint_tune_never_registered(ray_session, tmp_path):
    """A trial's folder may hold checkpoints Tune never registered (the driver died before taking the report):
    the trial resumes from the newest of them that verifies, passing over a newer save cut short; with none
    intact it starts as Tune says (here: from nothing)."""
    from ray import tune

    from alphadpo_ray.training.recipe import write_manifest

    def report_the_checkpoint_to_resume_from(config):  # defined here: pickled by value for the trial's process
        from alphadpo_ray.training.recipe import TuneSession

        checkpoint = TuneSession().get_checkpoint()
        tune.report({"resumes_from": checkpoint.path.rsplit("/", 1)[-1] if checkpoint else "nothing"})

    experiment = tmp_path / "storage" / "unregistered"
    for trial, intact, cut_short in (("two-saved", ["checkpoint_000000", "checkpoint_000001"], "checkpoint_000002"),
                                     ("none-intact", [], "checkpoint_000000")):
        for name in [*intact, cut_short]:
            folder = experiment / trial / name
            folder.mkdir(parents=True)
            (folder / "trainer_state.json").write_text('{"step": 1}')
            if name in intact:
                write_manifest(folder, 0, 1, 1)
    tuner = tune.Tuner(report_the_checkpoint_to_resume_from,
                       param_space={"trial": tune.grid_search(["two-saved", "none-intact"])},
                       tune_config=tune.TuneConfig(trial_dirname_creator=lambda t: t.config["trial"], reuse_actors=True,
                                                   max_concurrent_trials=1),  # one process imports torch
                       run_config=tune.RunConfig(name="unregistered", storage_path=str(tmp_path / "storage"),
                                                 verbose=0))
    grid = tuner.fit()
    assert {r.config["trial"]: r.metrics["resumes_from"] for r in grid} == {
        "two-saved": "checkpoint_000001", "none-intact": "nothing"}
