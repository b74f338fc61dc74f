"""Reading the pixels of an image wherever it lives: a file (`cbmir.imaging.io.read_image`) or a member of
an archive (the archive layout's reader)."""

from __future__ import annotations

import numpy as np

from cbmir.datasets.medmnist import medmnist_pixels
from cbmir.datasets.records import Record
from cbmir.imaging.io import DEFAULT_MAX_PIXELS, read_image
from cbmir.locations import Location


def read_pixels(location: Location, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The 2-D pixel array at `location`. A file may raise `ImageReadError` naming it and the reason (an
    image above `max_pixels` among them); an archive member `DatasetError`, or `OSError` for a missing archive."""
    if location.member is None:
        return read_image(location.path, max_pixels=max_pixels).pixels
    return medmnist_pixels(location.path, location.member.split, location.member.index)


def load_pixels(record: Record) -> np.ndarray:
    """The 2-D pixel array of any dataset record (its file's size limited to the default `max_pixels`)."""
    return read_pixels(Location.of(record))
