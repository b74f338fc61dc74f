"""The caller: who the token belongs to and what their role allows (for clients and the web page)."""

from __future__ import annotations

from fastapi import APIRouter

from cbmir.service.access import ROUTE_ROLES
from cbmir.service.dependencies import CallerDep
from cbmir.service.errors import V1_ERRORS
from cbmir.service.schemas import CallerOut

router = APIRouter(prefix="/v1", tags=["account"], responses=V1_ERRORS)


@router.get("/me", response_model=CallerOut, summary="Who the token belongs to, and the routes their role allows")
def me(caller: CallerDep) -> CallerOut:
    allowed = sorted(route for route, needed in ROUTE_ROLES.items() if caller.role.allows(needed))
    return CallerOut(user=caller.name, role=caller.role.value, allowed=allowed)
