"""The PACS test harness itself: Orthanc starts, stores every generated object, answers DICOMweb only with
credentials, keeps its data across a restart, transcodes, and pushes by C-STORE; the generated objects are
what their descriptions say."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE, AllStoragePresentationContexts, evt

from cbmir.imaging.io import ImageReadError, NotAnImageError, read_image
from tests.pacs import dicoms
from tests.pacs.dicoms import SECRETS, STUDY_DATES, TestDicom, generate_dicoms
from tests.pacs.orthanc import LISTENER_AE_TITLE, Orthanc, OrthancError


def _dicomweb(orthanc: Orthanc) -> DICOMwebClient:
    session = requests.Session()
    session.auth = (orthanc.user, orthanc.password)
    return DICOMwebClient(orthanc.dicomweb_url, session=session)


def _by_kind(objects: list[TestDicom], kind: str) -> TestDicom:
    return next(obj for obj in objects if obj.kind == kind)


def _check_readability(objects: list[TestDicom]) -> None:
    """Images read and the others fail with their reason; the SR's reason is the sync's wording (it refuses the
    SR by its SOP class without reading it), so for the SR the reader is only checked to call it not an image."""
    for obj in objects:
        if obj.is_image:
            read_image(obj.path)
            continue
        assert obj.reason_fragment is not None, obj.kind
        with pytest.raises(ImageReadError) as caught:
            read_image(obj.path)
        if obj.kind == "sr-basic-text":
            assert isinstance(caught.value, NotAnImageError)
        else:
            assert obj.reason_fragment in caught.value.reason.lower(), obj.kind


def test_generated_objects_are_what_they_say(generated_dicoms: list[TestDicom]) -> None:
    assert len({obj.sop for obj in generated_dicoms}) == len(generated_dicoms)
    assert {obj.study_date for obj in generated_dicoms} == set(STUDY_DATES)
    same_series = [obj for obj in generated_dicoms if obj.kind.startswith("cr-same-series")]
    assert len(same_series) == 2 and len({(obj.study, obj.series) for obj in same_series}) == 1
    for obj in generated_dicoms:
        ds = pydicom.dcmread(obj.path)
        assert (ds.SOPInstanceUID, ds.StudyDate) == (obj.sop, obj.study_date)
        text = str(ds)
        assert all(secret in text for secret in SECRETS), obj.kind
    _check_readability(generated_dicoms)


def test_phantoms_stand_in_for_missing_shared_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dicoms, "SHARED_DATA", tmp_path / "absent")
    objects = generate_dicoms(tmp_path / "dicoms")
    assert not [obj for obj in objects if obj.kind.startswith("txv")]
    _check_readability(objects)


def test_orthanc_stores_every_object_and_serves_it_over_dicomweb(
    orthanc: Orthanc, generated_dicoms: list[TestDicom]
) -> None:
    ids = orthanc.upload_files(obj.path for obj in generated_dicoms)
    assert sorted(orthanc.instances()) == sorted(ids) and len(set(ids)) == len(generated_dicoms)
    found = _dicomweb(orthanc).search_for_instances()
    assert {item["00080018"]["Value"][0] for item in found} == {obj.sop for obj in generated_dicoms}
    orthanc.delete_instance(ids[0])
    assert len(orthanc.instances()) == len(generated_dicoms) - 1


def test_dicomweb_refuses_requests_without_credentials(orthanc: Orthanc) -> None:
    assert httpx.get(f"{orthanc.dicomweb_url}/studies").status_code == 401


def test_orthanc_errors_carry_status(orthanc: Orthanc) -> None:
    with pytest.raises(OrthancError, match="404"):
        orthanc.delete_instance("no-such-instance")


@pytest.mark.parametrize("down", ["stop", "kill"])
def test_instances_survive_a_restart(orthanc: Orthanc, generated_dicoms: list[TestDicom], down: str) -> None:
    ids = orthanc.upload_files(obj.path for obj in generated_dicoms[:3])
    getattr(orthanc, down)()
    assert not orthanc.running
    orthanc.start()
    assert sorted(orthanc.instances()) == sorted(ids)


def test_transcoded_jpeg_baseline_is_readable(orthanc: Orthanc, generated_dicoms: list[TestDicom]) -> None:
    jpeg = _by_kind(generated_dicoms, "cr-jpeg-baseline")
    assert pydicom.dcmread(jpeg.path).file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    orthanc.upload(jpeg.path.read_bytes())
    ds = _dicomweb(orthanc).retrieve_instance(
        jpeg.study, jpeg.series, jpeg.sop, media_types=(("application/dicom", ExplicitVRLittleEndian),)
    )
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert read_image(buffer.getvalue()).pixels.shape == (ds.Rows, ds.Columns)


def test_push_reaches_a_store_scp_at_the_listener_port(orthanc: Orthanc, generated_dicoms: list[TestDicom]) -> None:
    images = [obj for obj in generated_dicoms if obj.is_image][:2]
    received: list[str] = []

    def store(event: evt.Event) -> int:
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    ae = AE(ae_title=LISTENER_AE_TITLE)
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(("127.0.0.1", orthanc.listener_port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    assert server is not None  # block=False: the server thread
    try:
        orthanc.push(orthanc.upload_files(obj.path for obj in images))
    finally:
        server.shutdown()
    assert sorted(received) == sorted(obj.sop for obj in images)


def test_push_without_a_listener_fails(orthanc: Orthanc, generated_dicoms: list[TestDicom]) -> None:
    ids = orthanc.upload_files(obj.path for obj in generated_dicoms[:1])
    with pytest.raises(OrthancError, match="modalities/cbmir/store"):
        orthanc.push(ids)
