"""A one-worker run trained in this process: the recipe without Ray, its checkpoints kept by Ray Train's own
checkpoint manager.

Why: a single worker has nothing to schedule or synchronise, yet starting Ray, the Train controller, a
worker actor and a reference-scoring task costs ~25 s of a short run's ~35 s fixed cost on a CPU node
(issue 11's trace; `benchmarks/bench_fixed_cost.py` prints today's figures). Here `recipe.run_recipe` runs
in the driver with `InProcessSession`, which reports to the same callbacks a `TorchTrainer` calls
(console progress, MLflow) and persists checkpoints exactly as Ray Train does — the same
``{storage_path}/{run_name}/checkpoint_<time>`` directories, the same
``checkpoint_manager_snapshot.json`` written by Ray's `CheckpointManager`, ``ray.num_to_keep`` applied by
it — so a run started here resumes under Ray Train (with more workers, or on a cluster) and the other way
round. A failure retries the recipe from its latest checkpoint up to ``ray.max_failures`` times, as Ray
Train's worker-group restart would. There is no preemption notice without a cluster (runs with
``ray.address``, or RAY_ADDRESS, always use Ray Train).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass
from typing import Any

from .. import compat
from ..config.experiment import ExperimentConfig
from ..errors import StorageFull
from ..services.storage import uri_of
from .engine import quiet_logs
from .recipe import run_recipe


def runs_in_process(config: ExperimentConfig) -> bool:
    """A run trains in this process when it has one worker, no cluster to join, and
    ``ray.in_process_single_worker`` is on (the default)."""
    ray = config.ray
    return (ray.num_workers == 1 and ray.in_process_single_worker and not ray.address
            and not os.environ.get("RAY_ADDRESS"))


@dataclass
class InProcessResult:
    """What `launch` reads from a fit: the recipe's return value and the latest registered checkpoint
    (a `ray.train.Checkpoint`: ``.path`` on ``.filesystem``), like `ray.train.Result`."""

    return_value: dict[str, Any] | None
    checkpoint: Any
    error: BaseException | None = None


class InProcessSession:
    """The recipe's session (`recipe.TrainSession`'s interface) for a worker that is this process."""

    rank, world = 0, 1

    def __init__(self, config: ExperimentConfig, callbacks: list):
        self.callbacks = callbacks
        self.storage, self.manager = compat.train_checkpoint_manager(config.storage_path(), config.run_name,
                                                                     config.ray.num_to_keep)

    def latest_checkpoint(self):
        return compat.latest_train_checkpoint(self.manager)

    def get_checkpoint(self):
        return self.latest_checkpoint()

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        """Persist the checkpoint (copied into run storage, then registered: the snapshot is written last,
        so a copy cut short is never resumed from), then call the callbacks, as Ray Train's controller does."""
        checkpoint = None
        if checkpoint_dir:
            name, destination, fs = compat.next_train_checkpoint_path(self.storage)
            try:
                checkpoint = compat.persist_train_checkpoint(self.storage, checkpoint_dir, name)
                compat.register_train_checkpoint(self.manager, checkpoint, metrics)
            except OSError as err:  # nothing registered it: what the save left must not look like a checkpoint
                with contextlib.suppress(OSError):
                    fs.delete_dir(destination)
                if err.errno != errno.ENOSPC:
                    raise
                raise StorageFull(f"no space left on device saving the checkpoint of step {metrics.get('step')} to "
                                  f"{uri_of(destination, fs)} (ray.storage_path); that incomplete checkpoint was "
                                  "removed, the earlier ones are kept. Free space, lower ray.num_to_keep, or use a "
                                  "larger disk") from err
        for callback in self.callbacks:
            callback.after_report(None, [metrics], checkpoint)

    def preemption_notice(self):
        """Always None: preemption notices come from a cluster's nodes; in-process runs have none."""
        return None


def fit_in_process(config: ExperimentConfig, plan, callbacks: list, log=print) -> InProcessResult:
    """Run the recipe here; on an error, retry from the latest checkpoint up to ``ray.max_failures`` times
    (-1: without limit), then return the error with the latest checkpoint."""
    quiet_logs()
    session = InProcessSession(config, callbacks)
    loop_config = {"config": config.to_dict(), "plan": plan.to_dict()}
    failures = 0
    while True:
        try:
            out = run_recipe(loop_config, session)
            return InProcessResult(out, session.latest_checkpoint())
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:  # noqa: BLE001 - counted against max_failures like a worker failure
            failures += 1
            for callback in callbacks:  # as Ray Train's controller does: `ConsoleProgress` says what happens next
                getattr(callback, "after_exception", lambda *_: None)(None, {0: err})
            limit = config.ray.max_failures
            if limit != -1 and failures > limit:
                return InProcessResult(None, session.latest_checkpoint(), err)
            time.sleep(1.0)
            session = InProcessSession(config, callbacks)  # re-reads the registered checkpoints
