"""Peak memory and fwd+bwd time of chunked response log-probs vs the straightforward full log-softmax.

    .venv/bin/python benchmarks/bench_logprobs.py                      # V=32000, T=1024, 4 sequences, CPU
    .venv/bin/python benchmarks/bench_logprobs.py --chunk-size 256,512,1024 --batch 8
    .venv/bin/python benchmarks/bench_logprobs.py --memory-budget-mb 0,128,512 --time-rounds 7
    .venv/bin/python benchmarks/bench_logprobs.py --device cuda --dtype bfloat16

Random final hidden states [B, T, H] and a random output head Linear(H, V) stand in for a model
(the decoder's own memory is the same on both paths). Variants:
  straight  logits = head(h) [B, T, V] -> log_softmax -> gather -> masked sum over tokens
  chunked   alphadpo_ray.ml.logprobs.chunked_token_logps(h, head, ..., chunk_size, memory_budget_mb) -> sum
each in "fwd" (no grad) and "fwd+bwd" (grad w.r.t. h and the head weight; chunks keep their logits
while they fit the memory budget, the rest are checkpointed and recompute them in backward), for each
--memory-budget-mb (the memory target is read at the project's default budget).

Time: one more subprocess times fwd+bwd of the straightforward head ("unchunked"), the chunked head
with budget 0 (every chunk recomputed, the behaviour before the budget), with the default budget and
with a budget that holds all the logits (run as one chunk), interleaved round by round (A B C D A B C
D ...), first round dropped as warmup; medians of wall and process-CPU seconds.

Every (variant, mode) runs in a fresh subprocess so that one run's allocations and allocator caches
cannot hide another's. Peak extra memory = peak minus the memory held once the inputs exist:
  cpu:  the kernel's resident-set high-water mark (VmHWM) is reset via /proc/self/clear_refs after
        the inputs are built, then read back (fallback: ru_maxrss growth, which may under-report).
        Workers run with MALLOC_MMAP_THRESHOLD_=1 MiB so that glibc returns freed tensor blocks to the
        kernel; with its default dynamic threshold, freed blocks under 32 MiB stay in its heap and the
        RSS peak then also counts allocator retention (see --glibc-default-malloc);
  cuda: torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated() after reset_peak_memory_stats.
Values (per-sequence sums, and for fwd+bwd both gradients) are compared across variants.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SPEED_TARGET = 1.1  # chunked head whose logits all fit the budget vs the unchunked head, fwd+bwd CPU time


# ---------------------------------------------------------------------------------------------- worker


def _status_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


class _CpuPeak:
    """Peak RSS growth over a block: VmHWM reset through clear_refs, else ru_maxrss growth."""

    def __enter__(self):
        self.rss0 = _status_kib("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM reset"
        except OSError:
            self.method = "ru_maxrss growth (lower bound)"
        self.max0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc):
        if self.method == "VmHWM reset":
            self.extra_mib = (_status_kib("VmHWM") - self.rss0) / 1024
        else:
            self.extra_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.max0) / 1024
        return False


class _CudaPeak:
    def __enter__(self):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()
        self.method = "torch.cuda.max_memory_allocated"
        return self

    def __exit__(self, *exc):
        import torch

        torch.cuda.synchronize()
        self.extra_mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return False


def worker(args) -> None:
    import torch

    from alphadpo_ray.ml.logprobs import chunked_token_logps

    torch.manual_seed(0)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    B, T, H, V = args.batch, args.tokens, args.hidden, args.vocab
    grad = args.mode == "fwd+bwd"
    hidden = torch.randn(B, T, H, device=dev, dtype=dtype).requires_grad_(grad)
    head = torch.nn.Linear(H, V, bias=False).to(device=dev, dtype=dtype).requires_grad_(grad)
    targets = torch.randint(0, V, (B, T), device=dev)
    mask = torch.zeros(B, T, dtype=torch.bool, device=dev)
    n_prompt = int(T * (1 - args.response_frac))
    mask[:, n_prompt:] = True

    def straight():
        logits = head(hidden).float()
        tok = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return (tok * mask).sum(-1)

    def chunked():
        return chunked_token_logps(hidden, head, targets, mask, chunk_size=args.chunk_size,
                                   memory_budget_mb=args.memory_budget_mb).sum(-1)

    fn = straight if args.variant == "straight" else chunked
    # warm up kernels / thread pools at a tiny size so their one-off allocations are not counted
    with torch.no_grad():
        small = torch.nn.Linear(H, 64, bias=False).to(device=dev, dtype=dtype)
        torch.log_softmax(small(hidden[:1, :8]).float(), -1)
        chunked_token_logps(hidden[:1, :8], small, targets[:1, :8] % 64, chunk_size=4)

    peak = _CudaPeak() if dev.type == "cuda" else _CpuPeak()
    t0 = time.perf_counter()
    with peak:
        if grad:
            out = fn()
            out.sum().backward()
        else:
            with torch.no_grad():
                out = fn()
    seconds = time.perf_counter() - t0
    result = {"extra_mib": peak.extra_mib, "method": peak.method, "seconds": seconds}
    save = {"logps": out.detach().cpu()}
    if grad:
        save["grad_hidden"] = hidden.grad.cpu()
        save["grad_head"] = head.weight.grad.cpu()
    torch.save(save, args.out)
    print(json.dumps(result))


def timing_worker(args) -> None:
    """fwd+bwd seconds of the unchunked head and the chunked head at several budgets, interleaved."""
    import statistics

    import torch

    from alphadpo_ray.ml.logprobs import chunked_token_logps

    torch.manual_seed(0)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    B, T, H, V = args.batch, args.tokens, args.hidden, args.vocab
    hidden = torch.randn(B, T, H, device=dev, dtype=dtype, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=False).to(device=dev, dtype=dtype)
    targets = torch.randint(0, V, (B, T), device=dev)
    mask = torch.zeros(B, T, dtype=torch.bool, device=dev)
    mask[:, int(T * (1 - args.response_frac)):] = True
    all_mib = int(mask.sum()) * V * 4 / 2**20 + 1  # every response token's float32 logits fit

    def unchunked():
        tok = torch.log_softmax(head(hidden).float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return (tok * mask).sum()

    def chunked(budget):
        return lambda: chunked_token_logps(hidden, head, targets, mask, chunk_size=args.chunk_size,
                                           memory_budget_mb=budget).sum()

    variants = {"unchunked": unchunked, "chunked, budget 0 (recompute)": chunked(0.0),
                f"chunked, budget {args.memory_budget_mb:g} MiB (default)": chunked(args.memory_budget_mb),
                f"chunked, budget {all_mib:.0f} MiB (all kept)": chunked(all_mib)}
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for r in range(args.time_rounds + 1):
        for name, fn in variants.items():
            hidden.grad = head.weight.grad = None
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            fn().backward()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if r:  # round 0 is warmup
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    print(json.dumps({k: [statistics.median(wall[k]), statistics.median(cpu[k])] for k in variants}))


# ---------------------------------------------------------------------------------------------- driver


def _worker_cmd(args, *extra: str) -> list[str]:
    return [
        sys.executable, __file__, "--vocab", str(args.vocab), "--tokens", str(args.tokens),
        "--batch", str(args.batch), "--hidden", str(args.hidden), "--device", args.device, "--dtype", args.dtype,
        "--response-frac", str(args.response_frac), *extra,
    ]


def _run_worker(args, cmd: list[str], what: str) -> dict:
    env = dict(os.environ)
    if args.device == "cpu" and not args.glibc_default_malloc:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"worker {what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_one(args, variant: str, mode: str, chunk_size: int, budget: float, out: str) -> dict:
    cmd = _worker_cmd(args, "--worker", "--variant", variant, "--mode", mode, "--out", out,
                      "--chunk-size", str(chunk_size), "--memory-budget-mb", str(budget))
    return _run_worker(args, cmd, f"{variant}/{mode}")


def main(argv=None) -> int:
    from alphadpo_ray.ml.logprobs import DEFAULT_MEMORY_BUDGET_MB

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tokens", type=int, default=1024, help="sequence length T")
    p.add_argument("--batch", type=int, default=4, help="sequences")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--chunk-size", default="512", help="tokens per chunk; a comma list compares several")
    p.add_argument("--memory-budget-mb", default=f"0,{DEFAULT_MEMORY_BUDGET_MB:g}",
                   help="MiB of logits chunks may keep for the backward; a comma list compares several "
                        f"(the memory target is read at the default, {DEFAULT_MEMORY_BUDGET_MB:g})")
    p.add_argument("--time-rounds", type=int, default=5, help="timed fwd+bwd rounds per variant (0: skip timing)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--response-frac", type=float, default=1.0,
                   help="fraction of each sequence that is response (1.0: every position counts, so chunking "
                        "gets no help from skipping prompt tokens)")
    p.add_argument("--glibc-default-malloc", action="store_true",
                   help="cpu: keep glibc's dynamic mmap threshold (blocks under 32 MiB freed to its heap are kept "
                        "resident, so RSS also counts allocator retention, not only live tensors)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--timing-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=["straight", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["fwd", "fwd+bwd"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker or args.timing_worker:
        args.chunk_size = int(args.chunk_size)
        args.memory_budget_mb = float(args.memory_budget_mb)
        (worker if args.worker else timing_worker)(args)
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible (torch.cuda.is_available() is False)")
    chunk_sizes = [int(c) for c in str(args.chunk_size).split(",")]
    budgets = [float(b) for b in str(args.memory_budget_mb).split(",")]
    if DEFAULT_MEMORY_BUDGET_MB not in budgets:
        budgets.append(DEFAULT_MEMORY_BUDGET_MB)
    load0 = os.getloadavg()
    print(f"vocab {args.vocab}, tokens {args.tokens}, batch {args.batch}, hidden {args.hidden}, "
          f"dtype {args.dtype}, device {args.device}, response fraction {args.response_frac}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"machine: {_cpu_model()}, {os.cpu_count()} CPUs; load average before "
          f"{' '.join(f'{x:.2f}' for x in load0)}")
    print(f"one [B, T, V] float32 tensor = {args.batch * args.tokens * args.vocab * 4 / 2**20:.0f} MiB")
    rows, method, ratios, match = [], None, {}, True
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("fwd", "fwd+bwd"):
            ref_file = os.path.join(tmp, f"straight-{mode}.pt")
            base = run_one(args, "straight", mode, chunk_sizes[0], 0.0, ref_file)
            method = base["method"]
            rows.append(("straight", "-", "-", mode, base["extra_mib"], base["seconds"], 1.0, "reference"))
            ref = torch.load(ref_file)
            for cs in chunk_sizes:
                for budget in budgets if mode == "fwd+bwd" else budgets[:1]:  # no grad: nothing is kept
                    f = os.path.join(tmp, f"chunked-{mode}-{cs}-{budget}.pt")
                    res = run_one(args, "chunked", mode, cs, budget, f)
                    got = torch.load(f)
                    ok = all(torch.allclose(got[k].float(), ref[k].float(),
                                            rtol=1e-4 if args.dtype == "float32" else 2e-2,
                                            atol=1e-4 if args.dtype == "float32" else 1e-1) for k in ref)
                    diff = max((got[k].float() - ref[k].float()).abs().max().item() for k in ref)
                    match &= ok
                    ratio = res["extra_mib"] / base["extra_mib"]
                    if mode == "fwd" or budget == DEFAULT_MEMORY_BUDGET_MB:
                        ratios.setdefault(cs, []).append(ratio)
                    rows.append(("chunked", str(cs), "-" if mode == "fwd" else f"{budget:g}", mode, res["extra_mib"],
                                 res["seconds"], ratio, f"{'match' if ok else 'MISMATCH'} (max|diff| {diff:.1e})"))
    malloc = "" if args.device != "cpu" else (", glibc default malloc" if args.glibc_default_malloc
                                              else ", MALLOC_MMAP_THRESHOLD_=1MiB")
    print(f"peak extra memory via {method}{malloc}\n")
    print(f"{'variant':<9} {'chunk':>6} {'budget':>7} {'mode':<8} {'peak extra MiB':>15} {'seconds':>8} "
          f"{'ratio':>6}  values")
    for v, cs, budget, mode, mib, sec, ratio, note in rows:
        print(f"{v:<9} {cs:>6} {budget:>7} {mode:<8} {mib:>15.1f} {sec:>8.2f} {ratio:>6.3f}  {note}")
    print()

    speed = None
    if args.time_rounds > 0:
        timed = _run_worker(args, _worker_cmd(args, "--timing-worker", "--chunk-size", str(chunk_sizes[0]),
                                              "--memory-budget-mb", str(DEFAULT_MEMORY_BUDGET_MB),
                                              "--time-rounds", str(args.time_rounds)), "timing")
        base_wall, base_cpu = timed["unchunked"]
        print(f"fwd+bwd time, chunk {chunk_sizes[0]}, {args.time_rounds} interleaved rounds after 1 warmup, medians:")
        print(f"{'variant':<40} {'wall s':>8} {'cpu s':>8} {'wall/unchunked':>15} {'cpu/unchunked':>14}")
        for name, (wall, cpu) in timed.items():
            print(f"{name:<40} {wall:>8.3f} {cpu:>8.3f} {wall / base_wall:>15.2f} {cpu / base_cpu:>14.2f}")
        speed = list(timed.values())[-1][1] / base_cpu
        print()

    load1 = os.getloadavg()
    print(f"load average after {' '.join(f'{x:.2f}' for x in load1)}")
    print(f"values match the straightforward computation: {'yes' if match else 'NO'}")
    worst = max(ratios[chunk_sizes[0]])
    print(f"peak memory chunked/straightforward = {worst:.3f} (chunk {chunk_sizes[0]}, default budget "
          f"{DEFAULT_MEMORY_BUDGET_MB:g} MiB, worst of fwd and fwd+bwd; target <= 0.25): "
          f"{'PASS' if worst <= 0.25 else 'MISS'}")
    if speed is not None:
        print(f"fwd+bwd cpu time chunked (all logits within the budget)/unchunked = {speed:.2f} "
              f"(target <= {SPEED_TARGET}): {'PASS' if speed <= SPEED_TARGET else 'MISS'}")
    return 0 if match else 1


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    raise SystemExit(main())
