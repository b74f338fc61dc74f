"""Shared test helpers. Real radiographs come from ../shared/data (or $CBMIR_SHARED_DATA); tests that need
them skip with a visible reason when that folder is absent. A real PostgreSQL server (tests/postgres.py) is
started once per session by the first test that needs one, and skipped, saying why, without its binaries."""

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from cbmir.checkpoint import new_card, save_checkpoint
from cbmir.imaging.preprocess import preset
from cbmir.labels import LabelSchema
from cbmir.models import create_model
from tests.postgres import PostgresServer, binaries

SHARED_DATA = Path(os.environ.get("CBMIR_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def read_grey(path: Path) -> np.ndarray:
    """A grey image file a test wrote or reads (OpenCV answers None, not an error, for one it cannot read)."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert image is not None, f"cannot read {path}"
    return image


def shared_path(relative: str) -> Path:
    """Path below the shared data folder, or skip the calling test saying which path is missing."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (set CBMIR_SHARED_DATA to the shared data folder)")
    return path


def small_checkpoint(folder: Path, codes: list[str]) -> Path:
    """An untrained 64-px chest CNN with IRMA axis heads: a real model, fast enough for tests."""
    schema = LabelSchema.from_labels("irma-axes", [(code,) for code in codes])
    model = create_model("chest-cnn-chowdhury", schema.head_sizes).eval()
    save_checkpoint(folder, model, new_card(model, schema, preset("constant-plain", size=64)))
    return folder


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server of Debian's package on a free loopback port, for the whole session."""
    folder = binaries()
    if folder is None:
        pytest.skip("PostgreSQL is not installed (no initdb; apt-get install postgresql)")
    server = PostgresServer(folder).start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """The URL (with its password) of a new, empty database of its own."""
    return postgres_server.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_location(request, tmp_path) -> str | Path:
    """Where a test's store lives, once per backend: a SQLite file, or a PostgreSQL database's URL."""
    if request.param == "sqlite":
        return tmp_path / "store.sqlite"
    return request.getfixturevalue("postgres_url")
