"""The one place where errors become HTTP answers: every error is a JSON object ``{"error": "..."}`` with
the status its kind calls for, and a message that says what was wrong (naming the file or field)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match, Mount
from starlette.staticfiles import StaticFiles

from cbmir.errors import CbmirError
from cbmir.explain import ModelChangedError
from cbmir.imaging.io import ImageReadError, ImageTooLargeError, NotAnImageError
from cbmir.index import UnknownImageError
from cbmir.index.errors import DatabaseError
from cbmir.pacs import PacsAuthError, PacsError, PacsNotFoundError, PacsUnavailableError
from cbmir.refine import RefinementError
from cbmir.service.catalog import InvalidCodeError, OriginalsDisabledError, OriginalUnavailableError
from cbmir.service.pacs_search import PacsNotConfiguredError, UnusableInstanceError
from cbmir.service.schemas import ErrorOut

log = logging.getLogger(__name__)

# Most specific first: the first kind an error is an instance of gives its status.
STATUS_OF: tuple[tuple[type[CbmirError], int], ...] = (
    (UnknownImageError, 404),
    (OriginalUnavailableError, 404),
    (OriginalsDisabledError, 403),
    (ModelChangedError, 503),
    (DatabaseError, 503),  # the index's database failed or is unreachable: not the request's fault
    (PacsNotConfiguredError, 503),
    (PacsNotFoundError, 404),
    (PacsAuthError, 502),  # the PACS refused this server's credentials: the caller's own are fine
    (PacsUnavailableError, 504),
    (PacsError, 502),  # any other answer of the PACS that cannot be used
    (ImageTooLargeError, 413),
    (NotAnImageError, 415),
    (ImageReadError, 422),
    (UnusableInstanceError, 422),
    (InvalidCodeError, 422),
    (RefinementError, 422),  # a region outside its image, an unknown marked image
    (CbmirError, 422),  # any other bad input: a malformed filter, k or id
)


ERROR_MEANINGS = {
    400: "the request body cannot be parsed (a malformed multipart form or JSON)",
    401: "no valid bearer token",
    403: "not allowed to the caller's role, or by this server's settings (originals)",
    404: "no such image, or its original is gone; or (search by PACS image) no such instance on the PACS",
    408: "the request body stopped arriving",
    411: "the request gives no Content-Length",
    413: "the request body or the image is above the server's limit",
    415: "the upload is not an image format cbmir reads",
    422: "a malformed field, filter, code or image, a region outside its image or an unknown marked image; or "
    "(search by PACS image) malformed UIDs, or an instance that holds no single-frame image cbmir reads (the "
    "message names it)",
    429: "too many wrong tokens from this client: try again after Retry-After seconds",
    502: "(search by PACS image) the PACS refused this server's credentials, or answered unusably",
    503: "the audit trail cannot be written, so nothing is answered; or the index's database failed or cannot "
    "be reached (a PostgreSQL server restarting: the next request reconnects); or (explanations) the checkpoint on "
    "disk is no longer the model the server started with; or (search by PACS image) this server has no PACS "
    "configured",
    504: "(search by PACS image) the PACS cannot be reached, or did not answer in time or kept failing, after "
    "the configured retries",
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses: each an `ErrorOut` with what it means."""
    return {status: {"model": ErrorOut, "description": ERROR_MEANINGS[status]} for status in statuses}


# Every /v1 route: the caller (token, role, wrong tokens), the validation of what it was given, the audit.
V1_ERRORS = documented(401, 403, 422, 429, 503)
# Every route with a body: it may not parse, stop arriving, or come without or above its length.
BODY_ERRORS = documented(400, 408, 411, 413)
UPLOAD_ERRORS = {**BODY_ERRORS, **documented(415)}
BY_ID_ERRORS = documented(404)
PACS_ERRORS = {**BODY_ERRORS, **documented(404, 502, 503, 504)}


def status_of(error: CbmirError) -> int:
    return next(status for kind, status in STATUS_OF if isinstance(error, kind))


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> str:
    """The `Allow` header of a 405: every method served at the request's path, found by asking each route
    whether it would take the request with that method. Starlette's own names only the methods of the
    first route that matches the path (GET of /v1/images/{image_id}, not its DELETE), and that of its static
    files none."""
    # The request as it came in: a mount has moved its own path into the scope's root_path.
    scope = {**request.scope, "root_path": request.scope.get("app_root_path", request.scope.get("root_path", ""))}
    allowed: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Mount):  # static files: their path matches any method, and they serve GET and HEAD
            if isinstance(route.app, StaticFiles) and route.matches(scope)[0] is not Match.NONE:
                allowed |= {"GET", "HEAD"}
            continue
        allowed.update(method for method in HTTP_METHODS if route.matches({**scope, "method": method})[0] is Match.FULL)
    return ", ".join(sorted(allowed))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CbmirError)
    async def domain_error(request: Request, error: CbmirError) -> JSONResponse:
        return error_response(status_of(error), str(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message, headers = str(error.detail), getattr(error, "headers", None)
        if error.status_code == 405:
            allowed = allowed_methods(request)
            message = f"{request.method} is not allowed at {request.url.path}, only {allowed}"
            headers = {**(headers or {}), "Allow": allowed}
        return error_response(error.status_code, message, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for problem in error.errors():
            where = ".".join(str(part) for part in problem.get("loc", ()) if part not in ("body", "query", "path"))
            problems.append(f"{where or 'request'}: {problem.get('msg', 'invalid')}")
        return error_response(422, "; ".join(problems))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return error_response(500, "internal error: the server log has the details")
