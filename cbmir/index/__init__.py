"""The retrieval core: a SQLite store of images and embeddings (the source of truth) and a FAISS index
derived from it, behind `Engine`. See `cbmir.index.engine`, `cbmir.index.store` and `cbmir.index.vectors`."""

from cbmir.index.engine import MAX_K, Engine, Hit, describe_stamp
from cbmir.index.store import (
    FIELDS,
    DuplicateImageError,
    EntryError,
    Filters,
    ImageEntry,
    IndexConfigError,
    IndexMismatchError,
    QueryError,
    SearchIndexError,
)
from cbmir.index.vectors import IndexPolicy, automatic_type

__all__ = [
    "FIELDS",
    "MAX_K",
    "DuplicateImageError",
    "Engine",
    "EntryError",
    "Filters",
    "Hit",
    "ImageEntry",
    "IndexConfigError",
    "IndexMismatchError",
    "IndexPolicy",
    "QueryError",
    "SearchIndexError",
    "automatic_type",
    "describe_stamp",
]
