"""The frozen part of the trunk, run once over every cached view before training (`cbmir.train.loop`): in ONNX
Runtime when it can, else in torch.

This pass is the largest part of a default training run, and on 2 cores ONNX Runtime runs the frozen stages
of the default trunk about twice as fast as torch eager, and keeps most of its speed while another process holds
a core (torch's thread pool does not). The graph is exported for the run (into memory, never saved) and is
only a faster way to the same numbers: it is used only when, on the first batch, its outputs differ from
torch's by at most `TOLERANCE` (relative to the largest value); a model the exporter cannot handle, or a
graph that does not match, leaves the pass in torch, with a note. Below `MIN_ONNX_VIEWS` views the export
(10-15 s on this machine) would cost more than it saves, and the pass stays in torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cbmir.export import export_module
from cbmir.graph import INPUT_NAME, GraphError, session_options
from cbmir.models import RadiographNet

TOLERANCE = 1e-4
MIN_ONNX_VIEWS = 512


class FrozenPart(nn.Module):
    """uint8 N x H x W x 3 prepared images -> what the frozen trunk gives: the trunk features (`stage` None),
    or the activation entering trunk stage `stage` and the pooled descriptors before it."""

    def __init__(self, model: RadiographNet, stage: int | None):
        super().__init__()
        self.model, self.stage = model, stage

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = images.permute(0, 3, 1, 2).float()
        if self.stage is None:
            return (self.model.trunk_features(x),)
        return self.model.trunk_start(x, self.stage)


class FrozenPass:
    """`FrozenPart` over chunks of at most `batch` images, in ONNX Runtime once its graph matched torch on the
    first chunk (see the module's docstring)."""

    def __init__(self, model: RadiographNet, stage: int | None, device: torch.device, views: int, batch: int):
        self.part = FrozenPart(model, stage).eval()
        self.device, self.batch = device, batch
        self.try_onnx = device.type == "cpu" and views >= MIN_ONNX_VIEWS
        self.session: Any = None  # an onnxruntime.InferenceSession of the part, once it matched torch

    @property
    def runtime(self) -> str:
        return "ONNX Runtime" if self.session is not None else "torch"

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        if self.session is not None:
            return _run(self.session, images, self.batch)
        expected = self._torch(images)
        if self.try_onnx:
            self.try_onnx = False
            self.session = self._checked_session(images, expected)
        return expected

    @torch.inference_mode()
    def _torch(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        outputs = self.part(torch.from_numpy(np.array(images, dtype=np.uint8)).to(self.device))  # a writable copy
        return tuple(output.float().cpu().numpy() for output in outputs)

    def _checked_session(self, images: np.ndarray, expected: tuple[np.ndarray, ...]) -> Any:
        """A session of the part's graph that gives `expected` for `images`, else None (with a note)."""
        try:
            import onnxruntime
        except ImportError:
            return None
        names = [f"output_{index}" for index in range(len(expected))]
        try:
            example = torch.from_numpy(_padded(images, self.batch))
            graph = export_module(self.part, example, names, dynamic_batch=False)
        except GraphError as error:
            tqdm.write(f"note: the frozen trunk runs in torch: {error}")
            return None
        options = session_options(torch.get_num_threads())
        session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        for ours, theirs in zip(_run(session, images, self.batch), expected, strict=True):
            difference, scale = np.abs(ours - theirs).max(initial=0.0), np.abs(theirs).max(initial=1.0)
            if difference > TOLERANCE * scale:
                tqdm.write("note: the frozen trunk runs in torch: its ONNX graph does not match torch")
                return None
        return session


def _padded(images: np.ndarray, batch: int) -> np.ndarray:
    """`images` filled up to `batch` with copies of the last (the graph's batch is fixed)."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    return np.concatenate([images, np.repeat(images[-1:], batch - len(images), axis=0)])


def _run(session: Any, images: np.ndarray, batch: int) -> tuple[np.ndarray, ...]:
    outputs = session.run(None, {INPUT_NAME: _padded(images, batch)})
    return tuple(output[: len(images)] for output in outputs)
