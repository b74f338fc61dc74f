"""What route functions ask for: the catalog, the settings, the caller's authorisation, and the search
filters (one `FilterParams`, from form fields or from query parameters)."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Form, Query, Request
from starlette.exceptions import HTTPException

from cbmir.service.catalog import Catalog
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


def authorised(request: Request, settings: SettingsDep) -> None:
    """Every /v1 route needs the bearer token, when the server has one."""
    if settings.token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), settings.token.encode()):
        raise HTTPException(
            401, "a valid token is needed: send 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"}
        )
