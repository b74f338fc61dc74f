"""`cbmir sync` against a real Orthanc (DICOMweb, basic auth): every image instance indexed through the same
stages as a file, the rest recorded with their UIDs and reasons, re-runs that fetch nothing twice, a SIGKILL
mid-sync and a PACS that stops halfway, and servers that refuse, fail or never answer (real HTTP servers)."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from cbmir.embed import Embedder
from cbmir.index import Engine, Filters
from cbmir.locations import Location, PacsInstance
from cbmir.pacs import Pacs, PacsError, PacsNotFoundError, PacsSettings, PacsUnavailableError
from cbmir.search import Retrieval
from cbmir.service.catalog import THUMBNAILS, Catalog
from indexer.pacs import sync_pacs
from indexer.pipeline import Summary, index_records, read_archive
from tests.conftest import small_checkpoint
from tests.pacs.dicoms import SECRETS, TestDicom
from tests.pacs.orthanc import Orthanc

CODES = ["1121-127-700-500", "1123-211-500-700"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return small_checkpoint(tmp_path_factory.mktemp("model"), CODES)


@pytest.fixture
def loaded(orthanc: Orthanc, generated_dicoms: list[TestDicom]) -> Orthanc:
    orthanc.upload_files(d.path for d in generated_dicoms)
    return orthanc


def settings_for(orthanc: Orthanc, **changes) -> PacsSettings:
    return PacsSettings(pacs_user=orthanc.user, pacs_password=orthanc.password, **changes)


def instance_of(location: str) -> PacsInstance:
    instance = Location.parse(location).instance
    assert instance is not None, f"{location} is not a PACS location"
    return instance


def sync(orthanc: Orthanc, db: Path, model: Path, **options) -> tuple[Summary, Engine]:
    """Sync every modality from `orthanc` into `db`; the summary and a reopened engine (close it)."""
    pacs = Pacs(orthanc.dicomweb_url, settings_for(orthanc))
    with Retrieval.open(db, Embedder.load(model)) as retrieval:
        summary = sync_pacs(pacs, retrieval, dataset="pacs", progress=False, **{"modalities": (), **options})
    return summary, Engine.open(db)


def test_sync_indexes_every_image_and_records_the_rest_by_uid(loaded, generated_dicoms, model, tmp_path):
    summary, engine = sync(loaded, tmp_path / "db", model)
    with engine:
        images = [d for d in generated_dicoms if d.is_image]
        rows = engine.get(engine.query(Filters()))
        assert sorted(instance_of(row.location).sop for row in rows) == sorted(d.sop for d in images)
        for row in rows:
            instance = instance_of(row.location)
            assert instance.server == loaded.dicomweb_url
            assert row.extra["SOPInstanceUID"] == instance.sop  # the UIDs a viewer link is made of
            assert row.dataset == "pacs"
        failures = {instance_of(f["location"]).sop: f["reason"] for f in engine.failures()}
        refused = [d for d in generated_dicoms if not d.is_image]
        assert sorted(failures) == sorted(d.sop for d in refused)
        for item in refused:
            assert item.reason_fragment in failures[item.sop].lower(), failures[item.sop]
    assert summary.indexed == len(images) and sum(summary.failed.values()) == len(refused)


def test_a_synced_image_has_the_vector_of_the_same_file_indexed_from_disk(loaded, generated_dicoms, model, tmp_path):
    """One road: fetched over WADO-RS (uncompressed) or read from the file, the same image gets the same vector."""
    sync(loaded, tmp_path / "pacs-db", model)[1].close()
    files = tmp_path / "files"
    files.mkdir()
    chosen = [
        d for d in generated_dicoms if d.kind in ("cr-mono2-16bit", "dx-mono1-16bit", "cr-rle", "dx-rescale-window")
    ]
    for item in chosen:
        (files / f"{item.sop}.dcm").write_bytes(item.path.read_bytes())
    with Retrieval.open(tmp_path / "file-db", Embedder.load(model)) as retrieval:
        name, records = read_archive(files)
        index_records(records, retrieval, dataset=name, workers=1, progress=False)
    with Engine.open(tmp_path / "pacs-db") as synced, Engine.open(tmp_path / "file-db") as from_files:
        by_sop = {row.extra["SOPInstanceUID"]: row.id for row in synced.get(synced.query(Filters()))}
        for row in from_files.get(from_files.query(Filters())):
            expected = from_files.embeddings([row.id])
            np.testing.assert_allclose(synced.embeddings([by_sop[row.extra["SOPInstanceUID"]]]), expected, atol=1e-6)


def test_a_rerun_fetches_only_new_instances_and_retries_failures(loaded, generated_dicoms, model, tmp_path):
    db = tmp_path / "db"
    sync(loaded, db, model)[1].close()
    images = sum(d.is_image for d in generated_dicoms)
    again, engine = sync(loaded, db, model)
    with engine:
        assert (again.indexed, again.skipped, len(engine.query())) == (0, images, images)
    assert (
        sum(again.failed.values()) == len(generated_dicoms) - images
    )  # failures are tried again: a decoder may be there now
    newcomer = pydicom.dcmread(next(d.path for d in generated_dicoms if d.kind == "cr-mono2-8bit"))
    newcomer.SOPInstanceUID = newcomer.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    newcomer.PixelData = bytes(255 - value for value in newcomer.PixelData)
    newcomer.save_as(tmp_path / "new.dcm", enforce_file_format=True)
    loaded.upload_files([tmp_path / "new.dcm"])
    third, engine = sync(loaded, db, model)
    with engine:
        assert (third.indexed, third.skipped, len(engine.query())) == (1, images, images + 1)


def test_modality_and_study_date_filters_choose_what_is_synced(loaded, generated_dicoms, model, tmp_path):
    summary, engine = sync(loaded, tmp_path / "dx", model, modalities=("DX",))
    with engine:
        modalities = {row.extra["Modality"] for row in engine.get(engine.query(Filters()))}
        assert modalities == {"DX"}
        assert len(engine.query()) == sum(d.is_image and d.kind.startswith("dx") for d in generated_dicoms)
    summary, engine = sync(loaded, tmp_path / "dates", model, modalities=("CR", "DX"), study_dates="20240601-20241231")
    with engine:
        expected = {d.sop for d in generated_dicoms if d.is_image and "20240601" <= d.study_date <= "20241231"}
        assert {row.extra["SOPInstanceUID"] for row in engine.get(engine.query(Filters()))} == expected
    summary, engine = sync(loaded, tmp_path / "match", model, attributes={"SOPInstanceUID": generated_dicoms[0].sop})
    with engine:
        assert [row.extra["SOPInstanceUID"] for row in engine.get(engine.query(Filters()))] == [generated_dicoms[0].sop]


def test_no_patient_identifying_tag_reaches_the_index_or_its_thumbnails(loaded, model, tmp_path, monkeypatch):
    db = tmp_path / "db"
    sync(loaded, db, model)[1].close()
    monkeypatch.setenv("CBMIR_PACS_USER", loaded.user)  # thumbnails fetch the pixels again, with these
    monkeypatch.setenv("CBMIR_PACS_PASSWORD", loaded.password)
    with Retrieval.open(db, Embedder.load(model)) as retrieval:
        catalog = Catalog(retrieval, None, max_pixels=10**7, max_decoding=1)
        for image_id in retrieval.engine.query(Filters()):
            assert read_grey_bytes(catalog.thumbnail(int(image_id))).size > 0
    assert len(list((db / THUMBNAILS).glob("*.png"))) == len(loaded.instances()) - 3
    with sqlite3.connect(db / "store.sqlite") as store:
        store.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for path in db.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            for secret in SECRETS:
                assert secret.encode() not in content, f"{secret} found in {path}"


def read_grey_bytes(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert image is not None, "not a PNG"
    return image


def many_instances(generated_dicoms: list[TestDicom], folder: Path, count: int) -> list[Path]:
    """`count` CR instances of different content (a 16-bit source with one pixel changed per copy)."""
    source = pydicom.dcmread(next(d.path for d in generated_dicoms if d.kind == "cr-mono2-16bit"))
    pixels = source.pixel_array
    folder.mkdir()
    paths = []
    for number in range(count):
        copy = pixels.copy()
        copy.flat[number] = (int(copy.flat[number]) + 1 + number) % 4096
        source.PixelData = copy.tobytes()
        source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths.append(folder / f"{number}.dcm")
        source.save_as(paths[-1], enforce_file_format=True)
    return paths


def sync_command(orthanc: Orthanc, db: Path, model: Path) -> tuple[list[str], dict[str, str]]:
    command = [sys.executable, "-m", "cbmir", "sync", orthanc.dicomweb_url, "--db", str(db), "--model", str(model)]
    command += ["--batch-size", "2", "--workers", "1"]
    env = {
        **os.environ,
        "CBMIR_PACS_USER": orthanc.user,
        "CBMIR_PACS_PASSWORD": orthanc.password,
        "CBMIR_PACS_ATTEMPTS": "2",
        "CBMIR_PACS_BACKOFF_SECONDS": "0.05",
        "CBMIR_PACS_TIMEOUT_SECONDS": "5",
    }
    return command, env


def indexed_count(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db / 'store.sqlite'}?mode=ro", uri=True, timeout=5) as store:
            return int(store.execute("SELECT count(*) FROM images").fetchone()[0])
    except sqlite3.OperationalError:  # not created yet
        return 0


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_a_sync_killed_with_sigkill_and_run_again_has_every_instance_once(orthanc, generated_dicoms, model, tmp_path):
    paths = many_instances(generated_dicoms, tmp_path / "many", 60)
    orthanc.upload_files(paths)
    db = tmp_path / "db"
    command, env = sync_command(orthanc, db, model)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: indexed_count(db) >= 6 or process.poll() is not None, 120, "the first batches")
        assert process.poll() is None, "the sync ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    killed_at = indexed_count(db)
    assert 0 < killed_at < 60
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"skipped {killed_at}" in rerun.stdout  # what the killed run stored was not fetched again
    with Engine.open(db) as engine:
        rows = engine.get(engine.query(Filters()))
        sops = [row.extra["SOPInstanceUID"] for row in rows]
        assert len(sops) == len(set(sops)) == 60
        hits = engine.search(engine.embeddings([rows[0].id])[0], k=100)
        assert sorted(hit.id for hit in hits) == sorted(row.id for row in rows)  # FAISS holds the same 60


def test_a_pacs_that_stops_halfway_leaves_a_failure_report_and_a_rerun_finishes(
    orthanc, generated_dicoms, model, tmp_path
):
    paths = many_instances(generated_dicoms, tmp_path / "many", 60)
    orthanc.upload_files(paths)
    db = tmp_path / "db"
    command, env = sync_command(orthanc, db, model)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: indexed_count(db) >= 6 or process.poll() is not None, 120, "the first batches")
    orthanc.kill()
    output, errors = process.communicate(timeout=120)
    assert process.returncode == 0, errors
    assert "failure report: cbmir db failures" in output
    done = indexed_count(db)
    assert done < 60
    report = subprocess.run(
        [sys.executable, "-m", "cbmir", "db", "failures", "--db", str(db)], capture_output=True, text=True, timeout=60
    )
    lines = report.stdout.splitlines()
    assert len(lines) == 60 - done, report.stdout  # every instance not indexed, each with its UIDs and why
    for line in lines:
        location, reason = line.split("\t")[:2]
        assert Location.parse(location).kind == "pacs"
        assert any(why in reason for why in ("cannot connect", "connection broke", "not fetched")), reason
    orthanc.start()
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    with Engine.open(db) as engine:
        assert len(engine.query()) == 60 and engine.failures() == []


def test_refused_credentials_stop_the_sync_with_a_clear_error(loaded, model, tmp_path):
    command, env = sync_command(loaded, tmp_path / "db", model)
    result = subprocess.run(
        command, env={**env, "CBMIR_PACS_PASSWORD": "wrong"}, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "refused the credentials (HTTP 401)" in result.stderr and "Traceback" not in result.stderr
    assert indexed_count(tmp_path / "db") == 0


def test_credentials_in_the_url_are_refused(loaded):
    with pytest.raises(PacsError, match="without credentials"):
        Pacs(f"http://alice:secret@127.0.0.1:{loaded.http_port}/dicom-web", PacsSettings())


def test_an_instance_deleted_after_it_was_found_is_not_found(loaded, generated_dicoms):
    pacs = Pacs(loaded.dicomweb_url, settings_for(loaded))
    found = {item.instance.sop: item.instance for item in pacs.find(modalities=())}
    for orthanc_id in loaded.instances():
        loaded.delete_instance(orthanc_id)
    gone = found[generated_dicoms[0].sop]
    with pytest.raises(PacsNotFoundError, match=f"instance {gone.sop} .*HTTP 404"):
        pacs.fetch(gone)


@pytest.fixture
def failing_server() -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server that answers every request 500, and the paths it was asked for."""
    asked: list[str] = []

    class Failing(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web", asked
    server.shutdown()
    server.server_close()


def test_a_failing_server_is_tried_again_with_backoff_then_reported(failing_server):
    url, asked = failing_server
    pacs = Pacs(url, PacsSettings(pacs_attempts=3, pacs_backoff_seconds=0.1))
    started = time.monotonic()
    with pytest.raises(PacsUnavailableError, match="answered HTTP 500"):
        list(pacs.find())
    assert len(asked) == 3 and time.monotonic() - started >= 0.3  # waits 0.1 s, then 0.2 s


def test_a_server_that_never_answers_times_out_and_one_that_is_gone_cannot_be_connected():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        pacs = Pacs(f"http://127.0.0.1:{port}/dicom-web", PacsSettings(pacs_timeout_seconds=0.3, pacs_attempts=1))
        with pytest.raises(PacsUnavailableError, match="no answer within 0.3 s"):
            pacs.fetch(PacsInstance(pacs.server, "1.2", "1.3", "1.4"))
    pacs = Pacs(f"http://127.0.0.1:{port}/dicom-web", PacsSettings(pacs_attempts=1))
    with pytest.raises(PacsUnavailableError, match="cannot connect"):
        list(pacs.find())


def test_a_server_that_hangs_up_mid_answer_is_tried_again_then_reported_unavailable():
    """A PACS stopped while it sends an instance: the answer's body ends before its Content-Length."""
    asked: list[str] = []

    class HangingUp(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"DICM" * 10)
            self.close_connection = True

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HangingUp)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        pacs = Pacs(
            f"http://127.0.0.1:{server.server_address[1]}/dicom-web",
            PacsSettings(pacs_attempts=2, pacs_backoff_seconds=0.05),
        )
        with pytest.raises(PacsUnavailableError, match="connection broke during the answer"):
            pacs.fetch(PacsInstance(pacs.server, "1.2", "1.3", "1.4"))
        assert len(asked) == 2
    finally:
        server.shutdown()
        server.server_close()


def test_search_by_a_pacs_image_from_the_command_line(loaded, generated_dicoms, model, tmp_path):
    db = tmp_path / "db"
    sync(loaded, db, model)[1].close()
    query = next(d for d in generated_dicoms if d.kind == "cr-mono2-16bit")
    env = {
        **os.environ,
        "CBMIR_PACS_URL": loaded.dicomweb_url,
        "CBMIR_PACS_USER": loaded.user,
        "CBMIR_PACS_PASSWORD": loaded.password,
        "CBMIR_VIEWER_URL": "http://viewer.example/viewer?StudyInstanceUIDs={study}&SOP={instance}",
    }
    uids = f"{query.study}/{query.series}/{query.sop}"
    command = [sys.executable, "-m", "cbmir", "search", "--db", str(db), "--model", str(model), "-k", "3"]
    result = subprocess.run([*command, "--pacs-instance", uids], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines().index("3 similar radiograph(s):") + 1
    assert query.sop in result.stdout.splitlines()[first]  # the instance itself is its own nearest neighbour
    assert f"viewer: http://viewer.example/viewer?StudyInstanceUIDs={query.study}&SOP={query.sop}" in result.stdout
    missing = subprocess.run(
        [*command, "--pacs-instance", f"{query.study}/{query.series}/1.2.3"], env=env, capture_output=True, text=True
    )
    assert missing.returncode == 2 and "instance 1.2.3" in missing.stderr and "404" in missing.stderr
