"""Batch indexing of a radiograph archive: reader -> mapper -> writer.

- reader: the archive's records (any layout `cbmir.datasets` reads, or a plain folder of images, unlabelled);
- mapper: worker processes hash, read and preprocess each file (so reading and preprocessing overlap with the
  model), then the main process embeds and predicts in batches (`cbmir.search.Retrieval.store`, the same
  road as every other caller);
- writer: each batch goes into the engine in one transaction.

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
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import TypeVar

import numpy as np
from tqdm import tqdm

from cbmir.datasets import Record, load_pixels
from cbmir.embed import batches
from cbmir.errors import CbmirError
from cbmir.imaging.io import DEFAULT_MAX_PIXELS, read_dicom, read_file, read_image
from cbmir.imaging.listing import IMAGE_SUFFIXES, image_files
from cbmir.imaging.preprocess import Preprocessing, PreprocessingError
from cbmir.locations import Location, PacsInstance
from cbmir.pacs import PacsAuthError, PacsError, PacsSettings, PacsUnavailableError, pacs_client
from cbmir.search import PreparedImage, Retrieval

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
    """What a worker makes of one image: the image ready to store, or that its content is already indexed
    (`skipped`, with its hash), or why it failed."""

    location: Location
    content_hash: str | None = None
    prepared: PreparedImage | None = None
    failure: str | None = None
    skipped: bool = False
    read_seconds: float = 0.0
    preprocess_seconds: float = 0.0


@dataclass(frozen=True)
class WorkerState:
    present: frozenset[str]
    pipeline: Preprocessing
    dataset: str
    max_pixels: int
    pacs: PacsSettings | None = None
    pacs_failing: Synchronized | None = None  # PACS fetches failed in a row, shared by the workers


_worker: WorkerState | None = None


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


def map_record(record: Record) -> Mapped:
    """Hash, read and preprocess one record (in a worker process). Already-indexed content is skipped before
    it is decoded; an unreadable file becomes a failure with its reason."""
    assert _worker is not None, "map_record runs in a worker started by index_records"
    started = time.perf_counter()
    location = Location.of(record)
    try:
        if record.index is None:
            data = read_file(record.path)
            content_hash = hashlib.sha256(data).hexdigest()
            if content_hash in _worker.present:
                return Mapped(location, content_hash, skipped=True, read_seconds=time.perf_counter() - started)
            radiograph = read_image(data, name=str(record.path), max_pixels=_worker.max_pixels)
            pixels = radiograph.pixels
            extra = dicom_tags(radiograph.meta.dicom)
        else:
            pixels = load_pixels(record)
            content_hash = hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()
            if content_hash in _worker.present:
                return Mapped(location, content_hash, skipped=True, read_seconds=time.perf_counter() - started)
            extra = {}
    except (CbmirError, OSError) as error:  # an unreadable file or archive member: a failure, never a stop
        reason = str(error) if isinstance(error, CbmirError) else f"cannot read {record.path}: {error.strerror}"
        return Mapped(location, failure=reason, read_seconds=time.perf_counter() - started)
    return _prepare(location, content_hash, pixels, tuple(record.labels), {**dict(record.extra), **extra}, started)


def map_instance(instance: PacsInstance) -> Mapped:
    """Fetch, read and preprocess one PACS instance (in a worker process). Its content hash is that of its
    pixels, which do not depend on the transfer syntax it came in. A fetch or read that fails is a failure
    with its reason; refused credentials (`PacsAuthError`) stop the run."""
    assert _worker is not None and _worker.pacs is not None and _worker.pacs_failing is not None
    started = time.perf_counter()
    location = Location(instance=instance)
    if _worker.pacs_failing.value >= PACS_DOWN_AFTER:
        reason = f"{location}: not fetched: {instance.server} failed {PACS_DOWN_AFTER} fetches in a row"
        return Mapped(location, failure=reason)
    try:
        dataset = pacs_client(instance.server, _worker.pacs).fetch(instance)
    except PacsUnavailableError as error:
        with _worker.pacs_failing.get_lock():
            _worker.pacs_failing.value += 1
        return Mapped(location, failure=str(error), read_seconds=time.perf_counter() - started)
    except PacsAuthError:
        raise
    except PacsError as error:
        return Mapped(location, failure=str(error), read_seconds=time.perf_counter() - started)
    _worker.pacs_failing.value = 0
    try:
        radiograph = read_dicom(dataset, name=str(location), max_pixels=_worker.max_pixels)
    except CbmirError as error:
        return Mapped(location, failure=str(error), read_seconds=time.perf_counter() - started)
    content_hash = hashlib.sha256(np.ascontiguousarray(radiograph.pixels).tobytes()).hexdigest()
    if content_hash in _worker.present:
        return Mapped(location, content_hash, skipped=True, read_seconds=time.perf_counter() - started)
    return _prepare(location, content_hash, radiograph.pixels, (), dicom_tags(radiograph.meta.dicom), started)


def _prepare(
    location: Location, content_hash: str, pixels: np.ndarray, labels: tuple[str, ...], extra: dict, started: float
) -> Mapped:
    """The image read, preprocessed with the model's pipeline; an image the model cannot take (a 100000 x 1
    strip) is a failure too."""
    assert _worker is not None
    read_done = time.perf_counter()
    try:
        model_input = _worker.pipeline(pixels)
    except PreprocessingError as error:
        return Mapped(location, content_hash, failure=f"{location}: {error}", read_seconds=read_done - started)
    prepared = PreparedImage(
        location,
        content_hash,
        model_input,
        width=int(pixels.shape[1]),
        height=int(pixels.shape[0]),
        dataset=_worker.dataset,
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

    def text(self) -> str:
        lines = [
            f"indexed {self.indexed}, skipped {self.skipped} (already indexed), failed {sum(self.failed.values())}"
        ]
        lines += [f"  failed, {reason}: {count}" for reason, count in self.failed.most_common()]
        stages = ", ".join(f"{stage} {value:.1f}" for stage, value in self.seconds.items())
        rate = self.indexed / self.wall_seconds if self.wall_seconds else 0.0
        lines.append(
            f"seconds per stage (read and preprocess summed over workers): {stages}; "
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
    state = WorkerState(frozenset(retrieval.engine.content_hashes()), retrieval.embedder.pipeline, dataset, max_pixels)
    return run_stages(records, map_record, state, retrieval, workers=workers, batch_size=batch_size, progress=progress)


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


def run_stages(
    items: Sequence[T],
    mapper: Callable[[T], Mapped],
    state: WorkerState,
    retrieval: Retrieval,
    *,
    workers: int,
    batch_size: int,
    progress: bool,
    summary: Summary | None = None,
) -> Summary:
    """The stages after listing: `mapper` in `workers` processes given `state` (0: in this thread, for a
    caller that maps few images at a time), then the model and the store in batches of `batch_size`, adding
    to `summary`."""
    summary = summary or Summary()
    started = time.perf_counter()
    bar = tqdm(total=len(items), desc="index", unit="img", disable=not progress)
    with ExitStack() as stack:
        if workers:
            pool = stack.enter_context(
                ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(state,))
            )
            mapped: Iterator[Mapped] = mapped_in_order(pool, mapper, items, 2 * batch_size)
        else:
            global _worker
            _worker = state
            mapped = map(mapper, items)
        for batch in batches(mapped, batch_size):
            for item in batch:
                summary.seconds["read"] += item.read_seconds
                summary.seconds["preprocess"] += item.preprocess_seconds
            _write_batch(batch, retrieval, summary)
            bar.update(len(batch))
            bar.set_postfix(indexed=summary.indexed, skipped=summary.skipped, failed=sum(summary.failed.values()))
    bar.close()
    summary.wall_seconds += time.perf_counter() - started
    return summary


def _write_batch(batch: list[Mapped], retrieval: Retrieval, summary: Summary) -> None:
    failures = [(str(item.location), item.failure) for item in batch if item.failure]
    for _, reason in failures:
        summary.failed[failure_kind(reason)] += 1
    fresh = [item.prepared for item in batch if item.prepared is not None]
    summary.skipped += len(batch) - len(fresh) - len(failures)
    # The same content twice (in this batch, or indexed by an earlier batch of this run) is indexed once.
    already = retrieval.engine.hashes_present([image.content_hash for image in fresh])
    unique: dict[str, PreparedImage] = {}
    for image in fresh:
        if image.content_hash in already or image.content_hash in unique:
            summary.skipped += 1
        else:
            unique[image.content_hash] = image
    if unique:
        stored = retrieval.store(list(unique.values()))
        summary.seconds["model"] += stored.model_seconds
        summary.seconds["write"] += stored.write_seconds
        summary.indexed += len(stored.ids)
    if failures:
        started = time.perf_counter()
        retrieval.engine.record_failures(failures)
        summary.seconds["write"] += time.perf_counter() - started


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
