"""Preprocessed images of dataset records, made once in parallel worker processes and kept in a
memory-mapped .npy cache, so training epochs, evaluation and baselines never decode a file twice.

A cache entry is an array file and a listing (the kept record ids and the failures), each written atomically;
the listing is written last, so an entry with a listing is complete and one without it is made again."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cbmir.datasets import Record, load_pixels
from cbmir.files import write_atomically, write_atomically_with
from cbmir.imaging.io import ImageReadError
from cbmir.imaging.preprocess import Preprocessing


def fingerprint(lines: Sequence[str]) -> str:
    """sha256 hex of the lines, newline-separated."""
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _preprocess_one(job: tuple[Record, Preprocessing]) -> np.ndarray | str:
    record, pipeline = job
    try:
        return pipeline(load_pixels(record))
    except ImageReadError as error:
        return str(error)


@dataclass
class PreparedImages:
    """Preprocessed uint8 images of some records, in a memory-mapped .npy cache, and the files that failed."""

    records: list[Record]
    images: np.ndarray
    failures: list[str]


def prepare_images(records: Sequence[Record], pipeline: Preprocessing, cache: Path, desc: str) -> PreparedImages:
    """Read and preprocess `records` in parallel worker processes into `cache` (reused when the records and
    the pipeline are the same). Unreadable files are left out and listed, never fatal."""
    key = fingerprint([pipeline.to_json()] + [f"{r.id}\t{r.path}\t{r.index}" for r in records])[:16]
    array_path, listing_path = cache / f"images-{key}.npy", cache / f"images-{key}.json"
    if array_path.exists() and listing_path.exists():
        listing = json.loads(listing_path.read_text())
        kept = set(listing["kept"])
        return PreparedImages(
            [r for r in records if r.id in kept], np.load(array_path, mmap_mode="r"), listing["failures"]
        )
    cache.mkdir(parents=True, exist_ok=True)
    partial = array_path.with_suffix(".partial.npy")
    side = pipeline.size
    images = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(len(records), side, side, 3))
    kept_rows: list[int] = []
    failures: list[str] = []
    jobs = [(record, pipeline) for record in records]
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        results = pool.map(_preprocess_one, jobs, chunksize=8)
        for row, result in enumerate(tqdm(results, total=len(jobs), desc=desc, unit="img")):
            if isinstance(result, str):
                failures.append(result)
                continue
            images[len(kept_rows)] = result
            kept_rows.append(row)
    images.flush()
    del images
    kept_images = np.load(partial, mmap_mode="r")[: len(kept_rows)]
    write_atomically_with(array_path, lambda file: np.save(file, kept_images))
    partial.unlink()
    listing = {"kept": [records[row].id for row in kept_rows], "failures": failures}
    write_atomically(listing_path, json.dumps(listing).encode())
    return PreparedImages([records[row] for row in kept_rows], np.load(array_path, mmap_mode="r"), failures)
