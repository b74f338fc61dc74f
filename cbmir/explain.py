"""Why two radiographs match: for a pair of model inputs, where each one agrees with the other.

Method (feature agreement, no gradients, no training): the trunk's spatial feature maps of both images are
taken from the stages the model's pooling summarises (for `RegionalPooling`, the default trunk, the last
four EfficientNet-Lite stages, 14 x 14 and 7 x 7 cells at 224 px; for any other trunk its last stage with a
spatial output). Each cell's feature vector (all channels at one position) is scaled to unit length, and a
cell of image A gets the cosine similarity of its best-matching cell anywhere in image B: "B has something
that looks like this". Each stage's map is resized to the finest stage's grid and the stages are averaged
(each stage weighs the same, as in the regional descriptor). B's map is the same against A. The pair's
`score` is the cosine similarity of the two embeddings (the search score), from the same model run.

What it means: a bright region of the query has a counterpart in the neighbour at the scales the search
descriptor looks at, a transparent one has none. It explains the trunk's evidence, not the embedding layer's
weighting of it; with the default heads-only training the trunk is the ImageNet one, so the maps show shared
visual structure (bone outlines, soft-tissue edges, collimation), not diagnosis.

Invariants:
- agreement values are cosines of features after ReLU-type activations, so they lie in [0, 1] for the
  EfficientNet-Lite trunks (in [-1, 1] for any trunk); an image paired with itself has agreement 1 in every
  cell, and the maps do not depend on the order of the pair (A's map with B is A's map whichever is query);
- `in_image_frame` undoes the preprocessing's square padding (the padded square maps back to the image's own
  width x height frame, the padding cut off), so a map lines up with the image and its thumbnail;
- `overlay_png` uses one fixed scale for every pair (transparent at or below `LOW_AGREEMENT`, most opaque at
  full agreement), so overlays of different pairs compare;
- nothing is downloaded: the model comes from a checkpoint (or is given).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cbmir.checkpoint import load_checkpoint
from cbmir.errors import CbmirError
from cbmir.imaging.preprocess import Padding
from cbmir.models.architectures import RegionalPooling
from cbmir.models.inference import images_to_tensor
from cbmir.models.net import RadiographNet
from cbmir.stamp import ModelStamp

LOW_AGREEMENT = 0.5  # at or below: transparent (unrelated radiographs' cells mostly lie below it)
MAX_ALPHA = 190  # of 255 at full agreement: the radiograph stays visible under the colour
LEVELS = 32


class ExplainError(CbmirError):
    """Inputs that are not a pair of this model's inputs, or a model whose trunk has no spatial features."""


@dataclass(frozen=True)
class Agreement:
    """Agreement maps of a pair over the model-input square (grid x grid, the finest stage's cells) and the
    pair's embedding similarity."""

    query: np.ndarray  # float32 grid x grid
    neighbour: np.ndarray  # float32 grid x grid
    score: float


def spatial_stages(model: RadiographNet) -> tuple[str, ...]:
    """The trunk submodules whose outputs are the spatial maps the trunk's pooling summarises: the stages a
    `RegionalPooling` pools, else the last trunk block whose output is N x C x H x W (found by one run on a
    blank input)."""
    if isinstance(model.trunk, RegionalPooling):
        return model.trunk.pooled_stages
    last_names = [block[-1] for block in model.trunk_blocks]
    shapes = _outputs(model, last_names, torch.zeros(1, 3, model.input_size, model.input_size))
    spatial = [name for name in last_names if shapes[name].dim() == 4 and shapes[name].shape[-1] > 1]
    if not spatial:
        raise ExplainError("this model's trunk has no stage with a spatial output, so it cannot show agreement")
    return (spatial[-1],)


def _outputs(model: RadiographNet, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The outputs of the trunk submodules `names` when the model embeds `x`, and the embeddings (key "")."""
    caught: dict[str, torch.Tensor] = {}

    def catch(name: str):
        def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
            caught[name] = output

        return hook

    handles = [model.trunk.get_submodule(name).register_forward_hook(catch(name)) for name in names]
    try:
        caught[""] = model.embed(x)
    finally:
        for handle in handles:
            handle.remove()
    return caught


def _best_match(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For C x H x W feature maps of A and B: each A cell's cosine with its best-matching B cell (H x W), and
    each B cell's with its best A cell."""
    cells_a, cells_b = F.normalize(a.flatten(1), dim=0), F.normalize(b.flatten(1), dim=0)
    similarity = cells_a.T @ cells_b
    return similarity.max(dim=1).values.reshape(a.shape[1:]), similarity.max(dim=0).values.reshape(b.shape[1:])


class ModelChangedError(CbmirError):
    """The checkpoint folder holds another model than the one the vectors were made with."""


class Explainer:
    """Agreement maps of a model (see the module docstring). Thread-safe: one model run at a time (the
    trunk's outputs are caught with hooks, which concurrent runs would mix)."""

    def __init__(self, model: RadiographNet):
        self.model = model.eval()
        self.stages = spatial_stages(model)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folder: Path, stamp: ModelStamp) -> Explainer:
        """The explainer of the checkpoint in `folder`, which must still hold the model of `stamp` (the one
        the vectors were made with); another is a `ModelChangedError`."""
        checkpoint = load_checkpoint(folder)
        if ModelStamp(checkpoint.stamp, checkpoint.model.embedding_dim).digest != stamp.digest:
            raise ModelChangedError(
                f"{folder} holds another model than the one this server searches with: restart the server to "
                "explain with it"
            )
        return cls(checkpoint.model)

    @torch.inference_mode()
    def agreement(self, query: np.ndarray, neighbour: np.ndarray) -> Agreement:
        """The agreement maps of two model inputs (uint8 size x size x 3, as `Embedder.prepare` makes them)."""
        size = self.model.input_size
        for name, image in (("query", query), ("neighbour", neighbour)):
            if not (isinstance(image, np.ndarray) and image.shape == (size, size, 3)):
                got = image.shape if isinstance(image, np.ndarray) else type(image).__name__
                raise ExplainError(f"the {name} must be a prepared {size} x {size} x 3 model input, got {got}")
        x = images_to_tensor(np.stack([query, neighbour]), torch.device("cpu"))
        with self._lock:
            caught = _outputs(self.model, list(self.stages), x)
        maps = [_best_match(caught[name][0].float(), caught[name][1].float()) for name in self.stages]
        grid = max(pair[0].shape[-1] for pair in maps)

        def joined(side: int) -> np.ndarray:
            resized = [F.interpolate(pair[side][None, None], size=(grid, grid), mode="bilinear") for pair in maps]
            return torch.cat(resized).mean(dim=0)[0].numpy().astype(np.float32)

        score = float((caught[""][0] * caught[""][1]).sum())
        return Agreement(query=joined(0), neighbour=joined(1), score=score)


def in_image_frame(grid: np.ndarray, width: int, height: int, padding: Padding, size: tuple[int, int]) -> np.ndarray:
    """A map over the model-input square as a `size` (width, height) map over the image's own frame: the
    square padding the preprocessing added (for `constant` and `wrap`, centred, the odd pixel at the end) is
    cut off, so the map lines up with a `width` x `height` image scaled to `size`."""
    square = 4 * grid.shape[0]  # fine enough to cut the padding within a quarter of a cell
    upsampled = cv2.resize(grid, (square, square), interpolation=cv2.INTER_LINEAR)
    if padding != "none":
        side = max(width, height)
        top, left = (side - height) // 2, (side - width) // 2
        rows = slice(int(top * square / side), max(int(top * square / side) + 1, round((top + height) * square / side)))
        columns = slice(
            int(left * square / side), max(int(left * square / side) + 1, round((left + width) * square / side))
        )
        upsampled = upsampled[rows, columns]
    return cv2.resize(upsampled, size, interpolation=cv2.INTER_LINEAR)


def overlay_png(agreement: np.ndarray) -> bytes:
    """An agreement map (values as cosines) as an RGBA PNG of its size: a colour map (inferno: dark purple
    to yellow) whose opacity grows from none at `LOW_AGREEMENT` to `MAX_ALPHA` at full agreement, in
    `LEVELS` steps (finer steps are not seen on a thumbnail, and the steps keep the PNG small)."""
    level = np.round(np.clip((agreement - LOW_AGREEMENT) / (1 - LOW_AGREEMENT), 0, 1) * LEVELS) / LEVELS
    colours = cv2.applyColorMap(np.rint(level * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
    alpha = np.rint(level * MAX_ALPHA).astype(np.uint8)
    return cv2.imencode(".png", np.dstack([colours, alpha]))[1].tobytes()  # OpenCV writes BGRA as RGBA PNG
