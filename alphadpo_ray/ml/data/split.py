"""Held-out data: the source's own test split / a separate eval file, or a seeded prompt-disjoint split."""

from __future__ import annotations

import dataclasses
import os
import random
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError, DataError
from .sources import is_local_source
from .validation import ValidationReport, load_preference_data

if TYPE_CHECKING:  # imported where used: see sources.py
    import datasets


def split_held_out(
    dataset: datasets.Dataset, fraction: float, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split into (train, held_out) so that no prompt text appears on both sides.

    Distinct prompts (in order of first appearance) are shuffled with `random.Random(seed)` and moved
    to the held-out side until it holds at least `round(fraction * len(dataset))` rows (at least 1).
    Deterministic for a seed; both sides keep the original row order. `DataError` if a side would be empty.
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"held_out_fraction={fraction}: expected 0 < fraction < 1")
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(dataset["prompt"]):
        groups.setdefault(prompt, []).append(i)
    prompts = list(groups)
    random.Random(seed).shuffle(prompts)
    target, held = max(1, round(fraction * len(dataset))), []
    for p in prompts:
        if len(held) >= target:
            break
        held.extend(groups[p])
    if not held or len(held) == len(dataset):
        raise DataError(
            f"cannot split {len(dataset)} rows with {len(groups)} distinct prompt(s) into prompt-disjoint "
            f"train and held-out sets with fraction {fraction}: one side would be empty"
        )
    held_set = set(held)
    train_idx = [i for i in range(len(dataset)) if i not in held_set]
    return dataset.select(train_idx), dataset.select(sorted(held))


def load_with_held_out(
    source: str | os.PathLike,
    *,
    split: str = "train",
    eval_source: str | os.PathLike | None = None,
    eval_split: str | None = None,
    held_out_fraction: float = 0.05,
    seed: int = 0,
    **load_kwargs: Any,
) -> tuple[datasets.Dataset, datasets.Dataset, dict[str, ValidationReport]]:
    """Train and held-out pairs plus their reports (`{"train": ..., "held_out": ...}`).

    Held-out is `eval_source` (a file or hub id) and/or `eval_split` (a hub set's own test split, e.g.
    `test_prefs`) when given; otherwise a prompt-disjoint `split_held_out` of the training data (rows keep
    their original `row` indices). Each report describes its own split's rows: after a split, the
    training report counts the rows that were not held out and every skipped row (they were read as
    training data), the held-out report only the held-out pairs.
    """
    train, report = load_preference_data(source, split=split, **load_kwargs)
    if eval_source is None and eval_split is None:
        train, held = split_held_out(train, held_out_fraction, seed)
        held_report = ValidationReport(
            source=f"{report.source} [held-out split: {held_out_fraction:g} by prompt, seed {seed}]",
            format=report.format, total=len(held), kept=len(held))
        train_report = dataclasses.replace(report, total=report.total - len(held), kept=len(train))
        return train, held, {"train": train_report, "held_out": held_report}
    if eval_source is None and is_local_source(source):
        raise ConfigError(f"eval_split={eval_split!r}: a local file has no splits; give eval_source=<path> instead")
    eval_source = source if eval_source is None else eval_source
    eval_split = eval_split or split
    if str(eval_source) == str(source) and eval_split == split:
        raise ConfigError(f"eval_source/eval_split name the training data itself ({source}, split {split!r})")
    held, held_report = load_preference_data(eval_source, split=eval_split, **load_kwargs)
    return train, held, {"train": report, "held_out": held_report}
