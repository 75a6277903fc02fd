"""The built-in task's SFT reference: a tiny Llama trained on responses of *both* kinds.

Supervised fine-tuning on the chosen and the rejected response of every training pair, with equal
weight, makes a reference that is genuinely uncertain: on a new prompt it finds the right answer and
the task's systematic mistake about equally likely, so its held-out preference accuracy is near
chance and its greedy generation accuracy well below 100%. Preference optimisation then has
something real to fix.

`prepare_builtin_task` builds everything once and caches it on disk under a hash of its settings
(task + SFT config): the tokenizer, the reference model (both `save_pretrained`), the train and
held-out pairs as JSON lines, and the reference's held-out metrics. Concurrent callers wait on a file
lock instead of building twice; a finished build is published with an atomic rename.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..ml import task as task_lib
from ..ml.threads import set_cpu_threads
from ..ml.task import SFTConfig
from ..ml.data import collate_pairs, collate_sft, preference_data_from_rows, tokenize_pairs, tokenize_sft
from ..ml.logprobs import sequence_logps
from ..ml.losses import build_loss
from ..ml.metrics import evaluate_preferences, generation_accuracy
from ..services.storage import default_cache_dir, file_lock
from ..ml.models import build_tiny_model, build_tokenizer, load_model, load_tokenizer


@dataclass(frozen=True)
class BuiltinTask:
    """Paths of a prepared built-in task (all under `root`)."""

    root: Path
    reference_dir: Path
    train_file: Path
    held_out_file: Path
    reference_metrics: dict


def builtin_key(task: task_lib.TaskConfig, sft: SFTConfig) -> str:
    # version 2: held-out pairs no longer carry the task's length bias (task.generate).
    payload = json.dumps({"task": asdict(task), "sft": asdict(sft), "version": 2}, sort_keys=True, default=list)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _load_built(root: Path) -> BuiltinTask:
    meta = json.loads((root / "meta.json").read_text())
    return BuiltinTask(
        root=root,
        reference_dir=root / "reference",
        train_file=root / "train.jsonl",
        held_out_file=root / "held_out.jsonl",
        reference_metrics=meta["reference_metrics"],
    )


def prepare_builtin_task(
    task: task_lib.TaskConfig | None = None,
    sft: SFTConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> BuiltinTask:
    """Build (or reuse) the built-in task's data, tokenizer and SFT reference; see the module docstring."""
    task, sft = task or task_lib.TaskConfig(), sft or SFTConfig()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache / f"builtin-{builtin_key(task, sft)}"
    if (root / "meta.json").exists():
        return _load_built(root)
    with file_lock(cache / f".builtin-{builtin_key(task, sft)}.lock"):
        if (root / "meta.json").exists():  # another process built it while we waited
            return _load_built(root)
        staging = Path(tempfile.mkdtemp(prefix=".building-", dir=cache))
        try:
            _build(task, sft, staging, progress)
            os.replace(staging, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return _load_built(root)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def _build(task: task_lib.TaskConfig, sft: SFTConfig, out: Path, progress: bool) -> None:
    train_rows, held_rows = task_lib.generate(task)
    _write_jsonl(out / "train.jsonl", train_rows)
    _write_jsonl(out / "held_out.jsonl", held_rows)
    tokenizer = build_tokenizer(task_lib.corpus(task), vocab_size=sft.vocab_size)
    model = build_tiny_model(
        "llama",
        tokenizer,
        hidden_size=sft.hidden_size,
        num_layers=sft.num_layers,
        num_heads=sft.num_heads,
        intermediate_size=3 * sft.hidden_size,
        seed=sft.seed,
    )
    lengths = {"max_length": sft.max_length, "max_prompt_length": sft.max_prompt_length}
    train, _ = preference_data_from_rows(train_rows, name="builtin-train", chat_template=True, tokenizer=tokenizer)
    examples = [
        ex
        for column in ("chosen", "rejected")
        for ex in tokenize_sft(train, tokenizer, response_column=column, **lengths)
    ]
    train_sft(model, examples, tokenizer.pad_token_id, sft, progress=progress)
    reference_dir = out / "reference"
    model.save_pretrained(reference_dir, safe_serialization=True)
    tokenizer.save_pretrained(reference_dir)
    metrics = reference_metrics(reference_dir, out / "held_out.jsonl", sft)
    meta = {"task": asdict(task), "sft": asdict(sft), "reference_metrics": metrics}
    (out / "meta.json").write_text(json.dumps(meta, indent=2, default=list))


def train_sft(model, examples: list[dict], pad_token_id: int, sft: SFTConfig, progress: bool = True) -> list[float]:
    """Token-mean NLL on the response tokens, AdamW with warmup + cosine decay; returns the loss curve."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup


    set_cpu_threads()  # the cores free now: oversubscribed OpenMP threads spin (13× slower on a busy machine)
    rng = random.Random(sft.seed)
    torch.manual_seed(sft.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=sft.learning_rate, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(sft.warmup_ratio * sft.steps), sft.steps)
    model.train()
    losses = []
    bar = tqdm(range(sft.steps), desc="SFT reference", disable=not progress, mininterval=2.0)
    for _ in bar:
        batch = collate_sft(rng.sample(examples, min(sft.batch_size, len(examples))), pad_token_id)
        out = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        loss = -out.logps.sum() / out.lengths.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses


def load_held_out(path: Path, tokenizer, max_length: int, max_prompt_length: int):
    """Tokenised held-out pairs of the built-in task (prompts rendered with the chat template)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    dataset, _ = preference_data_from_rows(rows, name=str(path), chat_template=True, tokenizer=tokenizer)
    return dataset, tokenize_pairs(dataset, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)


def held_out_metrics(policy, reference, tokenizer, loss, held_out_file: Path, max_length: int = 128,
                     max_prompt_length: int = 96, batch_size: int = 32, generation_samples: int = 64) -> dict:
    """All held-out metrics of `policy` against `reference` on the built-in task (one process)."""
    texts, tokens = load_held_out(held_out_file, tokenizer, max_length, max_prompt_length)
    batches = [
        collate_pairs([tokens[j] for j in range(i, min(i + batch_size, len(tokens)))], tokenizer.pad_token_id)
        for i in range(0, len(tokens), batch_size)
    ]
    metrics = evaluate_preferences(policy, loss, batches, reference=reference)
    prompts = [(tokens[i]["prompt_ids"], texts[i]["prompt"]) for i in range(min(generation_samples, len(tokens)))]
    metrics.update(generation_accuracy(policy, tokenizer, prompts, task_lib.check))
    return metrics


def reference_metrics(reference_dir: Path, held_out_file: Path, sft: SFTConfig) -> dict:
    """The reference's own held-out metrics, scored with the reference-free length-normalised reward
    (π̄c > π̄j; what AlphaDPO's and SimPO's rewards reduce to at the reference)."""
    tokenizer = load_tokenizer(reference_dir)
    reference = load_model(reference_dir, eval_mode=True)
    loss = build_loss("simpo", beta=1.0, gamma_beta_ratio=0.0)
    return held_out_metrics(reference, reference, tokenizer, loss, held_out_file, sft.max_length,
                            sft.max_prompt_length, generation_samples=200)
