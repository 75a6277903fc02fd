"""Tokenisation with TRL-DPO-style truncation (as in the official SimPO / AlphaDPO configs).

Prompt and responses are tokenised separately (`add_special_tokens=False`); bos is prepended to the
prompt (if the tokenizer has one and the prompt does not already start with it) and eos appended to
each response (unless already there). Then, if `len(prompt) + max(len(responses)) > max_length`, the
prompt is cut to `max_prompt_length` (`keep_end` keeps its last tokens, `keep_start` its first), and if
still too long each response is cut to `max_length - len(prompt)`. (TRL cuts responses to
`max_length - max_prompt_length`; ours is never shorter.) Special tokens are added before cutting,
as in TRL, so `keep_end` may drop the bos and a cut response loses its eos.
"""

from __future__ import annotations

from typing import Any, Sequence

import datasets

from ..errors import ConfigError

TRUNCATION_MODES = ("keep_end", "keep_start")


def check_lengths(max_length: int, max_prompt_length: int, truncation_mode: str = "keep_end") -> None:
    """Raise `ConfigError` unless 0 < max_prompt_length < max_length and the mode is known."""
    if not 0 < max_prompt_length < max_length:
        raise ConfigError(
            f"max_prompt_length={max_prompt_length} and max_length={max_length}: "
            "expected 0 < max_prompt_length < max_length"
        )
    if truncation_mode not in TRUNCATION_MODES:
        raise ConfigError(f"truncation_mode={truncation_mode!r}: expected one of {', '.join(TRUNCATION_MODES)}")


def truncate(
    prompt: list[int], responses: Sequence[list[int]], max_length: int, max_prompt_length: int, truncation_mode: str
) -> tuple[list[int], list[list[int]]]:
    """Cut the prompt, then the responses, so that prompt + longest response fits in `max_length`."""
    longest = max(len(r) for r in responses)
    if len(prompt) + longest > max_length:
        prompt = prompt[-max_prompt_length:] if truncation_mode == "keep_end" else prompt[:max_prompt_length]
    if len(prompt) + longest > max_length:
        responses = [r[: max_length - len(prompt)] for r in responses]
    return prompt, [list(r) for r in responses]


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _tokenize_batch(batch: dict[str, list], tokenizer, response_columns: Sequence[str], output_columns: Sequence[str],
                    max_length: int, max_prompt_length: int, truncation_mode: str) -> dict[str, list]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompts = [p if bos is None or p[:1] == [bos] else [bos, *p] for p in _encode(tokenizer, batch["prompt"])]
    responses = [[r if eos is None or r[-1:] == [eos] else [*r, eos] for r in _encode(tokenizer, batch[c])]
                 for c in response_columns]
    out: dict[str, list] = {c: [] for c in ("prompt_ids", *output_columns)}
    for i, prompt in enumerate(prompts):
        prompt, cut = truncate(prompt, [rs[i] for rs in responses], max_length, max_prompt_length, truncation_mode)
        out["prompt_ids"].append(prompt)
        for c, r in zip(output_columns, cut):
            out[c].append(r)
    return out


def _tokenize(dataset: datasets.Dataset, tokenizer, response_columns: Sequence[str], output_columns: Sequence[str],
              max_length: int, max_prompt_length: int, truncation_mode: str, num_proc: int | None) -> datasets.Dataset:
    check_lengths(max_length, max_prompt_length, truncation_mode)
    kwargs: dict[str, Any] = dict(tokenizer=tokenizer, response_columns=response_columns, output_columns=output_columns,
                                  max_length=max_length, max_prompt_length=max_prompt_length,
                                  truncation_mode=truncation_mode)
    text_columns = [c for c in ("prompt", "chosen", "rejected") if c in dataset.column_names]
    return dataset.map(_tokenize_batch, batched=True, fn_kwargs=kwargs, remove_columns=text_columns,
                       num_proc=num_proc, desc="tokenizing")


def tokenize_pairs(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
    num_proc: int | None = None,
) -> datasets.Dataset:
    """`prompt`/`chosen`/`rejected` text → `prompt_ids`/`chosen_ids`/`rejected_ids`; other columns (`row`) kept."""
    return _tokenize(dataset, tokenizer, ("chosen", "rejected"), ("chosen_ids", "rejected_ids"),
                     max_length, max_prompt_length, truncation_mode, num_proc)


def tokenize_sft(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
    response_column: str = "chosen",
    num_proc: int | None = None,
) -> datasets.Dataset:
    """`prompt` + one response column (default `chosen`) → `prompt_ids`/`response_ids`, same rules as pairs."""
    return _tokenize(dataset, tokenizer, (response_column,), ("response_ids",),
                     max_length, max_prompt_length, truncation_mode, num_proc)
