"""Secrets stay out of everything the package writes or prints: MLflow params and artifacts, outputs,
checkpoints (DeepSpeed stores its config in every one), Ray's session logs (Tune used to forward AWS
credentials into each trial's runtime_env) and messages (an unreachable-server error printed the
password of its URI).

The end-to-end test runs `alphadpo-ray train` and `alphadpo-ray sweep` in a subprocess with its own
Ray under its own RAY_TMPDIR, fake secrets in the environment, the config and the tracking URI (a
real `mlflow server`), then greps every file written for them.
"""

from __future__ import annotations

import base64
import gzip
import http.server
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import small_config
from services import mlflow_server

# Distinctive fake secrets (QZX…): shaped like the real thing where a shape rule must catch them.
ENV_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAQZXFAKE000000001",
    "AWS_SECRET_ACCESS_KEY": "QZXawsSecretAccessKey0000000000000000000",
    "HF_TOKEN": "hf_QZXfakeHuggingFaceToken00000000000",
    "MLFLOW_TRACKING_PASSWORD": "QZXmlflowEnvPassword-0000",
}
CONFIG_SECRETS = {
    "hftoken": "QZXhftokenValue-1111",  # a secret name without a separator
    "passphrase": "QZXpassphraseValue-2222",
    "api_key": "QZXcometApiKey-3333",  # under deepspeed.extra.comet
    "url_password": "QZXurlPassword-4444",  # inside a URL under a neutral name
    "token_shaped": "ghp_QZXfakeGitHubToken000000000000000000",  # a token under a neutral name
    "tracking_password": "QZXtrackingUriPassword-5555",  # in the MLflow tracking URI
}


def _extra() -> dict:
    return {
        "hftoken": CONFIG_SECRETS["hftoken"],
        "passphrase": CONFIG_SECRETS["passphrase"],
        "comet": {"enabled": False, "api_key": CONFIG_SECRETS["api_key"],
                  "workspace": f"https://bob:{CONFIG_SECRETS['url_password']}@comet.example.com/ws",
                  "project": CONFIG_SECRETS["token_shaped"]},
    }


# ------------------------------------------------------------------------------------------------
# Masking and redaction (fast)


def test_masking_by_name_and_by_value_shape():
    from alphadpo_ray.services.secrets import MASK, mask_secrets, redact
    from alphadpo_ray.services.tracking import config_params

    config = {
        "deepspeed": {"extra": _extra(), "zero_stage": 2},
        "tracking": {"tracking_uri": "http://alice:pw123@127.0.0.1:5091", "experiment_name": "x"},
        "model": {"tokenizer": "org/tok", "name_or_path": "/models/hf_cache/llama"},
        "training": {"max_new_tokens": 32, "learning_rate": 1e-4},
        "notes": ["bearer sk-proj-QZXabcdefghijklmnop1234", "AKIAQZXFAKE000000001", "plain text"],
    }
    masked = mask_secrets(config)
    extra = masked["deepspeed"]["extra"]
    assert extra["hftoken"] == MASK and extra["passphrase"] == MASK and extra["comet"]["api_key"] == MASK
    assert extra["comet"]["workspace"] == "https://bob:***@comet.example.com/ws"
    assert extra["comet"]["project"] == MASK
    assert extra["comet"]["enabled"] is False and masked["deepspeed"]["zero_stage"] == 2
    assert masked["tracking"] == {"tracking_uri": "http://alice:***@127.0.0.1:5091", "experiment_name": "x"}
    assert masked["model"] == config["model"] and masked["training"] == config["training"]
    assert masked["notes"] == ["bearer ***", MASK, "plain text"]
    flat = " ".join(config_params(config).values())
    for value in [*CONFIG_SECRETS.values(), "pw123", "sk-proj-QZX", "AKIAQZX"]:
        assert value not in flat

    assert redact("cannot reach http://alice:PASSWORD@127.0.0.1:5091/api: refused") == \
        "cannot reach http://alice:***@127.0.0.1:5091/api: refused"
    assert redact("s3://AKID:p@ss@bucket/x and ftp://token@host") == "s3://AKID:***@bucket/x and ftp://***@host"
    for token in ("hf_QZXabcdefghijklmnopqrstu", "sk-QZXabcdefghijklmnopqrstu", "ghp_QZXabcdefghijklmnopqrstuvwxyz",
                  "AKIAQZXFAKE000000001", "xoxb-1234-5678-QZXabcdef", "glpat-QZXabcdefghijklmnop"):
        assert redact(f"token={token};") == "token=***;"
    for harmless in ("sqlite:////tmp/x/mlflow.db", "s3://bucket/runs", "hf_datasets_cache", "max_new_tokens 32",
                     "https://example.com/a@b"):
        assert redact(harmless) == harmless


def test_unreachable_server_error_shows_no_password(tmp_path):
    from alphadpo_ray.services.tracking import TrackingUnavailable, check_tracking

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(TrackingUnavailable) as failed:
        check_tracking(f"http://alice:PASSWORD@127.0.0.1:{port}", timeout=2)
    assert f"http://alice:***@127.0.0.1:{port}" in str(failed.value)
    assert "PASSWORD" not in str(failed.value)
    with pytest.raises(TrackingUnavailable) as failed:  # a store URI with a password, unusable
        check_tracking(f"postgresql://alice:PASSWORD@127.0.0.1:{port}/db")
    assert "PASSWORD" not in str(failed.value)
    # one connection attempt, not MLflow's ~100 s of retries with a warning each
    assert "unreachable (connection failed" in str(failed.value)


class _Health(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def do_GET(self):  # noqa: N802
        _Health.seen.append((self.path, self.headers.get("Authorization")))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


CREDENTIALS_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"  # /health is open on authenticating servers


def test_tracking_uri_with_credentials_is_accepted_and_kept_out_of_the_uri(monkeypatch):
    """The server is up: the probe authenticates with the URI's credentials; the URI used from then on
    (printed, summarised, pickled with callbacks) has none, MLflow reads them from the environment."""
    from alphadpo_ray.services.tracking import check_tracking, resolve_tracking_uri

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        uri = f"http://alice:{CONFIG_SECRETS['tracking_password']}@127.0.0.1:{port}"
        check_tracking(uri, timeout=5)
        expected = "Basic " + base64.b64encode(f"alice:{CONFIG_SECRETS['tracking_password']}".encode()).decode()
        assert _Health.seen[-2:] == [("/health", expected), (CREDENTIALS_PROBE, expected)]

        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # restored after the test
            monkeypatch.setenv(name, "")
            monkeypatch.delenv(name)
        resolved = resolve_tracking_uri(uri)
        assert resolved == f"http://127.0.0.1:{port}"
        assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
        assert os.environ["MLFLOW_TRACKING_PASSWORD"] == CONFIG_SECRETS["tracking_password"]
        check_tracking(resolved, timeout=5)  # credentials now from the environment
        assert _Health.seen[-2:] == [("/health", expected), (CREDENTIALS_PROBE, expected)]
    finally:
        server.shutdown()
        server.server_close()


def test_deepspeed_saved_config_has_no_extra_strings():
    from alphadpo_ray.training.engine import deepspeed_config, saved_deepspeed_config

    config = small_config(Path(tempfile.gettempdir()) / "secrets-unit", deepspeed={"zero_stage": 2, "extra": {
        **_extra(), "zero_optimization": {"reduce_bucket_size": 12345}}})
    live, saved = deepspeed_config(config), saved_deepspeed_config(config)
    assert live["hftoken"] == CONFIG_SECRETS["hftoken"]  # the engine runs on the real config
    assert saved["hftoken"] == saved["passphrase"] == saved["comet"]["api_key"] == saved["comet"]["workspace"] == "***"
    assert saved["comet"]["enabled"] is False
    assert saved["zero_optimization"] == live["zero_optimization"]
    assert {k: v for k, v in saved.items() if k not in _extra()} == {k: v for k, v in live.items() if k not in _extra()}


def test_tune_forwards_no_credentials_into_runtime_envs(monkeypatch):
    from ray.tune.execution import class_cache

    from alphadpo_ray.config.experiment import config_from_dict
    from alphadpo_ray.training.launch import _keep_credentials_out_of_runtime_envs, worker_env
    from alphadpo_ray.services.secrets import is_secret_name

    for name, value in ENV_SECRETS.items():
        monkeypatch.setenv(name, value)
    _keep_credentials_out_of_runtime_envs()
    assert not [n for n in class_cache.ENV_VARS_TO_PROPAGATE if is_secret_name(n)]

    class Trainable:
        pass

    remote = class_cache._ActorClassCache().get(Trainable)
    env_vars = str(remote._default_options.get("runtime_env"))
    assert not [v for v in ENV_SECRETS.values() if v in env_vars]
    env = worker_env(config_from_dict({}))
    assert not [k for k in env if is_secret_name(k)] and not set(env.values()) & set(ENV_SECRETS.values())


# ------------------------------------------------------------------------------------------------
# End to end: a train and a sweep, then grep everything written


DRIVER = """
import sys
from alphadpo_ray.cli import main
code = main(["train", sys.argv[1]])
print(f"[test] train exit {code}", flush=True)
code = code or main(["sweep", sys.argv[2]])
print(f"[test] sweep exit {code}", flush=True)
sys.exit(code)
"""


def _needles() -> dict[str, bytes]:
    values = {**ENV_SECRETS, **CONFIG_SECRETS}
    needles = {name: value.encode() for name, value in values.items()}
    user_pass = f"alice:{CONFIG_SECRETS['tracking_password']}".encode()
    needles["basic-auth header"] = base64.b64encode(user_pass)
    return needles


def _hits(path: Path, data: bytes, needles: dict[str, bytes]) -> list[str]:
    found = [f"{path}: {name}" for name, needle in needles.items() if needle in data]
    if data[:2] == b"\x1f\x8b":
        try:
            found += _hits(Path(f"{path}[gunzip]"), gzip.decompress(data), needles)
        except OSError:
            pass
    if data[:4] == b"PK\x03\x04":  # .pt files are zip archives: look inside every member as well
        try:
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    found += _hits(Path(f"{path}!{member}"), archive.read(member), needles)
        except (zipfile.BadZipFile, OSError):
            pass
    return found


@pytest.mark.slow
def test_no_secret_in_anything_a_train_and_a_sweep_write(builtin_task, tmp_path):
    root = tmp_path / "written"  # everything the commands write (the configs that hold the secrets are beside it)
    (root / "mlflow-server").mkdir(parents=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="ars-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    try:
        with mlflow_server(root / "mlflow-server") as server_uri:
            port = int(server_uri.rsplit(":", 1)[1])
            _train_and_sweep(root, tmp_path, ray_tmp, port)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _train_and_sweep(root: Path, tmp_path: Path, ray_tmp: Path, port: int) -> None:
    """`alphadpo-ray train` then `sweep` with the secrets, tracked on the server at `port`; then every file
    written (under `root` and Ray's temp dir) is scanned for them."""
    uri = f"http://alice:{CONFIG_SECRETS['tracking_password']}@127.0.0.1:{port}"
    common = dict(ray={"num_workers": 2, "storage_path": str(root / "storage"), "address": "local"},
                  deepspeed={"zero_stage": 2, "extra": _extra()},
                  tracking={"tracking_uri": uri, "experiment_name": "secrets"},
                  training={"max_steps": 2, "save_steps": 2, "logging_steps": 1, "eval_steps": 100})
    train = small_config(root / "train", name="secret-train", **common)
    sweep = small_config(
        root / "sweep", name="secret-sweep", **{
            **common, "ray": {**common["ray"], "num_workers": 1},
            "training": {**common["training"], "per_device_train_batch_size": 8, "total_batch_size": 8},
            "sweep": {"name": "secret-sweep", "num_samples": 2, "max_concurrent_trials": 2}})
    configs = tmp_path / "configs"
    configs.mkdir()
    for name, config in (("train", train), ("sweep", sweep)):
        (configs / f"{name}.yaml").write_text(yaml.safe_dump(config.to_dict()))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_USERNAME")}
    env.update(ENV_SECRETS, RAY_TMPDIR=str(ray_tmp))
    with open(root / "console.log", "wb") as console:
        command = [sys.executable, "-c", DRIVER, str(configs / "train.yaml"), str(configs / "sweep.yaml")]
        run = subprocess.run(command, cwd=root, env=env, stdout=console, stderr=subprocess.STDOUT, timeout=600)
    output = (root / "console.log").read_text(errors="replace")
    assert run.returncode == 0, output[-4000:]
    assert "[test] train exit 0" in output and "[test] sweep exit 0" in output

    # it really ran, tracked on the server and checkpointed
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"http://127.0.0.1:{port}")
    runs = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    assert len(runs) >= 4 and all(r.info.status == "FINISHED" for r in runs)  # train, sweep parent, 2 trials
    assert list((root / "storage").rglob("*model_states.pt")) and list((root / "storage").rglob("*optim_states.pt"))
    assert list(ray_tmp.rglob("runtime_env_agent.log"))
    assert "alice:***@" in output or f"127.0.0.1:{port}" in output

    needles = _needles()
    hits, scanned = [], 0
    for base in (root, ray_tmp):
        for path in base.rglob("*"):
            if path.is_file() and not path.is_symlink() and not path.name.endswith((".sock", ".socket")):
                try:
                    data = path.read_bytes()
                except OSError:
                    continue
                scanned += 1
                hits += _hits(path, data, needles)
    assert scanned > 100
    assert hits == []

