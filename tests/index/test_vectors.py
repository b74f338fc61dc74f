"""The FAISS side: automatic index types, recall of approximate types, training, writing, the GPU guard."""

import json

import faiss
import numpy as np
import pytest

from cbmir.index import Engine, Filters, IndexConfigError, IndexPolicy, automatic_type
from cbmir.index import vectors as vectors_module
from tests.index import STAMP, assert_exact, index_ids, make_entries, passes, recall, unit_vectors

DIMENSION = 32
SMALL = IndexPolicy(hnsw_from=1000, ivf_from=3000, nprobe=4)  # 4 of 64 lists at 4000 vectors


@pytest.mark.parametrize(
    "count, expected",
    [(0, "Flat"), (199_999, "Flat"), (200_000, "HNSW32"), (999_999, "HNSW32"), (1_000_000, "IVF2048,Flat"),
     (1_999_999, "IVF4096,Flat"), (2_000_000, "ondisk:IVF256,PQ64"), (4_000_000, "ondisk:IVF512,PQ64"),
     (10_000_000, "ondisk:IVF1024,PQ64"), (100_000_000, "ondisk:IVF2048,PQ64")],
)  # fmt: skip
def test_the_default_thresholds(count, expected):
    assert automatic_type(count, IndexPolicy()) == expected


def test_automatic_ivf_lists_can_always_be_trained():
    for count in (3000, 10_000, 10**6, 2 * 10**6, 10**8):
        chosen = automatic_type(count, SMALL)
        lists = int(chosen.split("IVF")[1].split(",")[0])
        centroids = max(lists, 256) if chosen.startswith("ondisk:") else lists  # PQ64 trains 256 codewords
        assert lists & (lists - 1) == 0 and count >= vectors_module.TRAIN_PER_CENTROID * centroids


@pytest.fixture(scope="module")
def clustered():
    """4,000 archive vectors around 40 centres and 50 held-out queries from the same distribution."""
    vectors = unit_vectors(4050, DIMENSION, seed=3, clusters=40)
    return make_entries(vectors[:4000], seed=3), vectors[4000:]


@pytest.mark.parametrize("count, expected", [(800, "Flat"), (2000, "HNSW32"), (4000, "IVF64,Flat")])
def test_the_type_follows_the_size_and_approximate_types_keep_recall(tmp_path, clustered, count, expected):
    entries, queries = clustered
    with Engine.open(tmp_path, model=STAMP, policy=SMALL) as engine:
        ids = np.concatenate([engine.add(entries[start : start + 400]) for start in range(0, count, 400)])
        assert engine.stats()["index_type"] == "Flat"  # until the next write
        engine.flush()
        assert engine.stats()["index_type"] == expected
        by_id = dict(zip(ids.tolist(), entries[:count], strict=True))
        vectors = {i: entry.embedding for i, entry in by_id.items()}
        recalls = [recall(engine.search(query, 10), query, vectors, 10) for query in queries]
        assert np.mean(recalls) >= 0.9 if expected != "Flat" else min(recalls) == 1.0
        filters = Filters(dataset="irma")
        allowed = {i: v for i, v in vectors.items() if passes(by_id[i], filters)}
        for query in queries[:5]:
            assert_exact(engine.search(query, 10, filters), query, allowed, 10)
    with Engine.open(tmp_path, policy=SMALL) as engine:
        assert engine.stats()["index_type"] == expected and index_ids(engine) == set(vectors)


@pytest.mark.parametrize("index_type", ["HNSW32", "IVF64,Flat"])
def test_large_filtered_sets_use_the_selector_with_a_wider_search(tmp_path, clustered, index_type):
    entries, queries = clustered
    policy = IndexPolicy(exact_filter_limit=100, nprobe=4)
    with Engine.open(tmp_path, model=STAMP, index_type=index_type, policy=policy) as engine:
        ids = engine.add(entries)
        engine.flush()
        by_id = dict(zip(ids.tolist(), entries, strict=True))
        filters = Filters(anatomy="9")
        allowed = {i: entry.embedding for i, entry in by_id.items() if passes(entry, filters)}
        assert len(allowed) > policy.exact_filter_limit
        recalls = []
        for query in queries:
            hits = engine.search(query, 10, filters)
            assert len(hits) == 10 and all(hit.id in allowed for hit in hits)
            recalls.append(recall(hits, query, allowed, 10))
        assert np.mean(recalls) >= 0.9


def test_an_ivf_type_waits_for_enough_vectors_to_train(tmp_path):
    vectors = unit_vectors(1200, DIMENSION, seed=4)
    entries = make_entries(vectors, seed=4)
    with Engine.open(tmp_path, model=STAMP, index_type="IVF16,Flat") as engine:
        engine.add(entries[:500])  # 16 lists need 16 x 39 = 624 training vectors
        engine.flush()
        assert engine.stats()["index_type"] == "Flat"
        engine.add(entries[500:])
        engine.flush()
        assert engine.stats()["index_type"] == "IVF16,Flat"
        assert isinstance(engine._vectors.index, faiss.IndexIVFFlat) and engine._vectors.index.is_trained
    with Engine.open(tmp_path, index_type="auto") as engine:
        assert engine.stats()["index_type"] == "Flat" and index_ids(engine) == set(range(1, 1201))


@pytest.mark.parametrize(
    "index_type, message",
    [("Bogus", "could not parse index string Bogus"), ("IVF16,PQ4", "compresses or transforms"),
     ("PCA16,Flat", "compresses or transforms"), ("HNSW32,SQ8", "compresses or transforms")],
)  # fmt: skip
def test_unsupported_index_types_are_refused_before_anything_is_stored(tmp_path, index_type, message):
    [entry] = make_entries(unit_vectors(1, DIMENSION, seed=5), seed=5)
    with pytest.raises(IndexConfigError, match=rf"index type {index_type!r}.*{message}.*use Flat, HNSW\{{M\}}"):
        Engine.open(tmp_path, model=STAMP, index_type=index_type)  # the model gives the dimension: refused at open
    with Engine.open(tmp_path, index_type="Flat") as engine:
        assert engine.stats()["count"] == 0
    with Engine.open(tmp_path, model=STAMP, index_type="Flat") as engine:
        engine.add([entry])
    with pytest.raises(IndexConfigError, match=rf"index type {index_type!r}"):
        Engine.open(tmp_path, index_type=index_type)
    with Engine.open(tmp_path) as engine:
        assert engine.stats()["index_type"] == "Flat" and engine.stats()["count"] == 1


def test_the_index_is_written_every_so_many_vectors_atomically_with_its_manifest(tmp_path):
    entries = make_entries(unit_vectors(700, DIMENSION, seed=6), seed=6)
    engine = Engine.open(tmp_path, model=STAMP, policy=IndexPolicy(write_every=300))
    engine.add(entries[:200])  # below write_every: the file written at open (empty) is not rewritten
    assert json.loads((tmp_path / "vectors.json").read_text())["count"] == 0
    engine.add(entries[200:400])
    manifest = json.loads((tmp_path / "vectors.json").read_text())
    assert manifest["count"] == 400 and manifest["last_id"] == 400 and manifest["index_type"] == "Flat"
    assert manifest["dimension"] == DIMENSION and manifest["size"] == (tmp_path / "vectors.faiss").stat().st_size
    assert manifest["stamp"] == engine.stats()["stamp_digest"]
    engine.add(entries[400:])
    assert engine.stats()["unsaved_vectors"] == 0
    assert json.loads((tmp_path / "vectors.json").read_text())["count"] == 700
    engine.close()
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        ".lock",
        "store.sqlite",
        "vectors.faiss",
        "vectors.json",
    ]


def test_without_a_gpu_function_faiss_counts_no_gpu(monkeypatch):
    monkeypatch.delattr(faiss, "get_num_gpus", raising=False)
    assert vectors_module._gpu_count() == 0


def test_a_gpu_replica_serves_unfiltered_searches_only(tmp_path, monkeypatch):
    """No GPU here: a CPU clone stands in for the replica to check what is routed to it and when it is remade."""
    made = []

    def replica(index):
        made.append(faiss.clone_index(index))
        return made[-1]

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", replica, raising=False)
    vectors = unit_vectors(400, DIMENSION, seed=8)
    entries = make_entries(vectors, seed=8)
    with Engine.open(tmp_path, model=STAMP) as engine:
        engine.add(entries[:300])
        engine.search(vectors[0], 5, Filters(dataset="irma"))
        assert made == []
        assert engine.search(vectors[0], 5)[0].id == 1 and len(made) == 1
        engine.search(vectors[1], 5)
        assert len(made) == 1
        engine.add(entries[300:])
        assert engine.search(vectors[350], 5)[0].id == 351 and len(made) == 2 and made[-1].ntotal == 400


def test_where_a_gpu_cannot_take_the_index_the_cpu_searches(tmp_path, monkeypatch):
    def refuse(index):
        raise RuntimeError(
            "Error in faiss::gpu::ToGpuCloner at cloner.cpp:1: this index type is not implemented on GPU"
        )

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", refuse, raising=False)
    vectors = unit_vectors(100, DIMENSION, seed=9)
    with Engine.open(tmp_path, model=STAMP, index_type="HNSW32") as engine:
        engine.add(make_entries(vectors, seed=9))
        assert engine.search(vectors[10], 3)[0].id == 11


def test_a_failed_periodic_write_does_not_fail_the_add(tmp_path, monkeypatch, caplog):
    entries = make_entries(unit_vectors(300, DIMENSION, seed=10), seed=10)
    engine = Engine.open(tmp_path, model=STAMP, policy=IndexPolicy(write_every=100))
    real_write = faiss.write_index

    def disk_full(index, path):
        raise RuntimeError("Error in faiss::FileIOWriter at io.cpp:1: write error: No space left on device")

    monkeypatch.setattr(faiss, "write_index", disk_full)
    assert len(engine.add(entries[:200])) == 200
    assert "could not write" in caplog.text and "No space left" in caplog.text
    assert len(engine.search(entries[150].embedding, 3)) == 3
    monkeypatch.setattr(faiss, "write_index", real_write)
    engine.add(entries[200:])
    engine.close()
    assert json.loads((tmp_path / "vectors.json").read_text())["count"] == 300
