"""The refinement domain (`cbmir.refine`): the Rocchio step against a hand computation, regions against their
image, and marked images."""

from __future__ import annotations

import numpy as np
import pytest

from cbmir.refine import Feedback, RefinementError, Region, Rocchio


def test_one_rocchio_step_as_computed_by_hand():
    query = np.array([1.0, 0.0])
    positives = np.array([[0.0, 1.0], [0.6, 0.8]])
    negatives = np.array([[-1.0, 0.0]])
    # 1 * (1, 0) + 0.75 * (0.3, 0.9) - 0.25 * (-1, 0) = (1.475, 0.675); its norm is sqrt(2.63125)
    expected = np.array([1.475, 0.675]) / np.sqrt(2.63125)
    refined = Rocchio()(query, positives, negatives)
    assert refined.dtype == np.float32
    np.testing.assert_allclose(refined, expected, atol=1e-6)
    np.testing.assert_allclose(refined, [0.909308, 0.416124], atol=1e-6)


def test_rocchio_takes_unit_vectors_and_leaves_an_unmarked_query_alone():
    query = np.array([3.0, 4.0])  # normalised first: (0.6, 0.8)
    np.testing.assert_allclose(Rocchio()(query, np.zeros((0, 2)), np.zeros((0, 2))), [0.6, 0.8], atol=1e-6)
    # alpha 2, beta 1, no negatives: 2 * (1, 0) + (0, 1) = (2, 1), over sqrt(5)
    refined = Rocchio(alpha=2.0, beta=1.0, gamma=0.5)(np.array([5.0, 0.0]), np.array([[0.0, 2.0]]), np.zeros((0, 2)))
    np.testing.assert_allclose(refined, np.array([2.0, 1.0]) / np.sqrt(5.0), atol=1e-6)


def test_negatives_that_cancel_the_query_are_refused():
    with pytest.raises(RefinementError, match="negative"):
        Rocchio(alpha=1.0, beta=0.0, gamma=1.0)(np.array([1.0, 0.0]), np.zeros((0, 2)), np.array([[1.0, 0.0]]))


def test_a_region_is_parsed_checked_against_its_image_and_cropped():
    region = Region.parse("10, 20,30,40")
    assert region == Region(10, 20, 30, 40) and str(region) == "10,20,30,40"
    pixels = np.arange(100 * 50).reshape(100, 50)  # 50 wide, 100 high
    np.testing.assert_array_equal(region.crop(pixels), pixels[20:60, 10:40])
    assert Region(34, 84, 16, 16).fit(50, 100) == Region(34, 84, 16, 16)


@pytest.mark.parametrize(
    ("region", "problem"),
    [
        (Region(40, 0, 16, 16), "inside"),  # beyond the right edge
        (Region(0, 90, 16, 16), "inside"),
        (Region(-1, 0, 16, 16), "inside"),
        (Region(0, 0, 0, 20), "at least 16"),
        (Region(0, 0, -20, 20), "at least 16"),
        (Region(0, 0, 15, 20), "at least 16"),
    ],
)
def test_a_region_that_does_not_fit_names_itself_and_the_image_size(region, problem):
    with pytest.raises(RefinementError, match=problem) as refused:
        region.fit(50, 100)
    assert f"region {region}" in str(refused.value) and "50 x 100" in str(refused.value)


@pytest.mark.parametrize("text", ["", "1,2,3", "1,2,3,4,5", "a,b,c,d", "1.5,2,3,4"])
def test_a_malformed_region_is_refused(text):
    with pytest.raises(RefinementError, match="x,y,width,height"):
        Region.parse(text)


def test_feedback_counts_each_image_once_and_refuses_an_image_marked_both_ways():
    feedback = Feedback(positive=(3, 1, 3), negative=(2,))
    assert feedback.positive == (3, 1) and feedback.marked == {1, 2, 3} and feedback.excluded == {1, 2, 3}
    assert Feedback(positive=(1,), include_marked=True).excluded == frozenset()
    with pytest.raises(RefinementError, match="image 2 is marked both"):
        Feedback(positive=(1, 2), negative=(2,))
