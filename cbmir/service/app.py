"""The query service: a versioned HTTP API (`/v1`, bearer token) over one index and its model, and the web
page that uses it (served at `/`).

The model and the index are loaded once, at start-up, and shared by every request: the engine serialises
its own work, and the embedder joins concurrent searches into one model batch (micro-batching, see
`cbmir.embed`), so a search waits for the model only while the model runs. Route functions are plain
functions, which FastAPI runs in its thread pool: decoding and preprocessing run there, off the event loop
and outside the model queue, so a slow image never holds up the others. Errors become JSON answers in one
place (`cbmir.service.errors`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import swagger_ui_bundle
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles

from cbmir.access import AuditTrail, UserDirectory
from cbmir.embed import Embedder
from cbmir.index.engine import store_location
from cbmir.index.store import Store
from cbmir.irma import CodeTables
from cbmir.search import Retrieval
from cbmir.service.access import Gate, GateMiddleware
from cbmir.service.catalog import Catalog
from cbmir.service.errors import install_error_handlers
from cbmir.service.explanations import Explanations
from cbmir.service.middleware import BodyTimeout, SecurityHeaders, UploadLimits
from cbmir.service.routes import account, codes, explain, images, search, system
from cbmir.service.routes import annotations as annotation_routes  # `annotations` is the __future__ feature
from cbmir.service.settings import ServiceSettings

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; frame-ancestors 'none'"
    ),
}
DESCRIPTION = (
    "Content-based retrieval of radiographs: search similar prior cases, predict IRMA codes, pre-label "
    "images. Every /v1 endpoint needs `Authorization: Bearer <token>`, of a user whose role allows it "
    "(reader: search and view; annotator: also propose and record codes; admin: also add and remove images), "
    "and every /v1 request is recorded in the index's audit trail."
)


def create_app(settings: ServiceSettings) -> FastAPI:
    """The service for `settings`, with the model and the index loaded now (so that a bad checkpoint or
    index is reported before the server starts); the index is closed when the server stops."""
    tables = CodeTables.load(settings.irma_tables) if settings.irma_tables else None
    embedder = Embedder.load(
        settings.model,
        runtime=settings.runtime,
        batch_size=settings.max_batch,
        batch_wait_ms=settings.batch_wait_ms,
        threads=settings.threads,
    )
    retrieval = Retrieval.open(settings.db, embedder, vectors=settings.vectors)
    catalog = Catalog(
        retrieval,
        tables,
        max_pixels=settings.max_pixels,
        max_decoding=settings.max_decoding,
        dicom_tags=settings.dicom_tags,
        allow_originals=settings.allow_originals,
    )

    access_store = Store(store_location(settings.db))  # its own connection: audit writes never wait for searches

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            retrieval.close()
            access_store.close()

    app = FastAPI(title="cbmir", version="1", lifespan=lifespan, docs_url=None, redoc_url=None, description=DESCRIPTION)
    routers = (
        account.router,
        search.router,
        explain.router,
        images.router,
        annotation_routes.router,
        codes.router,
        system.router,
    )
    api_routes = [route for router in routers for route in router.routes if isinstance(route, APIRoute)]
    gate = Gate(api_routes, settings, UserDirectory(access_store), AuditTrail(access_store))
    app.state.settings, app.state.catalog, app.state.gate = settings, catalog, gate
    app.state.explanations = Explanations(catalog, settings.model)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization"],
        )

    # Each middleware added wraps those added before it: a request meets the body timeout, the security
    # headers, the gate (who asks is known, and audited, before a limit refuses them), then the upload limits.
    app.add_middleware(UploadLimits, max_bytes=settings.max_upload_bytes)
    app.add_middleware(GateMiddleware, gate=gate)
    app.add_middleware(SecurityHeaders, headers=SECURITY_HEADERS)
    app.add_middleware(BodyTimeout, seconds=settings.body_timeout_seconds)
    install_error_handlers(app)
    for router in routers:
        app.include_router(router)
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")
    app.mount("/static", StaticFiles(directory=system.STATIC), name="static")
    return app
