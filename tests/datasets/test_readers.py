"""Tests of the dataset readers and `open_dataset`. Every reader runs on tiny layouts written to tmp_path
(image files hold placeholder bytes: readers list files, they do not decode them; tests/datasets/test_layouts.py
decodes them); the tests using `shared_path` check the counts of the real archives in the shared data folder
and skip with a reason when it is absent."""

import gzip
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cbmir.datasets import (
    NIH_FINDINGS,
    Dataset,
    DatasetError,
    Record,
    layouts,
    load_medmnist_image,
    open_dataset,
    read_class_folders,
    read_dicom_folder,
    read_irma,
    read_medmnist,
    read_nih,
    register_layout,
)
from cbmir.errors import CbmirError
from indexer.pipeline import read_archive
from tests.conftest import shared_path

CHEST = "1123-127-500-000"
HAND = "1121-110-411-700"


def touch(path: Path, content: bytes = b"placeholder") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def write_dicom(path: Path) -> Path:
    """A file with the DICOM preamble and magic: enough for the readers, which do not decode it."""
    return touch(path, bytes(128) + b"DICM" + bytes(16))


def only_problem(dataset: Dataset, kind: str):
    found = [problem for problem in dataset.problems if problem.kind == kind]
    assert len(found) == 1, dataset.summary()
    return found[0]


# --- Record -----------------------------------------------------------------------------------------------


def test_record_label_is_the_single_label_or_a_clear_error():
    single = Record("a", Path("a.png"), ["x"], "set")  # type: ignore[arg-type]  # made a tuple
    assert single.label == "x" and single.labels == ("x",)
    for labels in ((), ("x", "y")):
        with pytest.raises(DatasetError, match=f"has {len(labels)} labels"):
            _ = Record("b", Path("b.png"), labels, "set").label


def test_record_is_immutable_and_hashable_with_extra():
    record = Record("a", "a.png", ("x",), "set", extra={"view": "PA"})  # type: ignore[arg-type]  # made a Path
    assert isinstance(record.path, Path)
    with pytest.raises(TypeError):
        record.extra["view"] = "AP"  # type: ignore[index]
    assert {record, Record("a", Path("a.png"), ("x",), "set", extra={"view": "PA"})} == {record}
    assert issubclass(DatasetError, CbmirError)


# --- IRMA -------------------------------------------------------------------------------------------------


def irma_layout(folder: Path, rows: list[str], images: list[str]) -> Path:
    for name in images:
        touch(folder / "images" / name)
    (folder / "codes.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_read_irma_with_and_without_header(tmp_path):
    for header in (["image_id;irma_code"], []):
        folder = irma_layout(tmp_path / str(len(header)), header + [f"1;{CHEST}", f"2;{HAND}"], ["1.png", "2.jpg"])
        dataset = read_irma(folder)
        assert [(r.id, r.path.name, r.label, r.split, r.index) for r in dataset.records] == [
            ("1", "1.png", CHEST, None, None),
            ("2", "2.jpg", HAND, None, None),
        ]
        assert dataset.task == "single-label" and dataset.classes == (HAND, CHEST) and not dataset.problems
        assert {r.source for r in dataset.records} == {folder.name}


def test_read_irma_images_beside_an_explicit_table_and_codes_normalised(tmp_path):
    touch(tmp_path / "imgs" / "7.png")
    touch(tmp_path / "imgs" / "8.png")
    table = tmp_path / "labels.txt"
    table.write_text("7.png;1123127500000\n8;1121-110-411-700\n")
    dataset = read_irma(tmp_path / "imgs", table)
    assert [(r.id, r.label) for r in dataset.records] == [("7", CHEST), ("8", HAND)]


def test_read_irma_reports_every_problem_kind_with_line_and_row(tmp_path):
    rows = [
        "image_id;irma_code",
        f"1;{CHEST}",
        f"2;{CHEST}",  # missing file
        f"1;{HAND}",  # duplicate id
        "3;1123-127-500",  # invalid code
        "4;1123-12*-***-000",  # not-known positions are no ground truth
        "5",  # no code
    ]
    folder = irma_layout(tmp_path, rows, ["1.png", "3.png", "4.png", "5.png", "9.png"])
    dataset = read_irma(folder)
    assert [r.id for r in dataset.records] == ["1"]
    assert dataset.problem_counts == {
        "unreadable-row": 1,
        "duplicate-id": 1,
        "invalid-code": 2,
        "missing-file": 1,
        # 3, 4 and 5 are left out with their rows, and 9 has none.
        "unlisted-file": 4,
    }
    missing = only_problem(dataset, "missing-file")
    assert (missing.file.name, missing.line, missing.row) == ("codes.csv", 3, f"2;{CHEST}")
    duplicate = only_problem(dataset, "duplicate-id")
    assert (duplicate.line, duplicate.row) == (4, f"1;{HAND}") and "line 2" in duplicate.detail
    assert [(p.line, p.row) for p in dataset.problems if p.kind == "invalid-code"] == [
        (5, "3;1123-127-500"),
        (6, "4;1123-12*-***-000"),
    ]
    assert only_problem(dataset, "unreadable-row").line == 7
    summary = dataset.summary()
    assert "invalid-code: 2" in summary and f"codes.csv:3: '2;{CHEST}'" in summary
    with pytest.raises(DatasetError, match="missing-file: 1"):
        read_irma(folder, strict=True)


def test_read_irma_reports_undecodable_and_badly_quoted_rows(tmp_path):
    touch(tmp_path / "images" / "1.png")
    (tmp_path / "codes.csv").write_bytes(f'1;{CHEST}\n"2"x;{CHEST}\n\xff3;{CHEST}\n'.encode("latin-1"))
    dataset = read_irma(tmp_path)
    assert len(dataset) == 1
    assert [(p.kind, p.line) for p in dataset.problems] == [("unreadable-row", 2), ("unreadable-row", 3)]


def test_read_irma_without_table_is_an_error(tmp_path):
    touch(tmp_path / "images" / "1.png")
    with pytest.raises(DatasetError, match="label table not found"):
        read_irma(tmp_path)
    with pytest.raises(DatasetError, match="folder not found"):
        read_irma(tmp_path / "absent")


def test_read_irma_ignores_hidden_files(tmp_path):
    folder = irma_layout(tmp_path, [f"1;{CHEST}"], ["1.png", "._1.png", ".2.png"])
    dataset = read_irma(folder)
    assert [r.path.name for r in dataset.records] == ["1.png"] and not dataset.problems


# --- class folders ----------------------------------------------------------------------------------------


def test_read_class_folders_without_split_level(tmp_path):
    touch(tmp_path / "NORMAL" / "a.png")
    touch(tmp_path / "NORMAL" / "sub" / "b.jpeg")
    touch(tmp_path / "PNEUMONIA" / "c.png")
    touch(tmp_path / "PNEUMONIA" / "notes.txt")
    touch(tmp_path / "PNEUMONIA" / ".hidden.png")
    dataset = read_class_folders(tmp_path)
    assert [(r.id, r.label, r.split) for r in dataset.records] == [
        ("a", "NORMAL", None),
        ("b", "NORMAL", None),
        ("c", "PNEUMONIA", None),
    ]
    assert dataset.classes == ("NORMAL", "PNEUMONIA") and not dataset.problems


def test_read_class_folders_with_split_level_normalises_split_names(tmp_path):
    for split, name in (("train", "t"), ("valid", "v1"), ("VAL", "v2"), ("test", "x")):
        touch(tmp_path / split / "0_normal" / f"{name}.png")
        touch(tmp_path / split / "1_abnormal" / f"{name}-b.png")
    dataset = read_class_folders(tmp_path)
    assert Counter(r.split for r in dataset.records) == {"train": 2, "validation": 4, "test": 2}
    assert dataset.classes == ("0_normal", "1_abnormal") and not dataset.problems


def test_read_class_folders_reports_duplicates_and_stray_images(tmp_path):
    touch(tmp_path / "train" / "A" / "same.png")
    touch(tmp_path / "test" / "B" / "same.png")
    touch(tmp_path / "train" / "loose.png")
    touch(tmp_path / "other" / "A" / "elsewhere.png")
    dataset = read_class_folders(tmp_path)
    assert [r.path.relative_to(tmp_path).as_posix() for r in dataset.records] == ["test/B/same.png"]
    assert dataset.problem_counts == {"duplicate-id": 1, "unlisted-file": 2}
    assert only_problem(dataset, "duplicate-id").file == tmp_path / "train" / "A" / "same.png"


def test_read_class_folders_without_images_is_an_error(tmp_path):
    touch(tmp_path / "A" / "readme.txt")
    with pytest.raises(DatasetError, match="no images in class folders"):
        read_class_folders(tmp_path)


def test_read_class_folders_reads_every_image_suffix_in_any_case(tmp_path):
    for name in ("a.PNG", "b.dicom", "c.Tiff", "d.dcm"):
        touch(tmp_path / "A" / name)
    touch(tmp_path / "B" / "e.jpg")
    assert [r.id for r in read_class_folders(tmp_path).records] == ["a", "b", "c", "d", "e"]


# --- NIH --------------------------------------------------------------------------------------------------

NIH_HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position"


def nih_layout(root: Path, rows: list[str], images: list[str], gzipped: bool = False) -> Path:
    for name in images:
        touch(root / "tree" / name)
    text = "\n".join([NIH_HEADER] + rows) + "\n"
    table = root / ("table.csv.gz" if gzipped else "table.csv")
    table.write_bytes(gzip.compress(text.encode()) if gzipped else text.encode())
    return table


@pytest.mark.parametrize("gzipped", [False, True])
def test_read_nih_joins_the_table_to_the_tree(tmp_path, gzipped):
    rows = [
        "00000001_000.png,Cardiomegaly|Emphysema,0,1,57,M,PA",
        "00000002_000.png,No Finding,0,2,81,F,AP",
        "00000003_000.png,Hernia,0,3,74,F,PA",  # not below the root: ignored
    ]
    table = nih_layout(tmp_path, rows, ["train/1_abnormal/00000001_000.png", "test/0_normal/00000002_000.jpg"], gzipped)
    dataset = read_nih(tmp_path / "tree", table)
    assert dataset.task == "multi-label" and not dataset.problems
    assert [(r.id, r.labels, r.split) for r in dataset.records] == [
        ("00000002_000", (), "test"),
        ("00000001_000", ("Cardiomegaly", "Emphysema"), "train"),
    ]
    assert dict(dataset.records[1].extra) == {"patient_id": "1", "age": "57", "sex": "M", "view": "PA"}
    assert dataset.classes == ("Cardiomegaly", "Emphysema")


def test_read_nih_reports_unknown_labels_duplicates_and_unlisted_images(tmp_path):
    rows = [
        "a.png,Effusion,0,1,50,M,PA",
        "b.png,Effusion|Covid,0,2,50,M,PA",  # unknown finding
        "a.png,Mass,1,1,51,M,PA",  # duplicate
        "c.png,Mass",  # too few fields
    ]
    table = nih_layout(tmp_path, rows, ["a.png", "b.png", "d.png"])
    dataset = read_nih(tmp_path / "tree", table)
    assert [r.id for r in dataset.records] == ["a"]
    assert dataset.problem_counts == {"unreadable-row": 1, "duplicate-id": 1, "unknown-label": 1, "unlisted-file": 1}
    unknown = only_problem(dataset, "unknown-label")
    assert (unknown.line, unknown.row) == (3, rows[1]) and "Covid" in unknown.detail
    assert only_problem(dataset, "unlisted-file").file.name == "d.png"


def test_read_nih_needs_the_key_columns(tmp_path):
    touch(tmp_path / "tree" / "a.png")
    (tmp_path / "table.csv").write_text("file,label\na.png,Mass\n")
    with pytest.raises(DatasetError, match="'Image Index'"):
        read_nih(tmp_path / "tree", tmp_path / "table.csv")


# --- DICOM ------------------------------------------------------------------------------------------------


def dicom_tree(root: Path) -> Path:
    write_dicom(root / "p1" / "s1" / "IM1.dcm")
    write_dicom(root / "p1" / "s2" / "IM1.dcm")
    write_dicom(root / "p2" / "1.2.840.5")  # no extension: found by its magic
    touch(root / "p2" / "notes.txt", b"not a dicom file" * 20)
    write_dicom(root / "DICOMDIR")
    return root


def test_read_dicom_folder_unlabelled(tmp_path):
    dataset = read_dicom_folder(dicom_tree(tmp_path / "tree"))
    assert [r.id for r in dataset.records] == ["p1/s1/IM1", "p1/s2/IM1", "p2/1.2.840.5"]
    assert dataset.task == "unlabelled" and dataset.classes == () and not dataset.problems


def test_read_dicom_folder_labelled_by_csv(tmp_path):
    root = dicom_tree(tmp_path / "tree")
    write_dicom(root / "p3" / "single.dcm")
    labels = tmp_path / "labels.csv"
    rows = [
        "file,label",
        "p1/s1/IM1.dcm,chest",
        "p2/1.2.840.5,hand",
        "single,skull",
        "IM1,chest",
        "absent.dcm,x",
        "p1/s1/IM1,hand",
    ]
    labels.write_text("\n".join(rows) + "\n")
    dataset = read_dicom_folder(root, labels)
    assert [(r.id, r.label) for r in dataset.records] == [
        ("p1/s1/IM1", "chest"),
        ("p2/1.2.840.5", "hand"),
        ("p3/single", "skull"),
    ]
    assert dataset.problem_counts == {"duplicate-id": 1, "missing-file": 2, "unlisted-file": 1}
    assert [
        (p.line, p.detail.startswith("names several files")) for p in dataset.problems if p.kind == "missing-file"
    ] == [(5, True), (6, False)]
    assert only_problem(dataset, "duplicate-id").line == 7
    assert only_problem(dataset, "unlisted-file").file == root / "p1" / "s2" / "IM1.dcm"


def test_read_dicom_folder_without_dicom_is_an_error(tmp_path):
    touch(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="no DICOM files"):
        read_dicom_folder(tmp_path)


def test_read_dicom_folder_takes_dicom_suffix_files_by_their_magic(tmp_path):
    write_dicom(tmp_path / "a.dicom")
    touch(tmp_path / "b.dicom", b"no magic" * 20)
    write_dicom(tmp_path / "c.png")  # another format's suffix: never taken for DICOM
    assert [r.id for r in read_dicom_folder(tmp_path).records] == ["a.dicom"]


# --- MedMNIST ---------------------------------------------------------------------------------------------


def write_medmnist(path: Path, sizes=(5, 2, 3), labels=None, channels: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    arrays: dict[str, Any] = {}
    for prefix, size in zip(("train", "val", "test"), sizes, strict=True):
        shape = (size, 6, 6) if channels is None else (size, 6, 6, channels)
        arrays[f"{prefix}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{prefix}_labels"] = (
            (np.arange(size) % 2).reshape(-1, 1).astype(np.uint8) if labels is None else labels[prefix]
        )
    np.savez_compressed(path, **arrays)
    return path


def test_read_medmnist_records_and_images(tmp_path):
    npz = write_medmnist(tmp_path / "tiny.npz")
    dataset = read_medmnist(npz, class_names=["normal", "pneumonia"])
    assert Counter(r.split for r in dataset.records) == {"train": 5, "validation": 2, "test": 3}
    record = dataset.records[6]
    assert (record.id, record.split, record.index, record.label, record.path) == (
        "validation-1",
        "validation",
        1,
        "pneumonia",
        npz,
    )
    with np.load(npz) as archive:
        expected = archive["val_images"][1]
    image = load_medmnist_image(record)
    assert image.dtype == np.uint8 and image.ndim == 2 and np.array_equal(image, expected)
    assert read_medmnist(npz).classes == ("0", "1")


def test_load_medmnist_image_follows_a_rewritten_archive_and_converts_colour(tmp_path):
    npz = write_medmnist(tmp_path / "tiny.npz")
    record = read_medmnist(npz).records[0]
    assert load_medmnist_image(record).shape == (6, 6)
    write_medmnist(npz, channels=3)
    os.utime(npz, ns=(0, 10**9 + npz.stat().st_mtime_ns))
    image = load_medmnist_image(record)
    assert image.shape == (6, 6) and image.dtype == np.uint8
    with pytest.raises(DatasetError, match="MedMNIST"):
        load_medmnist_image(Record("x", npz, ("0",), "set"))


def test_read_medmnist_unknown_labels_and_multi_label(tmp_path):
    labels = {
        "train": np.array([[0], [1], [7]], np.uint8),
        "val": np.zeros((1, 1), np.uint8),
        "test": np.ones((1, 1), np.uint8),
    }
    dataset = read_medmnist(write_medmnist(tmp_path / "a.npz", (3, 1, 1), labels), ["no", "yes"])
    assert len(dataset) == 4
    problem = only_problem(dataset, "unknown-label")
    assert (problem.line, problem.row) == (2, "train_labels[2] = [7]")

    multi = {
        "train": np.array([[1, 0, 1], [0, 0, 0]], np.uint8),
        "val": np.array([[0, 1, 0]], np.uint8),
        "test": np.array([[1, 1, 0]], np.uint8),
    }
    dataset = read_medmnist(write_medmnist(tmp_path / "b.npz", (2, 1, 1), multi), ["x", "y", "z"])
    assert dataset.task == "multi-label"
    assert [r.labels for r in dataset.records] == [("x", "z"), (), ("y",), ("x", "y")]


def test_read_medmnist_rejects_bad_archives(tmp_path):
    labels = {prefix: np.zeros((size, 1), np.uint8) for prefix, size in (("train", 4), ("val", 2), ("test", 3))}
    with pytest.raises(DatasetError, match="shape"):
        read_medmnist(write_medmnist(tmp_path / "short.npz", labels=labels))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DatasetError, match="no train/val/test"):
        read_medmnist(tmp_path / "other.npz")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="not a readable"):
        read_medmnist(tmp_path / "broken.npz")


def test_load_medmnist_image_names_an_index_the_archive_lacks(tmp_path):
    npz = write_medmnist(tmp_path / "tiny.npz")
    with pytest.raises(DatasetError, match="tiny.npz: val_images has 2 images, no image 5"):
        load_medmnist_image(Record("x", npz, ("0",), "set", "validation", 5))


# --- detection --------------------------------------------------------------------------------------------


def test_open_dataset_detects_each_layout(tmp_path):
    irma = irma_layout(tmp_path / "irma", [f"1;{CHEST}"], ["1.png"])
    assert open_dataset(irma).classes == (CHEST,)
    assert open_dataset(write_medmnist(tmp_path / "m.npz")).records[0].index == 0
    assert len(open_dataset(dicom_tree(tmp_path / "dicom"))) == 3
    touch(tmp_path / "classes" / "A" / "a.png")
    touch(tmp_path / "classes" / "B" / "b.png")
    assert open_dataset(tmp_path / "classes").classes == ("A", "B")
    table = nih_layout(tmp_path / "nih", ["a.png,Mass,0,1,50,M,PA"], ["a.png"])
    assert open_dataset(tmp_path / "nih" / "tree", table=table).task == "multi-label"


def test_open_dataset_lists_the_supported_layouts_when_nothing_fits(tmp_path):
    touch(tmp_path / "flat" / "a.png")
    touch(tmp_path / "one-class" / "png" / "a.png")
    for folder in ("flat", "one-class"):
        with pytest.raises(DatasetError, match="Supported layouts:(.|\n)*MedMNIST(.|\n)*class folders"):
            open_dataset(tmp_path / folder)
    with pytest.raises(DatasetError, match="one-class tree"):
        open_dataset(tmp_path / "one-class")
    with pytest.raises(DatasetError, match="no such file"):
        open_dataset(tmp_path / "absent")


def test_open_dataset_lists_every_registered_layout_in_order(tmp_path):
    with pytest.raises(DatasetError) as raised:
        open_dataset(touch(tmp_path / "notes.txt"))
    listed = str(raised.value).split("Supported layouts:\n")[1].splitlines()
    assert listed == [f"  - {layout.describe}" for layout in layouts()]
    assert [layout.name for layout in layouts()] == ["irma", "medmnist", "nih", "dicom", "class-folders"]


def test_register_layout_refuses_a_name_twice():
    [first, *_] = layouts()
    with pytest.raises(DatasetError, match="already registered"):
        register_layout(first.name, detect=first.detect, read=first.read, describe="again", order=0)


# --- real data --------------------------------------------------------------------------------------------


def test_real_irma2007_dev():
    dataset = open_dataset(shared_path("irma2007-dev"))
    assert len(dataset) == 650 and not dataset.problems
    assert dataset.summary() == "irma2007-dev: 650 records, single-label, 115 classes; splits: none\nproblems: none"
    assert len(dataset.classes) == 115
    assert Counter(r.label for r in dataset.records).most_common(1) == [("1123-127-500-000", 118)]


def test_real_nih1000_with_the_nih_table():
    dataset = read_nih(shared_path("chest/nih1000"), shared_path("chest/nih_Data_Entry_2017_v2020.csv.gz"))
    assert len(dataset) == 1000 and not dataset.problems and dataset.classes == NIH_FINDINGS
    assert Counter(r.split for r in dataset.records) == {"train": 600, "validation": 200, "test": 200}
    by_folder: dict[str, list[Record]] = {"0_normal": [], "1_abnormal": []}
    for record in dataset.records:
        by_folder[record.path.parent.name].append(record)
    assert all(r.labels for r in by_folder["1_abnormal"])
    # The normal folders hold 500 images, one of which the table labels with a finding.
    assert [(r.id, r.labels, r.split) for r in by_folder["0_normal"] if r.labels] == [
        ("00000193_019", ("Pneumonia",), "validation")
    ]
    folders = read_class_folders(shared_path("chest/nih1000"))
    assert len(folders) == 1000 and folders.classes == ("0_normal", "1_abnormal")


def test_real_kermany():
    dataset = open_dataset(shared_path("chest/kermany-600x2"))
    assert Counter(r.label for r in dataset.records) == {"NORMAL": 600, "PNEUMONIA": 600} and not dataset.problems


def test_real_pneumoniamnist():
    dataset = open_dataset(shared_path("chest/pneumoniamnist_28.npz"), class_names=["normal", "pneumonia"])
    assert Counter(r.split for r in dataset.records) == {"train": 4708, "validation": 524, "test": 624}
    assert dataset.classes == ("normal", "pneumonia") and not dataset.problems
    assert load_medmnist_image(dataset.records[-1]).shape == (28, 28)


def test_a_folder_of_dicom_and_other_images_is_read_whole_never_partly(tmp_path):
    """Issue 12, defect 4: one DICOM file among PNGs made the folder read as a DICOM tree of that file alone,
    with no problem reported."""
    write_dicom(tmp_path / "mixed" / "one.dcm")
    for name in ("a.png", "b.jpg", "c.tif"):
        touch(tmp_path / "mixed" / name)
    with pytest.raises(DatasetError, match="holds 3 image file.s. that are not DICOM .e.g. a.png. beside its DICOM"):
        open_dataset(tmp_path / "mixed")
    name, records = read_archive(tmp_path / "mixed")
    assert sorted(record.path.name for record in records) == ["a.png", "b.jpg", "c.tif", "one.dcm"]
