"""Torch's side of inference: model inputs as tensors, the device, and the torch runtime of `cbmir.embed`
(which imports this module only when a model runs in torch)."""

from __future__ import annotations

import numpy as np
import torch

from cbmir.checkpoint import Checkpoint


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def images_to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 N x H x W x 3 preprocessed images to a float N x 3 x H x W tensor (0..255) in channels_last."""
    tensor = torch.from_numpy(np.array(images, dtype=np.uint8)).to(device).permute(0, 3, 1, 2).float()
    return tensor.contiguous(memory_format=torch.channels_last)


class TorchRunner:
    """The checkpoint's model in torch (inference mode, channels_last; the GPU when torch sees one):
    prepared inputs -> unit embeddings and logits per head, as numpy arrays."""

    name = "torch"

    def __init__(self, checkpoint: Checkpoint):
        self.device = default_device()
        self.model = checkpoint.model.eval().to(self.device).to(memory_format=torch.channels_last)
        self.description = f"torch {torch.__version__} on {self.device.type}, {torch.get_num_threads()} thread(s)"

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        output = self.model(images_to_tensor(images, self.device))
        vectors = output.embedding.float().cpu().numpy()
        return vectors, {head: values.float().cpu().numpy() for head, values in output.logits.items()}
