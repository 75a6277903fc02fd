"""The preference-optimisation recipe: what every Ray Train worker runs, top to bottom.

`run_recipe` reads as the loop below; each phase is a function of its own:

    setup            process group, seeds, tokenizer, this worker's data, the policy under DeepSpeed
                     (ZeRO 0-3, AdamW, warmup + decay schedule), the method's loss
    resume           from the session's checkpoint: engine, schedule, step, AlphaDPO statistics, RNG
    train_step       the global batch of `total_batch_size` pairs split into workers × accumulation
                     micro-batches; chunked log-probs of the policy, cached reference log-probs, the
                     method's loss, DeepSpeed backward/step; metrics averaged over all workers
    preemption_notice  every step: has Ray announced that a node under this run is being reclaimed?
    evaluate         every `eval_steps`: held-out metrics with the reference loaded for evaluation only
    save_checkpoint  every `save_steps`, at the end (the end also exports the policy) and at once on a
                     preemption notice (the just-in-time checkpoint: the restart Ray Train makes at the
                     reclaim deadline loses only the steps trained since the notice); other
                     `logging_steps` report metrics without a checkpoint

The data order is a function of (seed, step) alone, and the loss's running statistics are
checkpointed, so a resumed run — or one with a different number of workers and the same
`total_batch_size` — follows the same trajectory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import posixpath
import re
import random
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config.experiment import ExperimentConfig
from ..config.sweep_settings import objectives
from ..errors import AlphaDPOError, StorageFull
from ..ml import distributed
from ..ml.threads import set_cpu_threads
from ..ml.data import collate_pairs
from ..ml.logprobs import sequence_logps
from ..ml.losses import build_loss
from ..ml.metrics import evaluate_preferences, generation_accuracy, sampled_kl
from ..ml.models import load_tokenizer
from ..ml.task import check
from ..services.secrets import redact
from ..services.storage import read_table
from ..services.train_callbacks import WORKER_NODE_KEY
from .engine import (build_policy_engine, consolidated_state_dict, load_reference, quiet_logs,
                     release_reference)
from . import worker_process
from .plan import PreparedRun

STATE_FILE = "trainer_state.json"
DS_TAG = "state"


# ------------------------------------------------------------------------------------------------
# Small pieces


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
    """The RNG states as tensors, lists and numbers only, so `torch.load(..., weights_only=True)` reads them."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(words), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
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
        self.node_ip = ray.util.get_node_ip_address()

    def get_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        try:
            ray.train.report({**metrics, WORKER_NODE_KEY: self.node_ip}, checkpoint=checkpoint)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            where = ray.train.get_context().get_storage().experiment_fs_path
            raise StorageFull(f"no space left on device uploading the checkpoint of step {metrics.get('step')} into "
                              f"{_redact(where)} (ray.storage_path); the incomplete checkpoint_* directory it left is "
                              "removed when the run ends. Free space, lower ray.num_to_keep, or use a larger disk"
                              ) from err

    def preemption_notice(self):
        """Ray Train's `PreemptionInfo` (nodes being reclaimed, their ranks, the deadline) once a node
        hosting one of this run's workers is being drained for preemption, else None. A barrier:
        every worker calls it once per step, so all see rank 0's answer."""
        import ray.train

        return ray.train.get_preemption_info()


class TuneSession:
    """The same interface inside a Ray Tune trial (`ray.tune.*`): the single-worker direct path."""

    rank, world = 0, 1
    checkpoint_unregistered = False  # get_checkpoint handed over one the driver never took the report of

    def get_checkpoint(self):
        """Tune's latest registered checkpoint of this trial, or a newer intact one in the trial's folder that Tune
        never registered: the trial saved it and the sweep driver never took the report (the driver was killed as
        the trial saved or finished, or the trial died with its report on the way). A newer one that does not
        verify (a save cut short) is passed over, as before."""
        import ray.tune

        registered = ray.tune.get_checkpoint()
        storage = ray.tune.get_context().get_storage()  # DeveloperAPI: the trial's folder in the run storage
        fs, folder = storage.storage_filesystem, storage.trial_fs_path
        known = posixpath.basename(registered.path.rstrip("/")) if registered is not None else ""
        for name in (n for n in checkpoint_names(fs, folder) if n > known):  # Tune's checkpoint_<index>
            path = posixpath.join(folder, name)
            if checkpoint_problem(fs, path) is None:
                print(f"[resume] {name} of this trial was saved but never registered by the sweep driver (it or the "
                      "trial stopped first): resuming from it", flush=True)
                self.checkpoint_unregistered = True  # its report never reached the driver: `run_recipe` sends it
                return ray.tune.Checkpoint(path, filesystem=fs)
        return registered

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        import ray.tune

        checkpoint = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=checkpoint)

    def preemption_notice(self):
        """Always None: Ray's notice comes through Ray Train's worker group, which a Tune trial
        running the recipe itself does not have (`ray.train.get_preemption_info` refuses to run in a
        Tune session). A node lost under such a trial fails the trial, and Tune restarts it (up to
        ``sweep.max_failures``) from its latest checkpoint, as the same trial."""
        return None


def train_loop_per_worker(loop_config: dict) -> dict:
    """Entry point of each Ray Train worker."""
    worker_process.setup()
    return run_recipe(loop_config, TrainSession())


@dataclass
class _Worker:
    """What one worker's phases share: settings, its data, the engine and the loss."""

    config: object  # ExperimentConfig
    plan: object  # PreparedRun
    session: object
    device: torch.device
    tokenizer: object
    train_rows: list
    eval_rows: list  # this worker's held-out shard
    engine: object
    zero3_handle: object  # transformers' HfDeepSpeedConfig under ZeRO-3: must live as long as the engine
    loss_fn: object
    start: float

    @property
    def rank(self) -> int:
        return self.session.rank

    @property
    def world(self) -> int:
        return self.session.world


def run_recipe(loop_config: dict, session) -> dict:
    """The whole recipe on one worker: setup, resume, then steps with evaluation, reports and checkpoints."""
    w = setup(loop_config, session)
    t, total_steps = w.config.training, w.plan.total_steps
    state = resume(w)
    setup_seconds = time.time() - w.start  # data, engine, resume: the per-run fixed cost
    spent = {"setup": setup_seconds, "steps": 0.0, "evaluation": 0.0}  # this process's seconds, for summary.json
    if not state["evals"]:  # step 0: the policy is the reference; reported, so curves start there
        eval_start = time.time()
        state["evals"].append(evaluate(w, 0))
        spent["evaluation"] += time.time() - eval_start
        w.session.report({**state["evals"][0], "step": 0, "total_steps": total_steps})
    elif state.get("report") and (state["step"] >= total_steps
                                  or getattr(w.session, "checkpoint_unregistered", False)):
        # resumed from the final checkpoint, or from one whose report never reached the sweep driver (Tune's
        # reports are synchronous: only the last can be lost, with the driver or the trial's node): the checkpoint's
        # report again (MLflow keeps each step once), for whoever waits on the run's reports — that step's metrics in
        # MLflow, Tune's last result, Optuna's objective
        w.session.report(state["report"])
    last_eval = state["evals"][-1]
    window = {"seconds": 0.0, "tokens": 0, "steps": 0}
    status, message = "finished", ""
    while state["step"] < total_steps:
        step_start = time.time()
        train_metrics, tokens = train_step(w, state["step"])
        if train_metrics is None:
            status = "diverged"
            message = (f"non-finite loss at step {state['step'] + 1} (method {w.config.method.name}, "
                       f"learning_rate {t.learning_rate}); training stopped instead of continuing on garbage")
            if w.rank == 0:
                print(f"[error] {message}", flush=True)
            break  # every rank stops here together; nothing more is reported
        step = state["step"] = state["step"] + 1
        step_seconds = time.time() - step_start
        window["seconds"] += step_seconds
        spent["steps"] += step_seconds
        window["tokens"] += tokens
        window["steps"] += 1
        state["loss_state"] = w.loss_fn.state_dict()
        state["history"].append({k: v for k, v in train_metrics.items() if k.startswith("train/") or k == "step"})
        preempted = preemption_notice(w, state, step)  # every step, on every worker: a barrier

        is_last = step == total_steps
        if step % t.eval_steps == 0 or is_last:
            eval_start = time.time()
            last_eval = evaluate(w, step)
            spent["evaluation"] += time.time() - eval_start
            state["evals"].append(last_eval)
            key = "eval/accuracy"
            if state["best_eval"] is None or last_eval.get(key, -1) > state["best_eval"].get(key, -1):
                state["best_eval"] = last_eval
        if (preempted or step % t.logging_steps == 0 or is_last or step % t.eval_steps == 0
                or step % t.save_steps == 0):
            elapsed = max(window["seconds"], 1e-9)
            speed = distributed.mean_over_workers({"train/tokens_per_second_per_worker": window["tokens"] / elapsed,
                                                   "train/seconds_per_step": elapsed / max(window["steps"], 1)})
            report = {**train_metrics, **speed, **last_eval, "total_steps": total_steps,
                      "run/preemptions": state["preemptions"]["recovered"],
                      "time/setup_seconds": setup_seconds, "time/recipe_seconds": time.time() - w.start}
            window = {"seconds": 0.0, "tokens": 0, "steps": 0}
            if preempted or step % t.save_steps == 0 or is_last:  # a notice: the just-in-time checkpoint
                state["report"] = report  # what a resume from this checkpoint may have to report again (above)
                save_checkpoint(w, state, report, final=is_last)
            else:
                w.session.report(report)

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
        "world_size": w.world,
        "preemptions": state["preemptions"]["recovered"],
        "seconds": {k: round(v, 2) for k, v in spent.items()},
    }


# ------------------------------------------------------------------------------------------------
# The phases


def setup(loop_config: dict, session) -> _Worker:
    """Process group, seeds, tokenizer, this worker's data, the DeepSpeed engine and the loss."""
    start = time.time()
    config = ExperimentConfig.model_validate(loop_config["config"])
    plan = PreparedRun(**loop_config["plan"])
    quiet_logs()
    set_cpu_threads(config.ray.resources_per_worker.get("CPU", 1))  # no more than its CPUs, fewer on a busy machine
    distributed.init_process_group(config.ray.use_gpu, single_process=session.world == 1)
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if config.ray.use_gpu else torch.device("cpu")
    _seed_all(config.training.seed)
    tokenizer = load_tokenizer(plan.tokenizer_path)
    train_rows = read_table(plan.train_uri).to_pylist()
    eval_rows = read_table(plan.eval_uri).to_pylist()[session.rank::session.world]
    engine, zero3_handle = build_policy_engine(config, plan.policy_path, plan.total_steps)
    loss_fn = build_loss(config.method.name, **config.method.hyperparameters)
    return _Worker(config, plan, session, device, tokenizer, train_rows, eval_rows, engine, zero3_handle, loss_fn,
                   start)


def resume(w: _Worker) -> dict:
    """The run's state: fresh, or restored from the newest intact checkpoint (engine, schedule, step,
    history, the loss's running statistics, RNG).

    Ray hands over the run's latest checkpoint; it is used only if its manifests verify (see
    `verify_checkpoint`). Otherwise the run falls back to the newest intact older one among the
    run's ``checkpoint_*`` directories (Ray keeps ``ray.num_to_keep``), with a warning naming the bad
    one; every worker agrees on each verdict (collective), so all load the same checkpoint. With
    none intact it fails naming each checkpoint and what is wrong with it. A `train` run's driver has
    already set bad registered checkpoints aside (`launch.screen_checkpoints`), so Ray Train never
    counts them as kept; this fallback covers damage after that check and Tune trials."""
    state = {"step": 0, "history": [], "evals": [], "best_eval": None, "loss_state": w.loss_fn.state_dict(),
             "preemptions": {"recovered": 0, "pending": None}}
    checkpoint = w.session.get_checkpoint()
    if checkpoint is None:
        return state
    fs = checkpoint.filesystem
    candidates = checkpoint_candidates(fs, checkpoint.path)
    bad: list[tuple[str, str]] = []
    for i in range(distributed.max_over_workers(len(candidates))):  # the same number of rounds on every worker
        path = candidates[i] if i < len(candidates) else None
        with _local_view(fs, path) as (ckpt_dir, problem):
            if problem is None:
                problem = verify_checkpoint(ckpt_dir, w.rank, w.world)
            flags = distributed.all_gather_1d(torch.tensor([1.0 if problem else 0.0], dtype=torch.float64))
            failed_on = [r for r, flag in enumerate(flags.tolist()) if flag]
            if not failed_on:
                _load_checkpoint(w, ckpt_dir)
                state = json.loads((ckpt_dir / STATE_FILE).read_text())
                break
        name = posixpath.basename(path or candidates[0])
        if problem and w.rank != 0:  # a problem only this worker saw (a file of its share): its own line
            print(f"[warning] worker {w.rank}: checkpoint {name}: {problem}", flush=True)
        bad.append((name, problem or f"a file checked by worker {failed_on[0]} is corrupt"))
        if w.rank == 0:
            print(f"[warning] checkpoint {name} is not usable: {bad[-1][1]}; trying the next older one", flush=True)
    else:
        run_dir = posixpath.dirname(checkpoint.path.rstrip("/"))
        # The list comes last: Ray shows a worker's error as its first and last 500 characters.
        raise CheckpointUnusable(
            f"cannot resume from {_redact(run_dir)}: no checkpoint passes its manifest check (restore the files, "
            "or delete that directory or pick a new run name to start over) — "
            + "; ".join(f"{name}: {why}" for name, why in bad)
        )
    w.loss_fn.load_state_dict(state["loss_state"])
    notice = _recovered_preemption(state)
    if w.rank == 0:
        origin = "" if not bad else (f" (checkpoint {posixpath.basename(candidates[len(bad)])}, "
                                     f"skipped {', '.join(n for n, _ in bad)})")
        after = "" if notice is None else f", after the preemption noticed at step {notice['step']}"
        print(f"[resume] continuing from step {state['step']} of {w.plan.total_steps}{origin}{after}", flush=True)
    return state


def _recovered_preemption(state: dict) -> dict | None:
    """Count a recovered preemption: a resume from a checkpoint written after a preemption notice
    (the just-in-time one, or a later one before the node went). Returns that notice, else None.
    Ray Train does not hand a run its restart history, so the count lives in the run state;
    checkpoints from before this count existed start it at 0."""
    preemptions = state.setdefault("preemptions", {"recovered": 0, "pending": None})
    notice, preemptions["pending"] = preemptions["pending"], None
    if notice is not None:
        preemptions["recovered"] += 1
    return notice


def _load_checkpoint(w: _Worker, ckpt_dir: Path) -> None:
    w.engine.load_checkpoint(str(ckpt_dir), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
    rng_file = ckpt_dir / f"rng_rank{w.rank}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=True))


def train_step(w: _Worker, step: int) -> tuple[dict | None, int]:
    """One optimizer step (`step` counts from 0): (metrics averaged over workers, tokens this worker
    saw), or (None, tokens) when any worker's loss is not finite (every worker stops together)."""
    t, engine, device = w.config.training, w.engine, w.device
    accumulation = w.config.gradient_accumulation_steps
    rows = global_batch_rows(step, len(w.train_rows), t.total_batch_size, t.seed)
    sums: dict[str, float] = {}
    tokens = 0
    for micro in micro_batches(rows, w.rank, w.world, t.per_device_train_batch_size, accumulation):
        batch = collate_pairs([w.train_rows[i] for i in micro], w.tokenizer.pad_token_id)
        ids = batch["input_ids"].to(device)
        out = sequence_logps(engine.module, ids, batch["attention_mask"].to(device),
                             batch["response_mask"].to(device), chunk_size=t.logprob_chunk_size,
                             memory_budget_mb=t.logprob_memory_budget_mb)
        n = ids.shape[0] // 2
        ref_c, ref_j = batch.get("ref_chosen_logps"), batch.get("ref_rejected_logps")
        result = w.loss_fn(out.logps[:n], out.logps[n:],
                           None if ref_c is None else ref_c.to(device), None if ref_j is None else ref_j.to(device),
                           out.lengths[:n], out.lengths[n:])
        if distributed.any_worker(not bool(torch.isfinite(result.loss))):
            return None, tokens
        engine.backward(result.loss)
        engine.step()
        tokens += int(batch["attention_mask"].sum())
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
    metrics = {f"train/{k}": v for k, v in distributed.mean_over_workers(sums).items()}
    grad_norm = engine.get_global_grad_norm()
    metrics["train/grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    metrics["train/learning_rate"] = float(engine.get_lr()[0])
    metrics["step"] = step + 1
    metrics["epoch"] = (step + 1) * t.total_batch_size / len(w.train_rows)
    return metrics, tokens


def preemption_notice(w: _Worker, state: dict, step: int) -> bool:
    """Whether a new preemption notice arrived before `step` is reported (collective: every worker
    asks Ray once per step). A new notice is kept in the run state as pending, so the just-in-time
    checkpoint the caller writes now carries it and a resume from it counts a recovered preemption;
    a notice already seen is not new, so each notice gets one checkpoint. Rank 0 prints one line."""
    info = w.session.preemption_notice()
    if info is None:
        return False
    notice = {"deadline_ms": info.deadline_ms, "nodes": info.preempted_node_ids}
    pending = state["preemptions"]["pending"]
    if pending is not None and all(pending.get(k) == v for k, v in notice.items()):
        return False
    state["preemptions"]["pending"] = {"step": step, **notice}
    if w.rank == 0:
        deadline = "no deadline given" if info.deadline_ms is None else (
            f"reclaimed at {time.strftime('%H:%M:%S', time.localtime(info.deadline_ms / 1000))} "
            f"(in {info.deadline_ms / 1000 - time.time():.0f} s)")
        print(f"[preemption] notice at step {step}: worker(s) {info.preempted_ranks} on node(s) "
              f"{', '.join(n[:12] for n in info.preempted_node_ids)} {deadline}; writing a just-in-time "
              f"checkpoint of step {step}", flush=True)
    return True


def evaluate(w: _Worker, step: int) -> dict:
    """Held-out metrics at `step` (collective: every worker evaluates its shard). The reference is loaded
    for evaluation only (every method needs it here: both KLs and the method-independent
    accuracy_logratio) and released before training continues. The sampled KL draws the same seeded
    random numbers at every evaluation (common random numbers: its curve moves with the policy, not
    with fresh sampling noise) and leaves training's RNG untouched."""
    t = w.config.training
    reference, handle = load_reference(w.config, w.plan.reference_path, w.device)
    batches = [collate_pairs(w.eval_rows[i : i + t.per_device_eval_batch_size], w.tokenizer.pad_token_id)
               for i in range(0, len(w.eval_rows), t.per_device_eval_batch_size)]
    try:
        metrics = evaluate_preferences(w.engine.module, w.loss_fn, batches, reference=reference,
                                       chunk_size=t.logprob_chunk_size)
        if t.sampled_kl_samples:
            prompts = [r["prompt_ids"] for r in w.eval_rows[: math.ceil(t.sampled_kl_samples / w.world)]]
            metrics.update(sampled_kl(w.engine.module, reference, prompts, max_new_tokens=t.max_new_tokens,
                                      batch_size=t.per_device_eval_batch_size, pad_token_id=w.tokenizer.pad_token_id,
                                      eos_token_id=w.tokenizer.eos_token_id, chunk_size=t.logprob_chunk_size,
                                      seed=t.seed))
    finally:
        del reference
        release_reference(handle)
    if w.plan.builtin_task and t.generation_eval_samples:
        per_worker = math.ceil(t.generation_eval_samples / w.world)
        prompts = [(r["prompt_ids"], r["prompt"]) for r in w.eval_rows[:per_worker]]
        metrics.update(generation_accuracy(w.engine.module, w.tokenizer, prompts, check,
                                           max_new_tokens=t.max_new_tokens, batch_size=t.per_device_eval_batch_size))
    metrics = {f"eval/{k}": v for k, v in metrics.items()}
    metrics["eval/step"] = step
    metrics.update(objectives(metrics, w.config.sweep))
    return metrics


def save_checkpoint(w: _Worker, state: dict, metrics: dict, final: bool) -> None:
    """Report `metrics` with a checkpoint (collective): engine, RNG per rank, the run state on rank 0
    and, at the end, the exported policy (safetensors) with its tokenizer.

    Every worker writes its files into a local directory and then, last, its manifest
    (``manifest_rank{r}.json``: size and sha256 of each of its files; rank 0's also records the
    number of workers). Ray uploads each worker's directory into the same checkpoint. A save that
    fails before the report leaves nothing in storage; one interrupted during the upload leaves a
    directory whose manifests do not verify, which `resume` never loads."""
    tmp = scratch_dir(f"ckpt-r{w.rank}")
    try:
        try:
            w.engine.save_checkpoint(tmp, tag=DS_TAG)
            torch.save(_rng_state(), Path(tmp) / f"rng_rank{w.rank}.pt")
            weights = consolidated_state_dict(w.engine, w.config) if final else None
            if w.rank == 0:
                (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
                if final:
                    w.engine.module.save_pretrained(Path(tmp) / "policy", state_dict=weights, safe_serialization=True)
                    w.tokenizer.save_pretrained(Path(tmp) / "policy")
            write_manifest(tmp, w.rank, w.world, state["step"])
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            raise StorageFull(f"no space left on device writing worker {w.rank}'s checkpoint of step {state['step']} "
                              f"to the temporary directory {tmp} (TMPDIR); free space there or point TMPDIR at a "
                              "larger disk") from err
        w.session.report(metrics, checkpoint_dir=tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Checkpoint manifests: what `save_checkpoint` writes last and `resume` verifies


MANIFEST = "manifest_rank{rank}.json"
_MANIFEST_NAME = re.compile(r"manifest_rank\d+\.json")


class CheckpointUnusable(AlphaDPOError, RuntimeError):
    """No checkpoint of the run passes its manifest check."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | Path, rank: int, world: int, step: int) -> Path:
    """Write worker `rank`'s manifest of every file in `directory` (its own checkpoint files): relative
    path → size and sha256. Call it last; it is written to a temporary name and renamed into place."""
    root = Path(directory)
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not _MANIFEST_NAME.fullmatch(rel):
            files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    target = root / MANIFEST.format(rank=rank)
    tmp = root / f".{target.name}.tmp"
    tmp.write_text(json.dumps({"format": 1, "rank": rank, "world_size": world, "step": step, "files": files},
                              indent=1, sort_keys=True))
    tmp.replace(target)
    return target


def _read_manifest(directory: Path, rank: int) -> tuple[dict | None, str | None]:
    name = MANIFEST.format(rank=rank)
    try:
        manifest = json.loads((directory / name).read_text())
        files = manifest["files"]
        world = int(manifest["world_size"])
        if not isinstance(files, dict) or world < 1 or not all(
                isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
                for e in files.values()):
            raise ValueError("unexpected layout")
    except FileNotFoundError:
        return None, f"{name} missing (save cut short)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"{name} unreadable ({type(err).__name__})"
    return manifest, None


def verify_checkpoint(directory: str | Path, rank: int = 0, world: int = 1) -> str | None:
    """What is wrong with a checkpoint directory, or None when it is intact.

    Every worker checks that each saving worker's manifest is there and readable and that every file
    listed exists with its recorded size (cheap: every worker reaches the same verdict and message).
    Worker `rank` of `world` then checks the sha256 of the files of manifests rank, rank + world, …,
    so each file is read once over all workers; `resume` combines the verdicts."""
    directory = Path(directory)
    head, problem = _read_manifest(directory, 0)
    if problem:
        return problem
    manifests = {0: head}
    for r in range(1, int(head["world_size"])):
        manifests[r], problem = _read_manifest(directory, r)
        if problem:
            return problem
    for manifest in manifests.values():
        for rel, entry in manifest["files"].items():
            path = directory / rel
            if not path.is_file():
                return f"{rel} missing"
            size = path.stat().st_size
            if size != entry["size"]:
                return f"{rel} {'truncated' if size < entry['size'] else 'changed'}: {size} of {entry['size']} bytes"
    for r in range(rank, len(manifests), world):
        for rel, entry in manifests[r]["files"].items():
            if _sha256(directory / rel) != entry["sha256"]:
                return f"{rel} corrupt (sha256 differs from {MANIFEST.format(rank=r)})"
    return None


def checkpoint_candidates(fs, path: str) -> list[str]:
    """`path` (the run's latest checkpoint, as Ray registered it) then the older ``checkpoint_*``
    directories beside it, newest first. Ray names checkpoints so that names sort by time (Train:
    ``checkpoint_<timestamp>``, Tune: ``checkpoint_<index>``); newer unregistered ones are ignored."""
    path = path.rstrip("/")
    parent, name = posixpath.split(path)
    return [path] + [posixpath.join(parent, n) for n in checkpoint_names(fs, parent) if n < name]


def checkpoint_names(fs, folder: str) -> list[str]:
    """The ``checkpoint_*`` directories in `folder`, newest first (their names sort by time); none when the
    folder is missing or cannot be listed."""
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except OSError:
        return []
    return sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                   and i.base_name.startswith("checkpoint_")), reverse=True)


def checkpoint_problem(fs, path: str) -> str | None:
    """What is wrong with the checkpoint at `path` on `fs`, or None when it is intact: `verify_checkpoint`
    as one worker checking everything (every manifest, every file's size and sha256). The driver runs it
    before Ray Train's checkpoint manager loads the run (`launch`), so a bad checkpoint is never handed
    over or counted."""
    with _local_view(fs, path) as (ckpt_dir, problem):
        return problem or verify_checkpoint(ckpt_dir)


def scratch_dir(kind: str) -> str:
    """A new temporary directory ``alphadpo-{kind}-{host}-p{pid}-…`` (a checkpoint being written, one being read
    from remote storage). Its owner removes it when done; a process killed meanwhile (a lost worker, an
    out-of-memory kill) cannot, and on a node that lives on each such directory is a whole checkpoint share left
    in the temp folder. So first, this host's ones whose process is gone are removed (by the pid in their name; a
    pid in use again, or another user's process, keeps its directory; the host name keeps containers that share a
    temp folder but not their process ids apart)."""
    root = Path(tempfile.gettempdir())
    host = re.sub(r"[^a-z0-9]", "", socket.gethostname().lower())[:24] or "host"
    pattern = re.compile(rf"alphadpo-[a-z0-9-]+-{host}-p(\d+)-\w+")
    for stale in root.glob(f"alphadpo-*-{host}-p*-*"):
        match = pattern.fullmatch(stale.name)
        if match and stale.is_dir() and not _process_alive(int(match.group(1))):
            shutil.rmtree(stale, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"alphadpo-{kind}-{host}-p{os.getpid()}-", dir=root)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def _local_view(fs, path: str | None):
    """(a local directory with the checkpoint's files, None) — the directory itself on local storage,
    a temporary download otherwise — or (None, why it cannot be read)."""
    import pyarrow.fs as pafs

    if path is None:
        yield None, "not listed on this worker"
        return
    if isinstance(fs, pafs.LocalFileSystem):
        local = Path(path)
        yield (local, None) if local.is_dir() else (None, "the directory is gone")
        return
    tmp = scratch_dir("resume")
    try:
        try:
            pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        except OSError as err:
            yield None, f"cannot be read ({_redact(str(err))})"
            return
        yield Path(tmp), None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _redact(text: str) -> str:
    return redact(text)
