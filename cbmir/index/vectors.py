"""The vector side of an index folder: a FAISS index derived from the store, and how it stays consistent.

Vectors are unit-norm embeddings compared by inner product (cosine similarity); the FAISS id of a vector
is its store id (`IndexIDMap2` around non-IVF indexes, IVF indexes keep ids natively). The index type is a
FAISS factory string, chosen by `automatic_type` unless the user names one.

``vectors.faiss`` is written atomically (temporary file, fsync, ``os.replace``) and described by
``vectors.json``: model stamp digest, dimension, index type, vector count, last store id, size and sha256
of the index file. Writing it after every batch would cost too much at scale, so it is written on
`flush` / close, every `IndexPolicy.write_every` added vectors, after every removal, and after a repair at
open. Since store ids only grow and are never reused, a written index holds exactly the store's images up
to its manifest's last id, minus those removed since. Opening therefore (1) rebuilds from the store when
the files are missing, unreadable, do not match each other (checksum) or were made for another
dimension, model or index type; (2) otherwise adds the store's images after the last id (catch-up after
a crash between writes); (3) rebuilds when the count still differs from the store's (images removed after
the last write). So whenever a process dies, the next open ends with an index equal to the store. An
on-disk type (``ondisk:<factory>``, `cbmir.index.ondisk`) keeps its vectors in two row files beside the
index file, which the manifest describes too (``row_files``: rows and a sha256 per block); they are checked,
cut back or rebuilt under the same rules.

The caller (the engine) serialises access and holds the folder lock, so no other process writes here. The
store may be shared (PostgreSQL): then other processes, each with a vector folder of its own, add and remove
images too. Their ids are committed in id order (one writer at a time), so an add first takes in the ids
below its own (`add`), and `refresh` takes in their adds, and rebuilds after their removals (the store
counts removals, so finding that none happened costs one query); the same three steps as opening.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np

from cbmir.files import file_digest
from cbmir.index.errors import IndexConfigError
from cbmir.index.filters import Filters
from cbmir.index.ondisk import (
    IDS_FILE,
    MAX_WIDEN,
    ONDISK,
    ROWS_FILE,
    OnDiskIndex,
    centroids,
    compressed_factory,
    factory_index,
    faiss_message,
    id_bitmap,
    new_compressed,
)
from cbmir.index.store import Store
from cbmir.stamp import stamp_digest

INDEX_FILE, MANIFEST_FILE = "vectors.faiss", "vectors.json"
MANIFEST_FORMAT = 1
TRAIN_PER_CENTROID = 39  # FAISS k-means warns below 39 training vectors per centroid
SAMPLE_PER_CENTROID = 64
GPU_MAX_K = 2048  # the largest k FAISS GPU indexes search

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexPolicy:
    """When to use which index type, and how hard approximate indexes search.

    Automatic types by vector count: exact ``Flat`` below `hnsw_from` (one 512-d query over 100k vectors
    takes about 7 ms on 2 shared CPU cores, over 1M about 69 ms: BENCHMARKS.md, large_index); ``HNSW32`` below
    `ivf_from` (builds at about 2,400 vectors/s on 2 cores, and cannot remove, so a removal rebuilds it);
    ``IVF{n},Flat`` from `ivf_from`, n = 4·sqrt(count) rounded down to a power of two and at most count / 39,
    trained on a sample of 64 vectors per list; the on-disk type (`ondisk_type`) from `ondisk_from`, where
    IVF,Flat's float32 vectors would hold 4 GB of memory (2,056 bytes each) and the on-disk index holds 72
    bytes per vector in memory and answered with recall@10 1.00 in 3.2 ms at 10^6, 0.99 in 7.1 ms at 10^7
    (p50, `ondisk_nprobe` 16, `rerank` 40: the codes limit recall, not the lists probed; 8 lists gave the same
    recall, 16 leave a margin for embeddings less clustered than the benchmark's, 32 cost twice the time;
    rerank 20 gives 0.97 and 10 gives 0.92 at 10^7). An IVF type named by the user is used once
    the store holds 39 vectors per centroid of its largest k-means (lists, PQ codewords); ``Flat`` until then.

    Filtered searches are exact on ``Flat``. On approximate types they are exact too while at most
    `exact_filter_limit` images match (only the matching vectors are scored: the flat storage under the
    HNSW graph, every IVF list; `ondisk_exact_limit` for the on-disk type, whose float16 rows, read through
    a memory map, cost about 1.6 ms per 1,000, where its selector search took 9-11 ms at 10^7); beyond that
    FAISS searches with a selector of the matching ids, as hard as an unfiltered search (`ef_search`,
    `nprobe`), widened only while it finds fewer than k of them (the on-disk type starts wider, by
    sqrt(count / matching), and re-ranks `rerank` × k candidates).
    """

    hnsw_from: int = 200_000
    ivf_from: int = 1_000_000
    ondisk_from: int = 2_000_000
    exact_filter_limit: int = 50_000
    ondisk_exact_limit: int = 5_000
    ef_search: int = 128
    nprobe: int = 64
    ondisk_nprobe: int = 16
    rerank: int = 40
    write_every: int = 100_000


def ondisk_type(count: int) -> str:
    """The automatic on-disk type for `count` vectors: 64-byte PQ codes (no OPQ: its training takes minutes
    on 2 cores, see BENCHMARKS.md, large_index), sqrt(count) / 4 lists rounded to a power of two (1024 at
    10^7)."""
    return f"{ONDISK}IVF{1 << round(math.log2(math.sqrt(count) / 4))},PQ64"


def automatic_type(count: int, policy: IndexPolicy) -> str:
    if count < policy.hnsw_from:
        return "Flat"
    if count < policy.ivf_from:
        return "HNSW32"
    if count >= policy.ondisk_from:
        return ondisk_type(count)
    lists = min(4 * math.sqrt(count), count / TRAIN_PER_CENTROID)  # FAISS's 4·sqrt(n) rule, if trainable
    return f"IVF{1 << max(0, math.floor(math.log2(max(lists, 1))))},Flat"


def _empty_index(dimension: int, index_type: str) -> faiss.Index:
    """A new index of `index_type`, with store ids. Only types that keep vectors uncompressed (Flat, HNSW
    over flat storage, IVF with flat lists) are accepted, so that a filtered search can always be exact; an
    on-disk type gives its compressed index, untrained (`OnDiskIndex.create` adds the row files)."""
    factory = compressed_factory(index_type)
    if factory is not None:
        return new_compressed(dimension, factory)
    hint = (
        "use Flat, HNSW{M} (such as HNSW32), IVF{lists},Flat (such as IVF1024,Flat) or, to keep the vectors on "
        "disk, ondisk:{IVF factory} (such as ondisk:IVF1024,PQ64)"
    )
    index = factory_index(dimension, index_type, index_type, hint)
    if not isinstance(index, (faiss.IndexFlat, faiss.IndexHNSWFlat, faiss.IndexIVFFlat)):
        raise IndexConfigError(f"index type {index_type!r} compresses or transforms the vectors; {hint}")
    return index if isinstance(index, faiss.IndexIVF) else faiss.IndexIDMap2(index)


def _training_minimum(index: faiss.Index) -> int:
    return 0 if index.is_trained else TRAIN_PER_CENTROID * centroids(index)  # only IVF needs training


def _as_float32(array: np.ndarray) -> np.ndarray:
    """FAISS takes only C-contiguous float32; numpy 2 arithmetic easily yields float64."""
    return np.ascontiguousarray(array, dtype=np.float32)


def _gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _replace_atomically(path: Path, write) -> None:
    """Call write(temporary path) for a temporary file beside `path`, then rename it over `path`."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


class Vectors:
    """The FAISS index of one folder, kept equal to the store's embeddings. `requested` is a FAISS factory
    string or "auto"."""

    def __init__(self, folder: Path, store: Store, requested: str, policy: IndexPolicy):
        self.folder, self.store, self.requested, self.policy = Path(folder), store, requested, policy
        self.index: faiss.Index | None = None
        self.type: str | None = None
        self._last_id = 0  # every stored id up to this one is in the index, unless removed since
        self._removals = store.removals()  # the store's removal count the index reflects (see refresh)
        self._unsaved = 0
        # a GPU replica for unfiltered searches, None until made, False when impossible
        self._gpu: faiss.Index | bool | None = None
        self._flat: tuple[np.ndarray, np.ndarray] | None = None  # see _flat_view
        for leftover in self.folder.glob(".vectors.*.tmp"):  # from a crash while writing
            leftover.unlink(missing_ok=True)
        dimension = store.meta("dimension")
        if dimension is not None:
            self._open(dimension)

    @property
    def index_path(self) -> Path:
        return self.folder / INDEX_FILE

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST_FILE

    @property
    def _ready(self) -> faiss.Index:
        """The index, for the methods that run only once it is loaded, rebuilt or prepared."""
        assert self.index is not None, "the index is neither loaded nor prepared"
        return self.index

    @property
    def unsaved(self) -> int:
        """Vectors added since the index file was last written."""
        return self._unsaved

    def _wanted_type(self, dimension: int) -> str:
        count = self.store.count()
        if self.requested == "auto":
            return automatic_type(count, self.policy)
        if count < _training_minimum(_empty_index(dimension, self.requested)):
            return "Flat"
        return self.requested

    # -- open, repair, write --------------------------------------------------------------------------------

    def _open(self, dimension: int) -> None:
        wanted = self._wanted_type(dimension)
        problem = self._load(dimension, wanted)
        if problem is None:
            caught_up = self._catch_up()
            if self._ready.ntotal == self.store.count(through_id=self._last_id):
                if caught_up:
                    log.info("%s: added %d images stored after its last write", self.index_path, caught_up)
                    self._write(dimension)
                return
            problem = f"it holds {self._ready.ntotal} vectors, the store {self.store.count()} images (removed since)"
        level = logging.WARNING if self.store.count() else logging.DEBUG  # a new, empty index is no news
        log.log(level, "rebuilding %s from the store: %s", self.index_path, problem)
        self._rebuild(dimension, wanted)
        self._write(dimension)

    def _load(self, dimension: int, wanted: str) -> str | None:
        """Load the index file if it is sound and made for this store; otherwise say why not."""
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return f"{MANIFEST_FILE} is missing"
        except (OSError, ValueError) as error:
            return f"{MANIFEST_FILE} cannot be read ({error})"
        if not isinstance(manifest, dict):
            return f"{MANIFEST_FILE} is not a manifest"
        expected = {
            "format": MANIFEST_FORMAT,
            "dimension": dimension,
            "stamp": stamp_digest(self.store.meta("stamp")),
            "index_type": wanted,
        }
        for key, value in expected.items():
            if manifest.get(key) != value:
                return f"its {key} is {manifest.get(key)!r}, wanted {value!r}"
        if not isinstance(manifest.get("last_id"), int):
            return f"its last_id is {manifest.get('last_id')!r}"
        try:
            size, digest = file_digest(self.index_path, sync=True)
        except FileNotFoundError:
            return f"{INDEX_FILE} is missing"
        if size != manifest.get("size") or digest != manifest.get("sha256"):
            return f"{INDEX_FILE} does not match its manifest (damaged, or a crash while writing)"
        try:
            index = faiss.read_index(str(self.index_path))
        except RuntimeError as error:
            return f"{INDEX_FILE} cannot be read ({faiss_message(error)})"
        if index.ntotal != manifest.get("count") or index.d != dimension:
            return f"{INDEX_FILE} holds {index.ntotal} {index.d}-d vectors, its manifest says otherwise"
        if compressed_factory(wanted) is not None:
            index = OnDiskIndex.open(self.folder, index, manifest.get("row_files"))
            if isinstance(index, str):
                return index
        self.index, self.type, self._last_id = index, wanted, int(manifest["last_id"])
        self._changed()
        return None

    def _rebuild(self, dimension: int, index_type: str) -> None:
        index = _empty_index(dimension, index_type)
        if not index.is_trained:
            index.train(self._training_sample(index))
        if compressed_factory(index_type) is not None:
            index = OnDiskIndex.create(self.folder, index)
        self.index, self.type, self._last_id = index, index_type, 0
        self._changed()
        for ids, vectors in self.store.iter_embeddings():
            self._add(ids, vectors)

    def _training_sample(self, index: faiss.IndexIVF) -> np.ndarray:
        ids = self.store.query(Filters())
        size = min(len(ids), SAMPLE_PER_CENTROID * centroids(index))
        chosen = np.random.default_rng(0).choice(ids, size, replace=False)
        return _as_float32(np.concatenate([vectors for _, vectors in self.store.iter_embeddings(ids=chosen)]))

    def _write(self, dimension: int) -> None:
        """Write the index and its manifest, first switching type if the store's size now asks for another."""
        wanted = self._wanted_type(dimension)
        if wanted != self.type:
            log.info(
                "%s: switching from %s to %s for %d images", self.index_path, self.type, wanted, self.store.count()
            )
            self._rebuild(dimension, wanted)
        written: dict[str, tuple[int, str]] = {}
        index = self._ready
        row_files = index.sync() if isinstance(index, OnDiskIndex) else None  # durable before the manifest

        def write_index(path: Path) -> None:
            faiss.write_index(index.compressed if isinstance(index, OnDiskIndex) else index, str(path))
            written["file"] = file_digest(path, sync=True)

        _replace_atomically(self.index_path, write_index)
        size, digest = written["file"]
        manifest = {
            "format": MANIFEST_FORMAT,
            "index_type": self.type,
            "dimension": dimension,
            "stamp": stamp_digest(self.store.meta("stamp")),
            "count": self._ready.ntotal,
            "last_id": self._last_id,
            "size": size,
            "sha256": digest,
            **({"row_files": row_files} if row_files is not None else {}),
            "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }

        def write_manifest(path: Path) -> None:
            with open(path, "w") as file:
                file.write(json.dumps(manifest, indent=2) + "\n")
                file.flush()
                os.fsync(file.fileno())

        _replace_atomically(self.manifest_path, write_manifest)
        if row_files is None:  # those of an on-disk type used before
            for name in (ROWS_FILE, IDS_FILE):
                (self.folder / name).unlink(missing_ok=True)
        directory = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the renames durable
        finally:
            os.close(directory)
        self._unsaved = 0

    def flush(self) -> None:
        """Write the index if vectors were added since the last write."""
        if self._unsaved:
            self._write(self._ready.d)

    # -- changes --------------------------------------------------------------------------------------------

    def _changed(self) -> None:
        """Forget what was derived from the index (GPU replica, flat view): it changed."""
        self._gpu, self._flat = None, None

    def prepare(self, dimension: int) -> None:
        """Make the (empty) index for the first vectors, so a bad index type fails before anything is stored."""
        if self.index is None:
            self.type = self._wanted_type(dimension)
            self.index = _empty_index(dimension, self.type)

    def _add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self._ready.add_with_ids(_as_float32(vectors), np.ascontiguousarray(ids, dtype=np.int64))
        self._last_id = max(self._last_id, int(ids.max()))
        self._changed()

    def _catch_up(self, before_id: int | None = None) -> int:
        """Add the store's images after the last id held (and before `before_id`); how many there were."""
        added = 0
        for ids, vectors in self.store.iter_embeddings(after_id=self._last_id, before_id=before_id):
            self._add(ids, vectors)
            added += len(ids)
        self._unsaved += added
        return added

    def refresh(self) -> bool:
        """Take in what other processes sharing the store changed since: the images they added (after the
        last id held: ids are committed in order) are added, and when they removed images (the store's
        removal count moved) and the index holds others than the store, it is rebuilt. Two short indexed
        queries when nothing changed. Returns whether the index changed."""
        dimension = self.store.meta("dimension")
        if dimension is None:
            return False
        self.prepare(dimension)
        removals = self.store.removals()
        changed = self._catch_up() > 0
        if removals != self._removals:
            self._removals = removals
            if self._ready.ntotal != self.store.count(through_id=self._last_id):
                log.info("rebuilding %s: images were removed from the store by another process", self.index_path)
                self._rebuild(dimension, self.type or self._wanted_type(dimension))
                self._write(dimension)
                changed = True
        return changed

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors just stored under `ids`, after any that other processes stored before them; writes
        the index every `write_every` vectors."""
        self._catch_up(before_id=int(ids.min()))
        self._add(ids, vectors)
        self._unsaved += len(ids)
        if self._unsaved >= self.policy.write_every:
            try:
                self._write(self._ready.d)
            except (OSError, RuntimeError) as error:  # the images are stored: a later write or open makes up for it
                log.error("could not write %s (%s); retrying at the next write", self.index_path, error)

    def remove(self, ids: np.ndarray) -> None:
        """Remove vectors already deleted from the store, and write the index so they leave the disk too.
        Index types that cannot remove (HNSW) are rebuilt from the store."""
        if self.index is None or self.type is None:  # both are set together
            return
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        try:
            if isinstance(self.index, OnDiskIndex):
                removed = self.index.remove(ids)
            else:
                removed = self.index.remove_ids(faiss.IDSelectorBatch(ids))
        except RuntimeError:
            removed = None
        if removed != len(ids):
            self._rebuild(self.index.d, self.type)
        self._changed()
        self._write(self.index.d)

    # -- search ---------------------------------------------------------------------------------------------

    def search(self, query: np.ndarray, k: int, within: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ids and inner products of the k vectors nearest to `query`, best first, among `within`
        (store ids) when given. Exact on a Flat index, and on any index when `within` is small."""
        nothing = np.zeros(0, np.int64), np.zeros(0, np.float32)
        if self.index is None or self.index.ntotal == 0 or (within is not None and len(within) == 0):
            return nothing
        query = _as_float32(query.reshape(1, -1))
        if isinstance(self.index, OnDiskIndex):
            policy = self.policy
            return self.index.search(
                query[0],
                k,
                within,
                nprobe=policy.ondisk_nprobe,
                rerank=policy.rerank,
                exact_limit=policy.ondisk_exact_limit,
            )
        replica = self._gpu_replica() if within is None and k <= GPU_MAX_K else None
        if replica is not None:
            scores, ids = replica.search(query, k)
        elif self.type == "Flat":
            return self._flat_search(query[0], k, within)
        elif within is None:
            scores, ids = self.index.search(query, k, params=self._parameters(k, None, 1))
        elif len(within) <= self.policy.exact_filter_limit:
            scores, ids = self._exact(query, k, id_bitmap(within))
        else:
            scores, ids = self._filtered_approximate(query, k, id_bitmap(within), len(within))
        found = ids[0] >= 0  # FAISS pads with -1 when fewer than k vectors qualify
        return ids[0][found], scores[0][found]

    def _flat_view(self) -> tuple[np.ndarray, np.ndarray]:
        """The Flat index's vectors as a numpy matrix (no copy) and their store ids, ascending: vectors are
        only ever added in id order (new images, catch-up, rebuild) and removal keeps the order. Remade after
        every change, since FAISS may move the vectors."""
        if self._flat is None:
            index = self._ready
            flat = faiss.downcast_index(index.index)
            matrix = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)
            self._flat = matrix, faiss.vector_to_array(index.id_map)
        return self._flat

    def _flat_search(self, query: np.ndarray, k: int, within: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Exact search of a Flat index. Unfiltered, or when most vectors pass the filter: one BLAS
        matrix-vector product (FAISS searches a single query on one thread, BLAS on every core: half the time
        on two), then the best of the passing rows. When at most half pass: FAISS's scan with a bitmap of the
        passing rows, which computes only their scores."""
        matrix, ids = self._flat_view()
        if within is not None:
            positions = np.searchsorted(ids, within)
            positions = positions[(positions < len(ids)) & (ids[np.minimum(positions, len(ids) - 1)] == within)]
            if len(positions) * 2 <= len(ids):
                params = faiss.SearchParameters(sel=id_bitmap(positions))
                scores, found = self._ready.index.search(query[None], k, params=params)
                keep = found[0] >= 0
                return ids[found[0][keep]], scores[0][keep]
        scores = matrix @ query
        if within is not None:
            scores, ids = scores[positions], ids[positions]
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.argsort(-scores[top], kind="stable")]
        return ids[top], scores[top]

    def _exact(self, query: np.ndarray, k: int, selector: faiss.IDSelector) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over the selected vectors of an IVF or HNSW index: both keep them uncompressed."""
        index = self._ready
        if isinstance(index, faiss.IndexIVF):  # probing every list is exhaustive
            return index.search(query, k, params=faiss.SearchParametersIVF(sel=selector, nprobe=index.nlist))
        # the HNSW graph's flat storage, positions translated to store ids
        inner = faiss.downcast_index(index.index)
        translated = faiss.IDSelectorTranslated(index.id_map, selector)
        scores, positions = inner.storage.search(query, k, params=faiss.SearchParameters(sel=translated))
        ids = np.array([[index.id_map.at(int(p)) if p >= 0 else -1 for p in positions[0]]], np.int64)
        return scores, ids

    def _filtered_approximate(
        self, query: np.ndarray, k: int, selector: faiss.IDSelector, matching: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """A filtered search of HNSW or IVF as hard as an unfiltered one (the same ef_search / nprobe, so
        about the same recall and time), widened fourfold at a time only while it finds fewer than k of the
        matching images."""
        index, widen, wanted = self._ready, 1, min(k, matching)
        while True:
            scores, ids = index.search(query, k, params=self._parameters(k, selector, widen))
            exhausted = isinstance(index, faiss.IndexIVF) and self.policy.nprobe * widen >= index.nlist
            if (ids[0] >= 0).sum() >= wanted or exhausted or widen >= MAX_WIDEN:
                return scores, ids
            widen *= 4

    def _parameters(self, k: int, selector: faiss.IDSelector | None, widen: int) -> faiss.SearchParameters:
        index = self._ready
        if isinstance(index, faiss.IndexIVF):
            return faiss.SearchParametersIVF(sel=selector, nprobe=min(index.nlist, self.policy.nprobe * widen))
        if isinstance(faiss.downcast_index(index.index), faiss.IndexHNSW):
            return faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.policy.ef_search, k) * widen)
        return faiss.SearchParameters(sel=selector)

    def _gpu_replica(self) -> faiss.Index | None:
        """A GPU copy of the index for unfiltered searches, made on first use after each change. The CPU index
        stays the master: FAISS GPU indexes take no id selectors and cannot remove."""
        if self._gpu is None:
            self._gpu = False
            if _gpu_count() > 0:
                try:
                    replica = faiss.index_cpu_to_all_gpus(self.index)
                    if isinstance(self.index, faiss.IndexIVF):
                        faiss.GpuParameterSpace().set_index_parameter(replica, "nprobe", self.policy.nprobe)
                    self._gpu = replica
                except RuntimeError as error:  # types FAISS cannot put on a GPU, such as HNSW
                    log.info("searching %s on the CPU: %s", self.type, faiss_message(error))
        return self._gpu or None
