"""The batch indexer on a Ray cluster (`cbmir index ARCHIVE --ray [ADDRESS]`): the stages of
`indexer.pipeline`, the same functions, wired as one Ray Data pipeline.

- listing, in the driver: the archive's records (`read_archive`) and the content hashes already indexed;
- read + preprocess: `map_record` in Ray tasks (one CPU each), a block of records per task;
- model: `embed_batch` in a pool of actors, each holding one `Embedder` loaded from the checkpoint folder;
  with GPUs in the cluster one actor per GPU (``num_gpus=1`` each), else up to one actor per node;
- write, in the driver: `skip_known`, then `write_batch` into the driver's `Retrieval`, one transaction per
  batch, as the single-machine indexer writes.

Each row of the dataset is one `Mapped`, the record the single-machine stages pass along: from the tasks to
the actors it carries the preprocessed model input (uint8), never the file's bytes; from the actors to the
driver the store entry, the model input dropped. Every node must read the archive and the checkpoint folder
at the paths the driver was given, and have cbmir installed; each actor checks that the model it loaded is
the driver's (its `ModelStamp`), so the index never mixes two models.

Invariants and crash guarantees:
- only the driver writes, each batch in one transaction, after `skip_known` checked its content against the
  store: an image is stored at most once, whatever Ray retries or replays;
- a task lost with its node is run again by Ray, an actor lost with its node is restarted (Ray Data's
  defaults for both), so a worker node that dies mid-run costs time, not images;
- when the run cannot finish (the driver killed, the cluster gone), the batches written stay written and the
  rest is not written at all; a re-run skips every stored image by its content hash before decoding it and
  indexes the rest, so after any number of kills every image is in the index exactly once;
- an unreadable image is a failure recorded with its reason (a location keeps its latest one), as on one
  machine; it never stops the run.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cbmir.datasets import Record
from cbmir.errors import CbmirError
from cbmir.imaging.io import DEFAULT_MAX_PIXELS
from cbmir.search import Retrieval
from cbmir.stamp import ModelStamp
from indexer.pipeline import (
    Mapped,
    Summary,
    WorkerState,
    embed_batch,
    files_state,
    map_record,
    note_first_batch,
    progress_bar,
    show_progress,
    skip_known,
    write_batch,
)

if TYPE_CHECKING:  # the read tasks import this module: only the actors load the model's module (and torch)
    import ray.data

    from cbmir.embed import Embedder

RAY_REQUIREMENT = "ray[data]>=2.40"
# The object store of a Ray instance started for one run: small, since the machine runs other work; a run
# holds a few batches of model inputs there at a time and Ray Data spills to disk beyond it.
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20
# The longest wait for a cluster's address to answer before the run is refused.
CONNECT_SECONDS = 5.0
DEFAULT_PORT = 6379  # `ray start --head`'s
USAGE_STATS_VARIABLE = "RAY_USAGE_STATS_ENABLED"  # "0": no usage statistics (see `connected`)
COLUMN = "mapped"  # the one column of the dataset's rows: a `Mapped`


class RayIndexingError(CbmirError):
    """Ray cannot be used for a run (not installed, an address that does not answer as a Ray cluster), or
    the run on Ray did not finish."""


@dataclass
class RaySummary(Summary):
    """A run's summary, with Ray Data's own statistics of its stages (`Dataset.stats()`)."""

    ray_stats: str = ""


def require_ray() -> None:
    """Ray with Ray Data installed, else a `RayIndexingError` saying what to install. Ray is imported only
    when a run asks for it."""
    try:
        import ray.data  # noqa: F401 - Ray Data, not only Ray core
    except ImportError:
        raise RayIndexingError(f"--ray needs Ray Data, not installed here: pip install '{RAY_REQUIREMENT}'") from None


def index_on_ray(
    records: Sequence[Record],
    retrieval: Retrieval,
    *,
    model: Path,
    dataset: str,
    address: str = "local",
    batch_size: int = 32,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    threads: int | None = None,
    progress: bool = True,
) -> RaySummary:
    """Index `records` into `retrieval`'s index on the Ray cluster at `address` (``host:port``, ``auto`` for
    the cluster started on this machine, or ``local``: a Ray instance started for the run and stopped after
    it, as `ray.init` reads addresses). `model` is the checkpoint folder of `retrieval`'s
    embedder, which each actor loads in the same runtime with `threads` threads (None: every core of its
    node); `batch_size` images go through the model and into the store at a time."""
    require_ray()
    import ray

    summary, started = RaySummary(), time.perf_counter()
    state = files_state(retrieval, dataset, max_pixels)
    with connected(address):
        pipeline = _pipeline(records, state, model, retrieval.embedder, batch_size, threads)
        bar = progress_bar(len(records), progress)
        try:
            for rows in pipeline.iter_batches(batch_size=batch_size, batch_format="numpy"):
                batch: list[Mapped] = list(rows[COLUMN])
                skip_known(batch, retrieval)
                write_batch(batch, retrieval, summary)
                note_first_batch(summary, started)
                show_progress(bar, len(batch), summary)
        except ray.exceptions.RayError as error:
            raise RayIndexingError(f"the run on Ray stopped: {_cause(error)}; run it again to index the rest") from None
        finally:
            bar.close()
        summary.ray_stats = pipeline.stats()
    summary.wall_seconds = time.perf_counter() - started
    return summary


def _cause(error: BaseException) -> str:
    """The last line of the innermost error Ray reports (a task's own exception, not Ray's wrapping)."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


@contextmanager
def connected(address: str) -> Iterator[None]:
    """This process connected to the Ray cluster at `address` (``local``: a new instance) for the block.

    Ray's usage statistics stay off unless ``RAY_USAGE_STATS_ENABLED`` says otherwise: an indexer of patients'
    images reports to no one, and Ray Data's usage collector would otherwise leave a thread in this process
    that polls a Prometheus server on localhost:9090 every 10 s until the process exits."""
    import ray

    os.environ.setdefault(USAGE_STATS_VARIABLE, "0")
    options: dict[str, Any] = {"logging_level": logging.WARNING, "include_dashboard": False}
    if address == "local":
        options["object_store_memory"] = LOCAL_OBJECT_STORE_BYTES
    else:
        check_address(address)
    try:
        ray.init(address, **options)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise RayIndexingError(f"cannot use the Ray cluster at {address}: {_cause(error)}") from None
    try:
        yield
    finally:
        ray.shutdown()


def check_address(address: str) -> None:
    """Refuse, within `CONNECT_SECONDS`, an address where no Ray cluster answers: nothing listening, a host
    that cannot be reached, or a server that is not gRPC (Ray's control service speaks it). Ray itself would
    keep retrying such an address for minutes. ``auto`` (the cluster started on this machine) is Ray's own
    to find."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        host, port = address.removeprefix("ray://"), str(DEFAULT_PORT)
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS) as connection:
            connection.sendall(_HTTP2_PREFACE)
            answer = connection.recv(9)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise RayIndexingError(f"no Ray cluster answers at {address}: {reason}") from None
    if len(answer) < 9 or answer[3] != _HTTP2_SETTINGS:
        raise RayIndexingError(f"{address} answers, but not as a Ray cluster (no gRPC server there)")


# A gRPC server answers an HTTP/2 client's preface and empty SETTINGS frame with a SETTINGS frame of its own.
_HTTP2_SETTINGS = 0x4
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, _HTTP2_SETTINGS, 0, 0, 0, 0, 0])


def _pipeline(
    records: Sequence[Record],
    state: WorkerState,
    model: Path,
    embedder: Embedder,
    batch_size: int,
    threads: int | None,
) -> ray.data.Dataset:
    """The lazy dataset of the run: records -> read + preprocess (tasks) -> model (actors)."""
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver draws the run's own bar
    context.print_on_execution_start = False
    context.enable_fallback_to_arrow_object_ext_type = True  # rows are `Mapped` objects, pickled: said, not warned
    gpus = int(ray.cluster_resources().get("GPU", 0))
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    blocks = max(1, math.ceil(len(records) / batch_size))
    # Absolute paths: a task reads in its worker's working folder, on any node.
    rows = [{"record": replace(record, path=record.path.absolute())} for record in records]
    listed = ray.data.from_items(rows, override_num_blocks=blocks)
    # The state (with the indexed content's hashes) goes into the object store once, with the function.
    mapped = listed.map_batches(
        partial(map_records, state=state), batch_size=batch_size, batch_format="numpy", num_cpus=1
    )
    loaded = {
        "model": str(model.absolute()),
        "runtime": embedder.runtime,
        "batch_size": embedder.batch_size,
        "threads": threads,
        "stamp": embedder.stamp,
    }
    # The actors claim no CPU: as on one machine, the model shares its node's cores with the read tasks (its
    # threads sleep when idle, never spinning), so every CPU of the cluster can run a read task. This also
    # keeps Ray Data from fusing the two stages into the actors, which would read one image at a time a node.
    return mapped.map_batches(
        EmbedActor,
        fn_constructor_kwargs=loaded,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=gpus)
        if gpus
        else ray.data.ActorPoolStrategy(min_size=1, max_size=nodes),
        num_cpus=0,
        num_gpus=1 if gpus else None,
    )


def _column(items: list[Mapped]) -> dict[str, np.ndarray]:
    column = np.empty(len(items), dtype=object)
    column[:] = items
    return {COLUMN: column}


def map_records(rows: dict[str, np.ndarray], state: WorkerState) -> dict[str, np.ndarray]:
    """The read + preprocess task: each record of a block mapped (`map_record`)."""
    return _column([map_record(record, state) for record in rows["record"]])


class EmbedActor:
    """The model stage's actor: one `Embedder`, loaded once, embeds the blocks given to it (`embed_batch`)."""

    def __init__(self, model: str, runtime: str, batch_size: int, threads: int | None, stamp: ModelStamp):
        from cbmir.embed import Embedder, set_threads

        set_threads(threads)
        self.embedder = Embedder.load(model, runtime=runtime, batch_size=batch_size, threads=threads)
        if self.embedder.stamp.digest != stamp.digest:
            raise RayIndexingError(
                f"{model} on {socket.gethostname()} holds model {self.embedder.stamp.describe()}, not the "
                f"driver's {stamp.describe()}: every node must read the same checkpoint"
            )

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch: list[Mapped] = list(rows[COLUMN])
        embed_batch(batch, self.embedder)
        return _column(batch)
