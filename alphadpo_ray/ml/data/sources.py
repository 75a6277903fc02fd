"""Reading a raw preference table: a local .jsonl / .json / .jsonl.gz / .parquet file or a hub id.

JSON lines are read one line at a time: a line that is not UTF-8 or not one JSON object (a truncated
last line, say) is one unreadable row with its line number, skipped and reported like any bad row."""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import DataError
from .formats import RowProblem

if TYPE_CHECKING:  # imported where data is loaded: ~0.6 s that every Ray Train worker (collation only) would pay
    import datasets

# File suffix -> `datasets` builder name.
SUPPORTED_EXTENSIONS: dict[str, str] = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".parquet": "parquet"}
# Suffixes that mark a string as a file path (so it is never mistaken for a hub id).
_FILE_HINTS = (".json", ".jsonl", ".gz", ".parquet", ".csv", ".tsv", ".txt", ".arrow", ".zip", ".xz", ".bz2", ".zst")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_local_source(source: str | os.PathLike) -> bool:
    """True for an existing path or anything that looks like a file path; False for a hub id like `org/name`."""
    if isinstance(source, Path) or Path(source).exists():
        return True
    s = str(source)
    return not _HUB_ID.match(s) or s.lower().endswith(_FILE_HINTS)


def source_name(source: str | os.PathLike, split: str = "train") -> str:
    """How errors and reports name a source: the path for files, `id[split]` for hub sets."""
    return str(source) if is_local_source(source) else f"{source}[{split}]"


def _builder_for(path: Path) -> str:
    name = path.name.lower()
    for ext in sorted(SUPPORTED_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return SUPPORTED_EXTENSIONS[ext]
    raise DataError(
        f"{path}: unsupported file type; expected one of {', '.join(SUPPORTED_EXTENSIONS)} (or a hub dataset id)"
    )


@dataclass
class RawRows:
    """A source's rows as read, before validation. A row is a dict, or a `RowProblem` for a line that
    could not be read (`not_utf8`, `malformed_json`); `lines[i]` is row i's 1-based line number in a
    JSON-lines file (None for JSON arrays, parquet files and hub sets). `rows` may be a `datasets.Dataset`."""

    rows: Any
    columns: list[str]
    lines: list[int] | None = None


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def _json_type(value: Any) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def _columns(rows: list) -> list[str]:
    return list(dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r))


def _parse_line(raw: bytes, number: int) -> dict | RowProblem:
    """One line of a JSON-lines file → its object, or the `RowProblem` that makes it unreadable."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return RowProblem("not_utf8", None, f"UTF-8 text (byte {e.start + 1} of the line, 0x{raw[e.start]:02x}, "
                                            "is not valid UTF-8)")
    if number == 1:
        text = text.removeprefix("\ufeff")  # a byte-order mark
    try:
        value = json.loads(text.rstrip())  # without the newline, so that a cut line's error points into it
    except json.JSONDecodeError as e:  # e.g. a truncated last line
        return RowProblem("malformed_json", None, f"one JSON object per line ({e.msg}: column {e.colno})")
    except (ValueError, RecursionError) as e:
        return RowProblem("malformed_json", None, f"one JSON object per line ({type(e).__name__}: {e})")
    if not isinstance(value, dict):
        return RowProblem("malformed_json", None, f"one JSON object per line, got a JSON {_json_type(value)}")
    return value


def _no_rows(path: Path, empty: bool) -> DataError:
    what = "the file is empty" if empty else "the file holds only whitespace"
    return DataError(f"{path}: no rows ({what}; expected one JSON object per line, or a parquet/JSON table)")


def _read_json_lines(path: Path) -> RawRows:
    """Line by line, so that one bad line is one bad row (reported with its line number), not a bad file."""
    rows: list = []
    lines: list[int] = []
    number = 0
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as stream:
            for number, raw in enumerate(stream, 1):
                if raw.strip():  # blank lines are not rows
                    rows.append(_parse_line(raw, number))
                    lines.append(number)
    except (OSError, EOFError, zlib.error) as e:  # not gzip, or a compressed stream cut short
        raise DataError(f"{path}: could not read past line {number}: {type(e).__name__}: {e}") from e
    if not rows:
        raise _no_rows(path, empty=number == 0)
    return RawRows(rows, _columns(rows), lines)


def _read_json(path: Path) -> RawRows:
    """A `.json` file: one array of objects, one object, or (as `datasets` accepts) JSON lines."""
    data = path.read_bytes()
    if not data.strip():
        raise _no_rows(path, empty=not data)
    if data.lstrip().removeprefix(b"\xef\xbb\xbf").lstrip()[:1] == b"[":
        try:
            value = json.loads(data.decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise DataError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[e.start]:02x})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg} (a .json file "
                            "holds one array of objects; use .jsonl, one object per line, to skip bad rows)") from None
        if not value:
            raise DataError(f"{path}: no rows (an empty JSON array)")
        rows = [r if isinstance(r, dict) else RowProblem("malformed_json", None, f"a JSON object, got a JSON "
                                                                               f"{_json_type(r)}") for r in value]
        return RawRows(rows, _columns(rows))
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except ValueError:  # not one document: JSON lines
        return _read_json_lines(path)
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected an array of objects, one object, or one object per line; "
                        f"got a JSON {_json_type(value)}")
    return RawRows([value], list(value), [1])


def read_raw(source: str | os.PathLike, split: str = "train") -> RawRows:
    """Read the rows unchanged. JSON and JSON-lines files are parsed here, a line at a time (an unreadable
    line becomes a `RowProblem` row with its line number); parquet files and hub sets through `datasets`.
    Local files have one split, so `split` only applies to hub ids. An empty file is a `DataError`."""
    import datasets

    if not is_local_source(source):
        try:
            ds = datasets.load_dataset(str(source), split=split)
        except Exception as e:  # network, unknown id, unknown split: one clear message
            raise DataError(f"{source}[{split}]: could not load hub dataset: {e}") from e
        return RawRows(ds, list(ds.column_names))
    path = Path(source).expanduser()
    if path.is_dir():
        raise DataError(f"{path}: is a directory; expected a preference data file "
                        f"({'/'.join(SUPPORTED_EXTENSIONS)}) inside it, or a hub dataset id")
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected a preference data file or a hub dataset id)")
    builder = _builder_for(path)
    if path.name.lower().endswith(".json"):
        return _read_json(path)
    if builder == "json":
        return _read_json_lines(path)
    if path.stat().st_size == 0:
        raise _no_rows(path, empty=True)
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:
        cause = e.__cause__ or e
        raise DataError(f"{path}: could not read as {builder}: {type(cause).__name__}: {cause}") from e
    if len(ds) == 0:
        raise DataError(f"{path}: no rows (the table is empty)")
    return RawRows(ds, list(ds.column_names))
