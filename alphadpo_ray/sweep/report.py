"""`alphadpo-ray report TARGET`: rebuild a sweep's or a compare's table and plots from MLflow alone.

TARGET is a sweep or compare name (the parent run's name), an MLflow run id, or an experiment name
(every top-level sweep/compare in it). Nothing but the tracking store is read: the rows come from
the child runs' params, latest metrics, status and error tags.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import AlphaDPOError
from . import results as res
from .tracking import ERROR_TAG, KIND_TAG, METHOD_TAG, PARENT_TAG, TRIAL_TAG, WORKERS_TAG

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
        history = client.get_metric_history(run.info.run_id, "eval/accuracy")
        row = {
            "trial_id": run.data.tags.get(TRIAL_TAG, run.info.run_id),
            "method": run.data.tags.get(METHOD_TAG, run.data.params.get("method", "")),
            "status": STATUS.get(run.info.status, run.info.status.lower()),
            "error": run.data.tags.get(ERROR_TAG, ""),
            **params,
            **{c: metrics.get(f"eval/{c}") for c in res.METRIC_COLUMNS},
            "steps": max((m.step for m in history), default=None),
            "seconds": metrics.get("time_total_s"),
            "workers": int(run.data.tags.get(WORKERS_TAG, 1)),
        }
        rows.append(row)
    return rows


def _find_parents(client, target: str):
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
    raise ReportNotFound(f"no sweep, compare, run id or experiment named {target!r} in the tracking store")


def report(target: str, tracking_uri: str | None = None, output_dir: str | None = None) -> dict:
    from mlflow.tracking import MlflowClient

    from ..tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    parents, experiment_ids = _find_parents(client, target)
    by_method: dict[str, list[dict]] = {}
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
    rows = [r for method_rows in by_method.values() for r in method_rows]
    if not rows:
        raise ReportNotFound(f"{target!r} has no trial runs in {uri}")
    directory = Path(output_dir) if output_dir else Path("outputs") / "reports" / target
    marked = {m: res.mark_pareto(r, accuracy) for m, r in by_method.items()}
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
