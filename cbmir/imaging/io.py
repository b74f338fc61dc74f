"""Read one radiograph (PNG, JPEG, TIFF, BMP or DICOM) from a path or bytes into a 2-D numpy array.

Everything a caller can get wrong with a file becomes an `ImageReadError` that names the file and the reason;
no decoder traceback escapes and no partially decoded (half-grey) image is ever returned.

Pixel conventions:

- PNG, JPEG, TIFF, BMP: the stored grey values, ``uint8`` or ``uint16`` (16-bit PNG and TIFF keep 16 bits).
  Colour and palette images become grey by ITU-R BT.601 luminance (0.299 R + 0.587 G + 0.114 B); alpha is
  dropped; 1-bit images become 0/255.
- DICOM: ``float32`` values after the modality LUT (rescale slope/intercept) and the VOI LUT or window, with
  MONOCHROME1 inverted inside that output range, so bone is bright. float32 holds every integer up to 2**24
  exactly, so no stored, rescaled or windowed value is lost or clipped.
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pydicom
from PIL import BmpImagePlugin, Image, ImageFile, JpegImagePlugin, PngImagePlugin, TiffImagePlugin
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from cbmir.errors import CbmirError

DEFAULT_MAX_PIXELS = 50_000_000
"""Largest width × height accepted by default (the `max_pixels` setting, ``$CBMIR_MAX_PIXELS``, changes it
for the indexer, the search command and the service); checked from the header, before any pixel is
decoded. Twice the largest radiographs in use (a 4k x 6k mammogram is 24 megapixels)."""

_LUMA = (0.299, 0.587, 0.114)

# DICOM tags copied into ImageMeta.dicom. Technical tags only: nothing that identifies a patient, and no
# free-text descriptions (they sometimes carry names or dates).
TECHNICAL_DICOM_TAGS = (
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "ImageLaterality",
    "Laterality",
    "PhotometricInterpretation",
    "PresentationIntentType",
    "PresentationLUTShape",
    "Manufacturer",
    "ManufacturerModelName",
    "SOPClassUID",
    # Where the image is in a PACS (for links to its viewer). UIDs name no patient; they are not de-identified.
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "PixelSpacing",
    "ImagerPixelSpacing",
)

# pip package names where they differ from the requirement names in pydicom's "missing dependencies" text.
_PIP_NAMES = {"gdcm": "python-gdcm"}

# (SamplesPerPixel, PhotometricInterpretation) pairs that read_image accepts; colour becomes luminance.
_DICOM_PIXEL_KINDS = {(1, "MONOCHROME1"), (1, "MONOCHROME2"), (3, "RGB"), (3, "YBR_FULL"), (3, "YBR_FULL_422")}

_COLOUR_MODES = ("P", "PA", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")

_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last chunk of a PNG file: length 0, type, CRC


# --------------------------------------------------------------------------------------------------- errors


class ImageReadError(CbmirError):
    """A file or byte string could not be read as a radiograph."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"cannot read {source}: {reason}")
        self.source = source
        self.reason = reason


class EmptyFileError(ImageReadError):
    """The input has no bytes at all."""


class TruncatedImageError(ImageReadError):
    """The file ends before all of its pixels (or its header) have been read."""


class NotAnImageError(ImageReadError):
    """The content is not a supported image (whatever its extension says), or a DICOM without pixels."""


class UnsupportedTransferSyntaxError(ImageReadError):
    """A DICOM file is compressed with a transfer syntax that no installed plugin can decode."""

    def __init__(self, source: str, reason: str, transfer_syntax: str) -> None:
        super().__init__(source, reason)
        self.transfer_syntax = transfer_syntax


class MultiFrameError(ImageReadError):
    """The file holds several frames (multi-frame DICOM, multi-page TIFF, animated PNG)."""

    def __init__(self, source: str, reason: str, frames: int) -> None:
        super().__init__(source, reason)
        self.frames = frames


class ImageTooLargeError(ImageReadError):
    """The header announces more pixels than the caller's limit (decompression-bomb guard)."""

    def __init__(self, source: str, width: int, height: int, limit: int) -> None:
        self.pixels = width * height
        self.limit = limit
        super().__init__(
            source,
            f"image is {width}×{height} = {self.pixels:,} pixels, above the limit of {limit:,} (max_pixels)",
        )


# ------------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ImageMeta:
    """Where an image came from and how it was stored."""

    source: str
    """File path, or the name given for bytes (``"<bytes>"`` if none)."""
    source_format: str
    """``"png"``, ``"jpeg"``, ``"tiff"``, ``"bmp"`` or ``"dicom"``, detected from the content."""
    bit_depth: int
    """Bits per sample as stored (DICOM: BitsStored; palette images: 8, the depth of the palette)."""
    original_size: tuple[int, int]
    """(width, height) of the stored image."""
    photometric: str
    """DICOM PhotometricInterpretation as stored (before inversion), else the Pillow mode ("L", "RGB", "I;16")."""
    dicom: dict[str, str]
    """Technical DICOM tags that are present (see ``TECHNICAL_DICOM_TAGS``), plus TransferSyntaxUID; empty otherwise."""


@dataclass(frozen=True)
class Radiograph:
    """A grey radiograph, bone bright. See the module docstring for the dtype of `pixels`."""

    pixels: np.ndarray
    meta: ImageMeta


# ------------------------------------------------------------------------------------------------- reading


def read_image(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Radiograph:
    """Read a single-frame radiograph from a file path or from the bytes of a file.

    The format is detected from the content, never from the extension. `name`, if given, labels the image
    in its metadata and in errors instead of the path (bytes without a name are ``"<bytes>"``). Images whose
    header announces more than `max_pixels` pixels are refused before decoding. Raises `ImageReadError`
    (or one of its subclasses) for any input that cannot be read.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        return _read_stream(io.BytesIO(bytes(source)), label, max_pixels)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path or bytes, not {type(source).__name__}")
    label = name or str(os.fspath(source))
    with _open_file(source, label) as stream:
        return _read_stream(stream, label, max_pixels)


def _open_file(path: str | os.PathLike[str], label: str) -> BinaryIO:
    """Open the regular file `path` for reading; a failure to open it becomes an ImageReadError (errors while
    reading are the reader's to report). A named pipe, socket or device is refused without waiting on it:
    it is opened non-blocking and looked at before anything is read."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError as exc:
        raise ImageReadError(label, "no such file") from exc
    except OSError as exc:
        raise ImageReadError(label, exc.strerror or str(exc)) from exc
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise ImageReadError(label, "not a regular file (a folder, named pipe, socket or device)")
    os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "rb")


def read_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of the regular file `path`; an `ImageReadError` naming it for anything else (missing,
    unreadable, a named pipe that would block a reader for ever)."""
    label = str(os.fspath(path))
    with _open_file(path, label) as stream:
        try:
            return stream.read()
        except OSError as exc:
            raise ImageReadError(label, exc.strerror or str(exc)) from exc


def _read_stream(stream: BinaryIO, source: str, max_pixels: int) -> Radiograph:
    head = stream.read(132)
    stream.seek(0)
    if not head:
        raise EmptyFileError(source, "the file is empty")
    fmt = _sniff_format(head, source)
    if fmt == "dicom":
        return _read_dicom(stream, source, max_pixels, has_preamble=head[128:132] == b"DICM")
    return _read_raster(stream, fmt, head, source, max_pixels)


def _sniff_format(head: bytes, source: str) -> str:
    """Name the format from the first 132 bytes; raise NotAnImageError if none matches."""
    if head[128:132] == b"DICM":  # checked first: dual-format files carry a TIFF header in the preamble
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"BM") and len(head) >= 18:
        dib_header_size = struct.unpack_from("<I", head, 14)[0]
        if dib_header_size in (12, 16, 40, 52, 56, 64, 108, 124):
            return "bmp"
    if _looks_like_headerless_dicom(head):
        return "dicom"
    for magic, kind in ((b"GIF8", "GIF"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xffO\xffQ", "JPEG 2000")):
        if head.startswith(magic):
            raise NotAnImageError(source, f"{kind} files are not supported (use PNG, JPEG, TIFF, BMP or DICOM)")
    raise NotAnImageError(source, f"not a PNG, JPEG, TIFF, BMP or DICOM file (it starts with {head[:8]!r})")


def _looks_like_headerless_dicom(head: bytes) -> bool:
    """A DICOM stream without the 128-byte preamble and "DICM" starts with a group 0002 or 0008 tag.

    Only then is pydicom's lenient ``force=True`` parsing tried, and its result must still hold pixel data.
    """
    if len(head) < 8:
        return False
    group, element = struct.unpack_from("<HH", head)
    if group not in (0x0002, 0x0008) or element > 0x00FF:
        return False
    vr = head[4:6]
    explicit = vr.isalpha() and vr.isupper()
    implicit_length = struct.unpack_from("<I", head, 4)[0]
    return explicit or implicit_length < 0x10000


# ------------------------------------------------------------------------------------ PNG, JPEG, TIFF, BMP

# Plugin classes are instantiated directly instead of through Image.open: their constructors read only the
# header (so the size is known before decoding), and Image.open's global MAX_IMAGE_PIXELS check, which could
# refuse an image the caller's max_pixels allows, is bypassed without touching global state.
_PILLOW_CLASSES: dict[str, type[ImageFile.ImageFile]] = {
    "png": PngImagePlugin.PngImageFile,
    "jpeg": JpegImagePlugin.JpegImageFile,
    "tiff": TiffImagePlugin.TiffImageFile,
    "bmp": BmpImagePlugin.BmpImageFile,
}


def _read_raster(stream: BinaryIO, fmt: str, head: bytes, source: str, max_pixels: int) -> Radiograph:
    label = fmt.upper()
    try:
        image = _PILLOW_CLASSES[fmt](stream)
    except MemoryError:
        raise
    except Exception as exc:  # Pillow signals bad headers with SyntaxError, struct.error, OSError, ...
        raise _pillow_error(source, label, exc) from exc

    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(source, width, height, max_pixels)
    if width == 0 or height == 0:
        raise ImageReadError(source, f"{label} header announces an empty image ({width}×{height})")
    try:
        frames = getattr(image, "n_frames", 1)
    except Exception as exc:
        raise _pillow_error(source, label, exc) from exc
    if frames > 1:
        raise MultiFrameError(source, f"{label} file has {frames} frames; only single images are read", frames)

    bit_depth = _stored_bit_depth(image, fmt, head)
    mode = image.mode
    pixels: np.ndarray | None = None
    try:
        if fmt == "png" and mode == "L" and bit_depth == 8:  # the common case: libpng is faster than Pillow
            pixels = _decode_grey_png(stream, width, height)
        if pixels is None:
            image.load()  # raises on truncated data (as long as ImageFile.LOAD_TRUNCATED_IMAGES is False)
            if mode in _COLOUR_MODES and bit_depth > 8:
                stream.seek(0)
                pixels = _decode_deep_colour(stream.read())
            else:
                pixels = _pillow_to_grey(image)
    except (MemoryError, ImageReadError):
        raise
    except Exception as exc:
        raise _pillow_error(source, label, exc) from exc
    if pixels is None:
        raise ImageReadError(source, f"{label} with {bit_depth}-bit {mode} samples is not supported")

    meta = ImageMeta(source, fmt, bit_depth, (width, height), mode, {})
    return Radiograph(pixels, meta)


def _stored_bit_depth(image: Image.Image, fmt: str, head: bytes) -> int:
    if image.mode == "P":
        return 8
    if fmt == "png":
        return head[24]  # IHDR bit depth
    if fmt == "jpeg":
        return int(getattr(image, "bits", 8))
    if isinstance(image, TiffImagePlugin.TiffImageFile):
        bits = image.tag_v2.get(TiffImagePlugin.BITSPERSAMPLE, 1)
        return int(bits[0] if isinstance(bits, tuple) else bits)
    return 1 if image.mode == "1" else 8


def _pillow_to_grey(image: Image.Image) -> np.ndarray | None:
    """Grey uint8/uint16 array of a loaded Pillow image, or None for sample formats we do not accept."""
    mode = image.mode
    if mode == "L":
        return np.asarray(image, dtype=np.uint8)
    if mode == "1" or mode in _COLOUR_MODES:
        return np.asarray(image.convert("L"), dtype=np.uint8)  # Pillow uses the same BT.601 weights
    if mode.startswith("I;16") and not mode.startswith("I;16S"):
        return np.asarray(image).astype(np.uint16)  # also makes big-endian "I;16B" native
    return None  # signed, 32-bit integer or float samples


def _decode_grey_png(stream: BinaryIO, width: int, height: int) -> np.ndarray | None:
    """The samples of an 8-bit grey PNG decoded by libpng (through OpenCV): the same pixels as Pillow's decoder
    gives, in three quarters of its time. None (and Pillow decodes the file, or says what is wrong with it, as
    for any other file) unless the file ends with its IEND chunk, so that a cut-off file never reaches libpng
    (which would print an error), and libpng decodes all of it.
    """
    import cv2  # imported here, as in _decode_deep_colour

    stream.seek(0)
    data = stream.read()
    if not data.endswith(_PNG_IEND):
        return None
    try:  # IMREAD_UNCHANGED: the stored samples, EXIF orientation ignored, as Pillow reads them
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:  # e.g. above OpenCV's own pixel limit
        return None
    if decoded is None or decoded.dtype != np.uint8 or decoded.shape != (height, width):
        return None
    return decoded


def _decode_deep_colour(data: bytes) -> np.ndarray:
    """16-bit colour PNG/TIFF at full depth (Pillow would reduce it to 8 bits).

    Only called after Pillow has decoded the whole file, so it is known to be complete: OpenCV alone could
    return a partly decoded image for a truncated file.
    """
    import cv2  # imported here: only this rare case needs it

    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise ValueError("OpenCV could not decode the 16-bit colour samples")
    if decoded.ndim == 2:
        return decoded
    bgr = decoded[..., :3]
    return _luminance(bgr[..., ::-1], decoded.dtype.type)


def _luminance(rgb: np.ndarray, dtype: type[np.integer] | type[np.floating]) -> np.ndarray:
    grey = rgb[..., 0] * np.float32(_LUMA[0]) + rgb[..., 1] * np.float32(_LUMA[1])
    grey += rgb[..., 2] * np.float32(_LUMA[2])
    if issubclass(dtype, np.integer):
        grey = np.clip(np.rint(grey), 0, np.iinfo(dtype).max)
    return grey.astype(dtype)


def _pillow_error(source: str, label: str, exc: Exception) -> ImageReadError:
    message = str(exc) or type(exc).__name__
    cut_short = (
        isinstance(exc, (EOFError, struct.error))
        or "truncated" in message.lower()
        or "requires a buffer" in message  # struct.error re-raised by Pillow as SyntaxError
    )
    if cut_short:
        return TruncatedImageError(source, f"{label} data ends early ({message})")
    return ImageReadError(source, f"invalid {label} data ({message})")


# ---------------------------------------------------------------------------------------------------- DICOM


def _read_dicom(stream: BinaryIO, source: str, max_pixels: int, *, has_preamble: bool) -> Radiograph:
    try:
        ds = pydicom.dcmread(stream, force=not has_preamble)
    except MemoryError:
        raise
    except InvalidDicomError as exc:
        raise NotAnImageError(source, f"not a valid DICOM file ({_one_line(exc)})") from exc
    except Exception as exc:
        if not has_preamble:
            raise NotAnImageError(source, f"not a PNG, JPEG, TIFF, BMP or DICOM file ({_one_line(exc)})") from exc
        if isinstance(exc, EOFError):
            raise TruncatedImageError(source, f"DICOM data set ends early ({_one_line(exc)})") from exc
        raise ImageReadError(source, f"DICOM data set cannot be parsed ({_one_line(exc)})") from exc
    return _dataset_to_radiograph(ds, source, max_pixels, has_preamble)


def read_dicom(ds: Dataset, *, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Radiograph:
    """The radiograph in a DICOM data set already parsed (one received over the network), read as a DICOM
    file is; `ImageReadError` (or a subclass) naming `name` and the reason when it holds none."""
    return _dataset_to_radiograph(ds, name, max_pixels, has_preamble=True)


def _dataset_to_radiograph(ds: Dataset, source: str, max_pixels: int, has_preamble: bool) -> Radiograph:
    try:
        return _dicom_to_radiograph(ds, source, max_pixels, has_preamble)
    except (ImageReadError, MemoryError):
        raise
    except Exception as exc:  # pydicom converts elements lazily, so a corrupt value can fail on any access
        raise ImageReadError(source, f"invalid DICOM data set ({_one_line(exc)})") from exc


def _dicom_to_radiograph(ds: Dataset, source: str, max_pixels: int, has_preamble: bool) -> Radiograph:
    _check_dicom_pixel_data(ds, source, has_preamble)
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
        photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip()
        bits_stored = int(ds.get("BitsStored") or ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ImageReadError(source, f"DICOM image attributes are missing or invalid ({exc})") from exc
    if frames > 1:
        raise MultiFrameError(source, f"DICOM file has {frames} frames; only single-frame images are read", frames)
    if columns * rows > max_pixels:
        raise ImageTooLargeError(source, columns, rows, max_pixels)
    if (samples, photometric) not in _DICOM_PIXEL_KINDS:
        raise ImageReadError(
            source, f"DICOM with {samples} sample(s) per pixel and {photometric} pixels is not supported"
        )

    tsuid = _transfer_syntax(ds)
    _check_decoder(tsuid, source)
    try:
        stored = ds.pixel_array
    except MemoryError:
        raise
    except Exception as exc:
        raise _dicom_decode_error(source, tsuid, exc) from exc
    expected = (rows, columns) if samples == 1 else (rows, columns, 3)
    if stored.shape != expected:
        raise ImageReadError(source, f"decoded DICOM pixels have shape {stored.shape}, expected {expected}")

    if samples == 3:
        pixels = _luminance(stored, np.float32)  # pydicom already turned YBR into RGB
    else:
        pixels = _monochrome_to_display(stored, ds, invert=photometric == "MONOCHROME1")

    meta = ImageMeta(source, "dicom", bits_stored, (columns, rows), photometric, _dicom_tags(ds, tsuid))
    return Radiograph(pixels, meta)


def _check_dicom_pixel_data(ds: Dataset, source: str, has_preamble: bool) -> None:
    """Refuse data sets without usable pixel data, telling a cut-off file from a DICOM that has no image.

    pydicom reads leniently: a file that ends inside the pixel data yields a short value or, for compressed
    data, an empty data set (with a warning) instead of an error.
    """
    if "PixelData" not in ds:
        if not has_preamble:
            raise NotAnImageError(source, "not a PNG, JPEG, TIFF, BMP or DICOM file (no DICOM pixel data found)")
        if len(ds) == 0 or "Rows" in ds or "Columns" in ds:
            raise TruncatedImageError(source, "DICOM file ends before its pixel data")
        sop_class = ds.get("SOPClassUID")
        kind = f" ({UID(str(sop_class)).name})" if sop_class else ""
        raise NotAnImageError(source, f"DICOM file has no pixel data{kind}")
    raw = ds.get_item(0x7FE00010)
    declared = getattr(raw, "length", None)  # known while the element is still raw; 0xFFFFFFFF: encapsulated
    present = len(raw.value) if isinstance(raw.value, bytes) else None
    if declared not in (None, 0xFFFFFFFF) and present is not None and present < declared:
        raise TruncatedImageError(source, f"DICOM pixel data is cut short ({present:,} of {declared:,} bytes present)")


def _transfer_syntax(ds: Dataset) -> UID:
    tsuid = ds.file_meta.get("TransferSyntaxUID")
    if tsuid:
        return UID(str(tsuid))
    # A headerless data set: pydicom knows the encoding it parsed, which implies an uncompressed syntax.
    implicit, little_endian = ds.original_encoding
    if implicit:
        tsuid = ImplicitVRLittleEndian
    elif little_endian:
        tsuid = ExplicitVRLittleEndian
    else:
        tsuid = ExplicitVRBigEndian
    ds.file_meta.TransferSyntaxUID = tsuid
    return tsuid


def _check_decoder(tsuid: UID, source: str) -> None:
    syntax = f"{tsuid.name} ({tsuid})" if tsuid.is_transfer_syntax else str(tsuid)
    try:
        decoder = get_decoder(tsuid)
    except NotImplementedError as exc:
        raise UnsupportedTransferSyntaxError(
            source, f"transfer syntax {syntax} is not supported by pydicom", str(tsuid)
        ) from exc
    if decoder.is_available:
        return
    options = [_install_hint(missing) for missing in decoder.missing_dependencies]
    raise UnsupportedTransferSyntaxError(
        source,
        f"no installed plugin decodes transfer syntax {syntax}; install {' or '.join(options)}",
        str(tsuid),
    )


def _install_hint(missing: str) -> str:
    """'pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1' -> 'pylibjpeg + pylibjpeg-libjpeg'."""
    _, _, requirement = missing.partition(" - requires ")
    names = [re.split(r"[<>=!~ ]", req.strip(), maxsplit=1)[0] for req in requirement.split(" and ")]
    return " + ".join(_PIP_NAMES.get(name, name) for name in names if name and name != "numpy")


def _dicom_decode_error(source: str, tsuid: UID, exc: Exception) -> ImageReadError:
    message = _one_line(exc)
    if "less than expected" in message or "truncated" in message.lower():
        return TruncatedImageError(source, f"DICOM pixel data ends early ({message})")
    return ImageReadError(source, f"cannot decode {tsuid.name} pixel data ({message})")


def _one_line(exc: Exception) -> str:
    """The exception's message on one line (pydicom's span several), or its type if it has none."""
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _monochrome_to_display(stored: np.ndarray, ds: Dataset, *, invert: bool) -> np.ndarray:
    """Modality LUT, then VOI LUT or window, then MONOCHROME1 inversion, as float32.

    The inversion mirrors values inside the nominal output range of the last transform applied (not the
    range found in this image), so the same stored value always maps to the same output value.
    """
    values = apply_modality_lut(stored, ds)
    low, high = _modality_range(ds)
    voi_items = ds.get("VOILUTSequence")
    if voi_items and "LUTDescriptor" in voi_items[0] and "LUTData" in voi_items[0]:
        if not np.issubdtype(values.dtype, np.integer):
            values = np.rint(values).astype(np.int64)  # LUTs are indexed by integers
        values = apply_voi(values, ds)
        low, high = 0, 2 ** int(voi_items[0].LUTDescriptor[2]) - 1
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        values = apply_windowing(values, ds)  # maps into the same nominal range as the modality output
    values = values.astype(np.float32)
    if invert:
        values = np.float32(low + high) - values
    return values


def _modality_range(ds: Dataset) -> tuple[float, float]:
    """Nominal (min, max) after the modality transform, as pydicom's windowing assumes it."""
    modality_lut = ds.get("ModalityLUTSequence")
    if modality_lut:
        return 0.0, float(2 ** int(modality_lut[0].LUTDescriptor[2]) - 1)
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation") or 0) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        low, high = sorted((low * slope + intercept, high * slope + intercept))
    return low, high


def _dicom_tags(ds: Dataset, tsuid: UID) -> dict[str, str]:
    tags: dict[str, str] = {}
    for keyword in TECHNICAL_DICOM_TAGS:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        text = "\\".join(str(v) for v in value) if isinstance(value, MultiValue) else str(value)
        if text.strip():
            tags[keyword] = text.strip()
    tags["TransferSyntaxUID"] = str(tsuid)
    return tags
