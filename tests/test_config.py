"""The experiment config: every shipped YAML validates (offline), the paper setups carry the official
hyperparameters, invalid configs fail with a `ConfigError` naming the key, `--set` overrides, the CLI
fails fast without starting Ray, relative data paths, secrets masking, and the Ray cluster config.
Fast: nothing here starts Ray, trains or touches the network."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from alphadpo_ray.cli import main
from alphadpo_ray.config.experiment import ExperimentConfig, config_from_dict, load_config
from alphadpo_ray.ml.data import is_local_source
from alphadpo_ray.errors import ConfigError
from alphadpo_ray.ml.losses import method_names, method_spec
from alphadpo_ray.services.secrets import MASK, mask_secrets
from alphadpo_ray.services.tracking import config_params

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
CONFIGS = sorted(EXPERIMENTS.rglob("*.yaml"))
PAPER = EXPERIMENTS / "paper"

# file -> (model, data, beta, gamma_beta_ratio, alpha, learning_rate), from junkangwu/alpha-DPO training_configs/
OFFICIAL = {
    "mistral-7b-instruct.yaml": ("mistralai/Mistral-7B-Instruct-v0.2", "princeton-nlp/mistral-instruct-ultrafeedback",
                                 2.5, 0.15, 0.05, 6.0e-7),
    "llama-3-8b-instruct.yaml": ("meta-llama/Meta-Llama-3-8B-Instruct", "princeton-nlp/llama3-ultrafeedback",
                                 2.5, 0.6, 0.2, 1.0e-6),
    "llama-3-8b-instruct-v0.2.yaml": ("meta-llama/Meta-Llama-3-8B-Instruct",
                                      "princeton-nlp/llama3-ultrafeedback-armorm",
                                      10.0, 0.4, 0.2, 1.0e-6),
    "gemma-2-9b-it.yaml": ("google/gemma-2-9b-it", "princeton-nlp/gemma2-ultrafeedback-armorm",
                           10.0, 0.4, 0.05, 8.0e-7),
}


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"config validation tried to use the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def write_yaml(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


# --------------------------------------------------------------------------------------------------
# Shipped configs


def test_the_shipped_configs_are_all_found():
    names = {p.relative_to(EXPERIMENTS).as_posix() for p in CONFIGS}
    assert "quickstart.yaml" in names
    assert {f"paper/{name}" for name in OFFICIAL} <= names


def _users_files(directory):
    """What experiments/own-data.yaml expects in the working directory: the user's own pairs."""
    (directory / "my-pairs.jsonl").write_text('{"prompt": "q", "chosen": " a", "rejected": " b"}\n')


@pytest.mark.parametrize("path", CONFIGS, ids=[p.relative_to(EXPERIMENTS).as_posix() for p in CONFIGS])
def test_every_experiment_config_validates_offline(path, no_network, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # configs must not depend on the working directory (own-data: the user's file)
    _users_files(tmp_path)
    config = load_config(path)
    assert isinstance(config, ExperimentConfig)
    assert config.gradient_accumulation_steps >= 1
    assert config.method.resolved()  # the loss builds with these hyperparameters
    if config.sweep is not None:  # the sweep section and each method's search space validate too
        from alphadpo_ray.config.sweep_settings import SweepConfig, method_space

        assert isinstance(config.sweep, SweepConfig)
        for method in config.sweep.methods or [config.method.name]:
            assert method_space(config.sweep, method, config.training.learning_rate)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_paper_configs_carry_the_official_hyperparameters(name, no_network):
    model, data, beta, gamma_beta_ratio, alpha, lr = OFFICIAL[name]
    c = load_config(PAPER / name)
    assert c.model.name_or_path == model
    assert c.data.source == data and not is_local_source(c.data.source)  # a hub id, not a path
    assert c.method.name == "alpha-dpo"
    assert c.method.resolved() == pytest.approx(
        {"beta": beta, "gamma_beta_ratio": gamma_beta_ratio, "alpha": alpha, "label_smoothing": 0.0, "ema_decay": 0.9})
    t = c.training
    assert t.learning_rate == pytest.approx(lr)
    assert (t.per_device_train_batch_size, t.total_batch_size) == (2, 128)
    assert c.gradient_accumulation_steps == 16
    assert (c.ray.num_workers, c.ray.use_gpu, c.ray.resources_per_worker) == (4, True, {"CPU": 8, "GPU": 1})
    assert (c.data.max_length, c.data.max_prompt_length) == (2048, 1800)
    assert (t.lr_scheduler_type, t.warmup_ratio, t.num_train_epochs) == ("cosine", 0.1, 1)
    assert (t.bf16, t.gradient_checkpointing, t.seed) == (True, True, 42)
    assert (t.eval_steps, t.logging_steps, t.generation_eval_samples) == (400, 5, 0)
    assert c.deepspeed.zero_stage == 3
    assert (c.data.format, c.data.split, c.data.eval_split) == ("messages", "train", "test")
    assert c.model.attn_implementation == ("eager" if name.startswith("gemma") else "flash_attention_2")
    # Cluster-ready: shared storage (absolute or a URI), named runs in one MLflow experiment.
    assert c.ray.storage_path.startswith("/") or "://" in c.ray.storage_path
    assert c.output_dir.startswith("/") or "://" in c.output_dir
    assert c.tracking.experiment_name == "alphadpo-paper"
    assert c.run_name == c.name == name.removesuffix(".yaml") + "-alpha-dpo"


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_paper_configs_map_to_the_intended_deepspeed_config(name):
    from alphadpo_ray.training.engine import deepspeed_config

    ds = deepspeed_config(load_config(PAPER / name))
    assert ds["train_batch_size"] == 128
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 16
    assert ds["train_batch_size"] == 4 * ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"] == {"enabled": True}
    assert ds["optimizer"]["params"]["lr"] == pytest.approx(OFFICIAL[name][5])  # DeepSpeed's Adam on GPU


def test_paper_config_scales_to_more_workers_with_the_same_total_batch():
    c = load_config(PAPER / "mistral-7b-instruct.yaml", ["ray.num_workers=8"])
    assert (c.training.total_batch_size, c.gradient_accumulation_steps) == (128, 8)


# --------------------------------------------------------------------------------------------------
# Invalid configs: a ConfigError whose message names the key

ALPHA = {"name": "alpha-dpo", "beta": 2.5, "gamma_beta_ratio": 0.3, "alpha": 0.2}

INVALID = [
    # (id, config, key the message must name, other text it must contain)
    ("unknown-top-level-key", {"trainin": {"learning_rate": 1e-4}}, "trainin: unknown key", ""),
    ("unknown-nested-key", {"training": {"lr": 1e-4}}, "training.lr: unknown key", ""),
    ("unknown-deeply-nested-key", {"data": {"builtin": {"sft": {"step": 3}}}},
     "data.builtin.sft.step: unknown key", ""),
    ("unknown-method", {"method": {"name": "alpha-dpoo"}}, "method.name", "'alpha-dpoo'"),
    ("hyperparameter-the-method-does-not-take", {"method": {"name": "dpo", "beta": 0.1, "alpha": 0.2}},
     "method.alpha", "'dpo' does not take"),
    ("beta-zero", {"method": {**ALPHA, "beta": 0}}, "method.beta", "> 0"),
    ("beta-negative", {"method": {"name": "dpo", "beta": -0.1}}, "method.beta", "> 0"),
    ("beta-not-a-number", {"method": {"name": "dpo", "beta": "high"}}, "method.beta", "'high'"),
    ("alpha-negative", {"method": {**ALPHA, "alpha": -0.1}}, "method.alpha", ">= 0"),
    ("label-smoothing-out-of-range", {"method": {"name": "dpo", "beta": 0.1, "label_smoothing": 0.7}},
     "method.label_smoothing", "[0, 0.5]"),
    ("learning-rate-zero", {"training": {"learning_rate": 0}}, "training.learning_rate", "greater than 0"),
    ("learning-rate-negative", {"training": {"learning_rate": -1e-5}}, "training.learning_rate", "greater than 0"),
    ("learning-rate-not-a-number", {"training": {"learning_rate": "fast"}}, "training.learning_rate", "fast"),
    ("batch-size-zero", {"training": {"per_device_train_batch_size": 0}}, "training.per_device_train_batch_size", ""),
    ("total-batch-zero", {"training": {"total_batch_size": 0}}, "training.total_batch_size", ""),
    ("workers-zero", {"ray": {"num_workers": 0}}, "ray.num_workers", ""),
    ("total-batch-not-divisible", {"training": {"per_device_train_batch_size": 4, "total_batch_size": 20},
                                   "ray": {"num_workers": 2}}, "training.total_batch_size", "= 8"),
    ("accumulation-disagrees", {"training": {"per_device_train_batch_size": 4, "total_batch_size": 16,
                                             "gradient_accumulation_steps": 4}, "ray": {"num_workers": 2}},
     "training.gradient_accumulation_steps", "= 2"),
    ("prompt-not-shorter-than-max-length", {"data": {"max_length": 64, "max_prompt_length": 64}},
     "data.max_prompt_length", "data.max_length (64)"),
    ("data-file-missing", {"model": {"name_or_path": "some-org/some-model"},
                           "data": {"source": "/nonexistent/dir/pairs.jsonl"}},
     "data.source", "/nonexistent/dir/pairs.jsonl"),
    ("eval-file-missing", {"model": {"name_or_path": "some-org/some-model"},
                           "data": {"source": "some-org/some-set", "eval_source": "./missing-eval.parquet"}},
     "data.eval_source", "missing-eval.parquet"),
    ("builtin-model-with-other-data", {"data": {"source": "some-org/some-set"}}, "model.name_or_path", "builtin"),
    ("unknown-scheduler", {"training": {"lr_scheduler_type": "exponential"}}, "training.lr_scheduler_type", ""),
    ("zero-stage-out-of-range", {"deepspeed": {"zero_stage": 4}}, "deepspeed.zero_stage", ""),
    ("section-not-a-mapping", {"training": 5}, "training", "expected a section (a mapping of keys), got int 5"),
    ("bad-run-name", {"name": "my run"}, "name", ""),
]


@pytest.mark.parametrize("config,key,text", [i[1:] for i in INVALID], ids=[i[0] for i in INVALID])
def test_invalid_config_names_the_key(tmp_path, config, key, text):
    path = write_yaml(tmp_path / "bad.yaml", config)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert key in message and text in message
    assert str(path) in message
    assert "\n" not in message  # one problem → one line


def test_several_problems_are_all_listed(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", {"training": {"lr": 1, "learning_rate": 0}, "ray": {"num_workers": 0}})
    message = str(pytest.raises(ConfigError, load_config, path).value)
    assert "3 problems" in message
    for key in ("training.lr", "training.learning_rate", "ray.num_workers"):
        assert f"\n  {key}: " in message


def test_method_defaults_are_filled_and_explicit_agreeing_accumulation_is_accepted():
    c = config_from_dict({"method": {"name": "r-dpo"}, "training": {"gradient_accumulation_steps": 1}})
    assert c.method.hyperparameters == method_spec("r-dpo").starting_hyperparameters()
    assert c.gradient_accumulation_steps == 1


def test_bad_yaml(tmp_path):
    path = write_yaml(tmp_path / "broken.yaml", "training: [learning_rate: 1\nmethod: {")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_config(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("text,kind", [("- training\n- method\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_non_mapping_yaml(tmp_path, text, kind):
    path = write_yaml(tmp_path / "list.yaml", text)
    with pytest.raises(ConfigError, match=f"expected a mapping of sections at the top level, got {kind}"):
        load_config(path)


def test_empty_yaml_is_refused_not_read_as_the_defaults(tmp_path):
    """An empty file (or one of comments only) is a mistake, not the quickstart: no config is the quickstart."""
    for text in ("", "# to do\n", "---\n"):
        with pytest.raises(ConfigError, match=r"empty\.yaml is empty: expected a mapping of sections"):
            load_config(write_yaml(tmp_path / "empty.yaml", text))
    assert load_config(None).to_dict() == config_from_dict({}).to_dict()


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="it is a directory"):
        load_config(tmp_path)


def test_floats_without_a_dot_are_numbers(tmp_path):
    """PyYAML reads `1e-4` as a string; the config loader reads it as YAML 1.2 does."""
    path = write_yaml(tmp_path / "c.yaml", "method: {name: dpo, beta: 1e-1}\ntraining: {learning_rate: 5e-4}\n")
    c = load_config(path)
    assert c.method.hyperparameters == {"beta": 0.1} and c.training.learning_rate == 5e-4


# --------------------------------------------------------------------------------------------------
# --set overrides

QUICKSTART = EXPERIMENTS / "quickstart.yaml"


def test_set_nested_keys_with_yaml_typed_values():
    c = load_config(QUICKSTART, [
        "training.learning_rate=1e-4",
        "training.bf16=true",
        "data.max_train_samples=null",
        "data.builtin.sft.steps=10",
        "ray.resources_per_worker={CPU: 2, memory: 1000000}",
        "tracking.run_name=run-7",
        "method.alpha=0.05",
        "training.num_train_epochs=2",
    ])
    assert c.training.learning_rate == 1e-4 and isinstance(c.training.learning_rate, float)
    assert c.training.bf16 is True
    assert c.data.max_train_samples is None
    assert c.data.builtin.sft.steps == 10
    assert c.ray.resources_per_worker == {"CPU": 2, "memory": 1000000}
    assert c.run_name == "run-7"
    assert c.method.hyperparameters == {"beta": 2.5, "gamma_beta_ratio": 0.3, "alpha": 0.05}
    assert c.training.num_train_epochs == 2.0


def test_set_later_items_win():
    c = load_config(QUICKSTART, ["training.learning_rate=1e-4", "training.learning_rate=3e-4"])
    assert c.training.learning_rate == 3e-4


@pytest.mark.parametrize("method", [m for m in method_names() if m != "alpha-dpo"])
def test_set_method_switch_starts_from_that_methods_defaults(method):
    c = load_config(QUICKSTART, [f"method.name={method}"])  # quickstart is alpha-dpo with alpha, gamma_beta_ratio
    assert c.method.name == method
    assert c.method.hyperparameters == method_spec(method).starting_hyperparameters()


def test_set_method_switch_then_hyperparameters_in_any_order():
    for items in (["method.name=dpo", "method.beta=0.3"], ["method.beta=0.3", "method.name=dpo"]):
        c = load_config(QUICKSTART, items)
        assert (c.method.name, c.method.hyperparameters) == ("dpo", {"beta": 0.3})
    # Back to alpha-dpo from a dpo file: alpha-dpo's defaults, not dpo's beta.
    c = config_from_dict({"method": {"name": "dpo", "beta": 0.1}}, overrides=["method.name=alpha-dpo"])
    assert c.method.hyperparameters == method_spec("alpha-dpo").starting_hyperparameters()


def test_set_same_method_keeps_the_files_hyperparameters():
    c = load_config(PAPER / "gemma-2-9b-it.yaml", ["method.name=alpha-dpo"])
    assert c.method.hyperparameters == {"beta": 10, "gamma_beta_ratio": 0.4, "alpha": 0.05}


def test_set_values_are_validated_like_the_file():
    with pytest.raises(ConfigError, match=r"training\.lr: unknown key"):
        load_config(QUICKSTART, ["training.lr=1e-4"])
    with pytest.raises(ConfigError, match=r"method\.alpha: method 'dpo' does not take"):
        load_config(QUICKSTART, ["method.name=dpo", "method.alpha=0.1"])
    with pytest.raises(ConfigError, match=r"method\.beta: must be > 0"):
        load_config(QUICKSTART, ["method.beta=0"])


@pytest.mark.parametrize("item,text", [
    ("training.learning_rate", "expected KEY=VALUE"),
    ("=1e-4", "empty key"),
    ("training..learning_rate=1", "empty part"),
    ("training.learning_rate.value=1", "learning_rate is not a section"),
    ("ray.resources_per_worker={CPU: ", "not valid YAML"),
])
def test_bad_set_syntax(item, text):
    with pytest.raises(ConfigError, match="--set") as err:
        load_config(QUICKSTART, [item])
    assert text in str(err.value) and repr(item) in str(err.value)


# --------------------------------------------------------------------------------------------------
# CLI


def test_cli_validate_accepts_every_shipped_config(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    _users_files(tmp_path)
    assert main(["validate", *map(str, CONFIGS)]) == 0
    out = capsys.readouterr().out
    assert out.count("ok  ") == len(CONFIGS)


def test_cli_validate_with_set(capsys):
    assert main(["validate", str(PAPER / "gemma-2-9b-it.yaml"), "--set", "ray.num_workers=8"]) == 0
    assert "8 workers" in capsys.readouterr().out


@pytest.mark.parametrize("argv,key", [
    (["train", "{bad}"], "training.learning_rate"),
    (["train", "{good}", "--set", "training.lr=1"], "training.lr"),
    (["train", "{missing}"], "config file not found"),
    (["validate", "{good}", "{bad}"], "training.learning_rate"),
])
def test_cli_bad_config_fails_fast_with_one_line_and_never_starts_ray(tmp_path, monkeypatch, capsys, argv, key):
    import ray

    import alphadpo_ray.training.launch as launch

    was_initialized = ray.is_initialized()
    ray_calls, train_calls = [], []
    monkeypatch.setattr(ray, "init", lambda *a, **k: ray_calls.append((a, k)))
    monkeypatch.setattr(launch, "train", lambda *a, **k: train_calls.append((a, k)))
    paths = {"bad": write_yaml(tmp_path / "bad.yaml", {"training": {"learning_rate": -1}}),
             "good": QUICKSTART, "missing": tmp_path / "missing.yaml"}
    code = main([a.format(**paths) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and key in err
    assert ray_calls == [] and ray.is_initialized() == was_initialized
    if not was_initialized:
        assert not ray.is_initialized()
    assert train_calls == []  # the config error stops the command before the run starts


# --------------------------------------------------------------------------------------------------
# Relative data paths


def test_relative_data_paths_resolve_against_the_yaml_directory(tmp_path, monkeypatch):
    exp = tmp_path / "project" / "experiments"
    (exp / "data").mkdir(parents=True)
    for name in ("train.jsonl", "eval.jsonl"):
        (exp / "data" / name).write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    path = write_yaml(exp / "local.yaml", {
        "model": {"name_or_path": "some-org/some-model"},
        "data": {"source": "data/train.jsonl", "eval_source": "./data/eval.jsonl"},
    })
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    c = load_config(path)
    assert Path(c.data.source) == (exp / "data" / "train.jsonl").resolve()
    assert Path(c.data.eval_source) == (exp / "data" / "eval.jsonl").resolve()
    # Also when run from the YAML's own directory with a relative config path.
    monkeypatch.chdir(exp)
    assert Path(load_config("local.yaml").data.source) == (exp / "data" / "train.jsonl").resolve()


def test_relative_data_path_missing_everywhere_names_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_yaml(tmp_path / "cfg" / "c.yaml", {"model": {"name_or_path": "some-org/some-model"},
                                                    "data": {"source": "data/nothing-here.jsonl"}})
    with pytest.raises(ConfigError, match=r"data\.source: data file not found: data/nothing-here\.jsonl"):
        load_config(path)


def test_hub_ids_are_left_alone(tmp_path, no_network):
    path = write_yaml(tmp_path / "hub.yaml", {"model": {"name_or_path": "some-org/some-model"},
                                              "data": {"source": "princeton-nlp/llama3-ultrafeedback-armorm",
                                                       "eval_split": "test"}})
    assert load_config(path).data.source == "princeton-nlp/llama3-ultrafeedback-armorm"


# --------------------------------------------------------------------------------------------------
# Secrets masking (what MLflow params and config.json get)


def test_mask_secrets():
    config = {
        "hf_token": "hf_abc", "api_key": "k", "aws_secret_access_key": "s", "password": "p", "mlflow_auth": "a",
        "model": {"tokenizer": "org/tok", "name_or_path": "org/model"},
        "training": {"max_new_tokens": 32, "learning_rate": 1e-4},
        "tracking": {"MLFLOW_TRACKING_TOKEN": "t", "experiment_name": "x", "run_name": None},
        "extra": [{"OPENAI_API_KEY": "sk-1", "monkey": 1, "keyboard": "qwerty"}],
        "unset_token": None,
    }
    masked = mask_secrets(config)
    for key in ("hf_token", "api_key", "aws_secret_access_key", "password", "mlflow_auth"):
        assert masked[key] == MASK
    assert masked["tracking"]["MLFLOW_TRACKING_TOKEN"] == MASK
    assert masked["extra"][0]["OPENAI_API_KEY"] == MASK
    assert masked["model"] == config["model"]
    assert masked["training"] == config["training"]
    assert masked["tracking"]["experiment_name"] == "x"
    assert masked["extra"][0]["monkey"] == 1 and masked["extra"][0]["keyboard"] == "qwerty"
    assert masked["unset_token"] is None
    assert config["hf_token"] == "hf_abc"  # the input is not modified

    params = config_params(config)
    assert params["hf_token"] == MASK and params["model.tokenizer"] == "org/tok"
    assert params["training.max_new_tokens"] == "32"
    assert "hf_abc" not in json.dumps(params) and "sk-1" not in json.dumps(params)


def test_config_params_of_a_real_config_mask_nothing_needed():
    params = config_params(load_config(QUICKSTART).to_dict())
    assert MASK not in params.values()
    assert params["method.beta"] == "2.5" and params["training.learning_rate"] == "0.0002"


# --------------------------------------------------------------------------------------------------
# Ray cluster launcher config


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert isinstance(cluster, dict)
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in cluster, key
    nodes = cluster["available_node_types"]
    assert cluster["head_node_type"] in nodes
    workers = {name: n for name, n in nodes.items() if name != cluster["head_node_type"]}
    assert workers and all(n["max_workers"] >= n.get("min_workers", 0) for n in workers.values())
    assert sum(n.get("min_workers", 0) for n in workers.values()) <= cluster["max_workers"]
    assert any("pip install" in c and "torch" in c for c in cluster["setup_commands"])
    assert any("pip install" in c and "alphadpo-ray" in c for c in cluster["setup_commands"])
    assert "." in cluster["file_mounts"].values()
    # Ray's own schema check (the one `ray up` runs), where this Ray ships it.
    util = pytest.importorskip("ray.autoscaler._private.util")
    util.validate_config(cluster)
