"""`cbmir listen`, the C-STORE receiver: real associations from pynetdicom and from a real Orthanc, the status
each instance gets, images indexed through the indexer's stages, nothing acknowledged ever lost (a listener
killed with SIGKILL), and no patient-identifying tag kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from cbmir.embed import Embedder
from cbmir.index import Engine, Filters
from cbmir.search import Retrieval
from indexer.listener import CANNOT_UNDERSTAND, SPOOL, SUCCESS, Listener, ListenerError
from tests.conftest import small_checkpoint
from tests.pacs.dicoms import SECRETS
from tests.pacs.orthanc import Orthanc, free_ports

CODES = ["1121-127-700-500", "1123-211-500-700"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return small_checkpoint(tmp_path_factory.mktemp("model"), CODES)


@pytest.fixture
def listening(model, tmp_path) -> Iterator[Listener]:
    [port] = free_ports(1)
    with (
        Retrieval.open(tmp_path / "db", Embedder.load(model)) as retrieval,
        Listener(retrieval, port=port, batch_seconds=0.2) as listener,
    ):
        yield listener


def send(port: int, datasets: list[Dataset]) -> list[int]:
    """C-STORE each data set in one association, as a modality would; the statuses answered."""
    sender = AE(ae_title="MODALITY")
    for context in StoragePresentationContexts[:100]:
        assert context.abstract_syntax is not None
        sender.add_requested_context(context.abstract_syntax)
    # The compressed test objects need their own transfer syntax proposed.
    for dataset in datasets:
        syntax = dataset.file_meta.TransferSyntaxUID
        if not syntax.is_compressed:
            continue
        sender.add_requested_context(dataset.SOPClassUID, [syntax])
    association = sender.associate("127.0.0.1", port, ae_title="CBMIR")
    assert association.is_established
    try:
        statuses = []
        for dataset in datasets:
            answer = association.send_c_store(dataset)
            statuses.append(int(answer.Status) if answer else -1)
        return statuses
    finally:
        association.release()


def test_received_images_are_indexed_and_the_rest_refused_with_a_reason(listening, generated_dicoms):
    images = [d for d in generated_dicoms if d.is_image and d.kind != "cr-jpeg-baseline"]
    refused = [d for d in generated_dicoms if d.kind in ("dx-multiframe", "dx-jpeg2000-undecodable")]
    statuses = send(listening.address[1], [pydicom.dcmread(d.path) for d in images + refused])
    assert statuses == [SUCCESS] * len(images) + [CANNOT_UNDERSTAND] * len(refused)
    listening.stop()  # indexes everything received before it returns
    engine = listening.retrieval.engine
    rows = engine.get(engine.query(Filters()))
    assert sorted(row.extra["SOPInstanceUID"] for row in rows) == sorted(d.sop for d in images)
    assert {row.dataset for row in rows} == {"received"}
    failures = {f["location"]: f["reason"] for f in engine.failures()}
    for item in refused:
        [reason] = [reason for location, reason in failures.items() if item.sop in location]
        assert "MODALITY" in reason and item.reason_fragment in reason.lower()


def test_a_structured_report_is_refused_and_garbage_does_not_stop_the_listener(listening, generated_dicoms):
    report = next(d for d in generated_dicoms if d.kind == "sr-basic-text")
    image = next(d for d in generated_dicoms if d.kind == "cr-mono2-8bit")
    cut = pydicom.dcmread(image.path)
    cut.PixelData = cut.PixelData[: len(cut.PixelData) // 3]  # a sender's broken object
    cut.SOPInstanceUID = "1.2.3.4.5.6"
    statuses = send(listening.address[1], [pydicom.dcmread(report.path), cut, pydicom.dcmread(image.path)])
    assert statuses[:2] == [CANNOT_UNDERSTAND, CANNOT_UNDERSTAND] and statuses[2] == SUCCESS
    listening.stop()
    engine = listening.retrieval.engine
    assert [row.extra["SOPInstanceUID"] for row in engine.get(engine.query(Filters()))] == [image.sop]
    reasons = " ".join(f["reason"] for f in engine.failures())
    assert "no pixel data" in reasons and "1.2.3.4.5.6" in reasons


def test_verification_answers(listening):
    sender = AE(ae_title="MODALITY")
    sender.add_requested_context(Verification)
    association = sender.associate("127.0.0.1", listening.address[1], ae_title="CBMIR")
    assert association.is_established
    assert int(association.send_c_echo().Status) == SUCCESS
    association.release()


def test_orthanc_pushes_to_the_listener(orthanc: Orthanc, generated_dicoms, model, tmp_path):
    images = [d for d in generated_dicoms if d.is_image]
    ids = orthanc.upload_files(d.path for d in images)
    with (
        Retrieval.open(tmp_path / "db", Embedder.load(model)) as retrieval,
        Listener(retrieval, port=orthanc.listener_port, batch_seconds=0.2),
    ):
        orthanc.push(ids)
    with Engine.open(tmp_path / "db") as engine:
        assert sorted(row.extra["SOPInstanceUID"] for row in engine.get(engine.query(Filters()))) == sorted(
            d.sop for d in images
        )


def test_nothing_acknowledged_is_lost_when_the_listener_is_killed(generated_dicoms, model, tmp_path):
    db, [port] = tmp_path / "db", free_ports(1)
    command = [sys.executable, "-m", "cbmir", "listen", "--db", str(db), "--model", str(model), "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    images = [d for d in generated_dicoms if d.is_image and d.kind != "cr-jpeg-baseline"]
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                statuses = send(port, [pydicom.dcmread(d.path) for d in images])
                break
            except AssertionError:  # not listening yet
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.2)
        os.kill(process.pid, signal.SIGKILL)  # before its batch wait is over: received, not yet indexed
    finally:
        process.kill()
        process.wait()
    assert statuses == [SUCCESS] * len(images)
    assert len(list((db / SPOOL).glob("*.dcm"))) == len(images)
    with Retrieval.open(db, Embedder.load(model)) as retrieval, Listener(retrieval, port=port):
        pass  # a restart indexes what was spooled
    with Engine.open(db) as engine:
        sops = [row.extra["SOPInstanceUID"] for row in engine.get(engine.query(Filters()))]
    assert sorted(sops) == sorted(d.sop for d in images)


def test_no_patient_identifying_tag_is_kept(listening, generated_dicoms, tmp_path):
    images = [d for d in generated_dicoms if d.is_image and d.kind != "cr-jpeg-baseline"]
    send(listening.address[1], [pydicom.dcmread(d.path) for d in images])
    listening.stop()
    folder = listening.retrieval.engine.folder
    listening.retrieval.engine.flush()
    for path in folder.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            for secret in SECRETS:
                assert secret.encode() not in content, f"{secret} found in {path}"
    for path in (folder / SPOOL).glob("*.dcm"):
        kept = pydicom.dcmread(path)
        assert "PatientName" not in kept and "PatientID" not in kept and "PixelData" in kept


def test_a_port_in_use_is_a_clear_error(model, tmp_path):
    with Retrieval.open(tmp_path / "db", Embedder.load(model)) as retrieval:
        [port] = free_ports(1)
        with Listener(retrieval, port=port):
            second = Listener(retrieval, port=port)
            with pytest.raises(ListenerError, match=f"cannot listen on 127.0.0.1:{port}"):
                second.start()
