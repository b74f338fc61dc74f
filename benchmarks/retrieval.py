"""Retrieval benchmark: how precise are the neighbours the engine returns, beside two simple baselines on the
same split, in one run.

    python benchmarks/retrieval.py ../shared/data/irma2007-dev --tables ../shared/data/irma-code-tables

The default CPU model is trained on the training part of the archive (its own split, else 70/10/20 with the
seed); the training and validation parts are indexed by the batch indexer into a real index (the gallery);
every held-back image queries it through the engine. With --queries, the whole DATASET is the gallery (the
model trained on its training part) and the other dataset gives the queries.

For the full code and each IRMA axis (for class datasets: the class), per query: P@k, the fraction of the
top k neighbours with the query's code; mAP@10, the average precision over the top 10, normalised by
min(10, relevant images in the gallery); vote@5, whether the majority code of the top 5 (ties to the best
ranked) is the query's. For IRMA codes also the mean ImageCLEF error score of the model's predicted codes
(with '*' where it stops) and of the kNN-voted codes. Baselines, exact cosine kNN over the same gallery:
raw-pixel thumbnails (the preprocessed image's original channel at 32x32, mean-centred) and frozen ImageNet
EfficientNet-Lite0 features (the packaged weights, no training).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, frozen_features, publish, saved_figure

from cbmir.datasets import load_pixels, open_dataset
from cbmir.embed import Embedder
from cbmir.errors import CbmirError
from cbmir.index import Engine
from cbmir.irma import AXES, CodeTables, IrmaCode, run_error_score
from cbmir.prepared import prepare_images
from cbmir.train import make_config, train
from indexer.pipeline import index_records

KS = (1, 5, 10)
SPLIT = (0.7, 0.1, 0.2)
GOALS = {"full code": 0.90, "anatomical": 0.95}


def label_views(irma: bool) -> dict:
    """What 'the same' means for each reported figure: the whole label, and each IRMA axis."""
    if not irma:
        return {"class": lambda label: label}
    views = {"full code": lambda label: str(IrmaCode.parse(label))}
    for axis in AXES:
        views[axis] = lambda label, axis=axis: IrmaCode.parse(label)[axis]
    return views


def figures(neighbour_labels: list[list[str]], query_labels: list[str], gallery_labels: list[str], view) -> dict:
    """P@1/5/10, mAP@10, vote@5 and the precision@k curve for one notion of 'the same'."""
    gallery_counts = Counter(view(label) for label in gallery_labels)
    hits = np.array([[view(n) == view(q) for n in row[:10]] + [False] * (10 - len(row[:10]))
                     for row, q in zip(neighbour_labels, query_labels)], dtype=float)
    result = {f"P@{k}": float(hits[:, :k].mean()) for k in KS}
    precisions = np.cumsum(hits, axis=1) / np.arange(1, 11)
    relevant = np.array([min(10, gallery_counts[view(q)]) for q in query_labels])
    average_precision = (precisions * hits).sum(axis=1) / np.maximum(relevant, 1)
    result["mAP@10"] = float(average_precision.mean())
    result["vote@5"] = float(np.mean([vote([view(n) for n in row[:5]]) == view(q)
                                      for row, q in zip(neighbour_labels, query_labels)]))
    result["curve"] = [float(value) for value in precisions.mean(axis=0)]
    return result


def vote(labels: list[str]) -> str | None:
    """The most common label, ties going to the one ranked first."""
    counts = Counter(labels)
    return max(labels, key=lambda label: (counts[label], -labels.index(label))) if labels else None


def knn(gallery: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return np.argsort(-(unit(queries) @ unit(gallery).T), axis=1)[:, :k]


def thumbnails(images: np.ndarray) -> np.ndarray:
    small = np.stack([cv2.resize(np.ascontiguousarray(image[..., 0]), (32, 32), interpolation=cv2.INTER_AREA)
                      for image in images]).reshape(len(images), -1).astype(np.float32)
    return small - small.mean(axis=1, keepdims=True)


def run(args) -> tuple[dict, str]:
    tables = CodeTables.load(args.tables) if args.tables else None
    dataset = open_dataset(args.dataset)
    work = Path(args.work)
    shutil.rmtree(work / "model", ignore_errors=True)  # no feature cache of an earlier run: time it all
    started = time.time()
    checkpoint = train(dataset, make_config(mode=args.mode, split=SPLIT, seed=args.seed), work / "model",
                       tables=tables)
    train_seconds = time.time() - started
    split = json.loads((work / "model" / "split.json").read_text())
    by_id = {record.id: record for record in dataset.records}
    if args.queries:
        gallery = list(dataset.records)
        queries = list(open_dataset(args.queries).records)
    else:
        gallery = [by_id[i] for i in split["train"] + split["validation"]]
        queries = [by_id[i] for i in split["test"]]
    irma = checkpoint.schema.task == "irma-axes"
    views = label_views(irma)

    embedder = Embedder(checkpoint)
    with tempfile.TemporaryDirectory(dir=work) as folder, Engine.open(folder, embedder=embedder) as engine:
        index_records(gallery, engine, embedder, dataset=dataset.name)
        stored = engine.get(engine.query(), ["id", "true_code"])
        label_of = {row["id"]: row["true_code"] for row in stored}
        query_labels, engine_neighbours, predicted = [], [], []
        for record in queries:
            embeddings, predictions = embedder.embed_and_predict([load_pixels(record)])
            hits = engine.search(embeddings.vectors[0], 10)
            engine_neighbours.append([label_of[hit.id] for hit in hits])
            query_labels.append(record.labels[0])
            predicted.append(predictions[0].label)

    cache = work / "cache"
    prepared_gallery = prepare_images(gallery, checkpoint.pipeline, cache, "gallery")
    prepared_queries = prepare_images(queries, checkpoint.pipeline, cache, "queries")
    if len(prepared_queries.records) != len(queries):
        raise CbmirError(f"some query images cannot be read: {prepared_queries.failures[:3]}")
    gallery_images, query_images = prepared_gallery.images, prepared_queries.images
    gallery_truth = [record.labels[0] for record in prepared_gallery.records]
    methods = {"cbmir engine": engine_neighbours}
    for name, features in (("raw-pixel thumbnails", thumbnails), ("frozen ImageNet Lite0", frozen_features)):
        order = knn(features(np.asarray(gallery_images)), features(np.asarray(query_images)))
        methods[name] = [[gallery_truth[j] for j in row] for row in order]

    results = {name: {view_name: figures(neighbours, query_labels, gallery_truth, view)
                      for view_name, view in views.items()} for name, neighbours in methods.items()}
    error_scores = {}
    if irma and tables:
        error_scores["cbmir predicted codes"] = run_error_score(zip(query_labels, predicted), tables) / len(queries)
        for name, neighbours in methods.items():
            voted = [vote([str(IrmaCode.parse(n)) for n in row[:5]]) for row in neighbours]
            error_scores[f"{name}, kNN-voted codes (top 5)"] = run_error_score(zip(query_labels, voted), tables) / len(queries)
    summary = {"dataset": dataset.name, "gallery": len(gallery), "queries": len(queries), "mode": args.mode,
               "train_seconds": train_seconds, "results": results, "error_scores": error_scores}
    return summary, markdown(summary, views)


def markdown(summary: dict, views: dict) -> str:
    lines = [(f"Dataset `{summary['dataset']}`: gallery {summary['gallery']} images (indexed by the engine), "
              f"{summary['queries']} query images held back from training; default CPU model, {summary['mode']} "
              f"mode, trained in {summary['train_seconds']:.0f} s. Baselines: exact cosine kNN over the same gallery."),
             "", "![precision@k](benchmarks/results/retrieval-precision.png)", ""]
    metrics = [f"P@{k}" for k in KS] + ["mAP@10", "vote@5"]
    lines += ["| label | method | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for view in views:
        best = {metric: max(summary["results"][m][view][metric] for m in summary["results"]) for metric in metrics}
        for method, per_view in summary["results"].items():
            cells = [(f"**{per_view[view][m]:.3f}**" if per_view[view][m] == best[m] else f"{per_view[view][m]:.3f}")
                     for m in metrics]
            lines.append(f"| {view} | {method} | " + " | ".join(cells) + " |")
    if summary["error_scores"]:
        lines += ["", "| codes | mean ImageCLEF error score (lower is better) |", "|---|---|"]
        lines += [f"| {name} | {value:.3f} |" for name, value in summary["error_scores"].items()]
    engine = summary["results"]["cbmir engine"]
    goals = [f"{view} P@1 {engine[view]['P@1']:.3f} (goal {goal:.2f}: {'met' if engine[view]['P@1'] >= goal else 'not met'})"
             for view, goal in GOALS.items() if view in engine]
    beaten = all(engine[view][m] >= summary["results"][other][view][m] for view in engine
                 for m in metrics for other in summary["results"] if other != "cbmir engine")
    lines += ["", "Goals: " + "; ".join(goals) + ("." if goals else "") +
              f" The engine {'beats or equals' if beaten else 'does not beat'} both baselines on every figure."]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    shown = [view for view in ("full code", "anatomical", "class") if view in summary["results"]["cbmir engine"]]
    with saved_figure(path, ncols=len(shown), figsize=(6 * len(shown), 4), squeeze=False) as (_, axes):
        for axis, view in zip(axes[0], shown):
            for method, per_view in summary["results"].items():
                axis.plot(range(1, 11), per_view[view]["curve"], marker="o", label=method)
            axis.set(title=f"precision@k, {view}", xlabel="k", ylabel="precision", ylim=(0, 1))
            axis.grid(alpha=0.3)
            axis.legend()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path, help="archive in any supported layout (the gallery)")
    parser.add_argument("--tables", type=Path, help="IRMA code tables folder, for the error scores")
    parser.add_argument("--queries", type=Path, help="another archive whose images are the queries")
    parser.add_argument("--mode", default="heads", help="training mode: heads or finetune")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("benchmark-work/retrieval"))
    args = parser.parse_args()
    try:
        summary, text = run(args)
    except CbmirError as error:
        sys.exit(f"error: {error}")
    RESULTS.mkdir(exist_ok=True)
    plot(summary, RESULTS / "retrieval-precision.png")
    publish("retrieval", summary, text)
    print(text)


if __name__ == "__main__":
    main()
