"""The ImageCLEF/IRMA layout: a folder of images named ``<image_id>.<ext>`` (in ``images/`` or beside the
table) and a ``image_id;irma_code`` table, ``codes.csv`` by default."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from cbmir.datasets.records import Dataset, Problem, Record, finish, require_folder
from cbmir.datasets.registry import register_layout
from cbmir.datasets.tables import id_label_rows, strip_image_suffix
from cbmir.imaging.listing import images_in
from cbmir.irma import IrmaCode, IrmaCodeError


def detect(path: Path, **options: Any) -> bool:
    return path.is_dir() and (path / "codes.csv").is_file()


def read_irma(
    folder: str | os.PathLike[str], codes_csv: str | os.PathLike[str] | None = None, *, strict: bool = False
) -> Dataset:
    """ImageCLEF/IRMA layout: images named ``<image_id>.<ext>`` and a ``image_id;irma_code`` table.

    `folder` is the dataset folder; images are looked up in its ``images`` subfolder when there is one, else
    in `folder` itself. The table defaults to ``folder/codes.csv``. Labels are the codes in dashed lower-case
    form; codes with ``*`` (not known) positions are invalid as ground truth.
    """
    folder = Path(folder)
    require_folder(folder, "IRMA dataset")
    table = Path(codes_csv) if codes_csv is not None else folder / "codes.csv"
    image_folder = folder / "images" if (folder / "images").is_dir() else folder
    files: dict[str, list[Path]] = defaultdict(list)
    for path in images_in(image_folder):
        files[path.stem].append(path)
    used: set[Path] = set()
    problems: list[Problem] = []
    records = []
    seen: dict[str, int] = {}
    for number, text, key, code_text in id_label_rows(table, problems):
        image_id = strip_image_suffix(key)
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
    return finish(folder.name, records, "single-label", problems, strict)


register_layout(
    "irma",
    detect=detect,
    read=read_irma,
    describe="IRMA/ImageCLEF: a folder with codes.csv (image_id;irma_code) and the images (in images/ or beside it)",
    order=10,
)
