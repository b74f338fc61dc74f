"""Images to embeddings and predictions, in batches, through a checkpoint's own preprocessing pipeline.

CPU inference is set up for speed: inference mode, channels_last memory layout, and all cores as torch
threads (unless told otherwise); the GPU is used when torch sees one."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from cbmir.checkpoint import Checkpoint
from cbmir.labels import Prediction, decode_predictions, probabilities_from_logits
from cbmir.models import RadiographNet


@dataclass
class Embeddings:
    vectors: np.ndarray  # N x d float32, unit L2 norm
    probabilities: dict[str, np.ndarray]  # head -> N x n_classes


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def images_to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 N x H x W x 3 preprocessed images to a float N x 3 x H x W tensor (0..255) in channels_last."""
    tensor = torch.from_numpy(np.array(images, dtype=np.uint8)).to(device).permute(0, 3, 1, 2).float()
    return tensor.contiguous(memory_format=torch.channels_last)


def batches(items: Iterable, size: int) -> Iterator[list]:
    """Lists of `size` consecutive items (the last one shorter)."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.inference_mode()
def run_model(
    model: RadiographNet, images: Iterable[np.ndarray], *, batch_size: int = 16, device: torch.device | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Unit-norm embeddings (N x d float32) and raw logits per head for preprocessed uint8 H x W x 3 images."""
    device = device or default_device()
    model.eval().to(device, memory_format=torch.channels_last)
    vectors, logits = [], {head: [] for head in model.head_sizes}
    for batch in batches(images, batch_size):
        output = model(images_to_tensor(np.stack(batch), device))
        vectors.append(torch.nn.functional.normalize(output.features, dim=1).float().cpu().numpy())
        for head, values in output.logits.items():
            logits[head].append(values.float().cpu().numpy())
    if not vectors:
        return np.zeros((0, model.embedding_dim), np.float32), {
            head: np.zeros((0, size), np.float32) for head, size in model.head_sizes.items()
        }
    return np.concatenate(vectors), {head: np.concatenate(parts) for head, parts in logits.items()}


class Embedder:
    """Turns grey radiographs (2-D arrays, as `cbmir.imaging.io.read_image` gives) into search vectors and
    predictions with a checkpoint's model and its recorded preprocessing."""

    def __init__(self, checkpoint: Checkpoint, *, batch_size: int = 16, threads: int | None = None):
        self.checkpoint = checkpoint
        self.schema = checkpoint.schema
        self.pipeline = checkpoint.pipeline
        self.batch_size = batch_size
        self.device = default_device()
        torch.set_num_threads(threads or os.cpu_count() or 1)

    @property
    def dimension(self) -> int:
        return self.checkpoint.model.embedding_dim

    def embed(self, pixels: Iterable[np.ndarray]) -> Embeddings:
        vectors, logits = run_model(
            self.checkpoint.model,
            (self.pipeline(image) for image in pixels),
            batch_size=self.batch_size,
            device=self.device,
        )
        return Embeddings(vectors, probabilities_from_logits(self.schema, logits))

    def predict(self, embeddings: Embeddings, top: int = 3) -> list[Prediction]:
        return decode_predictions(
            self.schema, embeddings.probabilities, irma_threshold=self.checkpoint.irma_threshold, top=top
        )

    def embed_and_predict(self, pixels: Sequence[np.ndarray]) -> tuple[Embeddings, list[Prediction]]:
        embeddings = self.embed(pixels)
        return embeddings, self.predict(embeddings)
