"""Micro-batching in the real service: concurrent searches over HTTP are joined into fewer model runs, in
ONNX Runtime on the checkpoint's exported graph, and each client still gets the answer it gets alone."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest

from cbmir.checkpoint import load_checkpoint
from cbmir.export import export_graph
from cbmir.imaging.io import read_image
from cbmir.service import ServiceSettings
from tests.service.conftest import TOKEN, start
from tests.service.test_api import phantom, search

CLIENTS = 8


@pytest.fixture(scope="module")
def batching_service(index_parts, tmp_path_factory):
    """The shared index (built in torch) served in ONNX Runtime, waiting up to 300 ms to join searches."""
    archive, model, db = index_parts
    base = tmp_path_factory.mktemp("batching")
    model_copy, db_copy = shutil.copytree(model, base / "model"), shutil.copytree(db, base / "db")
    checkpoint = load_checkpoint(model_copy)
    images = sorted((archive / "images").glob("*.png"))[:4]
    samples = np.stack([checkpoint.pipeline(read_image(path).pixels) for path in images])
    export_graph(checkpoint, samples, described="phantoms")
    settings = ServiceSettings(
        db=db_copy, model=model_copy, token=TOKEN, runtime="onnx", max_batch=16, batch_wait_ms=300
    )
    yield from start(settings, archive)


def answer(body: dict) -> tuple[str, list[int], list[float]]:
    hits = body["neighbours"]
    return body["prediction"]["label"], [hit["id"] for hit in hits], [hit["score"] for hit in hits]


def test_concurrent_searches_share_model_runs_and_get_their_own_answers(batching_service):
    queries = [phantom(batching_service, number) for number in range(CLIENTS)]
    with batching_service.client() as client:
        assert client.get("/v1/stats").json()["runtime"].startswith("ONNX Runtime")
        alone = [answer(search(client, path, k="5").json()) for path in queries]
        runs_before = client.get("/v1/stats").json()["model_runs"]
    results: dict[int, tuple[int, tuple[str, list[int], list[float]] | None]] = {}
    start = threading.Barrier(CLIENTS)

    def one_client(number: int) -> None:
        with batching_service.client() as own:
            start.wait()
            response = search(own, queries[number], k="5")
            results[number] = (response.status_code, answer(response.json()) if response.status_code == 200 else None)

    threads = [threading.Thread(target=one_client, args=(number,)) for number in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for number, (label, ids, scores) in enumerate(alone):
        status, got = results[number]
        assert status == 200 and got is not None
        assert got[:2] == (label, ids)
        assert got[2] == pytest.approx(scores, abs=1e-5)
    with batching_service.client() as client:
        runs = client.get("/v1/stats").json()["model_runs"] - runs_before
    assert 1 <= runs < CLIENTS
