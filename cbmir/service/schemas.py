"""The API's request and response shapes; they make the OpenAPI document at /openapi.json."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from cbmir.index import CodeSource, Filters


class FilterParams(BaseModel):
    """The search filters, as form fields of an upload search or query parameters of a search by id. An
    empty value means "any"."""

    anatomy: str | None = Field(default=None, description="IRMA anatomical prefix, e.g. 9 (any leg region)")
    biology: str | None = Field(default=None, description="IRMA biological prefix, e.g. 7 (musculoskeletal)")
    technical: str | None = Field(default=None, description="IRMA technical prefix")
    directional: str | None = Field(default=None, description="IRMA directional prefix")
    code: str | None = Field(default=None, description="a full IRMA code")
    on: CodeSource = Field(default="best", description="filter on the best (true where known), true or predicted code")
    dataset: str | None = Field(default=None, description="only images of this dataset")
    label: str | None = Field(default=None, description="only images with this label or finding")

    @field_validator("anatomy", "biology", "technical", "directional", "code", "dataset", "label", mode="before")
    @classmethod
    def _empty_is_any(cls, value: Any) -> Any:
        return None if value == "" else value

    def filters(self) -> Filters:
        """The engine's filters (a `QueryError` names a malformed prefix or code)."""
        return Filters(**self.model_dump())


class AxisOut(BaseModel):
    axis: str
    code: str
    confidence: float
    text: str | None  # the axis code in words, from the code tables


class ClassScore(BaseModel):
    label: str
    probability: float


class PredictionOut(BaseModel):
    label: str  # the predicted IRMA code (with * where the model stopped) or class
    confidence: float
    kind: str  # "irma" or "classes"
    axes: list[AxisOut]
    top: dict[str, list[ClassScore]]
    words: str | None


class ImageOut(BaseModel):
    id: int
    name: str
    dataset: str
    width: int
    height: int
    code: str | None  # the true code where known, else the predicted one
    true_code: str | None
    predicted: str | None
    confidence: float | None
    words: str | None
    labels: list[str]
    thumbnail_url: str


class NeighbourOut(ImageOut):
    score: float


class ImageDetailOut(ImageOut):
    confidences: dict[str, float]
    extra: dict[str, Any]
    added_at: str
    original_url: str | None


class QueryOut(BaseModel):
    name: str | None = None
    id: int | None = None
    width: int
    height: int


class SearchOut(BaseModel):
    query: QueryOut
    prediction: PredictionOut | None
    neighbours: list[NeighbourOut]


class ProposalOut(BaseModel):
    name: str
    id: int
    duplicate: bool  # the same file was already indexed: its stored prediction is shown
    proposed: str | None
    confidence: float | None
    prediction: PredictionOut | None
    true_code: str | None
    words: str | None


class ErrorOut(BaseModel):
    """Every error answer: what was wrong, naming the file or field."""

    error: str


class FailedOut(BaseModel):
    name: str
    error: str


class BatchOut(BaseModel):
    items: list[ProposalOut]
    failed: list[FailedOut]


class CodeIn(BaseModel):
    code: str


class CodeEntry(BaseModel):
    code: str
    text: str | None
    level: int
    count: int


class CodesOut(BaseModel):
    tables: bool
    axes: dict[str, list[CodeEntry]]


class CallerOut(BaseModel):
    """The caller of `GET /v1/me`: their user name, role, and the routes ("METHOD path") it allows."""

    user: str
    role: Literal["reader", "annotator", "admin"]
    allowed: list[str]
