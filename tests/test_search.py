"""The search use case: an index and the model of its vectors, bound together; image in, prediction and
hits out; images in, stored. Checked against the embedder's own answers and brute-force search."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cbmir.checkpoint import Checkpoint, new_card
from cbmir.embed import Embedder
from cbmir.imaging.preprocess import Preprocessing
from cbmir.index import DuplicateImageError, Engine, Filters, IndexMismatchError, ModelStamp, QueryError
from cbmir.labels import LabelSchema
from cbmir.locations import Location
from cbmir.models import create_model
from cbmir.search import BLENDED_NEIGHBOURS, PreparedImage, Retrieval


def make_embedder(seed: int = 0, embedding_dim: int = 16, batch_size: int = 5) -> Embedder:
    torch.manual_seed(seed)
    model = create_model("chest-cnn-chowdhury", {"label": 2}, embedding_dim=embedding_dim)
    card = new_card(
        model, LabelSchema("single-label", {"label": ("normal", "pneumonia")}), Preprocessing(size=64, enhanced=False)
    )
    card["created"] = f"2024-01-0{seed + 1}T00:00:00+00:00"  # two embedders made in the same second differ
    return Embedder(Checkpoint(model, card), batch_size=batch_size)


def radiographs(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (90, 70 + i), dtype=np.uint8) for i in range(count)]


def prepared(embedder: Embedder, images: list[np.ndarray], dataset: str = "chest") -> list[PreparedImage]:
    return [
        PreparedImage(
            location=Location(Path(f"/x/{i}.png")),
            content_hash=f"{i:064x}",
            model_input=embedder.prepare(image),
            width=image.shape[1],
            height=image.shape[0],
            dataset=dataset,
            labels=("normal",) if i % 2 else (),
        )
        for i, image in enumerate(images)
    ]


def test_embed_inputs_batches_equal_one_run_per_image():
    embedder = make_embedder(batch_size=5)
    images = radiographs(12)
    together = embedder.embed(images)
    alone = [embedder.embed([image]) for image in images]
    np.testing.assert_allclose(together.vectors, np.concatenate([e.vectors for e in alone]), atol=1e-5)
    assert np.linalg.norm(together.vectors, axis=1) == pytest.approx(np.ones(12), abs=1e-5)
    assert [p.label for p in together.predictions] == [e.predictions[0].label for e in alone]
    assert embedder.embed([]).vectors.shape == (0, 16)


def test_store_keeps_the_embedders_predictions_and_search_finds_each_image_first(tmp_path):
    embedder = make_embedder()
    images = radiographs(12)
    with Retrieval.open(tmp_path, embedder) as retrieval:
        stored = retrieval.store(prepared(embedder, images))
        assert stored.ids.tolist() == list(range(1, 13))
        expected = embedder.embed(images)
        assert [p.label for p in stored.predictions] == [p.label for p in expected.predictions]
        rows = retrieval.engine.get(stored.ids)
        assert [row.predicted for row in rows] == [p.label for p in expected.predictions]
        assert [row.true_code for row in rows] == [("normal" if i % 2 else None) for i in range(12)]
        result = retrieval.search_image(images[4], 3)
        assert result.hits[0].id == 5 and result.hits[0].score == pytest.approx(1.0, abs=1e-4)
        brute = np.argsort(-(expected.vectors @ expected.vectors[4]))[:3] + 1
        assert [hit.id for hit in result.hits] == brute.tolist()
        normal = retrieval.search_image(images[4], 12, Filters(label="normal")).hits
        labelled = np.arange(1, 12, 2)  # the images labelled "normal" (ids 2, 4, ...), the query not among them
        by_score = labelled[np.argsort(-(expected.vectors[labelled] @ expected.vectors[4]))] + 1
        assert [hit.id for hit in normal] == by_score.tolist()
        with pytest.raises(DuplicateImageError):
            retrieval.store(prepared(embedder, images[:1]))


def test_a_searchs_prediction_blends_in_the_known_labels_of_the_nearest_images(tmp_path):
    embedder = make_embedder()
    images = radiographs(14)
    with Retrieval.open(tmp_path, embedder) as retrieval:
        stored = prepared(embedder, images)  # odd positions labelled "normal"
        stored[3] = replace(stored[3], labels=("pneumonia",))
        stored[5] = replace(stored[5], labels=("fracture",))  # a class the model does not know: no vote
        retrieval.store(stored)
        query = radiographs(1, seed=7)[0]
        own = embedder.embed([query])
        scores = retrieval.engine.embeddings(range(1, 15)) @ own.vectors[0]
        nearest = np.argsort(-scores)[:BLENDED_NEIGHBOURS]
        known = {1: "normal", 3: "pneumonia", 7: "normal", 9: "normal", 11: "normal", 13: "normal"}
        votes, voters = np.zeros(2), 0
        for i in nearest:
            if i in known:
                votes[["normal", "pneumonia"].index(known[i])] += np.exp((scores[i] - scores[nearest[0]]) / 0.05)
                voters += 1
        expected = 0.5 * own.probabilities["label"][0] + 0.5 * votes / votes.sum()
        answers = [
            retrieval.search_image(query, 12),  # its 10 nearest are the first of its hits
            retrieval.search_image(query, 3),  # too few hits: the 10 nearest are searched for the prediction
            retrieval.search_image(query, 12, Filters(label="normal")),  # filters do not change the prediction
        ]
        for answer in answers:
            assert answer.prediction.neighbours == voters > 0
            top = dict(answer.prediction.top["label"])
            assert [top["normal"], top["pneumonia"]] == pytest.approx(expected.tolist(), abs=1e-5)
            assert answer.prediction.label == ["normal", "pneumonia"][int(np.argmax(expected))]
    with Retrieval.open(tmp_path / "empty", embedder) as retrieval:
        alone = retrieval.search_image(query, 3).prediction
        assert alone.neighbours == 0 and alone.top == own.predictions[0].top


def test_a_bad_k_is_refused_before_the_model_runs(tmp_path):
    embedder = make_embedder()
    with Retrieval.open(tmp_path, embedder) as retrieval, pytest.raises(QueryError, match="k=0"):
        retrieval.search_image(np.zeros((10, 10), np.uint8), 0)


def test_an_index_of_another_model_is_refused(tmp_path):
    first, second = make_embedder(seed=0), make_embedder(seed=1)
    with Retrieval.open(tmp_path, first) as retrieval:
        retrieval.store(prepared(first, radiographs(3)))
    with pytest.raises(IndexMismatchError, match="you are using chest-cnn-chowdhury 2024-01-02"):
        Retrieval.open(tmp_path, second)
    with Engine.open(tmp_path) as engine:
        with pytest.raises(IndexMismatchError, match="search it with the model it was built with"):
            Retrieval(engine, second)
        assert engine.model == first.stamp
    wider = make_embedder(seed=0, embedding_dim=24)
    with pytest.raises(IndexMismatchError, match="/ 16-d; you are using .* / 24-d"):
        Retrieval.open(tmp_path, wider)


def test_the_stamp_names_the_checkpoint_and_the_dimension():
    embedder = make_embedder()
    assert embedder.stamp == ModelStamp(embedder.stamp.identity, 16)
    assert set(embedder.stamp.identity) == {"architecture", "labels", "preprocessing", "created"}
