"""Per-sequence response log-probs of a causal LM, chunked over tokens; exact token KL to a reference.

For a batch row n with tokens x_0..x_{T-1} and response mask r (r_t = 1 iff x_t is a response token),

    logp_n   = sum_{t>=1} r_t * log softmax(z_{t-1})[x_t]          (z_{t-1} = logits at position t-1)
    length_n = sum_{t>=1} r_t
    kl_n     = sum_{t>=1} r_t * sum_v p(v|x_<t) (log p(v|x_<t) - log q(v|x_<t))   (q = reference)

Why chunked: the straightforward path, ``log_softmax(model(...).logits[:, :-1])``, holds the
[N, T, V] logits *and* a log-softmax of the same size (plus, in training, the same again for
their gradients). At V = 32k, T = 1024 in float32 each of those is 128 MiB per sequence, so a
DPO batch of 2B sequences costs gigabytes just for the output layer. Here the decoder is run to
its final hidden states [N, T, H] (H << V), only the response positions are kept, and the output
head + log-softmax + gather is applied ``chunk_size`` tokens at a time, so at most one
[chunk_size, V] block of logits is being worked on. In training a memory budget
(``memory_budget_mb``, ``training.logprob_memory_budget_mb``) decides per chunk, in order: while
the float32 logits kept so far plus this chunk's fit the budget, the chunk keeps its logits for the
backward (one [chunk_size, V] buffer, two with soft-capping: tanh keeps its output too) and its
backward costs what the unchunked head's does; the chunks beyond the budget are wrapped in
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the forward keeps only the chunk's
hidden states and its [chunk_size] log-probs, and the backward recomputes that chunk's logits (one
more head matmul + logsumexp per chunk: the chunked head with budget 0 costs about 1.4x the
unchunked head in forward + backward at V = 32k). The log-softmax + gather has a hand-written backward needing
one extra [chunk_size, V] buffer. Peak extra memory is about the budget plus a few [chunk_size, V]
blocks, independent of N * T. Prompt and padding positions never reach the head at all. Results and
gradients are the same whatever the budget, and equal the straightforward computation up to float32
rounding. Default chunk_size 512 tokens: one float32 [512, 32k] block is 62.5 MiB (for V >= 128k use
128-256). When all of a batch's response logits fit the budget they run as one chunk (the
unchunked head's work and speed; peak up to twice the budget: the logits and their gradient).
Default budget 128 MiB: batches whose response logits fit it run at unchunked speed, larger ones
stay within ~1/4 of the straightforward peak at V = 32k (benchmarks/bench_logprobs.py prints the
figures).

Precision: the head runs in the model's dtype and each chunk's logits are upcast to float32
before the (optional) logit scale, soft-capping and log-softmax.

Model-specific logit post-processing taken from the (text) config:
  * ``final_logit_softcapping`` (Gemma-2/3): z <- cap * tanh(z / cap);
  * ``logit_scale`` (Cohere): z <- z * logit_scale;  ``logits_scaling`` (Granite): z <- z / logits_scaling.
Anything else a model does after its head (or before it, outside its decoder) is not known here, so
in ``mode="auto"`` the decoder+head path is checked once per model against ``model(...).logits`` on
a few tokens of the first batch (dropout off, no grad); if they disagree, or the model has no
usable decoder / output embeddings, this falls back to ``model(...).logits`` (exact, chunked
log-softmax, but the [N, T, V] logits are materialised) and warns once.

DeepSpeed ZeRO-3: the output head is called as a module (its forward hooks gather the weight);
with a stable trace ``stage3_max_reuse_distance`` keeps it gathered across chunks. A *frozen*
head (LoRA) under ZeRO-3 with non-reentrant checkpointing needs a DeepSpeed that re-gathers
frozen params in checkpoint recomputes (deepspeedai/DeepSpeed#8148). The ZeRO-3 head
(`_Zero3HeadLogps`) follows the memory budget too: chunks within it keep their head outputs (one
[chunk_size, V] buffer each, soft-capping or not), the others are recomputed in its backward; it
is never merged into one chunk. Pass the engine or the bare HF model; wrappers without
``get_output_embeddings`` are unwrapped through ``.module`` (this bypasses a DDP wrapper's
forward, so don't rely on DDP gradient sync through this function).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

from .. import compat
from . import distributed

DEFAULT_CHUNK_SIZE = 512
DEFAULT_MEMORY_BUDGET_MB = 128.0  # float32 logits kept for the backward instead of recomputed (see above)

# Mode decided by the "auto" probe, per model object: "hidden" (decoder + chunked head) or "logits".
# Process-wide on purpose, with weak keys: an entry lives exactly as long as its model, so a reused
# process (a Tune actor running trial after trial) neither leaks models nor reuses another's decision.
_PROBED: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()
_MODES = ("auto", "hidden", "logits")


@dataclass
class SequenceLogps:
    """Per-sequence results of `sequence_logps` (all [N])."""

    logps: torch.Tensor  # summed response log-probs, float32 (with grad when the model has grad)
    lengths: torch.Tensor  # response token counts, long (0 => logps 0; the caller validates)
    kl: Optional[torch.Tensor] = None  # exact KL(pi_theta || pi_ref) summed over response tokens, no grad
    ref_logps: Optional[torch.Tensor] = None  # reference's summed response log-probs, no grad


# ----------------------------------------------------------------------------------------------
# chunked core (no model needed)


def _logits(head: Callable, h: torch.Tensor, scale: Optional[float], softcap: Optional[float]) -> torch.Tensor:
    """z = head(h) in float32, then z*scale, then cap*tanh(z/cap)."""
    z = head(h).float()
    if scale is not None and scale != 1.0:
        z = z * scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z


class _TokenLogSoftmax(torch.autograd.Function):
    """out_i = z[i, t_i] - logsumexp(z_i);  d out_i / d z_i = onehot(t_i) - softmax(z_i).

    Same values as log_softmax(z).gather(t), but the backward needs one [c, V] buffer (z itself is
    saved, not copied) where autograd's log_softmax + gather would hold the log-softmax output, a
    zero-filled gather gradient and the log-softmax gradient at once.
    """

    @staticmethod
    def forward(ctx, z, tgt):
        lse = torch.logsumexp(z, dim=-1)
        ctx.save_for_backward(z, lse, tgt)
        return z.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, g):
        z, lse, tgt = ctx.saved_tensors
        grad = (z - lse.unsqueeze(-1)).exp_().mul_(-g.unsqueeze(-1))  # -g * softmax(z)
        grad.scatter_add_(-1, tgt.unsqueeze(-1), g.unsqueeze(-1))  # + g * onehot(t)
        return grad, None


def _chunk_token_logps(h, tgt, head, scale, softcap):
    return _TokenLogSoftmax.apply(_logits(head, h, scale, softcap), tgt)


def _select(hidden: torch.Tensor, mask: Optional[torch.Tensor]):
    """The rows of `hidden` [..., H] where `mask` [...] is true, as [M, H], with their indices (one per dim)."""
    lead = hidden.shape[:-1]
    if mask is None:
        mask = torch.ones(lead, dtype=torch.bool, device=hidden.device)
    if mask.shape != lead:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected the leading shape of hidden {tuple(lead)}")
    where = tuple(i.to(hidden.device) for i in mask.bool().nonzero(as_tuple=True))
    return hidden[where], where, lead  # copies only the M selected rows, even from a strided view


def _scatter(vals: torch.Tensor, where, lead) -> torch.Tensor:
    """Per-token values back into a float32 zero tensor of shape `lead` (differentiable)."""
    return torch.zeros(lead, dtype=torch.float32, device=vals.device).index_put(where, vals)


def _check_chunk(chunk_size) -> int:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (tokens per chunk), got {chunk_size!r}")
    return chunk_size


def _check_budget(memory_budget_mb) -> float:
    ok = isinstance(memory_budget_mb, (int, float)) and not isinstance(memory_budget_mb, bool)
    if not ok or not memory_budget_mb >= 0:
        raise ValueError(f"memory_budget_mb must be a number >= 0 (MiB of logits kept), got {memory_budget_mb!r}")
    return float(memory_budget_mb)


def _kept_rows(h: torch.Tensor, head: Callable, softcap: Optional[float], memory_budget_mb: float) -> int:
    """How many leading rows of `h` may keep their float32 logits for the backward within the budget."""
    if memory_budget_mb <= 0 or h.shape[0] == 0:
        return 0
    weight = getattr(head, "weight", None)
    if isinstance(head, torch.nn.Linear) and weight is not None:
        vocab = weight.shape[0]
    else:  # any other head: one row tells its output width
        with torch.no_grad():
            vocab = head(h[:1]).shape[-1]
    bytes_per_row = vocab * 4 * (2 if softcap else 1)  # z (saved by _TokenLogSoftmax), + tanh's output
    return int(min(memory_budget_mb * 2**20 // bytes_per_row, h.shape[0]))  # inf: every row


def _needs_grad(hidden: torch.Tensor, head: Callable) -> bool:
    if not torch.is_grad_enabled():
        return False
    if hidden.requires_grad:
        return True
    return isinstance(head, torch.nn.Module) and any(p.requires_grad for p in head.parameters())


def _zero3_partitioned(*heads) -> bool:
    """True when a head's weights are ZeRO-3 partitioned (calling the module all-gathers them)."""
    return any(isinstance(h, torch.nn.Module) and any(hasattr(p, "ds_id") for p in h.parameters()) for h in heads)


def _gathered(*heads):
    """Full weights of ZeRO-3 partitioned heads for the duration of the block: one all-gather per
    head, the same on every rank whatever its number of tokens (calling a partitioned head once per
    chunk would make the number of collectives depend on each rank's data)."""
    import contextlib

    params = [p for h in heads if _zero3_partitioned(h) for p in h.parameters()]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _as_linear(head):
    """A ZeRO-3 head as a plain function of its (gathered) weight: module calls would re-partition it."""
    if not isinstance(head, torch.nn.Linear):
        raise NotImplementedError(
            f"ZeRO-3 chunked log-probs need an nn.Linear output head, got {type(head).__name__}; "
            "use sequence_logps(..., mode='logits')"
        )
    return lambda x: torch.nn.functional.linear(x, head.weight, head.bias)


def _transform_grad(a: torch.Tensor, scale: Optional[float], softcap: Optional[float]) -> Optional[torch.Tensor]:
    """d z / d a for z = softcap·tanh(scale·a / softcap) (or scale·a); None when z = a."""
    s = scale if scale is not None else 1.0
    if not softcap:
        return None if s == 1.0 else torch.full_like(a, s)
    return s * (1 - torch.tanh(s * a / softcap) ** 2)


class _Zero3HeadLogps(torch.autograd.Function):
    """Chunked log p(target) through a ZeRO-3 partitioned linear head, exact in values and gradients.

    Forward and backward each gather the head's weight once (the caller's `_gathered` block in
    forward, its own in backward) and loop over chunks of rows with the plain weight, so the number
    of collectives does not depend on how many response tokens this rank holds. The chunks within
    the first `kept` rows keep their float32 head outputs for the backward (the memory budget); the
    others' are recomputed there. Memory: the kept outputs, one [chunk, V] logits buffer at a time,
    and the full weight gradient that ZeRO-3 reduce-scatters.
    """

    @staticmethod
    def forward(ctx, h, weight, tgt, head, chunk_size, scale, softcap, kept=0):
        linear = _as_linear(head)
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        kept_outputs = []
        with torch.no_grad():
            for s in range(0, h.shape[0], chunk_size):
                a = linear(h[s : s + chunk_size]).float()
                z = _logits(_identity, a, scale, softcap)
                out[s : s + chunk_size] = z.gather(-1, tgt[s : s + chunk_size, None]).squeeze(-1) - z.logsumexp(-1)
                if s + a.shape[0] <= kept:
                    kept_outputs.append(a)
        ctx.save_for_backward(h, tgt, *kept_outputs)
        ctx.head, ctx.chunk_size, ctx.scale, ctx.softcap = head, chunk_size, scale, softcap
        return out

    @staticmethod
    def backward(ctx, g):
        h, tgt, *kept_outputs = ctx.saved_tensors
        head, c = ctx.head, ctx.chunk_size
        grad_h = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        trained = ctx.needs_input_grad[1] and _zero3_partitioned(head)
        with contextlib.nullcontext() if trained else _gathered(head), torch.no_grad():
            if trained:
                _gather_until_accumulated(head.weight)
            weight = head.weight
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for i, s in enumerate(range(0, h.shape[0], c)):
                hc, gc = h[s : s + c], g[s : s + c].float()
                if i < len(kept_outputs):
                    a = kept_outputs[i]
                else:
                    a = torch.nn.functional.linear(hc, weight, head.bias).float()
                z = a
                if ctx.scale is not None and ctx.scale != 1.0:
                    z = z * ctx.scale
                if ctx.softcap:
                    z = ctx.softcap * torch.tanh(z / ctx.softcap)
                dz = torch.softmax(z, dim=-1).mul_(-gc[:, None])  # d out / d z = onehot(t) - softmax(z)
                dz.scatter_add_(-1, tgt[s : s + c, None], gc[:, None])
                d = _transform_grad(a, ctx.scale, ctx.softcap)
                da = dz if d is None else dz.mul_(d)
                if grad_h is not None:
                    grad_h[s : s + c] = (da.to(weight.dtype) @ weight).to(h.dtype)
                grad_w.addmm_(da.t(), hc.float())
        return grad_h, grad_w.to(weight.dtype), None, None, None, None, None, None


def _gather_until_accumulated(weight: torch.nn.Parameter) -> None:
    """All-gather a ZeRO-3 partitioned head `weight` for its backward and keep it gathered until autograd
    has accumulated the gradient returned for it: AccumulateGrad shapes a gradient after its parameter,
    so a partitioned one fails ("size of tensor a (0) must match ..."; an untied head, which no module
    call gathers in backward). Released right after, unless a module still holds it (a tied input
    embedding, whose backward ran in between; DeepSpeed releases it with that module). A weight that is
    gathered already is left to whoever gathered it. DeepSpeed's own post-accumulate hook (registered
    at initialize, so run before this one) has taken the gradient by then."""
    if not compat.zero3_param_partitioned(weight):
        return
    weight.all_gather()  # a collective, issued alike on every rank (they run the same graph)

    def release(_):
        handle.remove()
        if not compat.zero3_param_in_use(weight):
            weight.partition()

    handle = weight.register_post_accumulate_grad_hook(release)


def chunked_token_logps(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    target_ids: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    softcap: Optional[float] = None,
    scale: Optional[float] = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> torch.Tensor:
    """Per-token log p(target | state) = log_softmax(z)[target], z = softcap(scale * head(hidden)) in float32.

    `hidden` [..., H] are the states that predict `target_ids` [...] (already shifted); only positions
    where `mask` [...] is true go through `head`, `chunk_size` of them at a time. Returns float32 [...],
    0 where masked out. When a gradient is needed, chunks keep their logits for the backward while
    those fit `memory_budget_mb` (MiB, in order) and are checkpointed (recomputed) beyond it; 0
    checkpoints every chunk.
    """
    chunk_size = _check_chunk(chunk_size)
    memory_budget_mb = _check_budget(memory_budget_mb)
    if target_ids.shape != hidden.shape[:-1]:
        raise ValueError(f"target_ids has shape {tuple(target_ids.shape)}, expected {tuple(hidden.shape[:-1])}")
    h, where, lead = _select(hidden, mask)
    tgt = target_ids.to(h.device)[where]
    if _zero3_partitioned(head):
        with _gathered(head):  # gathered, the weight has its full shape for `_kept_rows`
            kept = _kept_rows(h, head, None, memory_budget_mb) if _needs_grad(hidden, head) else 0
            vals = _Zero3HeadLogps.apply(h, head.weight, tgt, head, chunk_size, scale, softcap, kept)
        return _scatter(vals, where, lead)
    kept = h.shape[0]  # rows whose chunks keep their logits (no grad: nothing to keep, nothing to recompute)
    if _needs_grad(hidden, head):
        kept = _kept_rows(h, head, softcap, memory_budget_mb)
        if kept >= h.shape[0]:
            chunk_size = max(chunk_size, h.shape[0])  # all logits fit: one chunk, fewer and larger matmuls
    parts = []
    for s in range(0, h.shape[0], chunk_size):
        hc, tc = h[s : s + chunk_size], tgt[s : s + chunk_size]
        if s + hc.shape[0] > kept:
            parts.append(checkpoint(_chunk_token_logps, hc, tc, head, scale, softcap, use_reentrant=False))
        else:
            parts.append(_chunk_token_logps(hc, tc, head, scale, softcap))
    vals = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32) + h.sum() * 0
    return _scatter(vals, where, lead)


@torch.no_grad()
def _pair_stats(
    hidden, head, ref_hidden, ref_head, target_ids, mask, chunk_size, softcap, scale, ref_softcap, ref_scale
):
    """One chunked pass over both models: per-token (kl, logp, ref_logp); logps only if target_ids given."""
    chunk_size = _check_chunk(chunk_size)
    if ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(
            f"ref_hidden leading shape {tuple(ref_hidden.shape[:-1])} != hidden's {tuple(hidden.shape[:-1])}"
        )
    h, where, lead = _select(hidden, mask)
    rh, _, _ = _select(ref_hidden, mask)  # stays on the reference's device; its log-probs move over
    tgt = None if target_ids is None else target_ids.to(h.device)[where]
    kls, lps, rlps = [], [], []
    with _gathered(head, ref_head):  # ZeRO-3: one gather per head for the whole pass
        head = _as_linear(head) if _zero3_partitioned(head) else head
        ref_head = _as_linear(ref_head) if _zero3_partitioned(ref_head) else ref_head
        for s in range(0, h.shape[0], chunk_size):
            _kl_chunk(h, rh, tgt, s, chunk_size, head, ref_head, scale, softcap, ref_scale, ref_softcap, kls, lps, rlps)
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.float32, device=h.device)  # noqa: E731
    kl = _scatter(cat(kls), where, lead)
    if tgt is None:
        return kl, None, None
    return kl, _scatter(cat(lps), where, lead), _scatter(cat(rlps), where, lead)


def _kl_chunk(h, rh, tgt, s, chunk_size, head, ref_head, scale, softcap, ref_scale, ref_softcap, kls, lps, rlps):
    """Rows s:s+chunk_size of `_pair_stats`: appends per-token KL (and policy/reference log-probs)."""
    lp = torch.log_softmax(_logits(head, h[s : s + chunk_size], scale, softcap), dim=-1)
    lq = torch.log_softmax(_logits(ref_head, rh[s : s + chunk_size], ref_scale, ref_softcap).to(lp.device), dim=-1)
    if lp.shape[-1] != lq.shape[-1]:
        raise ValueError(f"policy vocab {lp.shape[-1]} != reference vocab {lq.shape[-1]}: KL needs the same tokenizer")
    if tgt is not None:
        t = tgt[s : s + chunk_size].unsqueeze(-1)
        lps.append(lp.gather(-1, t).squeeze(-1))
        rlps.append(lq.gather(-1, t).squeeze(-1))
    diff = lq.neg_().add_(lp)  # log p - log q, in place
    kls.append(torch.linalg.vecdot(lp.exp_(), diff).clamp_(min=0.0))  # sum_v p (log p - log q) >= 0


def chunked_token_kl(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    ref_hidden: torch.Tensor,
    ref_head: Callable[[torch.Tensor], torch.Tensor],
    mask: Optional[torch.Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    softcap: Optional[float] = None,
    ref_softcap: Optional[float] = None,
    scale: Optional[float] = None,
    ref_scale: Optional[float] = None,
) -> torch.Tensor:
    """Per-token exact KL(p || q) = sum_v p(v) (log p(v) - log q(v)) over the full vocabulary, no grad.

    p = softmax(z), z = softcap(scale * head(hidden)); q likewise from `ref_hidden`/`ref_head`. Both
    hidden tensors are [..., H_model] over the same positions; `mask` [...] selects them. Float32 [...],
    0 where masked out; rounding negatives are clamped to 0.
    """
    kl, _, _ = _pair_stats(
        hidden, head, ref_hidden, ref_head, None, mask, chunk_size, softcap, scale, ref_softcap, ref_scale
    )
    return kl


# ----------------------------------------------------------------------------------------------
# HF causal LMs


@dataclass
class _HeadInputs:
    states: torch.Tensor  # [N, T, H] final hidden states, or [N, T, V] logits in "logits" mode
    head: Callable
    scale: Optional[float]
    softcap: Optional[float]


def _identity(x):
    return x


def _unwrap(model):
    while not hasattr(model, "get_output_embeddings") and hasattr(model, "module"):
        model = model.module
    return model


def _logit_transform(model):
    """(scale, softcap) from the model's (text) config: see the module docstring."""
    config = getattr(model, "config", None)
    if config is None:
        return None, None
    try:
        config = config.get_text_config(decoder=True)
    except Exception:  # older / custom configs
        pass
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v != 0  # noqa: E731
    softcap = getattr(config, "final_logit_softcapping", None)
    softcap = float(softcap) if num(softcap) else None
    scale = None
    if num(getattr(config, "logit_scale", None)):
        scale = float(config.logit_scale)
    elif num(getattr(config, "logits_scaling", None)):
        scale = 1.0 / float(config.logits_scaling)
    return scale, softcap


def _find_decoder(model):
    dec = None
    if hasattr(model, "get_decoder"):
        try:
            dec = model.get_decoder()
        except Exception:
            dec = None
    if dec is None or dec is model:
        dec = getattr(model, getattr(model, "base_model_prefix", "") or "model", None)
    if not isinstance(dec, torch.nn.Module) or dec is model:
        return None
    return dec


def _decoder_hidden(decoder, input_ids, attention_mask) -> torch.Tensor:
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    h = getattr(out, "last_hidden_state", None)
    if h is None:
        h = out[0]
    if not torch.is_tensor(h) or h.dim() != 3 or h.shape[:2] != input_ids.shape:
        raise RuntimeError(f"decoder returned {type(h).__name__} {getattr(h, 'shape', '')}, expected [N, T, H]")
    return h


def _full_logits(model, input_ids, attention_mask) -> _HeadInputs:
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return _HeadInputs(logits, _identity, None, None)


def _probe(model, decoder, head, scale, softcap, input_ids, attention_mask) -> Optional[str]:
    """None if decoder+head reproduces model(...).logits on a few tokens, else the reason."""
    n = min(input_ids.shape[1], 16)
    ids, am = input_ids[:1, :n], attention_mask[:1, :n]
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            raw = model(input_ids=ids, attention_mask=am, use_cache=False).logits  # errors here are the caller's
            full = raw.float()
            try:
                ours = _logits(head, _decoder_hidden(decoder, ids, am), scale, softcap)
            except Exception as e:  # the decoder path cannot even run: fall back
                return f"{type(e).__name__}: {e}"
    finally:
        for m, t in training.items():
            m.training = t
    if full.shape != ours.shape:
        return f"logits shape {tuple(full.shape)} vs decoder+head {tuple(ours.shape)}"
    keep = am[0].bool() if am[0].any() else torch.ones_like(am[0], dtype=torch.bool)
    full, ours = full[0][keep], ours[0][keep]
    rtol = 1e-3 if raw.dtype == torch.float32 else 3e-2  # bf16/fp16: softcap/scale may run in half precision
    err, tol = (full - ours).abs().max().item(), 1e-4 + rtol * full.abs().max().item()
    return None if err <= tol else f"max |logits difference| {err:.3g} > {tol:.3g}"


def _head_inputs(model, input_ids, attention_mask, mode: str) -> _HeadInputs:
    model = _unwrap(model)
    if mode == "logits":
        return _full_logits(model, input_ids, attention_mask)
    decoder = _find_decoder(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    scale, softcap = _logit_transform(model)
    if mode == "auto":
        decided = _PROBED.get(model)
        if decided is None:
            reason = "no decoder module / output embeddings" if decoder is None or head is None else None
            if reason is None:
                reason = _probe(model, decoder, head, scale, softcap, input_ids, attention_mask)
            # every rank must take the same path (ZeRO-3 forwards are collective)
            failed = distributed.any_worker(reason is not None)
            reason = reason or ("another rank's check failed" if failed else None)
            decided = "hidden" if reason is None else "logits"
            _PROBED[model] = decided
            if reason is not None:
                warnings.warn(
                    f"sequence_logps: {type(model).__name__}'s decoder + output head does not reproduce its logits "
                    f"({reason}); using the full model(...).logits instead (exact, but materialises [N, T, V]).",
                    stacklevel=3,
                )
        if decided == "logits":
            return _full_logits(model, input_ids, attention_mask)
    elif decoder is None or head is None:
        raise ValueError(
            f"mode='hidden' needs a decoder module and output embeddings; {type(model).__name__} lacks one"
        )
    return _HeadInputs(_decoder_hidden(decoder, input_ids, attention_mask), head, scale, softcap)


def _check_batch(input_ids, attention_mask, response_mask):
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [N, T], got shape {tuple(input_ids.shape)}")
    for name, t in (("attention_mask", attention_mask), ("response_mask", response_mask)):
        if t.shape != input_ids.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected input_ids' {tuple(input_ids.shape)}")
    if response_mask.shape[1] and response_mask[:, 0].bool().any():
        rows = response_mask[:, 0].bool().nonzero().flatten().tolist()
        raise ValueError(f"response_mask[:, 0] is set in rows {rows[:10]}: token 0 has no context to be predicted from")


def sequence_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    reference=None,
    *,
    mode: str = "auto",
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> SequenceLogps:
    """Summed response log-probs logp_n = sum_{t>=1} r_t log p(x_t | x_<t), r = response_mask & attention_mask.

    Batch: `input_ids`, `attention_mask`, `response_mask` all [N, T], right-padded; response_mask[n, t]
    = 1 iff token t is a response token (predicted by the logits at t-1; column 0 must be 0). Rows with
    no response token get length 0 and logp 0. With `reference` (same tokenizer), also returns the exact
    per-sequence KL(pi || pi_ref) = sum_t r_t sum_v p(v) (log p(v) - log q(v)) and the reference's
    logps, from the same pass and without grad. `mode`: "auto" (decoder + chunked head, verified once
    per model, else full logits), "hidden" (decoder + chunked head, unverified), "logits" (full logits).
    `memory_budget_mb`: MiB of float32 logits the policy's chunks may keep for the backward instead of
    recomputing them (see `chunked_token_logps`); same values and gradients whatever it is.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    _check_chunk(chunk_size)
    _check_budget(memory_budget_mb)
    _check_batch(input_ids, attention_mask, response_mask)
    tmask = response_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
    targets = input_ids[:, 1:]
    lengths = tmask.sum(-1)

    pol = _head_inputs(model, input_ids, attention_mask, mode)
    states = pol.states[:, :-1]
    if reference is None:
        tok = chunked_token_logps(states, pol.head, targets, tmask, chunk_size, pol.softcap, pol.scale,
                                  memory_budget_mb=memory_budget_mb)
        return SequenceLogps(tok.sum(-1), lengths)

    ref_dev = _device_of(reference, input_ids)
    with torch.no_grad():
        ref = _head_inputs(reference, input_ids.to(ref_dev), attention_mask.to(ref_dev), mode)
    ref_states = ref.states[:, :-1]
    args = (targets, tmask, chunk_size, pol.softcap, pol.scale, ref.softcap, ref.scale)
    if _needs_grad(states, pol.head):
        tok = chunked_token_logps(states, pol.head, targets, tmask, chunk_size, pol.softcap, pol.scale,
                                  memory_budget_mb=memory_budget_mb)
        kl, _, ref_tok = _pair_stats(states.detach(), pol.head, ref_states, ref.head, *args)
    else:  # one fused pass: policy and reference logits are each computed once per chunk
        kl, tok, ref_tok = _pair_stats(states, pol.head, ref_states, ref.head, *args)
    return SequenceLogps(tok.sum(-1), lengths, kl.sum(-1), ref_tok.to(tok.device).sum(-1))


def _device_of(model, default: torch.Tensor) -> torch.device:
    try:
        return next(_unwrap(model).parameters()).device
    except (StopIteration, AttributeError):
        return default.device
