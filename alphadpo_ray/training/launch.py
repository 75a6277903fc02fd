"""One training run: Ray Train's `TorchTrainer` over DeepSpeed workers running `recipe.train_loop_per_worker`.

`train(config)`:
  1. check the MLflow store (fail fast if unreachable; an embedded SQLite store is created under a lock);
  2. check the run's identity (`_check_identity`): a run with checkpoints in
     ``{storage_path}/{run_name}`` continues only if the fingerprint of its resolved settings
     (`run_fingerprint`, stored in ``alphadpo_run.json`` beside them) is unchanged — else it refuses,
     naming the changed keys, before Ray starts; ``restart=True`` (``--restart``) sets the old storage
     aside and starts over; then start or connect to Ray — except for a one-worker run without a
     cluster address, which trains in this process (`in_process.runs_in_process`): no Ray start;
  3. prepare data and the reference cache (`prepare.prepare_run`; scored in this process when in-process);
  4. start or resume the MLflow run: a run continued from a checkpoint continues its MLflow run (and
     logs only the steps after those already there), a fresh start gets a new one;
  5. `TorchTrainer.fit()` (or `in_process.fit_in_process`, same checkpoints and callbacks) with checkpoints kept per `CheckpointConfig` and `FailureConfig(max_failures)`;
     re-running the same command with the same storage path and run name resumes a stopped run; a
     tracking outage never stops it (`tracking.PendingMetrics`);
  6. export the final policy (`save_pretrained`, safetensors), write ``summary.json``, close the MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from .. import compat
from ..config.experiment import ExperimentConfig
from ..console import drop_benign_worker_lines
from ..errors import AlphaDPOError
from ..services import secrets, storage, tracking, train_callbacks
from ..services.secrets import is_secret_name, looks_secret, mask_secrets, redact
from ..services.storage import default_cache_dir
from ..services.tracking import flatten
from .in_process import fit_in_process, runs_in_process
from .preflight import check_cluster_access, check_token_file, gcs_address, preflight, spot_warnings
from . import prepare  # called as prepare.prepare_run: tests replace it to see it is not reached
from .recipe import MANIFEST, CheckpointUnusable, checkpoint_problem, train_loop_per_worker

# The Train controller polls workers at this interval; reports block on it (default 2 s).
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
PREEMPTION_POLL_ENV = "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"  # read by Ray Train's controller (ray.preemption_poll_s)


class TrainingFailed(AlphaDPOError):
    """The run stopped without finishing (diverged, or workers failed beyond max_failures)."""


class RunConfigChanged(AlphaDPOError):
    """A re-run would continue a stored run under settings that change its result."""


IDENTITY_FILE = "alphadpo_run.json"  # in {storage_path}/{run_name}, beside Ray Train's checkpoints
QUARANTINE_DIR = "quarantined_checkpoints"  # beside them: checkpoints found bad, out of Ray's checkpoint_* names
PENDING_FILE = "mlflow-pending.jsonl"  # in the run's output dir: reports the tracking store has not taken yet
# Settings that do not change what a run computes: names and places, tracking, scheduling, logging and
# checkpoint cadence, and how the global batch is split (2 workers × b = 1 worker × 2b, see recipe.py).
NOT_IDENTITY = ("name", "output_dir", "cache_dir", "tracking", "sweep", "ray.address", "ray.num_workers",
                "ray.resources_per_worker", "ray.storage_path", "ray.max_failures", "ray.max_preemption_failures",
                "ray.spot", "ray.preemption_poll_s", "ray.preemption_grace_s",
                "ray.placement_strategy", "ray.num_to_keep", "ray.in_process_single_worker",
                "ray.health_check_interval_s", "training.per_device_train_batch_size",
                "training.gradient_accumulation_steps", "training.per_device_eval_batch_size",
                "training.logging_steps", "training.save_steps", "training.logprob_chunk_size",
                "training.logprob_memory_budget_mb")


@dataclass
class RunIdentity:
    """A run's identity in storage: where it lives, the fingerprint of this start's settings, whether
    there is anything to continue (``fresh``: no registered checkpoint), and the stored record."""

    uri: str
    fingerprint: str
    settings: dict[str, Any]
    fresh: bool
    previous: dict | None


def run_fingerprint(config: ExperimentConfig) -> tuple[str, dict[str, Any]]:
    """(sha256, settings): the flattened resolved settings that change a run's result — the method with
    every hyperparameter resolved, training, data, model, DeepSpeed, seeds, plugins — less
    `NOT_IDENTITY`, secrets masked (so ``alphadpo_run.json`` can hold them), and their hash."""
    tree = config.to_dict()
    tree["method"] = {"name": config.method.name, **config.method.resolved()}
    settings = {k: v for k, v in flatten(mask_secrets(tree)).items()
                if not any(k == p or k.startswith(p + ".") for p in NOT_IDENTITY)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest(), settings


# Where an S3-compatible object store is (not who may use it): read by pyarrow (Ray's storage, this
# package's), boto3 and MLflow. Passed on to every worker so the nodes of an existing cluster reach the
# store the driver reaches; credentials never are (see `_keep_credentials_out_of_runtime_envs`).
OBJECT_STORE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")


def torch_extensions_dir(config: ExperimentConfig) -> str:
    """This environment's own directory for PyTorch JIT extensions (DeepSpeed ops): under the project's
    cache, one per Python environment. The default (~/.cache/torch_extensions) is shared by every
    environment on the machine, so each rebuilds what another built last (30-50 s per op)."""
    import sys

    tag = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    return str(Path(config.cache_dir or default_cache_dir()) / "torch_extensions" / tag)


def worker_env(config: ExperimentConfig) -> dict[str, str]:
    """The environment of Ray's workers (the job's `runtime_env`): library switches, this environment's
    extensions directory, and the object store's endpoint and region from this environment
    (`OBJECT_STORE_ENV`), never a credential."""
    return {
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR") or torch_extensions_dir(config),
        **{k: os.environ[k] for k in OBJECT_STORE_ENV if os.environ.get(k) and not looks_secret(os.environ[k])},
        HEALTH_CHECK_ENV: str(config.ray.health_check_interval_s),
        **({PREEMPTION_POLL_ENV: str(config.ray.preemption_poll_s)} if config.ray.preemption_poll_s else {}),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),  # idle OpenMP threads sleep (threads.py)
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "RAY_TRAIN_ENABLE_STATE_TRACKING": os.environ.get("RAY_TRAIN_ENABLE_STATE_TRACKING", "0"),
        # Ray Train's print patch in its workers tees a print to the (wrapped) stdout *and* logs it through
        # the root logger, so each worker console line ([resume], [warning], [preemption]) reached the
        # driver twice; unpatched, a worker's print reaches it once through Ray's log forwarding.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' per-file loading/saving bars in workers and tasks
        **({} if config.ray.use_gpu else {"DS_ACCELERATOR": "cpu"}),  # no "unable to detect" warning per process
    }


def _keep_credentials_out_of_runtime_envs() -> None:
    """Stop Ray Tune from copying credentials into every trial's `runtime_env`.

    Tune puts ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SECURITY_TOKEN`` and
    ``AWS_SESSION_TOKEN`` from the driver's environment into the runtime_env of each trial actor
    (``ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE``), and Ray's runtime_env agent writes
    every runtime_env it sets up into ``runtime_env_agent.log``. Those names are removed from that
    set — process-wide on purpose: it is Ray's module-level setting, read whenever Tune registers a
    trainable. Trials lose nothing on a Ray started from this process (its workers inherit this
    environment); on an existing cluster the nodes' own credentials apply (instance roles, or the
    variables set on the nodes)."""
    try:
        from ray.tune.execution import class_cache
    except ImportError:  # pragma: no cover - other Ray versions
        return
    names = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if isinstance(names, set):
        names.difference_update({name for name in names if is_secret_name(name)})


def apply_worker_env(config: ExperimentConfig) -> dict[str, str]:
    """Set the worker environment in this process where unset (a user's own value wins); returns it."""
    env = worker_env(config)
    os.environ.update({k: v for k, v in env.items() if k not in os.environ})
    return env


# Run by Ray in every worker process of the job as it starts (trial actors that never ran a trial included): a
# SIGTERM that Python swallows in a callback exits the process instead of printing a traceback, and Ray's state
# API asks this cluster, not another Ray on the machine (`worker_process`). The trial and Train-worker entry
# points call it too, for jobs whose Ray someone else started.
WORKER_SETUP_HOOK = "alphadpo_ray.training.worker_process.setup"


def init_ray(config: ExperimentConfig, address: str | None = None) -> None:
    """Connect to `address` / `ray.address` / RAY_ADDRESS, or start a local Ray instance.

    The worker environment goes to Ray's workers through the job's `runtime_env`; it is also set in
    this (driver) process where unset, on purpose and for the process's lifetime: the same library
    switches (tokenizers' thread pool, datasets' progress bars) apply to the driver's own data
    preparation, and Ray Train's controller reads the health-check interval from the environment of
    the process that creates it. A user's own value always wins. A token file named by RAY_AUTH_TOKEN_PATH
    must exist and hold a token (`preflight.check_token_file`); spot nodes with no failure budget are
    warned about (`preflight.spot_warnings`). An explicit cluster address is
    probed first (`preflight.check_cluster_access`): a cluster that refuses this process's auth token
    or does not answer is one clear error, not Ray's retries and traceback."""
    import ray

    _keep_credentials_out_of_runtime_envs()
    env = apply_worker_env(config)
    if not ray.is_initialized():
        check_token_file()  # a missing RAY_AUTH_TOKEN_PATH file fails every ray.init, a local one too
        address = address or config.ray.address or os.environ.get("RAY_ADDRESS")
        if gcs_address(address):
            check_cluster_access(gcs_address(address))
        # The dashboard serves the state API that Ray Train's placement-group cleaner polls.
        ray.init(address=address, runtime_env={"env_vars": env, "worker_process_setup_hook": WORKER_SETUP_HOOK},
                 log_to_driver=True, logging_level="warning")
        for line in spot_warnings(config, ray.nodes()):
            print(line, flush=True)
    drop_benign_worker_lines()


def build_trainer(config: ExperimentConfig, plan, callbacks: list | None = None, run_name: str | None = None):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = dict(config.ray.resources_per_worker)
    if config.ray.use_gpu:
        resources.setdefault("GPU", 1)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "plan": plan.to_dict()},
        torch_config=TorchConfig(backend="nccl" if config.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.ray.num_workers, use_gpu=config.ray.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=config.ray.placement_strategy),
        run_config=RunConfig(
            name=run_name or config.run_name,
            storage_path=config.storage_path(),
            checkpoint_config=CheckpointConfig(num_to_keep=config.ray.num_to_keep),
            failure_config=FailureConfig(max_failures=config.ray.max_failures,
                                         max_preemption_failures=config.ray.max_preemption_failures,
                                         **({"preemption_grace_s": config.ray.preemption_grace_s}
                                            if config.ray.preemption_grace_s is not None else {})),
            callbacks=callbacks or [],
            logging_config=LoggingConfig(log_level="WARNING"),  # progress lines come from ConsoleProgress
        ),
    )


def export_policy(checkpoint, destination: Path) -> Path | None:
    """Copy the final checkpoint's exported policy (safetensors + tokenizer) to `destination`."""
    import shutil

    if checkpoint is None:
        return None
    source = storage.join(checkpoint.path, "policy")  # a path on checkpoint.filesystem (local or object store)
    if not storage.is_dir(source, checkpoint.filesystem):
        return None
    if destination.exists():
        shutil.rmtree(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    storage.copy_dir(source, str(destination), checkpoint.filesystem)
    return destination


def train(config: ExperimentConfig, log=print, restart: bool = False, address: str | None = None) -> dict:
    """Run (or resume) one training run; returns the summary also written to ``summary.json``.
    ``restart``: set the run's old storage aside and start over (a new MLflow run). ``address``
    (``--address``): the cluster to run on, over ``ray.address`` / RAY_ADDRESS; given, the run always
    uses Ray Train (never in this process)."""
    start = time.time()
    preflight(config, log)  # paths, disk, DeepSpeed config, hub ids: before anything starts
    uri = _check_tracking(config)
    identity = _check_identity(config, restart, log)
    if not identity.fresh:
        screen_checkpoints(identity.uri, log)  # a bad checkpoint is set aside even when nothing trains
    stored = _finished_summary(identity)
    if stored is not None:  # nothing to do: answered from storage, no Ray, no data
        return {**stored, "already_finished": True}
    in_process = runs_in_process(config) and not address
    if in_process:
        apply_worker_env(config)
    else:
        init_ray(config, address)
    plan = prepare.prepare_run(config, log=log, in_process=in_process)
    where = "1 worker in this process" if in_process else f"{config.ray.num_workers} workers"
    log(f"[run] {config.run_name}: {config.method.name} {config.method.resolved()} | {plan.train_pairs} train / "
        f"{plan.eval_pairs} held-out pairs | {plan.total_steps} steps × {config.training.total_batch_size} pairs | "
        f"{where}, ZeRO-{config.deepspeed.zero_stage}")
    run_id, logged_through = _start_tracking(config, uri, identity, log)
    try:
        tracking.log_train_views(uri, run_id, plan=plan)
        _record_identity(config, identity, uri, run_id)
        result = _fit(config, plan, uri, run_id, logged_through, log, in_process, resumed=not identity.fresh)
        summary = _write_summary(config, plan, result, uri, run_id, start, log)
    except BaseException as err:  # Ctrl-C, SIGTERM, a full disk, a failed run: never leave it RUNNING
        if run_id:
            tracking.close_on_exit(uri, run_id, err, pending=tracking.PendingMetrics(uri, _pending_path(config)),
                                   log=log)
        if isinstance(err, Exception) and not isinstance(err, AlphaDPOError):
            raise TrainingFailed(f"training run {config.run_name} failed: {type(err).__name__}: {err}") from err
        raise
    tracking.log_train_views(uri, run_id, policy=summary.get("policy"), config_dict=config.to_dict())
    if run_id:
        brief = {k: v for k, v in summary.items() if k not in ("history", "evals")}
        tracking.finish_run(uri, run_id, "FINISHED" if summary["status"] == "finished" else "FAILED", brief,
                            [config.run_dir / "config.json"], pending=tracking.PendingMetrics(uri, _pending_path(config)),
                            log=log)
    if summary["status"] != "finished":
        raise TrainingFailed(summary["message"] or f"run ended with status {summary['status']}")
    _record_finished(identity, summary)
    return summary


def _record_finished(identity: RunIdentity, summary: dict) -> None:
    """Mark the run finished in ``alphadpo_run.json`` (its step, its summary) so a re-run of the same
    command answers from it (`_finished_summary`). Every start rewrites the record without the mark."""
    record = _read_json(storage.join(identity.uri, IDENTITY_FILE)) or {}
    record["finished"] = {"steps": summary.get("steps"), "total_steps": summary.get("total_steps"),
                          "summary": summary["summary_path"], "checkpoint": summary.get("checkpoint")}
    storage.write_json(storage.join(identity.uri, IDENTITY_FILE), record)


def _finished_summary(identity: RunIdentity) -> dict | None:
    """The stored summary of a run that finished under this very fingerprint (its identity record says
    so, its ``summary.json`` is still there and says finished, and its final checkpoint is still Ray's
    latest, not set aside as bad), else None: the run (re)starts or resumes."""
    finished = (identity.previous or {}).get("finished") if not identity.fresh else None
    if not finished or (identity.previous or {}).get("fingerprint") != identity.fingerprint:
        return None
    try:
        summary = json.loads(Path(finished["summary"]).read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if summary.get("status") != "finished" or summary.get("checkpoint") != finished.get("checkpoint"):
        return None
    latest = compat.train_snapshot_latest(_read_json(storage.join(identity.uri, compat.TRAIN_SNAPSHOT_FILE)) or {})
    if latest is None or latest != posixpath.basename(str(finished.get("checkpoint") or "").rstrip("/")):
        return None  # its final checkpoint was set aside as bad (`screen_checkpoints`): the run resumes
    return summary


def _check_tracking(config: ExperimentConfig) -> str | None:
    """The MLflow tracking URI (checked reachable, before anything is prepared), or None when off."""
    if not config.tracking.enabled:
        return None
    uri = tracking.resolve_tracking_uri(config.tracking.tracking_uri)
    tracking.create_sqlite_store(uri)
    tracking.check_tracking(uri)
    return uri


def _read_json(uri: str) -> dict | None:
    """A JSON file from run storage (local or object store), or None if missing or unreadable."""
    fs, path = storage.resolve(uri)
    try:
        with fs.open_input_stream(path) as handle:
            data = json.loads(handle.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _has_checkpoint(run_uri: str) -> bool:
    """Whether Ray Train would resume the run: its snapshot lists a registered checkpoint."""
    return compat.train_snapshot_has_checkpoint(_read_json(storage.join(run_uri, compat.TRAIN_SNAPSHOT_FILE)) or {})


def _set_aside(run_uri: str) -> str | None:
    """Move a run's storage out of the way (``{run}.replaced-{time}`` beside it); object stores, which
    cannot move folders, delete it. The new location, or None when deleted."""
    if "://" not in run_uri:
        destination = f"{run_uri}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        os.replace(run_uri, destination)
        return destination
    fs, path = storage.resolve(run_uri)
    fs.delete_dir(path)
    return None


def _changed_message(config: ExperimentConfig, run_uri: str, before: dict, after: dict) -> str:
    missing = object()

    def shown(value) -> str:
        return "(unset)" if value is missing else repr(value)

    changed = [f"  {k}: {shown(before.get(k, missing))} → {shown(after.get(k, missing))}"
               for k in sorted(set(before) | set(after)) if before.get(k, missing) != after.get(k, missing)]
    rename = ("--set tracking.run_name=NEW" if config.tracking.run_name
              else "--set name=NEW (or --set tracking.run_name=NEW)")
    return "\n".join([
        f"run {config.run_name!r} has checkpoints in {run_uri} from a different config; resuming would continue "
        "that run under other settings:",
        *(changed or ["  (the stored fingerprint differs)"]),
        f"Nothing was started. Give this config a new run name ({rename}), or start over, replacing the stored "
        "run and starting a new MLflow run: alphadpo-ray train CONFIG --restart",
    ])


def _check_identity(config: ExperimentConfig, restart: bool, log) -> RunIdentity:
    """Before anything starts: a run with a registered checkpoint continues only under the same
    fingerprint, else this refuses (`RunConfigChanged`). ``restart`` first sets the old storage aside.
    A run stored without a fingerprint (an older version) is continued and gets one."""
    run_uri = storage.join(config.storage_path(), config.run_name)
    fingerprint, settings = run_fingerprint(config)
    if restart and storage.exists(run_uri):
        moved = _set_aside(run_uri)
        where = f"moved to {moved}" if moved else "deleted"
        log(f"[restart] {config.run_name}: old run storage {where}; starting over")
    repair_snapshot(config.storage_path(), config.run_name, log)
    previous = _read_json(storage.join(run_uri, IDENTITY_FILE))
    fresh = not _has_checkpoint(run_uri)
    if previous and not fresh and previous.get("fingerprint") != fingerprint:
        raise RunConfigChanged(_changed_message(config, run_uri, previous.get("settings") or {}, settings))
    return RunIdentity(run_uri, fingerprint, settings, fresh, previous)


def screen_checkpoints(run_uri: str, log=print) -> None:
    """Before Ray Train's checkpoint manager loads the run: verify the checkpoint it would hand over (the
    latest registered) in full (`recipe.checkpoint_problem`: manifests, sizes, sha256), then older
    registered ones, newest first, until one is intact. Each bad one is taken off Ray's snapshot (written
    first, atomically) and then moved to ``QUARANTINE_DIR`` beside it (deleted on an object store), with
    one line naming it — so Ray resumes from the intact one and ``ray.num_to_keep`` never counts a bad
    checkpoint as kept (it would delete a good one to keep the bad one). None intact: `CheckpointUnusable`
    naming each and what is wrong, nothing moved (the files can still be restored)."""
    snapshot = _read_json(storage.join(run_uri, compat.TRAIN_SNAPSHOT_FILE))
    latest = compat.train_snapshot_latest(snapshot or {})
    if latest is None:
        return
    fs, run_path = storage.resolve(run_uri)
    order = [latest] + sorted(set(compat.train_snapshot_checkpoints(snapshot)) - {latest}, reverse=True)  # by time
    name, bad = _first_intact(fs, run_path, order)
    if name is None:
        raise CheckpointUnusable(
            f"cannot resume from {redact(run_uri)}: no checkpoint passes its manifest check (restore the files, "
            "or delete that directory or pick a new run name to start over) — "
            + "; ".join(f"{n}: {why}" for n, why in bad))
    if not bad:
        return
    storage.write_json(storage.join(run_uri, compat.TRAIN_SNAPSHOT_FILE),
                       compat.train_snapshot_without(snapshot, {n for n, _ in bad}, name))
    _quarantine(fs, run_path, bad, name, log)


def _first_intact(fs, run_path: str, names: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """The first of `names` (checkpoint directories, in the order to try) whose manifests verify, and the
    (name, what is wrong) of each one before it; (None, all of them) when none does."""
    bad: list[tuple[str, str]] = []
    for name in names:
        problem = checkpoint_problem(fs, posixpath.join(run_path, name))
        if problem is None:
            return name, bad
        bad.append((name, problem))
    return None, bad


def _quarantine(fs, run_path: str, bad: list[tuple[str, str]], resumed_from: str, log) -> None:
    """Move each bad checkpoint (name, what is wrong) to ``QUARANTINE_DIR`` beside it (deleted on an
    object store, which cannot move folders), with one line naming it."""
    for bad_name, why in bad:
        source = posixpath.join(run_path, bad_name)
        if isinstance(fs, pafs.LocalFileSystem):
            destination = posixpath.join(run_path, QUARANTINE_DIR, bad_name)
            fs.create_dir(posixpath.dirname(destination))
            fs.move(source, destination)
            done = f"moved to {destination}"
        else:
            fs.delete_dir(source)
            done = "deleted"
        log(f"[checkpoint] {redact(storage.uri_of(source, fs))} is not usable ({why}): {done}; resuming from "
            f"{resumed_from} (a bad checkpoint is never counted toward ray.num_to_keep)")


def repair_snapshot(storage_path: str, run_name: str, log=print) -> None:
    """Before Ray starts: rebuild Ray Train's checkpoint-manager snapshot when it cannot be read.

    Ray's controller rewrites the snapshot in place, truncating it first, so a run killed (``kill -9``, a
    lost node) during that write leaves it empty or cut short, and every later start of the run failed
    in Ray's controller (``CheckpointManagerInitializationError: Expecting value``). The unreadable file
    is kept beside the run (``….unreadable-{time}``) and the snapshot rebuilt from the ``checkpoint_*``
    directories in storage: verified newest first (`checkpoint_problem`) until one is intact, that one
    the latest and the older ones kept before it, in time order; bad newer ones are set aside as
    `screen_checkpoints` does. Checkpoints Ray had already deleted under ``ray.num_to_keep`` are gone
    and stay gone. No directory at all: the snapshot is set aside and the run starts afresh. None intact:
    `CheckpointUnusable`, nothing moved."""
    run_uri = storage.join(storage_path, run_name)
    snapshot_uri = storage.join(run_uri, compat.TRAIN_SNAPSHOT_FILE)
    if not storage.exists(snapshot_uri) or _read_json(snapshot_uri) is not None:
        return
    fs, run_path = storage.resolve(run_uri)
    names = sorted(_checkpoint_dirs(run_uri), reverse=True)  # Ray's names sort by time: newest first
    intact, bad = _first_intact(fs, run_path, names)
    if intact is None and names:
        raise CheckpointUnusable(
            f"cannot resume from {redact(run_uri)}: its Ray Train snapshot {compat.TRAIN_SNAPSHOT_FILE} is "
            "unreadable and no checkpoint passes its manifest check (restore the files, or delete that "
            "directory or pick a new run name to start over) — " + "; ".join(f"{n}: {why}" for n, why in bad))
    snapshot_path = storage.resolve(snapshot_uri)[1]
    kept_as = f"{snapshot_path}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
    fs.move(snapshot_path, kept_as)
    kept = sorted(set(names) - {n for n, _ in bad})
    where = f"{redact(storage.uri_of(snapshot_path, fs))} was unreadable (a run stopped while Ray Train rewrote it)"
    if not kept:
        log(f"[checkpoint] {where}: kept as {redact(storage.uri_of(kept_as, fs))}; no checkpoint in storage, "
            "so the run starts afresh")
        return
    compat.rebuild_train_snapshot(storage_path, run_name,
                                  [(n, {"step": _manifest_step(fs, posixpath.join(run_path, n))}) for n in kept])
    log(f"[checkpoint] {where}: kept as {redact(storage.uri_of(kept_as, fs))} and rebuilt from the {len(kept)} "
        f"checkpoint(s) in storage; resuming from {kept[-1]}")
    _quarantine(fs, run_path, bad, kept[-1], log)


def _manifest_step(fs, checkpoint_path: str) -> int | None:
    """The step rank 0's manifest records for a checkpoint (`recipe.write_manifest`), or None."""
    try:
        with fs.open_input_stream(posixpath.join(checkpoint_path, MANIFEST.format(rank=0))) as handle:
            return int(json.loads(handle.read())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _checkpoint_dirs(run_uri: str) -> set[str]:
    """Names of the ``checkpoint_*`` directories in a run's storage."""
    fs, path = storage.resolve(run_uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return set()
    return {i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")}


def remove_failed_saves(run_uri: str, before: set[str], log=print) -> list[str]:
    """Delete the ``checkpoint_*`` directories this fit created (not in `before`) that Ray Train never
    registered: saves that failed part-way (a full disk, a worker lost mid-upload). They would otherwise
    stay for good, looking like checkpoints. Registered ones — every checkpoint Ray can resume from —
    are never touched. Returns their URIs."""
    snapshot = _read_json(storage.join(run_uri, compat.TRAIN_SNAPSHOT_FILE)) or {}
    fs, path = storage.resolve(run_uri)
    removed = []
    for name in sorted(_checkpoint_dirs(run_uri) - before - set(compat.train_snapshot_checkpoints(snapshot))):
        target = posixpath.join(path, name)
        try:
            fs.delete_dir(target)
        except OSError as err:
            log(f"[checkpoint] could not remove the incomplete checkpoint {redact(storage.uri_of(target, fs))}: {err}")
            continue
        removed.append(redact(storage.uri_of(target, fs)))
        log(f"[checkpoint] removed {removed[-1]}: its save did not complete (never registered by Ray Train)")
    return removed


def _record_identity(config: ExperimentConfig, identity: RunIdentity, uri: str | None, run_id: str | None) -> None:
    """Write ``alphadpo_run.json`` (fingerprint, settings, MLflow run) with the run, before it trains."""
    previous = {} if identity.fresh else identity.previous or {}  # a fresh start owns no earlier MLflow run
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    storage.write_json(storage.join(identity.uri, IDENTITY_FILE), {
        "run_name": config.run_name,
        "fingerprint": identity.fingerprint,
        "settings": identity.settings,
        "mlflow_run_id": run_id or previous.get("mlflow_run_id"),
        "tracking_uri": secrets.redact(uri) if uri else previous.get("tracking_uri"),
        "created": previous.get("created", now),
        "updated": now,
    })


def _pending_path(config: ExperimentConfig) -> Path:
    return config.run_dir / PENDING_FILE


def _start_tracking(config: ExperimentConfig, uri: str | None, identity: RunIdentity, log) -> tuple[str | None, int]:
    """(MLflow run id or None, last step already logged to it). Reports an earlier start left
    unsent are sent first; a run continued from a checkpoint continues its MLflow run (the one
    recorded with its storage), a fresh start gets a new one (an old one left RUNNING is closed)."""
    from mlflow.tracking import MlflowClient

    if not uri:
        return None, -1
    pending = tracking.PendingMetrics(uri, _pending_path(config))
    waiting: dict[str, list[int]] = {}  # run id → steps an earlier start left on disk
    for event in pending.events():
        if "step" in event:
            waiting.setdefault(event["run_id"], []).append(int(event["step"]))
    held = {}  # what the store held of those runs before they are sent
    for waiting_id in waiting:
        try:
            held[waiting_id] = tracking.last_logged_step(MlflowClient(uri), waiting_id)
        except Exception:  # noqa: BLE001 - unreachable, or a run the store lost: said below / refused by flush
            pass
    sent = pending.flush()
    if not sent:
        log(f"[mlflow] {len(pending.events())} earlier report(s) still wait for the tracking store "
            f"({pending.error}); kept in {pending.path}")
    previous = identity.previous or {}
    recorded = previous.get("mlflow_run_id") if previous.get("tracking_uri") == secrets.redact(uri) else None
    key = tracking.run_key(config.storage_path(), config.run_name)
    run_id, resumed = tracking.start_or_resume_run(
        uri, config.tracking.experiment_name, config.run_name, key, tracking.config_params(config.to_dict()),
        tags={"alphadpo.kind": "train", "method": config.method.name}, resume=not identity.fresh, run_id=recorded,
    )
    logged = tracking.last_logged_step(MlflowClient(uri), run_id) if resumed else -1
    log(f"[mlflow] {'resumed' if resumed else 'started'} run {run_id} in {secrets.redact(uri)}"
        + _logged_note(logged, held.get(run_id, logged), waiting.get(run_id, []) if resumed else [], sent,
                       pending.path))
    return run_id, max([logged, *(waiting.get(run_id, []) if resumed and not sent else [])])


def _logged_note(logged: int, held_before: int, waiting: list[int], sent: bool, path: Path) -> str:
    """What a resumed run's history holds: steps up to N in MLflow, and those an earlier start left on disk
    (sent now, or still waiting for the store)."""
    later = sorted(s for s in waiting if s > held_before)
    if not later:
        return f" (steps up to {logged} in MLflow)" if logged >= 0 else ""
    span = f"{later[0]}–{later[-1]}" if later[-1] != later[0] else f"{later[0]}"
    before = held_before if sent else logged
    head = f"steps up to {before} in MLflow" if before >= 0 else "no steps in MLflow"
    return f" ({head}, {span} pending on disk ({path}), {'sent now' if sent else 'sent when the store answers'})"


SEND_EVERY_S = 1.0  # how often the driver sends what the Train controller appended to the pending file


def _fit(config: ExperimentConfig, plan, uri: str | None, run_id: str | None, logged_through: int = -1, log=print,
         in_process: bool = False, resumed: bool = False):
    """`TorchTrainer.fit()` — or, for a one-worker local run, the recipe in this process
    (`in_process.fit_in_process`) — with console progress and (when tracking) the MLflow metrics callback.

    Under Ray Train the callback (in the Train controller) only appends each report to the run's pending
    file and this process sends the file while the run trains (`tracking.MetricsSender`, every
    `SEND_EVERY_S`), so the controller never imports MLflow; a Ray Client driver runs on another machine
    than the controller, so there the controller sends. In process, the callback sends (woken by each report)."""
    callbacks: list = [train_callbacks.ConsoleProgress(config.ray.max_failures, config.ray.max_preemption_failures,
                                                        resumed=resumed, log=log if in_process else None)]
    metrics = sender = None
    if run_id:
        driver_sends = not in_process and not _ray_client()
        metrics = train_callbacks.MLflowMetricsCallback(uri, run_id, _pending_path(config), logged_through,
                                                        send=not driver_sends)
        callbacks.append(metrics)
        if driver_sends:
            sender = tracking.MetricsSender(tracking.PendingMetrics(uri, _pending_path(config)), every_s=SEND_EVERY_S)
    run_uri = storage.join(config.storage_path(), config.run_name)
    before = _checkpoint_dirs(run_uri)
    try:
        if not in_process:
            result = build_trainer(config, plan, callbacks).fit()
        else:
            result = fit_in_process(config, plan, callbacks, log)
            if result.error is not None:
                raise result.error
    except Exception as err:  # the MLflow run is closed as FAILED by `train`
        removed = remove_failed_saves(run_uri, before, log)
        cleaned = f" (removed the incomplete checkpoint {', '.join(removed)})" if removed else ""
        raise TrainingFailed(f"training run {config.run_name} failed: {err}{cleaned}") from err
    finally:  # what the senders had not sent is sent by `finish_run` / `close_on_exit`
        if sender is not None:
            sender.stop(timeout=30)
        if metrics is not None:
            metrics.close()
    remove_failed_saves(run_uri, before, log)  # a save that failed before a retry succeeded
    return result


def _ray_client() -> bool:
    """This driver is a Ray Client (``ray://``): its machine is not the Train controller's."""
    import ray

    return ray.util.client.ray.is_connected()


def _write_summary(config: ExperimentConfig, plan, result, uri: str | None, run_id: str | None, start: float,
                   log=print) -> dict:
    """Export the final policy, write ``summary.json`` and ``config.json`` (`train` then finishes the MLflow run)."""
    out = result.return_value or {}
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    policy = export_policy(result.checkpoint, run_dir / "policy") if out.get("status") == "finished" else None
    summary = {
        "name": config.name,
        "run_name": config.run_name,
        "status": out.get("status", "unknown"),
        "message": out.get("message", ""),
        "method": config.method.name,
        "hyperparameters": config.method.resolved(),
        "steps": out.get("steps"),
        "total_steps": plan.total_steps,
        "final_eval": out.get("final_eval"),
        "best_eval": out.get("best_eval"),
        "reference_metrics": plan.reference_metrics,
        "checkpoint": (storage.uri_of(result.checkpoint.path, result.checkpoint.filesystem)
                       if result.checkpoint else None),
        "policy": str(policy) if policy else None,
        "storage_path": config.storage_path(),
        "mlflow_run_id": run_id,
        "tracking_uri": secrets.redact(uri) if uri else None,
        "reference_cache": plan.reference_cache,
        "train_pairs": plan.train_pairs,
        "eval_pairs": plan.eval_pairs,
        "preemptions": out.get("preemptions", 0),  # resumes after a preemption notice (recipe.resume)
        "evals": out.get("evals", []),
        "history": out.get("history", []),
        "wall_seconds": round(time.time() - start, 1),
        "seconds": out.get("seconds"),  # the last training process's setup / steps / evaluation
    }
    summary["summary_path"] = str(run_dir / "summary.json")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "config.json").write_text(json.dumps(secrets.mask_secrets(config.to_dict()), indent=2))
    return summary
