"""Reference log-probs, computed once and cached: no reference forward at training time.

Before training, the reference model's summed response log-probs (and response lengths) of every
training pair are computed — sharded over the cluster with Ray tasks, one reference copy per shard,
on a GPU when the run uses GPUs — and written to the run storage under a key that hashes

* the reference model (its config and weight files — and its code under ``trust_remote_code`` — for a
  local directory; for a hub id, the id and the commit actually loaded, to which scoring is pinned),
* how it is run: dtype, ``attn_implementation`` and ``trust_remote_code`` (applied when scoring, as
  for the policy in `engine._from_pretrained`),
* the tokenizer (its vocabulary, chat template and special tokens),
* the tokenised dataset (a fingerprint of the token ids themselves), and
* the truncation settings (max_length, max_prompt_length, truncation_mode).

Nothing else (batch size, chunk size, shards, storage, device) is in the key.

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
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..ml.threads import set_cpu_threads
from ..ml.data import collate_pairs
from ..ml.logprobs import sequence_logps
from ..ml import models  # called as models.load_model: tests record its load settings
from ..services import storage

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


_COMMIT = re.compile(r"[0-9a-f]{40}")
# Files of a model directory that do not change its log-probs (the tokenizer is keyed on its own).
_NOT_NUMERIC = {"generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "chat_template.json"}


def resolve_hub_revision(repo_id: str, revision: str = "main", cache_dir: str | os.PathLike | None = None) -> str | None:
    """The commit that `from_pretrained(repo_id, revision=revision)` loads, or None if unknown.

    Online, the Hub's answer (downloading ``config.json`` follows ``revision`` to its current commit and
    records it under the cache's ``refs/``); offline or when the Hub is unreachable, the commit the local
    hub cache's ``refs/<revision>`` points at — what an offline `from_pretrained` loads.
    """
    if _COMMIT.fullmatch(revision):
        return revision
    try:
        from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    except ImportError:
        return None
    candidates = []
    if not constants.is_offline_mode():
        candidates.append(lambda: hf_hub_download(repo_id, "config.json", revision=revision, cache_dir=cache_dir))
    candidates.append(lambda: try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision))
    for candidate in candidates:
        try:
            path = candidate()
        except Exception:  # noqa: BLE001 - unreachable hub, unknown repo: try the next source
            continue
        commit = Path(path).parent.name if isinstance(path, (str, os.PathLike)) else ""
        if _COMMIT.fullmatch(commit):  # .../snapshots/<commit>/config.json
            return commit
    return None


def resolve_model(name_or_path: str, trust_remote_code: bool = False,
                  cache_dir: str | os.PathLike | None = None) -> tuple[str, str | None]:
    """(identity, revision to load) of a model.

    A local directory: digests of its config and weight files (and of its ``*.py`` when remote code is
    trusted, since that code then computes the numbers); no revision. A hub id: ``id@commit`` with the
    commit actually loaded (`resolve_hub_revision`), which the caller pins scoring to; the id alone
    (and no pin) when no commit can be resolved.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        suffixes = {".json", ".safetensors", ".bin"} | ({".py"} if trust_remote_code else set())
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and p.suffix in suffixes and p.name not in _NOT_NUMERIC)
        return hashlib.sha256("".join(f"{p.name}:{_file_digest(p)}" for p in files).encode()).hexdigest(), None
    commit = resolve_hub_revision(name_or_path, cache_dir=cache_dir)
    return (f"{name_or_path}@{commit}" if commit else name_or_path), commit


def model_identity(name_or_path: str, trust_remote_code: bool = False,
                   cache_dir: str | os.PathLike | None = None) -> str:
    """A stable identity of a model: file digests for a local directory, id + resolved commit for the hub."""
    return resolve_model(name_or_path, trust_remote_code, cache_dir)[0]


def dtype_name(dtype) -> str:
    """Canonical torch dtype name: ``torch.bfloat16``, ``"bf16"`` and ``"bfloat16"`` are one dtype."""
    name = str(dtype).removeprefix("torch.")
    return {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(name, name)


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


def cache_key(reference: str, tokenizer, table: pa.Table, truncation: dict, *, dtype="float32",
              attn_implementation: str | None = None, trust_remote_code: bool = False,
              reference_identity: str | None = None) -> str:
    """Hash of everything that determines the cached numbers (see the module docstring).

    ``reference_identity`` is `model_identity(reference, trust_remote_code)` when the caller already
    resolved it (so the key and the scoring use the same commit)."""
    parts = {
        "reference": reference_identity or model_identity(reference, trust_remote_code),
        "dtype": dtype_name(dtype),
        "attn_implementation": attn_implementation,
        "trust_remote_code": bool(trust_remote_code),
        "tokenizer": tokenizer_identity(tokenizer),
        "data": table_fingerprint(table),
        "truncation": truncation,
        "version": 2,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def cache_uri(storage_path: str, key: str) -> str:
    return storage.join(storage_path, CACHE_DIR, f"{key}.parquet")


def load_kwargs(attn_implementation: str | None = None, trust_remote_code: bool = False,
                revision: str | None = None) -> dict:
    """`from_pretrained` keyword arguments of the reference: those the policy is loaded with
    (`engine._from_pretrained`), plus the pinned hub commit."""
    kwargs: dict = {"trust_remote_code": bool(trust_remote_code)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if revision:
        kwargs["revision"] = revision
    return kwargs


def score_rows(reference_path: str, rows: dict, pad_token_id: int, batch_size: int, chunk_size: int,
               device: str = "cpu", dtype: str = "float32", load: dict | None = None) -> dict:
    """Summed response log-probs of the reference for tokenised pairs (dict of columns).

    ``load``: extra `from_pretrained` arguments (`load_kwargs`)."""
    import torch

    model = models.load_model(reference_path, dtype=getattr(torch, dtype_name(dtype)), eval_mode=True,
                       **(load or {})).to(device)
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
             use_gpu: bool, batch_size: int, chunk_size: int, dtype: str, load: dict | None = None,
             in_process: bool = False) -> pa.Table:
    """Score the pairs: `num_shards` Ray tasks, or (`in_process`) one pass in this process with the
    worker's CPU count as torch threads (what Ray gives a task; more threads than the worker's CPUs
    oversubscribe a busy machine: 10× slower measured with 2 threads on 2 loaded cores)."""
    columns = ["row", "prompt_ids", "chosen_ids", "rejected_ids"]
    device = "cuda" if use_gpu else "cpu"
    cpus = float(resources.get("CPU", 1))
    if in_process:
        import torch

        threads = torch.get_num_threads()
        set_cpu_threads(cpus)
        try:
            return pa.table(score_rows(reference, table.select(columns).to_pydict(), pad_token_id, batch_size,
                                       chunk_size, device, dtype, load))
        finally:
            torch.set_num_threads(threads)
    import ray

    extra = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    task = ray.remote(score_rows).options(
        num_cpus=cpus, num_gpus=1 if use_gpu else 0, resources=extra or None, name="reference_logps"
    )
    n = table.num_rows
    bounds = np.linspace(0, n, num=min(num_shards, n) + 1, dtype=int)
    refs = [
        task.remote(reference, table.slice(lo, hi - lo).select(columns).to_pydict(),
                    pad_token_id, batch_size, chunk_size, device, dtype, load)
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]
    parts = ray.get(refs)
    merged = {k: [v for part in parts for v in part[k]] for k in COLUMNS}
    return pa.table(merged)


def _one_local_cpu_node(resources: dict, use_gpu: bool) -> bool:
    """Whether the pairs are better scored in this process than as Ray tasks: a CPU run whose Ray instance
    is this machine alone, with room for one worker (`ray.nodes()`, public API). Each task is a new
    process that imports torch, transformers and DeepSpeed (~5 CPU-s), more than scoring a small table
    takes; in this process, which has them imported, scoring uses the same cores. A cluster, GPUs or a
    node too small for a worker keep the tasks (they scale out, or make the autoscaler add a node)."""
    import ray

    if use_gpu or not ray.is_initialized():
        return False
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return (len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == ray.util.get_node_ip_address()
            and nodes[0].get("Resources", {}).get("CPU", 0) >= float(resources.get("CPU", 1)))


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
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    in_process: bool = False,
) -> CacheResult:
    """Return the cache file for these pairs, computing it (once, across processes) if missing: as Ray
    tasks, or in this process (`in_process`, a one-worker run that starts no Ray; or a CPU run on a Ray
    instance of this machine alone, `_one_local_cpu_node`).

    ``dtype``, ``attn_implementation`` and ``trust_remote_code`` are the policy's (`config.training.bf16`,
    `config.model.*`): the reference is scored with them and they are part of the key."""
    start = time.time()
    identity, revision = resolve_model(reference, trust_remote_code)
    key = cache_key(reference, tokenizer, table, truncation, dtype=dtype, attn_implementation=attn_implementation,
                    trust_remote_code=trust_remote_code, reference_identity=identity)
    uri = cache_uri(storage_path, key)
    if storage.exists(uri):
        return CacheResult(uri, key, True, time.time() - start)
    local = "://" not in storage_path  # local or NFS storage: serialise same-key computations
    lock = storage.file_lock(Path(storage_path) / CACHE_DIR / f".{key}.lock") if local else contextlib.nullcontext()
    with lock:
        if storage.exists(uri):  # another run computed it while we waited
            return CacheResult(uri, key, True, time.time() - start)
        in_process = in_process or _one_local_cpu_node(resources or {"CPU": 1}, use_gpu)
        logger.info("computing reference log-probs for %d pairs (%s)", table.num_rows,
                    "in this process" if in_process else f"{num_shards} shards")
        scores = _compute(table, reference, tokenizer.pad_token_id, num_shards, resources or {"CPU": 1},
                          use_gpu, batch_size, chunk_size, dtype_name(dtype),
                          load_kwargs(attn_implementation, trust_remote_code, revision), in_process)
        storage.write_table(uri, scores)
        storage.write_json(uri.removesuffix(".parquet") + ".json", {
            "key": key, "reference": reference, "reference_identity": identity, "revision": revision,
            "dtype": dtype_name(dtype), "attn_implementation": attn_implementation,
            "trust_remote_code": bool(trust_remote_code), "pairs": table.num_rows, "truncation": truncation,
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
