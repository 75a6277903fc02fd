"""`alphadpo-ray study`: its config section, tables, winner line, verdict and report text (no Ray here;
the studies themselves run from experiments/studies/ and their figures are in docs/comparisons.md)."""

from __future__ import annotations

import pytest

from alphadpo_ray.config.experiment import StudyConfig, config_from_dict
from alphadpo_ray.errors import ConfigError
from alphadpo_ray.sweep import stats
from alphadpo_ray.sweep.study import (StudyNotFound, contrast, grouped_table, markdown, study_path, study_tables,
                                      verdict, winner_line)


def _row(method, seed, acc, kl, phase="seeds", **extra):
    return {"method": method, "seed": seed, "status": "finished", "phase": phase, "accuracy_logratio": acc, "kl": kl,
            **extra}


def test_grouped_table_pools_seeds_per_value_into_t_intervals():
    rows = [_row("alpha-dpo", s, acc, kl, alpha=a) for a, vals in
            {0.0: [(0.80, 2.0), (0.82, 2.2), (0.78, 1.8)], 0.1: [(0.70, 1.0), (0.72, 1.1), (0.71, 0.9)]}.items()
            for s, (acc, kl) in zip((1, 2, 3), vals)]
    rows.append({**_row("alpha-dpo", 4, 0.99, 0.1, alpha=0.1), "status": "failed"})  # not pooled
    table = grouped_table(rows, "alpha")
    assert [g["alpha"] for g in table] == [0.0, 0.1]
    assert table[1]["seeds"] == [1, 2, 3]
    expected = stats.t_interval([0.70, 0.72, 0.71])
    got = table[1]["intervals"]["accuracy_logratio"]
    assert got["mean"] == pytest.approx(expected.mean) and got["low"] == pytest.approx(expected.low)
    assert got["high"] - got["low"] > 0


def test_contrast_says_whether_the_trend_over_the_grid_is_resolved():
    rows = [_row("alpha-dpo", s, 0.9 + d, kl + d, alpha=a) for a, kl in ((0.0, 0.2), (0.1, 0.3), (0.3, 0.4))
            for s, d in ((1, 0.0), (2, 0.01), (3, -0.01))]
    out = contrast(rows, "alpha")
    assert (out["from"], out["to"]) == (0.0, 0.3)
    kl, acc = stats.Interval(**out["differences"]["kl"]), stats.Interval(**out["differences"]["accuracy_logratio"])
    assert kl.mean == pytest.approx(0.2) and kl.low > 0  # KL rises with alpha, resolved
    assert acc.low <= 0 <= acc.high  # accuracy equal within noise
    text = markdown(study_tables(StudyConfig(kind="sweep", title="t", group_by="alpha"), rows),
                    {"command": "c", "machine": "m", "date": "d", "wall_seconds": 1.0, "load_before": "-",
                     "load_after": "-"}, {})
    assert "exact KL: +0.2000" in text and "— resolved" in text and "no difference resolved" in text
    assert "Ranks:" not in text  # a grid has no ranking


def test_verdict_yes_no_and_not_resolved():
    low = [_row("alpha-dpo", s, 0.80 + d, 1.0 + d) for s, d in ((1, 0.0), (2, 0.01), (3, -0.01))]
    high = [_row("simpo", s, 0.80 - d, 3.0 + d) for s, d in ((1, 0.0), (2, 0.01), (3, -0.01))]
    assert verdict(low + high, "alpha-dpo", "simpo")["answer"] == "yes"
    assert verdict(low + high, "simpo", "alpha-dpo")["answer"] == "no"
    noisy = [_row("simpo", s, 0.80, kl) for s, kl in ((1, 0.2), (2, 2.0), (3, 4.0))]
    out = verdict(low + noisy, "alpha-dpo", "simpo")
    assert out["answer"] == "not resolved" and "contains 0" in out["reason"]
    worse = [_row("alpha-dpo", s, 0.60 + d, 1.0 + d) for s, d in ((1, 0.0), (2, 0.01), (3, -0.01))]
    assert "not matched" in verdict(worse + high, "alpha-dpo", "simpo")["reason"]
    # search rows are not seeds: with seed rows present only those count
    stray = [_row("alpha-dpo", 0, 0.80, 50.0, phase="search")]
    assert verdict(low + high + stray, "alpha-dpo", "simpo")["answer"] == "yes"
    # the sampled KL gets its own answer: here within noise although the exact KL is resolved lower
    sampled = [{**r, "kl_sampled": v} for r, v in zip(low + high, (0.1, 0.5, 0.9, 0.2, 0.6, 1.0))]
    out = verdict(sampled, "alpha-dpo", "simpo")
    assert out["answer"] == "yes" and out["sampled"]["answer"] == "not resolved"


def test_winner_line_names_ties():
    assert "no difference resolved" in winner_line([{"method": "a", "rank": 1}, {"method": "b", "rank": 1}])
    assert winner_line([{"method": "a", "rank": 1}, {"method": "b", "rank": 2}]).startswith("a wins")
    line = winner_line([{"method": "a", "rank": 1}, {"method": "b", "rank": 1}, {"method": "c", "rank": 3}])
    assert "a, b" in line and "tied" in line


def test_markdown_has_the_table_verdict_and_provenance():
    study = StudyConfig(kind="compare", title="AlphaDPO vs SimPO", question="lower KL?", verdict=["alpha-dpo", "simpo"])
    rows = [_row("alpha-dpo", s, 0.8, 1.0 + 0.01 * s) for s in (1, 2, 3)] + \
           [_row("simpo", s, 0.8, 2.0 + 0.01 * s) for s in (1, 2, 3)]
    methods = [{"method": m, "rank": 1, "seeds": 3,
                "intervals": {"kl": stats.t_interval([r["kl"] for r in rows if r["method"] == m]).as_dict()}}
               for m in ("alpha-dpo", "simpo")]
    tables = study_tables(study, rows, methods)
    text = markdown(tables, {"command": "alphadpo-ray study x", "machine": "m", "date": "d", "wall_seconds": 1.0,
                             "load_before": "1", "load_after": "2"}, {"pareto": "pareto.png"})
    assert "| =1 | alpha-dpo | 3 |" in text and "± " in text
    assert "**Verdict — alpha-dpo: lower KL than simpo at matched accuracy? yes**" in text
    assert "on the sampled KL" not in text  # none logged in these rows
    assert "`alphadpo-ray study x`" in text and "![pareto](pareto.png)" in text


def test_study_section_is_validated():
    base = {"sweep": {"methods": ["alpha-dpo", "simpo"]}}
    with pytest.raises(ConfigError, match=r"study.verdict: expected two different methods"):
        config_from_dict({**base, "study": {"kind": "compare", "title": "t", "verdict": ["alpha-dpo", "dpo"]}}, "t")
    with pytest.raises(ConfigError, match=r"study.group_by: 'alpha' is not in sweep.search_space"):
        config_from_dict({**base, "study": {"kind": "sweep", "title": "t", "group_by": "alpha"}}, "t")
    with pytest.raises(ConfigError, match=r"study: a study runs a sweep or compare"):
        config_from_dict({"study": {"kind": "sweep", "title": "t"}}, "t")


def test_study_names_resolve_and_unknown_names_list_the_ready_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert study_path("alpha-sensitivity").name == "alpha-sensitivity.yaml"  # from the source tree
    with pytest.raises(StudyNotFound, match=r"no study 'nope'.*alpha-sensitivity"):
        study_path("nope")
