"""Domain objects (stored rows, hits, predictions) as the API's response shapes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cbmir.index import Hit, ImageRow
from cbmir.labels import Prediction
from cbmir.pacs import PacsSettings, pacs_uids
from cbmir.service.catalog import Catalog
from cbmir.service.schemas import AxisOut, ClassScore, ImageDetailOut, NeighbourOut, PacsOut, PredictionOut


def image_fields(catalog: Catalog, row: ImageRow) -> dict[str, Any]:
    """The fields every answer shows of an image (`ImageOut`)."""
    return {
        "id": row.id,
        "name": catalog.name(row),
        "dataset": row.dataset,
        "width": row.width,
        "height": row.height,
        "code": row.code,
        "true_code": row.true_code,
        "predicted": row.predicted,
        "confidence": row.confidence,
        "words": catalog.words(row.code),
        "labels": list(row.labels),
        "thumbnail_url": f"/v1/images/{row.id}/thumbnail",
    }


def image_detail(catalog: Catalog, settings: PacsSettings, row: ImageRow) -> ImageDetailOut:
    original = f"/v1/images/{row.id}/original" if catalog.allow_originals else None
    return ImageDetailOut(
        **image_fields(catalog, row),
        pacs=pacs_place(settings, row.extra),
        confidences=row.confidences,
        extra=row.extra,
        added_at=row.added_at,
        original_url=original,
    )


def pacs_place(settings: PacsSettings, tags: Mapping[str, Any]) -> PacsOut | None:
    """Where an image is on the PACS, and its viewer link, from its DICOM tags (an indexed image's `extra`, a
    read query's header); None for an image without the three UIDs."""
    uids = pacs_uids(tags)
    return None if uids is None else PacsOut(**uids, viewer_url=settings.viewer_link_of(tags))


def neighbours(catalog: Catalog, settings: PacsSettings, hits: list[Hit]) -> list[NeighbourOut]:
    return [
        NeighbourOut(score=hit.score, pacs=pacs_place(settings, hit.extra), **image_fields(catalog, hit))
        for hit in hits
    ]


def prediction(catalog: Catalog, predicted: Prediction) -> PredictionOut:
    axes = [
        AxisOut(axis=axis, code=p.code, confidence=p.confidence, text=catalog.axis_words(axis, p.code))
        for axis, p in (predicted.axes or {}).items()
    ]
    return PredictionOut(
        label=predicted.label,
        confidence=predicted.confidence,
        kind="irma" if predicted.axes else "classes",
        axes=axes,
        words=catalog.words(predicted.label),
        neighbours=predicted.neighbours,
        top={
            head: [ClassScore(label=label, probability=p) for label, p in scores]
            for head, scores in predicted.top.items()
        },
    )
