"""One sweep trial = one training run of `alphadpo_ray.training.recipe` with the trial's hyperparameters.

Two paths, same recipe, same checkpoints, same metrics:

* multi-worker trials drive a nested `TorchTrainer` (its own workers and DeepSpeed engines); its
  reports reach Tune through `TuneReportCallback`. Its run name is ``{sweep}_{trial_id}`` — stable
  across `Tuner.restore`, so an interrupted trial resumes from its own Train checkpoint;
* single-worker trials (``sweep.direct_single_worker``) run the recipe in the Tune trial itself,
  reporting and checkpointing through `ray.tune`: no controller, no worker actor, and with
  ``reuse_actors`` the imports and the (single-process) gloo group are paid once per actor.

A node lost under a trial never makes a new trial. Multi-worker trials get Ray's preemption notice: the
recipe writes a just-in-time checkpoint and the nested `TorchTrainer` restarts its workers on other
nodes inside the same Tune trial — at the reclaim deadline, counted against
``ray.max_preemption_failures``; a node that dies before its deadline or without notice counts against
``ray.max_failures``. A direct single-worker trial has no worker group to be notified through: its node's loss
fails the trial and Tune restarts it (``sweep.max_failures``) from its latest checkpoint, with the
same trial id — so the same Optuna trial and MLflow child run, which logs each step once.

A diverged trial (non-finite loss) raises `TrialDiverged`, so Tune records it as failed with its
reason and the searcher is told it failed (see `SafeOptunaSearch`).
"""

from __future__ import annotations

from ..config.experiment import ExperimentConfig, config_from_dict
from ..errors import AlphaDPOError
from ..training import worker_process
from ..training.engine import quiet_logs
from ..training.launch import build_trainer
from ..training.plan import PreparedRun
from ..training.recipe import TuneSession, run_recipe

TRAINING_KEYS = ("learning_rate", "seed")  # trial parameters that set `training.*`, not the method


class TrialDiverged(AlphaDPOError, RuntimeError):
    """The trial's loss became NaN/inf; it stopped at once."""


def trial_config(base: dict, method: str, params: dict, run_name: str) -> ExperimentConfig:
    """The base config with the trial's method, hyperparameters, learning rate and training seed applied."""
    data = {**base, "name": run_name}
    hparams = {k: v for k, v in params.items() if k not in TRAINING_KEYS}
    data["method"] = {"name": method, **hparams}
    training = {**base.get("training", {})}
    if "learning_rate" in params:
        training["learning_rate"] = float(params["learning_rate"])
    if "seed" in params:
        training["seed"] = int(params["seed"])
    data["training"] = training
    data["tracking"] = {**base.get("tracking", {}), "enabled": False}  # the sweep driver logs to MLflow
    return config_from_dict(data, f"trial {run_name}")


def run_trial(params: dict, *, base: dict, method: str, plan: dict, sweep_name: str, trainers_path: str) -> None:
    """The Tune trainable (function API)."""
    import ray.tune

    worker_process.setup()  # for a Ray someone else started (the job's setup hook does it otherwise)
    context = ray.tune.get_context()
    run_name = f"{sweep_name}_{context.get_trial_id()}"
    config = trial_config(base, method, params, run_name)
    loop_config = {"config": config.to_dict(), "plan": plan}
    if config.ray.num_workers == 1 and (config.sweep is None or config.sweep.direct_single_worker):
        quiet_logs()
        out = run_recipe(loop_config, TuneSession())
    else:
        from ray.tune.integration.ray_train import TuneReportCallback

        config = config.model_copy(update={"ray": config.ray.model_copy(update={"storage_path": trainers_path})})
        trainer = build_trainer(config, PreparedRun(**plan), callbacks=[TuneReportCallback()], run_name=run_name)
        out = trainer.fit().return_value or {}
    if out.get("status") != "finished":
        raise TrialDiverged(out.get("message") or f"trial {run_name} ended with status {out.get('status')}")
