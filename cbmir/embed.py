"""Images to embeddings and predictions through a checkpoint's own model and preprocessing.

`Embedder` is the only code that runs a model for inference: the indexer, the search use case
(`cbmir.search`), the service, the CLI, evaluation and the benchmarks all call `Embedder.embed_inputs`.
Below it, the index knows vectors and a `ModelStamp`, never a model.

The runtime is chosen here, once, when the embedder is made:
- ``onnx``: ONNX Runtime on the checkpoint's exported graph (`cbmir.export`), which must be current (exported
  from these weights) and have matched torch within the export's tolerances; anything else is refused with
  what to run. The CUDA execution provider is used when ONNX Runtime has one.
- ``torch``: the torch model (inference mode, channels_last; the GPU when torch sees one).
- ``auto`` (the default): ``onnx`` when the checkpoint has a current graph, ``torch`` when it has none; a
  stale or damaged graph is refused, never used and never silently skipped.
Both give the same vectors within the export's tolerances, so an index built with one answers the other
under the same model stamp.

Threads (one policy, measured on 2 cores with another busy process beside it, BENCHMARKS.md "threads"): ONNX
Runtime runs `threads` intra-op threads (every core by default), one inter-op thread and no spinning, so
a waiting pool never steals a core from the readers, the other searches or another process (spinning gave
the same rate beside a busy process with a worse p99). Torch's thread count is process-wide and set by the
program (`set_threads`), never here.

Torch is imported only for the torch runtime (`cbmir.models.inference`): a process that runs ONNX Runtime
(a Ray actor, the CLI, the service until it explains) does not spend 3 s loading it.

Micro-batching: concurrent callers share one model queue. Whoever finds the model free runs it on what is
queued (up to `batch_size` images), after waiting up to `batch_wait_ms` for more to arrive; the others
wait for their answers. So searches that arrive while the model runs go into its next run together (with
no wait at all, the default: measured in the service at 20 clients, a 2 or 5 ms wait gained nothing), and
a batch that fails is run again request by request, so that only the bad request fails.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import numpy as np

from cbmir.checkpoint import Checkpoint, load_checkpoint
from cbmir.errors import CbmirError
from cbmir.graph import (
    EMBEDDING_OUTPUT,
    INPUT_NAME,
    MAX_GRAPH_BATCH,
    GraphError,
    graph_for,
    head_output,
    session_options,
)
from cbmir.imaging.preprocess import Preprocessing
from cbmir.labels import LabelSchema, Prediction, decode_predictions, probabilities_from_logits
from cbmir.stamp import ModelStamp

T = TypeVar("T")
Runtime = Literal["auto", "torch", "onnx"]
RUNTIMES: tuple[Runtime, ...] = ("auto", "torch", "onnx")
# One model run: prepared inputs (uint8 N x H x W x 3) -> unit embeddings N x d and logits per head.
Outputs = tuple[np.ndarray, dict[str, np.ndarray]]


class ModelRunner(Protocol):
    """One runtime's model: prepared inputs (uint8 N x H x W x 3) -> unit embeddings and logits per head."""

    name: str
    description: str

    def __call__(self, images: np.ndarray) -> Outputs: ...


class RuntimeUnavailableError(CbmirError):
    """An inference runtime that is not installed, or a runtime name that does not exist."""


@dataclass
class Embeddings:
    """The model's answer for N images: search vectors, probabilities per head, and decoded predictions."""

    vectors: np.ndarray  # N x d float32, unit L2 norm
    probabilities: dict[str, np.ndarray]  # head -> N x n_classes
    predictions: list[Prediction]


# The program's thread count for torch (`set_threads`), applied when a model first runs in torch here.
_torch_threads: int | None = None


def set_threads(threads: int | None) -> None:
    """Set torch's process-wide thread count (None: every core). Programs call this once, at start-up; it
    applies at once if torch is loaded, else when a model first runs in torch here."""
    global _torch_threads
    _torch_threads = threads or os.cpu_count() or 1
    if "torch" in sys.modules:
        _apply_torch_threads()


def _apply_torch_threads() -> None:
    import torch

    if _torch_threads is not None:
        torch.set_num_threads(_torch_threads)


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


class _OnnxRunner:
    name = "onnx"

    def __init__(self, graph: Path, heads: list[str], threads: int | None):
        try:
            import onnxruntime
        except ImportError:
            raise RuntimeUnavailableError(
                "ONNX Runtime is not installed: `pip install onnxruntime` (or use --runtime torch)"
            ) from None
        options = session_options(threads or os.cpu_count() or 1)
        available = onnxruntime.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = onnxruntime.InferenceSession(str(graph), options, providers=providers)
        except Exception as error:  # onnxruntime raises its own exception types for unreadable graphs
            first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            raise GraphError(f"{graph}: ONNX Runtime cannot load it ({first}): run `cbmir export`") from None
        names = [output.name for output in self.session.get_outputs()]
        self.outputs = [EMBEDDING_OUTPUT, *(head_output(head) for head in heads)]
        if sorted(names) != sorted(self.outputs):
            raise GraphError(f"{graph}: its outputs {names} are not this model's {self.outputs}: run `cbmir export`")
        self.heads = heads
        self.description = (
            f"ONNX Runtime {onnxruntime.__version__} ({self.session.get_providers()[0]}, "
            f"{options.intra_op_num_threads} thread(s))"
        )

    def __call__(self, images: np.ndarray) -> Outputs:
        vectors, *logits = self.session.run(self.outputs, {INPUT_NAME: np.ascontiguousarray(images, dtype=np.uint8)})
        return vectors, dict(zip(self.heads, logits, strict=True))


@dataclass
class _Request:
    images: np.ndarray
    outputs: Outputs | None = None
    error: BaseException | None = None
    done: bool = False


class _ModelQueue:
    """The model's queue: concurrent callers' inputs gathered into model batches (see the module docstring).
    The caller that finds the model free runs it for everyone queued; one model run at a time."""

    def __init__(self, run: Callable[[np.ndarray], Outputs], max_images: int, wait_seconds: float):
        self._run, self.max_images, self.wait_seconds = run, max_images, wait_seconds
        self._changed = threading.Condition()
        self._queued: deque[_Request] = deque()
        self._running = False
        self.runs = 0  # model runs so far (concurrent callers joined: fewer runs than calls)

    def run(self, images: np.ndarray) -> Outputs:
        request = _Request(images)
        with self._changed:
            self._queued.append(request)
            self._changed.notify_all()
            while not request.done:
                if self._running:
                    self._changed.wait()
                    continue
                self._running = True
                taken = self._gather()
                self._changed.release()
                try:
                    self._answer(taken)
                except BaseException as error:  # interrupted: the requests taken must not wait for ever
                    for other in taken:
                        if not other.done:
                            other.error, other.done = error, True
                    raise
                finally:
                    self._changed.acquire()
                    self._running = False
                    self._changed.notify_all()
        if request.error is not None:
            raise request.error
        assert request.outputs is not None
        return request.outputs

    def _gather(self) -> list[_Request]:
        """Up to `max_images` images of queued requests, oldest first (at least one request), after waiting
        up to `wait_seconds` for the batch to fill. Called holding the condition."""
        deadline = time.monotonic() + self.wait_seconds
        while sum(len(r.images) for r in self._queued) < self.max_images:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._changed.wait(left)
        taken = [self._queued.popleft()]
        count = len(taken[0].images)
        while self._queued and count + len(self._queued[0].images) <= self.max_images:
            count += len(self._queued[0].images)
            taken.append(self._queued.popleft())
        return taken

    def _answer(self, taken: list[_Request]) -> None:
        self.runs += 1
        try:
            vectors, logits = self._run(np.concatenate([request.images for request in taken]))
        except Exception as error:
            if len(taken) == 1:
                taken[0].error = error
            else:  # one bad request must not fail the others: run each alone
                for request in taken:
                    self._answer([request])
            for request in taken:
                request.done = True
            return
        start = 0
        for request in taken:
            end = start + len(request.images)
            request.outputs = (vectors[start:end], {head: values[start:end] for head, values in logits.items()})
            request.done, start = True, end


class Embedder:
    """Turns radiographs into search vectors and predictions with a checkpoint's model and its recorded
    preprocessing, in the runtime chosen (see the module docstring). Safe to share between threads.

    `batch_size`: the most images in one model run (callers' inputs are cut into such batches, and
    concurrent callers' batches are joined up to it). `batch_wait_ms`: how long a run waits for more
    callers before starting with fewer images (0: never wait). `threads`: ONNX Runtime's intra-op threads
    (None: every core)."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        runtime: Runtime = "auto",
        batch_size: int = 32,
        batch_wait_ms: float = 0.0,
        threads: int | None = None,
    ):
        if runtime not in RUNTIMES:
            raise RuntimeUnavailableError(f"runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
        if batch_size < 1 or batch_wait_ms < 0:
            raise CbmirError(f"batch_size {batch_size} must be at least 1 and batch_wait_ms {batch_wait_ms} >= 0")
        self.schema: LabelSchema = checkpoint.schema
        self.pipeline: Preprocessing = checkpoint.pipeline
        self.irma_threshold = checkpoint.irma_threshold
        self.batch_size = batch_size
        self.head_sizes = checkpoint.schema.head_sizes
        self.stamp = ModelStamp(checkpoint.stamp, checkpoint.embedding_dim)
        self._runner = _choose_runner(checkpoint, runtime, threads)
        if self._runner.name == "onnx" and batch_size > MAX_GRAPH_BATCH:
            raise CbmirError(f"batch size {batch_size}: the ONNX graph takes at most {MAX_GRAPH_BATCH} images a run")
        self.runtime: str = self._runner.name
        self.runtime_description: str = self._runner.description
        self._queue = _ModelQueue(self._runner, batch_size, batch_wait_ms / 1000)

    @classmethod
    def load(cls, folder: str | os.PathLike[str], **options: Any) -> Embedder:
        """The embedder of the checkpoint in `folder` (a `CheckpointError` names what is wrong with it);
        `options` as for the constructor."""
        return cls(load_checkpoint(Path(folder)), **options)

    @property
    def dimension(self) -> int:
        return self.stamp.dimension

    @property
    def model_runs(self) -> int:
        """How many times the model has run (joined concurrent calls count once)."""
        return self._queue.runs

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """A grey radiograph (2-D array, as `cbmir.imaging.io.read_image` gives) as this model's input."""
        return self.pipeline(pixels)

    def embed(self, pixels: Iterable[np.ndarray]) -> Embeddings:
        """Embed grey radiographs: `prepare` each, then `embed_inputs`."""
        return self.embed_inputs(self.prepare(image) for image in pixels)

    def embed_inputs(self, inputs: Iterable[np.ndarray] | np.ndarray) -> Embeddings:
        """Embed prepared model inputs (uint8 H x W x 3, as `prepare` makes them), in model batches of at
        most `batch_size`, through the shared model queue."""
        vectors: list[np.ndarray] = []
        logits: dict[str, list[np.ndarray]] = {head: [] for head in self.head_sizes}
        for batch in batches(inputs, self.batch_size):
            batch_vectors, batch_logits = self._queue.run(np.stack(batch).astype(np.uint8, copy=False))
            vectors.append(batch_vectors)
            for head, values in batch_logits.items():
                logits[head].append(values)
        if not vectors:
            empty = {head: np.zeros((0, size), np.float32) for head, size in self.head_sizes.items()}
            return Embeddings(np.zeros((0, self.dimension), np.float32), empty, [])
        joined = {head: np.concatenate(parts) for head, parts in logits.items()}
        probabilities = probabilities_from_logits(self.schema, joined)
        predictions = decode_predictions(self.schema, probabilities, irma_threshold=self.irma_threshold)
        return Embeddings(np.concatenate(vectors).astype(np.float32, copy=False), probabilities, predictions)


def _choose_runner(checkpoint: Checkpoint, runtime: Runtime, threads: int | None) -> ModelRunner:
    has_graph = checkpoint.path is not None and isinstance(checkpoint.card.get("onnx"), dict)
    if runtime == "torch" or (runtime == "auto" and not has_graph):
        from cbmir.models.inference import TorchRunner

        _apply_torch_threads()
        return TorchRunner(checkpoint)
    return _OnnxRunner(graph_for(checkpoint), list(checkpoint.schema.head_sizes), threads)
