"""A comparison as MLflow shows it: numbers as metrics, the verdict as the run's description, trials as a table.

* Each method's run (its search sweep, ``{compare}-{method}``) holds that method's figures as metrics with
  the same keys on every method (`method_metrics`): ``{metric}_mean``, ``{metric}_low``, ``{metric}_high``
  (the 95 % t-interval over its seed re-runs) for the headline metrics, ``rank``, ``tied`` (0/1), ``seeds``
  and its budget (``budget_trials``, ``budget_steps``, ``budget_worker_seconds``): MLflow's "Compare runs",
  chart and parallel-coordinates views line the methods up by key.
* The compare (or study) run holds the same per method as ``{method}/{key}`` (one chart per key, one line
  per method in its chart view), its description (``mlflow.note.content``, Markdown) the methods table with
  intervals and the verdict, and the trials as a table artifact (``trials_table.json``, `MlflowClient.log_table`).

Everything is logged once: a value the run already holds is not logged again (`log_metrics_once`), the
description is a tag, the table is written only where the run has none. `compare` and `report` (from
MLflow alone, for runs made before these views too) both call `publish_compare`.
"""

from __future__ import annotations

from ..services.tracking import NOTE_TAG, log_metrics_once
from . import results as res, stats
from .study import verdict, winner_line

HEADLINE = ("accuracy_logratio", "kl", "kl_sampled", "generation_accuracy", "generated_length")
TITLES = {"accuracy_logratio": "accuracy (log-ratio)", "kl": "exact KL", "kl_sampled": "sampled KL",
          "generation_accuracy": "generation acc.", "generated_length": "gen. length"}
TABLE_FILE = "trials_table.json"
TABLE_COLUMNS = ("trial_id", "method", "phase", "seed", "status", *res.METRIC_COLUMNS, "steps", "seconds")


def method_metrics(summary: dict) -> dict[str, float]:
    """One method's figures under keys every method shares (None values left out)."""
    out: dict[str, float] = {}
    for metric in HEADLINE:
        interval = (summary.get("intervals") or {}).get(metric) or {}
        for part in ("mean", "low", "high"):
            if isinstance(interval.get(part), (int, float)):
                out[f"{metric}_{part}"] = float(interval[part])
    if summary.get("rank") is not None:
        out["rank"] = float(summary["rank"])
    out["tied"] = float(bool(summary.get("tied")))
    out["seeds"] = float(summary.get("seeds") or 0)
    out["budget_trials"] = float(summary.get("trials") or 0)
    out["budget_steps"] = float(summary.get("steps") or 0)
    out["budget_worker_seconds"] = float(summary.get("compute_worker_seconds") or 0)
    return out


def methods_markdown(summaries: list[dict], title: str) -> str:
    """The methods table (mean ± half-width of the 95 % interval), the winner and what the intervals mean,
    as Markdown."""
    metrics = [m for m in HEADLINE if any(((s.get("intervals") or {}).get(m) or {}).get("mean") is not None
                                           for s in summaries)]
    lines = [f"### {title}", "", "| rank | method | seeds | " + " | ".join(TITLES[m] for m in metrics) + " |",
             "|---|---|---|" + "---|" * len(metrics)]
    for s in summaries:
        cells = []
        for m in metrics:
            interval = stats.Interval(**s["intervals"][m]) if m in (s.get("intervals") or {}) else None
            if interval is None or interval.mean is None:
                cells.append("-")
            else:
                cells.append(interval.text())
        lines.append(f"| {res.rank_text(s)} | {s['method']} | {s.get('seeds') or '-'} | " + " | ".join(cells) + " |")
    if not metrics:  # no seed re-runs: the best search values
        lines[2:] = ["| rank | method | best accuracy_logratio | KL at best | trials |", "|---|---|---|---|---|"]
        lines += [f"| {res.rank_text(s)} | {s['method']} | {_number(s.get('best_accuracy_logratio'))} | "
                  f"{_number(s.get('kl_at_best'))} | {s.get('trials')} |" for s in summaries]
    lines += ["", f"**Result.** {winner_line(summaries)}", "",
              f"_{res.interval_caption(summaries)}; shown as mean ± half-width, the bounds are the metrics "
              "`{metric}_low` / `{metric}_high`._"]
    return "\n".join(lines) + "\n"


def compare_description(summaries: list[dict], title: str, rows: list[dict], study: dict | None = None) -> str:
    """The compare run's description: `methods_markdown`, headed by the study's question and followed by its
    verdict when the config has a ``study`` section with one (`study.verdict`)."""
    text = methods_markdown(summaries, title)
    if study and study.get("question"):
        text = f"**Question.** {study['question']}\n\n" + text
    if study and study.get("verdict"):
        v = verdict(rows, *study["verdict"])
        kl = stats.Interval(**v["kl_difference"])
        text += (f"\n**Verdict — {v['question']} {v['answer']}** ({v['reason']}; exact KL difference "
                 + (f"{kl.mean:+.4f}, 95 % interval [{kl.low:+.4f}, {kl.high:+.4f}]" if kl.resolved else "unresolved")
                 + ")\n")
    return text


def _number(value) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.4g}"


def _table(rows: list[dict]):
    import pandas as pd

    hp = res.hyperparameter_columns(rows)
    columns = [*TABLE_COLUMNS[:5], *hp, *TABLE_COLUMNS[5:]]
    return pd.DataFrame([{c: r.get(c) for c in columns} for r in rows], columns=columns)


def publish_compare(client, compare_run_id: str | None, method_runs: dict[str, str], summaries: list[dict],
                    rows: list[dict], title: str, description: str | None = None) -> None:
    """Log a comparison's views (module docstring): `method_runs` maps each method to its run; `description`
    (default: `methods_markdown`) becomes the compare run's description."""
    per_method = {s["method"]: method_metrics(s) for s in summaries}
    for method, run_id in method_runs.items():
        if method in per_method:
            log_metrics_once(client, run_id, per_method[method])
    if not compare_run_id:
        return
    log_metrics_once(client, compare_run_id, {f"{m}/{k}": v for m, values in per_method.items()
                                              for k, v in values.items()})
    client.set_tag(compare_run_id, NOTE_TAG, description or methods_markdown(summaries, title))
    if rows and not any(a.path == TABLE_FILE for a in client.list_artifacts(compare_run_id)):
        client.log_table(compare_run_id, data=_table(rows), artifact_file=TABLE_FILE)
