"""Random augmentation of preprocessed radiographs for training: small geometric and contrast changes that
keep an image a plausible radiograph of the same class. No flips: left and right are not interchangeable in
a radiograph. The result depends only on the image, the generator's state and the settings."""

from __future__ import annotations

import cv2
import numpy as np


def augment(image: np.ndarray, rng: np.random.Generator, rotation: float) -> np.ndarray:
    """A random rotation of up to `rotation` degrees, +-8% scale, +-4% shift and a contrast and brightness
    change of a square uint8 H x W x 3 image, drawn from `rng`."""
    side = image.shape[0]
    angle = rng.uniform(-rotation, rotation)
    scale = rng.uniform(0.92, 1.08)
    matrix = cv2.getRotationMatrix2D((side / 2, side / 2), angle, scale)
    matrix[:, 2] += rng.uniform(-0.04, 0.04, size=2) * side
    warped = cv2.warpAffine(image, matrix, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    gain, offset = rng.uniform(0.9, 1.1), rng.uniform(-12, 12)
    return np.clip(warped.astype(np.float32) * gain + offset, 0, 255).astype(np.uint8)
