"""What the index holds: the IRMA codes present (for the page's filter menus) and its statistics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from cbmir.service.dependencies import CatalogDep
from cbmir.service.errors import V1_ERRORS
from cbmir.service.schemas import CodeEntry, CodesOut

router = APIRouter(prefix="/v1", tags=["codes"], responses=V1_ERRORS)


@router.get("/codes", response_model=CodesOut, summary="IRMA codes present in the index, in words, per axis")
def codes(catalog: CatalogDep) -> CodesOut:
    axes = {
        axis: [
            CodeEntry(code=entry.code, text=entry.text, level=len(entry.code), count=entry.count) for entry in entries
        ]
        for axis, entries in catalog.code_counts().items()
    }
    return CodesOut(tables=catalog.tables is not None, axes=axes)


@router.get("/stats", summary="Images, model, index type and inference runtime")
def stats(catalog: CatalogDep) -> dict[str, Any]:
    figures = catalog.engine.stats()
    schema = catalog.schema
    classes = {head: list(labels) for head, labels in schema.heads.items()} if schema.task != "irma-axes" else {}
    return {
        "images": figures["count"],
        "datasets": figures["datasets"],
        "index_type": figures["index_type"],
        "dimension": figures["dimension"],
        "model": figures["model"],
        "task": schema.task,
        "classes": classes,
        "failures": figures["failures"],
        "tables": catalog.tables is not None,
        "runtime": catalog.retrieval.embedder.runtime_description,
        "model_runs": catalog.retrieval.embedder.model_runs,
    }
