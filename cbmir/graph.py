"""A checkpoint's ONNX graph as ONNX Runtime sees it: its file, its input and output names, and the check
that it is current (`graph_for`). Torch-free, so that a program running only ONNX Runtime never loads
torch; `cbmir.export` makes the graph and records it in the card.

The graph (`model.onnx` in the checkpoint folder) takes prepared inputs exactly as `Embedder.prepare` makes
them (uint8 N x H x W x 3, N from 1 to `MAX_GRAPH_BATCH`) and gives the unit-norm embedding and every head's
logits. The card's `onnx` section records the graph's and the weights' sha256; a graph is used only while
both still match, so a graph of other weights, or a foreign or damaged file, is refused, never used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cbmir.checkpoint import WEIGHTS_FILE, Checkpoint
from cbmir.errors import CbmirError
from cbmir.files import file_digest

GRAPH_FILE = "model.onnx"
INPUT_NAME, EMBEDDING_OUTPUT = "images", "embedding"
LOGITS_PREFIX = "logits:"
# Largest batch the graph accepts (the batch axis is dynamic from 1 to this).
MAX_GRAPH_BATCH = 1024


class GraphError(CbmirError):
    """A checkpoint's ONNX graph that is missing, stale (other weights), damaged, or does not match torch."""


def session_options(threads: int, spinning: bool = False) -> Any:
    """ONNX Runtime's options for a cbmir session (inference and training's frozen pass alike): `threads`
    intra-op threads, one inter-op thread, sequential execution, and no spinning unless asked, so a waiting
    pool never steals a core from the other work or process beside it (measured: BENCHMARKS.md "threads")."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    spin = "1" if spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return options


def head_output(head: str) -> str:
    return f"{LOGITS_PREFIX}{head}"


def graph_for(checkpoint: Checkpoint) -> Path:
    """The checkpoint's ONNX graph, if it was exported from these very weights and matched torch; else a
    `GraphError` that says why and what to run."""
    folder = checkpoint.path
    remedy = f"run `cbmir export {folder}` (or use --runtime torch)"
    section = checkpoint.card.get("onnx")
    if folder is None or not isinstance(section, dict):
        raise GraphError(f"{folder or 'this checkpoint'} has no ONNX graph: {remedy}")
    path = folder / str(section.get("file", GRAPH_FILE))
    if not path.is_file():
        raise GraphError(f"{path} is missing: {remedy}")
    if file_digest(folder / WEIGHTS_FILE)[1] != section.get("weights_sha256"):
        raise GraphError(f"{path} was exported from other weights than {folder / WEIGHTS_FILE} (stale): {remedy}")
    if file_digest(path)[1] != section.get("sha256"):
        raise GraphError(f"{path} is not the graph its card records (replaced or damaged): {remedy}")
    return path
