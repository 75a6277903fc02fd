"""The preference-optimisation recipe: what every Ray Train worker runs, top to bottom.

    setup      process group (Ray Train made it), seeds, tokenizer, this worker's data
    engine     policy under DeepSpeed (ZeRO 0-3), AdamW, warmup + decay schedule
    resume     from `ray.train.get_checkpoint()`: engine, schedule, step, AlphaDPO statistics, RNG
    loop       per optimizer step: the global batch of `total_batch_size` pairs is split into
               workers × accumulation micro-batches; chunked log-probs of the policy, cached
               reference log-probs, the method's loss, DeepSpeed backward/step
    report     metrics reduced over all workers, `ray.train.report` every `logging_steps`
    evaluate   every `eval_steps`: held-out metrics with the reference loaded for evaluation only
    checkpoint every `save_steps` and at the end (the end also exports the policy)

The data order is a function of (seed, step) alone, and the loss's running statistics are
checkpointed, so a resumed run — or one with a different number of workers and the same
`total_batch_size` — follows the same trajectory.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

STATE_FILE = "trainer_state.json"
DS_TAG = "state"


# ------------------------------------------------------------------------------------------------
# Small pieces


def _reduce_mean(values: dict[str, float], world: int) -> dict[str, float]:
    """Mean of each value over all workers (one all-reduce)."""
    if world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, (t / world).tolist()))


def _any_worker(flag: bool, world: int) -> bool:
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def global_batch_rows(step: int, n_rows: int, total_batch: int, seed: int) -> np.ndarray:
    """Row positions of optimizer step `step`: a fresh seeded permutation per epoch, drop-last."""
    per_epoch = n_rows // total_batch
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_rows)
    return order[offset * total_batch : (offset + 1) * total_batch]


def micro_batches(rows: np.ndarray, rank: int, world: int, per_device: int, accumulation: int) -> list[np.ndarray]:
    """This worker's micro-batches of a global batch: micro-step m of rank r takes slice (m·world + r)."""
    return [rows[(m * world + rank) * per_device : (m * world + rank + 1) * per_device] for m in range(accumulation)]


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# The worker


class TrainSession:
    """Where the recipe reports to: a Ray Train worker (`ray.train.*`)."""

    def __init__(self):
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()

    def get_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


class TuneSession:
    """The same interface inside a Ray Tune trial (`ray.tune.*`): the single-worker direct path."""

    rank, world = 0, 1

    def get_checkpoint(self):
        import ray.tune

        return ray.tune.get_checkpoint()

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        import ray.tune

        checkpoint = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=checkpoint)


def train_loop_per_worker(loop_config: dict) -> dict:
    """Entry point of each Ray Train worker."""
    return run_recipe(loop_config, TrainSession())


def run_recipe(loop_config: dict, session) -> dict:
    import deepspeed

    from .config import ExperimentConfig
    from .data import collate_pairs
    from .engine import build_policy_engine, consolidated_state_dict, load_reference, quiet_logs
    from .logprobs import sequence_logps
    from .losses import build_loss
    from .metrics import evaluate_preferences, generation_accuracy
    from .sweep.config import objectives
    from .models import load_tokenizer
    from .prepare import PreparedRun
    from .storage import read_table
    from .task import check

    # --- setup -------------------------------------------------------------------------------
    recipe_start = time.time()
    config = ExperimentConfig.model_validate(loop_config["config"])
    plan = PreparedRun(**loop_config["plan"])
    t = config.training
    quiet_logs()
    rank, world = session.rank, session.world
    torch.set_num_threads(max(1, int(config.ray.resources_per_worker.get("CPU", 1))))
    if world > 1 or not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if config.ray.use_gpu else "gloo", verbose=False)
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if config.ray.use_gpu else torch.device("cpu")
    _seed_all(t.seed)

    tokenizer = load_tokenizer(plan.tokenizer_path)
    pad_id = tokenizer.pad_token_id
    train_rows = read_table(plan.train_uri).to_pylist()
    eval_rows = read_table(plan.eval_uri).to_pylist()[rank::world]  # this worker's held-out shard
    accumulation = config.gradient_accumulation_steps
    total_steps = plan.total_steps

    # --- engine ------------------------------------------------------------------------------
    engine, _zero3_handle = build_policy_engine(config, plan.policy_path, total_steps)
    loss_fn = build_loss(config.method.name, **config.method.hyperparameters)

    # --- resume ------------------------------------------------------------------------------
    state = {"step": 0, "history": [], "evals": [], "best_eval": None, "loss_state": loss_fn.state_dict()}
    checkpoint = session.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            engine.load_checkpoint(ckpt_dir, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
            state = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
            rng_file = Path(ckpt_dir) / f"rng_rank{rank}.pt"
            if rng_file.exists():
                _set_rng_state(torch.load(rng_file, weights_only=False))
        loss_fn.load_state_dict(state["loss_state"])
        if rank == 0:
            print(f"[resume] continuing from step {state['step']} of {total_steps}", flush=True)

    def evaluate(step: int) -> dict:
        # The reference is loaded for evaluation only (every method needs it here: KL and the
        # method-independent accuracy_logratio), and released again before training continues.
        reference, handle = load_reference(config, plan.reference_path, device)
        batches = [
            collate_pairs(eval_rows[i : i + t.per_device_eval_batch_size], pad_id)
            for i in range(0, len(eval_rows), t.per_device_eval_batch_size)
        ]
        metrics = evaluate_preferences(engine.module, loss_fn, batches, reference=reference,
                                       chunk_size=t.logprob_chunk_size)
        del reference, handle
        if plan.builtin_task and t.generation_eval_samples:
            per_worker = math.ceil(t.generation_eval_samples / world)
            prompts = [(r["prompt_ids"], r["prompt"]) for r in eval_rows[:per_worker]]
            metrics.update(generation_accuracy(engine.module, tokenizer, prompts, check,
                                               max_new_tokens=t.max_new_tokens,
                                               batch_size=t.per_device_eval_batch_size))
        metrics = {f"eval/{k}": v for k, v in metrics.items()}
        metrics["eval/step"] = step
        metrics.update(objectives(metrics, config.sweep))
        return metrics

    def save_checkpoint(metrics: dict, final: bool) -> None:
        tmp = tempfile.mkdtemp(prefix=f"alphadpo-ckpt-r{rank}-")
        try:
            engine.save_checkpoint(tmp, tag=DS_TAG)
            torch.save(_rng_state(), Path(tmp) / f"rng_rank{rank}.pt")
            weights = consolidated_state_dict(engine, config) if final else None
            if rank == 0:
                (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
                if final:
                    engine.module.save_pretrained(Path(tmp) / "policy", state_dict=weights, safe_serialization=True)
                    tokenizer.save_pretrained(Path(tmp) / "policy")
            session.report(metrics, checkpoint_dir=tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # --- loop --------------------------------------------------------------------------------
    setup_seconds = time.time() - recipe_start  # data, engine, resume: the per-run fixed cost
    last_eval: dict = state["evals"][-1] if state["evals"] else {}
    if state["step"] == 0 and t.eval_steps and not state["evals"]:
        last_eval = evaluate(0)
        state["evals"].append(last_eval)
    window_seconds, window_tokens, window_steps = 0.0, 0, 0
    status, message = "finished", ""
    step = state["step"]
    while step < total_steps:
        step_start = time.time()
        rows = global_batch_rows(step, len(train_rows), t.total_batch_size, t.seed)
        sums: dict[str, float] = {}
        diverged = False
        for micro in micro_batches(rows, rank, world, t.per_device_train_batch_size, accumulation):
            batch = collate_pairs([train_rows[i] for i in micro], pad_id)
            ids = batch["input_ids"].to(device)
            out = sequence_logps(engine.module, ids, batch["attention_mask"].to(device),
                                 batch["response_mask"].to(device), chunk_size=t.logprob_chunk_size)
            n = ids.shape[0] // 2
            ref_c = batch.get("ref_chosen_logps")
            ref_j = batch.get("ref_rejected_logps")
            result = loss_fn(out.logps[:n], out.logps[n:],
                             None if ref_c is None else ref_c.to(device), None if ref_j is None else ref_j.to(device),
                             out.lengths[:n], out.lengths[n:])
            if _any_worker(not bool(torch.isfinite(result.loss)), world):
                diverged = True
                break
            engine.backward(result.loss)
            engine.step()
            window_tokens += int(batch["attention_mask"].sum())
            part = {
                "loss": result.loss.item(),
                "rewards/chosen": result.chosen_rewards.mean().item(),
                "rewards/rejected": result.rejected_rewards.mean().item(),
                "rewards/margin": (result.chosen_rewards - result.rejected_rewards).mean().item(),
                "rewards/accuracy": (result.chosen_rewards > result.rejected_rewards).float().mean().item(),
                "logps/chosen": (out.logps[:n] / out.lengths[:n]).mean().item(),
                "logps/rejected": (out.logps[n:] / out.lengths[n:]).mean().item(),
                **{f"loss/{k}": v for k, v in result.metrics.items()},
            }
            for k, v in part.items():
                sums[k] = sums.get(k, 0.0) + v / accumulation
        if diverged:
            status = "diverged"
            message = (f"non-finite loss at step {step + 1} (method {config.method.name}, "
                       f"learning_rate {t.learning_rate}); training stopped instead of continuing on garbage")
            if rank == 0:
                print(f"[error] {message}", flush=True)
            break  # every rank stops here together; nothing more is reported
        step += 1
        window_steps += 1
        window_seconds += time.time() - step_start
        train_metrics = {f"train/{k}": v for k, v in _reduce_mean(sums, world).items()}
        grad_norm = engine.get_global_grad_norm()
        train_metrics["train/grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        train_metrics["train/learning_rate"] = float(engine.get_lr()[0])
        train_metrics["step"] = step
        train_metrics["epoch"] = step * t.total_batch_size / len(train_rows)
        state["step"], state["loss_state"] = step, loss_fn.state_dict()
        state["history"].append({k: v for k, v in train_metrics.items() if k.startswith("train/") or k == "step"})

        is_last = step == total_steps
        if step % t.eval_steps == 0 or is_last:
            last_eval = evaluate(step)
            state["evals"].append(last_eval)
            key = "eval/accuracy"
            if state["best_eval"] is None or last_eval.get(key, -1) > state["best_eval"].get(key, -1):
                state["best_eval"] = last_eval
        if step % t.logging_steps == 0 or is_last or step % t.eval_steps == 0 or step % t.save_steps == 0:
            elapsed = max(window_seconds, 1e-9)
            speed = _reduce_mean({"train/tokens_per_second_per_worker": window_tokens / elapsed,
                                  "train/seconds_per_step": elapsed / max(window_steps, 1)}, world)
            report = {**train_metrics, **speed, **last_eval, "total_steps": total_steps,
                      "time/setup_seconds": setup_seconds, "time/recipe_seconds": time.time() - recipe_start}
            window_seconds, window_tokens, window_steps = 0.0, 0, 0
            if step % t.save_steps == 0 or is_last:
                save_checkpoint(report, final=is_last)
            else:
                session.report(report)

    return {
        "status": status,
        "message": message,
        "steps": state["step"],
        "total_steps": total_steps,
        "history": state["history"],
        "evals": state["evals"],
        "final_eval": state["evals"][-1] if state["evals"] else None,
        "best_eval": state["best_eval"],
        "loss_state": state["loss_state"],
        "world_size": world,
    }
