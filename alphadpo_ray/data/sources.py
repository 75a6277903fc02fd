"""Reading a raw preference table: a local .jsonl / .json / .jsonl.gz / .parquet file or a hub id."""

from __future__ import annotations

import os
import re
from pathlib import Path

import datasets

from ..errors import DataError

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


def read_raw(source: str | os.PathLike, split: str = "train") -> datasets.Dataset:
    """Load the table unchanged. Local files have one split, so `split` only applies to hub ids."""
    if not is_local_source(source):
        try:
            return datasets.load_dataset(str(source), split=split)
        except Exception as e:  # network, unknown id, unknown split: one clear message
            raise DataError(f"{source}[{split}]: could not load hub dataset: {e}") from e
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected a preference data file or a hub dataset id)")
    builder = _builder_for(path)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:
        cause = e.__cause__ or e
        raise DataError(f"{path}: could not read as {builder}: {type(cause).__name__}: {cause}") from e
