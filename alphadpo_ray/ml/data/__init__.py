"""Preference data: loading (jsonl/json/jsonl.gz/parquet/hub), row validation, tokenisation with
TRL-style truncation, collation for one concatenated forward pass, and a prompt-disjoint held-out split."""

from .collate import collate_pairs, collate_sft, pad_sequences
from .formats import FORMATS, HH_MARKER, MESSAGE_ROLES, REASONS, RowProblem, detect_format
from .sources import SUPPORTED_EXTENSIONS, RawRows, is_local_source, read_raw
from .split import load_with_held_out, split_held_out
from .tokenization import (
    PAIR_REASONS,
    TRUNCATION_MODES,
    TruncationReport,
    check_lengths,
    tokenize_pairs,
    tokenize_pairs_with_report,
    tokenize_sft,
    truncate,
)
from .validation import ValidationReport, load_preference_data, preference_data_from_rows, validate_rows

__all__ = [
    "FORMATS", "HH_MARKER", "MESSAGE_ROLES", "PAIR_REASONS", "REASONS", "SUPPORTED_EXTENSIONS", "TRUNCATION_MODES",
    "RawRows", "RowProblem", "TruncationReport", "ValidationReport",
    "check_lengths", "collate_pairs", "collate_sft", "detect_format", "is_local_source", "load_preference_data",
    "load_with_held_out", "pad_sequences", "preference_data_from_rows", "read_raw", "split_held_out",
    "tokenize_pairs", "tokenize_pairs_with_report", "tokenize_sft", "truncate", "validate_rows",
]
