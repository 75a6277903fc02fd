"""What the driver's console shows: the project's own progress lines and real problems, nothing else.

Libraries announce routine things at INFO/WARNING on every command: MLflow's store creation, Optuna's
"new study", Ray's notice that token authentication is on (the default Ray 2.60 keeps: clusters still
use it), transformers' per-file progress bars. `quiet_driver` turns exactly those down, process-wide
(loggers are process-wide), once per command. Worker-side noise is kept down by the worker
environment (`launch.worker_env`) and `engine.quiet_logs`; Tune's own output by `sweep.run`.
"""

from __future__ import annotations

import logging
import re

from . import compat

QUIET = {
    "mlflow": logging.WARNING,  # "Creating initial MLflow database tables..."
    "alembic": logging.WARNING,
    "optuna": logging.WARNING,  # "A new study created in memory"
    compat.RAY_AUTH_TOKEN_SETUP_LOGGER: logging.ERROR,  # token auth on (the default)
}


def quiet_driver() -> None:
    """Turn down the routine INFO/WARNING announcements of MLflow, Optuna, Ray, DeepSpeed and transformers."""
    import os

    import torch

    if not torch.cuda.is_available():  # DeepSpeed warns "unable to detect" an accelerator in every process
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # read when mlflow / datasets are first imported (a user's own value wins)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for name, level in QUIET.items():
        logging.getLogger(name).setLevel(level)
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # optuna's own handler ignores the logger level
    except ImportError:  # pragma: no cover - optuna is a dependency
        pass
    try:
        import transformers

        transformers.logging.disable_progress_bar()
        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


# Worker lines Ray forwards to the driver that are known to be benign, or that a handled failure brings and
# the project's own one-line account replaces (`train_callbacks.ConsoleProgress.after_exception`, the `[resume]`
# line); each stays in Ray's log files (``logs/worker-*-{pid}.err``, ``raylet.out``, ``gcs_server.out``).
KNOWN_BENIGN_WORKER_LINES = (
    # Ray Train's own PreemptionWatcher actor, at error level (ray-project/ray#53727): not a problem of the run
    re.compile(r"core_worker\.cc.*Actor with class name: 'PreemptionWatcher'.*max_restarts > 0"),
    # its notice, which the recipe's `[preemption]` line gives with the step and the checkpoint written
    re.compile(r"^PreemptionWatcher: preemption detected"),
    # a Tune trial restored (a retry, a resumed sweep): the recipe's `[resume] continuing from step N` says it
    re.compile(r"^Restored on \S+ from checkpoint: Checkpoint\("),
    # a lost node: the GCS cannot free its placement-group bundles, the raylet reports it dead
    re.compile(r"gcs_placement_group_scheduler\.cc.*Failed to remove \d+ bundle"),
    re.compile(r"has been marked dead because the detector has missed too many heartbeats"),
)

# Traces (a header line, ``Traceback (most recent call last):``, its frames, the exception line and any
# indented lines after it) dropped from the console per worker process. Value: None when another line
# already says what happened (a worker group failure: `ConsoleProgress.after_exception`), else the line to
# print instead, once per process ({why}: the exception). Ray Train's PlacementGroupCleaner asks the state
# API for its controller with no address; in a job whose Ray someone else started (no `worker_process` setup
# hook), with another Ray instance on the machine, Ray cannot tell which one is meant ("Found multiple active Ray
# instances") and its monitor thread dies with a 30-line trace; training is unaffected (the cleaner only matters
# if the driver dies uncleanly).
KNOWN_TRACES = (
    (re.compile(r"^Exception in thread PlacementGroupCleanerMonitor"),
     "Ray Train's placement-group cleaner stopped ({why}); training is unaffected"),
    (re.compile(r"^Error in training function:"), None),  # a worker of a failed group (Ray Train's util)
    (re.compile(r"^Graceful shutdown of backend failed"), None),  # the controller, a worker being gone
    # the controller's request to the autoscaling coordinator timed out (a busy machine): it retries
    (re.compile(r"^Failed to send resource request for train-"),
     "Ray Train's controller timed out sending a resource request ({why}; a busy machine or network): it retries, "
     "training goes on"),
)


# A trace's exception line: a (dotted) exception name, then ": message" or nothing (``ConnectionError: …``,
# ``ray.exceptions.ActorDiedError: …``); not a frame's ``File "…"``, its code or a ``^^^`` caret line.
_EXCEPTION_LINE = re.compile(
    r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning|Timeout|Iteration)\w*(\([\w.]*\))?(: |:?$)")
TRACE_MAX_LINES = 500  # a trace whose exception line never came (not recognised): what follows is shown again


class _WorkerLineFilter:
    """Keep(line, pid): drops `KNOWN_BENIGN_WORKER_LINES` and the traces of `KNOWN_TRACES` (per worker
    process, from the header to the end of the exception), printing a trace's one-line replacement where it
    has one; every dropped line stays in Ray's log files."""

    def __init__(self, say=print):
        self.say = say
        # pid → (replacement, exception line seen, lines dropped so far)
        self.tracing: dict[object, tuple[str | None, bool, int]] = {}
        self.said: set[tuple[str, object]] = set()  # (replacement, pid) printed

    def __call__(self, line: str, pid) -> bool:
        if pid in self.tracing:
            what, ended, count = self.tracing[pid]
            if count >= TRACE_MAX_LINES:
                del self.tracing[pid]  # never ended as a trace does: this line is judged on its own
            elif line.startswith((" ", "\t")) or not line.strip():
                self.tracing[pid] = (what, ended, count + 1)
                return False
            elif not ended:
                # before the exception line: "Traceback (most recent call last):", or the rest of a frame or
                # caret line that Ray forwarded in two pieces (its log monitor read the file mid-line)
                exception = bool(_EXCEPTION_LINE.match(line))
                self.tracing[pid] = (what, exception, count + 1)
                if exception and what and (what, pid) not in self.said:  # once per process
                    self.said.add((what, pid))
                    why = ("it found several Ray instances on this machine and cannot tell which is this run's"
                           if "multiple active Ray instances" in line else line.strip()[:160])
                    self.say(f"[ray] {what.format(why=why)}; the trace is in Ray's session logs, worker-*-{pid}.err",
                             flush=True)
                return False
            else:
                del self.tracing[pid]  # a line after the trace: judged on its own
        for header, what in KNOWN_TRACES:
            if header.search(line):
                self.tracing[pid] = (what, False, 0)
                return False
        return not any(p.search(line) for p in KNOWN_BENIGN_WORKER_LINES)


def drop_benign_worker_lines() -> None:
    """Ray forwards every worker's output to the driver's console; drop the lines known to be benign or
    replaced by the project's own (`KNOWN_BENIGN_WORKER_LINES`, the traces of `KNOWN_TRACES`), through
    `compat.filter_worker_output` (Ray's private stdstream dispatcher: if it is not there, nothing is
    filtered). Idempotent; call after `ray.init`."""
    compat.filter_worker_output(_WorkerLineFilter())


def table_console():
    """A rich console for result tables: COLUMNS when set, else the terminal's width, or 180 columns when
    output is piped (logs, `ray job logs`), so tables are not squeezed to 80."""
    import os
    import sys

    from rich.console import Console

    if os.environ.get("COLUMNS", "").isdigit():
        return Console(width=int(os.environ["COLUMNS"]))
    return Console() if sys.stdout.isatty() else Console(width=180)
