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


# Worker lines Ray forwards to the driver that are known to be benign, printed on every run.
KNOWN_BENIGN_WORKER_LINES = (
    # Ray Train's own PreemptionWatcher actor, at error level (ray-project/ray#53727): not a problem of the run
    re.compile(r"core_worker\.cc.*Actor with class name: 'PreemptionWatcher'.*max_restarts > 0"),
)


# Threads of Ray's own actors whose death is not a problem of the run. Ray Train's PlacementGroupCleaner
# asks the state API for its controller with no address; with another Ray instance on the machine Ray
# cannot tell which one is meant ("Found multiple active Ray instances") and the monitor thread dies
# with a 30-line trace. Training is unaffected (the cleaner only matters if the driver dies uncleanly).
KNOWN_BENIGN_THREAD_DEATHS = {
    "PlacementGroupCleanerMonitor": "Ray Train's placement-group cleaner",
}
_THREAD_DEATH = re.compile(r"^Exception in thread ([\w-]+)")


class _WorkerLineFilter:
    """Keep(line, pid): drops `KNOWN_BENIGN_WORKER_LINES`, and the traceback of a thread in
    `KNOWN_BENIGN_THREAD_DEATHS` (from ``Exception in thread NAME:`` to its exception line, per worker
    process), printing one line in its place; the trace stays in Ray's ``logs/worker-*-{pid}.err``."""

    def __init__(self, say=print):
        self.say = say
        self.dropping: dict[int, str] = {}  # pid → the thread whose traceback is being dropped

    def __call__(self, line: str, pid: int) -> bool:
        if pid in self.dropping:
            if line.startswith((" ", "\t", "Traceback (most recent call last)")) or not line.strip():
                return False
            what = KNOWN_BENIGN_THREAD_DEATHS[self.dropping.pop(pid)]
            error = line.strip()
            why = ("it found several Ray instances on this machine and cannot tell which is this run's"
                   if "multiple active Ray instances" in error else error[:160])
            self.say(f"[ray] {what} stopped ({why}); training is unaffected; the trace is in Ray's session "
                     f"logs, worker-*-{pid}.err", flush=True)
            return False
        death = _THREAD_DEATH.match(line)
        if death and death.group(1) in KNOWN_BENIGN_THREAD_DEATHS:
            self.dropping[pid] = death.group(1)
            return False
        return not any(p.search(line) for p in KNOWN_BENIGN_WORKER_LINES)


def drop_benign_worker_lines() -> None:
    """Ray forwards every worker's output to the driver's console; drop the lines known to be benign
    (`KNOWN_BENIGN_WORKER_LINES`, and the traces of `KNOWN_BENIGN_THREAD_DEATHS`, one line each instead),
    through `compat.filter_worker_output` (Ray's private stdstream dispatcher: if it is not there,
    nothing is filtered). Idempotent; call after `ray.init`."""
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
