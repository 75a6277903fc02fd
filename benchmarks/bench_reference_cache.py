"""Time per optimizer step of alpha-dpo with the cached reference vs a live reference forward.

    .venv/bin/python benchmarks/bench_reference_cache.py                        # tiny Llama, ZeRO-3, CPU, ~1 min
    .venv/bin/python benchmarks/bench_reference_cache.py --zero-stage 0 --batch 8
    .venv/bin/python benchmarks/bench_reference_cache.py --device cuda --model /path/to/hf-model --batch 8

One process builds the policy engine the way every Ray Train worker does
(`alphadpo_ray.training.engine.build_policy_engine` from an `ExperimentConfig`: same DeepSpeed config, AdamW,
schedule; ZeRO-3 by default, as the project's config), on a single-process group (gloo on CPU, nccl
with --device cuda), with the recipe's per-worker torch threads (1 for the default 1 CPU per worker).
The reference is the same weights loaded separately (`alphadpo_ray.ml.models.load_model(path,
eval_mode=True)`): a whole, plain module, i.e. the cheapest reference forward the live variant can
have (no ZeRO-3 gathering), so the comparison leans towards the live variant. The batch is `--batch`
synthetic pairs (random token ids; fixed prompt and response lengths, so no padding), collated with
`alphadpo_ray.ml.data.collate_pairs`. One optimizer step, both variants, as in `alphadpo_ray.training.recipe`
(one micro-batch, no accumulation; collation and the divergence check included):

  cached  collate (rows carry ref_chosen_logps / ref_rejected_logps) -> sequence_logps(policy) on the
          concatenated chosen+rejected batch -> alpha-dpo loss with the cached reference log-probs ->
          engine.backward -> engine.step
  live    the same, with rows that carry no reference columns, plus sequence_logps(reference) under
          no_grad on every step (TRL-style: the reference forward runs inside the training step)

Both variants drive the same engine (one model, one optimizer), interleaved after a shared warmup
(blocks of --steps/--blocks steps, order flipping every block: c l l c c l ...), so drift in machine
load hits both alike. Each step is timed on its own (CUDA synchronised); medians are the headline,
and tokens/s per worker = the step's attention-mask tokens (as the recipe counts) / median step time.
The cache's one-time cost is one no-grad reference pass over the pairs (what
`reference_cache.score_rows` does once per dataset, then reused by every epoch and sweep trial).

Expected ratio: a step is policy forward F + backward (~2F) + optimizer step and per-step overheads
O (ZeRO-3 parameter gathering/partitioning included); the live variant adds a no-grad reference
forward R (a bit under F), so cached/live = (3F + O) / (3F + O + R) ~ 0.75 at best, and <= 0.8 only
while O stays under about half a forward. O grows with the parameter count and F with the tokens per
step, so few tokens per step (small --batch/--seq-len) push the ratio towards 1; gradient
checkpointing (a second policy forward) also raises it.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TARGET = 0.8
HPARAMS = {"beta": 2.5, "gamma_beta_ratio": 0.3, "alpha": 0.2}


def _init_process_group(device: str) -> None:
    """A single-process group (world 1), as the project's one-worker paths make it (DeepSpeed's CPU
    communication op is not JIT-built: see `alphadpo_ray.ml.distributed.skip_cpu_comm_ops`)."""
    from alphadpo_ray.ml import distributed

    if device == "cuda":
        import torch

        torch.cuda.set_device(0)
    distributed.init_process_group(device == "cuda", single_process=True)


def _synthetic_texts(n: int, seed: int) -> list[str]:
    """Random 'words' so that byte-level BPE has enough distinct merges to reach the vocab size."""
    rng = random.Random(seed)
    letters = string.ascii_lowercase
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(3000)]
    return [" ".join(rng.choice(words) for _ in range(40)) for _ in range(n)]


def _build_model_dir(path: Path, args) -> None:
    from alphadpo_ray.ml.models import build_tiny_model, build_tokenizer

    tokenizer = build_tokenizer(_synthetic_texts(2000, args.seed), vocab_size=args.vocab)
    model = build_tiny_model("llama", tokenizer, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                             intermediate_size=3 * args.hidden, max_position_embeddings=max(512, args.seq_len),
                             seed=args.seed)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def _model_facts(path: str) -> tuple[int, int]:
    """(vocab size, pad id) of a saved causal LM, from its config."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    pad = cfg.pad_token_id if isinstance(getattr(cfg, "pad_token_id", None), int) else None
    if pad is None:
        eos = getattr(cfg, "eos_token_id", None)
        pad = eos[0] if isinstance(eos, (list, tuple)) else (eos if isinstance(eos, int) else 0)
    return int(cfg.vocab_size), int(pad)


def _pairs(n: int, prompt_len: int, response_len: int, vocab: int, pad_id: int, seed: int) -> list[dict]:
    """Random-token pairs of fixed lengths; ids avoid the pad id and the (low) special-token ids."""
    import torch

    g = torch.Generator().manual_seed(seed)
    low = min(16, vocab - 2)

    def ids(k):
        x = torch.randint(low, vocab, (k,), generator=g)
        return torch.where(x == pad_id, torch.full_like(x, low if pad_id != low else low + 1), x).tolist()

    return [{"row": i, "prompt_ids": ids(prompt_len), "chosen_ids": ids(response_len),
             "rejected_ids": ids(response_len)} for i in range(n)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="local HF causal-LM directory (default: build a tiny Llama)")
    p.add_argument("--hidden", type=int, default=256, help="tiny Llama hidden size (intermediate = 3x)")
    p.add_argument("--layers", type=int, default=4, help="tiny Llama decoder layers")
    p.add_argument("--heads", type=int, default=4, help="tiny Llama attention heads")
    p.add_argument("--vocab", type=int, default=1024, help="tiny tokenizer vocab size (BPE on synthetic text)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (prompt + response)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default: half of --seq-len)")
    p.add_argument("--batch", type=int, default=4, help="pairs per optimizer step (2x sequences per forward)")
    p.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    p.add_argument("--blocks", type=int, default=None,
                   help="alternating blocks per variant (steps are split over them; default: one step per block, "
                        "i.e. fully interleaved c l l c c l ...)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each variant first")
    p.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3], help="project default: 3")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", default=None, action=argparse.BooleanOptionalAction,
                   help="bf16 engine and reference (default: on for cuda, off for cpu)")
    p.add_argument("--optimizer", default="auto", choices=["auto", "torch", "deepspeed"],
                   help="deepspeed.optimizer of the config (auto: torch AdamW on CPU, DeepSpeed's on GPU)")
    p.add_argument("--chunk-size", type=int, default=512, help="training.logprob_chunk_size")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="training.gradient_checkpointing, with the policy put in train mode so that HF applies it")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads on CPU (default 1: what the recipe sets for the default "
                        "ray.resources_per_worker {CPU: 1}; 0 leaves torch's own choice)")
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.blocks = args.steps if args.blocks is None else args.blocks
    if args.steps < 1 or args.blocks < 1 or args.warmup < 0 or args.batch < 1:
        p.error("--steps, --blocks, --batch must be >= 1 and --warmup >= 0")
    prompt_len = args.seq_len // 2 if args.prompt_len is None else args.prompt_len
    response_len = args.seq_len - prompt_len
    if prompt_len < 1 or response_len < 1:
        p.error(f"--prompt-len {prompt_len} must leave at least one response token in --seq-len {args.seq_len}")
    bf16 = (args.device == "cuda") if args.bf16 is None else args.bf16

    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from alphadpo_ray.config.experiment import config_from_dict
    from alphadpo_ray.ml.data import collate_pairs
    from alphadpo_ray.training.engine import build_policy_engine, deepspeed_config, quiet_logs
    from alphadpo_ray.ml.logprobs import sequence_logps
    from alphadpo_ray.ml.losses import build_loss
    from alphadpo_ray.ml.models import load_model

    quiet_logs()
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with tempfile.TemporaryDirectory(prefix="bench-refcache-") as tmp:
        if args.model:
            model_path, model_desc = str(Path(args.model).expanduser()), args.model
        else:
            model_path = str(Path(tmp) / "tiny")
            _build_model_dir(Path(model_path), args)
            model_desc = (f"tiny Llama (hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
                          f"intermediate {3 * args.hidden}, built locally)")
        vocab, pad_id = _model_facts(model_path)

        _init_process_group(args.device)
        n_steps_total = 2 * (args.warmup + args.steps) + 1
        config = config_from_dict({
            "name": "bench-reference-cache",
            "model": {"name_or_path": model_path},
            "method": {"name": "alpha-dpo", **HPARAMS},
            "training": {"per_device_train_batch_size": args.batch, "total_batch_size": args.batch,
                         "learning_rate": args.learning_rate, "bf16": bf16, "max_steps": n_steps_total,
                         "logprob_chunk_size": args.chunk_size, "gradient_checkpointing": args.gradient_checkpointing},
            "deepspeed": {"zero_stage": args.zero_stage, "optimizer": args.optimizer},
            "ray": {"num_workers": 1, "use_gpu": args.device == "cuda"},
            "tracking": {"enabled": False},
        }, source="bench_reference_cache")
        dtype = torch.bfloat16 if bf16 else torch.float32

        # The reference is loaded first: while the engine's ZeRO-3 handle (HfDeepSpeedConfig) is alive,
        # from_pretrained would create it partitioned too. A whole, plain reference is the cheapest
        # forward the live variant can have (no ZeRO-3 gather hooks), so the comparison favours it.
        t0 = time.perf_counter()
        reference = load_model(model_path, dtype=dtype, eval_mode=True).to(device)
        sync()
        ref_load_s = time.perf_counter() - t0
        n_params = sum(p.numel() for p in reference.parameters())
        t0 = time.perf_counter()
        engine, _zero3_handle = build_policy_engine(config, model_path, n_steps_total)
        engine_s = time.perf_counter() - t0
        if args.gradient_checkpointing:
            # from_pretrained leaves the module in eval mode and the recipe never calls train(); HF runs
            # its gradient checkpointing only in training mode, so switch it on here to measure it at all.
            engine.train()

        pairs = _pairs(args.batch, prompt_len, response_len, vocab, pad_id, args.seed)
        chunk = config.training.logprob_chunk_size

        # --- the cache: one no-grad reference pass over the pairs (what reference_cache does, once) --------
        def reference_pass():
            batch = collate_pairs(pairs, pad_id)
            with torch.no_grad():
                res = sequence_logps(reference, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                     batch["response_mask"].to(device), chunk_size=chunk)
            sync()
            return res

        reference_pass()  # first call: kernel warmup and the decoder/head probe, not part of the figure
        cache_times = []
        for _ in range(3):
            t0 = time.perf_counter()
            res = reference_pass()
            cache_times.append(time.perf_counter() - t0)
        b = args.batch
        cached_rows = [{**e, "ref_chosen_logps": float(res.logps[i]), "ref_rejected_logps": float(res.logps[b + i])}
                       for i, e in enumerate(pairs)]

        loss_fns = {v: build_loss("alpha-dpo", **HPARAMS) for v in ("cached", "live")}

        # --- one optimizer step, as in alphadpo_ray.training.recipe --------------------------------------------------
        def step(variant: str) -> tuple[float, float, int]:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            batch = collate_pairs(cached_rows if variant == "cached" else pairs, pad_id)
            ids = batch["input_ids"].to(device)
            am, rm = batch["attention_mask"].to(device), batch["response_mask"].to(device)
            out = sequence_logps(engine.module, ids, am, rm, chunk_size=chunk)
            n = ids.shape[0] // 2
            if variant == "live":
                with torch.no_grad():
                    ref = sequence_logps(reference, ids, am, rm, chunk_size=chunk)
                ref_c, ref_j = ref.logps[:n], ref.logps[n:]
            else:
                ref_c, ref_j = batch["ref_chosen_logps"].to(device), batch["ref_rejected_logps"].to(device)
            result = loss_fns[variant](out.logps[:n], out.logps[n:], ref_c, ref_j, out.lengths[:n], out.lengths[n:])
            finite = bool(torch.isfinite(result.loss))  # the recipe's divergence check (a sync point)
            engine.backward(result.loss)
            engine.step()
            loss = result.loss.item()
            sync()
            seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
            if not finite or loss != loss:
                print(f"[warn] non-finite loss in a {variant} step (timing still counts)", flush=True)
            return seconds, cpu_seconds, int(batch["attention_mask"].sum())

        for _ in range(args.warmup):
            for variant in ("cached", "live"):
                step(variant)

        times: dict[str, list[float]] = {"cached": [], "live": []}
        cpu_times: dict[str, list[float]] = {"cached": [], "live": []}
        tokens: dict[str, list[int]] = {"cached": [], "live": []}
        per_block = [len(r) for r in _split(args.steps, args.blocks)]
        for k, n_block in enumerate(per_block):
            order = ("cached", "live") if k % 2 == 0 else ("live", "cached")
            for variant in order:
                for _ in range(n_block):
                    s, c, tok = step(variant)
                    times[variant].append(s)
                    cpu_times[variant].append(c)
                    tokens[variant].append(tok)

        # --- report ------------------------------------------------------------------------------------------
        ds = deepspeed_config(config)
        print(f"model: {model_desc}; vocab {vocab}, {n_params / 1e6:.2f}M parameters, dtype {dtype}")
        print(f"batch: {args.batch} pairs x (prompt {prompt_len} + response {response_len}) tokens = "
              f"{2 * args.batch} sequences of {args.seq_len}, {tokens['cached'][0]} tokens per step; "
              f"random token ids, collate_pairs")
        print(f"engine: DeepSpeed ZeRO-{args.zero_stage}, {'bf16' if bf16 else 'fp32'}, optimizer "
              f"{'DeepSpeed AdamW' if 'optimizer' in ds else 'torch.optim.AdamW'} (lr {args.learning_rate}), "
              f"grad clip {ds['gradient_clipping']}, accumulation {ds['gradient_accumulation_steps']}, "
              f"gradient checkpointing {'on (module in train mode)' if args.gradient_checkpointing else 'off'}, "
              f"logprob chunk {chunk}; 1 process ({'nccl' if device.type == 'cuda' else 'gloo'}), "
              f"device {device}, torch threads {torch.get_num_threads()}")
        sizes = sorted(set(per_block))
        print(f"loss: alpha-dpo {HPARAMS}; timing: {args.warmup} warmup + {args.steps} timed steps per variant "
              f"in {len(per_block)} alternating blocks of {'/'.join(map(str, sizes))} step(s) "
              f"(order flips each block: c l l c ...)")
        print(f"setup: engine build {engine_s:.1f} s, reference load {ref_load_s:.1f} s; "
              f"load average at start {load0:.1f}, at end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print()
        print(f"{'variant':<8} {'median s/step':>14} {'mean s/step':>12} {'min':>7} {'max':>7} "
              f"{'cpu s/step':>11} {'tokens/s/worker':>16} {'vs live':>8}")
        med = {v: statistics.median(times[v]) for v in times}
        cpu = {v: statistics.median(cpu_times[v]) for v in cpu_times}
        for v in ("cached", "live"):
            tps = statistics.median(tokens[v]) / med[v]  # tokens of one step / median step time
            print(f"{v:<8} {med[v]:>14.4f} {statistics.fmean(times[v]):>12.4f} {min(times[v]):>7.4f} "
                  f"{max(times[v]):>7.4f} {cpu[v]:>11.4f} {tps:>16.0f} {med[v] / med['live']:>8.3f}")
        ratio = med["cached"] / med["live"]
        mean_ratio = statistics.fmean(times["cached"]) / statistics.fmean(times["live"])
        print()
        cache_s = statistics.median(cache_times)
        saved = med["live"] - med["cached"]
        print(f"one-time cache cost (no-grad reference pass over these {args.batch} pairs, median of 3): "
              f"{cache_s:.4f} s = {cache_s / med['live']:.2f} live steps; the live variant spends "
              f"{saved:+.4f} s/step more than the cached one")
        print(f"other estimators: mean-based ratio {mean_ratio:.3f}; process-CPU-time ratio "
              f"{cpu['cached'] / cpu['live']:.3f} (less sensitive to other load; on cuda it only counts the host)")
        print(f"total wall time {time.perf_counter() - t_start:.0f} s")
        if os.getloadavg()[0] > (os.cpu_count() or 1) + 0.5 and device.type == "cpu":
            print(f"[note] the load average exceeds the CPU count: other processes share the cores and the "
                  f"wall-clock figures are noisy; rerun on an idle machine")
        print(f"ratio cached/live step time: {ratio:.2f} (target <= {TARGET})")
        del engine, reference
    return 0


def _split(total: int, parts: int) -> list[range]:
    parts = min(parts, total)
    bounds = [round(i * total / parts) for i in range(parts + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


if __name__ == "__main__":
    raise SystemExit(main())
