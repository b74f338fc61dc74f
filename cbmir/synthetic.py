"""A small synthetic archive in the IRMA layout, so the whole flow can be seen and tested on a machine without
real radiographs. The images are drawn phantoms (bright "bone" shapes on darker "soft tissue"), NOT medical
images, and every archive says so in a SYNTHETIC.txt beside the images."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

# Three real IRMA codes, one per phantom kind: chest PA, hand, skull.
PHANTOM_CODES = {
    "chest": "1123-127-500-000",
    "hand": "1121-110-411-700",
    "skull": "1121-120-200-700",
}

_NOTICE = """SYNTHETIC DATA - NOT MEDICAL IMAGES.
Drawn phantoms made by `cbmir synthetic` (seed {seed}) to demonstrate and test cbmir.
Layout: images/<id>.png and codes.csv (image_id;irma_code), as in the ImageCLEF/IRMA distribution.
"""


def _chest(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    image = np.full((height, width), 60, np.float32)
    cv2.ellipse(image, (width // 2, height // 2), (int(width * 0.45), int(height * 0.47)), 0, 0, 360, 150, -1)
    for side in (-1, 1):
        centre = (width // 2 + side * int(width * rng.uniform(0.18, 0.22)), int(height * 0.48))
        axes = (int(width * rng.uniform(0.13, 0.16)), int(height * rng.uniform(0.3, 0.36)))
        cv2.ellipse(image, centre, axes, 0, 0, 360, 45, -1)
    cv2.rectangle(image, (width // 2 - width // 40, 0), (width // 2 + width // 40, height), 220, -1)
    return image


def _hand(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    image = np.full((height, width), 30, np.float32)
    palm = (width // 2, int(height * 0.72))
    cv2.ellipse(image, palm, (int(width * 0.28), int(height * 0.2)), 0, 0, 360, 110, -1)
    for finger in range(5):
        angle = np.deg2rad(-60 + finger * 30 + rng.uniform(-5, 5))
        length = height * rng.uniform(0.3, 0.4)
        tip = (int(palm[0] + np.sin(angle) * length * 1.2), int(palm[1] - np.cos(angle) * length * 1.4))
        cv2.line(image, palm, tip, 210, max(3, width // 30))
    return image


def _skull(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    image = np.full((height, width), 25, np.float32)
    centre = (width // 2, height // 2)
    axes = (int(width * rng.uniform(0.36, 0.42)), int(height * rng.uniform(0.4, 0.46)))
    cv2.ellipse(image, centre, axes, 0, 0, 360, 120, -1)
    cv2.ellipse(image, centre, axes, 0, 0, 360, 230, max(4, width // 25))
    cv2.ellipse(image, (centre[0], int(height * 0.7)), (axes[0] // 2, axes[1] // 4), 0, 0, 180, 200, -1)
    return image


_DRAW = {"chest": _chest, "hand": _hand, "skull": _skull}
KINDS = tuple(_DRAW)


def phantom(kind: str, rng: np.random.Generator, longest_side: int = 256) -> np.ndarray:
    """One uint8 phantom of the given kind, with a random aspect ratio, blur and noise."""
    short_side = int(longest_side * rng.uniform(0.7, 1.0))
    height, width = (longest_side, short_side) if rng.random() < 0.5 else (short_side, longest_side)
    image = _DRAW[kind](rng, height, width)
    image = cv2.GaussianBlur(image, (0, 0), sigmaX=longest_side / 150)
    image += rng.normal(0, 6, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_synthetic_archive(folder: Path, per_kind: int = 8, longest_side: int = 256, seed: int = 0) -> Path:
    """Write `per_kind` phantoms of each kind as images/<id>.png plus codes.csv; returns the folder."""
    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = ["image_id;irma_code"]
    for number in range(per_kind * len(_DRAW)):
        kind = KINDS[number % len(KINDS)]
        image_id = f"synthetic-{kind}-{number:04d}"
        cv2.imwrite(str(images / f"{image_id}.png"), phantom(kind, rng, longest_side))
        rows.append(f"{image_id};{PHANTOM_CODES[kind]}")
    (folder / "codes.csv").write_text("\n".join(rows) + "\n")
    (folder / "SYNTHETIC.txt").write_text(_NOTICE.format(seed=seed))
    return folder
