"""MLflow for sweeps: one parent run per sweep, one nested child run per trial, written from the driver.

`SweepMLflowCallback` is a Tune callback: it runs in the sweep driver and sees every trial's
results, so concurrent trials never write to the store themselves (SQLite would lock). A trial's child
run (its creation with tags, params and dataset inputs, when the trial starts), its metrics and its end
(status tags, close) are appended to the sweep's `PendingMetrics` file (`sweep_pending`, one per sweep)
and sent by one background `MetricsSender`, so Tune's event loop never waits on the store: a slow or
unreachable store delays the runs and metrics, not the sweep. The driver sends what is left when the
sweep ends, with a bounded wait (`send_sweep_pending`); what the store did not take stays in the file and
is sent first by the next ``--resume``. Trial → MLflow run ids are kept in the callback's saved state
*and* recoverable from MLflow itself (child runs are tagged with sweep id and trial id), so a resumed
sweep continues the same child runs instead of creating duplicates. A trial resumed from a checkpoint
(a restored sweep, a restarted trial) reports its replayed steps again; each child run logs every step
once (steps at or below the highest one already in its history are skipped).

A trial that ended without error before its ``total_steps`` (an ASHA/median scheduler stopped it) is
an MLflow ``FINISHED`` run tagged ``alphadpo.status = stopped early`` with the step it stopped at
(``alphadpo.steps``), so `report` can tell it from a trial that trained to the end. Sweep and trial runs
carry ``alphadpo.phase`` (``search``, or ``seeds`` for a compare's re-runs of a method's best
configuration) and trial runs ``alphadpo.seed`` (their ``training.seed``), so `report` rebuilds a
compare's seed statistics from MLflow alone. Trial runs also hold ``method``, ``phase`` and ``seed`` as
params (the runs table groups by them), the objective among their metrics (sortable), and the training and
held-out data as dataset inputs.
"""

from __future__ import annotations

import re
import time

from ray.tune import Callback

from ..services.tracking import (FINISH_WAIT_S, NEW_RUN, MetricsSender, PendingMetrics, close_run,
                                 default_pending_path, last_logged_step, new_run_key, numeric_metrics,
                                 report_by_step, search_all_runs, send_pending)

KIND_TAG, SWEEP_TAG, TRIAL_TAG, METHOD_TAG = "alphadpo.kind", "alphadpo.sweep", "alphadpo.trial_id", "method"
ERROR_TAG, WORKERS_TAG = "alphadpo.error", "alphadpo.workers"
STATUS_TAG, STEPS_TAG, TOTAL_STEPS_TAG = "alphadpo.status", "alphadpo.steps", "alphadpo.total_steps"
PHASE_TAG, SEED_TAG = "alphadpo.phase", "alphadpo.seed"  # a compare's phase ("search"/"seeds"); training.seed
SEARCH, SEEDS = "search", "seeds"
PARENT_TAG = "mlflow.parentRunId"
DATA_KEYS = ("train_uri", "train_pairs", "eval_uri", "eval_pairs")  # what a trial's dataset inputs read of the plan
FINISHED, STOPPED, FAILED = "finished", "stopped early", "failed"


def trial_status(result: dict | None, error=None) -> str:
    """``failed`` if the trial raised; ``stopped early`` if it ended without error before its
    ``total_steps`` (every recipe report carries ``step`` and ``total_steps``; only a scheduler stops a
    trial that way); else ``finished``."""
    if error:
        return FAILED
    step, total = (result or {}).get("step"), (result or {}).get("total_steps")
    if isinstance(step, (int, float)) and isinstance(total, (int, float)) and step < total:
        return STOPPED
    return FINISHED


# Lines of a trial's traceback that say what went wrong whatever else it holds: divergence, out of memory.
TELLING_LINES = (r"non-finite loss[^\n]*", r"(out of memory|OutOfMemory)[^\n]*")


def error_reason(text: str) -> str:
    """The line of a trial's traceback that says what went wrong (a `TELLING_LINES` match, else its last line)."""
    for pattern in TELLING_LINES:
        match = re.search(pattern, text or "")
        if match:
            return match.group(0)[:500]
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "trial failed")[:500]


def trial_error_text(trial) -> str:
    """A failed trial's error text, read from its local error file (storage gets it only later)."""
    try:
        path = trial.error_file
        if path:
            with open(path) as handle:
                return handle.read()
    except OSError:
        pass
    try:
        return str(trial.get_error() or "")
    except Exception:  # noqa: BLE001
        return ""


# A sweep's pending file → this process's sender for it: one per sweep, shared by every instance of its
# callback (a resumed Tuner runs one unpickled from its storage) and the driver's sends at the sweep's start
# and end, so the steps one of them has sent the others know (`PendingMetrics.floors`).
_SENDERS: dict[str, MetricsSender] = {}


def sweep_sender(uri: str, parent_run_id: str) -> MetricsSender:
    """The background sender of the sweep's pending file (started on first use)."""
    path = str(default_pending_path(parent_run_id))
    if path not in _SENDERS:
        _SENDERS[path] = MetricsSender(PendingMetrics(uri, path), "the sweep")
    return _SENDERS[path]


def sweep_pending(uri: str, parent_run_id: str) -> PendingMetrics:
    """The sweep's file of trial metrics and ends not yet in the store (one per sweep, named by its parent run)."""
    return sweep_sender(uri, parent_run_id).pending


def send_sweep_pending(uri: str, parent_run_id: str, wait_s: float = FINISH_WAIT_S, log=print) -> bool:
    """Send what the sweep's file holds (a sweep ending, or resuming after a driver that died with some
    unsent), waiting up to `wait_s` for an unreachable store; True once the store has it all. What it
    cannot send stays in the file for the next ``--resume``, and the console says so once. Never raises."""
    pending = sweep_pending(uri, parent_run_id)
    try:
        if send_pending(pending, wait_s, "to send the sweep's trial metrics", "trial runs up to date", log):
            return True
    except BaseException:  # noqa: BLE001 - interrupted again while waiting: the file keeps the rest
        pass
    log(f"[mlflow] tracking store unreachable ({pending.error}): the sweep's pending trial metrics and ends are kept "
        f"in {pending.path} and sent when the sweep is resumed (--resume)")
    return False


def _seed_tag(seed) -> dict:
    return {SEED_TAG: str(int(seed))} if isinstance(seed, (int, float)) else {}


class SweepMLflowCallback(Callback):
    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep_id: str, method: str,
                 workers: int = 1, phase: str = SEARCH, seed: int | None = None, data: dict | None = None):
        self.tracking_uri, self.experiment_id, self.workers = tracking_uri, experiment_id, workers
        self.data = data  # the prepared run's data (`PreparedRun` fields): each trial's dataset inputs
        self.phase, self.seed = phase, seed  # seed: the base config's training.seed (a trial's own wins)
        self.parent_run_id, self.sweep_id, self.method = parent_run_id, sweep_id, method
        self.runs: dict[str, str] = {}
        self._client = None
        self._logged: dict[str, int] = {}  # trial id → highest step in its run's history (read from MLflow first)
        self._existing: dict[str, str] | None = None  # trial id → child run already in MLflow (`_existing_runs`)
        self._created: set[str] = set()  # trials whose run this instance created: nothing in their history yet

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def __getstate__(self):
        state = dict(self.__dict__)
        state["runs"] = self._known_runs()  # a run not yet created: found, or created, again after a restore
        state["_client"] = None
        state["_logged"] = {}
        state["_existing"], state["_created"] = None, set()
        return state

    def _send(self, event: dict) -> None:
        """Append `event` to the sweep's pending file; the sweep's sender thread takes it to the store."""
        sweep_sender(self.tracking_uri, self.parent_run_id).add(event)

    def _existing_runs(self) -> dict[str, str]:
        """Trial id → this sweep's child run already in MLflow (the newest, if several), read once: one
        paged search when first needed, not one per trial (a tag search scans the store, so per trial it
        grew with the sweep). The driver is the only writer of its sweep's runs, so the map stays true
        with the runs this instance creates (kept in ``runs``)."""
        if self.__dict__.get("_existing") is None:  # absent in a callback pickled by an older version
            found: dict[str, str] = {}
            for run in search_all_runs(self.client, [self.experiment_id],
                                       f"tags.`{SWEEP_TAG}` = '{self.sweep_id}'"):  # newest first
                if run.data.tags.get(TRIAL_TAG):
                    found.setdefault(run.data.tags[TRIAL_TAG], run.info.run_id)
            self._existing = found
        return self._existing

    def run_key(self, trial) -> str:
        """The key the sweep's pending file knows the trial's child run by: its MLflow run id, or, for a run
        created by this sweep, the `new_run_key` whose creation was appended to the file — the sender creates
        the run, so Tune's loop never waits for the store, not even at a trial's start."""
        trial_id = trial.trial_id
        if trial_id not in self.runs:
            existing = self._existing_runs().get(trial_id)
            if existing is not None:
                self.runs[trial_id] = existing
                self.client.update_run(existing, status="RUNNING")
            else:
                seed = trial.config.get("seed", getattr(self, "seed", None))
                key = new_run_key(self.experiment_id, {SWEEP_TAG: self.sweep_id, TRIAL_TAG: trial_id})
                grouping = {"method": self.method, "phase": getattr(self, "phase", SEARCH), "seed": seed}
                data = getattr(self, "data", None) or {}
                self._send({"run_id": key, "create": {
                    "run_name": f"{self.method}-{trial_id}",
                    "tags": {PARENT_TAG: self.parent_run_id, KIND_TAG: "trial", METHOD_TAG: self.method,
                             WORKERS_TAG: str(self.workers), PHASE_TAG: getattr(self, "phase", SEARCH),
                             **_seed_tag(seed)},
                    "params": {**{k: v for k, v in grouping.items() if v is not None}, **trial.config},
                    "data": {k: data[k] for k in DATA_KEYS if data.get(k) is not None}}})
                self.runs[trial_id] = key
                self.__dict__.setdefault("_created", set()).add(trial_id)
        return self.runs[trial_id]

    def mlflow_run_id(self, trial_id: str) -> str | None:
        """The trial's MLflow run id (None while the sender has still to create its run)."""
        key = self.runs.get(trial_id)
        if key is None or not key.startswith(NEW_RUN):
            return key
        return sweep_pending(self.tracking_uri, self.parent_run_id).run_id(key)

    def _known_runs(self) -> dict[str, str]:
        """Trial id → MLflow run id of the runs known to exist (what a restored callback may trust)."""
        return {t: run_id for t in self.runs if (run_id := self.mlflow_run_id(t))}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_key(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step = int(result.get("step", result.get("training_iteration", 0)))
        key = self.run_key(trial)
        logged = self.__dict__.setdefault("_logged", {})  # absent in a callback pickled by an older version
        if trial.trial_id not in logged:  # a run this instance created has no history to read
            created = trial.trial_id in self.__dict__.get("_created", ())
            logged[trial.trial_id] = -1 if created else last_logged_step(self.client, key)
        now = int(time.time() * 1000)
        for step, part in report_by_step({**result, "step": step}):
            if step <= logged[trial.trial_id]:
                continue  # replayed after a resume, or an evaluation already logged: in the run's history
            metrics = {k: v for k, v in numeric_metrics(part).items() if "/" in k or k in ("time_total_s", "epoch")}
            if metrics:
                self._send({"run_id": key, "step": step, "ts": now, "metrics": metrics})
            logged[trial.trial_id] = step

    def on_trial_complete(self, iteration, trials, trial, **info):
        """Finished or stopped early by the scheduler (Tune completes both): the status tag says which."""
        key = self.run_key(trial)
        result = trial.last_result or {}
        tags = {STATUS_TAG: trial_status(result)}
        for tag, field in ((STEPS_TAG, "step"), (TOTAL_STEPS_TAG, "total_steps")):
            if isinstance(result.get(field), (int, float)):
                tags[tag] = str(int(result[field]))
        self._send({"run_id": key, "finish": "FINISHED", "tags": tags})

    def on_trial_error(self, iteration, trials, trial, **info):
        key = self.run_key(trial)
        self._send({"run_id": key, "finish": "FAILED",
                    "tags": {ERROR_TAG: error_reason(trial_error_text(trial)), STATUS_TAG: FAILED}})

    def close_ended(self, records: list[dict]) -> None:
        """Trials the journal ended after the last saved sweep state (`journal.reconcile`): the driver may
        have died before their child runs were closed; a run still open is closed as the trial ended."""
        for record in records:
            run_id = self._existing_runs().get(record["trial_id"])
            if run_id is None or self.client.get_run(run_id).info.status != "RUNNING":
                continue
            result = record.get("result") or {}
            if record["status"] == "ERROR":
                self.client.set_tag(run_id, STATUS_TAG, FAILED)
                close_run(self.client, run_id, "FAILED")
                continue
            self.client.set_tag(run_id, STATUS_TAG, trial_status(result))
            for tag, key in ((STEPS_TAG, "step"), (TOTAL_STEPS_TAG, "total_steps")):
                if isinstance(result.get(key), (int, float)):
                    self.client.set_tag(run_id, tag, str(int(result[key])))
            close_run(self.client, run_id, "FINISHED")

    def get_state(self):
        return {"runs": self._known_runs()}

    def set_state(self, state):
        self.runs.update({t: r for t, r in state.get("runs", {}).items() if not r.startswith(NEW_RUN)})
