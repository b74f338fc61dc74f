"""The API's request and response shapes; they make the OpenAPI document at /openapi.json."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
)
from pydantic_core import PydanticCustomError

from cbmir.index import CodeSource, Filters
from cbmir.index.filters import AXIS_FILTERS
from cbmir.irma import AXES, AXIS_LENGTHS
from cbmir.refine import MIN_REGION_SIDE, Feedback, Region, Rocchio


def explained(what: str) -> WrapValidator:
    """A validator that refuses a value not of its field's form saying what the field takes: pydantic's own
    message would only quote the pattern."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as error:
            raise PydanticCustomError(
                "form", "expected {what}, got {given}", {"what": what, "given": repr(value)[:80]}
            ) from error

    return WrapValidator(check)


# The filters' forms, as patterns that the schema shows and pydantic enforces, so that the schema says exactly
# what the server takes (the domain's own checks, `cbmir.index.Filters`, take a little more: blanks around a
# value, non-ASCII letters that lower-case to a-z). Each also matches the empty value, which means "any".
POSITION = "[0-9A-Za-z]"
MAX_NAME = 255  # a dataset is named after its archive's folder (a file name) or an upload's dataset field


def _prefix_form(field: str, example: str = "") -> str:
    axis = AXIS_FILTERS[field]
    return f"an IRMA {axis} prefix: 1 to {AXIS_LENGTHS[axis]} digits or letters{example}"


TECHNICAL = _prefix_form("technical")
DIRECTIONAL = _prefix_form("directional")
ANATOMY = _prefix_form("anatomy", ", e.g. 9 (any leg region)")
BIOLOGY = _prefix_form("biology", ", e.g. 7 (musculoskeletal)")
CODE = "a full IRMA code: TTTT-DDD-AAA-BBB or its 13 characters without dashes, an axis may end in '*' (not known)"


def _prefix(field: str, what: str) -> Any:
    length = AXIS_LENGTHS[AXIS_FILTERS[field]]
    return Field(default=None, max_length=length, pattern=f"^{POSITION}{{0,{length}}}$", description=what)


def _axis(length: int) -> str:
    """One axis of a full code: its positions, of which a tail may be '*' (not known)."""
    known = [f"{POSITION}{{{count}}}" + r"\*" * (length - count) for count in range(length, 0, -1)]
    return "(?:" + "|".join([*known, r"\*" * length]) + ")"


def _code() -> str:
    """A full code: its four axes, with dashes between them or without."""
    axes = [_axis(AXIS_LENGTHS[axis]) for axis in AXES]
    return f"^(?:{'-'.join(axes)}|{''.join(axes)})?$"


class FilterParams(BaseModel):
    """The search filters, as form fields of an upload search or query parameters of a search by id. An
    empty value means "any", and so does a blank dataset or label."""

    anatomy: Annotated[str | None, explained(ANATOMY)] = _prefix("anatomy", ANATOMY)
    biology: Annotated[str | None, explained(BIOLOGY)] = _prefix("biology", BIOLOGY)
    technical: Annotated[str | None, explained(TECHNICAL)] = _prefix("technical", TECHNICAL)
    directional: Annotated[str | None, explained(DIRECTIONAL)] = _prefix("directional", DIRECTIONAL)
    code: Annotated[str | None, explained(CODE)] = Field(
        default=None, max_length=len("TTTT-DDD-AAA-BBB"), pattern=_code(), description=CODE
    )
    on: CodeSource = Field(default="best", description="filter on the best (true where known), true or predicted code")
    dataset: str | None = Field(default=None, max_length=MAX_NAME, description="only images of this dataset")
    label: str | None = Field(default=None, max_length=MAX_NAME, description="only images with this label or finding")

    @field_validator("anatomy", "biology", "technical", "directional", "code", mode="before")
    @classmethod
    def _empty_is_any(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("dataset", "label", mode="before")
    @classmethod
    def _blank_is_any(cls, value: Any) -> Any:
        """Free text, so a blank value means any, as an empty one does."""
        return None if isinstance(value, str) and not value.strip() else value

    def filters(self) -> Filters:
        """The engine's filters (which take every value the fields' patterns allow)."""
        return Filters(**self.model_dump())


# Image ids in a query parameter: digits, comma-separated; at most 10,000 characters (about 1,400 ids),
# which keeps the request line within what the server reads (uvicorn's h11 reads a head of up to 16 KiB).
IMAGE_IDS = "comma-separated image ids, e.g. 3,14,15"
ImageIds = Annotated[
    str, StringConstraints(pattern=r"^[0-9]{1,19}(?:,[0-9]{1,19})*$", max_length=10_000), explained(IMAGE_IDS)
]


# Refining a search (`cbmir.refine`). The patterns take what the server parses; whether a region fits its image
# is known once the image is read (a 422 naming the region, its value and the image's size).
REGION = (
    "search this region of the image only: x,y,width,height in the pixels of the image as uploaded or "
    f"stored (x,y its top-left corner), inside the image, each side at least {MIN_REGION_SIDE} pixels"
)
REGION_FORM = "x,y,width,height: four integers, in pixels"
REGION_PATTERN = r"^(?:-?[0-9]{1,9}(?:,-?[0-9]{1,9}){3})?$"
MAX_MARKED = 50
MARKED = f"comma-separated image ids, at most {MAX_MARKED}, e.g. 3,14,15"
_MARKED_PATTERN = f"^(?:[0-9]{{1,18}}(?:,[0-9]{{1,18}}){{0,{MAX_MARKED - 1}}})?$"


def _marked(description: str) -> Any:
    return Field(default=None, pattern=_MARKED_PATTERN, description=f"{description}: {MARKED}")


class RefineParams(BaseModel):
    """Refining a search, as form fields of an upload search or query parameters of a search by id: a region
    of the query image, and images of an earlier answer marked relevant or not (the query moves towards the
    first and away from the second, one Rocchio step; they are left out of the answer unless
    `include_marked`). An empty value means none."""

    region: Annotated[str | None, explained(REGION_FORM)] = Field(
        default=None, pattern=REGION_PATTERN, description=REGION
    )
    positive: Annotated[str | None, explained(MARKED)] = _marked("images marked relevant")
    negative: Annotated[str | None, explained(MARKED)] = _marked("images marked not relevant")
    include_marked: bool = Field(default=False, description="let the marked images come back in the answer")

    def parsed_region(self) -> Region | None:
        return Region.parse(self.region) if self.region else None

    def feedback(self, rocchio: Rocchio) -> Feedback | None:
        """The marked images with these Rocchio weights; None when nothing is marked."""
        positive, negative = _ids(self.positive), _ids(self.negative)
        if not positive and not negative:
            return None
        return Feedback(positive, negative, include_marked=self.include_marked, rocchio=rocchio)


def _ids(text: str | None) -> tuple[int, ...]:
    return tuple(int(value) for value in text.split(",")) if text else ()


MAX_RESULTS = 200
# A DICOM UID as `cbmir.locations.is_uid` takes it.
UID_FORM = "a DICOM UID: digits and dots, at most 64 characters, e.g. 1.2.840.10008.5.1.4.1.1.1"
Uid = Annotated[str, StringConstraints(pattern=r"^[0-9]+(?:\.[0-9]+)*$", max_length=64), explained(UID_FORM)]


class PacsSearchIn(BaseModel):
    """A search by an image on the server's PACS (``CBMIR_PACS_URL``): the instance's UIDs, and `k`, the
    `filters` and the refinement (`refine`) as a search by upload takes them."""

    model_config = ConfigDict(extra="forbid")  # a misspelt option is refused, not silently ignored

    study: Uid = Field(description=f"the Study Instance UID: {UID_FORM}")
    series: Uid = Field(description=f"the Series Instance UID: {UID_FORM}")
    instance: Uid = Field(description=f"the SOP Instance UID: {UID_FORM}")
    k: int = Field(default=10, ge=1, le=MAX_RESULTS, description="how many similar images to answer")
    filters: FilterParams = Field(default_factory=FilterParams)
    refine: RefineParams = Field(default_factory=RefineParams)


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
    neighbours: int = Field(
        description="how many of the query's nearest indexed images lent their known code (class) to the "
        "prediction, beside the model; 0: the model's own prediction"
    )


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


class PacsOut(BaseModel):
    """Where an image is on the PACS, from the UIDs kept when it was indexed or read from DICOM, and its link in
    the viewer."""

    study: str = Field(description="Study Instance UID")
    series: str = Field(description="Series Instance UID")
    instance: str = Field(description="SOP Instance UID")
    viewer_url: str | None = Field(
        description="the image in the viewer (CBMIR_VIEWER_URL with the UIDs filled in); null when the server "
        "has no viewer configured"
    )


PACS = (
    "where the image is on the PACS, with its viewer link, for an image that came from DICOM with its UIDs (from "
    "a PACS, the DICOM listener, DICOM files or uploads); null for others"
)


class NeighbourOut(ImageOut):
    score: float
    pacs: PacsOut | None = Field(description=PACS)


class ImageDetailOut(ImageOut):
    pacs: PacsOut | None = Field(description=PACS)
    confidences: dict[str, float]
    extra: dict[str, Any]
    added_at: str
    original_url: str | None


class RegionOut(BaseModel):
    x: int
    y: int
    width: int
    height: int


class QueryOut(BaseModel):
    """The query as searched: the image (uploaded: its name; indexed: its id and name; on the PACS: its SOP
    Instance UID) and its size, where it is on the PACS, and how the search was refined (the region
    searched, the images marked relevant and not)."""

    name: str | None = None
    id: int | None = None
    width: int
    height: int
    pacs: PacsOut | None = Field(default=None, description=PACS)
    region: RegionOut | None = None
    positive: list[int] = []
    negative: list[int] = []


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


class AnnotationOut(BaseModel):
    """An image in an export of annotations: a row of the CSV, an item of the JSON list."""

    id: int
    name: str
    proposed: str | None
    confidence: float | None
    true_code: str | None
    status: Literal["pending", "accepted", "corrected"]
    words: str | None


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


class ExplainOut(BaseModel):
    """Why a query and a neighbour match: for each, where it agrees with the other, as a PNG overlay (a data
    URL, transparent where agreement is low) of its thumbnail's size; the pair's embedding similarity; and the
    milliseconds the maps took (0 when they came from the cache)."""

    query: str = Field(description="data:image/png;base64,... overlay for the query's thumbnail")
    neighbour: str = Field(description="data:image/png;base64,... overlay for the neighbour's thumbnail")
    score: float
    milliseconds: float
