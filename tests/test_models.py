"""The tiny offline model and its byte-level BPE tokenizer: save/load round trips, the chat template,
unknown-free byte-level tokenisation, individual digits, and frozen references."""

from __future__ import annotations

import pytest
import torch

from alphadpo_ray.ml.models import CHAT_TEMPLATE, ROLE_TOKENS, build_tiny_model, load_model, load_tokenizer


@pytest.fixture(scope="module")
def ids(tiny_tokenizer):
    text = "<|user|>\nSort the letters d b a c.\n<|assistant|>\nAnswer: a b c d</s>"
    return torch.tensor([tiny_tokenizer(text, add_special_tokens=False)["input_ids"]])


def test_model_round_trip_gives_the_same_logits(tiny_model_dir, tmp_path, ids):
    model = load_model(tiny_model_dir, eval_mode=True)
    with torch.no_grad():
        torch.manual_seed(0)
        for p in model.parameters():  # not the saved weights any more: the round trip must carry these
            p.add_(0.01 * torch.randn_like(p))
        before = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "copy", safe_serialization=True)
    assert (tmp_path / "copy" / "model.safetensors").exists()
    again = load_model(tmp_path / "copy", eval_mode=True)
    with torch.no_grad():
        after = again(input_ids=ids).logits
    assert torch.equal(before, after)
    original = load_model(tiny_model_dir, eval_mode=True)
    with torch.no_grad():
        assert not torch.equal(original(input_ids=ids).logits, after)
    assert again.config.vocab_size == model.config.vocab_size


def test_tokenizer_round_trip(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    text = "<|user|>\nWhat is 12 + 34?\n<|assistant|>\nThe answer is 46.</s>"
    assert again(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    assert again.chat_template == tiny_tokenizer.chat_template == CHAT_TEMPLATE
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
        assert getattr(again, name) == getattr(tiny_tokenizer, name) is not None
    assert len(again) == len(tiny_tokenizer)


def test_model_vocabulary_matches_the_tokenizer(tiny_model_dir, tiny_tokenizer):
    model = load_model(tiny_model_dir)
    assert model.config.vocab_size == len(tiny_tokenizer)
    assert model.config.pad_token_id == tiny_tokenizer.pad_token_id
    assert model.config.eos_token_id == tiny_tokenizer.eos_token_id
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied


def test_build_tiny_llama_is_deterministic_for_a_seed(tiny_tokenizer):
    a, b = build_tiny_model("llama", tiny_tokenizer, hidden_size=16, num_heads=2, intermediate_size=32, seed=3), \
        build_tiny_model("llama", tiny_tokenizer, hidden_size=16, num_heads=2, intermediate_size=32, seed=3)
    c = build_tiny_model("llama", tiny_tokenizer, hidden_size=16, num_heads=2, intermediate_size=32, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


CONVERSATIONS = [
    [{"role": "user", "content": "Sort ascending: 7 2 9"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse the order: a b c"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_generation_prompt_is_a_prefix_of_the_full_conversation(tiny_tokenizer, messages):
    reply = {"role": "assistant", "content": "The answer is 2 7 9."}
    prompt = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tiny_tokenizer.apply_chat_template(messages + [reply], tokenize=False)
    assert prompt.endswith("<|assistant|>\n")
    assert full.startswith(prompt)
    assert full[len(prompt):] == reply["content"] + tiny_tokenizer.eos_token
    # the role markers and eos are single special tokens, so the prefix property holds on token ids too
    prompt_ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tiny_tokenizer(full, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert full_ids[-1] == tiny_tokenizer.eos_token_id
    for role in ROLE_TOKENS:
        assert len(tiny_tokenizer(role, add_special_tokens=False)["input_ids"]) == 1


def test_chat_template_renders_the_documented_format(tiny_tokenizer):
    messages = [{"role": "user", "content": "Sort ascending: 7 2 9"}]
    assert tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        "<|user|>\nSort ascending: 7 2 9\n<|assistant|>\n"
    )


@pytest.mark.parametrize(
    "text",
    [
        "héllo wörld — naïve café",
        "日本語のテキスト, 中文, 한국어",
        "emoji 🙂🚀 and a zero-width\u200bjoiner",
        "tabs\tand\nnewlines\r\n  and   spaces ",
        "control \x00\x07 chars and \ufffd",
        "Ωmega ∑ ∫ √ ≠ ≤ ∞",
        "",
    ],
)
def test_byte_level_tokenizer_round_trips_any_text_without_unk(tiny_tokenizer, text):
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.unk_token_id not in ids
    assert tiny_tokenizer.decode(ids) == text


def test_digits_are_tokenised_individually(tiny_tokenizer):
    # "12", "34", "46" appear often in the training texts, so BPE would merge them were digits not split
    text = "What is 12 + 34? The answer is 46. Year 2024, pi 3.14159"
    tokens = tiny_tokenizer.convert_ids_to_tokens(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])
    digit_tokens = [t for t in tokens if any(c.isdigit() for c in t)]
    assert all(len(t) == 1 for t in digit_tokens), digit_tokens
    assert "".join(digit_tokens) == "".join(c for c in text if c.isdigit())


def test_tokenizer_pads_on_the_right(tiny_tokenizer):
    assert tiny_tokenizer.padding_side == "right"
    batch = tiny_tokenizer(["a", "a b c d e"], padding=True, add_special_tokens=False)
    assert batch["input_ids"][0][-1] == tiny_tokenizer.pad_token_id
    assert batch["attention_mask"][0][0] == 1 and batch["attention_mask"][0][-1] == 0


def test_load_model_eval_mode_freezes_parameters(tiny_model_dir, ids):
    reference = load_model(tiny_model_dir, eval_mode=True)
    assert not reference.training
    assert all(not m.training for m in reference.modules())
    assert all(not p.requires_grad for p in reference.parameters())
    out = reference(input_ids=ids).logits
    assert not out.requires_grad  # even with grad enabled, nothing to differentiate

    policy = load_model(tiny_model_dir)
    assert all(p.requires_grad for p in policy.parameters())
    policy(input_ids=ids).logits.sum().backward()
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)


def test_load_model_dtype(tiny_model_dir):
    model = load_model(tiny_model_dir, dtype=torch.bfloat16, eval_mode=True)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_loaders_name_what_a_local_directory_lacks(tiny_model_dir, tmp_path):
    """An empty or half-saved directory is one message naming the path and the missing files, not a
    transformers traceback (which suggests installing sentencepiece)."""
    import shutil

    from alphadpo_ray.errors import ConfigError

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=rf"^{empty}: is not a complete tokenizer directory: missing tokenizer files "
                                          r"\(one of tokenizer\.json, .*\) \(it holds nothing\)"):
        load_tokenizer(empty)
    with pytest.raises(ConfigError, match=rf"^{empty}: is not a complete model directory: missing config\.json; weights"):
        load_model(empty)
    half = tmp_path / "half"
    shutil.copytree(tiny_model_dir, half)
    for weights in half.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ConfigError, match=r"missing weights \(model\.safetensors or pytorch_model\.bin"):
        load_model(half)
    assert load_tokenizer(half).pad_token is not None  # the tokenizer files are all there
