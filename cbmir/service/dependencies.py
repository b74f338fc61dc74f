"""What route functions ask for: the catalog, the explanations, the settings, the search filters and
refinements (one `FilterParams` and one `RefineParams`, from form fields or from query parameters), the
caller (found and authorised by `cbmir.service.access.Gate` before the route runs) and the request's audit
note."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Form, Query, Request

from cbmir.access import User
from cbmir.service.access import AuditNote, Gate, audit_note
from cbmir.service.catalog import Catalog
from cbmir.service.explanations import Explanations
from cbmir.service.schemas import FilterParams, RefineParams
from cbmir.service.settings import ServiceSettings


def get_catalog(request: Request) -> Catalog:
    return request.app.state.catalog


def get_explanations(request: Request) -> Explanations:
    return request.app.state.explanations


def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


def get_gate(request: Request) -> Gate:
    return request.app.state.gate


def get_caller(request: Request) -> User:
    return request.state.user


CatalogDep = Annotated[Catalog, Depends(get_catalog)]
ExplanationsDep = Annotated[Explanations, Depends(get_explanations)]
SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
GateDep = Annotated[Gate, Depends(get_gate)]
CallerDep = Annotated[User, Depends(get_caller)]
AuditDep = Annotated[AuditNote, Depends(audit_note)]
FormFilters = Annotated[FilterParams, Form()]
QueryFilters = Annotated[FilterParams, Query()]
FormRefine = Annotated[RefineParams, Form()]
QueryRefine = Annotated[RefineParams, Query()]
