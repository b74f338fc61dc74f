"""Pre-labelling: proposed codes for a batch of files, and their export with the accepted codes."""

from __future__ import annotations

import csv
import io
import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response

from cbmir.service.dependencies import AuditDep, CatalogDep
from cbmir.service.errors import BY_ID_ERRORS, UPLOAD_ERRORS, V1_ERRORS
from cbmir.service.routes.images import BATCH_SEMANTICS, ingest_batch
from cbmir.service.schemas import IMAGE_IDS, AnnotationOut, BatchOut, ImageIds

router = APIRouter(prefix="/v1", tags=["annotations"], responses=V1_ERRORS)
EXPORTED: dict[int | str, dict[str, Any]] = {
    200: {
        "model": list[AnnotationOut],
        "description": "the images as CSV (the same fields) or as JSON",
        "content": {"text/csv": {"schema": {"type": "string"}}},
    }
}


@router.post(
    "/annotate",
    response_model=BatchOut,
    summary="Propose codes for a batch of files",
    description="Each readable file is indexed (so that its proposal can be accepted) and gets its proposed "
    "code; a file that is already indexed keeps its id and stored prediction. " + BATCH_SEMANTICS,
    responses=UPLOAD_ERRORS,
)
def annotate(
    catalog: CatalogDep,
    audit: AuditDep,
    files: Annotated[list[UploadFile], File(min_length=1)],
    dataset: Annotated[str, Form(min_length=1, max_length=100)] = "annotation",
) -> BatchOut:
    return ingest_batch(catalog, audit, files, dataset, None)


@router.get(
    "/annotations",
    summary="Proposals and accepted codes of images, as CSV or JSON",
    responses={**EXPORTED, **BY_ID_ERRORS},
)
def export(
    catalog: CatalogDep,
    audit: AuditDep,
    ids: Annotated[ImageIds, Query(description=IMAGE_IDS)],
    format: Annotated[Literal["csv", "json"], Query()] = "csv",
) -> Response:
    records = []
    rows = catalog.engine.get([int(part) for part in ids.split(",")])
    audit.saw([row.id for row in rows], results=True)
    for row in rows:
        status = "pending" if row.true_code is None else "accepted" if row.true_code == row.predicted else "corrected"
        records.append(
            AnnotationOut(
                id=row.id,
                name=catalog.name(row),
                proposed=row.predicted,
                confidence=row.confidence,
                true_code=row.true_code,
                status=status,
                words=catalog.words(row.code),
            ).model_dump()
        )
    disposition = {"Content-Disposition": f"attachment; filename=annotations.{format}"}
    if format == "json":
        return Response(json.dumps(records, indent=2), media_type="application/json", headers=disposition)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows({key: spreadsheet_safe(value) for key, value in record.items()} for record in records)
    return Response(text.getvalue(), media_type="text/csv", headers=disposition)


# What makes a spreadsheet read a cell as a formula (OWASP's list for CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: object) -> object:
    """A text cell that a spreadsheet would run as a formula, quoted with a leading apostrophe (shown as
    text, never run); numbers and other values as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value
