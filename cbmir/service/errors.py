"""The one place where errors become HTTP answers: every error is a JSON object ``{"error": "..."}`` with
the status its kind calls for, and a message that says what was wrong (naming the file or field)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from cbmir.errors import CbmirError
from cbmir.imaging.io import ImageReadError, ImageTooLargeError, NotAnImageError
from cbmir.index import UnknownImageError
from cbmir.service.catalog import InvalidCodeError, OriginalsDisabledError, OriginalUnavailableError
from cbmir.service.schemas import ErrorOut

log = logging.getLogger(__name__)

# Most specific first: the first kind an error is an instance of gives its status.
STATUS_OF: tuple[tuple[type[CbmirError], int], ...] = (
    (UnknownImageError, 404),
    (OriginalUnavailableError, 404),
    (OriginalsDisabledError, 403),
    (ImageTooLargeError, 413),
    (NotAnImageError, 415),
    (ImageReadError, 422),
    (InvalidCodeError, 422),
    (CbmirError, 422),  # any other bad input: a malformed filter, k or id
)


ERROR_MEANINGS = {
    401: "no valid bearer token",
    403: "not allowed by this server's settings",
    404: "no such image, or its original is gone",
    411: "the request gives no Content-Length",
    413: "the request body or the image is above the server's limit",
    415: "the upload is not an image format cbmir reads",
    422: "a malformed field, filter, code or image (the message names it)",
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses: each an `ErrorOut` with what it means."""
    return {status: {"model": ErrorOut, "description": ERROR_MEANINGS[status]} for status in statuses}


# Every /v1 route: the token, and the validation of what it was given.
V1_ERRORS = documented(401, 422)
UPLOAD_ERRORS = documented(411, 413, 415)
BY_ID_ERRORS = documented(404)


def status_of(error: CbmirError) -> int:
    return next(status for kind, status in STATUS_OF if isinstance(error, kind))


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CbmirError)
    async def domain_error(request: Request, error: CbmirError) -> JSONResponse:
        return error_response(status_of(error), str(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), getattr(error, "headers", None))

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
