"""The class-per-folder layout: ``root/<class>/**/image``, or ``root/<split>/<class>/**/image``.

Detected as the broadest layout, tried last: any image in a subfolder. A tree that reads as fewer than two
classes is not taken for a dataset by `open_dataset` (a folder of images sorted by date, say), though
`read_class_folders` reads it when asked to.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cbmir.datasets.records import SPLIT_ALIASES, Dataset, DatasetError, Problem, Record, finish, require_folder
from cbmir.datasets.registry import LayoutMismatch, register_layout
from cbmir.imaging.listing import image_files, images_in, is_image, iter_files, subfolders
from cbmir.locations import Split


def detect(path: Path, **options: Any) -> bool:
    return path.is_dir() and any(is_image(file) and file.parent != path for file in iter_files(path))


def read_class_folders(root: str | os.PathLike[str], *, strict: bool = False) -> Dataset:
    """Class-per-folder tree: ``root/<class>/**/image``, or ``root/<split>/<class>/**/image``.

    The split level is used when any folder below `root` is named train, validation, valid, val or test
    (any case). The record id is the file name without extension; an id seen twice (the same image in two
    classes or splits, say) is a problem, as is an image outside the class folders.
    """
    root = Path(root)
    require_folder(root, "class-folder dataset")
    problems: list[Problem] = []
    records = []
    seen: dict[str, Path] = {}
    top = subfolders(root)
    split_folders = [folder for folder in top if folder.name.lower() in SPLIT_ALIASES]
    bases: list[tuple[Split | None, Path]]
    if split_folders:
        bases = [(SPLIT_ALIASES[folder.name.lower()], folder) for folder in split_folders]
        problems.extend(
            Problem("unlisted-file", path, None, "", "not below a train/validation/test folder")
            for folder in top
            if folder not in split_folders
            for path in image_files(folder)
        )
    else:
        bases = [(None, root)]
    for split, base in bases:
        problems.extend(
            Problem("unlisted-file", path, None, "", "not inside a class folder") for path in images_in(base)
        )
        for class_folder in subfolders(base):
            for path in image_files(class_folder):
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
    return finish(root.name, records, "single-label", problems, strict)


def _read_detected(root: Path, **options: Any) -> Dataset:
    """`read_class_folders`, refusing a tree of fewer than two classes: detection cannot tell it from a folder
    of images merely filed in subfolders."""
    dataset = read_class_folders(root, **options)
    if len(dataset.classes) < 2:
        raise LayoutMismatch(
            f"its class folders give the classes {list(dataset.classes)}; read a one-class tree with read_class_folders"
        )
    return dataset


register_layout(
    "class-folders",
    detect=detect,
    read=_read_detected,
    describe="class folders: root/<class>/<image> or root/<train|validation|test>/<class>/<image>",
    order=90,
)
