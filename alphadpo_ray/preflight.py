"""Checks that run before Ray starts, so a run fails in seconds with a message instead of minutes later.

* `check_deepspeed` — the generated DeepSpeed config (with ``deepspeed.extra`` merged in) is parsed by
  DeepSpeed's own config classes; a bad key or value is reported by name, never echoing the value
  (``deepspeed.extra`` may hold credentials). Part of ``alphadpo-ray validate`` too.
* `check_paths` — ``output_dir``, a local ``ray.storage_path`` and a ``sqlite:///`` MLflow store can
  be created and written (a probe file is written and removed), and the disk holding the checkpoints
  has room for them (a warning with the estimate when it may not).
* `check_hub` — a model or dataset named by hub id can be had: offline (``HF_HUB_OFFLINE=1``) it must be
  in the local cache; online the hub must answer within a few seconds. Otherwise the message says what
  to do (a local directory, or ``HF_HUB_OFFLINE=1`` with a filled cache).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

from .config import BUILTIN, ExperimentConfig
from .errors import ConfigError

# DeepSpeed's pydantic config classes → the config section they parse.
_DS_SECTIONS = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedBF16Config": "bf16",
                "DeepSpeedFP16Config": "fp16", "DeepSpeedActivationCheckpointingConfig": "activation_checkpointing",
                "DeepSpeedCommsConfig": "comms_logger", "DeepSpeedMonitorConfig": "monitor",
                "DeepSpeedFlopsProfilerConfig": "flops_profiler"}
_HUB_TIMEOUT_S = 3.0


def preflight(config: ExperimentConfig, log=print) -> None:
    """Every check of this module, in order of cost."""
    check_deepspeed(config)
    check_paths(config, log)
    check_hub(config)


# ------------------------------------------------------------------------------------------------
# DeepSpeed config


def check_deepspeed(config: ExperimentConfig) -> None:
    """Parse the run's DeepSpeed config with DeepSpeed's own classes (only when ``deepspeed.extra`` adds
    to what this package generates, which is known to be valid)."""
    if not config.deepspeed.extra:
        return
    from pydantic import ValidationError

    from .engine import deepspeed_config

    ds = deepspeed_config(config)
    # DeepSpeed checks the batch sizes against this process's world size (1 here): state them for one.
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]
    try:
        from deepspeed.runtime.config import DeepSpeedConfig

        DeepSpeedConfig(ds)
    except ValidationError as err:
        section = _DS_SECTIONS.get(err.title, err.title)
        problems = [f"{'.'.join([section, *map(str, e['loc'])])}: {e['msg'].lower()}" for e in err.errors()]
        raise ConfigError(f"deepspeed.extra: DeepSpeed rejects {'; '.join(problems)}") from None
    except (AssertionError, ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"deepspeed.extra: DeepSpeed rejects the merged config: {type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}") from None


# ------------------------------------------------------------------------------------------------
# Paths and disk


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_dir(key: str, path: Path) -> None:
    """Raise naming `key` unless `path` can be created and written: a probe directory is made (and
    removed) in `path`, or in its nearest existing ancestor if `path` does not exist yet, so the check
    leaves nothing behind."""
    existing = _nearest_existing(path)
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "not a directory", str(existing))
        os.rmdir(tempfile.mkdtemp(prefix=".alphadpo-write-probe-", dir=existing))
    except OSError as err:
        raise ConfigError(f"{key}: cannot write to {path} ({err.strerror or err}"
                          f"{'' if existing == path else f' at {existing}'}); choose a writable directory") from None


def _estimated_checkpoint_bytes(config: ExperimentConfig) -> int | None:
    """Bytes of the checkpoints a run keeps: per parameter its weight (bf16 or fp32) plus fp32 master
    weight and two Adam moments (12 bytes), times the checkpoints kept (+1 while a new one is written).
    Parameters are estimated from the model's weight files; None for hub models (not known here)."""
    source = config.model.name_or_path
    if source == BUILTIN:
        b = config.data.builtin.sft
        params = 12 * b.num_layers * b.hidden_size**2 + 2 * b.vocab_size * b.hidden_size
    else:
        path = Path(source).expanduser()
        if not path.is_dir():
            return None
        files = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")]
        if not files:
            return None
        stored = sum(p.stat().st_size for p in files)
        params = stored // 2  # weights are stored in 16 bits (bf16/fp16) more often than not: an upper bound
    per_param = (2 if config.training.bf16 else 4) + 12
    kept = (config.ray.num_to_keep or 2) + 1
    return params * per_param * kept


def check_paths(config: ExperimentConfig, log=print) -> None:
    """Writable output dir, local storage and SQLite store; warn when checkpoints may not fit the disk."""
    from .tracking import resolve_tracking_uri

    _probe_dir("output_dir", Path(config.output_dir).expanduser().resolve())
    storage = config.storage_path()
    if "://" not in storage:
        _probe_dir("ray.storage_path", Path(storage))
        need = _estimated_checkpoint_bytes(config)
        free = shutil.disk_usage(_nearest_existing(Path(storage))).free
        if need is not None and free < need:
            log(f"[warning] ray.storage_path {storage}: {free / 2**30:.1f} GiB free, but the checkpoints this run keeps "
                f"need about {need / 2**30:.1f} GiB (ray.num_to_keep = {config.ray.num_to_keep}); free space or "
                "lower ray.num_to_keep")
    if config.tracking.enabled:
        uri = resolve_tracking_uri(config.tracking.tracking_uri)
        if uri.startswith("sqlite:///"):
            db = Path(uri.removeprefix("sqlite:///"))
            db = db if db.is_absolute() or uri.startswith("sqlite:////") else Path.cwd() / db
            _probe_dir("tracking.tracking_uri", db.parent)


# ------------------------------------------------------------------------------------------------
# Hugging Face Hub


def _hub_ids(config: ExperimentConfig) -> list[tuple[str, str, str]]:
    """(config key, repo id, repo type) of every model / dataset the config names by hub id."""
    from .data import is_local_source

    out = []
    for key, value in (("model.name_or_path", config.model.name_or_path), ("model.reference", config.model.reference),
                       ("model.tokenizer", config.model.tokenizer)):
        if value and value != BUILTIN and not Path(value).expanduser().exists():
            out.append((key, value, "model"))
    for key, value in (("data.source", config.data.source), ("data.eval_source", config.data.eval_source)):
        if value and value != BUILTIN and not is_local_source(value):
            out.append((key, value, "dataset"))
    return out


def _hub_reachable(timeout: float = _HUB_TIMEOUT_S) -> bool:
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _in_cache(repo_id: str, repo_type: str) -> bool:
    from huggingface_hub import scan_cache_dir

    try:
        return any(r.repo_id == repo_id and r.repo_type == repo_type for r in scan_cache_dir().repos)
    except Exception:  # noqa: BLE001 - no cache directory yet
        return False


def check_hub(config: ExperimentConfig) -> None:
    """Hub ids resolve: from the cache when offline, else the hub answers within a few seconds."""
    ids = _hub_ids(config)
    if not ids:
        return
    if _offline():
        for key, repo_id, repo_type in ids:
            if not _in_cache(repo_id, repo_type):
                raise ConfigError(
                    f"{key}: {repo_id!r} is not a local path and not in the Hugging Face cache, and HF_HUB_OFFLINE is "
                    f"set; give a local directory/file, or download the {repo_type} once with network access")
        return
    if not _hub_reachable():
        key, repo_id, repo_type = ids[0]
        raise ConfigError(
            f"{key}: {repo_id!r} is not a local path, and the Hugging Face Hub "
            f"({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}) did not answer within {_HUB_TIMEOUT_S:g} s; "
            f"give a local directory/file, or set HF_HUB_OFFLINE=1 to use the {repo_type} from the local cache")
