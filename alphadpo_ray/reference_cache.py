"""Reference log-probs, computed once and cached: no reference forward at training time.

Before training, the reference model's summed response log-probs (and response lengths) of every
training pair are computed — sharded over the cluster with Ray tasks, one reference copy per shard,
on a GPU when the run uses GPUs — and written to the run storage under a key that hashes

* the reference model (its config and weight files, or hub id + revision),
* the tokenizer (its vocabulary and chat template),
* the tokenised dataset (a fingerprint of the token ids themselves), and
* the truncation settings (max_length, max_prompt_length, truncation_mode).

Any later run or sweep trial with the same key reuses the file without loading the reference. A
file lock (local storage) makes concurrent callers with the same key wait for one computation
instead of repeating it. Reference-free methods (simpo, cpo, orpo) never call this.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import storage

logger = logging.getLogger(__name__)
CACHE_DIR = "reference_cache"
COLUMNS = ("row", "ref_chosen_logps", "ref_rejected_logps", "chosen_lengths", "rejected_lengths")


@dataclass(frozen=True)
class CacheResult:
    uri: str
    key: str
    hit: bool
    seconds: float


def _file_digest(path: Path, edge: int = 1 << 20) -> str:
    """Size plus hashes of the first and last MiB: cheap for multi-GB weights, and changes with them."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as handle:
        h.update(handle.read(edge))
        if path.stat().st_size > 2 * edge:
            handle.seek(-edge, os.SEEK_END)
            h.update(handle.read(edge))
    return h.hexdigest()


def model_identity(name_or_path: str) -> str:
    """A stable identity of a model: file digests for a local directory, id + revision for the hub."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and (p.suffix in {".json", ".safetensors", ".bin"}))
        return hashlib.sha256("".join(f"{p.name}:{_file_digest(p)}" for p in files).encode()).hexdigest()
    try:  # hub id: pin to the resolved commit when the local hub cache knows it
        from huggingface_hub import scan_cache_dir

        for repo in scan_cache_dir().repos:
            if repo.repo_id == name_or_path:
                return f"{name_or_path}@{sorted(r.commit_hash for r in repo.revisions)[-1]}"
    except Exception:  # noqa: BLE001 - no cache, offline: the id alone
        pass
    return name_or_path


def tokenizer_identity(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    template = getattr(tokenizer, "chat_template", None) or ""
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256((vocab + template + special).encode()).hexdigest()


def table_fingerprint(table: pa.Table, columns=("row", "prompt_ids", "chosen_ids", "rejected_ids")) -> str:
    """Hash of the token ids themselves: same data and tokenisation ⇔ same fingerprint."""
    h = hashlib.sha256()
    for name in columns:
        column = table.column(name).combine_chunks()
        flat = column.flatten() if pa.types.is_list(column.type) else column
        h.update(name.encode())
        h.update(np.asarray(flat).tobytes())
        if pa.types.is_list(column.type):
            h.update(np.asarray(column.offsets).tobytes())
    return h.hexdigest()


def cache_key(reference: str, tokenizer, table: pa.Table, truncation: dict) -> str:
    parts = {
        "reference": model_identity(reference),
        "tokenizer": tokenizer_identity(tokenizer),
        "data": table_fingerprint(table),
        "truncation": truncation,
        "version": 1,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def cache_uri(storage_path: str, key: str) -> str:
    return storage.join(storage_path, CACHE_DIR, f"{key}.parquet")


def score_rows(reference_path: str, rows: dict, pad_token_id: int, batch_size: int, chunk_size: int,
               device: str = "cpu", dtype: str = "float32") -> dict:
    """Summed response log-probs of the reference for tokenised pairs (dict of columns)."""
    import torch

    from .data import collate_pairs
    from .logprobs import sequence_logps
    from .models import load_model

    model = load_model(reference_path, dtype=getattr(torch, dtype), eval_mode=True).to(device)
    n = len(rows["row"])
    out = {k: [] for k in COLUMNS}
    with torch.no_grad():
        for start in range(0, n, batch_size):
            idx = range(start, min(start + batch_size, n))
            examples = [{k: rows[k][i] for k in ("row", "prompt_ids", "chosen_ids", "rejected_ids")} for i in idx]
            batch = collate_pairs(examples, pad_token_id)
            res = sequence_logps(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                 batch["response_mask"].to(device), chunk_size=chunk_size)
            b = len(examples)
            out["row"].extend(batch["index"].tolist())
            out["ref_chosen_logps"].extend(res.logps[:b].double().cpu().tolist())
            out["ref_rejected_logps"].extend(res.logps[b:].double().cpu().tolist())
            out["chosen_lengths"].extend(res.lengths[:b].cpu().tolist())
            out["rejected_lengths"].extend(res.lengths[b:].cpu().tolist())
    return out


def _compute(table: pa.Table, reference: str, pad_token_id: int, num_shards: int, resources: dict,
             use_gpu: bool, batch_size: int, chunk_size: int, dtype: str) -> pa.Table:
    import ray

    cpus = float(resources.get("CPU", 1))
    extra = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    task = ray.remote(score_rows).options(
        num_cpus=cpus, num_gpus=1 if use_gpu else 0, resources=extra or None, name="reference_logps"
    )
    n = table.num_rows
    bounds = np.linspace(0, n, num=min(num_shards, n) + 1, dtype=int)
    refs = [
        task.remote(reference, table.slice(lo, hi - lo).select(["row", "prompt_ids", "chosen_ids", "rejected_ids"]).to_pydict(),
                    pad_token_id, batch_size, chunk_size, "cuda" if use_gpu else "cpu", dtype)
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]
    parts = ray.get(refs)
    merged = {k: [v for part in parts for v in part[k]] for k in COLUMNS}
    return pa.table(merged)


def ensure_reference_cache(
    table: pa.Table,
    *,
    reference: str,
    tokenizer,
    truncation: dict,
    storage_path: str,
    num_shards: int = 1,
    resources: dict | None = None,
    use_gpu: bool = False,
    batch_size: int = 32,
    chunk_size: int = 512,
    dtype: str = "float32",
) -> CacheResult:
    """Return the cache file for these pairs, computing it (once, across processes) if missing."""
    start = time.time()
    key = cache_key(reference, tokenizer, table, truncation)
    uri = cache_uri(storage_path, key)
    if storage.exists(uri):
        return CacheResult(uri, key, True, time.time() - start)
    local = "://" not in storage_path  # local or NFS storage: serialise same-key computations
    lock = storage.file_lock(Path(storage_path) / CACHE_DIR / f".{key}.lock") if local else contextlib.nullcontext()
    with lock:
        if storage.exists(uri):  # another run computed it while we waited
            return CacheResult(uri, key, True, time.time() - start)
        logger.info("computing reference log-probs for %d pairs (%d shards)", table.num_rows, num_shards)
        scores = _compute(table, reference, tokenizer.pad_token_id, num_shards, resources or {"CPU": 1},
                          use_gpu, batch_size, chunk_size, dtype)
        storage.write_table(uri, scores)
        storage.write_json(uri.removesuffix(".parquet") + ".json", {
            "key": key, "reference": reference, "pairs": table.num_rows, "truncation": truncation,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(time.time() - start, 2),
        })
        return CacheResult(uri, key, False, time.time() - start)


def attach(table: pa.Table, cache: pa.Table) -> pa.Table:
    """Add the cached reference columns to the tokenised pairs (joined on `row`, order of `table`)."""
    lookup = {int(r): i for i, r in enumerate(cache.column("row").to_pylist())}
    try:
        order = [lookup[int(r)] for r in table.column("row").to_pylist()]
    except KeyError as err:
        raise RuntimeError(f"reference cache has no entry for row {err.args[0]}; delete the cache file and rerun") from None
    picked = cache.take(pa.array(order))
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        table = table.append_column(name, picked.column(name))
    return table
