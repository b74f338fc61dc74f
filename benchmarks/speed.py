"""Speed benchmark: indexing throughput on real radiographs and search latency on generated archives, each
beside its reference measured in the same run.

    python benchmarks/speed.py --archive ../shared/data/irma2007-dev

Indexing: the archive is indexed by the batch indexer into a fresh index (seconds per stage: read and
preprocess summed over the worker processes, model, write), against the model-only rate (the same model
over the same images already preprocessed in memory, the same batch size): what indexing would reach if
reading and preprocessing cost nothing. Without --model, an untrained model of the CPU default
(architecture, embedding, preprocessing) is used: the weights do not change the speed.

Search: for each archive size, unit vectors (512-d, the default embedding) with generated IRMA codes go
into an engine; single queries (k=10) are timed for each index type, unfiltered and with filters of
decreasing selectivity, beside the same FAISS index file searched directly ("bare FAISS"; filtered with an
id selector of the matching ids, computed beforehand), scikit-learn's brute-force NearestNeighbors (for a
filter: fitted on the matching vectors beforehand), and the memory-streaming bound (reading every vector
once, summed by torch on all cores). Recall@10 is against the exact answer.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faiss
import httpx
import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cbmir.checkpoint import Checkpoint, load_checkpoint, new_card, save_checkpoint
from cbmir.datasets import load_pixels
from cbmir.embed import Embedder
from cbmir.imaging.preprocess import preset
from cbmir.index import Engine, Filters, ImageEntry, IndexPolicy, ModelStamp, automatic_type
from cbmir.labels import LabelSchema
from cbmir.models import create_model
from cbmir.search import Retrieval
from cbmir.train import TrainConfig
from common import RESULTS, publish, saved_figure
from indexer.pipeline import index_records, read_archive

DIMENSION, K, BATCH, CLUSTERS = 512, 10, 32, 200
# From broad to selective: about 50%, 11% and 0.5% of a generated archive (see generated_codes).
FILTERS = {
    "none": None,
    "biology=7": Filters(biology="7"),
    "anatomy=5": Filters(anatomy="5"),
    "anatomy=52, biology=7": Filters(anatomy="52", biology="7"),
}


# -- indexing --------------------------------------------------------------------------------------------------


def default_checkpoint(records) -> Checkpoint:
    """An untrained model of the CPU default for these records' labels (ImageNet trunk, random heads)."""
    config = TrainConfig()
    schema = LabelSchema.from_labels(
        "irma-axes" if all(r.labels for r in records) else "single-label",
        [r.labels or ("unlabelled",) for r in records],
    )
    model = create_model(config.model, schema.head_sizes, pretrained=True, embedding_dim=config.embedding_dim).eval()
    return Checkpoint(model, new_card(model, schema, preset(config.preset, size=model.input_size)))


def indexing(archive: Path, model: Path | None, workers: int, work: Path) -> dict:
    """Index the archive into work/index (kept for the HTTP section, with the checkpoint in work/model)."""
    name, records = read_archive(archive)
    if model is None:
        checkpoint = default_checkpoint(records)
        model = save_checkpoint(work / "model", checkpoint.model, checkpoint.card)
        described = f"untrained {TrainConfig().model} (CPU default)"
    else:
        checkpoint, described = load_checkpoint(model), str(model)
    embedder = Embedder(checkpoint, batch_size=BATCH)
    with Retrieval.open(work / "index", embedder) as retrieval:
        summary = index_records(records, retrieval, dataset=name, workers=workers, batch_size=BATCH)
    print(summary.text())
    images = [embedder.prepare(load_pixels(record)) for record in records]
    embedder.embed_inputs(images[:BATCH])  # warm-up
    started = time.perf_counter()
    embedder.embed_inputs(images)
    model_seconds = time.perf_counter() - started
    sizes = [max(image.shape[:2]) for image in images]
    result: dict[str, Any] = {
        "archive": name,
        "images": len(records),
        "indexed": summary.indexed,
        "failed": sum(summary.failed.values()),
        "model": described,
        "model_path": str(model),
        "input_size": int(sizes[0]),
        "workers": workers,
        "batch_size": BATCH,
        "wall_seconds": summary.wall_seconds,
        "images_per_second": summary.indexed / summary.wall_seconds,
        "stage_seconds": summary.seconds,
        "model_only_seconds": model_seconds,
        "model_only_images_per_second": len(images) / model_seconds,
    }
    result["fraction_of_model_only"] = result["images_per_second"] / result["model_only_images_per_second"]
    # The model alone keeps every core busy, so reading and preprocessing cannot hide behind it: their CPU
    # time comes out of the model's. The best overlap reachable is then this fraction of the model-only rate.
    model_core_seconds = model_seconds * torch.get_num_threads()
    result["overlap_ceiling"] = model_core_seconds / (
        model_core_seconds + summary.seconds["read"] + summary.seconds["preprocess"]
    )
    print(
        f"model only: {result['model_only_images_per_second']:.1f} images/s; indexing reaches "
        f"{result['fraction_of_model_only']:.0%} of it"
    )
    return result


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


def build_store(folder: Path, vectors: np.ndarray, codes: list[str]) -> float:
    """Add the generated images through the engine (Flat); returns the seconds it took."""
    started = time.perf_counter()
    with Engine.open(
        folder,
        model=ModelStamp({"architecture": "generated"}, DIMENSION),
        index_type="Flat",
        policy=IndexPolicy(write_every=len(vectors) + 1),
    ) as engine:
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


def http_load(work: Path, model: str, archive: Path, clients: list[int], seconds: float) -> list[dict]:
    """Serve work/index with `cbmir serve` (its own process, as in use) and search it by uploading the
    archive's radiographs from `clients` concurrent clients, each sending its next request when the
    previous one is answered, for `seconds` per setting."""
    token = "speed-benchmark-" + os.urandom(8).hex()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "cbmir", "serve", "--db", str(work / "index"), "--model", model, "--port", str(port)],
        env={**os.environ, "CBMIR_TOKEN": token},
    )
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    _, records = read_archive(archive)
    uploads = [(record.path.name, record.path.read_bytes()) for record in records if record.index is None][:200]
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the service did not start")
            time.sleep(0.5)
        results = [load(url, headers, uploads, count, seconds) for count in clients]
        return results
    finally:
        server.terminate()
        server.wait(timeout=60)


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


def plot(sizes: list[dict], path: Path) -> None:
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


def markdown(index_result: dict | None, http: list[dict], sizes: list[dict], plot_name: str) -> str:
    lines = []
    if index_result:
        r = index_result
        stages = ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in r["stage_seconds"].items())
        lines += [
            "### Indexing",
            "",
            (
                f"Archive `{r['archive']}` ({r['images']} radiographs, model input {r['input_size']} px), model: "
                f"{r['model']}, {r['workers']} reader/preprocessor processes, batches of {r['batch_size']}."
            ),
            "",
            "| figure | value |",
            "|---|---|",
            f"| indexed | {r['indexed']} ({r['failed']} failed) in {r['wall_seconds']:.1f} s |",
            f"| indexing rate | **{r['images_per_second']:.1f} images/s** |",
            "| model-only rate (same images preprocessed in memory) | "
            f"{r['model_only_images_per_second']:.1f} images/s |",
            f"| indexing / model-only | **{r['fraction_of_model_only']:.0%}** (goal ≥ 70%) |",
            (
                f"| ceiling when the model alone fills every core: model core-seconds / (those + read + preprocess) "
                f"| {r['overlap_ceiling']:.0%} |"
            ),
            f"| seconds per stage (read and preprocess summed over workers) | {stages} |",
            "",
        ]
    if http:
        lines += [
            "### End-to-end HTTP search",
            "",
            (
                "`cbmir serve` over that index, in its own process; each client uploads a radiograph of the archive "
                "to `POST /v1/search` (k=10) and sends the next when answered. Latency includes the upload, reading, "
                "preprocessing, the model, the search and the JSON answer."
            ),
            "",
            "| clients | requests | errors | searches/s | p50 ms | p99 ms |",
            "|---|---|---|---|---|---|",
            *(
                f"| {r['clients']} | {r['requests']} | {sum(r['errors'].values())} | {r['requests_per_second']:.1f} | "
                f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} |"
                for r in http
            ),
            "",
        ]
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
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", type=Path, help="radiographs to index and to search with over HTTP")
    parser.add_argument("--model", type=Path, help="checkpoint folder (default: an untrained CPU-default model)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, nargs="*", default=[1, 20], help="concurrent HTTP clients")
    parser.add_argument("--http-seconds", type=float, default=60, help="duration of each HTTP load")
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=100, help="timed queries per configuration")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        index_result, http = None, []
        if args.archive:
            index_result = indexing(args.archive, args.model, args.workers, work)
            http = http_load(work, index_result["model_path"], args.archive, args.clients, args.http_seconds)
        sizes = [search_size(count, args.queries, work) for count in args.sizes]
    RESULTS.mkdir(exist_ok=True)
    if sizes:
        plot(sizes, RESULTS / "speed-latency.png")
    publish(
        "speed",
        {"indexing": index_result, "http": http, "search": sizes},
        markdown(index_result, http, sizes, "benchmarks/results/speed-latency.png"),
    )


if __name__ == "__main__":
    main()
