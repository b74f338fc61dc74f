"""The preprocessing of Nkwentsha et al. (ImageCLEF 2009 radiographs, InceptionV3), as pure numpy functions
and one serialisable pipeline object.

Order of operations, as in the paper: pad to square (or not), resize to the model's input size, then, for the
"enhanced" variants, CLAHE and non-local means applied to the resized image, and "layering" into 3 channels:

    channel 0: the padded and resized original
    channel 1: CLAHE of channel 0 (clipLimit 2.55, tiles 8x8)
    channel 2: non-local means of channel 0 (h 2, templateWindowSize 4, searchWindowSize 4)

The "plain" variants put channel 0 in all three channels. The output is always uint8, H x W x 3: scaling to the
range a network expects belongs to the model (each model knows its own normalisation).

Table I of the paper names three ways to reach a square image, kept here as preset names:
`resize` (squash to square, aspect ratio not kept), `repetitive` (pad with the image's repetition,
OpenCV BORDER_WRAP) and `constant` (pad with zeros, BORDER_CONSTANT); each `plain` or `enhanced`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal, get_args

import cv2
import numpy as np

from cbmir.errors import CbmirError

Padding = Literal["none", "constant", "wrap"]
BorderMode = Literal["constant", "wrap"]  # the paddings that add pixels
Interpolation = Literal["nearest", "linear", "area", "cubic", "lanczos"]

PADDINGS: tuple[Padding, ...] = get_args(Padding)
INTERPOLATIONS: dict[Interpolation, int] = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "area": cv2.INTER_AREA,
    "cubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
}
_BORDERS: dict[BorderMode, int] = {"constant": cv2.BORDER_CONSTANT, "wrap": cv2.BORDER_WRAP}
# The largest input edge accepted: OpenCV's resize and CLAHE work on int32 sizes, and a radiograph is never this big.
_MAX_EDGE = 1 << 15
_SCHEMA_VERSION = 1


class PreprocessingError(CbmirError):
    """An invalid pipeline setting or an input array the pipeline cannot take."""


# Padding to a square is refused, before anything is allocated, for images no radiograph resembles: a
# 100000 x 1 image would otherwise become a 10^10-pixel square (radiographs, long-leg views included, stay
# within 1:5).
MAX_ASPECT_RATIO = 10
MAX_PADDED_PIXELS = 100_000_000


def _check_grey(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray):
        raise PreprocessingError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim != 2:
        raise PreprocessingError(f"image must be 2-D (grey), got shape {image.shape}")
    if image.size == 0:
        raise PreprocessingError(f"image is empty (shape {image.shape})")
    if max(image.shape) > _MAX_EDGE:
        raise PreprocessingError(f"image shape {image.shape} exceeds the largest supported edge {_MAX_EDGE}")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """8-bit copy of a grey image. uint8 passes unchanged; any other dtype (16-bit PNG, windowed DICOM) is
    stretched linearly from its own minimum to maximum onto 0..255, so the full stored contrast is kept."""
    _check_grey(image)
    if image.dtype == np.uint8:
        return image
    return _stretch(image, np.uint8)


def to_uint16(image: np.ndarray) -> np.ndarray:
    """16-bit copy of a grey image, stretched linearly from its own minimum to maximum onto 0..65535 (to keep
    DICOM pixels, float after their LUTs, as a lossless-enough PNG)."""
    _check_grey(image)
    return _stretch(image, np.uint16)


def _stretch(image: np.ndarray, dtype: type) -> np.ndarray:
    if image.dtype == np.bool_ or not np.issubdtype(image.dtype, np.number):
        raise PreprocessingError(f"image dtype {image.dtype} is not a numeric pixel type")
    values = image.astype(np.float64)
    if not np.isfinite(values).all():
        raise PreprocessingError("image contains NaN or infinite values")
    low, high = values.min(), values.max()
    if high == low:
        return np.zeros(image.shape, dtype)
    return np.rint((values - low) * (np.iinfo(dtype).max / (high - low))).astype(dtype)


def pad_to_square(image: np.ndarray, mode: BorderMode) -> np.ndarray:
    """Pad the shorter side equally on both sides (the odd pixel at the end): `constant` with zeros,
    `wrap` with the image's own repetition (OpenCV BORDER_WRAP, which repeats further when the pad exceeds
    the image)."""
    _check_grey(image)
    if mode not in _BORDERS:
        raise PreprocessingError(f"padding mode {mode!r} is not one of {sorted(_BORDERS)}")
    height, width = image.shape
    side = max(height, width)
    if side > MAX_ASPECT_RATIO * min(height, width) or side * side > MAX_PADDED_PIXELS:
        raise PreprocessingError(
            f"a {width} x {height} image cannot be padded to a square: its sides may differ at most "
            f"{MAX_ASPECT_RATIO}-fold and the square may hold at most {MAX_PADDED_PIXELS:,} pixels"
        )
    top, left = (side - height) // 2, (side - width) // 2
    bottom, right = side - height - top, side - width - left
    return cv2.copyMakeBorder(image, top, bottom, left, right, _BORDERS[mode], value=0)


def resize(image: np.ndarray, size: int, interpolation: Interpolation = "nearest") -> np.ndarray:
    """Resize to size x size (nearest-neighbour, as in the paper, unless told otherwise)."""
    _check_grey(image)
    if interpolation not in INTERPOLATIONS:
        raise PreprocessingError(f"interpolation {interpolation!r} is not one of {sorted(INTERPOLATIONS)}")
    return cv2.resize(image, (size, size), interpolation=INTERPOLATIONS[interpolation])


def clahe(image: np.ndarray, clip_limit: float = 2.55, tile_grid: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of an 8-bit image."""
    _check_grey(image)
    return cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid)).apply(to_uint8(image))


def nl_means(image: np.ndarray, h: float = 2.0, template_window: int = 4, search_window: int = 4) -> np.ndarray:
    """Non-local means denoising of an 8-bit image (OpenCV fastNlMeansDenoising).

    Only the bounding box of the non-zero pixels, widened by a margin, is denoised (the zero padding is 30% of
    a constant-padded irma2007-dev radiograph), with the same result, bit for bit, as the whole image: OpenCV
    computes each output pixel in integer arithmetic from the input within `reach` pixels (search half-window
    plus template half-window), reflecting the image at its border. With a margin of `reach + 1`, every pixel
    of the crop sees the same neighbourhood as in the whole image (the crop's own reflected border reflects
    zeros), and a pixel outside the crop is more than a search half-window from any non-zero pixel, so it
    averages zeros only and is 0.
    """
    _check_grey(image)
    grey = to_uint8(image)
    x, y, width, height = cv2.boundingRect(grey)  # of the non-zero pixels; (0, 0, 0, 0) if there are none
    reach = search_window // 2 + template_window // 2
    top, left = max(y - reach - 1, 0), max(x - reach - 1, 0)
    bottom, right = min(y + height + reach + 1, grey.shape[0]), min(x + width + reach + 1, grey.shape[1])
    if width == 0:
        return np.zeros_like(grey)
    if (top, left, bottom, right) == (0, 0, *grey.shape):
        return cv2.fastNlMeansDenoising(
            grey, None, h=h, templateWindowSize=template_window, searchWindowSize=search_window
        )
    denoised = np.zeros_like(grey)
    denoised[top:bottom, left:right] = cv2.fastNlMeansDenoising(
        grey[top:bottom, left:right], None, h=h, templateWindowSize=template_window, searchWindowSize=search_window
    )
    return denoised


def layer(original: np.ndarray, contrast: np.ndarray, denoised: np.ndarray) -> np.ndarray:
    """Stack three same-sized grey images into one H x W x 3 image: original, CLAHE, NL-means."""
    for image in (original, contrast, denoised):
        _check_grey(image)
    if not original.shape == contrast.shape == denoised.shape:
        raise PreprocessingError(f"layers differ in shape: {original.shape}, {contrast.shape}, {denoised.shape}")
    if original.dtype == contrast.dtype == denoised.dtype == np.uint8:
        return cv2.merge([original, contrast, denoised])  # as np.dstack, several times faster
    return np.dstack([original, contrast, denoised])


@dataclass(frozen=True)
class Preprocessing:
    """How a grey radiograph becomes a model input. Frozen and JSON-serialisable, so a checkpoint and an index
    record exactly how their inputs were made; calling it returns a uint8 size x size x 3 array."""

    padding: Padding = "constant"
    size: int = 512
    interpolation: Interpolation = "nearest"
    enhanced: bool = True
    clahe_clip_limit: float = 2.55
    clahe_tile_grid: int = 8
    nlmeans_h: float = 2.0
    nlmeans_template_window: int = 4
    nlmeans_search_window: int = 4

    def __post_init__(self) -> None:
        if self.padding not in PADDINGS:
            raise PreprocessingError(f"padding {self.padding!r} is not one of {list(PADDINGS)}")
        if self.interpolation not in INTERPOLATIONS:
            raise PreprocessingError(f"interpolation {self.interpolation!r} is not one of {sorted(INTERPOLATIONS)}")
        if not isinstance(self.enhanced, bool):
            raise PreprocessingError(f"enhanced must be true or false, got {self.enhanced!r}")
        _require_int("size", self.size, 8, 4096)
        _require_int("clahe_tile_grid", self.clahe_tile_grid, 1, 64)
        _require_int("nlmeans_template_window", self.nlmeans_template_window, 1, 35)
        _require_int("nlmeans_search_window", self.nlmeans_search_window, 1, 35)
        for name in ("clahe_clip_limit", "nlmeans_h"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1000:
                raise PreprocessingError(f"{name} must be a number in (0, 1000), got {value!r}")

    def __call__(self, image: np.ndarray) -> np.ndarray:
        grey = to_uint8(image)
        if self.padding != "none":
            grey = pad_to_square(grey, self.padding)
        grey = resize(grey, self.size, self.interpolation)
        if not self.enhanced:
            return layer(grey, grey, grey)
        return layer(
            grey,
            clahe(grey, self.clahe_clip_limit, self.clahe_tile_grid),
            nl_means(grey, self.nlmeans_h, self.nlmeans_template_window, self.nlmeans_search_window),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"version": _SCHEMA_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        if not isinstance(data, dict):
            raise PreprocessingError(f"a preprocessing record must be a JSON object, got {type(data).__name__}")
        fields = dict(data)
        version = fields.pop("version", None)
        if version != _SCHEMA_VERSION:
            raise PreprocessingError(
                f"preprocessing record has version {version!r}; this cbmir reads version {_SCHEMA_VERSION}"
            )
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise PreprocessingError(f"unknown preprocessing field(s): {', '.join(unknown)}")
        return cls(**fields)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise PreprocessingError(f"preprocessing record is not valid JSON: {error}") from None
        return cls.from_dict(data)


def _require_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PreprocessingError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


_PAPER_PADDING: dict[str, Padding] = {"resize": "none", "repetitive": "wrap", "constant": "constant"}
PRESETS: dict[str, Preprocessing] = {
    f"{square}-{variant}": Preprocessing(padding=padding, enhanced=variant == "enhanced")
    for square, padding in _PAPER_PADDING.items()
    for variant in ("plain", "enhanced")
}


def preset(name: str, **overrides: Any) -> Preprocessing:
    """A Table I preset (e.g. `constant-enhanced`, the paper's best), with fields such as `size` overridden."""
    if name not in PRESETS:
        raise PreprocessingError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(Preprocessing)})
    if unknown:
        raise PreprocessingError(f"unknown preprocessing field(s): {', '.join(unknown)}")
    return dataclasses.replace(PRESETS[name], **overrides)
