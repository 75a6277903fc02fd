"""A comparison as MLflow shows it (`alphadpo_ray.sweep.views`), and the MLflow helpers it rests on: an
experiment typed for model training, metrics and dataset inputs logged once, runs closed without MLflow's
console links, a UI hint that runs as printed."""

from __future__ import annotations

import json

import pytest
from test_compare_seeds import _method


def _store(tmp_path):
    from mlflow.tracking import MlflowClient

    from alphadpo_ray.services.tracking import create_sqlite_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    create_sqlite_store(uri)
    return uri, MlflowClient(uri)


def test_method_metrics_share_keys_and_the_description_holds_the_table():
    from alphadpo_ray.sweep import results as res
    from alphadpo_ray.sweep.views import method_metrics, methods_markdown

    rows = {"a": _method("a", [("a1", 0.9, 0.1)], [0.80, 0.82, 0.81]),
            "c": _method("c", [("c1", 0.7, 0.1)], [0.60, 0.61, 0.62])}
    summaries = res.rank_methods(rows)
    a, c = (method_metrics(s) for s in summaries)
    assert set(a) == set(c)  # the same keys on every method: MLflow lines them up
    interval = summaries[0]["intervals"]["accuracy_logratio"]
    assert a["accuracy_logratio_mean"] == pytest.approx(0.81)
    assert (a["accuracy_logratio_low"], a["accuracy_logratio_high"]) == (interval["low"], interval["high"])
    assert "kl_sampled_mean" not in a  # not logged, no value
    assert (a["rank"], a["tied"], c["rank"], c["tied"], a["seeds"]) == (1.0, 0.0, 2.0, 0.0, 3.0)
    assert (a["budget_trials"], a["budget_steps"]) == (4.0, 16.0)
    text = methods_markdown(summaries, "compare x")
    half = (interval["high"] - interval["low"]) / 2
    assert f"| 1 | a | 3 | 0.810 ± {half:.3f} |" in text
    assert "**Result.** a wins" in text and "Student-t" in text


def test_publish_compare_logs_everything_once(tmp_path):
    """Metrics per method (un-prefixed on its run, ``{method}/…`` on the compare run), the description, the
    trials table: a second publish (a resumed compare, a `report`) adds nothing."""
    from alphadpo_ray.services import tracking
    from alphadpo_ray.sweep import results as res
    from alphadpo_ray.sweep.views import TABLE_FILE, publish_compare

    uri, client = _store(tmp_path)
    compare, _ = tracking.start_or_resume_run(uri, "views", "cmp", "k-cmp", {})
    experiment = client.get_run(compare).info.experiment_id
    assert client.get_experiment(experiment).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    method_runs = {m: client.create_run(experiment, run_name=f"cmp-{m}").info.run_id for m in ("a", "c")}
    rows = {"a": _method("a", [("a1", 0.9, 0.1)], [0.80, 0.82, 0.81]),
            "c": _method("c", [("c1", 0.7, 0.1)], [0.60, 0.61, 0.62])}
    summaries = res.rank_methods(rows)
    flat = [r for rs in rows.values() for r in rs]
    for _ in range(2):
        publish_compare(client, compare, method_runs, summaries, flat, "compare cmp")
    for method, run_id in method_runs.items():
        metrics = client.get_run(run_id).data.metrics
        assert {"accuracy_logratio_mean", "accuracy_logratio_low", "accuracy_logratio_high", "kl_mean", "rank",
                "tied", "budget_steps"} <= set(metrics)
        assert all(len(client.get_metric_history(run_id, k)) == 1 for k in metrics)
    run = client.get_run(compare)
    assert run.data.metrics["a/rank"] == 1 and run.data.metrics["c/rank"] == 2
    assert all(len(client.get_metric_history(compare, k)) == 1 for k in run.data.metrics)
    assert "**Result.** a wins" in run.data.tags[tracking.NOTE_TAG]
    with open(client.download_artifacts(compare, TABLE_FILE, str(tmp_path))) as handle:
        table = json.load(handle)
    assert len(table["data"]) == len(flat) and "accuracy_logratio" in table["columns"]
    assert TABLE_FILE in json.loads(run.data.tags["mlflow.loggedArtifacts"])[0]["path"]


def test_data_inputs_once_and_runs_closed_quietly(tmp_path, capfd):
    from alphadpo_ray.services import tracking

    uri, client = _store(tmp_path)
    run_id, _ = tracking.start_or_resume_run(uri, "views", "r", "k-r", {})
    plan = {"train_uri": "/s/prepared/abc/train.parquet", "eval_uri": "/s/prepared/abc/eval.parquet",
            "train_pairs": 96, "eval_pairs": 32}
    for _ in range(2):
        tracking.log_data_inputs(client, run_id, plan)
    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert sorted((i.dataset.name, json.loads(i.dataset.profile)["num_rows"]) for i in inputs) == [
        ("held-out", 32), ("train", 96)]
    assert {json.loads(i.dataset.source)["uri"] for i in inputs} == {plan["train_uri"], plan["eval_uri"]}
    assert len({i.dataset.digest for i in inputs}) == 2
    assert tracking.log_metrics_once(client, run_id, {"x": 1.0}) == {"x": 1.0}
    assert tracking.log_metrics_once(client, run_id, {"x": 1.0}) == {}
    tracking.close_run(client, run_id)
    assert "View run" not in capfd.readouterr().out


def test_ui_hint_runs_as_printed(tmp_path):
    from alphadpo_ray.services.tracking import ui_hint

    server = ui_hint("http://u:pw@127.0.0.1:5055", "3")
    assert server == "open http://127.0.0.1:5055/#/experiments/3/runs?workflowType=machine_learning"
    assert "mlflow ui" not in server
    local = ui_hint("sqlite:////w/mlflow.db", "1", cwd=tmp_path)
    assert local.startswith("`mlflow ui --backend-store-uri sqlite:////w/mlflow.db` then open http://127.0.0.1:5000/")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "mlflow").touch()
    assert ui_hint("sqlite:////w/mlflow.db", "1", cwd=tmp_path).startswith("`.venv/bin/mlflow ui ")


def test_policy_is_a_logged_model_once(tmp_path):
    """The exported policy: a logged model ``policy`` of the run, its config and the run's config as artifacts,
    the weights left where they are (named by a tag); a second call adds nothing."""
    from alphadpo_ray.services import tracking

    uri, client = _store(tmp_path)
    run_id, _ = tracking.start_or_resume_run(uri, "views", "r", "k-r", {})
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "config.json").write_text('{"model_type": "llama"}')
    (policy / "model.safetensors").write_bytes(b"\0" * 1000)
    config = {"method": {"name": "alpha-dpo", "alpha": 0.2}, "tracking": {"hf_token": "hf_abcdefghijklmnopqrstu"}}
    first = tracking.log_policy_model(client, run_id, policy, config)
    assert tracking.log_policy_model(client, run_id, policy, config) == first
    experiment = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
    assert [m.name for m in models] == ["policy"] and models[0].params["method.alpha"] == "0.2"
    assert models[0].tags["alphadpo.policy_path"] == str(policy)
    files = {a.path for a in client.list_logged_model_artifacts(first)}
    assert files == {"config.json", "alphadpo_config.json"}  # not the weights
    import mlflow

    location = client.get_logged_model(first).artifact_location
    saved = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/alphadpo_config.json",
                                                dst_path=str(tmp_path / "dl"))
    assert "hf_abcdefghijklmnopqrstu" not in open(saved).read()  # the config's secrets masked


def test_report_adds_the_views_to_a_compare_made_before_them(tmp_path, capsys):
    """A compare as older versions logged it (trial runs with tags and metrics; no methods' metrics, no
    description, no table): `report` writes them, once — a second report adds nothing."""
    from mlflow.entities import Metric, RunTag

    from alphadpo_ray.services import tracking
    from alphadpo_ray.sweep.report import report

    uri, client = _store(tmp_path)
    experiment = client.create_experiment("old")
    compare = client.create_run(experiment, run_name="oldcmp", tags={"alphadpo.kind": "compare",
                                                                     "alphadpo.sweep": "oldcmp"}).info.run_id
    accuracies = {"a": (0.9, [0.80, 0.82, 0.81]), "c": (0.7, [0.60, 0.61, 0.62])}
    for method, (search_acc, seeds) in accuracies.items():
        for phase, values in (("search", [search_acc]), ("seeds", seeds)):
            sweep = client.create_run(experiment, run_name=f"oldcmp-{method}" + ("-seeds" if phase == "seeds" else ""),
                                      tags={"alphadpo.kind": "sweep", "method": method, "alphadpo.phase": phase,
                                            "mlflow.parentRunId": compare}).info.run_id
            for i, acc in enumerate(values):
                trial = client.create_run(experiment, run_name=f"{method}-{phase}-{i}", tags={
                    "alphadpo.kind": "trial", "mlflow.parentRunId": sweep, "method": method,
                    "alphadpo.trial_id": f"{method}{phase}{i}", "alphadpo.phase": phase,
                    "alphadpo.seed": str(42 + i + (phase == "seeds"))}).info.run_id
                client.log_batch(trial, metrics=[Metric("eval/accuracy_logratio", acc, 0, 4),
                                                 Metric("eval/kl", 0.1 + i / 100, 0, 4)],
                                 tags=[RunTag("alphadpo.steps", "4"), RunTag("alphadpo.total_steps", "4")])
                tracking.close_run(client, trial)
            tracking.close_run(client, sweep)
    tracking.close_run(client, compare)
    assert not client.get_run(compare).data.metrics

    for i in range(2):
        report("oldcmp", tracking_uri=uri, output_dir=str(tmp_path / f"report{i}"))
    assert "methods' metrics, description and trials table in place" in capsys.readouterr().out
    run = client.get_run(compare)
    assert run.data.metrics["a/rank"] == 1 and run.data.metrics["a/accuracy_logratio_mean"] == pytest.approx(0.81)
    assert all(len(client.get_metric_history(compare, k)) == 1 for k in run.data.metrics)
    assert "**Result.** a wins" in run.data.tags[tracking.NOTE_TAG]
    method_run = client.search_runs([experiment], "attributes.run_name = 'oldcmp-a'")[0]
    assert method_run.data.metrics["accuracy_logratio_mean"] == pytest.approx(0.81)
    assert [a.path for a in client.list_artifacts(compare)].count("trials_table.json") == 1
