"""Images to embeddings and predictions through a checkpoint's own model and preprocessing.

`Embedder` is the only code that runs a model for inference: the indexer, the search use case
(`cbmir.search`), the service, the CLI, evaluation and the benchmarks all call `Embedder.embed_inputs`.
It owns the model lock, so concurrent callers take turns for the model (each run already uses every
core) and nothing else waits on it; it is also where the inference runtime is chosen. Below it, the index
knows vectors and a `ModelStamp`, never a model.

CPU inference: inference mode and channels_last memory layout; the GPU is used when torch sees one.
The thread count is a process-wide setting, made by the program (see `set_threads`), never here.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from cbmir.checkpoint import Checkpoint, load_checkpoint
from cbmir.imaging.preprocess import Preprocessing
from cbmir.labels import LabelSchema, Prediction, decode_predictions, probabilities_from_logits
from cbmir.stamp import ModelStamp

T = TypeVar("T")


@dataclass
class Embeddings:
    """The model's answer for N images: search vectors, probabilities per head, and decoded predictions."""

    vectors: np.ndarray  # N x d float32, unit L2 norm
    probabilities: dict[str, np.ndarray]  # head -> N x n_classes
    predictions: list[Prediction]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(threads: int | None) -> None:
    """Set torch's process-wide thread count (None: every core). Programs call this once, at start-up."""
    torch.set_num_threads(threads or os.cpu_count() or 1)


def images_to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 N x H x W x 3 preprocessed images to a float N x 3 x H x W tensor (0..255) in channels_last."""
    tensor = torch.from_numpy(np.array(images, dtype=np.uint8)).to(device).permute(0, 3, 1, 2).float()
    return tensor.contiguous(memory_format=torch.channels_last)


def batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of `size` consecutive items (the last one shorter)."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class Embedder:
    """Turns radiographs into search vectors and predictions with a checkpoint's model and its recorded
    preprocessing. Safe to share between threads."""

    def __init__(self, checkpoint: Checkpoint, *, batch_size: int = 32):
        self.schema: LabelSchema = checkpoint.schema
        self.pipeline: Preprocessing = checkpoint.pipeline
        self.irma_threshold = checkpoint.irma_threshold
        self.batch_size = batch_size
        self.device = default_device()
        model = checkpoint.model.eval().to(self.device)
        self._model = model.to(memory_format=torch.channels_last)
        self.stamp = ModelStamp(checkpoint.stamp, self._model.embedding_dim)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, batch_size: int = 32) -> Embedder:
        """The embedder of the checkpoint in `folder` (a `CheckpointError` names what is wrong with it)."""
        return cls(load_checkpoint(Path(folder)), batch_size=batch_size)

    @property
    def dimension(self) -> int:
        return self.stamp.dimension

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """A grey radiograph (2-D array, as `cbmir.imaging.io.read_image` gives) as this model's input."""
        return self.pipeline(pixels)

    def embed(self, pixels: Iterable[np.ndarray]) -> Embeddings:
        """Embed grey radiographs: `prepare` each, then `embed_inputs`."""
        return self.embed_inputs(self.prepare(image) for image in pixels)

    @torch.inference_mode()
    def embed_inputs(self, inputs: Iterable[np.ndarray] | np.ndarray) -> Embeddings:
        """Embed prepared model inputs (uint8 H x W x 3, as `prepare` makes them), in batches of
        `batch_size`; the lock is held for one batch at a time."""
        vectors: list[np.ndarray] = []
        logits: dict[str, list[np.ndarray]] = {head: [] for head in self._model.head_sizes}
        for batch in batches(inputs, self.batch_size):
            tensor = images_to_tensor(np.stack(batch), self.device)
            with self._lock:
                output = self._model(tensor)
                vectors.append(torch.nn.functional.normalize(output.features, dim=1).float().cpu().numpy())
                for head, values in output.logits.items():
                    logits[head].append(values.float().cpu().numpy())
        if not vectors:
            empty = {head: np.zeros((0, size), np.float32) for head, size in self._model.head_sizes.items()}
            return Embeddings(np.zeros((0, self.dimension), np.float32), empty, [])
        joined = {head: np.concatenate(parts) for head, parts in logits.items()}
        probabilities = probabilities_from_logits(self.schema, joined)
        predictions = decode_predictions(self.schema, probabilities, irma_threshold=self.irma_threshold)
        return Embeddings(np.concatenate(vectors), probabilities, predictions)
