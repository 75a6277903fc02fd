"""The driver console's filter of worker output (`console._WorkerLineFilter`), fed the lines Ray forwarded
from a real run beside another Ray instance (Ray 2.60's PlacementGroupCleaner trace, shortened)."""

from __future__ import annotations

from alphadpo_ray.console import _WorkerLineFilter

CLEANER_TRACE = """Exception in thread PlacementGroupCleanerMonitor:
Traceback (most recent call last):
  File "/usr/lib/python3.11/threading.py", line 1045, in _bootstrap_inner
    self.run()
  File ".../ray/train/v2/_internal/execution/controller/placement_group_cleaner.py", line 80, in _monitor_loop
    alive = is_actor_alive(
            ^^^^^^^^^^^^^^^
  File ".../ray/_private/services.py", line 759, in canonicalize_bootstrap_address_or_die
    raise ConnectionError(
ConnectionError: Found multiple active Ray instances: {'10.0.0.2:46379', '10.0.0.2:46217'}. Please specify \
the one to connect to by setting the `--address` flag or `RAY_ADDRESS` environment variable.""".splitlines()


def test_a_benign_thread_death_is_one_line_and_other_output_is_kept():
    said: list[str] = []
    keep = _WorkerLineFilter(say=lambda line, flush=False: said.append(line))
    step = "step 1/4  loss 1.1156  margin +0.036"
    # the cleaner's trace (pid 7) arrives in two batches with a controller line (pid 5) between them
    kept = [line for line in CLEANER_TRACE[:4] if keep(line, 7)]
    kept += [line for line in [step] if keep(line, 5)]
    kept += [line for line in CLEANER_TRACE[4:] if keep(line, 7)]
    kept += [line for line in ["Exception in thread Other:", "Traceback (most recent call last):"] if keep(line, 7)]
    assert kept == [step, "Exception in thread Other:", "Traceback (most recent call last):"]
    assert len(said) == 1 and said[0].startswith("[ray] Ray Train's placement-group cleaner stopped (it found several "
                                                 "Ray instances on this machine")
    assert "worker-*-7.err" in said[0]


def test_a_trace_line_forwarded_in_two_pieces_stays_in_the_trace():
    """Ray's log monitor can read a worker's .err file while a line is half written and forward the rest as a
    line of its own (seen in CI: a caret line's second half, ``^^^^^^^^``, printed as the cleaner's reason and
    its exception line leaking): the pieces of frame and caret lines are dropped with the trace."""
    said: list[str] = []
    keep = _WorkerLineFilter(say=lambda line, flush=False: said.append(line))
    split = []
    for line in CLEANER_TRACE:
        if line.strip().startswith(("^", "File")):
            cut = len(line) // 2
            split += [line[:cut], line[cut:]]  # the second piece starts mid-line, not indented
        else:
            split.append(line)
    assert [line for line in split + ["step 2/4  loss 1.0"] if keep(line, 7)] == ["step 2/4  loss 1.0"]
    assert len(said) == 1 and "it found several Ray instances on this machine" in said[0], said


# A worker node lost mid-step (tests/test_preemption.py's run, shortened): the surviving worker's trace, the
# controller's, the GCS's and the raylet's lines, then the run going on.
NODE_LOSS = [
    (9, "Error in training function:"),
    (9, "Traceback (most recent call last):"),
    (9, '  File "/work/alphadpo_ray/distributed.py", line 102, in all_reduce'),
    (9, "    dist.all_reduce(work, op=_OPS[op])"),
    (9, "RuntimeError: [../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:26803. GLHF!"),
    (9, ""),
    (5, "Graceful shutdown of backend failed. This is expected if one of the workers has crashed."),
    (5, "Traceback (most recent call last):"),
    (5, '  File ".../ray/_private/worker.py", line 1055, in get_objects'),
    (5, "    raise value"),
    (5, "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task."),
    (5, "\tclass_name: "),
    (5, "\tactor_id: aa60cf973f6ce474a6027a8e02000000"),
    (5, ""),
    ("gcs_server", "[2026-12-06 19:58:14,561 E 13613 13613] (gcs_server) gcs_placement_group_scheduler.cc:273: "
                   "Failed to remove 1 bundle(s) for placement group 6b13e6 at node d11030"),
    ("raylet", "The node with node id: d11030 and address: 127.0.0.2 and node name: 127.0.0.2 has been marked dead "
               "because the detector has missed too many heartbeats from it."),
    (12, "Restored on 127.0.0.3 from checkpoint: Checkpoint(filesystem=local, path=/s/0a1_00002/checkpoint_000001)"),
    (5, "[failure] node 127.0.0.2 lost at step 4; resuming from step 4 (0 steps lost)"),
    (11, "[resume] continuing from step 4 of 16, after the preemption noticed at step 4"),
    (5, "step 5/16  loss 0.8521  margin -0.272"),
]


def test_a_handled_node_loss_leaves_the_projects_own_lines():
    said: list[str] = []
    keep = _WorkerLineFilter(say=lambda line, flush=False: said.append(line))
    assert [line for pid, line in NODE_LOSS if keep(line, pid)] == [line for _, line in NODE_LOSS[-3:]]
    assert not said


def test_a_known_transient_trace_is_one_line_once_per_process():
    """Ray Train's controller on a busy machine: its resource request times out, with a trace, again and again."""
    said: list[str] = []
    keep = _WorkerLineFilter(say=lambda line, flush=False: said.append(line))
    trace = ["Failed to send resource request for train-e573b48a. If this only happens transiently during network "
             "partition or CPU being overloaded, it's safe to ignore this error. If this error persists, file a GitHub "
             "issue.", "Traceback (most recent call last):", '  File ".../autoscaling_coordinator_client.py", line 58',
             "    ray.get(", "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready."]
    kept = [line for line in trace + trace + ["step 1/30  loss 0.69"] if keep(line, 3)]
    assert kept == ["step 1/30  loss 0.69"]
    assert said == ["[ray] Ray Train's controller timed out sending a resource request (ray.exceptions.GetTimeoutError: "
                    "Get timed out: some object(s) not ready.; a busy machine or network): it retries, training goes on; "
                    "the trace is in Ray's session logs, worker-*-3.err"]
