"""Dataset readers: each archive layout becomes a `Dataset` of `Record`s, one per labelled image.

Layouts: ImageCLEF/IRMA (image folder + ``image_id;irma_code`` CSV), class-per-folder trees (optionally below
train/validation/test folders), NIH ChestX-ray14 (label table joined to an image tree), DICOM trees
(optionally labelled by a CSV) and MedMNIST ``.npz`` archives. `open_dataset` picks the reader from what a
path holds.

A reader never drops anything silently: a row or file with a problem (missing image, duplicate id, unknown
label, invalid IRMA code, unreadable row, image no row labels) is left out of `Dataset.records` and listed in
`Dataset.problems`; with ``strict=True`` the reader raises `DatasetError` instead. Errors in the layout
itself (no such folder, a table without its key columns) always raise.
"""

from __future__ import annotations

import csv
import gzip
import os
import random
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import IO

import cv2
import numpy as np

from cbmir.errors import CbmirError
from cbmir.imaging.io import read_image
from cbmir.irma import IrmaCode, IrmaCodeError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm"})
SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {
    "train": "train", "validation": "validation", "valid": "validation", "val": "validation", "test": "test"
}
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
TASKS = ("single-label", "multi-label", "unlabelled")
PROBLEM_KINDS = {
    "unreadable-row": "table rows that could not be read",
    "duplicate-id": "rows or files repeating an id already read",
    "invalid-code": "IRMA codes that do not parse",
    "unknown-label": "labels outside the known classes",
    "missing-file": "rows whose image file was not found",
    "unlisted-file": "image files that no row labels or that lie outside the class layout",
}
# First-column names that mark a CSV's first row as a header (compared lower case, letters and digits only).
_ID_COLUMNS = frozenset({"id", "imageid", "image", "imageindex", "imagename", "file", "filename", "path", "name"})
_MEDMNIST_PREFIXES = {"train": "train", "validation": "val", "test": "test"}
_DICOM_MAGIC_OFFSET = 128


class DatasetError(CbmirError):
    """A dataset layout that cannot be read, or (with ``strict=True``) one with problems."""


@dataclass(frozen=True)
class Record:
    """One image of a dataset. `labels` holds one label for single-label sets, any number for multi-label."""

    id: str
    path: Path
    labels: tuple[str, ...]
    source: str
    split: str | None = None
    index: int | None = None
    # Excluded from the hash because a mapping is not hashable; still compared.
    extra: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))

    def __reduce__(self):
        # A MappingProxyType does not pickle; rebuild from a plain dict so records can go to worker processes.
        return (Record, (self.id, self.path, self.labels, self.source, self.split, self.index, dict(self.extra)))

    @property
    def label(self) -> str:
        """The single label; an error for records with no label or several."""
        if len(self.labels) != 1:
            raise DatasetError(
                f"record {self.id!r} of {self.source!r} has {len(self.labels)} labels {list(self.labels)}, "
                "not exactly one: use `labels` for multi-label or unlabelled data"
            )
        return self.labels[0]


@dataclass(frozen=True)
class Problem:
    """Why one row or file was left out. `line` is the table line (for .npz archives, the array row), None
    for problems found in the file tree."""

    kind: str
    file: Path
    line: int | None
    row: str
    detail: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else str(self.file)
        row = f" {self.row!r}" if self.row else ""
        return f"{where}:{row} {self.detail}"


@dataclass(frozen=True)
class Dataset:
    """What a reader found: the usable records, their task and sorted classes, and what it left out and why."""

    name: str
    records: list[Record]
    task: str
    classes: tuple[str, ...]
    problems: tuple[Problem, ...] = ()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def problem_counts(self) -> dict[str, int]:
        """Number of problems per kind, in the order of `PROBLEM_KINDS`, kinds without problems left out."""
        counts = Counter(problem.kind for problem in self.problems)
        return {kind: counts[kind] for kind in PROBLEM_KINDS if counts[kind]}

    def summary(self, examples: int = 3) -> str:
        """A few lines for people: size, task, classes, splits and each kind of problem with its first rows."""
        splits = Counter(record.split for record in self.records if record.split)
        split_text = ", ".join(f"{split} {splits[split]}" for split in SPLITS if splits[split]) or "none"
        lines = [
            f"{self.name}: {len(self.records)} records, {self.task}, {len(self.classes)} classes; splits: {split_text}"
        ]
        if not self.problems:
            lines.append("problems: none")
        for kind, count in self.problem_counts.items():
            lines.append(f"{kind}: {count} ({PROBLEM_KINDS[kind]}), left out of the records")
            shown = [problem for problem in self.problems if problem.kind == kind][:examples]
            lines.extend(f"  {problem}" for problem in shown)
            if count > len(shown):
                lines.append(f"  ... and {count - len(shown)} more")
        return "\n".join(lines)


def _finish(name: str, records: list[Record], task: str, problems: list[Problem], strict: bool) -> Dataset:
    dataset = Dataset(
        name=name,
        records=records,
        task=task,
        classes=tuple(sorted({label for record in records for label in record.labels})),
        problems=tuple(problems),
    )
    if strict and problems:
        raise DatasetError(f"dataset has problems (strict mode):\n{dataset.summary()}")
    return dataset


# --- files and tables -------------------------------------------------------------------------------------


def _walk_files(root: Path) -> list[Path]:
    """Every file below `root`, sorted, skipping hidden files and folders (names starting with a dot)."""
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        found.extend(Path(folder) / name for name in names if not name.startswith("."))
    return sorted(found)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _image_files(root: Path) -> list[Path]:
    return [path for path in _walk_files(root) if _is_image(path)]


def _subfolders(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))


def _split_of(relative: Path) -> str | None:
    """The split named by the first train/validation/test folder (or alias) on a relative path, if any."""
    for part in relative.parent.parts:
        if part.lower() in SPLIT_ALIASES:
            return SPLIT_ALIASES[part.lower()]
    return None


def _require_folder(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: {what} folder not found")


def _open_text(path: Path) -> IO[str]:
    """A table as text, gunzipped when it starts with the gzip magic; undecodable bytes become U+FFFD."""
    with path.open("rb") as file:
        gzipped = file.read(2) == b"\x1f\x8b"
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="replace", newline="")
    return path.open(encoding="utf-8-sig", errors="replace", newline="")


def _table_rows(path: Path, problems: list[Problem]) -> Iterator[tuple[int, str, list[str]]]:
    """(line number, line text, fields) of each non-blank line of a CSV, reporting lines that cannot be read.

    The delimiter is whichever of ``;``, ``,`` and tab the first line holds most often. Each line is one
    row: quoted fields spanning lines are not supported (none of the label tables in use has them), and
    in exchange every problem points at an exact line.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: label table not found")
    delimiter = None
    with _open_text(path) as file:
        for number, line in enumerate(file, 1):
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            if delimiter is None:
                delimiter = max(";,\t", key=text.count)
            if "\ufffd" in text:
                problems.append(Problem("unreadable-row", path, number, text, "not UTF-8 text"))
                continue
            try:
                fields = next(csv.reader([text], delimiter=delimiter, strict=True))
            except csv.Error as error:
                problems.append(Problem("unreadable-row", path, number, text, f"bad CSV quoting: {error}"))
                continue
            yield number, text, [value.strip() for value in fields]


def _is_header(fields: list[str]) -> bool:
    return "".join(char for char in fields[0].lower() if char.isalnum()) in _ID_COLUMNS


def _id_label_rows(path: Path, problems: list[Problem]) -> Iterator[tuple[int, str, str, str]]:
    """(line number, line text, id, label) from a two-column table with an optional header.

    Columns after the second are ignored. A first row whose first field is a usual id column name (``id``,
    ``image_id``, ``file``, ...) is taken as the header.
    """
    first = True
    for number, text, fields in _table_rows(path, problems):
        if first and _is_header(fields):
            first = False
            continue
        first = False
        if len(fields) < 2 or not fields[0] or not fields[1]:
            problems.append(Problem("unreadable-row", path, number, text, "expected an id and a label"))
            continue
        yield number, text, fields[0], fields[1]


def _strip_image_suffix(name: str) -> str:
    stem, suffix = os.path.splitext(name)
    return stem if suffix.lower() in IMAGE_SUFFIXES else name


# --- readers ----------------------------------------------------------------------------------------------


def read_irma(folder: str | os.PathLike[str], codes_csv: str | os.PathLike[str] | None = None, *,
              strict: bool = False) -> Dataset:
    """ImageCLEF/IRMA layout: images named ``<image_id>.<ext>`` and a ``image_id;irma_code`` table.

    `folder` is the dataset folder; images are looked up in its ``images`` subfolder when there is one, else
    in `folder` itself. The table defaults to ``folder/codes.csv``. Labels are the codes in dashed lower-case
    form; codes with ``*`` (not known) positions are invalid as ground truth.
    """
    folder = Path(folder)
    _require_folder(folder, "IRMA dataset")
    table = Path(codes_csv) if codes_csv is not None else folder / "codes.csv"
    image_folder = folder / "images" if (folder / "images").is_dir() else folder
    files: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(path for path in image_folder.iterdir() if path.is_file() and _is_image(path)):
        files[path.stem].append(path)
    used: set[Path] = set()
    problems: list[Problem] = []
    records = []
    seen: dict[str, int] = {}
    for number, text, key, code_text in _id_label_rows(table, problems):
        image_id = _strip_image_suffix(key)
        if image_id in seen:
            detail = f"id {image_id!r} already on line {seen[image_id]}"
            problems.append(Problem("duplicate-id", table, number, text, detail))
            continue
        seen[image_id] = number
        try:
            code = IrmaCode.parse(code_text)
        except IrmaCodeError as error:
            problems.append(Problem("invalid-code", table, number, text, str(error)))
            continue
        if not code.is_complete:
            problems.append(Problem("invalid-code", table, number, text, f"code {code} has not-known positions"))
            continue
        if not files.get(image_id):
            problems.append(Problem("missing-file", table, number, text, f"no image {image_id}.* in {image_folder}"))
            continue
        path = files[image_id][0]
        used.add(path)
        records.append(Record(image_id, path, (str(code),), folder.name))
    problems.extend(
        Problem("unlisted-file", path, None, "", f"no row of {table.name} names this image")
        for paths in files.values()
        for path in paths
        if path not in used
    )
    return _finish(folder.name, records, "single-label", problems, strict)


def read_class_folders(root: str | os.PathLike[str], *, strict: bool = False) -> Dataset:
    """Class-per-folder tree: ``root/<class>/**/image``, or ``root/<split>/<class>/**/image``.

    The split level is used when any folder below `root` is named train, validation, valid, val or test
    (any case). The record id is the file name without extension; an id seen twice (the same image in two
    classes or splits, say) is a problem, as is an image outside the class folders.
    """
    root = Path(root)
    _require_folder(root, "class-folder dataset")
    problems: list[Problem] = []
    records = []
    seen: dict[str, Path] = {}
    top = _subfolders(root)
    split_folders = [folder for folder in top if folder.name.lower() in SPLIT_ALIASES]
    if split_folders:
        bases = [(SPLIT_ALIASES[folder.name.lower()], folder) for folder in split_folders]
        problems.extend(
            Problem("unlisted-file", path, None, "", "not below a train/validation/test folder")
            for folder in top
            if folder not in split_folders
            for path in _image_files(folder)
        )
    else:
        bases = [(None, root)]
    for split, base in bases:
        problems.extend(
            Problem("unlisted-file", path, None, "", "not inside a class folder")
            for path in sorted(base.iterdir())
            if path.is_file() and _is_image(path) and not path.name.startswith(".")
        )
        for class_folder in _subfolders(base):
            for path in _image_files(class_folder):
                if path.stem in seen:
                    detail = f"id {path.stem!r} already used by {seen[path.stem]}"
                    problems.append(Problem("duplicate-id", path, None, "", detail))
                    continue
                seen[path.stem] = path
                records.append(Record(path.stem, path, (class_folder.name,), root.name, split))
    if not records and not problems:
        raise DatasetError(
            f"{root}: no images in class folders (expected root/<class>/<image> or root/<split>/<class>/<image>)"
        )
    return _finish(root.name, records, "single-label", problems, strict)


def read_nih(root: str | os.PathLike[str], table: str | os.PathLike[str], *, strict: bool = False) -> Dataset:
    """NIH ChestX-ray14: the images below `root` (any depth) labelled by the NIH table (plain or gzipped CSV).

    Images join table rows by file name without extension, so re-encoded copies still match. Labels are the
    pipe-separated findings of `NIH_FINDINGS`; ``No Finding`` gives no labels. The split comes from a
    train/validation/test folder on the image's path, if any. `extra` holds patient id, age, sex and view
    position. Table rows for images not below `root` are ignored: the table covers the whole archive.
    """
    root, table = Path(root), Path(table)
    _require_folder(root, "NIH image")
    problems: list[Problem] = []
    images: dict[str, Path] = {}
    for path in _image_files(root):
        if path.stem in images:
            detail = f"id {path.stem!r} already used by {images[path.stem]}"
            problems.append(Problem("duplicate-id", path, None, "", detail))
        else:
            images[path.stem] = path
    rows = _table_rows(table, problems)
    header = next(rows, None)
    columns = {name: position for position, name in enumerate(header[2] if header else [])}
    for required in ("Image Index", "Finding Labels"):
        if required not in columns:
            raise DatasetError(f"{table}: no {required!r} column; is this the NIH ChestX-ray14 label table?")
    extra_columns = {"patient_id": "Patient ID", "age": "Patient Age", "sex": "Patient Gender", "view": "View Position"}
    extra_columns = {key: columns[name] for key, name in extra_columns.items() if name in columns}
    width = max(columns.values()) + 1
    known = set(NIH_FINDINGS)
    labelled: dict[str, Record] = {}
    seen: dict[str, int] = {}
    for number, text, fields in rows:
        if len(fields) < width:
            problems.append(Problem("unreadable-row", table, number, text, f"{len(fields)} fields, expected {width}"))
            continue
        image_id = _strip_image_suffix(fields[columns["Image Index"]])
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
        split = _split_of(path.relative_to(root))
        labelled[image_id] = Record(image_id, path, tuple(sorted(findings)), root.name, split, extra=extra)
    problems.extend(
        Problem("unlisted-file", path, None, "", f"no row of {table.name} names this image")
        for image_id, path in images.items()
        if image_id not in seen
    )
    records = sorted(labelled.values(), key=lambda record: record.path)
    return _finish(root.name, records, "multi-label", problems, strict)


def _is_dicom(path: Path) -> bool:
    """A ``.dcm`` file, or any file except a DICOMDIR index with the ``DICM`` magic after the 128-byte preamble."""
    if path.suffix.lower() == ".dcm":
        return True
    if path.name.upper() == "DICOMDIR" or _is_image(path):
        return False
    with path.open("rb") as file:
        file.seek(_DICOM_MAGIC_OFFSET)
        return file.read(4) == b"DICM"


def read_dicom_folder(root: str | os.PathLike[str], labels_csv: str | os.PathLike[str] | None = None, *,
                      strict: bool = False) -> Dataset:
    """A DICOM tree (any depth), unlabelled or labelled by a ``file,label`` CSV (header optional).

    The record id is the path below `root` without the ``.dcm`` suffix (DICOM trees reuse file names from
    series to series). A CSV row may name a file by that id, by its relative path, or by its bare file name
    (with or without extension) when that name is unique in the tree. Without a CSV the task is
    ``unlabelled``; with one, DICOM files no row names are reported as unlisted.
    """
    root = Path(root)
    _require_folder(root, "DICOM")
    files = {}
    for path in _walk_files(root):
        if _is_dicom(path):
            relative = path.relative_to(root)
            files[(relative.with_suffix("") if relative.suffix.lower() == ".dcm" else relative).as_posix()] = path
    if not files:
        raise DatasetError(f"{root}: no DICOM files (.dcm or with the DICM magic) found")
    if labels_csv is None:
        records = [Record(record_id, path, (), root.name) for record_id, path in files.items()]
        return _finish(root.name, records, "unlabelled", [], strict)
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
    for number, text, key, label in _id_label_rows(table, problems):
        record_id = aliases.get(key)
        if record_id is None:
            if key in aliases:
                detail = "names several files; use the path below the root"
            else:
                detail = f"no DICOM file {key!r} below {root}"
            problems.append(Problem("missing-file", table, number, text, detail))
            continue
        if record_id in seen:
            detail = f"file {record_id!r} already on line {seen[record_id]}"
            problems.append(Problem("duplicate-id", table, number, text, detail))
            continue
        seen[record_id] = number
        records.append(Record(record_id, files[record_id], (label,), root.name))
    problems.extend(
        Problem("unlisted-file", path, None, "", f"no row of {table.name} names this file")
        for record_id, path in files.items()
        if record_id not in seen
    )
    return _finish(root.name, records, "single-label", problems, strict)


def _npz_shape(npz: Path, key: str) -> tuple[int, ...]:
    """Shape of one array of an ``.npz`` from its header, without decompressing the data."""
    with zipfile.ZipFile(npz) as archive, archive.open(f"{key}.npy") as file:
        version = np.lib.format.read_magic(file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return read_header(file)[0]


def read_medmnist(npz: str | os.PathLike[str], class_names: Sequence[str] | None = None, *,
                  strict: bool = False) -> Dataset:
    """A MedMNIST archive: ``{train,val,test}_images`` with ``*_labels``, one record per image.

    Labels are ``class_names[value]``, or the integer as text without `class_names`. Multi-label archives
    (ChestMNIST: one 0/1 column per finding) give the names of the columns set to 1. Images are read
    on demand by `load_medmnist_image`, so reading the archive costs only its label arrays.
    """
    npz = Path(npz)
    if not npz.is_file():
        raise DatasetError(f"{npz}: MedMNIST archive not found")
    try:
        with np.load(npz) as archive:
            keys = set(archive.files)
            labels = {split: archive[f"{prefix}_labels"] for split, prefix in _MEDMNIST_PREFIXES.items()
                      if f"{prefix}_labels" in keys and f"{prefix}_images" in keys}
        shapes = {split: _npz_shape(npz, f"{_MEDMNIST_PREFIXES[split]}_images") for split in labels}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise DatasetError(f"{npz}: not a readable .npz archive ({error})") from error
    if not labels:
        raise DatasetError(f"{npz}: no train/val/test _images and _labels arrays (has: {sorted(keys)})")
    multi_label = any(values.ndim == 2 and values.shape[1] > 1 for values in labels.values())
    problems: list[Problem] = []
    records = []
    for split, values in labels.items():
        prefix = _MEDMNIST_PREFIXES[split]
        if len(values) != shapes[split][0] or len(shapes[split]) not in (3, 4):
            raise DatasetError(f"{npz}: {prefix}_images has shape {shapes[split]} for {len(values)} labels")
        values = values.reshape(len(values), -1)
        for index, row in enumerate(values):
            positions = np.flatnonzero(row).tolist() if multi_label else [int(row[0])]
            if class_names is not None and not all(0 <= position < len(class_names) for position in positions):
                problems.append(Problem("unknown-label", npz, index, f"{prefix}_labels[{index}] = {row.tolist()}",
                                        f"class_names has {len(class_names)} names"))
                continue
            names = tuple(class_names[position] if class_names is not None else str(position) for position in positions)
            records.append(Record(f"{split}-{index}", npz, names, npz.stem, split, index))
    return _finish(npz.stem, records, "multi-label" if multi_label else "single-label", problems, strict)


@lru_cache(maxsize=3)
def _medmnist_images(npz: Path, key: str, modified_ns: int) -> np.ndarray:
    """One image array of an archive, kept read-only. An .npz member cannot be memory-mapped, so the
    last three arrays (one archive's splits) stay in memory; `modified_ns` makes a rewritten file reload."""
    with np.load(npz) as archive:
        images = archive[key]
    images.setflags(write=False)
    return images


def load_medmnist_image(record: Record) -> np.ndarray:
    """The image of a MedMNIST record as a 2-D uint8 array (colour archives converted to grey)."""
    if record.index is None or record.split not in _MEDMNIST_PREFIXES:
        raise DatasetError(f"record {record.id!r} does not come from a MedMNIST archive (no split and array index)")
    images = _medmnist_images(record.path, f"{_MEDMNIST_PREFIXES[record.split]}_images", record.path.stat().st_mtime_ns)
    image = images[record.index]
    if image.dtype != np.uint8:
        raise DatasetError(f"{record.path}: images are {image.dtype}, expected uint8")
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image


def load_pixels(record: Record) -> np.ndarray:
    """The 2-D pixel array of any record: its row of a MedMNIST archive, or its image file (which may raise
    `ImageReadError` naming the file and the reason)."""
    if record.index is not None:
        return load_medmnist_image(record)
    return read_image(record.path).pixels


# --- detection --------------------------------------------------------------------------------------------

LAYOUTS = (
    "IRMA/ImageCLEF: a folder with codes.csv (image_id;irma_code) and the images (in images/ or beside it)",
    "MedMNIST: an .npz file with train/val/test _images and _labels arrays",
    "NIH ChestX-ray14: an image folder, with table= the NIH label table",
    "DICOM tree: a folder with .dcm files (or files with the DICM magic), optionally labels_csv=",
    "class folders: root/<class>/<image> or root/<train|validation|test>/<class>/<image>",
)


def open_dataset(path: str | os.PathLike[str], **kwargs) -> Dataset:
    """Read a dataset with the reader its layout calls for; keyword arguments go to that reader.

    Checked in this order: ``.npz`` file, folder with ``codes.csv``, ``table=`` given (NIH), any DICOM file
    below the folder, image files in subfolders (class folders). A class tree of DICOM files therefore
    reads as a DICOM tree: call `read_class_folders` for it.
    """
    path = Path(path)
    hint = ""
    if path.is_file() and path.suffix.lower() == ".npz":
        return read_medmnist(path, **kwargs)
    if path.is_dir():
        if (path / "codes.csv").is_file():
            return read_irma(path, **kwargs)
        if "table" in kwargs:
            return read_nih(path, **kwargs)
        files = _walk_files(path)
        if any(_is_dicom(file) for file in files):
            return read_dicom_folder(path, **kwargs)
        if any(_is_image(file) and file.parent != path for file in files):
            dataset = read_class_folders(path, **kwargs)
            if len(dataset.classes) >= 2:
                return dataset
            hint = (
                f" (its class folders give the classes {list(dataset.classes)}; "
                "read a one-class tree with read_class_folders)"
            )
    elif not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    layouts = "\n".join(f"  - {layout}" for layout in LAYOUTS)
    raise DatasetError(f"{path}: not a dataset layout cbmir can read{hint}. Supported layouts:\n{layouts}")


# --- splitting --------------------------------------------------------------------------------------------


def stratified_split(records: Sequence[Record], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                     seed: int = 0) -> dict[str, list[Record]]:
    """Split records into train/validation/test, stratified by label, the same way for the same seed.

    Each stratum (a label; for multi-label records the exact label combination; for unlabelled ones a single
    stratum) gives ``round(n * fraction)`` records to validation and to test, but always keeps at least one
    in train. So a class too small to spread (a singleton, or anything that rounds to 0) stays in train.
    Multi-label combinations are mostly rare, so the combinations too small to spread are pooled and the
    pool is split as one stratum; in addition any record carrying a label seen on no other record stays in
    train. Each split keeps the order of `records`; the result depends on records' ids, not on their order.
    """
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise DatasetError(
            f"fractions must be three non-negative numbers (train, validation, test) summing to 1, got {fractions}"
        )
    label_counts = Counter(label for record in records for label in record.labels)
    strata: dict[tuple[str, ...], list[int]] = defaultdict(list)
    assigned: dict[int, str] = {}
    for position, record in enumerate(records):
        if any(label_counts[label] == 1 for label in record.labels):
            assigned[position] = "train"
        else:
            strata[record.labels].append(position)

    def held_out(size: int) -> list[int]:
        counts = [int(size * fraction + 0.5) for fraction in fractions[1:]]
        while sum(counts) and size - sum(counts) < 1:
            counts[counts.index(max(counts))] -= 1
        return counts

    groups = [strata[key] for key in sorted(strata)]
    if any(len(record.labels) > 1 for record in records):
        rare = [group for group in groups if not any(held_out(len(group)))]
        pool = [position for group in rare for position in group]
        groups = [group for group in groups if any(held_out(len(group)))] + [pool]
    rng = random.Random(seed)
    for group in groups:
        members = sorted(group, key=lambda position: records[position].id)
        rng.shuffle(members)
        validation, test = held_out(len(members))
        for rank, position in enumerate(members):
            assigned[position] = "validation" if rank < validation else "test" if rank < validation + test else "train"
    return {
        split: [record for position, record in enumerate(records) if assigned[position] == split] for split in SPLITS
    }
