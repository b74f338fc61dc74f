"""The service with its index's store in PostgreSQL (``CBMIR_DB=postgresql://...``, the vectors in
``CBMIR_VECTORS``): it answers searches, within its refresh interval no longer returns an image another
process removed from the shared store, and outlives a restart of the database server."""

from __future__ import annotations

import time

import pytest

from cbmir.access import AuditTrail
from cbmir.embed import Embedder
from cbmir.index import Engine
from cbmir.index.store import Store
from cbmir.search import Retrieval
from cbmir.service import ServiceSettings
from cbmir.settings import load_settings
from indexer.pipeline import index_records, read_archive
from tests.postgres import PASSWORD
from tests.service.conftest import TOKEN, start
from tests.service.test_api import phantom, search


@pytest.fixture
def served(index_parts, postgres_url, tmp_path, monkeypatch):
    archive, model, _ = index_parts
    name, records = read_archive(archive)
    with Retrieval.open(postgres_url, Embedder.load(model), vectors=tmp_path / "indexer") as retrieval:
        index_records(records, retrieval, dataset=name, workers=0, progress=False)
    monkeypatch.setenv("CBMIR_DB", postgres_url)
    monkeypatch.setenv("CBMIR_VECTORS", str(tmp_path / "service"))
    settings = load_settings(ServiceSettings, model=model, token=TOKEN)
    yield from start(settings, archive)


def test_the_service_on_a_postgresql_store_answers_and_follows_other_processes_changes(served, postgres_url, tmp_path):
    assert served.settings.db == postgres_url and (tmp_path / "service" / "vectors.faiss").exists()
    with served.client() as client:
        assert client.get("/ready").json()["images"] == len(list((served.archive / "images").glob("*.png")))
        query = phantom(served, 3)
        response = search(client, query, k="3")
        assert response.status_code == 200, response.text
        assert response.json()["neighbours"][0]["name"] == query.name
        # another process (here: another engine with its own vectors) removes that image from the shared store
        with Engine.open(postgres_url, vectors=tmp_path / "indexer") as other:
            [row] = [row for row in other.get(other.query()) if row.location.endswith(query.name)]
            other.remove([row.id])
        time.sleep(2.1)  # the service's refresh interval
        names = [hit["name"] for hit in search(client, query, k="3").json()["neighbours"]]
        assert query.name not in names and len(names) == 3


def test_the_service_answers_503_while_postgresql_is_down_and_reconnects_after(served, postgres_server):
    with served.client() as client:
        query = phantom(served, 2)
        assert search(client, query, k="3").status_code == 200
        with postgres_server.down():
            response = search(client, query, k="3")
            assert response.status_code == 503, response.text
            # the audit record cannot be written either, so the answer says that (the log names the database)
            assert "cannot be written" in response.json()["error"] and PASSWORD not in response.text
        response = search(client, query, k="3")  # the server is back: the next request reconnects
        assert response.status_code == 200, response.text
        assert response.json()["neighbours"][0]["name"] == query.name
    store = Store(served.settings.db)  # the audit trail, kept in the same database, lost nothing and was not broken
    try:
        verification = AuditTrail(store).verify()
        assert verification.problems == [] and verification.records >= 2
    finally:
        store.close()
