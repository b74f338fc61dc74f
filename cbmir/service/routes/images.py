"""Indexed images: metadata, thumbnail, original; adding, removing, and recording a true code.

Thumbnails and originals are never answered from a path, which a removal could delete before the answer is
sent: a thumbnail is sent from its bytes, an original from a file opened by the route (see `Catalog`)."""

from __future__ import annotations

import mimetypes
import os
from collections.abc import Iterator
from typing import Annotated, BinaryIO
from urllib.parse import quote

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import Response, StreamingResponse

from cbmir.imaging.io import ImageReadError
from cbmir.imaging.preprocess import PreprocessingError
from cbmir.index import UnknownImageError
from cbmir.service import views
from cbmir.service.access import AuditNote
from cbmir.service.catalog import BatchRefusedError, Catalog, upload_name
from cbmir.service.dependencies import AuditDep, CatalogDep, SettingsDep
from cbmir.service.errors import BODY_ERRORS, BY_ID_ERRORS, UPLOAD_ERRORS, V1_ERRORS, documented
from cbmir.service.schemas import BatchOut, CodeIn, FailedOut, ImageDetailOut, ProposalOut

router = APIRouter(prefix="/v1", tags=["images"], responses=V1_ERRORS)
DatasetName = Annotated[str, Form(min_length=1, max_length=100)]
BATCH_SEMANTICS = (
    "Not atomic: each file is added or refused on its own, and the answer lists per file what was added "
    "(`items`) and what was refused with the reason (`failed`). When no file could be added the answer is "
    "422, naming every file and its reason."
)
CHUNK_BYTES = 1 << 16


class PngResponse(Response):
    media_type = "image/png"


@router.get(
    "/images/{image_id}", response_model=ImageDetailOut, summary="An indexed image's metadata", responses=BY_ID_ERRORS
)
def image(catalog: CatalogDep, settings: SettingsDep, audit: AuditDep, image_id: int) -> ImageDetailOut:
    audit.saw([image_id])
    return views.image_detail(catalog, settings, catalog.row(image_id))


@router.get(
    "/images/{image_id}/thumbnail",
    response_class=Response,  # not PngResponse, which would document the JSON error answers as image/png too
    summary="A PNG thumbnail",
    responses={200: {"description": "the thumbnail", "content": {"image/png": {}}}, **BY_ID_ERRORS},
)
def thumbnail(catalog: CatalogDep, audit: AuditDep, image_id: int) -> PngResponse:
    audit.saw([image_id])
    return PngResponse(catalog.thumbnail(image_id), headers={"Cache-Control": "private, max-age=3600"})


@router.get(
    "/images/{image_id}/original",
    response_class=StreamingResponse,
    summary="The original file (only when the server allows originals)",
    responses={**BY_ID_ERRORS, **documented(403)},
)
def original(catalog: CatalogDep, audit: AuditDep, image_id: int) -> StreamingResponse:
    audit.saw([image_id])
    name, file = catalog.original(image_id)
    quoted = quote(name)  # as Starlette's FileResponse names a download
    disposition = f"attachment; filename*=utf-8''{quoted}" if quoted != name else f'attachment; filename="{name}"'
    return StreamingResponse(
        chunks(file),
        media_type=mimetypes.guess_type(name)[0] or "application/octet-stream",
        headers={
            "Content-Disposition": disposition,
            "Content-Length": str(os.fstat(file.fileno()).st_size),
            "Cache-Control": "private, no-store",
        },
    )


def chunks(file: BinaryIO) -> Iterator[bytes]:
    """An open file's content, closing it at the end."""
    with file:
        while chunk := file.read(CHUNK_BYTES):
            yield chunk


@router.post(
    "/images",
    response_model=BatchOut,
    summary="Add images, with a known code or predicted",
    description=BATCH_SEMANTICS,
    responses=UPLOAD_ERRORS,
)
def add_images(
    catalog: CatalogDep,
    audit: AuditDep,
    files: Annotated[list[UploadFile], File(min_length=1)],
    code: Annotated[str | None, Form()] = None,
    dataset: DatasetName = "uploads",
) -> BatchOut:
    return ingest_batch(catalog, audit, files, dataset, catalog.check_code(code) if code else None)


@router.delete("/images/{image_id}", summary="Remove an image for good", responses=BY_ID_ERRORS)
def remove_image(catalog: CatalogDep, audit: AuditDep, image_id: int) -> dict[str, int]:
    catalog.remove(image_id)
    audit.saw([image_id])
    return {"removed": image_id}


@router.put(
    "/images/{image_id}/code",
    response_model=ImageDetailOut,
    summary="Accept or correct a proposal: store the true code",
    responses={**BY_ID_ERRORS, **BODY_ERRORS},
)
def set_code(
    catalog: CatalogDep, settings: SettingsDep, audit: AuditDep, image_id: int, body: CodeIn
) -> ImageDetailOut:
    previous = catalog.row(image_id).true_code
    catalog.set_true_code(image_id, body.code)
    audit.saw([image_id], code=catalog.row(image_id).true_code, previous=previous)
    return views.image_detail(catalog, settings, catalog.row(image_id))


def ingest_batch(
    catalog: Catalog, audit: AuditNote, files: list[UploadFile], dataset: str, true_code: str | None
) -> BatchOut:
    """Index each readable file; one that cannot be read or used is listed under `failed` with the reason
    (see `BATCH_SEMANTICS`); a `BatchRefusedError` when none could be added."""
    items, failed = [], []
    for upload in files:
        name = upload_name(upload.filename)
        try:
            image_id, prediction = catalog.ingest(name, upload.file.read(), dataset, true_code)
        except (ImageReadError, PreprocessingError) as error:
            reason = str(error)
            failed.append(FailedOut(name=name, error=reason if reason.startswith(name) else f"{name}: {reason}"))
            continue
        audit.saw([image_id], results=True)  # noted at once: the record must hold it whatever comes next
        try:
            row = catalog.row(image_id)
        except UnknownImageError:
            failed.append(FailedOut(name=name, error=f"{name}: added as image {image_id}, then removed meanwhile"))
            continue
        items.append(
            ProposalOut(
                name=name,
                id=image_id,
                duplicate=prediction is None,
                proposed=row.predicted,
                confidence=row.confidence,
                prediction=views.prediction(catalog, prediction) if prediction else None,
                true_code=row.true_code,
                words=catalog.words(row.predicted),
            )
        )
    audit.saw([], dataset=dataset, refused=len(failed) or None)
    if failed and not items:
        raise BatchRefusedError("no file was added: " + "; ".join(failure.error for failure in failed))
    return BatchOut(items=items, failed=failed)
