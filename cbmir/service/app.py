"""The query service: a versioned HTTP API (`/v1`, bearer token) over one index and its model, and the web
page that uses it (served at `/`).

The model and the engine are loaded once, at start-up, and shared by every request: the engine serialises
its own work, and model runs take turns behind one lock (each already uses every core). Request handlers
are plain functions, which FastAPI runs in its thread pool, so a slow image never blocks the others.

Every error is a JSON object `{"error": "..."}` with a 4xx status that says what was wrong: a missing or
wrong token (401), an unknown image (404), a request body over the limit (413), a file that is not a
readable radiograph (415 or 422, naming the file and the reason), a bad parameter (422).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import secrets
import threading
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import cv2
import numpy as np
import swagger_ui_bundle
from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from cbmir.checkpoint import load_checkpoint
from cbmir.datasets import IMAGE_SUFFIXES, Record, load_medmnist_image
from cbmir.embed import Embedder
from cbmir.errors import CbmirError
from cbmir.files import write_atomically
from cbmir.imaging.io import (
    ImageReadError,
    ImageTooLargeError,
    NotAnImageError,
    read_image,
)
from cbmir.imaging.preprocess import to_uint8, to_uint16
from cbmir.index import DuplicateImageError, Engine, Filters, Hit, QueryError
from cbmir.irma import (
    AXES,
    AXIS_LENGTHS,
    CodeTables,
    IrmaCode,
    IrmaCodeError,
    short_text,
    significant,
)
from cbmir.labels import Prediction
from cbmir.service.settings import ServiceSettings
from indexer.pipeline import Mapped, dicom_tags, embed_entries

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
UPLOADS, THUMBNAILS = "uploads", "thumbnails"
THUMBNAIL_SIDE = 320
MAX_EXPORT_IDS = 10_000
IMAGE_FIELDS = ("id", "location", "dataset", "width", "height", "true_code", "predicted", "confidence", "labels",
                "extra")
UPLOAD_NAME = "upload_name"  # the key in `extra` of the file name an uploaded image was sent with
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; frame-ancestors 'none'",
}


class ApiError(HTTPException):
    """An error answered as {"error": message} with `status`."""

    def __init__(self, status: int, message: str):
        super().__init__(status_code=status, detail=message)


# -- response shapes (they make the OpenAPI docs) -----------------------------------------------------------

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


# -- the shared parts ---------------------------------------------------------------------------------------

class Service:
    """What every request shares: settings, the engine, the embedder and the code tables."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.embedder = Embedder(load_checkpoint(settings.model))
        self.tables = CodeTables.load(settings.tables) if settings.tables else None
        self.engine = Engine.open(settings.db, embedder=self.embedder)
        self.model_lock = threading.Lock()
        for name in (UPLOADS, THUMBNAILS):
            (self.engine.folder / name).mkdir(exist_ok=True)

    def close(self) -> None:
        self.engine.close()

    # -- words ------------------------------------------------------------------------------------------

    def words(self, code: str | None) -> str | None:
        if code is None or self.tables is None:
            return None
        try:
            return self.tables.describe(code)
        except IrmaCodeError:
            return None  # a chest class or another plain label: it is its own words

    def prediction(self, prediction: Prediction) -> PredictionOut:
        axes = []
        if prediction.axes:
            axes = [AxisOut(axis=axis, code=p.code, confidence=p.confidence, text=self.axis_words(axis, p.code))
                    for axis, p in prediction.axes.items()]
        return PredictionOut(
            label=prediction.label, confidence=prediction.confidence, kind="irma" if prediction.axes else "classes",
            axes=axes, words=self.words(prediction.label),
            top={head: [ClassScore(label=label, probability=p) for label, p in scores]
                 for head, scores in prediction.top.items()},
        )

    def axis_words(self, axis: str, code: str) -> str | None:
        if self.tables is None:
            return None
        return ", ".join(self.tables.decode(_single_axis_code(axis, code))[axis])

    # -- images -----------------------------------------------------------------------------------------

    def image(self, row: dict[str, Any]) -> dict[str, Any]:
        code = row["true_code"] or row["predicted"]
        path, _, position = row["location"].partition("#")
        name = row["extra"].get(UPLOAD_NAME) or Path(path).name + (f"#{position}" if position else "")
        return {
            "id": row["id"], "name": name,
            "dataset": row["dataset"], "width": row["width"],
            "height": row["height"], "code": code, "true_code": row["true_code"], "predicted": row["predicted"],
            "confidence": row["confidence"], "words": self.words(code), "labels": list(row["labels"]),
            "thumbnail_url": f"/v1/images/{row['id']}/thumbnail",
        }

    def row(self, image_id: int, fields: tuple[str, ...] = ()) -> dict[str, Any]:
        try:
            [row] = self.engine.get([image_id], (*IMAGE_FIELDS, *fields))
        except QueryError:
            raise ApiError(404, f"no image with id {image_id} in this index") from None
        return row

    def neighbours(self, hits: list[Hit]) -> list[NeighbourOut]:
        rows = {row["id"]: row for row in self.engine.get([hit.id for hit in hits], IMAGE_FIELDS)}
        return [NeighbourOut(score=hit.score, **self.image(rows[hit.id])) for hit in hits]

    def source_pixels(self, location: str) -> np.ndarray:
        """The pixels of a stored image, read again from where it was indexed from."""
        path, _, position = location.partition("#")
        try:
            if position:
                split, index = position.split("/")
                return load_medmnist_image(Record(position, Path(path), (), "index", split, int(index)))
            return read_image(path, max_pixels=self.settings.max_pixels).pixels
        except (CbmirError, OSError, ValueError) as error:
            raise ApiError(404, f"the original of this image cannot be read any more ({error})") from None

    def thumbnail(self, image_id: int) -> Path:
        """A PNG of at most THUMBNAIL_SIDE pixels a side, made on first request and kept."""
        row = self.row(image_id)  # a removed image has no thumbnail, even if its file were left behind
        path = self.engine.folder / THUMBNAILS / f"{image_id}.png"
        if not path.exists():
            pixels = to_uint8(self.source_pixels(row["location"]))
            scale = THUMBNAIL_SIDE / max(pixels.shape)
            if scale < 1:
                size = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))
                pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
            _, encoded = cv2.imencode(".png", pixels)
            write_atomically(path, encoded.tobytes())
        return path

    # -- adding -----------------------------------------------------------------------------------------

    def ingest(self, name: str, data: bytes, dataset: str, true_code: str | None) -> tuple[int, Prediction | None]:
        """Index one uploaded file (kept under uploads/ so thumbnails and originals work); returns its id and
        prediction, or the stored image's id and None when the same file is already indexed."""
        content_hash = hashlib.sha256(data).hexdigest()
        existing = self.engine.id_for_hash(content_hash)
        if existing is not None:
            return existing, None
        radiograph = read_upload(name, data, self.settings)
        if radiograph.meta.source_format == "dicom":
            # The DICOM header names the patient: keep only the pixels (16-bit PNG), and only the configured
            # tags in the store.
            suffix, kept = ".png", cv2.imencode(".png", to_uint16(radiograph.pixels))[1].tobytes()
        else:
            suffix, kept = Path(name).suffix.lower(), data
        stored = self.engine.folder / UPLOADS / (content_hash + (suffix if suffix in IMAGE_SUFFIXES else ""))
        record = Record(name, stored, (true_code,) if true_code else (), dataset)
        mapped = Mapped(record, content_hash, self.embedder.pipeline(radiograph.pixels),
                        width=int(radiograph.pixels.shape[1]), height=int(radiograph.pixels.shape[0]),
                        extra={**dicom_tags(radiograph.meta.dicom, self.settings.dicom_tags), UPLOAD_NAME: name})
        with self.model_lock:
            [(entry, prediction)] = embed_entries([mapped], self.embedder, dataset)
        write_atomically(stored, kept)
        try:
            [image_id] = self.engine.add([entry])
        except DuplicateImageError:  # the same file, added by a concurrent request meanwhile
            return self.engine.id_for_hash(content_hash), None
        except BaseException:
            stored.unlink(missing_ok=True)
            raise
        return int(image_id), prediction

    def remove(self, image_id: int) -> None:
        row = self.row(image_id)
        self.engine.remove([image_id])
        (self.engine.folder / THUMBNAILS / f"{image_id}.png").unlink(missing_ok=True)
        uploaded = Path(row["location"])
        if uploaded.parent == self.engine.folder.absolute() / UPLOADS:
            uploaded.unlink(missing_ok=True)

    def check_code(self, code: str) -> str:
        """A true code as an annotator gives it: a complete IRMA code for an IRMA model, else one of the
        model's classes."""
        schema = self.embedder.schema
        code = code.strip()
        if schema.task == "irma-axes":
            try:
                parsed = IrmaCode.parse(code)
            except IrmaCodeError as error:
                raise ApiError(422, f"code {code!r}: {error}") from None
            if "*" in str(parsed):
                raise ApiError(422, f"code {code!r}: a true code must be complete (no '*')")
            return str(parsed)
        classes = [label for labels in schema.heads.values() for label in labels]
        if code not in classes:
            raise ApiError(422, f"label {code!r} is not one of this model's classes: {', '.join(classes)}")
        return code


def _single_axis_code(axis: str, code: str) -> IrmaCode:
    """A full code that is `code` on `axis` and unspecified (zeros) elsewhere, to decode one axis."""
    return IrmaCode.parse("-".join(code if name == axis else "0" * AXIS_LENGTHS[name] for name in AXES))


def read_upload(name: str, data: bytes, settings: ServiceSettings):
    """The radiograph in an uploaded file, or the 4xx error that says why not."""
    try:
        return read_image(data, name=name, max_pixels=settings.max_pixels)
    except ImageTooLargeError as error:
        raise ApiError(413, str(error)) from None
    except NotAnImageError as error:
        raise ApiError(415, str(error)) from None
    except ImageReadError as error:
        raise ApiError(422, str(error)) from None


def upload_name(upload: UploadFile) -> str:
    """The file name the client gave, reduced to its last part (it names the file in messages, never a path)."""
    name = re.split(r"[\\/]", upload.filename or "")[-1].strip()
    return name or "upload"


# -- the application ----------------------------------------------------------------------------------------

def _service(request: Request) -> Service:
    return request.app.state.service


Shared = Annotated[Service, Depends(_service)]


def create_app(settings: ServiceSettings) -> FastAPI:
    """The service for `settings`, with the model and the index loaded now (so that a bad checkpoint or
    index is reported before the server starts); the index is closed when the server stops."""
    shared = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            shared.close()

    app = FastAPI(title="cbmir", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Content-based retrieval of radiographs: search similar prior cases, predict IRMA "
                              "codes, pre-label images. Every /v1 endpoint needs `Authorization: Bearer <token>`.")
    app.state.service = shared
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "PUT", "DELETE"], allow_headers=["Authorization"])

    @app.middleware("http")
    async def limits_and_headers(request: Request, call_next):
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None:
                return error_response(411, "the request must give its Content-Length")
            if not length.isdigit() or int(length) > settings.max_upload_bytes:
                return error_response(413, f"the request body ({length} bytes) is above the limit of "
                                           f"{settings.max_upload_bytes:,} bytes")
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return error_response(error.status_code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        problems = []
        for problem in error.errors():
            where = ".".join(str(part) for part in problem.get("loc", ()) if part not in ("body", "query", "path"))
            problems.append(f"{where or 'request'}: {problem.get('msg', 'invalid')}")
        return error_response(422, "; ".join(problems))

    @app.exception_handler(QueryError)
    async def query_error(request: Request, error: QueryError):
        return error_response(422, str(error))

    @app.exception_handler(CbmirError)
    async def cbmir_error(request: Request, error: CbmirError):
        return error_response(422, str(error))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return error_response(500, "internal error: the server log has the details")

    def authorised(request: Request) -> None:
        if settings.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), settings.token.encode()):
            raise HTTPException(401, "a valid token is needed: send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorised)])

    def filters_from(anatomy, biology, technical, directional, code, on, dataset, label) -> Filters:
        return Filters(anatomy=anatomy or None, biology=biology or None, technical=technical or None,
                       directional=directional or None, code=code or None, on=on, dataset=dataset or None,
                       label=label or None)

    @v1.post("/search", response_model=SearchOut, summary="Search by an uploaded radiograph")
    def search_upload(
        svc: Shared, file: Annotated[UploadFile, File(description="PNG, JPEG, TIFF, BMP or DICOM")],
        k: Annotated[int, Form(ge=1, le=200)] = 10, anatomy: Annotated[str | None, Form()] = None,
        biology: Annotated[str | None, Form()] = None, technical: Annotated[str | None, Form()] = None,
        directional: Annotated[str | None, Form()] = None, code: Annotated[str | None, Form()] = None,
        on: Annotated[str, Form()] = "best", dataset: Annotated[str | None, Form()] = None,
        label: Annotated[str | None, Form()] = None,
    ) -> SearchOut:
        filters = filters_from(anatomy, biology, technical, directional, code, on, dataset, label)
        name = upload_name(file)
        radiograph = read_upload(name, file.file.read(), svc.settings)
        with svc.model_lock:
            prediction, hits = svc.engine.search_image(radiograph.pixels, k, filters)
        height, width = radiograph.pixels.shape[:2]
        return SearchOut(query=QueryOut(name=name, width=width, height=height),
                         prediction=svc.prediction(prediction), neighbours=svc.neighbours(hits))

    @v1.get("/images/{image_id}/similar", response_model=SearchOut, summary="Search by an indexed image")
    def search_by_id(
        svc: Shared, image_id: int, k: Annotated[int, Query(ge=1, le=200)] = 10, anatomy: str | None = None,
        biology: str | None = None, technical: str | None = None, directional: str | None = None,
        code: str | None = None, on: str = "best", dataset: str | None = None, label: str | None = None,
    ) -> SearchOut:
        filters = filters_from(anatomy, biology, technical, directional, code, on, dataset, label)
        row = svc.row(image_id)
        hits = svc.engine.search_by_id(image_id, k, filters)
        return SearchOut(query=QueryOut(id=image_id, name=svc.image(row)["name"], width=row["width"],
                                        height=row["height"]),
                         prediction=None, neighbours=svc.neighbours(hits))

    @v1.get("/images/{image_id}", response_model=ImageDetailOut, summary="An indexed image's metadata")
    def image(svc: Shared, image_id: int) -> ImageDetailOut:
        row = svc.row(image_id, ("confidences", "added_at"))
        return ImageDetailOut(**svc.image(row), confidences=row["confidences"], extra=row["extra"],
                              added_at=row["added_at"],
                              original_url=f"/v1/images/{image_id}/original" if svc.settings.allow_originals else None)

    @v1.get("/images/{image_id}/thumbnail", response_class=FileResponse, summary="A PNG thumbnail")
    def thumbnail(svc: Shared, image_id: int):
        return FileResponse(svc.thumbnail(image_id), media_type="image/png",
                            headers={"Cache-Control": "private, max-age=3600"})

    @v1.get("/images/{image_id}/original", response_class=FileResponse,
            summary="The original file (only when the server allows originals)")
    def original(svc: Shared, image_id: int):
        if not svc.settings.allow_originals:
            raise ApiError(403, "this server serves thumbnails only (start it with --allow-originals to serve originals)")
        location = svc.row(image_id)["location"]
        path = Path(location.partition("#")[0])
        if "#" in location or not path.is_file():
            raise ApiError(404, f"the original file of image {image_id} is not available")
        return FileResponse(path, filename=path.name, headers={"Cache-Control": "private, no-store"})

    @v1.post("/images", response_model=BatchOut, summary="Add images, with a known code or predicted")
    def add_images(
        svc: Shared, files: Annotated[list[UploadFile], File()], code: Annotated[str | None, Form()] = None,
        dataset: Annotated[str, Form(min_length=1, max_length=100)] = "uploads",
    ) -> BatchOut:
        return ingest_batch(svc, files, dataset, svc.check_code(code) if code else None)

    @v1.delete("/images/{image_id}", summary="Remove an image for good")
    def remove_image(svc: Shared, image_id: int) -> dict[str, int]:
        svc.remove(image_id)
        return {"removed": image_id}

    @v1.post("/annotate", response_model=BatchOut, summary="Propose codes for a batch of files")
    def annotate(svc: Shared, files: Annotated[list[UploadFile], File()],
                 dataset: Annotated[str, Form(min_length=1, max_length=100)] = "annotation") -> BatchOut:
        """Each readable file is indexed (so that its proposal can be accepted) and gets its proposed code;
        a file that is already indexed keeps its id and stored prediction; unreadable files are listed
        under `failed` with the reason."""
        return ingest_batch(svc, files, dataset, None)

    @v1.put("/images/{image_id}/code", response_model=ImageDetailOut,
            summary="Accept or correct a proposal: store the true code")
    def set_code(svc: Shared, image_id: int, body: CodeIn) -> ImageDetailOut:
        svc.row(image_id)
        svc.engine.set_true_code(image_id, svc.check_code(body.code))
        return image(svc, image_id)

    @v1.get("/annotations", summary="Proposals and accepted codes of images, as CSV or JSON")
    def export(svc: Shared, ids: Annotated[str, Query(description="comma-separated image ids")],
               format: Annotated[str, Query(pattern="^(csv|json)$")] = "csv") -> Response:
        try:
            wanted = [int(part) for part in ids.split(",") if part.strip()]
        except ValueError:
            raise ApiError(422, f"ids: expected comma-separated image ids, got {ids[:80]!r}") from None
        if not wanted or len(wanted) > MAX_EXPORT_IDS:
            raise ApiError(422, f"ids: give from 1 to {MAX_EXPORT_IDS} image ids")
        rows = [svc.image(svc.row(image_id)) for image_id in wanted]
        records = [{"id": r["id"], "name": r["name"], "proposed": r["predicted"], "confidence": r["confidence"],
                    "true_code": r["true_code"],
                    "status": "pending" if r["true_code"] is None else
                    "accepted" if r["true_code"] == r["predicted"] else "corrected",
                    "words": r["words"]} for r in rows]
        disposition = {"Content-Disposition": f"attachment; filename=annotations.{format}"}
        if format == "json":
            return Response(json.dumps(records, indent=2), media_type="application/json", headers=disposition)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
        return Response(text.getvalue(), media_type="text/csv", headers=disposition)

    @v1.get("/codes", response_model=CodesOut, summary="IRMA codes present in the index, in words, per axis")
    def codes(svc: Shared) -> CodesOut:
        axes = {}
        for axis in AXES:
            counts: Counter[str] = Counter()
            for code, count in svc.engine.axis_codes(axis).items():
                value = significant(code)
                for end in range(1, len(value) + 1):
                    counts[value[:end]] += count
            table = svc.tables[axis] if svc.tables else None
            axes[axis] = [CodeEntry(code=prefix, level=len(prefix), count=count,
                                    text=short_text(table.entries[prefix]) if table and prefix in table.entries else None)
                          for prefix, count in sorted(counts.items())]
        return CodesOut(tables=svc.tables is not None, axes=axes)

    @v1.get("/stats", summary="Images, model and index type")
    def stats(svc: Shared) -> dict[str, Any]:
        figures = svc.engine.stats()
        schema = svc.embedder.schema
        return {"images": figures["count"], "datasets": figures["datasets"], "index_type": figures["index_type"],
                "dimension": figures["dimension"], "model": figures["model"], "task": schema.task,
                "classes": {head: list(labels) for head, labels in schema.heads.items()} if schema.task != "irma-axes" else {},
                "failures": figures["failures"], "tables": svc.tables is not None}

    app.include_router(v1)

    @app.get("/health", summary="Liveness (no token needed)")
    def health() -> dict[str, Any]:
        return {"status": "ok", "auth_required": settings.token is not None}

    @app.get("/ready", summary="Readiness: model and index loaded and answering (no token needed)")
    def ready() -> JSONResponse:
        try:
            images = shared.engine.stats()["count"]
        except Exception as error:  # a closed or broken index: not ready, and say why
            return JSONResponse({"ready": False, "error": str(error)}, status_code=503)
        return JSONResponse({"ready": True, "images": images})

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        """Swagger UI from the swagger-ui-bundle-v2 package, not a CDN (nothing is fetched from the internet)."""
        page = get_swagger_ui_html(openapi_url="/openapi.json", title="cbmir API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")
        # Swagger UI starts itself with an inline script; this page shows no images, only the API's shape.
        page.headers["Content-Security-Policy"] = ("default-src 'self'; script-src 'self' 'unsafe-inline'; "
                                                   "style-src 'self' 'unsafe-inline'; img-src 'self' data:")
        return page

    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def ingest_batch(svc: Service, files: list[UploadFile], dataset: str, true_code: str | None) -> BatchOut:
    items, failed = [], []
    for upload in files:
        name = upload_name(upload)
        try:
            image_id, prediction = svc.ingest(name, upload.file.read(), dataset, true_code)
        except HTTPException as error:
            failed.append(FailedOut(name=name, error=str(error.detail)))
            continue
        row = svc.image(svc.row(image_id))
        items.append(ProposalOut(
            name=name, id=image_id, duplicate=prediction is None, proposed=row["predicted"],
            confidence=row["confidence"], prediction=svc.prediction(prediction) if prediction else None,
            true_code=row["true_code"], words=svc.words(row["predicted"])))
    return BatchOut(items=items, failed=failed)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)
