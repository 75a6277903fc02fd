"""Checks that run before Ray starts, so a run fails in seconds with a message instead of minutes later.

* `check_deepspeed` — the generated DeepSpeed config (with ``deepspeed.extra`` merged in) is parsed by
  DeepSpeed's own config classes; a bad key or value is reported by name, never echoing the value
  (``deepspeed.extra`` may hold credentials). Part of ``alphadpo-ray validate`` too.
* `check_models` — a local model directory holds config.json, weights and tokenizer files (what is
  missing is named, instead of a transformers traceback); a path that looks local exists.
* `check_paths` — ``output_dir``, a local ``ray.storage_path`` and a ``sqlite:///`` MLflow store can
  be created and written (a probe file is written and removed), and the disk holding the checkpoints
  has room for them (`check_disk_space`: else a refusal naming the path, MiB free and needed).
* `check_hub` — a model or dataset named by hub id can be had: offline (``HF_HUB_OFFLINE=1``) it must be
  in the local cache; online the hub must answer within a few seconds. Otherwise the message says what
  to do (a local directory, or ``HF_HUB_OFFLINE=1`` with a filled cache).
* `check_job_outputs` — a Ray job started with ``--working-dir`` runs in a temporary copy of that
  directory, which Ray deletes: nothing the run keeps (outputs, checkpoints, cache, MLflow store) may
  resolve inside it.
* `check_cluster_access` — called by `launch.init_ray` before connecting to an existing cluster: the
  cluster answers and accepts this process's auth token, else one message naming the fix (instead of
  half a minute of Ray's retries and a traceback).
"""

from __future__ import annotations

import json
import os
import shutil
import shlex
import socket
import tempfile
from pathlib import Path

from .. import compat
from ..config.experiment import BUILTIN, ExperimentConfig
from ..errors import AlphaDPOError, ConfigError, StorageFull
from ..ml.data import is_local_source
from ..ml.models import local_model_problem
from ..services.secrets import redact
from ..services.tracking import resolve_tracking_uri
from .engine import deepspeed_config

# DeepSpeed's pydantic config classes → the config section they parse.
_DS_SECTIONS = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedBF16Config": "bf16",
                "DeepSpeedFP16Config": "fp16", "DeepSpeedActivationCheckpointingConfig": "activation_checkpointing",
                "DeepSpeedCommsConfig": "comms_logger", "DeepSpeedMonitorConfig": "monitor",
                "DeepSpeedFlopsProfilerConfig": "flops_profiler"}
_HUB_TIMEOUT_S = 3.0
_CLUSTER_TIMEOUT_S = 10.0


class ClusterAccessError(AlphaDPOError):
    """The Ray cluster named by --address / ray.address / RAY_ADDRESS does not answer or refuses this
    process's authentication."""


def preflight(config: ExperimentConfig, log=print) -> None:
    """Every check of this module that needs no cluster, in order of cost."""
    check_job_outputs(config)
    check_deepspeed(config)
    check_models(config)
    check_paths(config, log)
    check_hub(config)


# ------------------------------------------------------------------------------------------------
# Local model directories


def check_models(config: ExperimentConfig) -> None:
    """Each local model directory the run loads holds what `from_pretrained` needs (config.json and weights
    for a model, vocabulary files for the tokenizer, which comes from model.tokenizer, else the reference,
    else name_or_path), and a path that looks local exists. Part of ``alphadpo-ray validate`` too."""
    m = config.model
    for key, value, what in (
        ("model.name_or_path", m.name_or_path, {"tokenizer": m.tokenizer is None and m.reference is None}),
        ("model.reference", m.reference, {"tokenizer": m.tokenizer is None}),
        ("model.tokenizer", m.tokenizer, {"model": False}),
    ):
        if value and value != BUILTIN:
            problem = local_model_problem(value, **what)
            if problem:
                raise ConfigError(f"{key}: {value} {problem}")


# ------------------------------------------------------------------------------------------------
# DeepSpeed config


def check_deepspeed(config: ExperimentConfig) -> None:
    """Parse the run's DeepSpeed config with DeepSpeed's own classes (only when ``deepspeed.extra`` adds
    to what this package generates, which is known to be valid)."""
    if not config.deepspeed.extra:
        return
    from pydantic import ValidationError

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


def _bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def check_disk_space(config: ExperimentConfig) -> None:
    """Refuse (`StorageFull`, before Ray starts) a run whose checkpoints do not fit the disk holding a local
    ``ray.storage_path``: free space below the estimate (`_estimated_checkpoint_bytes`: ``num_to_keep`` + 1
    checkpoints) less what this run's ``checkpoint_*`` directories already hold — at least one checkpoint."""
    storage = config.storage_path()
    need = _estimated_checkpoint_bytes(config)
    if need is None:
        return
    kept = (config.ray.num_to_keep or 2) + 1
    run_dir = Path(storage) / config.run_name
    held = sum(_bytes_under(p) for p in run_dir.glob("checkpoint_*") if p.is_dir()) if run_dir.is_dir() else 0
    more = max(need - held, need // kept)
    disk = _nearest_existing(Path(storage))
    free = shutil.disk_usage(disk).free
    if free >= more:
        return
    mib = 2**20
    already = f", less {held / mib:.1f} MiB this run's checkpoints already hold" if held else ""
    raise StorageFull(
        f"ray.storage_path {storage}: {free / mib:.1f} MiB free on the disk holding {disk}, but the checkpoints this "
        f"run keeps need about {more / mib:.1f} MiB more ({kept} checkpoints of about {need / kept / mib:.1f} MiB: "
        f"ray.num_to_keep = {config.ray.num_to_keep} plus the one being written{already}). Nothing was started. Free "
        "space there, lower ray.num_to_keep, or point ray.storage_path at a larger disk.")


def check_storage_uri(storage: str) -> None:
    """No credentials in ``ray.storage_path`` (``s3://bucket/x?secret_key=…``, ``user:password@``): it is
    printed, logged and stored with every run and trial, and handed to every worker."""
    if redact(storage) != storage:
        raise ConfigError(
            f"ray.storage_path {redact(storage)} holds credentials; give them to the object store's client instead: "
            "the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS) or the "
            "nodes' instance role. The endpoint may stay in the path (?endpoint_override=HOST:PORT&scheme=http) "
            "or come from AWS_ENDPOINT_URL.")


def check_paths(config: ExperimentConfig, log=print) -> None:
    """Writable output dir, local storage and SQLite store; refuse when the checkpoints do not fit the disk."""
    _probe_dir("output_dir", Path(config.output_dir).expanduser().resolve())
    if config.cache_dir:
        _probe_dir("cache_dir", Path(config.cache_dir).expanduser().resolve())
    storage = config.storage_path()
    check_storage_uri(storage)
    if "://" not in storage:
        _probe_dir("ray.storage_path", Path(storage))
        check_disk_space(config)
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


# ------------------------------------------------------------------------------------------------
# Ray jobs and clusters


def job_working_dir() -> Path | None:
    """The working-dir copy this process runs in when it is the driver of a Ray job submitted with
    ``--working-dir``, else None. Ray gives a job's driver its job config (runtime_env included) in
    ``RAY_JOB_CONFIG_JSON_ENV_VAR`` and starts it in the unpacked copy,
    ``<session>/runtime_resources/working_dir_files/<package>``, which it deletes when no job uses it."""
    try:
        runtime_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    if not runtime_env.get("working_dir"):
        return None
    cwd = Path.cwd().resolve()
    parts = cwd.parts
    if "working_dir_files" not in parts[:-1]:
        return None  # the entrypoint changed directory first: relative paths are the user's choice
    return Path(*parts[: parts.index("working_dir_files") + 2])


def _tracking_path(uri: str) -> Path | None:
    """The local file or directory an MLflow tracking URI writes to (None for a server)."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).expanduser().resolve()
    if uri.startswith("file:"):
        return Path(uri.removeprefix("file:").removeprefix("//")).expanduser().resolve()
    return None if "://" in uri else Path(uri).expanduser().resolve()


def _local_artifact_root(uri: str, store: Path, experiment: str) -> Path:
    """Where a local MLflow store keeps `experiment`'s artifacts: the location recorded when the
    experiment was created, or — for one not created yet — MLflow's default, ``./mlruns`` of the
    current directory."""
    if store.exists():
        from mlflow.tracking import MlflowClient

        found = MlflowClient(uri).get_experiment_by_name(experiment)
        if found is not None:
            return _tracking_path(found.artifact_location) or Path("/")  # a remote location: not inside
    return Path.cwd().resolve() / "mlruns"


def check_job_outputs(config: ExperimentConfig) -> None:
    """In a Ray job's working-dir copy, refuse (before anything is written) an output_dir, local
    ray.storage_path, cache_dir, local MLflow store or its artifact folder that resolves inside the
    copy: Ray deletes it, so the results would be lost (or the run fails mid-way when it goes)."""
    copy = job_working_dir()
    if copy is None:
        return
    places = [("output_dir", Path(config.output_dir).expanduser().resolve())]
    if "://" not in config.ray.storage_path:
        places.append(("ray.storage_path", Path(config.storage_path())))
    cache = config.cache_dir or os.environ.get("ALPHADPO_RAY_CACHE")
    if cache:
        places.append(("cache_dir", Path(cache).expanduser().resolve()))
    if config.tracking.enabled:
        key = "tracking.tracking_uri" if config.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") \
            else "tracking.tracking_uri (default ./mlflow.db)"
        uri = resolve_tracking_uri(config.tracking.tracking_uri)
        path = _tracking_path(uri)
        if path is not None:
            places.append((key, path))
            places.append(("MLflow artifacts of experiment " + repr(config.tracking.experiment_name),
                           _local_artifact_root(uri, path, config.tracking.experiment_name)))
    inside = [f"{key} -> ./{path.relative_to(copy)}" for key, path in places if path == copy or copy in path.parents]
    if inside:
        raise ConfigError(
            f"This run is a Ray job running in its temporary copy of --working-dir ({copy}), which Ray deletes when "
            f"the job ends, and these would be written inside that copy: {'; '.join(inside)}. Nothing was started. Give "
            "absolute paths outside the working dir that the cluster's nodes share (or s3:// / gs:// for "
            "ray.storage_path) and an MLflow tracking server, e.g. --set output_dir=/shared/outputs "
            "--set ray.storage_path=s3://bucket/ray --set tracking.tracking_uri=http://mlflow-host:5000 "
            "(or MLFLOW_TRACKING_URI in the job's env).")


def gcs_address(address: str | None) -> str | None:
    """``host:port`` of an explicit cluster address; None when Ray finds or starts the cluster itself
    (None, ``auto``, ``local``) or the address is a ``ray://`` client URL."""
    if not address or address in ("auto", "local") or "://" in address or ":" not in address:
        return None
    return address


def _token_source() -> str:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}"
    return "~/.ray/auth_token (the default)"


MARKET_TYPE_LABEL = "ray.io/market-type"  # Ray 2.60's node label from RAY_NODE_MARKET_TYPE (KubeRay sets it)


def spot_warnings(config: ExperimentConfig, nodes: list[dict]) -> list[str]:
    """A warning line when the cluster says spot — a live node labelled ``ray.io/market-type: spot``
    (`ray.nodes()` entries) — and the run has no failure budget for it: ``ray.max_failures: 0`` (a spot
    kill that the drain poll misses is an ordinary failure and ends the run) or
    ``ray.max_preemption_failures: 0``. Empty otherwise. Nodes an autoscaler adds later are not seen."""
    spot = sorted({str(n.get("NodeManagerAddress") or n.get("NodeID", "?")) for n in nodes if n.get("Alive", True)
                   and str((n.get("Labels") or {}).get(MARKET_TYPE_LABEL, "")).lower() == "spot"})
    zero = [k for k in ("max_failures", "max_preemption_failures") if getattr(config.ray, k) == 0]
    if not spot or not zero:
        return []
    return [f"[warning] node(s) {', '.join(spot)} are spot ({MARKET_TYPE_LABEL}=spot) and "
            f"{' and '.join(f'ray.{k}' for k in zero)} is 0: a spot kill ends the run. Set ray.spot: true "
            f"(a failures budget, a 1 s drain-notice poll and a 30 s grace) or raise {', '.join(f'ray.{k}' for k in zero)}."]


def check_token_file() -> None:
    """When RAY_AUTH_TOKEN_PATH names the token (and RAY_AUTH_TOKEN does not override it), the file must
    exist and hold a token: else one `ClusterAccessError` saying how to fill it. Ray only says the file
    "cannot be opened or is empty", and its own fix, ``ray get-auth-token --generate``, fails the same way
    while RAY_AUTH_TOKEN_PATH names the missing file (Ray 2.60 checks the path before generating)."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not path or os.environ.get("RAY_AUTH_TOKEN"):
        return
    try:
        problem = None if Path(path).expanduser().read_text().strip() else "is empty"
    except FileNotFoundError:
        problem = "does not exist"
    except OSError as err:
        problem = f"cannot be read ({err.strerror or err})"
    if problem:
        raise ClusterAccessError(
            f"RAY_AUTH_TOKEN_PATH={path}: the token file {problem}. Put the cluster's token there (on the head node "
            f"`ray get-auth-token` prints it), or make a new token with `env -u RAY_AUTH_TOKEN_PATH ray "
            f"get-auth-token --generate > {shlex.quote(path)}` (with RAY_AUTH_TOKEN_PATH set, --generate fails on "
            f"the missing file); or unset RAY_AUTH_TOKEN_PATH to use ~/.ray/auth_token.")


def check_cluster_access(address: str) -> None:
    """Ask the GCS at `address` for its cluster id with the authentication `ray.init` would use, and
    raise one `ClusterAccessError` naming the fix when it refuses (no token: RAY_AUTH_MODE is not
    ``token``, or a wrong one) or does not answer — instead of Ray's half a minute of retries, each
    logging an ``Unauthenticated`` line, and a ConnectionError traceback. Other answers are left to
    `ray.init`."""
    import grpc
    from ray.exceptions import AuthenticationError

    how = ("Set `export RAY_AUTH_MODE=token` and give the cluster's token in RAY_AUTH_TOKEN, in a file named by "
           "RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token (the default; `ray get-auth-token` on the head node "
           "prints it). Nodes joining the cluster need the same two settings.")
    check_token_file()
    try:
        token_mode, has_token = compat.ray_token_auth()
        if token_mode and not has_token:
            raise ClusterAccessError(f"RAY_AUTH_MODE=token, but no Ray auth token was found ({_token_source()}). {how}")
        metadata = compat.ray_auth_metadata() if token_mode else ()
    except AuthenticationError:  # e.g. RAY_AUTH_TOKEN_PATH names a missing or empty file
        raise ClusterAccessError(f"RAY_AUTH_MODE=token, but the Ray auth token cannot be read from "
                                 f"{_token_source()}. {how}") from None
    try:
        compat.gcs_get_cluster_id(address, metadata, _CLUSTER_TIMEOUT_S)
    except grpc.RpcError as err:
        code = err.code()
        if code == grpc.StatusCode.UNAUTHENTICATED and not token_mode:
            raise ClusterAccessError(
                f"The Ray cluster at {address} requires token authentication, and this process sends no token "
                f"(RAY_AUTH_MODE is not 'token'). {how}") from None
        if code == grpc.StatusCode.UNAUTHENTICATED:
            raise ClusterAccessError(
                f"The Ray cluster at {address} rejected this process's auth token (from {_token_source()}): it "
                f"is not the cluster's. {how}") from None
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise ClusterAccessError(
                f"No Ray cluster answered at {address} within {_CLUSTER_TIMEOUT_S:g} s. Check the address (the "
                "head's GCS address, `ray start --head --port`, default port 6379) and that the head node is "
                "running and reachable from here.") from None
