"""`alphadpo-ray init-model DATA OUT`: a small model for your own preference data, built offline.

To try the pipeline on your data without downloading anything:

1. read and validate DATA exactly as training will (same formats, same skip report);
2. train a byte-level BPE tokenizer on its text, with a model family's special tokens and chat
   template (`models.FAMILIES`: llama, mistral, llama3, gemma2, qwen2);
3. build a small random model of that family and fine-tune it (SFT) on the *chosen* responses, so it
   is a sensible reference: preference optimisation then starts from a model that already writes
   answers like the data's;
4. `save_pretrained` model + tokenizer into OUT (written beside it first, then renamed: an interrupted
   build never leaves a half-written OUT), ready for ``model.name_or_path: OUT``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..ml.data import load_preference_data, read_raw, tokenize_sft
from ..ml.models import FAMILIES, build_tiny_model, build_tokenizer
from ..ml.task import SFTConfig
from .sft import train_sft


@dataclass(frozen=True)
class InitModelSettings:
    family: str = "llama"
    vocab_size: int = 512
    hidden_size: int = 96
    num_layers: int = 2
    num_heads: int = 4
    sft_steps: int = 300
    batch_size: int = 16
    learning_rate: float = 3e-3
    max_length: int = 256
    max_prompt_length: int = 128
    format: str = "auto"
    chat_template: bool = False  # render string prompts with the chat template (messages always are)
    seed: int = 0


def _texts(value) -> list[str]:
    """Every string inside a row (prompt/response strings, message contents)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _texts(v)]
    if isinstance(value, list):
        return [t for v in value for t in _texts(v)]
    return []


def init_model(data: str, out: str, settings: InitModelSettings = InitModelSettings(), *, force: bool = False,
               log=print) -> dict:
    """Build OUT from DATA (see the module docstring); returns what was built."""
    s = settings
    if s.family not in FAMILIES:
        raise ConfigError(f"--family: unknown model family {s.family!r}; choose one of {', '.join(FAMILIES)}")
    if s.max_prompt_length >= s.max_length:
        raise ConfigError(f"--max-prompt-length ({s.max_prompt_length}) must be smaller than --max-length ({s.max_length})")
    destination = Path(out).expanduser().resolve()
    if destination.exists() and any(destination.iterdir()) and not force:
        raise ConfigError(f"{out} exists and is not empty; choose another OUT or pass --force to replace it")

    raw = read_raw(data)
    corpus = [t for row in raw.rows for t in _texts(row)]
    tokenizer = build_tokenizer(corpus, vocab_size=s.vocab_size, family=s.family)
    dataset, report = load_preference_data(data, format=s.format, chat_template=s.chat_template, tokenizer=tokenizer)
    if report.num_skipped:
        log(f"[data] {report.summary()}")
    examples = list(tokenize_sft(dataset, tokenizer, response_column="chosen", max_length=s.max_length,
                                 max_prompt_length=s.max_prompt_length))
    model = build_tiny_model(s.family, tokenizer, hidden_size=s.hidden_size, num_layers=s.num_layers,
                             num_heads=s.num_heads, intermediate_size=3 * s.hidden_size,
                             max_position_embeddings=max(512, s.max_length), seed=s.seed)
    sft = SFTConfig(vocab_size=s.vocab_size, hidden_size=s.hidden_size, num_layers=s.num_layers, num_heads=s.num_heads,
                    steps=s.sft_steps, batch_size=s.batch_size, learning_rate=s.learning_rate,
                    max_length=s.max_length, max_prompt_length=s.max_prompt_length, seed=s.seed)
    losses = train_sft(model, examples, tokenizer.pad_token_id, sft)

    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        built = {"data": str(Path(data).resolve()), "family": s.family, "parameters": model.num_parameters(),
                 "vocab_size": len(tokenizer), "pairs": len(dataset), "skipped": report.num_skipped,
                 "sft_loss_first": losses[0], "sft_loss_last": losses[-1], "settings": s.__dict__}
        (staging / "init_model.json").write_text(json.dumps(built, indent=2))
        if destination.exists():
            shutil.rmtree(destination)
        staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"wrote {destination}: {s.family}, {built['parameters'] / 1e6:.2f} M parameters, vocabulary {built['vocab_size']}, "
        f"SFT on {len(dataset)} chosen responses (loss {losses[0]:.2f} → {losses[-1]:.2f}); "
        f"use it with model.name_or_path: {out}")
    return {**built, "path": str(destination)}
