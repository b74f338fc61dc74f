"""The on-disk index type: recall after re-ranking, exact filters, incremental adds, removal, repair after a
crash, and the engine end to end. Real FAISS on small seeded archives, checked against brute force."""

import json
import os

import numpy as np
import pytest

from cbmir.index import Engine, Filters, IndexConfigError, IndexPolicy
from cbmir.index.ondisk import BLOCK_BYTES, IDS_FILE, ROWS_FILE, OnDiskIndex
from tests.index import STAMP, assert_exact, index_ids, make_entries, passes, recall, unit_vectors

DIMENSION, COUNT = 32, 4000
SMALL_TYPE = "ondisk:IVF16,PQ8x4"  # 16 lists, 16 codewords: used from 39 x 16 = 624 vectors
TRANSFORMED_TYPE = "ondisk:PCAR16,IVF16,PQ8x4"  # a transform in front, as OPQ is
POLICY = IndexPolicy(nprobe=4, rerank=10, ondisk_exact_limit=200)


@pytest.fixture(scope="module")
def clustered():
    """4,000 archive vectors around 40 centres, their entries, and 50 held-out queries."""
    vectors = unit_vectors(COUNT + 50, DIMENSION, seed=31, clusters=40)
    return make_entries(vectors[:COUNT], seed=31), vectors[COUNT:]


@pytest.fixture(scope="module")
def archive(clustered, tmp_path_factory):
    """An engine with the small on-disk type over the clustered archive, added in batches and flushed."""
    entries, _ = clustered
    engine = Engine.open(tmp_path_factory.mktemp("ondisk"), model=STAMP, index_type=SMALL_TYPE, policy=POLICY)
    ids = np.concatenate([engine.add(entries[start : start + 500]) for start in range(0, COUNT, 500)])
    engine.flush()
    yield engine, dict(zip(ids.tolist(), entries, strict=True))
    engine.close()


def embeddings(by_id: dict) -> dict:
    return {i: entry.embedding for i, entry in by_id.items()}


def test_recall_after_reranking_and_exact_scores(archive, clustered):
    engine, by_id = archive
    assert engine.stats()["index_type"] == SMALL_TYPE
    assert isinstance(engine._vectors.index, OnDiskIndex) and index_ids(engine) == set(by_id)
    vectors = embeddings(by_id)
    recalls = []
    for query in clustered[1]:
        hits = engine.search(query, 10)
        assert len(hits) == 10
        # the scores are the float16 rows' inner products, within float16 rounding of the true ones
        np.testing.assert_allclose([hit.score for hit in hits], [vectors[hit.id] @ query for hit in hits], atol=2e-3)
        assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
        recalls.append(recall(hits, query, vectors, 10))
    assert np.mean(recalls) >= 0.95


@pytest.mark.parametrize(
    "filters",
    [Filters(dataset="chest"), Filters(anatomy="9"), Filters(code="1121-127-700-500"), Filters(label="mass")],
)
def test_filtered_searches_return_only_passing_images_and_match_brute_force(archive, clustered, filters):
    engine, by_id = archive
    allowed = {i: entry.embedding for i, entry in by_id.items() if passes(entry, filters)}
    recalls = []
    for query in clustered[1][:20]:
        hits = engine.search(query, 10, filters)
        assert len(hits) == min(10, len(allowed)) and {hit.id for hit in hits} <= set(allowed)
        recalls.append(recall(hits, query, allowed, 10))
        if len(allowed) <= POLICY.ondisk_exact_limit:  # scored exactly: the brute-force answer itself
            assert_exact_f16(hits, query, allowed)
    assert np.mean(recalls) >= 0.95


def assert_exact_f16(hits, query, allowed):
    """`hits` are the brute-force top 10 of `allowed` (scores compared at float16 precision)."""
    rounded = {i: vector.astype(np.float16).astype(np.float32) for i, vector in allowed.items()}
    assert_exact(hits, query, rounded, 10)


def test_a_selective_filter_still_finds_the_best_passing_images_through_the_compressed_index(tmp_path, clustered):
    """With the exact scan off, a filter passing few images widens nprobe until it finds them."""
    entries, queries = clustered
    policy = IndexPolicy(nprobe=1, rerank=10, ondisk_exact_limit=0)
    with Engine.open(tmp_path, model=STAMP, index_type=SMALL_TYPE, policy=policy) as engine:
        ids = engine.add(entries)
        engine.flush()
        by_id = dict(zip(ids.tolist(), entries, strict=True))
        filters = Filters(code="1121-127-700-500", on="true")
        allowed = {i: entry.embedding for i, entry in by_id.items() if passes(entry, filters)}
        assert 100 < len(allowed) < COUNT / 10
        recalls = []
        for query in queries[:20]:
            hits = engine.search(query, 10, filters)
            assert len(hits) == 10 and {hit.id for hit in hits} <= set(allowed)
            recalls.append(recall(hits, query, allowed, 10))
        assert np.mean(recalls) >= 0.95


def test_added_images_are_searchable_at_once_and_after_reopening(tmp_path, clustered):
    entries, queries = clustered
    with Engine.open(tmp_path, model=STAMP, index_type=SMALL_TYPE, policy=POLICY) as engine:
        engine.add(entries[:1000])
        engine.flush()
        assert isinstance(engine._vectors.index, OnDiskIndex)
        rows_before = (tmp_path / ROWS_FILE).stat().st_size
        later = engine.add(entries[1000:1200])  # appended and coded, not retrained
        assert (tmp_path / ROWS_FILE).stat().st_size == rows_before + 200 * DIMENSION * 2
        assert engine.search(entries[1100].embedding, 1)[0].id == later[100]
    manifest = json.loads((tmp_path / "vectors.json").read_text())
    assert manifest["count"] == manifest["row_files"]["rows"] == 1200 and manifest["last_id"] == 1200
    with Engine.open(tmp_path, policy=POLICY) as engine:
        assert engine.stats()["index_type"] == SMALL_TYPE and index_ids(engine) == set(range(1, 1201))
        assert engine.search(entries[1199].embedding, 1)[0].id == 1200


def test_removed_images_leave_the_index_and_the_disk(tmp_path, clustered):
    entries, queries = clustered
    with Engine.open(tmp_path, model=STAMP, index_type=SMALL_TYPE, policy=POLICY) as engine:
        ids = engine.add(entries[:1000])
        engine.flush()
        gone = [int(ids[10]), int(ids[500])]
        engine.remove(gone)
        assert index_ids(engine) == set(ids.tolist()) - set(gone)
        rows = np.fromfile(tmp_path / ROWS_FILE, dtype=np.float16).reshape(-1, DIMENSION)
        assert not rows[[10, 500]].any() and rows[11].any()  # zeroed in place
        assert all(hit.id not in gone for hit in engine.search(entries[10].embedding, 20))
        assert all(hit.id not in gone for hit in engine.search(entries[10].embedding, 20, Filters(dataset="irma")))
    with Engine.open(tmp_path, policy=POLICY) as engine:  # the manifest vouches for the zeroed rows
        assert index_ids(engine) == set(ids.tolist()) - set(gone)


def corrupt(folder, how):
    if how == "appended after the last write":
        with open(folder / ROWS_FILE, "ab") as file:
            file.write(np.ones((3, DIMENSION), np.float16).tobytes())
        with open(folder / IDS_FILE, "ab") as file:
            file.write(np.array([9001, 9002, 9003], np.int64).tobytes())
    elif how == "manifest missing":
        (folder / "vectors.json").unlink()
    elif how == "rows damaged":
        with open(folder / ROWS_FILE, "r+b") as file:
            file.seek(1234)
            file.write(b"\x7f\x7f")
    elif how == "rows cut short":  # shorter than the 1,000 rows the manifest vouches for
        os.truncate(folder / ROWS_FILE, 1000 * DIMENSION * 2 - 10)
    elif how == "ids missing":
        (folder / IDS_FILE).unlink()


@pytest.mark.parametrize(
    "how", ["appended after the last write", "manifest missing", "rows damaged", "rows cut short", "ids missing"]
)
def test_reopening_after_a_crash_repairs_from_the_store(tmp_path, clustered, how, caplog):
    entries, queries = clustered
    engine = Engine.open(tmp_path, model=STAMP, index_type=SMALL_TYPE, policy=IndexPolicy(write_every=10**6))
    engine.add(entries[:1000])
    engine.flush()
    engine.add(entries[1000:1300])  # stored, appended to the row files, not in the manifest: a kill now
    engine._store.close()
    assert engine._lock_handle is not None
    os.close(engine._lock_handle)
    corrupt(tmp_path, how)
    with Engine.open(tmp_path, policy=POLICY) as engine:
        assert index_ids(engine) == set(range(1, 1301))
        assert (tmp_path / ROWS_FILE).stat().st_size == 1300 * DIMENSION * 2
        assert (tmp_path / IDS_FILE).stat().st_size == 1300 * 8
        vectors = {i + 1: entry.embedding for i, entry in enumerate(entries[:1300])}
        assert np.mean([recall(engine.search(q, 10), q, vectors, 10) for q in queries[:20]]) >= 0.95
    rebuilt = "rebuilding" in caplog.text
    assert rebuilt == (how != "appended after the last write")
    with Engine.open(tmp_path, policy=POLICY) as engine:  # and what was written then is sound
        assert index_ids(engine) == set(range(1, 1301))


def test_the_row_files_checksums_cover_blocks(tmp_path, monkeypatch, clustered):
    """Only the blocks changed since the last write are hashed again, and each is verified at open."""
    monkeypatch.setattr("cbmir.index.ondisk.BLOCK_BYTES", 4096)
    entries, _ = clustered
    with Engine.open(tmp_path, model=STAMP, index_type=SMALL_TYPE, policy=POLICY) as engine:
        engine.add(entries[:1000])
    digests = json.loads((tmp_path / "vectors.json").read_text())["row_files"][ROWS_FILE]
    assert len(digests) == -(-1000 * DIMENSION * 2 // 4096) and BLOCK_BYTES == 1 << 26
    with Engine.open(tmp_path, policy=POLICY) as engine:
        engine.add(entries[1000:1010])
    after = json.loads((tmp_path / "vectors.json").read_text())["row_files"][ROWS_FILE]
    assert after[: len(digests) - 1] == digests[:-1] and after[-1] != digests[-1]


def test_the_engine_end_to_end_with_a_transform_in_front(tmp_path):
    """A type with a transform before IVF and PQ (as OPQ is; PCA here, which trains in no time) through the
    engine: Flat until it can be trained, then on-disk; search, filter, remove, reopen as another type."""
    vectors = unit_vectors(2050, DIMENSION, seed=33, clusters=40)
    entries = make_entries(vectors[:2000], seed=33)
    with Engine.open(tmp_path, model=STAMP, index_type=TRANSFORMED_TYPE, policy=POLICY) as engine:
        engine.add(entries[:500])
        engine.flush()
        assert engine.stats()["index_type"] == "Flat"  # 500 < 624 training vectors
        engine.add(entries[500:])
        engine.flush()
        assert engine.stats()["index_type"] == TRANSFORMED_TYPE
        assert {"vectors.f16", "vectors.ids"} <= set(engine.stats()["files"])
        by_id = {i + 1: entry for i, entry in enumerate(entries)}
        assert np.mean([recall(engine.search(q, 10), q, embeddings(by_id), 10) for q in vectors[2000:]]) >= 0.95
        filters = Filters(anatomy="9", dataset="irma")
        allowed = {i: entry.embedding for i, entry in by_id.items() if passes(entry, filters)}
        for query in vectors[2000:2010]:
            assert_exact_f16(engine.search(query, 10, filters), query, allowed)
        engine.remove([1])
    with Engine.open(tmp_path, index_type="Flat") as engine:  # another type: rebuilt, row files gone
        assert engine.stats()["count"] == 1999 and not (tmp_path / ROWS_FILE).exists()


@pytest.mark.parametrize(
    "index_type, message",
    [("ondisk:HNSW32", "is not an IVF index"), ("ondisk:Bogus", "FAISS cannot build it")],
)
def test_unsupported_ondisk_types_are_refused(tmp_path, index_type, message):
    with pytest.raises(IndexConfigError, match=rf"index type {index_type!r}.*{message}.*ondisk:IVF1024,PQ64"):
        Engine.open(tmp_path, model=STAMP, index_type=index_type)
