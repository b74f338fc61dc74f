"""The use cases every caller shares (CLI, service, indexer, benchmarks): "image in, prediction and hits
out" and "images in, stored".

`Retrieval` binds an index to the model its vectors come from, checked once when it is made, so a search
or an add can never mix one model's vectors with another's. Reading files, HTTP and progress bars are the
callers' business; the model runs in `cbmir.embed`, the vectors live in `cbmir.index`.

A search may be refined by example (`cbmir.refine.Feedback`): the query vector becomes the Rocchio vector of
it and the marked images' stored embeddings, the filters are kept, and the marked images are left out of
the k results (the engine is asked for k more) unless the feedback includes them.

A search's prediction is the model's, blended with the known labels (true codes, classes) of the query's
`BLENDED_NEIGHBOURS` nearest indexed images, whatever the search's filters and feedback: the nearest images
vote beside the model (`cbmir.labels.blend_with_neighbours`). An indexed image searched again meets itself
first, its own known code weighing most. Stored predictions stay the model's own, so that an index
does not depend on the order its images were added in.

A query is embedded once, as given. Measured over the 5 folds of irma2007-dev and not done (ad hoc): averaging
the query's vectors and probabilities over itself and three crops of 6% margins (no mirror flips: left and
right are part of the code) gave full-code P@1 0.783 vs 0.788 and the same classifier accuracy (0.755);
expanding the query with its first neighbour, +0.008 at P@10 and nothing at P@1.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from cbmir.index import MAX_K, Engine, Filters, Hit, ImageEntry, IndexMismatchError, IndexPolicy, UnknownImageError
from cbmir.index.engine import check_k
from cbmir.labels import Prediction, blend_with_neighbours, decode_predictions
from cbmir.locations import Location
from cbmir.refine import Feedback, RefinementError

if TYPE_CHECKING:  # the model's module (and torch) is the caller's to load: the indexer's readers never do
    from cbmir.embed import Embedder, Embeddings


# How many of a query's nearest indexed images lend their known labels to its prediction.
BLENDED_NEIGHBOURS = 10


@dataclass(frozen=True)
class PreparedImage:
    """One image ready to store: where it is read from, its content hash, the model input (the
    checkpoint's preprocessing of its pixels) and what the store keeps beside the vector. `labels` are
    the known labels: one is the true code or class, several are findings."""

    location: Location
    content_hash: str
    model_input: np.ndarray
    width: int
    height: int
    dataset: str
    labels: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchResult:
    prediction: Prediction
    hits: list[Hit]


@dataclass(frozen=True)
class Stored:
    """What `Retrieval.store` did: the new ids and predictions, in input order, and its time per stage."""

    ids: np.ndarray
    predictions: list[Prediction]
    model_seconds: float
    write_seconds: float


class Retrieval:
    """An index (`Engine`) and the `Embedder` whose vectors it holds."""

    def __init__(self, engine: Engine, embedder: Embedder):
        if engine.model is not None and engine.model.digest != embedder.stamp.digest:
            raise IndexMismatchError(
                f"the index {engine.location} holds vectors of model {engine.model.describe()}, not of "
                f"{embedder.stamp.describe()}: search it with the model it was built with"
            )
        self.engine, self.embedder = engine, embedder

    @classmethod
    def open(
        cls,
        db: str | os.PathLike[str],
        embedder: Embedder,
        *,
        vectors: str | os.PathLike[str] | None = None,
        index_type: str | None = None,
        policy: IndexPolicy | None = None,
    ) -> Retrieval:
        """Open (or create) the index `db` (a folder, or a PostgreSQL URL with its vectors in the folder
        `vectors`: see `Engine.open`) for `embedder`'s model; another model's index is an
        `IndexMismatchError`."""
        engine = Engine.open(db, vectors=vectors, model=embedder.stamp, index_type=index_type, policy=policy)
        return cls(engine, embedder)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Retrieval:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def search_image(self, pixels: np.ndarray, k: int = 10, filters: Filters | None = None) -> SearchResult:
        """The prediction for a grey radiograph (2-D array) and the k most similar indexed images passing
        `filters`. A bad k is refused before the model runs."""
        return self.search_input(self.embedder.prepare(pixels), k, filters)

    def search_input(
        self,
        model_input: np.ndarray,
        k: int = 10,
        filters: Filters | None = None,
        feedback: Feedback | None = None,
    ) -> SearchResult:
        """`search_image` for a radiograph already prepared for the model (`Embedder.prepare`), refined by
        `feedback` when given."""
        check_k(k)
        embeddings = self.embedder.embed_inputs([model_input])
        vector = embeddings.vectors[0]
        hits = self.search_vector(vector, k, filters, feedback)
        plain = (filters is None or filters.is_empty) and (feedback is None or not feedback.marked)
        nearest = hits if plain and k >= BLENDED_NEIGHBOURS else self.engine.search(vector, BLENDED_NEIGHBOURS)
        return SearchResult(self.blended_prediction(embeddings, nearest[:BLENDED_NEIGHBOURS]), hits)

    def blended_prediction(self, embeddings: Embeddings, nearest: Sequence[Hit], row: int = 0) -> Prediction:
        """The prediction for image `row` of `embeddings`, blended with the known labels of `nearest` (its
        nearest indexed images, unfiltered) by `cbmir.labels.blend_with_neighbours`; the model's own when none
        of them has a known label the model can use."""
        schema = self.embedder.schema
        probabilities = {head: values[row] for head, values in embeddings.probabilities.items()}
        known = [(hit.true_code, hit.score) for hit in nearest if hit.true_code]
        blended, voters = blend_with_neighbours(schema, probabilities, known)
        if not voters:
            return embeddings.predictions[row]
        rows = {head: values[None, :] for head, values in blended.items()}
        [prediction] = decode_predictions(schema, rows, irma_threshold=self.embedder.irma_threshold)
        return replace(prediction, neighbours=voters)

    def search_vector(
        self, vector: np.ndarray, k: int = 10, filters: Filters | None = None, feedback: Feedback | None = None
    ) -> list[Hit]:
        """The k images nearest to a query vector that pass `filters`, refined by `feedback` (see the module
        docstring). A marked id that is not indexed is a `RefinementError` naming its field."""
        if feedback is None or not feedback.marked:
            return self.engine.search(vector, k, filters)
        k = check_k(k)
        vector = feedback.rocchio(
            vector, self._marked("positive", feedback.positive), self._marked("negative", feedback.negative)
        )
        excluded = feedback.excluded
        hits = self.engine.search(vector, min(k + len(excluded), MAX_K), filters)
        return [hit for hit in hits if hit.id not in excluded][:k]

    def _marked(self, field: str, ids: tuple[int, ...]) -> np.ndarray:
        try:
            return self.engine.embeddings(ids)
        except UnknownImageError as error:
            raise RefinementError(f"{field}: {error}") from None

    def store(self, images: Sequence[PreparedImage]) -> Stored:
        """Embed and predict `images` and add them in one transaction (all or none; a content hash already
        stored is a `DuplicateImageError`)."""
        started = time.perf_counter()
        embeddings = self.embedder.embed_inputs([image.model_input for image in images])
        entries = image_entries(images, embeddings)
        written = time.perf_counter()
        ids = self.engine.add(entries)
        return Stored(ids, embeddings.predictions, written - started, time.perf_counter() - written)


def image_entries(images: Sequence[PreparedImage], embeddings: Embeddings) -> list[ImageEntry]:
    """What the store keeps of each image: `images` with their vectors and predictions (`embeddings` of
    their model inputs, in the same order)."""
    return [
        _entry(image, vector, prediction)
        for image, vector, prediction in zip(images, embeddings.vectors, embeddings.predictions, strict=True)
    ]


def _entry(image: PreparedImage, vector: np.ndarray, prediction: Prediction) -> ImageEntry:
    if prediction.axes:
        confidences = {axis: axis_prediction.confidence for axis, axis_prediction in prediction.axes.items()}
    else:
        confidences = {name: probability for head in prediction.top.values() for name, probability in head}
    return ImageEntry(
        location=str(image.location),
        content_hash=image.content_hash,
        width=image.width,
        height=image.height,
        dataset=image.dataset,
        true_code=image.labels[0] if len(image.labels) == 1 else None,
        predicted=prediction.label,
        confidences=confidences,
        confidence=prediction.confidence,
        labels=image.labels,
        extra=image.extra,
        embedding=vector,
    )
