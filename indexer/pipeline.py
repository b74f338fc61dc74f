"""Batch indexing of a radiograph archive: reader -> mapper -> model -> writer.

- reader: the archive's records (any layout `cbmir.datasets` reads, or a plain folder of images, unlabelled);
- mapper (`map_record`, `map_instance`): hash, read and preprocess one image into a `Mapped`, given the
  run's `WorkerState`;
- model (`embed_batch`): a batch's prepared images embedded and predicted by the `Embedder` (the same
  `embed_inputs` road as every other caller), each becoming the store entry to write;
- writer (`skip_known`, then `write_batch`): content indexed meanwhile is skipped, and each batch goes into
  the engine in one transaction, its failures recorded.

`run_stages` runs them on this machine: the mapper in worker processes (so reading and preprocessing overlap
with the model), the model and the writer in the calling thread. `indexer.ray_pipeline` runs the same stage
functions on a Ray cluster.

Idempotent and resumable: a file whose content hash is already indexed is skipped, and each batch is all or
nothing, so a run killed at any moment (even with SIGKILL) and run again ends with every image exactly once.
A file that cannot be read is recorded with its reason in the failure report and counted; it never stops
the run.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from tqdm import tqdm

from cbmir.datasets import Record, load_pixels
from cbmir.errors import CbmirError
from cbmir.imaging.io import DEFAULT_MAX_PIXELS, read_dicom, read_file, read_image
from cbmir.imaging.listing import IMAGE_SUFFIXES, image_files
from cbmir.imaging.preprocess import Preprocessing, PreprocessingError
from cbmir.index import DuplicateImageError, ImageEntry
from cbmir.locations import Location, PacsInstance
from cbmir.pacs import PacsAuthError, PacsError, PacsSettings, PacsUnavailableError, pacs_client
from cbmir.search import PreparedImage, Retrieval, image_entries

if TYPE_CHECKING:  # never imported here: a process that only reads and preprocesses never loads torch
    from cbmir.embed import Embedder

T = TypeVar("T")

# DICOM tags safe to keep beside an image: technical, never patient-identifying; the UIDs link to a viewer.
SAFE_DICOM_TAGS = (
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "PhotometricInterpretation",
    "Manufacturer",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
)
# A PACS that failed this many fetches in a row, each after its retries, is taken to be down: the rest of
# the run's instances are recorded as not fetched at once rather than each waiting out its retries.
PACS_DOWN_AFTER = 3


def dicom_tags(header: dict[str, str], keep: Sequence[str] = ()) -> dict[str, str]:
    """The DICOM tags stored beside an image: `SAFE_DICOM_TAGS`, plus `keep` when configured to."""
    return {tag: header[tag] for tag in (*SAFE_DICOM_TAGS, *keep) if tag in header}


@dataclass
class Mapped:
    """One image on its way through the stages. The mapper makes it the image ready for the model
    (`prepared`), or says that its content is already indexed (`skipped`, with its hash), or why it failed;
    the model stage turns `prepared` into the `entry` to write (dropping the model input); `skip_known`
    may still mark it `skipped`. Each stage adds its seconds."""

    location: Location
    content_hash: str | None = None
    prepared: PreparedImage | None = None
    entry: ImageEntry | None = None
    failure: str | None = None
    skipped: bool = False
    read_seconds: float = 0.0
    preprocess_seconds: float = 0.0
    model_seconds: float = 0.0


@dataclass(frozen=True)
class WorkerState:
    """What the mapper needs besides its item, the same for the whole run: the content hashes indexed when
    the run started, the model's preprocessing, the dataset name and the pixel limit (and for a PACS, its
    settings and the count of fetches failed in a row, shared by the workers)."""

    present: frozenset[str]
    pipeline: Preprocessing
    dataset: str
    max_pixels: int
    pacs: PacsSettings | None = None
    pacs_failing: Synchronized | None = None


Mapper = Callable[[T, WorkerState], Mapped]
_worker: WorkerState | None = None  # the run's state in a worker process of `run_stages`


def _init_worker(state: WorkerState) -> None:
    global _worker
    _worker = state
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True, name="exit-with-parent").start()


def _exit_with_parent(parent: int) -> None:
    """A worker never outlives the indexer: killed with SIGKILL, the indexer cannot stop its pool, and the
    workers would keep its memory and the index lock they inherited, so the re-run could not start."""
    while os.getppid() == parent:
        time.sleep(0.25)
    os._exit(1)


def _map_in_worker(mapper: Mapper[T], item: T) -> Mapped:
    assert _worker is not None, "runs in a worker process started by run_stages"
    return mapper(item, _worker)


def map_record(record: Record, state: WorkerState) -> Mapped:
    """Hash, read and preprocess one record. Already-indexed content is skipped before it is decoded; an
    unreadable file becomes a failure with its reason."""
    started = time.perf_counter()
    location = Location.of(record)
    try:
        if record.index is None:
            data = read_file(record.path)
            content_hash = hashlib.sha256(data).hexdigest()
            if content_hash in state.present:
                return Mapped(location, content_hash, skipped=True, read_seconds=time.perf_counter() - started)
            radiograph = read_image(data, name=str(record.path), max_pixels=state.max_pixels)
            pixels = radiograph.pixels
            extra = dicom_tags(radiograph.meta.dicom)
        else:
            pixels = load_pixels(record)
            content_hash = hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()
            if content_hash in state.present:
                return Mapped(location, content_hash, skipped=True, read_seconds=time.perf_counter() - started)
            extra = {}
    except (CbmirError, OSError) as error:  # an unreadable file or archive member: a failure, never a stop
        reason = str(error) if isinstance(error, CbmirError) else f"cannot read {record.path}: {error.strerror}"
        return Mapped(location, failure=reason, read_seconds=time.perf_counter() - started)
    labels, extra = tuple(record.labels), {**dict(record.extra), **extra}
    return _prepare(location, content_hash, pixels, labels, extra, state, started)


def map_instance(instance: PacsInstance, state: WorkerState) -> Mapped:
    """Fetch, read and preprocess one PACS instance. Its content hash is that of its pixels, which do not
    depend on the transfer syntax it came in. A fetch or read that fails is a failure with its reason;
    refused credentials (`PacsAuthError`) stop the run."""
    assert state.pacs is not None and state.pacs_failing is not None, "a PACS run's state"
    started = time.perf_counter()
    location = Location(instance=instance)
    if state.pacs_failing.value >= PACS_DOWN_AFTER:
        reason = f"{location}: not fetched: {instance.server} failed {PACS_DOWN_AFTER} fetches in a row"
        return Mapped(location, failure=reason)
    try:
        dataset = pacs_client(instance.server, state.pacs).fetch(instance)
    except PacsUnavailableError as error:
        with state.pacs_failing.get_lock():
            state.pacs_failing.value += 1
        return Mapped(location, failure=str(error), read_seconds=time.perf_counter() - started)
    except PacsAuthError:
        raise
    except PacsError as error:
        return Mapped(location, failure=str(error), read_seconds=time.perf_counter() - started)
    state.pacs_failing.value = 0
    try:
        radiograph = read_dicom(dataset, name=str(location), max_pixels=state.max_pixels)
    except CbmirError as error:
        return Mapped(location, failure=str(error), read_seconds=time.perf_counter() - started)
    content_hash = hashlib.sha256(np.ascontiguousarray(radiograph.pixels).tobytes()).hexdigest()
    if content_hash in state.present:
        return Mapped(location, content_hash, skipped=True, read_seconds=time.perf_counter() - started)
    tags = dicom_tags(radiograph.meta.dicom)
    return _prepare(location, content_hash, radiograph.pixels, (), tags, state, started)


def _prepare(
    location: Location,
    content_hash: str,
    pixels: np.ndarray,
    labels: tuple[str, ...],
    extra: dict,
    state: WorkerState,
    started: float,
) -> Mapped:
    """The image read, preprocessed with the model's pipeline; an image the model cannot take (a 100000 x 1
    strip) is a failure too."""
    read_done = time.perf_counter()
    try:
        model_input = state.pipeline(pixels)
    except PreprocessingError as error:
        return Mapped(location, content_hash, failure=f"{location}: {error}", read_seconds=read_done - started)
    prepared = PreparedImage(
        location,
        content_hash,
        model_input,
        width=int(pixels.shape[1]),
        height=int(pixels.shape[0]),
        dataset=state.dataset,
        labels=labels,
        extra=extra,
    )
    return Mapped(
        location,
        content_hash,
        prepared,
        read_seconds=read_done - started,
        preprocess_seconds=time.perf_counter() - read_done,
    )


@dataclass
class Summary:
    indexed: int = 0
    skipped: int = 0
    failed: Counter = field(default_factory=Counter)
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("read", "preprocess", "model", "write"), 0.0)
    )
    wall_seconds: float = 0.0
    # (seconds from the run's start, images indexed) when its first batch was written: what starting the
    # workers, the model and any cluster cost, apart from the rate after it
    first_batch: tuple[float, int] | None = None

    def text(self) -> str:
        lines = [
            f"indexed {self.indexed}, skipped {self.skipped} (already indexed), failed {sum(self.failed.values())}"
        ]
        lines += [f"  failed, {reason}: {count}" for reason, count in self.failed.most_common()]
        stages = ", ".join(f"{stage} {value:.1f}" for stage, value in self.seconds.items())
        rate = self.indexed / self.wall_seconds if self.wall_seconds else 0.0
        lines.append(
            f"seconds per stage (summed over the processes running each): {stages}; "
            f"wall {self.wall_seconds:.1f} s, {rate:.1f} images/s"
        )
        return "\n".join(lines)


def failure_kind(reason: str) -> str:
    """A short category for the summary: the reason after the file name, without details in brackets."""
    tail = reason.split(": ", 1)[-1]
    return tail.split(" (")[0].split(";")[0][:60]


def index_records(
    records: Sequence[Record],
    retrieval: Retrieval,
    *,
    dataset: str,
    workers: int = 2,
    batch_size: int = 32,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> Summary:
    """Index `records` into `retrieval`'s index with its model; returns the run's summary. An image file
    above `max_pixels` is a failure, found in its header before decoding."""
    state = files_state(retrieval, dataset, max_pixels)
    return run_stages(records, map_record, state, retrieval, workers=workers, batch_size=batch_size, progress=progress)


def files_state(retrieval: Retrieval, dataset: str, max_pixels: int) -> WorkerState:
    """The mapper's state for a run over files: the content indexed now, the model's preprocessing."""
    return WorkerState(frozenset(retrieval.engine.content_hashes()), retrieval.embedder.pipeline, dataset, max_pixels)


def run_stages(
    items: Sequence[T],
    mapper: Mapper[T],
    state: WorkerState,
    retrieval: Retrieval,
    *,
    workers: int,
    batch_size: int,
    progress: bool,
    summary: Summary | None = None,
) -> Summary:
    """The stages after listing, on this machine: `mapper` in `workers` processes given `state` (0: in this
    thread, for a caller that maps few images at a time), then in batches of `batch_size` the known content
    skipped before the model runs, the model and the store, adding to `summary`."""
    summary = summary or Summary()
    started = time.perf_counter()
    bar = progress_bar(len(items), progress)
    with ExitStack() as stack:
        if workers:
            pool = stack.enter_context(
                ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(state,))
            )
            mapped: Iterator[Mapped] = mapped_in_order(pool, partial(_map_in_worker, mapper), items, 2 * batch_size)
        else:
            mapped = (mapper(item, state) for item in items)
        while batch := list(islice(mapped, batch_size)):
            skip_known(batch, retrieval)
            embed_batch(batch, retrieval.embedder)
            write_batch(batch, retrieval, summary)
            note_first_batch(summary, started)
            show_progress(bar, len(batch), summary)
    bar.close()
    summary.wall_seconds += time.perf_counter() - started
    return summary


def mapped_in_order(
    pool: Executor, function: Callable[[T], Mapped], items: Sequence[T], window: int
) -> Iterator[Mapped]:
    """`function` of each item, in order, run in `pool` with at most `window` items in flight: reading runs
    ahead of the model by that much and no more, so memory stays bounded however large the archive (and a
    source that fails midway is not read to its end meanwhile)."""
    pending: deque[Future[Mapped]] = deque()
    for item in items:
        if len(pending) >= window:
            yield pending.popleft().result()
        pending.append(pool.submit(function, item))
    while pending:
        yield pending.popleft().result()


def progress_bar(total: int, shown: bool) -> tqdm:
    """The run's progress bar over `total` images (drawn only when `shown`)."""
    return tqdm(total=total, desc="index", unit="img", disable=not shown)


def note_first_batch(summary: Summary, started: float) -> None:
    """Record, once, when the run that began at `started` (`time.perf_counter`) wrote its first batch."""
    if summary.first_batch is None:
        summary.first_batch = (time.perf_counter() - started, summary.indexed)


def show_progress(bar: tqdm, done: int, summary: Summary) -> None:
    bar.update(done)
    bar.set_postfix(indexed=summary.indexed, skipped=summary.skipped, failed=sum(summary.failed.values()))


def skip_known(batch: list[Mapped], retrieval: Retrieval) -> None:
    """Mark as skipped each image of `batch` whose content is indexed already (by an earlier batch of this
    run, or by anyone since the run's start) or repeats an earlier image of the batch: the same content is
    indexed once."""
    waiting = [item for item in batch if item.prepared is not None or item.entry is not None]
    present = retrieval.engine.hashes_present(item.content_hash for item in waiting if item.content_hash)
    seen: set[str | None] = set()
    for item in waiting:
        if item.content_hash in present or item.content_hash in seen:
            item.prepared, item.entry, item.skipped = None, None, True
        seen.add(item.content_hash)


def embed_batch(batch: list[Mapped], embedder: Embedder) -> None:
    """The model stage: the prepared images of `batch` embedded and predicted (in model runs of at most the
    embedder's batch size); each becomes its store entry, its model input dropped, and carries its share of
    the model's seconds. The other items are left as they are."""
    waiting = [item for item in batch if item.prepared is not None]
    if not waiting:
        return
    started = time.perf_counter()
    images = [item.prepared for item in waiting if item.prepared is not None]
    entries = image_entries(images, embedder.embed_inputs([image.model_input for image in images]))
    share = (time.perf_counter() - started) / len(waiting)
    for item, entry in zip(waiting, entries, strict=True):
        item.prepared, item.entry, item.model_seconds = None, entry, share


def write_batch(batch: list[Mapped], retrieval: Retrieval, summary: Summary) -> None:
    """The write stage, for a batch the model stage has seen: its entries added in one transaction (all or
    none), its failures recorded with their reasons, and its counts and stage seconds added to `summary`."""
    if any(item.prepared is not None for item in batch):
        raise ValueError("write_batch takes a batch after the model stage (embed_batch)")
    failures = [(str(item.location), item.failure) for item in batch if item.failure]
    entries = [item.entry for item in batch if item.entry is not None]
    started = time.perf_counter()
    while entries:
        try:
            summary.indexed += len(retrieval.engine.add(entries))
            break
        except DuplicateImageError:  # another process sharing the store added some of them since skip_known
            known = retrieval.engine.hashes_present(entry.content_hash for entry in entries)
            if not known:
                raise
            for item in batch:
                if item.entry is not None and item.entry.content_hash in known:
                    item.entry, item.skipped = None, True
            entries = [item.entry for item in batch if item.entry is not None]
    if failures:
        retrieval.engine.record_failures(failures)
    summary.seconds["write"] += time.perf_counter() - started
    summary.skipped += sum(item.skipped for item in batch)
    for _, reason in failures:
        summary.failed[failure_kind(reason)] += 1
    for item in batch:
        summary.seconds["read"] += item.read_seconds
        summary.seconds["preprocess"] += item.preprocess_seconds
        summary.seconds["model"] += item.model_seconds


class IndexingError(CbmirError):
    """An archive or database the indexer cannot work with."""


def read_archive(path: Path, **kwargs) -> tuple[str, list[Record]]:
    """The records of an archive: any layout `cbmir.datasets` reads, or else every image file below a folder
    (unlabelled). Returns the dataset name and the records."""
    from cbmir.datasets import DatasetError, open_dataset

    path = Path(path)
    try:
        dataset = open_dataset(path, **kwargs)
        return dataset.name, list(dataset.records)
    except DatasetError:
        if not path.is_dir():
            raise
    files = image_files(path)
    if not files:
        raise IndexingError(f"{path}: no images found (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    return path.name, [Record(p.relative_to(path).as_posix(), p, (), path.name) for p in files]
