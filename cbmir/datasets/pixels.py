"""Reading the pixels of an image wherever it lives: a file (`cbmir.imaging.io.read_image`), a member of an
archive (the archive layout's reader) or an instance on a PACS (`cbmir.pacs`, with the environment's
credentials)."""

from __future__ import annotations

import numpy as np

from cbmir.datasets.medmnist import medmnist_pixels
from cbmir.datasets.records import Record
from cbmir.imaging.io import DEFAULT_MAX_PIXELS, read_dicom, read_image
from cbmir.locations import Location


def read_pixels(location: Location, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The 2-D pixel array at `location`. A file may raise `ImageReadError` naming it and the reason (an
    image above `max_pixels` among them); an archive member `DatasetError`, or `OSError` for a missing
    archive; a PACS instance `PacsError` when it cannot be fetched."""
    if location.instance is not None:
        from cbmir.pacs import pacs_client

        dataset = pacs_client(location.instance.server).fetch(location.instance)
        return read_dicom(dataset, name=str(location), max_pixels=max_pixels).pixels
    if location.member is None:
        return read_image(location.path, max_pixels=max_pixels).pixels
    return medmnist_pixels(location.path, location.member.split, location.member.index)


def load_pixels(record: Record) -> np.ndarray:
    """The 2-D pixel array of any dataset record (its file's size limited to the default `max_pixels`)."""
    return read_pixels(Location.of(record))
