"""The layout registry: each archive layout registers how to recognise it (`detect`) and how to read it
(`read`) with `register_layout`, and `open_dataset` tries them in their `order`.

A layout's `detect(path, **options)` looks only at names, suffixes and magic bytes (never a whole read) and
says whether the path is that layout; `read(path, **options)` returns the `Dataset`. A narrow layout
(a folder with ``codes.csv``) gets a lower order than a broad one (any tree of images in folders), which
comes last. A reader may still find that a path detect let through is not its layout after all and raise
`LayoutMismatch`; `open_dataset` then goes on and, if nothing else fits, gives the reason in its error.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbmir.datasets.records import Dataset, DatasetError

Detect = Callable[..., bool]
Read = Callable[..., Dataset]


class LayoutMismatch(DatasetError):
    """Raised by a registered reader for a path that `detect` accepted but that is not its layout."""


@dataclass(frozen=True)
class Layout:
    """A registered layout: `describe` is the line naming it in the list of supported layouts."""

    name: str
    describe: str
    detect: Detect
    read: Read
    order: int


_REGISTRY: dict[str, Layout] = {}


def register_layout(name: str, *, detect: Detect, read: Read, describe: str, order: int) -> Layout:
    """Register a layout under `name`; `open_dataset` tries the layouts from the lowest `order` up."""
    if name in _REGISTRY:
        raise DatasetError(f"dataset layout {name!r} is already registered")
    layout = Layout(name, describe, detect, read, order)
    _REGISTRY[name] = layout
    return layout


def layouts() -> tuple[Layout, ...]:
    """The registered layouts in the order `open_dataset` tries them."""
    return tuple(sorted(_REGISTRY.values(), key=lambda layout: (layout.order, layout.name)))


def open_dataset(path: str | os.PathLike[str], **options: Any) -> Dataset:
    """Read a dataset with the reader its layout calls for; keyword arguments go to that reader.

    The layouts are tried in their order: folder with ``codes.csv`` (IRMA), ``.npz`` file (MedMNIST),
    ``table=`` given (NIH), any DICOM file below the folder, image files in subfolders (class folders, with
    at least two classes). A class tree of DICOM files therefore reads as a DICOM tree: call
    `read_class_folders` for it, as for a one-class tree.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    reasons = []
    for layout in layouts():
        if layout.detect(path, **options):
            try:
                return layout.read(path, **options)
            except LayoutMismatch as mismatch:
                reasons.append(str(mismatch))
    hint = f" ({'; '.join(reasons)})" if reasons else ""
    listed = "\n".join(f"  - {layout.describe}" for layout in layouts())
    raise DatasetError(f"{path}: not a dataset layout cbmir can read{hint}. Supported layouts:\n{listed}")
