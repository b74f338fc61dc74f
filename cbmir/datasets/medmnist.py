"""The MedMNIST layout: an ``.npz`` archive with ``{train,val,test}_images`` and ``*_labels`` arrays, one
record per image row. Reading the archive costs only its label arrays; the images of one split are loaded
when the first of them is asked for (`medmnist_pixels`) and then kept, the archive being small."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cbmir.datasets.records import Dataset, DatasetError, Problem, Record, finish
from cbmir.datasets.registry import register_layout
from cbmir.locations import Split

# The array name prefix of each split.
_PREFIXES: dict[Split, str] = {"train": "train", "validation": "val", "test": "test"}


def detect(path: Path, **options: Any) -> bool:
    return path.is_file() and path.suffix.lower() == ".npz"


def _npz_shape(npz: Path, key: str) -> tuple[int, ...]:
    """Shape of one array of an ``.npz`` from its header, without decompressing the data."""
    with zipfile.ZipFile(npz) as archive, archive.open(f"{key}.npy") as file:
        version = np.lib.format.read_magic(file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape: tuple[int, ...] = read_header(file)[0]
        return shape


def read_medmnist(
    npz: str | os.PathLike[str], class_names: Sequence[str] | None = None, *, strict: bool = False
) -> Dataset:
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
            labels = {
                split: archive[f"{prefix}_labels"]
                for split, prefix in _PREFIXES.items()
                if f"{prefix}_labels" in keys and f"{prefix}_images" in keys
            }
        shapes = {split: _npz_shape(npz, f"{_PREFIXES[split]}_images") for split in labels}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise DatasetError(f"{npz}: not a readable .npz archive ({error})") from error
    if not labels:
        raise DatasetError(f"{npz}: no train/val/test _images and _labels arrays (has: {sorted(keys)})")
    multi_label = any(values.ndim == 2 and values.shape[1] > 1 for values in labels.values())
    problems: list[Problem] = []
    records = []
    for split, values in labels.items():
        prefix = _PREFIXES[split]
        if len(values) != shapes[split][0] or len(shapes[split]) not in (3, 4):
            raise DatasetError(f"{npz}: {prefix}_images has shape {shapes[split]} for {len(values)} labels")
        for index, row in enumerate(values.reshape(len(values), -1)):
            positions = np.flatnonzero(row).tolist() if multi_label else [int(row[0])]
            if class_names is not None and not all(0 <= position < len(class_names) for position in positions):
                problems.append(
                    Problem(
                        "unknown-label",
                        npz,
                        index,
                        f"{prefix}_labels[{index}] = {row.tolist()}",
                        f"class_names has {len(class_names)} names",
                    )
                )
                continue
            names = tuple(class_names[position] if class_names is not None else str(position) for position in positions)
            records.append(Record(f"{split}-{index}", npz, names, npz.stem, split, index))
    return finish(npz.stem, records, "multi-label" if multi_label else "single-label", problems, strict)


@lru_cache(maxsize=3)
def _split_images(npz: Path, key: str, modified_ns: int) -> np.ndarray:
    """One image array of an archive, kept read-only. An .npz member cannot be memory-mapped, so the
    last three arrays (one archive's splits) stay in memory; `modified_ns` makes a rewritten file reload."""
    with np.load(npz) as archive:
        if key not in archive.files:
            raise DatasetError(f"{npz}: no {key} array (has: {sorted(archive.files)})")
        images = archive[key]
    images.setflags(write=False)
    return images


def medmnist_pixels(npz: Path, split: Split, index: int) -> np.ndarray:
    """Image `index` of `split` of a MedMNIST archive as a 2-D uint8 array (colour archives converted to grey).
    A missing archive is an `OSError`; an index or split the archive does not have, a `DatasetError`."""
    key = f"{_PREFIXES[split]}_images"
    images = _split_images(npz, key, npz.stat().st_mtime_ns)
    if not 0 <= index < len(images):
        raise DatasetError(f"{npz}: {key} has {len(images)} images, no image {index}")
    image = images[index]
    if image.dtype != np.uint8:
        raise DatasetError(f"{npz}: images are {image.dtype}, expected uint8")
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image


def load_medmnist_image(record: Record) -> np.ndarray:
    """The image of a MedMNIST record as a 2-D uint8 array (colour archives converted to grey)."""
    if record.index is None or record.split is None or record.split not in _PREFIXES:
        raise DatasetError(f"record {record.id!r} does not come from a MedMNIST archive (no split and array index)")
    return medmnist_pixels(record.path, record.split, record.index)


register_layout(
    "medmnist",
    detect=detect,
    read=read_medmnist,
    describe="MedMNIST: an .npz file with train/val/test _images and _labels arrays",
    order=20,
)
