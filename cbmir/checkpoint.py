"""A checkpoint is one folder: `model.pt` (the weights) and `card.json` (the model card: architecture, label
schema, preprocessing pipeline, training data fingerprint, hyper-parameters, metrics, library versions).
Loading needs nothing else: no packaged pretrained weights, no dataset, no configuration. Loading reads and
checks the card; the weights are read into the model when it is first asked for (`Checkpoint.model`), so a
program that needs only the card, its preprocessing or the ONNX graph never loads torch (3 s of start-up).

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
import threading
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cbmir.errors import CbmirError
from cbmir.files import write_atomically, write_atomically_with
from cbmir.imaging.preprocess import Preprocessing
from cbmir.labels import LabelSchema

if TYPE_CHECKING:  # torch is imported when the model is built, not to read a card
    from cbmir.models import RadiographNet

CARD_FILE, WEIGHTS_FILE = "card.json", "model.pt"
CARD_VERSION = 1
_VERSIONED = ("cbmir", "torch", "torchvision", "timm", "numpy", "opencv-python-headless", "pydicom", "scikit-learn")


class CheckpointError(CbmirError):
    """A checkpoint folder that is missing, incomplete or does not fit its own card."""


class Checkpoint:
    """A model card and its model: given (a model in memory), or built from the weights in `path` on first
    use."""

    def __init__(self, model: RadiographNet | None, card: dict[str, Any], path: Path | None = None):
        if model is None and path is None:
            raise ValueError("a checkpoint without a model needs the folder of its weights")
        self._model, self.card, self.path = model, card, path
        self._loading = threading.Lock()

    @property
    def model(self) -> RadiographNet:
        """The model, its weights read from the folder the first time it is asked for (a `CheckpointError`
        names the file when they do not load)."""
        with self._loading:
            if self._model is None:
                assert self.path is not None
                self._model = _built_model(self.card, self.path / WEIGHTS_FILE)
            return self._model

    @property
    def embedding_dim(self) -> int:
        return int(self.card["embedding_dim"])

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


def _save_weights(model: RadiographNet, file: Any) -> None:
    import torch

    torch.save(model.state_dict(), file)


def save_checkpoint(folder: Path, model: RadiographNet, card: dict[str, Any]) -> Path:
    """Write the checkpoint into `folder` so that a crash never leaves weights without their card (see the
    module docstring). Other files in `folder` (plots, reports) stay."""
    folder = Path(folder)
    card_text = json.dumps(card, indent=2, sort_keys=True) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=folder))
    try:
        write_atomically_with(staging / WEIGHTS_FILE, lambda file: _save_weights(model, file))
        write_atomically(staging / CARD_FILE, card_text.encode())
        (folder / WEIGHTS_FILE).unlink(missing_ok=True)
        os.replace(staging / CARD_FILE, folder / CARD_FILE)
        os.replace(staging / WEIGHTS_FILE, folder / WEIGHTS_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """The checkpoint in `folder`, its card read and checked (a `CheckpointError` names what is wrong); the
    weights are read when the model is first asked for."""
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
    heads = card["architecture"].get("heads")
    if heads != schema.head_sizes:
        raise CheckpointError(f"{card_path}: the model's heads {heads} do not match its label schema")
    if not isinstance(card.get("embedding_dim"), int):
        raise CheckpointError(f"{card_path}: embedding_dim is missing or not an integer")
    return Checkpoint(None, card, folder)


def _built_model(card: dict[str, Any], weights_path: Path) -> RadiographNet:
    """The card's architecture with the weights in `weights_path`, in eval mode."""
    import torch

    from cbmir.models import create_model

    architecture = dict(card["architecture"])
    name, heads = architecture.pop("name"), architecture.pop("heads")
    model = create_model(name, heads, pretrained=False, **architecture)
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        raise CheckpointError(
            f"{weights_path}: weights do not load into {name} ({str(error).splitlines()[0]})"
        ) from None
    model.eval()
    return model
