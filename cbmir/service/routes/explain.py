"""Why a neighbour matches its query: agreement overlays of the pair (`cbmir.service.explanations`), for a
query that is an indexed image or an upload."""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile

from cbmir.refine import Region
from cbmir.service.catalog import upload_name
from cbmir.service.dependencies import AuditDep, ExplanationsDep
from cbmir.service.errors import BY_ID_ERRORS, UPLOAD_ERRORS, V1_ERRORS
from cbmir.service.explanations import Explanation
from cbmir.service.schemas import REGION, REGION_FORM, REGION_PATTERN, ExplainOut, explained

router = APIRouter(prefix="/v1", tags=["explain"], responses=V1_ERRORS)
NEIGHBOUR = "the id of the neighbour (an indexed image) to explain"
EXPLAINED_REGION = REGION.replace("search this region", "explain this region", 1)
COST = (
    " Computed on demand (both images read and prepared, one model run on the pair: about 70 ms on 2 idle CPU "
    "cores) and kept: asking again answers from memory, with `milliseconds` 0."
)


def answer(explanation: Explanation) -> ExplainOut:
    def data_url(png: bytes) -> str:
        return "data:image/png;base64," + base64.b64encode(png).decode()

    return ExplainOut(
        query=data_url(explanation.query_png),
        neighbour=data_url(explanation.neighbour_png),
        score=explanation.score,
        milliseconds=explanation.milliseconds,
    )


@router.get(
    "/images/{image_id}/explain",
    response_model=ExplainOut,
    summary="Why a neighbour matches an indexed image: where each agrees with the other",
    description="Overlays for both thumbnails." + COST,
    responses=BY_ID_ERRORS,
)
def explain_by_id(
    explanations: ExplanationsDep,
    audit: AuditDep,
    image_id: int,
    neighbour: Annotated[int, Query(description=NEIGHBOUR)],
) -> ExplainOut:
    explanation = explanations.by_id(image_id, neighbour)
    audit.saw([image_id, neighbour])
    return answer(explanation)


@router.post(
    "/explain",
    response_model=ExplainOut,
    summary="Why a neighbour matches an uploaded radiograph: where each agrees with the other",
    description="Overlays for the upload (at its thumbnail's size) and the neighbour's thumbnail." + COST,
    responses={**UPLOAD_ERRORS, **BY_ID_ERRORS},
)
def explain_upload(
    explanations: ExplanationsDep,
    audit: AuditDep,
    file: Annotated[UploadFile, File(description="the query: PNG, JPEG, TIFF, BMP or DICOM")],
    neighbour: Annotated[int, Form(description=NEIGHBOUR)],
    region: Annotated[
        str | None, explained(REGION_FORM), Form(pattern=REGION_PATTERN, description=EXPLAINED_REGION)
    ] = None,
) -> ExplainOut:
    parsed = Region.parse(region) if region else None
    explanation = explanations.by_upload(upload_name(file.filename), file.file.read(), neighbour, parsed)
    audit.saw([neighbour], region=region or None)
    return answer(explanation)
