"""Indexing the radiographs of a PACS over DICOMweb: list (QIDO-RS) → fetch + read + preprocess in worker
processes (WADO-RS) → embed + predict → write, the indexer's own stages after its listing.

Incremental and resumable, keyed by SOP Instance UID: an instance is stored under its location text (which
holds its three UIDs), so a re-run fetches only instances that are not indexed yet; each batch is written in
one transaction, so a run killed at any moment and run again ends with every instance exactly once. An
instance that cannot be taken is a recorded failure naming its UIDs and the reason (`cbmir db failures`),
and is tried again by the next run; an instance the listing already shows to hold no image (a structured
report) is recorded without being fetched. Refused credentials stop the run: every later request would be
refused too.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Mapping

from tqdm import tqdm

from cbmir.imaging.io import DEFAULT_MAX_PIXELS
from cbmir.locations import Location
from cbmir.pacs import RADIOGRAPH_MODALITIES, Pacs
from cbmir.search import Retrieval
from indexer.pipeline import Summary, WorkerState, failure_kind, map_instance, run_stages


def sync_pacs(
    pacs: Pacs,
    retrieval: Retrieval,
    *,
    dataset: str,
    modalities: tuple[str, ...] = RADIOGRAPH_MODALITIES,
    study_dates: str | None = None,
    attributes: Mapping[str, str] | None = None,
    workers: int = 2,
    batch_size: int = 32,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> Summary:
    """Index the image instances of `pacs` that match the filters (see `Pacs.find`) and are not indexed
    yet; returns the run's summary, whose ``list`` time is the search's."""
    summary, started = Summary(), time.perf_counter()
    found = list(
        tqdm(
            pacs.find(modalities=modalities, study_dates=study_dates, attributes=attributes),
            desc="list",
            unit="instance",
            disable=not progress,
        )
    )
    summary.seconds = {"list": time.perf_counter() - started, **summary.seconds}
    known = retrieval.engine.locations_present(str(Location(instance=item.instance)) for item in found)
    refused = [(str(Location(instance=item.instance)), item.not_an_image) for item in found if item.not_an_image]
    wanted = [
        item.instance for item in found if not item.not_an_image and str(Location(instance=item.instance)) not in known
    ]
    summary.skipped += len(known)
    if refused:
        retrieval.engine.record_failures((location, reason) for location, reason in refused if reason)
        for _, reason in refused:
            summary.failed[failure_kind(str(reason))] += 1
    state = WorkerState(
        frozenset(retrieval.engine.content_hashes()),
        retrieval.embedder.pipeline,
        dataset,
        max_pixels,
        pacs.settings,
        multiprocessing.Value("i", 0),
    )
    run_stages(
        wanted,
        map_instance,
        state,
        retrieval,
        workers=workers,
        batch_size=batch_size,
        progress=progress,
        summary=summary,
    )
    summary.wall_seconds = time.perf_counter() - started
    return summary
