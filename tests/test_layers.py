"""The layering the architecture promises, read from the import statements: nothing below the embedder
imports a model or torch, and the embedder is the only inference code the use cases reach."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cbmir"
# Modules that know vectors, files and codes, never a model.
BELOW_THE_EMBEDDER = ["index", "stamp.py", "imaging/io.py", "irma.py", "files.py", "errors.py"]
MODEL_MODULES = ("torch", "torchvision", "timm", "cbmir.models", "cbmir.embed", "cbmir.checkpoint", "cbmir.train")


# Parsed in a fresh interpreter: CPython 3.11's ast.parse can fail spuriously ("AST constructor recursion
# depth mismatch", python/cpython#106905) in a process where earlier tests left threads running.
_IMPORTS = """
import ast, json, sys
found = {}
for path in sys.argv[1:]:
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    found[path] = sorted(names)
print(json.dumps(found))
"""


def imports(paths: list[Path]) -> dict[Path, set[str]]:
    """The modules each file imports, read from its import statements."""
    done = subprocess.run([sys.executable, "-c", _IMPORTS, *map(str, paths)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return {Path(path): set(names) for path, names in json.loads(done.stdout).items()}


@pytest.mark.parametrize("part", BELOW_THE_EMBEDDER)
def test_nothing_below_the_embedder_imports_a_model(part):
    files = sorted((PACKAGE / part).rglob("*.py")) if (PACKAGE / part).is_dir() else [PACKAGE / part]
    for path, names in imports(files).items():
        found = {name for name in names if name.startswith(MODEL_MODULES)}
        assert not found, f"{path.relative_to(PACKAGE.parent)} imports {sorted(found)}"


def test_the_service_and_indexer_run_the_model_only_through_the_embedder():
    """They may hold an Embedder (through cbmir.search), never a torch model of their own."""
    roots = [PACKAGE / "service", PACKAGE.parent / "indexer", PACKAGE / "search.py"]
    files = [path for root in roots for path in (sorted(root.rglob("*.py")) if root.is_dir() else [root])]
    for path, names in imports(files).items():
        found = {name for name in names if name.startswith(("torch", "cbmir.models", "cbmir.checkpoint"))}
        assert not found, f"{path.relative_to(PACKAGE.parent)} imports {sorted(found)}"
