"""Chunked response log-probs and exact token KL equal the straightforward full-vocabulary computation."""

from __future__ import annotations

import warnings

import pytest
import torch

import alphadpo_ray.ml.logprobs as lp_mod
from alphadpo_ray.ml.logprobs import SequenceLogps, chunked_token_kl, chunked_token_logps, sequence_logps
from alphadpo_ray.ml.models import load_model

ATOL = 1e-5


# ---------------------------------------------------------------------------------------------- helpers


def make_batch(vocab: int, n: int = 5, t: int = 14, seed: int = 0):
    """Right-padded batch with varying lengths and prompt/response splits; the last row has no response."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    am = torch.zeros(n, t, dtype=torch.long)
    rm = torch.zeros(n, t, dtype=torch.long)
    for i in range(n):
        length = t if i == 0 else int(torch.randint(3, t + 1, (1,), generator=g))
        prompt = int(torch.randint(1, length, (1,), generator=g))
        if i == n - 1:
            prompt = length  # prompt only: zero response tokens
        am[i, :length] = 1
        rm[i, prompt:length] = 1
        ids[i, length:] = 0  # pad id
    return ids, am, rm


def straight_token_logps(model, ids, am, rm):
    logits = model(input_ids=ids, attention_mask=am).logits.float()
    tok = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return tok * (rm[:, 1:] * am[:, 1:])


def straight_kl(model, ref, ids, am, rm):
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids, attention_mask=am).logits.float()[:, :-1], -1)
        lq = torch.log_softmax(ref(input_ids=ids, attention_mask=am).logits.float()[:, :-1], -1)
    return ((lp.exp() * (lp - lq)).sum(-1) * (rm[:, 1:] * am[:, 1:])).sum(-1)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    ref = load_model(tiny_model_dir, eval_mode=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return ref


@pytest.fixture(scope="module")
def batch(model):
    return make_batch(model.config.vocab_size)


# ---------------------------------------------------------------------------------------------- values


def test_values_lengths_and_chunk_sizes_match_straightforward(model, batch):
    ids, am, rm = batch
    with torch.no_grad():
        want = straight_token_logps(model, ids, am, rm).sum(-1)
    n_resp = int(rm.sum())
    results = []
    for chunk in (1, 3, ids.shape[1], n_resp, n_resp + 7, 512):
        with torch.no_grad():
            out = sequence_logps(model, ids, am, rm, chunk_size=chunk)
        assert isinstance(out, SequenceLogps) and out.kl is None and out.ref_logps is None
        assert out.logps.dtype == torch.float32 and out.lengths.dtype == torch.long
        torch.testing.assert_close(out.logps, want, atol=ATOL, rtol=0)
        results.append(out.logps)
    assert out.lengths.tolist() == rm[:, 1:].sum(-1).tolist()
    assert out.lengths[-1] == 0 and out.logps[-1] == 0  # no response tokens: length 0, logp 0
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], atol=ATOL, rtol=0)
    # the full-logits fallback gives the same figures
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(model, ids, am, rm, 4, mode="logits").logps, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("budget", [0, lp_mod.DEFAULT_MEMORY_BUDGET_MB])
def test_gradients_match_straightforward_and_chunks_are_checkpointed(model, batch, monkeypatch, budget):
    """Budget 0 checkpoints every chunk; the default keeps this tiny batch's logits (no checkpoint)."""
    ids, am, rm = batch
    w = torch.linspace(-1.0, 2.0, ids.shape[0])  # a weighted loss, not just the sum
    params = [p for p in model.parameters() if p.requires_grad]

    model.zero_grad()
    (w * straight_token_logps(model, ids, am, rm).sum(-1)).sum().backward()
    want = [p.grad.clone() for p in params]

    calls = []
    real = lp_mod.checkpoint
    monkeypatch.setattr(lp_mod, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    model.zero_grad()
    out = sequence_logps(model, ids, am, rm, chunk_size=3, memory_budget_mb=budget)
    assert out.logps.requires_grad
    (w * out.logps).sum().backward()
    n_tokens = int((rm[:, 1:] * am[:, 1:]).sum())
    assert len(calls) == (-(-n_tokens // 3) if budget == 0 else 0)
    assert all(k["use_reentrant"] is False for k in calls)
    for p, g in zip(params, want):
        torch.testing.assert_close(p.grad, g, atol=ATOL, rtol=1e-4)
    model.zero_grad()


def test_padding_does_not_count(model, batch):
    ids, am, rm = batch
    with torch.no_grad():
        base = sequence_logps(model, ids, am, rm, chunk_size=4)
        ids2 = ids.clone()
        ids2[am == 0] = (ids2[am == 0] + 17) % model.config.vocab_size  # other ids after each sequence's end
        rm2 = rm.clone()
        rm2[am == 0] = 1  # a response mask that spills into padding is cut at the attention mask
        moved = sequence_logps(model, ids2, am, rm2, chunk_size=4)
        # while a changed response token does change the result of its row only
        ids3 = ids.clone()
        row, col = 0, int(rm[0].nonzero()[-1])
        ids3[row, col] = (ids3[row, col] + 1) % model.config.vocab_size
        changed = sequence_logps(model, ids3, am, rm, chunk_size=4)
    torch.testing.assert_close(moved.logps, base.logps, atol=ATOL, rtol=0)
    assert moved.lengths.tolist() == base.lengths.tolist()
    assert not torch.isclose(changed.logps[0], base.logps[0])
    torch.testing.assert_close(changed.logps[1:], base.logps[1:], atol=ATOL, rtol=0)


def test_bad_inputs_raise(model, batch):
    ids, am, rm = batch
    bad = rm.clone()
    bad[2, 0] = 1
    with pytest.raises(ValueError, match=r"response_mask\[:, 0\].*\[2\]"):
        sequence_logps(model, ids, am, bad)
    with pytest.raises(ValueError, match="response_mask has shape"):
        sequence_logps(model, ids, am, rm[:, :-1])
    with pytest.raises(ValueError, match="chunk_size"):
        sequence_logps(model, ids, am, rm, chunk_size=0)
    with pytest.raises(ValueError, match="mode"):
        sequence_logps(model, ids, am, rm, mode="fast")


def test_bf16_model_returns_float32_close_to_its_logits(tiny_model_dir):
    m16 = load_model(tiny_model_dir, dtype=torch.bfloat16, eval_mode=True)
    ids, am, rm = make_batch(m16.config.vocab_size, seed=3)
    with torch.no_grad():
        out = sequence_logps(m16, ids, am, rm, chunk_size=5)
        want = straight_token_logps(m16, ids, am, rm).sum(-1)
    assert out.logps.dtype == torch.float32
    torch.testing.assert_close(out.logps, want, atol=0.05, rtol=0.01)


# ---------------------------------------------------------------------------------------------- KL


def test_kl_and_ref_logps_match_direct_full_vocab(model, reference, batch):
    ids, am, rm = batch
    want_kl = straight_kl(model, reference, ids, am, rm)
    with torch.no_grad():
        want_ref = sequence_logps(reference, ids, am, rm).logps
        want_pol = straight_token_logps(model, ids, am, rm).sum(-1)
        fused = sequence_logps(model, ids, am, rm, chunk_size=3, reference=reference)  # no-grad: one fused pass
    with_grad = sequence_logps(model, ids, am, rm, chunk_size=5, reference=reference)  # policy pass + KL pass
    for out in (fused, with_grad):
        torch.testing.assert_close(out.kl, want_kl, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(out.ref_logps, want_ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(out.logps.detach(), want_pol, atol=ATOL, rtol=0)
        assert (out.kl >= 0).all() and out.kl[-1] == 0 and out.kl[:-1].gt(0).all()
        assert not out.kl.requires_grad and not out.ref_logps.requires_grad
    assert with_grad.logps.requires_grad


def test_kl_of_model_with_itself_is_zero(model, batch):
    ids, am, rm = batch
    with torch.no_grad():
        out = sequence_logps(model, ids, am, rm, chunk_size=4, reference=model)
    torch.testing.assert_close(out.kl, torch.zeros_like(out.kl), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.ref_logps, out.logps, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- chunked core


def test_chunked_core_softcap_and_scale_match_manual():
    torch.manual_seed(0)
    n, t, h, v, cap, scale = 3, 7, 16, 50, 2.0, 3.0
    hidden = torch.randn(n, t, h, requires_grad=True)
    head = torch.nn.Linear(h, v, bias=False)
    tgt = torch.randint(0, v, (n, t))
    mask = torch.rand(n, t) > 0.3

    z = cap * torch.tanh(head(hidden) * scale / cap)
    manual = torch.log_softmax(z, -1).gather(-1, tgt[..., None]).squeeze(-1) * mask
    manual.sum().backward()
    g_hidden, g_head = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = None
    head.weight.grad = None

    got = chunked_token_logps(hidden, head, tgt, mask, chunk_size=4, softcap=cap, scale=scale)
    assert got.shape == (n, t) and (got[~mask] == 0).all()
    torch.testing.assert_close(got, manual, atol=ATOL, rtol=0)
    got.sum().backward()
    torch.testing.assert_close(hidden.grad, g_hidden, atol=ATOL, rtol=0)
    torch.testing.assert_close(head.weight.grad, g_head, atol=ATOL, rtol=0)
    # without softcap the logits really differ (the cap is active at this scale)
    assert not torch.allclose(chunked_token_logps(hidden, head, tgt, mask, 4, scale=scale), manual, atol=1e-3)

    ref_head = torch.nn.Linear(h + 2, v, bias=False)
    ref_hidden = torch.randn(n, t, h + 2)
    with torch.no_grad():
        lp = torch.log_softmax(z, -1)
        lq = torch.log_softmax(ref_head(ref_hidden), -1)
        want = (lp.exp() * (lp - lq)).sum(-1) * mask
    kl = chunked_token_kl(hidden, head, ref_hidden, ref_head, mask, chunk_size=2, softcap=cap, scale=scale)
    torch.testing.assert_close(kl, want, atol=ATOL, rtol=1e-5)
    assert not kl.requires_grad


def test_token_log_softmax_backward_gradcheck():
    z = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    tgt = torch.tensor([0, 8, 3, 3])
    assert torch.autograd.gradcheck(lambda x: lp_mod._TokenLogSoftmax.apply(x, tgt), (z,))
    torch.testing.assert_close(lp_mod._TokenLogSoftmax.apply(z, tgt), torch.log_softmax(z, -1)[torch.arange(4), tgt])


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("kept_chunks", [0, 2, None])  # None: a budget that holds every chunk's logits
def test_memory_budget_keeps_chunks_that_fit_and_checkpoints_the_rest(monkeypatch, kept_chunks, softcap):
    n, t, h, v, chunk = 3, 7, 8, 50, 4
    hidden = torch.randn(n, t, h, requires_grad=True)
    head = torch.nn.Linear(h, v)
    tgt = torch.randint(0, v, (n, t))
    mask = torch.rand(n, t, generator=torch.Generator().manual_seed(3)) > 0.2
    m = int(mask.sum())
    w = torch.randn(n, t)

    z = head(hidden) if softcap is None else softcap * torch.tanh(head(hidden) / softcap)
    want = torch.log_softmax(z, -1).gather(-1, tgt[..., None]).squeeze(-1) * mask
    (w * want).sum().backward()
    want_grads = [x.grad.clone() for x in (hidden, head.weight, head.bias)]
    hidden.grad = head.weight.grad = head.bias.grad = None

    row_bytes = v * 4 * (1 if softcap is None else 2)  # float32 logits (+ tanh's output) per kept row
    budget = (m if kept_chunks is None else kept_chunks * chunk) * row_bytes / 2**20
    checkpointed, chunk_rows = [], []
    real_checkpoint, real_chunk = lp_mod.checkpoint, lp_mod._chunk_token_logps
    monkeypatch.setattr(lp_mod, "checkpoint", lambda *a, **k: checkpointed.append(1) or real_checkpoint(*a, **k))
    monkeypatch.setattr(lp_mod, "_chunk_token_logps", lambda hc, *a: chunk_rows.append(len(hc)) or real_chunk(hc, *a))
    got = chunked_token_logps(hidden, head, tgt, mask, chunk, softcap=softcap, memory_budget_mb=budget)
    (w * got).sum().backward()

    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    for x, g in zip((hidden, head.weight, head.bias), want_grads):
        torch.testing.assert_close(x.grad, g, atol=ATOL, rtol=1e-5)
    n_chunks = -(-m // chunk)
    if kept_chunks is None:  # everything fits: one chunk of all rows, nothing recomputed
        assert chunk_rows == [m] and not checkpointed
    else:
        assert len(checkpointed) == n_chunks - kept_chunks
        assert len(chunk_rows) == n_chunks + len(checkpointed)  # a checkpointed chunk runs again in backward
    if kept_chunks != 0:  # one byte less keeps one chunk fewer
        kept = n_chunks if kept_chunks is None else kept_chunks
        checkpointed.clear()
        chunked_token_logps(hidden, head, tgt, mask, chunk, softcap=softcap, memory_budget_mb=budget - 2**-20)
        assert len(checkpointed) == n_chunks - (kept - 1)


def test_memory_budget_is_validated():
    head, hidden, tgt = torch.nn.Linear(4, 5), torch.randn(3, 4), torch.zeros(3, dtype=torch.long)
    for bad in (-1, float("nan"), True, "64"):
        with pytest.raises(ValueError, match="memory_budget_mb"):
            chunked_token_logps(hidden, head, tgt, memory_budget_mb=bad)
    from alphadpo_ray.config.experiment import config_from_dict
    from alphadpo_ray.errors import ConfigError

    base = {"name": "x", "model": {"name_or_path": "m"}}
    assert config_from_dict(base, source="t").training.logprob_memory_budget_mb == lp_mod.DEFAULT_MEMORY_BUDGET_MB
    for bad in (-1, float("inf")):
        with pytest.raises(ConfigError, match="logprob_memory_budget_mb"):
            config_from_dict({**base, "training": {"logprob_memory_budget_mb": bad}}, source="t")


def test_chunked_core_flat_inputs_and_empty_mask():
    head = torch.nn.Linear(8, 11)
    hidden = torch.randn(9, 8)
    tgt = torch.randint(0, 11, (9,))
    want = torch.log_softmax(head(hidden), -1).gather(-1, tgt[:, None]).squeeze(-1)
    torch.testing.assert_close(chunked_token_logps(hidden, head, tgt, chunk_size=2), want, atol=ATOL, rtol=0)
    none = chunked_token_logps(hidden, head, tgt, torch.zeros(9, dtype=torch.bool), chunk_size=2)
    assert none.shape == (9,) and (none == 0).all()


# ---------------------------------------------------------------------------------------------- other models


def _tiny(kind: str):
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM
    from transformers import GraniteConfig, GraniteForCausalLM

    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    if kind == "gemma2":  # softcap far below the raw logits' scale, so it changes every logit
        return Gemma2ForCausalLM(Gemma2Config(head_dim=16, final_logit_softcapping=0.05, **common))
    if kind == "cohere":
        return CohereForCausalLM(CohereConfig(logit_scale=0.0625, **common))
    return GraniteForCausalLM(GraniteConfig(logits_scaling=8.0, embedding_multiplier=3.0, **common))


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite"])
def test_logit_postprocessing_from_config(kind):
    m = _tiny(kind).eval()
    ids, am, rm = make_batch(97, n=3, t=10, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the decoder + head path must pass its check: no fallback warning
        out = sequence_logps(m, ids, am, rm, chunk_size=4)
    assert lp_mod._PROBED[m] == "hidden"
    out.logps.sum().backward()
    got = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    want = straight_token_logps(m, ids, am, rm).sum(-1)
    want.sum().backward()
    torch.testing.assert_close(out.logps.detach(), want.detach(), atol=ATOL, rtol=0)
    for p, g in zip(m.parameters(), got):
        torch.testing.assert_close(g, p.grad, atol=ATOL, rtol=1e-4)


def test_unknown_head_postprocessing_falls_back_to_logits(tiny_model_dir):
    m = load_model(tiny_model_dir).train()
    forward = m.forward

    def scaled_forward(*args, **kwargs):  # something the decoder + head path cannot know about
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    m.forward = scaled_forward
    ids, am, rm = make_batch(m.config.vocab_size, seed=7)
    with pytest.warns(UserWarning, match="does not reproduce its logits"):
        out = sequence_logps(m, ids, am, rm, chunk_size=3)
    assert lp_mod._PROBED[m] == "logits" and m.training  # the check restores train mode
    want = straight_token_logps(m, ids, am, rm).sum(-1)
    torch.testing.assert_close(out.logps, want, atol=ATOL, rtol=0)
    out.logps.sum().backward()
    assert m.get_output_embeddings().weight.grad is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided once per model: no second warning
        sequence_logps(m, ids, am, rm, chunk_size=3)


@pytest.mark.parametrize("scale,softcap", [(None, None), (0.7, None), (None, 5.0), (1.3, 3.0)])
def test_zero3_head_function_matches_chunked_autograd(scale, softcap, monkeypatch):
    """The ZeRO-3 path (one weight gather per pass, hand-written backward) gives the same values and
    gradients as per-chunk autograd; without partitioned weights its gather is a no-op."""
    from alphadpo_ray.ml.logprobs import _chunk_token_logps, _Zero3HeadLogps

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).double()
    h = torch.randn(13, 16, dtype=torch.float64, requires_grad=True)
    tgt = torch.randint(0, 50, (13,))
    ref = _chunk_token_logps(h, tgt, head, scale, softcap)
    g = torch.randn(13, dtype=torch.float64)
    want = torch.autograd.grad((ref * g).sum(), [h, head.weight])
    linear, calls = torch.nn.functional.linear, []
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: calls.append(1) or linear(*a))
    for kept, recomputed in ((0, 4), (8, 2), (13, 0)):  # rows keeping their head outputs: none, 2 chunks, all
        out = _Zero3HeadLogps.apply(h, head.weight, tgt, head, 4, scale, softcap, kept)
        assert torch.allclose(out.double(), ref.double(), atol=1e-5)
        calls.clear()
        got = torch.autograd.grad((out * g).sum(), [h, head.weight])
        assert len(calls) == recomputed  # chunk head outputs recomputed in backward
        for a, b in zip(got, want):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
