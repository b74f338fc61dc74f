"""The layering the architecture promises, read from the import statements: nothing below the embedder
imports a model or torch, and the embedder is the only inference code the use cases reach."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cbmir"
# Modules that know vectors, files and codes, never a model.
BELOW_THE_EMBEDDER = ["index", "stamp.py", "imaging/io.py", "irma.py", "files.py", "errors.py"]
MODEL_MODULES = ("torch", "torchvision", "timm", "cbmir.models", "cbmir.embed", "cbmir.checkpoint", "cbmir.train")


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("part", BELOW_THE_EMBEDDER)
def test_nothing_below_the_embedder_imports_a_model(part):
    files = sorted((PACKAGE / part).rglob("*.py")) if (PACKAGE / part).is_dir() else [PACKAGE / part]
    for path in files:
        found = {name for name in imports(path) if name.startswith(MODEL_MODULES)}
        assert not found, f"{path.relative_to(PACKAGE.parent)} imports {sorted(found)}"


def test_the_service_and_indexer_run_the_model_only_through_the_embedder():
    """They may hold an Embedder (through cbmir.search), never a torch model of their own."""
    roots = [PACKAGE / "service", PACKAGE.parent / "indexer", PACKAGE / "search.py"]
    files = [path for root in roots for path in (sorted(root.rglob("*.py")) if root.is_dir() else [root])]
    for path in files:
        found = {name for name in imports(path) if name.startswith(("torch", "cbmir.models", "cbmir.checkpoint"))}
        assert not found, f"{path.relative_to(PACKAGE.parent)} imports {sorted(found)}"
