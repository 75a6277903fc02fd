"""`alphadpo-ray study NAME`: a ready experiment (a sweep or a compare) and the report that answers its question.

A study is an experiment config with a ``study:`` section (`alphadpo_ray.config.experiment.StudyConfig`); the ready
ones live in ``experiments/studies/NAME.yaml``. Top to bottom (`run.run_study`):
  1. run the config's sweep (one method over a controlled grid) or compare (methods: search, then seeds);
  2. tabulate: a sweep's rows grouped by ``study.group_by`` (seeds pooled into 95 % t-intervals), a
     compare's ranked methods with their intervals, and the optional verdict "does the first method reach
     lower KL than the second at matched accuracy?" (`stats.lower_kl_verdict`, Welch intervals over seeds);
  3. write ``study.md`` (tables, verdict, plots, the machine and command) and ``study.json`` next to the
     sweep's results, and log both to its MLflow run (tables and verdict also as the run's description).

`study_tables` is a pure function of the config and the rows, so `report` rebuilds the same tables from
MLflow alone.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from ..config.experiment import StudyConfig
from ..console import table_console
from ..errors import AlphaDPOError
from . import stats
from .nested_runs import FINISHED

STUDY_METRICS = ("accuracy_logratio", "accuracy", "kl", "kl_sampled", "generation_accuracy", "generated_length")
METRIC_TITLES = {"accuracy_logratio": "accuracy (log-ratio)", "accuracy": "accuracy (own reward)",
                 "kl": "exact KL", "kl_sampled": "sampled KL", "generation_accuracy": "generation acc.",
                 "generated_length": "gen. length"}
STUDIES_DIR = "experiments/studies"


class StudyNotFound(AlphaDPOError):
    """No study file of that name."""


def study_path(name: str) -> Path:
    """A study file: NAME as a path, else ``experiments/studies/NAME.yaml`` in the working directory or in
    this package's source tree."""
    roots = [root / STUDIES_DIR for root in (Path.cwd(), Path(__file__).resolve().parents[2])]
    candidates = ([Path(name)] if name.endswith((".yaml", ".yml")) else []) + [r / f"{name}.yaml" for r in roots]
    for path in candidates:
        if path.is_file():
            return path
    known = dict.fromkeys(sorted(p.stem for r in roots for p in r.glob("*.yaml")))
    raise StudyNotFound(f"no study {name!r}: expected a YAML file or one of {', '.join(known) or 'none'} "
                        f"(in {STUDIES_DIR}/)")


def _intervals(rows: list[dict]) -> dict[str, dict]:
    return {m: stats.t_interval([r.get(m) for r in rows]).as_dict() for m in STUDY_METRICS
            if any(isinstance(r.get(m), (int, float)) for r in rows)}


def _finished(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == FINISHED]


def _groups(rows: list[dict], group_by: str) -> list[tuple]:
    groups: dict = {}
    for row in _finished(rows):
        groups.setdefault(row.get(group_by), []).append(row)
    return sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0]))


def grouped_table(rows: list[dict], group_by: str) -> list[dict]:
    """One entry per value of `group_by` (ascending): the finished rows' seeds and metric intervals."""
    return [{group_by: value, "seeds": sorted(r.get("seed") for r in members if r.get("seed") is not None),
             "intervals": _intervals(members)} for value, members in _groups(rows, group_by)]


def contrast(rows: list[dict], group_by: str) -> dict:
    """The largest value of `group_by` against the smallest: per metric, the Welch interval of the
    difference of their means over seeds (is the trend resolved, or within noise?)."""
    groups = _groups(rows, group_by)
    if len(groups) < 2:
        return {}
    (low, first), (high, last) = groups[0], groups[-1]
    differences = {m: stats.difference_interval([r.get(m) for r in last], [r.get(m) for r in first]).as_dict()
                   for m in STUDY_METRICS if any(isinstance(r.get(m), (int, float)) for r in first + last)}
    return {"from": low, "to": high, "differences": differences}


def _seed_rows(rows: list[dict], method: str) -> list[dict]:
    mine = [r for r in _finished(rows) if r.get("method") == method]
    return [r for r in mine if r.get("phase") == "seeds"] or mine


def verdict(rows: list[dict], first: str, second: str) -> dict:
    """`stats.lower_kl_verdict` of `first` vs `second` on their seed rows (accuracy: accuracy_logratio), on the
    exact teacher-forced KL (the answer) and, where logged, on the sampled KL (``sampled``)."""
    a, b = _seed_rows(rows, first), _seed_rows(rows, second)

    def on(kl: str) -> dict:
        return stats.lower_kl_verdict([r.get(kl) for r in a], [r.get(kl) for r in b],
                                      [r.get("accuracy_logratio") for r in a], [r.get("accuracy_logratio") for r in b])

    out = {"first": first, "second": second, "question": f"{first}: lower KL than {second} at matched accuracy?",
           **on("kl")}
    if any(isinstance(r.get("kl_sampled"), (int, float)) for r in a + b):
        out["sampled"] = on("kl_sampled")
    return out


def winner_line(methods: list[dict]) -> str:
    """Who wins, or that no difference is resolved at the top (ranks share ties)."""
    top = [m["method"] for m in methods if m.get("rank") == 1]
    if not methods:
        return "no finished method"
    if len(top) == len(methods):
        return "no difference resolved: every method's interval overlaps the best (all rank 1)"
    if len(top) > 1:
        return f"no difference resolved among {', '.join(top)} (tied at rank 1); they are resolved better than the rest"
    return f"{top[0]} wins: resolved better than every other method"


def study_tables(study: StudyConfig, rows: list[dict], methods: list[dict] | None = None) -> dict:
    """The study's tables as data: ``groups`` (sweep with group_by), ``methods`` (compare, in rank order),
    ``winner`` and ``verdict`` (compare)."""
    out: dict = {"title": study.title, "question": study.question, "kind": study.kind,
                 "interval": "95 % Student-t interval over training seeds (mean ± half-width)"}
    if study.kind == "sweep" and study.group_by:
        out["group_by"] = study.group_by
        out["groups"] = grouped_table(rows, study.group_by)
        out["contrast"] = contrast(rows, study.group_by)
    if study.kind == "compare":
        out["methods"] = [{k: m.get(k) for k in ("rank", "method", "intervals", "seeds", "best_config", "trials", "steps")}
                          for m in methods or []]
        out["winner"] = winner_line(out["methods"])
        if study.verdict:
            out["verdict"] = verdict(rows, *study.verdict)
    return out


def _cell(interval: dict | None) -> str:
    if not interval:
        return "-"
    return stats.Interval(**interval).text()


def _metric_header(entries: list[dict]) -> list[str]:
    present = {m for e in entries for m in (e.get("intervals") or {})}
    return [m for m in STUDY_METRICS if m in present]


def markdown(tables: dict, context: dict, plots: dict[str, str]) -> str:
    """``study.md``: question, tables, verdict, plots, and where and how the figures were made."""
    lines = [f"# {tables['title']}", ""]
    if tables.get("question"):
        lines += [f"**Question.** {tables['question']}", ""]
    entries = tables.get("groups") or tables.get("methods") or []
    metrics = _metric_header(entries)
    if "groups" in tables:
        key = tables["group_by"]
        lines += [f"| {key} | seeds | " + " | ".join(METRIC_TITLES[m] for m in metrics) + " |",
                  "|---|---|" + "---|" * len(metrics)]
        for g in entries:
            lines.append(f"| {g[key]} | {len(g['seeds'])} | " + " | ".join(_cell(g['intervals'].get(m)) for m in metrics) + " |")
    if "methods" in tables:
        lines += ["| rank | method | seeds | " + " | ".join(METRIC_TITLES[m] for m in metrics) + " |",
                  "|---|---|---|" + "---|" * len(metrics)]
        ranks = [m.get("rank") for m in entries]
        for m in entries:
            tied = ranks.count(m.get("rank")) > 1
            lines.append(f"| {'=' if tied else ''}{m.get('rank')} | {m['method']} | {m.get('seeds') or '-'} | "
                         + " | ".join(_cell((m.get('intervals') or {}).get(k)) for k in metrics) + " |")
        lines += ["", f"**Result.** {tables['winner']}"]
    if tables.get("contrast"):
        c = tables["contrast"]
        lines += ["", f"**{tables['group_by']} {c['to']} against {c['from']}** (difference of means, 95 % Welch interval):", ""]
        for metric, d in c["differences"].items():
            interval = stats.Interval(**d)
            resolved = interval.resolved and (interval.low > 0 or interval.high < 0)
            lines.append(f"- {METRIC_TITLES[metric]}: {_range(interval)} — "
                         f"{'resolved' if resolved else 'no difference resolved'}")
    lines += ["", f"Intervals: {tables['interval']}."]
    if "methods" in tables:
        lines[-1] += (" Ranks: 1 + the number of methods resolved better (Welch interval of the difference of "
                      "means excludes 0); equal ranks are ties.")
    if "verdict" in tables:
        v = tables["verdict"]
        kl, acc = stats.Interval(**v["kl_difference"]), stats.Interval(**v["accuracy_difference"])
        lines += ["", f"**Verdict — {v['question']} {v['answer']}** (exact teacher-forced KL: {v['reason']}).",
                  "", f"- exact KL({v['first']}) − KL({v['second']}): {_range(kl)}",
                  f"- accuracy_logratio({v['first']}) − ({v['second']}): {_range(acc)}"]
        if v.get("sampled"):
            sampled = v["sampled"]
            lines.append(f"- sampled KL({v['first']}) − KL({v['second']}): "
                         f"{_range(stats.Interval(**sampled['kl_difference']))} → on the sampled KL: "
                         f"**{sampled['answer']}** ({sampled['reason']})")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({path})" for name, path in plots.items()]
    lines += ["", "## How these figures were made", "",
              f"- command: `{context['command']}`",
              f"- machine: {context['machine']}",
              f"- date: {context['date']}, wall time {context['wall_seconds']:.0f} s, load average "
              f"{context['load_before']} before → {context['load_after']} after"]
    return "\n".join(lines) + "\n"


def _range(interval: stats.Interval) -> str:
    if interval.mean is None:
        return "-"
    if not interval.resolved:
        return f"{interval.mean:+.4f} (no interval: one seed)"
    return f"{interval.mean:+.4f}, 95 % interval [{interval.low:+.4f}, {interval.high:+.4f}]"


def machine() -> str:
    return f"{platform.node()}: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}"


def write_study(tables: dict, context: dict, plots: dict, directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    md, js = directory / "study.md", directory / "study.json"
    md.write_text(markdown(tables, context, plots))
    js.write_text(json.dumps({**tables, "context": context, "plots": plots}, indent=2, default=str))
    return {"markdown": md, "json": js}


def print_study(tables: dict, console=None) -> None:
    """The study's table and verdict on the console."""
    from rich.table import Table

    console = console or table_console()
    entries = tables.get("groups") or tables.get("methods") or []
    metrics = _metric_header(entries)
    table = Table(title=f"{tables['title']} — {tables['interval']}")
    first = [tables["group_by"], "seeds"] if "groups" in tables else ["rank", "method", "seeds"]
    for column in [*first, *(METRIC_TITLES[m] for m in metrics)]:
        table.add_column(column, justify="right")
    for e in entries:
        head = ([str(e[tables["group_by"]]), str(len(e["seeds"]))] if "groups" in tables
                else [str(e.get("rank")), e["method"], str(e.get("seeds") or "-")])
        table.add_row(*head, *(_cell((e.get("intervals") or {}).get(m)) for m in metrics))
    console.print(table)
    if "winner" in tables:
        console.print(tables["winner"])
    if "verdict" in tables:
        v = tables["verdict"]
        console.print(f"verdict — {v['question']} [bold]{v['answer']}[/bold] (exact KL: {v['reason']})"
                      + (f"; on the sampled KL: {v['sampled']['answer']}" if v.get("sampled") else ""))
