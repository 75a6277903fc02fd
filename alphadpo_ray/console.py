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


def drop_benign_worker_lines() -> None:
    """Ray forwards every worker's output to the driver's console; drop the lines known to be benign
    (`KNOWN_BENIGN_WORKER_LINES`), through `compat.filter_worker_output` (Ray's private stdstream
    dispatcher: if it is not there, nothing is filtered). Idempotent; call after `ray.init`."""
    compat.filter_worker_output(lambda line: not any(p.search(line) for p in KNOWN_BENIGN_WORKER_LINES))


def table_console():
    """A rich console for result tables: COLUMNS when set, else the terminal's width, or 180 columns when
    output is piped (logs, `ray job logs`), so tables are not squeezed to 80."""
    import os
    import sys

    from rich.console import Console

    if os.environ.get("COLUMNS", "").isdigit():
        return Console(width=int(os.environ["COLUMNS"]))
    return Console() if sys.stdout.isatty() else Console(width=180)
