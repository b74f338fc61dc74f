"""Fixtures for tests against a real PACS: a fresh Orthanc per test (it starts in about 0.2 s, so no test sees
another's instances or change history) and the generated DICOM objects."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pacs.dicoms import TestDicom, generate_dicoms
from tests.pacs.orthanc import Orthanc, missing


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A running, empty Orthanc; skips with the install command where Orthanc or its DICOMweb plugin is absent."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    server = Orthanc(tmp_path / "orthanc")
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def generated_dicoms(tmp_path_factory: pytest.TempPathFactory) -> list[TestDicom]:
    """The generated test objects (see `tests.pacs.dicoms`), written once per run; tests must not change them."""
    return generate_dicoms(tmp_path_factory.mktemp("dicoms"))
