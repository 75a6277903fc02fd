"""The result plots on synthetic rows: fitted axes, visible fronts, the reference marker, error bars from
seeds, the controlled-grid check, curves and tie marks. Fast: no Ray, no training."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest

from alphadpo_ray.sweep import plots
from alphadpo_ray.sweep.stats import t_interval

PNG = b"\x89PNG"


def _row(method, accuracy, kl, status="finished", pareto=False, phase="search", seed=0, **config):
    return {"trial_id": f"{method}-{accuracy}-{kl}-{seed}", "method": method, "status": status, "pareto": pareto,
            "phase": phase, "seed": seed, "accuracy_logratio": accuracy, "accuracy": accuracy, "kl": kl, **config}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def rows_by_method():
    return {
        "dpo": [_row("dpo", 0.70, 0.30, pareto=True, beta=0.1), _row("dpo", 0.66, 0.40, beta=0.2),
                _row("dpo", 0.74, 0.55, pareto=True, beta=0.3),
                _row("dpo", 0.62, 0.20, status="stopped early", beta=0.4),
                *(_row("dpo", a, k, phase="seeds", seed=s, beta=0.1)
                  for s, (a, k) in enumerate([(0.69, 0.31), (0.72, 0.29), (0.70, 0.34)]))],
        # one finished trial: a front of one point, which must stay visible above other methods' dots
        "simpo": [_row("simpo", 0.68, 0.35, pareto=True, beta=2.0), _row("simpo", 0.1, 9.0, status="failed", beta=3.0)],
    }


def _artist(ax, gid):
    found = [a for a in [*ax.collections, *ax.lines] if a.get_gid() == gid]
    return found[0] if found else None


def _error_bars(ax, gid):
    """The errorbar container whose data line carries `gid`: (data line, caps, (bar segments,...))."""
    return next(c for c in ax.containers if c.lines[0].get_gid() == gid).lines


def test_pareto_axes_are_fitted_to_the_data(rows_by_method, tmp_path):
    fig = plots.pareto_figure(rows_by_method, "accuracy_logratio", reference={"accuracy": 0.5, "kl": 0.0})
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    plotted = [0.70, 0.66, 0.74, 0.62, 0.68] + [t_interval([0.69, 0.72, 0.70]).low]
    span = max(plotted) - min(plotted)
    # the reference's 0.5 is far below the data: the axis is not stretched to it, nor to 1.0
    assert min(plotted) - 0.1 * span <= low < min(plotted)
    assert max(plotted) < high <= max(0.74, t_interval([0.69, 0.72, 0.70]).high) + 0.1 * span
    assert "outside the plotted range" in " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert _artist(ax, "reference") is None and _artist(ax, "reference-note") is not None
    assert ax.get_xlabel() == plots.KL_LABEL
    assert plots.plot_pareto(rows_by_method, "accuracy_logratio", tmp_path / "a" / "pareto.png").read_bytes()[:4] == PNG


def test_pareto_single_point_front_and_reference_marker_drawn(rows_by_method):
    fig = plots.pareto_figure(rows_by_method, "accuracy_logratio", reference={"accuracy": 0.66, "kl": 0.25})
    ax = fig.axes[0]
    front = _artist(ax, "front:simpo")
    trials = _artist(ax, "trials:dpo")
    assert front is not None and len(front.get_offsets()) == 1
    assert front.get_zorder() > trials.get_zorder()
    assert front.get_sizes()[0] > trials.get_sizes()[0]
    assert len(_artist(ax, "front:dpo").get_offsets()) == 2
    reference = _artist(ax, "reference")
    assert reference is not None and list(reference.get_offsets()[0]) == [0.25, 0.66]
    x_low, x_high = ax.get_xlim()
    assert x_low < 0.25 < x_high
    # distinct colour and marker per method
    styles = plots.method_styles(rows_by_method)
    assert styles["dpo"][0] != styles["simpo"][0] and styles["dpo"][1] != styles["simpo"][1]


def test_pareto_seed_mean_has_t_error_bars(rows_by_method):
    fig = plots.pareto_figure(rows_by_method, "accuracy_logratio")
    marker, caps, (x_bar, y_bar) = _error_bars(fig.axes[0], "seeds:dpo:0")
    acc = t_interval([0.69, 0.72, 0.70])
    kl = t_interval([0.31, 0.29, 0.34])
    assert marker.get_ydata()[0] == pytest.approx(acc.mean)
    (y_segment,) = y_bar.get_segments()
    assert [p[1] for p in y_segment] == pytest.approx([acc.low, acc.high])
    (x_segment,) = x_bar.get_segments()
    assert [p[0] for p in x_segment] == pytest.approx([kl.low, kl.high])


def test_fitted_limits():
    assert plots.fitted_limits([0.6, 0.7], margin=0.1) == pytest.approx((0.59, 0.71))
    low, high = plots.fitted_limits([0.8])
    assert low < 0.8 < high and high - low < 0.1
    assert plots.fitted_limits([None, float("nan")]) is None


def _alpha_row(alpha, seed, accuracy, kl, **fixed):
    config = {"beta": 0.1, "gamma_beta_ratio": 0.5, "learning_rate": 1e-4, **fixed}
    return {**_row("alpha-dpo", accuracy, kl, seed=seed, alpha=alpha, **config), "kl_sampled": kl * 1.1}


def test_alpha_controlled_grid_has_seed_error_bars(tmp_path):
    values = {0.0: [0.60, 0.64, 0.62], 0.05: [0.66, 0.65, 0.69], 0.1: [0.70, 0.74, 0.71], 0.2: [0.72, 0.70, 0.75],
              0.3: [0.71, 0.69, 0.73]}
    rows = [_alpha_row(a, s, v, 0.1 + a) for a, vs in values.items() for s, v in enumerate(vs)]
    rows.append(_row("dpo", 0.9, 0.1, beta=0.1))  # other methods are ignored
    points = plots.alpha_points(plots.alpha_rows(rows), "accuracy_logratio")
    assert [a for a, _ in points] == list(values)
    for (_, interval), seed_values in zip(points, values.values()):
        assert interval == t_interval(seed_values) and interval.n == 3
    fig = plots.alpha_sensitivity_figure(rows)
    title = fig._suptitle.get_text()
    assert "NOT a controlled grid" not in title and "β=0.1" in title
    ax = next(a for a in fig.axes if a.get_title() == plots.METRIC_LABELS["accuracy_logratio"])
    assert ax.get_xscale() == "linear" and ax.get_xlim()[0] < 0.0
    marker, _, (y_bar,) = _error_bars(ax, "alpha:accuracy_logratio")
    assert [s[1][1] - s[0][1] for s in y_bar.get_segments()] == pytest.approx(
        [t_interval(v).high - t_interval(v).low for v in values.values()])
    titles = {a.get_title() for a in fig.axes if a.get_visible()}
    assert plots.METRIC_LABELS["kl_sampled"] in titles and plots.METRIC_LABELS["generated_length"] not in titles
    assert plots.plot_alpha_sensitivity(rows, tmp_path / "alpha.png").read_bytes()[:4] == PNG


def test_alpha_uncontrolled_set_is_labelled(tmp_path):
    rows = [_alpha_row(0.0, 0, 0.6, 0.1), _alpha_row(0.1, 0, 0.7, 0.2, beta=0.3, learning_rate=5e-5)]
    assert plots.varying_columns(rows) == ["beta", "learning_rate"]
    fig = plots.alpha_sensitivity_figure(rows)
    assert fig._suptitle.get_text().startswith("AlphaDPO vs α — NOT a controlled grid: β, lr also vary")
    assert plots.plot_alpha_sensitivity(rows, tmp_path / "alpha.png").exists()
    assert plots.plot_alpha_sensitivity([_row("dpo", 0.7, 0.1)], tmp_path / "none.png") is None


def test_alpha_ticks_are_the_grid_or_a_readable_few(tmp_path):
    """A grid of α values gets a tick at each; an α searched over a range (a value per trial: the quickstart's 8
    trials printed overlapping labels, a 2,000-trial sweep 2,000 labels and grid lines over the points) gets
    matplotlib's few."""
    import random

    grid = [_alpha_row(a, s, 0.6 + a, 0.1 + a) for a in (0.0, 0.05, 0.1, 0.2) for s in range(2)]
    ax = plots.alpha_sensitivity_figure(grid).axes[0]
    assert list(ax.get_xticks()) == [0.0, 0.05, 0.1, 0.2]
    rng = random.Random(0)
    quickstart = [0.0110, 0.0187, 0.0500, 0.0550, 0.0792, 0.1641, 0.2000, 0.2279]  # `make run`'s 8 trials
    many = [rng.uniform(0.0, 0.5) for _ in range(300)]
    for alphas in (quickstart, many):
        searched = [_alpha_row(a, 0, 0.6, 0.1, beta=rng.uniform(1, 3)) for a in alphas]
        fig = plots.alpha_sensitivity_figure(searched)
        for ax in (a for a in fig.axes if a.get_visible()):
            low, high = ax.get_xlim()
            shown = [t for t in ax.get_xticks() if low <= t <= high]
            steps = {round(b - a, 9) for a, b in zip(shown, shown[1:])}
            assert 3 <= len(shown) <= 12 and len(steps) == 1, shown  # matplotlib's evenly spaced ticks
        assert plots.plot_alpha_sensitivity(searched, tmp_path / "alpha.png").read_bytes()[:4] == PNG


def _curve(kl_values, acc_values, sampled=True):
    curve = {"step": [10, 20, 30], "kl": kl_values, "accuracy_logratio": acc_values}
    if sampled:
        curve["kl_sampled"] = [v * 1.2 for v in kl_values]
    return curve


def test_kl_curves_mean_and_band_over_seeds(tmp_path):
    seeds = [{**_row("dpo", 0.7, 0.3, phase="seeds", seed=s), "curve": _curve(kl, [0.6, 0.65, 0.7])}
             for s, kl in enumerate([[0.1, 0.2, 0.3], [0.12, 0.25, 0.28], [0.09, 0.22, 0.35]])]
    search = [{**_row("dpo", 0.7, 9.0), "curve": _curve([5.0, 6.0, 7.0], [0.6, 0.6, 0.6])}]
    simpo = [{**_row("simpo", 0.7, 0.2), "curve": _curve([0.05, 0.1, 0.2], [0.55, 0.6, 0.7], sampled=False)}]
    steps, intervals = plots.curve_band(seeds, "kl")
    assert steps == [10, 20, 30]
    assert intervals[1] == t_interval([0.2, 0.25, 0.22])
    fig = plots.kl_curves_figure({"dpo": seeds + search, "simpo": simpo})
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [plots.METRIC_LABELS[m] for m in ("kl", "kl_sampled", "accuracy_logratio")]
    dpo_line = _artist(fig.axes[0], "curve:kl:dpo")
    assert list(dpo_line.get_ydata()) == pytest.approx([i.mean for i in intervals])  # the seeds, not the search trial
    assert "mean of 3 seeds" in dpo_line.get_label()
    assert "search trials" in _artist(fig.axes[0], "curve:kl:simpo").get_label()
    assert _artist(fig.axes[1], "curve:kl_sampled:simpo") is None
    assert plots.plot_kl_curves({"dpo": seeds}, tmp_path / "kl.png").read_bytes()[:4] == PNG
    assert plots.plot_kl_curves({"dpo": [_row("dpo", 0.7, 0.3)]}, tmp_path / "none.png") is None


def _summary(method, rank, mean, tied):
    return {"method": method, "rank": rank, "tied": tied, "intervals": {
        "accuracy_logratio": t_interval([mean - 0.01, mean, mean + 0.02]).as_dict(),
        "kl": {"mean": 0.3, "low": None, "high": None, "n": 1, "level": 0.95}}}


def test_method_intervals_mark_ties(tmp_path):
    summaries = [_summary("alpha-dpo", 1, 0.8, True), _summary("simpo", 1, 0.79, True), _summary("dpo", 3, 0.6, False)]
    assert plots.rank_labels(summaries) == ["=1  alpha-dpo", "=1  simpo", "3  dpo"]
    fig = plots.method_intervals_figure(summaries)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["=1  alpha-dpo", "=1  simpo", "3  dpo"]
    assert [a.get_title() for a in fig.axes] == [plots.METRIC_LABELS["accuracy_logratio"], plots.METRIC_LABELS["kl"]]
    marker, _, (x_bar,) = _error_bars(ax, "interval:accuracy_logratio:dpo")
    expected = t_interval([0.59, 0.6, 0.62])
    (segment,) = x_bar.get_segments()
    assert [p[0] for p in segment] == pytest.approx([expected.low, expected.high]) and marker.get_ydata()[0] == 2
    assert plots.plot_method_intervals(summaries, tmp_path / "m" / "methods.png").read_bytes()[:4] == PNG
    assert plots.plot_method_intervals([{"method": "dpo", "rank": 1}], tmp_path / "none.png") is None
