"""The retrieval core: a store of images and embeddings (the source of truth: a SQLite file or a PostgreSQL
database, `cbmir.index.database`) and a FAISS index derived from it, behind `Engine`. It knows vectors and
a `ModelStamp`, never a model. See `cbmir.index.engine`, `cbmir.index.store`, `cbmir.index.vectors`,
`cbmir.index.filters` and `cbmir.stamp`."""

from cbmir.index.engine import MAX_K, STORE_FILE, Engine, Hit
from cbmir.index.errors import (
    DuplicateImageError,
    EntryError,
    IndexConfigError,
    IndexMismatchError,
    QueryError,
    SearchIndexError,
    UnknownImageError,
)
from cbmir.index.filters import CODE_SOURCES, CodeSource, Filters
from cbmir.index.store import ImageEntry, ImageRow
from cbmir.index.vectors import IndexPolicy, automatic_type
from cbmir.stamp import ModelStamp, describe_identity

__all__ = [
    "CODE_SOURCES",
    "MAX_K",
    "STORE_FILE",
    "CodeSource",
    "DuplicateImageError",
    "Engine",
    "EntryError",
    "Filters",
    "Hit",
    "ImageEntry",
    "ImageRow",
    "IndexConfigError",
    "IndexMismatchError",
    "IndexPolicy",
    "ModelStamp",
    "QueryError",
    "SearchIndexError",
    "UnknownImageError",
    "automatic_type",
    "describe_identity",
]
