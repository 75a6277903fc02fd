"""Tokenisation with TRL-DPO-style truncation (as in the official SimPO / AlphaDPO configs).

Prompt and responses are tokenised separately (`add_special_tokens=False`); bos is prepended to the
prompt (if the tokenizer has one and the prompt does not already start with it) and eos appended to
each response (unless already there). Then, if `len(prompt) + max(len(responses)) > max_length`, the
prompt is cut to `max_prompt_length` (`keep_end` keeps its last tokens, `keep_start` its first), and if
still too long each response is cut to `max_length - len(prompt)`. (TRL cuts responses to
`max_length - max_prompt_length`; ours is never shorter.) Special tokens are added before cutting,
as in TRL, so `keep_end` may drop the bos and a cut response loses its eos.

`tokenize_pairs_with_report` also counts what truncation did (pairs with a cut prompt, pairs with a cut
response) and skips the pairs that cannot be scored after it, by reason (`PAIR_REASONS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from ...errors import ConfigError, DataError

if TYPE_CHECKING:  # imported where used: see sources.py
    import datasets

TRUNCATION_MODES = ("keep_end", "keep_start")
PAIR_REASONS = (
    "no_response_tokens",  # chosen or rejected keeps no token of its own text (only bos/eos/pad, or nothing)
    "identical_after_truncation",  # chosen and rejected were cut to the same tokens: no preference is left
)
MAX_EXAMPLES = 5  # rows remembered per skip reason
_PROMPT_CUT, _RESPONSE_CUT = 1, 2


@dataclass
class TruncationReport:
    """What tokenisation did to one split's pairs: how many were truncated (prompt cut, response cut) and
    which were skipped because they cannot be scored (`skipped` by reason, `examples`: first `row` values)."""

    source: str
    max_length: int
    max_prompt_length: int
    truncation_mode: str
    total: int = 0
    kept: int = 0
    truncated: int = 0  # pairs with anything cut
    prompt_truncated: int = 0  # pairs whose prompt was cut to max_prompt_length
    response_truncated: int = 0  # pairs with a chosen or rejected response cut (it loses its end and eos)
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[int]] = field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def lost_response(self) -> int:
        """Pairs in which a response kept nothing of its own text."""
        return self.skipped.get("no_response_tokens", 0)

    def add_skip(self, reason: str, row: int) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        rows = self.examples.setdefault(reason, [])
        if len(rows) < MAX_EXAMPLES:
            rows.append(row)

    def summary(self) -> str:
        side = "first" if self.truncation_mode == "keep_start" else "last"
        text = (f"{self.source}: {self.truncated} of {self.total} pairs truncated to data.max_length {self.max_length} "
                f"(prompt cut in {self.prompt_truncated}: {self.truncation_mode} kept its {side} "
                f"{self.max_prompt_length} tokens; a response cut in {self.response_truncated}: its end and eos lost); "
                f"{self.lost_response} lost a whole response")
        if self.skipped:
            parts = []
            for r, n in self.skipped.items():
                rows = self.examples[r]
                more = ", ..." if n > len(rows) else ""
                parts.append(f"{r} {n} (row{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows))}{more})")
            text += f"; skipped {self.num_skipped} that cannot be scored: " + "; ".join(parts)
        return text + f"; {self.kept} pairs left [raise data.max_length / data.max_prompt_length to keep more]"


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


def _problem(cut: list[list[int]], flags: int, special: set) -> str:
    """Why a truncated pair cannot be scored ('' if it can)."""
    if any(all(t in special for t in r) for r in cut):
        return "no_response_tokens"
    if flags & _RESPONSE_CUT and len(cut) == 2 and cut[0] == cut[1]:
        return "identical_after_truncation"
    return ""


def _tokenize_batch(batch: dict[str, list], tokenizer, response_columns: Sequence[str], output_columns: Sequence[str],
                    max_length: int, max_prompt_length: int, truncation_mode: str,
                    report: bool = False) -> dict[str, list]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    special = {t for t in (bos, eos, tokenizer.pad_token_id) if t is not None}
    prompts = [p if bos is None or p[:1] == [bos] else [bos, *p] for p in _encode(tokenizer, batch["prompt"])]
    responses = [[r if eos is None or r[-1:] == [eos] else [*r, eos] for r in _encode(tokenizer, batch[c])]
                 for c in response_columns]
    out: dict[str, list] = {c: [] for c in ("prompt_ids", *output_columns, *(("_cut", "_problem") if report else ()))}
    for i, full_prompt in enumerate(prompts):
        full = [rs[i] for rs in responses]
        prompt, cut = truncate(full_prompt, full, max_length, max_prompt_length, truncation_mode)
        out["prompt_ids"].append(prompt)
        for c, r in zip(output_columns, cut):
            out[c].append(r)
        if report:
            flags = (_PROMPT_CUT if len(prompt) < len(full_prompt) else 0) | (
                _RESPONSE_CUT if any(len(a) < len(b) for a, b in zip(cut, full)) else 0)
            out["_cut"].append(flags)
            out["_problem"].append(_problem(cut, flags, special))
    return out


def _tokenize(dataset: datasets.Dataset, tokenizer, response_columns: Sequence[str], output_columns: Sequence[str],
              max_length: int, max_prompt_length: int, truncation_mode: str, num_proc: int | None,
              report: bool = False) -> datasets.Dataset:
    check_lengths(max_length, max_prompt_length, truncation_mode)
    kwargs: dict[str, Any] = dict(tokenizer=tokenizer, response_columns=response_columns, output_columns=output_columns,
                                  max_length=max_length, max_prompt_length=max_prompt_length,
                                  truncation_mode=truncation_mode, report=report)
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


def tokenize_pairs_with_report(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
    name: str = "<pairs>",
    strict: bool = False,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, TruncationReport]:
    """`tokenize_pairs`, plus a `TruncationReport`; pairs that cannot be scored after truncation (a response
    with no token of its own left, or chosen and rejected cut to the same tokens) are skipped and counted,
    or, with `strict=True`, the first one raises a `DataError` naming `name`, its row and the reason."""
    out = _tokenize(dataset, tokenizer, ("chosen", "rejected"), ("chosen_ids", "rejected_ids"),
                    max_length, max_prompt_length, truncation_mode, num_proc, report=True)
    report = TruncationReport(name, max_length, max_prompt_length, truncation_mode, total=len(out))
    rows = out["row"] if "row" in out.column_names else list(range(len(out)))
    keep = []
    for i, (flags, problem) in enumerate(zip(out["_cut"], out["_problem"])):
        report.truncated += bool(flags)
        report.prompt_truncated += bool(flags & _PROMPT_CUT)
        report.response_truncated += bool(flags & _RESPONSE_CUT)
        if not problem:
            keep.append(i)
            continue
        if strict:
            raise DataError(f"{name}: row {rows[i]} (0-based): {problem}: after truncation to data.max_length "
                            f"{max_length} (data.max_prompt_length {max_prompt_length}, {truncation_mode}) the pair "
                            "cannot be scored (data.strict is on; turn it off to skip such pairs)")
        report.add_skip(problem, rows[i])
    report.kept = len(keep)
    if len(keep) < len(out):
        out = out.select(keep)
    return out.remove_columns(["_cut", "_problem"]), report


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
