"""Plots of sweep and comparison results: Pareto fronts, KL over training, α sensitivity, method intervals.

Every plot is built by a ``*_figure`` function (an open matplotlib figure, so tests can inspect what is
drawn) and written by the matching ``plot_*`` function (PNG, parent folders created, figure closed).
Wherever seeds exist the plot shows their mean with the 95 % Student-t interval of `stats.t_interval`;
one method keeps one colour and one marker in every plot. Rows are trial rows (`results`); seed rows
carry ``phase == "seeds"``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import results as res
from .results import hyperparameter_columns, pareto_front, rank_text
from .stats import Interval, t_interval
from .nested_runs import FINISHED, SEEDS, STOPPED

DPI = 120
MARGIN = 0.06  # fraction of the data's span left free on each side of a fitted axis
KL_LABEL = "exact KL(πθ‖πref), teacher-forced on held-out responses (nats)"
METRIC_LABELS = {
    "accuracy": "held-out accuracy (method's own reward)",
    "accuracy_logratio": "held-out accuracy_logratio",
    "kl": "exact KL (nats)",
    "kl_sampled": "sampled KL on own generations (nats)",
    "generation_accuracy": "generation accuracy",
    "generated_length": "generated length (tokens)",
}
FOREST_METRICS = ("accuracy_logratio", "kl", "kl_sampled", "generation_accuracy", "generated_length")
ALPHA_METRICS = ("accuracy", "accuracy_logratio", "kl", "kl_sampled", "generation_accuracy", "generated_length")
CURVE_PANELS = ("kl", "kl_sampled", "accuracy_logratio")
SHORT_NAMES = {"beta": "β", "gamma_beta_ratio": "γ/β", "learning_rate": "lr", "alpha": "α"}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "*")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def method_styles(methods) -> dict[str, tuple[str, str]]:
    """(colour, marker) per method, assigned in name order so a method looks the same in every plot."""
    colours = _pyplot().get_cmap("tab10").colors
    return {m: (colours[i % len(colours)], MARKERS[i % len(MARKERS)]) for i, m in enumerate(sorted(set(methods)))}


def fitted_limits(values, margin: float = MARGIN) -> tuple[float, float] | None:
    """Axis limits that hold the finite `values` with `margin` of their span free on each side
    (never stretched to fixed points such as 0.5 or 1.0); None without finite values."""
    xs = [float(v) for v in values if _finite(v)]
    if not xs:
        return None
    low, high = min(xs), max(xs)
    pad = (high - low) * margin if high > low else max(abs(high) * 0.05, 1e-3)
    return low - pad, high + pad


def _is_seed(row: dict) -> bool:
    return row.get("phase") == SEEDS


def _has(row: dict, *metrics: str) -> bool:
    return all(_finite(row.get(m)) for m in metrics)


def _interval_of(rows: list[dict], metric: str) -> Interval:
    return t_interval([r.get(metric) for r in rows])


def _half_width(interval: Interval) -> float:
    return (interval.high - interval.low) / 2 if interval.resolved else 0.0


def config_columns(rows: list[dict]) -> list[str]:
    """The hyperparameter columns that define a configuration (not the seed, phase, curve or metrics)."""
    return [c for c in hyperparameter_columns(rows) if not any(isinstance(r.get(c), (dict, list)) for r in rows)]


def _config_groups(rows: list[dict], columns: list[str]) -> list[list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(repr(r.get(c)) for c in columns), []).append(r)
    return list(groups.values())


# --- Pareto -----------------------------------------------------------------------------------------


def _seed_means(rows: list[dict], accuracy: str) -> list[tuple[Interval, Interval]]:
    """(KL interval, accuracy interval) over the finished seed rows of each configuration."""
    seeds = [r for r in rows if _is_seed(r) and r.get("status") == FINISHED and _has(r, accuracy, "kl")]
    return [(_interval_of(g, "kl"), _interval_of(g, accuracy)) for g in _config_groups(seeds, config_columns(seeds))]


def _interval_ends(interval: Interval) -> list[float]:
    return [v for v in (interval.mean, interval.low, interval.high) if v is not None]


def _near(value: float, limits: tuple[float, float] | None, reach: float = 0.25) -> bool:
    """Whether `value` lies within the limits widened by `reach` of their span on each side."""
    if limits is None:
        return False
    span = limits[1] - limits[0]
    return limits[0] - reach * span <= value <= limits[1] + reach * span


def pareto_limits(rows_by_method: dict[str, list[dict]], accuracy: str,
                  reference: dict | None = None) -> tuple[tuple[float, float] | None, tuple[float, float] | None, bool]:
    """(x limits, y limits, whether the reference is drawn inside them): fitted to the plotted trials and
    seed intervals; the reference joins them only when it lies near the data on both axes."""
    xs, ys = [], []
    for rows in rows_by_method.values():
        plotted = [r for r in rows
                   if not _is_seed(r) and r.get("status") in (FINISHED, STOPPED) and _has(r, accuracy, "kl")]
        xs += [r["kl"] for r in plotted]
        ys += [r[accuracy] for r in plotted]
        for kl, acc in _seed_means(rows, accuracy):
            xs += _interval_ends(kl)
            ys += _interval_ends(acc)
    x, y = fitted_limits(xs), fitted_limits(ys)
    ref_inside = bool(reference) and _near(reference["kl"], x) and _near(reference["accuracy"], y)
    if ref_inside:
        x, y = fitted_limits([*xs, reference["kl"]]), fitted_limits([*ys, reference["accuracy"]])
    return x, y, ref_inside


def _draw_method_pareto(ax, method: str, rows: list[dict], accuracy: str, style: tuple[str, str]) -> None:
    colour, marker = style
    search = [r for r in rows if not _is_seed(r) and _has(r, accuracy, "kl")]
    front = pareto_front(search, accuracy)
    on_front = {id(r) for r in front}
    finished = [r for r in search if r.get("status") == FINISHED and id(r) not in on_front]
    stopped = [r for r in search if r.get("status") == STOPPED and id(r) not in on_front]
    if finished:
        ax.scatter([r["kl"] for r in finished], [r[accuracy] for r in finished], color=colour, marker=marker, s=26,
                   alpha=0.4, zorder=2, gid=f"trials:{method}", label=f"{method}: trials ({len(finished)})")
    if stopped:
        ax.scatter([r["kl"] for r in stopped], [r[accuracy] for r in stopped], color=colour, marker="x", s=30,
                   alpha=0.6, zorder=2, gid=f"stopped:{method}", label=f"{method}: stopped early ({len(stopped)})")
    if front:
        ax.step([r["kl"] for r in front], [r[accuracy] for r in front], where="post", color=colour, linewidth=1.6,
                zorder=4)
        ax.scatter([r["kl"] for r in front], [r[accuracy] for r in front], color=colour, marker=marker, s=110,
                   edgecolors="black", linewidths=1.3, zorder=6, gid=f"front:{method}",
                   label=f"{method}: Pareto front ({len(front)})")
    for i, (kl, acc) in enumerate(_seed_means(rows, accuracy)):
        ax.errorbar(kl.mean, acc.mean, xerr=_half_width(kl), yerr=_half_width(acc), color=colour, marker=marker,
                    markersize=14, markerfacecolor="white", markeredgewidth=2.2, capsize=4, elinewidth=1.6,
                    zorder=5, gid=f"seeds:{method}:{i}",
                    label=f"{method}: mean of {acc.n} seeds ± 95 % t" if i == 0 else None)


def pareto_figure(rows_by_method: dict[str, list[dict]], accuracy: str, reference: dict | None = None):
    """Accuracy vs exact KL: each method's trials, Pareto front and seed means with error bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 5.5))
    styles = method_styles(rows_by_method)
    for method, rows in rows_by_method.items():
        _draw_method_pareto(ax, method, rows, accuracy, styles[method])
    x, y, ref_inside = pareto_limits(rows_by_method, accuracy, reference)
    if reference:
        text = f"reference πref ({accuracy} {reference['accuracy']:.3g}, KL {reference['kl']:.3g})"
        if ref_inside:
            ax.scatter([reference["kl"]], [reference["accuracy"]], marker="*", s=220, color="black", zorder=7,
                       gid="reference", label=text)
        else:
            ax.plot([], [], marker="*", linestyle="", color="black", markersize=12, gid="reference-note",
                    label=text + ": outside the plotted range")
    if x:
        ax.set_xlim(*x)
    if y:
        ax.set_ylim(*y)
    ax.set_xlabel(KL_LABEL)
    ax.set_ylabel(f"held-out {accuracy}")
    ax.set_title(f"Held-out {accuracy} vs exact KL — small markers: trials (× stopped early),\n"
                 "outlined markers + line: Pareto front, hollow markers with bars: seed mean ± 95 % t-interval",
                 fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no trial with both figures (e.g. all still running): no legend
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig


def plot_pareto(rows_by_method: dict[str, list[dict]], accuracy: str, path: Path,
                reference: dict | None = None) -> Path:
    """Write `pareto_figure` to `path`."""
    return _save(pareto_figure(rows_by_method, accuracy, reference), path)


# --- KL over training -------------------------------------------------------------------------------


def curve_band(rows: list[dict], metric: str) -> tuple[list, list[Interval]]:
    """(steps, t-interval over the rows at each step) of `metric` in the rows' curves."""
    at_step: dict[float, list[float]] = {}
    for r in rows:
        curve = r.get("curve") or {}
        for step, value in zip(curve.get("step") or [], curve.get(metric) or []):
            if _finite(step) and _finite(value):
                at_step.setdefault(step, []).append(value)
    steps = sorted(at_step)
    return steps, [t_interval(at_step[s]) for s in steps]


def _curve_rows(rows: list[dict]) -> tuple[list[dict], str]:
    """The seed rows with curves, else the finished rows with curves (and how the legend names them)."""
    with_curve = [r for r in rows if r.get("status") == FINISHED and (r.get("curve") or {}).get("step")]
    seeds = [r for r in with_curve if _is_seed(r)]
    if seeds:
        return seeds, f"mean of {len(seeds)} seeds"
    return with_curve, f"mean of {len(with_curve)} search trials"


def kl_curves_figure(rows_by_method: dict[str, list[dict]]):
    """KL (exact; sampled when logged) and accuracy_logratio over training steps, mean ± 95 % t band."""
    chosen = {m: _curve_rows(rows) for m, rows in rows_by_method.items()}
    chosen = {m: c for m, c in chosen.items() if c[0]}
    if not chosen:
        return None
    metrics = [m for m in CURVE_PANELS if any(curve_band(rows, m)[0] for rows, _ in chosen.values())]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.4), squeeze=False)
    styles = method_styles(chosen)
    for ax, metric in zip(axes[0], metrics):
        for method, (rows, how) in chosen.items():
            steps, intervals = curve_band(rows, metric)
            if not steps:
                continue
            colour, marker = styles[method]
            ax.plot(steps, [i.mean for i in intervals], color=colour, marker=marker, markersize=4,
                    label=f"{method} ({how})", gid=f"curve:{metric}:{method}")
            banded = [(s, i) for s, i in zip(steps, intervals) if i.resolved]
            if banded:
                ax.fill_between([s for s, _ in banded], [i.low for _, i in banded], [i.high for _, i in banded],
                                color=colour, alpha=0.2, linewidth=0)
        ax.set_title(METRIC_LABELS[metric], fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out value")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.suptitle("Held-out metrics over training: mean over seeds, band = 95 % t-interval", fontsize=11)
    fig.tight_layout()
    return fig


def plot_kl_curves(rows_by_method: dict[str, list[dict]], path: Path) -> Path | None:
    """Write `kl_curves_figure` to `path`; None when no row has a curve."""
    fig = kl_curves_figure(rows_by_method)
    return _save(fig, path) if fig is not None else None


# --- α sensitivity ----------------------------------------------------------------------------------


def alpha_rows(rows: list[dict]) -> list[dict]:
    """Finished AlphaDPO rows with a finite α."""
    return [r for r in rows
            if r.get("method") == "alpha-dpo" and r.get("status") == FINISHED and _finite(r.get("alpha"))]


def varying_columns(rows: list[dict]) -> list[str]:
    """Configuration columns other than α that take more than one value across `rows`."""
    return [c for c in config_columns(rows) if c != "alpha" and len({repr(r.get(c)) for r in rows}) > 1]


def alpha_points(rows: list[dict], metric: str) -> list[tuple[float, Interval]]:
    """(α, t-interval over the rows at that α) in α order, for the α values with a finite `metric`."""
    by_alpha: dict[float, list[dict]] = {}
    for r in rows:
        by_alpha.setdefault(float(r["alpha"]), []).append(r)
    points = [(a, _interval_of(group, metric)) for a, group in sorted(by_alpha.items())]
    return [(a, i) for a, i in points if i.n]


def _fixed_text(rows: list[dict]) -> str:
    return ", ".join(f"{SHORT_NAMES.get(c, c)}={rows[0].get(c)}" for c in config_columns(rows) if c != "alpha")


# α values get a tick each only when there are at most this many and neighbours are at least this share of the axis
# apart (a grid); otherwise matplotlib's own ticks. An α searched over a range has a value per trial: the quickstart's
# 8 trials printed overlapping labels, a 2,000-trial sweep 2,000 labels and grid lines over the points.
ALPHA_TICKS_MAX = 12
ALPHA_TICK_GAP = 0.1


def alpha_ticks(alphas: list[float], limits: tuple[float, float]) -> list[float] | None:
    """The sorted `alphas` as ticks when they read apart on an axis spanning `limits`, else None."""
    gaps = [b - a for a, b in zip(alphas, alphas[1:])]
    if len(alphas) > ALPHA_TICKS_MAX or (gaps and min(gaps) < ALPHA_TICK_GAP * (limits[1] - limits[0])):
        return None
    return alphas


def alpha_sensitivity_figure(rows: list[dict]):
    """AlphaDPO metrics against α: mean ± 95 % t over seeds when only α (and the seed) vary, otherwise the
    raw points under a title saying the grid is not controlled."""
    ok = alpha_rows(rows)
    if not ok:
        return None
    varying = varying_columns(ok)
    metrics = [m for m in ALPHA_METRICS if any(_finite(r.get(m)) for r in ok)]
    plt = _pyplot()
    columns = min(3, len(metrics))
    lines = math.ceil(len(metrics) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.6 * columns, 3.6 * lines), squeeze=False)
    alphas = sorted({float(r["alpha"]) for r in ok})
    for ax, metric in zip(axes.flat, metrics):
        if varying:
            points = [(r["alpha"], r[metric]) for r in ok if _finite(r.get(metric))]
            ax.scatter([a for a, _ in points], [v for _, v in points], color="tab:red", marker="o",
                       gid=f"points:{metric}")
        else:
            points = alpha_points(ok, metric)
            ax.errorbar([a for a, _ in points], [i.mean for _, i in points], yerr=[_half_width(i) for _, i in points],
                        color="tab:blue", marker="o", capsize=4, gid=f"alpha:{metric}")
        limits = fitted_limits([0.0, *alphas])
        ticks = alpha_ticks(alphas, limits)
        if ticks is not None:  # a grid: a tick at each α; a searched α: matplotlib's own ticks
            ax.set_xticks(ticks)
        ax.set_xlim(*limits)
        ax.set_xlabel("α")
        ax.set_title(METRIC_LABELS[metric], fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    if varying:
        names = ", ".join(SHORT_NAMES.get(c, c) for c in varying)
        title = f"AlphaDPO vs α — NOT a controlled grid: {names} also vary (points are single trials)"
    else:
        seeds = max(i.n for _, i in alpha_points(ok, metrics[0]))
        title = (f"AlphaDPO vs α, all else fixed ({_fixed_text(ok)}): mean ± 95 % t-interval over "
                 f"up to {seeds} seeds per α")
    fig.suptitle(title, fontsize=11, color="darkred" if varying else "black")
    fig.tight_layout()
    return fig


def plot_alpha_sensitivity(rows: list[dict], path: Path) -> Path | None:
    """Write `alpha_sensitivity_figure` to `path`; None without finished AlphaDPO rows with an α."""
    fig = alpha_sensitivity_figure(rows)
    return _save(fig, path) if fig is not None else None


# --- method intervals -------------------------------------------------------------------------------


def rank_labels(summaries: list[dict]) -> list[str]:
    """``"=1  dpo"`` for a method tied on its rank, ``"2  simpo"`` otherwise: the rank as tables show it."""
    return [f"{rank_text(s)}  {s.get('method', '')}" for s in summaries]


def method_intervals_figure(summaries: list[dict]):
    """One row per method in ranking order, one panel per metric: the mean and its 95 % t-interval."""
    metrics = [m for m in FOREST_METRICS if any((s.get("intervals") or {}).get(m, {}).get("mean") is not None
                                                  for s in summaries)]
    if not metrics:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics) + 1.5, 0.55 * len(summaries) + 2.0),
                             sharey=True, squeeze=False)
    styles = method_styles(s.get("method", "") for s in summaries)
    rows = range(len(summaries))
    for ax, metric in zip(axes[0], metrics):
        for y, s in zip(rows, summaries):
            interval = (s.get("intervals") or {}).get(metric) or {}
            if interval.get("mean") is None:
                continue
            colour, marker = styles[s.get("method", "")]
            low, high = interval.get("low"), interval.get("high")
            resolved = low is not None and high is not None
            half = [[interval["mean"] - low], [high - interval["mean"]]] if resolved else None
            ax.errorbar([interval["mean"]], [y], xerr=half, color=colour, marker=marker, markersize=8, capsize=4,
                        gid=f"interval:{metric}:{s.get('method', '')}")
        ax.set_title(METRIC_LABELS[metric], fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].set_yticks(list(rows), rank_labels(summaries))
    axes[0][0].invert_yaxis()
    fig.suptitle("Methods in rank order (=k: tied, not resolved apart): mean over seeds ± 95 % t-interval",
                 fontsize=11)
    fig.tight_layout()
    return fig


def plot_method_intervals(summaries: list[dict], path: Path) -> Path | None:
    """Write `method_intervals_figure` to `path`; None when no summary has intervals."""
    fig = method_intervals_figure(summaries)
    return _save(fig, path) if fig is not None else None


__all__ = ["plot_pareto", "plot_kl_curves", "plot_alpha_sensitivity", "plot_method_intervals", "pareto_figure",
           "kl_curves_figure", "alpha_sensitivity_figure", "method_intervals_figure", "pareto_limits",
           "fitted_limits", "curve_band", "alpha_points", "alpha_ticks", "varying_columns", "rank_labels", "method_styles"]


def write_plots(rows_by_method: dict[str, list[dict]], accuracy: str, directory: Path, reference_accuracy=None,
                summaries: list[dict] | None = None) -> dict[str, Path]:
    """The plots of a sweep or compare (those that have something to show): Pareto fronts, KL over
    training, α sensitivity, and (with `summaries`) the methods' intervals. `report` draws the same."""
    reference = None if reference_accuracy is None else {"accuracy": reference_accuracy, "kl": 0.0}
    all_rows = [r for rows in rows_by_method.values() for r in rows]
    files = {
        "pareto_plot": plot_pareto(rows_by_method, accuracy, directory / "pareto.png", reference),
        "kl_curves_plot": plot_kl_curves(rows_by_method, directory / "kl_curves.png"),
        "alpha_plot": plot_alpha_sensitivity(all_rows, directory / "alpha_sensitivity.png"),
    }
    if summaries is not None:
        files["intervals_plot"] = plot_method_intervals(summaries, directory / "method_intervals.png")
    return {k: Path(v) for k, v in files.items() if v}


def write_compare_files(by_method: dict[str, list[dict]], summaries: list[dict], directory: Path,
                        title: str) -> dict[str, Path]:
    """A compare's tables (trials, methods.json, the printed methods table) and plots: what `compare`
    writes and logs, and what `report` rebuilds from MLflow."""
    files = res.write_tables([r for rows in by_method.values() for r in rows], directory)
    files["methods"] = directory / "methods.json"
    files["methods"].write_text(json.dumps(summaries, indent=2, default=str))
    files["methods_table"] = directory / "methods.txt"
    files["methods_table"].write_text(res.methods_text(summaries, "accuracy_logratio", title))
    files.update(write_plots(by_method, "accuracy_logratio", directory, 0.5, summaries))
    return files
