"""Row validation and the loading entry points: `load_preference_data` (files / hub) and
`preference_data_from_rows` (in-memory lists). Both return a `Dataset` with `prompt`, `chosen`,
`rejected` (response text only), `row` (0-based index in the original data) and a `ValidationReport`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from ...errors import ConfigError, DataError
from .formats import PARSERS, RowProblem, detect_format
from .sources import RawRows, read_raw, source_name

if TYPE_CHECKING:  # imported where used: see sources.py
    import datasets

log = logging.getLogger(__name__)
MAX_EXAMPLES = 5  # row indices remembered per skip reason


@dataclass
class ValidationReport:
    """What validation did to one source (or one split of it). `examples` holds the first few 0-based
    row indices per reason and, for JSON-lines files, `lines` their 1-based line numbers. `truncation`
    is filled by tokenisation (`tokenization.TruncationReport` as a dict)."""

    source: str
    format: str
    total: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[int]] = field(default_factory=dict)
    lines: dict[str, list[int]] = field(default_factory=dict)
    truncation: dict | None = None

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def add_skip(self, reason: str, row: int, line: int | None = None) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        rows = self.examples.setdefault(reason, [])
        if len(rows) < MAX_EXAMPLES:
            rows.append(row)
            if line is not None:
                self.lines.setdefault(reason, []).append(line)

    def _where(self, reason: str) -> str:
        rows, lines = self.examples[reason], self.lines.get(reason)
        more = self.skipped[reason] > len(rows)
        where = f"row{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows))}"
        if lines:
            where += f" = line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines))}"
        return where + (", ..." if more else "")

    def summary(self) -> str:
        head = f"{self.source} ({self.format}): kept {self.kept} of {self.total} rows"
        if not self.skipped:
            return head
        parts = [f"{r} {n} ({self._where(r)})" for r, n in self.skipped.items()]
        note = "row indices are 0-based, line numbers 1-based" if self.lines else "row indices are 0-based"
        return f"{head}; skipped {self.num_skipped}: " + "; ".join(parts) + f" [{note}]"


def validate_rows(
    rows: Iterable[dict[str, Any]],
    columns: Sequence[str],
    name: str,
    *,
    format: str = "auto",
    strict: bool = False,
    chat_template: bool = False,
    tokenizer=None,
    keep_columns: Sequence[str] = (),
    lines: Sequence[int] | None = None,
) -> tuple[datasets.Dataset, ValidationReport]:
    """Parse and check every row; skip bad ones (or raise on the first with `strict=True`). A row may be
    a `RowProblem` (a line the reader could not read); `lines` gives each row's line number in its file."""
    import datasets

    rows = rows.to_list() if isinstance(rows, datasets.Dataset) else list(rows)
    if not rows:
        raise DataError(f"{name}: no rows (the source is empty)")
    readable = any(not isinstance(r, RowProblem) for r in rows)  # else each row's problem is reported below
    fmt = detect_format(columns, rows, name, format) if readable else format
    if fmt == "hh" and chat_template:
        raise ConfigError(f"{name}: chat_template=True applies to the strings format, not {fmt!r}")
    if readable and (fmt == "messages" or chat_template) and getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(f"{name}: the {fmt} format with chat templating needs a tokenizer with a chat_template")
    if readable and (missing := [c for c in keep_columns if c not in columns]):
        raise DataError(f"{name}: keep_columns {missing} not in columns {list(columns)}")
    parse = PARSERS.get(fmt)
    report = ValidationReport(source=name, format=fmt, total=len(rows))
    out: dict[str, list] = {k: [] for k in ("prompt", "chosen", "rejected", "row", *keep_columns)}
    for i, row in enumerate(rows):
        try:
            if isinstance(row, RowProblem):
                raise row
            triple = parse(row, tokenizer, chat_template)
        except RowProblem as p:
            line = lines[i] if lines is not None else None
            if strict:
                where = f"line {line} (row {i}, 0-based)" if line is not None else f"row {i} (0-based)"
                raise DataError(f"{name}: {where}: {p} (data.strict is on; turn it off to skip such rows)") from None
            report.add_skip(p.reason, i, line)
            continue
        for k, v in zip(("prompt", "chosen", "rejected", "row"), (*triple, i)):
            out[k].append(v)
        for k in keep_columns:
            out[k].append(row.get(k))
    report.kept = len(out["row"])
    if report.kept == 0:
        why = ", ".join(f"{r}: {n}" for r, n in report.skipped.items()) or "the source is empty"
        raise DataError(f"{name}: no usable rows out of {report.total} ({why})")
    log.debug("%s", report.summary())  # the caller reports it (prepare prints each split's once)
    return datasets.Dataset.from_dict(out), report


def load_preference_data(
    source: str | os.PathLike,
    *,
    split: str = "train",
    format: str = "auto",
    strict: bool = False,
    chat_template: bool = False,
    tokenizer=None,
    keep_columns: Sequence[str] = (),
) -> tuple[datasets.Dataset, ValidationReport]:
    """Load a local file (.jsonl/.json/.jsonl.gz/.parquet) or a hub id (`split` applies to hub ids only),
    detect its shape (`format`: auto|strings|messages|hh), validate every row and return the clean pairs."""
    raw: RawRows = read_raw(source, split)
    return validate_rows(raw.rows, raw.columns, source_name(source, split), format=format, strict=strict,
                         chat_template=chat_template, tokenizer=tokenizer, keep_columns=keep_columns, lines=raw.lines)


def preference_data_from_rows(
    rows: Sequence[dict[str, Any]],
    *,
    name: str = "<in-memory>",
    format: str = "auto",
    strict: bool = False,
    chat_template: bool = False,
    tokenizer=None,
    keep_columns: Sequence[str] = (),
) -> tuple[datasets.Dataset, ValidationReport]:
    """Same as `load_preference_data` for an in-memory list of dicts (e.g. the built-in task); the clean
    rows become a `Dataset` via `Dataset.from_dict`, so mixed-type bad rows never reach Arrow."""
    columns = list(dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r))
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{name}: row {bad} (0-based): expected a dict, got {type(rows[bad]).__name__}")
    return validate_rows(list(rows), columns, name, format=format, strict=strict,
                         chat_template=chat_template, tokenizer=tokenizer, keep_columns=keep_columns)
