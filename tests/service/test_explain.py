"""Why a neighbour matches, over real HTTP: both explain routes answer PNG overlays of each thumbnail's size,
a second call comes from the cache, and bad ids or fields are refused as the other routes refuse them."""

from __future__ import annotations

import base64

import cv2
import numpy as np
import pytest

from cbmir.service.catalog import thumbnail_size
from tests.conftest import read_grey
from tests.service.test_api import phantom


def overlay(data_url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    image = cv2.imdecode(np.frombuffer(base64.b64decode(data_url[len(prefix) :]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None and image.shape[2] == 4
    return image


def thumbnail_shape(client, image_id: int) -> tuple[int, int]:
    detail = client.get(f"/v1/images/{image_id}").json()
    width, height = thumbnail_size(detail["width"], detail["height"])
    return height, width


def test_explain_by_id_answers_overlays_and_then_from_the_cache(service):
    with service.client() as client:
        first = client.get("/v1/images/1/explain", params={"neighbour": 5})
        assert first.status_code == 200, first.text
        body = first.json()
        assert overlay(body["query"]).shape[:2] == thumbnail_shape(client, 1)
        assert overlay(body["neighbour"]).shape[:2] == thumbnail_shape(client, 5)
        assert -1 <= body["score"] <= 1 and body["milliseconds"] > 0
        similar = client.get("/v1/images/1/similar", params={"k": 24}).json()["neighbours"]
        assert body["score"] == pytest.approx(next(hit["score"] for hit in similar if hit["id"] == 5), abs=1e-4)
        again = client.get("/v1/images/1/explain", params={"neighbour": 5}).json()
        assert again == {**body, "milliseconds": 0.0}


def test_explain_an_upload_answers_overlays_and_then_from_the_cache(service):
    path = phantom(service, 4)
    with service.client() as client:
        answers = [
            client.post("/v1/explain", files={"file": (path.name, path.read_bytes())}, data={"neighbour": "2"})
            for _ in range(2)
        ]
        assert [answer.status_code for answer in answers] == [200, 200], answers[0].text
        first, second = (answer.json() for answer in answers)
        width, height = read_grey(path).shape[::-1]
        assert overlay(first["query"]).shape[:2] == thumbnail_size(width, height)[::-1]
        assert overlay(first["neighbour"]).shape[:2] == thumbnail_shape(client, 2)
        assert first["milliseconds"] > 0 and second == {**first, "milliseconds": 0.0}


def test_explain_refuses_unknown_ids_and_bad_fields_by_name(service):
    image = phantom(service, 1).read_bytes()
    with service.client() as client:
        assert client.get("/v1/images/999999/explain", params={"neighbour": 2}).status_code == 404
        assert client.get("/v1/images/1/explain", params={"neighbour": 999999}).status_code == 404
        for params in ({"neighbour": "x"}, {}):
            refused = client.get("/v1/images/1/explain", params=params)
            assert refused.status_code == 422 and refused.json()["error"].startswith("neighbour:"), refused.text
        unknown = client.post("/v1/explain", files={"file": ("q.png", image)}, data={"neighbour": "999999"})
        assert unknown.status_code == 404
        missing = client.post("/v1/explain", files={"file": ("q.png", image)})
        assert missing.status_code == 422 and missing.json()["error"].startswith("neighbour:")
        not_an_image = client.post(
            "/v1/explain", files={"file": ("notes.txt", b"not an image")}, data={"neighbour": "2"}
        )
        assert not_an_image.status_code == 415 and "notes.txt" in not_an_image.json()["error"]


def test_explain_a_region_of_an_upload_shows_agreement_inside_it_only(service):
    path = phantom(service, 6)
    width, height = read_grey(path).shape[::-1]
    region = f"0,0,{width // 2},{height // 2}"
    with service.client() as client:
        answer = client.post(
            "/v1/explain", files={"file": (path.name, path.read_bytes())}, data={"neighbour": "2", "region": region}
        )
        assert answer.status_code == 200, answer.text
        shown = overlay(answer.json()["query"])
        assert shown.shape[:2] == thumbnail_size(width, height)[::-1]
        assert not shown[shown.shape[0] // 2 + 2 :, :, 3].any() and not shown[:, shown.shape[1] // 2 + 2 :, 3].any()
        whole = client.post("/v1/explain", files={"file": (path.name, path.read_bytes())}, data={"neighbour": "2"})
        assert whole.json()["milliseconds"] > 0  # not the region's cached answer
        for bad in ("1,2,3", f"0,0,{width + 1},{height}"):
            refused = client.post(
                "/v1/explain", files={"file": (path.name, path.read_bytes())}, data={"neighbour": "2", "region": bad}
            )
            assert refused.status_code == 422 and refused.json()["error"].startswith("region"), refused.text
