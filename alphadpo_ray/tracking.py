"""MLflow tracking: one run per training run, logged by a single writer.

* The tracking URI comes from the config, else ``MLFLOW_TRACKING_URI``, else an embedded SQLite store
  ``mlflow.db`` in the working directory — the store `mlflow ui` opens there by default.
* `check_tracking` runs before anything expensive: an unreachable server fails the run at once with
  a clear message instead of training for hours untracked; a SQLite store is created once, by the
  driver, before any other process touches it.
* The resolved config is logged as params with anything whose name looks like a token, key, secret
  or password masked.
* Per-step metrics are logged by `MLflowMetricsCallback`, a Ray Train `UserCallback`: it runs in the
  Train controller (one process) and sees every report, so several workers never write at once.
* A run is keyed by (storage path, run name): re-running a stopped run resumes the same MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .errors import AlphaDPOError

SECRET_PARTS = {"token", "key", "secret", "password", "passwd", "pwd", "credential", "credentials", "auth", "apikey"}
MASK = "***"
RUN_KEY_TAG = "alphadpo.run_key"


class TrackingUnavailable(AlphaDPOError):
    """The MLflow tracking server cannot be reached."""


def resolve_tracking_uri(configured: str | None = None) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_tracking(uri: str, timeout: float = 10.0) -> None:
    """Fail fast if the tracking store is unusable (server down, unwritable path)."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                if response.status != 200:
                    raise TrackingUnavailable(f"MLflow server at {uri} answered {response.status} on /health")
        except (urllib.error.URLError, OSError) as err:
            raise TrackingUnavailable(
                f"MLflow tracking server {uri} is unreachable ({getattr(err, 'reason', err)}). Start it "
                "(`mlflow server --host 127.0.0.1 --port 5000`), fix tracking.tracking_uri / MLFLOW_TRACKING_URI, "
                "or set tracking.enabled=false; nothing was trained."
            ) from None
        return
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        MlflowClient(uri).search_experiments(max_results=1)  # creates/migrates the store here, once
    except Exception as err:  # noqa: BLE001
        raise TrackingUnavailable(f"MLflow tracking store {uri} is not usable: {err}") from None


def _is_secret(name: str) -> bool:
    parts = {p for p in re.split(r"[^a-z0-9]+|_", name.lower()) if p}
    return bool(parts & SECRET_PARTS) or any(s in name.lower() for s in ("api_key", "apikey", "access_key"))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} → {'a.b': 1}; lists become JSON strings."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(tree) if isinstance(tree, (list, tuple)) else tree}


def mask_secrets(tree: Any) -> Any:
    """A copy of a nested config with the values of secret-looking keys replaced by '***'."""
    if isinstance(tree, dict):
        return {k: (MASK if _is_secret(str(k)) and v is not None and not isinstance(v, dict) else mask_secrets(v))
                for k, v in tree.items()}
    if isinstance(tree, list):
        return [mask_secrets(v) for v in tree]
    return tree


def config_params(config_dict: dict) -> dict[str, str]:
    return {k: str(v)[:6000] for k, v in flatten(mask_secrets(config_dict)).items()}


def run_key(storage_path: str, run_name: str) -> str:
    return hashlib.sha256(f"{storage_path}|{run_name}".encode()).hexdigest()[:16]


def get_or_create_experiment(client, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def start_or_resume_run(uri: str, experiment: str, run_name: str, key: str, params: dict[str, str],
                        tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """(run_id, resumed): reuse the run tagged with `key` if there is one, else create it."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment_id = get_or_create_experiment(client, experiment)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id, True
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_KEY_TAG: key, **(tags or {})})
    items = list(params.items())
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
    return run.info.run_id, False


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def log_metrics(client, run_id: str, metrics: dict[str, Any], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = [Metric(k, v, now, step) for k, v in numeric_metrics(metrics).items() if k not in ("step", "total_steps")]
    for i in range(0, len(values), 500):
        client.log_batch(run_id, metrics=values[i : i + 500])


def finish_run(uri: str, run_id: str, status: str, summary: dict | None = None, artifacts: list[Path] = ()) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if summary is not None:
        client.log_dict(run_id, summary, "summary.json")
    for path in artifacts:
        if Path(path).exists():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status=status)


try:
    from ray.train import UserCallback as _UserCallback
except ImportError:  # pragma: no cover - Ray Train V1
    _UserCallback = object


class MLflowMetricsCallback(_UserCallback):
    """Logs rank 0's (already all-reduced) metrics of every report to one MLflow run."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._client = None

    def after_report(self, run_context, metrics, checkpoint):
        if not metrics:
            return
        from mlflow.tracking import MlflowClient

        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        m = metrics[0]
        log_metrics(self._client, self.run_id, m, int(m.get("step", 0)))


class ConsoleProgress(_UserCallback):
    """One compact progress line per report (step, loss, held-out accuracy and KL, throughput)."""

    def after_report(self, run_context, metrics, checkpoint):
        if not metrics or "train/loss" not in metrics[0]:
            return
        m = metrics[0]
        line = f"step {int(m['step'])}/{int(m.get('total_steps', 0))}  loss {m['train/loss']:.4f}"
        line += f"  margin {m.get('train/rewards/margin', float('nan')):+.3f}"
        if "eval/accuracy" in m:
            line += f"  | eval@{int(m.get('eval/step', 0))} acc {m['eval/accuracy']:.3f}"
            if "eval/accuracy_logratio" in m:
                line += f" acc_logratio {m['eval/accuracy_logratio']:.3f}"
            if "eval/kl" in m:
                line += f" kl {m['eval/kl']:.3f}"
            if "eval/generation_accuracy" in m:
                line += f" gen {m['eval/generation_accuracy']:.2f}"
        line += f"  | {m.get('train/tokens_per_second_per_worker', 0):.0f} tok/s/worker"
        if checkpoint is not None:
            line += "  [checkpoint]"
        print(line, flush=True)
