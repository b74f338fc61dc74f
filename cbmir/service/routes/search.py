"""Searching: by an uploaded radiograph, by an image on the PACS, or by an indexed image; each refined by a region
of the query image and by images of an earlier answer marked relevant or not (`cbmir.refine`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile

from cbmir.refine import Feedback, Region
from cbmir.search import SearchResult
from cbmir.service import views
from cbmir.service.access import AuditNote
from cbmir.service.catalog import Catalog, Decoded, upload_name
from cbmir.service.dependencies import (
    AuditDep,
    CatalogDep,
    FormFilters,
    FormRefine,
    QueryFilters,
    QueryRefine,
    SettingsDep,
)
from cbmir.service.errors import BY_ID_ERRORS, PACS_ERRORS, UPLOAD_ERRORS, V1_ERRORS
from cbmir.service.pacs_search import search_instance
from cbmir.service.schemas import MAX_RESULTS, FilterParams, PacsSearchIn, QueryOut, RegionOut, SearchOut
from cbmir.service.settings import ServiceSettings

router = APIRouter(prefix="/v1", tags=["search"], responses=V1_ERRORS)
PACS_SEARCH = (
    "Fetches the instance from the server's PACS (CBMIR_PACS_URL, with the server's credentials) and answers "
    "as a search by upload of that DICOM file would; `filters` and `refine` take what the upload search's "
    "form fields take. Errors name the UIDs and the reason: 404 when the PACS does not hold the instance, 422 "
    "when it holds no single-frame image cbmir reads (a report, several frames, no decoder, above the size "
    "limit), 502 when the PACS refuses this server's credentials, 503 when no PACS is configured, 504 when "
    "the PACS cannot be reached or does not answer in time."
)


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
    decoded, result = catalog.search_image(
        name, file.file.read(), k, filters.filters(), region=region, feedback=feedback
    )
    note_search(audit, [hit.id for hit in result.hits], k, filters, region, feedback)
    return searched(catalog, settings, name, decoded, result, region, feedback)


@router.post(
    "/search/pacs",
    response_model=SearchOut,
    summary="Search by an image on the PACS",
    description=PACS_SEARCH,
    responses=PACS_ERRORS,
)
def search_pacs(catalog: CatalogDep, settings: SettingsDep, audit: AuditDep, query: PacsSearchIn) -> SearchOut:
    # Noted first: the record names the instance asked for even when the search fails.
    audit.saw([], pacs={"study": query.study, "series": query.series, "instance": query.instance})
    region, feedback = query.refine.parsed_region(), query.refine.feedback(settings.rocchio())
    decoded, result = search_instance(
        catalog,
        settings,
        query.study,
        query.series,
        query.instance,
        query.k,
        query.filters.filters(),
        region=region,
        feedback=feedback,
    )
    note_search(audit, [hit.id for hit in result.hits], query.k, query.filters, region, feedback)
    return searched(catalog, settings, query.instance, decoded, result, region, feedback)


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
    own = QueryOut(
        id=image_id,
        name=catalog.name(row),
        width=row.width,
        height=row.height,
        pacs=views.pacs_place(settings, row.extra),
    )
    return SearchOut(
        query=query_out(own, region, feedback),
        prediction=views.prediction(catalog, prediction) if prediction else None,
        neighbours=views.neighbours(catalog, settings, hits),
    )


def searched(
    catalog: Catalog,
    settings: ServiceSettings,
    name: str,
    decoded: Decoded,
    result: SearchResult,
    region: Region | None,
    feedback: Feedback | None,
) -> SearchOut:
    """The answer to a search by a query image read here (uploaded, or fetched from the PACS)."""
    query = QueryOut(
        name=name, width=decoded.width, height=decoded.height, pacs=views.pacs_place(settings, decoded.meta.dicom)
    )
    return SearchOut(
        query=query_out(query, region, feedback),
        prediction=views.prediction(catalog, result.prediction),
        neighbours=views.neighbours(catalog, settings, result.hits),
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
