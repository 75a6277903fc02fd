"""MFU of the project's AlphaDPO step on one GPU: a ~1B-parameter random Llama, ZeRO-0 and ZeRO-2, bf16.

    .venv/bin/python benchmarks/bench_gpu_step.py                  # one GPU, ~4-6 min (prepared to fit 10)
    .venv/bin/python benchmarks/bench_gpu_step.py --dry-run        # tiny CPU version of the same code path (~1 min)

Refuses to run without a CUDA device (except --dry-run). Model: transformers' LlamaConfig with the
shape of Llama-3.2-1B (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab 128256,
tied embeddings: 1.24B parameters), random weights built on the GPU in bf16 and saved to a temp
directory (no tokenizer: the batch is token ids). Batch: --pairs random-token pairs of --seq-len
tokens (half prompt, half response, no padding). The step is `bench_compute_bound.project_step`, i.e.
the recipe's step: DeepSpeed engine from `alphadpo_ray.training.engine.build_policy_engine` (bf16, ZeRO
--zero-stages, single-process NCCL group, --optimizer), `sequence_logps` with the chunked head
(--chunk-size) at each --memory-budget-mb (kept logits vs recompute), alpha-dpo with the reference
log-probs cached in the rows (scored once on the GPU before timing), engine.backward, engine.step.

Per ZeRO stage: one engine, --warmup untimed steps, then --steps rounds over the budgets
(interleaved), each step CUDA-synchronised; medians. MFU = FLOPs per step / median seconds / peak,
FLOPs per step = tokens x (6 N + 12 L T d) (N: weights of every Linear applied, the tied head
included; attention counted in full, not halved for causality), peak --peak-tflops (default the H200
bf16 dense spec, 989 TFLOP/s). Also printed: 2048^2 and 8192^2 bf16 torch.mm yardsticks, peak
GPU memory per stage. Stops starting new stages after --time-limit-s (default 480 s) so the whole run
stays within 10 minutes. Target: MFU >= 0.45.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, Path(__file__).resolve().parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_compute_bound import (  # noqa: E402
    H200_BF16_DENSE_TFLOPS, _sync_time, cached_rows, linear_weights, project_step, step_flops,
)
from bench_reference_cache import _init_process_group, _pairs  # noqa: E402

MFU_TARGET = 0.45
PAD_ID = 0
DRY_RUN = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 512, "seq_len": 32,
           "pairs": 2, "steps": 1, "warmup": 1}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="tiny model on CPU (fp32, gloo) through the same code path: checks the script only")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence: half prompt, half response")
    p.add_argument("--pairs", type=int, default=8, help="preference pairs per step (2x sequences)")
    p.add_argument("--steps", type=int, default=8, help="timed rounds per stage (one step per budget each)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per stage")
    p.add_argument("--zero-stages", default="0,2", help="comma list of ZeRO stages")
    p.add_argument("--chunk-size", type=int, default=512, help="training.logprob_chunk_size")
    p.add_argument("--memory-budget-mb", dest="budgets", default="128,8192",
                   help="comma list of training.logprob_memory_budget_mb values (128: the project's default)")
    p.add_argument("--optimizer", default="torch", choices=["torch", "deepspeed"],
                   help="deepspeed.optimizer: torch AdamW needs no JIT-built DeepSpeed op (the default here)")
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS)
    p.add_argument("--time-limit-s", type=float, default=480.0, help="start no new ZeRO stage after this")
    p.add_argument("--learning-rate", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.dry_run:
        for k, v in DRY_RUN.items():
            setattr(args, k, v)
    args.dtype = "fp32" if args.dry_run else "bf16"  # read by project_step
    args.memory_budget_mb = None  # project_step's config keeps the default; each step passes its budget
    return args


def build_model_dir(path: Path, args, device, dtype) -> None:
    """A random Llama of the requested shape, saved with its config (no tokenizer needed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=max(2048, args.seq_len),
                         tie_word_embeddings=True, pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(args.seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(path, safe_serialization=True)
    del model


def mm_tflops(n: int, device, dtype) -> float:
    import torch

    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(5):
        t0 = _sync_time(device)
        torch.mm(a, b)
        times.append(_sync_time(device) - t0)
    return 2.0 * n**3 / statistics.median(times) / 1e12


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench_gpu_step.py needs a CUDA GPU and torch.cuda.is_available() is False here: run it on a "
                         "GPU machine, or use --dry-run for a tiny CPU check of the script")
    from alphadpo_ray.training.engine import quiet_logs

    quiet_logs()
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    stages = [int(s) for s in args.zero_stages.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    prompt_len = args.seq_len // 2
    tokens = 2 * args.pairs * args.seq_len
    results, skipped = {}, []

    with tempfile.TemporaryDirectory(prefix="bench-gpu-step-") as tmp:
        path = Path(tmp) / "model"
        t0 = time.perf_counter()
        build_model_dir(path, args, device, dtype)
        build_s = time.perf_counter() - t0
        from alphadpo_ray.ml.models import load_model

        probe = load_model(str(path), dtype=dtype)
        n_params = sum(p.numel() for p in probe.parameters())
        n_linear = linear_weights(probe)
        del probe
        flops = step_flops(n_linear, args.layers, args.hidden, args.seq_len, tokens)
        pairs = _pairs(args.pairs, prompt_len, args.seq_len - prompt_len, args.vocab, PAD_ID, args.seed)
        t0 = time.perf_counter()
        rows = cached_rows(str(path), pairs, PAD_ID, args.chunk_size, device, dtype)
        cache_s = time.perf_counter() - t0
        _init_process_group("cpu" if args.dry_run else "cuda")
        yard = {n: mm_tflops(n, device, dtype) for n in ((256, 512) if args.dry_run else (2048, 8192))}

        for stage in stages:
            if time.perf_counter() - t_start > args.time_limit_s:
                skipped.append(stage)
                continue
            args.zero_stage = stage
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            n_steps = args.warmup + args.steps * len(budgets)
            step, desc, keep = project_step(str(path), args, rows, PAD_ID, device, n_steps)
            engine_s = time.perf_counter() - t0
            for _ in range(args.warmup):
                step({})
            secs = {b: [] for b in budgets}
            phases = {b: [] for b in budgets}
            for r in range(args.steps):
                for b in budgets if r % 2 == 0 else budgets[::-1]:
                    ph: dict = {}
                    t0 = _sync_time(device)
                    step(ph, memory_budget_mb=b)
                    secs[b].append(_sync_time(device) - t0)
                    phases[b].append(ph)
            peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            results[stage] = (desc, engine_s, peak_gib, {b: statistics.median(v) for b, v in secs.items()},
                              {b: {k: statistics.median(d[k] for d in v) for k in v[0]} for b, v in phases.items()})
            del step, keep
            gc.collect()

    # --- report -----------------------------------------------------------------------------------------------
    dev_name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (dry run)"
    print(f"device: {dev_name}; torch {torch.__version__}; date {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"model: random Llama, hidden {args.hidden}, {args.layers} layers, {args.heads} heads ({args.kv_heads} KV), "
          f"intermediate {args.intermediate}, vocab {args.vocab} (tied), {n_params / 1e6:.1f}M parameters, "
          f"{args.dtype}; built in {build_s:.0f} s")
    print(f"batch: {args.pairs} pairs x {args.seq_len} tokens (prompt {prompt_len} + response "
          f"{args.seq_len - prompt_len}), {tokens} tokens per step; reference cache pass {cache_s:.1f} s")
    print(f"FLOPs per step = tokens x (6 N + 12 L T d) = {tokens} x (6 x {n_linear / 1e9:.3f}B + 12 x {args.layers} x "
          f"{args.seq_len} x {args.hidden}) = {flops / 1e12:.1f} TFLOP; peak {args.peak_tflops:g} TFLOP/s "
          f"({'H200 bf16 dense spec' if args.peak_tflops == H200_BF16_DENSE_TFLOPS else 'given'})")
    print(f"yardstick torch.mm {args.dtype}: " + ", ".join(f"{n}^2 {tf:.1f} TFLOP/s" for n, tf in yard.items()))
    print(f"timing: {args.warmup} warm-up + {args.steps} rounds over the budgets per stage (order flips each round); "
          f"medians; load average before {load0[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print()
    print(f"{'ZeRO':>4} {'budget MiB':>10} {'s/step':>8} {'fwd s':>7} {'bwd s':>7} {'opt s':>7} {'tokens/s':>9} "
          f"{'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9} {'engine s':>9}")
    verdicts = []
    for stage, (desc, engine_s, peak_gib, med, ph) in results.items():
        for b in budgets:
            mfu = flops / med[b] / (args.peak_tflops * 1e12)
            print(f"{stage:>4} {b:>10g} {med[b]:>8.3f} {ph[b]['forward']:>7.3f} {ph[b]['backward']:>7.3f} "
                  f"{ph[b]['optimizer']:>7.3f} {tokens / med[b]:>9.0f} {flops / med[b] / 1e12:>8.1f} {mfu:>6.3f} "
                  f"{peak_gib:>9.1f} {engine_s:>9.1f}")
        best = min(budgets, key=lambda b: med[b])
        mfu = flops / med[best] / (args.peak_tflops * 1e12)
        verdicts.append(f"MFU ZeRO-{stage} (budget {best:g} MiB) = {mfu:.3f} (target >= {MFU_TARGET}): "
                        f"{'PASS' if mfu >= MFU_TARGET else 'MISS'}")
    for stage in skipped:
        verdicts.append(f"MFU ZeRO-{stage}: not measured (past --time-limit-s {args.time_limit_s:g})")
    print()
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")
    if args.dry_run:
        print("[dry run] tiny model on CPU: the script's code path works; the figures say nothing about a GPU")
    for line in verdicts:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
