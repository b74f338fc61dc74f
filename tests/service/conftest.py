"""A real query service for the API and page tests: a tiny real index (synthetic phantoms with IRMA codes,
a small untrained CNN, a SQLite store and a FAISS index) served by uvicorn on a free loopback port."""

from __future__ import annotations

import io
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from cbmir.embed import Embedder
from cbmir.search import Retrieval
from cbmir.service import ServiceSettings, create_app
from cbmir.synthetic import write_synthetic_archive
from indexer.pipeline import index_records, read_archive
from tests.conftest import SHARED_DATA, small_checkpoint

TOKEN = "test-token-0123456789abcdef"
TABLES = SHARED_DATA / "irma-code-tables"
VIEWER = "https://viewer.test/viewer?StudyInstanceUIDs={study}&series={series}&instance={instance}"
"""The viewer link template of the `service` fixture (CBMIR_VIEWER_URL)."""
CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")


def dicom_file(pixels: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """An 8-bit CR radiograph in the DICOM file format with new UIDs; its bytes and UIDs (study, series,
    instance, as the API's `pacs` names them)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CR"
    ds.set_pixel_data(pixels, "MONOCHROME2", 8)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), {
        "study": ds.StudyInstanceUID,
        "series": ds.SeriesInstanceUID,
        "instance": ds.SOPInstanceUID,
    }


@dataclass
class Running:
    url: str
    settings: ServiceSettings
    archive: Path

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


def build_index(base: Path) -> tuple[Path, Path, Path]:
    """Index 8 phantoms of each kind (chest, hand, skull); returns the archive, model and index folders."""
    archive = write_synthetic_archive(base / "archive", per_kind=8, longest_side=160)
    codes = [line.split(";")[1] for line in (archive / "codes.csv").read_text().splitlines()[1:]]
    model = small_checkpoint(base / "model", codes)
    name, records = read_archive(archive)
    with Retrieval.open(base / "db", Embedder.load(model)) as retrieval:
        index_records(records, retrieval, dataset=name, workers=1, progress=False)
    return archive, model, base / "db"


def start(settings: ServiceSettings, archive: Path):
    """Serve `settings` from a thread; yields the Running service and stops it afterwards."""
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield Running(f"http://127.0.0.1:{port}", settings, archive)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="session")
def index_parts(tmp_path_factory):
    return build_index(tmp_path_factory.mktemp("service"))


@pytest.fixture(scope="module")
def service(index_parts, tmp_path_factory):
    """The service over a copy of the shared index (tests add and remove images), with a token, small limits
    (4 MiB per request, 8 megapixels per image) and a viewer (`VIEWER`), but no PACS."""
    import shutil

    archive, model, db = index_parts
    copy = tmp_path_factory.mktemp("db") / "db"
    shutil.copytree(db, copy)
    settings = ServiceSettings(
        db=copy,
        model=model,
        irma_tables=TABLES if TABLES.exists() else None,
        token=TOKEN,
        max_upload_bytes=4 << 20,
        max_pixels=8_000_000,
        failed_logins_per_minute=1000,  # the token tests send many wrong tokens; the limit has its own test
        viewer_url=VIEWER,
    )
    yield from start(settings, archive)
