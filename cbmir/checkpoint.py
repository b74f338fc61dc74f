"""A checkpoint is one folder: `model.pt` (the weights) and `card.json` (the model card: architecture, label
schema, preprocessing pipeline, training data fingerprint, hyper-parameters, metrics, library versions).
Loading needs nothing else: no packaged pretrained weights, no dataset, no configuration.

Saving never leaves weights without their own card, even after a crash: both files are
written in full and fsynced in a staging folder first, then the old weights are removed, the card is moved
in, and the weights last. An interrupted save leaves the old checkpoint, or a card without weights (which
`load_checkpoint` refuses by name), or the new checkpoint."""

from __future__ import annotations

import json
import os
import pickle
import platform
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from cbmir.errors import CbmirError
from cbmir.files import write_atomically, write_atomically_with
from cbmir.imaging.preprocess import Preprocessing
from cbmir.labels import LabelSchema
from cbmir.models import RadiographNet, create_model

CARD_FILE, WEIGHTS_FILE = "card.json", "model.pt"
CARD_VERSION = 1
_VERSIONED = ("cbmir", "torch", "torchvision", "timm", "numpy", "opencv-python-headless", "pydicom", "scikit-learn")


class CheckpointError(CbmirError):
    """A checkpoint folder that is missing, incomplete or does not fit its own card."""


@dataclass
class Checkpoint:
    model: RadiographNet
    card: dict[str, Any]
    path: Path | None = None

    @property
    def schema(self) -> LabelSchema:
        return LabelSchema.from_dict(self.card["labels"])

    @property
    def pipeline(self) -> Preprocessing:
        return Preprocessing.from_dict(self.card["preprocessing"])

    @property
    def irma_threshold(self) -> float:
        return float(self.card.get("irma_threshold", 0.0))

    @property
    def stamp(self) -> dict[str, Any]:
        """What an index records to refuse queries by another model: architecture, schema, preprocessing and
        the weights' identity (the card's creation time)."""
        return {key: self.card[key] for key in ("architecture", "labels", "preprocessing", "created")}


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def new_card(model: RadiographNet, schema: LabelSchema, pipeline: Preprocessing, **sections: Any) -> dict[str, Any]:
    """A model card for `model`; `sections` adds training, metrics, irma_threshold and the like."""
    return {
        "card_version": CARD_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "architecture": dict(model.config),
        "embedding_dim": model.embedding_dim,
        "labels": schema.to_dict(),
        "preprocessing": pipeline.to_dict(),
        "versions": library_versions(),
        **sections,
    }


def save_checkpoint(folder: Path, model: RadiographNet, card: dict[str, Any]) -> Path:
    """Write the checkpoint into `folder` so that a crash never leaves weights without their card (see the
    module docstring). Other files in `folder` (plots, reports) stay."""
    folder = Path(folder)
    card_text = json.dumps(card, indent=2, sort_keys=True) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=folder))
    try:
        write_atomically_with(staging / WEIGHTS_FILE, lambda file: torch.save(model.state_dict(), file))
        write_atomically(staging / CARD_FILE, card_text.encode())
        (folder / WEIGHTS_FILE).unlink(missing_ok=True)
        os.replace(staging / CARD_FILE, folder / CARD_FILE)
        os.replace(staging / WEIGHTS_FILE, folder / WEIGHTS_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    folder = Path(folder)
    card_path, weights_path = folder / CARD_FILE, folder / WEIGHTS_FILE
    for path in (card_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{folder} is not a cbmir checkpoint: {path.name} is missing")
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{card_path}: not valid JSON ({error})") from None
    if card.get("card_version") != CARD_VERSION:
        raise CheckpointError(f"{card_path}: card version {card.get('card_version')!r}, expected {CARD_VERSION}")
    schema = LabelSchema.from_dict(card["labels"])
    Preprocessing.from_dict(card["preprocessing"])
    architecture = dict(card["architecture"])
    name, heads = architecture.pop("name"), architecture.pop("heads")
    if heads != schema.head_sizes:
        raise CheckpointError(f"{card_path}: the model's heads {heads} do not match its label schema")
    model = create_model(name, heads, pretrained=False, **architecture)
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        raise CheckpointError(
            f"{weights_path}: weights do not load into {name} ({str(error).splitlines()[0]})"
        ) from None
    model.eval()
    return Checkpoint(model, card, folder)
