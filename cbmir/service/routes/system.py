"""Routes without a token: liveness, readiness, the web page and the API docs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response

from cbmir.service.dependencies import CatalogDep, GateDep

router = APIRouter()
STATIC = Path(__file__).resolve().parents[1] / "static"
# Swagger UI starts itself with an inline script; its page shows no images, only the API's shape.
DOCS_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:"
)


@router.get("/health", summary="Liveness (no token needed)")
def health(gate: GateDep) -> dict[str, Any]:
    return {"status": "ok", "auth_required": gate.auth_required()}


@router.get("/ready", summary="Readiness: model and index loaded and answering (no token needed)")
def ready(catalog: CatalogDep) -> JSONResponse:
    try:
        images = catalog.engine.stats()["count"]
    except Exception as error:  # a closed or broken index: not ready, and say why
        return JSONResponse({"ready": False, "error": str(error)}, status_code=503)
    return JSONResponse({"ready": True, "images": images})


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/docs", include_in_schema=False)
def docs() -> Response:
    """Swagger UI from the swagger-ui-bundle-v2 package, not a CDN (nothing is fetched from the internet)."""
    page = get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="cbmir API",
        swagger_js_url="/docs-assets/swagger-ui-bundle.js",
        swagger_css_url="/docs-assets/swagger-ui.css",
        swagger_favicon_url="/docs-assets/favicon-32x32.png",
    )
    page.headers["Content-Security-Policy"] = DOCS_POLICY
    return page
