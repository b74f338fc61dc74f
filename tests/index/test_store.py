"""The store, on SQLite and on PostgreSQL alike (every test that takes `store` or `filled` runs on both):
fields, filters, streaming, all-or-nothing adds, duplicates, deletion, failures, the schema version."""

import dataclasses
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from cbmir.index import DuplicateImageError, EntryError, Filters, IndexConfigError, QueryError, UnknownImageError
from cbmir.index.store import Store, filter_sql
from tests.index import FILTERS, content_hash, make_entries, passes, unit_vectors

DIMENSION = 16


@pytest.fixture
def store(store_location):
    store = Store(store_location)
    yield store
    store.close()


@pytest.fixture
def filled(store):
    entries = make_entries(unit_vectors(600, DIMENSION, seed=1), seed=1)
    ids = store.add(entries, np.stack([entry.embedding for entry in entries]))
    return store, dict(zip(ids.tolist(), entries, strict=True))


def add(store, entries):
    return store.add(entries, np.stack([entry.embedding for entry in entries]))


def test_fields_come_back_as_stored(store):
    [entry] = make_entries(unit_vectors(1, DIMENSION, seed=2), seed=2)
    entry = dataclasses.replace(entry, true_code=" 1121-127-700-500 ", predicted="1121-12*-9**-***", labels=("Mass",))
    [image_id] = add(store, [entry])
    [row] = store.get([image_id])
    assert row.id == image_id and row.location == entry.location and row.dataset == entry.dataset
    assert (row.width, row.height) == (entry.width, entry.height)
    assert row.true_code == "1121-127-700-500" and row.predicted == "1121-12*-9**-***"
    assert row.code == row.true_code
    assert row.labels == ("Mass",) and row.extra == {"source": "img"}
    assert row.confidences == pytest.approx(dict(entry.confidences))
    assert row.confidence == pytest.approx(entry.confidence)
    [vector] = store.embeddings([image_id])
    assert vector.dtype == np.float32 and np.array_equal(vector, entry.embedding)
    assert row.content_hash == entry.content_hash and row.added_at.endswith("+00:00")


def test_get_names_an_unknown_id(filled):
    store, _ = filled
    with pytest.raises(UnknownImageError, match="no image with id 9999"):
        store.get([1, 9999])
    with pytest.raises(UnknownImageError, match="no image with id 9998"):
        store.embeddings([9998, 2])


def test_get_keeps_the_order_of_the_ids(filled):
    store, entries = filled
    ids = [17, 3, 250, 3]
    assert [row.location for row in store.get(ids)] == [entries[i].location for i in ids]
    expected = np.stack([entries[i].embedding for i in ids])
    np.testing.assert_allclose(
        store.embeddings(ids), expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-6
    )


@pytest.mark.parametrize("filters", FILTERS, ids=str)
def test_query_matches_the_reference_meaning_of_filters(filled, filters):
    store, entries = filled
    expected = [i for i, entry in entries.items() if passes(entry, filters)]
    assert store.query(filters).tolist() == expected


def test_query_without_filters_lists_every_id(filled):
    store, entries = filled
    ids = store.query(Filters())
    assert ids.dtype == np.int64 and ids.tolist() == sorted(entries)


@pytest.mark.parametrize(
    "column, filters",
    [("images_best_a", Filters(anatomy="9")), ("images_true_b", Filters(biology="7", on="true")),
     ("images_pred_t", Filters(technical="1121", on="predicted")), ("image_labels", Filters(label="Mass"))],
)  # fmt: skip
def test_filters_are_answered_from_an_index(store, column, filters):
    database = store.database
    condition, params = filter_sql(filters, database)
    if database.kind == "sqlite":
        rows = database.execute(f"EXPLAIN QUERY PLAN SELECT id FROM images WHERE {condition}", params)
        plan = " ".join(row[3] for row in rows)
        assert column in plan and "SCAN images" not in plan
    else:  # can an index answer it (a LIKE prefix needs the "C" collation)? The table is too small to prefer one.
        database.execute("SET enable_seqscan = off")
        plan = " ".join(row[0] for row in database.execute(f"EXPLAIN SELECT id FROM images WHERE {condition}", params))
        assert column in plan and "Seq Scan on images" not in plan


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Filters(anatomy="9x9x"), r"filter anatomy='9x9x'.*only 3"),
        (lambda: Filters(biology=""), r"filter biology='': empty"),
        (lambda: Filters(technical="1-2"), r"filter technical='1-2'.*position 2 is '-'"),
        (lambda: Filters(directional=7), r"filter directional=7"),  # type: ignore[arg-type]  # not a str, on purpose
        (lambda: Filters(code="1121-127-700"), r"filter code='1121-127-700'"),
        (lambda: Filters(on="both"), r"filter on='both': expected one of best, true, predicted"),  # type: ignore[arg-type]  # on purpose
        (lambda: Filters(dataset=""), r"filter dataset=''"),
        (lambda: Filters(label="  "), r"filter label='  '"),
    ],
)
def test_invalid_filters_name_the_field(make, message):
    with pytest.raises(QueryError, match=message):
        make()


def test_iter_embeddings_streams_batches_in_id_order(filled):
    store, entries = filled
    batches = list(store.iter_embeddings(batch=64))
    assert [len(ids) for ids, _ in batches] == [64] * 9 + [24]
    ids = np.concatenate([ids for ids, _ in batches])
    assert ids.tolist() == sorted(entries)
    vectors = np.concatenate([vectors for _, vectors in batches])
    assert vectors.dtype == np.float32 and np.array_equal(vectors[10], entries[ids[10]].embedding)
    assert np.concatenate([ids for ids, _ in store.iter_embeddings(after_id=590)]).tolist() == list(range(591, 601))
    chosen = [599, 5, 77, 5]
    streamed = list(store.iter_embeddings(ids=chosen, batch=2))
    assert [ids.tolist() for ids, _ in streamed] == [[5, 77], [599]]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(content_hash="abc"), "content_hash 'abc' is not a sha256"),
        (dict(width=0), "width must be a positive integer"),
        (dict(height=2.5), "height must be a positive integer"),
        (dict(dataset=""), "dataset must be a non-empty text"),
        (dict(location=""), "location must be a non-empty text"),
        (dict(true_code="1121-12x-7!0-500"), r"true_code: invalid IRMA code '1121-12x-7!0-500'"),
        (dict(predicted=5), "predicted must be text or None"),
        (dict(confidence=float("nan")), "confidence must be a finite number"),
        (dict(confidences={"technical": float("inf")}), "confidences must map names to finite numbers"),
        (dict(labels="Mass"), "labels must be a tuple of non-empty texts"),
        (dict(extra={"when": object()}), "extra cannot be stored as JSON"),
    ],
)
def test_a_bad_entry_is_named_and_nothing_is_added(store, change, message):
    entries = make_entries(unit_vectors(5, DIMENSION, seed=3), seed=3)
    entries[3] = dataclasses.replace(entries[3], **change)
    with pytest.raises(EntryError, match=rf"entry 3 \(.*\): {message}"):
        add(store, entries)
    assert store.count() == 0 and store.meta("dimension") is None


def test_duplicate_hashes_are_refused_whole(filled):
    store, entries = filled
    new = make_entries(unit_vectors(4, DIMENSION, seed=4), seed=4, prefix="new")
    known = dataclasses.replace(new[2], content_hash=entries[7].content_hash.upper())
    with pytest.raises(
        DuplicateImageError, match=rf"entry 2 \('/archive/new/2.png'\).*already stored \(from '{entries[7].location}'\)"
    ):
        add(store, [new[0], new[1], known, new[3]])
    twice = dataclasses.replace(new[3], content_hash=new[0].content_hash)
    with pytest.raises(DuplicateImageError, match=r"entry 3 .* same content hash as entry 0"):
        add(store, [new[0], new[1], new[2], twice])
    assert store.count() == len(entries)
    assert store.hashes_present(entry.content_hash for entry in new) == set()


def test_hashes_present_ignores_case(filled):
    store, entries = filled
    known = entries[5].content_hash
    assert store.hashes_present([known.upper(), content_hash("never")]) == {known}


def test_remove_deletes_the_rows_and_in_sqlite_their_bytes(store, tmp_path):
    entries = make_entries(unit_vectors(50, DIMENSION, seed=5), seed=5, prefix="secret-study-4711")
    ids = add(store, entries)
    store.remove(ids[:10].tolist())
    assert store.count() == 40 and store.query(Filters()).tolist() == ids[10:].tolist()
    with pytest.raises(UnknownImageError, match="no image with id 1"):
        store.get([1])
    with pytest.raises(QueryError, match="no image with id 3"):
        store.remove([3, 20])
    assert store.count() == 40
    assert store.hashes_present(entry.content_hash for entry in entries) == {e.content_hash for e in entries[10:]}
    if store.database.kind != "sqlite":
        return  # PostgreSQL keeps deleted rows' bytes in its files until VACUUM reuses the space (README)
    raw = b"".join(path.read_bytes() for path in tmp_path.glob("store.sqlite*"))
    for entry in entries[:10]:
        assert entry.location.encode() not in raw and entry.content_hash.encode() not in raw
    assert entries[10].location.encode() in raw


def test_failures_keep_the_latest_reason_and_clear_when_indexed(store):
    store.record_failures([("/a.dcm", "not an image"), ("/b.png", "truncated")])
    store.record_failures([("/a.dcm", "unsupported transfer syntax")])
    assert sorted((f["location"], f["reason"]) for f in store.failures()) == [
        ("/a.dcm", "unsupported transfer syntax"),
        ("/b.png", "truncated"),
    ]
    [entry] = make_entries(unit_vectors(1, DIMENSION, seed=6), seed=6)
    add(store, [dataclasses.replace(entry, location="/b.png")])
    assert [f["location"] for f in store.failures()] == ["/a.dcm"]


def test_the_store_records_its_schema_and_sqlite_is_in_wal_mode(store, store_location):
    assert store.meta("schema_version") == 1
    if isinstance(store_location, Path):
        other = sqlite3.connect(store_location)
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        other.close()


def test_a_store_from_a_newer_cbmir_is_refused(store_location):
    newer = Store(store_location)
    newer.set_meta("schema_version", 99)
    newer.close()
    with pytest.raises(IndexConfigError, match="schema version 99; this cbmir reads up to 1"):
        Store(store_location)


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    (tmp_path / "junk.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(IndexConfigError, match="junk.sqlite cannot be opened as a cbmir store"):
        Store(tmp_path / "junk.sqlite")
