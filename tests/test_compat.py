"""The compat seam: one contract test per private internal `alphadpo_ray.compat` reaches (each runs the real
library and fails naming the library and its installed version when the internal changed), and a scan
that keeps private access to Ray, Optuna, DeepSpeed and MLflow out of every other module.

`make upgrade-check` runs this file (and the resume/restore tests) on the newest versions pyproject.toml
allows."""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import json
import logging
import os
import re
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import alphadpo_ray
from alphadpo_ray import compat

PACKAGE = Path(alphadpo_ray.__file__).parent
LIBRARIES = ("ray", "optuna", "deepspeed", "mlflow")


@contextlib.contextmanager
def contract(library: str, what: str):
    """Turn any failure inside into one loud line: the library, its installed version, the version compat
    was checked on, and the internal that changed."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - every way an internal can change
        pytest.fail(f"{library} {version(library)} (alphadpo_ray.compat checked on {compat.CHECKED_ON[library]}): "
                    f"{what} changed: {type(err).__name__}: {err}. Update alphadpo_ray/compat.py.", pytrace=False)


def test_failures_name_the_library_and_its_installed_version():
    with pytest.raises(pytest.fail.Exception, match=rf"optuna {re.escape(version('optuna'))} .*FrozenTrial._trial_id"):
        with contract("optuna", "FrozenTrial._trial_id"):
            raise AttributeError("'FrozenTrial' object has no attribute '_trial_id'")


# ------------------------------------------------------------------------------ Ray Train


def test_train_checkpoint_manager_persists_registers_keeps_and_restores(tmp_path):
    """Checkpoints persisted and registered as Ray Train's controller does: ``num_to_keep`` applied, the
    snapshot written, and a new manager on the same run restores the latest one."""
    with contract("ray", "ray.train.v2._internal.execution (StorageContext, CheckpointManager, _TrainingReport)"):
        storage_path = str(tmp_path / "store")
        storage, manager = compat.train_checkpoint_manager(storage_path, "run", 2)
        for step in range(3):
            local = tmp_path / f"local{step}"
            local.mkdir()
            (local / "step.txt").write_text(str(step))
            checkpoint = compat.persist_train_checkpoint(storage, str(local))
            compat.register_train_checkpoint(manager, checkpoint, {"step": step})
        latest = compat.latest_train_checkpoint(manager)
        assert Path(latest.path, "step.txt").read_text() == "2"
        kept = sorted(p.name for p in (tmp_path / "store" / "run").iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
        assert len(kept) == 2, kept
        snapshot = json.loads((tmp_path / "store" / "run" / compat.TRAIN_SNAPSHOT_FILE).read_text())
        assert compat.train_snapshot_has_checkpoint(snapshot)
        assert not compat.train_snapshot_has_checkpoint({})
        assert sorted(set(compat.train_snapshot_checkpoints(snapshot))) == kept
        assert compat.train_snapshot_latest(snapshot) == kept[-1] == Path(latest.path).name
        assert not [p for p in (tmp_path / "store" / "run").iterdir() if ".tmp-" in p.name]  # moved into place
        _storage, restored = compat.train_checkpoint_manager(storage_path, "run", 2)
        assert compat.latest_train_checkpoint(restored).path == latest.path

        # the snapshot without its latest checkpoint: Ray's manager restores the other as the latest
        (tmp_path / "store" / "run" / compat.TRAIN_SNAPSHOT_FILE).write_text(
            json.dumps(compat.train_snapshot_without(snapshot, {kept[-1]}, kept[0])))
        _storage, restored = compat.train_checkpoint_manager(storage_path, "run", 2)
        assert Path(compat.latest_train_checkpoint(restored).path).name == kept[0]
        name, path, _fs = compat.next_train_checkpoint_path(_storage)
        assert name.startswith("checkpoint_") and path.endswith(name)

        # the snapshot rebuilt from the directories alone (it was unreadable): Ray's manager restores it
        (tmp_path / "store" / "run" / compat.TRAIN_SNAPSHOT_FILE).unlink()
        compat.rebuild_train_snapshot(storage_path, "run", [(n, {"step": i}) for i, n in enumerate(kept)])
        _storage, restored = compat.train_checkpoint_manager(storage_path, "run", 2)
        assert compat.latest_train_checkpoint(restored).path == latest.path
        assert sorted(p.name for p in (tmp_path / "store" / "run").iterdir() if p.is_dir() and p.name.startswith("checkpoint_")) \
            == kept  # nothing deleted


def test_train_report_logger_is_the_one_quieted():
    with contract("ray", "ray.train.v2._internal.execution.context's report logger"):
        from ray.train.v2._internal.execution import context

        assert compat.quiet_train_report_logger(logging.WARNING)
        assert context.logger is logging.getLogger(context.__file__)
        assert context.logger.level == logging.WARNING


# ------------------------------------------------------------------------------ Ray core


def test_worker_output_filter_drops_only_rejected_lines():
    with contract("ray", "ray._private.ray_logging.global_worker_stdstream_dispatcher"):
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        from ray._private import worker

        got, printer = [], worker.print_to_stdstream
        with dispatcher._lock:
            saved, dispatcher.handlers = dispatcher.handlers, []
        try:
            dispatcher.add_handler("ray_print_logs", got.append)
            assert compat.filter_worker_output(lambda line, pid: "benign" not in line and pid == 1)
            assert compat.filter_worker_output(lambda line, pid: False)  # idempotent: the handler is wrapped once
            dispatcher.emit({"pid": 1, "lines": ["kept", "a benign line"]})
            dispatcher.emit({"pid": 1, "lines": ["benign only"]})
            dispatcher.emit({"pid": 2, "lines": ["kept, but from another pid"]})  # the pid reaches `keep`
            assert got == [{"pid": 1, "lines": ["kept"]}]
        finally:
            with dispatcher._lock:
                dispatcher.handlers = saved
            worker.print_to_stdstream = printer


def test_cluster_error_messages_pass_the_same_filter(capsys):
    with contract("ray", "ray._private.worker.print_to_stdstream (the error-message printer)"):
        from ray._private import worker

        saved = worker.print_to_stdstream
        try:  # from Ray's own printer: an earlier run in this process (launch.init_ray) may have wrapped it
            worker.print_to_stdstream = getattr(saved, "_alphadpo_original", saved)
            compat.filter_worker_output(lambda line, pid: not (pid == "raylet" and "marked dead" in line))
            worker.print_to_stdstream({"lines": ["node 127.0.0.9 has been marked dead"], "pid": "raylet",
                                       "is_err": False}, ignore_prefix=False)
            worker.print_to_stdstream({"lines": ["a raylet message kept"], "pid": "raylet", "is_err": False},
                                      ignore_prefix=False)
            out = capsys.readouterr().out
            assert "a raylet message kept" in out and "marked dead" not in out
        finally:
            worker.print_to_stdstream = saved


def test_train_worker_died_or_preempted_reads_a_health_check_failure():
    with contract("ray", "ray.train.v2._internal.exceptions.WorkerHealthCheckFailedError.health_check_failure"):
        from ray.exceptions import ActorDiedError
        from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

        died = ActorDiedError()
        assert compat.train_worker_died(WorkerHealthCheckFailedError("worker gone", failure=died))
        assert not compat.train_worker_died(RuntimeError("Connection closed by peer"))
        assert not compat.train_worker_preempted(WorkerHealthCheckFailedError("worker gone", failure=died))
        died._preempted = True  # as Ray sets it from a node death by preemption
        assert compat.train_worker_preempted(WorkerHealthCheckFailedError("worker gone", failure=died))
        assert not compat.train_worker_preempted(RuntimeError("Connection closed by peer"))


def test_ray_auth_token_setup_logger_exists():
    with contract("ray", f"the logger module {compat.RAY_AUTH_TOKEN_SETUP_LOGGER}"):
        import importlib

        importlib.import_module(compat.RAY_AUTH_TOKEN_SETUP_LOGGER)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_token_auth_reads_the_token_a_process_would_send():
    """In a fresh process (Ray's token loader is process-wide): token mode and the token from
    RAY_AUTH_TOKEN, sent as gRPC metadata; without token mode, none."""
    script = ("import json; from alphadpo_ray import compat; mode, has = compat.ray_token_auth(); "
              "print(json.dumps([mode, has, [list(p) for p in compat.ray_auth_metadata()] if mode else []]))")
    token = "a" * 32
    with contract("ray", "ray._raylet authentication (get_authentication_mode, AuthenticationTokenLoader)"):
        on = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120,
                            env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
        mode, has, metadata = json.loads(on.stdout.strip().splitlines()[-1])
        assert (mode, has) == (True, True)
        assert any(token in value for _key, value in metadata), metadata
        off_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        off = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120,
                             env={**off_env, "RAY_AUTH_MODE": "disabled"})
        assert json.loads(off.stdout.strip().splitlines()[-1]) == [False, False, []]


def test_gcs_stub_reports_an_absent_cluster_as_a_grpc_status():
    import grpc

    with contract("ray", "ray.core.generated gcs_service_pb2(_grpc) NodeInfoGcsService.GetClusterId"):
        with pytest.raises(grpc.RpcError) as caught:
            compat.gcs_get_cluster_id(f"127.0.0.1:{_free_port()}", (), 1.0)
        assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


# ------------------------------------------------------------------------------ Tune + Optuna


def _optuna_search(points=None):
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(space={"x": tune.uniform(0.0, 1.0)}, metric="m", mode="max", seed=0,
                        points_to_evaluate=points)


def test_tune_state_files_match_what_tune_writes(tmp_path):
    """A real save of a concurrency-limited Optuna searcher and of a grid generator writes the files the
    patterns name; the edited states restore into fresh ones with the trial count and live trials set."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchGenerator

    with contract("ray", "Tune's saved search state (file names, SearchGenerator/ConcurrencyLimiter/"
                         "BasicVariantGenerator state keys)"):
        patterns = compat.tune_state_patterns()
        assert fnmatch.fnmatch("experiment_state-2026-12-06_16-00-00.json", patterns["experiment"])
        limiter = ConcurrencyLimiter(_optuna_search(), max_concurrent=3)
        for trial_id in ("a", "b", "c"):
            assert limiter.suggest(trial_id) is not None
        SearchGenerator(limiter).save_to_dir(str(tmp_path), "s")
        names = os.listdir(tmp_path)
        gen_file = [n for n in names if fnmatch.fnmatch(n, patterns["search_gen"])]
        assert gen_file and [n for n in names if fnmatch.fnmatch(n, patterns["searcher"])], names
        edited = compat.edit_search_generator_state((tmp_path / gen_file[0]).read_bytes(), 5, {"b"})
        (tmp_path / gen_file[0]).write_bytes(edited)
        restored_limiter = ConcurrencyLimiter(_optuna_search(), max_concurrent=3)
        restored = SearchGenerator(restored_limiter)
        restored.restore_from_dir(str(tmp_path))
        assert restored._counter == 5
        assert restored_limiter.live_trials == {"b"} and restored_limiter.num_unfinished_live_trials == 1

        grid_dir = tmp_path / "grid"
        grid_dir.mkdir()
        grid = BasicVariantGenerator(max_concurrent=2)
        grid._live_trials = {"x", "y"}
        grid.save_to_dir(str(grid_dir), "s")
        (variant_file,) = [n for n in os.listdir(grid_dir) if fnmatch.fnmatch(n, patterns["variants"])]
        (grid_dir / variant_file).write_bytes(
            compat.edit_variant_generator_state((grid_dir / variant_file).read_bytes(), {"x", "z"}))
        fresh = BasicVariantGenerator(max_concurrent=2)
        fresh.restore_from_dir(str(grid_dir))
        assert fresh._live_trials == {"x"}


def test_skip_generated_variants_steps_a_saved_grid_past_created_trials(tmp_path):
    from ray import tune
    from ray.tune.experiment import Experiment
    from ray.tune.search import BasicVariantGenerator

    with contract("ray", "BasicVariantGenerator's _iterators / _TrialIterator counter, uuid_prefix, create_trial"):
        tune.register_trainable("compat_grid", lambda config: None)
        grid = BasicVariantGenerator()
        grid.add_configurations([Experiment("g", "compat_grid", config={"a": tune.grid_search([1, 2, 3])})])
        first = grid.next_trial()
        grid.save_to_dir(str(tmp_path), "s")
        (saved,) = [p for p in tmp_path.iterdir() if fnmatch.fnmatch(p.name, compat.tune_state_patterns()["variants"])]
        pickle_state = saved.read_bytes()
        second = grid.next_trial()  # created after the save
        edited, skipped = compat.skip_generated_variants(pickle_state, {second.trial_id, "other"})
        assert skipped == {second.trial_id}
        saved.write_bytes(edited)
        restored = BasicVariantGenerator()
        restored.restore_from_dir(str(tmp_path))
        third = restored.next_trial()
        assert (third.trial_id, third.config) == (f"{first.trial_id[:-5]}00002", {"a": 3})
        assert restored._live_trials >= {second.trial_id} and restored.next_trial() is None  # the grid is done


def test_optuna_search_parts_and_saved_state_round_trip():
    import optuna
    from optuna.trial import TrialState, create_trial

    with contract("ray", "OptunaSearch's _ot_study, _space, _ot_trials, _completed_trials and save format"):
        searcher = _optuna_search(points=[{"x": 0.25}])
        study, space, trials, completed = compat.optuna_search_parts(searcher)
        assert isinstance(study, optuna.Study) and set(space) == {"x"} and trials == {} and completed == set()
        searcher.suggest("a")
        searcher.suggest("b")
        searcher.on_trial_complete("a", {"m": 1.0})
        assert set(trials) == {"a", "b"} and completed == {"a"}
        restored = _optuna_search(points=[{"x": 0.25}])
        compat.load_optuna_searcher(restored, compat.dump_optuna_searcher(searcher))
        r_study, _space, r_trials, r_completed = compat.optuna_search_parts(restored)
        assert set(r_trials) == {"a", "b"} and r_completed == {"a"} and len(r_study.trials) == 2

    with contract("optuna", "FrozenTrial.system_attrs['fixed_params'] / FrozenTrial._trial_id"):
        study = optuna.create_study(direction="maximize")
        study.enqueue_trial({"x": 0.5})
        (waiting,) = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        assert compat.enqueued_params(waiting) == {"x": 0.5}
        distributions = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
        study.add_trial(create_trial(state=TrialState.RUNNING, params={"x": 0.75}, distributions=distributions))
        added = study.get_trials(deepcopy=False)[-1]
        study.tell(compat.optuna_trial_handle(study, added), 2.0)
        assert study.get_trials(deepcopy=False)[-1].state == TrialState.COMPLETE
        assert study.best_trial.params == {"x": 0.75}


def test_nsga2_sampler_pickles_and_goes_on_sampling():
    """Optuna's NSGA-II sampler holds a lock (``BaseGASampler._thread_lock``) that pickle refuses; compat's
    sampler leaves it out. Pickled mid-study (as Tune's Tuner state and the trial journal do, with pickle and
    Ray's cloudpickle), the loaded sampler has its own lock and goes on: its generations continue."""
    import pickle

    import optuna
    import ray.cloudpickle

    def objective(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        return x, 1.0 - x * x

    with contract("optuna", "NSGAIISampler's state (BaseGASampler._thread_lock, the only unpicklable part)"):
        study = optuna.create_study(directions=["maximize", "minimize"],
                                    sampler=compat.nsga2_sampler(seed=0, population_size=4))
        study.optimize(objective, n_trials=10)
        for dumps in (pickle.dumps, ray.cloudpickle.dumps):
            loaded = pickle.loads(dumps(study))
            assert type(loaded.sampler).__qualname__ == "PicklableNSGAIISampler"
            assert loaded.sampler._thread_lock is not study.sampler._thread_lock
            loaded.optimize(objective, n_trials=6)
            assert len(loaded.trials) == 16 and all(0.0 <= t.params["x"] <= 1.0 for t in loaded.trials)


# ------------------------------------------------------------------------------ DeepSpeed


def _zero3_worker(rank: int, tmp: str) -> None:
    os.environ["TORCH_EXTENSIONS_DIR"] = f"{tmp}/torch-extensions"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="1")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=1)
    try:
        out = {"marked": compat.mark_cpu_comm_ops_incompatible()}
        import deepspeed

        out["ops"] = {k: deepspeed.ops.__compatible_ops__.get(k) for k in ("deepspeed_shm_comm", "deepspeed_ccl_comm")}
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config={
            "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
        weight = engine.module[0].weight
        out["partitioned"] = compat.zero3_param_partitioned(weight)
        with deepspeed.zero.GatheredParameters([weight]):
            out["gathered"] = not compat.zero3_param_partitioned(weight)
            out["in_use"] = compat.zero3_param_in_use(weight)
        state = compat.zero3_consolidated_state_dict(engine)
        out["state"] = {k: torch.equal(state[k].float(), expected[k]) for k in expected} if state else None
        torch.save(out, f"{tmp}/out.pt")
    finally:
        dist.destroy_process_group()


def test_deepspeed_zero3_internals(tmp_path):
    """In a gloo worker: the CPU comm ops are marked incompatible where DeepSpeed's comm layer looks; a
    ZeRO-3 parameter reads as partitioned, then gathered and unused inside GatheredParameters; the
    consolidated state dict on rank 0 holds the full weights."""
    import importlib
    import inspect

    with contract("deepspeed", "ops.__compatible_ops__, ds_status/ds_active_sub_modules, "
                               "DeepSpeedEngine._zero3_consolidated_16bit_state_dict"):
        assert "__compatible_ops__" in inspect.getsource(importlib.import_module("deepspeed.comm.torch"))
        mp.spawn(_zero3_worker, args=(str(tmp_path),), nprocs=1, join=True)
        out = torch.load(tmp_path / "out.pt", weights_only=False)
        assert out["marked"] and out["ops"] == {"deepspeed_shm_comm": False, "deepspeed_ccl_comm": False}
        assert (out["partitioned"], out["gathered"], out["in_use"]) == (True, True, False), out
        assert out["state"] and all(out["state"].values()), out["state"]


def test_deepspeed_imports_without_mlflow_and_mlflow_imports_after():
    """In a fresh process (a Ray Train worker's first import): DeepSpeed comes up with its optional MLflow import
    refused (its autotuner says so), MLflow is not loaded by it, and importing MLflow afterwards works."""
    script = """
import sys
from alphadpo_ray import compat
deepspeed = compat.import_deepspeed()
print("mlflow" in sys.modules, deepspeed.autotuning.autotuner.has_mlflow, hasattr(deepspeed, "initialize"))
import mlflow
print(mlflow.MlflowClient.__name__)
"""
    with contract("deepspeed", "autotuning.autotuner's optional `import mlflow`"):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "DS_ACCELERATOR": "cpu"})
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.split() == ["False", "False", "True", "MlflowClient"], out.stdout


# ------------------------------------------------------------------------------ MLflow


def test_default_experiment_dropped_and_recreated_on_open(tmp_path, monkeypatch):
    """Experiment 0 deleted for good (the client's soft delete, then `mlflow gc`); MLflow makes a fresh
    Default experiment when a copy of the store is opened."""
    from mlflow.tracking import MlflowClient

    with contract("mlflow", "deleting experiment 0 for good (delete_experiment + `mlflow gc --experiment-ids 0`)"):
        db = tmp_path / "store.db"
        client = MlflowClient(f"sqlite:///{db}")
        assert [e.experiment_id for e in client.search_experiments()] == ["0"]
        compat.drop_default_experiment(db)
        import sqlite3

        with contextlib.closing(sqlite3.connect(db)) as connection:
            assert connection.execute("SELECT COUNT(*) FROM experiments").fetchone() == (0,)
        import shutil

        shutil.copyfile(db, tmp_path / "copy.db")  # as tracking's template store is used: a copy opened
        monkeypatch.chdir(tmp_path)
        reopened = MlflowClient(f"sqlite:///{tmp_path / 'copy.db'}")
        assert reopened.get_experiment("0").name == "Default"


def test_mlflow_plugins_register_tracking_stores_by_entry_point_group():
    """`config.tracking_uri_problem` accepts a plugin's scheme from the ``mlflow.tracking_store`` entry
    points (public); MLflow's registry must read that group."""
    import inspect

    with contract("mlflow", "the tracking store plugin entry point group"):
        from mlflow.tracking._tracking_service import registry

        assert '"mlflow.tracking_store"' in inspect.getsource(registry)


# ------------------------------------------------------------------------------ one seam

PRIVATE_MODULE = re.compile(rf"^({'|'.join(LIBRARIES)})(\.\w+)*\.(_\w+|core\.generated)(\.|$)")
# Internals of these libraries whose names do not start with one underscore (attributes, or keys of their
# saved state and settings), and single-underscore attributes that are public by convention (namedtuples).
INTERNAL_NAMES = {"ds_status", "ds_active_sub_modules", "ds_tensor", "ds_numel", "__compatible_ops__", "fixed_params",
                  "checkpoint_results", "latest_checkpoint_result", "num_unfinished_live_trials", "cached_results"}
PUBLIC_UNDERSCORE = {"_replace", "_asdict", "_fields", "_make", "_exit"}  # documented: namedtuple's, os._exit
SQL = re.compile(r"^\s*(DELETE|UPDATE|INSERT|ALTER|DROP)\s", re.IGNORECASE)


def _own_names(tree: ast.AST) -> set[str]:
    """Names whose underscore attributes are the project's own: self, cls, and its private functions'
    objects (a function attribute like ``filtered._alphadpo_filtered`` set on its own closure)."""
    names = {"self", "cls"}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
    return names


def private_uses(path: Path) -> list[str]:
    """Private reaches into Ray, Optuna, DeepSpeed or MLflow in one module: imports from their private
    modules (``ray._private``, ``ray.train.v2._internal``, ``ray._raylet``, generated stubs) or of their
    private names; underscore attributes of objects that are not the module's own; their internal
    attributes; private logger/module names as strings; raw SQL."""
    tree = ast.parse(path.read_text())
    own = _own_names(tree)
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if PRIVATE_MODULE.match(a.name)]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            module = node.module or ""
            if module.split(".")[0] in LIBRARIES:
                if PRIVATE_MODULE.match(module):
                    found.append(f"line {node.lineno}: from {module} import ...")
                found += [f"line {node.lineno}: from {module} import {a.name}" for a in node.names
                          if a.name.startswith("_")]
        elif isinstance(node, ast.Attribute):
            name, owner = node.attr, node.value
            single = name.startswith("_") and not name.startswith("__") and name not in PUBLIC_UNDERSCORE
            if name in INTERNAL_NAMES or (single and not (isinstance(owner, ast.Name) and owner.id in own)):
                found.append(f"line {node.lineno}: .{name}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if PRIVATE_MODULE.match(node.value) or SQL.match(node.value) or node.value in INTERNAL_NAMES \
                    or re.fullmatch(r"_(ot|live|completed)_\w+|_zero3\w*", node.value):
                found.append(f"line {node.lineno}: {node.value!r}")
    return found


def test_the_scan_finds_each_kind_of_private_reach(tmp_path):
    source = tmp_path / "bad.py"
    source.write_text("from ray._private.ray_logging import x\nimport ray._raylet\n"
                      "from ray.core.generated import gcs_service_pb2\nfrom ray.train.v2._internal.a import b\n"
                      "from mlflow.tracking import _registry\ns._ot_study\nw.ds_status\n"
                      "getattr(ops, '__compatible_ops__')\nq = 'DELETE FROM experiments'\n"
                      "self._fine\nparts._replace(a=1)\n")
    assert len(private_uses(source)) == 9, private_uses(source)


def test_no_module_but_compat_reaches_library_internals():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "compat.py":
            continue
        uses = private_uses(path)
        if uses:
            offenders[str(path.relative_to(PACKAGE))] = uses
    assert offenders == {}, ("private internals of Ray/Optuna/DeepSpeed/MLflow belong in alphadpo_ray/compat.py "
                             f"(a named function with a contract test in tests/test_compat.py): {offenders}")


def test_tune_trial_checkpoint_step_reads_the_latest_registered_result(tmp_path):
    from ray import tune
    from ray.train import Checkpoint
    from ray.train._internal.session import _TrainingResult
    from ray.tune.experiment import Trial

    with contract("ray", "Trial.latest_checkpoint_result (its checkpoint manager's latest _TrainingResult)"):
        tune.register_trainable("compat_ckpt", lambda config: None)
        trial = Trial("compat_ckpt", config={})
        assert compat.tune_trial_checkpoint_step(trial) == (False, None)
        for step in (4, 8):
            folder = tmp_path / f"ckpt{step}"
            folder.mkdir()
            trial.run_metadata.checkpoint_manager.register_checkpoint(
                _TrainingResult(Checkpoint.from_directory(str(folder)), {"step": step}))
        assert compat.tune_trial_checkpoint_step(trial) == (True, 8)
