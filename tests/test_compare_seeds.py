"""Statistics in a comparison: `compare`'s seeds phase (each method's best configuration re-run with new
training seeds), mean ± 95 % intervals, ranks with ties, and the same order from `compare` and `report`."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import small_config


def _row(method, trial_id, phase, seed, acc, kl, **params):
    return {"trial_id": trial_id, "method": method, "phase": phase, "seed": seed, "status": "finished", "error": "",
            "alpha": 0.1, **params, "accuracy_logratio": acc, "accuracy": acc, "kl": kl, "steps": 4,
            "total_steps": 4, "seconds": 1.0, "workers": 1, "pareto": False, "curve": {}}


def _method(method, search, seeds, lr=1e-4):
    """Search rows [(trial_id, acc, kl)] then seed rows [acc] of the best search configuration."""
    rows = [_row(method, t, "search", 42, a, k, learning_rate=lr) for t, a, k in search]
    return rows + [_row(method, f"{method}-s{i}", "seeds", 43 + i, a, 0.1 + i / 100, learning_rate=lr)
                   for i, a in enumerate(seeds)]


def test_rank_methods_intervals_and_ties_on_hand_made_rows():
    """Methods within each other's noise share a rank (shown "=1"); a resolved worse one ranks below."""
    from rich.console import Console

    from alphadpo_ray.sweep import results as res

    rows = {
        "b": _method("b", [("b1", 0.9, 0.2)], [0.805, 0.79, 0.83]),
        "a": _method("a", [("a1", 0.9, 0.3), ("a2", 0.9, 0.1)], [0.80, 0.82, 0.81]),
        "c": _method("c", [("c1", 0.7, 0.1)], [0.60, 0.61, 0.62]),
    }
    summaries = res.rank_methods(rows)
    assert [(s["method"], s["rank"], s["tied"]) for s in summaries] == [("a", 1, True), ("b", 1, True),
                                                                         ("c", 3, False)]
    a = summaries[0]
    assert a["seeds"] == 3 and a["seed_values"] == [43, 44, 45]
    assert a["best_trial"] == "a2"  # equal accuracy: the lower KL wins
    assert a["best_config"] == {"alpha": 0.1, "learning_rate": 1e-4}
    assert (a["search_trials"], a["seed_trials"], a["trials"], a["steps"]) == (2, 3, 5, 20)
    interval = a["intervals"]["accuracy_logratio"]
    assert interval["mean"] == pytest.approx(0.81) and interval["low"] < 0.81 < interval["high"] and interval["n"] == 3
    assert set(a["intervals"]) == set(res.INTERVAL_METRICS)
    assert a["intervals"]["kl_sampled"]["mean"] is None  # not logged: no interval
    # the same order whatever order the rows come in (compare reads Tune, report reads MLflow)
    shuffled = {m: list(reversed(r)) for m, r in reversed(list(rows.items()))}
    assert [(s["method"], s["rank"]) for s in res.rank_methods(shuffled)] == [("a", 1), ("b", 1), ("c", 3)]

    console = Console(record=True, width=220)
    res.print_methods(summaries, "accuracy_logratio", "m", console=console)
    text = console.export_text()
    assert "=1" in text and "0.810 ± " in text and "Student-t interval over n = 3 training seeds" in text

    # without seeds: the best search values, equal values tied, no intervals
    search_only = {m: [r for r in r_ if r["phase"] == "search"] for m, r_ in rows.items()}
    plain = res.rank_methods(search_only)
    assert [(s["method"], s["rank"], s["tied"]) for s in plain] == [("a", 1, True), ("b", 1, True), ("c", 3, False)]
    assert all(s["intervals"] == {} and s["seeds"] == 0 for s in plain)
    assert "no seed re-runs" in res.interval_caption(plain)


def test_rows_carry_curves_from_tune_dataframes():
    """A row's curve: each evaluation at the step it was made (``eval/step``: every recipe report carries
    the latest evaluation along), in step order, a replayed step once."""
    import pandas as pd

    from alphadpo_ray.sweep import results as res

    frame = pd.DataFrame([
        {"step": 1, "train/loss": 0.6, "eval/step": 0, "eval/kl": 0.0, "eval/accuracy_logratio": 0.5},
        {"step": 2, "train/loss": 0.6, "eval/step": 2, "eval/kl": 0.1, "eval/accuracy_logratio": 0.6},
        {"step": 3, "train/loss": 0.5, "eval/step": 2, "eval/kl": 0.1, "eval/accuracy_logratio": 0.6},  # carried
        {"step": 4, "eval/step": 4, "eval/kl": 0.2, "eval/accuracy_logratio": 0.7, "train/loss": 0.5},
        {"step": 4, "eval/step": 4, "eval/kl": 0.25, "eval/accuracy_logratio": 0.75},  # replayed after a resume
    ])
    grid = [SimpleNamespace(metrics={"trial_id": "t1", "step": 4, "total_steps": 4, "eval/kl": 0.25},
                            error=None, config={"alpha": 0.1, "seed": 7}, path="/x/t1", metrics_dataframe=frame)]
    row = res.rows_from_result_grid(grid, "alpha-dpo", workers=1, phase="seeds", seed=42)[0]
    assert (row["phase"], row["seed"]) == ("seeds", 7)
    assert row["curve"] == {"step": [0, 2, 4], "accuracy_logratio": [0.5, 0.6, 0.75], "kl": [0.0, 0.1, 0.25]}
    assert "seed" not in res.hyperparameter_columns([row]) and "curve" not in res.hyperparameter_columns([row])


def test_a_carried_evaluation_is_logged_at_its_own_step_once():
    """Reports repeat the latest evaluation; MLflow gets it at ``eval/step`` only (a curve point per
    evaluation), the report's own metrics at its step."""
    from alphadpo_ray.services.tracking import report_by_step

    carried = {"step": 10, "train/loss": 0.5, "eval/step": 0, "eval/kl": 0.0, "objective/score": 0.5}
    assert report_by_step(carried) == [(0, {"eval/step": 0, "eval/kl": 0.0, "objective/score": 0.5}),
                                       (10, {"step": 10, "train/loss": 0.5})]
    fresh = {"step": 20, "train/loss": 0.4, "eval/step": 20, "eval/kl": 0.3}
    assert report_by_step(fresh) == [(20, fresh)]
    assert report_by_step({"step": 3, "train/loss": 0.1}) == [(3, {"step": 3, "train/loss": 0.1})]


def test_seed_is_a_trial_parameter_of_every_method():
    from alphadpo_ray.sweep.trial import trial_config
    from alphadpo_ray.config.sweep_settings import SweepConfig, method_space

    sweep = SweepConfig(search_space={"seed": {"type": "grid", "values": [1, 2]}})
    for method in ("alpha-dpo", "dpo"):
        assert method_space(sweep, method, 1e-4)["seed"] == {"type": "grid", "values": [1, 2]}
    with pytest.raises(ValueError, match="integers"):
        method_space(SweepConfig(search_space={"seed": {"type": "uniform", "low": 0, "high": 3}}), "dpo", 1e-4)
    config = trial_config({"training": {"seed": 42}}, "dpo", {"beta": 0.1, "seed": 5, "learning_rate": 1e-5}, "t")
    assert config.training.seed == 5 and config.training.learning_rate == 1e-5 and config.method.beta == 0.1


@pytest.mark.slow
def test_compare_with_seeds_gives_intervals_and_the_same_order_in_report(ray_session, builtin_task, tmp_path):
    """2 methods × (1 search trial + 2 seed re-runs): intervals for both, new seeds for the re-runs,
    curves on every row, and `report` (MLflow alone) prints the same order and ranks; `--resume` of the
    finished compare re-runs nothing."""
    from mlflow.tracking import MlflowClient

    from alphadpo_ray.sweep.report import report
    from alphadpo_ray.sweep.run import run_compare
    from alphadpo_ray.sweep.study import verdict

    training = {"per_device_train_batch_size": 8, "total_batch_size": 8, "max_steps": 4, "eval_steps": 2,
                "logging_steps": 2, "save_steps": 4, "generation_eval_samples": 0}
    config = small_config(tmp_path, name="cs", ray={"num_workers": 1}, deepspeed={"zero_stage": 0},
                          training=training, sweep={"name": "cmpseeds", "methods": ["alpha-dpo", "simpo"],
                                                    "num_samples": 1, "seeds": 2, "max_concurrent_trials": 2},
                          study={"kind": "compare", "title": "two methods", "verdict": ["alpha-dpo", "simpo"]})
    summary = run_compare(config, log=lambda *_: None)
    methods = {s["method"]: s for s in summary["methods"]}
    assert set(methods) == {"alpha-dpo", "simpo"}
    for s in methods.values():
        assert s["seeds"] == 2 and s["seed_values"] == [43, 44]  # the search trained with training.seed 42
        interval = s["intervals"]["accuracy_logratio"]
        assert interval["n"] == 2 and interval["low"] is not None and interval["low"] <= interval["mean"] <= interval["high"]
        assert (s["search_trials"], s["seed_trials"], s["steps"]) == (1, 2, 12)
    assert {json.dumps(b, sort_keys=True) for b in summary["budget"].values()} == {json.dumps(
        {"search_trials": 1, "seed_trials": 2, "steps_per_trial": 4, "pairs_per_step": 8, "pair_steps": 96},
        sort_keys=True)}
    assert "Student-t" in summary["interval_method"]
    directory = Path(summary["files"]["methods"]).parent
    for name in ("methods.json", "methods.txt", "trials.csv", "pareto.png", "kl_curves.png", "method_intervals.png",
                 "results.json"):
        assert (directory / name).exists(), name
    rows = json.loads((directory / "trials.json").read_text())
    assert len(rows) == 6 and all(r["curve"]["step"] == [0, 2, 4] for r in rows)  # from the reference on
    for method in methods:
        search = [r for r in rows if r["method"] == method and r["phase"] == "search"]
        seeded = [r for r in rows if r["method"] == method and r["phase"] == "seeds"]
        assert {r["seed"] for r in search} == {42} and {r["seed"] for r in seeded} == {43, 44}
        for r in seeded:  # the search's best configuration, re-run
            assert all(r[k] == v for k, v in methods[method]["best_config"].items())

    uri = config.tracking.tracking_uri
    client = MlflowClient(uri)
    compare_run = client.get_run(summary["mlflow_compare_run_id"])
    artifacts = {a.path for a in client.list_artifacts(compare_run.info.run_id)}
    assert {"methods.json", "methods.txt", "results.json", "pareto.png", "kl_curves.png"} <= artifacts
    trials = client.search_runs([compare_run.info.experiment_id], "tags.`alphadpo.kind` = 'trial'")
    assert sorted(t.data.tags["alphadpo.phase"] for t in trials) == ["search"] * 2 + ["seeds"] * 4

    rebuilt = report("cmpseeds", tracking_uri=uri, output_dir=str(tmp_path / "report"))
    order = lambda summaries: [(s["method"], s["rank"], s["tied"]) for s in summaries]  # noqa: E731
    assert order(rebuilt["methods"]) == order(summary["methods"])
    for a, b in zip(summary["methods"], rebuilt["methods"]):
        assert a["intervals"]["accuracy_logratio"]["mean"] == pytest.approx(b["intervals"]["accuracy_logratio"]["mean"])
        assert a["best_trial"] == b["best_trial"] and a["seed_values"] == b["seed_values"]
    assert all(r["curve"]["step"] == [0, 2, 4] for r in rebuilt["rows"])
    study = json.loads((tmp_path / "report" / "study.json").read_text())  # the study's tables, from MLflow too
    assert [m["method"] for m in study["methods"]] == [s["method"] for s in summary["methods"]]
    assert study["verdict"]["answer"] == verdict(rows, "alpha-dpo", "simpo")["answer"]
    assert "Verdict" in (tmp_path / "report" / "study.md").read_text()
    for name in ("methods.json", "methods.txt", "trials.csv", "pareto.png", "kl_curves.png", "method_intervals.png"):
        assert (tmp_path / "report" / name).exists(), name
    assert "method" in (tmp_path / "report" / "trials.csv").read_text().splitlines()[0].split(",")

    again = run_compare(config, resume=True, log=lambda *_: None)  # everything finished: nothing runs again
    assert order(again["methods"]) == order(summary["methods"])
    assert len(client.search_runs([compare_run.info.experiment_id], "tags.`alphadpo.kind` = 'trial'")) == 6

    # MLflow shows the comparison: the experiment opens as model training; each method's run and the compare
    # run hold the methods' figures, once each, also after `report` and the `--resume` above
    from alphadpo_ray.services.tracking import EXPERIMENT_KIND_TAG, NOTE_TAG

    experiment = client.get_experiment(compare_run.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    compare_run = client.get_run(compare_run.info.run_id)
    sweeps = client.search_runs([experiment.experiment_id], "tags.`alphadpo.kind` = 'sweep' and "
                                                             "tags.`alphadpo.phase` = 'search'")
    assert sorted(r.data.tags["method"] for r in sweeps) == ["alpha-dpo", "simpo"]
    for run in [*sweeps, compare_run]:
        assert all(len(client.get_metric_history(run.info.run_id, k)) == 1 for k in run.data.metrics
                   if not k.startswith(("best_", "kl_at_best", "pareto_size", "trials", "stopped", "failed",
                                        "compute_worker_seconds", "steps"))), run.info.run_name
    for run in sweeps:
        s, m = methods[run.data.tags["method"]], run.data.metrics
        interval = s["intervals"]["accuracy_logratio"]
        assert (m["accuracy_logratio_mean"], m["accuracy_logratio_low"], m["accuracy_logratio_high"]) == pytest.approx(
            (interval["mean"], interval["low"], interval["high"]))
        assert m["rank"] == s["rank"] and m["tied"] == float(s["tied"]) and m["budget_steps"] == 12
        assert compare_run.data.metrics[f"{s['method']}/accuracy_logratio_mean"] == pytest.approx(interval["mean"])
        assert {"kl_mean", "kl_low", "kl_high", "generated_length_mean"} <= set(m) or "kl_mean" in m
    note = compare_run.data.tags[NOTE_TAG]
    assert "Verdict" in note and "alpha-dpo" in note and "simpo" in note  # the study's table and verdict
    assert "trials_table.json" in {a.path for a in client.list_artifacts(compare_run.info.run_id)}
    for trial in trials:
        params, inputs = trial.data.params, trial.inputs.dataset_inputs
        assert params["method"] == trial.data.tags["method"] and params["phase"] == trial.data.tags["alphadpo.phase"]
        assert params["seed"] == trial.data.tags["alphadpo.seed"]
        assert sorted(i.dataset.name for i in inputs) == ["held-out", "train"]
        assert "objective/score" in trial.data.metrics or "eval/accuracy_logratio" in trial.data.metrics
