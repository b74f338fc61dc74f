"""The NIH ChestX-ray14 layout: an image tree (any depth) labelled by the NIH label table, given as
``table=`` (the table covers the whole archive, the tree may hold a part of it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cbmir.datasets.records import Dataset, DatasetError, Problem, Record, finish, require_folder, split_of
from cbmir.datasets.registry import register_layout
from cbmir.datasets.tables import strip_image_suffix, table_rows
from cbmir.imaging.listing import image_files

NIH_FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
)
NIH_NO_FINDING = "No Finding"
# Record.extra keys and the table columns they come from, when the table has them.
_EXTRA_COLUMNS = {"patient_id": "Patient ID", "age": "Patient Age", "sex": "Patient Gender", "view": "View Position"}


def detect(path: Path, **options: Any) -> bool:
    return path.is_dir() and "table" in options


def read_nih(root: str | os.PathLike[str], table: str | os.PathLike[str], *, strict: bool = False) -> Dataset:
    """NIH ChestX-ray14: the images below `root` (any depth) labelled by the NIH table (plain or gzipped CSV).

    Images join table rows by file name without extension, so re-encoded copies still match. Labels are the
    pipe-separated findings of `NIH_FINDINGS`; ``No Finding`` gives no labels. The split comes from a
    train/validation/test folder on the image's path, if any. `extra` holds patient id, age, sex and view
    position. Table rows for images not below `root` are ignored: the table covers the whole archive.
    """
    root, table = Path(root), Path(table)
    require_folder(root, "NIH image")
    problems: list[Problem] = []
    images: dict[str, Path] = {}
    for path in image_files(root):
        if path.stem in images:
            detail = f"id {path.stem!r} already used by {images[path.stem]}"
            problems.append(Problem("duplicate-id", path, None, "", detail))
        else:
            images[path.stem] = path
    rows = table_rows(table, problems)
    header = next(rows, None)
    columns = {name: position for position, name in enumerate(header[2] if header else [])}
    for required in ("Image Index", "Finding Labels"):
        if required not in columns:
            raise DatasetError(f"{table}: no {required!r} column; is this the NIH ChestX-ray14 label table?")
    extra_columns = {key: columns[name] for key, name in _EXTRA_COLUMNS.items() if name in columns}
    width = max(columns.values()) + 1
    known = set(NIH_FINDINGS)
    labelled: dict[str, Record] = {}
    seen: dict[str, int] = {}
    for number, text, fields in rows:
        if len(fields) < width:
            problems.append(Problem("unreadable-row", table, number, text, f"{len(fields)} fields, expected {width}"))
            continue
        image_id = strip_image_suffix(fields[columns["Image Index"]])
        if image_id not in images:
            continue
        if image_id in seen:
            detail = f"id {image_id!r} already on line {seen[image_id]}"
            problems.append(Problem("duplicate-id", table, number, text, detail))
            continue
        seen[image_id] = number
        findings = [value.strip() for value in fields[columns["Finding Labels"]].split("|")]
        if findings == [NIH_NO_FINDING]:
            findings = []
        unknown = [value for value in findings if value not in known]
        if unknown:
            problems.append(Problem("unknown-label", table, number, text, f"not one of the 14 NIH findings: {unknown}"))
            continue
        path = images[image_id]
        extra = {key: fields[position] for key, position in extra_columns.items()}
        split = split_of(path.relative_to(root))
        labelled[image_id] = Record(image_id, path, tuple(sorted(findings)), root.name, split, extra=extra)
    problems.extend(
        Problem("unlisted-file", path, None, "", f"no row of {table.name} names this image")
        for image_id, path in images.items()
        if image_id not in seen
    )
    records = sorted(labelled.values(), key=lambda record: record.path)
    return finish(root.name, records, "multi-label", problems, strict)


register_layout(
    "nih",
    detect=detect,
    read=read_nih,
    describe="NIH ChestX-ray14: an image folder, with table= the NIH label table",
    order=30,
)
