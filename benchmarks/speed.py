"""Speed benchmark: the model, indexing and HTTP search on real radiographs in both inference runtimes
(torch and ONNX Runtime) side by side, idle and with another busy process on the machine, and search
latency on generated archives; each figure beside its reference measured in the same run.

    python benchmarks/speed.py --archive ../shared/data/irma2007-dev

The model: without --model, the CPU default untrained (its architecture, embedding and preprocessing; the
weights do not change the speed), saved to a scratch folder and exported to ONNX there (`export_graph`, on
16 prepared radiographs of the archive). With --model, that checkpoint folder, which must already have a
current ONNX graph (`cbmir export`). Both runtimes use cbmir's thread policy (`cbmir.embed`; torch with
every core): `benchmarks/threads.py` measures the alternatives.

Sections (each can be skipped with --skip; a run that skips any writes results/speed-partial.json and leaves
BENCHMARKS.md alone, unless --publish):
- model: model-only rate (the Embedder on the archive's radiographs already preprocessed in memory, batches
  of 32, about 8 s) and one-image latency (p50/p99 of 100 runs), per runtime, idle and busy (one other
  process, `python -c "while True: pass"`, running during the measurement).
- indexing: the archive indexed by the batch indexer into a fresh index per runtime, idle and busy: images/s,
  seconds per stage (read and preprocess summed over the worker processes, model, write), the fraction of the
  model-only rate, and which bound holds: read+preprocess alone on the workers, or the model alone.
- http: `cbmir serve --runtime R` over the idle ONNX Runtime index (both runtimes give the same vectors under
  the same model stamp), in its own process; 1 and 20 clients upload radiographs of the archive to
  `POST /v1/search` (k=10), each sending its next request when answered, --http-seconds per load; then
  again with --generated unit vectors (around 200 centres, generated IRMA codes) added to that index.
- batch-wait: the ONNX Runtime service at 20 clients with `--batch-wait-ms` 0, 2 and 5 (real index).
- sizes: for each archive size, unit vectors (512-d, the default embedding) with generated IRMA codes go
  into an engine; single queries (k=10) are timed for each index type, unfiltered and with filters of
  decreasing selectivity, beside the same FAISS index file searched directly ("bare FAISS"; filtered with
  an id selector of the matching ids, computed beforehand), scikit-learn's brute-force NearestNeighbors (for
  a filter: fitted on the matching vectors beforehand), and the memory-streaming bound (reading every vector
  once, summed by torch on all cores). Recall@10 is against the exact answer.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import httpx
import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cbmir.checkpoint import Checkpoint, load_checkpoint
from cbmir.datasets import Record, load_pixels
from cbmir.embed import Embedder, set_threads
from cbmir.graph import graph_for
from cbmir.index import Engine, Filters, ImageEntry, IndexPolicy, ModelStamp, automatic_type
from cbmir.search import Retrieval
from cbmir.service import ServiceSettings
from common import (
    DEFAULT_MODEL_NAME,
    RESULTS,
    OtherLoad,
    busy_process,
    command,
    cpu_description,
    exported_default_model,
    load_average,
    model_rate,
    one_image_latency,
    publish,
    saved_figure,
)
from indexer.pipeline import index_records, read_archive

DIMENSION, K, BATCH, CLUSTERS = 512, 10, 32, 200
RUNTIMES = ("torch", "onnx")
RUNTIME_NAMES = {"torch": "torch", "onnx": "ONNX Runtime"}
LOADS = {False: "idle", True: "busy"}
SECTIONS = ("model", "indexing", "http", "batch-wait", "sizes")
# From broad to selective: about 50%, 11% and 0.5% of a generated archive (see generated_codes).
FILTERS = {
    "none": None,
    "biology=7": Filters(biology="7"),
    "anatomy=5": Filters(anatomy="5"),
    "anatomy=52, biology=7": Filters(anatomy="52", biology="7"),
}
# The targets.
GOALS = {
    "model_ratio": 3.0,  # ONNX Runtime / torch, model only
    "indexing_images_per_second": 80.0,
    "one_client_p50_ms": 25.0,
    "twenty_clients_per_second": 60.0,
    "twenty_clients_p99_ms": 600.0,
}


# -- the model and the archive ----------------------------------------------------------------------------------


def model_and_inputs(archive: Path, model: Path | None, work: Path) -> dict:
    """The checkpoint (exported to ONNX), the archive's records and their prepared model inputs."""
    name, records = read_archive(archive)
    export_seconds = None
    if model is None:
        checkpoint, export_seconds = exported_default_model(work / "model", records, name)
        described = DEFAULT_MODEL_NAME
        print(f"default model saved and exported to ONNX in {export_seconds:.0f} s")
    else:
        checkpoint, described = load_checkpoint(model), str(model)
        graph_for(checkpoint)  # a checkpoint without a current graph is refused here, with what to run
    assert checkpoint.path is not None
    started = time.perf_counter()
    images = np.stack([checkpoint.pipeline(load_pixels(record)) for record in records])
    print(f"{len(images)} radiographs read and preprocessed in {time.perf_counter() - started:.0f} s")
    return {
        "archive": name,
        "records": records,
        "checkpoint": checkpoint,
        "images": images,
        "model": described,
        "model_path": str(checkpoint.path),
        "export_seconds": export_seconds,
    }


def embedder(checkpoint: Checkpoint, runtime: str) -> Embedder:
    return Embedder(checkpoint, runtime=runtime, batch_size=BATCH)  # type: ignore[arg-type]


# -- model only -------------------------------------------------------------------------------------------------


def model_only(checkpoint: Checkpoint, images: np.ndarray, runtime: str, busy: bool) -> dict:
    """Images/s at batch 32 and one-image latency of the model alone in `runtime`."""
    model = embedder(checkpoint, runtime)
    with OtherLoad() as other, busy_process(busy):
        rate = model_rate(model.embed_inputs, images, batch=BATCH, seconds=8.0)
        latency = one_image_latency(model.embed_inputs, images, runs=100, seconds=15.0)
    result = {"runtime": runtime, "busy": busy, "described": model.runtime_description, **rate, **latency}
    result["other_cores"] = other.cores
    print(
        f"model only, {RUNTIME_NAMES[runtime]}, {LOADS[busy]}: {rate['images_per_second']:.1f} images/s, one image "
        f"p50 {latency['p50_ms']:.1f} ms, p99 {latency['p99_ms']:.1f} ms ({model.runtime_description})"
    )
    return result


# -- indexing ---------------------------------------------------------------------------------------------------


def indexing(
    name: str,
    records: list[Record],
    checkpoint: Checkpoint,
    runtime: str,
    busy: bool,
    workers: int,
    folder: Path,
    model_only_rate: float | None,
) -> dict:
    """Index the archive into a fresh index in `folder` with `runtime`, idle or busy."""
    model = embedder(checkpoint, runtime)
    with OtherLoad() as other, busy_process(busy), Retrieval.open(folder, model) as retrieval:
        summary = index_records(records, retrieval, dataset=name, workers=workers, batch_size=BATCH, progress=False)
    seconds = dict(summary.seconds)
    cores = os.cpu_count() or 1
    rate = summary.indexed / summary.wall_seconds
    # Reading and preprocessing alone, spread over the worker processes (at most one core each): the fastest
    # the indexer could go if the model cost nothing.
    preparing = seconds["read"] + seconds["preprocess"]
    preparing_rate = summary.indexed / (preparing / min(workers, cores)) if preparing else float("inf")
    result: dict[str, Any] = {
        "runtime": runtime,
        "busy": busy,
        "indexed": summary.indexed,
        "failed": sum(summary.failed.values()),
        "wall_seconds": summary.wall_seconds,
        "images_per_second": rate,
        "stage_seconds": seconds,
        "read_preprocess_images_per_second": preparing_rate,
        "model_only_images_per_second": model_only_rate,
        "workers": workers,
        "other_cores": other.cores,
    }
    result.update(bound(result, cores))
    print(
        f"indexing, {RUNTIME_NAMES[runtime]}, {LOADS[busy]}: {rate:.1f} images/s; "
        + ", ".join(f"{stage} {value:.1f}" for stage, value in seconds.items())
        + f" s; read+preprocess alone {preparing_rate:.0f} images/s"
    )
    return result


def bound(row: dict, cores: int) -> dict:
    """What bounds an indexing run: its rate against the model-only rate, the rate if the workers' read and
    preprocess CPU seconds and the model's (model-only, on every core) shared the cores perfectly, the
    share of the CPU that reading and preprocessing take, and the bound: read+preprocess when it alone
    is slower than the model alone, both (the cores they share) when it takes at least 40% of the CPU, else
    the model."""
    model_only_rate = row["model_only_images_per_second"]
    if not model_only_rate:
        return {}
    preparing = row["stage_seconds"]["read"] + row["stage_seconds"]["preprocess"]
    model_core_seconds = row["indexed"] / model_only_rate * cores
    share = preparing / (preparing + model_core_seconds)
    if row["read_preprocess_images_per_second"] < model_only_rate:
        limit = "read+preprocess"
    elif share >= 0.4:
        limit = "the cores, shared by model and read+preprocess"
    else:
        limit = "model"
    return {
        "fraction_of_model_only": row["images_per_second"] / model_only_rate,
        "shared_cores_images_per_second": row["indexed"] * cores / (model_core_seconds + preparing),
        "read_preprocess_cpu_share": share,
        "bound": limit,
    }


def add_generated(folder: Path, stamp: ModelStamp, count: int) -> float:
    """Add `count` generated unit vectors (around CLUSTERS centres, generated IRMA codes) to the index in
    `folder` through the engine, under the model stamp of its real images; returns the seconds it took."""
    rng = np.random.default_rng(count)
    vectors, codes = unit_rows(count, rng, CLUSTERS), generated_codes(count, rng)
    started = time.perf_counter()
    with Engine.open(folder, model=stamp, policy=IndexPolicy(write_every=count + 1)) as engine:
        add_generated_rows(engine, vectors, codes)
        total = engine.stats()["count"]
    print(f"{count:,} generated vectors added in {time.perf_counter() - started:.0f} s: {total:,} images")
    return time.perf_counter() - started


# -- search ----------------------------------------------------------------------------------------------------


def generated_codes(count: int, rng: np.random.Generator) -> list[str]:
    """IRMA-shaped codes: anatomy uniform over 100-999 (first digit 1-9, two more 0-9), biology 7 for half
    of the images and 4, 5 or 8 for the rest."""
    directional = rng.choice(["110", "120", "121", "211", "220"], count)
    anatomy = rng.integers(100, 1000, count)
    biology = rng.choice(["700", "710", "400", "500", "800", "810"], count, p=[0.3, 0.2, 0.15, 0.15, 0.1, 0.1])
    return [f"1121-{d}-{a}-{b}" for d, a, b in zip(directional, anatomy, biology, strict=True)]


def unit_rows(count: int, rng: np.random.Generator, clusters: int = 0) -> np.ndarray:
    """Random unit vectors; with `clusters`, drawn around that many centres, as embeddings of radiographs
    gather around their classes (uniform random vectors in 512-d have no near neighbours to find, which
    would understate what approximate indexes reach)."""
    rows = rng.standard_normal((count, DIMENSION), dtype=np.float32)
    if clusters:
        centres = 3 * rng.standard_normal((clusters, DIMENSION), dtype=np.float32)
        rows += centres[rng.integers(0, clusters, count)]
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def add_generated_rows(engine: Engine, vectors: np.ndarray, codes: list[str]) -> None:
    """Add generated images (one per vector, with its code) through the engine, 20,000 per transaction."""
    for start in range(0, len(vectors), 20_000):
        engine.add(
            [
                ImageEntry(
                    location=f"generated/{i}",
                    content_hash=f"{i:064x}",
                    width=512,
                    height=512,
                    dataset="generated",
                    true_code=codes[i],
                    embedding=vectors[i],
                )
                for i in range(start, min(start + 20_000, len(vectors)))
            ]
        )


def build_store(folder: Path, vectors: np.ndarray, codes: list[str]) -> float:
    """Add the generated images through the engine (Flat); returns the seconds it took."""
    started = time.perf_counter()
    with Engine.open(
        folder,
        model=ModelStamp({"architecture": "generated"}, DIMENSION),
        index_type="Flat",
        policy=IndexPolicy(write_every=len(vectors) + 1),
    ) as engine:
        add_generated_rows(engine, vectors, codes)
    return time.perf_counter() - started


def timed(search, queries: np.ndarray) -> tuple[dict, list]:
    search(queries[0])  # warm-up
    durations: list[float] = []
    answers = []
    for query in queries:
        started = time.perf_counter()
        answers.append(search(query))
        durations.append(time.perf_counter() - started)
    seconds = np.array(durations)
    return {
        "p50_ms": float(np.median(seconds) * 1e3),
        "p99_ms": float(np.quantile(seconds, 0.99) * 1e3),
        "queries_per_second": float(len(seconds) / seconds.sum()),
    }, answers


def recall(answers: list, exact: list) -> float:
    return float(
        np.mean(
            [len(set(map(int, a)) & set(map(int, e))) / max(len(e), 1) for a, e in zip(answers, exact, strict=True)]
        )
    )


def stream_bound(vectors: np.ndarray) -> float:
    """Median seconds to read every vector once (torch sums them on all cores): no exact search can be faster."""
    tensor = torch.from_numpy(vectors)
    times = []
    for _ in range(7):
        started = time.perf_counter()
        tensor.sum()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def index_types(count: int, policy: IndexPolicy) -> list[str]:
    """Flat at every size; HNSW32 up to 10^5 (it builds at ~2,400 vectors/s here); IVF (lists as the
    automatic choice would pick them) from 10^5."""
    types = ["Flat"]
    if count <= 100_000:
        types.append("HNSW32")
    if count >= 100_000:
        types.append(automatic_type(count, IndexPolicy(hnsw_from=0, ivf_from=0)))
    return types


def search_size(count: int, queries_per_run: int, work: Path) -> dict:
    rng = np.random.default_rng(count)
    vectors, codes = unit_rows(count, rng, CLUSTERS), generated_codes(count, rng)
    # queries near stored vectors, as real queries are (a radiograph resembles some archive images)
    queries = vectors[rng.integers(0, count, queries_per_run)] + 0.5 * unit_rows(queries_per_run, rng)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    folder = work / f"generated-{count}"
    build_seconds = build_store(folder, vectors, codes)
    print(f"{count:,} vectors: stored in {build_seconds:.0f} s")
    policy = IndexPolicy()
    bound = stream_bound(vectors)
    rows, exact, open_seconds = [], {}, {}
    with Engine.open(folder) as engine:
        matching = {name: engine.query(f) if f else None for name, f in FILTERS.items()}
    for name, ids in matching.items():  # exact answers by numpy; store ids are 1..count in insertion order
        rows_of = slice(None) if ids is None else ids - 1
        candidates = np.arange(1, count + 1) if ids is None else ids
        scores = queries @ vectors[rows_of].T
        top = np.argsort(-scores, axis=1)[:, :K]
        exact[name] = [candidates[t] for t in top]
    for index_type in index_types(count, policy):
        started = time.perf_counter()
        with Engine.open(folder, index_type=index_type, policy=policy) as engine:
            open_seconds[index_type] = time.perf_counter() - started
            bare = faiss.read_index(str(folder / "vectors.faiss"))
            for name, filters in FILTERS.items():
                within = matching[name]
                figures, answers = timed(
                    lambda q, filters=filters: [hit.id for hit in engine.search(q, K, filters)], queries
                )
                bare_figures, bare_answers = timed(bare_search(bare, within, policy), queries)
                rows.append(
                    {
                        "index_type": index_type,
                        "filter": name,
                        "method": "cbmir engine",
                        "matching": count if within is None else len(within),
                        "recall_at_10": recall(answers, exact[name]),
                        **figures,
                    }
                )
                rows.append(
                    {
                        "index_type": index_type,
                        "filter": name,
                        "method": "bare FAISS",
                        "matching": rows[-1]["matching"],
                        "recall_at_10": recall(bare_answers, exact[name]),
                        **bare_figures,
                    }
                )
                print(
                    f"  {index_type:14} {name:22} engine p50 {figures['p50_ms']:7.2f} ms  "
                    f"bare FAISS {bare_figures['p50_ms']:7.2f} ms  recall {rows[-2]['recall_at_10']:.3f}"
                )
    for name, ids in matching.items():
        subset = vectors if ids is None else vectors[ids - 1]
        ids_of = np.arange(1, count + 1) if ids is None else ids
        neighbours = NearestNeighbors(n_neighbors=min(K, len(subset)), algorithm="brute").fit(subset)
        figures, answers = timed(
            lambda q, ids_of=ids_of, neighbours=neighbours: ids_of[
                neighbours.kneighbors(q[None], return_distance=False)[0]
            ],
            queries,
        )
        rows.append(
            {
                "index_type": "brute force",
                "filter": name,
                "method": "scikit-learn NearestNeighbors",
                "matching": len(subset),
                "recall_at_10": recall(answers, exact[name]),
                **figures,
            }
        )
        print(f"  scikit-learn   {name:22} p50 {figures['p50_ms']:7.2f} ms")
    return {
        "count": count,
        "store_seconds": build_seconds,
        "open_seconds": open_seconds,
        "stream_bound_ms": bound * 1e3,
        "rows": rows,
    }


def bare_search(index: faiss.Index, within: np.ndarray | None, policy: IndexPolicy):
    """Search the index file directly with FAISS, tuned like the engine (nprobe, efSearch)."""
    selector = None if within is None else faiss.IDSelectorBatch(within)
    if isinstance(index, faiss.IndexIVF):
        params = faiss.SearchParametersIVF(sel=selector, nprobe=min(index.nlist, policy.nprobe))
    elif isinstance(faiss.downcast_index(index.index), faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=policy.ef_search)
    else:
        params = faiss.SearchParameters(sel=selector)

    def search(query: np.ndarray) -> np.ndarray:
        _, ids = index.search(query[None], K, params=params)
        return ids[0][ids[0] >= 0]

    return search


# -- HTTP ------------------------------------------------------------------------------------------------------


@contextmanager
def served(folder: Path, model: str, runtime: str, options: list[str]) -> Iterator[tuple[str, dict]]:
    """`cbmir serve` over the index in `folder` in its own process (as in use), with `runtime` and `options`;
    yields its URL and the request headers once it is ready, stops it after."""
    token = "speed-benchmark-" + os.urandom(8).hex()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    arguments = ["serve", "--db", str(folder), "--model", model, "--port", str(port), "--runtime", runtime]
    environment = {key: value for key, value in os.environ.items() if not key.startswith("CBMIR_")}
    server = subprocess.Popen(
        [sys.executable, "-m", "cbmir", *arguments, *options], env={**environment, "CBMIR_TOKEN": token}
    )
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the service did not start")
            time.sleep(0.5)
        yield url, headers
    finally:
        server.terminate()
        server.wait(timeout=60)


def uploads_of(records: list[Record]) -> list[tuple[str, bytes]]:
    return [(record.path.name, record.path.read_bytes()) for record in records if record.index is None][:200]


def http_loads(
    folder: Path,
    model: str,
    runtime: str,
    uploads: list[tuple[str, bytes]],
    clients: list[int],
    seconds: float,
    options: list[str] | None = None,
) -> list[dict]:
    """Search the served index with each number of `clients` for `seconds` (after a few warm-up searches)."""
    results = []
    with OtherLoad() as other, served(folder, model, runtime, options or []) as (url, headers):
        with httpx.Client(base_url=url, headers=headers, timeout=120) as session:
            for name, data in uploads[:5]:
                session.post("/v1/search", files={"file": (name, data)}, data={"k": "10"}).raise_for_status()
            images = session.get("/ready").json()["images"]
        for count in clients:
            result = load(url, headers, uploads, count, seconds)
            results.append({"runtime": runtime, "index_images": images, "options": options or [], **result})
    for result in results:
        result["other_cores"] = other.cores  # over the server's whole life, start-up included
    return results


def load(url: str, headers: dict, uploads: list[tuple[str, bytes]], clients: int, seconds: float) -> dict:
    """`clients` concurrent clients searching for `seconds`: latency percentiles, throughput, errors."""
    latencies: list[float] = []
    failures: Counter[int] = Counter()  # by HTTP status
    stop = time.monotonic() + seconds

    def client(number: int) -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=120) as session:
            turn = number
            while time.monotonic() < stop:
                name, data = uploads[turn % len(uploads)]
                started = time.perf_counter()
                response = session.post("/v1/search", files={"file": (name, data)}, data={"k": "10"})
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    failures[response.status_code] += 1
                turn += clients

    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    elapsed = time.monotonic() - started
    result = {
        "clients": clients,
        "requests": len(latencies),
        "errors": dict(failures),
        "seconds": elapsed,
        "requests_per_second": len(latencies) / elapsed,
        "p50_ms": float(np.median(latencies) * 1e3),
        "p99_ms": float(np.quantile(latencies, 0.99) * 1e3),
    }
    print(
        f"HTTP, {clients} clients: {result['requests_per_second']:.1f} searches/s, p50 {result['p50_ms']:.0f} ms, "
        f"p99 {result['p99_ms']:.0f} ms, errors {dict(failures)}"
    )
    return result


# -- report ----------------------------------------------------------------------------------------------------


def pick(rows: list[dict], **match: Any) -> dict | None:
    return next((row for row in rows if all(row.get(key) == value for key, value in match.items())), None)


def ratio(onnx: dict | None, torch_row: dict | None, key: str) -> str:
    if not onnx or not torch_row or not torch_row.get(key):
        return ""
    return f"{onnx[key] / torch_row[key]:.2f}"


def plot_runtimes(results: dict, path: Path) -> None:
    """Images/s (model only, indexing) and one-image p50 per runtime, idle and busy."""
    panels = [
        ("model", "images_per_second", "model only, images/s (batch 32)"),
        ("indexing", "images_per_second", "indexing irma2007-dev, images/s"),
        ("model", "p50_ms", "model only, one image, p50 ms"),
    ]
    panels = [panel for panel in panels if results.get(panel[0])]
    if not panels:
        return
    with saved_figure(path, ncols=len(panels), figsize=(4 * len(panels), 4), squeeze=False) as (_, axes):
        for axis, (section, key, title) in zip(axes[0], panels, strict=True):
            positions = np.arange(len(RUNTIMES))
            for offset, busy, colour in ((-0.2, False, "tab:blue"), (0.2, True, "tab:red")):
                values = [(pick(results[section], runtime=r, busy=busy) or {}).get(key, 0.0) for r in RUNTIMES]
                bars = axis.bar(positions + offset, values, 0.4, color=colour, label=LOADS[busy])
                axis.bar_label(bars, fmt="%.0f", fontsize=8)
            axis.set_xticks(positions, [RUNTIME_NAMES[r] for r in RUNTIMES])
            axis.set_title(title, fontsize=10)
            axis.grid(True, axis="y", alpha=0.3)
            axis.legend(fontsize=8)


def verdict(met: bool) -> str:
    return "met" if met else "**not met**"


def markdown_model(results: dict, context: dict) -> list[str]:
    rows = results["model"]
    lines = [
        "### Model only",
        "",
        (
            f"Model: {context['model']}, input {context['input_size']} px; the `Embedder` on the {context['images']} "
            f"radiographs of `{context['archive']}` already preprocessed in memory: batches of {BATCH} for about "
            "8 s after a warm-up batch, and one image at a time (100 runs after warm-up, fewer where they would "
            'take over 15 s). Busy: one other process (`python -c "while True: pass"`) runs during the '
            f"measurement. Runtimes as cbmir configures them: {rows[0]['described']}; {rows[-1]['described']}. "
            "*Other programs' cores* (here and below): the cores that processes other than this benchmark and "
            "those it started kept busy during the measurement (from /proc/stat); near 0: the machine was ours."
        ),
        "",
        "| figure | torch idle | ONNX Runtime idle | ONNX Runtime / torch | torch busy | ONNX Runtime busy | "
        "ONNX Runtime / torch |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, name, digits in (
        ("images_per_second", f"images/s, batch {BATCH}", 1),
        ("p50_ms", "one image, p50 ms", 1),
        ("p99_ms", "one image, p99 ms", 1),
        ("other_cores", "other programs' cores during it", 2),
    ):
        cells = []
        for busy in (False, True):
            t, o = pick(rows, runtime="torch", busy=busy), pick(rows, runtime="onnx", busy=busy)
            versus = ratio(o, t, key) if key != "other_cores" else ""
            cells += [f"{t[key]:.{digits}f}" if t else "", f"{o[key]:.{digits}f}" if o else "", versus]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    goal = []
    for busy in (False, True):
        t, o = pick(rows, runtime="torch", busy=busy), pick(rows, runtime="onnx", busy=busy)
        if t and o:
            value = o["images_per_second"] / t["images_per_second"]
            goal.append(f"{LOADS[busy]} {value:.1f}× ({verdict(value >= GOALS['model_ratio'])})")
    lines += ["", f"Goal: ONNX Runtime ≥ {GOALS['model_ratio']:.0f}× torch, model only: " + "; ".join(goal) + ".", ""]
    return lines


def markdown_indexing(results: dict, context: dict) -> list[str]:
    rows = results["indexing"]
    lines = [
        "### Indexing",
        "",
        (
            f"`{context['archive']}` ({context['images']} radiographs) indexed by the batch indexer into a fresh "
            f"index per runtime and load, {rows[0]['workers']} reader/preprocessor processes, batches of {BATCH}. "
            "Seconds per stage: read and preprocess summed over the worker processes. *Read+preprocess alone*: "
            "the indexed images over those seconds spread on the workers, the fastest indexing could go if the "
            "model cost nothing; *shared cores*: the rate if the model's CPU seconds (model-only, on every core) "
            "and the workers' shared the cores perfectly. Bound: read+preprocess where it alone is slower than the "
            "model alone; the cores, shared by both, where read+preprocess takes at least 40% of the CPU; else the "
            "model."
        ),
        "",
        "| runtime | load | indexed (failed) | images/s | model-only images/s | indexing / model-only | "
        "read+preprocess alone, images/s | shared cores, images/s | read s | preprocess s | model s | write s | "
        "bound | other programs' cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = row["stage_seconds"]
        fraction = f"{row['fraction_of_model_only']:.0%}" if "fraction_of_model_only" in row else ""
        model_rate_text = f"{row['model_only_images_per_second']:.1f}" if row["model_only_images_per_second"] else ""
        shared = f"{row['shared_cores_images_per_second']:.0f}" if "shared_cores_images_per_second" in row else ""
        lines.append(
            f"| {RUNTIME_NAMES[row['runtime']]} | {LOADS[row['busy']]} | {row['indexed']} ({row['failed']}) | "
            f"**{row['images_per_second']:.1f}** | {model_rate_text} | {fraction} | "
            f"{row['read_preprocess_images_per_second']:.0f} | {shared} | {s['read']:.1f} | {s['preprocess']:.1f} | "
            f"{s['model']:.1f} | {s['write']:.1f} | {row.get('bound', '')} | {row['other_cores']:.2f} |"
        )
    notes = []
    for busy in (False, True):
        t, o = pick(rows, runtime="torch", busy=busy), pick(rows, runtime="onnx", busy=busy)
        if t and o:
            notes.append(f"{LOADS[busy]} {o['images_per_second'] / t['images_per_second']:.2f}×")
        if o:
            target = GOALS["indexing_images_per_second"]
            notes.append(
                f"ONNX Runtime {LOADS[busy]} {o['images_per_second']:.1f} images/s against {target:.0f} "
                f"({verdict(o['images_per_second'] >= target)})"
            )
    lines += ["", "Indexing, ONNX Runtime / torch, and the goal of ≥ 80 images/s: " + "; ".join(notes) + "."]
    for row in rows:
        if row.get("bound", "model") == "model":
            continue
        s = row["stage_seconds"]
        lines.append(
            f"- {RUNTIME_NAMES[row['runtime']]} {LOADS[row['busy']]}: read+preprocess is a bound: "
            f"{s['read']:.1f} + {s['preprocess']:.1f} CPU seconds, {row['read_preprocess_cpu_share']:.0%} of the "
            f"CPU the run needs (with the model's {row['indexed'] / row['model_only_images_per_second']:.1f} s on "
            f"every core); alone on the workers it would allow {row['read_preprocess_images_per_second']:.0f} "
            f"images/s, and shared with the model {row['shared_cores_images_per_second']:.0f} images/s, so a "
            "faster model alone cannot bring indexing to the goal on these cores."
        )
    if all(row.get("bound", "model") == "model" for row in rows):
        lines.append("The model is the bound in every row (read+preprocess takes under 40% of the CPU).")
    return [*lines, ""]


def markdown_http(results: dict, context: dict) -> list[str]:
    rows = results.get("http") or []
    lines = [
        "### End-to-end HTTP search",
        "",
        (
            f"`cbmir serve --runtime R` (`--max-batch {results.get('max_batch', 16)} --batch-wait-ms "
            f"{results.get('batch_wait_ms', 2):g}`, the defaults of this run) over the index of the ONNX "
            f"Runtime idle indexing ({context['images']} radiographs), then with "
            f"{results.get('generated', 0):,} generated unit vectors (around {CLUSTERS} centres, generated IRMA "
            f"codes) added to that index through the engine"
            + (f" in {results['generated_seconds']:.0f} s" if results.get("generated_seconds") else "")
            + "; the server in its own process. Each client uploads a radiograph of the archive to "
            "`POST /v1/search` (k=10) and sends the next when answered, for "
            f"{results['http_seconds']:.0f} s per row. Latency includes the upload, reading, preprocessing, the model, "
            "the search and the JSON answer."
        ),
        "",
        "| index images | clients | runtime | requests | errors | searches/s | p50 ms | p99 ms | "
        "searches/s ONNX Runtime / torch | p50 torch / ONNX Runtime | other programs' cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for images in dict.fromkeys(r["index_images"] for r in rows):
        for clients in dict.fromkeys(r["clients"] for r in rows):
            t = pick(rows, runtime="torch", index_images=images, clients=clients)
            o = pick(rows, runtime="onnx", index_images=images, clients=clients)
            for row in (t, o):
                if row is None:
                    continue
                speedup = ratio(o, t, "requests_per_second") if row is o else ""
                faster = f"{t['p50_ms'] / o['p50_ms']:.2f}" if row is o and t and o else ""
                lines.append(
                    f"| {images:,} | {clients} | {RUNTIME_NAMES[row['runtime']]} | {row['requests']} | "
                    f"{sum(row['errors'].values())} | {row['requests_per_second']:.1f} | {row['p50_ms']:.0f} | "
                    f"{row['p99_ms']:.0f} | {speedup} | {faster} | {row['other_cores']:.2f} |"
                )
    goals = []
    for images in dict.fromkeys(r["index_images"] for r in rows):
        one = pick(rows, runtime="onnx", index_images=images, clients=1)
        many = pick(rows, runtime="onnx", index_images=images, clients=20)
        if one:
            goals.append(
                f"{images:,} images, 1 client p50 {one['p50_ms']:.0f} ms against ≤ {GOALS['one_client_p50_ms']:.0f} "
                f"({verdict(one['p50_ms'] <= GOALS['one_client_p50_ms'])})"
            )
        if many:
            met = (
                many["requests_per_second"] >= GOALS["twenty_clients_per_second"]
                and many["p99_ms"] <= GOALS["twenty_clients_p99_ms"]
                and not many["errors"]
            )
            goals.append(
                f"{images:,} images, 20 clients {many['requests_per_second']:.1f} searches/s, p99 "
                f"{many['p99_ms']:.0f} ms, {sum(many['errors'].values())} errors against ≥ "
                f"{GOALS['twenty_clients_per_second']:.0f}/s, ≤ {GOALS['twenty_clients_p99_ms']:.0f} ms, 0 "
                f"({verdict(met)})"
            )
    if goals:
        lines += ["", "Goals, ONNX Runtime: " + "; ".join(goals) + "."]
    return [*lines, ""]


def markdown_batch_wait(results: dict) -> list[str]:
    rows = results["batch_wait"]
    best = max(rows, key=lambda r: (not r["errors"], r["requests_per_second"]))
    lines = [
        "### Micro-batching wait",
        "",
        (
            f"The ONNX Runtime service over the real index at {rows[0]['clients']} clients, "
            f"{results['http_seconds']:.0f} s each, with `--batch-wait-ms` (how long a model run waits for more "
            "searches to join it; `--max-batch 16`)."
        ),
        "",
        "| --batch-wait-ms | requests | errors | searches/s | p50 ms | p99 ms | other programs' cores |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['batch_wait_ms']:g} | {r['requests']} | {sum(r['errors'].values())} | "
            f"{r['requests_per_second']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['other_cores']:.2f} |"
            for r in rows
        ),
        "",
        f"Most searches/s: `--batch-wait-ms {best['batch_wait_ms']:g}` ({best['requests_per_second']:.1f}/s, "
        f"p99 {best['p99_ms']:.0f} ms); the service's default is "
        f"{ServiceSettings.model_fields['batch_wait_ms'].default:g} ms.",
        "",
    ]
    return lines


def markdown(results: dict, context: dict | None, runtime_plot: str | None, sizes_plot: str | None) -> str:
    lines: list[str] = []
    if context:
        if runtime_plot:
            lines += [f"![runtimes, idle and busy]({runtime_plot})", ""]
        if results.get("model"):
            lines += markdown_model(results, context)
        if results.get("indexing"):
            lines += markdown_indexing(results, context)
        if results.get("http"):
            lines += markdown_http(results, context)
        if results.get("batch_wait"):
            lines += markdown_batch_wait(results)
    if results.get("search"):
        lines += markdown_sizes(results["search"], sizes_plot or "")
    return "\n".join(lines)


def plot_sizes(sizes: list[dict], path: Path) -> None:
    counts = [size["count"] for size in sizes]
    lines = [
        ("cbmir engine", "Flat", "none"),
        ("cbmir engine", "Flat", "anatomy=5"),
        ("bare FAISS", "Flat", "none"),
        ("bare FAISS", "Flat", "anatomy=5"),
        ("scikit-learn NearestNeighbors", "brute force", "none"),
    ]
    with saved_figure(path, figsize=(7, 4.5)) as (_, axis):
        for method, index_type, name in lines:
            values = [
                next(
                    r["p50_ms"]
                    for r in size["rows"]
                    if (r["method"], r["index_type"], r["filter"]) == (method, index_type, name)
                )
                for size in sizes
            ]
            axis.plot(counts, values, marker="o", label=f"{method}, {index_type}, filter {name}")
        axis.plot(counts, [size["stream_bound_ms"] for size in sizes], "k--", label="memory-streaming bound")
        axis.set(
            xscale="log",
            yscale="log",
            xlabel="archive size (vectors, 512-d)",
            ylabel="p50 latency per query (ms)",
            title="Single-query search latency, k=10, 2 CPU cores",
        )
        axis.legend(fontsize=8)
        axis.grid(True, which="both", alpha=0.3)


def markdown_sizes(sizes: list[dict], plot_name: str) -> list[str]:
    lines: list[str] = []
    lines += [
        "### Search latency",
        "",
        (
            f"Single queries, k=10, over generated 512-d unit vectors around {CLUSTERS} centres (as embeddings "
            "gather around their classes), with generated IRMA codes; "
            "filters match about 50% (biology=7), 11% (anatomy=5) and 0.5% (anatomy=52, biology=7) of the archive. "
            "Ratios: to bare FAISS on the same index type and filter, to the same method unfiltered, and to the "
            "memory-streaming bound."
        ),
        "",
        f"![latency vs archive size]({plot_name})",
        "",
    ]
    for size in sizes:
        built = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in size["open_seconds"].items())
        lines += [
            (
                f"**{size['count']:,} vectors**: stored through the engine in {size['store_seconds']:.0f} s; "
                f"index built at open: {built}; reading every vector once takes {size['stream_bound_ms']:.2f} ms."
            ),
            "",
            (
                "| index | filter (matching) | method | p50 ms | p99 ms | queries/s | recall@10 | × bare FAISS | "
                "× unfiltered | × stream bound |"
            ),
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in size["rows"]:
            bare = next(
                (
                    r
                    for r in size["rows"]
                    if r["method"] == "bare FAISS"
                    and r["index_type"] == row["index_type"]
                    and r["filter"] == row["filter"]
                ),
                None,
            )
            unfiltered = next(
                r
                for r in size["rows"]
                if r["method"] == row["method"] and r["index_type"] == row["index_type"] and r["filter"] == "none"
            )
            versus_bare = f"{row['p50_ms'] / bare['p50_ms']:.2f}" if bare and row["method"] == "cbmir engine" else ""
            versus_unfiltered = f"{row['p50_ms'] / unfiltered['p50_ms']:.2f}" if row["filter"] != "none" else ""
            lines.append(
                f"| {row['index_type']} | {row['filter']} ({row['matching']:,}) | {row['method']} | "
                f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['queries_per_second']:.0f} | "
                f"{row['recall_at_10']:.3f} | {versus_bare} | {versus_unfiltered} | "
                f"{row['p50_ms'] / size['stream_bound_ms']:.2f} |"
            )
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, help="radiographs to index and to search with over HTTP")
    parser.add_argument(
        "--model", type=Path, help="checkpoint folder with a current ONNX graph (default: an untrained CPU default)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, nargs="*", default=[1, 20], help="concurrent HTTP clients")
    parser.add_argument("--http-seconds", type=float, default=20, help="duration of each HTTP load")
    parser.add_argument("--generated", type=int, default=100_000, help="generated vectors added for the HTTP rows")
    parser.add_argument("--batch-waits", type=float, nargs="*", default=[0, 2, 5], help="--batch-wait-ms values")
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=100, help="timed queries per configuration")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections not to run")
    parser.add_argument("--publish", action="store_true", help="rewrite BENCHMARKS.md even when sections are skipped")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: render results/speed.json again (plots and section, with its command and date)",
    )
    args = parser.parse_args()
    if args.render_only:
        render_again()
        return
    set_threads(None)  # cbmir's policy: every core (as `cbmir serve` and `cbmir index` do without $CBMIR_THREADS)
    skip = set(args.skip)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "http_seconds": args.http_seconds,
        "cpu": cpu_description(),
        "load_average_before": load_average(),
    }
    if results["load_average_before"] > 0.5:
        print(f"warning: the one-minute load average is {results['load_average_before']:.2f}: the machine is not idle")
    archive_sections = {"model", "indexing", "http", "batch-wait"} - skip
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        if args.archive and archive_sections:
            context = model_and_inputs(args.archive, args.model, work)
            checkpoint, images, records = context["checkpoint"], context["images"], context["records"]
            results["setup"] = {
                "archive": context["archive"],
                "images": len(images),
                "input_size": int(images.shape[1]),
                "model": context["model"],
                "model_path": context["model_path"],
                "export_seconds": context["export_seconds"],
            }
            if "model" in archive_sections:
                results["model"] = [
                    model_only(checkpoint, images, runtime, busy) for runtime in RUNTIMES for busy in (False, True)
                ]
            served_index = work / "index-onnx-idle"
            results["indexing"] = []
            for runtime in RUNTIMES:
                for busy in (False, True):
                    if "indexing" in skip and (runtime, busy) != ("onnx", False):
                        continue  # the HTTP sections still need the index they serve
                    if "indexing" in skip and not {"http", "batch-wait"} & archive_sections:
                        continue
                    rate = (pick(results.get("model") or [], runtime=runtime, busy=busy) or {}).get("images_per_second")
                    folder = work / f"index-{runtime}-{LOADS[busy]}"
                    row = indexing(context["archive"], records, checkpoint, runtime, busy, args.workers, folder, rate)
                    results["indexing"].append(row)
            uploads = uploads_of(records)
            model_path = context["model_path"]
            if "http" in archive_sections:
                service_defaults = ServiceSettings.model_fields
                results["max_batch"] = service_defaults["max_batch"].default
                results["batch_wait_ms"] = service_defaults["batch_wait_ms"].default
                results["http"] = [
                    row
                    for runtime in RUNTIMES
                    for row in http_loads(served_index, model_path, runtime, uploads, args.clients, args.http_seconds)
                ]
            if "batch-wait" in archive_sections:
                results["batch_wait"] = []
                for wait in args.batch_waits:
                    options = ["--batch-wait-ms", f"{wait:g}"]
                    row = http_loads(served_index, model_path, "onnx", uploads, [20], args.http_seconds, options)[0]
                    results["batch_wait"].append({**row, "batch_wait_ms": wait})
            if "http" in archive_sections and args.generated:
                stamp = ModelStamp(checkpoint.stamp, checkpoint.model.embedding_dim)
                results["generated"] = args.generated
                results["generated_seconds"] = add_generated(served_index, stamp, args.generated)
                results["http"] += [
                    row
                    for runtime in RUNTIMES
                    for row in http_loads(served_index, model_path, runtime, uploads, args.clients, args.http_seconds)
                ]
        results["search"] = [] if "sizes" in skip else [search_size(n, args.queries, work) for n in args.sizes]
    results["seconds"] = time.perf_counter() - started
    print(f"speed benchmark: {results['seconds'] / 60:.1f} minutes")
    setup = results.get("setup")
    full = bool(args.archive) and not skip
    RESULTS.mkdir(exist_ok=True)
    if not (full or args.publish):
        text = markdown(results, setup, None, None)
        partial = {"command": command(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **results}
        (RESULTS / "speed-partial.json").write_text(json.dumps(partial, indent=2, sort_keys=True) + "\n")
        print(text)
        print("(sections skipped: written to benchmarks/results/speed-partial.json, BENCHMARKS.md left alone)")
        return
    runtime_plot = sizes_plot = None
    if setup and (results.get("model") or results.get("indexing")):
        plot_runtimes(results, RESULTS / "speed-runtimes.png")
        runtime_plot = "benchmarks/results/speed-runtimes.png"
    if results["search"]:
        plot_sizes(results["search"], RESULTS / "speed-latency.png")
        sizes_plot = "benchmarks/results/speed-latency.png"
    text = markdown(results, setup, runtime_plot, sizes_plot)
    publish("speed", results, text)
    print(text)


def render_again() -> None:
    """The plots and the section of results/speed.json, with derived figures computed again."""
    results = json.loads((RESULTS / "speed.json").read_text())
    stamp = {key: results.pop(key) for key in ("command", "date", "machine")}
    for row in results.get("indexing") or []:
        row.update(bound(row, int(stamp["machine"].split()[0])))
    runtime_plot = sizes_plot = None
    if results.get("setup") and (results.get("model") or results.get("indexing")):
        plot_runtimes(results, RESULTS / "speed-runtimes.png")
        runtime_plot = "benchmarks/results/speed-runtimes.png"
    if results.get("search"):
        plot_sizes(results["search"], RESULTS / "speed-latency.png")
        sizes_plot = "benchmarks/results/speed-latency.png"
    text = markdown(results, results.get("setup"), runtime_plot, sizes_plot)
    publish("speed", results, text, stamp=stamp)
    print(text)


if __name__ == "__main__":
    main()
