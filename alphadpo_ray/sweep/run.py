"""`alphadpo-ray sweep` and `alphadpo-ray compare`: Ray Tune + Optuna over the training recipe.

A sweep, top to bottom:
  1. validate the config and its ``sweep`` section; check the MLflow store; start/connect Ray;
  2. prepare data and the reference cache once (`prepare_run`): every trial reuses them;
  3. per method: its conditional search space, `SafeOptunaSearch` (multi-objective by default),
     an optional ASHA/median scheduler, and a `Tuner` whose trials are training runs;
     ``--resume`` restores the Tuner from storage instead (finished trials are kept, unfinished
     ones resume from their checkpoints, the Optuna study continues);
  4. MLflow: a parent run per sweep, child runs per trial (written from the driver: the callback creates
     them, a background sender sends their metrics from the sweep's pending file);
  5. the results table, the Pareto set of accuracy vs KL, plots, and ``results.json``.

`compare` runs the same budget for several methods under one compare run: per method a search
(``num_samples`` trials, its sweep ``{compare}-{method}``), then a seeds phase (``{compare}-{method}-seeds``:
the search's best configuration re-run with ``sweep.seeds`` new training seeds). Methods are ranked on
the method-independent ``accuracy_logratio`` over those seeds, with 95 % intervals and ties
(`results.rank_methods`, which `report` uses too). MLflow gets the comparison as metrics, the compare run's
description and a trials table (`views.publish_compare`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.logger import TBXLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

from .. import compat
from ..config.experiment import ExperimentConfig, config_from_dict
from ..config.sweep_settings import SchedulerConfig, SweepConfig, method_space, starting_points
from ..errors import AlphaDPOError
from ..ml.losses import method_names, needs_reference
from ..services import secrets, storage, storage as run_storage, tracking
from ..services.secrets import redact
from ..services.tracking import NOTE_TAG, close_run, log_metrics, resolve_tracking_uri
from ..training.launch import init_ray
from ..training.preflight import preflight
from ..training.prepare import prepare_run
from . import journal, plots, results as res
from .nested_runs import (DATA_KEYS, KIND_TAG, METHOD_TAG, PARENT_TAG, PHASE_TAG, SEARCH, SEEDS, SWEEP_TAG,
                          SweepMLflowCallback, TELLING_LINES, error_reason, send_sweep_pending, trial_error_text)
from .study import machine, markdown, print_study, study_tables, write_study
from .trial import run_trial
from .views import compare_description, publish_compare


CHECKPOINT_PERIOD_ENV = "TUNE_GLOBAL_CHECKPOINT_S"
DEFAULT_CHECKPOINT_S = 30.0  # Tune's full experiment-state save, with the trial journal between saves


class SweepFailed(AlphaDPOError):
    """No trial of a sweep finished."""


class SweepExists(AlphaDPOError):
    """A sweep or compare of this name already exists and ``--resume`` was not given."""


class SweepRunning(AlphaDPOError):
    """Another process holds the sweep's name (its lock in storage)."""


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a sweep: Tune saved its state and `fit` returned; the command ends as interrupted
    (its MLflow runs KILLED, the ``--resume`` line printed) instead of as finished."""


# Sweep name → ids of its trials that ended (complete or failed) in this process's `fit`, kept by
# `TrialProgress`. Process-wide because a resumed Tuner runs the callbacks unpickled from its storage,
# not the instances this process made; `run_method_sweep` clears its sweep's entry before `fit`.
_ENDED: dict[str, set[str]] = {}


class TrialProgress(Callback):
    """One console line when a trial starts, finishes or fails (Tune's own tables are switched off); it
    also records which trials ended (`_ENDED`), so a sweep that Ctrl-C stopped knows which did not."""

    def __init__(self, accuracy_key: str, total: int, name: str = ""):
        self.accuracy_key, self.total, self.name = accuracy_key, total, name

    def _ended_ids(self) -> set[str]:
        return _ENDED.setdefault(getattr(self, "name", ""), set())

    def on_step_begin(self, iteration, trials, **info):
        if getattr(self, "name", "") not in _ENDED:  # first step: a resumed sweep's trials that ended before
            self._ended_ids().update(t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR"))

    def _ended(self) -> int:
        """Trials ended so far, the one ending now included (and those a resumed sweep had already finished);
        counted as they end, not by walking every trial of the sweep at each end."""
        return len(self._ended_ids())

    @staticmethod
    def _params(trial) -> str:
        return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(trial.config.items()))

    def on_trial_start(self, iteration, trials, trial, **info):
        print(f"[trial {trial.trial_id}] started: {self._params(trial)}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended_ids().add(trial.trial_id)
        r = trial.last_result or {}
        print(f"[trial {trial.trial_id}] done ({self._ended()}/{self.total}): {self.accuracy_key.removeprefix('eval/')} "
              f"{r.get(self.accuracy_key, float('nan')):.3f}  kl {r.get('eval/kl', float('nan')):.3f}  "
              f"step {r.get('step', '?')}  {r.get('time_total_s', 0):.1f}s", flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        """Tune retries a failed trial (``sweep.max_failures``): one ``[failure]`` line; the traceback stays
        in the trial's error file (Tune's own error log is off, `_tune_environment`)."""
        step = (trial.last_result or {}).get("step", 0)
        saved, at = compat.tune_trial_checkpoint_step(trial)
        if not saved:
            then = f"no checkpoint yet: retrying from step 0 ({step} step{'' if step == 1 else 's'} lost)"
        else:
            then = f"retrying from its checkpoint of step {'?' if at is None else at}"
        reason = _failure_reason(trial_error_text(trial))
        print(f"[failure] trial {trial.trial_id} failed at step {step} ({reason}); {then} (failure "
              f"{trial.num_failures} of sweep.max_failures {trial.max_failures}; traceback in "
              f"{trial.error_file or 'its error.txt'})", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended_ids().add(trial.trial_id)
        print(f"[trial {trial.trial_id}] FAILED ({self._ended()}/{self.total}): {error_reason(trial_error_text(trial))}",
              flush=True)


# Ray's words for a trial actor that is gone (most specific first), and what the [failure] line says instead.
_LOST_ACTOR = ((("worker process has died",), "its process died"),
               (("its node has died", "The actor is temporarily unavailable"), "its node was lost or cannot be reached"),
               (("The actor died unexpectedly before finishing this task",
                 "The actor experienced an error before finishing this task"), "its process or node was lost"))


def _failure_reason(text: str) -> str:
    """A retried trial's reason, from its error text: the line that says what went wrong (`error_reason`), or,
    for Ray's paragraphs about a killed actor process or a lost, unreachable or drained node (``ActorDiedError``,
    ``ActorUnavailableError``: class name, actor id, RPC codes), a few words; cut at 160 characters."""
    reason = error_reason(text)
    if not any(re.match(pattern, reason) for pattern in TELLING_LINES):
        for needles, words in _LOST_ACTOR:
            if any(needle in (text or "") for needle in needles):
                return words
    return reason if len(reason) <= 160 else reason[:160] + "…"


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def sweep_settings(config: ExperimentConfig) -> SweepConfig:
    """The config's sweep section (validated with the config), or the defaults."""
    return config.sweep or SweepConfig()


def _searcher(sweep: SweepConfig, points: list[dict]):
    """Optuna through Tune (the space comes from the Tuner's param_space)."""
    from ray.tune.search.optuna import OptunaSearch

    import optuna

    metric, mode = sweep.metrics_and_modes()
    # Concurrent trials: TPE's constant liar counts running trials as bad, so it spreads them out.
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=sweep.seed, n_startup_trials=sweep.tpe_startup_trials,
                                                  multivariate=sweep.tpe_multivariate,
                                                  constant_liar=sweep.max_concurrent_trials > 1),
        "nsga2": lambda: compat.nsga2_sampler(seed=sweep.seed, population_size=sweep.nsga2_population),
        "random": lambda: optuna.samplers.RandomSampler(seed=sweep.seed),
    }

    class SafeOptunaSearch(OptunaSearch):
        """Optuna never sees a failed trial's stale metrics nor a NaN objective: both are FAIL."""

        def on_trial_complete(self, trial_id, result=None, error=False):
            keys = metric if isinstance(metric, list) else [metric]
            values = [(result or {}).get(k) for k in keys]
            if error or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                result, error = None, True
            super().on_trial_complete(trial_id, result=result, error=error)

    return SafeOptunaSearch(metric=metric, mode=mode, points_to_evaluate=points or None,
                            sampler=samplers[sweep.sampler]())


def tune_domains(space: dict[str, dict], grid_as_choice: bool):
    """Ray Tune domains for a space spec (grid → tune.grid_search, or choice under Optuna)."""
    from ray import tune

    out = {}
    for name, spec in space.items():
        kind = spec["type"]
        if kind == "loguniform":
            out[name] = tune.loguniform(spec["low"], spec["high"])
        elif kind == "uniform":
            out[name] = tune.uniform(spec["low"], spec["high"])
        elif kind == "quniform":
            out[name] = tune.quniform(spec["low"], spec["high"], spec.get("q", 1))
        elif kind == "choice" or (kind == "grid" and grid_as_choice):
            out[name] = tune.choice(spec["values"])
        else:
            out[name] = tune.grid_search(spec["values"])
    return out


class SkipsEndedTrials:
    """Tune's FIFO choice of the next trial to run (the first PENDING trial, else the first PAUSED one) without
    walking the trials that already ended: Tune keeps every trial of the sweep in one list and asks at every
    step of its loop, so its walk grew with the sweep (a fifth of the driver's main thread at 3,000 trials,
    py-spy, benchmarks/README.md §4). A trial that ended stays ended within a `fit`, so the list's ended prefix
    is skipped; another controller's list (a resumed sweep) is walked from the top."""

    def choose_trial_to_run(self, tune_controller):
        # the controller's own list: Tune hands the scheduler a new wrapper of its controller at every call
        trials = tune_controller.get_trials()
        walked, start = getattr(self, "_ended_prefix", (None, 0))
        if walked is not trials or start > len(trials):
            start = 0
        while start < len(trials) and trials[start].status in (Trial.TERMINATED, Trial.ERROR):
            start += 1
        self._ended_prefix = (trials, start)
        for wanted in (Trial.PENDING, Trial.PAUSED):
            for i in range(start, len(trials)):
                if trials[i].status == wanted:
                    return trials[i]
        return None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_ended_prefix"}  # never the controller's trials


class FifoScheduler(SkipsEndedTrials, FIFOScheduler):
    """Tune's default scheduler (run every trial to its end), choosing the next trial as `SkipsEndedTrials`."""


class AshaScheduler(SkipsEndedTrials, ASHAScheduler):
    """``sweep.scheduler.type: asha``: Tune's asynchronous successive halving, choosing as `SkipsEndedTrials`."""


class MedianStopping(SkipsEndedTrials, MedianStoppingRule):
    """``sweep.scheduler.type: median``: Tune's median stopping rule, choosing as `SkipsEndedTrials`."""


def _scheduler(sweep: SweepConfig):
    s = sweep.scheduler
    if s.type == "asha":
        return AshaScheduler(time_attr="step", metric=s.metric, mode=s.mode, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor, max_t=10**9)
    if s.type == "median":
        return MedianStopping(time_attr="step", metric=s.metric, mode=s.mode, grace_period=s.grace_period)
    return FifoScheduler()


class NoTensorBoardLogs(TBXLoggerCallback):
    """Stands in for the TensorBoard logger Tune adds to every `fit` unless one is given (Tune adds its CSV,
    JSON and TensorBoard loggers only where the callbacks have none of that kind): no event files. A sweep's
    metrics are in MLflow (and each trial's ``result.json``/``progress.csv``, which Tune's restore reads);
    TensorBoard's writer — a thread and a file per trial, a flush per result — was a quarter of the sweep
    driver's main-thread time over thousands of one-second trials (py-spy, benchmarks/README.md §4)."""

    def __init__(self) -> None:  # no tensorboardX needed
        pass

    def log_trial_start(self, trial) -> None:
        pass

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        pass

    def log_trial_end(self, trial, failed: bool = False) -> None:
        pass


@dataclass
class SweepResult:
    name: str
    method: str
    rows: list[dict]
    directory: Path
    parent_run_id: str | None
    files: dict = field(default_factory=dict)
    interrupted: bool = False  # Ctrl-C stopped the sweep before every planned trial ended


def run_method_sweep(config: ExperimentConfig, sweep: SweepConfig, method: str, plan, *, name: str, resume: bool,
                     uri: str | None, parent_of: str | None = None, phase: str = SEARCH, log=print) -> SweepResult:
    """One Tuner over one method's space (the unit `sweep`, `compare` and its seeds phase are built from)."""
    space = method_space(sweep, method, config.training.learning_rate)
    defaults = {**config.method.resolved(), "learning_rate": config.training.learning_rate,
                "seed": config.training.seed}
    points = starting_points(sweep, method, space, defaults)
    total = planned_trials(sweep, space)
    progress = TrialProgress(sweep.accuracy_key, total, name)
    callbacks: list = [progress]
    parent_id = None
    if uri:
        parent_id, tracker = _parent_run(config, sweep, method, name, uri, space, points, parent_of, phase,
                                         data={k: getattr(plan, k) for k in DATA_KEYS})
        callbacks.append(tracker)
        send_sweep_pending(uri, parent_id, log=log)  # what a driver that died left unsent: first
    tuner = _tuner(config, sweep, method, plan, name, space, points, callbacks, resume, log)
    _ENDED.pop(name, None)
    try:
        with _tune_environment(sweep):
            grid = tuner.fit()
    except BaseException:
        if uri:
            send_sweep_pending(uri, parent_id, tracking.EXIT_WAIT_S, log)
        raise
    if uri:  # the trials' metrics and ends still in the sweep's file, before its summary and close
        send_sweep_pending(uri, parent_id, log=log)
    # Tune answers the first Ctrl-C by saving its state and returning from `fit` as if done: a trial that
    # did not end (Tune's own count of terminated and errored trials), or fewer trials than planned, means
    # the sweep was interrupted; which trials did not end, the callbacks' record of those that did says.
    ids = {Path(r.path or "?").name for r in grid}
    ended_here = _ENDED.pop(name, set()) | _ENDED.pop("", set())  # "": a callback pickled without a name
    interrupted = grid.num_terminated + grid.num_errors < len(grid) or len(ids) < total
    unended = ids - ended_here if interrupted else set()
    rows = res.rows_from_result_grid(grid, method, config.ray.num_workers, phase=phase, seed=config.training.seed,
                                     unended=unended)
    if phase == SEEDS:  # re-runs of one configuration: the front is the search's
        rows = [{**r, "pareto": False} for r in rows]
    else:
        rows = res.mark_pareto(rows, sweep.accuracy_metric, include_stopped=sweep.pareto_includes_stopped)
    return SweepResult(name=name, method=method, rows=rows, directory=config.run_dir.parent / name,
                       parent_run_id=parent_id, interrupted=interrupted)


def _parent_run(config: ExperimentConfig, sweep: SweepConfig, method: str, name: str, uri: str, space: dict,
                points: list, parent_of: str | None, phase: str = SEARCH, data: dict | None = None):
    """The sweep's MLflow parent run (started or resumed) and the callback that writes its child runs."""
    from mlflow.tracking import MlflowClient

    storage = config.storage_path()
    parent_id, _ = tracking.start_or_resume_run(
        uri, config.tracking.experiment_name, name, tracking.run_key(storage, name),
        tags={KIND_TAG: "sweep", SWEEP_TAG: name, METHOD_TAG: method, PHASE_TAG: phase,
              **({PARENT_TAG: parent_of} if parent_of else {})},
        params={"method": method, "num_samples": str(sweep.num_samples), "objective": sweep.objective,
                "sampler": sweep.sampler, "seed": str(sweep.seed)},
    )
    client = MlflowClient(uri)
    client.log_dict(parent_id, {"search_space": space, "points_to_evaluate": points}, "search_space.json")
    client.log_dict(parent_id, secrets.mask_secrets(config.to_dict()), "config.json")
    experiment_id = client.get_run(parent_id).info.experiment_id
    return parent_id, SweepMLflowCallback(uri, experiment_id, parent_id, name, method, config.ray.num_workers,
                                          phase=phase, seed=config.training.seed, data=data)


def planned_trials(sweep: SweepConfig, space: dict[str, dict]) -> int:
    """Trials a sweep runs: ``num_samples``, or with ``search: grid`` the product of its grid sizes."""
    if sweep.search != "grid":
        return sweep.num_samples
    return math.prod(len(spec["values"]) for spec in space.values() if spec["type"] == "grid")


def trial_resources(config: ExperimentConfig, sweep: SweepConfig) -> dict[str, float]:
    """What Tune reserves for one trial, and so what an autoscaler adds nodes for.

    A direct single-worker trial is the training worker: all of ``ray.resources_per_worker``, custom
    resources included (CPU 1 and, with ``use_gpu``, GPU 1 unless given), exactly as a Ray Train worker
    would ask. A multi-worker trial only drives a nested `TorchTrainer`: ``sweep.trial_cpus`` CPU
    anywhere (on a head with no CPUs, a sliver of a worker node); its workers ask for their own."""
    if config.ray.num_workers == 1 and sweep.direct_single_worker:
        resources = {"CPU": 1, **config.ray.resources_per_worker}
        if config.ray.use_gpu:
            resources.setdefault("GPU", 1)
        return resources
    return {"CPU": sweep.trial_cpus}


def _tuner(config: ExperimentConfig, sweep: SweepConfig, method: str, plan, name: str, space: dict, points: list,
           callbacks: list, resume: bool, log):
    """A new `Tuner` over the method's space, or (``--resume``) the one restored from storage."""
    from ray import tune
    from ray.tune import FailureConfig, RunConfig, TuneConfig, Tuner


    storage = config.storage_path()
    experiment_dir = run_storage.join(storage, name)
    direct = config.ray.num_workers == 1 and sweep.direct_single_worker
    resources = trial_resources(config, sweep)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=config.to_dict(), method=method, plan=plan.to_dict(), sweep_name=name,
                             trainers_path=run_storage.join(storage, f"{name}-trainers")),
        resources,
    )
    use_grid = sweep.search == "grid"
    if resume and Tuner.can_restore(experiment_dir):
        log(f"[sweep] resuming {name} from {experiment_dir}")
        ended = journal.reconcile(experiment_dir, None if use_grid else (lambda: _searcher(sweep, points)))
        for tracker in (c for c in callbacks if isinstance(c, SweepMLflowCallback)):
            tracker.close_ended(ended)
        analysis_logger = logging.getLogger("ray.tune.analysis.experiment_analysis")
        analysis_logger.addFilter(_no_missing_results_warning)
        try:
            return Tuner.restore(experiment_dir, trainable, resume_unfinished=True, resume_errored=False,
                                 restart_errored=False)
        finally:
            analysis_logger.removeFilter(_no_missing_results_warning)
    if resume:
        log(f"[sweep] nothing to resume at {experiment_dir}; starting {name}")
    tune_config = TuneConfig(
        search_alg=None if use_grid else _searcher(sweep, points),
        scheduler=_scheduler(sweep),
        num_samples=sweep.num_samples if not use_grid else 1,
        max_concurrent_trials=sweep.max_concurrent_trials,
        reuse_actors=direct,
        trial_dirname_creator=lambda trial: trial.trial_id,
    )
    return Tuner(
        trainable,
        param_space=tune_domains(space, grid_as_choice=not use_grid),
        tune_config=tune_config,
        run_config=RunConfig(name=name, storage_path=storage,
                             callbacks=[journal.TrialJournal(), *callbacks, NoTensorBoardLogs()],
                             failure_config=FailureConfig(max_failures=sweep.max_failures), verbose=0),
    )


def _no_missing_results_warning(record: logging.LogRecord) -> bool:
    """Drop Tune's "Failed to fetch metrics for N trial(s)" on restore when every one of them merely has no
    results yet (a trial the killed driver had just started: ``result.json and progress.csv were not
    found``); it resumes, and any other failure to read results is still shown."""
    message = record.getMessage()
    if not message.startswith("Failed to fetch metrics for"):
        return True
    entries = [line for line in message.splitlines()[1:] if line.startswith("- ")]
    return not entries or not all("were not found" in line for line in entries)


def _no_restore_advice(record: logging.LogRecord) -> bool:
    """Drop Tune's "Resume experiment with: Tuner.restore(path=..., trainable=...)" after Ctrl-C: Python-API
    advice that a CLI user cannot follow (Ray 2.60 has no setting for it); the command prints its own
    ``--resume`` line instead."""
    return "Tuner.restore(" not in record.getMessage()


@contextlib.contextmanager
def _tune_environment(sweep: SweepConfig):
    """Tune's process-wide switches for this sweep's `fit` only (its controller reads them when `fit`
    starts; previous values are restored after):

    * `TUNE_GLOBAL_CHECKPOINT_S`, the period of Tune's full experiment-state save (every trial's record and
      the searcher; its cost grows with the trials): ``sweep.experiment_checkpoint_s``, 30 s by default —
      the trial journal (`journal.TrialJournal`) records each trial's start, checkpoints and end at once, so
      a killed driver never re-runs a finished trial whatever the period (a grid sweep too: `--resume`
      advances its saved variant generator past the trials the journal holds);
    * `TUNE_PRINT_ALL_TRIAL_ERRORS=0` (unless set): no full traceback on the console for each failed
      trial; `TrialProgress` prints one line per failure and the trace stays in the trial's error file;
    * `RAY_AIR_NEW_OUTPUT=0`: Tune's legacy reporter, which honours ``verbose=0`` (the new one prints its
      configuration box and a TensorBoard hint regardless); `TrialProgress` prints the trial lines;
    * a filter on Tune's logger that drops its ``Tuner.restore(...)`` advice after Ctrl-C (`_no_restore_advice`)."""
    period = DEFAULT_CHECKPOINT_S if sweep.experiment_checkpoint_s is None else sweep.experiment_checkpoint_s
    values = {CHECKPOINT_PERIOD_ENV: str(period), "RAY_AIR_NEW_OUTPUT": "0",
              "TUNE_PRINT_ALL_TRIAL_ERRORS": os.environ.get("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")}
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    tune_logger = logging.getLogger("ray.tune.tune")
    tune_logger.addFilter(_no_restore_advice)
    try:
        yield
    finally:
        tune_logger.removeFilter(_no_restore_advice)
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _finish(result: SweepResult, sweep: SweepConfig, uri: str | None, reference_accuracy, title: str) -> None:
    """Tables, plots, results.json; the parent run gets them as artifacts and is finished. An interrupted
    sweep (`SweepResult.interrupted`) gets its tables, then raises `SweepInterrupted`: its runs are marked
    KILLED on the way out, and its summary metrics wait for the ``--resume`` that completes it."""
    accuracy = sweep.accuracy_metric
    files = res.write_tables(result.rows, result.directory)
    files.update(plots.write_plots({result.method: result.rows}, accuracy, result.directory, reference_accuracy))
    result.files = files
    res.print_trials(result.rows, accuracy, title + (" — interrupted" if result.interrupted else ""))
    if uri and result.parent_run_id:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        for path in files.values():
            client.log_artifact(result.parent_run_id, str(path))
    if result.interrupted:
        raise SweepInterrupted()
    if uri and result.parent_run_id:
        # Step = trials in the table: a resumed sweep that ran more trials adds a point, and one that
        # finds nothing new (a second --resume) logs nothing again — each (key, step) once.
        step = len(result.rows)
        summary = {k: v for k, v in res.method_summary(result.rows, accuracy).items() if k != "method"
                   and not any(m.step == step for m in client.get_metric_history(result.parent_run_id, k))}
        log_metrics(client, result.parent_run_id, summary, step)
        close_run(client, result.parent_run_id)


def _experiment_of(uri: str | None, run_id: str | None) -> str | None:
    if not uri or not run_id:
        return None
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri).get_run(run_id).info.experiment_id


def _prepare(config: ExperimentConfig, methods: list[str], log):
    """Data + reference cache, once for every method of the sweep (the cache only if one needs it)."""
    return prepare_run(config, log=log, need_reference=any(needs_reference(m) for m in methods))


def with_method(config: ExperimentConfig, method: str) -> ExperimentConfig:
    """The config with `method` and that method's default hyperparameters."""
    return config_from_dict({**config.to_dict(), "method": {"name": method}}, f"{config.name} [{method}]")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_json(uri: str) -> dict | None:
    fs, path = storage.resolve(uri)
    try:
        with fs.open_input_stream(path) as handle:
            data = json.loads(handle.read() or b"null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _create_lock(lock_uri: str, holder: dict) -> bool:
    """Create the lock file if there is none (atomically on local and NFS paths); True if created."""
    if "://" in lock_uri:  # object stores have no exclusive create: check, then write
        if storage.exists(lock_uri):
            return False
        storage.write_json(lock_uri, holder)
        return True
    Path(lock_uri).parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock_uri, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        json.dump(holder, handle)
    return True


def _remove_lock(lock_uri: str) -> None:
    fs, path = storage.resolve(lock_uri)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


@contextlib.contextmanager
def sweep_lock(storage_path: str, name: str):
    """Hold the sweep or compare `name` while it runs: ``{storage_path}/{name}.lock`` names the holder
    (pid, host, start). Another sweep of the same name refuses (`SweepRunning`) while the holder
    lives; a lock left by a dead process on this host is taken over; the holder removes it at the end."""
    lock_uri = storage.join(storage_path, f"{name}.lock")
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              "token": uuid.uuid4().hex}
    try:
        for _ in range(3):
            if _create_lock(lock_uri, holder):
                break
            current = _read_json(lock_uri)
            if current and current.get("host") == holder["host"] and isinstance(current.get("pid"), int) \
                    and not _pid_alive(current["pid"]):
                _remove_lock(lock_uri)  # its holder died without releasing it (killed)
                continue
            who = (f"pid {current.get('pid')} on {current.get('host')} since {current.get('since')}" if current
                   else "a process that is starting")
            raise SweepRunning(
                f"sweep {name!r} is already running: {lock_uri} is held by {who}. Wait for it to end or use another "
                f"name (--set sweep.name=NEW); if that process is gone, remove {lock_uri}.")
        else:
            raise SweepRunning(f"sweep {name!r}: could not take the lock {lock_uri}; remove it if no sweep is running")
    except OSError as err:
        raise AlphaDPOError(f"cannot create the sweep lock {lock_uri}: {err}") from None
    try:
        yield lock_uri
    finally:
        if (_read_json(lock_uri) or {}).get("token") == holder["token"]:
            _remove_lock(lock_uri)


def _refuse_existing(config: ExperimentConfig, uri: str | None, names: list[str], kind: str) -> None:
    """Without ``--resume`` a sweep or compare never adds to one of the same name: its Tune experiment
    in storage or its MLflow runs (parent, or a compare's per-method sweeps) mean `SweepExists`."""
    experiments = [storage.join(config.storage_path(), n) for n in names]
    experiments = [e for e in experiments if storage.exists(e)]
    runs = []
    if uri:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(config.tracking.experiment_name)
        for n in names if experiment else []:
            found = client.search_runs([experiment.experiment_id], f"tags.`{SWEEP_TAG}` = '{n}'", max_results=50)
            runs += [f"{r.info.run_id} ({n})" for r in found if r.data.tags.get(KIND_TAG) != "trial"]
    if not experiments and not runs:
        return
    where = "; ".join([*(f"Tune experiment {e}" for e in experiments),
                       *([f"MLflow run(s) {', '.join(runs)} in {redact(uri)}"] if runs else [])])
    way = (f"continue it with `alphadpo-ray {kind} CONFIG --resume`, or start a separate one with "
           "--set sweep.name=NEW" if experiments else
           "its storage is gone, so it cannot be resumed: start a separate one with --set sweep.name=NEW")
    raise SweepExists(f"{kind} {names[0]!r} already exists ({where}). Nothing was started; {way}.")


def _start(config: ExperimentConfig, address: str | None, names: list[str] | None = None, resume: bool = True,
           kind: str = "sweep"):
    """Preflight, the tracking store (created under its lock), the name check (without ``--resume``),
    then Ray."""
    preflight(config)  # paths, disk, DeepSpeed config, hub ids: before Ray starts
    uri = None
    if config.tracking.enabled:
        uri = tracking.resolve_tracking_uri(config.tracking.tracking_uri)
        tracking.create_sqlite_store(uri)
        tracking.check_tracking(uri)
    if not resume and names:
        _refuse_existing(config, uri, names, kind)
    init_ray(config, address)
    return uri


def run_sweep(config: ExperimentConfig, *, resume: bool = False, address: str | None = None, log=print) -> SweepResult:
    """`alphadpo-ray sweep`: one method (the config's) searched with Tune + Optuna. The sweep's name is
    held (`sweep_lock`) while it runs; without `resume` an existing sweep of that name is refused."""
    name = sweep_settings(config).name or f"{config.name}-sweep"
    with sweep_lock(config.storage_path(), name):
        try:
            return _run_sweep(config, resume=resume, address=address, log=log)
        except BaseException as err:
            close_open_runs(config, [name], err, log)
            raise


def _run_sweep(config: ExperimentConfig, *, resume: bool, address: str | None, log) -> SweepResult:
    sweep = sweep_settings(config)
    method = config.method.name
    name = sweep.name or f"{config.name}-sweep"
    start = time.time()
    uri = _start(config, address, [name], resume, "sweep")
    plan = _prepare(config, [method], log)
    trials = planned_trials(sweep, method_space(sweep, method, config.training.learning_rate))
    log(f"[sweep] {name}: {method}, {trials} trials, objective {sweep.objective} "
        f"({', '.join(_as_list(sweep.metrics_and_modes()[0]))}), "
        f"{plan.total_steps} steps per trial, up to {sweep.max_concurrent_trials} at once")
    result = run_method_sweep(config, sweep, method, plan, name=name, resume=resume, uri=uri, log=log)
    reference_accuracy = (plan.reference_metrics or {}).get(sweep.accuracy_metric)
    _finish(result, sweep, uri, reference_accuracy, f"sweep {name} ({method})")
    (result.directory / "results.json").write_text(json.dumps({
        "name": name, "method": method, "reference_metrics": plan.reference_metrics,
        "pareto": res.pareto_front(result.rows, sweep.accuracy_metric),
        "summary": res.method_summary(result.rows, sweep.accuracy_metric),
        "mlflow_parent_run_id": result.parent_run_id, "tracking_uri": redact(uri),
        "mlflow_experiment_id": _experiment_of(uri, result.parent_run_id),
        "files": {k: str(v) for k, v in result.files.items()}, "wall_seconds": round(time.time() - start, 1),
    }, indent=2, default=str))
    if not any(r["status"] == "finished" for r in result.rows):
        raise SweepFailed(f"sweep {name}: every trial failed (see the table above and {result.directory})")
    return result


def run_compare(config: ExperimentConfig, *, resume: bool = False, address: str | None = None, log=print) -> dict:
    """`alphadpo-ray compare`: the same sweep budget for each method, side by side. Its name is held
    (`sweep_lock`) while it runs; without `resume` an existing compare of that name is refused."""
    name = sweep_settings(config).name or f"{config.name}-compare"
    with sweep_lock(config.storage_path(), name):
        try:
            return _run_compare(config, resume=resume, address=address, log=log)
        except BaseException as err:
            sweep = sweep_settings(config)
            methods = sweep.methods or list(method_names())
            close_open_runs(config, [name, *(f"{name}-{m}" for m in methods), *(f"{name}-{m}-seeds" for m in methods)],
                            err, log)
            raise


def close_open_runs(config: ExperimentConfig, names: list[str], err: BaseException, log=print) -> None:
    """On the way out of a sweep or compare (Ctrl-C, SIGTERM, an error): its MLflow runs still RUNNING —
    the compare run, the sweeps' parent runs and their trial runs, found by their ``alphadpo.sweep`` tag —
    are marked KILLED (an interrupt) or FAILED (an error); `--resume` sets them RUNNING again. A store that
    does not answer is one line: they stay RUNNING there. Never raises."""
    if not config.tracking.enabled:
        return
    uri = tracking.resolve_tracking_uri(config.tracking.tracking_uri)
    status = tracking.exit_status(err)
    try:
        if not tracking.server_reachable(uri):
            raise OSError("does not answer")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(config.tracking.experiment_name)
        if experiment is None:
            return
        closed = 0
        for name in names:
            for run in list(tracking.search_all_runs(
                    client, [experiment.experiment_id],
                    f"tags.`{SWEEP_TAG}` = '{name}' and attributes.status = 'RUNNING'")):
                client.set_terminated(run.info.run_id, status)
                closed += 1
        if closed:
            log(f"[mlflow] {closed} run(s) of {names[0]} marked {status}")
    except BaseException as failure:  # noqa: BLE001 - unreachable store, or interrupted again while closing
        log(f"[mlflow] tracking store {secrets.redact(uri)} unreachable ({secrets.redact(str(failure))[:200]}): "
            f"the runs of {names[0]} stay RUNNING in the store until it is resumed")


def seeds_settings(sweep: SweepConfig, method: str, point: dict, seeds: list[int]) -> SweepConfig:
    """The seeds phase's sweep settings: a grid over nothing but `seeds`, every hyperparameter fixed at
    `point` (no starting points, no early stopping)."""
    grid = {k: {"type": "grid", "values": [v]} for k, v in point.items()}
    grid["seed"] = {"type": "grid", "values": list(seeds)}
    return sweep.model_copy(update={"search": "grid", "points_to_evaluate": False, "num_samples": 1,
                                    "search_space": {method: grid}, "scheduler": SchedulerConfig()})


def _seeds_point(config: ExperimentConfig, sweep: SweepConfig, name: str, search_rows: list[dict],
                 resume: bool) -> dict | None:
    """What the seeds phase `name` re-runs: the best search trial's hyperparameters and `sweep.seeds`
    training seeds above every seed the search used (so the winner's selection luck is not counted
    again). Stored with the phase's Tune experiment, so a resumed compare re-runs the same point."""
    uri = storage.join(config.storage_path(), name, "seeds_point.json")
    stored = _read_json(uri) if resume else None
    if stored:
        return stored
    best = res.best_search_row(search_rows, sweep.accuracy_metric)
    if best is None:
        return None
    used = [int(r["seed"]) for r in search_rows if isinstance(r.get("seed"), int)] or [config.training.seed]
    point = {"trial_id": best["trial_id"], "config": res.best_config(best),
             "seeds": list(range(max(used) + 1, max(used) + 1 + sweep.seeds))}
    storage.write_json(uri, point)
    return point


def _budget(by_method: dict[str, list[dict]], total_steps: int, pairs_per_step: int, seeds: int) -> dict:
    """Each method's spend: search and seed trials × steps × pairs. Every method must spend the same
    (a method whose search had no finished trial ran no seeds phase: it is only reported)."""
    budget = {}
    for method, rows in by_method.items():
        search = sum(r.get("phase") != SEEDS for r in rows)
        seeded = len(rows) - search
        budget[method] = {"search_trials": search, "seed_trials": seeded, "steps_per_trial": total_steps,
                          "pairs_per_step": pairs_per_step,
                          "pair_steps": (search + seeded) * total_steps * pairs_per_step}
    searched = {b["search_trials"] for b in budget.values()}
    reseeded = {b["seed_trials"] for b in budget.values() if b["seed_trials"] or not seeds}
    if len(searched) > 1 or len(reseeded) > 1:
        raise SweepFailed(f"unequal budgets across methods (trials × steps × seeds): {budget}")
    return budget


def _run_compare(config: ExperimentConfig, *, resume: bool, address: str | None, log) -> dict:
    sweep = sweep_settings(config)
    # Methods are ranked on the method-independent reward: their own implicit-reward accuracies differ in scale.
    sweep = sweep.model_copy(update={"accuracy_metric": "accuracy_logratio"})
    methods = sweep.methods or list(method_names())
    name = sweep.name or f"{config.name}-compare"
    start = time.time()
    names = [name, *(f"{name}-{m}" for m in methods), *(f"{name}-{m}-seeds" for m in methods if sweep.seeds)]
    uri = _start(config, address, names, resume, "compare")
    plan = _prepare(config, methods, log)
    pairs = config.training.total_batch_size
    log(f"[compare] {name}: {', '.join(methods)} — each {sweep.num_samples} search + {sweep.seeds} seed trials "
        f"× {plan.total_steps} steps × {pairs} pairs "
        f"= {(sweep.num_samples + sweep.seeds) * plan.total_steps * pairs} pair-steps, same data and model")
    compare_id = None
    if uri:
        compare_id, _ = tracking.start_or_resume_run(
            uri, config.tracking.experiment_name, name, tracking.run_key(config.storage_path(), name),
            tags={KIND_TAG: "compare", SWEEP_TAG: name},
            params={"methods": ",".join(methods), "num_samples": str(sweep.num_samples), "seeds": str(sweep.seeds),
                    "total_steps": str(plan.total_steps)},
        )
    compare_config = config.model_copy(update={"sweep": sweep})
    by_method: dict[str, list[dict]] = {}
    method_runs: dict[str, str] = {}
    for method in methods:
        method_config = with_method(compare_config, method)
        result = run_method_sweep(method_config, sweep, method, plan, name=f"{name}-{method}", resume=resume,
                                  uri=uri, parent_of=compare_id, log=log)
        _finish(result, sweep, uri, 0.5, f"{name}: {method}")
        by_method[method] = result.rows
        if result.parent_run_id:
            method_runs[method] = result.parent_run_id
        point = _seeds_point(config, sweep, f"{name}-{method}-seeds", result.rows, resume) if sweep.seeds else None
        if sweep.seeds and point is None:
            log(f"[compare] {method}: no search trial finished, so no seeds phase")
        if point:
            seeded = run_method_sweep(method_config, seeds_settings(sweep, method, point["config"], point["seeds"]),
                                      method, plan, name=f"{name}-{method}-seeds", resume=resume, uri=uri,
                                      parent_of=compare_id, phase=SEEDS, log=log)
            _finish(seeded, sweep, uri, 0.5, f"{name}: {method}, best trial {point['trial_id']} with seeds "
                    f"{', '.join(map(str, point['seeds']))}")
            by_method[method] += seeded.rows
    budget = _budget(by_method, plan.total_steps, pairs, sweep.seeds)
    directory = config.run_dir.parent / name
    summaries = res.rank_methods(by_method, "accuracy_logratio")
    title = f"compare {name}: methods ranked on accuracy_logratio" + (" over seeds" if sweep.seeds else "")
    res.print_methods(summaries, "accuracy_logratio", title)
    files = plots.write_compare_files(by_method, summaries, directory, title)
    summary = {"name": name, "methods": summaries, "interval_method": res.interval_caption(summaries),
               "budget": budget, "files": {k: str(v) for k, v in files.items()},
               "mlflow_compare_run_id": compare_id, "tracking_uri": secrets.redact(uri),
               "mlflow_experiment_id": _experiment_of(uri, compare_id), "wall_seconds": round(time.time() - start, 1)}
    files["results"] = directory / "results.json"
    files["results"].write_text(json.dumps(summary, indent=2, default=str))
    if uri and compare_id:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        for path in files.values():
            client.log_artifact(compare_id, str(path))
        all_rows = [r for rows in by_method.values() for r in rows]
        study = config.study.model_dump() if config.study else None
        publish_compare(client, compare_id, method_runs, summaries, all_rows, title,
                        compare_description(summaries, title, all_rows, study))
        tracking.close_run(client, compare_id)
    return summary


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def run_study(config: ExperimentConfig, *, command: str, resume: bool = False, address: str | None = None,
              log=print) -> dict:
    """Run the study's sweep or compare, then write and log its report."""
    study = config.study
    if study is None:
        raise AlphaDPOError(f"config {config.name!r} has no study section: run it with `sweep` or `compare`, "
                            f"or add study: {{kind, title}}")
    load_before, start = _load(), time.time()
    if study.kind == "sweep":
        result = run_sweep(config, resume=resume, address=address, log=log)
        rows, methods, directory, run_id = result.rows, None, result.directory, result.parent_run_id
        files, uri = result.files, json.loads((directory / "results.json").read_text()).get("tracking_uri")
    else:
        summary = run_compare(config, resume=resume, address=address, log=log)
        directory = Path(summary["files"]["json"]).parent
        rows = json.loads(Path(summary["files"]["json"]).read_text())
        methods, run_id, files, uri = (summary["methods"], summary["mlflow_compare_run_id"], summary["files"],
                                       summary["tracking_uri"])
    tables = study_tables(study, rows, methods)
    context = {"command": command, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
               "wall_seconds": time.time() - start, "load_before": load_before, "load_after": _load()}
    plots = {k: os.path.relpath(v, directory) for k, v in files.items() if str(v).endswith(".png")}
    written = write_study(tables, context, plots, directory)
    _log_to_mlflow(config, run_id, written, markdown(tables, context, {}))
    print_study(tables)
    log(f"[study] {study.title}: {written['markdown']}")
    return {"directory": directory, "tables": tables, "files": written, "mlflow_run_id": run_id, "tracking_uri": uri}


def _log_to_mlflow(config: ExperimentConfig, run_id: str | None, files: dict[str, Path], description: str) -> None:
    """The study's files as artifacts of its run, and its tables and verdict as the run's description."""
    if not run_id or not config.tracking.enabled:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(resolve_tracking_uri(config.tracking.tracking_uri))
    for path in files.values():
        client.log_artifact(run_id, str(path))
    client.set_tag(run_id, NOTE_TAG, description)
