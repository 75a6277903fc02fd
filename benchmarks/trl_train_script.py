"""A plain TRL DPO training script on the project's built-in task: the baseline for `alphadpo-ray train`'s fixed cost.

    .venv/bin/python benchmarks/trl_train_script.py --steps 12
    /usr/bin/time -v .venv/bin/python benchmarks/trl_train_script.py --steps 12 --set training.learning_rate=1e-4

What a user would hand-roll with TRL (the `bench` extra: trl==1.16.0): load the built-in task's cached
SFT model and tokenizer and its training pairs (the files `alphadpo-ray train` itself uses; the project
is imported only to read the same config and find those files in its cache, ALPHADPO_RAY_CACHE or
~/.cache/alphadpo-ray; nothing is downloaded, and if the task is not cached yet it is built first and
that time is printed apart), render prompts with the tokenizer's chat template as the project does, and
run DPOTrainer(precompute_ref_log_probs=True) for --steps optimizer steps in this one process: no Ray,
no DeepSpeed, no tracking, no evaluation; the final model is saved (as a training run would).

The settings come from the project's config (its defaults, the same --config file and --set overrides
as `alphadpo-ray train`), for one worker: per-device batch, gradient accumulation (total batch / per-device
batch), learning rate, schedule and warmup, weight decay, grad clip, beta, max_length, seed, bf16, and torch
threads = ray.resources_per_worker.CPU (what the recipe sets). The loss is TRL's sigmoid DPO (the project's
method's loss costs the same: a few ops on [batch] tensors). Prints wall time per phase and per step.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=12, help="optimizer steps (TRL max_steps)")
    p.add_argument("--config", default=None, help="the config file given to `alphadpo-ray train` (default: its defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, as for train")
    p.add_argument("--output-dir", default=None, help="where TRL writes the final model (default: a temp dir)")
    args = p.parse_args(argv)

    import torch
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from alphadpo_ray.config.experiment import BUILTIN, load_config
    from alphadpo_ray.training.prepare import prepare_builtin

    t_imports = time.perf_counter() - T0
    datasets.disable_progress_bars()
    config = load_config(args.config, [*args.set, "ray.num_workers=1"])
    if config.data.source != BUILTIN:
        raise SystemExit("trl_train_script: the config's data.source must be 'builtin' (the comparison's task)")
    t, cpu = config.training, int(config.ray.resources_per_worker.get("CPU", 1))
    torch.set_num_threads(max(1, cpu))
    t0 = time.perf_counter()
    built = prepare_builtin(config)  # the cached task: model, tokenizer and pairs on disk
    t_task = time.perf_counter() - t0

    t0 = time.perf_counter()
    model_dir = str(built.reference_dir) if config.model.name_or_path == BUILTIN else config.model.name_or_path
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if t.bf16 else torch.float32)
    data = datasets.Dataset.from_json(str(built.train_file))
    data = data.map(lambda row: {"prompt": tokenizer.apply_chat_template(
        [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, tokenize=False)})
    t_load = time.perf_counter() - t0

    out_dir = args.output_dir or tempfile.mkdtemp(prefix="trl-dpo-")
    trl_args = DPOConfig(
        output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type, warmup_steps=math.ceil(t.warmup_ratio * args.steps), weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, beta=float(config.method.resolved().get("beta", 0.1)),
        max_length=config.data.max_length, precompute_ref_log_probs=True,
        precompute_ref_batch_size=t.per_device_eval_batch_size, seed=t.seed, bf16=t.bf16,
        use_cpu=not config.ray.use_gpu, report_to=[], save_strategy="no", logging_strategy="no",
        eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )
    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t = time.perf_counter()

        def on_step_end(self, *_, **__):
            step_times.append(time.perf_counter() - self.t)

    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, args=trl_args, train_dataset=data, processing_class=tokenizer,
                         callbacks=[StepTimer()])
    t_init = time.perf_counter() - t0  # includes TRL's tokenization and the reference precompute pass
    t0 = time.perf_counter()
    trainer.train()
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.save_model(out_dir)
    t_save = time.perf_counter() - t0

    total = time.perf_counter() - T0
    print(f"settings: {args.steps} steps, {len(data)} training pairs, per-device batch {t.per_device_train_batch_size}"
          f" x accumulation {config.gradient_accumulation_steps}, lr {t.learning_rate} {t.lr_scheduler_type} "
          f"(warmup {t.warmup_ratio}), beta {trl_args.beta}, max_length {config.data.max_length}, "
          f"{'bf16' if t.bf16 else 'fp32'}, torch threads {torch.get_num_threads()}, model {model_dir}")
    print(f"phases: imports {t_imports:.1f} s, built-in task from cache {t_task:.1f} s, model+data load "
          f"{t_load:.1f} s, DPOTrainer init (tokenize + reference precompute) {t_init:.1f} s, "
          f"train {t_train:.1f} s, save {t_save:.1f} s")
    if step_times:
        print(f"steps: median {statistics.median(step_times):.3f} s/step, mean {statistics.fmean(step_times):.3f}, "
              f"first {step_times[0]:.3f}, {len(step_times)} steps")
    print(f"total wall time {total:.1f} s (load average {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
