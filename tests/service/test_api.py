"""The HTTP API against a real server (uvicorn on a loopback port) over a tiny real index: the token, the
limits, every kind of bad upload, and the happy paths of search, images, annotation and removal."""

from __future__ import annotations

import csv
import io
import json
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from cbmir.cli import app as cli
from cbmir.irma import IrmaCode
from cbmir.service import ServiceConfigError, ServiceSettings
from cbmir.service.app import SECURITY_HEADERS
from cbmir.service.routes.system import DOCS_POLICY, STATIC
from tests.conftest import read_grey, shared_path
from tests.service.conftest import TOKEN, VIEWER, dicom_file


def png_bytes(pixels: np.ndarray) -> bytes:
    return cv2.imencode(".png", pixels)[1].tobytes()


def phantom(service, number: int = 0) -> Path:
    return sorted((service.archive / "images").glob("*.png"))[number]


def search(client, path: Path, **fields):
    with open(path, "rb") as file:
        return client.post("/v1/search", files={"file": (path.name, file)}, data=fields)


def search_bytes(client, name: str, data: bytes, **fields):
    return client.post("/v1/search", files={"file": (name, data)}, data=fields)


def check_search_answer(body: dict) -> None:
    assert body["prediction"]["kind"] == "irma"
    IrmaCode.parse(body["prediction"]["label"])
    assert [axis["axis"] for axis in body["prediction"]["axes"]] == [
        "technical",
        "directional",
        "anatomical",
        "biological",
    ]
    assert body["neighbours"], "no neighbours"
    scores = [hit["score"] for hit in body["neighbours"]]
    assert scores == sorted(scores, reverse=True)


# -- the token ----------------------------------------------------------------------------------------------

V1_CALLS = [
    ("GET", "/v1/me"),
    ("POST", "/v1/search"),
    ("POST", "/v1/search/pacs"),
    ("GET", "/v1/images/1/similar"),
    ("GET", "/v1/images/1/explain?neighbour=2"),
    ("POST", "/v1/explain"),
    ("GET", "/v1/images/1"),
    ("GET", "/v1/images/1/thumbnail"),
    ("GET", "/v1/images/1/original"),
    ("POST", "/v1/images"),
    ("DELETE", "/v1/images/1"),
    ("POST", "/v1/annotate"),
    ("PUT", "/v1/images/1/code"),
    ("GET", "/v1/annotations?ids=1"),
    ("GET", "/v1/codes"),
    ("GET", "/v1/stats"),
]


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789", TOKEN + "x"])
def test_every_v1_call_without_the_right_token_is_401(service, token):
    with service.client(token) as client:
        for method, path in V1_CALLS:
            response = client.request(method, path, content=b"" if method in ("POST", "PUT") else None)
            assert response.status_code == 401, (method, path, response.text)
            assert "token" in response.json()["error"]
        # and nothing was removed by the unauthorised DELETE
        assert service.client().get("/v1/images/1").status_code == 200


@pytest.mark.timeout(30)
def test_the_token_is_checked_before_the_body_is_read(service):
    """Issue 12, defect 8: an unauthorised upload was read whole before its 401, and one whose body never came
    held the connection for minutes. The 401 now comes from the headers alone."""
    host, port = service.url.removeprefix("http://").split(":")
    head = (
        "POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        "Content-Length: 3000000\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(head.encode())  # and never the 3 MB it announces
        answer = connection.recv(4096).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 401"), answer[:200]
    assert "www-authenticate: bearer" in answer.lower()


def test_every_v1_route_is_in_the_checked_list(service):
    """A new /v1 route must be added to V1_CALLS, so that the token test covers it."""
    spec = service.client().get("/openapi.json").json()
    routes = {
        (method.upper(), path) for path, item in spec["paths"].items() for method in item if path.startswith("/v1")
    }
    checked = {(method, path.split("?")[0].replace("/1", "/{image_id}")) for method, path in V1_CALLS}
    assert routes == checked


def test_health_and_page_need_no_token(service):
    with service.client(None) as client:
        assert client.get("/health").json() == {"status": "ok", "auth_required": True}
        assert client.get("/ready").json()["ready"] is True
        page = client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert page.headers["x-content-type-options"] == "nosniff"


def test_the_page_and_its_files_arrive_whole_and_every_answer_has_the_security_headers(service):
    """Byte for byte as on disk (the middlewares pass bodies through); the headers on pages, files, API
    answers and refusals alike, where the answer does not set its own (the API docs' looser policy)."""
    with service.client(None) as client, service.client() as reader:
        answers = {name: client.get(url) for name, url in {"index.html": "/", "app.js": "/static/app.js"}.items()}
        for name, answer in answers.items():
            assert answer.content == (STATIC / name).read_bytes()
            assert answer.headers["content-length"] == str(len(answer.content))
        answers |= {"refused": client.get("/v1/stats"), "stats": reader.get("/v1/stats"), "docs": client.get("/docs")}
        assert [answers[name].status_code for name in ("refused", "stats", "docs")] == [401, 200, 200]
        for name, answer in answers.items():
            present = {header: answer.headers.get(header) for header in SECURITY_HEADERS}
            expected = SECURITY_HEADERS | ({"Content-Security-Policy": DOCS_POLICY} if name == "docs" else {})
            assert present == expected, name


def test_without_a_token_the_server_refuses_to_leave_loopback(tmp_path, index_parts):
    _, model, db = index_parts
    with pytest.raises(ServiceConfigError, match="refusing to listen on 0.0.0.0"):
        ServiceSettings(db=db, model=model, host="0.0.0.0").check_binding(has_users=False)
    ServiceSettings(db=db, model=model, host="127.0.0.1").check_binding(has_users=False)
    ServiceSettings(db=db, model=model, host="0.0.0.0", token=TOKEN).check_binding(has_users=False)
    ServiceSettings(db=db, model=model, host="0.0.0.0").check_binding(has_users=True)
    result = CliRunner().invoke(
        cli, ["serve", "--db", str(db), "--model", str(model), "--host", "0.0.0.0"], env={"CBMIR_TOKEN": ""}
    )
    assert result.exit_code == 2
    assert "no token configured: refusing to listen on 0.0.0.0" in result.output


def test_a_pacs_url_that_cannot_be_used_is_refused_at_start(index_parts):
    _, model, db = index_parts
    serve = ["serve", "--db", str(db), "--model", str(model)]
    for url in ("http://alice:secret@pacs:8042/dicom-web", "pacs:8042/dicom-web", "http://pacs/dicom-web?x=1"):
        with pytest.raises(ServiceConfigError, match="CBMIR_PACS_URL is not a DICOMweb base URL"):
            ServiceSettings(db=db, model=model, pacs_url=url)
        result = CliRunner().invoke(cli, serve, env={"CBMIR_PACS_URL": url})
        assert result.exit_code == 2 and "CBMIR_PACS_URL is not a DICOMweb base URL" in result.output
        assert "secret" not in result.output  # a password in the URL is not echoed


def test_cors_is_closed_by_default(service):
    with service.client() as client:
        response = client.get("/v1/stats", headers={"Origin": "https://elsewhere.example"})
        assert response.status_code == 200
        assert "access-control-allow-origin" not in response.headers
        preflight = client.options(
            "/v1/stats", headers={"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "GET"}
        )
        assert "access-control-allow-origin" not in preflight.headers


# -- searching ----------------------------------------------------------------------------------------------


def test_search_by_upload_finds_the_image_itself_first(service):
    with service.client() as client:
        response = search(client, phantom(service, 3), k="5")
        assert response.status_code == 200, response.text
        body = response.json()
        check_search_answer(body)
        assert body["query"]["name"] == phantom(service, 3).name
        assert body["neighbours"][0]["name"] == phantom(service, 3).name
        assert body["neighbours"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert len(body["neighbours"]) == 5
        thumbnail = client.get(body["neighbours"][0]["thumbnail_url"])
        assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/png"
        decoded = cv2.imdecode(np.frombuffer(thumbnail.content, np.uint8), cv2.IMREAD_UNCHANGED)
        assert decoded is not None and decoded.size > 0


def test_anatomy_filter_returns_only_matching_codes(service):
    with service.client() as client:
        for prefix in ("5", "4", "2"):
            body = search(client, phantom(service), k="50", anatomy=prefix).json()
            assert body["neighbours"], prefix
            assert all(IrmaCode.parse(hit["code"])["anatomical"].startswith(prefix) for hit in body["neighbours"])
        bad = search(client, phantom(service), anatomy="x!")
        assert bad.status_code == 422 and "anatomy" in bad.json()["error"]


FILTER_VALUES = [
    ("anatomy", "9", True),
    ("anatomy", "", True),  # empty: any
    ("anatomy", "x!", False),
    ("anatomy", " 9", False),
    ("anatomy", "9123", False),
    ("technical", "1121", True),
    ("code", "1121-127-700-500", True),
    ("code", "1121127700500", True),
    ("code", "1121-12*-***-***", True),
    ("code", "1121-1*2-700-500", False),
    ("code", "1121-127-700", False),
    ("dataset", "   ", True),  # blank free text: any
    ("dataset", "x" * 256, False),
]


@pytest.mark.parametrize(("field", "value", "valid"), FILTER_VALUES)
def test_the_schema_states_the_filters_the_server_takes(service, field, value, valid):
    """Issue 12, defect 13: the filters had no patterns in the schema, so it allowed values the server refused.
    Now the server checks the schema's own patterns, and a value outside them is a 422 that names the field and
    says what it takes."""
    with service.client() as client:
        spec = client.get("/openapi.json").json()
        answer = client.get("/v1/images/2/similar", params={field: value})
    [parameter] = [p for p in spec["paths"]["/v1/images/{image_id}/similar"]["get"]["parameters"] if p["name"] == field]
    form = parameter["schema"]["anyOf"][0]
    assert (len(value) <= form["maxLength"] and re.search(form.get("pattern", ""), value) is not None) == valid
    assert answer.status_code == (200 if valid else 422), answer.text
    if not valid:
        assert answer.json()["error"].startswith(f"{field}: ")
        if "pattern" in form:
            assert answer.json()["error"] == f"{field}: expected {parameter['description']}, got {value!r}"


def test_search_by_id_and_image_metadata(service):
    with service.client() as client:
        body = client.get("/v1/images/2/similar", params={"k": 4, "biology": "7"}).json()
        assert body["query"]["id"] == 2 and body["prediction"] is None
        assert body["neighbours"][0]["id"] == 2
        detail = client.get("/v1/images/2").json()
        assert detail["id"] == 2 and detail["width"] > 0 and detail["original_url"] is None
        assert "location" not in detail  # server paths stay on the server
        assert client.get("/v1/images/2/original").status_code == 403
        assert client.get("/v1/images/999999").status_code == 404
        assert client.get("/v1/images/999999/similar").status_code == 404


def test_hits_from_dicom_carry_their_pacs_uids_and_viewer_link(service):
    """An image indexed from DICOM (here an upload) keeps its UIDs: every answer that lists it says where it is
    on the PACS and links to the viewer (`CBMIR_VIEWER_URL`); other images say null. The schema shows it."""
    pixels = phantom_pixels(service, 5)
    data, uids = dicom_file(pixels)
    place = {**uids, "viewer_url": VIEWER.format(**uids)}
    with service.client() as client:
        [item] = client.post("/v1/images", files={"files": ("cr.dcm", data)}).json()["items"]
        try:
            by_upload = search_bytes(client, "cr.dcm", data, k="3").json()
            by_id = client.get(f"/v1/images/{item['id']}/similar", params={"k": 3}).json()
            for body in (by_upload, by_id):
                assert body["query"]["pacs"] == place
                first, *others = body["neighbours"]
                assert first["id"] == item["id"] and first["pacs"] == place
                assert [hit["pacs"] for hit in others] == [None] * len(others)  # phantoms from PNG files
            assert search_bytes(client, "q.png", png_bytes(pixels)).json()["query"]["pacs"] is None
            assert client.get(f"/v1/images/{item['id']}").json()["pacs"] == place
            assert client.get(f"/v1/images/{others[0]['id']}").json()["pacs"] is None
            schemas = client.get("/openapi.json").json()["components"]["schemas"]
        finally:
            client.delete(f"/v1/images/{item['id']}")
    for answer in ("NeighbourOut", "ImageDetailOut"):
        hit = schemas[answer]
        assert "pacs" in hit["required"] and "PACS" in hit["properties"]["pacs"]["description"]
        assert {"$ref": "#/components/schemas/PacsOut"} in hit["properties"]["pacs"]["anyOf"]
    assert set(schemas["PacsOut"]["properties"]) == {"study", "series", "instance", "viewer_url"}
    assert all(field.get("description") for field in schemas["PacsOut"]["properties"].values())


def phantom_pixels(service, number: int) -> np.ndarray:
    """The pixels of an indexed phantom, mirrored: an image like the index's that is not in it."""
    return np.ascontiguousarray(read_grey(phantom(service, number))[:, ::-1])


@pytest.mark.parametrize(
    "path",
    [
        "/v1/images/..%2F..%2Fetc%2Fpasswd/thumbnail",
        "/v1/images/-1/thumbnail",
        "/v1/images/1e3/thumbnail",
        "/v1/images/%2Fetc%2Fpasswd",
    ],
)
def test_ids_never_reach_the_filesystem(service, path):
    response = service.client().get(path)
    assert response.status_code in (404, 422)
    assert "root:" not in response.text


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PATCH", "/v1/images/1", "DELETE, GET"),
        ("POST", "/v1/images/1", "DELETE, GET"),
        ("GET", "/v1/images/1/code", "PUT"),
        ("DELETE", "/v1/images", "POST"),
        ("PUT", "/v1/stats", "GET"),
        ("POST", "/static/app.js", "GET, HEAD"),
    ],
)
def test_a_405_allows_every_method_the_path_serves(service, method, path, allowed):
    """Issue 12, defect 13: PATCH /v1/images/1 answered `Allow: GET`, though DELETE is served there too
    (Starlette names the methods of the first route that matches the path), and static files none."""
    with service.client() as client:
        response = client.request(method, path, content=b"" if method in ("POST", "PUT", "PATCH") else None)
        assert response.status_code == 405, response.text
        assert response.headers["allow"] == allowed
        assert response.json()["error"] == f"{method} is not allowed at {path}, only {allowed}"
        assert client.get("/v1/images/1").status_code == 200  # and nothing was changed


@pytest.mark.parametrize("k", ["0", "201", "ten"])
def test_bad_k_is_a_422_naming_the_field(service, k):
    response = search(service.client(), phantom(service), k=k)
    assert response.status_code == 422 and response.json()["error"].startswith("k:")


def test_code_tables_for_the_filter_menus(service):
    body = service.client().get("/v1/codes").json()
    anatomy = {entry["code"]: entry for entry in body["axes"]["anatomical"]}
    assert {"2", "4", "5"} <= set(anatomy)  # skull, hand (upper extremity), chest phantoms
    assert sum(anatomy[code]["count"] for code in ("2", "4", "5")) == service.client().get("/v1/stats").json()["images"]
    if body["tables"]:
        assert anatomy["5"]["text"] == "chest"


# -- bad uploads --------------------------------------------------------------------------------------------


def bad_uploads() -> dict[str, tuple[bytes, int, str]]:
    good = png_bytes(np.full((64, 64), 128, np.uint8))
    return {
        "notes.txt": (b"this is a text file, not a radiograph\n", 415, "not a PNG, JPEG, TIFF, BMP or DICOM"),
        "truncated.png": (good[: len(good) // 2], 422, "notes.txt"),
        "empty.png": (b"", 422, "empty"),
        "huge.png": (png_bytes(np.zeros((3000, 3000), np.uint8)), 413, "above the limit"),
        "fake.dcm": (b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x04\x00abc\0", 422, "fake.dcm"),
    }


@pytest.mark.parametrize("name", list(bad_uploads()))
def test_each_bad_upload_gets_a_4xx_naming_the_reason_and_the_server_keeps_answering(service, name):
    data, status, _ = bad_uploads()[name]
    with service.client() as client:
        response = client.post("/v1/search", files={"file": (name, data)})
        assert response.status_code == status, response.text
        message = response.json()["error"]
        assert name in message
        if name != "truncated.png":
            assert bad_uploads()[name][2] in message
        assert search(client, phantom(service)).status_code == 200


def test_a_body_over_the_limit_is_refused_before_it_is_read(service):
    with service.client() as client:
        response = client.post("/v1/search", files={"file": ("big.png", b"\0" * (5 << 20))})
        assert response.status_code == 413 and "above the limit" in response.json()["error"]
        chunked = client.post(
            "/v1/search",
            content=iter([b"--x\r\n", b"data"]),
            headers={"Content-Type": "multipart/form-data; boundary=x"},
        )
        assert chunked.status_code == 411
        assert client.get("/health").status_code == 200


def test_a_client_that_stalls_does_not_hang_the_server(service):
    """A request that announces a body and never sends it ties up only its own connection."""
    host, port = service.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as stalled:
        stalled.sendall(
            b"POST /v1/search HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + b"\r\nContent-Type: multipart/form-data; boundary=x\r\nContent-Length: 1000\r\n\r\n--x"
        )
        assert search(service.client(), phantom(service)).status_code == 200


def test_every_real_fixture_gets_a_prediction_and_neighbours(service):
    fixtures = shared_path("fixtures/txv")
    files = sorted(p for p in fixtures.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".dcm"})
    assert len(files) >= 9
    with service.client() as client:
        for path in files:
            response = search(client, path, k="3")
            assert response.status_code == 200, (path.name, response.text)
            check_search_answer(response.json())


def test_concurrent_searches_all_succeed(service):
    data = phantom(service, 5).read_bytes()

    def one(_):
        with service.client() as client:
            return client.post("/v1/search", files={"file": ("q.png", data)}, data={"k": "5"}).status_code

    with ThreadPoolExecutor(20) as pool:
        assert set(pool.map(one, range(40))) == {200}


# -- adding, annotating, removing -----------------------------------------------------------------------------


def test_add_with_a_known_code_then_duplicate_then_remove(service):
    pixels = np.random.default_rng(7).integers(0, 255, (90, 70), dtype=np.uint8)
    data = png_bytes(pixels)
    with service.client() as client:
        added = client.post(
            "/v1/images", files={"files": ("new.png", data)}, data={"code": "1121-120-200-000", "dataset": "tests"}
        ).json()
        [item] = added["items"]
        assert not item["duplicate"] and item["true_code"] == "1121-120-200-000"
        again = client.post("/v1/images", files={"files": ("same.png", data)}).json()
        assert again["items"][0]["id"] == item["id"] and again["items"][0]["duplicate"]
        found = client.post("/v1/search", files={"file": ("q.png", data)}, data={"k": "1"}).json()
        assert found["neighbours"][0]["id"] == item["id"]
        assert client.get(f"/v1/images/{item['id']}/thumbnail").status_code == 200
        assert client.delete(f"/v1/images/{item['id']}").json() == {"removed": item["id"]}
        assert client.get(f"/v1/images/{item['id']}").status_code == 404
        assert client.delete(f"/v1/images/{item['id']}").status_code == 404
        after = client.post("/v1/search", files={"file": ("q.png", data)}, data={"k": "3"}).json()
        assert item["id"] not in [hit["id"] for hit in after["neighbours"]]
    uploads = service.settings.db / "uploads"
    assert (
        not any(uploads.glob(f"{item['id']}*"))
        and not (service.settings.db / "thumbnails" / f"{item['id']}.png").exists()
    )


def test_annotate_accept_correct_and_export(service):
    rng = np.random.default_rng(11)
    files = [("files", (f"scan-{n}.png", png_bytes(rng.integers(0, 255, (80, 60), dtype=np.uint8)))) for n in range(2)]
    files.append(("files", ("broken.png", b"\x89PNG\r\n\x1a\n")))
    with service.client() as client:
        batch = client.post("/v1/annotate", files=files)
        assert batch.status_code == 200, batch.text
        body = batch.json()
        assert [item["name"] for item in body["items"]] == ["scan-0.png", "scan-1.png"]
        assert [failed["name"] for failed in body["failed"]] == ["broken.png"]
        assert "broken.png" in body["failed"][0]["error"]
        first, second = body["items"]
        assert first["proposed"] and 0 <= first["confidence"] <= 1 and first["prediction"]["axes"]
        accepted = client.put(f"/v1/images/{first['id']}/code", json={"code": first["proposed"].replace("*", "0")})
        assert accepted.status_code == 200, accepted.text
        corrected = client.put(f"/v1/images/{second['id']}/code", json={"code": "1121-115-700-400"})
        assert corrected.json()["true_code"] == "1121-115-700-400"
        for bad in ("1121-12*-700-400", "not a code", ""):
            response = client.put(f"/v1/images/{second['id']}/code", json={"code": bad})
            assert response.status_code == 422 and "code" in response.json()["error"], bad
        true_filtered = client.get(f"/v1/images/{second['id']}/similar", params={"anatomy": "7", "on": "true"}).json()
        assert [hit["id"] for hit in true_filtered["neighbours"]] == [second["id"]]

        ids = f"{first['id']},{second['id']}"
        exported = client.get("/v1/annotations", params={"ids": ids, "format": "csv"})
        assert exported.headers["content-disposition"] == "attachment; filename=annotations.csv"
        rows = list(csv.DictReader(io.StringIO(exported.text)))
        assert list(rows[0]) == ["id", "name", "proposed", "confidence", "true_code", "status", "words"]
        assert [row["name"] for row in rows] == ["scan-0.png", "scan-1.png"]  # the names the files were sent with
        assert rows[1]["true_code"] == "1121-115-700-400" and rows[1]["status"] == "corrected"
        as_json = json.loads(client.get("/v1/annotations", params={"ids": ids, "format": "json"}).text)
        assert as_json[1]["status"] == "corrected"
        assert client.get("/v1/annotations", params={"ids": "1,x"}).status_code == 422


def test_patient_identifying_dicom_tags_are_not_stored(service):
    dicom = shared_path("fixtures/txv/Fake_MONOHR1.dcm")
    with service.client() as client:
        [item] = client.post("/v1/images", files={"files": (dicom.name, dicom.read_bytes())}).json()["items"]
        detail = client.get(f"/v1/images/{item['id']}").json()
        assert "PatientName" not in detail["extra"] and "PatientID" not in detail["extra"]
        stored = (service.settings.db / "store.sqlite").read_bytes()
        assert b"16d7f894-55d7-4d95-8957-d18987f0e981" not in stored
        client.delete(f"/v1/images/{item['id']}")


def test_csv_export_never_hands_a_spreadsheet_a_formula(service):
    """Issue 12, defect 10: a file named like a formula was exported as-is, and a spreadsheet would run it."""
    name = "=2+5+cmd|' -C calc'!A0.png"
    image = png_bytes(np.random.default_rng(12).integers(0, 255, (70, 50), dtype=np.uint8))
    with service.client() as client:
        [item] = client.post("/v1/images", files={"files": (name, image)}).json()["items"]
        exported = client.get("/v1/annotations", params={"ids": str(item["id"]), "format": "csv"})
        [row] = list(csv.DictReader(io.StringIO(exported.text)))
        assert row["name"] == "'" + name
        as_json = client.get("/v1/annotations", params={"ids": str(item["id"]), "format": "json"}).json()
        assert as_json[0]["name"] == name  # JSON is data, not a spreadsheet: kept as sent
        client.delete(f"/v1/images/{item['id']}")


def test_a_batch_adds_per_file_and_a_batch_of_refused_files_is_422(service):
    """Issue 12, defects 5 and 7: [good, thin strip] answered 422 yet added the good one, and a batch whose
    every file was refused answered 200; the thin strip's error did not name the file."""
    good = png_bytes(np.random.default_rng(13).integers(0, 255, (64, 48), dtype=np.uint8))
    strip = png_bytes(np.full((1, 2000), 90, np.uint8))
    with service.client() as client:
        before = client.get("/v1/stats").json()["images"]
        mixed = client.post("/v1/images", files=[("files", ("good.png", good)), ("files", ("strip.png", strip))])
        assert mixed.status_code == 200, mixed.text
        body = mixed.json()
        assert [item["name"] for item in body["items"]] == ["good.png"]
        assert [failed["name"] for failed in body["failed"]] == ["strip.png"]
        assert body["failed"][0]["error"].startswith("strip.png: a 2000 x 1 image cannot be padded to a square")
        assert client.get("/v1/stats").json()["images"] == before + 1
        refused = client.post(
            "/v1/annotate", files=[("files", ("strip.png", strip)), ("files", ("broken.png", b"\x89PNG\r\n\x1a\n"))]
        )
        assert refused.status_code == 422
        assert refused.json()["error"].startswith("no file was added: strip.png: a 2000 x 1 image")
        assert "broken.png" in refused.json()["error"]
        assert client.get("/v1/stats").json()["images"] == before + 1
        client.delete(f"/v1/images/{body['items'][0]['id']}")
        searched = search_bytes(client, "strip.png", strip)
        assert searched.status_code == 422
        assert searched.json()["error"].startswith("strip.png: a 2000 x 1 image cannot be padded")
    with service.client() as client:
        schema = client.get("/openapi.json").json()
    assert "Not atomic" in schema["paths"]["/v1/images"]["post"]["description"]
    assert "Not atomic" in schema["paths"]["/v1/annotate"]["post"]["description"]


def test_the_schema_documents_each_routes_error_answers(service):
    """Issue 12, defect 13: error answers were missing from the OpenAPI schema (and a PNG route documented its
    JSON errors as image/png), and `files` allowed an empty list."""
    with service.client() as client:
        spec = client.get("/openapi.json").json()
        empty = client.post("/v1/images", data={"dataset": "x"})
    assert empty.status_code == 422 and "files" in empty.json()["error"]
    error_schema = {"$ref": "#/components/schemas/ErrorOut"}
    assert {"404", "502", "503", "504"} <= set(spec["paths"]["/v1/search/pacs"]["post"]["responses"])
    for path, item in spec["paths"].items():
        if not path.startswith("/v1"):
            continue
        for method, operation in item.items():
            documented = {code: answer for code, answer in operation["responses"].items() if code != "200"}
            assert {"401", "403", "422", "429", "503"} <= set(documented), (method, path)
            if "{image_id}" in path:
                assert "404" in documented, (method, path)
            if "requestBody" in operation:
                assert {"400", "408", "411", "413"} <= set(documented), (method, path)
            for code, answer in documented.items():
                assert answer["content"]["application/json"]["schema"] == error_schema, (method, path, code)
            upload = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
            if upload:
                assert "415" in documented, (method, path)
                fields = spec["components"]["schemas"][upload["schema"]["$ref"].rsplit("/", 1)[-1]]["properties"]
                assert "files" not in fields or fields["files"]["minItems"] == 1, (method, path)
