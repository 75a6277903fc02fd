"""Sweep results: one row per trial, the Pareto set of accuracy vs KL, tables and plots.

A trial row: ``trial_id, method, status, error, <hyperparameters>, accuracy, accuracy_logratio, kl,
kl_per_token, generation_accuracy, steps, total_steps, seconds, workers``. The same rows come from a
finished `Tuner` (`rows_from_result_grid`) or from MLflow alone (`alphadpo_ray.sweep.report`).

``status`` is ``finished``, ``failed`` or ``stopped early`` (a scheduler ended the trial at ``steps`` <
``total_steps``). A stopped trial's KL is low partly because it trained less, so it stays off the
Pareto set unless asked for (`SweepConfig.pareto_includes_stopped`); it still counts in the summaries.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .tracking import FAILED, FINISHED, STOPPED, error_reason, trial_status

METRIC_COLUMNS = ("accuracy", "accuracy_logratio", "kl", "kl_per_token", "generation_accuracy")
HYPERPARAMETER_ORDER = ("alpha", "beta", "gamma_beta_ratio", "learning_rate", "length_alpha", "cpo_alpha",
                        "label_smoothing")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def rows_from_result_grid(grid, method: str, workers: int) -> list[dict]:
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path or "?").name
        row = {"trial_id": trial_id, "method": method, "status": trial_status(metrics, result.error),
               "error": error_reason(str(result.error)) if result.error else "", **(result.config or {})}
        for column in METRIC_COLUMNS:
            value = metrics.get(f"eval/{column}")
            row[column] = value if _finite(value) else None
        row["steps"] = metrics.get("step")
        row["total_steps"] = metrics.get("total_steps")
        row["seconds"] = metrics.get("time_total_s")
        row["workers"] = workers
        rows.append(row)
    return rows


def _front(rows: list[dict], accuracy: str, include_stopped: bool) -> list[dict]:
    statuses = (FINISHED, STOPPED) if include_stopped else (FINISHED,)
    ok = [r for r in rows if r.get("status") in statuses and _finite(r.get(accuracy)) and _finite(r.get("kl"))]
    front = [
        r for r in ok
        if not any((o[accuracy] >= r[accuracy] and o["kl"] <= r["kl"]) and (o[accuracy] > r[accuracy] or o["kl"] < r["kl"])
                   for o in ok)
    ]
    return sorted(front, key=lambda r: r["kl"])


def pareto_front(rows: list[dict], accuracy: str = "accuracy", include_stopped: bool | None = None) -> list[dict]:
    """Trials not dominated in (max accuracy, min kl), sorted by KL: finished ones, and those stopped
    early by a scheduler only with ``include_stopped``.

    Rows already marked by `mark_pareto` (every row has ``pareto``) keep their marks unless
    ``include_stopped`` is given, so tables, plots, summaries and results.json show one front."""
    if include_stopped is None and rows and all("pareto" in r for r in rows):
        return sorted((r for r in rows if r["pareto"]), key=lambda r: r["kl"])
    return _front(rows, accuracy, bool(include_stopped))


def method_summary(rows: list[dict], accuracy: str, include_stopped: bool | None = None) -> dict:
    """Best accuracy (and its KL) among the trials that trained to the end, the Pareto set size, and
    what the method spent: every trial counts, stopped early and failed ones too."""
    ok = [r for r in rows if r.get("status") == FINISHED and _finite(r.get(accuracy))]
    best = max((r[accuracy] for r in ok), default=None)
    at_best = [r for r in ok if r[accuracy] == best and _finite(r.get("kl"))]
    return {
        "method": rows[0]["method"] if rows else "",
        "best_" + accuracy: best,
        "kl_at_best": min((r["kl"] for r in at_best), default=None),
        "pareto_size": len(pareto_front(rows, accuracy, include_stopped)),
        "trials": len(rows),
        "stopped": sum(r.get("status") == STOPPED for r in rows),
        "failed": sum(r.get("status") == FAILED for r in rows),
        "compute_worker_seconds": round(sum((r.get("seconds") or 0) * (r.get("workers") or 1) for r in rows), 1),
        "steps": sum(int(r.get("steps") or 0) for r in rows),
    }


def hyperparameter_columns(rows: list[dict]) -> list[str]:
    present = {k for r in rows for k in r} - set(METRIC_COLUMNS) - {
        "trial_id", "method", "status", "error", "steps", "total_steps", "seconds", "workers", "pareto"}
    return [k for k in HYPERPARAMETER_ORDER if k in present] + sorted(present - set(HYPERPARAMETER_ORDER))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if (abs(value) < 1e-2 or abs(value) >= 1e3) and value != 0 else f"{value:.3f}"
    return str(value)


def status_text(row: dict) -> str:
    """The status as tables show it: a stopped trial with the step it stopped at."""
    if row.get("status") == STOPPED and row.get("steps") is not None:
        total = row.get("total_steps")
        return f"{STOPPED} @ step {row['steps']}" + (f"/{total}" if total is not None else "")
    return str(row.get("status"))


def mark_pareto(rows: list[dict], accuracy: str, include_stopped: bool = False) -> list[dict]:
    """Each row with ``pareto``: whether it is on the front (stopped trials only with ``include_stopped``)."""
    front = {id(r) for r in _front(rows, accuracy, include_stopped)}
    return [{**r, "pareto": id(r) in front} for r in rows]


def write_tables(rows: list[dict], directory: Path, stem: str = "trials") -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    columns = ["trial_id", "method", "status", *hyperparameter_columns(rows), *METRIC_COLUMNS,
               "pareto", "steps", "total_steps", "seconds", "error"]
    csv_path, json_path = directory / f"{stem}.csv", directory / f"{stem}.json"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(rows, indent=2, default=str))
    return {"csv": csv_path, "json": json_path}


def _console():
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=180)


def print_trials(rows: list[dict], accuracy: str, title: str, console=None) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = console or _console()
    hp = hyperparameter_columns(rows)
    table = Table(title=title, show_lines=False)
    for column in ("trial", "status", *hp, *METRIC_COLUMNS, "pareto"):
        table.add_column(column, justify="right" if column not in ("trial", "status") else "left")
    rank = {FINISHED: 0, STOPPED: 1}
    ordered = sorted(rows, key=lambda r: (rank.get(r.get("status"), 2), -(r.get(accuracy) or -1e9), r.get("kl") or 0))
    for r in ordered:
        table.add_row(str(r["trial_id"]), status_text(r), *(_fmt(r.get(k)) for k in hp),
                      *(_fmt(r.get(k)) for k in METRIC_COLUMNS), "★" if r.get("pareto") else "")
    console.print(table)
    for r in ordered:
        if r.get("error"):
            console.print(f"  trial {r['trial_id']} failed: {escape(str(r['error']))}")  # paths like [/__w/…] are not markup


def print_methods(summaries: list[dict], accuracy: str, title: str, console=None) -> None:
    from rich.table import Table

    console = console or _console()
    table = Table(title=title)
    columns = ["method", f"best_{accuracy}", "kl_at_best", "pareto_size", "trials", "stopped", "failed", "steps",
               "compute_worker_seconds"]
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    for s in summaries:
        table.add_row(*(_fmt(s.get(c)) for c in columns))
    console.print(table)


# --- plots ------------------------------------------------------------------------------------------


def plot_pareto(rows_by_method: dict[str, list[dict]], accuracy: str, path: Path, reference_accuracy=None) -> Path:
    """Each method's trials and Pareto front of held-out accuracy vs KL on one chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (method, rows) in enumerate(sorted(rows_by_method.items())):
        colour = colours[i % len(colours)]
        ok = [r for r in rows if _finite(r.get(accuracy)) and _finite(r.get("kl")) and r["status"] == FINISHED]
        ax.scatter([r["kl"] for r in ok], [r[accuracy] for r in ok], color=colour, alpha=0.35, s=22)
        stopped = [r for r in rows if _finite(r.get(accuracy)) and _finite(r.get("kl")) and r["status"] == STOPPED]
        if stopped:
            ax.scatter([r["kl"] for r in stopped], [r[accuracy] for r in stopped], color=colour, alpha=0.5, s=22,
                       marker="x", label=f"{method}: {len(stopped)} stopped early")
        front = pareto_front(rows, accuracy)
        if front:
            ax.step([r["kl"] for r in front], [r[accuracy] for r in front], where="post", color=colour,
                    marker="o", label=f"{method} ({len(front)} on front)")
    if reference_accuracy is not None:
        ax.axhline(reference_accuracy, color="grey", linestyle=":", label="reference")
    ax.set_xlabel("KL(πθ‖πref) per held-out response (nats)")
    ax.set_ylabel(f"held-out {accuracy}")
    ax.set_title("Accuracy vs KL: trials (dots; × stopped early) and Pareto fronts (lines)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_alpha_sensitivity(rows: list[dict], accuracy: str, path: Path) -> Path | None:
    """AlphaDPO: held-out accuracy and KL against α (log scale)."""
    ok = [r for r in rows if r.get("method") == "alpha-dpo" and r["status"] == "finished"
          and _finite(r.get("alpha")) and _finite(r.get(accuracy))]
    if not ok:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok.sort(key=lambda r: r["alpha"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    a1.scatter([r["alpha"] for r in ok], [r[accuracy] for r in ok], color="tab:blue")
    a1.set_ylabel(f"held-out {accuracy}")
    a2.scatter([r["alpha"] for r in ok], [r.get("kl") for r in ok], color="tab:red")
    a2.set_ylabel("KL")
    for ax in (a1, a2):
        ax.set_xscale("log")
        ax.set_xlabel("α")
        ax.grid(alpha=0.3)
    fig.suptitle("AlphaDPO α sensitivity")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
