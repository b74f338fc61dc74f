"""What route functions ask for: the catalog, the settings and the search filters (one `FilterParams`, from
form fields or from query parameters); and the caller's authorisation, which the middleware checks."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Form, Query, Request
from fastapi.responses import JSONResponse

from cbmir.service.catalog import Catalog
from cbmir.service.errors import error_response
from cbmir.service.schemas import FilterParams
from cbmir.service.settings import ServiceSettings


def get_catalog(request: Request) -> Catalog:
    return request.app.state.catalog


def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


CatalogDep = Annotated[Catalog, Depends(get_catalog)]
SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
FormFilters = Annotated[FilterParams, Form()]
QueryFilters = Annotated[FilterParams, Query()]


def token_refusal(request: Request, settings: ServiceSettings) -> JSONResponse | None:
    """The 401 answer for a /v1 request without the server's bearer token (None: let it through). Checked
    from the headers alone, by the service's middleware, before any of the body is read: an unauthorised
    upload is never received, and a body that never comes holds nothing up."""
    if settings.token is None or not request.url.path.startswith("/v1") or request.method == "OPTIONS":
        return None  # no token configured; not the API; or a CORS preflight, which carries no credentials
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), settings.token.encode()):
        return None
    return error_response(
        401, "a valid token is needed: send 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"}
    )
