"""The on-disk index type, for archives whose float32 vectors do not fit in memory.

Named ``ondisk:<FAISS factory string>``, e.g. ``ondisk:IVF1024,PQ64`` (the automatic type at 10^7, see
`cbmir.index.vectors.ondisk_type`) or ``ondisk:OPQ64_256,IVF4096,PQ64``; the factory must make an IVF index
(behind a transform such as OPQ or not) and may compress its codes (PQ, SQ): the codes only choose
candidates. Three files beside the manifest:

- ``vectors.faiss``: the compressed index (IVF lists of codes and store ids), the only part held in memory;
- ``vectors.f16``: every vector added, float16, one row of d values each, in the order added;
- ``vectors.ids``: the store id of each row (int64). Rows are added in store id order (new images, catch-up,
  rebuild all go by ascending id) and ids are never reused, so this file is sorted and a row is found by
  binary search.

A search asks the compressed index for ``rerank × k`` candidates (``nprobe`` lists probed, a bitmap selector
of the passing ids when filtered) and re-ranks them exactly: the inner product with their float16 rows, read
through a memory map, so only the candidates' rows are touched. A filter passing at most ``exact_limit``
images is answered by an exact scan of those images' rows instead; a broader one probes more lists the fewer
images pass (``nprobe / sqrt(fraction passing)``) and widens fourfold while fewer than k passing images are
found. Every hit passes the filter.

Invariants, when the manifest is current: both row files hold its ``rows`` rows; the compressed index holds
exactly the ids of the rows not removed; a removed image's row keeps its id (the file stays sorted) but its
values are overwritten with zeros, so the vector leaves the disk; it is in neither the compressed index nor
the store, so it is never a candidate, and a rebuild drops it.

Crash guarantees: rows are appended in place and only ever rewritten by a removal's zeroing; `sync` fsyncs
both files and gives their sha256 per block of `BLOCK_BYTES` (rehashing only the blocks changed since the
last sync), which the manifest keeps beside the compressed index's own checksum. `open` cuts files longer
than the manifest says back to its rows (rows appended after the last write, which the caller adds again
from the store) and refuses, with the reason, files that are shorter or whose blocks do not match, so the
caller rebuilds from the store. A rebuild writes new files (the old ones are unlinked first, so a reader of
the old mapping never sees them truncated). Whatever moment a process is killed, nothing half-written is
used.

Memory: only the compressed index stays in memory: for PQ64, 64 bytes of codes and 8 of id per vector, plus
the centroids (and a transform's matrix), about its file's size once opened; while it is being built,
FAISS's lists grow by doubling and hold up to as much again. Training takes a sample, adds come in the
store's batches, and re-ranking reads only the candidates' rows; the row files live in the page cache, which
the kernel reclaims.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path

import faiss
import numpy as np

from cbmir.index.errors import IndexConfigError, SearchIndexError

ONDISK = "ondisk:"
ROWS_FILE, IDS_FILE = "vectors.f16", "vectors.ids"
BLOCK_BYTES = 1 << 26  # 64 MiB: the unit of the row files' checksums
EXACT_CHUNK = 16_384  # rows scored at once by an exact scan
# FAISS's default 25 k-means rounds per PQ codebook took 163 s for PQ64 on 16k vectors on 2 busy cores; the
# codes only choose candidates, and re-ranking makes up for coarser ones
PQ_TRAINING_ITERATIONS = 10
MAX_WIDEN = 256  # how far a filtered search widens (ef_search, nprobe) before it settles for fewer hits

log = logging.getLogger(__name__)


def compressed_factory(index_type: str) -> str | None:
    """The FAISS factory string of an on-disk index type, None for any other type."""
    return index_type[len(ONDISK) :] if index_type.startswith(ONDISK) else None


def faiss_message(error: RuntimeError) -> str:
    """The readable end of a FAISS exception ("Error in <signature> at <file>:<line>: <message>")."""
    return str(error).strip().splitlines()[0].rsplit(": ", 1)[-1]


def factory_index(dimension: int, factory: str, index_type: str, hint: str) -> faiss.Index:
    """FAISS's index of `factory` for inner products; one it cannot build is an `IndexConfigError` naming
    the `index_type` asked for, FAISS's reason and the `hint`."""
    try:
        return faiss.index_factory(dimension, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise IndexConfigError(
            f"index type {index_type!r}: FAISS cannot build it for {dimension}-d vectors "
            f"({faiss_message(error)}); {hint}"
        ) from None


def id_bitmap(members: np.ndarray) -> faiss.IDSelector:
    """A FAISS selector of these ids (or positions) as a bitmap: one bit test per candidate vector, cheaper
    than the hash lookup of IDSelectorBatch."""
    passing = np.zeros(int(members.max()) + 1 if len(members) else 1, dtype=bool)
    passing[members] = True
    return faiss.IDSelectorBitmap(np.packbits(passing, bitorder="little"))


def new_compressed(dimension: int, factory: str) -> faiss.Index:
    """An empty, untrained compressed index of `factory` for inner products, with store ids."""
    hint = "use ondisk:<an IVF factory string>, such as ondisk:IVF1024,PQ64 or ondisk:OPQ64_256,IVF4096,PQ64"
    index = factory_index(dimension, factory, ONDISK + factory, hint)
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        raise IndexConfigError(f"index type {ONDISK + factory!r} is not an IVF index; {hint}") from None
    if hasattr(ivf, "pq"):
        ivf.pq.cp.niter = PQ_TRAINING_ITERATIONS
    return index


def centroids(index: faiss.Index) -> int:
    """The most centroids any k-means of an IVF index's training finds: its lists, its PQ's codewords, or
    the 256 codewords an OPQ rotation is trained with."""
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    counts = [ivf.nlist, ivf.pq.ksub if hasattr(ivf, "pq") else 0]
    if isinstance(index, faiss.IndexPreTransform):
        transforms = (faiss.downcast_VectorTransform(index.chain.at(i)) for i in range(index.chain.size()))
        counts += [1 << 8 for transform in transforms if isinstance(transform, faiss.OPQMatrix)]
    return max(counts)


def _digest(handle: int, start: int, end: int) -> str:
    digest = hashlib.sha256()
    while start < end:
        chunk = os.pread(handle, min(1 << 23, end - start), start)
        if not chunk:
            break  # shorter than expected: the digest cannot match
        digest.update(chunk)
        start += len(chunk)
    return digest.hexdigest()


class _RowFile:
    """One append-only file of fixed-size rows, with a sha256 per block kept current by `sync`."""

    def __init__(self, path: Path, dtype: np.dtype, width: int, rows: int, digests: list[str]):
        self.path, self.dtype, self.width = path, dtype, width
        self.row_bytes = dtype.itemsize * width
        self.rows, self.digests = rows, digests
        self._dirty: set[int] = set()  # blocks changed since the last sync
        self._view: np.memmap | None = None

    def _blocks(self, first_row: int, end_row: int) -> range:
        return range(first_row * self.row_bytes // BLOCK_BYTES, math.ceil(end_row * self.row_bytes / BLOCK_BYTES))

    def append(self, values: np.ndarray) -> None:
        with open(self.path, "ab") as file:
            file.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self._dirty.update(self._blocks(self.rows, self.rows + len(values)))
        self.rows += len(values)
        self._view = None

    def zero(self, rows: np.ndarray) -> None:
        """Overwrite these rows with zeros, in place."""
        handle = os.open(self.path, os.O_WRONLY)
        try:
            for row in rows.tolist():
                os.pwrite(handle, bytes(self.row_bytes), row * self.row_bytes)
        finally:
            os.close(handle)
        for row in rows.tolist():
            self._dirty.update(self._blocks(row, row + 1))

    def view(self) -> np.ndarray:
        """The rows, memory-mapped (remapped after appends)."""
        shape = (self.rows, self.width) if self.width > 1 else (self.rows,)
        if not self.rows:
            return np.zeros(shape, self.dtype)  # an empty file cannot be mapped
        if self._view is None or len(self._view) != self.rows:
            self._view = np.memmap(self.path, dtype=self.dtype, mode="r", shape=shape)
        return self._view

    def sync(self) -> list[str]:
        """fsync the file and bring the digests of the changed blocks up to date; returns all of them."""
        end = self.rows * self.row_bytes
        blocks = math.ceil(end / BLOCK_BYTES)
        del self.digests[blocks:]
        self.digests.extend([""] * (blocks - len(self.digests)))
        handle = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(handle)
            for block in sorted(self._dirty | {b for b, digest in enumerate(self.digests) if not digest}):
                if block < blocks:
                    self.digests[block] = _digest(handle, block * BLOCK_BYTES, min(end, (block + 1) * BLOCK_BYTES))
        finally:
            os.close(handle)
        self._dirty.clear()
        return list(self.digests)

    def check(self) -> str | None:
        """Cut the file back to `rows` if it is longer; say what is wrong if it is shorter or does not match."""
        end = self.rows * self.row_bytes
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return f"{self.path.name} is missing"
        if size < end:
            return f"{self.path.name} holds {size} bytes, its manifest says {end}"
        if size > end:
            log.info("%s: dropping %d bytes written after the last manifest", self.path, size - end)
            os.truncate(self.path, end)
        if len(self.digests) != math.ceil(end / BLOCK_BYTES):
            return f"{self.path.name}: its manifest lists {len(self.digests)} block checksums"
        handle = os.open(self.path, os.O_RDONLY)
        try:
            for block, expected in enumerate(self.digests):
                if _digest(handle, block * BLOCK_BYTES, min(end, (block + 1) * BLOCK_BYTES)) != expected:
                    return f"{self.path.name} does not match its manifest at block {block} (damaged)"
        finally:
            os.close(handle)
        return None


class OnDiskIndex:
    """A compressed FAISS index over float16 rows kept on disk, answering by exact re-ranking. Make one with
    `create` (new, empty files) or `open` (files a manifest describes). Mirrors the part of FAISS's index
    interface the vector bookkeeping uses (`ntotal`, `d`, `add_with_ids`)."""

    def __init__(self, folder: Path, compressed: faiss.Index, rows: _RowFile, ids: _RowFile):
        self.folder, self.compressed = folder, compressed
        self._rows, self._ids = rows, ids
        self._ivf = faiss.extract_index_ivf(compressed)
        self._decoder = faiss.IndexScalarQuantizer(compressed.d, faiss.ScalarQuantizer.QT_fp16)

    @classmethod
    def create(cls, folder: Path, compressed: faiss.Index) -> OnDiskIndex:
        """An index with no vectors yet over new row files; `compressed` must be trained and empty."""
        files = []
        for name, dtype, width in ((ROWS_FILE, np.dtype(np.float16), compressed.d), (IDS_FILE, np.dtype(np.int64), 1)):
            path = Path(folder) / name
            path.unlink(missing_ok=True)
            path.touch()
            files.append(_RowFile(path, dtype, width, 0, []))
        return cls(Path(folder), compressed, *files)

    @classmethod
    def open(cls, folder: Path, compressed: faiss.Index, described: object) -> OnDiskIndex | str:
        """The index over the row files `described` (what `sync` returned, as kept in the manifest), or why
        the files cannot be used."""
        if not isinstance(described, dict) or not isinstance(described.get("rows"), int):
            return "its manifest does not describe the row files"
        rows: int = described["rows"]
        files = []
        for name, dtype, width in ((ROWS_FILE, np.dtype(np.float16), compressed.d), (IDS_FILE, np.dtype(np.int64), 1)):
            digests = described.get(name)
            if not isinstance(digests, list):
                return f"its manifest has no checksums of {name}"
            file = _RowFile(Path(folder) / name, dtype, width, rows, list(digests))
            problem = file.check()
            if problem is not None:
                return problem
            files.append(file)
        if compressed.ntotal > rows:
            return f"the compressed index holds {compressed.ntotal} vectors, the row files {rows}"
        return cls(Path(folder), compressed, *files)

    @property
    def ntotal(self) -> int:
        return self.compressed.ntotal

    @property
    def d(self) -> int:
        return self.compressed.d

    @property
    def nlist(self) -> int:
        return self._ivf.nlist

    def add_with_ids(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Append rows and add their codes: `ids` ascending and above every id added before."""
        if len(ids) and self._ids.rows and ids[0] <= self._ids.view()[-1]:
            raise SearchIndexError(
                f"{self.folder / IDS_FILE}: id {ids[0]} is not above the last id added, {self._ids.view()[-1]}: "
                "rows are added in store id order"
            )
        self._rows.append(vectors.astype(np.float16))
        self._ids.append(ids)
        self.compressed.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        """Remove these ids from the compressed index and zero their rows; returns how many were found."""
        removed = self.compressed.remove_ids(faiss.IDSelectorBatch(ids))
        self._rows.zero(self._row_numbers(ids))
        return removed

    def sync(self) -> dict[str, object]:
        """fsync the row files and describe them (rows, block checksums) for the manifest."""
        return {"rows": self._rows.rows, ROWS_FILE: self._rows.sync(), IDS_FILE: self._ids.sync()}

    # -- search ---------------------------------------------------------------------------------------------

    def search(
        self, query: np.ndarray, k: int, within: np.ndarray | None, *, nprobe: int, rerank: int, exact_limit: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ids and inner products (from the float16 rows) of the k best vectors for `query` (d float32),
        best first, among `within` (store ids) when given."""
        if within is not None and len(within) <= exact_limit:
            return self._best(query, k, within)  # exact: every passing row is scored
        candidates = self._candidates(query, rerank * k, within, nprobe)
        return self._best(query, k, np.sort(candidates))

    def _candidates(self, query: np.ndarray, count: int, within: np.ndarray | None, nprobe: int) -> np.ndarray:
        """Ids of about the `count` best vectors by their codes; at least k of the passing ones when that many
        pass, unless even every list cannot give them."""
        selector = id_bitmap(within) if within is not None else None
        widen = 1 if within is None else math.sqrt(max(1.0, self.ntotal / max(1, len(within))))
        wanted = count if within is None else min(count, len(within))
        while True:
            probes = min(self.nlist, math.ceil(nprobe * widen))
            parameters = faiss.SearchParametersIVF(sel=selector, nprobe=probes)
            if isinstance(self.compressed, faiss.IndexPreTransform):  # a transform (OPQ) in front
                parameters = faiss.SearchParametersPreTransform(index_params=parameters)
            _, ids = self.compressed.search(query[None], count, params=parameters)
            found = ids[0][ids[0] >= 0]
            if len(found) >= wanted or probes == self.nlist or widen >= MAX_WIDEN:
                return found
            widen *= 4

    def _row_numbers(self, ids: np.ndarray) -> np.ndarray:
        """The rows of these ids, in their order, leaving out ids that have none."""
        known = self._ids.view()
        rows = np.searchsorted(known, ids)
        return rows[(rows < len(known)) & (known[np.minimum(rows, len(known) - 1)] == ids)]

    def _scores(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Inner products of `query` with these rows, decoded from float16 by FAISS, a chunk at a time."""
        matrix = self._rows.view()
        scores = np.empty(len(rows), np.float32)
        for start in range(0, len(rows), EXACT_CHUNK):
            chunk = np.ascontiguousarray(matrix[rows[start : start + EXACT_CHUNK]])
            scores[start : start + len(chunk)] = self._decoder.sa_decode(chunk.view(np.uint8)) @ query
        return scores

    def _best(self, query: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = self._row_numbers(ids)
        scores = self._scores(query, rows)
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.argsort(-scores[top], kind="stable")]
        return self._ids.view()[rows[top]].astype(np.int64), scores[top]
