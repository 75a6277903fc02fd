"""Seconds per SFT step of the built-in task's reference (default size, batch 32), imports excluded.

    python benchmarks/bench_sft_threads.py [--steps 30] [--root BUILTIN_DIR]

Times `alphadpo_ray.training.sft.train_sft` on 400 of the task's training pairs (both responses) with whatever
thread policy the imported package has; run it with PYTHONPATH at an older checkout for "before", and
beside `python -c "while True: pass"` processes for a busy machine (docs/performance.md).
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch

from alphadpo_ray.ml.data import preference_data_from_rows, tokenize_sft
from alphadpo_ray.ml.models import build_tiny_model, load_tokenizer
from alphadpo_ray.training.sft import prepare_builtin_task, train_sft
from alphadpo_ray.ml.task import SFTConfig

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=30)
ap.add_argument("--root", default=None, help="a built task (default: the cached default one, built if missing)")
args = ap.parse_args()
root = Path(args.root) if args.root else prepare_builtin_task(progress=False).root
tok = load_tokenizer(root / "reference")
rows = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()[:400]]
train, _ = preference_data_from_rows(rows, name="t", chat_template=True, tokenizer=tok)
ex = [e for c in ("chosen", "rejected")
      for e in tokenize_sft(train, tok, response_column=c, max_length=128, max_prompt_length=96)]
model = build_tiny_model("llama", tok, hidden_size=96, num_layers=2, num_heads=4, intermediate_size=288, seed=0)
load0, t0 = os.getloadavg()[0], time.perf_counter()
train_sft(model, ex, tok.pad_token_id, SFTConfig(steps=args.steps), progress=False)
dt = time.perf_counter() - t0
print(f"{args.steps} steps in {dt:.1f} s = {dt / args.steps:.2f} s/step; torch threads {torch.get_num_threads()}; "
      f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY')}; load {load0:.1f} → {os.getloadavg()[0]:.1f} "
      f"on {os.cpu_count()} CPUs")
