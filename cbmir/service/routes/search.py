"""Searching: by an uploaded radiograph, or by an indexed image."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile

from cbmir.service import views
from cbmir.service.catalog import upload_name
from cbmir.service.dependencies import AuditDep, CatalogDep, FormFilters, QueryFilters
from cbmir.service.errors import BY_ID_ERRORS, UPLOAD_ERRORS, V1_ERRORS
from cbmir.service.schemas import QueryOut, SearchOut

router = APIRouter(prefix="/v1", tags=["search"], responses=V1_ERRORS)
MAX_RESULTS = 200


@router.post("/search", response_model=SearchOut, summary="Search by an uploaded radiograph", responses=UPLOAD_ERRORS)
def search_upload(
    catalog: CatalogDep,
    audit: AuditDep,
    file: Annotated[UploadFile, File(description="PNG, JPEG, TIFF, BMP or DICOM")],
    filters: FormFilters,
    k: Annotated[int, Form(ge=1, le=MAX_RESULTS)] = 10,
) -> SearchOut:
    name = upload_name(file.filename)
    decoded, result = catalog.search_upload(name, file.file.read(), k, filters.filters())
    audit.saw([hit.id for hit in result.hits], results=True, k=k, filters=filters.model_dump(exclude_none=True) or None)
    return SearchOut(
        query=QueryOut(name=name, width=decoded.width, height=decoded.height),
        prediction=views.prediction(catalog, result.prediction),
        neighbours=views.neighbours(catalog, result.hits),
    )


@router.get(
    "/images/{image_id}/similar", response_model=SearchOut, summary="Search by an indexed image", responses=BY_ID_ERRORS
)
def search_by_id(
    catalog: CatalogDep,
    audit: AuditDep,
    image_id: int,
    filters: QueryFilters,
    k: Annotated[int, Query(ge=1, le=MAX_RESULTS)] = 10,
) -> SearchOut:
    row, hits = catalog.similar(image_id, k, filters.filters())
    audit.saw([image_id])
    audit.saw([hit.id for hit in hits], results=True, k=k, filters=filters.model_dump(exclude_none=True) or None)
    return SearchOut(
        query=QueryOut(id=image_id, name=catalog.name(row), width=row.width, height=row.height),
        prediction=None,
        neighbours=views.neighbours(catalog, hits),
    )
