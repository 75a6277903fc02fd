"""`alphadpo-ray report TARGET`: rebuild a sweep's or a compare's table and plots from MLflow alone.

TARGET is a sweep or compare name (the parent run's name), an MLflow run id, or an experiment name
(every top-level sweep/compare in it). Nothing but the tracking store is read: the rows come from
the child runs' params, latest metrics, metric histories (the curves), status, error, phase and seed
tags. A compare's methods are summarised and ranked by the same `results.rank_methods` as `compare`
(intervals over its seeds phase), and the same tables and plots are written. A trial a scheduler stopped early is
read from its ``alphadpo.status`` tag (with the step it stopped at) and kept off the Pareto set unless
the sweep's logged config (its ``config.json`` artifact) set ``sweep.pareto_includes_stopped``. When that
config has a ``study`` section, the study's tables and verdict (``study.md``) are rebuilt too.

A trial run MLflow still holds as ``RUNNING`` is shown as running only while it is active: with no
activity — its start, or any metric logged — for more than `STALE_AFTER_S` (30 min; every live trial
reports at least once per step, and its driver closes it on the way out), it is shown as
``stale (RUNNING in MLflow, no activity since …)``: its driver is gone (killed, its machine lost) and the
run stays RUNNING until its sweep is resumed.

For one compare, the comparison's MLflow views (methods' metrics, the compare run's description, the trials table:
`views.publish_compare`) are written where missing, so runs made before they existed get them too.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from ..config.experiment import StudyConfig
from ..errors import AlphaDPOError
from ..services.secrets import redact
from ..services.tracking import resolve_tracking_uri, search_all_runs
from . import plots, results as res
from .nested_runs import (ERROR_TAG, FINISHED, KIND_TAG, METHOD_TAG, PARENT_TAG, PHASE_TAG, SEARCH, SEEDS, SEED_TAG,
                          STATUS_TAG, STEPS_TAG, TOTAL_STEPS_TAG, TRIAL_TAG, WORKERS_TAG)
from .study import machine, markdown, print_study, study_tables, write_study
from .views import publish_compare

STALE_AFTER_S = float(os.environ.get("ALPHADPO_RAY_STALE_AFTER_S", 30 * 60))
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
    return list(search_all_runs(client, experiment_ids, f"tags.`{PARENT_TAG}` = '{parent_id}'"))


def _stale(client, run, now: float | None = None) -> str | None:
    """``stale (RUNNING in MLflow, no activity since …)`` for a RUNNING run whose latest activity (its start,
    its latest metric) is more than `STALE_AFTER_S` old; None for a run that is not."""
    if run.info.status != "RUNNING":
        return None
    latest = run.info.start_time or 0
    for key in run.data.metrics:
        latest = max([latest, *(m.timestamp for m in client.get_metric_history(run.info.run_id, key))])
    if (now if now is not None else time.time()) - latest / 1000 <= STALE_AFTER_S:
        return None
    return f"stale (RUNNING in MLflow, no activity since {time.strftime('%Y-%m-%d %H:%M', time.localtime(latest / 1000))})"


def _curve(client, run) -> dict:
    """A trial's held-out evaluations in step order from its MLflow metric histories (read only for the
    metrics the run logged: one store query each)."""
    run_id = run.info.run_id
    histories = {m: {h.step: h.value for h in client.get_metric_history(run_id, f"eval/{m}")}
                 for m in res.CURVE_METRICS if f"eval/{m}" in run.data.metrics}
    histories = {m: h for m, h in histories.items() if h}
    steps = sorted(set().union(*histories.values())) if histories else []
    return {"step": steps, **{m: [h.get(s) for s in steps] for m, h in histories.items()}} if steps else {}


def _trial_rows(client, experiment_ids: list[str], sweep_run) -> list[dict]:
    rows = []
    for run in _children(client, experiment_ids, sweep_run.info.run_id):
        if run.data.tags.get(KIND_TAG) != "trial":
            continue
        metrics = run.data.metrics
        params = {k: _number(v) for k, v in run.data.params.items() if k != "method"}
        tags = run.data.tags
        curve = _curve(client, run)
        status = _stale(client, run) or STATUS.get(run.info.status, run.info.status.lower())
        if status == FINISHED:  # finished or stopped early (the tag of the trial's completion says which)
            status = tags.get(STATUS_TAG, FINISHED)
        steps = max(curve.get("step", []), default=None)
        row = {
            "trial_id": tags.get(TRIAL_TAG, run.info.run_id),
            "method": tags.get(METHOD_TAG, run.data.params.get("method", "")),
            "phase": tags.get(PHASE_TAG, sweep_run.data.tags.get(PHASE_TAG, SEARCH)),
            "seed": int(tags[SEED_TAG]) if SEED_TAG in tags else None,
            "status": status,
            "error": tags.get(ERROR_TAG, ""),
            **params,
            **{c: metrics.get(f"eval/{c}") for c in res.METRIC_COLUMNS},
            "steps": int(tags[STEPS_TAG]) if STEPS_TAG in tags else steps,
            "total_steps": int(tags[TOTAL_STEPS_TAG]) if TOTAL_STEPS_TAG in tags else None,
            "seconds": metrics.get("time_total_s"),
            "workers": int(run.data.tags.get(WORKERS_TAG, 1)),
            "curve": curve,
        }
        rows.append(row)
    return rows


def _logged_config(client, sweep_run) -> dict:
    """The config a sweep logged (its ``config.json`` artifact), or {} when it logged none."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(sweep_run.info.run_id, "config.json", tmp)
            return json.loads(Path(path).read_text())
    except Exception:  # noqa: BLE001 - no config logged
        return {}


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
        runs = [run for kind in ("sweep", "compare")  # not every trial of the experiment: its sweeps and compares
                for run in search_all_runs(client, [experiment.experiment_id], f"tags.`{KIND_TAG}` = '{kind}'")]
        runs.sort(key=lambda r: -(r.info.start_time or 0))  # newest first, as one search returns them
        tops = [r for r in runs if PARENT_TAG not in r.data.tags or r.data.tags.get(KIND_TAG) == "compare"]
        if tops:
            return tops, [experiment.experiment_id]
    raise ReportNotFound(f"no sweep, compare, run id or experiment named {target!r} in the tracking store {store}")


def report(target: str, tracking_uri: str | None = None, output_dir: str | None = None) -> dict:
    from mlflow.tracking import MlflowClient


    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # reading config.json: no bars
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        # reading never creates a store: MLflow would make an empty one here and find nothing in it
        raise ReportNotFound(f"no MLflow store at {uri}: run report where the sweep ran, or pass --tracking-uri "
                             "(or set MLFLOW_TRACKING_URI) to the store the sweep wrote")
    client = MlflowClient(uri)
    parents, experiment_ids = _find_parents(client, target, redact(uri))
    by_method: dict[str, list[dict]] = {}
    include_stopped: dict[str, bool] = {}
    study = None
    accuracy, compare = "accuracy", False
    for parent in parents:
        if parent.data.tags.get(KIND_TAG) == "compare":
            accuracy, compare = "accuracy_logratio", True
            sweeps = [r for r in _children(client, experiment_ids, parent.info.run_id)
                      if r.data.tags.get(KIND_TAG) == "sweep"]
        else:
            sweeps = [parent]
        for sweep_run in sweeps:
            method = sweep_run.data.tags.get(METHOD_TAG, "?")
            by_method.setdefault(method, []).extend(_trial_rows(client, experiment_ids, sweep_run))
            logged = _logged_config(client, sweep_run)
            stopped = bool((logged.get("sweep") or {}).get("pareto_includes_stopped", False))
            include_stopped[method] = include_stopped.get(method, False) or stopped
            study = study or logged.get("study")
    rows = [r for method_rows in by_method.values() for r in method_rows]
    if not rows:
        raise ReportNotFound(f"{target!r} has no trial runs in {redact(uri)}")
    directory = Path(output_dir) if output_dir else Path("outputs") / "reports" / target
    marked = {m: _mark(r, accuracy, include_stopped[m]) for m, r in by_method.items()}
    all_rows = [r for method_rows in marked.values() for r in method_rows]
    summaries = res.rank_methods(marked, accuracy)
    if compare:
        seeded = any(r.get("phase") == SEEDS for r in all_rows)
        title = f"compare {target}: methods ranked on {accuracy}" + (" over seeds" if seeded else "")
        files = plots.write_compare_files(marked, summaries, directory, title)
    else:
        title = f"{target}: methods"
        files = res.write_tables(all_rows, directory)
        files["methods"] = directory / "methods.json"
        files["methods"].write_text(json.dumps(summaries, indent=2, default=str))
        files.update(plots.write_plots(marked, accuracy, directory))
    if len(marked) > 1 or compare:
        res.print_methods(summaries, accuracy, title)
    res.print_trials(all_rows, accuracy, f"{target}: trials (from MLflow)")
    description = None
    if study:
        written, description = _rebuild_study(study, all_rows, summaries if compare else None, target, redact(uri),
                                              directory, files)
        files.update(written)
    if compare and len(parents) == 1:
        _publish(client, parents[0], experiment_ids, summaries, all_rows, title, description)
    return {"directory": directory, "rows": all_rows, "methods": summaries, "files": files,
            "interval_method": res.interval_caption(summaries)}


def _mark(rows: list[dict], accuracy: str, include_stopped: bool) -> list[dict]:
    """Pareto marks over the search trials (a compare's seed re-runs stay off the front, as in `compare`)."""
    search = res.mark_pareto([r for r in rows if r.get("phase") != SEEDS], accuracy, include_stopped)
    return search + [{**r, "pareto": False} for r in rows if r.get("phase") == SEEDS]


def _rebuild_study(study: dict, rows: list[dict], summaries: list[dict] | None, target: str, store: str,
                   directory: Path, files: dict) -> dict[str, Path]:
    """A study's tables and verdict (`study.md`, `study.json`) from the rows read back from MLflow."""
    import time

    tables = study_tables(StudyConfig(**study), rows, summaries)
    context = {"command": f"alphadpo-ray report {target} (rebuilt from MLflow {store})", "machine": machine(),
               "date": time.strftime("%Y-%m-%d %H:%M"), "wall_seconds": 0.0, "load_before": "-", "load_after": "-"}
    plots = {k: Path(v).name for k, v in files.items() if str(v).endswith(".png")}
    print_study(tables)
    return write_study(tables, context, plots, directory), markdown(tables, context, {})


def _publish(client, compare_run, experiment_ids: list[str], summaries: list[dict], rows: list[dict], title: str,
             description: str | None) -> None:
    """The comparison's MLflow views (`views.publish_compare`) on the compare run and its methods' runs,
    rebuilt from what was read: a run made before they existed gets them; one that has them gets nothing
    twice. A store that refuses writes (read-only credentials) is said so, the files are written anyway."""
    from mlflow.exceptions import MlflowException

    method_runs = {r.data.tags.get(METHOD_TAG): r.info.run_id
                   for r in _children(client, experiment_ids, compare_run.info.run_id)
                   if r.data.tags.get(KIND_TAG) == "sweep" and r.data.tags.get(PHASE_TAG, SEARCH) == SEARCH}
    try:
        publish_compare(client, compare_run.info.run_id, method_runs, summaries, rows, title, description)
    except MlflowException as err:
        print(f"[report] cannot write the comparison's metrics and description to MLflow run "
              f"{compare_run.info.run_id} ({str(err).splitlines()[0][:300]}); the files above have them")
        return
    print(f"[report] MLflow run {compare_run.info.run_id}: methods' metrics, description and trials table in place")
