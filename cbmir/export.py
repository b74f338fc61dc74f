"""A checkpoint's model exported as an ONNX graph (`cbmir.graph`), for inference in ONNX Runtime, checked
against torch.

The graph runs all that torch runs, the input conversion included. An export is kept only if, on real inputs run
through both, the embeddings differ from torch's by at most `EMBEDDING_TOLERANCE` and the logits by at most
`LOGIT_TOLERANCE` (absolute, per value). The card's `onnx` section records the graph's and the weights'
sha256, the differences measured, the inputs they were measured on and the library versions;
`cbmir.graph.graph_for` accepts a graph only while both hashes still match, so a graph of other weights, or a
foreign or damaged file, is refused, never used.

Crash safety: the graph is written in full and fsynced before it replaces the old one, and the card is
rewritten (atomically) after it. A crash in between leaves a card whose recorded sha256 does not match the
file, which `graph_for` refuses as stale until the checkpoint is exported again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

import numpy as np
import torch
from torch import nn

from cbmir.checkpoint import CARD_FILE, WEIGHTS_FILE, Checkpoint, CheckpointError
from cbmir.datasets import Record, load_pixels
from cbmir.files import file_digest, write_atomically
from cbmir.graph import EMBEDDING_OUTPUT, GRAPH_FILE, INPUT_NAME, MAX_GRAPH_BATCH, GraphError, head_output
from cbmir.imaging.io import ImageReadError
from cbmir.imaging.preprocess import Preprocessing
from cbmir.models import RadiographNet

# Agreement demanded of ONNX Runtime with torch on the same inputs; float32 kernels that sum in another
# order differ by about 1e-6 on this model, so these leave room for other CPUs without hiding a wrong graph.
EMBEDDING_TOLERANCE = 1e-4
LOGIT_TOLERANCE = 1e-3

# The exporter parses Python source (`ast.parse`). CPython 3.11 keeps the AST constructor's recursion count
# per interpreter, so another thread parsing at the same moment (3.11's traceback formatting does, for its
# ^^^ markers) can make it fail spuriously with this SystemError (python/cpython#106905); trying again is safe.
_AST_RACE = "AST constructor recursion depth mismatch"
_EXPORT_ATTEMPTS = 3


class _GraphModule(nn.Module):
    """What the graph computes: uint8 N x H x W x 3 -> (unit embedding, logits of each head in order)."""

    def __init__(self, model: RadiographNet):
        super().__init__()
        self.model = model
        self.heads = list(model.head_sizes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.model(images.permute(0, 3, 1, 2).float())
        return (output.embedding, *(output.logits[head] for head in self.heads))


@dataclass(frozen=True)
class Agreement:
    """How far ONNX Runtime's outputs are from torch's on the same inputs."""

    embedding: float
    logits: float

    @property
    def within_tolerance(self) -> bool:
        return self.embedding <= EMBEDDING_TOLERANCE and self.logits <= LOGIT_TOLERANCE


def export_graph(checkpoint: Checkpoint, samples: np.ndarray, *, described: str) -> dict[str, Any]:
    """Export `checkpoint`'s model (which must have been saved to its folder) to `model.onnx` there, check it
    against torch on `samples` (prepared inputs, uint8 N x H x W x 3; `described` says what they are, for
    the card) and record the result in the card. Returns the card's new `onnx` section. A graph that does
    not match torch within the tolerances is a `GraphError` and nothing is written."""
    folder = checkpoint.path
    if folder is None or not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError("only a checkpoint saved in a folder can be exported (save it first)")
    if samples.ndim != 4 or samples.dtype != np.uint8 or len(samples) == 0:
        raise GraphError(
            f"export needs prepared sample inputs (uint8 N x H x W x 3), got {samples.dtype} {samples.shape}"
        )
    samples = np.array(samples)  # a writable copy (a memory-mapped cache is read-only, which torch warns of)
    model = checkpoint.model.eval().to("cpu")
    module = _GraphModule(model).eval()
    names = [EMBEDDING_OUTPUT, *(head_output(head) for head in module.heads)]
    try:
        graph = export_module(module, torch.from_numpy(samples[: min(len(samples), 2)]), names)
    except GraphError as error:
        raise GraphError(f"{error}: use --runtime torch") from None
    agreement = compare(graph, module, samples)
    if not agreement.within_tolerance:
        raise GraphError(
            f"the ONNX export of {folder} differs from torch by {agreement.embedding:.2e} (embedding) and "
            f"{agreement.logits:.2e} (logits), beyond the tolerances {EMBEDDING_TOLERANCE:g} / "
            f"{LOGIT_TOLERANCE:g}: use --runtime torch for this model"
        )
    section = {
        "file": GRAPH_FILE,
        "sha256": hashlib.sha256(graph).hexdigest(),
        "weights_sha256": file_digest(folder / WEIGHTS_FILE)[1],
        "inputs": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "max_batch": MAX_GRAPH_BATCH},
        "outputs": names,
        "checked_on": f"{len(samples)} {described}",
        "max_abs_difference": {"embedding": agreement.embedding, "logits": agreement.logits},
        "tolerance": {"embedding": EMBEDDING_TOLERANCE, "logits": LOGIT_TOLERANCE},
        "exported": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {name: _version(name) for name in ("torch", "onnx", "onnxscript", "onnxruntime")},
    }
    card = {**checkpoint.card, "onnx": section}
    try:
        write_atomically(folder / GRAPH_FILE, graph)
        write_atomically(folder / CARD_FILE, (json.dumps(card, indent=2, sort_keys=True) + "\n").encode())
    except OSError as error:
        raise GraphError(f"cannot write the graph into {folder}: {error.strerror or error}") from None
    checkpoint.card["onnx"] = section
    return section


def sample_inputs(records: Iterable[Record], pipeline: Preprocessing, count: int = 16) -> np.ndarray:
    """Up to `count` prepared inputs made from the first readable `records`, to check an export on."""
    prepared = []
    for record in records:
        try:
            prepared.append(pipeline(load_pixels(record)))
        except (ImageReadError, OSError):
            continue
        if len(prepared) == count:
            break
    if not prepared:
        raise GraphError("no readable image to check the export on")
    return np.stack(prepared)


def export_module(
    module: nn.Module, example: torch.Tensor, output_names: list[str], *, dynamic_batch: bool = True
) -> bytes:
    """`module` (one input, named `INPUT_NAME`) as a serialised ONNX graph with the weights inside; its batch
    axis dynamic up to `MAX_GRAPH_BATCH`, or fixed at the example's. A `GraphError` when it cannot be exported."""
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=MAX_GRAPH_BATCH)},) if dynamic_batch else None
    quiet = io.StringIO()
    try:
        for attempt in range(1, _EXPORT_ATTEMPTS + 1):
            try:
                with contextlib.redirect_stdout(quiet), torch.inference_mode(False), torch.no_grad():
                    program = torch.onnx.export(
                        module,
                        (example,),
                        dynamo=True,
                        dynamic_shapes=dynamic_shapes,
                        input_names=[INPUT_NAME],
                        output_names=output_names,
                        verbose=False,
                    )
                break
            except SystemError as error:
                if _AST_RACE not in str(error) or attempt == _EXPORT_ATTEMPTS:
                    raise
    except Exception as error:  # the exporter raises many kinds; each means this model cannot be exported
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise GraphError(f"the model cannot be exported to ONNX ({first[:300]})") from None
    assert program is not None
    return program.model_proto.SerializeToString()


def compare(graph: bytes, module: nn.Module, samples: np.ndarray) -> Agreement:
    """Run `samples` through ONNX Runtime (the serialised `graph`) and torch, in batches of one and of up to
    eight."""
    import onnxruntime

    session = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
    embedding_error = logit_error = 0.0
    chunks = [samples[:1], *(samples[start : start + 8] for start in range(0, len(samples), 8))]
    with torch.inference_mode():
        for chunk in chunks:
            expected = [tensor.numpy() for tensor in module(torch.from_numpy(chunk))]
            got = session.run(None, {INPUT_NAME: chunk})
            embedding_error = max(embedding_error, float(np.abs(got[0] - expected[0]).max()))
            for ours, theirs in zip(got[1:], expected[1:], strict=True):
                logit_error = max(logit_error, float(np.abs(ours - theirs).max()))
    return Agreement(embedding_error, logit_error)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
