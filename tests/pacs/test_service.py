"""Searching by a PACS image through the service, against a real Orthanc (DICOMweb, basic auth) and a real server
(uvicorn on a loopback port) over an index synced from that Orthanc: the instance is fetched and answered as an
upload of the same DICOM file is; hits carry their UIDs and viewer links; each failure is its documented status
with a message naming the UIDs and the reason; the audit trail names the instance; the page drives it all."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis

# Imported now, at collection, not lazily by the first `from_dict` deep in a test: CPython 3.11.7 can fail
# to compile (pytest rewrites schemathesis's modules) a module imported under a deep stack ("AST constructor
# recursion depth mismatch", seen once in CI).
import schemathesis.specs.openapi.schemas
from pydicom.uid import generate_uid

from cbmir.embed import Embedder
from cbmir.pacs import Pacs, PacsSettings
from cbmir.search import Retrieval
from cbmir.service import ServiceSettings
from cbmir.settings import load_settings
from indexer.pacs import sync_pacs
from tests.conftest import small_checkpoint
from tests.pacs.dicoms import TestDicom
from tests.pacs.orthanc import Orthanc, free_ports
from tests.service.conftest import Running, start
from tests.service.test_access import run
from tests.service.test_concurrency import DECODING, CountingCatalog
from tests.service.test_page import (
    CHROMIUM,
    chromium,
    enter_token,
    fresh_page,
    neighbours,
    screenshot,
    wait_for_grid,
)

CODES = ["1121-127-700-500", "1123-211-500-700"]
VIEWER = "http://viewer.test/ohif/viewer?StudyInstanceUIDs={study}&SeriesInstanceUID={series}&SOPInstanceUID={instance}"
# Objects whose pixels reach the service unchanged from the PACS (uncompressed or lossless, which Orthanc sends
# as Explicit VR Little Endian), so that searching by them and uploading their files give the same answer.
LOSSLESS = ("cr-mono2-16bit", "dx-mono1-16bit", "dx-rescale-window", "cr-rle")
serving = contextlib.contextmanager(start)
browsing = contextlib.contextmanager(chromium)
opened = contextlib.contextmanager(fresh_page)


@dataclass(frozen=True)
class Synced:
    """An Orthanc holding every generated object, an index synced from it, and a reader's token."""

    orthanc: Orthanc
    db: Path
    model: Path
    reader: str
    objects: list[TestDicom]

    def object(self, kind: str) -> TestDicom:
        return next(obj for obj in self.objects if obj.kind == kind)

    def settings(self, **changes: Any) -> ServiceSettings:
        """The service's settings: this Orthanc as its PACS (quick retries, short timeout), then `changes`."""
        values = {
            "pacs_url": self.orthanc.dicomweb_url,
            "pacs_user": self.orthanc.user,
            "pacs_password": self.orthanc.password,
            "pacs_attempts": 2,
            "pacs_backoff_seconds": 0.01,
            "pacs_timeout_seconds": 2.0,
            **changes,
        }
        return ServiceSettings(db=self.db, model=self.model, **values)

    def client(self, running: Running) -> httpx.Client:
        return running.client(self.reader)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_checkpoint(tmp_path_factory.mktemp("model"), CODES)


@pytest.fixture
def synced(orthanc: Orthanc, generated_dicoms: list[TestDicom], model: Path, tmp_path: Path) -> Synced:
    orthanc.upload_files(obj.path for obj in generated_dicoms)
    pacs = Pacs(orthanc.dicomweb_url, PacsSettings(pacs_user=orthanc.user, pacs_password=orthanc.password))
    with Retrieval.open(tmp_path / "db", Embedder.load(model)) as retrieval:
        sync_pacs(pacs, retrieval, dataset="pacs", modalities=(), workers=0, progress=False)
    reader = run("users", "add", "reader1", "--db", str(tmp_path / "db"), "--role", "reader").strip()
    return Synced(orthanc, tmp_path / "db", model, reader, generated_dicoms)


def uids(obj: TestDicom) -> dict[str, str]:
    return {"study": obj.study, "series": obj.series, "instance": obj.sop}


def search_pacs(client: httpx.Client, obj: TestDicom, **options: Any) -> httpx.Response:
    return client.post("/v1/search/pacs", json={**uids(obj), **options})


def search_upload(client: httpx.Client, obj: TestDicom, **fields: Any) -> httpx.Response:
    return client.post("/v1/search", files={"file": (obj.path.name, obj.path.read_bytes())}, data=fields)


def check_schema(client: httpx.Client, answer: httpx.Response) -> None:
    """Fail unless `answer` is what the server's OpenAPI schema documents for a search by PACS image."""
    spec = client.get("/openapi.json").json()
    schemathesis.openapi.from_dict(spec)["/v1/search/pacs"]["POST"].validate_response(answer)


def configured_from_environment(synced: Synced, monkeypatch: pytest.MonkeyPatch) -> ServiceSettings:
    """The service's settings as `cbmir serve` reads them: the PACS and the viewer from CBMIR_* variables (the
    thumbnails of synced images are fetched with the credentials there too)."""
    for name, value in {
        "CBMIR_PACS_URL": synced.orthanc.dicomweb_url,
        "CBMIR_PACS_USER": synced.orthanc.user,
        "CBMIR_PACS_PASSWORD": synced.orthanc.password,
        "CBMIR_VIEWER_URL": VIEWER,
    }.items():
        monkeypatch.setenv(name, value)
    return load_settings(ServiceSettings, db=synced.db, model=synced.model)


def test_a_reader_searches_by_a_pacs_image_as_by_uploading_it(synced, monkeypatch):
    """A reader's search by an instance's UIDs answers what an upload of its DICOM file answers; each hit says
    where it is on the PACS, with its viewer link."""
    by_sop = {obj.sop: obj for obj in synced.objects}
    settings = configured_from_environment(synced, monkeypatch)
    with serving(settings, synced.db) as running, synced.client(running) as client:
        for kind in LOSSLESS:
            obj = synced.object(kind)
            by_pacs = search_pacs(client, obj, k=5)
            assert by_pacs.status_code == 200, by_pacs.text
            check_schema(client, by_pacs)
            uploaded = search_upload(client, obj, k="5").json()
            found = by_pacs.json()
            place = {**uids(obj), "viewer_url": VIEWER.format(**uids(obj))}
            assert found["query"] == {**uploaded["query"], "name": obj.sop} and found["query"]["pacs"] == place
            assert found["prediction"] == uploaded["prediction"]
            assert [hit["id"] for hit in found["neighbours"]] == [hit["id"] for hit in uploaded["neighbours"]]
            scores = [hit["score"] for hit in found["neighbours"]]
            assert scores == pytest.approx([hit["score"] for hit in uploaded["neighbours"]], abs=1e-6)
            assert found["neighbours"][0]["name"] == obj.sop and scores[0] == pytest.approx(1.0, abs=1e-4)
            for hit in found["neighbours"]:  # synced images are named by their SOP Instance UID
                hit_uids = uids(by_sop[hit["name"]])
                assert hit["pacs"] == {**hit_uids, "viewer_url": VIEWER.format(**hit_uids)}


def test_the_options_of_an_upload_search_refine_a_pacs_search_the_same_way(synced):
    obj = synced.object("cr-mono2-16bit")
    with serving(synced.settings(), synced.db) as running, synced.client(running) as client:
        first = search_pacs(client, obj, k=4).json()["neighbours"]
        marked = {"positive": str(first[1]["id"]), "negative": str(first[2]["id"])}
        options = {"region": "10,10,120,100", **marked, "include_marked": True}
        refined = search_pacs(client, obj, k=4, filters={"dataset": "pacs"}, refine=options)
        assert refined.status_code == 200, refined.text
        uploaded = search_upload(client, obj, k="4", dataset="pacs", **options)
        assert refined.json()["neighbours"] == uploaded.json()["neighbours"]
        assert refined.json()["query"]["region"] == {"x": 10, "y": 10, "width": 120, "height": 100}
        assert refined.json()["query"]["positive"] == [first[1]["id"]]
        assert refined.json()["query"]["pacs"]["viewer_url"] is None  # no viewer configured
        assert all(hit["pacs"]["viewer_url"] is None for hit in refined.json()["neighbours"])
        outside = search_pacs(client, obj, refine={"region": "0,0,5000,5000"})
        assert outside.status_code == 422 and "region" in outside.json()["error"]


def test_each_instance_the_service_cannot_search_by_is_a_4xx_naming_the_uids_and_the_reason(synced):
    """A UID the PACS does not have is 404; a malformed one 422, naming the field; an instance without a single
    image cbmir reads is 422, with the reason an upload of its file gets. Then Orthanc dies: 504."""
    image = synced.object("cr-mono2-16bit")
    with serving(synced.settings(), synced.db) as running, synced.client(running) as client:
        missing = replace(image, sop=generate_uid())
        answer = search_pacs(client, missing)
        assert answer.status_code == 404, answer.text
        assert_names(answer, missing, "not found")
        check_schema(client, answer)

        for field, value in (("study", "1.2.x"), ("series", "1..2"), ("instance", "1" * 65)):
            answer = client.post("/v1/search/pacs", json={**uids(image), field: value})
            assert answer.status_code == 422, answer.text
            assert answer.json()["error"].startswith(f"{field}: expected a DICOM UID"), answer.text
        unknown = client.post("/v1/search/pacs", json={**uids(image), "anatomy": "9"})
        assert unknown.status_code == 422 and unknown.json()["error"].startswith("anatomy: Extra inputs")

        for kind in ("sr-basic-text", "dx-multiframe", "dx-jpeg2000-undecodable"):
            obj = synced.object(kind)
            answer = search_pacs(client, obj)
            assert answer.status_code == 422, (kind, answer.text)
            assert_names(answer, obj)
            reason = search_upload(client, obj).json()["error"].split(": ", 1)[1]
            assert answer.json()["error"].endswith(f": {reason}"), (kind, answer.text)
            check_schema(client, answer)

        synced.orthanc.kill()
        answer = search_pacs(client, image)
        assert answer.status_code == 504, answer.text
        assert_names(answer, image, "cannot connect")
        check_schema(client, answer)


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """The DICOMweb URL of a server that takes connections and never answers."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        yield f"http://127.0.0.1:{listening.getsockname()[1]}/dicom-web"


@pytest.mark.parametrize(
    ("setting", "status", "reason"),
    [
        ("wrong password", 502, "refused the credentials (HTTP 401)"),
        ("no PACS", 503, "CBMIR_PACS_URL is not set"),
        ("closed port", 504, "cannot connect"),
        ("silent server", 504, "no answer within 0.3 s"),
    ],
)
def test_a_pacs_the_service_cannot_use_is_its_documented_status(synced, setting, status, reason):
    image = synced.object("cr-mono2-16bit")
    with contextlib.ExitStack() as stack:
        changes: dict[str, Any]
        match setting:
            case "wrong password":
                changes = {"pacs_password": "not-the-password"}
            case "no PACS":
                changes = {"pacs_url": None}
            case "closed port":
                changes = {"pacs_url": f"http://127.0.0.1:{free_ports(1)[0]}/dicom-web"}
            case "silent server":
                changes = {"pacs_url": stack.enter_context(silent_server()), "pacs_timeout_seconds": 0.3}
        running = stack.enter_context(serving(synced.settings(**changes), synced.db))
        with synced.client(running) as client:
            answer = search_pacs(client, image)
            assert answer.status_code == status, answer.text
            assert_names(answer, image, reason)
            check_schema(client, answer)


def assert_names(answer: httpx.Response, obj: TestDicom, reason: str = "") -> None:
    """The error names the instance by its three UIDs, and the reason."""
    error = answer.json()["error"]
    assert all(uid in error for uid in uids(obj).values()) and reason in error, error


def test_the_audit_trail_records_each_search_by_pacs_image_with_its_uids(synced):
    image = synced.object("cr-mono2-16bit")
    report = synced.object("sr-basic-text")
    with serving(synced.settings(), synced.db) as running, synced.client(running) as client:
        found = search_pacs(client, image, k=3, filters={"dataset": "pacs"}).json()["neighbours"]
        assert search_pacs(client, report).status_code == 422
    records = [
        json.loads(line)
        for line in run("audit", "show", "--db", str(synced.db), "--json").splitlines()
        if json.loads(line)["route"] == "POST /v1/search/pacs"
    ]
    assert [(record["user"], record["role"], record["status"]) for record in records] == [
        ("reader1", "reader", 200),
        ("reader1", "reader", 422),
    ]
    assert records[0]["images"] == [hit["id"] for hit in found] and records[0]["count"] == 3
    assert records[0]["detail"] == {"pacs": uids(image), "k": 3, "filters": {"on": "best", "dataset": "pacs"}}
    assert records[1]["detail"] == {"pacs": uids(report)} and records[1]["images"] == []


def test_pacs_images_are_decoded_in_the_slots_uploads_wait_for(synced, monkeypatch):
    """Searches by PACS image share the decoding slots with uploads: with one slot (`max_decoding=1`), concurrent
    searches of both kinds are decoded one at a time, and each gets its answer."""
    monkeypatch.setattr("cbmir.service.app.Catalog", CountingCatalog)
    kinds = ("cr-mono2-16bit", "dx-mono1-16bit", "cr-mono2-8bit", "cr-rle")
    with serving(synced.settings(max_decoding=1), synced.db) as running:
        decoded_before = DECODING.calls
        together = threading.Barrier(2 * len(kinds))

        def search(kind: str, how: Callable[..., httpx.Response]) -> tuple[int, list[int]]:
            with synced.client(running) as client:
                together.wait()
                answer = how(client, synced.object(kind), k=3)
                return answer.status_code, [hit["id"] for hit in answer.json()["neighbours"]]

        with ThreadPoolExecutor(2 * len(kinds)) as pool:
            by_pacs = [pool.submit(search, kind, search_pacs) for kind in kinds]
            uploaded = [pool.submit(search, kind, search_upload) for kind in kinds]
            answers = [(pacs.result(), upload.result()) for pacs, upload in zip(by_pacs, uploaded, strict=True)]
    assert (DECODING.calls - decoded_before, DECODING.most) == (2 * len(kinds), 1)
    for (pacs_status, pacs_ids), upload in answers:
        assert pacs_status == 200 and (pacs_status, pacs_ids) == upload


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed: apt-get install chromium")
def test_the_page_searches_by_pacs_image_and_links_cases_to_the_viewer(synced, monkeypatch):
    image = synced.object("dx-mono1-16bit")
    with (
        serving(configured_from_environment(synced, monkeypatch), synced.db) as running,
        browsing() as browser,
        opened(browser, running.url) as page,
    ):
        enter_token(page, synced.reader)
        page.click("#pacs-search summary")
        for field, value in uids(image).items():
            page.fill(f"#pacs-{field}", value)
        page.click("#pacs-submit")
        wait_for_grid(page)
        screenshot(page, "cbmir-page-pacs-search.png")
        assert neighbours(page)[0]["name"] == image.sop
        assert page.locator("#results-title").inner_text() == f"Similar prior cases to PACS instance {image.sop}"
        expected = VIEWER.format(**uids(image))
        assert page.locator("#query-viewer").get_attribute("href") == expected
        assert page.locator("#neighbours .neighbour .viewer-link").first.get_attribute("href") == expected
        assert page.locator("#why-toggle").is_disabled()  # no maps without the query's pixels
        page.fill("#pacs-instance", generate_uid())
        page.click("#pacs-submit")
        page.locator("#message", has_text="not found on the server").wait_for()
        assert page.locator("#neighbours .neighbour").count() == 0
