"""The engine: exact search with and without filters, removal, reopening, crash consistency, model checks."""

import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cbmir.index import (
    MAX_K,
    DuplicateImageError,
    Engine,
    EntryError,
    Filters,
    ImageRow,
    IndexConfigError,
    IndexMismatchError,
    ModelStamp,
    QueryError,
    UnknownImageError,
)
from cbmir.index.store import Store
from tests.index import (
    FILTERS,
    OTHER_STAMP,
    STAMP,
    TEST_NET,
    assert_exact,
    index_ids,
    make_entries,
    passes,
    recall,
    unit_vectors,
)

DIMENSION, COUNT = 32, 3000
REPO = Path(__file__).resolve().parents[2]
TYPES = ("Flat", "HNSW32", "IVF16,Flat")


def candidates(entries: dict, vectors: dict, filters: Filters | None) -> dict:
    return {i: vectors[i] for i, entry in entries.items() if passes(entry, filters)}


@pytest.fixture(scope="module", params=TYPES)
def archive(request, tmp_path_factory):
    """An engine of each index type over the same seeded archive, flushed (so IVF is trained)."""
    folder = tmp_path_factory.mktemp("archive")
    entries = make_entries(unit_vectors(COUNT, DIMENSION, seed=11), seed=11)
    engine = Engine.open(folder, model=STAMP, index_type=request.param)
    ids = np.concatenate([engine.add(entries[start : start + 500]) for start in range(0, COUNT, 500)])
    engine.flush()
    assert engine.stats()["index_type"] == request.param
    by_id = dict(zip(ids.tolist(), entries, strict=True))
    yield engine, by_id, {i: entry.embedding for i, entry in by_id.items()}
    engine.close()


def fresh(folder, count=800, seed=21, **options):
    """A small engine of its own, for tests that change it."""
    entries = make_entries(unit_vectors(count, DIMENSION, seed=seed), seed=seed)
    engine = Engine.open(folder, model=STAMP, **options)
    ids = engine.add(entries)
    return engine, dict(zip(ids.tolist(), entries, strict=True))


def vectors_of(entries: dict) -> dict:
    return {i: entry.embedding for i, entry in entries.items()}


def queries(count: int, seed: int) -> np.ndarray:
    return unit_vectors(count, DIMENSION, seed=seed)


@pytest.mark.parametrize("k", [1, 10, 400])
def test_unfiltered_search_is_exact_on_flat_and_close_on_approximate_types(archive, k):
    engine, _, vectors = archive
    for query in queries(5, seed=12):
        hits = engine.search(query, k)
        if engine.stats()["index_type"] == "Flat":
            assert_exact(hits, query, vectors, k)
        else:
            assert recall(hits, query, vectors, k) >= 0.9


@pytest.mark.parametrize("filters", FILTERS, ids=str)
def test_filtered_search_equals_brute_force_on_every_index_type(archive, filters):
    engine, entries, vectors = archive
    allowed = candidates(entries, vectors, filters)
    for query in queries(3, seed=13):
        for k in (1, 10, 120):  # 120 is more than some filters match
            hits = engine.search(query, k, filters)
            assert_exact(hits, query, allowed, k)
            assert all(passes(entries[hit.id], filters) for hit in hits)


def test_hits_carry_what_a_result_list_shows(archive):
    engine, entries, vectors = archive
    [hit] = engine.search(vectors[42], 1, Filters(dataset=entries[42].dataset))
    entry = entries[42]
    assert hit.id == 42 and hit.score == pytest.approx(1.0, abs=1e-5)
    assert (hit.location, hit.dataset, hit.width, hit.height) == (
        entry.location,
        entry.dataset,
        entry.width,
        entry.height,
    )
    assert (hit.predicted, hit.labels, hit.confidence) == (
        entry.predicted,
        entry.labels,
        pytest.approx(entry.confidence),
    )


def test_fewer_matches_than_k_give_fewer_hits(archive):
    engine, entries, vectors = archive
    assert engine.search(vectors[1], MAX_K, Filters(anatomy="z")) == []
    few = Filters(code="112d-121-a10-33b", on="true", label="Mass")
    hits = engine.search(vectors[1], MAX_K, few)
    assert 0 < len(hits) == len(candidates(entries, vectors, few)) < 100
    assert all(hit.id > 0 and -1.0 <= hit.score <= 1.0 for hit in hits)


@pytest.mark.parametrize("k", [0, -1, MAX_K + 1, 2.5, True, "10"])
def test_an_absurd_k_is_refused(archive, k):
    engine, _, vectors = archive
    with pytest.raises(QueryError, match=rf"k={k!r}: the number of results must be an integer from 1 to {MAX_K}"):
        engine.search(vectors[1], k)


def test_search_by_id_puts_the_image_first_unless_excluded(archive):
    engine, entries, _ = archive
    hits = engine.search_by_id(7, 5)
    assert hits[0].id == 7 and hits[0].score == pytest.approx(1.0, abs=1e-5) and len(hits) == 5
    others = engine.search_by_id(7, 5, include_self=False)
    assert 7 not in [hit.id for hit in others] and len(others) == 5
    assert [hit.id for hit in others[:4]] == [hit.id for hit in hits[1:]]
    elsewhere = Filters(dataset="irma" if entries[7].dataset == "chest" else "chest")
    assert 7 not in [hit.id for hit in engine.search_by_id(7, 5, elsewhere)]
    with pytest.raises(QueryError, match="no image with id 99999"):
        engine.search_by_id(99999, 5)


def test_search_by_id_puts_the_image_first_among_identical_duplicates(tmp_path):
    engine, _ = fresh(tmp_path, count=50)
    copies = make_entries(np.repeat(unit_vectors(1, DIMENSION, seed=3), 12, axis=0), seed=3, prefix="copy")
    ids = engine.add(copies)
    for image_id in (ids[0], ids[-1]):
        hits = engine.search_by_id(int(image_id), 5)
        assert hits[0].id == image_id and len(hits) == 5 and {hit.id for hit in hits} <= set(ids.tolist())
    engine.close()


@pytest.mark.parametrize("index_type", TYPES)
def test_results_are_the_same_after_close_and_reopen(tmp_path, index_type):
    engine, entries = fresh(tmp_path, index_type=index_type)
    engine.close()
    with Engine.open(tmp_path) as engine:
        assert engine.stats()["index_type"] == index_type
        assert index_ids(engine) == set(entries)
        for filters in (Filters(anatomy="9"), Filters(label="Mass", dataset="irma")):
            for query in queries(3, seed=14):
                assert_exact(
                    engine.search(query, 10, filters), query, candidates(entries, vectors_of(entries), filters), 10
                )


@pytest.mark.parametrize("index_type", TYPES)
def test_removed_images_are_gone_from_results_and_disk(tmp_path, index_type):
    engine, entries = fresh(tmp_path, index_type=index_type)
    engine.flush()
    gone = [5, 6, 300, 799]
    stored = [vector.tobytes() for vector in engine.embeddings(gone)]
    engine.remove(gone)
    on_disk = (tmp_path / "vectors.faiss").read_bytes()  # written by remove itself
    assert not any(vector in on_disk for vector in stored)
    assert engine.embeddings([7])[0].tobytes() in on_disk
    kept = {i: entry for i, entry in entries.items() if i not in gone}
    vectors = vectors_of(kept)
    for i in gone:
        hits = engine.search(entries[i].embedding, 50, Filters(dataset=entries[i].dataset))
        assert i not in [hit.id for hit in hits]
        assert_exact(hits, entries[i].embedding, candidates(kept, vectors, Filters(dataset=entries[i].dataset)), 50)
    with pytest.raises(UnknownImageError, match="no image with id 5"):
        engine.get([5])
    with pytest.raises(UnknownImageError, match="no image with id 6"):
        engine.remove([6])
    engine.close()
    raw = b"".join(path.read_bytes() for path in tmp_path.glob("store.sqlite*"))
    assert not any(entries[i].content_hash.encode() in raw for i in gone)
    with Engine.open(tmp_path) as engine:
        assert index_ids(engine) == set(kept) and engine.stats()["count"] == len(kept)
        assert 300 not in [hit.id for hit in engine.search(entries[300].embedding, len(kept), Filters(anatomy="9"))]


def test_an_add_with_a_bad_entry_in_the_middle_adds_nothing(tmp_path):
    engine, entries = fresh(tmp_path, count=100)
    batch = make_entries(unit_vectors(6, DIMENSION, seed=31), seed=31, prefix="batch")
    wrong = batch.copy()
    wrong[3] = dataclasses.replace(wrong[3], embedding=np.ones(DIMENSION + 1, np.float32))
    with pytest.raises(
        IndexMismatchError,
        match=r"entry 3 \('/archive/batch/3.png'\): the embedding has 33 values; "
        r"this index holds 32-d vectors of model test-net",
    ):
        engine.add(wrong)
    for change, message in [
        (np.full(DIMENSION, np.nan), "NaN or infinite"),
        (np.zeros(DIMENSION), "all zeros"),
        (np.ones((2, DIMENSION)), r"one vector, got shape \(2, 32\)"),
        ("abc", "not an array of numbers"),
    ]:
        bad = batch.copy()
        bad[4] = dataclasses.replace(bad[4], embedding=change)  # type: ignore[arg-type]  # bad on purpose
        with pytest.raises(EntryError, match=rf"entry 4 .*{message}"):
            engine.add(bad)
    known = batch.copy()
    known[5] = dataclasses.replace(known[5], content_hash=entries[1].content_hash)
    with pytest.raises(DuplicateImageError, match="entry 5 .*already stored"):
        engine.add(known)
    assert engine.stats()["count"] == 100 and index_ids(engine) == set(entries)
    assert engine.hashes_present(entry.content_hash for entry in batch) == set()
    ids = engine.add(batch)
    assert ids.tolist() == list(range(101, 107))
    engine.close()


def test_embeddings_are_normalised_before_storing(tmp_path):
    engine, _ = fresh(tmp_path, count=10)
    [entry] = make_entries(unit_vectors(1, DIMENSION, seed=41), seed=41, prefix="scaled")
    [image_id] = engine.add([dataclasses.replace(entry, embedding=entry.embedding.astype(np.float64) * 7.5)])
    [vector] = engine.embeddings([image_id])
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-6)
    assert engine.search(entry.embedding * 3, 1)[0].score == pytest.approx(1.0, abs=1e-5)
    engine.close()


def test_another_model_or_dimension_is_refused(tmp_path):
    engine, _ = fresh(tmp_path, count=10)
    with pytest.raises(
        IndexMismatchError, match="this index was built with model test-net .* / 32-d; the query vector has 64 values"
    ):
        engine.search(np.ones(64), 3)
    engine.close()
    with pytest.raises(
        IndexMismatchError,
        match=r"built with model test-net 2024-01-01.* / 32-d; you are using other-net [^/]* / 32-d\. An index holds",
    ):
        Engine.open(tmp_path, model=OTHER_STAMP)
    with pytest.raises(IndexMismatchError, match=r"/ 32-d; you are using .* / 1280-d"):
        Engine.open(tmp_path, model=ModelStamp(TEST_NET, 1280))
    with Engine.open(tmp_path, model=STAMP) as engine:
        assert engine.stats()["count"] == 10


def test_adding_needs_a_recorded_model(tmp_path):
    [entry] = make_entries(unit_vectors(1, DIMENSION, seed=51), seed=51)
    with Engine.open(tmp_path) as engine:
        with pytest.raises(IndexConfigError, match="no model recorded: open it with model= before adding"):
            engine.add([entry])
        assert engine.search(entry.embedding, 5) == []
    with Engine.open(tmp_path, model=STAMP) as engine:
        engine.add([entry])
    with Engine.open(tmp_path) as engine:
        assert engine.model == STAMP and engine.dimension == DIMENSION


def test_get_returns_typed_rows_in_the_order_asked(archive):
    engine, entries, vectors = archive
    rows = engine.get([3, 1])
    assert [(row.id, row.location, row.true_code) for row in rows] == [
        (i, entries[i].location, entries[i].true_code) for i in (3, 1)
    ]
    assert all(isinstance(row, ImageRow) and isinstance(row.labels, tuple) for row in rows)
    np.testing.assert_allclose(engine.embeddings([3, 1]), np.stack([vectors[3], vectors[1]]), atol=1e-6)
    with pytest.raises(QueryError, match="image id '1' is not an integer"):
        engine.get(["1"])
    with pytest.raises(UnknownImageError, match="no image with id 999999"):
        engine.embeddings([1, 999999])


def test_one_process_at_a_time_opens_a_folder(tmp_path):
    with (
        Engine.open(tmp_path, model=STAMP),
        pytest.raises(IndexConfigError, match=rf"is already open \(process {os.getpid()}\)"),
    ):
        Engine.open(tmp_path)
    Engine.open(tmp_path).close()


def test_stats_describe_the_index(tmp_path):
    engine, entries = fresh(tmp_path, count=200)
    engine.record_failures([("/archive/broken.dcm", "not a DICOM file")])
    stats = engine.stats()
    assert stats["count"] == 200 and stats["dimension"] == DIMENSION and stats["index_type"] == "Flat"
    assert stats["model"].startswith("test-net 2024-01-01T00:00:00+00:00 (")
    assert stats["datasets"] == {name: sum(e.dataset == name for e in entries.values()) for name in ("chest", "irma")}
    assert stats["failures"] == 1 and stats["unsaved_vectors"] == 200
    engine.close()
    with Engine.open(tmp_path) as engine:
        stats = engine.stats()
        assert stats["unsaved_vectors"] == 0 and stats["files"]["vectors.faiss"] > 200 * DIMENSION * 4
        assert engine.failures()[0]["reason"] == "not a DICOM file"


def test_threads_can_share_an_engine(tmp_path):
    engine, _ = fresh(tmp_path, count=300)
    more = make_entries(unit_vectors(300, DIMENSION, seed=61), seed=61, prefix="more")
    errors = []

    def search():
        try:
            for query in queries(30, seed=62):
                assert len(engine.search(query, 5, Filters(dataset="irma"))) == 5
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=search) for _ in range(3)]
    for thread in threads:
        thread.start()
    for start in range(0, 300, 30):
        engine.add(more[start : start + 30])
    for thread in threads:
        thread.join()
    assert errors == [] and engine.stats()["count"] == 600 and len(index_ids(engine)) == 600
    engine.close()


# -- crash consistency ----------------------------------------------------------------------------------------


def assert_consistent(folder: Path, query_seed: int = 71) -> None:
    with Engine.open(folder) as engine:
        ids = engine._store.query(Filters()).tolist()
        assert index_ids(engine) == set(ids)
        rows = engine.get(ids)
        vectors = dict(zip(ids, engine.embeddings(ids), strict=True))
        for query in queries(3, seed=query_seed):
            if engine.stats()["index_type"] == "Flat":
                assert_exact(engine.search(query, 10), query, vectors, 10)
            chest = {i: v for (i, v), row in zip(vectors.items(), rows, strict=True) if row.dataset == "chest"}
            assert_exact(engine.search(query, 10, Filters(dataset="chest")), query, chest, 10)
        manifest = json.loads((folder / "vectors.json").read_text())
        assert manifest["count"] == len(ids) and manifest["last_id"] >= max(ids, default=0)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda folder: (folder / "vectors.faiss").unlink(), "vectors.faiss is missing"),
        (lambda folder: _truncate(folder / "vectors.faiss"), "does not match its manifest"),
        (lambda folder: (folder / "vectors.faiss").write_bytes(b"garbage"), "does not match its manifest"),
        (lambda folder: _flip_bytes(folder / "vectors.faiss"), "does not match its manifest"),
        (lambda folder: (folder / "vectors.json").unlink(), "vectors.json is missing"),
        (lambda folder: (folder / "vectors.json").write_text("{not json"), "vectors.json cannot be read"),
        (lambda folder: _edit_manifest(folder, dimension=64), "its dimension is 64, wanted 32"),
        (lambda folder: _edit_manifest(folder, stamp="0" * 64), "its stamp is '0000"),
        (lambda folder: _edit_manifest(folder, count=5), "holds 1000 .* vectors, its manifest says otherwise"),
    ],
    ids=["deleted", "truncated", "garbage", "bytes-flipped", "no-manifest", "bad-manifest", "other-dimension",
         "other-model", "wrong-count"],
)  # fmt: skip
@pytest.mark.parametrize("index_type", ["Flat", "IVF16,Flat"])
def test_a_damaged_or_mismatched_index_file_is_rebuilt_from_the_store(tmp_path, caplog, damage, reason, index_type):
    engine, _ = fresh(tmp_path, count=1000, index_type=index_type)
    engine.close()
    damage(tmp_path)
    assert_consistent(tmp_path)
    assert any("rebuilding" in r.message and re.search(reason, r.message) for r in caplog.records), caplog.text


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _edit_manifest(folder: Path, **changes) -> None:
    manifest = json.loads((folder / "vectors.json").read_text())
    (folder / "vectors.json").write_text(json.dumps({**manifest, **changes}))


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = bytes(16)
    path.write_bytes(bytes(data))


def test_an_index_and_manifest_from_different_writes_are_rebuilt(tmp_path):
    engine, _ = fresh(tmp_path, count=300)
    engine.close()
    old = (tmp_path / "vectors.faiss").read_bytes()
    more = make_entries(unit_vectors(50, DIMENSION, seed=81), seed=81, prefix="more")
    with Engine.open(tmp_path) as engine:
        engine.add(more)
    (tmp_path / "vectors.faiss").write_bytes(old)  # a crash between the two renames of a write
    (tmp_path / ".vectors.abc123.tmp").write_bytes(b"half written")
    assert_consistent(tmp_path)
    assert not list(tmp_path.glob(".vectors.*.tmp"))


def test_rows_stored_after_the_last_write_are_caught_up(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cbmir.index.vectors")
    engine, _ = fresh(tmp_path, count=300)
    engine.close()
    store = Store(tmp_path / "store.sqlite")  # what a crash after the store's commit leaves behind
    more = make_entries(unit_vectors(40, DIMENSION, seed=91), seed=91, prefix="more")
    store.add(more, np.stack([entry.embedding for entry in more]))
    store.close()
    assert_consistent(tmp_path)
    assert "added 40 images stored after its last write" in caplog.text and "rebuilding" not in caplog.text


def test_rows_removed_after_the_last_write_leave_the_index(tmp_path, caplog):
    engine, _ = fresh(tmp_path, count=300)
    engine.close()
    store = Store(tmp_path / "store.sqlite")
    more = make_entries(unit_vectors(40, DIMENSION, seed=92), seed=92, prefix="more")
    store.add(more, np.stack([entry.embedding for entry in more]))
    store.remove([3, 4, 320])
    store.close()
    assert_consistent(tmp_path)
    assert "it holds 339 vectors, the store 337 images" in caplog.text  # 320 was never in the index


_ADDER = """
import sys
from cbmir.index import Engine, IndexPolicy
from tests.index import STAMP, make_entries, unit_vectors

engine = Engine.open(sys.argv[1], model=STAMP, policy=IndexPolicy(write_every=int(sys.argv[2])))
for batch in range(10_000):
    entries = make_entries(unit_vectors(50, 32, seed=batch), seed=batch, prefix=f"batch{batch}")
    engine.add(entries)
    if batch == 2:
        print("adding", flush=True)
"""


@pytest.mark.parametrize("write_every, seconds", [(10**9, 1.0), (120, 1.5), (40, 2.0)])
def test_a_process_killed_while_adding_leaves_a_consistent_index(tmp_path, write_every, seconds):
    process = subprocess.Popen(
        [sys.executable, "-c", _ADDER, str(tmp_path), str(write_every)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None  # stdout=PIPE
    try:
        assert process.stdout.readline().strip() == "adding"
        time.sleep(seconds)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert_consistent(tmp_path)


def test_filtered_searches_see_added_removed_and_recoded_images_at_once(tmp_path):
    """The ids passing a filter are cached between searches; every change must show in the next search."""
    engine, entries = fresh(tmp_path, count=200)
    with engine:
        leg = Filters(anatomy="9", on="true")
        query = queries(1, seed=5)[0]
        assert_exact(engine.search(query, 10, leg), query, candidates(entries, vectors_of(entries), leg), 10)
        [new] = make_entries(query[None], seed=99, prefix="new")
        new = dataclasses.replace(new, true_code="1121-120-913-700", labels=())
        [new_id] = engine.add([new]).tolist()
        assert engine.search(query, 1, leg)[0].id == new_id
        engine.set_true_code(new_id, "1121-120-500-700")
        assert new_id not in [hit.id for hit in engine.search(query, 10, leg)]
        engine.set_true_code(new_id, "1121-120-911-700")
        assert engine.search(query, 1, leg)[0].id == new_id
        engine.remove([new_id])
        assert new_id not in [hit.id for hit in engine.search(query, 10, leg)]
