"""Shared test helpers. Real radiographs come from ../shared/data (or $CBMIR_SHARED_DATA); tests that need
them skip with a visible reason when that folder is absent."""

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(
    os.environ.get("CBMIR_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)


def shared_path(relative: str) -> Path:
    """Path below the shared data folder, or skip the calling test saying which path is missing."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (set CBMIR_SHARED_DATA to the shared data folder)")
    return path
