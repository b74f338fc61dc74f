"""Tests of cbmir.imaging.io: round trips of tiny generated images, every error path, and the real fixtures."""

import contextlib
import io
import struct
import time
import warnings
import zlib
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from cbmir.errors import CbmirError
from cbmir.imaging.io import (
    DEFAULT_MAX_PIXELS,
    EmptyFileError,
    ImageReadError,
    ImageTooLargeError,
    MultiFrameError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedTransferSyntaxError,
    _decode_grey_png,
    read_image,
)
from tests.conftest import shared_path

RNG_SEED = 7


@pytest.fixture
def grey8() -> np.ndarray:
    return np.random.default_rng(RNG_SEED).integers(0, 256, size=(48, 64), dtype=np.uint8)


@pytest.fixture
def grey16() -> np.ndarray:
    return np.random.default_rng(RNG_SEED).integers(0, 65536, size=(48, 64), dtype=np.uint16)


@pytest.fixture
def rgb8() -> np.ndarray:
    return np.random.default_rng(RNG_SEED).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)


def smooth(height: int = 96, width: int = 128) -> np.ndarray:
    """A gradient that JPEG keeps within a few grey levels (random noise would not survive compression)."""
    y, x = np.mgrid[0:height, 0:width]
    return (x * 255 // (width - 1) // 2 + y * 255 // (height - 1) // 2).astype(np.uint8)


def encode(array: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **options)
    return buffer.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def bt601(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


# ------------------------------------------------------------------------------------------ round trips


def test_png_8_bit_round_trip(tmp_path, grey8):
    result = read_image(write(tmp_path, "a.png", encode(grey8, "PNG")))
    assert result.pixels.dtype == np.uint8
    np.testing.assert_array_equal(result.pixels, grey8)
    meta = result.meta
    assert (meta.source_format, meta.bit_depth, meta.original_size, meta.photometric) == ("png", 8, (64, 48), "L")
    assert meta.source == str(tmp_path / "a.png")
    assert meta.dicom == {}


def test_png_16_bit_keeps_16_bits(tmp_path, grey16):
    result = read_image(write(tmp_path, "a.png", encode(grey16, "PNG")))
    assert result.pixels.dtype == np.uint16
    np.testing.assert_array_equal(result.pixels, grey16)
    assert result.meta.bit_depth == 16


def test_jpeg_round_trip_is_close(tmp_path):
    image = smooth()
    result = read_image(write(tmp_path, "a.jpg", encode(image, "JPEG", quality=95)))
    assert result.pixels.dtype == np.uint8 and result.pixels.shape == image.shape
    assert np.abs(result.pixels.astype(int) - image).mean() < 2
    assert (result.meta.source_format, result.meta.bit_depth) == ("jpeg", 8)


@pytest.mark.parametrize("compression", [None, "tiff_lzw", "tiff_adobe_deflate"])
def test_tiff_8_and_16_bit_round_trip(tmp_path, grey8, grey16, compression):
    for array in (grey8, grey16):
        result = read_image(write(tmp_path, "a.tif", encode(array, "TIFF", compression=compression)))
        assert result.pixels.dtype == array.dtype
        np.testing.assert_array_equal(result.pixels, array)
        assert (result.meta.source_format, result.meta.bit_depth) == ("tiff", array.itemsize * 8)


def test_bmp_round_trip(tmp_path, grey8):
    result = read_image(write(tmp_path, "a.bmp", encode(grey8, "BMP")))
    np.testing.assert_array_equal(result.pixels, grey8)
    assert (result.meta.source_format, result.meta.bit_depth) == ("bmp", 8)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_rgb_becomes_bt601_luminance(tmp_path, rgb8, fmt):
    result = read_image(write(tmp_path, "a.img", encode(rgb8, fmt)))
    assert result.pixels.dtype == np.uint8 and result.pixels.shape == rgb8.shape[:2]
    assert np.abs(result.pixels - bt601(rgb8)).max() <= 1
    assert result.meta.photometric == "RGB"


def test_rgba_and_palette_become_grey(tmp_path, rgb8):
    rgba = np.dstack([rgb8, np.full(rgb8.shape[:2], 40, np.uint8)])
    result = read_image(write(tmp_path, "rgba.png", encode(rgba, "PNG")))
    assert np.abs(result.pixels - bt601(rgb8)).max() <= 1  # alpha is ignored

    palette = Image.fromarray(rgb8).quantize(16)
    buffer = io.BytesIO()
    palette.save(buffer, "PNG")
    result = read_image(buffer.getvalue())
    expected = np.asarray(palette.convert("RGB"))
    assert result.meta.photometric == "P" and result.meta.bit_depth == 8
    assert np.abs(result.pixels - bt601(expected)).max() <= 1


@pytest.mark.parametrize("extension", [".png", ".tiff"])
def test_16_bit_colour_keeps_16_bits(rgb8, extension):
    rgb16 = rgb8.astype(np.uint16) * 257
    ok, encoded = cv2.imencode(extension, rgb16[..., ::-1])  # OpenCV writes BGR
    assert ok
    result = read_image(encoded.tobytes())
    assert result.pixels.dtype == np.uint16
    assert result.meta.bit_depth == 16
    assert np.abs(result.pixels - bt601(rgb16.astype(float))).max() <= 1


def test_bytes_input_with_and_without_name(grey8):
    data = encode(grey8, "PNG")
    unnamed = read_image(data)
    named = read_image(bytearray(data), name="upload.png")
    np.testing.assert_array_equal(unnamed.pixels, grey8)
    assert unnamed.meta.source == "<bytes>"
    assert named.meta.source == "upload.png"


def test_format_comes_from_content_not_extension(tmp_path, grey8):
    result = read_image(write(tmp_path, "looks_like.jpg", encode(grey8, "PNG")))
    assert result.meta.source_format == "png"


def test_pillow_global_limit_neither_applies_nor_changes(tmp_path, grey8, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # far below 48 x 64
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        result = read_image(encode(grey8, "PNG"))
    assert result.pixels.shape == (48, 64)
    assert Image.MAX_IMAGE_PIXELS == 100


def adam7_png(image: np.ndarray, exif: bytes) -> bytes:
    """An interlaced (Adam7) 8-bit grey PNG with an eXIf chunk (Pillow cannot write interlaced PNG)."""
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    raw = b"".join(
        b"\x00" + row.tobytes()
        for x0, y0, dx, dy in passes
        if image[y0::dy, x0::dx].size
        for row in image[y0::dy, x0::dx]
    )
    height, width = image.shape
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 1)
    chunks = png_chunk(b"IHDR", ihdr) + png_chunk(b"eXIf", exif) + png_chunk(b"IDAT", zlib.compress(raw))
    return b"\x89PNG\r\n\x1a\n" + chunks + png_chunk(b"IEND", b"")


@pytest.mark.parametrize("interlaced", [False, True])
def test_8_bit_grey_png_is_decoded_by_libpng_with_pillows_pixels(grey8, interlaced):
    """8-bit grey PNG, the common radiograph file, takes the faster libpng decoder: the stored samples, as
    Pillow decodes them, interlaced or not, with the EXIF orientation not applied (Pillow does not either).
    A cut-off file is left to Pillow, which says what is wrong."""
    exif = Image.Exif()
    exif[0x0112] = 3  # "rotate by 180 degrees"
    data = adam7_png(grey8, exif.tobytes()[6:]) if interlaced else encode(grey8, "PNG", exif=exif)
    assert b"eXIf" in data
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), grey8)
    np.testing.assert_array_equal(_decode_grey_png(io.BytesIO(data), 64, 48), grey8)
    np.testing.assert_array_equal(read_image(data).pixels, grey8)
    assert _decode_grey_png(io.BytesIO(data[:-4]), 64, 48) is None
    assert_fast_error(TruncatedImageError, data[: len(data) // 2])


# ------------------------------------------------------------------------------------------------ errors


ReadError = TypeVar("ReadError", bound=ImageReadError)


def assert_fast_error(error_type: type[ReadError], source, **kwargs) -> ReadError:
    start = time.perf_counter()
    with pytest.raises(error_type) as caught:
        read_image(source, **kwargs)
    assert time.perf_counter() - start < 0.5
    error = caught.value
    assert isinstance(error, CbmirError)
    assert str(error) == f"cannot read {error.source}: {error.reason}"
    return error


def test_empty_file(tmp_path):
    error = assert_fast_error(EmptyFileError, write(tmp_path, "empty.png", b""))
    assert error.source == str(tmp_path / "empty.png")


def test_missing_file_and_directory(tmp_path):
    error = assert_fast_error(ImageReadError, tmp_path / "absent.png")
    assert isinstance(error.__cause__, FileNotFoundError)
    assert "no such file" in error.reason
    assert_fast_error(ImageReadError, tmp_path)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_png_raises(fraction):
    image = np.random.default_rng(RNG_SEED).integers(0, 256, size=(300, 300), dtype=np.uint8)
    data = encode(image, "PNG")
    assert_fast_error(TruncatedImageError, data[: int(len(data) * fraction)])


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95, "eoi"])
def test_truncated_jpeg_raises(cut):
    data = encode(smooth(300, 300), "JPEG", quality=90)
    end = len(data) - 2 if cut == "eoi" else int(len(data) * cut)  # "eoi": only the end marker is missing
    assert_fast_error(TruncatedImageError, data[:end], name="cut.jpg")


@pytest.mark.parametrize("fmt", ["TIFF", "BMP"])
def test_truncated_tiff_and_bmp_raise(grey8, fmt):
    data = encode(grey8, fmt)
    assert_fast_error(TruncatedImageError, data[: len(data) * 2 // 3])


def test_text_file_renamed_png_is_not_an_image(tmp_path):
    path = write(tmp_path, "notes.png", b"patient list\nnothing to see here\n")
    error = assert_fast_error(NotAnImageError, path)
    assert error.source == str(path)


def test_gif_is_refused_by_name(grey8):
    error = assert_fast_error(NotAnImageError, encode(grey8, "GIF"))
    assert "GIF" in error.reason


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_huge_png_header_is_refused_before_decoding():
    side = 30_000
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grey
    idat = zlib.compress(b"\x00" + bytes(side))  # one row; the rest would only be decoded if we tried
    bomb = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    assert len(bomb) < 1_000
    error = assert_fast_error(ImageTooLargeError, bomb)
    assert (error.pixels, error.limit) == (side * side, DEFAULT_MAX_PIXELS)
    assert "900,000,000" in error.reason and f"{DEFAULT_MAX_PIXELS:,}" in error.reason


def test_max_pixels_is_per_call(grey8):
    data = encode(grey8, "PNG")
    assert_fast_error(ImageTooLargeError, data, max_pixels=48 * 64 - 1)
    assert read_image(data, max_pixels=48 * 64).pixels.shape == (48, 64)


def test_multi_page_tiff_is_refused(grey8):
    buffer = io.BytesIO()
    Image.fromarray(grey8).save(buffer, "TIFF", save_all=True, append_images=[Image.fromarray(grey8)])
    error = assert_fast_error(MultiFrameError, buffer.getvalue())
    assert error.frames == 2


# ------------------------------------------------------------------------------------------------- DICOM


def dicom_bytes(
    pixels: np.ndarray | None,
    *,
    transfer_syntax: UID = ExplicitVRLittleEndian,
    encapsulated: bytes | None = None,
    preamble: bool = True,
    **attributes,
) -> bytes:
    """A small DICOM file: 12-bit MONOCHROME2 unless `attributes` say otherwise; no pixels if `pixels` is None."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "123456"
    ds.PatientBirthDate = "19700101"
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape[-2:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = pixels.itemsize * 8
        ds.BitsStored = 12 if pixels.itemsize == 2 else 8
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    if encapsulated is not None:
        ds.PixelData = encapsulate([encapsulated])
        ds["PixelData"].VR = "OB"
    elif pixels is not None:
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OW" if pixels.itemsize == 2 else "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    return data if preamble else data[132:]


@pytest.fixture
def stored12() -> np.ndarray:
    return np.random.default_rng(RNG_SEED).integers(0, 4096, size=(40, 50), dtype=np.uint16)


def test_dicom_monochrome2_round_trip_as_float32(tmp_path, stored12):
    result = read_image(write(tmp_path, "x.dcm", dicom_bytes(stored12)))
    assert result.pixels.dtype == np.float32
    np.testing.assert_array_equal(result.pixels, stored12)
    meta = result.meta
    assert (meta.source_format, meta.bit_depth, meta.original_size) == ("dicom", 12, (50, 40))
    assert meta.photometric == "MONOCHROME2"
    assert meta.dicom["Modality"] == "DX" and meta.dicom["BodyPartExamined"] == "CHEST"
    assert meta.dicom["TransferSyntaxUID"] == ExplicitVRLittleEndian
    assert not {"PatientName", "PatientID", "PatientBirthDate"} & meta.dicom.keys()
    assert "SOPInstanceUID" in meta.dicom  # where the image is in a PACS, for a link to its viewer


def test_dicom_without_preamble(stored12):
    result = read_image(dicom_bytes(stored12, preamble=False))
    np.testing.assert_array_equal(result.pixels, stored12)
    assert result.meta.source_format == "dicom"


def test_dicom_monochrome1_is_inverted(stored12):
    result = read_image(dicom_bytes(stored12, PhotometricInterpretation="MONOCHROME1"))
    np.testing.assert_array_equal(result.pixels, 4095 - stored12.astype(np.float32))
    assert result.meta.photometric == "MONOCHROME1"


def test_dicom_rescale_slope_and_intercept(stored12):
    result = read_image(dicom_bytes(stored12, RescaleSlope="2", RescaleIntercept="-1024"))
    np.testing.assert_array_equal(result.pixels, stored12 * 2.0 - 1024)
    assert result.meta.dicom["RescaleSlope"] == "2"


def test_dicom_signed_pixels_and_rescale():
    stored = np.random.default_rng(RNG_SEED).integers(-2048, 2048, size=(8, 9), dtype=np.int16)
    result = read_image(dicom_bytes(stored, RescaleSlope="0.5", RescaleIntercept="10"))
    np.testing.assert_array_equal(result.pixels, stored * 0.5 + 10)


def test_dicom_window_then_monochrome1_inversion():
    stored = np.array([[0, 1000, 1536, 2048, 2560, 3000, 4095]], dtype=np.uint16)
    shown = read_image(dicom_bytes(stored, WindowCenter="2048", WindowWidth="1024")).pixels[0]
    assert shown[0] == shown[1] == 0 and shown[-1] == shown[-2] == 4095  # clipped to the 12-bit range
    assert np.all(np.diff(shown) >= 0) and 2000 < shown[3] < 2100
    monochrome1 = dicom_bytes(stored, WindowCenter="2048", WindowWidth="1024", PhotometricInterpretation="MONOCHROME1")
    inverted = read_image(monochrome1).pixels[0]
    np.testing.assert_allclose(inverted, 4095 - shown)


def test_dicom_voi_lut_sequence_is_applied(stored12):
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.LUTData = (np.arange(4096) // 2).astype("<u2").tobytes()  # OW, as scanners write it
    result = read_image(dicom_bytes(stored12, VOILUTSequence=[item]))
    np.testing.assert_array_equal(result.pixels, stored12 // 2)


def test_dicom_rgb_becomes_luminance(rgb8):
    data = dicom_bytes(
        rgb8, SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0, Rows=48, Columns=64
    )
    result = read_image(data)
    assert result.pixels.dtype == np.float32 and result.pixels.shape == (48, 64)
    np.testing.assert_allclose(result.pixels, bt601(rgb8), atol=1e-3)


def test_dicom_palette_colour_is_refused(grey8):
    error = assert_fast_error(ImageReadError, dicom_bytes(grey8, PhotometricInterpretation="PALETTE COLOR"))
    assert "PALETTE COLOR" in error.reason


@pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")  # pydicom's, on the cut-off copy
def test_dicom_jpeg_baseline_is_decoded_and_truncation_detected():
    image = smooth(64, 64)
    data = dicom_bytes(
        image, transfer_syntax=JPEGBaseline8Bit, encapsulated=encode(image, "JPEG", quality=95), BitsStored=8
    )
    result = read_image(data)
    assert np.abs(result.pixels - image).mean() < 2
    assert_fast_error(TruncatedImageError, data[: len(data) - 300])


def test_truncated_native_dicom(stored12):
    data = dicom_bytes(stored12)
    error = assert_fast_error(TruncatedImageError, data[:-100])
    assert "pixel data" in error.reason


def test_multi_frame_dicom_is_refused():
    frames = np.random.default_rng(RNG_SEED).integers(0, 4096, size=(3, 10, 12), dtype=np.uint16)
    error = assert_fast_error(MultiFrameError, dicom_bytes(frames, NumberOfFrames=3))
    assert error.frames == 3


def test_huge_dicom_is_refused_before_decoding():
    tiny = np.zeros((2, 2), np.uint16)
    error = assert_fast_error(ImageTooLargeError, dicom_bytes(tiny, Rows=30_000, Columns=30_000))
    assert error.pixels == 900_000_000


def test_dicom_without_pixel_data():
    error = assert_fast_error(NotAnImageError, dicom_bytes(None))
    assert "no pixel data" in error.reason


def test_unsupported_transfer_syntax_names_syntax_and_plugin():
    candidates = [JPEGLSLossless, JPEGLosslessSV1, HTJ2KLossless, JPEG2000Lossless]
    missing = [uid for uid in candidates if not get_decoder(uid).is_available]
    if not missing:
        pytest.skip("every candidate transfer syntax has an installed decoder plugin")
    uid = missing[0]
    data = dicom_bytes(np.zeros((16, 16), np.uint16), transfer_syntax=uid, encapsulated=b"not a codestream")
    error = assert_fast_error(UnsupportedTransferSyntaxError, data)
    assert error.transfer_syntax == uid
    assert uid in error.reason and uid.name in error.reason
    assert "install" in error.reason
    assert any(package in error.reason for package in ("pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "python-gdcm"))


@pytest.mark.filterwarnings("ignore")  # decoders warn about the damage they find; only the outcome matters
def test_damaged_files_raise_only_image_read_errors():
    """Seeded random damage (flipped, inserted, deleted bytes, cuts) to every format: each read either
    succeeds with a 2-D image or raises an ImageReadError, never a decoder's own exception."""
    rng = np.random.default_rng(RNG_SEED)
    image = smooth(40, 48)
    deep = rng.integers(0, 4096, size=(40, 48), dtype=np.uint16)
    originals = [
        encode(image, "PNG"),
        encode(deep, "PNG"),
        encode(image, "JPEG"),
        encode(deep, "TIFF", compression="tiff_lzw"),
        encode(np.dstack([image] * 3), "BMP"),
        dicom_bytes(deep, WindowCenter="2000", WindowWidth="400"),
        dicom_bytes(image, transfer_syntax=JPEGBaseline8Bit, encapsulated=encode(image, "JPEG"), BitsStored=8),
    ]
    for original in originals:
        for _ in range(60):
            data = bytearray(original)
            at = int(rng.integers(0, len(data)))
            damage = rng.integers(0, 4)
            if damage == 0:
                data[at] = (data[at] + int(rng.integers(1, 256))) % 256
            elif damage == 1:
                data[at:at] = rng.bytes(int(rng.integers(1, 16)))
            elif damage == 2:
                del data[at : at + int(rng.integers(1, 16))]
            else:
                del data[at:]
            with contextlib.suppress(ImageReadError):
                assert read_image(bytes(data)).pixels.ndim == 2


# ------------------------------------------------------------------------------------------- real files


def mediastinum_brighter_than_lungs(pixels: np.ndarray) -> bool:
    """On a frontal chest radiograph shown bone bright, the central column outshines the lung fields."""
    h, w = pixels.shape
    centre = pixels[int(0.3 * h) : int(0.7 * h), int(0.45 * w) : int(0.55 * w)].mean()
    left = pixels[int(0.3 * h) : int(0.6 * h), int(0.2 * w) : int(0.35 * w)]
    right = pixels[int(0.3 * h) : int(0.6 * h), int(0.65 * w) : int(0.8 * w)]
    return centre > (left.mean() + right.mean()) / 2


def test_every_txv_fixture_reads_bone_bright():
    folder = shared_path("fixtures/txv")
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() != ".json"]
    assert len(files) >= 9
    formats = set()
    for path in files:
        result = read_image(path)
        formats.add(result.meta.source_format)
        assert result.pixels.ndim == 2 and result.pixels.std() > 0, path
        if path.name != "Fake_MONOHR1.dcm":  # a relabelled copy, see the test below
            assert mediastinum_brighter_than_lungs(result.pixels), path
    assert formats == {"png", "jpeg", "dicom"}


def test_fake_monochrome1_fixture_is_inverted():
    """Fake_MONOHR1.dcm stores the very pixels of the MONOCHROME2 fixture, only relabelled MONOCHROME1;
    so a correct reader shows it as the exact negative of the other."""
    folder = shared_path("fixtures/txv")
    fake = folder / "Fake_MONOHR1.dcm"
    real = folder / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    np.testing.assert_array_equal(pydicom.dcmread(fake).pixel_array, pydicom.dcmread(real).pixel_array)
    shown_fake, shown_real = read_image(fake), read_image(real)
    assert shown_fake.meta.photometric == "MONOCHROME1" and shown_real.meta.photometric == "MONOCHROME2"
    np.testing.assert_array_equal(shown_fake.pixels, 255 - shown_real.pixels)
    assert not mediastinum_brighter_than_lungs(shown_fake.pixels)


def test_all_irma_dev_images_read():
    paths = sorted(shared_path("irma2007-dev/images").glob("*.png"))
    assert len(paths) == 650
    for number, path in enumerate(paths):
        result = read_image(path)
        assert result.pixels.ndim == 2 and result.pixels.dtype in (np.uint8, np.uint16), path
        assert max(result.meta.original_size) <= 512
        if number % 50 == 0:  # (interlaced) 8-bit grey PNGs: libpng gives Pillow's pixels
            np.testing.assert_array_equal(result.pixels, np.asarray(Image.open(path).convert("L")), str(path))
