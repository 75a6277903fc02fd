"""One training run: Ray Train's `TorchTrainer` over DeepSpeed workers running `recipe.train_loop_per_worker`.

`train(config)`:
  1. check the MLflow store (fail fast if unreachable), start or connect to Ray;
  2. prepare data and the reference cache (`prepare.prepare_run`);
  3. start or resume the MLflow run (keyed by storage path + run name);
  4. `TorchTrainer.fit()` with checkpoints kept per `CheckpointConfig` and `FailureConfig(max_failures)`;
     re-running the same command with the same storage path and run name resumes a stopped run;
  5. export the final policy (`save_pretrained`, safetensors) and write ``summary.json``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .config import ExperimentConfig
from .errors import AlphaDPOError

# The Train controller polls workers at this interval; reports block on it (default 2 s).
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


class TrainingFailed(AlphaDPOError):
    """The run stopped without finishing (diverged, or workers failed beyond max_failures)."""


def worker_env(config: ExperimentConfig) -> dict[str, str]:
    return {
        HEALTH_CHECK_ENV: str(config.ray.health_check_interval_s),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "RAY_TRAIN_ENABLE_STATE_TRACKING": os.environ.get("RAY_TRAIN_ENABLE_STATE_TRACKING", "0"),
    }


def init_ray(config: ExperimentConfig, address: str | None = None) -> None:
    """Connect to `address` / `ray.address` / RAY_ADDRESS, or start a local Ray instance."""
    import ray

    env = worker_env(config)
    os.environ.update({k: v for k, v in env.items() if k not in os.environ})
    if ray.is_initialized():
        return
    address = address or config.ray.address or os.environ.get("RAY_ADDRESS")
    # The dashboard serves the state API that Ray Train's placement-group cleaner polls.
    ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True, logging_level="warning")


def build_trainer(config: ExperimentConfig, plan, callbacks: list | None = None, run_name: str | None = None):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .recipe import train_loop_per_worker

    resources = dict(config.ray.resources_per_worker)
    if config.ray.use_gpu:
        resources.setdefault("GPU", 1)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "plan": plan.to_dict()},
        torch_config=TorchConfig(backend="nccl" if config.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.ray.num_workers, use_gpu=config.ray.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name or config.run_name,
            storage_path=config.storage_path(),
            checkpoint_config=CheckpointConfig(num_to_keep=config.ray.num_to_keep),
            failure_config=FailureConfig(max_failures=config.ray.max_failures),
            callbacks=callbacks or [],
            logging_config=LoggingConfig(log_level="WARNING"),  # progress lines come from ConsoleProgress
        ),
    )


def export_policy(checkpoint, destination: Path) -> Path | None:
    """Copy the final checkpoint's exported policy (safetensors + tokenizer) to `destination`."""
    import shutil

    from . import storage

    if checkpoint is None:
        return None
    source = storage.join(checkpoint.path, "policy")
    if "://" not in source and not Path(source).exists():
        return None
    if destination.exists():
        shutil.rmtree(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if "://" in source:
        storage.copy_dir(source, str(destination))
    else:
        shutil.copytree(source, destination)
    return destination


def train(config: ExperimentConfig, log=print) -> dict:
    """Run (or resume) one training run; returns the summary also written to ``summary.json``."""
    from . import tracking
    from .prepare import prepare_run

    start = time.time()
    uri = None
    if config.tracking.enabled:
        uri = tracking.resolve_tracking_uri(config.tracking.tracking_uri)
        tracking.check_tracking(uri)
    init_ray(config)
    plan = prepare_run(config, log=log)
    log(f"[run] {config.run_name}: {config.method.name} {config.method.resolved()} | {plan.train_pairs} train / "
        f"{plan.eval_pairs} held-out pairs | {plan.total_steps} steps × {config.training.total_batch_size} pairs | "
        f"{config.ray.num_workers} workers, ZeRO-{config.deepspeed.zero_stage}")
    run_id = None
    callbacks: list = [tracking.ConsoleProgress()]
    if uri:
        key = tracking.run_key(config.storage_path(), config.run_name)
        run_id, resumed = tracking.start_or_resume_run(
            uri, config.tracking.experiment_name, config.run_name, key, tracking.config_params(config.to_dict()),
            tags={"alphadpo.kind": "train", "method": config.method.name},
        )
        log(f"[mlflow] {'resumed' if resumed else 'started'} run {run_id} in {uri}")
        callbacks.append(tracking.MLflowMetricsCallback(uri, run_id))

    trainer = build_trainer(config, plan, callbacks)
    try:
        result = trainer.fit()
    except Exception as err:
        if run_id:
            tracking.finish_run(uri, run_id, "FAILED")
        raise TrainingFailed(f"training run {config.run_name} failed: {err}") from err

    out = result.return_value or {}
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    policy = export_policy(result.checkpoint, run_dir / "policy") if out.get("status") == "finished" else None
    summary = {
        "name": config.name,
        "run_name": config.run_name,
        "status": out.get("status", "unknown"),
        "message": out.get("message", ""),
        "method": config.method.name,
        "hyperparameters": config.method.resolved(),
        "steps": out.get("steps"),
        "total_steps": plan.total_steps,
        "final_eval": out.get("final_eval"),
        "best_eval": out.get("best_eval"),
        "reference_metrics": plan.reference_metrics,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "policy": str(policy) if policy else None,
        "storage_path": config.storage_path(),
        "mlflow_run_id": run_id,
        "tracking_uri": uri,
        "reference_cache": plan.reference_cache,
        "train_pairs": plan.train_pairs,
        "eval_pairs": plan.eval_pairs,
        "evals": out.get("evals", []),
        "history": out.get("history", []),
        "wall_seconds": round(time.time() - start, 1),
    }
    summary["summary_path"] = str(run_dir / "summary.json")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "config.json").write_text(json.dumps(tracking.mask_secrets(config.to_dict()), indent=2))
    if run_id:
        brief = {k: v for k, v in summary.items() if k not in ("history", "evals")}
        tracking.finish_run(uri, run_id, "FINISHED" if summary["status"] == "finished" else "FAILED", brief,
                            [run_dir / "config.json"])
    if summary["status"] != "finished":
        raise TrainingFailed(summary["message"] or f"run ended with status {summary['status']}")
    return summary
