"""The image store, the source of truth of an index: a SQLite file (``store.sqlite`` in the index folder)
or a PostgreSQL database (a ``postgresql://`` URL) that several processes share. Both have the same schema,
the same statements (`cbmir.index.database` fills in what differs) and the same guarantees.

One row per image holds its location, content hash, size, dataset, true and predicted code or label, extra
labels and metadata, and the embedding itself, so the FAISS index can always be rebuilt from the store
alone. Ids come from ``AUTOINCREMENT`` (a sequence in PostgreSQL) and are never reused, even after removal:
an id always means the same image, which is what lets vectors catch up with the store after a crash or
with another process's adds. One writer at a time (see `cbmir.index.database`): every change is one
transaction, all or nothing also when the process is killed, a content hash is stored at most once (a
concurrent add of the same image is a `DuplicateImageError` for the later one), and ids are committed in
the order they are handed out.

Each IRMA axis of the true, the predicted and the "best" code (the true code where known, else the
predicted one) has its own indexed column, so an axis-prefix filter is an index range scan (``GLOB
'prefix*'``, or ``LIKE 'prefix%'`` on a "C"-collated column) rather than a table scan. A code counts as
IRMA when it has the dashed shape ``TTTT-DDD-AAA-BBB``; any other text (a chest class, NIH findings) is a
plain label.

The schema carries its version (`SCHEMA_VERSION`, in the ``meta`` table); a store of a newer version is
refused on either backend.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cbmir.index.database import Database, is_database_url, open_database
from cbmir.index.errors import (
    DatabaseError,
    DuplicateImageError,
    EntryError,
    IndexConfigError,
    IndexMismatchError,
    QueryError,
    UnknownImageError,
)
from cbmir.index.filters import AXIS_FILTERS, Filters
from cbmir.irma import AXES, AXIS_LENGTHS, IrmaCode, IrmaCodeError

SCHEMA_VERSION = 1
_SOURCES = {"best": "best", "true": "true", "predicted": "pred"}  # Filters.on -> column prefix
_AXIS_SUFFIX = {"technical": "t", "directional": "d", "anatomical": "a", "biological": "b"}
_IRMA_SHAPE = re.compile("-".join(f"[^-]{{{AXIS_LENGTHS[axis]}}}" for axis in AXES))
_HASH = re.compile(r"[0-9a-f]{64}")
_ID_CHUNK = 10_000


@dataclass(frozen=True, kw_only=True)
class ImageEntry:
    """One image to add. `true_code` and `predicted` are dashed IRMA codes or plain labels (a chest class);
    `confidences` maps IRMA axes or class names to probabilities; `labels` are extra labels such as NIH
    findings; `extra` is free metadata, which must never hold patient-identifying tags."""

    location: str
    content_hash: str
    width: int
    height: int
    dataset: str
    embedding: np.ndarray
    true_code: str | None = None
    predicted: str | None = None
    confidences: Mapping[str, float] = field(default_factory=dict)
    confidence: float | None = None
    labels: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageRow:
    """What the store holds of one image, besides its embedding (see `Store.embeddings`)."""

    id: int
    location: str
    content_hash: str
    width: int
    height: int
    dataset: str
    true_code: str | None
    predicted: str | None
    confidences: dict[str, float]
    confidence: float | None
    labels: tuple[str, ...]
    extra: dict[str, Any]
    added_at: str

    @property
    def code(self) -> str | None:
        """The true code where known, else the predicted one (what "best" filters look at)."""
        return self.true_code or self.predicted


_ROW_COLUMNS = tuple(f.name for f in fields(ImageRow))


def _image_row(values: Sequence[Any]) -> ImageRow:
    row = dict(zip(_ROW_COLUMNS, values, strict=True))
    return ImageRow(
        **{
            **row,
            "confidences": json.loads(row["confidences"]),
            "extra": json.loads(row["extra"]),
            "labels": tuple(json.loads(row["labels"])),
        }
    )


def filter_sql(filters: Filters, database: Database) -> tuple[str, list[str]]:
    """The WHERE condition of `filters` on the images table, and its parameters."""
    source = _SOURCES[filters.on]
    terms, params = [], []
    for name, axis in AXIS_FILTERS.items():
        prefix = getattr(filters, name)
        if prefix is not None:
            term, pattern = database.prefix_match(f"{source}_{_AXIS_SUFFIX[axis]}", prefix)
            terms.append(term)
            params.append(pattern)
    if filters.code is not None:
        code = IrmaCode.parse(filters.code)
        for axis in AXES:
            terms.append(f"{source}_{_AXIS_SUFFIX[axis]} = ?")
            params.append(code[axis])
    if filters.dataset is not None:
        terms.append("dataset = ?")
        params.append(filters.dataset)
    if filters.label is not None:
        terms.append(f"id IN (SELECT image_id FROM image_labels WHERE {database.nocase_equals('label')})")
        params.append(filters.label.strip())
    return " AND ".join(terms) or "TRUE", params


def _axis_columns(prefix: str) -> list[str]:
    return [f"{prefix}_{suffix}" for suffix in _AXIS_SUFFIX.values()]


_CODE_COLUMNS = _axis_columns("true") + _axis_columns("pred") + _axis_columns("best")
# CREATE statements with the column types that differ between backends left as {names} (Database.ddl)
_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS images (
        id {id},
        location {text} NOT NULL,
        content_hash {text} NOT NULL UNIQUE,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        dataset {text} NOT NULL,
        true_code {text},
        predicted {text},
        confidences {text} NOT NULL,
        confidence {real},
        labels {text} NOT NULL,
        extra {text} NOT NULL,
        embedding {blob} NOT NULL,
        added_at {text} NOT NULL,
        """
    + ", ".join(f"{column} {{text}}" for column in _CODE_COLUMNS)
    + "){table_options}",
    "CREATE INDEX IF NOT EXISTS images_dataset ON images (dataset){covering}",
    "CREATE INDEX IF NOT EXISTS images_location ON images (location)",
    *(f"CREATE INDEX IF NOT EXISTS images_{column} ON images ({column}){{covering}}" for column in _CODE_COLUMNS),
    """CREATE TABLE IF NOT EXISTS image_labels (
        label {text_nocase} NOT NULL,
        image_id BIGINT NOT NULL,
        PRIMARY KEY (label, image_id)){without_rowid}""",
    "CREATE INDEX IF NOT EXISTS image_labels_image ON image_labels (image_id)",
    "CREATE TABLE IF NOT EXISTS failures (location {text} PRIMARY KEY, reason {text} NOT NULL, at {text} NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (key {text} PRIMARY KEY, value {text} NOT NULL)",
]
_COLUMNS = (
    "location", "content_hash", "width", "height", "dataset", "true_code", "predicted", "confidences",
    "confidence", "labels", "extra", "embedding", "added_at", *_CODE_COLUMNS,
)  # fmt: skip
_INSERT = f"INSERT INTO images ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)}) RETURNING id"
_ADD_LABEL = "INSERT INTO image_labels (label, image_id) VALUES (?, ?) ON CONFLICT DO NOTHING"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _chunks(values: Sequence[Any] | np.ndarray, size: int = _ID_CHUNK) -> Iterator[Sequence[Any] | np.ndarray]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def store_exists(location: str | Path) -> bool:
    """Whether `location` (a SQLite file or a PostgreSQL URL) holds a cbmir store already: commands that only
    read must not create an empty one where the user mistyped. An unreachable database is an
    `IndexConfigError`."""
    if not is_database_url(location):
        return Path(location).is_file()
    database = open_database(location)
    try:
        database.execute("SELECT value FROM meta WHERE key = 'schema_version'")
    except DatabaseError:
        return False
    finally:
        database.close()
    return True


class Store:
    """The store of one index: a SQLite file (a path) or a PostgreSQL database (a ``postgresql://`` URL).
    Safe to share between threads: one connection behind a lock. Several processes may open the same
    PostgreSQL store, and a SQLite one beside the process that holds its index (the `cbmir users` command)."""

    def __init__(self, location: str | Path):
        self._lock = threading.RLock()
        self._db = open_database(location)
        self.name = self._db.name
        try:
            with self._db.transaction():
                for statement in _SCHEMA:
                    self._db.execute(self._db.ddl(statement))
                for statement in self._db.nocase_index("image_labels", "label"):
                    self._db.execute(statement)
                version = self._meta("schema_version")
                if version is None:
                    self._set_meta("schema_version", SCHEMA_VERSION)
        except DatabaseError as error:
            self._db.close()
            raise IndexConfigError(f"{self.name} cannot be opened as a cbmir store: {error.reason}") from None
        if version is not None and version > SCHEMA_VERSION:
            self._db.close()
            raise IndexConfigError(
                f"{self.name} has store schema version {version}; this cbmir reads up to {SCHEMA_VERSION}: "
                "upgrade cbmir"
            )

    # -- plumbing -------------------------------------------------------------------------------------------

    @property
    def database(self) -> Database:
        """The backend, for the statements that differ between backends (`Database.refusing`...)."""
        return self._db

    def add_tables(self, statements: Iterable[str]) -> None:
        """Create the tables another module keeps in this store (`CREATE ... IF NOT EXISTS` statements, with
        the column types of `Database.ddl`), in one transaction."""
        with self.writing() as db:
            for statement in statements:
                db.execute(db.ddl(statement))

    @contextmanager
    def writing(self) -> Iterator[Database]:
        """The connection inside one write transaction (committed at the end, rolled back on any error), for
        the tables other modules keep in this store (`cbmir.access`: users and the audit trail)."""
        with self._lock, self._db.transaction():
            yield self._db

    @contextmanager
    def reading(self) -> Iterator[Database]:
        """The connection, for reads of those tables."""
        with self._lock:
            yield self._db

    def _meta(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def _set_meta(self, key: str, value: Any) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value)),
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- meta and counts ------------------------------------------------------------------------------------

    def meta(self, key: str) -> Any:
        """The JSON value recorded under `key`, or None."""
        with self._lock:
            return self._meta(key)

    def set_meta(self, key: str, value: Any) -> None:
        with self._lock, self._db.transaction():
            self._set_meta(key, value)

    def count(self, *, through_id: int | None = None) -> int:
        """How many images are stored (with an id up to `through_id`, when given)."""
        below = "" if through_id is None else f" WHERE id <= {int(through_id)}"
        with self._lock:
            return self._db.execute(f"SELECT count(*) FROM images{below}").fetchone()[0]

    def removals(self) -> int:
        """How many images were ever removed from this store: another process's vectors compare it with the
        number they saw, which is cheaper than counting the images."""
        return self.meta("removals") or 0

    def max_id(self) -> int:
        """The largest id present, 0 when the store is empty."""
        with self._lock:
            return self._db.execute("SELECT coalesce(max(id), 0) FROM images").fetchone()[0]

    def dataset_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT dataset, count(*) FROM images GROUP BY dataset ORDER BY dataset"))

    # -- images ---------------------------------------------------------------------------------------------

    def add(self, entries: Sequence[ImageEntry], embeddings: np.ndarray) -> np.ndarray:
        """Store `entries` with their (already validated, unit-norm) `embeddings` in one transaction: all are
        added or, on any error, none. Returns the new ids in entry order.

        A content hash that is already stored, or that occurs twice in `entries`, is a `DuplicateImageError`:
        callers skip known files with `hashes_present` first (and, when processes share the store, skip what
        another one added meanwhile). Adding an image clears its location's failure record. The first add
        records the embedding dimension; later adds must match it.
        """
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or len(embeddings) != len(entries):
            raise ValueError(f"embeddings of shape {embeddings.shape} for {len(entries)} entries")
        added_at = _now()
        rows = [
            _row(number, entry, vector, added_at)
            for number, (entry, vector) in enumerate(zip(entries, embeddings, strict=True))
        ]
        seen: dict[str, int] = {}
        for number, entry in enumerate(entries):
            first = seen.setdefault(rows[number]["content_hash"], number)
            if first != number:
                raise DuplicateImageError(
                    f"entry {number} ({entry.location!r}) has the same content hash as entry {first} "
                    f"({entries[first].location!r}): the same image twice in one batch"
                )
        with self._lock, self._db.transaction():
            dimension = self._meta("dimension")
            if dimension is None:
                self._set_meta("dimension", embeddings.shape[1])
            elif dimension != embeddings.shape[1]:
                raise IndexMismatchError(f"this store holds {dimension}-d embeddings, not {embeddings.shape[1]}-d")
            condition, hashes = self._db.in_list("content_hash", list(seen))
            stored = dict(self._db.execute(f"SELECT content_hash, location FROM images WHERE {condition}", (hashes,)))
            for number, entry in enumerate(entries):
                known = rows[number]["content_hash"]
                if known in stored:
                    raise DuplicateImageError(
                        f"entry {number} ({entry.location!r}): content hash {known} is already stored "
                        f"(from {stored[known]!r}); skip known files with hashes_present"
                    )
            ids = self._db.insert_returning(_INSERT, [[row[column] for column in _COLUMNS] for row in rows])
            self._db.executemany(
                _ADD_LABEL,
                [
                    (label, image_id)
                    for row, entry, image_id in zip(rows, entries, ids, strict=True)
                    for label in sorted({label.strip() for label in (row["true_code"], *entry.labels) if label})
                ],
            )
            condition, locations = self._db.in_list("location", [entry.location for entry in entries])
            self._db.execute(f"DELETE FROM failures WHERE {condition}", (locations,))
        return np.array(ids, dtype=np.int64)

    def remove(self, ids: Sequence[int]) -> None:
        """Delete the images with `ids` for good: their rows, their labels, and in SQLite (by secure_delete
        and a WAL checkpoint) their bytes on disk. An unknown id is an `UnknownImageError` and nothing is
        removed."""
        ids = sorted({int(i) for i in ids})
        with self._lock:
            with self._db.transaction():
                missing = set(ids) - set(self._present(ids))
                if missing:
                    raise UnknownImageError(
                        f"no image with id {', '.join(map(str, sorted(missing)[:10]))} in this index"
                    )
                for chunk in _chunks(ids):
                    condition, chosen = self._db.in_list("image_id", chunk)
                    self._db.execute(f"DELETE FROM image_labels WHERE {condition}", (chosen,))
                    condition, chosen = self._db.in_list("id", chunk)
                    self._db.execute(f"DELETE FROM images WHERE {condition}", (chosen,))
                self._set_meta("removals", (self._meta("removals") or 0) + len(ids))
            self._db.removed()

    def set_true_code(self, image_id: int, code: str) -> None:
        """Record the true code or label of a stored image (an annotator's accepted or corrected proposal);
        its "best" code becomes this one. An unknown id is an `UnknownImageError`."""
        true_code, true_axes = _code_axes(code, f"image {image_id}: true code {code!r}")
        if not true_code:
            raise QueryError(f"image {image_id}: the true code must be a non-empty text")
        assignments = ", ".join(f"{column} = ?" for column in _axis_columns("true") + _axis_columns("best"))
        with self._lock, self._db.transaction():
            row = self._db.execute("SELECT true_code, labels FROM images WHERE id = ?", (image_id,)).fetchone()
            if row is None:
                raise UnknownImageError(f"no image with id {image_id} in this index")
            old, extra_labels = row[0], {label.strip() for label in json.loads(row[1])}
            self._db.execute(
                f"UPDATE images SET true_code = ?, {assignments} WHERE id = ?",
                (true_code, *true_axes, *true_axes, image_id),
            )
            if old and old not in extra_labels:
                self._db.execute(
                    f"DELETE FROM image_labels WHERE {self._db.nocase_equals('label')} AND image_id = ?",
                    (old, image_id),
                )
            self._db.execute(_ADD_LABEL, (true_code, image_id))

    def id_for_hash(self, content_hash: str) -> int | None:
        """The id of the image with this content hash, or None."""
        with self._lock:
            row = self._db.execute("SELECT id FROM images WHERE content_hash = ?", (content_hash.lower(),)).fetchone()
        return None if row is None else row[0]

    def axis_codes(self, axis: str) -> dict[str, int]:
        """How many images have each code on an IRMA axis (of their best code), e.g. {"911": 12, "7**": 3}."""
        column = f"best_{_AXIS_SUFFIX[axis]}"
        with self._lock:
            return dict(
                self._db.execute(f"SELECT {column}, count(*) FROM images WHERE {column} IS NOT NULL GROUP BY {column}")
            )

    def _present(self, ids: Sequence[int]) -> list[int]:
        found = []
        for chunk in _chunks(ids):
            condition, chosen = self._db.in_list("id", chunk)
            found += [row[0] for row in self._db.execute(f"SELECT id FROM images WHERE {condition}", (chosen,))]
        return found

    def get(self, ids: Sequence[int]) -> list[ImageRow]:
        """The rows of `ids`, in the order given. An unknown id is an `UnknownImageError`."""
        return self._by_id(ids, ", ".join(_ROW_COLUMNS), _image_row)

    def embeddings(self, ids: Sequence[int]) -> np.ndarray:
        """The stored unit-norm embeddings of `ids` (n x d float32), in the order given."""
        vectors = self._by_id(ids, "id, embedding", lambda row: np.frombuffer(row[1], dtype=np.float32))
        dimension = self.meta("dimension") or 0
        return np.array(vectors, dtype=np.float32).reshape(len(vectors), dimension)

    def _by_id(self, ids: Sequence[int], columns: str, make: Callable[[Sequence[Any]], Any]) -> list[Any]:
        wanted = [int(i) for i in ids]
        found: dict[int, Any] = {}
        with self._lock:
            for chunk in _chunks(sorted(set(wanted))):
                condition, chosen = self._db.in_list("id", chunk)
                for row in self._db.execute(f"SELECT {columns} FROM images WHERE {condition}", (chosen,)):
                    found[row[0]] = make(row)
        missing = [i for i in wanted if i not in found]
        if missing:
            raise UnknownImageError(f"no image with id {', '.join(map(str, missing[:10]))} in this index")
        return [found[i] for i in wanted]

    def query(self, filters: Filters) -> np.ndarray:
        """The ids (sorted int64) of the images that pass `filters`."""
        condition, params = filter_sql(filters, self._db)
        with self._lock:
            cursor = self._db.execute(f"SELECT id FROM images WHERE {condition} ORDER BY id", params)
            return np.fromiter((row[0] for row in cursor), dtype=np.int64)

    def hashes_present(self, hashes: Iterable[str]) -> set[str]:
        """Which of `hashes` (sha256 hex, any case) are stored, in lower case."""
        return self._present_values("content_hash", {h.lower() for h in hashes})

    def locations_present(self, locations: Iterable[str]) -> set[str]:
        """Which of these location texts an indexed image has (a PACS sync's "already fetched")."""
        return self._present_values("location", set(locations))

    def _present_values(self, column: str, wanted: set[str]) -> set[str]:
        present: set[str] = set()
        with self._lock:
            for chunk in _chunks(sorted(wanted)):
                condition, chosen = self._db.in_list(column, chunk)
                present.update(
                    row[0] for row in self._db.execute(f"SELECT {column} FROM images WHERE {condition}", (chosen,))
                )
        return present

    def content_hashes(self) -> Iterator[str]:
        """Every stored content hash, streamed (for the indexer's workers to skip known files early)."""
        with self._lock:
            rows = self._db.execute("SELECT content_hash FROM images").fetchall()
        return (row[0] for row in rows)

    def iter_embeddings(
        self,
        *,
        after_id: int = 0,
        before_id: int | None = None,
        batch: int = 4096,
        ids: Sequence[int] | np.ndarray | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream (ids int64, embeddings float32 n x d) batches in id order: every image after `after_id`
        (and before `before_id`), or only those of `ids`. Each batch is one short query, so a long stream
        never holds the lock."""
        if ids is not None:
            selected = np.unique(np.asarray(ids, dtype=np.int64))
            for chunk in _chunks(selected[selected > after_id], batch):
                condition, chosen = self._db.in_list("id", [int(i) for i in chunk])
                with self._lock:
                    rows = self._db.execute(
                        f"SELECT id, embedding FROM images WHERE {condition} ORDER BY id", (chosen,)
                    ).fetchall()
                if rows:
                    yield _embedding_batch(rows)
            return
        below = "" if before_id is None else f" AND id < {int(before_id)}"
        while True:
            with self._lock:
                rows = self._db.execute(
                    f"SELECT id, embedding FROM images WHERE id > ?{below} ORDER BY id LIMIT ?", (after_id, batch)
                ).fetchall()
            if not rows:
                return
            yield _embedding_batch(rows)
            after_id = rows[-1][0]

    # -- failures -------------------------------------------------------------------------------------------

    def record_failures(self, rows: Iterable[tuple[str, str]]) -> None:
        """Record (location, reason) pairs of files that could not be indexed. A location keeps only its
        latest failure, and loses it when the image is added later."""
        at = _now()
        with self._lock, self._db.transaction():
            self._db.executemany(
                "INSERT INTO failures (location, reason, at) VALUES (?, ?, ?) "
                "ON CONFLICT (location) DO UPDATE SET reason = excluded.reason, at = excluded.at",
                [(str(location), str(reason), at) for location, reason in rows],
            )

    def failures(self) -> list[dict[str, str]]:
        """The recorded failures, oldest first."""
        with self._lock:
            cursor = self._db.execute("SELECT location, reason, at FROM failures ORDER BY at, location")
            return [{"location": location, "reason": reason, "at": at} for location, reason, at in cursor]


def _embedding_batch(rows: list[tuple[int, bytes]]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([row[0] for row in rows], dtype=np.int64)
    vectors = np.frombuffer(b"".join(row[1] for row in rows), dtype=np.float32).reshape(len(rows), -1)
    return ids, vectors


def _code_axes(value: Any, where: str) -> tuple[str | None, list[str | None]]:
    """The stored text of a true or predicted code and its four axis codes (None unless it is IRMA).
    `where` names the value in error messages."""
    if value is None:
        return None, [None] * len(AXES)
    if not isinstance(value, str):
        raise EntryError(f"{where} must be text or None, got {value!r}")
    value = value.strip()
    if not _IRMA_SHAPE.fullmatch(value):
        return value, [None] * len(AXES)
    try:
        code = IrmaCode.parse(value)
    except IrmaCodeError as error:
        raise EntryError(f"{where}: {error}") from None
    return str(code), [code[axis] for axis in AXES]


def _json(number: int, entry: ImageEntry, name: str, value: Any) -> str:
    try:
        return json.dumps(value, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as error:
        raise EntryError(f"entry {number} ({entry.location!r}): {name} cannot be stored as JSON ({error})") from None


def _row(number: int, entry: ImageEntry, vector: np.ndarray, added_at: str) -> dict[str, Any]:
    """The column values of one entry, after checking every field."""

    def fail(reason: str) -> EntryError:
        return EntryError(f"entry {number} ({getattr(entry, 'location', None)!r}): {reason}")

    if not isinstance(entry, ImageEntry):
        raise EntryError(f"entry {number} is a {type(entry).__name__}, not an ImageEntry")
    if not isinstance(entry.location, str) or not entry.location.strip():
        raise fail("location must be a non-empty text")
    content_hash = entry.content_hash.lower() if isinstance(entry.content_hash, str) else None
    if content_hash is None or not _HASH.fullmatch(content_hash):
        raise fail(f"content_hash {entry.content_hash!r} is not a sha256 hex digest (64 hex digits)")
    for name in ("width", "height"):
        value = getattr(entry, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise fail(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(entry.dataset, str) or not entry.dataset.strip():
        raise fail("dataset must be a non-empty text")
    if entry.confidence is not None and not (
        isinstance(entry.confidence, (int, float, np.floating)) and math.isfinite(entry.confidence)
    ):
        raise fail(f"confidence must be a finite number or None, got {entry.confidence!r}")
    if not isinstance(entry.labels, (list, tuple)) or not all(isinstance(x, str) and x.strip() for x in entry.labels):
        raise fail(f"labels must be a tuple of non-empty texts, got {entry.labels!r}")
    if not isinstance(entry.extra, Mapping):
        raise fail(f"extra must be a mapping, got {type(entry.extra).__name__}")
    if not isinstance(entry.confidences, Mapping) or not all(
        isinstance(p, (int, float, np.floating)) and math.isfinite(p) for p in entry.confidences.values()
    ):
        raise fail(f"confidences must map names to finite numbers, got {entry.confidences!r}")
    true_code, true_axes = _code_axes(entry.true_code, f"entry {number} ({entry.location!r}): true_code")
    predicted, pred_axes = _code_axes(entry.predicted, f"entry {number} ({entry.location!r}): predicted")
    best_axes = true_axes if true_code is not None else pred_axes
    return {
        "location": entry.location,
        "content_hash": content_hash,
        "width": int(entry.width),
        "height": int(entry.height),
        "dataset": entry.dataset,
        "true_code": true_code,
        "predicted": predicted,
        "confidences": _json(number, entry, "confidences", {str(k): float(v) for k, v in entry.confidences.items()}),
        "confidence": None if entry.confidence is None else float(entry.confidence),
        "labels": _json(number, entry, "labels", list(entry.labels)),
        "extra": _json(number, entry, "extra", dict(entry.extra)),
        "embedding": vector.tobytes(),
        "added_at": added_at,
        **dict(zip(_CODE_COLUMNS, [*true_axes, *pred_axes, *best_axes], strict=True)),
    }
