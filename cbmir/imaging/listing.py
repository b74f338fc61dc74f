"""Which files in a folder tree are radiographs: one suffix list and one way to walk a tree.

Every command and reader that looks for images goes through here, so they all agree on the suffixes
(compared case-insensitively) and all skip hidden files and folders (names starting with a dot, such as
``.DS_Store``, ``._scan.png`` resource forks or ``.git``). The root itself may be hidden: only names below it
are checked. The readers detect formats from the content; the suffixes only say which files to try.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}) | DICOM_SUFFIXES


def is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def is_image(path: Path) -> bool:
    """Whether the file name has an image suffix (the content is not looked at)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def iter_files(root: str | os.PathLike[str]) -> Iterator[Path]:
    """Every regular file below `root` except hidden ones, in no particular order: for checks that can stop
    early. Named pipes, sockets and devices are not files to read (opening a pipe waits for a writer)."""
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in names:
            path = Path(folder) / name
            if not name.startswith(".") and path.is_file():
                yield path


def walk_files(root: str | os.PathLike[str]) -> list[Path]:
    """Every file below `root` except hidden ones, sorted."""
    return sorted(iter_files(root))


def image_files(root: str | os.PathLike[str]) -> list[Path]:
    """Every image file below `root` (any depth) except hidden ones, sorted; empty for a missing folder."""
    return [path for path in walk_files(root) if is_image(path)]


def images_in(folder: Path) -> list[Path]:
    """The image files directly in `folder` (not below it) except hidden ones, sorted."""
    return sorted(path for path in folder.iterdir() if path.is_file() and is_image(path) and not is_hidden(path))


def subfolders(folder: Path) -> list[Path]:
    """The folders directly in `folder` except hidden ones, sorted."""
    return sorted(path for path in folder.iterdir() if path.is_dir() and not is_hidden(path))
