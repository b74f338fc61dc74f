"""Batch indexing of a radiograph archive: reader -> mapper -> writer.

- reader: the archive's records (any layout `cbmir.datasets` reads, or a plain folder of images, unlabelled);
- mapper: worker processes hash, read and preprocess each file (so reading and preprocessing overlap with the
  model), then the main process embeds and predicts in batches;
- writer: each batch goes into the engine in one transaction.

Idempotent and resumable: a file whose content hash is already indexed is skipped, and each batch is all or
nothing, so a run killed at any moment (even with SIGKILL) and run again ends with every image exactly once.
A file that cannot be read is recorded with its reason in the failure report and counted; it never stops
the run.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cbmir.datasets import Record, load_pixels
from cbmir.embed import Embedder, batches, run_model
from cbmir.errors import CbmirError
from cbmir.imaging.io import ImageReadError, read_image
from cbmir.imaging.preprocess import Preprocessing
from cbmir.index import Engine, ImageEntry
from cbmir.labels import Prediction, decode_predictions, probabilities_from_logits

# DICOM tags safe to keep beside an image: technical, never patient-identifying.
SAFE_DICOM_TAGS = ("Modality", "BodyPartExamined", "ViewPosition", "PhotometricInterpretation", "Manufacturer")


def dicom_tags(header: dict[str, str], keep: Sequence[str] = ()) -> dict[str, str]:
    """The DICOM tags stored beside an image: `SAFE_DICOM_TAGS`, plus `keep` when configured to."""
    return {tag: header[tag] for tag in (*SAFE_DICOM_TAGS, *keep) if tag in header}


def location(record: Record) -> str:
    """Where an image is read from, as stored: an absolute path, so that the service finds it from any
    folder; a MedMNIST image adds #split/index."""
    path = record.path.absolute().as_posix()
    return path if record.index is None else f"{path}#{record.split}/{record.index}"


@dataclass
class Mapped:
    """What a worker makes of one record: the model input and the facts to store, or why it failed."""

    record: Record
    content_hash: str | None = None
    model_input: np.ndarray | None = None
    width: int = 0
    height: int = 0
    extra: dict[str, str] = field(default_factory=dict)
    failure: str | None = None
    skipped: bool = False
    read_seconds: float = 0.0
    preprocess_seconds: float = 0.0


_present: frozenset[str] = frozenset()
_pipeline: Preprocessing | None = None


def _init_worker(present: frozenset[str], pipeline: Preprocessing) -> None:
    global _present, _pipeline
    _present, _pipeline = present, pipeline
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def map_record(record: Record) -> Mapped:
    """Hash, read and preprocess one record (in a worker process). Already-indexed content is skipped before
    it is decoded; an unreadable file becomes a failure with its reason."""
    started = time.perf_counter()
    try:
        if record.index is None:
            data = record.path.read_bytes()
            content_hash = hashlib.sha256(data).hexdigest()
            if content_hash in _present:
                return Mapped(record, content_hash, skipped=True, read_seconds=time.perf_counter() - started)
            radiograph = read_image(data, name=str(record.path))
            pixels = radiograph.pixels
            extra = dicom_tags(radiograph.meta.dicom)
        else:
            pixels = load_pixels(record)
            content_hash = hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()
            if content_hash in _present:
                return Mapped(record, content_hash, skipped=True, read_seconds=time.perf_counter() - started)
            extra = {}
    except (ImageReadError, OSError) as error:
        reason = str(error) if isinstance(error, ImageReadError) else f"cannot read {record.path}: {error.strerror}"
        return Mapped(record, failure=reason, read_seconds=time.perf_counter() - started)
    read_done = time.perf_counter()
    model_input = _pipeline(pixels)
    return Mapped(record, content_hash, model_input, width=int(pixels.shape[1]), height=int(pixels.shape[0]),
                  extra={**dict(record.extra), **extra}, read_seconds=read_done - started,
                  preprocess_seconds=time.perf_counter() - read_done)


@dataclass
class Summary:
    indexed: int = 0
    skipped: int = 0
    failed: Counter = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("read", "preprocess", "model", "write"), 0.0))
    wall_seconds: float = 0.0

    def text(self) -> str:
        lines = [f"indexed {self.indexed}, skipped {self.skipped} (already indexed), failed {sum(self.failed.values())}"]
        lines += [f"  failed, {reason}: {count}" for reason, count in self.failed.most_common()]
        stages = ", ".join(f"{stage} {value:.1f}" for stage, value in self.seconds.items())
        rate = self.indexed / self.wall_seconds if self.wall_seconds else 0.0
        lines.append(f"seconds per stage (read and preprocess summed over workers): {stages}; "
                     f"wall {self.wall_seconds:.1f} s, {rate:.1f} images/s")
        return "\n".join(lines)


def failure_kind(reason: str) -> str:
    """A short category for the summary: the reason after the file name, without details in brackets."""
    tail = reason.split(": ", 1)[-1]
    return tail.split(" (")[0].split(";")[0][:60]


def index_records(records: Sequence[Record], engine: Engine, embedder: Embedder, *, dataset: str,
                  workers: int = 2, batch_size: int = 32, progress: bool = True) -> Summary:
    """Index `records` into `engine` with `embedder`'s model; returns the run's summary."""
    summary, started = Summary(), time.perf_counter()
    present = frozenset(engine.content_hashes())
    bar = tqdm(total=len(records), desc="index", unit="img", disable=not progress)
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker,
                             initargs=(present, embedder.pipeline)) as pool:
        mapped = pool.map(map_record, records, chunksize=4)
        for batch in batches(mapped, batch_size):
            for item in batch:
                summary.seconds["read"] += item.read_seconds
                summary.seconds["preprocess"] += item.preprocess_seconds
            _write_batch(batch, engine, embedder, dataset, summary)
            bar.update(len(batch))
            bar.set_postfix(indexed=summary.indexed, skipped=summary.skipped, failed=sum(summary.failed.values()))
    bar.close()
    summary.wall_seconds = time.perf_counter() - started
    return summary


def _write_batch(batch: list[Mapped], engine: Engine, embedder: Embedder, dataset: str, summary: Summary) -> None:
    failures = [(location(item.record), item.failure) for item in batch if item.failure]
    for _, reason in failures:
        summary.failed[failure_kind(reason)] += 1
    fresh = [item for item in batch if not item.failure and not item.skipped]
    summary.skipped += len(batch) - len(fresh) - len(failures)
    # The same content twice (in this batch, or indexed by an earlier batch of this run) is indexed once.
    already = engine.hashes_present([item.content_hash for item in fresh])
    unique: dict[str, Mapped] = {}
    for item in fresh:
        if item.content_hash in already or item.content_hash in unique:
            summary.skipped += 1
        else:
            unique[item.content_hash] = item
    started = time.perf_counter()
    entries = [entry for entry, _ in embed_entries(list(unique.values()), embedder, dataset)]
    summary.seconds["model"] += time.perf_counter() - started
    started = time.perf_counter()
    if entries:
        engine.add(entries)
    if failures:
        engine.record_failures(failures)
    summary.seconds["write"] += time.perf_counter() - started
    summary.indexed += len(entries)


def embed_entries(items: list[Mapped], embedder: Embedder, dataset: str) -> list[tuple[ImageEntry, Prediction]]:
    """Run the model over mapped images in one batch: the entry to store and the prediction of each."""
    if not items:
        return []
    vectors, logits = run_model(embedder.checkpoint.model, (item.model_input for item in items),
                                batch_size=len(items), device=embedder.device)
    predictions = decode_predictions(embedder.schema, probabilities_from_logits(embedder.schema, logits),
                                     irma_threshold=embedder.checkpoint.irma_threshold)
    return [(_entry(item, vector, prediction, dataset), prediction)
            for item, vector, prediction in zip(items, vectors, predictions)]


def _entry(item: Mapped, vector: np.ndarray, prediction: Prediction, dataset: str) -> ImageEntry:
    record = item.record
    labels = tuple(record.labels)
    if prediction.axes:
        confidences = {axis: axis_prediction.confidence for axis, axis_prediction in prediction.axes.items()}
    else:
        confidences = {name: probability for head in prediction.top.values() for name, probability in head}
    return ImageEntry(
        location=location(record),
        content_hash=item.content_hash,
        width=item.width,
        height=item.height,
        dataset=dataset,
        true_code=labels[0] if len(labels) == 1 else None,
        predicted=prediction.label,
        confidences=confidences,
        confidence=prediction.confidence,
        labels=labels,
        extra=item.extra,
        embedding=vector,
    )


class IndexingError(CbmirError):
    """An archive or database the indexer cannot work with."""


def read_archive(path: Path, **kwargs) -> tuple[str, list[Record]]:
    """The records of an archive: any layout `cbmir.datasets` reads, or else every image file below a folder
    (unlabelled). Returns the dataset name and the records."""
    from cbmir.datasets import IMAGE_SUFFIXES, DatasetError, open_dataset

    path = Path(path)
    try:
        dataset = open_dataset(path, **kwargs)
        return dataset.name, list(dataset.records)
    except DatasetError:
        if not path.is_dir():
            raise
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise IndexingError(f"{path}: no images found (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    return path.name, [Record(p.relative_to(path).as_posix(), p, (), path.name) for p in files]
