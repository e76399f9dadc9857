"""Token data containers and loaders: preference pairs (`PreferencePairs`), JSONL pairs and text
files. Knows no model; beside `rwasym.math` at the bottom of the layers."""

from .pairs import (
    ByteTokenizer,
    PreferencePairs,
    load_pairs,
    load_pairs_jsonl,
    load_tensors,
    load_text,
    tokenize_preference,
)

__all__ = [
    "ByteTokenizer",
    "PreferencePairs",
    "load_pairs",
    "load_pairs_jsonl",
    "load_tensors",
    "load_text",
    "tokenize_preference",
]
