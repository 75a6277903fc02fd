"""What the driver's console shows: the project's own progress lines and real problems, nothing else.

Libraries announce routine things at INFO/WARNING on every command: MLflow's store creation, Optuna's
"new study", Ray's notice that token authentication is on (the default Ray 2.60 keeps: clusters still
use it), transformers' per-file progress bars. `quiet_driver` turns exactly those down, process-wide
(loggers are process-wide), once per command. Worker-side noise is kept down by the worker
environment (`launch.worker_env`) and `engine.quiet_logs`; Tune's own output by `sweep.run`.
"""

from __future__ import annotations

import logging

QUIET = {
    "mlflow": logging.WARNING,  # "Creating initial MLflow database tables..."
    "alembic": logging.WARNING,
    "optuna": logging.WARNING,  # "A new study created in memory"
    "ray._private.authentication.authentication_token_setup": logging.ERROR,  # token auth on (the default)
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
