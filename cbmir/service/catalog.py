"""The service's domain: the indexed images as radiologists and annotators see them (names, codes in words,
thumbnails, originals), searching by an upload or by a DICOM data set fetched from a PACS (fetched by
`cbmir.service.pacs_search`), adding uploads, removing images and recording true codes.

It raises domain errors (`UnknownImageError`, `InvalidCodeError`, `OriginalUnavailableError`,
`OriginalsDisabledError`, the reader's `ImageReadError`s and `PreprocessingError`s for bad uploads, and
`cbmir.refine.RefinementError`s for a region or marked images that cannot refine a search) and
knows nothing of HTTP: `cbmir.service.errors` maps them to responses.

Requests race removals, and each sees one state of the index: a search's hits come from one engine call
(vectors and rows under the engine's lock), a thumbnail is answered with its bytes and an original with a
file opened while its image was still indexed, so a removal after that cannot break an answer; an image
removed meanwhile is an `UnknownImageError` (or, its file gone, an `OriginalUnavailableError`), and no
thumbnail outlives its image. At most `max_decoding` images are decoded at once (uploads and PACS images
read and prepared for the model, thumbnails made; the others wait for a slot): decoding takes memory in
proportion to an image's pixels, so the service's memory is bounded however many uploads arrive together. The
pixels never outlive the slot (`Decoded` holds what does), so a request waiting for the model holds only its
model input.

A search may be refined (`cbmir.refine`): by a region, cropped from the original pixels (of the upload, or of
an indexed image read again, in a decoding slot too) before the model's preprocessing; and by images marked
relevant or not, whose stored embeddings move the query vector (`Retrieval.search_vector`).

Uploads are kept under ``uploads/`` in the index folder (named by content hash), so that thumbnails and
originals work for them as for indexed files. An uploaded file is written before its row is added and
removed again if the add fails, so a stored row never points at a missing upload; what a killed server
left (temporary files, an upload whose row was never added) is removed when the service starts. DICOM
uploads are kept as pixels only (a 16-bit PNG): their headers name the patient.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
from pydicom.dataset import Dataset

from cbmir.datasets import read_pixels
from cbmir.errors import CbmirError
from cbmir.files import remove_temporaries, write_atomically
from cbmir.imaging.io import ImageMeta, Radiograph, read_dicom, read_image
from cbmir.imaging.listing import IMAGE_SUFFIXES
from cbmir.imaging.preprocess import PreprocessingError, to_uint8, to_uint16
from cbmir.index import DuplicateImageError, Filters, Hit, ImageRow, UnknownImageError
from cbmir.irma import AXES, AXIS_LENGTHS, CodeTables, IrmaCode, IrmaCodeError, short_text, significant
from cbmir.labels import Prediction
from cbmir.locations import Location
from cbmir.refine import Feedback, Region
from cbmir.search import PreparedImage, Retrieval, SearchResult
from indexer.pipeline import dicom_tags

UPLOADS, THUMBNAILS = "uploads", "thumbnails"
THUMBNAIL_SIDE = 320
UPLOAD_NAME = "upload_name"  # the key in `extra` of the file name an uploaded image was sent with


class InvalidCodeError(CbmirError):
    """A true code that is not a complete IRMA code (IRMA model) or not one of the model's classes."""


class OriginalUnavailableError(CbmirError):
    """The original pixels or file of an indexed image can no longer be read."""


class BatchRefusedError(CbmirError):
    """A batch of uploads of which no file could be added (each one's reason in the message)."""


class OriginalsDisabledError(CbmirError):
    """Originals were asked for from a server that serves thumbnails only."""


@dataclass(frozen=True)
class CodeCount:
    """A code prefix on one IRMA axis, how many indexed images have it, and its words when known."""

    code: str
    count: int
    text: str | None


@dataclass(frozen=True)
class Decoded:
    """What outlives the decoding of an upload: its model input, size and metadata, and for a DICOM file to
    be stored its pixels as a 16-bit PNG (what is kept instead of the file). Never the pixels themselves."""

    model_input: np.ndarray
    width: int
    height: int
    meta: ImageMeta
    dicom_png: bytes | None = None


def thumbnail_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) of an image's thumbnail: scaled down to THUMBNAIL_SIDE on its longer side, never up."""
    scale = THUMBNAIL_SIDE / max(width, height)
    if scale >= 1:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def upload_name(filename: str | None) -> str:
    """The file name a client gave, reduced to its last part (it names the file in messages, never a path)."""
    name = re.split(r"[\\/]", filename or "")[-1].strip()
    return name or "upload"


class Catalog:
    """The indexed images of one index and the model that filled it, with the code tables for words."""

    def __init__(
        self,
        retrieval: Retrieval,
        tables: CodeTables | None,
        *,
        max_pixels: int,
        max_decoding: int,
        dicom_tags: tuple[str, ...] = (),
        allow_originals: bool = False,
    ):
        self.retrieval, self.engine, self.tables = retrieval, retrieval.engine, tables
        self.max_pixels, self.dicom_tags, self.allow_originals = max_pixels, dicom_tags, allow_originals
        self.schema = retrieval.embedder.schema
        self._decoding = threading.BoundedSemaphore(max_decoding)
        for name in (UPLOADS, THUMBNAILS):
            (self.engine.folder / name).mkdir(exist_ok=True)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """What a server killed mid-write leaves (before any request is served): temporary files of the
        atomic writer, and uploads whose row was never added (the file is written before its row)."""
        for name in (UPLOADS, THUMBNAILS):
            remove_temporaries(self.engine.folder / name)
        uploads = sorted((self.engine.folder / UPLOADS).iterdir())
        stored = self.engine.hashes_present([path.name.split(".")[0] for path in uploads])
        for path in uploads:
            if path.name.split(".")[0] not in stored:
                path.unlink(missing_ok=True)

    # -- words ------------------------------------------------------------------------------------------

    def words(self, code: str | None) -> str | None:
        """A code in words from the tables; None without tables, or for a plain label (its own words)."""
        if code is None or self.tables is None:
            return None
        try:
            return self.tables.describe(code)
        except IrmaCodeError:
            return None

    def axis_words(self, axis: str, code: str) -> str | None:
        if self.tables is None:
            return None
        return ", ".join(self.tables.decode(_single_axis_code(axis, code))[axis])

    def code_counts(self) -> dict[str, list[CodeCount]]:
        """Per IRMA axis, every code prefix in the index (on the best code) with its image count."""
        axes = {}
        for axis in AXES:
            counts: Counter[str] = Counter()
            for code, count in self.engine.axis_codes(axis).items():
                value = significant(code)
                for end in range(1, len(value) + 1):
                    counts[value[:end]] += count
            table = self.tables[axis] if self.tables else None
            axes[axis] = [
                CodeCount(
                    prefix, count, short_text(table.entries[prefix]) if table and prefix in table.entries else None
                )
                for prefix, count in sorted(counts.items())
            ]
        return axes

    # -- images -----------------------------------------------------------------------------------------

    def row(self, image_id: int) -> ImageRow:
        """The stored row of an image; an unknown id is an `UnknownImageError`."""
        [row] = self.engine.get([image_id])
        return row

    @staticmethod
    def name(row: ImageRow) -> str:
        """What an image is called in answers: the name it was uploaded with, else its location's name."""
        return str(row.extra.get(UPLOAD_NAME) or Location.parse(row.location).name)

    def source_pixels(self, row: ImageRow) -> np.ndarray:
        """The pixels of a stored image, read again from where it was indexed from."""
        try:
            return read_pixels(Location.parse(row.location), max_pixels=self.max_pixels)
        except (CbmirError, OSError, ValueError) as error:
            raise OriginalUnavailableError(f"the original of this image cannot be read any more ({error})") from None

    def thumbnail(self, image_id: int) -> bytes:
        """A PNG of at most THUMBNAIL_SIDE pixels a side, made on first request and kept."""
        row = self.row(image_id)  # a removed image has no thumbnail, even if its file were left behind
        path = self.engine.folder / THUMBNAILS / f"{image_id}.png"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            pass
        with self._decoding:
            pixels = to_uint8(self.source_pixels(row))
            size = thumbnail_size(pixels.shape[1], pixels.shape[0])
            if size != (pixels.shape[1], pixels.shape[0]):
                pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
            encoded = cv2.imencode(".png", pixels)[1].tobytes()
        write_atomically(path, encoded)
        try:  # `remove` deletes the row, then this file: one of the two sees the other
            self.row(image_id)
        except UnknownImageError:
            path.unlink(missing_ok=True)
            raise
        return encoded

    def original(self, image_id: int) -> tuple[str, BinaryIO]:
        """The name and the open original file of an image, when this server serves originals and the file is
        still there. Opened here, while the image is indexed: an open file stays readable when its image is
        removed and the file deleted before it has been sent."""
        if not self.allow_originals:
            raise OriginalsDisabledError(
                "this server serves thumbnails only (start it with --allow-originals to serve originals)"
            )
        location = Location.parse(self.row(image_id).location)
        unavailable = OriginalUnavailableError(f"the original file of image {image_id} is not available")
        if not location.is_file:
            raise unavailable
        try:
            return location.path.name, location.path.open("rb")
        except OSError:
            raise unavailable from None

    def read_query(self, name: str, data: bytes | Dataset) -> Radiograph:
        """The radiograph in an uploaded file or in a DICOM data set fetched from a PACS; an `ImageReadError`
        naming `name` says why not. Only `decode` calls it."""
        if isinstance(data, Dataset):
            return read_dicom(data, name=name, max_pixels=self.max_pixels)
        return read_image(data, name=name, max_pixels=self.max_pixels)

    def decode(
        self, name: str, data: bytes | Dataset, *, storing: bool = False, region: Region | None = None
    ) -> Decoded:
        """An uploaded file (or a fetched DICOM data set) read and prepared for the model in one of the
        `max_decoding` slots (waiting for one while all are taken; released on any error). An
        `ImageReadError` or a `PreprocessingError` naming it says why it cannot be used. `storing`: also make
        what is stored of a DICOM file. `region`: prepare that region of the image only (a `RefinementError`
        when it does not fit); the size is still the whole image's."""
        with self._decoding:
            radiograph = self.read_query(name, data)
            model_input = self._prepare(name, radiograph.pixels, region)
            dicom = storing and radiograph.meta.source_format == "dicom"
            return Decoded(
                model_input,
                width=int(radiograph.pixels.shape[1]),
                height=int(radiograph.pixels.shape[0]),
                meta=radiograph.meta,
                dicom_png=cv2.imencode(".png", to_uint16(radiograph.pixels))[1].tobytes() if dicom else None,
            )

    def prepare_indexed(self, row: ImageRow, region: Region | None = None) -> np.ndarray:
        """An indexed image's model input (of its `region` only, when given), its pixels read again from their
        source in one of the decoding slots (as `decode` does for an upload)."""
        with self._decoding:
            return self._prepare(f"image {row.id}", self.source_pixels(row), region)

    def _prepare(self, name: str, pixels: np.ndarray, region: Region | None) -> np.ndarray:
        """The model input of an image's pixels, or of a region of them. Called in a decoding slot."""
        try:
            return self.retrieval.embedder.prepare(pixels if region is None else region.crop(pixels))
        except PreprocessingError as error:
            where = f"{name}, region {region}" if region else name
            raise PreprocessingError(f"{where}: {error}") from None

    # -- searching --------------------------------------------------------------------------------------

    def search_image(
        self,
        name: str,
        data: bytes | Dataset,
        k: int,
        filters: Filters,
        *,
        region: Region | None = None,
        feedback: Feedback | None = None,
    ) -> tuple[Decoded, SearchResult]:
        """A query radiograph (an uploaded file or a fetched DICOM data set) as decoded, and the prediction
        and k nearest images of it (or of its `region`), refined by `feedback`."""
        decoded = self.decode(name, data, region=region)
        return decoded, self.retrieval.search_input(decoded.model_input, k, filters, feedback)

    def similar(
        self,
        image_id: int,
        k: int,
        filters: Filters,
        *,
        region: Region | None = None,
        feedback: Feedback | None = None,
    ) -> tuple[ImageRow, Prediction | None, list[Hit]]:
        """An indexed image's row and the k images most like it (itself first when it passes `filters`).
        Refined, the query is the stored image's `region` (read again and embedded: the prediction is the
        region's) or its stored vector, moved by `feedback`, and the image itself ranks by its score."""
        if region is None and feedback is None:
            hits = self.engine.search_by_id(image_id, k, filters)
            own = hits[0] if hits and hits[0].id == image_id else self.row(image_id)
            return own, None, hits
        row = self.row(image_id)
        if region is None:
            [vector] = self.engine.embeddings([image_id])
            return row, None, self.retrieval.search_vector(vector, k, filters, feedback)
        result = self.retrieval.search_input(self.prepare_indexed(row, region), k, filters, feedback)
        return row, result.prediction, result.hits

    # -- adding and changing ----------------------------------------------------------------------------

    def ingest(self, name: str, data: bytes, dataset: str, true_code: str | None) -> tuple[int, Prediction | None]:
        """Index one uploaded file; returns its id and prediction, or the stored image's id and None when
        the same file is already indexed."""
        content_hash = hashlib.sha256(data).hexdigest()
        existing = self.engine.id_for_hash(content_hash)
        if existing is not None:
            return existing, None
        decoded = self.decode(name, data, storing=True)
        if decoded.dicom_png is not None:
            suffix, kept = ".png", decoded.dicom_png
        else:
            suffix, kept = Path(name).suffix.lower(), data
        stored = self.engine.folder / UPLOADS / (content_hash + (suffix if suffix in IMAGE_SUFFIXES else ""))
        image = PreparedImage(
            location=Location(stored.absolute()),
            content_hash=content_hash,
            model_input=decoded.model_input,
            width=decoded.width,
            height=decoded.height,
            dataset=dataset,
            labels=(true_code,) if true_code else (),
            extra={**dicom_tags(decoded.meta.dicom, self.dicom_tags), UPLOAD_NAME: name},
        )
        write_atomically(stored, kept)
        try:
            result = self.retrieval.store([image])
        except DuplicateImageError:  # the same file, added by a concurrent request meanwhile
            concurrent = self.engine.id_for_hash(content_hash)
            if concurrent is None:  # and removed again since: report the duplicate as it was
                raise
            return concurrent, None
        except BaseException:
            stored.unlink(missing_ok=True)
            raise
        return int(result.ids[0]), result.predictions[0]

    def remove(self, image_id: int) -> None:
        row = self.row(image_id)
        self.engine.remove([image_id])
        (self.engine.folder / THUMBNAILS / f"{image_id}.png").unlink(missing_ok=True)
        uploaded = Location.parse(row.location).path
        if uploaded.parent == self.engine.folder.absolute() / UPLOADS:
            uploaded.unlink(missing_ok=True)

    def check_code(self, code: str) -> str:
        """A true code as an annotator gives it: a complete IRMA code for an IRMA model, else one of the
        model's classes."""
        code = code.strip()
        if self.schema.task == "irma-axes":
            try:
                parsed = IrmaCode.parse(code)
            except IrmaCodeError as error:
                raise InvalidCodeError(f"code {code!r}: {error}") from None
            if "*" in str(parsed):
                raise InvalidCodeError(f"code {code!r}: a true code must be complete (no '*')")
            return str(parsed)
        classes = [label for labels in self.schema.heads.values() for label in labels]
        if code not in classes:
            raise InvalidCodeError(f"label {code!r} is not one of this model's classes: {', '.join(classes)}")
        return code

    def set_true_code(self, image_id: int, code: str) -> None:
        self.row(image_id)
        self.engine.set_true_code(image_id, self.check_code(code))


def _single_axis_code(axis: str, code: str) -> IrmaCode:
    """A full code that is `code` on `axis` and unspecified (zeros) elsewhere, to decode one axis."""
    return IrmaCode.parse("-".join(code if name == axis else "0" * AXIS_LENGTHS[name] for name in AXES))
