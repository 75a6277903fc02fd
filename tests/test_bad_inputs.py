"""A corpus of bad configs and bad environments: each one fails fast through the real CLI with exit
code 2 and one message that names the key (or file) and what was expected — before Ray starts — and
leaves nothing written behind. (Bad *data* files have their own corpus: test_bad_inputs_data.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from alphadpo_ray.cli import main

OK = {"name": "bad", "tracking": {"enabled": False}}


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _merge(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:
        for key, value in part.items():
            out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# (id, config sections (merged over OK) or raw text, extra CLI args, message pattern)
CONFIG_CASES = [
    ("lr-inf", {"training": {"learning_rate": float("inf")}}, [],
     r"training\.learning_rate: Input should be a finite number"),
    ("lr-nan-set", {}, ["--set", "training.learning_rate=.nan"], r"training\.learning_rate: Input should be a finite number"),
    ("lr-negative", {"training": {"learning_rate": -1e-4}}, [], r"training\.learning_rate: Input should be greater than 0"),
    ("beta-inf", {"method": {"name": "dpo", "beta": float("inf")}}, [],
     r"method\.beta: must be a finite number, got inf \(method 'dpo'\)"),
    ("beta-zero", {"method": {"name": "dpo", "beta": 0}}, [], r"method\.beta: must be > 0, got 0 \(method 'dpo'\)"),
    ("ema-decay-one", {"method": {"name": "alpha-dpo", "ema_decay": 1.0}}, [],
     r"method\.ema_decay: must be in \[0, 1\), got 1\.0 \(method 'alpha-dpo'\)"),
    ("unknown-method", {"method": {"name": "dpoo"}}, [], r"method\.name: unknown method 'dpoo'; choose one of alpha-dpo"),
    ("unknown-hparam", {"method": {"name": "dpo", "alpha": 0.1}}, [],
     r"method\.alpha: method 'dpo' does not take this hyperparameter; it takes: beta"),
    ("space-outside-range", {"sweep": {"search_space": {"beta": {"type": "uniform", "low": -1, "high": 1}}}}, [],
     r"sweep\.search_space\.beta: the space reaches -1, outside the valid range \(must be > 0\)"),
    ("space-choice-outside", {"sweep": {"search_space": {"alpha-dpo": {"alpha": {"type": "choice", "values": [0.1, -0.2]}}}}},
     [], r"sweep\.search_space\.alpha-dpo\.alpha: the space reaches -0\.2, outside the valid range \(must be >= 0\)"),
    ("space-loguniform-zero", {"sweep": {"search_space": {"alpha": {"type": "loguniform", "low": 0, "high": 1}}}}, [],
     r"sweep\.search_space\.alpha: loguniform needs low > 0"),
    ("space-unknown-type", {"sweep": {"search_space": {"beta": {"type": "normal"}}}}, [],
     r"sweep\.search_space\.beta: expected \{type: loguniform\|uniform"),
    ("space-nobody-takes", {"sweep": {"search_space": {"gamma": {"type": "uniform", "low": 0, "high": 1}}}}, [],
     r"sweep\.search_space\.gamma: no method takes this hyperparameter"),
    ("sweep-unknown-method", {"sweep": {"methods": ["dpo", "nope"]}}, [], r"sweep\.methods: .*unknown method 'nope'"),
    ("sweep-kl-budget-missing", {"sweep": {"objective": "kl_budget"}}, [], r"sweep: .*objective 'kl_budget' needs sweep\.kl_budget"),
    ("sweep-kl-weight-inf", {"sweep": {"kl_weight": float("inf")}}, [], r"sweep\.kl_weight: Input should be a finite number"),
    ("ds-extra-unknown-key", {"deepspeed": {"extra": {"zero_optimization": {"stage3_bogus": 1}}}}, [],
     r"deepspeed\.extra: DeepSpeed rejects zero_optimization\.stage3_bogus: extra inputs are not permitted"),
    ("ds-extra-bad-value", {"deepspeed": {"extra": {"zero_optimization": {"overlap_comm": "hunter2-not-a-bool"}}}}, [],
     r"deepspeed\.extra: DeepSpeed rejects zero_optimization\.overlap_comm: input should be a valid boolean"),
    ("batch-not-multiple", {"training": {"total_batch_size": 17}}, [],
     r"training\.total_batch_size: 17 is not a multiple of ray\.num_workers \(2\)"),
    ("accumulation-disagrees", {"training": {"gradient_accumulation_steps": 3}}, [],
     r"training\.gradient_accumulation_steps: 3 disagrees with training\.total_batch_size"),
    ("prompt-longer-than-max", {"data": {"max_length": 64, "max_prompt_length": 64}}, [],
     r"data\.max_prompt_length: must be smaller than data\.max_length \(64\)"),
    ("data-file-missing", {"model": {"name_or_path": "/nonexistent/model"}, "data": {"source": "/nonexistent/train.jsonl"}},
     [], r"data\.source: .*data file not found: /nonexistent/train\.jsonl"),
    ("data-format-unknown", {"data": {"format": "xml"}}, [], r"data\.format: expected one of auto, strings"),
    ("builtin-needs-builtin-data", {"data": {"source": "org/some-dataset"}}, [],
     r"model\.name_or_path: 'builtin' is the built-in task's reference; it needs data\.source 'builtin'"),
    ("builtin-train-too-small", {"data": {"builtin": {"train_size": 8}}, "training": {"max_steps": 5}}, [],
     r"training\.total_batch_size: 16 is larger than the built-in training set \(8 pairs\)"),
    ("held-out-fewer-than-workers", {"data": {"max_eval_samples": 1}}, [],
     r"data\.max_eval_samples: 1 held-out pairs for ray\.num_workers = 2"),
    ("eval-steps-zero", {"training": {"eval_steps": 0}}, [], r"training\.eval_steps: Input should be greater than or equal to 1"),
    ("unknown-top-level-key", {"trainig": {"learning_rate": 1e-4}}, [], r"trainig: unknown key"),
    ("unknown-section-key", {"training": {"lr": 1e-4}}, [], r"training\.lr: unknown key"),
    ("bad-name", {"name": "../escape"}, [], r"name: String should match pattern"),
    ("zero-stage-5", {"deepspeed": {"zero_stage": 5}}, [], r"deepspeed\.zero_stage: Input should be 0, 1, 2 or 3"),
    ("plugin-missing", {"plugins": ["/nonexistent/methods.py"]}, [],
     r"plugins: could not load '/nonexistent/methods\.py': ImportError: plugin file not found"),
    ("set-not-key-value", {}, ["--set", "training.learning_rate"], r"--set 'training\.learning_rate': expected KEY=VALUE"),
    ("set-empty-key", {}, ["--set", "=3"], r"--set '=3': empty key"),
    ("yaml-invalid", "training: [1, 2\n", [], r"exp\.yaml: not valid YAML: expected ',' or '\]', but got '<stream end>' "
                                          r"at line 2, column 1"),
    ("yaml-not-mapping", "- just\n- a list\n", [], r"exp\.yaml: expected a mapping of sections at the top level, got list"),
    ("not-utf8", b"name: caf\xe9\n", [], r"exp\.yaml: not UTF-8 text \(byte 9 is 0xe9\); save the config as UTF-8"),
    # --- the YAML file itself
    ("yaml-duplicate-key", "name: bad\ntracking: {enabled: false}\ntraining:\n  max_steps: 4\n  max_steps: 400\n", [],
     r"exp\.yaml: key training\.max_steps appears twice \(lines 4 and 5\); YAML would keep only the last value"),
    ("yaml-duplicate-section", "training: {max_steps: 4}\nname: bad\ntraining: {max_steps: 400}\n", [],
     r"exp\.yaml: key training appears twice \(lines 1 and 3\)"),
    ("yaml-duplicate-in-flow-mapping", "name: bad\nmethod: {name: dpo, beta: 0.1, beta: 0.5}\n", [],
     r"exp\.yaml: key method\.beta appears twice \(lines 2 and 2\)"),
    ("yaml-empty", "", [], r"exp\.yaml is empty: expected a mapping of sections \(name, model, data, method, training"),
    ("yaml-comments-only", "# TODO: fill in\n", [], r"exp\.yaml is empty: expected a mapping of sections"),
    ("yaml-scalar", "max_steps 4\n", [], r"exp\.yaml: expected a mapping of sections at the top level, got str"),
    ("yaml-tab-indent", "name: bad\ntraining:\n\tmax_steps: 4\n", [],
     r"exp\.yaml: not valid YAML: found character '\\t' that cannot start any token at line 3, column 1"),
    ("yaml-undefined-alias", "name: bad\ntraining: *defaults\n", [], r"exp\.yaml: not valid YAML: found undefined alias"),
    ("section-not-mapping", {"method": "dpo"}, [], r"method: expected a section \(a mapping of keys\), got str 'dpo'"),
    # --- method hyperparameters: every one has its registry range
    ("gamma-negative", {"method": {"name": "simpo", "beta": 2.0, "gamma_beta_ratio": -3}}, [],
     r"method\.gamma_beta_ratio: must be >= 0, got -3 \(method 'simpo'\)"),
    ("gamma-negative-set", {}, ["--set", "method.gamma_beta_ratio=-3"],
     r"method\.gamma_beta_ratio: must be >= 0, got -3 \(method 'alpha-dpo'\)"),
    ("length-alpha-negative", {"method": {"name": "r-dpo", "beta": 0.1, "length_alpha": -1}}, [],
     r"method\.length_alpha: must be >= 0, got -1 \(method 'r-dpo'\)"),
    ("method-typo-set", {}, ["--set", "method.name=dpoo"], r"method\.name: unknown method 'dpoo'; choose one of alpha-dpo, .*, r-dpo(, .*)? \(did you mean dpo\?\)"),
    ("method-trailing-space", {"method": {"name": "dpo "}}, [], r"method\.name: unknown method 'dpo '; .* \(did you mean dpo\?\)"),
    # --- tracking
    ("tracking-uri-scheme-typo", {"tracking": {"tracking_uri": "htp://x"}}, [],
     r"tracking\.tracking_uri: unsupported scheme 'htp:' in 'htp://x'; expected sqlite:///PATH\.db, http\(s\)://HOST:PORT"),
    ("tracking-uri-sqlite-two-slashes", {"tracking": {"tracking_uri": "sqlite://mlflow.db"}}, [],
     r"tracking\.tracking_uri: 'sqlite://mlflow\.db': an SQLite store is sqlite:///RELATIVE/PATH\.db"),
    ("tracking-uri-no-host", {}, ["--set", "tracking.tracking_uri=http://"], r"tracking\.tracking_uri: 'http://' names no host"),
    ("experiment-name-empty", {"tracking": {"experiment_name": ""}}, [],
     r"tracking\.experiment_name: String should have at least 1 character"),
    # --- training and data numbers
    ("per-device-batch-zero", {"training": {"per_device_train_batch_size": 0}}, [],
     r"training\.per_device_train_batch_size: Input should be greater than or equal to 1 \(got 0\)"),
    ("total-batch-negative", {"training": {"total_batch_size": -16}}, [],
     r"training\.total_batch_size: Input should be greater than or equal to 1 \(got -16\)"),
    ("lr-not-a-number", {"training": {"learning_rate": "fast"}}, [],
     r"training\.learning_rate: Input should be a valid number, unable to parse string as a number \(got 'fast'\)"),
    ("lr-zero-set", {}, ["--set", "training.learning_rate=0"], r"training\.learning_rate: Input should be greater than 0"),
    ("lr-empty-set", {}, ["--set", "training.learning_rate="], r"training\.learning_rate: Input should be a valid number \(got None\)"),
    ("held-out-fraction-above-one", {"data": {"held_out_fraction": 1.5}}, [],
     r"data\.held_out_fraction: Input should be less than 1 \(got 1\.5\)"),
    ("warmup-ratio-one", {"training": {"warmup_ratio": 1}}, [], r"training\.warmup_ratio: Input should be less than 1"),
    ("max-grad-norm-zero", {"training": {"max_grad_norm": 0}}, [], r"training\.max_grad_norm: Input should be greater than 0"),
    ("scheduler-typo", {"training": {"lr_scheduler_type": "cosin"}}, [],
     r"training\.lr_scheduler_type: Input should be 'cosine', 'linear', 'constant' or 'constant_with_warmup' \(got 'cosin'\)"),
    ("bool-not-bool", {"training": {"bf16": "maybe"}}, [], r"training\.bf16: Input should be a valid boolean"),
    ("sweep-num-samples-zero", {"sweep": {"num_samples": 0}}, [], r"sweep\.num_samples: Input should be greater than or equal to 1"),
    ("set-unknown-key", {}, ["--set", "training.lr=1e-4"], r"training\.lr: unknown key"),
    ("set-section-typo", {}, ["--set", "trainig.learning_rate=1e-4"], r"trainig: unknown key \(did you mean training\?\)"),
    ("set-key-typo", {}, ["--set", "training.learning_rat=1e-4"],
     r"--set 'training\.learning_rat=1e-4': training\.learning_rat: unknown key \(did you mean training\.learning_rate\?\)"),
    ("set-trailing-space", {}, ["--set", "training.learning_rate=1e-4 "],
     r"--set 'training\.learning_rate=1e-4 ': training\.learning_rate: the value '1e-4 ' has surrounding spaces"),
    ("set-hyperparameter-typo", {}, ["--set", "method.bta=1"],
     r"method\.bta: method 'alpha-dpo' does not take this hyperparameter \(did you mean beta\?\)"),
    # --- ray
    ("num-workers-zero", {"ray": {"num_workers": 0}}, [], r"ray\.num_workers: Input should be greater than or equal to 1"),
    ("num-workers-fraction", {"ray": {"num_workers": 2.5}}, [],
     r"ray\.num_workers: Input should be a valid integer, got a number with a fractional part"),
    ("resources-negative", {"ray": {"resources_per_worker": {"CPU": -1}}}, [],
     r"ray\.resources_per_worker\.CPU: expected an amount >= 0, got -1"),
    ("resources-lowercase-cpu", {"ray": {"resources_per_worker": {"cpu": 1}}}, [],
     r"ray\.resources_per_worker\.cpu: Ray's resource is spelled 'CPU'"),
    ("address-without-port", {"ray": {"address": "localhost"}}, [],
     r"ray\.address: 'localhost' is not a cluster address; expected HOST:PORT"),
    ("storage-unknown-scheme", {"ray": {"storage_path": "s4://bucket/runs"}}, [],
     r"ray\.storage_path: unsupported scheme 's4://' in 's4://bucket/runs'; expected a local path or a URI"),
    ("storage-s3-no-bucket", {"ray": {"storage_path": "s3://"}}, [], r"ray\.storage_path: 's3://' names no bucket"),
    ("storage-empty", {"ray": {"storage_path": ""}}, [], r"ray\.storage_path: String should have at least 1 character"),
    # --- models, data and plugins named by an empty string or a module that is not there
    ("model-path-empty", {"model": {"name_or_path": ""}}, [], r"model\.name_or_path: empty; expected a hub id"),
    ("data-source-empty", {"model": {"name_or_path": "some-org/some-model"}, "data": {"source": ""}}, [],
     r"data\.source: empty; expected a \.jsonl/"),
    ("plugin-module-missing", {"plugins": ["no_such_plugin_mod"]}, [],
     r"plugins: could not load 'no_such_plugin_mod': ModuleNotFoundError: No module named 'no_such_plugin_mod'"),
]

# Cases whose files are made in the test's directory ({tmp}): model directories and data sources.
PATH_CASES = [
    ("model-dir-empty", {"model": {"name_or_path": "{tmp}/empty-model"}},
     r"model\.name_or_path: .*/empty-model is not a complete model and tokenizer directory: missing config\.json; "
     r"weights .*; tokenizer files \(one of tokenizer\.json, tokenizer\.model"),
    ("model-dir-no-tokenizer", {"model": {"name_or_path": "{tmp}/no-tokenizer"}},
     r"model\.name_or_path: .*/no-tokenizer is not a complete model and tokenizer directory: missing tokenizer files "
     r".*\(it holds config\.json, model\.safetensors\)"),
    ("tokenizer-dir-empty", {"model": {"name_or_path": "some-org/some-model", "tokenizer": "{tmp}/empty-model"}},
     r"model\.tokenizer: .*/empty-model is not a complete tokenizer directory: missing tokenizer files"),
    ("reference-dir-no-weights", {"model": {"name_or_path": "some-org/some-model", "reference": "{tmp}/no-weights"}},
     r"model\.reference: .*/no-weights is not a complete model and tokenizer directory: missing weights \(model\.safetensors"),
    ("model-path-missing", {"model": {"name_or_path": "./models/tiny"}},
     r"model\.name_or_path: \./models/tiny not found; expected a local model directory"),
    ("model-path-is-a-file", {"model": {"name_or_path": "{tmp}/pairs.jsonl"}},
     r"model\.name_or_path: .*/pairs\.jsonl is a file; expected a model directory"),
    ("data-source-directory", {"data": {"source": "{tmp}/data"}},
     r"data\.source: .*/data is a directory; expected a \.jsonl/\.json/\.jsonl\.gz/\.parquet file.* \(name the file inside it\)"),
    ("eval-source-directory", {"data": {"eval_source": "{tmp}/data"}}, r"data\.eval_source: .*/data is a directory"),
    ("data-source-empty-file", {"data": {"source": "{tmp}/data/empty.jsonl"}},
     r"data\.source: .*/empty\.jsonl is empty \(0 bytes\); expected preference pairs"),
    ("data-source-csv", {"data": {"source": "{tmp}/data/pairs.csv"}},
     r"data\.source: .*/pairs\.csv: unsupported file type; expected a \.jsonl/"),
    ("data-source-trailing-space", {"data": {"source": "{tmp}/pairs.jsonl "}},
     r"data\.source: data file not found: '.*/pairs\.jsonl ' .*the name has surrounding spaces, and '.*/pairs\.jsonl' exists"),
]


def _path_case_files(tmp_path: Path) -> None:
    (tmp_path / "empty-model").mkdir()
    (tmp_path / "no-tokenizer").mkdir()
    (tmp_path / "no-tokenizer" / "config.json").write_text("{}")
    (tmp_path / "no-tokenizer" / "model.safetensors").write_bytes(b"")
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "empty.jsonl").write_bytes(b"")
    (tmp_path / "data" / "pairs.csv").write_text("prompt,chosen,rejected\nq,a,b\n")
    _pairs(tmp_path)


@pytest.mark.parametrize("command", ["validate", "train"])
@pytest.mark.parametrize("case,data,pattern", PATH_CASES, ids=[c[0] for c in PATH_CASES])
def test_bad_model_and_data_paths_fail_before_ray(case, data, pattern, command, tmp_path, capsys, monkeypatch, no_ray):
    """Local model directories missing what `from_pretrained` needs and data sources that are directories,
    empty or of the wrong type: one line naming the key and the path, from `validate` and `train` alike."""
    _path_case_files(tmp_path)
    data = yaml.safe_load(yaml.safe_dump(_merge({"model": {"name_or_path": "some-org/some-model"}, "data": {
        "source": "{tmp}/pairs.jsonl"}}, data)).replace("{tmp}", str(tmp_path)))
    code, err = _run(tmp_path, capsys, monkeypatch, data, [], command=command)
    import re

    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err
    assert not any(p.name in ("outputs", "mlflow.db") for p in tmp_path.iterdir())


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if anything starts or connects to Ray."""
    import ray

    def forbidden(*args, **kwargs):
        raise AssertionError("Ray was started before the bad input was reported")

    monkeypatch.setattr(ray, "init", forbidden)
    return ray


def _run(tmp_path, capsys, monkeypatch, data, extra, command="train"):
    monkeypatch.chdir(tmp_path)
    if isinstance(data, bytes):
        path = tmp_path / "exp.yaml"
        path.write_bytes(data)
    else:
        path = _write(tmp_path, data if isinstance(data, str) else _merge(OK, data))
    code = main([command, str(path), *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case,data,extra,pattern", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_fails_before_ray_with_one_message(case, data, extra, pattern, tmp_path, capsys, monkeypatch, no_ray):
    code, err = _run(tmp_path, capsys, monkeypatch, data, extra)
    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    import re

    assert re.search(pattern, err), err
    assert "hunter2" not in err  # values of deepspeed.extra are never echoed
    assert not any(p.name in ("outputs", "mlflow.db") for p in tmp_path.iterdir())  # nothing written


def test_bad_configs_also_fail_validate(tmp_path, capsys, monkeypatch, no_ray):
    """`alphadpo-ray validate` reports the same problems (DeepSpeed's included) without running anything."""
    for _, data, extra, pattern in CONFIG_CASES[:3] + CONFIG_CASES[16:18] + CONFIG_CASES[37:]:
        code, err = _run(tmp_path, capsys, monkeypatch, data, extra, command="validate")
        assert code == 2, err
        import re

        assert re.search(pattern, err) and len(err.strip().splitlines()) == 1, err


# -------------------------------------------------------------------------------- bad environments

ENV_CASES = [
    ("output-dir-in-proc", {"output_dir": "/proc/alphadpo-out"}, r"output_dir: cannot write to /proc/alphadpo-out"),
    ("storage-in-proc", {"ray": {"storage_path": "/proc/alphadpo-ray"}}, r"ray\.storage_path: cannot write to /proc/alphadpo-ray"),
    ("output-dir-is-a-file", {"output_dir": "{tmp}/a-file"}, r"output_dir: cannot write to .*a-file"),
    ("cache-dir-is-a-file", {"cache_dir": "{tmp}/a-file"}, r"cache_dir: cannot write to .*a-file"),
    ("mlflow-db-unwritable", {"tracking": {"enabled": True, "tracking_uri": "sqlite:////proc/alphadpo/mlflow.db"}},
     r"tracking\.tracking_uri: cannot write to /proc/alphadpo"),
]


@pytest.mark.parametrize("case,data,pattern", ENV_CASES, ids=[c[0] for c in ENV_CASES])
def test_unwritable_paths_fail_before_ray(case, data, pattern, tmp_path, capsys, monkeypatch, no_ray):
    (tmp_path / "a-file").write_text("not a directory")
    data = yaml.safe_load(yaml.safe_dump(data).replace("{tmp}", str(tmp_path)))
    code, err = _run(tmp_path, capsys, monkeypatch, _merge({"ray": {"storage_path": str(tmp_path / "ray")}}, data), [])
    import re

    assert code == 2 and re.search(pattern, err), err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("summary.json"))


def test_hub_model_offline_and_not_cached(tmp_path, capsys, monkeypatch, no_ray):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    data = {"model": {"name_or_path": "some-org/some-model"}, "data": {"source": _pairs(tmp_path)}}
    code, err = _run(tmp_path, capsys, monkeypatch, data, [])
    assert code == 2
    assert ("model.name_or_path: 'some-org/some-model' is not a local path and not in the Hugging Face cache, "
            "and HF_HUB_OFFLINE is set") in err


def test_hub_model_with_the_hub_unreachable(tmp_path, capsys, monkeypatch, no_ray):
    """No network: the hub's address refuses at once (a closed port on loopback stands in for it)."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    data = {"model": {"name_or_path": "some-org/some-model"}, "data": {"source": _pairs(tmp_path)}}
    code, err = _run(tmp_path, capsys, monkeypatch, data, [])
    assert code == 2
    assert "model.name_or_path: 'some-org/some-model' is not a local path, and the Hugging Face Hub" in err
    assert "set HF_HUB_OFFLINE=1" in err


def _pairs(tmp_path: Path) -> str:
    import json

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": " a", "rejected": " b"}) + "\n" for i in range(20)))
    return str(path)


def test_report_elsewhere_names_the_store_and_creates_none(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["report", "quickstart-sweep"]) == 2
    err = capsys.readouterr().err
    assert f"no MLflow store at sqlite:///{tmp_path / 'mlflow.db'}: run report where the sweep ran" in err
    assert not (tmp_path / "mlflow.db").exists()

    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'other.db'}"
    MlflowClient(store).search_experiments()  # an existing store without that sweep
    assert main(["report", "quickstart-sweep", "--tracking-uri", store]) == 2
    assert f"no sweep, compare, run id or experiment named 'quickstart-sweep' in the tracking store {store}" in \
        capsys.readouterr().err
