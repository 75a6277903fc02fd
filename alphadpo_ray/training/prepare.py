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
from dataclasses import asdict, dataclass

import pyarrow as pa

from ..config.experiment import BUILTIN, ExperimentConfig, total_steps
from ..errors import DataError
from ..ml.data import load_with_held_out, tokenize_pairs_with_report
from ..ml.losses import needs_reference
from ..ml.models import load_tokenizer
from ..ml.task import SFTConfig, TaskConfig
from ..services import storage
from . import reference_cache
from .plan import PreparedRun
from .sft import prepare_builtin_task

logger = logging.getLogger(__name__)


def prepare_builtin(config: ExperimentConfig):
    """The config's built-in task and SFT reference (built once, then reused from the cache)."""
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


@dataclass(frozen=True)
class _Sources:
    """Where a run's models and data come from, after the built-in task is resolved."""

    policy: str
    reference: str
    tokenizer: str
    train: str
    eval: str | None
    chat_template: bool
    builtin_task: bool
    reference_metrics: dict | None


def prepare_run(config: ExperimentConfig, log=print, need_reference: bool | None = None,
                in_process: bool = False) -> PreparedRun:
    """Prepare data and reference cache for `config` under its storage path (a missing cache is scored
    by Ray tasks, so Ray must be initialised — or, `in_process`, in this process).

    `need_reference` defaults to whether the config's method uses one; a sweep over several methods
    passes True if any of them does, so the cache is built once for all of them. Every check on the
    data's size runs before the reference model is loaded."""
    sources = _resolve_sources(config)
    tokenizer = load_tokenizer(sources.tokenizer)
    train_ds, eval_ds, reports = _load_pairs(config, sources, tokenizer, log)
    truncation = {"max_length": config.data.max_length, "max_prompt_length": config.data.max_prompt_length,
                  "truncation_mode": config.data.truncation_mode}
    train_table, eval_table = _tokenize(train_ds, eval_ds, tokenizer, truncation, reports, log, config.data.strict)
    steps = _check_sizes(config, train_table.num_rows, eval_table.num_rows)
    if need_reference is None:
        need_reference = needs_reference(config.method.name)
    cache = None
    if need_reference:
        train_table, cache = _attach_reference(config, sources, tokenizer, truncation, train_table, log, in_process)
    train_uri, eval_uri = _write_tables(config, train_table, eval_table, cache)
    return PreparedRun(
        policy_path=sources.policy, reference_path=sources.reference, tokenizer_path=sources.tokenizer,
        train_uri=train_uri, eval_uri=eval_uri, train_pairs=train_table.num_rows, eval_pairs=eval_table.num_rows,
        total_steps=steps, builtin_task=sources.builtin_task, reference_cache=cache,
        validation={k: (asdict(v) if v is not None else None) for k, v in reports.items()},
        reference_metrics=sources.reference_metrics,
    )


def _resolve_sources(config: ExperimentConfig) -> _Sources:
    """Models and data files: the built-in task's (building its SFT reference once), or the config's."""
    data = config.data
    if data.source == BUILTIN:
        built = prepare_builtin(config)
        default_model = str(built.reference_dir)
        train, eval_source, chat_template = str(built.train_file), str(built.held_out_file), True
        reference_metrics = built.reference_metrics
    else:
        default_model = config.model.name_or_path
        train, eval_source, chat_template = data.source, data.eval_source, data.chat_template
        reference_metrics = None
    policy = default_model if config.model.name_or_path == BUILTIN else config.model.name_or_path
    reference = config.model.reference or policy
    return _Sources(policy, reference, config.model.tokenizer or reference, train, eval_source, chat_template,
                    data.source == BUILTIN, reference_metrics)


def _load_pairs(config: ExperimentConfig, sources: _Sources, tokenizer, log):
    """Validated train and held-out pairs (bad rows skipped and reported, or strict failure), capped."""
    data = config.data
    train_ds, eval_ds, reports = load_with_held_out(
        sources.train, split=data.split, eval_source=sources.eval, eval_split=data.eval_split,
        held_out_fraction=data.held_out_fraction, seed=config.training.seed, format=data.format,
        strict=data.strict, chat_template=sources.chat_template, tokenizer=tokenizer,
    )
    for name, report in reports.items():  # each split's own rows, once (validation itself prints nothing)
        if report is not None and report.num_skipped:
            log(f"[data] {name}: {report.summary()}")
    if data.max_train_samples:
        train_ds = train_ds.select(range(min(data.max_train_samples, len(train_ds))))
    if data.max_eval_samples:
        eval_ds = eval_ds.select(range(min(data.max_eval_samples, len(eval_ds))))
    return train_ds, eval_ds, reports


def _tokenize(train_ds, eval_ds, tokenizer, truncation: dict, reports: dict | None = None, log=print,
              strict: bool = False) -> tuple[pa.Table, pa.Table]:
    """Token-id tables of both splits (the held-out one keeps its prompt text for generation checks).
    Pairs that cannot be scored after truncation are skipped (or, strict, fail); what truncation did is
    printed once per split and kept in that split's report (`reports[name].truncation`)."""
    columns = ["row", "prompt_ids", "chosen_ids", "rejected_ids"]
    tables = {}
    for name, ds in (("train", train_ds), ("held_out", eval_ds)):
        report = (reports or {}).get(name)
        tokens, cut = tokenize_pairs_with_report(ds, tokenizer, name=report.source if report else name,
                                                 strict=strict, **truncation)
        if report is not None:
            report.truncation = asdict(cut)
        if cut.truncated or cut.num_skipped:
            log(f"[data] {name}: {cut.summary()}")
        tables[name] = _to_table(tokens, columns)
        if name == "held_out":  # the prompts of the pairs that were kept, in order
            index = {row: i for i, row in enumerate(ds["row"])}
            prompts = ds.select([index[row] for row in tokens["row"]])["prompt"] if cut.num_skipped else ds["prompt"]
            tables[name] = tables[name].append_column("prompt", pa.array(prompts, pa.string()))
    return tables["train"], tables["held_out"]


def _check_sizes(config: ExperimentConfig, train_pairs: int, eval_pairs: int) -> int:
    """The run's optimizer steps, after checking that the data can feed it (before any model is loaded)."""
    if train_pairs == 0 or eval_pairs == 0:
        raise DataError(f"no usable {'training' if train_pairs == 0 else 'held-out'} pairs left after validation "
                        f"of data.source {config.data.source!r} (see the skipped-row report above)")
    workers = config.ray.num_workers
    if eval_pairs < workers:
        raise DataError(
            f"{eval_pairs} held-out pair(s) for ray.num_workers = {workers}: each worker evaluates its own shard, "
            "so there must be at least one pair per worker (raise data.max_eval_samples / data.held_out_fraction, "
            "or give data.eval_source)")
    return total_steps(config, train_pairs)


def _attach_reference(config: ExperimentConfig, sources: _Sources, tokenizer, truncation: dict, train_table, log,
                      in_process: bool = False):
    """Compute (or reuse) the cached reference log-probs and attach them to the training table."""
    result = reference_cache.ensure_reference_cache(
        train_table, reference=sources.reference, tokenizer=tokenizer, truncation=truncation,
        storage_path=config.storage_path(), num_shards=config.ray.num_workers,
        resources=config.ray.resources_per_worker, use_gpu=config.ray.use_gpu,
        batch_size=config.training.per_device_eval_batch_size, chunk_size=config.training.logprob_chunk_size,
        dtype="bfloat16" if config.training.bf16 else "float32",
        attn_implementation=config.model.attn_implementation, trust_remote_code=config.model.trust_remote_code,
        in_process=in_process,
    )
    log(f"[reference] log-probs {'reused from cache' if result.hit else 'computed'}: {result.uri}")
    cache = {"uri": result.uri, "key": result.key, "hit": result.hit, "seconds": round(result.seconds, 2)}
    return reference_cache.attach(train_table, storage.read_table(result.uri)), cache


def _write_tables(config: ExperimentConfig, train_table: pa.Table, eval_table: pa.Table, cache) -> tuple[str, str]:
    """Both tables under the run storage, addressed by their content (written once, then reused)."""
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
    return train_uri, eval_uri
