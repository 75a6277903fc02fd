"""Collation: right-padding to the longest sequence in the batch (optionally to a multiple of N).

`collate_pairs` builds the concatenated chosen+rejected batch for one forward pass; `collate_sft` the
single-sequence batch of an SFT stage. `response_mask` is True exactly on response tokens, so
per-sequence response log-probs are sums over it. Use `functools.partial` to fix `pad_token_id`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def _ids(x: Any) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.long).reshape(-1)


def pad_sequences(
    prompts: Sequence[Any], responses: Sequence[Any], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad `prompt + response` rows; returns `input_ids`, `attention_mask` (long) and `response_mask` (bool)."""
    prompts, responses = [_ids(p) for p in prompts], [_ids(r) for r in responses]
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    n = len(prompts)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    response_mask = torch.zeros((n, width), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        end = len(p) + len(r)
        input_ids[i, :end] = torch.cat([p, r])
        attention_mask[i, :end] = 1
        response_mask[i, len(p):end] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def _index(examples: Sequence[dict[str, Any]]) -> torch.Tensor:
    if any("row" not in e for e in examples):
        raise ValueError("collate: every example needs a 'row' column (its index in the source data)")
    return torch.as_tensor([int(e["row"]) for e in examples], dtype=torch.long)


def collate_pairs(
    examples: Sequence[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Batch of B pairs → `input_ids`/`attention_mask`/`response_mask` [2B, T] (rows :B prompt+chosen,
    B: prompt+rejected), `index` [B] (= `row`), and `ref_chosen_logps`/`ref_rejected_logps` [B] if present."""
    prompts = [e["prompt_ids"] for e in examples] * 2
    responses = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    batch = pad_sequences(prompts, responses, pad_token_id, pad_to_multiple_of)
    batch["index"] = _index(examples)
    for key in REF_COLUMNS:
        present = [e.get(key) is not None for e in examples]
        if any(present) and not all(present):
            raise ValueError(f"collate_pairs: '{key}' is set on some examples of the batch but not all")
        if all(present):
            batch[key] = torch.as_tensor([float(e[key]) for e in examples], dtype=torch.float32)
    return batch


def collate_sft(
    examples: Sequence[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Batch of B `prompt_ids` + `response_ids` → `input_ids`/`attention_mask`/`response_mask` [B, T]
    (+ `index` [B] when examples carry `row`)."""
    batch = pad_sequences([e["prompt_ids"] for e in examples], [e["response_ids"] for e in examples],
                          pad_token_id, pad_to_multiple_of)
    if all("row" in e for e in examples):
        batch["index"] = _index(examples)
    return batch
