"""Searching: by an uploaded radiograph, or by an indexed image; either refined by a region of the query image
and by images of an earlier answer marked relevant or not (`cbmir.refine`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile

from cbmir.refine import Feedback, Region
from cbmir.service import views
from cbmir.service.access import AuditNote
from cbmir.service.catalog import upload_name
from cbmir.service.dependencies import (
    AuditDep,
    CatalogDep,
    FormFilters,
    FormRefine,
    QueryFilters,
    QueryRefine,
    SettingsDep,
)
from cbmir.service.errors import BY_ID_ERRORS, UPLOAD_ERRORS, V1_ERRORS
from cbmir.service.schemas import FilterParams, QueryOut, RegionOut, SearchOut

router = APIRouter(prefix="/v1", tags=["search"], responses=V1_ERRORS)
MAX_RESULTS = 200


@router.post("/search", response_model=SearchOut, summary="Search by an uploaded radiograph", responses=UPLOAD_ERRORS)
def search_upload(
    catalog: CatalogDep,
    settings: SettingsDep,
    audit: AuditDep,
    file: Annotated[UploadFile, File(description="PNG, JPEG, TIFF, BMP or DICOM")],
    filters: FormFilters,
    refine: FormRefine,
    k: Annotated[int, Form(ge=1, le=MAX_RESULTS)] = 10,
) -> SearchOut:
    name = upload_name(file.filename)
    region, feedback = refine.parsed_region(), refine.feedback(settings.rocchio())
    decoded, result = catalog.search_upload(
        name, file.file.read(), k, filters.filters(), region=region, feedback=feedback
    )
    note_search(audit, [hit.id for hit in result.hits], k, filters, region, feedback)
    return SearchOut(
        query=query_out(QueryOut(name=name, width=decoded.width, height=decoded.height), region, feedback),
        prediction=views.prediction(catalog, result.prediction),
        neighbours=views.neighbours(catalog, result.hits),
    )


@router.get(
    "/images/{image_id}/similar", response_model=SearchOut, summary="Search by an indexed image", responses=BY_ID_ERRORS
)
def search_by_id(
    catalog: CatalogDep,
    settings: SettingsDep,
    audit: AuditDep,
    image_id: int,
    filters: QueryFilters,
    refine: QueryRefine,
    k: Annotated[int, Query(ge=1, le=MAX_RESULTS)] = 10,
) -> SearchOut:
    region, feedback = refine.parsed_region(), refine.feedback(settings.rocchio())
    row, prediction, hits = catalog.similar(image_id, k, filters.filters(), region=region, feedback=feedback)
    audit.saw([image_id])
    note_search(audit, [hit.id for hit in hits], k, filters, region, feedback)
    return SearchOut(
        query=query_out(
            QueryOut(id=image_id, name=catalog.name(row), width=row.width, height=row.height), region, feedback
        ),
        prediction=views.prediction(catalog, prediction) if prediction else None,
        neighbours=views.neighbours(catalog, hits),
    )


def note_search(
    audit: AuditNote, ids: list[int], k: int, filters: FilterParams, region: Region | None, feedback: Feedback | None
) -> None:
    """The audit note of a search: its results, k, the filters and the refinement."""
    audit.saw(
        ids,
        results=True,
        k=k,
        filters=filters.model_dump(exclude_none=True) or None,
        region=str(region) if region else None,
        positive=list(feedback.positive) if feedback and feedback.positive else None,
        negative=list(feedback.negative) if feedback and feedback.negative else None,
        include_marked=True if feedback and feedback.include_marked else None,
    )


def query_out(query: QueryOut, region: Region | None, feedback: Feedback | None) -> QueryOut:
    """The query as searched, with its refinement echoed."""
    if region is not None:
        query.region = RegionOut(x=region.x, y=region.y, width=region.width, height=region.height)
    if feedback is not None:
        query.positive, query.negative = list(feedback.positive), list(feedback.negative)
    return query
