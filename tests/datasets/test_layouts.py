"""The contract every registered dataset layout keeps, checked on a tiny archive of real (decodable) images
made in tmp_path: `open_dataset` detects it as that layout, reads the expected records without problems, and
`load_pixels` gives each record's pixels as the 2-D array that was written.

A layout registered without an example maker in `EXAMPLES` fails here: add one with the layout."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cbmir.datasets import Layout, layouts, load_pixels, open_dataset

CHEST = "1123-127-500-000"
HAND = "1121-110-411-700"


@dataclass
class Example:
    """A tiny archive: the path and options to open it with, and the (id, labels) and pixels of each record."""

    path: Path
    records: Sequence[tuple[str, tuple[str, ...]]]
    pixels: dict[str, np.ndarray]
    options: dict[str, Any] = field(default_factory=dict)


def grey(seed: int, shape: tuple[int, int] = (6, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), pixels)
    return path


def write_dicom(path: Path, pixels: np.ndarray) -> Path:
    """A minimal single-frame MONOCHROME2 secondary capture holding `pixels` as 16-bit values."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = DicomDataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "OT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def irma(root: Path) -> Example:
    pixels = {"1": grey(1), "2": grey(2)}
    for image_id, image in pixels.items():
        write_png(root / "images" / f"{image_id}.png", image)
    (root / "codes.csv").write_text(f"image_id;irma_code\n1;{CHEST}\n2;{HAND}\n")
    return Example(root, [("1", (CHEST,)), ("2", (HAND,))], pixels)


def medmnist(root: Path) -> Example:
    images = {"train": np.stack([grey(1), grey(2)]), "val": grey(3)[None], "test": grey(4)[None]}
    labels = {"train": [[1], [0]], "val": [[0]], "test": [[1]]}
    root.mkdir()
    npz = root / "tinymnist.npz"
    arrays: dict[str, Any] = {f"{prefix}_images": array for prefix, array in images.items()}
    arrays.update({f"{prefix}_labels": np.array(values, np.uint8) for prefix, values in labels.items()})
    np.savez_compressed(npz, **arrays)
    pixels = {
        "train-0": images["train"][0],
        "train-1": images["train"][1],
        "validation-0": images["val"][0],
        "test-0": images["test"][0],
    }
    records = [("train-0", ("1",)), ("train-1", ("0",)), ("validation-0", ("0",)), ("test-0", ("1",))]
    return Example(npz, records, pixels)


def nih(root: Path) -> Example:
    pixels = {"00000001_000": grey(1), "00000002_000": grey(2)}
    write_png(root / "images" / "train" / "00000001_000.png", pixels["00000001_000"])
    write_png(root / "images" / "test" / "00000002_000.png", pixels["00000002_000"])
    table = root / "Data_Entry.csv"
    table.write_text(
        "Image Index,Finding Labels,Patient ID\n00000001_000.png,Mass|Edema,1\n00000002_000.png,No Finding,2\n"
    )
    records = [("00000002_000", ()), ("00000001_000", ("Edema", "Mass"))]
    return Example(root / "images", records, pixels, {"table": table})


def dicom(root: Path) -> Example:
    pixels = {"p1/s1/IM1": grey(1).astype(np.uint16) * 16, "p1/s2/IM1": grey(2).astype(np.uint16) * 16}
    for record_id, image in pixels.items():
        write_dicom(root / f"{record_id}.dcm", image)
    return Example(root, [(record_id, ()) for record_id in pixels], pixels)


def class_folders(root: Path) -> Example:
    pixels = {"a": grey(1), "b": grey(2), "c": grey(3)}
    write_png(root / "NORMAL" / "a.png", pixels["a"])
    write_png(root / "NORMAL" / "more" / "b.png", pixels["b"])
    write_png(root / "PNEUMONIA" / "c.png", pixels["c"])
    return Example(root, [("a", ("NORMAL",)), ("b", ("NORMAL",)), ("c", ("PNEUMONIA",))], pixels)


EXAMPLES: dict[str, Callable[[Path], Example]] = {
    "irma": irma,
    "medmnist": medmnist,
    "nih": nih,
    "dicom": dicom,
    "class-folders": class_folders,
}


def test_every_registered_layout_has_an_example_archive():
    assert sorted(EXAMPLES) == sorted(layout.name for layout in layouts())


@pytest.mark.parametrize("layout", layouts(), ids=lambda layout: layout.name)
def test_layout_is_detected_read_and_its_pixels_load(layout: Layout, tmp_path):
    if layout.name not in EXAMPLES:
        pytest.fail(f"layout {layout.name!r} has no example archive: add a maker to EXAMPLES in {__file__}")
    example = EXAMPLES[layout.name](tmp_path / "archive")
    detected = [other.name for other in layouts() if other.detect(example.path, **example.options)]
    assert detected[:1] == [layout.name], f"tried first by open_dataset: {detected}"
    dataset = open_dataset(example.path, **example.options)
    assert dataset == layout.read(example.path, **example.options)
    assert [(record.id, record.labels) for record in dataset.records] == example.records
    assert not dataset.problems, dataset.summary()
    for record in dataset.records:
        pixels = load_pixels(record)
        assert pixels.ndim == 2, record
        np.testing.assert_array_equal(pixels, example.pixels[record.id], err_msg=record.id)
