"""The one place the package reaches private internals of Ray, Optuna, DeepSpeed and MLflow.

Every other module goes through the named functions here (`tests/test_compat.py` scans the package and
refuses a private access anywhere else). Each function says what it reaches, why no public API does it,
and the versions it was checked on (`CHECKED_ON`); `tests/test_compat.py` has a contract test per
function that runs the real library and names the installed version when the internal has changed,
and `make upgrade-check` runs those tests (plus the resume/restore ones) on the newest versions
pyproject.toml allows. Upgrading a library: run `make upgrade-check`, fix what it names here, then
raise the bound in pyproject.toml.

Layer 0: imports libraries only, never another project module.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import pickle
import uuid
from typing import Any, Callable

# The versions every function below was checked on (the suite passed on these).
CHECKED_ON = {"ray": "2.60.0", "optuna": "5.1.0", "deepspeed": "0.19.8", "mlflow": "3.17.2"}


# --- Ray Train: a one-worker run's checkpoints without a Train controller (in_process.py) ---------------

def train_checkpoint_manager(storage_path: str, run_name: str, num_to_keep: int | None):
    """(storage, manager): Ray Train's `StorageContext` and `CheckpointManager` for `run_name` under
    `storage_path`, the pair its controller uses, so a run trained in the driver's process keeps
    checkpoints (``num_to_keep``, the snapshot file) exactly as a `TorchTrainer` run and either resumes
    the other's. The manager writes its snapshot to a temporary name and then moves it into place: a write
    cut short (a full disk) leaves the previous snapshot — and so every earlier checkpoint — usable, where
    Ray's own write truncates the snapshot first. Private (``ray.train.v2._internal.execution``; the
    manager's ``_write_state_to_storage`` / ``_save_state`` / ``_storage_context``): Ray has no public API
    for checkpoint bookkeeping outside a Train controller. Checked on ray 2.60.0."""
    from ray.train import CheckpointConfig
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.storage import StorageContext

    class AtomicSnapshotCheckpointManager(CheckpointManager):
        def _write_state_to_storage(self):
            fs = self._storage_context.storage_filesystem
            path = self._storage_context.checkpoint_manager_snapshot_path
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with fs.open_output_stream(tmp) as out:
                    out.write(self._save_state().encode("utf-8"))
                fs.move(tmp, path)
            except OSError:
                with contextlib.suppress(OSError):
                    fs.delete_file(tmp)
                raise

    storage = StorageContext(storage_path, run_name)
    return storage, AtomicSnapshotCheckpointManager(CheckpointConfig(num_to_keep=num_to_keep), storage)


def next_train_checkpoint_path(storage) -> tuple[str, str, Any]:
    """(name, path, filesystem) of the checkpoint directory Ray Train would write next for this run
    (``checkpoint_YYYY-…``). Private: `StorageContext`'s ``make_default_checkpoint_dir_name`` /
    ``build_checkpoint_path_from_name`` (ray.train.v2._internal). Checked on ray 2.60.0."""
    name = storage.make_default_checkpoint_dir_name()
    return name, storage.build_checkpoint_path_from_name(name), storage.storage_filesystem


def persist_train_checkpoint(storage, checkpoint_dir: str, name: str | None = None):
    """Copy a local checkpoint directory into run storage under `name` (default: Ray Train's next default
    name, `next_train_checkpoint_path`) and return the `ray.train.Checkpoint` there. Private:
    `StorageContext.persist_current_checkpoint` (ray.train.v2._internal); public `ray.train.report` does
    this only inside a Train worker. Checked on ray 2.60.0."""
    from ray.train import Checkpoint

    name = name or storage.make_default_checkpoint_dir_name()
    return storage.persist_current_checkpoint(Checkpoint.from_directory(checkpoint_dir), name)


def register_train_checkpoint(manager, checkpoint, metrics: dict) -> None:
    """Register a persisted checkpoint with its metrics (`CheckpointManager.register_checkpoint` with a
    `_TrainingReport`: keeps ``num_to_keep``, writes the snapshot). It notifies waiters through an asyncio
    task, so it runs inside a short event loop. Private (ray.train.v2._internal), as
    `train_checkpoint_manager`. Checked on ray 2.60.0."""
    from ray.train.v2._internal.execution.training_report import _TrainingReport

    report = _TrainingReport(checkpoint, dict(metrics), validation=False)

    async def register():
        manager.register_checkpoint(report)
        await asyncio.sleep(0)

    asyncio.run(register())


def rebuild_train_snapshot(storage_path: str, run_name: str, checkpoints: list[tuple[str, dict]]) -> None:
    """Write Ray Train's snapshot (`TRAIN_SNAPSHOT_FILE`) for `run_name` anew, listing `checkpoints`
    (directory name in the run's storage, metrics) in report order, the last one the latest: what a
    `TorchTrainer` resume then loads. Ray's own manager writes it (`train_checkpoint_manager`, nothing
    deleted), so the file has exactly Ray's layout; the run must have no snapshot file when called (the
    manager would load it). Private, as `train_checkpoint_manager`. Checked on ray 2.60.0."""
    from ray.train import Checkpoint

    storage, manager = train_checkpoint_manager(storage_path, run_name, None)
    for name, metrics in checkpoints:
        checkpoint = Checkpoint(storage.build_checkpoint_path_from_name(name), storage.storage_filesystem)
        register_train_checkpoint(manager, checkpoint, metrics)


def latest_train_checkpoint(manager):
    """The manager's latest registered `ray.train.Checkpoint`, or None (its ``latest_checkpoint_result``,
    restored from the snapshot when the manager was made). Private manager, as `train_checkpoint_manager`.
    Checked on ray 2.60.0."""
    result = manager.latest_checkpoint_result
    return result.checkpoint if result else None


# Ray Train's list of registered checkpoints, in {storage_path}/{run_name}: what a resume reads.
TRAIN_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def train_snapshot_has_checkpoint(snapshot: dict) -> bool:
    """Whether Ray Train's checkpoint-manager snapshot (`TRAIN_SNAPSHOT_FILE`, parsed) lists a registered
    checkpoint, i.e. whether `TorchTrainer` would resume the run. Private file layout (its keys
    ``checkpoint_results`` / ``latest_checkpoint_result``): Ray has no public "would this run resume"
    query before the trainer starts. Checked on ray 2.60.0."""
    return bool(snapshot.get("checkpoint_results") or snapshot.get("latest_checkpoint_result"))


def train_snapshot_checkpoints(snapshot: dict) -> list[str]:
    """The checkpoint directory names a Ray Train snapshot (`TRAIN_SNAPSHOT_FILE`, parsed) lists: kept ones and
    the latest. Private file layout, as `train_snapshot_has_checkpoint`. Checked on ray 2.60.0."""
    entries = list(snapshot.get("checkpoint_results") or []) + [snapshot.get("latest_checkpoint_result") or {}]
    return [e["checkpoint_dir_name"] for e in entries if e.get("checkpoint_dir_name")]


def train_snapshot_latest(snapshot: dict) -> str | None:
    """The directory name of the latest checkpoint a Ray Train snapshot lists (the one a resume gets), or
    None. Private file layout, as `train_snapshot_has_checkpoint`. Checked on ray 2.60.0."""
    return (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")


def train_snapshot_without(snapshot: dict, drop: set[str], latest: str) -> dict:
    """A Ray Train snapshot without the checkpoints named in `drop`, `latest` its latest checkpoint (so Ray's
    manager neither resumes from nor counts them towards ``num_to_keep``). Private file layout: the keys
    below. Checked on ray 2.60.0."""

    def kept(entries, *aligned):
        rows = [row for row in zip(entries, *aligned) if row[0]["checkpoint_dir_name"] not in drop]
        return [list(column) for column in zip(*rows)] if rows else [[] for _ in (entries, *aligned)]

    out = dict(snapshot)
    out["checkpoint_results"], out["checkpoint_report_indices"] = kept(
        snapshot["checkpoint_results"], snapshot["checkpoint_report_indices"])
    out["pending_training_results"], out["pending_validation_specs"] = kept(
        snapshot.get("pending_training_results") or [], snapshot.get("pending_validation_specs") or [])
    out["latest_checkpoint_result"] = next(e for e in snapshot["checkpoint_results"]
                                           if e["checkpoint_dir_name"] == latest)
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):
        out[key] = [name for name in snapshot.get(key) or [] if name not in drop]
    return out


def quiet_train_report_logger(level: int = logging.WARNING) -> bool:
    """Turn down the logger Ray Train logs every report with, in full, at INFO. It is named after its
    file (``logging.getLogger(__file__)`` in ray.train.v2._internal.execution.context), outside the
    ``ray.train`` hierarchy, so setting the public logger's level does not reach it. False when the
    module is not there (another Ray). Checked on ray 2.60.0."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # pragma: no cover - another Ray version
        return False
    logging.getLogger(train_context.__file__).setLevel(level)
    return True


# --- Ray core: the driver's console and the cluster-access check (console.py, preflight.py) ---------------

# The logger that announces on every `ray.init` that token authentication is on (Ray 2.60's default).
RAY_AUTH_TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"


def filter_worker_output(keep: Callable[[str, int], bool]) -> bool:
    """Wrap the handler through which Ray prints worker output on the driver (``ray_print_logs`` in
    ``ray._private.ray_logging.global_worker_stdstream_dispatcher``) so only lines `keep(line, pid)`
    accepts are printed (pid: the worker process that wrote the line; its raw output stays in Ray's
    ``logs/worker-*-{pid}.out|err``); the cluster's error messages too (`_filter_error_messages`, pid
    ``"raylet"``). Private: Ray's only public switch is ``ray.init(log_to_driver=False)``, all or nothing.
    Idempotent; call after `ray.init`. False when the dispatcher is not there. Checked on ray 2.60.0."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # pragma: no cover - another Ray version
        return False
    with dispatcher._lock:
        for i, (name, handler) in enumerate(dispatcher.handlers):
            if name != "ray_print_logs" or getattr(handler, "_alphadpo_filtered", False):
                continue

            def filtered(data, _handler=handler):
                lines = [line for line in data.get("lines", []) if keep(line, data.get("pid", 0))]
                if lines:
                    _handler({**data, "lines": lines})

            filtered._alphadpo_filtered = True
            dispatcher.handlers[i] = (name, filtered)
    _filter_error_messages(keep)
    return True


def _filter_error_messages(keep: Callable[[str, int], bool]) -> None:
    """The same for the cluster's error messages (a node marked dead, ...), which Ray's
    ``listen_error_messages`` thread prints through ``ray._private.worker.print_to_stdstream`` with pid
    ``"raylet"``, not through the dispatcher: that module function is wrapped (looked up at each call)."""
    from ray._private import worker

    printer = worker.print_to_stdstream
    if getattr(printer, "_alphadpo_filtered", False):
        return

    def filtered(data, ignore_prefix: bool):
        if data.get("pid") != "raylet":
            return printer(data, ignore_prefix)
        lines = [line for line in data.get("lines", []) if keep(line, "raylet")]
        if lines:
            printer({**data, "lines": lines}, ignore_prefix)

    filtered._alphadpo_filtered = True
    filtered._alphadpo_original = printer  # what a test restores to install another filter
    worker.print_to_stdstream = filtered


def train_worker_died(error: BaseException) -> bool:
    """Whether a Train worker's error (as a `ray.train.UserCallback.after_exception` gets it) is the worker's
    death (its process or node gone: a ``WorkerHealthCheckFailedError`` of ``ray.train.v2._internal``
    wrapping a `ray.exceptions.RayActorError`), not an exception its training function raised. Private as
    `train_worker_preempted`. Checked on ray 2.60.0."""
    from ray.exceptions import RayActorError

    return isinstance(getattr(error, "health_check_failure", error), RayActorError)


def train_worker_preempted(error: BaseException) -> bool:
    """Whether a Train worker's error (as a `ray.train.UserCallback.after_exception` gets it) is its death by
    a node preemption, the test Ray Train's failure policy charges to ``max_preemption_failures``: a
    ``WorkerHealthCheckFailedError`` (``ray.train.v2._internal.exceptions``) whose ``health_check_failure``
    is a `ray.exceptions.RayActorError` with ``preempted`` set. Private: Ray hands callbacks no failure
    classification. Checked on ray 2.60.0."""
    from ray.exceptions import RayActorError

    failure = getattr(error, "health_check_failure", error)
    return isinstance(failure, RayActorError) and bool(failure.preempted)


def ray_token_auth() -> tuple[bool, bool]:
    """(token mode on, a token found) as `ray.init` would decide them (RAY_AUTH_MODE; RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token). Private (``ray._raylet``): Ray has no public API to ask
    about authentication before connecting. Checked on ray 2.60.0."""
    from ray._raylet import AuthenticationMode, AuthenticationTokenLoader, get_authentication_mode

    token_mode = get_authentication_mode() == AuthenticationMode.TOKEN
    return token_mode, token_mode and AuthenticationTokenLoader.instance().has_token()


def ray_auth_metadata() -> tuple:
    """gRPC metadata carrying this process's Ray auth token (raises `ray.exceptions.AuthenticationError`
    when the token cannot be read). Private (``ray._raylet``), as `ray_token_auth`. Checked on ray 2.60.0."""
    from ray._raylet import AuthenticationTokenLoader

    return tuple(AuthenticationTokenLoader.instance().get_token_for_http_header().items())


def gcs_get_cluster_id(address: str, metadata: tuple, timeout: float) -> None:
    """Ask the GCS at ``host:port`` for its cluster id (``NodeInfoGcsService.GetClusterId``) with
    `metadata`; raises `grpc.RpcError` (UNAUTHENTICATED, UNAVAILABLE, DEADLINE_EXCEEDED, …). Ray's
    generated gRPC stubs (``ray.core.generated``): the public job and state APIs talk to the dashboard's
    HTTP port, not to the GCS address a user gives `ray.init`, and `ray.init` itself retries for half a
    minute. Checked on ray 2.60.0."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
            gcs_service_pb2.GetClusterIdRequest(), metadata=metadata, timeout=timeout, wait_for_ready=True)


# --- Tune + Optuna: the saved searcher state a resumed sweep restores (sweep/journal.py) ------------------

def tune_trial_checkpoint_step(trial) -> tuple[bool, Any]:
    """(whether Tune holds a checkpoint for `trial`, the ``step`` its report carried or None): where a
    retried trial resumes from. Reaches `Trial.latest_checkpoint_result` (the trial's checkpoint manager's
    latest result; `Trial.checkpoint` gives the checkpoint but not its metrics). Checked on ray 2.60.0."""
    result = trial.latest_checkpoint_result
    if result is None:
        return False, None
    return True, (result.metrics or {}).get("step")


def tune_state_patterns() -> dict[str, str]:
    """Glob patterns of the files Tune restores an experiment from, at its top: the experiment state,
    the search generator, the base searcher, the grid's variant generator. Their file templates are
    class attributes (``CKPT_FILE_TMPL``) without a public "where is it" API. Checked on ray 2.60.0."""
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.search import BasicVariantGenerator, SearchGenerator, Searcher

    return {"experiment": TuneController.CKPT_FILE_TMPL.format("*"),
            "search_gen": SearchGenerator.CKPT_FILE_TMPL.format("*"),
            "searcher": Searcher.CKPT_FILE_TMPL.format("*"),
            "variants": BasicVariantGenerator.CKPT_FILE_TMPL.format("*")}


def edit_search_generator_state(data: bytes, created: int, live: set[str]) -> bytes:
    """A saved `SearchGenerator` state (cloudpickled dict) with ``counter`` (trials created) set to
    `created` and every `ConcurrencyLimiter`'s live trials set to `live` (its cached results dropped).
    Private state layout (``counter``, ``name:ConcurrencyLimiter`` → ``live_trials``,
    ``num_unfinished_live_trials``, ``cached_results``): Tune has no API to make a restored generator agree
    with a trial list it did not save. Checked on ray 2.60.0."""
    import ray.cloudpickle as cloudpickle

    gen = cloudpickle.loads(data)
    gen["counter"] = created
    for key, limiter in gen.items():
        if key.startswith("name:ConcurrencyLimiter"):
            limiter["live_trials"], limiter["num_unfinished_live_trials"] = set(live), len(live)
            limiter["cached_results"] = {}
    return cloudpickle.dumps(gen)


def edit_variant_generator_state(data: bytes, live: set[str]) -> bytes | None:
    """A saved `BasicVariantGenerator` state (cloudpickled dict) whose ``_live_trials`` keeps only `live`
    (it holds back new grid trials while ``max_concurrent`` are live); None when it has no such key.
    Private attribute of Tune's grid generator. Checked on ray 2.60.0."""
    import ray.cloudpickle as cloudpickle

    variants = cloudpickle.loads(data)
    if not (isinstance(variants, dict) and "_live_trials" in variants):
        return None
    variants["_live_trials"] = set(live) & variants["_live_trials"]
    return cloudpickle.dumps(variants)


def skip_generated_variants(data: bytes, created: set[str]) -> tuple[bytes, set[str]] | None:
    """A saved `BasicVariantGenerator` state (cloudpickled dict) advanced past the grid trials in `created`
    that it had not generated yet when saved: trial ids the journal holds but the saved state lacks. A
    grid's trials come in a fixed order from the pickled remaining variants, trial i named
    ``{uuid_prefix}{i:05d}``, so stepping each ``_TrialIterator`` while its next id is in `created`
    (counting, without building the `Trial`) makes a restore generate none of them again; they join its
    live trials (`edit_variant_generator_state` then keeps the running ones). Returns (the state, the ids
    skipped), or None when the state has no such iterators. Private: ``_iterators`` and
    `_TrialIterator`'s ``counter`` / ``uuid_prefix`` / ``create_trial`` (ray.tune.search.basic_variant);
    Tune has no public "these trials were already created". Checked on ray 2.60.0."""
    import ray.cloudpickle as cloudpickle

    variants = cloudpickle.loads(data)
    if not (isinstance(variants, dict) and isinstance(variants.get("_iterators"), list)):
        return None
    skipped: set[str] = set()
    for iterator in variants["_iterators"]:
        def count_only(_resolved_vars, _spec, it=iterator):
            it.counter += 1

        iterator.create_trial = count_only  # instance attribute: shadows the method for these steps only
        try:
            while (trial_id := f"{iterator.uuid_prefix}{iterator.counter:05d}") in created:
                try:
                    next(iterator)
                except StopIteration:
                    break
                skipped.add(trial_id)
        finally:
            del iterator.create_trial
    variants["_live_trials"] = set(variants.get("_live_trials") or ()) | skipped  # created: live until ended
    return cloudpickle.dumps(variants), skipped


def load_optuna_searcher(searcher, data: bytes) -> None:
    """Load a saved `OptunaSearch` state (``searcher-state-*.pkl``) into `searcher`, as
    `OptunaSearch.restore` does (``__dict__.update`` of the pickled dict), from bytes rather than a local
    path (the state may lie in an object store). Checked on ray 2.60.0."""
    searcher.__dict__.update(pickle.loads(data))


def dump_optuna_searcher(searcher) -> bytes:
    """`searcher`'s state as `OptunaSearch.save` writes it (a pickle of ``__dict__``), as bytes."""
    buffer = io.BytesIO()
    pickle.dump(searcher.__dict__.copy(), buffer)
    return buffer.getvalue()


def optuna_search_parts(searcher) -> tuple[Any, dict, dict, set]:
    """(study, space, Tune trial id → Optuna trial, ended Tune trial ids) of a Ray `OptunaSearch`: its
    ``_ot_study``, ``_space``, ``_ot_trials`` and ``_completed_trials``, live (changing the dict and set
    changes the searcher). Private: Tune exposes neither the study nor the trial mapping, and a restored
    searcher must be told of trials that ended after its state was saved. Checked on ray 2.60.0 with
    optuna 5.1.0."""
    return searcher._ot_study, searcher._space, searcher._ot_trials, searcher._completed_trials


def optuna_trial_handle(study, frozen):
    """A live `optuna.trial.Trial` for `frozen` (a `FrozenTrial` of `study`, e.g. one `study.add_trial`
    added RUNNING), to be told later. Private: Optuna makes a Trial from its storage id
    (``FrozenTrial._trial_id``), and only `study.ask` hands one out publicly. Checked on optuna 5.1.0."""
    import optuna

    return optuna.trial.Trial(study, frozen._trial_id)


def enqueued_params(frozen) -> dict | None:
    """The parameters `study.enqueue_trial` fixed for a WAITING trial (its ``system_attrs['fixed_params']``),
    or None. Private key of Optuna's queue. Checked on optuna 5.1.0."""
    return frozen.system_attrs.get("fixed_params")


def nsga2_sampler(**kwargs):
    """Optuna's `NSGAIISampler(**kwargs)`, picklable: Tune pickles the searcher (with its sampler) into the
    Tuner's state and the trial journal pickles it again (`dump_optuna_searcher`), and Optuna 5.1's genetic
    samplers hold a `threading.Lock` (``BaseGASampler._thread_lock``, guarding their generation cache) that
    cannot be pickled: a ``sweep.sampler: nsga2`` sweep failed at Tuner creation with ``TypeError: cannot
    pickle '_thread.lock' object``. The class (`PicklableNSGAIISampler`, made on first use so importing this
    module never imports Optuna) leaves the lock out of its pickled state and makes a new one when loaded.
    Checked on optuna 5.1.0."""
    return _picklable_nsga2()(**kwargs)


def _picklable_nsga2():
    """The `PicklableNSGAIISampler` class, defined once; pickles refer to it as
    ``alphadpo_ray.compat.PicklableNSGAIISampler`` (found through the module's ``__getattr__``)."""
    cls = globals().get("_PICKLABLE_NSGA2")
    if cls is None:
        import threading

        import optuna

        class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
            def __getstate__(self):
                state = self.__dict__.copy()
                state.pop("_thread_lock", None)
                return state

            def __setstate__(self, state):
                self.__dict__.update(state)
                self._thread_lock = threading.Lock()

        PicklableNSGAIISampler.__module__ = __name__
        PicklableNSGAIISampler.__qualname__ = "PicklableNSGAIISampler"
        globals()["_PICKLABLE_NSGA2"] = cls = PicklableNSGAIISampler
    return cls


def __getattr__(name: str):
    """``PicklableNSGAIISampler`` on demand (PEP 562), so unpickling a sampler finds its class."""
    if name == "PicklableNSGAIISampler":
        return _picklable_nsga2()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- DeepSpeed (engine.py, distributed.py, logprobs.py) --------------------------------------------------

def zero3_consolidated_state_dict(engine) -> dict | None:
    """Full 16-bit weights on rank 0 (None elsewhere) from a ZeRO-3 engine, gathered one layer at a time
    (`DeepSpeedEngine._zero3_consolidated_16bit_state_dict`; collective, every rank calls it). The public
    ``save_16bit_model`` writes a file instead, and ``GatheredParameters`` over the whole model would hold
    every weight on every rank at once. Checked on deepspeed 0.19.8."""
    return engine._zero3_consolidated_16bit_state_dict()


def import_deepspeed():
    """``import deepspeed`` without the MLflow import DeepSpeed makes on the way (``deepspeed.autotuning.autotuner``:
    an optional ``import mlflow`` in a try/except, for its autotuner, which this project never runs): MLflow's
    import is about a second of every Ray Train worker's start, and workers never log to MLflow themselves. MLflow
    is blocked (``sys.modules["mlflow"] = None``: an ImportError) only during this import and only where this
    process has not imported it; a DeepSpeed that needs it after all is imported again, plainly. Checked on
    deepspeed 0.19.8."""
    import sys

    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None
    try:
        import deepspeed
    except ImportError:  # a DeepSpeed whose import needs MLflow: drop the half-imported modules, import plainly
        for name in [n for n in sys.modules if n == "deepspeed" or n.startswith("deepspeed.")]:
            del sys.modules[name]
        del sys.modules["mlflow"]
        import deepspeed
    finally:
        if "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]
    return deepspeed


def mark_cpu_comm_ops_incompatible() -> bool:
    """Mark DeepSpeed's CPU communication ops (``deepspeed_shm_comm``, ``deepspeed_ccl_comm``) incompatible
    in ``deepspeed.ops.__compatible_ops__`` (which ``deepspeed.comm.torch`` consults before JIT-building
    them), so its collectives go through torch.distributed. No public switch exists. False when the dict
    is not there. Checked on deepspeed 0.19.8."""
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if not isinstance(compatible, dict):
        return False
    compatible.update({"deepspeed_shm_comm": False, "deepspeed_ccl_comm": False})
    return True


def zero3_param_partitioned(param) -> bool:
    """Whether a ZeRO-3 parameter is partitioned now, not gathered (its ``ds_status`` is
    ``ZeroParamStatus.NOT_AVAILABLE``): attributes DeepSpeed adds to each parameter, without a public
    accessor. Checked on deepspeed 0.19.8."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status == ZeroParamStatus.NOT_AVAILABLE


def zero3_param_in_use(param) -> bool:
    """Whether a module that DeepSpeed gathered a ZeRO-3 parameter for still holds it (its
    ``ds_active_sub_modules``), so releasing it now would pull it from under that module. Checked on
    deepspeed 0.19.8."""
    return bool(param.ds_active_sub_modules)


# --- MLflow (tracking.py) ----------------------------------------------------------------------------------

def drop_default_experiment(sqlite_path) -> None:
    """Delete the Default experiment (id 0) of an SQLite tracking store for good, so a copy of the store
    gets its own Default experiment (artifact location under the working directory) when MLflow first
    opens it. Public APIs only (it replaced raw SQL against MLflow's tables): the client's soft
    `delete_experiment`, then ``mlflow gc --experiment-ids 0`` (a subprocess, ~5 s, once per machine and
    MLflow version), which removes the experiment's rows from every table, rollups included. Here because
    it leans on edges of both (experiment 0 may be deleted; gc reads MLFLOW_TRACKING_URI) that the contract
    test watches. Checked on mlflow 3.17.2."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    path = Path(sqlite_path).resolve()
    uri = f"sqlite:///{path}"
    MlflowClient(uri).delete_experiment("0")
    done = subprocess.run([sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", uri, "--experiment-ids", "0"],
                          cwd=path.parent, env={**os.environ, "MLFLOW_TRACKING_URI": uri},
                          capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"`mlflow gc --experiment-ids 0` on {path} failed: {tail[0]}")
