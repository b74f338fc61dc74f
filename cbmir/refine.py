"""Refining a search, the two tools radiologists asked for (issue 16), as pure numpy.

By region: the query is a rectangle of the query image (`Region`, in the pixels of the image as read, x and y
its top-left corner), cropped from the original pixels before the checkpoint's own preprocessing, so the
model sees the crop as it would see a whole radiograph. A region fits its image (it lies inside it) and is at
least `MIN_REGION_SIDE` pixels a side; anything else is a `RefinementError` naming the region, its value and
the image's size.

By example: the user marks images of an answer as relevant (positive) or not (negative), and the query
vector moves towards the first and away from the second by one Rocchio step on unit vectors,

    normalise(alpha * q + beta * mean(positives) - gamma * mean(negatives)),

a missing mean counting as zero. With nothing marked the query is unchanged. The marked images are the
user's own and are left out of the refined answer unless asked for (`Feedback.include_marked`); an image
marked both ways is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from cbmir.errors import CbmirError

# The smallest region side: the preprocessing scales a crop up to the model's input (512 px for the default),
# and a crop below this would reach the model as a few interpolated blocks.
MIN_REGION_SIDE = 16
_REGION_TEXT = re.compile(r"^\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*$")


class RefinementError(CbmirError):
    """A region or marked images that cannot refine a search; the message names the field and the value."""


@dataclass(frozen=True)
class Region:
    """A rectangle of an image: top-left corner (x, y), width and height, in pixels. Made from any four
    integers; `fit` checks it against its image."""

    x: int
    y: int
    width: int
    height: int

    @classmethod
    def parse(cls, text: str) -> Region:
        """A region written as "x,y,width,height" (integers)."""
        match = _REGION_TEXT.match(text)
        if match is None:
            raise RefinementError(f"region {text!r}: expected x,y,width,height (four integers, in pixels)")
        return cls(*(int(value) for value in match.groups()))

    def __str__(self) -> str:
        return f"{self.x},{self.y},{self.width},{self.height}"

    def fit(self, width: int, height: int) -> Region:
        """This region, when it is a region of a `width` x `height` image: inside it, with sides of at
        least `MIN_REGION_SIDE` pixels."""
        if self.width < MIN_REGION_SIDE or self.height < MIN_REGION_SIDE:
            problem = f"its sides must be at least {MIN_REGION_SIDE} pixels"
        elif self.x < 0 or self.y < 0 or self.x + self.width > width or self.y + self.height > height:
            problem = "it must lie inside the image"
        else:
            return self
        raise RefinementError(
            f"region {self} (x,y,width,height): {problem}; the image is {width} x {height} pixels (width x height)"
        )

    def crop(self, pixels: np.ndarray) -> np.ndarray:
        """The region's pixels of a 2-D image it fits (checked here)."""
        self.fit(int(pixels.shape[1]), int(pixels.shape[0]))
        return pixels[self.y : self.y + self.height, self.x : self.x + self.width]


@dataclass(frozen=True)
class Rocchio:
    """The weights of one Rocchio step: of the query (alpha), of the positives' mean (beta), of the
    negatives' mean (gamma)."""

    alpha: float = 1.0
    beta: float = 0.75
    gamma: float = 0.25

    def __call__(self, query: np.ndarray, positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
        """The refined unit query (float32, d) from a query vector (d) and the unit embeddings of the
        positive and negative images (n x d each, n may be 0). Each input is normalised first."""
        moved = self.alpha * _unit(np.asarray(query, np.float64).reshape(-1))
        for weight, vectors in ((self.beta, positives), (-self.gamma, negatives)):
            if len(vectors):
                moved = moved + weight * _unit(np.asarray(vectors, np.float64)).mean(axis=0)
        norm = np.linalg.norm(moved)
        if not np.isfinite(norm) or norm == 0:
            raise RefinementError("negative: the images marked negative cancel the query out; mark fewer")
        return (moved / norm).astype(np.float32)


@dataclass(frozen=True)
class Feedback:
    """Images a user marked in an answer, by id, and how to use them: the Rocchio weights, and whether the
    marked images may come back (`include_marked`; by default they do not)."""

    positive: tuple[int, ...] = ()
    negative: tuple[int, ...] = ()
    include_marked: bool = False
    rocchio: Rocchio = Rocchio()

    def __post_init__(self) -> None:
        # each image counts once in its mean, in the order first given
        object.__setattr__(self, "positive", tuple(dict.fromkeys(int(i) for i in self.positive)))
        object.__setattr__(self, "negative", tuple(dict.fromkeys(int(i) for i in self.negative)))
        both = sorted(set(self.positive) & set(self.negative))
        if both:
            listed = ", ".join(map(str, both[:10]))
            raise RefinementError(f"positive and negative: image {listed} is marked both relevant and not")

    @property
    def marked(self) -> frozenset[int]:
        return frozenset(self.positive) | frozenset(self.negative)

    @property
    def excluded(self) -> frozenset[int]:
        """The images left out of the refined answer."""
        return frozenset() if self.include_marked else self.marked


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)
