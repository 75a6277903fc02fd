"""The paper's model families (Mistral, Llama-3, Gemma-2) and Qwen2, as tiny local models.

For each family: the tiny model really has the family's distinguishing feature, its chat template
renders the family's format with special tokens of its own tokenizer, chunked log-probs / exact KL
(`sequence_logps`) equal the straightforward Hugging Face computation, and AlphaDPO (2 Ray Train
workers) trains under ZeRO-3 and resumes from a checkpoint after a worker is killed, on the trajectory
of an uninterrupted ZeRO-0 run for two of the families.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TEXTS, small_config

import alphadpo_ray.ml.logprobs as lp_mod
from alphadpo_ray.ml.data.collate import pad_sequences
from alphadpo_ray.ml.logprobs import sequence_logps
from alphadpo_ray.ml.models import (
    FAMILIES,
    TINY_LOGIT_SOFTCAP,
    TINY_SLIDING_WINDOW,
    build_tiny_model,
    build_tiny_model_dir,
    build_tokenizer,
    load_model,
    load_tokenizer,
)

NEW_FAMILIES = ["mistral", "llama3", "gemma2", "qwen2"]
SIZE = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)  # head_dim 8; GQA: 2 kv heads
CHUNK = 7  # several chunks per batch


def _rows(n: int = 40, seed: int = 0) -> list[dict]:
    """Chat preference pairs (user/assistant messages only: Mistral and Gemma reject a system turn)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % 2:
            a, b = rng.randint(10, 49), rng.randint(10, 49)
            question, good, bad = f"What is {a} + {b}?", f"The answer is {a + b}.", f"The answer is {a + b + 1}."
        else:
            letters = rng.sample("abcdefg", 4)
            question = f"Sort the letters {' '.join(letters)}."
            good, bad = f"Answer: {' '.join(sorted(letters))}", f"Answer: {' '.join(sorted(letters)[::-1])}"
        user = {"role": "user", "content": question}
        rows.append({"chosen": [user, {"role": "assistant", "content": good}],
                     "rejected": [user, {"role": "assistant", "content": bad}]})
    return rows


ROWS = _rows()
TEXTS = SAMPLE_TEXTS + [m["content"] for r in ROWS for m in r["chosen"] + r["rejected"][-1:]]


@pytest.fixture(scope="module", params=NEW_FAMILIES)
def family(request):
    """(name, tokenizer, model) of one family, in train mode."""
    tokenizer = build_tokenizer(TEXTS, vocab_size=320, family=request.param)
    return request.param, tokenizer, build_tiny_model(request.param, tokenizer, **SIZE)


def _batch(tokenizer, rows=ROWS[:4]):
    """Chosen + rejected rows of `rows` rendered with the chat template, right-padded ([2B, T] each)."""
    prompts, responses = [], []
    for side in ("chosen", "rejected"):
        for row in rows:
            messages = row[side]
            prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(messages, tokenize=False)
            p, f = (tokenizer(x, add_special_tokens=False)["input_ids"] for x in (prompt, full))
            assert f[: len(p)] == p
            prompts.append(p)
            responses.append(f[len(p):])
    b = pad_sequences(prompts, responses, tokenizer.pad_token_id)
    return b["input_ids"], b["attention_mask"], b["response_mask"]


# ------------------------------------------------------------------------------------- the features


def test_model_has_the_family_feature(family):
    name, tokenizer, model = family
    cfg, layers = model.config, model.model.layers
    assert cfg.vocab_size == len(tokenizer) and cfg.eos_token_id == tokenizer.eos_token_id
    ids, am, _ = _batch(tokenizer)
    assert ids.shape[1] > 2 * TINY_SLIDING_WINDOW  # test sequences are longer than any window
    if name == "mistral":
        assert cfg.sliding_window == TINY_SLIDING_WINDOW
        with torch.no_grad():
            windowed = model(input_ids=ids, attention_mask=am).logits
            cfg.sliding_window = None
            try:
                full = model(input_ids=ids, attention_mask=am).logits
            finally:
                cfg.sliding_window = TINY_SLIDING_WINDOW
        w = TINY_SLIDING_WINDOW
        torch.testing.assert_close(windowed[:, :w], full[:, :w])  # within the window: the same
        assert (windowed[:, w:] - full[:, w:]).abs().max() > 1e-3  # beyond it: the window matters
    elif name == "llama3":
        attn = layers[0].self_attn
        assert cfg.num_key_value_heads < cfg.num_attention_heads
        assert attn.k_proj.out_features == attn.v_proj.out_features < attn.q_proj.out_features
        assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
        assert cfg.rope_parameters["rope_theta"] == 500000.0 and tokenizer.pad_token == tokenizer.eos_token
    elif name == "gemma2":
        assert cfg.final_logit_softcapping == TINY_LOGIT_SOFTCAP
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
        assert cfg.layer_types == ["sliding_attention", "full_attention"]
        assert [layer.self_attn.sliding_window for layer in layers] == [TINY_SLIDING_WINDOW, None]
        with torch.no_grad():
            capped = model(input_ids=ids, attention_mask=am).logits
            cfg.final_logit_softcapping = None
            try:
                raw = model(input_ids=ids, attention_mask=am).logits
            finally:
                cfg.final_logit_softcapping = TINY_LOGIT_SOFTCAP
        assert capped.abs().max() < TINY_LOGIT_SOFTCAP
        assert (capped - raw).abs().max() > 0.05  # the cap bites
    elif name == "qwen2":
        attn = layers[0].self_attn
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            assert proj.bias is not None and proj.bias.abs().max() > 0
        assert attn.o_proj.bias is None


EXPECTED_PROMPT = {  # the family's own format for one user turn, ready for the reply
    "mistral": "<s>[INST] Hi there [/INST]",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma2": "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "qwen2": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
             "<|im_start|>assistant\n",
}
EXPECTED_REPLY = {"mistral": "Hello</s>", "llama3": "Hello<|eot_id|>", "gemma2": "Hello<end_of_turn>\n",
                  "qwen2": "Hello<|im_end|>\n"}


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_chat_template_renders_the_family_format_with_its_own_special_tokens(name, tmp_path):
    path = build_tiny_model_dir(tmp_path, TEXTS, vocab_size=320, family=name, **SIZE)
    tokenizer, model = load_tokenizer(path), load_model(path)  # a saved checkpoint, like one from the hub
    assert type(model).__name__ == FAMILIES[name].model_class
    user, reply = [{"role": "user", "content": "Hi there"}], {"role": "assistant", "content": "Hello"}
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(user + [reply], tokenize=False)
    assert prompt == EXPECTED_PROMPT[name]
    assert full == prompt + EXPECTED_REPLY[name]
    for token in FAMILIES[name].special_tokens:  # every special token is one token of this tokenizer
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids  # the prefix property holds on token ids
    assert tokenizer.pad_token == (FAMILIES[name].pad or tokenizer.eos_token)  # no pad of its own: eos


# ---------------------------------------------------------------------------------- log-probs and KL


def _straight(model, ids, am, rm):
    """Per-sequence response log-probs and full-vocabulary log-softmax, the plain Hugging Face way."""
    lsm = torch.log_softmax(model(input_ids=ids, attention_mask=am).logits.float()[:, :-1], -1)
    mask = (rm[:, 1:] & am[:, 1:].bool()).float()
    return (lsm.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask).sum(-1), lsm, mask


def test_chunked_logps_and_kl_match_hugging_face(family):
    name, tokenizer, model = family
    ids, am, rm = _batch(tokenizer)
    model.train().zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to full logits
        out = sequence_logps(model, ids, am, rm, chunk_size=CHUNK)
    assert lp_mod._PROBED[model] == "hidden"  # mode="auto" took the decoder + chunked head path
    assert int(out.lengths.max()) > CHUNK  # several chunks per sequence

    out.logps.sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want, lp, mask = _straight(model, ids, am, rm)
    want.sum().backward()
    torch.testing.assert_close(out.logps.detach(), want.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(out.lengths, mask.sum(-1).long())
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name} {n}: {m}")
    model.zero_grad()

    reference = copy.deepcopy(model).eval().requires_grad_(False)  # deepcopy keeps Gemma-2's tying
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        pair = sequence_logps(model, ids, am, rm, chunk_size=CHUNK, reference=reference)
        ref_want, lq, _ = _straight(reference, ids, am, rm)
        lp = lp.detach()
        kl_want = ((lp.exp() * (lp - lq)).sum(-1) * mask).sum(-1)
    assert lp_mod._PROBED[reference] == "hidden"
    assert kl_want.min() > 1e-3  # the perturbed reference really differs
    torch.testing.assert_close(pair.kl, kl_want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pair.ref_logps, ref_want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pair.logps, want.detach(), atol=1e-5, rtol=1e-5)

    if name == "gemma2":  # the soft cap is applied: without it the log-probs would be visibly different
        model.config.final_logit_softcapping = None
        try:
            with torch.no_grad():
                uncapped, _, _ = _straight(model, ids, am, rm)
        finally:
            model.config.final_logit_softcapping = TINY_LOGIT_SOFTCAP
        assert (uncapped - want.detach()).abs().max() > 1e-2


# ------------------------------------------------------------------------- training under DeepSpeed


def _losses(summary):
    return [h["train/loss"] for h in summary["history"]]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("family-data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


STEPS = 8


def _config(tmp_path, name, model_dir, data_file, stage, workers=2):
    """`workers` × a batch of 4 // `workers`: one worker trains in this process (no Ray Train), on the same
    global batches (test_training's two-workers-match-one test)."""
    return small_config(
        tmp_path, name=name, model={"name_or_path": str(model_dir)},
        data={"source": str(data_file), "held_out_fraction": 0.1, "max_length": 64, "max_prompt_length": 48},
        training={"max_steps": STEPS, "save_steps": 2, "eval_steps": 100, "logging_steps": 1,
                  "per_device_train_batch_size": 4 // workers, "total_batch_size": 4, "per_device_eval_batch_size": 8,
                  "logprob_chunk_size": CHUNK},
        deepspeed={"zero_stage": stage}, ray={"max_failures": 2, "num_workers": workers}, tracking={"enabled": False},
    )


def _own_train_workers() -> list:
    """Ray Train worker processes of this test session's own Ray (descendants of this process): other
    processes on the machine, other Ray instances included, are never touched."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if any("RayTrainWorker" in part for part in proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _kill_a_worker_after_first_checkpoint(run_dir: Path, killed: threading.Event, done: threading.Event):
    """Once the controller has registered a checkpoint of the run, SIGKILL one of its workers."""
    deadline = time.time() + 300
    while time.time() < deadline and not done.is_set():
        try:
            registered = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
        except (OSError, ValueError, KeyError):
            registered = None
        workers = _own_train_workers() if registered else []
        if workers:
            os.kill(workers[-1].pid, signal.SIGKILL)
            killed.set()
            return
        time.sleep(0.05)


# Killed and resumed under ZeRO-3, then compared with a ZeRO-0 baseline: Gemma-2 (tied head + soft cap through
# the ZeRO-3 head gather) and Qwen2 (untied head, biases) — the two layouts a partitioned checkpoint can get
# wrong. Llama 3 and Mistral share Qwen2's layout without its biases: they train under ZeRO-3 uninterrupted (a
# worker group's restart costs ~20 CPU-s on 2 cores, and tells nothing more for them).
ZERO0_BASELINE = {"gemma2", "qwen2"}


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_trains_under_zero3(ray_session, name, data_file, tmp_path, capfd):
    """ZeRO-3, 2 workers, checkpoints every 2 steps, to step 8; the trained policy keeps the family's
    config. For ZERO0_BASELINE families a worker is killed after the first checkpoint, Ray Train restarts the
    group and the recipe resumes from the latest checkpoint (ray.max_failures 2: one spare, for a worker
    lost to a busy shared machine; a resume is deterministic either way), and an uninterrupted ZeRO-0 run of
    one worker on the same global batches (in this process) follows the same trajectory."""
    from alphadpo_ray.training.launch import train

    model_dir = build_tiny_model_dir(tmp_path / "model", TEXTS, vocab_size=320, family=name, **SIZE)
    quiet = lambda *_: None  # noqa: E731
    config = _config(tmp_path / "z3", f"{name}-z3-{tmp_path.name[-6:]}", model_dir, data_file, 3)
    resume = name in ZERO0_BASELINE
    killed, done = threading.Event(), threading.Event()
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint, daemon=True,
                              args=(Path(config.storage_path()) / config.run_name, killed, done))
    if resume:
        killer.start()
    try:
        resumed = train(config, log=quiet)
    finally:
        done.set()
        if resume:
            killer.join(timeout=5)
    assert resumed["status"] == "finished" and resumed["steps"] == STEPS, resumed["message"]
    assert len(resumed["history"]) == STEPS and all(x == x for x in _losses(resumed))  # finite
    if resume:
        assert killed.is_set(), "no worker was killed; the test did not exercise a resume"
        output, deadline = "", time.time() + 15  # worker output reaches the driver with a delay
        while "[resume] continuing from step" not in output and time.time() < deadline:
            output += capfd.readouterr().out
            time.sleep(0.2)
        assert "[resume] continuing from step" in output  # resumed from a checkpoint, not restarted

    initial, policy = load_model(model_dir), load_model(resumed["policy"])
    assert type(policy) is type(initial)
    for key in ("sliding_window", "num_key_value_heads", "final_logit_softcapping", "layer_types",
                "tie_word_embeddings"):
        assert getattr(policy.config, key, None) == getattr(initial.config, key, None), key
    if name == "gemma2":
        assert policy.get_output_embeddings().weight is policy.get_input_embeddings().weight
    start, end = initial.state_dict(), policy.state_dict()
    assert start.keys() == end.keys() and any(not torch.equal(end[k], start[k]) for k in start)  # it trained

    if name in ZERO0_BASELINE:
        baseline = _config(tmp_path / "z0", f"{name}-z0-{tmp_path.name[-6:]}", model_dir, data_file, 0, workers=1)
        zero0 = train(baseline, log=quiet)
        assert zero0["status"] == "finished" and zero0["steps"] == STEPS, zero0["message"]
        assert _losses(resumed) == pytest.approx(_losses(zero0), rel=1e-3, abs=1e-5)
        for key in ("train/loss/margin_mean", "train/loss/margin_std"):  # AlphaDPO's running statistics
            assert [h[key] for h in resumed["history"]] == pytest.approx([h[key] for h in zero0["history"]],
                                                                          rel=1e-3, abs=1e-5)
        assert _losses(zero0)[-1] != _losses(zero0)[0]  # it moved
