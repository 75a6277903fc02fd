"""`alphadpo-ray report TARGET`: rebuild a sweep's or a compare's table and plots from MLflow alone.

TARGET is a sweep or compare name (the parent run's name), an MLflow run id, or an experiment name
(every top-level sweep/compare in it). Nothing but the tracking store is read: the rows come from
the child runs' params, latest metrics, status and error tags. A trial a scheduler stopped early is
read from its ``alphadpo.status`` tag (with the step it stopped at) and kept off the Pareto set unless
the sweep's logged config (its ``config.json`` artifact) set ``sweep.pareto_includes_stopped``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..errors import AlphaDPOError
from . import results as res
from .tracking import (ERROR_TAG, FINISHED, KIND_TAG, METHOD_TAG, PARENT_TAG, STATUS_TAG, STEPS_TAG,
                       TOTAL_STEPS_TAG, TRIAL_TAG, WORKERS_TAG)

STATUS = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "failed", "RUNNING": "running", "SCHEDULED": "running"}


class ReportNotFound(AlphaDPOError):
    """Nothing in the tracking store matches the report target."""


def _number(text: str):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def _children(client, experiment_ids: list[str], parent_id: str):
    return client.search_runs(experiment_ids, filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=10_000)


def _trial_rows(client, experiment_ids: list[str], sweep_run) -> list[dict]:
    rows = []
    for run in _children(client, experiment_ids, sweep_run.info.run_id):
        if run.data.tags.get(KIND_TAG) != "trial":
            continue
        metrics = run.data.metrics
        params = {k: _number(v) for k, v in run.data.params.items() if k != "method"}
        tags = run.data.tags
        history = client.get_metric_history(run.info.run_id, "eval/accuracy")
        status = STATUS.get(run.info.status, run.info.status.lower())
        if status == FINISHED:  # finished or stopped early (the tag of the trial's completion says which)
            status = tags.get(STATUS_TAG, FINISHED)
        steps = max((m.step for m in history), default=None)
        row = {
            "trial_id": tags.get(TRIAL_TAG, run.info.run_id),
            "method": tags.get(METHOD_TAG, run.data.params.get("method", "")),
            "status": status,
            "error": tags.get(ERROR_TAG, ""),
            **params,
            **{c: metrics.get(f"eval/{c}") for c in res.METRIC_COLUMNS},
            "steps": int(tags[STEPS_TAG]) if STEPS_TAG in tags else steps,
            "total_steps": int(tags[TOTAL_STEPS_TAG]) if TOTAL_STEPS_TAG in tags else None,
            "seconds": metrics.get("time_total_s"),
            "workers": int(run.data.tags.get(WORKERS_TAG, 1)),
        }
        rows.append(row)
    return rows


def _includes_stopped(client, sweep_run) -> bool:
    """The sweep's `pareto_includes_stopped`, from the config it logged (default False)."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(sweep_run.info.run_id, "config.json", tmp)
            config = json.loads(Path(path).read_text())
        return bool((config.get("sweep") or {}).get("pareto_includes_stopped", False))
    except Exception:  # noqa: BLE001 - no config logged: the default
        return False


def _find_parents(client, target: str, store: str):
    experiments = client.search_experiments(max_results=10_000)
    ids = [e.experiment_id for e in experiments]
    try:
        run = client.get_run(target)
        return [run], [run.info.experiment_id]
    except Exception:  # noqa: BLE001 - not a run id
        pass
    named = client.search_runs(ids, filter_string=f"attributes.run_name = '{target}'", max_results=100)
    named = [r for r in named if r.data.tags.get(KIND_TAG) in ("sweep", "compare")]
    if named:
        return named[:1], ids
    experiment = client.get_experiment_by_name(target)
    if experiment is not None:
        runs = client.search_runs([experiment.experiment_id], max_results=10_000)
        tops = [r for r in runs if r.data.tags.get(KIND_TAG) in ("sweep", "compare") and (
            PARENT_TAG not in r.data.tags or r.data.tags.get(KIND_TAG) == "compare")]
        if tops:
            return tops, [experiment.experiment_id]
    raise ReportNotFound(f"no sweep, compare, run id or experiment named {target!r} in the tracking store {store}")


def report(target: str, tracking_uri: str | None = None, output_dir: str | None = None) -> dict:
    from mlflow.tracking import MlflowClient

    from ..tracking import redact, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        # reading never creates a store: MLflow would make an empty one here and find nothing in it
        raise ReportNotFound(f"no MLflow store at {uri}: run report where the sweep ran, or pass --tracking-uri "
                             "(or set MLFLOW_TRACKING_URI) to the store the sweep wrote")
    client = MlflowClient(uri)
    parents, experiment_ids = _find_parents(client, target, redact(uri))
    by_method: dict[str, list[dict]] = {}
    include_stopped: dict[str, bool] = {}
    accuracy = "accuracy"
    for parent in parents:
        if parent.data.tags.get(KIND_TAG) == "compare":
            accuracy = "accuracy_logratio"
            sweeps = [r for r in _children(client, experiment_ids, parent.info.run_id)
                      if r.data.tags.get(KIND_TAG) == "sweep"]
        else:
            sweeps = [parent]
        for sweep_run in sweeps:
            method = sweep_run.data.tags.get(METHOD_TAG, "?")
            by_method.setdefault(method, []).extend(_trial_rows(client, experiment_ids, sweep_run))
            include_stopped[method] = include_stopped.get(method, False) or _includes_stopped(client, sweep_run)
    rows = [r for method_rows in by_method.values() for r in method_rows]
    if not rows:
        raise ReportNotFound(f"{target!r} has no trial runs in {redact(uri)}")
    directory = Path(output_dir) if output_dir else Path("outputs") / "reports" / target
    marked = {m: res.mark_pareto(r, accuracy, include_stopped[m]) for m, r in by_method.items()}
    all_rows = [r for method_rows in marked.values() for r in method_rows]
    files = res.write_tables(all_rows, directory)
    files["pareto_plot"] = res.plot_pareto(marked, accuracy, directory / "pareto.png")
    alpha = res.plot_alpha_sensitivity(all_rows, accuracy, directory / "alpha_sensitivity.png")
    if alpha:
        files["alpha_plot"] = alpha
    summaries = [res.method_summary(r, accuracy) for r in marked.values()]
    summaries.sort(key=lambda s: -(s[f"best_{accuracy}"] or -1))
    if len(marked) > 1:
        res.print_methods(summaries, accuracy, f"{target}: methods")
    res.print_trials(all_rows, accuracy, f"{target}: trials (from MLflow)")
    return {"directory": directory, "rows": all_rows, "methods": summaries, "files": files}
