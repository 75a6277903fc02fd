"""Problems with the data's size fail before any model is loaded (and, for the built-in task, at
validation), never inside a worker: a training set smaller than one global batch with max_steps set,
fewer held-out pairs than workers, no usable rows. A disk too small for the run's checkpoints is
refused before Ray starts."""

from __future__ import annotations

import json
import re

import pytest

from alphadpo_ray.config.experiment import config_from_dict
from alphadpo_ray.errors import ConfigError, DataError


def _pairs(path, n, prompt="Question {i}?"):
    rows = [{"prompt": prompt.format(i=i), "chosen": f" good answer {i}", "rejected": f" bad {i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def no_models(monkeypatch):
    """Fail the test if the reference pass runs or any model is loaded."""
    import alphadpo_ray.ml.models as models
    import alphadpo_ray.training.reference_cache as reference_cache

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded / the reference pass ran before the data check")

    monkeypatch.setattr(reference_cache, "ensure_reference_cache", forbidden)
    monkeypatch.setattr(models, "load_model", forbidden)


def _config(tmp_path, model_dir, **sections):
    base = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"source": _pairs(tmp_path / "train.jsonl", 40), "eval_source": _pairs(tmp_path / "eval.jsonl", 6)},
        "training": {"per_device_train_batch_size": 4, "total_batch_size": 8, "max_steps": 3},
        "ray": {"num_workers": 2, "storage_path": str(tmp_path / "ray")},
        "tracking": {"enabled": False},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return config_from_dict(base)


def test_training_set_smaller_than_a_global_batch_fails_with_max_steps_set(tmp_path, tiny_model_dir, no_models):
    from alphadpo_ray.training.prepare import prepare_run

    config = _config(tmp_path, tiny_model_dir, data={"source": _pairs(tmp_path / "small.jsonl", 5)})
    with pytest.raises(ConfigError, match=r"training\.total_batch_size \(8\) is larger than the training set "
                                          r"\(5 pairs\)"):
        prepare_run(config, log=lambda *_: None)


def test_fewer_held_out_pairs_than_workers_fails_before_any_model(tmp_path, tiny_model_dir, no_models):
    from alphadpo_ray.training.prepare import prepare_run

    config = _config(tmp_path, tiny_model_dir, data={"eval_source": _pairs(tmp_path / "one.jsonl", 1)})
    with pytest.raises(DataError, match=r"1 held-out pair\(s\) for ray\.num_workers = 2: .*at least one pair per "
                                        r"worker"):
        prepare_run(config, log=lambda *_: None)


def test_no_usable_rows_fails_before_the_reference_pass(tmp_path, tiny_model_dir, no_models):
    from alphadpo_ray.training.prepare import prepare_run

    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": " same", "rejected": " same"}) + "\n"
                           for i in range(20)))
    config = _config(tmp_path, tiny_model_dir, data={"source": str(bad)})
    with pytest.raises(DataError, match=r"bad\.jsonl: no usable rows out of 20 \(identical_responses: 20\)"):
        prepare_run(config, log=lambda *_: None)


def test_builtin_sizes_are_checked_at_validation():
    with pytest.raises(ConfigError, match=r"training\.total_batch_size: 16 is larger than the built-in training set "
                                          r"\(8 pairs\)"):
        config_from_dict({"data": {"builtin": {"train_size": 8}}, "training": {"max_steps": 5}})
    with pytest.raises(ConfigError, match=r"data\.max_eval_samples: 1 held-out pairs for ray\.num_workers = 2"):
        config_from_dict({"data": {"max_eval_samples": 1}})
    with pytest.raises(ConfigError, match=r"data\.builtin\.held_out_size: 2 held-out pairs for ray\.num_workers = 4"):
        config_from_dict({"data": {"builtin": {"held_out_size": 2}},
                          "ray": {"num_workers": 4}, "training": {"total_batch_size": 32}})


def test_a_disk_too_small_for_the_checkpoints_is_refused_before_anything_starts(tmp_path, small_disk):
    """A real 8 MiB filesystem for ray.storage_path; the built-in model's checkpoints (ray.num_to_keep 2, plus the
    one being written) need about 14.6 MiB. Was: a warning in GiB ("0.0 GiB free … need about 0.0 GiB") and a run
    that died at its first checkpoint with ENOSPC naming no path."""
    from alphadpo_ray.errors import StorageFull
    from alphadpo_ray.training.launch import train

    disk = small_disk("8m")
    config = config_from_dict({"name": "too-small", "output_dir": str(tmp_path / "out"),
                               "ray": {"num_workers": 1, "storage_path": str(disk / "ray")},
                               "tracking": {"enabled": False}})
    with pytest.raises(StorageFull) as refused:
        train(config, log=lambda *_: None)
    message = str(refused.value)
    assert f"ray.storage_path {disk / 'ray'}: " in message and "Nothing was started" in message
    free, need = (float(x) for x in re.search(r"([\d.]+) MiB free .* need about ([\d.]+) MiB more", message).groups())
    assert 7 < free <= 8 and 14 < need < 16
    assert "ray.num_to_keep = 2" in message
    assert not any(disk.iterdir())  # not even the run's storage or prepared data


@pytest.mark.parametrize("content", [None, ""], ids=["missing", "empty"])
def test_missing_or_empty_token_file_says_how_to_make_it(tmp_path, content):
    """RAY_AUTH_TOKEN_PATH naming a missing or empty file: a real `sweep` stops before Ray starts with one line
    saying how to fill the file (before: Ray's AuthenticationError traceback, whose advice `ray get-auth-token
    --generate` fails the same way), and the command it prints, run as printed, makes a token Ray reads."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from conftest import small_config

    token = tmp_path / "secrets" / "ray-token"
    if content is not None:
        token.parent.mkdir()
        token.write_text(content)
    config = small_config(tmp_path, tracking={"enabled": False})
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(RAY_AUTH_TOKEN_PATH=str(token), HOME=str(tmp_path),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    out = subprocess.run([sys.executable, "-m", "alphadpo_ray", "sweep", str(path), "--address", "local"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stdout + out.stderr, out.stderr
    problem = "does not exist" if content is None else "is empty"
    assert lines[0].startswith(f"error: RAY_AUTH_TOKEN_PATH={token}: the token file {problem}. "), lines[0]
    generate = re.search(r"`(env -u RAY_AUTH_TOKEN_PATH ray get-auth-token --generate > [^`]+)`", lines[0]).group(1)
    token.parent.mkdir(exist_ok=True)
    made = subprocess.run(generate, shell=True, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    read = subprocess.run(["ray", "get-auth-token"], env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True,
                          text=True, timeout=120)
    assert read.returncode == 0 and read.stdout.strip() == token.read_text().strip() != "", read.stdout + read.stderr


def test_spot_switch_fills_the_failure_budget_drain_poll_and_grace():
    """`ray.spot: true` (in the file or by --set) sets what a spot cluster needs, each only where not given
    (before: no switch; a spot kill with the default ray.max_failures 0 ended the run, drain notices polled
    every 5 s); the poll reaches Ray Train through the workers' environment."""
    from alphadpo_ray.config.experiment import SPOT_DEFAULTS
    from alphadpo_ray.training.launch import PREEMPTION_POLL_ENV, worker_env

    base = {"name": "spot", "tracking": {"enabled": False}}
    plain = config_from_dict(base).ray
    assert (plain.max_failures, plain.preemption_poll_s, plain.preemption_grace_s) == (0, None, None)
    assert PREEMPTION_POLL_ENV not in worker_env(config_from_dict(base))
    spot = config_from_dict(base, overrides=["ray.spot=true"])
    assert {k: getattr(spot.ray, k) for k in SPOT_DEFAULTS} == {"max_failures": 3, "max_preemption_failures": -1,
                                                               "preemption_poll_s": 1.0, "preemption_grace_s": 30.0}
    assert worker_env(spot)[PREEMPTION_POLL_ENV] == "1.0"
    assert config_from_dict(spot.to_dict()).ray == spot.ray  # what workers rebuild is the same
    mine = config_from_dict({**base, "ray": {"spot": True, "max_failures": 1, "preemption_grace_s": 0}}).ray
    assert (mine.max_failures, mine.preemption_grace_s, mine.preemption_poll_s) == (1, 0, 1.0)


def test_spot_nodes_with_no_failure_budget_warn_before_the_run(tmp_path):
    """A real local Ray whose node says it is spot (RAY_NODE_MARKET_TYPE=spot → label ray.io/market-type,
    as KubeRay sets it): connecting with ray.max_failures 0 prints one warning naming the node, the setting
    and ray.spot; with ray.spot: true there is none."""
    import os
    import subprocess
    import sys

    script = (
        "import ray\n"
        "from alphadpo_ray.config.experiment import config_from_dict\n"
        "from alphadpo_ray.training.launch import init_ray\n"
        "from alphadpo_ray.training.preflight import spot_warnings\n"
        f"base = {{'name': 'spot', 'tracking': {{'enabled': False}}, 'ray': {{'storage_path': {str(tmp_path / 'ray')!r}}}}}\n"
        "init_ray(config_from_dict(base), 'local')\n"
        "spot = config_from_dict(base, overrides=['ray.spot=true'])\n"
        "print('with spot:', spot_warnings(spot, ray.nodes()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", script], env={**env, "RAY_NODE_MARKET_TYPE": "spot"}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = [line for line in out.stdout.splitlines() if line.startswith("[warning]")]
    assert len(warnings) == 1, out.stdout
    assert "(ray.io/market-type=spot) and ray.max_failures is 0: a spot kill ends the run" in warnings[0]
    assert "Set ray.spot: true" in warnings[0]
    assert "with spot: []" in out.stdout
