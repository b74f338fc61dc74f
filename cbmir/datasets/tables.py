"""The label tables of the dataset layouts: CSV files (plain or gzipped) read line by line.

Every line that cannot be read becomes a `Problem` pointing at its exact line; the readers never see it.
"""

from __future__ import annotations

import csv
import gzip
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from cbmir.datasets.records import DatasetError, Problem
from cbmir.imaging.listing import IMAGE_SUFFIXES

# First-column names that mark a CSV's first row as a header (compared lower case, letters and digits only).
_ID_COLUMNS = frozenset({"id", "imageid", "image", "imageindex", "imagename", "file", "filename", "path", "name"})


def _open_text(path: Path) -> IO[str]:
    """A table as text, gunzipped when it starts with the gzip magic; undecodable bytes become U+FFFD."""
    with path.open("rb") as file:
        gzipped = file.read(2) == b"\x1f\x8b"
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="replace", newline="")
    return path.open(encoding="utf-8-sig", errors="replace", newline="")


def table_rows(path: Path, problems: list[Problem]) -> Iterator[tuple[int, str, list[str]]]:
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


def id_label_rows(path: Path, problems: list[Problem]) -> Iterator[tuple[int, str, str, str]]:
    """(line number, line text, id, label) from a two-column table with an optional header.

    Columns after the second are ignored. A first row whose first field is a usual id column name (``id``,
    ``image_id``, ``file``, ...) is taken as the header.
    """
    first = True
    for number, text, fields in table_rows(path, problems):
        if first and _is_header(fields):
            first = False
            continue
        first = False
        if len(fields) < 2 or not fields[0] or not fields[1]:
            problems.append(Problem("unreadable-row", path, number, text, "expected an id and a label"))
            continue
        yield number, text, fields[0], fields[1]


def strip_image_suffix(name: str) -> str:
    """A table's image name without its image suffix (``1.png`` and ``1`` both name image ``1``)."""
    stem, suffix = os.path.splitext(name)
    return stem if suffix.lower() in IMAGE_SUFFIXES else name
