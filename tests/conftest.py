"""Shared fixtures: one torch thread, the tiny offline model and tokenizer, the built-in task with its SFT
reference, one local Ray instance (all built once per test session); `small_config` for short runs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Keep tests offline and quiet, whatever the environment says.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The built-in task's SFT reference is built once per machine and reused by every test (and by the
# Ray workers the tests start, which inherit this environment).
os.environ.setdefault("ALPHADPO_RAY_CACHE", str(Path(tempfile.gettempdir()) / "alphadpo-ray-test-cache"))

SAMPLE_TEXTS = [
    "What is 12 + 34? The answer is 46.",
    "Sort the letters d b a c. Answer: a b c d",
    "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, salt and yeast, then bake it.",
    "Reverse the word 'hello': olleh",
] * 20


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """One intra-op thread in the test process: the 2 cores are shared with Ray workers and other
    processes, and multi-threaded ops on a busy core wait for their slowest thread (measured 10-40x
    slower than one thread). Ray workers set their own count from resources_per_worker."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A directory holding a tiny random Llama and its byte-level BPE tokenizer (save_pretrained)."""
    from alphadpo_ray.ml.models import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"), SAMPLE_TEXTS, vocab_size=320)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from alphadpo_ray.ml.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def builtin_task():
    """The built-in task with its default SFT reference (what experiments/quickstart.yaml uses)."""
    from alphadpo_ray.training.sft import prepare_builtin_task

    return prepare_builtin_task(progress=False)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that needs Ray (4 logical CPUs on 2 cores:
    Train controllers, 2 workers and Tune trials must fit at once), with its dashboard on a free port, as
    `launch.init_ray` starts one (~1.7 CPU-s to start, ~0.03 of a core while the session lasts): Ray Train's
    placement-group cleaner asks its state API whether a run's controller is alive. A Ray without one still
    advertises 127.0.0.1:8265, where another Ray's dashboard (a CLI test's) says "no such actor", and the cleaner
    then removes the run's placement group, killing its workers (CI saw it)."""
    import ray

    from alphadpo_ray.config.experiment import config_from_dict
    from alphadpo_ray.training.launch import WORKER_SETUP_HOOK, worker_env

    env = worker_env(config_from_dict({}))
    os.environ.update(env)
    if not ray.is_initialized():
        ray.init(num_cpus=4, runtime_env={"env_vars": env, "worker_process_setup_hook": WORKER_SETUP_HOOK},
                 logging_level="warning", include_dashboard=True, dashboard_port=0)
    yield ray
    ray.shutdown()


def small_config(tmp_path, **sections):
    """A short built-in-task run: outputs and the MLflow store under tmp_path; Ray storage shared by
    the whole session (so the reference cache is computed once), with a run name unique to the test."""
    import re

    from alphadpo_ray.config.experiment import config_from_dict

    shared_storage = tmp_path.parent / "shared-ray-storage"  # this session's basetemp
    base = {
        "name": re.sub(r"[^A-Za-z0-9_.-]", "-", tmp_path.name)[:60],
        "output_dir": str(tmp_path / "outputs"),
        "data": {"source": "builtin", "max_eval_samples": 48},
        "method": {"name": "alpha-dpo", "beta": 2.5, "gamma_beta_ratio": 0.3, "alpha": 0.2},
        "training": {"learning_rate": 2e-4, "per_device_train_batch_size": 4, "total_batch_size": 8,
                     "max_steps": 8, "eval_steps": 100, "logging_steps": 2, "save_steps": 4,
                     "generation_eval_samples": 0, "per_device_eval_batch_size": 24},
        "deepspeed": {"zero_stage": 2},
        "ray": {"num_workers": 2, "storage_path": str(shared_storage)},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment_name": "tests"},
    }
    for key, value in sections.items():
        if key != "method" and isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return config_from_dict(base)


@pytest.fixture
def short_tmp():
    """`short_tmp()` makes a directory with a short path under /tmp (removed at teardown), for a Ray temp dir
    (RAY_TMPDIR): Ray's socket paths under it must fit AF_UNIX's 107 bytes, which a pytest temp path
    (longer under pytest-xdist's per-worker basetemp) does not always leave room for."""
    import shutil

    made = []

    def make() -> Path:
        made.append(Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp")))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def small_disk(tmp_path):
    """A tiny real filesystem: `small_disk(size)` mounts a tmpfs of `size` (e.g. "8m") under tmp_path and returns
    its path; unmounted at teardown. Skips where mounting needs privileges this process lacks."""
    import subprocess

    mounts = []

    def mount(size: str) -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


# --- the quick tier (`make test-quick`) ------------------------------------------------------------
# Everything that needs no Ray, no cluster, no server and no built-in task run: the inner loop's tests.
# Chosen from what a test uses (marks, fixtures) and, for the scenario files that drive the CLI in
# subprocesses, by module.
HEAVY_FIXTURES = {"ray_session", "builtin_task", "cluster", "s3", "driver", "server", "shared"}
HEAVY_MODULES = {"test_multinode", "test_preemption", "test_autoscaler", "test_team_tracking", "test_own_data",
                 "test_secrets", "test_tracking", "test_run_identity", "test_training", "test_checkpoints",
                 "test_model_families", "test_sweep", "test_compare_seeds", "test_study", "test_sft",
                 "test_tracking_outage", "test_object_storage", "test_preference_training"}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under `scripts/test_cpu.py` (ALPHADPO_RAY_TEST_CPU set): this worker's pid and the test it runs, for
    the script to charge the CPU of this worker's processes to."""
    marks = os.environ.get("ALPHADPO_RAY_TEST_CPU")
    if not marks:
        return (yield)
    mark = Path(marks) / os.environ.get("PYTEST_XDIST_WORKER", "main")
    mark.write_text(f"{os.getpid()}\t{item.nodeid}")
    try:
        return (yield)
    finally:
        mark.write_text(f"{os.getpid()}\t")


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true",
                     help="the quick tier: no Ray, cluster, server or training run (make test-quick)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--quick"):
        _quick_tier(config, items)
    else:
        _slowest_first(items)


# --- the full suite on two workers (`make test`: pytest-xdist --dist loadscope) ---------------------
# Each test is its own unit of work, except the modules below, whose tests share a module-scoped fixture
# (a cluster, a server, a model): a module is one unit, so the fixture is built once (a module's tests on
# both workers would each build it, and a worker switching modules tears it down). Units start slowest
# first (LPT) by the times of an earlier full run in durations.json (`scripts/test_durations.py`), so the
# two workers finish together. xdist's own `xdist_group` marks do not work with pytest 9 (it renames
# items through an attribute pytest 9 no longer reads), hence this scheduler, built on xdist's public
# `pytest_xdist_make_scheduler` hook and its scope scheduler.
SHARED_FIXTURE_MODULES = {
    "tests/test_cluster_configs.py", "tests/test_logprobs.py", "tests/test_metrics.py", "tests/test_model_families.py",
    "tests/test_models.py", "tests/test_multinode.py", "tests/test_object_storage.py", "tests/test_preemption.py",
    "tests/test_sft.py", "tests/test_training.py",
}
DURATIONS = Path(__file__).with_name("durations.json")
UNKNOWN_S = 1.0  # a test durations.json does not know yet


def _unit(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0]
    return module if module in SHARED_FIXTURE_MODULES else nodeid


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: no error where xdist is not installed
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class OneTestOrOneModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    return OneTestOrOneModule(config, log)


def _slowest_first(items) -> None:
    """Sort `items` slowest unit first (stable: a module's tests keep their order); a test using a module-scoped
    fixture outside SHARED_FIXTURE_MODULES is a usage error naming it (its module must be listed)."""
    import json

    known = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    seconds: dict[str, float] = {}
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        defs = getattr(item, "_fixtureinfo", None)
        if module not in SHARED_FIXTURE_MODULES and defs and any(
                d.scope in ("module", "class", "package") for fixture in defs.name2fixturedefs.values()
                for d in fixture if d.baseid.startswith("tests/test_")):
            raise pytest.UsageError(f"{item.nodeid} uses a module-scoped fixture: add {module} to "
                                    "SHARED_FIXTURE_MODULES in tests/conftest.py")
        seconds[_unit(item.nodeid)] = seconds.get(_unit(item.nodeid), 0.0) + known.get(item.nodeid, UNKNOWN_S)
    items.sort(key=lambda item: -seconds[_unit(item.nodeid)])


def _quick_tier(config, items) -> None:
    keep, drop = [], []
    for item in items:
        heavy = (item.get_closest_marker("slow") is not None
                 or HEAVY_FIXTURES & set(getattr(item, "fixturenames", ()))
                 or item.module.__name__.rpartition(".")[2] in HEAVY_MODULES)
        (drop if heavy else keep).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep
