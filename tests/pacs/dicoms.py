"""DICOM objects for PACS tests: the radiograph encodings a hospital archive holds (CR and DX, 8 to 16 bits,
MONOCHROME1, rescale and window, RLE and JPEG), plus objects an indexer must refuse with a reason
(undecodable JPEG 2000, multi-frame, a structured report).

Every object carries the same identifying patient tags (`SECRETS`), so privacy tests can grep an index for
them. Pixels come from real radiographs in the shared data when it is there, else from drawn phantoms, so
PACS tests also run without it; each object gets a different source image, since an indexer skips
identical content.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

from cbmir.imaging.io import ImageReadError, read_image
from cbmir.synthetic import KINDS, phantom
from tests.conftest import SHARED_DATA, read_grey

PATIENT_NAME = "CBMIRTEST^SECRETNAME"
PATIENT_ID = "SECRET-PID-4711"
PATIENT_BIRTH_DATE = "19420817"
INSTITUTION_NAME = "SECRET HOSPITAL"
REFERRING_PHYSICIAN_NAME = "SECRETDOCTOR^REFERRER"
SECRETS = (PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH_DATE, INSTITUTION_NAME, REFERRING_PHYSICIAN_NAME)
"""Identifying values set on every generated object; none may appear in an index."""

STUDY_DATES = ("20240105", "20240610", "20250320")
"""StudyDate values, spread over the objects so that date-range filters select some of them."""

CR_IMAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
BASIC_TEXT_SR = UID("1.2.840.10008.5.1.4.1.1.88.11")

_LONGEST_SIDE = 256
_IMAGES_NEEDED = 10  # one source image per generated image object
_TXV = "fixtures/txv"


@dataclass(frozen=True)
class TestDicom:
    """One generated DICOM file and what an indexer should make of it."""

    __test__ = False  # not a pytest test class, whatever its name

    path: Path
    study: str
    series: str
    sop: str
    kind: str
    study_date: str
    is_image: bool
    """Whether an indexer should index it (fetched in Explicit VR Little Endian where the PACS transcodes)."""
    reason_fragment: str | None = None
    """For objects that are not indexable: a lowercase part of the reason an indexer should give."""


def generate_dicoms(folder: Path) -> list[TestDicom]:
    """Write every test object into `folder` (created if needed); their descriptions, in writing order."""
    folder.mkdir(parents=True, exist_ok=True)
    images = source_images(_IMAGES_NEEDED)
    study, series = generate_uid(), generate_uid()
    objects: list[tuple[str, Dataset, bool, str | None]] = [
        ("cr-mono2-16bit", _cr_12bit(images[0]), True, None),
        ("dx-mono1-16bit", _dx_monochrome1(images[1]), True, None),
        ("cr-mono2-8bit", _cr_8bit(images[2]), True, None),
        ("dx-rescale-window", _dx_rescale_window(images[3]), True, None),
        ("cr-same-series-1", _in_series(_cr_12bit(images[4]), study, series, 1), True, None),
        ("cr-same-series-2", _in_series(_cr_12bit(images[5]), study, series, 2), True, None),
        ("cr-rle", _rle(_cr_12bit(images[6])), True, None),
        ("cr-jpeg-baseline", _jpeg_baseline(images[7]), True, None),
        ("dx-jpeg2000-undecodable", _undecodable_jpeg2000(images[8]), False, "cannot decode"),
        ("dx-multiframe", _multiframe(images[9]), False, "frames"),
        ("sr-basic-text", _basic_text_sr(), False, "not an image"),
    ]
    described: list[TestDicom] = []
    study_dates: dict[str, str] = {}
    for number, (kind, ds, is_image, reason) in enumerate(objects):
        date = study_dates.setdefault(ds.StudyInstanceUID, STUDY_DATES[number % len(STUDY_DATES)])
        described.append(_save(ds, folder / f"{number:02d}-{kind}.dcm", kind, date, is_image, reason))
    for number, source in enumerate(sorted((SHARED_DATA / _TXV).glob("*.dcm")), start=len(described)):
        described.append(_real_copy(source, folder, number))
    return described


def source_images(count: int) -> list[np.ndarray]:
    """`count` different uint8 radiographs (real ones when the shared data is there, else phantoms), at most
    `_LONGEST_SIDE` pixels on the longest side so that uploads and decoding stay fast."""
    paths = sorted((SHARED_DATA / "irma2007-dev").rglob("*.png"))
    if len(paths) >= count:
        images = [read_grey(path) for path in paths[:: len(paths) // count][:count]]
    else:
        rng = np.random.default_rng(4711)
        images = [phantom(KINDS[number % len(KINDS)], rng, _LONGEST_SIDE) for number in range(count)]
    return [_downscale(image) for image in images]


def _downscale(image: np.ndarray) -> np.ndarray:
    scale = _LONGEST_SIDE / max(image.shape)
    if scale >= 1:
        return image
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


# ----------------------------------------------------------------------------------------------- objects


def _base(sop_class: UID, modality: str) -> Dataset:
    """Patient, study and series attributes of a radiograph in its own new study."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.StudyTime = "093000"
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "cbmir tests"
    ds.InstitutionName = INSTITUTION_NAME
    ds.ReferringPhysicianName = REFERRING_PHYSICIAN_NAME
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = PATIENT_BIRTH_DATE
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    return ds


def _with_pixels(ds: Dataset, pixels: np.ndarray, photometric: str, bits_stored: int) -> Dataset:
    ds.set_pixel_data(pixels, photometric, bits_stored)
    ds.PixelSpacing = [0.5, 0.5]
    return ds


def _twelve_bit(image: np.ndarray) -> np.ndarray:
    return (image.astype(np.uint32) * 4095 // 255).astype(np.uint16)


def _cr_12bit(image: np.ndarray) -> Dataset:
    return _with_pixels(_base(CR_IMAGE, "CR"), _twelve_bit(image), "MONOCHROME2", 12)


def _dx_monochrome1(image: np.ndarray) -> Dataset:
    inverted = 65535 - image.astype(np.uint16) * 257  # MONOCHROME1: bone is dark in the stored values
    return _with_pixels(_base(DX_FOR_PRESENTATION, "DX"), inverted, "MONOCHROME1", 16)


def _cr_8bit(image: np.ndarray) -> Dataset:
    return _with_pixels(_base(CR_IMAGE, "CR"), image, "MONOCHROME2", 8)


def _dx_rescale_window(image: np.ndarray) -> Dataset:
    ds = _with_pixels(_base(DX_FOR_PRESENTATION, "DX"), _twelve_bit(image), "MONOCHROME2", 12)
    ds.RescaleSlope = "0.5"
    ds.RescaleIntercept = "-100"
    ds.RescaleType = "US"
    ds.WindowCenter = "900"  # the rescaled range is -100..1947.5; the window shows most of it
    ds.WindowWidth = "1800"
    return ds


def _in_series(ds: Dataset, study: str, series: str, number: int) -> Dataset:
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.InstanceNumber = number
    return ds


def _rle(ds: Dataset) -> Dataset:
    ds.compress(RLELossless, generate_instance_uid=False)
    return ds


def _encapsulated(ds: Dataset, frame: bytes, transfer_syntax: UID, rows: int, columns: int, bits: int) -> None:
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [0.5, 0.5]
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"


def _jpeg_baseline(image: np.ndarray) -> Dataset:
    """8-bit JPEG written by Pillow: PACS store what modalities compress, and Orthanc transcodes it."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=90)
    ds = _base(CR_IMAGE, "CR")
    _encapsulated(ds, buffer.getvalue(), JPEGBaseline8Bit, image.shape[0], image.shape[1], 8)
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    return ds


def _undecodable_jpeg2000(image: np.ndarray) -> Dataset:
    """JPEG 2000 whose codestream describes the image but holds no tile data: Orthanc has no JPEG 2000 codec,
    and the decoder pydicom finds (Pillow's OpenJPEG) fails on it, as on a cut-off transfer."""
    rows, columns = image.shape
    ds = _base(DX_FOR_PRESENTATION, "DX")
    _encapsulated(ds, _jpeg2000_main_header(rows, columns) + b"\xff\xd9", JPEG2000Lossless, rows, columns, 16)
    return ds


def _jpeg2000_main_header(rows: int, columns: int) -> bytes:
    """SOC, SIZ (one 16-bit unsigned component, one tile), COD (5 levels, reversible 5-3), QCD."""
    siz = b"\xff\x51" + (41).to_bytes(2, "big") + b"\x00\x00"
    siz += b"".join(value.to_bytes(4, "big") for value in (columns, rows, 0, 0, columns, rows, 0, 0))
    siz += (1).to_bytes(2, "big") + bytes([15, 1, 1])
    cod = b"\xff\x52" + (12).to_bytes(2, "big") + bytes([0, 0, 0, 1, 0, 5, 4, 4, 0, 1])
    qcd = b"\xff\x5c" + (19).to_bytes(2, "big") + bytes([0x40]) + bytes([8 << 3] * 16)
    return b"\xff\x4f" + siz + cod + qcd


def _multiframe(image: np.ndarray) -> Dataset:
    frames = np.stack([image, image[::-1], image[:, ::-1]]).astype(np.uint16) * 257
    return _with_pixels(_base(DX_FOR_PRESENTATION, "DX"), frames, "MONOCHROME2", 16)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue = value
    code.CodingSchemeDesignator = scheme
    code.CodeMeaning = meaning
    return code


def _basic_text_sr() -> Dataset:
    """A one-finding report: in the same studies as radiographs in a real PACS, but not an image."""
    ds = _base(BASIC_TEXT_SR, "SR")
    del ds.BodyPartExamined, ds.ViewPosition
    ds.ContentDate = "20240105"
    ds.ContentTime = "100000"
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic imaging report")])
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    finding = Dataset()
    finding.RelationshipType = "CONTAINS"
    finding.ValueType = "TEXT"
    finding.ConceptNameCodeSequence = Sequence([_code("121071", "DCM", "Finding")])
    finding.TextValue = "No acute cardiopulmonary findings."
    ds.ContentSequence = Sequence([finding])
    return ds


# ---------------------------------------------------------------------------------------------- writing


def _save(ds: Dataset, path: Path, kind: str, date: str, is_image: bool, reason: str | None) -> TestDicom:
    """Give `ds` a new SOP instance UID and `date`, write it in the DICOM file format, and describe it."""
    ds.SOPInstanceUID = generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return TestDicom(path, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, kind, date, is_image, reason)


def _real_copy(source: Path, folder: Path, number: int) -> TestDicom:
    """A copy of a real DICOM file with the test patient and new UIDs (the shared files carry the same UIDs
    in both); whether it is an image is what cbmir's reader says."""
    ds = pydicom.dcmread(source)
    for keyword, value in (
        ("PatientName", PATIENT_NAME),
        ("PatientID", PATIENT_ID),
        ("PatientBirthDate", PATIENT_BIRTH_DATE),
        ("InstitutionName", INSTITUTION_NAME),
        ("ReferringPhysicianName", REFERRING_PHYSICIAN_NAME),
    ):
        setattr(ds, keyword, value)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    kind = f"txv-{str(ds.PhotometricInterpretation).lower()}"
    path = folder / f"{number:02d}-{kind}.dcm"
    described = _save(ds, path, kind, STUDY_DATES[number % len(STUDY_DATES)], True, None)
    try:
        read_image(path)
    except ImageReadError as exc:
        return replace(described, is_image=False, reason_fragment=exc.reason.lower())
    return described
