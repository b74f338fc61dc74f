"""Refined searches over real HTTP (issue 16): by a region of the query image and by images marked relevant or
not, each answer checked against a brute-force search computed here (the crop embedded with the checkpoint's
own Embedder, or the Rocchio vector made with numpy, against every stored embedding)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cbmir.cli import app as cli
from cbmir.embed import Embedder
from cbmir.index import Filters
from cbmir.index.store import Store
from cbmir.labels import blend_with_neighbours, decode_predictions
from cbmir.search import BLENDED_NEIGHBOURS
from tests.conftest import read_grey
from tests.service.test_api import phantom, png_bytes, search_bytes

K = 5


@pytest.fixture(scope="module")
def embedder(service):
    return Embedder.load(service.settings.model)


@pytest.fixture(scope="module")
def stored(service):
    """Every stored id and its embedding (the store read beside the server, as the audit trail is)."""
    store = Store(service.settings.db / "store.sqlite")
    try:
        ids = store.query(Filters())
        return ids, store.embeddings(ids.tolist())
    finally:
        store.close()


@pytest.fixture(scope="module")
def true_codes(service, stored) -> dict[int, str | None]:
    store = Store(service.settings.db / "store.sqlite")
    try:
        return {row.id: row.true_code for row in store.get(stored[0])}
    finally:
        store.close()


def brute_force(
    stored, vector: np.ndarray, k: int = K, leave_out: frozenset[int] | set[int] = frozenset()
) -> dict[int, float]:
    ids, vectors = stored
    scores = vectors @ (vector / np.linalg.norm(vector))
    order = [i for i in np.argsort(-scores) if int(ids[i]) not in leave_out][:k]
    return {int(ids[i]): float(scores[i]) for i in order}


def check_equal(neighbours: list[dict], expected: dict[int, float]) -> None:
    """The answer has the brute-force top k's scores (with `check_scores`, each image at its own score: so
    images of equal scores may swap)."""
    assert [hit["score"] for hit in neighbours] == pytest.approx(list(expected.values()), abs=1e-4)
    assert len(neighbours) == len(expected)


def check_scores(neighbours: list[dict], stored, vector: np.ndarray) -> None:
    ids, vectors = stored
    position = {int(i): n for n, i in enumerate(ids)}
    unit = vector / np.linalg.norm(vector)
    for hit in neighbours:
        assert hit["score"] == pytest.approx(float(vectors[position[hit["id"]]] @ unit), abs=1e-4)


def embed(embedder: Embedder, pixels: np.ndarray, stored, true_codes: dict[int, str | None]) -> tuple[np.ndarray, str]:
    """The query's vector, and the code a search answers for it: the model's probabilities blended with the
    true codes of its brute-force nearest stored images."""
    embeddings = embedder.embed_inputs([embedder.prepare(pixels)])
    nearest = brute_force(stored, embeddings.vectors[0], k=BLENDED_NEIGHBOURS)
    known = [(code, score) for i, score in nearest.items() if (code := true_codes[i])]
    blended, _ = blend_with_neighbours(embedder.schema, {h: p[0] for h, p in embeddings.probabilities.items()}, known)
    rows = {head: values[None, :] for head, values in blended.items()}
    [prediction] = decode_predictions(embedder.schema, rows, irma_threshold=embedder.irma_threshold)
    return embeddings.vectors[0], prediction.label


def pasted(service, number: int) -> tuple[np.ndarray, np.ndarray, str]:
    """A phantom pasted off-centre into a black canvas three times its size: the original, the canvas and the
    region ("x,y,width,height") where the original lies."""
    original = read_grey(phantom(service, number))
    height, width = original.shape
    canvas = np.zeros((3 * height, 3 * width), np.uint8)
    x, y = width // 3, 2 * height - 7
    canvas[y : y + height, x : x + width] = original
    return original, canvas, f"{x},{y},{width},{height}"


def test_a_region_search_finds_the_pasted_original_first(service, embedder, stored, true_codes):
    original, canvas, region = pasted(service, 4)
    with service.client() as client:
        whole = search_bytes(client, "canvas.png", png_bytes(canvas), k=str(K))
        cropped = search_bytes(client, "canvas.png", png_bytes(canvas), k=str(K), region=region)
    assert whole.status_code == cropped.status_code == 200, cropped.text
    body = cropped.json()
    x, y, width, height = map(int, region.split(","))
    assert body["query"] == {
        "name": "canvas.png",
        "id": None,
        "width": canvas.shape[1],
        "height": canvas.shape[0],
        "pacs": None,
        "region": {"x": x, "y": y, "width": width, "height": height},
        "positive": [],
        "negative": [],
    }
    assert body["neighbours"][0]["name"] == phantom(service, 4).name
    assert body["neighbours"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    vector, label = embed(embedder, canvas[y : y + height, x : x + width], stored, true_codes)
    check_equal(body["neighbours"], brute_force(stored, vector))
    check_scores(body["neighbours"], stored, vector)
    assert body["prediction"]["label"] == label  # the crop's prediction
    assert whole.json()["query"]["region"] is None
    assert [hit["score"] for hit in whole.json()["neighbours"]] != pytest.approx(
        [hit["score"] for hit in body["neighbours"]], abs=1e-3
    )


def test_a_region_of_an_indexed_image_is_read_again_and_embedded(service, embedder, stored, true_codes):
    with service.client() as client:
        name = client.get("/v1/images/8").json()["name"]
        original = read_grey(service.archive / "images" / name)
        answer = client.get("/v1/images/8/similar", params={"k": K, "region": "10,20,90,120"})
        plain = client.get("/v1/images/8/similar", params={"k": K}).json()
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["query"]["region"] == {"x": 10, "y": 20, "width": 90, "height": 120}
    assert (body["query"]["id"], body["query"]["width"]) == (8, original.shape[1])
    vector, label = embed(embedder, original[20:140, 10:100], stored, true_codes)
    check_equal(body["neighbours"], brute_force(stored, vector))
    check_scores(body["neighbours"], stored, vector)
    assert body["prediction"]["label"] == label
    assert plain["prediction"] is None and plain["neighbours"][0]["id"] == 8


BAD_REGIONS = [
    ("0,0,500,20", "inside"),  # wider than the image
    ("-5,0,40,40", "inside"),
    ("150,150,40,40", "inside"),
    ("0,0,0,40", "at least 16"),
    ("0,0,-40,40", "at least 16"),
    ("0,0,15,40", "at least 16"),
]


@pytest.mark.parametrize(("region", "problem"), BAD_REGIONS)
def test_a_region_that_does_not_fit_is_a_422_naming_it_and_the_image_size(service, region, problem):
    image = phantom(service, 0)
    height, width = read_grey(image).shape
    with service.client() as client:
        by_upload = search_bytes(client, "q.png", image.read_bytes(), region=region)
        by_id = client.get("/v1/images/1/similar", params={"region": region})
    for answer in (by_upload, by_id):
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert f"region {region}" in error and problem in error and f"{width} x {height}" in error


@pytest.mark.parametrize("region", ["1,2,3", "a,b,c,d", "1,2,3,4,5", "1.5,2,30,40", "1, 2, 30, 40"])
def test_a_malformed_region_is_a_422_naming_it(service, region):
    with service.client() as client:
        by_upload = search_bytes(client, "q.png", phantom(service, 0).read_bytes(), region=region)
        by_id = client.get("/v1/images/1/similar", params={"region": region})
    for answer in (by_upload, by_id):
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"].startswith("region: expected x,y,width,height") and repr(region) in answer.text


def rocchio(query: np.ndarray, positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """The Rocchio vector with the default weights, written out here on its own (no negatives: none)."""
    vector = 1.0 * query + 0.75 * positives.mean(axis=0) - (0.25 * negatives.mean(axis=0) if len(negatives) else 0)
    return vector / np.linalg.norm(vector)


def test_refining_by_example_equals_a_brute_force_search_with_the_rocchio_vector(service, embedder, stored, true_codes):
    ids, vectors = stored
    position = {int(i): n for n, i in enumerate(ids)}
    with service.client() as client:
        first = client.get("/v1/images/3/similar", params={"k": K}).json()["neighbours"]
        positive, negative = [first[1]["id"], first[3]["id"]], [first[2]["id"]]
        marks = {"positive": ",".join(map(str, positive)), "negative": ",".join(map(str, negative))}
        refined = client.get("/v1/images/3/similar", params={"k": K, **marks})
        included = client.get("/v1/images/3/similar", params={"k": K, **marks, "include_marked": "true"}).json()
        uploaded = search_bytes(client, "q.png", phantom(service, 2).read_bytes(), k=str(K), **marks)
    assert refined.status_code == uploaded.status_code == 200, (refined.text, uploaded.text)
    body = refined.json()
    assert (body["query"]["positive"], body["query"]["negative"], body["query"]["region"]) == (positive, negative, None)
    vector = rocchio(vectors[position[3]], vectors[[position[i] for i in positive]], vectors[[position[negative[0]]]])
    marked = {*positive, *negative}
    assert not marked & {hit["id"] for hit in body["neighbours"]} and len(body["neighbours"]) == K
    check_equal(body["neighbours"], brute_force(stored, vector, leave_out=marked))
    check_scores(body["neighbours"], stored, vector)
    check_equal(included["neighbours"], brute_force(stored, vector))
    assert set(positive) <= {hit["id"] for hit in included["neighbours"]}  # the positives are the nearest
    query, label = embed(embedder, read_grey(phantom(service, 2)), stored, true_codes)
    upload_vector = rocchio(query, vectors[[position[i] for i in positive]], vectors[[position[negative[0]]]])
    check_equal(uploaded.json()["neighbours"], brute_force(stored, upload_vector, leave_out=marked))
    check_scores(uploaded.json()["neighbours"], stored, upload_vector)
    assert uploaded.json()["prediction"]["label"] == label  # the query image's, not the refined vector's


def test_a_region_and_marks_together_keep_the_filters(service, embedder, stored, true_codes):
    original, canvas, region = pasted(service, 9)
    x, y, width, height = map(int, region.split(","))
    ids, vectors = stored
    position = {int(i): n for n, i in enumerate(ids)}
    with service.client() as client:
        answer = search_bytes(
            client, "canvas.png", png_bytes(canvas), k="50", region=region, positive="1", anatomy="5"
        ).json()
        codes = {image: client.get(f"/v1/images/{image}").json()["code"] for image in ids.tolist()}
    passing = {image for image, code in codes.items() if code.split("-")[2].startswith("5")}
    vector = rocchio(
        embed(embedder, canvas[y : y + height, x : x + width], stored, true_codes)[0],
        vectors[[position[1]]],
        np.zeros((0, 1)),
    )
    leave_out = set(ids.tolist()) - passing | {1}
    check_equal(answer["neighbours"], brute_force(stored, vector, k=50, leave_out=leave_out))
    assert {hit["id"] for hit in answer["neighbours"]} <= passing - {1}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"positive": "1,999999"}, "positive: no image with id 999999"),
        ({"negative": "424242"}, "negative: no image with id 424242"),
        ({"positive": "1,2", "negative": "2"}, "image 2 is marked both"),
        ({"positive": ",".join(map(str, range(1, 52)))}, "positive: expected comma-separated image ids, at most 50"),
        ({"negative": "1;2"}, "negative: expected comma-separated image ids"),
    ],
)
def test_bad_marks_are_a_422_naming_the_field_and_the_id(service, fields, message):
    with service.client() as client:
        by_upload = search_bytes(client, "q.png", phantom(service, 0).read_bytes(), **fields)
        by_id = client.get("/v1/images/1/similar", params=fields)
    for answer in (by_upload, by_id):
        assert answer.status_code == 422, answer.text
        assert message in answer.json()["error"]


def test_the_audit_note_records_the_refinement(service):
    with service.client() as client:
        answer = client.get("/v1/images/2/similar", params={"k": 3, "region": "0,0,64,64", "positive": "5,6"})
    assert answer.status_code == 200, answer.text
    result = CliRunner().invoke(cli, ["audit", "show", "--db", str(service.settings.db), "--json", "--last", "1"])
    assert result.exit_code == 0, result.output
    [record] = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["route"] == "GET /v1/images/{image_id}/similar"
    assert record["images"] == [2, *[hit["id"] for hit in answer.json()["neighbours"]]]
    assert (record["detail"]["region"], record["detail"]["positive"], record["detail"]["k"]) == ("0,0,64,64", [5, 6], 3)
    assert "negative" not in record["detail"]
