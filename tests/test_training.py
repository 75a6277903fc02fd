"""The training path for real: Ray Train TorchTrainer × DeepSpeed (gloo) × MLflow, at toy scale.

All tests share one local Ray instance (`ray_session`) and the built-in task's SFT reference
(`builtin_task`), so each run costs only its worker start-up and a handful of optimizer steps.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import small_config

pytestmark = pytest.mark.slow


def _losses(summary):
    return [h["train/loss"] for h in summary["history"]]


def test_quickstart_shaped_run_learns_and_is_tracked(ray_session, builtin_task, tmp_path):
    """2 workers, ZeRO-3: held-out accuracy rises well above the reference's, KL > 0, all in MLflow."""
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    from alphadpo_ray.training.launch import train

    config = small_config(
        tmp_path,
        name="quickstart-small",
        deepspeed={"zero_stage": 3},
        # small chunks: ranks hold different numbers of response tokens, so their chunk counts differ,
        # and under ZeRO-3 the collectives must not depend on them (see logprobs._Zero3HeadLogps)
        training={"max_steps": 30, "eval_steps": 15, "save_steps": 15, "generation_eval_samples": 16,
                  "per_device_train_batch_size": 8, "total_batch_size": 16, "logprob_chunk_size": 48},
        data={"source": "builtin", "max_eval_samples": 200},
    )
    summary = train(config, log=lambda *_: None)

    reference_accuracy = summary["reference_metrics"]["accuracy"]
    final = summary["final_eval"]
    # 200 held-out pairs: a binomial sd of at most 0.035, so +0.2 is > 5 sd above the reference
    # (whose accuracy is ~0.5 by construction); the real run reaches ~0.85 after 25 steps.
    assert final["eval/accuracy"] >= reference_accuracy + 0.2
    assert final["eval/accuracy_logratio"] > 0.7
    assert final["eval/kl"] > 0.01
    # sampled KL over the policy's own responses (ZeRO-3: sampling and scoring are collective), 32
    # prompts split over 2 workers; exactly 0 at step 0, where the policy is the reference
    assert summary["evals"][0]["eval/kl_sampled"] == 0.0 == summary["evals"][0]["eval/kl_sampled_se"]
    assert summary["evals"][0]["eval/accuracy_logratio"] == 0.5  # step 0: the policy is the reference
    assert final["eval/kl_sampled"] > 0 and final["eval/kl_sampled_se"] > 0
    assert final["eval/kl_sampled_samples"] == 32
    assert 1 <= final["eval/generated_length"] <= 32  # greedy, at most max_new_tokens
    assert summary["status"] == "finished" and summary["steps"] == 30
    assert len(_losses(summary)) == 30 and all(math.isfinite(x) for x in _losses(summary))
    assert summary["reference_cache"] is not None

    run_dir = Path(config.run_dir)
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["mlflow_run_id"] == summary["mlflow_run_id"]
    policy = AutoModelForCausalLM.from_pretrained(summary["policy"])
    assert any(p.abs().sum() > 0 for p in policy.parameters())
    assert (Path(summary["policy"]) / "model.safetensors").exists()

    client = MlflowClient(config.tracking.tracking_uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "alpha-dpo"
    assert float(run.data.params["method.alpha"]) == 0.2
    assert run.data.metrics["eval/accuracy"] == pytest.approx(final["eval/accuracy"])
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(history) >= 10 and max(m.step for m in history) == 30
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "config.json"} <= artifacts


def _learned(summary: dict, steps: int) -> None:
    """A finished run of `steps` finite losses whose held-out log-ratio accuracy left the reference's exact 0.5
    (48 held-out pairs, 6 steps at lr 2e-4, measured ~0.8: 0.65 is > 2 sd above chance), with KL > 0 and the
    policy exported."""
    losses = _losses(summary)
    assert summary["status"] == "finished" and len(losses) == steps
    assert all(math.isfinite(x) for x in losses)
    assert summary["evals"][0]["eval/accuracy_logratio"] == 0.5  # step 0: the policy is the reference
    assert summary["final_eval"]["eval/accuracy_logratio"] > 0.65
    assert summary["final_eval"]["eval/kl"] > 0
    assert Path(summary["policy"], "model.safetensors").exists()


def test_two_workers_match_one_worker_with_double_batch(ray_session, builtin_task, tmp_path):
    """2 workers × b and 1 worker × 2b follow the same loss trajectory (sharding + gathered margin stats);
    the 2-worker run is also ZeRO-2's training check (ZeRO-0: test_zero0_trains; ZeRO-3:
    test_quickstart_shaped_run_learns_and_is_tracked)."""
    from alphadpo_ray.training.launch import train

    common = {"max_steps": 6, "save_steps": 6, "total_batch_size": 8}
    suffix = tmp_path.name[-6:]
    two = small_config(tmp_path / "two", name=f"two-workers-{suffix}", ray={"num_workers": 2},
                       deepspeed={"zero_stage": 2}, training={**common, "per_device_train_batch_size": 4})
    one = small_config(tmp_path / "one", name=f"one-worker-{suffix}", ray={"num_workers": 1},
                       deepspeed={"zero_stage": 2}, training={**common, "per_device_train_batch_size": 8})
    a, b = train(two, log=lambda *_: None), train(one, log=lambda *_: None)
    assert _losses(a) == pytest.approx(_losses(b), rel=2e-4, abs=2e-5)
    for key in ("train/loss/margin_mean", "train/loss/margin_std"):
        assert [h[key] for h in a["history"]] == pytest.approx([h[key] for h in b["history"]], rel=2e-4, abs=2e-5)
    _learned(a, 6)


def test_zero0_trains(ray_session, builtin_task, tmp_path):
    """ZeRO-0 (plain data parallel) with 2 workers trains."""
    from alphadpo_ray.training.launch import train

    config = small_config(tmp_path, name=f"zero0-{tmp_path.name[-6:]}", deepspeed={"zero_stage": 0},
                          training={"max_steps": 6, "save_steps": 6})
    _learned(train(config, log=lambda *_: None), 6)


def _processes(title: str):
    """Live processes started by this test session (its Ray's workers are its descendants) whose title
    (Ray sets `ray::<ActorClass>...`) contains `title`: never another session's processes."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if any(title in part for part in proc.cmdline()):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def _kill_after_first_checkpoint(storage: Path, run_name: str, title: str, done: threading.Event):
    """Wait until the run has a checkpoint on disk, then SIGKILL one process of the given actor class."""
    deadline = time.time() + 300
    while time.time() < deadline and not done.is_set():
        if list((storage / run_name).glob("checkpoint_*")) or list((storage / run_name).glob("*/checkpoint_*")):
            pids = _processes(title)
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                done.set()
                return
        time.sleep(0.05)


RESUME_TRAINING = {"max_steps": 24, "save_steps": 4, "eval_steps": 8}


@pytest.fixture(scope="module")
def uninterrupted(ray_session, builtin_task, tmp_path_factory):
    """The reference trajectory both interruption tests must reproduce: one worker in this process on the
    same global batches (2 workers × 4 and 1 × 8 agree: test_two_workers_match_one_worker_with_double_batch),
    so it costs no Ray Train run."""
    from alphadpo_ray.training.launch import train

    tmp = tmp_path_factory.mktemp("uninterrupted")
    config = small_config(tmp, name=f"uninterrupted-{tmp.name}", ray={"num_workers": 1},
                          training={**RESUME_TRAINING, "per_device_train_batch_size": 8})
    return train(config, log=lambda *_: None)


def _same_trajectory(resumed: dict, reference: dict) -> None:
    assert len(resumed["history"]) == len(reference["history"]) == RESUME_TRAINING["max_steps"]
    assert _losses(resumed) == pytest.approx(_losses(reference), rel=2e-4, abs=2e-5)
    for key in ("train/loss/margin_mean", "train/loss/margin_std"):  # AlphaDPO's running statistics
        assert [h[key] for h in resumed["history"]] == pytest.approx([h[key] for h in reference["history"]],
                                                                      rel=2e-4, abs=2e-5)


def test_worker_killed_mid_run_resumes_same_trajectory(uninterrupted, tmp_path):
    """FailureConfig restarts the worker group from the latest checkpoint; the losses and AlphaDPO's
    running statistics continue exactly as in an uninterrupted run."""
    from alphadpo_ray.training.launch import train

    config = small_config(tmp_path, name=f"killed-{tmp_path.name[-6:]}", training=RESUME_TRAINING,
                          ray={"max_failures": 2})
    killed = threading.Event()
    killer = threading.Thread(target=_kill_after_first_checkpoint,
                              args=(Path(config.storage_path()), config.run_name, "RayTrainWorker", killed), daemon=True)
    killer.start()
    resumed = train(config, log=lambda *_: None)
    killer.join(timeout=5)
    assert killed.is_set(), "the worker was never killed; the test did not exercise a failure"
    _same_trajectory(resumed, uninterrupted)


def test_reference_cache_hit_then_miss_on_new_truncation(ray_session, builtin_task, tmp_path, monkeypatch):
    """The first preparation computes the reference log-probs; a second run with the same reference, data
    and truncation reuses the file with no reference pass; new truncation misses. On this session's Ray
    (this machine alone, CPU) the pairs are scored in the driver, not as Ray tasks (each a new process
    importing torch); a cluster's reference tasks are seen in test_multinode."""
    import pyarrow.parquet as pq

    from alphadpo_ray.training import reference_cache
    from alphadpo_ray.training.prepare import prepare_run

    assert reference_cache._one_local_cpu_node({"CPU": 1}, use_gpu=False)
    assert not reference_cache._one_local_cpu_node({"CPU": 1}, use_gpu=True)
    assert not reference_cache._one_local_cpu_node({"CPU": 64}, use_gpu=False)  # no room: tasks (autoscaler)
    passes = []  # the real scoring function, counted where it runs: here
    score_rows = reference_cache.score_rows
    monkeypatch.setattr(reference_cache, "score_rows", lambda *a, **k: passes.append(1) or score_rows(*a, **k))

    fresh = {"num_workers": 2, "storage_path": str(tmp_path / "storage")}  # starts with no cache
    base = small_config(tmp_path, name="cache-a", ray=fresh, data={"source": "builtin", "max_train_samples": 64})
    first = prepare_run(base, log=lambda *_: None)
    assert first.reference_cache["hit"] is False
    cache_file = Path(first.reference_cache["uri"])
    mtime = cache_file.stat().st_mtime_ns
    assert len(passes) == 1  # one pass over the data, in this process
    assert pq.read_table(cache_file).num_rows == 64

    again = small_config(tmp_path, name="cache-b", ray=fresh, data={"source": "builtin", "max_train_samples": 64})
    second = prepare_run(again, log=lambda *_: None)
    assert second.reference_cache == {**first.reference_cache, "hit": True, "seconds": second.reference_cache["seconds"]}
    assert cache_file.stat().st_mtime_ns == mtime
    assert len(passes) == 1  # no reference forward the second time

    # A new truncation of the same pairs by the same reference: the other end of each sequence kept (a new
    # max_length would also build a second built-in SFT reference, ~50 s here, which is not what is tested)
    other_end = small_config(tmp_path, name="cache-c", ray=fresh,
                             data={"source": "builtin", "max_train_samples": 64, "truncation_mode": "keep_start"})
    assert other_end.data.truncation_mode != base.data.truncation_mode
    third = prepare_run(other_end, log=lambda *_: None)
    assert third.reference_cache["hit"] is False
    assert third.reference_cache["key"] != first.reference_cache["key"]
    assert len(passes) == 2


def test_reference_free_method_skips_the_cache(ray_session, builtin_task, tmp_path):
    from alphadpo_ray.training.prepare import prepare_run

    config = small_config(tmp_path, method={"name": "simpo", "beta": 2.5, "gamma_beta_ratio": 0.3})
    assert prepare_run(config, log=lambda *_: None).reference_cache is None


def test_unreachable_tracking_server_fails_before_training(builtin_task, tmp_path, monkeypatch):
    import alphadpo_ray.training.launch as launch
    import alphadpo_ray.training.prepare as prepare
    from alphadpo_ray.services.tracking import TrackingUnavailable

    calls = []
    monkeypatch.setattr(launch, "init_ray", lambda *a, **k: calls.append("init_ray"))
    monkeypatch.setattr(prepare, "prepare_run", lambda *a, **k: calls.append("prepare_run"))
    config = small_config(tmp_path, tracking={"tracking_uri": "http://127.0.0.1:9", "experiment_name": "x"},
                          ray={"num_workers": 2, "storage_path": str(tmp_path / "storage")})
    with pytest.raises(TrackingUnavailable, match="unreachable"):
        launch.train(config, log=lambda *_: None)
    assert calls == []  # Ray was never started or connected to, no data or reference pass was prepared
    assert not (tmp_path / "storage").exists()  # nothing was prepared or trained


def test_a_workers_sigterm_swallowed_in_a_callback_exits_it_without_a_traceback(ray_session, tmp_path):
    """Ray's worker answers SIGTERM (the raylet ending a finished trial's actor) with `SystemExit` wherever the
    main thread is; inside a weakref callback Python swallowed it, printed "Exception ignored in …" and a
    traceback (forwarded to the driver's console: CI saw it end a sweep test) and the process carried on.
    With `exit_on_a_swallowed_exit` — installed in every worker process of the job as it starts (the job's
    ``worker_process_setup_hook``, as `launch.init_ray` sets it; CI saw a trial actor that never ran a trial print
    the traceback) — it exits, quietly."""
    import ray

    @ray.remote(num_cpus=0)
    class Worker:
        def pid(self) -> int:
            return os.getpid()

        def sigterm_inside_a_callback(self, stderr_path: str, hooked: bool) -> str:
            import sys
            import weakref

            # the job's setup hook ran as this process started; without it, Python's own hook
            assert getattr(sys.unraisablehook, "_alphadpo_exits", False), "the job's setup hook did not run"
            if not hooked:
                sys.unraisablehook = sys.__unraisablehook__
            os.dup2(os.open(stderr_path, os.O_WRONLY | os.O_CREAT), 2)

            class Thing:
                pass

            def callback(_ref):  # Ray's SIGTERM handler runs in here, during the sleep
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)

            thing = Thing()
            self.ref = weakref.ref(thing, callback)
            del thing
            return "carried on"

    bare, hooked = Worker.remote(), Worker.remote()
    ray.get([bare.pid.remote(), hooked.pid.remote()])
    # without the hook: the exit is lost, a traceback is printed (what the test shows can fail)
    assert ray.get(bare.sigterm_inside_a_callback.remote(str(tmp_path / "bare.err"), False)) == "carried on"
    bare_err = (tmp_path / "bare.err").read_text()
    assert "Exception ignored in" in bare_err and "SystemExit" in bare_err, bare_err
    ray.kill(bare)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(hooked.sigterm_inside_a_callback.remote(str(tmp_path / "hooked.err"), True), timeout=60)
    assert (tmp_path / "hooked.err").read_text() == ""


def test_a_workers_state_api_asks_its_own_ray_with_another_ray_on_the_machine(ray_session, tmp_path):
    """Ray Train's placement-group cleaner asks the state API (no address given) once a second whether the run's
    controller is alive and takes "not found" for dead. With another Ray instance on the machine Ray guesses which
    to ask: CI saw the cleaner ask another Ray's dashboard, remove the run's placement group and the raylet kill
    the run's worker. The job's setup hook (`worker_process.state_api_on_this_cluster`) points every worker
    process at its own cluster: an actor of this job, asked about itself, is found alive, and found dead once
    killed; without the hook, Ray cannot tell which instance is meant."""
    import ray
    from ray.util.state import get_actor
    from ray_cluster import LocalCluster

    @ray.remote(num_cpus=0)
    class Worker:
        def me(self) -> str:
            return ray.get_runtime_context().get_actor_id()

        def ask(self, actor_id: str, hooked: bool = True):
            if not hooked:
                os.environ.pop("RAY_ADDRESS")  # what the hook set as the process started
            try:
                found = get_actor(actor_id, timeout=20)
                return os.environ.get("RAY_ADDRESS"), found.state if found else "not found"
            except Exception as err:  # noqa: BLE001 - returned for the test to check
                return os.environ.get("RAY_ADDRESS"), repr(err)

    with LocalCluster(tmp_path / "other-ray", nodes=[{"ip": "127.0.0.1", "num_cpus": 0}]):
        asking, asked, bare = Worker.remote(), Worker.remote(), Worker.remote()
        asked_id = ray.get(asked.me.remote())
        address, state = ray.get(asking.ask.remote(asked_id))
        assert address == ray.get_runtime_context().gcs_address and state == "ALIVE", (address, state)
        ray.kill(asked)
        deadline = time.time() + 30
        while (state := ray.get(asking.ask.remote(asked_id))[1]) == "ALIVE" and time.time() < deadline:
            time.sleep(0.5)
        assert state == "DEAD", state
        # without the hook: two instances on the machine, and Ray cannot tell which one is meant
        address, state = ray.get(bare.ask.remote(ray.get(bare.me.remote()), False))
        assert address is None and "multiple active Ray instances" in state, state
