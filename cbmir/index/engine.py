"""The retrieval engine: one index (a store and its vectors) behind add / search / remove, safe to share
between threads.

An index is a folder (``store.sqlite``, ``vectors.faiss``, ``vectors.json``), or a PostgreSQL store named by
a ``postgresql://`` URL plus a local vector folder (``--vectors``; by default
``cbmir-vectors/<host>-<port>-<dbname>`` under the working folder). Several processes may share one
PostgreSQL store, each with a vector folder of its own: the store is the truth, and each engine takes in
the others' adds and removals before a search, at most every `refresh_seconds` (`Engine.refresh`), and
before its own adds. Whatever the engine keeps beside the vectors (uploads, thumbnails, a listener's
received files) lives in the vector folder, `Engine.folder`.

The engine knows vectors, not models: an index holds the vectors of one model, named by its `ModelStamp`
(identity and dimension), recorded with the first images (or at open); any other model or dimension is
refused with an `IndexMismatchError`. Turning images into vectors is `cbmir.embed`'s job, and "image in,
hits out" is `cbmir.search`'s. One process at a time may open a (vector) folder (an advisory lock on
``folder/.lock``, released by the kernel even when the process is killed).

Crash guarantees: an add, removal or code change is one store transaction, all or nothing; the vectors
are repaired from the store at the next open (see `cbmir.index.vectors`), so a process killed at any
moment leaves an index that opens equal to its store.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cbmir.index.database import PostgresAddress, is_database_url
from cbmir.index.errors import EntryError, IndexConfigError, IndexMismatchError, QueryError, UnknownImageError
from cbmir.index.filters import Filters
from cbmir.index.ondisk import IDS_FILE, ROWS_FILE
from cbmir.index.store import ImageEntry, ImageRow, Store
from cbmir.index.vectors import INDEX_FILE, MANIFEST_FILE, IndexPolicy, Vectors
from cbmir.stamp import ModelStamp, describe_identity, stamp_digest

STORE_FILE, LOCK_FILE = "store.sqlite", ".lock"
VECTORS_ROOT = "cbmir-vectors"  # under the working folder: the default vector folders of PostgreSQL stores
REFRESH_SECONDS = 2.0  # how stale a search may be about other processes' changes to a shared store
STALE_LOCK_SECONDS = 10.0
MAX_K = 10_000
FILTER_CACHE_SIZE = 32


@dataclass(frozen=True)
class Hit(ImageRow):
    """One search result: the image's row and its similarity (inner product of unit vectors, at most 1)."""

    score: float


def _is_running(pid: str) -> bool:
    """Whether the process `pid` (as recorded in a lock file) exists; True when that cannot be told."""
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(identity: Any, dimension: int | None) -> str:
    return describe_identity(identity) + (f" / {dimension}-d" if dimension else "")


def _lock(folder: Path) -> int:
    """The folder's lock. A lock whose recorded holder has ended is waited for up to `STALE_LOCK_SECONDS`:
    processes the holder forked (the indexer's workers) share it until they notice and exit."""
    handle = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + STALE_LOCK_SECONDS
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = os.pread(handle, 32, 0).decode(errors="replace").strip() or "?"
            running = _is_running(holder)
            if running or time.monotonic() > deadline:
                os.close(handle)
                state = "" if running else ", which has ended; processes it started still hold the index"
                raise IndexConfigError(
                    f"the index {folder} is already open (process {holder}{state}): one process at a time may "
                    "open an index"
                ) from None
            time.sleep(0.1)
    os.ftruncate(handle, 0)
    os.write(handle, str(os.getpid()).encode())
    return handle


def store_location(db: str | os.PathLike[str]) -> str | Path:
    """The store of the index `db`: a PostgreSQL URL as given, or the folder's ``store.sqlite``."""
    return str(db) if is_database_url(db) else Path(db) / STORE_FILE


def vector_folder(db: str | os.PathLike[str], vectors: str | os.PathLike[str] | None = None) -> Path:
    """The local folder of the index `db`'s vectors: the index folder itself, or for a PostgreSQL URL
    `vectors` when given, else ``cbmir-vectors/<host>-<port>-<dbname>`` in the working folder."""
    if not is_database_url(db):
        if vectors is not None and Path(vectors) != Path(db):
            raise IndexConfigError(
                f"a vector folder ({vectors}) is for a PostgreSQL store; the index folder {db} keeps its vectors "
                "beside its store.sqlite"
            )
        return Path(db)
    if vectors is not None:
        return Path(vectors)
    return Path.cwd() / VECTORS_ROOT / PostgresAddress.parse(str(db)).folder_name


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
        raise QueryError(f"k={k!r}: the number of results must be an integer from 1 to {MAX_K}")
    return int(k)


def _ids(ids: Iterable[Any]) -> list[int]:
    values = list(ids.tolist() if isinstance(ids, np.ndarray) else ids)
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise QueryError(f"image id {value!r} is not an integer")
    return [int(value) for value in values]


class Engine:
    """Add, search and remove radiographs of one index. Open it with `Engine.open`."""

    def __init__(self, folder: Path, store: Store, vectors: Vectors, lock: int, refresh_seconds: float):
        self.folder = folder
        self.location = str(folder) if store.database.kind == "sqlite" else store.name  # for messages
        self._store, self._vectors = store, vectors
        self._lock_handle: int | None = lock  # None once closed
        self._lock = threading.RLock()
        self._refresh_seconds, self._refreshed = refresh_seconds, time.monotonic()
        # Only a PostgreSQL store has other writers: a SQLite folder is this process's alone (its lock), so
        # its searches neither refresh nor lose their cached filter results to a refresh.
        self._shared = store.database.kind != "sqlite"
        # ids passing recent filters: a radiologist keeps a filter for many queries, and the store query is
        # the larger part of a filtered search over a big archive. Cleared by every add and remove, and by
        # every refresh (another process may have changed codes).
        self._filtered: OrderedDict[Filters, np.ndarray] = OrderedDict()

    @classmethod
    def open(
        cls,
        db: str | os.PathLike[str],
        *,
        vectors: str | os.PathLike[str] | None = None,
        model: ModelStamp | None = None,
        index_type: str | None = None,
        policy: IndexPolicy | None = None,
        refresh_seconds: float = REFRESH_SECONDS,
    ) -> Engine:
        """Create or open the index `db`: a folder, or a PostgreSQL URL with its vectors in the folder
        `vectors` (see `vector_folder`). An unreachable database or refused credentials are an
        `IndexConfigError` naming host, port, database and the reason.

        `model` names the model whose vectors the index holds; it is recorded if the index has none yet and
        must equal the recorded one otherwise. Without it the recorded model is used, and adding needs one
        to be recorded. `index_type` is a FAISS factory string (``Flat``, ``HNSW32``, ``IVF4096,Flat``) or
        ``auto`` (by size, see `IndexPolicy`); it is recorded, and None keeps the recorded choice (``auto``
        for a new index). A search takes in other processes' changes to a shared store at most every
        `refresh_seconds` (0: before every search).
        """
        folder = vector_folder(db, vectors)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise IndexConfigError(f"cannot create the index folder {folder}: {error.strerror}") from None
        if model is not None and not isinstance(model, ModelStamp):
            raise IndexConfigError(f"model must be a ModelStamp, got {type(model).__name__}")
        if index_type is not None and (not isinstance(index_type, str) or not index_type.strip()):
            raise IndexConfigError(f"index_type={index_type!r}: expected a FAISS factory string or 'auto'")
        lock = _lock(folder)
        store = None
        try:
            store = Store(store_location(db))
            recorded_identity, recorded_dimension = store.meta("stamp"), store.meta("dimension")
            if model is not None and (
                (recorded_identity is not None and stamp_digest(recorded_identity) != model.digest)
                or (recorded_dimension is not None and recorded_dimension != model.dimension)
            ):
                raise IndexMismatchError(
                    f"this index ({store.name if is_database_url(db) else folder}) was built with model "
                    f"{_describe(recorded_identity, recorded_dimension)}; you are using {model.describe()}. "
                    f"An index holds the vectors of one model: use another folder, or re-index"
                )
            if model is not None and recorded_identity is None:
                store.set_meta("stamp", model.identity)
            if model is not None and recorded_dimension is None:
                store.set_meta("dimension", model.dimension)
            requested = index_type.strip() if index_type is not None else store.meta("index_type") or "auto"
            held = Vectors(folder, store, requested, policy or IndexPolicy())
            store.set_meta("index_type", requested)
        except BaseException:
            if store is not None:
                store.close()
            os.close(lock)
            raise
        return cls(folder, store, held, lock, refresh_seconds)

    # -- life cycle -----------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write the vector index if it changed since its last write."""
        with self._lock:
            self._vectors.flush()

    def close(self) -> None:
        """Flush, close the store and release the folder. Closing twice is harmless."""
        with self._lock:
            if self._lock_handle is None:
                return
            try:
                self._vectors.flush()
            finally:
                self._store.close()
                os.close(self._lock_handle)
                self._lock_handle = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def model(self) -> ModelStamp | None:
        """The model whose vectors this index holds, once recorded."""
        identity, dimension = self._store.meta("stamp"), self._store.meta("dimension")
        return None if identity is None or dimension is None else ModelStamp(identity, dimension)

    @property
    def dimension(self) -> int | None:
        return self._store.meta("dimension")

    def _described_model(self) -> str:
        return _describe(self._store.meta("stamp"), self.dimension)

    # -- adding and removing --------------------------------------------------------------------------------

    def add(self, entries: Sequence[ImageEntry]) -> np.ndarray:
        """Add images in one transaction (all or none) and return their ids. Embeddings are normalised to
        unit length; a NaN, zero or wrongly shaped one is an `EntryError`, another dimension than the
        index's an `IndexMismatchError`, both naming the entry. A content hash already stored (or twice in
        the batch) is a `DuplicateImageError`: skip known files with `hashes_present` first."""
        entries = list(entries)
        if not entries:
            return np.zeros(0, np.int64)
        with self._lock:
            if self._store.meta("stamp") is None:
                raise IndexConfigError("this index has no model recorded: open it with model= before adding images")
            vectors = self._embeddings(entries)
            self._vectors.prepare(vectors.shape[1])
            ids = self._store.add(entries, vectors)
            self._filtered.clear()
            self._vectors.add(ids, vectors)
            return ids

    def _embeddings(self, entries: list[ImageEntry]) -> np.ndarray:
        dimension = self.dimension
        rows = []
        for number, entry in enumerate(entries):
            where = f"entry {number} ({getattr(entry, 'location', None)!r})"
            try:
                vector = np.asarray(getattr(entry, "embedding", None), dtype=np.float64)
            except (TypeError, ValueError):
                raise EntryError(f"{where}: the embedding is not an array of numbers") from None
            if vector.ndim != 1 or vector.size == 0:
                raise EntryError(f"{where}: the embedding must be one vector, got shape {vector.shape}")
            if dimension is None:
                dimension = vector.size
            if vector.size != dimension:
                raise IndexMismatchError(
                    f"{where}: the embedding has {vector.size} values; this index holds {dimension}-d vectors "
                    f"of model {describe_identity(self._store.meta('stamp'))}"
                )
            if not np.isfinite(vector).all():
                raise EntryError(f"{where}: the embedding contains NaN or infinite values")
            norm = np.linalg.norm(vector)
            if norm == 0:
                raise EntryError(f"{where}: the embedding is all zeros")
            rows.append(vector / norm)
        return np.ascontiguousarray(rows, dtype=np.float32)

    def remove(self, ids: Iterable[int]) -> None:
        """Remove images for good: rows deleted and overwritten in the store, vectors removed from the index
        file. An unknown id is a `QueryError` and nothing is removed."""
        wanted = _ids(ids)
        if not wanted:
            return
        with self._lock:
            self._store.remove(wanted)
            self._filtered.clear()
            self._vectors.remove(np.unique(np.array(wanted, dtype=np.int64)))

    def set_true_code(self, image_id: int, code: str) -> None:
        """Record an image's true code or label (an accepted or corrected proposal); filters on the true and
        the best code see it at once."""
        [image_id] = _ids([image_id])
        with self._lock:
            self._store.set_true_code(image_id, code)
            self._filtered.clear()

    def id_for_hash(self, content_hash: str) -> int | None:
        """The id of the indexed image with this content hash (sha256 hex), or None."""
        return self._store.id_for_hash(content_hash)

    def axis_codes(self, axis: str) -> dict[str, int]:
        """Image counts per code of one IRMA axis (``anatomical``...), on the best code."""
        return self._store.axis_codes(axis)

    def hashes_present(self, hashes: Iterable[str]) -> set[str]:
        """Which of these content hashes are already indexed (lower case)."""
        return self._store.hashes_present(hashes)

    def locations_present(self, locations: Iterable[str]) -> set[str]:
        """Which of these location texts are already indexed."""
        return self._store.locations_present(locations)

    def query(self, filters: Filters | None = None) -> np.ndarray:
        """The ids (sorted int64) of the images that pass `filters` (all images without)."""
        return self._store.query(filters or Filters())

    def content_hashes(self) -> Iterator[str]:
        """Every indexed content hash."""
        return self._store.content_hashes()

    def record_failures(self, rows: Iterable[tuple[str, str]]) -> None:
        """Record (location, reason) for files that could not be indexed; see `failures`."""
        self._store.record_failures(rows)

    def failures(self) -> list[dict[str, str]]:
        return self._store.failures()

    # -- reading --------------------------------------------------------------------------------------------

    def get(self, ids: Iterable[int]) -> list[ImageRow]:
        """The stored rows of `ids`, in their order. An unknown id is an `UnknownImageError`."""
        return self._store.get(_ids(ids))

    def embeddings(self, ids: Iterable[int]) -> np.ndarray:
        """The stored unit-norm embeddings of `ids` (n x d float32), in their order."""
        return self._store.embeddings(_ids(ids))

    def search(self, vector: np.ndarray, k: int = 10, filters: Filters | None = None) -> list[Hit]:
        """The k images most similar to `vector` among those passing `filters`, best first; fewer when fewer
        pass. Exact (equal to brute force) on a Flat index and whenever the filters are selective."""
        k = check_k(k)
        if filters is not None and not isinstance(filters, Filters):
            raise QueryError(f"filters must be a Filters, got {type(filters).__name__}")
        with self._lock:
            query = self._query_vector(vector)
            if self._shared and time.monotonic() - self._refreshed >= self._refresh_seconds:
                self.refresh()
            try:
                return self._search(query, k, filters)
            except UnknownImageError:  # another process removed a hit since the last refresh
                self.refresh()
                return self._search(query, k, filters)

    def _search(self, query: np.ndarray, k: int, filters: Filters | None) -> list[Hit]:
        within = None if filters is None or filters.is_empty else self._passing(filters)
        ids, scores = self._vectors.search(query, k, within)
        return self._hits(ids, scores)

    def refresh(self) -> None:
        """Take in what other processes sharing the store changed: their adds and removals go into the
        vectors (see `Vectors.refresh`) and the cached filter results are dropped (they may have changed
        codes). On a PostgreSQL store a search does this by itself at most every `refresh_seconds`."""
        with self._lock:
            self._vectors.refresh()
            self._filtered.clear()
            self._refreshed = time.monotonic()

    def _passing(self, filters: Filters) -> np.ndarray:
        if filters in self._filtered:
            self._filtered.move_to_end(filters)
        else:
            self._filtered[filters] = self._store.query(filters)
            if len(self._filtered) > FILTER_CACHE_SIZE:
                self._filtered.popitem(last=False)
        return self._filtered[filters]

    def _query_vector(self, vector: np.ndarray) -> np.ndarray:
        try:
            query = np.asarray(vector, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise QueryError("the query vector is not an array of numbers") from None
        if self.dimension is not None and query.size != self.dimension:
            raise IndexMismatchError(
                f"this index was built with model {self._described_model()}; the query vector has {query.size} values"
            )
        norm = np.linalg.norm(query)
        if not np.isfinite(query).all() or norm == 0:
            raise QueryError("the query vector must be finite and not all zeros")
        return (query / norm).astype(np.float32)

    def _hits(self, ids: np.ndarray, scores: np.ndarray) -> list[Hit]:
        rows = self._store.get(ids.tolist())
        return [Hit(**vars(row), score=float(score)) for row, score in zip(rows, scores, strict=True)]

    def search_by_id(
        self, image_id: int, k: int = 10, filters: Filters | None = None, *, include_self: bool = True
    ) -> list[Hit]:
        """Images similar to a stored one. It comes first itself when it passes the filters, unless
        `include_self` is False."""
        [image_id] = _ids([image_id])
        k = check_k(k)
        with self._lock:
            [vector] = self._store.embeddings([image_id])
            hits = self.search(vector, min(k + 1, MAX_K), filters)
            others = [hit for hit in hits if hit.id != image_id]
            if not include_self:
                return others[:k]
            own = next((hit for hit in hits if hit.id == image_id), None)
            if own is None and (filters is None or image_id in self._passing(filters)):
                # pushed out of the top k + 1 by identical duplicates: it is still the best match
                own = self._hits(np.array([image_id]), np.array([vector @ vector]))[0]
            return ([own] if own else []) + others[: k - 1 if own else k]

    def stats(self) -> dict[str, Any]:
        """Size and make-up of the index, for status pages and the CLI."""
        with self._lock:
            files = {
                name: (self.folder / name).stat().st_size
                for name in (STORE_FILE, f"{STORE_FILE}-wal", INDEX_FILE, MANIFEST_FILE, ROWS_FILE, IDS_FILE)
                if (self.folder / name).exists()
            }
            return {
                "store": self._store.name,
                "count": self._store.count(),
                "dimension": self.dimension,
                "index_type": self._vectors.type,
                "model": describe_identity(self._store.meta("stamp")),
                "stamp_digest": stamp_digest(self._store.meta("stamp")),
                "datasets": self._store.dataset_counts(),
                "failures": len(self._store.failures()),
                "unsaved_vectors": self._vectors.unsaved,
                "files": files,
            }
