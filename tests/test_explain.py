"""Agreement maps (cbmir.explain) on drawn phantoms with the default architecture: its packaged ImageNet trunk
(what heads-only training leaves in place) against the same architecture with random weights."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from cbmir.explain import Explainer, ExplainError, in_image_frame, overlay_png
from cbmir.imaging.preprocess import preset
from cbmir.models import create_model
from cbmir.service.catalog import thumbnail_size
from cbmir.synthetic import phantom

MODEL = "efficientnet-lite0-regional"
PIPELINE = preset("constant-enhanced", size=224)


@pytest.fixture(scope="module")
def trained() -> Explainer:
    return Explainer(create_model(MODEL, {"anatomy": 3}, pretrained=True))


@pytest.fixture(scope="module")
def randomised() -> Explainer:
    torch.manual_seed(0)
    return Explainer(create_model(MODEL, {"anatomy": 3}, pretrained=False))


@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {kind: phantom(kind, rng, longest_side=300) for kind in ("chest", "hand", "skull")}


def prepared(images, kind: str) -> np.ndarray:
    return PIPELINE(images[kind])


def test_maps_are_not_constant_and_differ_between_pairs(trained, images):
    chest_hand = trained.agreement(prepared(images, "chest"), prepared(images, "hand"))
    chest_skull = trained.agreement(prepared(images, "chest"), prepared(images, "skull"))
    assert chest_hand.query.shape == (14, 14)  # the finest pooled stage's grid at 224 px
    assert chest_hand.query.std() > 0.02 and chest_hand.neighbour.std() > 0.02
    assert np.abs(chest_hand.query - chest_skull.query).mean() > 0.02
    assert chest_hand.query.min() >= 0 and chest_hand.query.max() <= 1 + 1e-6


def test_randomised_weights_give_other_maps(trained, randomised, images):
    pair = prepared(images, "chest"), prepared(images, "hand")
    assert np.abs(trained.agreement(*pair).query - randomised.agreement(*pair).query).mean() > 0.05


def test_an_image_agrees_fully_with_itself_wherever_it_has_content(trained, images):
    hand = images["hand"]
    same = trained.agreement(prepared(images, "hand"), prepared(images, "hand"))
    assert same.score == pytest.approx(1.0, abs=1e-5)
    size = thumbnail_size(hand.shape[1], hand.shape[0])
    frame = in_image_frame(same.query, hand.shape[1], hand.shape[0], "constant", size)
    content = cv2.resize(hand, size, interpolation=cv2.INTER_AREA) > 0
    assert frame[content].min() > 0.99


def test_the_overlay_has_the_thumbnails_size_and_aspect(trained, images):
    skull = images["skull"]
    agreement = trained.agreement(prepared(images, "skull"), prepared(images, "chest"))
    size = thumbnail_size(skull.shape[1], skull.shape[0])
    png = overlay_png(in_image_frame(agreement.query, skull.shape[1], skull.shape[0], "constant", size))
    overlay = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert overlay is not None and overlay.shape == (size[1], size[0], 4)
    assert overlay[..., 3].max() > overlay[..., 3].min()  # some of it shown, some of it not


def test_the_padding_is_cut_off_so_the_map_lines_up_with_the_image():
    """A 200 x 100 image is padded with 50 rows above and below: content rows 4..11 of a 16-cell grid."""
    grid = np.zeros((16, 16), np.float32)
    grid[4:12] = 1
    frame = in_image_frame(grid, 200, 100, "constant", (200, 100))
    assert frame.shape == (100, 200)
    assert frame[10:90].min() == pytest.approx(1.0) and frame.mean() > 0.9
    assert in_image_frame(grid, 200, 100, "none", (200, 100)).mean() == pytest.approx(0.5, abs=0.05)


def test_any_trunk_gives_maps_of_its_last_spatial_stage_and_wrong_inputs_are_refused():
    torch.manual_seed(0)
    small = Explainer(create_model("chest-cnn-chowdhury", {"anatomy": 3}))
    assert small.stages == ("conv3",)
    rng = np.random.default_rng(0)
    inputs = [preset("constant-plain", size=64)(phantom(kind, rng, 100)) for kind in ("chest", "hand")]
    assert small.agreement(*inputs).query.shape == (6, 6)
    with pytest.raises(ExplainError, match="the neighbour must be a prepared 64 x 64 x 3 model input"):
        small.agreement(inputs[0], np.zeros((32, 32, 3), np.uint8))
