import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from cbmir.imaging.io import read_image
from cbmir.imaging.preprocess import (
    PRESETS,
    Preprocessing,
    PreprocessingError,
    clahe,
    layer,
    nl_means,
    pad_to_square,
    preset,
    resize,
    to_uint8,
)
from tests.conftest import shared_path


@pytest.fixture
def wide() -> np.ndarray:
    """A seeded 6 x 10 grey image, wider than tall."""
    return np.random.default_rng(0).integers(1, 256, size=(6, 10), dtype=np.uint8)


def test_constant_padding_puts_zeros_and_centres_the_image(wide):
    padded = pad_to_square(wide, "constant")
    assert padded.shape == (10, 10)
    assert (padded[:2] == 0).all() and (padded[8:] == 0).all()
    np.testing.assert_array_equal(padded[2:8], wide)


def test_wrap_padding_repeats_the_opposite_side(wide):
    padded = pad_to_square(wide, "wrap")
    np.testing.assert_array_equal(padded[2:8], wide)
    np.testing.assert_array_equal(padded[:2], wide[-2:])
    np.testing.assert_array_equal(padded[8:], wide[:2])


def test_wrap_padding_repeats_further_than_the_image_for_very_elongated_images():
    strip = np.arange(1, 4, dtype=np.uint8).reshape(1, 3)
    padded = pad_to_square(strip, "wrap")
    assert padded.shape == (3, 3)
    assert (padded == strip).all()


def test_padding_an_odd_difference_puts_the_extra_row_at_the_end():
    padded = pad_to_square(np.ones((4, 7), np.uint8), "constant")
    assert padded.shape == (7, 7)
    assert padded[:1].sum() == 0 and padded[1:5].all() and padded[5:].sum() == 0


def test_resize_is_nearest_neighbour_by_default():
    image = np.array([[0, 255], [255, 0]], np.uint8)
    out = resize(image, 4)
    assert set(np.unique(out)) == {0, 255}
    np.testing.assert_array_equal(out[:2, :2], 0)
    assert len(np.unique(resize(image, 4, "linear"))) > 2


def test_to_uint8_stretches_16_bit_and_float_to_full_range():
    deep = np.array([[1000, 2000], [3000, 5000]], np.uint16)
    out = to_uint8(deep)
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    np.testing.assert_array_equal(to_uint8(np.full((3, 3), 7.5, np.float32)), 0)
    with pytest.raises(PreprocessingError, match="NaN"):
        to_uint8(np.array([[np.nan, 1.0]]))


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((4, 4, 3), np.uint8), "2-D"),
        (np.zeros((0, 4), np.uint8), "empty"),
        ([[1, 2]], "numpy array"),
        (np.zeros((2, 2), bool), "dtype"),
    ],
)
def test_bad_arrays_are_refused_with_the_reason(bad, message):
    with pytest.raises(PreprocessingError, match=message):
        Preprocessing()(bad)


def test_enhanced_layers_are_original_clahe_and_nl_means(wide):
    out = Preprocessing(padding="constant", size=32, enhanced=True)(wide)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    original = resize(pad_to_square(wide, "constant"), 32)
    np.testing.assert_array_equal(out[..., 0], original)
    np.testing.assert_array_equal(out[..., 1], clahe(original, 2.55, 8))
    np.testing.assert_array_equal(out[..., 2], nl_means(original, 2, 4, 4))
    assert not np.array_equal(out[..., 0], out[..., 1])


def test_plain_puts_the_same_image_in_all_channels(wide):
    out = Preprocessing(padding="wrap", size=16, enhanced=False)(wide)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()


def test_layer_refuses_mismatched_shapes():
    with pytest.raises(PreprocessingError, match="differ in shape"):
        layer(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8), np.zeros((2, 2), np.uint8))


def test_presets_reproduce_table_one():
    assert set(PRESETS) == {
        f"{square}-{variant}" for square in ("resize", "repetitive", "constant") for variant in ("plain", "enhanced")
    }
    best = PRESETS["constant-enhanced"]
    assert (best.padding, best.size, best.interpolation, best.enhanced) == ("constant", 512, "nearest", True)
    assert (best.clahe_clip_limit, best.clahe_tile_grid) == (2.55, 8)
    assert (best.nlmeans_h, best.nlmeans_template_window, best.nlmeans_search_window) == (2.0, 4, 4)
    assert PRESETS["resize-plain"].padding == "none" and PRESETS["repetitive-plain"].padding == "wrap"
    assert preset("constant-enhanced", size=224).size == 224


def test_pipeline_round_trips_through_json():
    pipeline = preset("repetitive-enhanced", size=300, interpolation="area")
    text = pipeline.to_json()
    assert json.loads(text)["version"] == 1
    assert Preprocessing.from_json(text) == pipeline


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: preset("fancy"), "unknown preset 'fancy'"),
        (lambda: preset("constant-plain", colour=True), "unknown preprocessing field"),
        (lambda: Preprocessing(padding="reflect"), "padding 'reflect'"),  # type: ignore[arg-type]
        (lambda: Preprocessing(size=0), "size must be"),
        (lambda: Preprocessing(interpolation="bilinear"), "interpolation 'bilinear'"),  # type: ignore[arg-type]
        (lambda: Preprocessing(clahe_clip_limit=-1), "clahe_clip_limit"),
        (lambda: Preprocessing.from_json("{"), "not valid JSON"),
        (lambda: Preprocessing.from_json('{"size": 512}'), "version None"),
        (lambda: Preprocessing.from_json('{"version": 1, "gamma": 2}'), "unknown preprocessing field"),
    ],
)
def test_invalid_settings_name_the_field(make, message):
    with pytest.raises(PreprocessingError, match=message):
        make()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_on_real_radiographs(name):
    images = shared_path("irma2007-dev/images")
    paths = sorted(images.glob("*.png"))[:5]
    pipeline = PRESETS[name]
    for path in paths:
        grey = read_image(path).pixels
        out = pipeline(grey)
        assert out.shape == (512, 512, 3) and out.dtype == np.uint8, path
        if pipeline.enhanced:
            np.testing.assert_array_equal(out[..., 1], clahe(out[..., 0]))
            np.testing.assert_array_equal(out[..., 2], nl_means(out[..., 0]))
        else:
            assert (out[..., 1] == out[..., 0]).all() and (out[..., 2] == out[..., 0]).all()


def test_constant_and_wrap_padding_on_a_real_radiograph():
    """IRMA radiographs have a longest side of 512, so padding to 512 and resizing to 512 keeps every pixel:
    the padded band is exactly zeros (constant) or the image's opposite edge (wrap)."""
    images = shared_path("irma2007-dev/images")
    grey = next(
        pixels
        for pixels in (read_image(path).pixels for path in sorted(images.glob("*.png")))
        if pixels.shape[0] < pixels.shape[1] - 40 and pixels.shape[1] == 512
    )
    height = grey.shape[0]
    top = (512 - height) // 2
    constant = PRESETS["constant-plain"](grey)[..., 0]
    wrap = PRESETS["repetitive-plain"](grey)[..., 0]
    assert (constant[:top] == 0).all() and (constant[top + height :] == 0).all()
    np.testing.assert_array_equal(constant[top : top + height], grey)
    np.testing.assert_array_equal(wrap[top : top + height], grey)
    np.testing.assert_array_equal(wrap[:top], grey[height - top :])
    assert wrap[:top].any()
    squashed = PRESETS["resize-plain"](grey)[..., 0]
    np.testing.assert_array_equal(squashed, cv2.resize(grey, (512, 512), interpolation=cv2.INTER_NEAREST))


# ------------------------------------------------------------------------ today's output, kept (speed-ups)

REFERENCE = Path(__file__).with_name("preprocess_reference.npz")


def _texture(height: int, width: int, maximum: int, dtype: type) -> np.ndarray:
    """A gradient plus a pseudo-random term, from integer arithmetic only (no random generator, whose stream
    could change with numpy), with a black band along the top and the right and a black inner patch, like the
    black borders of scanned films."""
    i, j = np.indices((height, width), dtype=np.int64)
    gradient = (i * 5 + j * 3) * (maximum // 2) // (5 * height + 3 * width)
    noise = (i * i * 31 + j * j * 17 + i * j * 7 + i * 3) % 61 * (maximum // 2) // 60
    image = (gradient + noise).astype(dtype)
    image[: height // 6, :] = 0
    image[:, width - width // 7 :] = 0
    image[height // 2 : height // 2 + 3, width // 3 : width // 3 + 4] = 0
    return image


def _reference_cases() -> dict[str, tuple[np.ndarray, Preprocessing]]:
    """Odd-sized tall, wide and square images at 8, 12 and 16 bits and as float (DICOM after its LUTs), through
    every preset at small sizes; the last cases keep the size (resize is then a copy) like a 512-px radiograph."""
    images = {
        "tall-8bit": _texture(45, 29, 255, np.uint8),
        "wide-12bit": _texture(23, 41, 4095, np.uint16),
        "square-16bit": _texture(31, 31, 65535, np.uint16),
        "tall-float": _texture(37, 20, 3000, np.uint16).astype(np.float32) * np.float32(0.37) - np.float32(100),
    }
    cases = {
        f"{image_name}/{name}": (image, preset(name, size=size))
        for image_name, image in images.items()
        for name, size in zip(sorted(PRESETS), (24, 17, 24, 17, 24, 17), strict=True)
    }
    wide = _texture(30, 48, 255, np.uint8)
    for name in ("constant-enhanced", "repetitive-enhanced", "resize-enhanced"):
        cases[f"wide-8bit-same-size/{name}"] = (wide, preset(name, size=48))
    cases["tall-8bit/constant-enhanced-linear"] = (
        images["tall-8bit"],
        preset("constant-enhanced", size=33, interpolation="linear"),
    )
    return cases


def test_the_presets_still_give_the_output_they_gave_before_the_speed_ups():
    """The outputs of the code before the preprocessing speed-ups (commit 5e15023), stored in
    preprocess_reference.npz: equal up to rounding (at most one grey level) in every pixel, so a faster
    implementation never changes what a checkpoint's model sees. Regenerate the file only for an intended
    change of the computation (and then say so: indexed vectors and trained models depend on it)."""
    reference = np.load(REFERENCE)
    cases = _reference_cases()
    assert sorted(reference.files) == sorted(cases)
    for key, (image, pipeline) in cases.items():
        out, expected = pipeline(image), reference[key]
        assert out.shape == expected.shape and out.dtype == expected.dtype, key
        difference = np.abs(out.astype(np.int16) - expected.astype(np.int16))
        assert difference.max() <= 1, f"{key}: {np.count_nonzero(difference > 1)} values differ by more than 1"


@pytest.mark.parametrize("template_window, search_window", [(4, 4), (3, 7), (1, 2), (5, 9)])
def test_nl_means_on_the_non_zero_part_equals_nl_means_on_the_whole_image(template_window, search_window):
    """nl_means denoises only the non-zero bounding box plus a margin; the result is OpenCV's on the whole image,
    bit for bit, also for zero bands just narrower or wider than the margin, on any side."""
    reach = search_window // 2 + template_window // 2
    texture = _texture(24, 28, 255, np.uint8)[4:, :-4]  # without its black bands, so `band` is the whole band
    for band in range(max(reach - 1, 0), reach + 4):
        for top, bottom, left, right in ((band, 0, 0, 0), (0, band, band, 0), (band, band, 0, band), (1, 0, band, 2)):
            image = cv2.copyMakeBorder(texture, top, bottom, left, right, cv2.BORDER_CONSTANT, value=0)
            for h in (2.0, 30.0):
                whole = cv2.fastNlMeansDenoising(
                    image, None, h=h, templateWindowSize=template_window, searchWindowSize=search_window
                )
                np.testing.assert_array_equal(nl_means(image, h, template_window, search_window), whole)
    np.testing.assert_array_equal(nl_means(np.zeros((9, 5), np.uint8)), np.zeros((9, 5), np.uint8))
