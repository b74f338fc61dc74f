"""Concurrent requests in a real server (uvicorn on a loopback port): reads and searches racing removals,
and the bound on how many uploads are decoded at once."""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter

import httpx
import numpy as np
import pytest
from pydicom.dataset import Dataset
from typer.testing import CliRunner

from cbmir.cli import app as cli
from cbmir.imaging.io import Radiograph
from cbmir.service import ServiceSettings
from cbmir.service.catalog import Catalog
from cbmir.settings import SettingsError, load_settings
from tests.service.conftest import TOKEN, start
from tests.service.test_api import phantom, png_bytes, search_bytes

UPLOADED, READERS = 40, 6
READS = ("similar", "similar-kept", "search", "detail", "thumbnail", "original")
BROKEN = 599  # an answer cut off while it was sent


@pytest.fixture(scope="module")
def originals_service(index_parts, tmp_path_factory):
    """A service over its own copy of the index that serves originals (uploads included)."""
    archive, model, db = index_parts
    copy = shutil.copytree(db, tmp_path_factory.mktemp("races") / "db")
    yield from start(ServiceSettings(db=copy, model=model, token=TOKEN, allow_originals=True), archive)


@pytest.mark.timeout(240)
def test_reads_and_searches_racing_removals_fail_only_for_the_removed_image(originals_service):
    """Issue 12, defect 6: a search by id failed when one of its neighbours was removed meanwhile, and a
    thumbnail racing a DELETE was a 500. Each image is removed while readers search (by id and by upload) and
    fetch its details, thumbnail (kept or still to be made) and original: no 5xx and no answer cut off,
    originals intact, a 404 only for the image being removed, and nothing of a removed image left behind."""
    rng = np.random.default_rng(6)
    files = [png_bytes(rng.integers(0, 255, (int(rng.integers(600, 1200)), 900), np.uint8)) for _ in range(UPLOADED)]
    with originals_service.client() as client:
        before = client.get("/v1/stats").json()["images"]
        added = client.post("/v1/images", files=[("files", (f"race-{n}.png", data)) for n, data in enumerate(files)])
        assert added.status_code == 200, added.text
        ids = [item["id"] for item in added.json()["items"]]
        for image_id in ids[::2]:  # half the thumbnails are kept before the removals, half made during them
            assert client.get(f"/v1/images/{image_id}/thumbnail").status_code == 200
    assert len(set(ids)) == UPLOADED
    kept = 1  # an indexed image nobody removes

    deleting: set[int] = set()  # ids whose DELETE has been sent
    removed = [threading.Event() for _ in ids]  # set when an image's DELETE has been answered
    together = threading.Barrier(READERS + 1)  # the readers start with each DELETE, and read until it is done
    outcomes: list[tuple[str, int, int, bool]] = []  # (kind, id, status, its DELETE sent by the answer)

    def remover() -> None:
        with originals_service.client() as own:
            for number, image_id in enumerate(ids):
                together.wait()
                deleting.add(image_id)
                outcomes.append(("delete", image_id, own.delete(f"/v1/images/{image_id}").status_code, True))
                removed[number].set()

    def reader(seed: int) -> None:
        with originals_service.client() as own:
            for number, target in enumerate(ids):
                kind = READS[(seed + number) % len(READS)]  # every image is read in every way
                together.wait()
                while not removed[number].is_set():
                    outcomes.append(read(own, kind, number, target))

    def read(own: httpx.Client, kind: str, number: int, image_id: int) -> tuple[str, int, int, bool]:
        try:
            if kind == "similar-kept":
                image_id = kept
                answer = own.get(f"/v1/images/{kept}/similar", params={"k": 100})
            elif kind == "similar":
                answer = own.get(f"/v1/images/{image_id}/similar", params={"k": 100})
            elif kind == "search":
                image_id = 0
                answer = own.post("/v1/search", files={"file": ("q.png", files[number])}, data={"k": "100"})
            elif kind == "detail":
                answer = own.get(f"/v1/images/{image_id}")
            else:
                answer = own.get(f"/v1/images/{image_id}/{kind}")
            status = answer.status_code
            if kind == "original" and status == 200 and answer.content != files[number]:
                status = BROKEN
        except httpx.TransportError:
            status = BROKEN
        return kind, image_id, status, image_id in deleting

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(READERS)]
    threads.append(threading.Thread(target=remover))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=200)
    figures = sorted(Counter((kind, status) for kind, _, status, _ in outcomes).items())
    assert not [outcome for outcome in outcomes if outcome[2] >= 500], figures
    wrong = [outcome for outcome in outcomes if outcome[2] != 200 and not (outcome[2] == 404 and outcome[3])]
    assert not wrong, (wrong[:10], figures)
    assert all(Counter(kind for kind, *_ in outcomes)[kind] for kind in READS), figures
    assert Counter(status for kind, _, status, _ in outcomes if kind == "delete") == {200: UPLOADED}

    folder = originals_service.settings.db
    with originals_service.client() as client:
        assert client.get("/v1/stats").json()["images"] == before
    thumbnails = {int(path.stem) for path in (folder / "thumbnails").glob("*.png")}
    assert not thumbnails & set(ids), "a thumbnail outlived its image"
    assert not list((folder / "uploads").iterdir()), "an upload outlived its image"


# -- the bound on decoding ------------------------------------------------------------------------------------

DECODE_SECONDS = 0.2  # long enough for concurrent decodes to overlap, were they not bounded


class Overlap:
    """How many calls are inside a block at once, the most there ever were, and how many there were."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inside = self.most = self.calls = 0

    def enter(self) -> None:
        with self._lock:
            self.inside += 1
            self.calls += 1
            self.most = max(self.most, self.inside)

    def leave(self) -> None:
        with self._lock:
            self.inside -= 1


DECODING = Overlap()


class CountingCatalog(Catalog):
    """A real catalog whose reading of queries is counted, and slowed down so that concurrent ones overlap."""

    def read_query(self, name: str, data: bytes | Dataset) -> Radiograph:
        DECODING.enter()
        try:
            time.sleep(DECODE_SECONDS)
            return super().read_query(name, data)
        finally:
            DECODING.leave()


@pytest.fixture(scope="module")
def one_decoder(index_parts, tmp_path_factory):
    """A service that decodes one upload at a time (`max_decoding=1`), counted by its `CountingCatalog`."""
    archive, model, db = index_parts
    copy = shutil.copytree(db, tmp_path_factory.mktemp("decoding") / "db")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("cbmir.service.app.Catalog", CountingCatalog)
        yield from start(ServiceSettings(db=copy, model=model, token=TOKEN, max_decoding=1), archive)


def neighbours(response: httpx.Response) -> tuple[str, list[int]]:
    assert response.status_code == 200, response.text
    body = response.json()
    return body["prediction"]["label"], [hit["id"] for hit in body["neighbours"]]


@pytest.mark.timeout(120)
def test_concurrent_uploads_are_decoded_one_at_a_time_and_each_gets_its_answer(one_decoder):
    """Issue 12, defect 3: six concurrent 227-byte uploads of a 32768x1 PNG took the server from 0.85 to
    5.8 GB. With `max_decoding=1`, concurrent searches, adds and bad uploads are decoded one at a time: each
    waits for its turn, a failing one gives its turn up (else the rest would hang), and each gets its answer."""
    queries = [phantom(one_decoder, number).read_bytes() for number in range(4)]
    rng = np.random.default_rng(3)
    new = [png_bytes(rng.integers(0, 255, (80, 64), dtype=np.uint8)) for _ in range(2)]
    with one_decoder.client() as client:
        alone = [neighbours(search_bytes(client, "q.png", data, k="5")) for data in queries]
    # name -> (path, file field, file content, form fields)
    jobs = {
        **{f"search-{n}": ("/v1/search", "file", data, {"k": "5"}) for n, data in enumerate(queries)},
        **{f"add-{n}": ("/v1/images", "files", data, {}) for n, data in enumerate(new)},
        "truncated.png": ("/v1/search", "file", queries[0][:200], {}),
        "strip.png": ("/v1/search", "file", png_bytes(np.full((1, 2000), 90, np.uint8)), {}),
    }
    decoded_before = DECODING.calls
    together = threading.Barrier(len(jobs))
    answers: dict[str, httpx.Response] = {}

    def run(name: str) -> None:
        path, field, data, fields = jobs[name]
        with one_decoder.client() as own:
            together.wait()
            answers[name] = own.post(path, files={field: (name, data)}, data=fields)

    threads = [threading.Thread(target=run, args=(name,)) for name in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=100)
    assert (DECODING.calls - decoded_before, DECODING.most) == (len(jobs), 1)

    for number, expected in enumerate(alone):
        assert neighbours(answers[f"search-{number}"]) == expected
    for name in ("truncated.png", "strip.png"):
        assert answers[name].status_code == 422 and name in answers[name].json()["error"]
    with one_decoder.client() as client:
        for number, data in enumerate(new):
            assert answers[f"add-{number}"].status_code == 200, answers[f"add-{number}"].text
            [item] = answers[f"add-{number}"].json()["items"]
            assert not item["duplicate"]
            assert neighbours(search_bytes(client, "q.png", data, k="1"))[1] == [item["id"]]
            assert client.delete(f"/v1/images/{item['id']}").status_code == 200


def test_max_decoding_is_a_setting_and_a_serve_option(index_parts, monkeypatch):
    _, model, db = index_parts
    assert ServiceSettings(db=db, model=model).max_decoding == 2
    monkeypatch.setenv("CBMIR_MAX_DECODING", "3")
    assert load_settings(ServiceSettings, db=db, model=model).max_decoding == 3
    assert load_settings(ServiceSettings, db=db, model=model, max_decoding=1).max_decoding == 1
    with pytest.raises(SettingsError, match=r"max_decoding \(\$CBMIR_MAX_DECODING\)"):
        load_settings(ServiceSettings, db=db, model=model, max_decoding=0)
    refused = CliRunner().invoke(cli, ["serve", "--db", str(db), "--model", str(model), "--max-decoding", "0"])
    assert refused.exit_code == 2 and "--max-decoding" in refused.output
