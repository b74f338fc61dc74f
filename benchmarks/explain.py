"""Explanation maps ("why these match", cbmir.explain): what a pair costs in the service, and sanity checks
that the maps say something about the pair and the trained model.

    python benchmarks/explain.py ../shared/data/irma2007-dev --tables ../shared/data/irma-code-tables

The default CPU model is trained as the retrieval benchmark trains it (70/10/20 split, seed 0) into
`--work`/model, or reused when it is already there. Its training and validation images are indexed
(ONNX Runtime, as the service searches); each of `--pairs` test images is a query, paired with its nearest
indexed image (the first neighbour the page shows) and with a random indexed image.

Time per pair goes through the service's own code (`Explanations.by_id`: both images read again and
prepared, one torch run of the pair, two thumbnail-sized PNG overlays), cold and then cached, after the
model's one-time load (timed apart). Sanity checks (Adebayo et al., 2018): the maps are not constant (their
standard deviation within a map), maps of one query with two different neighbours differ, and maps computed
with randomised weights (the same architecture, freshly initialised) differ from the trained model's on the
same pairs; all as mean absolute differences of agreement maps on the model's grid (agreement is a cosine,
0..1). Figure: a few queries and their nearest neighbour with both overlays (results/explain-examples.png).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cbmir.checkpoint import load_checkpoint
from cbmir.datasets import open_dataset
from cbmir.embed import Embedder
from cbmir.errors import CbmirError
from cbmir.explain import Explainer
from cbmir.index import Filters
from cbmir.irma import CodeTables
from cbmir.models import create_model
from cbmir.search import Retrieval
from cbmir.service.catalog import Catalog
from cbmir.service.explanations import Explanations
from cbmir.train import make_config, train
from common import OtherLoad, publish, saved_figure
from indexer.pipeline import index_records

SPLIT = (0.7, 0.1, 0.2)
EXAMPLES = 4
GALLERY, QUERIES = "gallery", "queries"
FIGURE = "explain-examples.png"


def checkpoint_folder(args) -> Path:
    """The default CPU model in `--work`/model: reused when it is there, else trained."""
    folder = args.work / "model"
    try:
        load_checkpoint(folder)
        print(f"reusing the model in {folder}")
    except CbmirError:
        shutil.rmtree(folder, ignore_errors=True)
        print(f"training the default CPU model into {folder}")
        tables = CodeTables.load(args.tables) if args.tables else None
        train(open_dataset(args.dataset), make_config(split=SPLIT, seed=args.seed), folder, tables=tables)
    return folder


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def run(args) -> dict:
    folder = checkpoint_folder(args)
    checkpoint = load_checkpoint(folder)
    dataset = open_dataset(args.dataset)
    split = json.loads((folder / "split.json").read_text())
    by_id = {record.id: record for record in dataset.records}
    gallery = [by_id[i] for i in split["train"] + split["validation"]]
    queries = [by_id[i] for i in split["test"]]
    rng = np.random.default_rng(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work) as db:
        retrieval = Retrieval.open(Path(db), Embedder(checkpoint))
        print(f"indexing {len(gallery)} gallery images ({retrieval.embedder.runtime_description})")
        index_records(gallery, retrieval, dataset=GALLERY, workers=1, progress=False)
        chosen = [queries[i] for i in rng.choice(len(queries), min(args.pairs, len(queries)), replace=False)]
        index_records(chosen, retrieval, dataset=QUERIES, workers=1, progress=False)
        catalog = Catalog(retrieval, None, max_pixels=50_000_000, max_decoding=2)
        explanations = Explanations(catalog, folder)
        gallery_ids = [int(i) for i in catalog.engine.query(Filters(dataset=GALLERY))]
        query_ids = [int(i) for i in catalog.engine.query(Filters(dataset=QUERIES))]
        started = time.perf_counter()
        explanations.explainer()
        load_seconds = time.perf_counter() - started
        pairs, cold, cached = [], [], []
        with OtherLoad() as other_load:
            for query in query_ids:
                nearest = catalog.engine.search_by_id(query, 1, Filters(dataset=GALLERY))[0].id
                other = int(rng.choice([i for i in gallery_ids if i != nearest]))
                pairs.append((query, nearest, other))
                cold.append(explanations.by_id(query, nearest).milliseconds)
                timed = time.perf_counter()
                explanations.by_id(query, nearest)
                cached.append((time.perf_counter() - timed) * 1e3)
        sanity = sanity_checks(catalog, explanations.explainer(), checkpoint.model, pairs)
        examples(catalog, explanations, pairs[:EXAMPLES], args.work / FIGURE)
        runtime = retrieval.embedder.runtime_description
        retrieval.close()
    return {
        "dataset": dataset.name,
        "examples_figure": str(args.work / FIGURE),
        "pairs": len(pairs),
        "model": checkpoint.card["architecture"]["name"],
        "input_size": checkpoint.model.input_size,
        "stages": list(explanations.explainer().stages),
        "search_runtime": runtime,
        "torch_threads": torch.get_num_threads(),
        "model_load_seconds": load_seconds,
        "cold_ms": summary(cold),
        "cached_ms": summary(cached),
        "other_load_cores": other_load.cores,
        **sanity,
    }


def summary(values: list[float]) -> dict[str, float]:
    array = np.array(values)
    return {"p50": float(np.median(array)), "p90": float(np.quantile(array, 0.9)), "mean": float(array.mean())}


def sanity_checks(catalog: Catalog, trained: Explainer, model, pairs: list[tuple[int, int, int]]) -> dict:
    """Non-constancy, pair dependence and weight dependence of the maps, as numbers (see the docstring)."""
    torch.manual_seed(0)
    randomised = Explainer(create_model(**model.config, pretrained=False))
    inputs = {}

    def prepared(image_id: int) -> np.ndarray:
        if image_id not in inputs:
            inputs[image_id] = catalog.prepare_indexed(catalog.row(image_id))
        return inputs[image_id]

    spread, nearest_vs_other, trained_vs_random, nearest_mean, other_mean = [], [], [], [], []
    for query, nearest, other in pairs:
        with_nearest = trained.agreement(prepared(query), prepared(nearest))
        with_other = trained.agreement(prepared(query), prepared(other))
        random_maps = randomised.agreement(prepared(query), prepared(nearest))
        spread.append(float(with_nearest.query.std()))
        nearest_vs_other.append(mean_abs(with_nearest.query, with_other.query))
        trained_vs_random.append(
            (mean_abs(with_nearest.query, random_maps.query) + mean_abs(with_nearest.neighbour, random_maps.neighbour))
            / 2
        )
        nearest_mean.append(float(with_nearest.query.mean()))
        other_mean.append(float(with_other.query.mean()))
    return {
        "within_map_std": float(np.mean(spread)),
        "different_pairs_mad": float(np.mean(nearest_vs_other)),
        "different_pairs_mad_min": float(np.min(nearest_vs_other)),
        "trained_vs_random_mad": float(np.mean(trained_vs_random)),
        "trained_vs_random_mad_min": float(np.min(trained_vs_random)),
        "mean_agreement_nearest": float(np.mean(nearest_mean)),
        "mean_agreement_random": float(np.mean(other_mean)),
    }


def examples(catalog: Catalog, explanations: Explanations, pairs: list[tuple[int, int, int]], path: Path) -> None:
    """Each query and its nearest neighbour, thumbnails with the overlays the service answers. Written to the
    work folder, never to results/: the figure shows the development radiographs, which stay out of git."""
    import cv2

    with saved_figure(path, nrows=len(pairs), ncols=4, figsize=(11, 2.9 * len(pairs))) as (_, axes):
        for row, (query, nearest, _) in zip(np.atleast_2d(axes), pairs, strict=True):
            agreement = explanations.explainer().agreement(
                catalog.prepare_indexed(catalog.row(query)), catalog.prepare_indexed(catalog.row(nearest))
            )
            for column, (image_id, grid, role) in enumerate(
                ((query, agreement.query, "query"), (nearest, agreement.neighbour, "nearest"))
            ):
                stored = catalog.row(image_id)
                thumbnail = cv2.imdecode(np.frombuffer(catalog.thumbnail(image_id), np.uint8), cv2.IMREAD_GRAYSCALE)
                frame = explanations.in_thumbnail_frame(grid, stored.width, stored.height)
                row[2 * column].imshow(thumbnail, cmap="gray")
                row[2 * column].set_title(f"{role} {stored.true_code or stored.predicted}", fontsize=8)
                row[2 * column + 1].imshow(thumbnail, cmap="gray")
                row[2 * column + 1].imshow(
                    np.ma.masked_less_equal(frame, 0.5), cmap="inferno", vmin=0.5, vmax=1.0, alpha=0.75
                )
                row[2 * column + 1].set_title(
                    f"agreement, 0.5 dark to 1 bright (score {agreement.score:.2f})", fontsize=8
                )
            for axis in row:
                axis.axis("off")


def markdown(result: dict) -> str:
    cold, cached, r = result["cold_ms"], result["cached_ms"], result
    timing = [
        ("cold: both images read and prepared, one torch run, two PNGs", cold, "{:.0f}"),
        ("cached (LRU in memory)", cached, "{:.3f}"),
    ]
    checks = [
        ("standard deviation within a map (0: constant)", f"{r['within_map_std']:.3f}"),
        (
            "mean abs. difference, one query with its nearest vs. a random image",
            f"{r['different_pairs_mad']:.3f} (least {r['different_pairs_mad_min']:.3f})",
        ),
        (
            "mean abs. difference, trained vs. randomised weights, same pairs",
            f"{r['trained_vs_random_mad']:.3f} (least {r['trained_vs_random_mad_min']:.3f})",
        ),
        (
            "mean agreement of the query with its nearest / with a random image",
            f"{r['mean_agreement_nearest']:.3f} / {r['mean_agreement_random']:.3f}",
        ),
    ]
    lines = [
        f"{r['pairs']} test images of {r['dataset']} as queries, each with its nearest indexed image (and, for the "
        f"sanity checks, a random one); model {r['model']} ({r['input_size']} px), maps from its stages "
        f"{', '.join(r['stages'])}; searches in {r['search_runtime']}, maps in torch with {r['torch_threads']} "
        "threads.",
        "",
        "| per pair (query and neighbour overlays) | p50 ms | p90 ms | mean ms |",
        "|---|---|---|---|",
        *(
            f"| {name} | " + " | ".join(form.format(t[key]) for key in ("p50", "p90", "mean")) + " |"
            for name, t, form in timing
        ),
        "",
        f"Other programs kept {r['other_load_cores']:.2f} cores busy while the pairs were timed. The torch model "
        f"is loaded once, on the first explanation: {r['model_load_seconds']:.1f} s.",
        "",
        "| sanity check (agreement maps, cosine 0..1) | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in checks),
        "",
        f"Queries and their nearest neighbours with the overlays are drawn to `{r['examples_figure']}` (not kept "
        "in git: it shows the development radiographs).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="an IRMA-coded archive (e.g. ../shared/data/irma2007-dev)")
    parser.add_argument("--tables", type=Path, help="IRMA code tables folder, for training the model if needed")
    parser.add_argument("--pairs", type=int, default=30, help="query images (each with its nearest neighbour)")
    parser.add_argument("--work", type=Path, default=Path("benchmark-work/explain"), help="model and scratch folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the training and the choices")
    args = parser.parse_args()
    try:
        result = run(args)
    except CbmirError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    text = markdown(result)
    publish("explain", result, text)
    print(text)


if __name__ == "__main__":
    main()
