"""The experiment config: one typed, validated YAML file → `ExperimentConfig`.

Sections: ``model``, ``data``, ``method`` (+ its hyperparameters), ``training``, ``deepspeed``,
``ray``, ``tracking`` (and ``sweep`` for `alphadpo-ray sweep`/`compare`). Names follow the official
AlphaDPO/SimPO configs where they exist (``beta``, ``gamma_beta_ratio``, ``alpha``,
``learning_rate``, ``per_device_train_batch_size``, ``gradient_accumulation_steps``, ``max_length``,
``max_prompt_length``, ``warmup_ratio``, ``lr_scheduler_type``, ``num_train_epochs``,
``gradient_checkpointing``, ``bf16``, ``seed``).

Everything is checked before Ray starts: unknown keys, unknown methods, hyperparameters the method
does not take, out-of-range values, a data file that does not exist, and a ``total_batch_size`` that
the workers × per-device batch × accumulation cannot meet exactly. Errors are `ConfigError`s that
name the key (``training.learning_rate: must be > 0, got 0``).
"""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..errors import ConfigError
from ..ml.losses import build_loss, hyperparameter_problems, method_names, method_spec
from .plugins import load_plugins
from .sweep_settings import SweepConfig, method_space
from ..ml.task import SFTConfig, TaskConfig

BUILTIN = "builtin"

class DuplicateKeyError(yaml.YAMLError):
    """A mapping names the same key twice (YAML would silently keep the last value)."""

    def __init__(self, key: str, first_line: int, second_line: int):
        super().__init__(f"duplicate key {key} at lines {first_line} and {second_line}")
        self.key, self.first_line, self.second_line = key, first_line, second_line


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2 floats without a dot (``1e-4``), which PyYAML (YAML 1.1)
    would otherwise read as the string '1e-4', and refusing a mapping that names a key twice
    (`DuplicateKeyError` with the key's dotted path and both lines; PyYAML keeps the last one)."""

    def construct_document(self, node):
        self._check_duplicates(node, ())
        return super().construct_document(node)

    def _check_duplicates(self, node, path: tuple[str, ...], seen_nodes: set | None = None) -> None:
        seen_nodes = set() if seen_nodes is None else seen_nodes
        if id(node) in seen_nodes:  # an alias repeats a node already checked
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            lines: dict[str, int] = {}
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = key_node.value
                    if key in lines:
                        raise DuplicateKeyError(".".join([*path, key]), lines[key], key_node.start_mark.line + 1)
                    lines[key] = key_node.start_mark.line + 1
                    self._check_duplicates(value_node, (*path, key), seen_nodes)
                else:
                    self._check_duplicates(value_node, path, seen_nodes)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_duplicates(item, (*path[:-1], f"{path[-1]}[{i}]") if path else (f"[{i}]",), seen_nodes)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader subclass)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: what is wrong and where (line and column, 1-based)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _keyed(key: str, message: str) -> PydanticCustomError:
    """A validation error reported under `key` (relative to the section that raises it), e.g. a
    cross-field check in ``data`` raised as ``_keyed("max_prompt_length", ...)`` shows up as
    ``data.max_prompt_length: ...``. ``key`` may be dotted (``training.total_batch_size``)."""
    return PydanticCustomError("keyed", "{message}", {"message": message, "key": key})


# Filesystems Ray Train's storage reaches through pyarrow (`pyarrow.fs.FileSystem.from_uri`).
STORAGE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs", "file")
# Schemes MLflow's tracking store registry knows out of the box (plugins add theirs through the
# ``mlflow.tracking_store`` entry point group, MLflow's documented plugin interface); a database
# scheme may name its driver (postgresql+psycopg2://).
TRACKING_SCHEMES = ("file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks",
                    "databricks-uc", "uc")


def tracking_uri_problem(uri: str) -> str | None:
    """Why `uri` cannot be an MLflow tracking URI (scheme unknown, host or database path missing), or None.
    A plain path (no scheme) is a local file store, as MLflow reads it."""
    expected = ("expected sqlite:///PATH.db, http(s)://HOST:PORT, postgresql://…, mysql://…, mssql://…, file:PATH, "
                "databricks, or a local directory")
    if uri != uri.strip() or not uri:
        return f"{uri!r}: {'empty' if not uri.strip() else 'surrounding spaces'}; {expected}"
    if uri in ("databricks", "databricks-uc", "uc") or uri.startswith(("databricks://", "databricks-uc://", "uc:")):
        return None
    scheme, sep, rest = uri.partition(":")
    if not sep or len(scheme) == 1 or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        return None  # a local path (a drive letter on Windows)
    base = scheme.lower().split("+")[0]
    if base not in TRACKING_SCHEMES:
        from importlib.metadata import entry_points

        # a scheme a plugin registers with MLflow: the plugin's ``mlflow.tracking_store`` entry point
        if scheme.lower() in {ep.name.lower() for ep in entry_points(group="mlflow.tracking_store")}:
            return None
        return f"unsupported scheme {scheme + ':'!r} in {uri!r}; {expected}"
    if base == "sqlite" and not rest.startswith("///"):
        return (f"{uri!r}: an SQLite store is sqlite:///RELATIVE/PATH.db or sqlite:////ABSOLUTE/PATH.db "
                "(three slashes before the path)")
    if base in ("http", "https") and not rest.removeprefix("//").split("/")[0].rpartition("@")[2]:
        return f"{uri!r} names no host; expected {base}://HOST:PORT"
    return None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SFTSettings(_Section):
    """Size and training budget of the built-in task's tiny SFT reference."""

    vocab_size: int = Field(SFTConfig.vocab_size, ge=300)
    hidden_size: int = Field(SFTConfig.hidden_size, ge=8)
    num_layers: int = Field(SFTConfig.num_layers, ge=1)
    num_heads: int = Field(SFTConfig.num_heads, ge=1)
    steps: int = Field(SFTConfig.steps, ge=1)
    batch_size: int = Field(SFTConfig.batch_size, ge=1)
    learning_rate: float = Field(SFTConfig.learning_rate, gt=0)
    seed: int = SFTConfig.seed


class BuiltinTaskSettings(_Section):
    """The built-in verifiable task (see `alphadpo_ray.ml.task`) and its SFT reference."""

    train_size: int = Field(TaskConfig.train_size, ge=8)
    held_out_size: int = Field(TaskConfig.held_out_size, ge=2)
    difficulty: Literal[1, 2, 3] = TaskConfig.difficulty
    length_bias: float = Field(TaskConfig.length_bias, ge=-1.0, le=1.0)
    label_noise: float = Field(TaskConfig.label_noise, ge=0.0, lt=0.5)
    operations: tuple[Literal["reverse", "sort"], ...] = TaskConfig.operations
    seed: int = TaskConfig.seed
    sft: SFTSettings = SFTSettings()


class ModelConfig(_Section):
    name_or_path: str = Field(BUILTIN, description="hub id, local directory, or 'builtin' (the task's SFT reference)")
    reference: str | None = Field(None, description="reference model; defaults to name_or_path (policy starts there)")
    tokenizer: str | None = Field(None, description="defaults to the reference")
    attn_implementation: str | None = None
    trust_remote_code: bool = False

    @field_validator("name_or_path", "reference", "tokenizer")
    @classmethod
    def _not_blank(cls, value: str | None):
        if value is not None and value != value.strip():  # never a hub id, and a path with spaces is a typo
            raise ValueError(f"{value!r} has surrounding spaces; expected a hub id or a local directory")
        if value is not None and not value:
            raise ValueError("empty; expected a hub id, a local model directory, or 'builtin'")
        return value


class DataConfig(_Section):
    source: str = Field(BUILTIN, description="'builtin', a local .jsonl/.json/.jsonl.gz/.parquet file, or a hub id")
    format: str = Field("auto", description="auto, or one of alphadpo_ray.ml.data.FORMATS (strings, messages, hh)")
    split: str = "train"
    eval_source: str | None = None
    eval_split: str | None = None
    held_out_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    chat_template: bool = False
    strict: bool = False
    max_length: int = Field(128, ge=8)
    max_prompt_length: int = Field(96, ge=1)
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(200, ge=1)
    builtin: BuiltinTaskSettings = BuiltinTaskSettings()

    @model_validator(mode="after")
    def _lengths(self):
        if self.max_prompt_length >= self.max_length:
            raise _keyed("max_prompt_length", f"must be smaller than data.max_length ({self.max_length}), "
                                              f"got {self.max_prompt_length}")
        return self

    @field_validator("format")
    @classmethod
    def _format(cls, value: str):
        from ..ml.data import FORMATS  # here, not at the top: `datasets` costs ~3 s, `validate` needs it only here

        if value not in FORMATS:
            raise ValueError(f"expected one of {', '.join(FORMATS)}, got {value!r}")
        return value

    @field_validator("source", "eval_source")
    @classmethod
    def _exists(cls, value: str | None):
        if value is None or value == BUILTIN:
            return value
        from ..ml.data import SUPPORTED_EXTENSIONS, is_local_source  # (as in `_format`)

        expected = f"a {'/'.join(SUPPORTED_EXTENSIONS)} file, 'builtin', or a hub dataset id"
        if not value.strip():
            raise ValueError(f"empty; expected {expected}")
        if not is_local_source(value):
            return value
        path = Path(value).expanduser()
        if not path.exists():
            stripped = Path(value.strip()).expanduser()
            hint = (f"; the name has surrounding spaces, and {str(stripped)!r} exists" if value != value.strip()
                    and stripped.exists() else "")
            raise ValueError(f"data file not found: {value if value == value.strip() else repr(value)} "
                             f"(expected an existing {expected.removeprefix('a ')}{hint})")
        if path.is_dir():
            raise ValueError(f"{value} is a directory; expected {expected} (name the file inside it)")
        if not path.name.lower().endswith(tuple(SUPPORTED_EXTENSIONS)):
            raise ValueError(f"{value}: unsupported file type; expected {expected}")
        if path.stat().st_size == 0:
            raise ValueError(f"{value} is empty (0 bytes); expected preference pairs, one JSON object per line "
                             "or a parquet/JSON table")
        # Absolute, resolved here on the driver: Ray workers run in another working directory, and the
        # stored config they get must name the same file.
        return str(Path(value).expanduser().resolve())


class MethodConfig(BaseModel):
    """``name`` plus that method's hyperparameters (validated against the loss registry)."""

    model_config = ConfigDict(extra="allow")
    name: str = "alpha-dpo"

    @model_validator(mode="after")
    def _check(self):
        if self.name not in method_names():
            raise _keyed("name", f"unknown method {self.name!r}; choose one of {', '.join(method_names())}"
                                 + _did_you_mean(self.name.strip(), method_names()))
        for key, problem in hyperparameter_problems(self.name, self.hyperparameters):
            raise _keyed(key, problem)
        return self

    @property
    def hyperparameters(self) -> dict[str, float]:
        return dict(self.model_extra or {})

    def resolved(self) -> dict[str, float]:
        """All hyperparameters with defaults filled in."""
        return build_loss(self.name, **self.hyperparameters).hparams


class TrainingConfig(_Section):
    learning_rate: float = Field(5e-4, gt=0)
    per_device_train_batch_size: int = Field(8, ge=1)
    total_batch_size: int = Field(16, ge=1, description="pairs per optimizer step across all workers")
    gradient_accumulation_steps: int | None = Field(None, ge=1, description="derived from total_batch_size if unset")
    per_device_eval_batch_size: int = Field(32, ge=1)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides num_train_epochs")
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    bf16: bool = False
    seed: int = 42
    logging_steps: int = Field(5, ge=1)
    eval_steps: int = Field(25, ge=1)
    save_steps: int = Field(50, ge=1)
    generation_eval_samples: int = Field(64, ge=0, description="held-out prompts decoded for generation_accuracy")
    sampled_kl_samples: int = Field(32, ge=0, description="held-out prompts answered by sampling from the policy "
                                    "for kl_sampled (one response each, max_new_tokens long at most); 0: off")
    max_new_tokens: int = Field(32, ge=1)
    logprob_chunk_size: int = Field(512, ge=1)
    logprob_memory_budget_mb: float = Field(
        128.0, ge=0, allow_inf_nan=False, description="MiB of float32 output-head logits kept for the backward "
        "instead of recomputed (faster while they fit; peak memory grows by up to this much); 0: always recompute")


class DeepSpeedConfig(_Section):
    zero_stage: Literal[0, 1, 2, 3] = 3
    offload_optimizer: bool = False
    offload_param: bool = False
    optimizer: Literal["auto", "torch", "deepspeed"] = Field(
        "auto", description="auto: torch.optim.AdamW on CPU (faster to build), DeepSpeed's fused Adam on GPU"
    )
    extra: dict[str, Any] = Field(default_factory=dict, description="merged into the generated DeepSpeed config")


SPOT_DEFAULTS = {"max_failures": 3, "max_preemption_failures": -1, "preemption_poll_s": 1.0,
                 "preemption_grace_s": 30.0}  # what `ray.spot: true` fills in (RayConfig._spot_defaults)


class RayConfig(_Section):
    address: str | None = Field(None, description="existing cluster (or RAY_ADDRESS); None starts a local one")
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1})
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how a run's workers are placed on nodes (Ray placement group strategy): PACK fills "
        "a node first (fast intra-node collectives), SPREAD puts them on different nodes where possible")
    storage_path: str = Field("outputs/ray", min_length=1, description="local path, NFS, or s3://, gs:// URI")
    max_failures: int = Field(0, ge=-1)
    max_preemption_failures: int = Field(-1, ge=-1, description="node preemptions to resume from, counted apart "
                                         "from max_failures (-1: any number, 0: none)")
    spot: bool = Field(False, description="the cluster's nodes are spot/preemptible: fills the settings below "
                       "left unset with SPOT_DEFAULTS (max_failures 3, max_preemption_failures -1, "
                       "preemption_poll_s 1, preemption_grace_s 30); values given explicitly win")
    preemption_poll_s: float | None = Field(None, gt=0, description="how often Ray Train polls for drain (preemption) "
                                            "notices (RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S; None: Ray's 5 s)")
    preemption_grace_s: float | None = Field(None, ge=0, description="how long surviving workers may keep running "
                                             "past a preemption deadline, to finish a just-in-time checkpoint "
                                             "(Ray Train FailureConfig.preemption_grace_s; None: Ray's 0)")
    num_to_keep: int | None = Field(2, ge=1)
    health_check_interval_s: float = Field(0.1, gt=0, description="Ray Train controller poll interval")

    @model_validator(mode="before")
    @classmethod
    def _spot_defaults(cls, data):
        """``spot: true``: the failure budget, drain poll and grace a spot cluster needs (`SPOT_DEFAULTS`),
        for every one not given. A spot kill the drain poll misses is an ordinary failure, so with
        ``max_failures: 0`` it ends the run; Ray polls drain notices every 5 s by default, and a node
        killed within that of its notice loses the steps since the last periodic checkpoint."""
        if isinstance(data, dict) and data.get("spot") is True:
            data = {**SPOT_DEFAULTS, **{k: v for k, v in data.items() if v is not None or k not in SPOT_DEFAULTS}}
        return data
    in_process_single_worker: bool = Field(True, description="a one-worker run without ray.address (or "
                                           "RAY_ADDRESS) trains in the driver's process: no Ray start, no Train "
                                           "controller or worker actor, the reference scored in-process; same "
                                           "checkpoints, metrics and resume (alphadpo_ray/training/in_process.py)")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None):
        """What `ray.init` connects to: auto, local, ray://HOST:PORT (Ray Client) or HOST:PORT (the GCS)."""
        if value is None or value in ("auto", "local"):
            return value
        host, _, port = value.removeprefix("ray://").rpartition(":")
        if (value.startswith("ray://") or "://" not in value) and host and port.isdigit() and 0 < int(port) < 65536:
            return value
        raise ValueError(f"{value!r} is not a cluster address; expected HOST:PORT of the head's GCS (port 6379 by "
                         "default), ray://HOST:PORT (Ray Client, 10001), 'auto' or 'local'")

    @field_validator("resources_per_worker")
    @classmethod
    def _resources(cls, value: dict[str, float]):
        for name, amount in value.items():
            standard = {"cpu": "CPU", "gpu": "GPU", "memory": "memory"}.get(name.lower())
            if standard and name != standard:  # a custom resource no node has: the run would wait forever
                raise _keyed(name, f"Ray's resource is spelled {standard!r}; {name!r} would be a custom resource "
                             "that no node offers, and the run would wait for it forever")
            if not math.isfinite(amount) or amount < 0:
                raise _keyed(name, f"expected an amount >= 0, got {amount}")
        return value

    @field_validator("storage_path")
    @classmethod
    def _storage(cls, value: str):
        if "://" not in value:
            return value
        scheme, _, rest = value.partition("://")
        if scheme.lower() not in STORAGE_SCHEMES:
            raise ValueError(f"unsupported scheme {scheme + '://'!r} in {value!r}; expected a local path or a URI "
                             f"with one of {', '.join(s + '://' for s in STORAGE_SCHEMES)}")
        if scheme.lower() in ("s3", "gs", "gcs") and not rest.split("?")[0].strip("/"):
            raise ValueError(f"{value!r} names no bucket; expected {scheme}://BUCKET/PATH")
        return value


class StudyConfig(_Section):
    """What `alphadpo-ray study` runs and how it reports (the ready studies are in experiments/studies/)."""

    kind: Literal["sweep", "compare"] = Field(description="sweep: one method over a controlled grid; "
                                              "compare: several methods, a search each, then seeds")
    title: str = Field(min_length=1)
    question: str = Field("", description="the question the study answers, one sentence")
    group_by: str | None = Field(None, description="sweep: one table row per value of this hyperparameter, "
                                 "its seeds pooled into intervals")
    verdict: list[str] | None = Field(None, min_length=2, max_length=2, description="compare: 'lower KL at "
                                      "matched accuracy' of the first method against the second")


class TrackingConfig(_Section):
    enabled: bool = True
    tracking_uri: str | None = Field(None, description="default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory")
    experiment_name: str = Field("alphadpo-ray", min_length=1)
    run_name: str | None = None

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, value: str | None):
        if value is None:
            return value
        problem = tracking_uri_problem(value)
        if problem:
            raise ValueError(problem)
        return value


def _load_config_plugins(data: Any) -> None:
    """Import the config's ``plugins`` (modules or .py files that register methods) before anything
    names their methods; a plugin that fails to import is a config error."""
    plugins = data.get("plugins") if isinstance(data, dict) else None
    if not plugins:
        return
    if not isinstance(plugins, list) or not all(isinstance(p, str) and p for p in plugins):
        raise ConfigError(f"plugins: expected a list of module names or .py paths, got {plugins!r}")
    for plugin in plugins:
        try:
            load_plugins([plugin])
        except Exception as err:  # noqa: BLE001 - any failure of user code is reported as the config's
            raise ConfigError(f"plugins: could not load {plugin!r}: {type(err).__name__}: {err}") from None


class ExperimentConfig(_Section):
    plugins: list[str] = Field(default_factory=list, description="modules or .py files imported first "
                               "(e.g. ones that add methods with alphadpo_ray.ml.losses.register_method)")
    name: str = Field("quickstart", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    output_dir: str = "outputs"
    cache_dir: str | None = Field(None, description="built-in task cache; default ALPHADPO_RAY_CACHE or ~/.cache/alphadpo-ray")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    method: MethodConfig = MethodConfig(name="alpha-dpo", **method_spec("alpha-dpo").starting_hyperparameters())
    training: TrainingConfig = TrainingConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()
    sweep: SweepConfig | None = Field(None, description="settings of `alphadpo-ray sweep` / `compare`")
    study: StudyConfig | None = Field(None, description="settings of `alphadpo-ray study` (a sweep or compare "
                                      "with its report)")

    @model_validator(mode="before")
    @classmethod
    def _plugins(cls, data):
        _load_config_plugins(data)
        return data

    @model_validator(mode="after")
    def _batch(self):
        _, problem = self._accumulation()
        if problem:
            raise _keyed(*problem)
        if self.sweep is not None:  # each method's conditional search space must be valid
            sections = [m for m in method_names() if m in self.sweep.search_space]
            for method in dict.fromkeys([self.method.name, *(self.sweep.methods or []), *sections]):
                try:
                    method_space(self.sweep, method, self.training.learning_rate)
                except ValueError as err:
                    key, _, message = str(err).partition(": ")
                    raise _keyed(key, message) from None
        if self.data.source == BUILTIN:  # the built-in task's sizes are known before anything is built
            b, d = self.data.builtin, self.data
            held_out = min(b.held_out_size, d.max_eval_samples or b.held_out_size)
            if held_out < self.ray.num_workers:
                raise _keyed("data.max_eval_samples" if held_out < b.held_out_size else "data.builtin.held_out_size",
                             f"{held_out} held-out pairs for ray.num_workers = {self.ray.num_workers}: each worker "
                             "evaluates its own shard, so there must be at least one pair per worker")
            train = min(b.train_size, d.max_train_samples or b.train_size)
            if train < self.training.total_batch_size:
                raise _keyed("training.total_batch_size",
                             f"{self.training.total_batch_size} is larger than the built-in training set "
                             f"({train} pairs); lower it or raise data.builtin.train_size")
        if self.study is not None:
            self._check_study()
        if self.model.name_or_path == BUILTIN and self.data.source != BUILTIN:
            raise _keyed("model.name_or_path",
                         "'builtin' is the built-in task's reference; it needs data.source 'builtin', "
                         f"got data.source {self.data.source!r}")
        return self

    def _check_study(self) -> None:
        """A study's grouping names a swept hyperparameter; its verdict names two compared methods."""
        study, sweep = self.study, self.sweep
        if sweep is None:
            raise _keyed("study", "a study runs a sweep or compare: add a sweep section")
        if study.kind == "sweep" and study.group_by and study.group_by not in sweep.search_space:
            raise _keyed("study.group_by", f"{study.group_by!r} is not in sweep.search_space "
                         f"({', '.join(sweep.search_space) or 'empty'})")
        if study.verdict:
            if study.kind != "compare":
                raise _keyed("study.verdict", "a verdict compares two methods: it needs study.kind 'compare'")
            compared = sweep.methods or list(method_names())
            missing = [m for m in study.verdict if m not in compared]
            if missing or study.verdict[0] == study.verdict[1]:
                raise _keyed("study.verdict", f"expected two different methods of the comparison "
                             f"({', '.join(compared)}), got {study.verdict}")

    def _accumulation(self) -> tuple[int, tuple[str, str] | None]:
        """(derived accumulation steps, (key, problem) or None)."""
        t = self.training
        per_step = self.ray.num_workers * t.per_device_train_batch_size
        if t.total_batch_size % per_step:
            return 0, ("training.total_batch_size", (
                f"{t.total_batch_size} is not a multiple of ray.num_workers ({self.ray.num_workers}) × "
                f"training.per_device_train_batch_size ({t.per_device_train_batch_size}) = {per_step}; "
                "pick sizes that divide it"))
        derived = t.total_batch_size // per_step
        if t.gradient_accumulation_steps is not None and t.gradient_accumulation_steps != derived:
            return derived, ("training.gradient_accumulation_steps", (
                f"{t.gradient_accumulation_steps} disagrees with training.total_batch_size {t.total_batch_size} / "
                f"({self.ray.num_workers} workers × {t.per_device_train_batch_size} per device) = {derived}; "
                "remove it or make them agree"))
        return derived, None

    @property
    def gradient_accumulation_steps(self) -> int:
        """total_batch_size / (num_workers × per_device_train_batch_size), which must be a whole number."""
        derived, problem = self._accumulation()
        if problem:
            raise ValueError(f"{problem[0]}: {problem[1]}")
        return derived

    @property
    def run_name(self) -> str:
        return self.tracking.run_name or self.name

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).expanduser().resolve() / self.name

    def storage_path(self) -> str:
        """`ray.storage_path` made absolute when it is a local path (Ray needs that)."""
        path = self.ray.storage_path
        return path if "://" in path else str(Path(path).expanduser().resolve())

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def _did_you_mean(word: str, choices) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.7)
    return f" (did you mean {close[0]}?)" if close else ""


def _keys_at(loc: list[str]) -> list[str]:
    """The keys the config section at `loc` (e.g. ['training']) takes; [] where it is not a section."""
    import typing

    cls: Any = ExperimentConfig
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return []
        cls = next((a for a in (field.annotation, *typing.get_args(field.annotation))
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return list(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else []


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        if e["type"] == "keyed":  # a cross-field check that names its own key (see `_keyed`)
            loc.append(e["ctx"]["key"])
        key = ".".join(loc) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "keyed":
            pass
        elif e["type"] == "extra_forbidden":
            msg = "unknown key" + _did_you_mean(loc[-1], _keys_at(loc[:-1]))
        elif e["type"] in ("model_type", "model_attributes_type", "dict_type"):
            msg = f"expected a section (a mapping of keys), got {type(e.get('input')).__name__} {e.get('input')!r}"
        elif e["type"].startswith("missing"):
            msg = "required key is missing"
        elif "input" in e and e["type"] not in ("value_error", "assertion_error"):
            msg += f" (got {e['input']!r})"
        lines.append(f"{key}: {msg}")
    if len(lines) == 1:  # the common case: one line, e.g. for the CLI's `error: ...`
        return f"invalid config {source}: {lines[0]}"
    return f"invalid config {source} ({len(lines)} problems):\n" + "\n".join(f"  {line}" for line in lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """'training.learning_rate=1e-4' → (['training', 'learning_rate'], 1e-4); values are parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. training.learning_rate=1e-4")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {item!r}: empty key")
    parts = [p.strip() for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty part in key {key.strip()!r}")
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {_yaml_problem(err)}") from None
    if raw != raw.strip():  # as a shell line ends `--set KEY=VALUE ` inside quotes: a typo, like a path's spaces
        raise ConfigError(f"--set {item!r}: {'.'.join(parts)}: the value {raw!r} has surrounding spaces; remove "
                          f"them (a value that needs them goes in YAML quotes: {'.'.join(parts)}=\"...\")")
    return parts, value


def _check_override_key(item: str, path: list[str]) -> None:
    """A `--set` key that a config section does not take is refused here, naming the item and the closest
    key (``--set 'training.learning_rat=1e-4': training.learning_rat: unknown key (did you mean
    training.learning_rate?)``); free-form places (method hyperparameters, ``deepspeed.extra``, search
    spaces) are left to validation."""
    import typing

    cls: Any = ExperimentConfig
    for depth, part in enumerate(path):
        fields = cls.model_fields
        if part not in fields:
            if cls.model_config.get("extra") == "forbid":
                close = _did_you_mean(part, fields).removeprefix(" (did you mean ").removesuffix("?)")
                hint = f" (did you mean {'.'.join([*path[:depth], close])}?)" if close else ""
                raise ConfigError(f"--set {item!r}: {'.'.join(path[:depth + 1])}: unknown key{hint}")
            return
        annotation = fields[part].annotation
        cls = next((a for a in (annotation, *typing.get_args(annotation))
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if cls is None:
            return


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set KEY=VALUE` items in order. Switching the method (``method.name=<other>``) drops the
    previous method's hyperparameters, so the new one starts from its defaults; method switches are
    applied first, so the other ``method.*`` items apply to the new method whatever their order."""
    data = copy.deepcopy(data)
    parsed = [(item, *parse_override(item)) for item in overrides]
    parsed.sort(key=lambda entry: entry[1] != ["method", "name"])  # stable: switches first, rest in order
    for item, path, value in parsed:
        _check_override_key(item, path)
        method = data.get("method")
        if path == ["method", "name"] and isinstance(method, dict) and method.get("name", "alpha-dpo") != value:
            data["method"] = {"name": value}
            continue
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def with_method_defaults(method: dict[str, Any] | None) -> dict[str, Any]:
    """Fill a method section's missing required hyperparameters from its registry entry's starting values."""
    method = dict(method or {})
    name = method.setdefault("name", "alpha-dpo")
    if not isinstance(name, str) or name not in method_names():
        return method  # validation names the problem
    return {**method_spec(name).starting_hyperparameters(), **method}


def config_from_dict(data: dict[str, Any], source: str = "<config>", overrides: list[str] | None = None) -> ExperimentConfig:
    data = apply_overrides(data or {}, overrides or [])
    model = data.get("model")
    if isinstance(model, dict):  # local model directories as absolute paths: workers run elsewhere
        for key in ("name_or_path", "reference", "tokenizer"):
            value = model.get(key)
            if (isinstance(value, str) and value.strip() and value != BUILTIN and not Path(value).is_absolute()
                    and Path(value).exists()):
                model[key] = str(Path(value).resolve())
    if isinstance(data.get("plugins"), list):  # .py plugins as absolute paths: workers run elsewhere
        data["plugins"] = [str(Path(p).expanduser().resolve()) if isinstance(p, str) and p.endswith(".py") else p
                           for p in data["plugins"]]
    _load_config_plugins(data)  # before the method section is filled from the registry
    if data.get("method") is None or isinstance(data.get("method"), dict):
        data["method"] = with_method_defaults(data.get("method"))
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


_SECTIONS = ("name", "model", "data", "method", "training", "deepspeed", "ray", "tracking", "sweep")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config (None → the embedded quickstart defaults), apply `--set` overrides, validate.

    Relative data and model paths in the file are resolved against the file's directory first, then the
    working directory (`--set` paths: the working directory); the config holds them as absolute paths
    (`DataConfig`), so Ray workers, which run in another directory, get the same files.
    """
    if path is None:
        return config_from_dict({}, "<defaults>", overrides)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        data = _load_yaml(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start} is 0x{err.object[err.start]:02x}); "
                          "save the config as UTF-8") from None
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}: key {err.key} appears twice (lines {err.first_line} and {err.second_line}); "
                          "YAML would keep only the last value: remove one") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
    if data is None:  # an empty file (or comments only): refused, not read as the quickstart defaults
        raise ConfigError(f"{path} is empty: expected a mapping of sections ({', '.join(_SECTIONS)}); "
                          "leave out the file to run the embedded quickstart")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    if isinstance(data.get("plugins"), list):  # a .py plugin beside the config file
        data["plugins"] = [str(path.resolve().parent / p) if isinstance(p, str) and p.endswith(".py")
                           and not Path(p).is_absolute() and (path.resolve().parent / p).exists() else p
                           for p in data["plugins"]]
    for section_name, keys in (("data", ("source", "eval_source")), ("model", ("name_or_path", "reference", "tokenizer"))):
        section = data.get(section_name) if isinstance(data.get(section_name), dict) else {}
        for key in keys:
            value = section.get(key)
            if isinstance(value, str) and value.strip() and value != BUILTIN and not Path(value).is_absolute():
                beside = path.resolve().parent / value
                if beside.exists():
                    section[key] = str(beside)
    return config_from_dict(data, str(path), overrides)


def total_steps(config: ExperimentConfig, train_pairs: int) -> int:
    """Optimizer steps of a run: max_steps, or epochs × (train_pairs // total_batch_size). Either way the
    training set must hold at least one global batch (the data order cycles through whole batches)."""
    t = config.training
    per_epoch = train_pairs // t.total_batch_size
    if per_epoch < 1:
        raise ConfigError(
            f"training.total_batch_size ({t.total_batch_size}) is larger than the training set ({train_pairs} pairs); "
            "lower it or use more data"
        )
    if t.max_steps is not None:
        return t.max_steps
    return max(1, math.floor(per_epoch * t.num_train_epochs))
