"""The service's "why these match": agreement overlays (`cbmir.explain`) of a query and one neighbour, as
PNGs sized to each image's thumbnail, computed on demand and kept in a bounded LRU.

The torch model is loaded from the checkpoint folder on the first request (the searches may run ONNX
Runtime, which gives no spatial features) and must be the model the index was built with: another
checkpoint left in the folder since the server started is refused (`ModelChangedError`), never explained
with. Images are decoded in the catalog's decoding slots (`Catalog.decode`, `Catalog.prepare_indexed`), so
explanations share the service's memory bound. An answer is keyed by the query's and the neighbour's content
hashes, the query's region and the model's stamp (never by an id alone, which a removal could free for
another image), so a cached answer is always that of the same pair of images; at most `capacity` answers
(two thumbnail-sized PNGs each, tens of kB) are kept.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cbmir.explain import Explainer, in_image_frame, overlay_png
from cbmir.index import ImageRow
from cbmir.refine import Region
from cbmir.service.catalog import Catalog, thumbnail_size

CACHED_PAIRS = 128


@dataclass(frozen=True)
class Explanation:
    """Overlays of a pair (RGBA PNGs, each of its image's thumbnail size), the pair's embedding similarity,
    and the milliseconds its computation took (0 when it came from the cache)."""

    query_png: bytes
    neighbour_png: bytes
    score: float
    milliseconds: float


@dataclass(frozen=True)
class _Image:
    """One image of a pair as the explainer needs it."""

    model_input: np.ndarray
    width: int
    height: int
    region: Region | None = None  # the part of the image the model input shows (None: all of it)


class Explanations:
    """The explanations of one catalog's pairs (see the module docstring). Safe to share between threads."""

    def __init__(self, catalog: Catalog, checkpoint: Path, capacity: int = CACHED_PAIRS):
        self.catalog, self.checkpoint, self.capacity = catalog, checkpoint, capacity
        self.stamp = catalog.retrieval.embedder.stamp
        self._explainer: Explainer | None = None
        self._loading = threading.Lock()
        self._cached: OrderedDict[tuple[str, ...], Explanation] = OrderedDict()
        self._cache_lock = threading.Lock()

    def explainer(self) -> Explainer:
        """The checkpoint's torch model as an `Explainer`, loaded once, on first use."""
        with self._loading:
            if self._explainer is None:
                self._explainer = Explainer.load(self.checkpoint, self.stamp)
            return self._explainer

    def by_id(self, image_id: int, neighbour_id: int) -> Explanation:
        """The explanation of indexed image `image_id` and its neighbour `neighbour_id` (unknown ids are an
        `UnknownImageError`)."""
        query, neighbour = self.catalog.row(image_id), self.catalog.row(neighbour_id)
        return self._explain(query.content_hash, lambda: self._indexed(query), neighbour)

    def by_upload(self, name: str, data: bytes, neighbour_id: int, region: Region | None = None) -> Explanation:
        """The explanation of an uploaded query, or of its `region` (as a search by that region sees it; the
        overlay is still the whole upload's, transparent outside the region), and the indexed image
        `neighbour_id`."""
        neighbour = self.catalog.row(neighbour_id)

        def decoded() -> _Image:
            upload = self.catalog.decode(name, data, region=region)
            return _Image(upload.model_input, upload.width, upload.height, region)

        return self._explain(hashlib.sha256(data).hexdigest() + (f"@{region}" if region else ""), decoded, neighbour)

    def in_thumbnail_frame(self, grid: np.ndarray, width: int, height: int, region: Region | None = None) -> np.ndarray:
        """An agreement map over the model input as a map over a `width` x `height` image's thumbnail; of a
        model input that shows a `region` of the image, placed there (agreement 0 elsewhere)."""
        padding = self.catalog.retrieval.embedder.pipeline.padding
        size = thumbnail_size(width, height)
        if region is None:
            return in_image_frame(grid, width, height, padding, size)
        scale_x, scale_y = size[0] / width, size[1] / height
        left, top = int(region.x * scale_x), int(region.y * scale_y)
        right = max(left + 1, min(size[0], round((region.x + region.width) * scale_x)))
        bottom = max(top + 1, min(size[1], round((region.y + region.height) * scale_y)))
        frame = np.zeros((size[1], size[0]), np.float32)
        frame[top:bottom, left:right] = in_image_frame(
            grid, region.width, region.height, padding, (right - left, bottom - top)
        )
        return frame

    def _indexed(self, row: ImageRow) -> _Image:
        return _Image(self.catalog.prepare_indexed(row), row.width, row.height)

    def _explain(self, query_hash: str, query: Callable[[], _Image], neighbour: ImageRow) -> Explanation:
        """The cached explanation of the query (made by `query` on a miss) and `neighbour`, or a new one."""
        key = (query_hash, neighbour.content_hash, self.stamp.digest or "")
        with self._cache_lock:
            if key in self._cached:
                self._cached.move_to_end(key)
                return replace(self._cached[key], milliseconds=0.0)
        started = time.perf_counter()
        explainer = self.explainer()
        first, second = query(), self._indexed(neighbour)
        agreement = explainer.agreement(first.model_input, second.model_input)
        query_png, neighbour_png = (
            overlay_png(self.in_thumbnail_frame(grid, image.width, image.height, image.region))
            for grid, image in ((agreement.query, first), (agreement.neighbour, second))
        )
        answer = Explanation(query_png, neighbour_png, agreement.score, (time.perf_counter() - started) * 1e3)
        with self._cache_lock:
            self._cached[key] = answer
            while len(self._cached) > self.capacity:
                self._cached.popitem(last=False)
        return answer
