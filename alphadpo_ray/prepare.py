"""Driver-side preparation of a run: models, data, held-out split, and the reference cache.

Runs once per training run (or once per sweep), before any training worker starts:

1. resolve the models (the built-in task builds or reuses its SFT reference),
2. load and validate the preference data (bad rows skipped and reported, or strict failure),
3. tokenise train and held-out pairs and write them to the run storage as Parquet,
4. for methods that use a reference, compute (or reuse) the cached reference log-probs and attach them.

Workers then read plain tables from storage: no worker loads data from its source, and none holds
the reference model during training steps.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from . import reference_cache, storage
from .config import BUILTIN, ExperimentConfig, total_steps
from .errors import DataError
from .losses import needs_reference

logger = logging.getLogger(__name__)


@dataclass
class PreparedRun:
    """Everything a training worker needs, as paths/URIs and small values (picklable)."""

    policy_path: str
    reference_path: str
    tokenizer_path: str
    train_uri: str
    eval_uri: str
    train_pairs: int
    eval_pairs: int
    total_steps: int
    builtin_task: bool
    reference_cache: dict | None = None
    validation: dict = field(default_factory=dict)
    reference_metrics: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _builtin(config: ExperimentConfig):
    from .sft import SFTConfig, prepare_builtin_task
    from .task import TaskConfig

    b = config.data.builtin
    task = TaskConfig(
        train_size=b.train_size, held_out_size=b.held_out_size, difficulty=b.difficulty,
        length_bias=b.length_bias, label_noise=b.label_noise, operations=tuple(b.operations), seed=b.seed,
    )
    sft = SFTConfig(**b.sft.model_dump(), max_length=config.data.max_length,
                    max_prompt_length=config.data.max_prompt_length)
    return prepare_builtin_task(task, sft, cache_dir=config.cache_dir)


def _to_table(dataset, columns) -> pa.Table:
    return dataset.select_columns(list(columns)).data.table.combine_chunks()


def prepare_run(config: ExperimentConfig, log=print, need_reference: bool | None = None) -> PreparedRun:
    """Prepare data and reference cache for `config` under its storage path (Ray must be initialised
    when the method needs a reference and the cache is missing: the reference pass runs as Ray tasks).

    `need_reference` defaults to whether the config's method uses one; a sweep over several methods
    passes True if any of them does, so the cache is built once for all of them."""
    from .data import load_with_held_out, tokenize_pairs
    from .models import load_tokenizer

    data = config.data
    builtin_task = data.source == BUILTIN
    reference_metrics = None
    if builtin_task:
        built = _builtin(config)
        default_model = str(built.reference_dir)
        train_source, eval_source, chat_template = str(built.train_file), str(built.held_out_file), True
        reference_metrics = built.reference_metrics
    else:
        default_model = config.model.name_or_path
        train_source, eval_source, chat_template = data.source, data.eval_source, data.chat_template
    policy = default_model if config.model.name_or_path == BUILTIN else config.model.name_or_path
    reference = config.model.reference or policy
    tokenizer_path = config.model.tokenizer or reference
    tokenizer = load_tokenizer(tokenizer_path)

    train_ds, eval_ds, reports = load_with_held_out(
        train_source, split=data.split, eval_source=eval_source, eval_split=data.eval_split,
        held_out_fraction=data.held_out_fraction, seed=config.training.seed, format=data.format,
        strict=data.strict, chat_template=chat_template, tokenizer=tokenizer,
    )
    for name, report in reports.items():
        if report is not None and report.num_skipped:
            log(f"[data] {name}: {report.summary()}")
    if data.max_train_samples:
        train_ds = train_ds.select(range(min(data.max_train_samples, len(train_ds))))
    if data.max_eval_samples:
        eval_ds = eval_ds.select(range(min(data.max_eval_samples, len(eval_ds))))
    truncation = {"max_length": data.max_length, "max_prompt_length": data.max_prompt_length,
                  "truncation_mode": data.truncation_mode}
    train_tok = tokenize_pairs(train_ds, tokenizer, **truncation)
    eval_tok = tokenize_pairs(eval_ds, tokenizer, **truncation)
    train_table = _to_table(train_tok, ("row", "prompt_ids", "chosen_ids", "rejected_ids"))
    eval_table = _to_table(eval_tok, ("row", "prompt_ids", "chosen_ids", "rejected_ids"))
    eval_table = eval_table.append_column("prompt", pa.array(eval_ds["prompt"], pa.string()))
    steps = total_steps(config, train_table.num_rows)

    cache = None
    if need_reference is None:
        need_reference = needs_reference(config.method.name)
    if need_reference:
        result = reference_cache.ensure_reference_cache(
            train_table, reference=reference, tokenizer=tokenizer, truncation=truncation,
            storage_path=config.storage_path(), num_shards=config.ray.num_workers,
            resources=config.ray.resources_per_worker, use_gpu=config.ray.use_gpu,
            batch_size=config.training.per_device_eval_batch_size, chunk_size=config.training.logprob_chunk_size,
            dtype="bfloat16" if config.training.bf16 else "float32",
        )
        log(f"[reference] log-probs {'reused from cache' if result.hit else 'computed'}: {result.uri}")
        train_table = reference_cache.attach(train_table, storage.read_table(result.uri))
        cache = {"uri": result.uri, "key": result.key, "hit": result.hit, "seconds": round(result.seconds, 2)}

    digest = hashlib.sha256(
        (reference_cache.table_fingerprint(train_table) + reference_cache.table_fingerprint(eval_table)
         + str(cache and cache["key"])).encode()
    ).hexdigest()[:16]
    base = storage.join(config.storage_path(), "prepared", digest)
    train_uri, eval_uri = storage.join(base, "train.parquet"), storage.join(base, "eval.parquet")
    if not storage.exists(train_uri):
        storage.write_table(train_uri, train_table)
    if not storage.exists(eval_uri):
        storage.write_table(eval_uri, eval_table)
    if train_table.num_rows == 0 or eval_table.num_rows == 0:
        raise DataError("no training or held-out pairs left after validation")
    return PreparedRun(
        policy_path=policy, reference_path=reference, tokenizer_path=tokenizer_path,
        train_uri=train_uri, eval_uri=eval_uri, train_pairs=train_table.num_rows, eval_pairs=eval_table.num_rows,
        total_steps=steps, builtin_task=builtin_task, reference_cache=cache,
        validation={k: (asdict(v) if v is not None else None) for k, v in reports.items()},
        reference_metrics=reference_metrics,
    )
