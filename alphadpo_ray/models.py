"""Models and tokenizers: a tiny offline Llama for CPU work, and `from_pretrained` loading for real ones.

Nothing here downloads anything unless it is given a hub id: the tiny model and its byte-level BPE
tokenizer are built locally from text, saved with `save_pretrained`, and loaded again with
`from_pretrained` from a directory, exactly like a hub checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

# Special tokens of the tiny tokenizer. The chat template renders
#   <|user|>\n{content}\n<|assistant|>\n{content}</s>
# so that the prompt rendered with add_generation_prompt=True is a prefix of the full conversation.
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a `PreTrainedTokenizerFast`.

    Byte-level means any text (HH conversations included) tokenizes without unknown tokens; digits
    are split individually so arithmetic stays learnable for a tiny model.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=ROLE_TOKENS,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def build_tiny_llama(
    tokenizer,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 192,
    max_position_embeddings: int = 512,
    seed: int = 0,
):
    """A randomly initialised Llama-architecture causal LM sized for CPU tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model


def build_tiny_model_dir(path: str | os.PathLike, texts: Iterable[str], vocab_size: int = 512, **model_kwargs) -> Path:
    """Build the tiny tokenizer and model and `save_pretrained` both into `path`; returns the path."""
    path = Path(path)
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size)
    model = build_tiny_llama(tokenizer, **model_kwargs)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def load_tokenizer(name_or_path: str | os.PathLike):
    """Load a tokenizer (local directory or hub id) and make sure it can pad."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32, eval_mode: bool = False, **kwargs):
    """`AutoModelForCausalLM.from_pretrained`; `eval_mode=True` also freezes it (for references)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype, **kwargs)
    if eval_mode:
        model.eval()
        model.requires_grad_(False)
    return model
