"""The project's training step against TRL's DPOTrainer step and a plain-PyTorch floor, per vocabulary.

    .venv/bin/python benchmarks/bench_vs_trl.py                          # vocab 512, 32k, 128k, 256k: ~30 min, CPU
    .venv/bin/python benchmarks/bench_vs_trl.py --vocabs 512,128256      # the two targets' cases: ~12 min
    .venv/bin/python benchmarks/bench_vs_trl.py --vocabs 512,32000       # ~4 min
    .venv/bin/python benchmarks/bench_vs_trl.py --device cuda --dtype bf16 --threads 0

Needs the `bench` extra (`pip install -e .[bench]`: trl==1.16.0). Per vocabulary, one fresh process builds
one tiny random Llama (transformers' LlamaConfig: --hidden, --layers, tied input/output embeddings unless
--no-tie-embeddings) and saves it; every variant loads those same weights, trains on the same batch
(--pairs preference pairs, prompt and response lengths drawn at random so the batch is padded as a real
one is; a word-level tokenizer with one token per id, so TRL's own tokenization yields exactly the ids
the project's rows hold, checked), with AdamW, the same constant learning rate, dtype and grad clip 1.0:

  project   the recipe's step (`alphadpo_ray.training.recipe.train_step`): `alphadpo_ray.training.engine.build_policy_engine`
            (DeepSpeed, ZeRO --zero-stage, single-process gloo group), `collate_pairs`, `sequence_logps`
            (chunked, training.logprob_chunk_size), alpha-dpo with the reference log-probs cached in the rows
            (scored once before timing, as `reference_cache` does), engine.backward + engine.step
  trl-pre   TRL DPOTrainer(precompute_ref_log_probs=True): TRL's own dataset preparation, precompute pass,
            dataloader and collator; each step is the body of transformers' Trainer loop: next batch ->
            trainer.training_step (forward, loss, backward) -> trainer._clip_grad_norm -> optimizer.step ->
            lr_scheduler.step -> model.zero_grad
  trl-live  the same with a live reference model (TRL loads its own copy)
  floor     the least work the step needs, no framework: pad to the longest row, the model body, the output
            head and log_softmax at response tokens only (one chunk, no recomputation, no extra metrics),
            gather, per-row sum, DPO loss with cached reference log-probs, backward, clip, torch.optim.AdamW

TRL's chunked head runs without Triton on CPU: it scores every position of the padded batch (prompt and
padding included) in [4096, 32768] fp32 tiles with several elementwise passes each, so at 128k and 256k
its steps take a minute or more on one core; that, not the project, is what makes the default run long.

Timing: one warm-up step of each variant (discarded), then --repeats rounds of project, trl-pre, trl-live,
floor (interleaved), each step timed on its own; medians. tokens/s = non-padding tokens per step / median.

Memory (same process, variants separated by measurement, not by process): before every build and every
step glibc's free memory is returned to the kernel (malloc_trim) and the resident-set high-water mark is
reset (/proc/self/clear_refs); state = RSS a variant adds over its build and its first step (weights,
optimizer moments, DeepSpeed buffers, TRL's reference copy), step = peak RSS growth during its steps,
peak = state + step. On cuda: torch.cuda allocator figures (memory_allocated deltas, max_memory_allocated).
The floor needs about 4 x response tokens x vocab x 4 bytes of logits; it is skipped (and said so) where that
exceeds 60 % of the memory available.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(REPO), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

from bench_logprobs import _cpu_model, _status_kib  # noqa: E402
from bench_reference_cache import HPARAMS, _init_process_group  # noqa: E402

VARIANTS = ("project", "trl-pre", "trl-live", "floor")
DEFAULT_VOCABS = "512,32000,128256,256000"
TARGET_TIME_LARGE = 0.3  # project / TRL step at 128k
TARGET_TIME_SMALL = 1.0  # project / TRL step at the small vocab
TARGET_MEMORY = 0.5  # project / TRL peak memory at 128k
H200_BF16_PEAK = 989e12
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3; the rest of the vocabulary is "t<id>"
PAD_ID, EOS_ID = 0, 2


# ----------------------------------------------------------------------------------------------- memory


class _Memory:
    """Resident-set (cpu) or allocator (cuda) accounting for one process, variant by variant."""

    def __init__(self, device):
        self.device = device
        self._libc = ctypes.CDLL("libc.so.6") if device.type == "cpu" else None

    def settle(self) -> float:
        """Current MiB after returning free memory (glibc arenas / CUDA cache) and resetting the peak."""
        import gc

        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated() / 2**20
        self._libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS") / 1024

    def now(self) -> float:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.memory_allocated() / 2**20
        return _status_kib("VmRSS") / 1024

    def peak(self) -> float:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        return _status_kib("VmHWM") / 1024


# ----------------------------------------------------------------------------------------------- data


def _pairs(n: int, vocab: int, seed: int, prompt_range, response_range) -> list[dict]:
    """Random-token pairs with varied lengths (the same lengths at every vocabulary); responses end with EOS
    (as TRL appends it)."""
    lengths, tokens = random.Random(seed), random.Random(seed + 1)

    def ids(k):
        return [tokens.randrange(len(SPECIALS), vocab) for _ in range(k)]

    shapes = [(lengths.randint(*prompt_range), lengths.randint(*response_range), lengths.randint(*response_range))
              for _ in range(n)]
    return [{"row": i, "prompt_ids": ids(p), "chosen_ids": ids(c - 1) + [EOS_ID], "rejected_ids": ids(r - 1) + [EOS_ID]}
            for i, (p, c, r) in enumerate(shapes)]


def _text(ids: list[int]) -> str:
    return "".join(SPECIALS[i] if i < len(SPECIALS) else f" t{i}" for i in ids)


def _build(path: Path, args, vocab: int) -> None:
    """A word-level tokenizer (token 't<i>' = id i) and a random Llama of that vocabulary, saved to `path`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = {tok: i for i, tok in enumerate(SPECIALS)}
    words.update({f"t{i}": i for i in range(len(SPECIALS), vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.padding_side = "right"
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=1024, tie_word_embeddings=args.tie_embeddings,
                      pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=EOS_ID)
    torch.manual_seed(args.seed)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    fast.save_pretrained(path)


# ----------------------------------------------------------------------------------------------- variants


def _project(path: str, args, rows: list[dict], device, dtype, total_steps: int):
    """The recipe's engine and step; the reference log-probs are scored once into the rows first."""
    import torch

    from alphadpo_ray.config.experiment import config_from_dict
    from alphadpo_ray.ml.data import collate_pairs
    from alphadpo_ray.training.engine import build_policy_engine
    from alphadpo_ray.ml.logprobs import sequence_logps
    from alphadpo_ray.ml.losses import build_loss

    _init_process_group(args.device)
    config = config_from_dict({
        "name": "bench-vs-trl", "model": {"name_or_path": path},
        "method": {"name": "alpha-dpo", **HPARAMS},
        "training": {"per_device_train_batch_size": args.pairs, "total_batch_size": args.pairs,
                     "learning_rate": args.learning_rate, "lr_scheduler_type": "constant", "warmup_ratio": 0.0,
                     "bf16": args.dtype == "bf16", "max_steps": total_steps, "max_grad_norm": 1.0,
                     **({"logprob_chunk_size": args.chunk_size} if args.chunk_size else {})},
        "deepspeed": {"zero_stage": args.zero_stage},
        "ray": {"num_workers": 1, "use_gpu": device.type == "cuda"},
        "tracking": {"enabled": False},
    }, source="bench_vs_trl")
    engine, handle = build_policy_engine(config, path, total_steps)
    # transformers' process-wide ZeRO-3 flag (set by `handle`) would make TRL treat its own plain models as
    # partitioned; it is set only while a project step runs (where the recipe has it set throughout)
    zero3 = _Zero3Flag(handle)
    chunk = config.training.logprob_chunk_size
    with torch.no_grad():  # the cache pass (reference = the initial weights), once, as reference_cache does
        b = collate_pairs(rows, PAD_ID)
        ref = sequence_logps(engine.module, b["input_ids"].to(device), b["attention_mask"].to(device),
                             b["response_mask"].to(device), chunk_size=chunk).logps
    n = len(rows)
    cached = [{**r, "ref_chosen_logps": float(ref[i]), "ref_rejected_logps": float(ref[n + i])}
              for i, r in enumerate(rows)]
    loss_fn = build_loss("alpha-dpo", **HPARAMS)

    def step() -> int:
        with zero3:
            return inner()

    def inner() -> int:
        batch = collate_pairs(cached, PAD_ID)
        ids = batch["input_ids"].to(device)
        out = sequence_logps(engine.module, ids, batch["attention_mask"].to(device),
                             batch["response_mask"].to(device), chunk_size=chunk)
        k = ids.shape[0] // 2
        result = loss_fn(out.logps[:k], out.logps[k:], batch["ref_chosen_logps"].to(device),
                         batch["ref_rejected_logps"].to(device), out.lengths[:k], out.lengths[k:])
        bool(torch.isfinite(result.loss))  # the recipe's divergence check (a sync point)
        engine.backward(result.loss)
        engine.step()
        result.loss.item()
        return int(batch["attention_mask"].sum())

    return step, (engine, handle), f"DeepSpeed ZeRO-{args.zero_stage}, logprob chunk {chunk}"


class _Zero3Flag:
    """Sets transformers' ZeRO-3 flag to `handle` inside the block and clears it outside."""

    def __init__(self, handle):
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        self.handle = handle
        unset_hf_deepspeed_config()

    def __enter__(self):
        from transformers.integrations.deepspeed import set_hf_deepspeed_config

        if self.handle is not None:
            set_hf_deepspeed_config(self.handle)

    def __exit__(self, *exc):
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        return False


def _trl(path: str, args, rows: list[dict], device, dtype, total_steps: int, precompute: bool, tmp: Path):
    """TRL's DPOTrainer on the same pairs (as text), driven through the body of Trainer's own loop."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = datasets.Dataset.from_list([{"prompt": _text(r["prompt_ids"]), "chosen": _text(r["chosen_ids"]),
                                        "rejected": _text(r["rejected_ids"])} for r in rows])
    cfg = DPOConfig(output_dir=str(tmp / f"trl-{precompute}"), per_device_train_batch_size=len(rows),
                    gradient_accumulation_steps=1, learning_rate=args.learning_rate, lr_scheduler_type="constant",
                    warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, max_steps=total_steps, beta=HPARAMS["beta"],
                    precompute_ref_log_probs=precompute, max_length=None, report_to=[], save_strategy="no",
                    logging_strategy="no", use_cpu=device.type == "cpu", bf16=args.dtype == "bf16",
                    disable_tqdm=True, dataloader_num_workers=0, seed=args.seed, optim="adamw_torch")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tokenizer)
    got = trainer.train_dataset[0]
    if [got["prompt_ids"], got["chosen_ids"]] != [rows[0]["prompt_ids"], rows[0]["chosen_ids"]]:
        raise SystemExit("TRL tokenized the pairs to other ids than the project's rows: the comparison is off")
    trainer.create_optimizer_and_scheduler(num_training_steps=total_steps)
    trainer.current_gradient_accumulation_steps = 1
    loader = trainer.get_train_dataloader()
    model = trainer.model
    batches = iter(())

    def step() -> int:
        nonlocal batches
        inputs = next(batches, None)
        if inputs is None:
            batches = iter(loader)
            inputs = next(batches)
        loss = trainer.training_step(model, inputs)
        trainer._clip_grad_norm(model)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()
        loss.item()
        return int(inputs["attention_mask"].sum())

    ref = "live reference (TRL's own copy)" if trainer.ref_model is not None else "precomputed reference"
    return step, trainer, f"TRL {__import__('trl').__version__} DPOTrainer, {ref}"


def _floor(path: str, args, rows: list[dict], device, dtype):
    """Plain PyTorch, the least work the step needs: the model body over the padded batch, the output
    head and log-softmax at response tokens only (one chunk), gather, per-row sum, DPO loss, AdamW."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    seqs = [r["prompt_ids"] + r["chosen_ids"] for r in rows] + [r["prompt_ids"] + r["rejected_ids"] for r in rows]
    starts = [len(r["prompt_ids"]) for r in rows] * 2
    width = max(map(len, seqs))

    def batch():
        ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros_like(ids)
        resp = torch.zeros_like(ids, dtype=torch.bool)
        for i, (s, p) in enumerate(zip(seqs, starts)):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
            resp[i, p:len(s)] = True
        return ids.to(device), mask.to(device), resp.to(device)

    def logps(ids, mask, resp):
        # the least work the step needs: the output head and its log-softmax at response tokens only
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        target = resp[:, 1:]
        logits = model.lm_head(hidden[target]).float()  # [response tokens, vocab]
        tok = logits.log_softmax(-1).gather(-1, ids[:, 1:][target].unsqueeze(-1)).squeeze(-1)
        row = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(target)[target]
        return torch.zeros(ids.shape[0], device=ids.device, dtype=tok.dtype).index_add(0, row, tok)

    with torch.no_grad():
        ref = logps(*batch())
    n = len(rows)

    def step() -> int:
        ids, mask, resp = batch()
        lp = logps(ids, mask, resp)
        margin = (lp[:n] - ref[:n]) - (lp[n:] - ref[n:])
        loss = -F.logsigmoid(HPARAMS["beta"] * margin).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        return int(mask.sum())

    return step, (model, optimizer), "plain PyTorch, logits at response tokens only, torch.optim.AdamW"


# ----------------------------------------------------------------------------------------------- worker


def _worker(args) -> dict:
    """One vocabulary, all variants in this (fresh) process; returns the figures as a dict."""
    import torch

    vocab = args.worker_vocab
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    from alphadpo_ray.training.engine import quiet_logs

    quiet_logs()
    mem = _Memory(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows = _pairs(args.pairs, vocab, args.seed, (args.prompt_min, args.prompt_max),
                  (args.response_min, args.response_max))
    n_tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    width = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows)
    total_steps = 2 * (1 + args.repeats) + 4
    out: dict = {"vocab": vocab, "tokens": n_tokens, "padded": 2 * len(rows) * width, "variants": {}}
    # the floor's logits at response tokens, their log-softmax and the two gradients, fp32
    response_tokens = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    floor_need = 4 * response_tokens * vocab * 4 / 2**20
    with tempfile.TemporaryDirectory(prefix="bench-vs-trl-") as tmp:
        path = Path(tmp) / "model"
        _build(path, args, vocab)
        n_params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(
            path).parameters())
        out["params"] = n_params
        steps, keep, state, desc = {}, {}, {}, {}
        # the project last: while its ZeRO-3 engine lives, from_pretrained would build the others partitioned
        for v in sorted(args.variants, key=lambda v: v == "project"):
            if v == "floor" and device.type == "cpu":
                avail = (_meminfo_mib("MemAvailable") or 0)
                if floor_need > 0.6 * avail:
                    out["variants"][v] = {"skipped": f"needs ~{floor_need / 1024:.1f} GiB of logits, "
                                                     f"{avail / 1024:.1f} GiB available"}
                    continue
            before = mem.settle()
            t0 = time.perf_counter()
            if v == "project":
                steps[v], keep[v], desc[v] = _project(str(path), args, rows, device, dtype, total_steps)
            elif v in ("trl-pre", "trl-live"):
                steps[v], keep[v], desc[v] = _trl(str(path), args, rows, device, dtype, total_steps,
                                                  v == "trl-pre", Path(tmp))
            else:
                steps[v], keep[v], desc[v] = _floor(str(path), args, rows, device, dtype)
            sync()
            state[v] = mem.settle() - before
            out["variants"][v] = {"desc": desc[v], "build_s": time.perf_counter() - t0, "times": [], "step_mib": []}

        steps = {v: steps[v] for v in args.variants if v in steps}  # interleave in the order given

        def timed(v):
            r = out["variants"][v]
            base = mem.settle()
            sync()
            t0 = time.perf_counter()
            r["tokens"] = steps[v]()
            sync()
            seconds = time.perf_counter() - t0
            r["step_mib"].append(mem.peak() - base)
            return seconds, mem.settle() - base

        for v in steps:  # warm-up: the first step also allocates the optimizer moments (persistent)
            seconds, grown = timed(v)
            state[v] += grown
            out["variants"][v]["warmup_s"] = seconds
        for _ in range(args.repeats):
            for v in steps:
                out["variants"][v]["times"].append(timed(v)[0])
        for v in steps:
            r = out["variants"][v]
            r["state_mib"] = state[v]
            r["step_mib"] = max(r["step_mib"])
            r["peak_mib"] = r["state_mib"] + r["step_mib"]
        keep.clear()
    return out


def _meminfo_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------------------------- driver


def _flops_per_step(r: dict, args) -> float:
    """6 x parameters x tokens (dense training FLOPs), the usual MFU convention."""
    return 6.0 * r["params"] * r["tokens"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocabs", default=DEFAULT_VOCABS, help="comma-separated vocabulary sizes")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (each: one step of every variant)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's own choice)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--tie-embeddings", default=True, action=argparse.BooleanOptionalAction,
                   help="tied input/output embeddings (halves the embedding memory of every variant)")
    p.add_argument("--pairs", type=int, default=16, help="preference pairs per step")
    p.add_argument("--prompt-min", type=int, default=24)
    p.add_argument("--prompt-max", type=int, default=72)
    p.add_argument("--response-min", type=int, default=40)
    p.add_argument("--response-max", type=int, default=104)
    p.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3], help="project default: 3")
    p.add_argument("--chunk-size", type=int, default=None, help="training.logprob_chunk_size (default: the config's)")
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_PEAK / 1e12,
                   help="device peak for MFU on cuda (default: H200 bf16 dense spec)")
    p.add_argument("--worker-vocab", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if set(args.variants) - set(VARIANTS) or "project" not in args.variants:
        p.error(f"--variants: a subset of {','.join(VARIANTS)} that includes project")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")

    if args.worker_vocab is not None:
        print("RESULT " + json.dumps(_worker(args)), flush=True)
        return 0

    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("bench_vs_trl needs TRL: pip install -e '.[bench]' (trl==1.16.0)")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible (torch.cuda.is_available() is false)")
    vocabs = [int(v) for v in args.vocabs.split(",") if v.strip()]
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    print(f"machine: {_cpu_model()}, {os.cpu_count()} CPUs; torch {torch.__version__}, trl {trl.__version__}; "
          f"torch threads {args.threads or 'default'}; device {args.device}, dtype {args.dtype}")
    print(f"model: random Llama, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, intermediate "
          f"{3 * args.hidden}, {'tied' if args.tie_embeddings else 'untied'} embeddings")
    print(f"batch: {args.pairs} pairs, prompt {args.prompt_min}-{args.prompt_max} + response "
          f"{args.response_min}-{args.response_max} tokens (random lengths, padded to the longest row); "
          f"AdamW lr {args.learning_rate} constant, grad clip 1.0; 1 warm-up + {args.repeats} interleaved rounds "
          f"of {', '.join(args.variants)}; one fresh process per vocabulary")
    print(f"load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)

    results = []
    for vocab in vocabs:
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--worker-vocab", str(vocab)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            raise SystemExit(f"vocab {vocab}: worker failed (exit {proc.returncode})")
        r = json.loads(line[len("RESULT "):])
        r["wall_s"] = time.perf_counter() - t0
        results.append(r)
        _print_case(r, args)

    load1 = os.getloadavg()
    print(f"\nload average at end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; "
          f"total wall time {time.perf_counter() - t_start:.0f} s")
    if args.device == "cpu" and max(load0[0], load1[0]) > (os.cpu_count() or 1) / max(1, args.threads or 1) + 0.5:
        print("[note] the load average exceeds what this run uses: other processes share the cores and the "
              "wall-clock figures are noisy; rerun on a quiet machine")
    _targets(results)
    return 0


def _med(r: dict, v: str) -> float | None:
    x = r["variants"].get(v, {})
    return statistics.median(x["times"]) if x.get("times") else None


def _print_case(r: dict, args) -> None:
    vocab = r["vocab"]
    print(f"\n== vocab {vocab}: {r['params'] / 1e6:.1f}M parameters, {r['tokens']} tokens per step "
          f"({r['padded']} with padding), case wall {r['wall_s']:.0f} s")
    mfu = args.device == "cuda"
    print(f"{'variant':<9} {'s/step':>8} {'min':>7} {'max':>7} {'tokens/s':>9} {'state MiB':>10} {'step MiB':>9} "
          f"{'peak MiB':>9} {'build s':>8}" + (f" {'MFU':>6}" if mfu else ""))
    ordered = [(v, r["variants"][v]) for v in VARIANTS if v in r["variants"]]
    for v, x in ordered:
        if "skipped" in x:
            print(f"{v:<9} skipped: {x['skipped']}")
            continue
        med = _med(r, v)
        line = (f"{v:<9} {med:>8.3f} {min(x['times']):>7.3f} {max(x['times']):>7.3f} {x['tokens'] / med:>9.0f} "
                f"{x['state_mib']:>10.0f} {x['step_mib']:>9.0f} {x['peak_mib']:>9.0f} {x['build_s']:>8.1f}")
        if mfu:
            line += f" {_flops_per_step(r, args) / med / (args.peak_tflops * 1e12):>6.1%}"
        print(line)
    if mfu:
        print(f"MFU = 6 x parameters x tokens / step time / {args.peak_tflops:.0f} TFLOP/s")
    for v, x in ordered:
        if "desc" in x:
            print(f"  {v}: {x['desc']}")
    proj = _med(r, "project")
    ratios = [f"project/{v} {proj / _med(r, v):.2f}" for v in ("trl-pre", "trl-live", "floor") if _med(r, v)]
    mem = [f"peak project/{v} {r['variants']['project']['peak_mib'] / r['variants'][v]['peak_mib']:.2f}"
           for v in ("trl-pre", "trl-live") if _med(r, v)]
    print("ratios: " + ", ".join(ratios + mem), flush=True)


def _targets(results: list[dict]) -> None:
    print()
    by_vocab = {r["vocab"]: r for r in results}
    large = next((by_vocab[v] for v in (128256, 128000) if v in by_vocab), None)
    small = by_vocab[min(by_vocab)] if by_vocab and min(by_vocab) <= 4096 else None
    for name, r, target, what in (
        (f"project/TRL-precomputed step time at vocab {large['vocab'] if large else '128k'}", large,
         TARGET_TIME_LARGE, "time"),
        (f"project/TRL-precomputed step time at vocab {small['vocab'] if small else '<=4096'}", small,
         TARGET_TIME_SMALL, "time"),
        (f"project/TRL-precomputed peak memory at vocab {large['vocab'] if large else '128k'}", large,
         TARGET_MEMORY, "memory"),
    ):
        if r is None or _med(r, "trl-pre") is None:
            print(f"{name}: not measured (target <= {target})")
            continue
        if what == "time":
            x = _med(r, "project") / _med(r, "trl-pre")
        else:
            x = r["variants"]["project"]["peak_mib"] / r["variants"]["trl-pre"]["peak_mib"]
        print(f"{name} = {x:.2f} (target <= {target}): {'PASS' if x <= target else 'MISS'}")


if __name__ == "__main__":
    raise SystemExit(main())
