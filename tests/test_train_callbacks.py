"""Unit tests of `services/train_callbacks.py`'s `ConsoleProgress`: the progress line of a report and the
``[failure]`` line for a sequence of reports and worker failures, the failures being the real Ray types a
Train controller hands `after_exception` (`ActorDiedError` built from Ray's own death context, wrapped in
the health-check error). No Ray is started."""

from __future__ import annotations

import pytest
from ray.core.generated.common_pb2 import ActorDiedErrorContext, NodeDeathInfo
from ray.exceptions import ActorDiedError

from alphadpo_ray.services.train_callbacks import WORKER_NODE_KEY, ConsoleProgress


def _died(ip: str = "", preempted: bool = False) -> Exception:
    """A dead Train worker as Ray Train reports it: a health-check failure wrapping the actor's death."""
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    death = NodeDeathInfo(reason=NodeDeathInfo.AUTOSCALER_DRAIN_PREEMPTED) if preempted else None
    context = ActorDiedErrorContext(class_name="RayTrainWorker", actor_id=b"\x01" * 16, node_ip_address=ip,
                                    error_message="the node died", node_death_info=death)
    return WorkerHealthCheckFailedError("worker gone", failure=ActorDiedError(context))


def _progress(**kwargs) -> tuple[ConsoleProgress, list[str]]:
    lines: list[str] = []
    return ConsoleProgress(log=lines.append, **kwargs), lines


def test_progress_line_of_a_full_report_with_checkpoint(capsys):
    progress = ConsoleProgress()
    metrics = {"step": 5, "total_steps": 10, "train/loss": 0.693147, "train/rewards/margin": 0.12,
               "eval/step": 4, "eval/accuracy": 0.75, "eval/accuracy_logratio": 0.625, "eval/kl": 0.0134,
               "eval/generation_accuracy": 0.5, "train/tokens_per_second_per_worker": 123.4}
    progress.after_report(None, [metrics, {"step": 5}], checkpoint=object())
    assert capsys.readouterr().out == ("step 5/10  loss 0.6931  margin +0.120  | eval@4 acc 0.750 acc_logratio 0.625 "
                                       "kl 0.013 gen 0.50  | 123 tok/s/worker  [checkpoint]\n")
    assert (progress.step, progress.checkpoint_step) == (5, 5)


def test_progress_line_of_a_minimal_report_and_silence_without_a_loss(capsys):
    progress = ConsoleProgress()
    progress.after_report(None, [{"step": 1, "total_steps": 4, "train/loss": 0.5}], None)
    assert capsys.readouterr().out == "step 1/4  loss 0.5000  margin +nan  | 0 tok/s/worker\n"
    progress.after_report(None, [{"step": 2}], None)  # an evaluation-only report: its step counts, no line
    progress.after_report(None, [], None)
    assert capsys.readouterr().out == "" and (progress.step, progress.checkpoint_step) == (2, None)


def test_failure_of_the_training_function_before_any_checkpoint():
    progress, lines = _progress()
    progress.after_report(None, [{"step": 3}], None)
    progress.after_exception(None, {0: RuntimeError("boom\nsecond line")})
    assert lines == ["[failure] worker 0 failed at step 3 (RuntimeError: boom); no checkpoint yet: starting over, "
                     "3 steps lost"]


def test_lost_worker_names_its_node_from_the_reports_and_the_checkpoint_it_resumes_from():
    progress, lines = _progress()
    nodes = [{"step": 8, WORKER_NODE_KEY: "10.0.0.2"}, {"step": 8, WORKER_NODE_KEY: "10.0.0.3"}]
    progress.after_report(None, nodes, checkpoint=object())
    progress.after_report(None, [{"step": 11}, {"step": 11}], None)
    progress.after_exception(None, {1: _died()})
    assert lines == ["[failure] node 10.0.0.3 lost at step 11; resuming from step 8 (3 steps lost)"]
    assert progress.failures == {"ray.max_failures": 1, "ray.max_preemption_failures": 0}


def test_lost_nodes_read_from_the_actor_errors_when_no_report_named_them():
    progress, lines = _progress()
    progress.after_report(None, [{"step": 1}], None)
    progress.after_exception(None, {1: _died("10.0.0.9"), 0: _died("10.0.0.7")})
    assert lines == ["[failure] nodes 10.0.0.7, 10.0.0.9 lost at step 1; no checkpoint yet: starting over, "
                     "1 step lost"]


def test_one_line_per_failure_and_the_budget_says_when_the_run_stops(capsys):
    """In the Train controller (no ``log``: printed), a poll repeating the failure already said is skipped."""
    progress = ConsoleProgress(max_failures=1)
    progress.after_report(None, [{"step": 2}], checkpoint=object())
    progress.after_report(None, [{"step": 3}], None)
    first = {0: ValueError("first")}
    progress.after_exception(None, first)
    progress.after_exception(None, first)  # the same failure, polled again
    progress.after_report(None, [{"step": 5}], None)
    progress.after_exception(None, {0: ValueError("second")})
    assert capsys.readouterr().out.splitlines() == [
        "[failure] worker 0 failed at step 3 (ValueError: first); resuming from step 2 (1 step lost)",
        "[failure] worker 0 failed at step 5 (ValueError: second); no failures left (ray.max_failures 1): the run stops"]


def test_preemptions_count_against_their_own_budget():
    progress, lines = _progress(max_failures=0, max_preemption_failures=1)
    progress.after_report(None, [{"step": 2}], checkpoint=object())
    progress.after_report(None, [{"step": 4}], None)
    progress.after_exception(None, {0: _died("10.0.0.5", preempted=True)})
    progress.after_report(None, [{"step": 6}], None)
    progress.after_exception(None, {0: _died("10.0.0.6", preempted=True)})
    assert lines == ["[failure] node 10.0.0.5 lost at step 4; resuming from step 2 (2 steps lost)",
                     "[failure] node 10.0.0.6 lost at step 6; no failures left (ray.max_preemption_failures 1): "
                     "the run stops"]
    assert progress.failures == {"ray.max_failures": 0, "ray.max_preemption_failures": 2}


def test_a_resumed_start_without_a_new_checkpoint_resumes_from_its_own():
    progress, lines = _progress(resumed=True)
    progress.after_report(None, [{"step": 7}], None)
    progress.after_exception(None, {0: RuntimeError("x")})
    assert lines == ["[failure] worker 0 failed at step 7 (RuntimeError: x); resuming from the checkpoint this "
                     "start resumed from"]


def test_several_workers_failing_show_the_first_error_cut_at_160_characters(capsys):
    progress = ConsoleProgress()  # no log: printed
    long = "y" * 200
    progress.after_exception(None, {1: RuntimeError("other"), 0: RuntimeError(long)})
    first = f"RuntimeError: {long}"[:160]
    assert capsys.readouterr().out == (f"[failure] workers 0, 1 failed at step 0 ({first}…); no checkpoint yet: "
                                       "starting over, 0 steps lost\n")


@pytest.mark.parametrize("budget", [-1, 5])
def test_unlimited_or_unspent_budget_never_stops(budget):
    progress, lines = _progress(max_failures=budget)
    for step in range(1, 4):
        progress.after_report(None, [{"step": step}], None)
        progress.after_exception(None, {0: OSError("disk")})
    assert len(lines) == 3 and not any("no failures left" in line for line in lines)


def test_a_failure_repeated_after_the_restart_before_any_report_is_said_and_counted():
    # what `in_process.fit_in_process` does with ray.max_failures 1 and a recipe failing before its first report:
    # one after_exception per failure, the second one ending the run
    progress, lines = _progress(max_failures=1)
    progress.after_exception(None, {0: RuntimeError("cannot load the model")})
    progress.after_exception(None, {0: RuntimeError("cannot load the model")})
    assert progress.failures["ray.max_failures"] == 2
    assert lines[-1] == ("[failure] worker 0 failed at step 0 (RuntimeError: cannot load the model); no failures left "
                         "(ray.max_failures 1): the run stops")


def test_mlflow_callback_buffers_each_step_once_and_says_the_outage_once(tmp_path, capsys):
    """Reports go to the run's pending file first (the store at 127.0.0.1:9 does not answer, so they stay):
    steps already logged and replayed steps are skipped, a carried evaluation is logged at its own step,
    only finite numbers are metrics; the outage is said once."""
    import pickle
    import threading
    import time

    from alphadpo_ray.services.tracking import PendingMetrics
    from alphadpo_ray.services.train_callbacks import MLflowMetricsCallback

    uri, path = "http://127.0.0.1:9", tmp_path / "pending.jsonl"
    callback = MLflowMetricsCallback(uri, "run-1", pending_path=path, logged_through=2)
    callback.after_report(None, [], None)
    callback.after_report(None, [{"step": 2, "train/loss": 1.0}], None)  # already in the run's history
    assert not path.exists() and callback._sender is None
    report = {"step": 3, "total_steps": 10, "train/loss": 0.5, "eval/step": 3, "eval/accuracy": 0.75,
              "flag": True, WORKER_NODE_KEY: "10.0.0.2", "bad": float("nan")}
    callback.after_report(None, [report, {"step": 3, "train/loss": 9.0}], None)  # rank 0's metrics only
    callback.after_report(None, [report], None)  # replayed after a worker-group restart
    callback.after_report(None, [{"step": 5, "train/loss": 0.25, "eval/step": 4, "eval/accuracy": 0.8}], None)
    events = PendingMetrics(uri, path).events()
    assert [(e["run_id"], e["step"], e["metrics"]) for e in events] == [
        ("run-1", 3, {"train/loss": 0.5, "eval/step": 3.0, "eval/accuracy": 0.75}),
        ("run-1", 4, {"eval/step": 4.0, "eval/accuracy": 0.8}),
        ("run-1", 5, {"train/loss": 0.25})]
    assert all(isinstance(e["ts"], int) for e in events)

    copy = pickle.loads(pickle.dumps(callback))  # what Ray ships to the Train controller: no thread
    assert copy._sender is None and copy.last_step == 5 and copy.pending_path == str(path)

    deadline = time.monotonic() + 60
    while not callback._sender.down and time.monotonic() < deadline:
        threading.Event().wait(0.05)
    assert callback._sender.down
    out = capsys.readouterr().out
    assert out.count("[mlflow]") == 1 and (
        f"[mlflow] tracking store unavailable (http://127.0.0.1:9 does not answer); training goes on, metrics are "
        f"kept in {path} and sent when it is back") in out
    assert len(PendingMetrics(uri, path).events()) == 3  # nothing lost


def test_controller_side_callback_only_appends_and_never_imports_mlflow(tmp_path):
    """``send=False`` (the driver sends, `launch._fit`): in a fresh process, as in the Train controller, a report
    is appended to the pending file, no sender thread starts and MLflow is never imported."""
    import subprocess
    import sys

    script = f"""
import sys, threading
from alphadpo_ray.services.train_callbacks import MLflowMetricsCallback
callback = MLflowMetricsCallback("sqlite:///{tmp_path}/mlflow.db", "run-1", pending_path="{tmp_path}/p.jsonl", send=False)
callback.after_report(None, [{{"step": 1, "train/loss": 0.5}}], None)
print("mlflow" in sys.modules, threading.active_count(), callback._sender)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "1", "None"], out.stdout
    from alphadpo_ray.services.tracking import PendingMetrics

    assert [(e["step"], e["metrics"]) for e in PendingMetrics("", tmp_path / "p.jsonl").events()] == [
        (1, {"train/loss": 0.5})]


def test_driver_sender_sends_what_another_process_appends_and_stops(tmp_path):
    """The driver's `MetricsSender` polls the file the Train controller appends to (no wake-up from it): the
    report reaches the store once, and `stop` ends the thread."""
    import time

    from mlflow.tracking import MlflowClient

    from alphadpo_ray.services.tracking import MetricsSender, PendingMetrics

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    path = tmp_path / "pending.jsonl"
    sender = MetricsSender(PendingMetrics(uri, path), every_s=0.1)
    PendingMetrics(uri, path).add({"run_id": run_id, "step": 1, "ts": 1, "metrics": {"train/loss": 0.5}})
    deadline = time.monotonic() + 60
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not path.exists()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(1, 0.5)]
    sender.stop(timeout=30)
    assert not sender.thread.is_alive()
