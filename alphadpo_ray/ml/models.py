"""Models and tokenizers: tiny offline models for CPU work, and `from_pretrained` loading for real ones.

The tiny models come in the families the paper trains and users bring (`FAMILIES`: the default
Llama, Mistral, Llama-3, Gemma-2, Qwen2), each with its distinguishing architecture features and its
chat template. Nothing here downloads anything unless it is given a hub id: the tiny models and their
byte-level BPE tokenizers are built locally from text, saved with `save_pretrained`, and loaded again with
`from_pretrained` from a directory, exactly like a hub checkpoint.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..errors import ConfigError

# Special tokens of the tiny (default, "llama") tokenizer. The chat template renders
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

# The tiny families' sliding window (tokens): shorter than the test sequences, so it changes the logits.
TINY_SLIDING_WINDOW = 8
# Gemma-2's final-logit soft cap for the tiny model: the real 30.0 would never bite on a tiny random
# model's logits (|z| << 1); at 0.5 the cap visibly changes log-probs, so a missed cap is caught.
TINY_LOGIT_SOFTCAP = 0.5


@dataclass(frozen=True)
class Family:
    """A model family: its transformers causal-LM class, its tokenizer's special tokens and chat template
    (written out here, as the family's hub tokenizers render it), and `settings(hidden_size, num_heads,
    num_layers)`, the config values that give the tiny model the family's distinguishing features."""

    name: str
    model_class: str  # a transformers *ForCausalLM class name
    bos: str | None
    eos: str
    pad: str | None  # None: the real checkpoint has none; pads with eos, as load_tokenizer does
    unk: str | None
    extra_tokens: tuple[str, ...]  # the template's other special tokens
    chat_template: str
    settings: Callable[[int, int, int], dict]

    @property
    def special_tokens(self) -> list[str]:
        return list(dict.fromkeys(t for t in (self.pad, self.bos, self.eos, self.unk, *self.extra_tokens) if t))


def _gqa(num_heads: int) -> int:
    """Key/value heads for grouped-query attention: fewer than the query heads (half, at least 1)."""
    return max(1, num_heads // 2)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(  # the package's own tiny model: full multi-head attention, tied embeddings
            "llama", "LlamaForCausalLM", BOS, EOS, PAD, UNK, tuple(ROLE_TOKENS), CHAT_TEMPLATE,
            lambda hidden, heads, layers: {"num_key_value_heads": heads, "tie_word_embeddings": True},
        ),
        Family(  # Mistral-7B: sliding-window attention (every layer sees only the last W tokens), GQA
            "mistral", "MistralForCausalLM", "<s>", "</s>", None, "<unk>", ("[INST]", "[/INST]"),
            "{{ bos_token }}{% for message in messages %}"
            "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
            "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
            "{% else %}{{ raise_exception('Mistral: only user and assistant roles are supported') }}{% endif %}"
            "{% endfor %}",
            lambda hidden, heads, layers: {"num_key_value_heads": _gqa(heads), "sliding_window": TINY_SLIDING_WINDOW},
        ),
        Family(  # Llama-3-8B: grouped-query attention, rope theta 500k, untied head, no pad token
            "llama3", "LlamaForCausalLM", "<|begin_of_text|>", "<|eot_id|>", None, None,
            ("<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"),
            "{{ bos_token }}{% for message in messages %}"
            "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
            " + '<|eot_id|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
            lambda hidden, heads, layers: {"num_key_value_heads": _gqa(heads), "tie_word_embeddings": False,
                                           "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
        ),
        Family(  # Gemma-2-9B: final-logit soft-capping, sliding/global attention alternating by layer,
            # tied input/output embeddings (plus attention-logit soft-capping, sqrt(H)-scaled embeddings)
            "gemma2", "Gemma2ForCausalLM", "<bos>", "<eos>", "<pad>", "<unk>", ("<start_of_turn>", "<end_of_turn>"),
            "{{ bos_token }}{% for message in messages %}"
            "{% if message['role'] == 'system' %}{{ raise_exception('Gemma: system role not supported') }}{% endif %}"
            "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n'"
            " + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
            lambda hidden, heads, layers: {
                "num_key_value_heads": _gqa(heads), "tie_word_embeddings": True,
                "final_logit_softcapping": TINY_LOGIT_SOFTCAP, "sliding_window": TINY_SLIDING_WINDOW,
                "layer_types": [("sliding_attention", "full_attention")[i % 2] for i in range(layers)],
                "head_dim": hidden // heads, "query_pre_attn_scalar": hidden // heads,
            },
        ),
        Family(  # Qwen2: biases on the q/k/v projections (ChatML template, no bos token)
            "qwen2", "Qwen2ForCausalLM", None, "<|im_end|>", "<|endoftext|>", None, ("<|im_start|>",),
            "{% for message in messages %}"
            "{% if loop.first and message['role'] != 'system' %}"
            "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
            "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
            lambda hidden, heads, layers: {"num_key_value_heads": _gqa(heads), "tie_word_embeddings": False},
        ),
    )
}


def _family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512, family: str = "llama"):
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a `PreTrainedTokenizerFast` with
    `family`'s special tokens (each one token) and chat template.

    Byte-level means any text (HH conversations included) tokenizes without unknown tokens; digits
    are split individually so arithmetic stays learnable for a tiny model.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fam = _family(family)
    tok = Tokenizer(models.BPE(unk_token=fam.unk))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=fam.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    named = (fam.pad, fam.bos, fam.eos, fam.unk)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=fam.bos,
        eos_token=fam.eos,
        pad_token=fam.pad or fam.eos,
        unk_token=fam.unk,
        additional_special_tokens=[t for t in fam.special_tokens if t not in named],
    )
    fast.chat_template = fam.chat_template
    fast.padding_side = "right"
    return fast


def build_tiny_model(
    family: str,
    tokenizer,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 192,
    max_position_embeddings: int = 512,
    seed: int = 0,
    **config_overrides,
):
    """A randomly initialised causal LM of `family` (see `FAMILIES`) sized for CPU tests; any config
    value can be overridden by keyword."""
    import transformers

    fam = _family(family)
    model_class = getattr(transformers, fam.model_class)
    settings = {**fam.settings(hidden_size, num_heads, num_layers), **config_overrides}
    config = model_class.config_class(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():  # HF initialises biases to zero; random ones make Qwen2's q/k/v biases matter
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj") and module.bias is not None:
                module.bias.normal_(0.0, config.initializer_range)
    return model


def build_tiny_model_dir(
    path: str | os.PathLike, texts: Iterable[str], vocab_size: int = 512, family: str = "llama", **model_kwargs
) -> Path:
    """Build `family`'s tiny tokenizer and model and `save_pretrained` both into `path`; returns the path."""
    path = Path(path)
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size, family=family)
    model = build_tiny_model(family, tokenizer, **model_kwargs)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


# What `from_pretrained` needs in a local directory: the model's config.json and weights; a tokenizer's
# vocabulary in one of the formats transformers reads (fast tokenizer.json, SentencePiece, BPE, WordPiece).
MODEL_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_hub_id(name: str) -> bool:
    """`org/name` or `name` (what the Hub accepts), as opposed to `./dir`, `/abs/dir` or `~/dir`."""
    return bool(_HUB_ID.match(name)) and ".." not in name


def local_model_problem(name_or_path: str | os.PathLike, *, model: bool = True, tokenizer: bool = True) -> str | None:
    """What a local model directory lacks for `load_model` (`model`) / `load_tokenizer` (`tokenizer`), in
    words; None when it has it, or when `name_or_path` is not a local path (a hub id)."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        if looks_like_hub_id(str(name_or_path)):
            return None
        return "not found; expected a local model directory (config.json, weights, tokenizer files) or a hub id"
    if not path.is_dir():
        return "is a file; expected a model directory (config.json, weights, tokenizer files) or a hub id"
    missing = []
    if model and not (path / "config.json").is_file():
        missing.append("config.json")
    if model and not any(any(path.glob(pattern)) for pattern in MODEL_WEIGHTS):
        missing.append("weights (model.safetensors or pytorch_model.bin, or their sharded index)")
    if tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    if not missing:
        return None
    what = "model and tokenizer" if model and tokenizer else "model" if model else "tokenizer"
    listing = sorted(p.name for p in path.iterdir())[:8]
    return (f"is not a complete {what} directory: missing {'; '.join(missing)} (it holds "
            f"{', '.join(listing) if listing else 'nothing'}); save it with save_pretrained or use "
            "`alphadpo-ray init-model`")


def _check_local(name_or_path, **what) -> None:
    problem = local_model_problem(name_or_path, **what)
    if problem:
        raise ConfigError(f"{name_or_path}: {problem}")


def load_tokenizer(name_or_path: str | os.PathLike):
    """Load a tokenizer (local directory or hub id) and make sure it can pad."""
    from transformers import AutoTokenizer

    _check_local(name_or_path, model=False)
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32, eval_mode: bool = False, **kwargs):
    """`AutoModelForCausalLM.from_pretrained`; `eval_mode=True` also freezes it (for references)."""
    from transformers import AutoModelForCausalLM

    _check_local(name_or_path, tokenizer=False)
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype, **kwargs)
    if eval_mode:
        model.eval()
        model.requires_grad_(False)
    return model
