"""Fraction of peak of a compute-bound training step: the project's step against a plain-PyTorch floor.

    .venv/bin/python benchmarks/bench_compute_bound.py                 # 103.8M Llama, 8 pairs x 256, 1 and 2 threads
    .venv/bin/python benchmarks/bench_compute_bound.py --small         # quick development run (~1-2 min)
    .venv/bin/python benchmarks/bench_compute_bound.py --memory-budget-mb 0   # every head chunk recomputed
    .venv/bin/python benchmarks/bench_compute_bound.py --device cuda --dtype bf16

Model: a random Llama built locally (`alphadpo_ray.ml.models.build_tiny_model_dir`: byte-level BPE on
synthetic words, --vocab), default hidden 1024, 8 layers, 16 heads, intermediate 2816, vocab 1024,
tied embeddings: 103.8M parameters. Batch: --pairs random-token pairs, prompt and response halves of
--seq-len each (no padding), collated with `alphadpo_ray.ml.data.collate_pairs`. One optimizer step:

  project  the recipe's step (`alphadpo_ray.training.recipe.train_step`, one micro-batch): DeepSpeed engine from
           `alphadpo_ray.training.engine.build_policy_engine` (ZeRO --zero-stage, the project's default 3, single-process
           gloo group), collate -> `sequence_logps` (chunked head, training.logprob_chunk_size and
           training.logprob_memory_budget_mb) -> alpha-dpo with the reference log-probs cached in the
           rows -> finite check -> engine.backward -> engine.step (grad clip 1.0, torch AdamW on CPU)
  floor    plain PyTorch on a second copy of the same weights: model(...).logits for every position,
           log_softmax, gather, masked sum, DPO loss with the same cached reference log-probs, backward,
           clip_grad_norm_(1.0), torch.optim.AdamW.step, zero_grad
  yardstick  torch.mm of two 2048 x 2048 matrices in the step's dtype (2 * 2048^3 FLOP): the peak this
           machine reaches at the current thread count, measured in the same run (median of 3 products
           per round). On cuda the figure against the device's spec (--peak-tflops, H200 bf16 dense 989)
           is the MFU; the yardstick is printed too.

FLOPs per step (analytic, the same nominal count for both, so skipping prompt positions in the head
is not credited): tokens x (6 x N + 12 x L x T x d), N = weights of every Linear the model applies
(attention and MLP projections and the output head, the tied embedding counted as the head), L layers,
T tokens per sequence, d hidden size (attention scores and values: 2 x 2 x T x d FLOP per token per
layer forward, x3 for forward + backward). Fraction of peak = FLOPs per step / median step seconds /
yardstick FLOP/s.

Timing: per thread count (`torch.set_num_threads`, --threads), one warm-up step of each, then --rounds
rounds of yardstick, project, floor (interleaved, medians). Each step's phases (forward incl. the
loss, backward, optimizer step) are timed as well, to show where a gap to the floor comes from, and its
CPU seconds (process + children, getrusage), the yardstick's too: where threads compete for cores (load
above the CPU count) wall time stretches with the share of cores the process gets, so the report puts
beside each wall figure the cores it got (cpu s / wall s) and the fraction of peak per CPU second.
Targets (CPU): project >= 0.85 of peak, and project step time <= 1.05 x the floor, at every thread count.
"""

from __future__ import annotations

import argparse
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

from bench_logprobs import _cpu_model as cpu_model  # noqa: E402
from bench_reference_cache import HPARAMS, _init_process_group, _model_facts, _pairs, _synthetic_texts  # noqa: E402

PEAK_FRACTION_TARGET = 0.85
FLOOR_RATIO_TARGET = 1.05
YARDSTICK_N = 2048
H200_BF16_DENSE_TFLOPS = 989.0
SMALL = {"hidden": 256, "layers": 2, "heads": 4, "intermediate": 704, "seq_len": 128, "pairs": 4, "rounds": 2}


def linear_weights(model) -> int:
    """Weights of every nn.Linear the model applies (a tied output head counts: it is a matmul per token)."""
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def step_flops(n_linear: int, layers: int, hidden: int, seq_len: int, tokens: int) -> float:
    """Nominal training FLOPs of one step: tokens x (6 N + 12 L T d) (see the module docstring)."""
    return tokens * (6.0 * n_linear + 12.0 * layers * seq_len * hidden)


def project_step(path: str, args, rows: list[dict], pad_id: int, device, total_steps: int):
    """The recipe's step on a `build_policy_engine` engine; returns (step, description, config, keep-alive)."""
    import torch

    from alphadpo_ray.config.experiment import config_from_dict
    from alphadpo_ray.ml.data import collate_pairs
    from alphadpo_ray.training.engine import build_policy_engine
    from alphadpo_ray.ml.logprobs import sequence_logps
    from alphadpo_ray.ml.losses import build_loss

    training = {"per_device_train_batch_size": len(rows), "total_batch_size": len(rows),
                "learning_rate": args.learning_rate, "bf16": args.dtype == "bf16", "max_steps": total_steps,
                "logprob_chunk_size": args.chunk_size}
    if args.memory_budget_mb is not None:
        training["logprob_memory_budget_mb"] = args.memory_budget_mb
    config = config_from_dict({
        "name": "bench-compute-bound", "model": {"name_or_path": path},
        "method": {"name": "alpha-dpo", **HPARAMS}, "training": training,
        "deepspeed": {"zero_stage": args.zero_stage, "optimizer": getattr(args, "optimizer", "auto")},
        "ray": {"num_workers": 1, "use_gpu": device.type == "cuda"},
        "tracking": {"enabled": False},
    }, source="bench_compute_bound")
    t = config.training
    engine, handle = build_policy_engine(config, path, total_steps)
    loss_fn = build_loss("alpha-dpo", **HPARAMS)

    def step(phases: dict, memory_budget_mb: float | None = None) -> None:
        """One step; `memory_budget_mb` overrides training.logprob_memory_budget_mb (bench_gpu_step compares)."""
        budget = t.logprob_memory_budget_mb if memory_budget_mb is None else memory_budget_mb
        t0 = time.perf_counter()
        batch = collate_pairs(rows, pad_id)
        ids = batch["input_ids"].to(device)
        out = sequence_logps(engine.module, ids, batch["attention_mask"].to(device), batch["response_mask"].to(device),
                             chunk_size=t.logprob_chunk_size, memory_budget_mb=budget)
        n = ids.shape[0] // 2
        result = loss_fn(out.logps[:n], out.logps[n:], batch["ref_chosen_logps"].to(device),
                         batch["ref_rejected_logps"].to(device), out.lengths[:n], out.lengths[n:])
        bool(torch.isfinite(result.loss))  # the recipe's divergence check (a sync point)
        t1 = _sync_time(device)
        engine.backward(result.loss)
        t2 = _sync_time(device)
        engine.step()
        result.loss.item()
        t3 = _sync_time(device)
        phases.update(forward=t1 - t0, backward=t2 - t1, optimizer=t3 - t2)

    desc = (f"DeepSpeed ZeRO-{args.zero_stage} (build_policy_engine), chunk {t.logprob_chunk_size}, "
            f"memory budget {t.logprob_memory_budget_mb:g} MiB")
    return step, desc, (engine, handle)


def floor_step(path: str, args, rows: list[dict], pad_id: int, device, dtype):
    """Plain PyTorch: full logits, log_softmax, gather, DPO loss, backward, clip, AdamW."""
    import torch
    import torch.nn.functional as F

    from alphadpo_ray.ml.data import collate_pairs
    from alphadpo_ray.ml.models import load_model

    model = load_model(path, dtype=dtype).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    batch = collate_pairs(rows, pad_id)
    ids, am, rm = (batch[k].to(device) for k in ("input_ids", "attention_mask", "response_mask"))
    ref_c, ref_j = batch["ref_chosen_logps"].to(device), batch["ref_rejected_logps"].to(device)
    n = ids.shape[0] // 2

    def step(phases: dict) -> None:
        t0 = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=am).logits[:, :-1].float()
        tok = logits.log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        lp = (tok * (rm[:, 1:] * am[:, 1:])).sum(-1)
        margin = (lp[:n] - ref_c) - (lp[n:] - ref_j)
        loss = -F.logsigmoid(HPARAMS["beta"] * margin).mean()
        t1 = _sync_time(device)
        loss.backward()
        t2 = _sync_time(device)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        t3 = _sync_time(device)
        phases.update(forward=t1 - t0, backward=t2 - t1, optimizer=t3 - t2)

    return step, "plain PyTorch, full logits, clip 1.0, torch.optim.AdamW", (model, optimizer)


def _sync_time(device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its waited-for children so far (getrusage)."""
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def yardstick(device, dtype) -> tuple[float, float]:
    """(FLOP per wall second, FLOP per CPU second) of torch.mm on two YARDSTICK_N^2 matrices: median of 3
    products each."""
    import torch

    a = torch.randn(YARDSTICK_N, YARDSTICK_N, device=device, dtype=dtype)
    b = torch.randn(YARDSTICK_N, YARDSTICK_N, device=device, dtype=dtype)
    torch.mm(a, b)
    times, cpus = [], []
    for _ in range(3):
        t0, c0 = _sync_time(device), cpu_seconds()
        torch.mm(a, b)
        times.append(_sync_time(device) - t0)
        cpus.append(cpu_seconds() - c0)
    flop = 2.0 * YARDSTICK_N**3
    return flop / statistics.median(times), flop / max(statistics.median(cpus), 1e-9)


def cached_rows(path: str, pairs: list[dict], pad_id: int, chunk_size: int, device=None, dtype=None) -> list[dict]:
    """The rows with the reference log-probs (the initial weights) cached in them, as reference_cache does."""
    import torch

    from alphadpo_ray.ml.data import collate_pairs
    from alphadpo_ray.ml.logprobs import sequence_logps
    from alphadpo_ray.ml.models import load_model

    device = device or torch.device("cpu")
    reference = load_model(path, dtype=dtype or torch.float32, eval_mode=True).to(device)
    batch = collate_pairs(pairs, pad_id)
    with torch.no_grad():
        ids, am, rm = (batch[k].to(device) for k in ("input_ids", "attention_mask", "response_mask"))
        ref = sequence_logps(reference, ids, am, rm, chunk_size=chunk_size).logps.cpu()
    del reference
    n = len(pairs)
    return [{**e, "ref_chosen_logps": float(ref[i]), "ref_rejected_logps": float(ref[n + i])}
            for i, e in enumerate(pairs)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="quick development size: " + ", ".join(
        f"{k.replace('_', '-')} {v}" for k, v in SMALL.items()))
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=2816, help="MLP intermediate size")
    p.add_argument("--vocab", type=int, default=1024, help="tokenizer vocab size (byte-level BPE on synthetic text)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence: half prompt, half response")
    p.add_argument("--pairs", type=int, default=8, help="preference pairs per step (2x sequences)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per thread count")
    p.add_argument("--threads", default="1,2", help="comma list of torch thread counts (CPU)")
    p.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3], help="project default: 3")
    p.add_argument("--chunk-size", type=int, default=512, help="training.logprob_chunk_size")
    p.add_argument("--memory-budget-mb", type=float, default=None,
                   help="training.logprob_memory_budget_mb (default: the project's default)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS,
                   help="cuda: the device's peak for MFU (default: H200 bf16 dense spec, 989)")
    p.add_argument("--learning-rate", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.small:
        for k, v in SMALL.items():
            setattr(args, k, v)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible (torch.cuda.is_available() is False); "
                         "run on a machine with a GPU, or use --device cpu")
    from alphadpo_ray.training.engine import quiet_logs
    from alphadpo_ray.ml.models import build_tiny_model_dir, load_model

    quiet_logs()
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    threads = [int(x) for x in args.threads.split(",")] if device.type == "cpu" else [torch.get_num_threads()]
    prompt_len = args.seq_len // 2

    with tempfile.TemporaryDirectory(prefix="bench-compute-bound-") as tmp:
        path = str(build_tiny_model_dir(
            Path(tmp) / "model", _synthetic_texts(2000, args.seed), vocab_size=args.vocab, hidden_size=args.hidden,
            num_layers=args.layers, num_heads=args.heads, intermediate_size=args.intermediate,
            max_position_embeddings=max(512, args.seq_len), seed=args.seed))
        vocab, pad_id = _model_facts(path)
        pairs = _pairs(args.pairs, prompt_len, args.seq_len - prompt_len, vocab, pad_id, args.seed)
        rows = cached_rows(path, pairs, pad_id, args.chunk_size, device, dtype)
        probe = load_model(path)
        n_params = sum(p.numel() for p in probe.parameters())
        n_linear = linear_weights(probe)
        del probe
        tokens = 2 * args.pairs * args.seq_len
        flops = step_flops(n_linear, args.layers, args.hidden, args.seq_len, tokens)

        _init_process_group(args.device)
        n_steps = len(threads) * (args.rounds + 1) + 1
        # the floor's plain copy first: while the engine's ZeRO-3 handle is alive, from_pretrained partitions
        floor = floor_step(path, args, rows, pad_id, device, dtype)
        steps = {"project": project_step(path, args, rows, pad_id, device, n_steps), "floor": floor}

        results = {}
        for n in threads:
            if device.type == "cpu":
                torch.set_num_threads(n)
            yard, yard_cpu = [], []
            secs, cpus, phases = {k: [] for k in steps}, {k: [] for k in steps}, {k: [] for k in steps}
            for r in range(args.rounds + 1):  # round 0: warm-up
                y, y_cpu = yardstick(device, dtype)
                for name, (step, _, _) in steps.items():
                    ph: dict = {}
                    t0, c0 = _sync_time(device), cpu_seconds()
                    step(ph)
                    dt, dc = _sync_time(device) - t0, cpu_seconds() - c0
                    if r:
                        secs[name].append(dt)
                        cpus[name].append(dc)
                        phases[name].append(ph)
                if r:
                    yard.append(y)
                    yard_cpu.append(y_cpu)
            results[n] = ((statistics.median(yard), statistics.median(yard_cpu)),
                          {k: statistics.median(v) for k, v in secs.items()},
                          {k: statistics.median(v) for k, v in cpus.items()},
                          {k: {p: statistics.median(d[p] for d in v) for p in v[0]} for k, v in phases.items()})
        load1 = os.getloadavg()

    # --- report -----------------------------------------------------------------------------------------------
    print(f"model: random Llama, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, intermediate "
          f"{args.intermediate}, vocab {vocab} (tied), {n_params / 1e6:.1f}M parameters, {args.dtype}")
    print(f"batch: {args.pairs} pairs x {args.seq_len} tokens (prompt {prompt_len} + response "
          f"{args.seq_len - prompt_len}), {tokens} tokens per step, no padding; alpha-dpo {HPARAMS}, cached reference")
    for name, (_, desc, _) in steps.items():
        print(f"{name}: {desc}")
    print(f"FLOPs per step = tokens x (6 N + 12 L T d) = {tokens} x (6 x {n_linear / 1e6:.2f}M + 12 x {args.layers} x "
          f"{args.seq_len} x {args.hidden}) = {flops / 1e12:.3f} TFLOP")
    peak_note = (f"yardstick torch.mm {YARDSTICK_N}^2 {args.dtype} (measured each round)" if device.type == "cpu" else
                 f"device peak {args.peak_tflops:g} TFLOP/s (MFU; yardstick torch.mm {YARDSTICK_N}^2 printed beside)")
    print(f"machine: {torch.cuda.get_device_name(0) if device.type == 'cuda' else cpu_model()}, "
          f"{os.cpu_count()} CPUs; peak = {peak_note}")
    print(f"timing: 1 warm-up + {args.rounds} interleaved rounds (yardstick, project, floor) per thread count; medians")
    print(f"load average before {' '.join(f'{x:.2f}' for x in load0)}, after {' '.join(f'{x:.2f}' for x in load1)}")
    print()
    print("cpu s = CPU seconds of the process and its children (getrusage) per step; cores = cpu s / s/step (below "
          "the thread count: the threads did not get their cores); of peak (cpu) = FLOP per CPU second / the "
          "yardstick's, what the work reaches on the cores it got")
    print(f"{'threads':>7} {'variant':<8} {'s/step':>8} {'cpu s':>8} {'cores':>6} {'fwd s':>7} {'bwd s':>7} {'opt s':>7} "
          f"{'tokens/s':>9} {'TFLOP/s':>8} {'yard TFLOP/s':>12} {'of peak':>8} {'(cpu)':>6} {'vs floor':>8} {'(cpu)':>6}")
    verdicts = []
    for n, ((yard, yard_cpu), med, cpu, ph) in results.items():
        peak = yard if device.type == "cpu" else args.peak_tflops * 1e12
        for name in steps:
            achieved = flops / med[name]
            print(f"{n:>7} {name:<8} {med[name]:>8.3f} {cpu[name]:>8.3f} {cpu[name] / med[name]:>6.2f} "
                  f"{ph[name]['forward']:>7.3f} {ph[name]['backward']:>7.3f} "
                  f"{ph[name]['optimizer']:>7.3f} {tokens / med[name]:>9.0f} {achieved / 1e12:>8.4f} "
                  f"{yard / 1e12:>12.4f} {achieved / peak:>8.3f} {flops / cpu[name] / yard_cpu:>6.3f} "
                  f"{med[name] / med['floor']:>8.3f} {cpu[name] / cpu['floor']:>6.3f}")
        frac = flops / med["project"] / peak
        ratio = med["project"] / med["floor"]
        label = "of peak" if device.type == "cpu" else f"MFU (peak {args.peak_tflops:g} TFLOP/s)"
        cores = cpu["project"] / med["project"]
        competed = (f"; the threads got {cores:.2f} of {n} core(s): per CPU second "
                    f"{flops / cpu['project'] / yard_cpu:.3f} of peak, {cpu['project'] / cpu['floor']:.3f} x the floor"
                    if device.type == "cpu" and cores < 0.9 * n else "")
        verdicts.append(f"project {label} at {n} thread(s) = {frac:.3f} (target >= {PEAK_FRACTION_TARGET}): "
                        f"{'PASS' if frac >= PEAK_FRACTION_TARGET else 'MISS'}{competed}")
        verdicts.append(f"project/floor step time at {n} thread(s) = {ratio:.3f} (target <= {FLOOR_RATIO_TARGET}): "
                        f"{'PASS' if ratio <= FLOOR_RATIO_TARGET else 'MISS'}")
    print()
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")
    if device.type == "cpu" and max(load0[0], load1[0]) > (os.cpu_count() or 1) + 0.5:
        print("[note] the load average exceeds the CPU count: other processes share the cores, figures are noisy")
    for line in verdicts:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
