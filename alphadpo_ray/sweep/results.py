"""Sweep results: one row per trial, the Pareto set of accuracy vs KL, method rankings, tables (plots: `plots`).

A trial row: ``trial_id, method, phase, seed, status, error, <hyperparameters>, <METRIC_COLUMNS>, steps,
total_steps, seconds, workers, curve``. ``phase`` is ``search`` or (a compare's re-runs of a method's best
configuration) ``seeds``; ``seed`` the trial's ``training.seed``; ``curve`` its held-out evaluations in
step order (``{"step": [...], metric: [...]}``, JSON only, not in the CSV). The same rows come from a
finished `Tuner` (`rows_from_result_grid`) or from MLflow alone (`alphadpo_ray.sweep.report`).

`rank_methods` turns a comparison's rows into its method summaries and their order — the one ranking
both `compare` and `report` print: mean ± 95 % t-interval over the seed re-runs, ties where the Welch
interval of a difference contains 0 (`alphadpo_ray.sweep.stats`).

``status`` is ``finished``, ``failed``, ``stopped early`` (a scheduler ended the trial at ``steps`` <
``total_steps``) or ``interrupted`` (Ctrl-C stopped the sweep before the trial ended; ``--resume`` continues it). A stopped trial's KL is low partly because it trained less, so it stays off the
Pareto set unless asked for (`SweepConfig.pareto_includes_stopped`); it still counts in the summaries.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from ..console import table_console
from . import stats
from .nested_runs import FAILED, FINISHED, SEARCH, SEEDS, STOPPED, error_reason, trial_status

INTERRUPTED = "interrupted"  # the sweep was interrupted (Ctrl-C) before this trial ended

METRIC_COLUMNS = ("accuracy", "accuracy_logratio", "kl", "kl_per_token", "generation_accuracy", "kl_sampled",
                  "kl_sampled_se", "generated_length")
CURVE_METRICS = ("accuracy_logratio", "kl", "kl_sampled", "accuracy", "generation_accuracy", "generated_length")
INTERVAL_METRICS = ("accuracy_logratio", "accuracy", "kl", "kl_sampled", "generation_accuracy", "generated_length")
ROW_COLUMNS = ("trial_id", "method", "phase", "seed", "status", "error", "steps", "total_steps", "seconds",
               "workers", "pareto", "curve")  # every row's columns besides hyperparameters and metrics
HYPERPARAMETER_ORDER = ("alpha", "beta", "gamma_beta_ratio", "learning_rate", "length_alpha", "cpo_alpha",
                        "label_smoothing")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def curve_from_dataframe(frame) -> dict:
    """A trial's held-out evaluations in step order from Tune's per-report dataframe. Every report carries
    the latest evaluation along; a point is taken only where it was made (``eval/step``), and a step
    reported twice, after a resume, counts once: the last."""
    columns = [m for m in CURVE_METRICS if frame is not None and f"eval/{m}" in frame.columns]
    if not columns or "eval/step" not in frame.columns:
        return {}
    by_step: dict[int, dict] = {}
    for record in frame[["eval/step", *(f"eval/{m}" for m in columns)]].to_dict("records"):
        values = {m: record[f"eval/{m}"] if _finite(record[f"eval/{m}"]) else None for m in columns}
        if _finite(record["eval/step"]) and any(v is not None for v in values.values()):
            by_step[int(record["eval/step"])] = values
    steps = sorted(by_step)
    return {"step": steps, **{m: [by_step[s][m] for s in steps] for m in columns}}


def rows_from_result_grid(grid, method: str, workers: int, phase: str = SEARCH, seed: int | None = None,
                          unended: set[str] | frozenset = frozenset()) -> list[dict]:
    """One row per Tune result; `seed` is the base config's ``training.seed`` (a trial's own wins); trials in
    `unended` (still running or pending when the sweep was interrupted) are ``interrupted``."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path or "?").name
        config = result.config or {}
        row = {"trial_id": trial_id, "method": method, "phase": phase, "seed": config.get("seed", seed),
               "status": INTERRUPTED if Path(result.path or "?").name in unended or trial_id in unended
               else trial_status(metrics, result.error),
               "error": error_reason(str(result.error)) if result.error else "", **config}
        for column in METRIC_COLUMNS:
            value = metrics.get(f"eval/{column}")
            row[column] = value if _finite(value) else None
        row["steps"] = metrics.get("step")
        row["total_steps"] = metrics.get("total_steps")
        row["seconds"] = metrics.get("time_total_s")
        row["workers"] = workers
        row["curve"] = curve_from_dataframe(getattr(result, "metrics_dataframe", None))
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


def best_search_row(rows: list[dict], accuracy: str = "accuracy_logratio") -> dict | None:
    """The best finished search trial: highest `accuracy`, then lower KL, then trial id (the one rule
    compare re-runs with seeds and report reads back)."""
    ok = [r for r in rows if r.get("phase", SEARCH) == SEARCH and r.get("status") == FINISHED
          and _finite(r.get(accuracy))]
    return min(ok, key=lambda r: (-r[accuracy], r["kl"] if _finite(r.get("kl")) else math.inf, str(r["trial_id"])),
               default=None)


def best_config(row: dict) -> dict:
    """A row's hyperparameters (its training seed left out)."""
    return {k: row[k] for k in hyperparameter_columns([row]) if k != "seed"}


def _method_entry(rows: list[dict], accuracy: str, include_stopped: bool | None) -> dict:
    """One method's summary in a comparison: the search's best values and Pareto set (`method_summary`
    over its search trials), what it spent over both phases, and intervals over its seed re-runs."""
    search = [r for r in rows if r.get("phase", SEARCH) == SEARCH]
    seeded = [r for r in rows if r.get("phase") == SEEDS and r.get("status") == FINISHED]
    spent = method_summary(rows, accuracy, include_stopped)
    best = best_search_row(search, accuracy)
    values = [r[accuracy] for r in seeded if _finite(r.get(accuracy))]
    return {
        **method_summary(search, accuracy, include_stopped),
        **{k: spent[k] for k in ("trials", "stopped", "failed", "compute_worker_seconds", "steps")},
        "method": rows[0]["method"] if rows else "",
        "search_trials": len(search),
        "seed_trials": len(rows) - len(search),
        "best_trial": best["trial_id"] if best else None,
        "best_config": best_config(seeded[0] if seeded else best) if (seeded or best) else {},
        "seeds": len(values),
        "seed_values": sorted(r["seed"] for r in seeded if r.get("seed") is not None),
        "intervals": {m: stats.t_interval([r.get(m) for r in seeded]).as_dict() for m in INTERVAL_METRICS}
        if values else {},
    }


def rank_methods(rows_by_method: dict[str, list[dict]], accuracy: str = "accuracy_logratio",
                 include_stopped: bool | None = None) -> list[dict]:
    """Method summaries of a comparison in rank order, each with ``rank`` and ``tied``.

    With seed re-runs: `stats.rank_with_ties` on the per-seed `accuracy` (tiebreak: mean KL), so methods
    within each other's noise share a rank. Without (``sweep.seeds`` 0): the best search values, equal
    values tied. A method with nothing to rank on comes last, rank None."""
    # one row order whatever the source (Tune or MLflow), so sums and so ties come out the same
    rows_by_method = {m: sorted(rows, key=lambda r: (r.get("phase") == SEEDS, str(r.get("seed")), str(r["trial_id"])))
                      for m, rows in rows_by_method.items()}
    entries = {m: _method_entry(rows, accuracy, include_stopped) for m, rows in rows_by_method.items()}
    seeded = {m: e for m, e in entries.items() if e["seeds"]}
    if seeded:
        samples = {m: [r[accuracy] for r in rows_by_method[m] if r.get("phase") == SEEDS
                       and r.get("status") == FINISHED and _finite(r.get(accuracy))] for m in seeded}
        kls = {m: [r.get("kl") for r in rows_by_method[m] if r.get("phase") == SEEDS and r.get("status") == FINISHED]
               for m in seeded}
        ranked = stats.rank_with_ties(samples, higher_is_better=True, tiebreak=kls)
    else:
        best = {m: e[f"best_{accuracy}"] for m, e in entries.items() if _finite(e[f"best_{accuracy}"])}
        order = sorted(best, key=lambda m: (-best[m], entries[m]["kl_at_best"] if _finite(entries[m]["kl_at_best"])
                                            else math.inf, m))
        ranked = [(m, 1 + sum(v > best[m] for v in best.values())) for m in order]
    ranks = dict(ranked)
    shared = [r for _, r in ranked]
    out = [{**entries[m], "rank": r, "tied": shared.count(r) > 1} for m, r in ranked]
    return out + [{**entries[m], "rank": None, "tied": False} for m in sorted(entries) if m not in ranks]


def interval_caption(summaries: list[dict]) -> str:
    """What the intervals and ties of `rank_methods` mean, in one line."""
    counts = sorted({s["seeds"] for s in summaries if s.get("intervals")})
    if not counts:
        return ("no seed re-runs (sweep.seeds 0): best search trial of each method, no intervals; "
                "equal values tied")
    n = str(counts[0]) if len(counts) == 1 else "/".join(map(str, counts))
    return (f"95 % Student-t interval over n = {n} training seeds of each method's best configuration; "
            "tied = Welch interval of the difference contains 0")


def rank_text(summary: dict) -> str:
    """``1``, ``=1`` for a shared rank, ``-`` for none."""
    rank = summary.get("rank")
    return "-" if rank is None else f"{'=' if summary.get('tied') else ''}{rank}"


def hyperparameter_columns(rows: list[dict]) -> list[str]:
    present = {k for r in rows for k in r} - set(METRIC_COLUMNS) - set(ROW_COLUMNS)
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
    columns = ["trial_id", "method", "phase", "seed", "status", *hyperparameter_columns(rows), *METRIC_COLUMNS,
               "pareto", "steps", "total_steps", "seconds", "error"]  # curve: JSON only
    csv_path, json_path = directory / f"{stem}.csv", directory / f"{stem}.json"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(rows, indent=2, default=str))
    return {"csv": csv_path, "json": json_path}


# Console headers for long column names (the CSV/JSON keep the full names); a legend line names the ones used.
SHORT_HEADERS = {"accuracy": "acc", "accuracy_logratio": "acc_lr", "kl_per_token": "kl/tok",
                 "generation_accuracy": "gen_acc", "kl_sampled": "kl_smp", "kl_sampled_se": "kl_smp_se",
                 "generated_length": "gen_len", "gamma_beta_ratio": "γ/β", "learning_rate": "lr",
                 "label_smoothing": "smooth", "length_alpha": "len_α", "cpo_alpha": "cpo_α", "pareto": "★"}


def short_trial_ids(ids: list[str]) -> tuple[dict[str, str], str]:
    """(id → what the table shows, the prefix left off): Tune's ids share their experiment's prefix
    (``174de_00000``, ``174de_00001``…), so the table shows what follows the longest prefix they all share
    up to a ``_`` — still unique, and short enough not to be cut to ``174de_00…`` on every row."""
    unique = list(dict.fromkeys(str(i) for i in ids))
    if len(unique) < 2:
        return {i: i for i in unique}, ""
    common = unique[0]
    for i in unique[1:]:
        while not i.startswith(common):
            common = common[:-1]
    prefix = common[:common.rfind("_") + 1]
    shown = {i: i[len(prefix):] for i in unique}
    if not prefix or any(not v for v in shown.values()) or len(set(shown.values())) < len(unique):
        return {i: i for i in unique}, ""
    return shown, prefix


def _legend(columns: list[str]) -> str:
    used = [f"{SHORT_HEADERS[c]} = {c}" for c in columns if c in SHORT_HEADERS]
    return "  " + ", ".join(used) if used else ""


def print_trials(rows: list[dict], accuracy: str, title: str, console=None) -> None:
    """The trials table, fitted to the console without losing identity: trial ids without their shared
    prefix, columns equal on every row (method, seed, fixed hyperparameters) moved to a line under the
    table, long metric and hyperparameter names abbreviated (`SHORT_HEADERS`, with a legend line), and
    values never cut (headers wrap instead)."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    console = console or table_console()
    hp = hyperparameter_columns(rows)
    metrics = [m for m in METRIC_COLUMNS if any(r.get(m) is not None for r in rows)] or list(METRIC_COLUMNS[:3])
    phases = any(r.get("phase") == SEEDS for r in rows)
    ids, prefix = short_trial_ids([r["trial_id"] for r in rows])
    rank = {FINISHED: 0, STOPPED: 1}
    ordered = sorted(rows, key=lambda r: (r.get("phase") == SEEDS, rank.get(r.get("status"), 2),
                                          -(r.get(accuracy) or -1e9), r.get("kl") or 0))
    cell = {"trial": lambda r: ids[str(r["trial_id"])], "method": lambda r: str(r.get("method", "")),
            "phase": lambda r: str(r.get("phase", "")), "status": status_text, "seed": lambda r: _fmt(r.get("seed")),
            "pareto": lambda r: "★" if r.get("pareto") else ""}
    for k in (*hp, *metrics):
        cell[k] = lambda r, k=k: _fmt(r.get(k))
    columns = ["trial", "method", *(["phase"] if phases else []), "status", "seed", *hp, *metrics, "pareto"]
    fixed = [c for c in ("method", "seed", *hp) if len(ordered) > 1 and len({cell[c](r) for r in ordered}) == 1]
    columns = [c for c in columns if c not in fixed]
    table = Table(title=title, show_lines=False, box=box.SIMPLE_HEAD, padding=(0, 0), pad_edge=False)
    for column in columns:
        table.add_column(escape(SHORT_HEADERS.get(column, column)), overflow="fold",
                         justify="right" if column not in ("trial", "method", "phase", "status") else "left",
                         min_width=max([len(cell[column](r)) for r in ordered] + [1]))
    for r in ordered:
        table.add_row(*(escape(cell[c](r)) for c in columns))
    console.print(table)
    notes = ([f"trial = id after {prefix}"] if prefix else []) + (
        ["all rows: " + ", ".join(f"{SHORT_HEADERS.get(c, c)} {cell[c](ordered[0])}" for c in fixed)] if fixed else [])
    legend = _legend(columns + fixed)
    for line in notes + ([legend.strip()] if legend else []):
        console.print("  " + escape(line))
    for r in ordered:
        if r.get("error"):
            console.print(f"  trial {r['trial_id']} failed: {escape(str(r['error']))}")  # paths like [/__w/…] are not markup


def print_methods(summaries: list[dict], accuracy: str, title: str, console=None) -> None:
    """The methods table: with seed re-runs each metric as mean ± half-width of its interval, with the
    interval method as the caption; otherwise the best search values."""
    from rich.table import Table

    console = console or table_console()
    with_intervals = any(s.get("intervals") for s in summaries)
    table = Table(title=title, caption=interval_caption(summaries) if any("seeds" in s for s in summaries) else None)
    metrics = [m for m in INTERVAL_METRICS if any((s.get("intervals") or {}).get(m, {}).get("mean") is not None
                                                  for s in summaries)]
    if with_intervals:
        columns = ["rank", "method", *metrics, "seeds", "trials", "steps", "compute_worker_seconds"]
    else:
        columns = ["rank", "method", f"best_{accuracy}", "kl_at_best", "pareto_size", "trials", "stopped", "failed",
                   "steps", "compute_worker_seconds"]
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    for s in summaries:
        cells = []
        for c in columns:
            if c == "rank":
                cells.append(rank_text(s))
            elif c in metrics:
                cells.append(stats.Interval(**s["intervals"][c]).text() if c in (s.get("intervals") or {}) else "-")
            else:
                cells.append(_fmt(s.get(c)))
        table.add_row(*cells)
    console.print(table)


def methods_text(summaries: list[dict], accuracy: str, title: str) -> str:
    """The methods table as `print_methods` prints it, as plain text (for files and MLflow)."""
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), record=True, width=200)
    print_methods(summaries, accuracy, title, console=console)
    return console.export_text()
