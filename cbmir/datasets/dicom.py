"""The DICOM tree layout: DICOM files at any depth (``.dcm``, or any file with the ``DICM`` magic),
unlabelled or labelled by a ``file,label`` table. Tried before class folders, so a class tree of DICOM
files reads as a DICOM tree."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cbmir.datasets.records import Dataset, DatasetError, Problem, Record, finish, require_folder
from cbmir.datasets.registry import LayoutMismatch, register_layout
from cbmir.datasets.tables import id_label_rows
from cbmir.imaging.listing import DICOM_SUFFIXES, is_image, iter_files, walk_files

_DICOM_MAGIC_OFFSET = 128


def is_dicom(path: Path) -> bool:
    """A ``.dcm`` file, or any file except a DICOMDIR index or another image format's file with the ``DICM``
    magic after the 128-byte preamble."""
    suffix = path.suffix.lower()
    if suffix == ".dcm":
        return True
    if path.name.upper() == "DICOMDIR" or (is_image(path) and suffix not in DICOM_SUFFIXES):
        return False
    with path.open("rb") as file:
        file.seek(_DICOM_MAGIC_OFFSET)
        return file.read(4) == b"DICM"


def detect(path: Path, **options: Any) -> bool:
    return path.is_dir() and any(is_dicom(file) for file in iter_files(path))


def read_dicom_folder(
    root: str | os.PathLike[str], labels_csv: str | os.PathLike[str] | None = None, *, strict: bool = False
) -> Dataset:
    """A DICOM tree (any depth), unlabelled or labelled by a ``file,label`` CSV (header optional).

    The record id is the path below `root` without the ``.dcm`` suffix (DICOM trees reuse file names from
    series to series). A CSV row may name a file by that id, by its relative path, or by its bare file name
    (with or without extension) when that name is unique in the tree. Without a CSV the task is
    ``unlabelled``; with one, DICOM files no row names are reported as unlisted.
    """
    root = Path(root)
    require_folder(root, "DICOM")
    files = {}
    for path in walk_files(root):
        if is_dicom(path):
            relative = path.relative_to(root)
            files[(relative.with_suffix("") if relative.suffix.lower() == ".dcm" else relative).as_posix()] = path
    if not files:
        raise DatasetError(f"{root}: no DICOM files (.dcm or with the DICM magic) found")
    if labels_csv is None:
        records = [Record(record_id, path, (), root.name) for record_id, path in files.items()]
        return finish(root.name, records, "unlabelled", [], strict)
    table = Path(labels_csv)
    aliases: dict[str, str | None] = {}
    for record_id, path in files.items():
        for name in {path.name, Path(record_id).name}:
            # None marks a bare name shared by several files.
            aliases[name] = record_id if aliases.get(name, record_id) == record_id else None
    for record_id, path in files.items():
        aliases[record_id] = aliases[path.relative_to(root).as_posix()] = record_id
    problems: list[Problem] = []
    records = []
    seen: dict[str, int] = {}
    for number, text, key, label in id_label_rows(table, problems):
        found = aliases.get(key)
        if found is None:
            if key in aliases:
                detail = "names several files; use the path below the root"
            else:
                detail = f"no DICOM file {key!r} below {root}"
            problems.append(Problem("missing-file", table, number, text, detail))
            continue
        if found in seen:
            detail = f"file {found!r} already on line {seen[found]}"
            problems.append(Problem("duplicate-id", table, number, text, detail))
            continue
        seen[found] = number
        records.append(Record(found, files[found], (label,), root.name))
    problems.extend(
        Problem("unlisted-file", path, None, "", f"no row of {table.name} names this file")
        for record_id, path in files.items()
        if record_id not in seen
    )
    return finish(root.name, records, "single-label", problems, strict)


def read_dicom_tree(root: Path, **options: Any) -> Dataset:
    """The DICOM layout as `open_dataset` finds it: a folder of DICOM files only. A folder that also holds
    other image files is not this layout (a `LayoutMismatch` saying so), so that it is never read partly:
    the indexer then reads every image of it as a plain folder."""
    others = [path for path in walk_files(root) if is_image(path) and not is_dicom(path)]
    if others:
        raise LayoutMismatch(
            f"{root} holds {len(others)} image file(s) that are not DICOM (e.g. {others[0].relative_to(root)}) "
            "beside its DICOM files, so it is no DICOM tree; `cbmir index` reads such a folder whole"
        )
    return read_dicom_folder(root, **options)


register_layout(
    "dicom",
    detect=detect,
    read=read_dicom_tree,
    describe="DICOM tree: a folder with .dcm files (or files with the DICM magic), optionally labels_csv=",
    order=40,
)
