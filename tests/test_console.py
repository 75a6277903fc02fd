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
