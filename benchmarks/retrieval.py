"""Retrieval benchmark: how precise are the neighbours the engine returns, beside two simple baselines on the
same split, in one run.

    python benchmarks/retrieval.py ../shared/data/irma2007-dev --tables ../shared/data/irma-code-tables

The default CPU model is trained on the training part of DATASET (its own split, else 70/10/20 with the
seed); the training and validation parts are indexed by the batch indexer into a real engine (the gallery)
and every held-back test image queries it through the engine. With --gallery G --queries Q instead of
DATASET, the model trains on G's training part, all of G is the gallery and every image of Q is a query.

For the full code and each IRMA axis (class datasets: the class, over all queries and per class), per query:
P@k, the fraction of the top k neighbours with the query's label; mAP@10, the average precision over the top
10, normalised by min(10, relevant images in the gallery); vote@5, whether the majority label of the top 5
(ties to the best ranked) is the query's. For IRMA codes also the mean ImageCLEF error score of the model's
predicted codes (with '*' where it stops) and of the kNN-voted codes. Baselines, exact cosine kNN over the
same gallery: raw-pixel thumbnails (the preprocessed image's original channel at 32x32, each minus its own
mean) and frozen ImageNet EfficientNet-Lite0 features (the packaged weights, no training). Beside them, as
a reference for what training adds, the engine's own trunk untrained: regionally pooled frozen Lite0 features.

Refining a search (issue 16), its own section, after the main one or alone with `--only refine` (which takes
the model an earlier run left in WORK/model, training it only when there is none):
- by example: a simulated user marks, among the first 10 results of each query, those with the query's full
  code positive and the others negative; one Rocchio round (`Retrieval.search_vector` with that feedback, the
  service's default weights) brings 10 new results (the marked left out). P@10 before and after, per axis and
  full code, and after with the marked kept;
- by region: each query radiograph pasted off-centre into a black canvas twice its width and height, searched
  whole and with the region of the original (`Region.crop`); P@1 and P@10 per axis.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cbmir.checkpoint import Checkpoint, load_checkpoint
from cbmir.datasets import load_pixels, open_dataset
from cbmir.embed import Embedder, batches
from cbmir.errors import CbmirError
from cbmir.index import ImageRow
from cbmir.irma import AXES, CodeTables, IrmaCode, run_error_score
from cbmir.prepared import prepare_images
from cbmir.refine import Feedback, Region
from cbmir.search import Retrieval
from cbmir.train import make_config, train
from common import frozen_features, run_and_publish, saved_figure
from indexer.pipeline import index_records

KS = (1, 5, 10)
SPLIT = (0.7, 0.1, 0.2)
ENGINE, PIXELS, FROZEN = "cbmir engine", "raw-pixel thumbnails", "frozen ImageNet Lite0"
# Not a baseline but a reference for what training adds: the engine's own trunk before any training.
UNTRAINED = "frozen regional Lite0 (the engine's untrained trunk)"
# The engine runs in its default runtime (ONNX Runtime on the exported graph); the same model in torch is a
# check that the runtime changes no figure.
ENGINE_TORCH = "cbmir engine, torch runtime"
GOALS = {"full code": 0.90, "anatomical": 0.95}
GOALS_TEXT = "full-code P@1 ≥ 0.90 and anatomical P@1 ≥ 0.95 (frozen ImageNet features: about 0.80 and 0.88)"
View = Callable[[str], str]  # what 'the same' means: the part of a label two images must share


def axis_view(axis: str) -> View:
    """The code of one IRMA axis of a label."""
    return lambda label: IrmaCode.parse(label)[axis]


def report_rows(irma: bool, query_labels: list[str]) -> dict[str, tuple[View, list[bool]]]:
    """Each table row: what 'the same' means (a function of the label) and which queries it covers."""
    everyone = [True] * len(query_labels)
    rows: dict[str, tuple[View, list[bool]]]
    if not irma:
        rows = {"class (all queries)": (str, everyone)}
        for name in sorted(set(query_labels)):
            rows[f"class {name}"] = (str, [label == name for label in query_labels])
        return rows
    rows = {"full code": (lambda label: str(IrmaCode.parse(label)), everyone)}
    for axis in AXES:
        rows[axis] = (axis_view(axis), everyone)
    return rows


def gallery_code(row: ImageRow) -> str:
    """The true code of an indexed gallery image (the benchmark indexes every one with its code)."""
    if row.true_code is None:
        raise ValueError(f"gallery image {row.id} was indexed without its code")
    return row.true_code


def figures(neighbour_labels: list[list[str]], query_labels: list[str], gallery_labels: list[str], view: View) -> dict:
    """P@1/5/10, mAP@10, vote@5 and the precision@k curve for one notion of 'the same'."""
    gallery_counts = Counter(view(label) for label in gallery_labels)
    hits = np.array(
        [
            [view(n) == view(q) for n in row[:10]] + [False] * (10 - len(row[:10]))
            for row, q in zip(neighbour_labels, query_labels, strict=True)
        ],
        dtype=float,
    )
    result: dict[str, float | list[float]] = {f"P@{k}": float(hits[:, :k].mean()) for k in KS}
    precisions = np.cumsum(hits, axis=1) / np.arange(1, 11)
    relevant = np.array([min(10, gallery_counts[view(q)]) for q in query_labels])
    average_precision = (precisions * hits).sum(axis=1) / np.maximum(relevant, 1)
    result["mAP@10"] = float(average_precision.mean())
    result["vote@5"] = float(
        np.mean(
            [vote([view(n) for n in row[:5]]) == view(q) for row, q in zip(neighbour_labels, query_labels, strict=True)]
        )
    )
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
    small = (
        np.stack(
            [
                cv2.resize(np.ascontiguousarray(image[..., 0]), (32, 32), interpolation=cv2.INTER_AREA)
                for image in images
            ]
        )
        .reshape(len(images), -1)
        .astype(np.float32)
    )
    return small - small.mean(axis=1, keepdims=True)


def single_labelled(dataset) -> list:
    odd = [record.id for record in dataset.records if len(record.labels) != 1]
    if odd:
        raise CbmirError(
            f"{dataset.name}: the retrieval benchmark needs one label per image; {len(odd)} images "
            f"have none or several (e.g. {odd[0]})"
        )
    return list(dataset.records)


def search_engine(gallery: list, queries: list, embedder: Embedder, folder: Path, name: str) -> dict:
    """Index the gallery into a fresh engine, then query it with every query image: the labels of each
    query's top 10, the model's predicted label per query, and the labels the engine holds."""
    with Retrieval.open(folder, embedder) as retrieval:
        engine = retrieval.engine
        indexing = index_records(gallery, retrieval, dataset=name)
        print(indexing.text())
        stored = [row.true_code for row in engine.get(engine.query())]
        neighbours, predicted = [], []
        for chunk in batches(queries, 32):
            embeddings = embedder.embed([load_pixels(record) for record in chunk])
            neighbours += [[hit.true_code for hit in engine.search(vector, 10)] for vector in embeddings.vectors]
            predicted += [prediction.label for prediction in embeddings.predictions]
    return {"neighbours": neighbours, "predicted": predicted, "gallery_labels": stored}


def trained(args, dataset, tables: CodeTables | None, *, fresh: bool) -> tuple[Checkpoint, float | None]:
    """The default CPU model trained on the dataset's training part in WORK/model, and the seconds training
    took: trained now when `fresh` (the main run times it, from no feature cache) or when WORK/model holds
    none, else the model an earlier run left there (None seconds)."""
    folder = args.work / "model"
    if not fresh and (folder / "split.json").is_file():
        print(f"reusing the model in {folder}")
        return load_checkpoint(folder), None
    shutil.rmtree(folder, ignore_errors=True)
    print(f"training on {dataset.name} ({len(dataset.records)} images, {args.mode} mode)")
    started = time.time()
    checkpoint = train(dataset, make_config(mode=args.mode, split=SPLIT, seed=args.seed), folder, tables=tables)
    return checkpoint, time.time() - started


def parts(args, records: list, query_set: list | None) -> tuple[list, list, dict]:
    """The gallery and the queries (see the module docstring), and the model's split."""
    split = json.loads((args.work / "model" / "split.json").read_text())
    if query_set is not None:
        return records, query_set, split
    by_id = {record.id: record for record in records}
    return [by_id[i] for i in split["train"] + split["validation"]], [by_id[i] for i in split["test"]], split


def run(args) -> dict:
    tables = CodeTables.load(args.tables) if args.tables else None
    dataset = open_dataset(args.gallery or args.dataset)
    records = single_labelled(dataset)
    query_dataset = open_dataset(args.queries) if args.queries else None
    query_set = single_labelled(query_dataset) if query_dataset else None
    work = args.work
    checkpoint, train_seconds = trained(args, dataset, tables, fresh=True)
    gallery, queries, split = parts(args, records, query_set)
    query_labels = [record.labels[0] for record in queries]
    irma = checkpoint.schema.task == "irma-axes"

    print(f"indexing {len(gallery)} gallery images, searching with {len(queries)} queries")
    work.mkdir(parents=True, exist_ok=True)
    embedder = Embedder(checkpoint)
    print(f"engine runtime: {embedder.runtime_description}")
    with tempfile.TemporaryDirectory(dir=work) as folder:
        engine = search_engine(gallery, queries, embedder, Path(folder), dataset.name)
    with tempfile.TemporaryDirectory(dir=work) as folder:
        in_torch = search_engine(gallery, queries, Embedder(checkpoint, runtime="torch"), Path(folder), dataset.name)

    print("baselines: raw-pixel thumbnails and frozen ImageNet Lite0 features")
    cache = work / "cache"
    prepared_gallery = prepare_images(gallery, checkpoint.pipeline, cache, "gallery")
    prepared_queries = prepare_images(queries, checkpoint.pipeline, cache, "queries")
    if len(prepared_queries.records) != len(queries):
        raise CbmirError(f"some query images cannot be read: {prepared_queries.failures[:3]}")
    gallery_labels = [record.labels[0] for record in prepared_gallery.records]
    methods = {
        ENGINE: (engine["neighbours"], engine["gallery_labels"]),
        ENGINE_TORCH: (in_torch["neighbours"], in_torch["gallery_labels"]),
    }
    untrained = partial(frozen_features, model_name="efficientnet-lite0-regional")
    for name, features in ((PIXELS, thumbnails), (FROZEN, frozen_features), (UNTRAINED, untrained)):
        order = knn(features(np.asarray(prepared_gallery.images)), features(np.asarray(prepared_queries.images)))
        methods[name] = ([[gallery_labels[j] for j in row] for row in order], gallery_labels)

    results = {}
    for row, (view, chosen) in report_rows(irma, query_labels).items():
        subset = [label for label, keep in zip(query_labels, chosen, strict=True) if keep]
        results[row] = {
            "queries": len(subset),
            "methods": {
                name: figures([n for n, keep in zip(neighbours, chosen, strict=True) if keep], subset, stored, view)
                for name, (neighbours, stored) in methods.items()
            },
        }
    error_scores = {}
    if irma and tables:

        def mean_error(codes):
            return run_error_score(zip(query_labels, codes, strict=True), tables) / len(queries)

        for name, (neighbours, _) in methods.items():
            error_scores[name] = {
                "kNN-voted (top 5)": mean_error([vote([str(IrmaCode.parse(n)) for n in row[:5]]) for row in neighbours])
            }
        error_scores[ENGINE]["predicted"] = mean_error(engine["predicted"])
    return {
        "dataset": dataset.name,
        "queries_dataset": query_dataset.name if query_dataset else None,
        "own_split": all(record.split for record in records),
        "seed": args.seed,
        "mode": args.mode,
        "split_sizes": {part: len(ids) for part, ids in split.items()},
        "gallery": len(gallery),
        "indexed": len(engine["gallery_labels"]),
        "queries": len(queries),
        "irma": irma,
        "tables": tables is not None,
        "train_seconds": train_seconds,
        "runtime": embedder.runtime_description,
        "results": results,
        "error_scores": error_scores,
    }


def setting(summary: dict) -> str:
    sizes = summary["split_sizes"]
    split = "its own split" if summary["own_split"] else f"split 70/10/20 with seed {summary['seed']}"
    parts = f"train {sizes['train']} / validation {sizes['validation']} / test {sizes['test']}"
    trained = (
        f"The default CPU model ({summary['mode']} mode) trained on the training part in "
        f"{summary['train_seconds']:.0f} s (feature caching included)."
    )
    if summary["queries_dataset"]:
        where = (
            f"Gallery: all {summary['gallery']} images of `{summary['dataset']}` ({split}: {parts}); queries: "
            f"all {summary['queries']} images of `{summary['queries_dataset']}`."
        )
    else:
        where = (
            f"Dataset `{summary['dataset']}`, {split}: {parts}. Gallery: the training and validation parts "
            f"({summary['gallery']} images); queries: the {summary['queries']} test images, never in the "
            "gallery and never trained on."
        )
    indexed = summary["indexed"]
    if indexed != summary["gallery"]:
        where += f" The engine indexed {indexed} of them (identical files are indexed once)."
    return (
        f"{where} {trained} Engine: the gallery indexed by the batch indexer, queries searched through "
        "`Engine.search`. Baselines, and the engine's trunk before training as a reference: exact cosine kNN "
        "over the same gallery."
    )


def markdown(summary: dict) -> str:
    results = summary["results"]
    lines = [setting(summary), "", "![precision@k](benchmarks/results/retrieval-precision.png)", ""]
    metrics = [f"P@{k}" for k in KS] + ["mAP@10", "vote@5"]
    lines += ["| label | queries | method | " + " | ".join(metrics) + " |", "|---|---|---|" + "---|" * len(metrics)]
    for row, result in results.items():
        best = {metric: max(figures[metric] for figures in result["methods"].values()) for metric in metrics}
        for name, figures in result["methods"].items():
            cells = [f"**{figures[m]:.3f}**" if figures[m] == best[m] else f"{figures[m]:.3f}" for m in metrics]
            lines.append(f"| {row} | {result['queries']} | {name} | " + " | ".join(cells) + " |")
    if summary["error_scores"]:
        lines += [
            "",
            (
                "Mean ImageCLEF error score of the codes given to the queries (lower is better; 0 right, "
                "1 wrong on every axis). The baselines have no classifier, only their kNN vote."
            ),
            "",
            "| method | kNN-voted codes (top 5) | model's predicted codes ('*' where it stops) |",
            "|---|---|---|",
        ]
        for name, scores in summary["error_scores"].items():
            predicted = f"{scores['predicted']:.3f}" if "predicted" in scores else "–"
            lines.append(f"| {name} | {scores['kNN-voted (top 5)']:.3f} | {predicted} |")
    elif summary["irma"]:
        lines += ["", "No error scores: give the IRMA code tables with --tables."]
    runtime_gap = max(
        abs(result["methods"][ENGINE][m] - result["methods"][ENGINE_TORCH][m])
        for result in results.values()
        for m in metrics
    )
    lines += [
        "",
        f"The engine ran in {summary.get('runtime', 'its default runtime')}; the same model in torch differs from "
        f"it by at most {runtime_gap:.3f} on any figure of the table.",
    ]
    beaten = all(
        result["methods"][ENGINE][m] >= result["methods"][other][m]
        for result in results.values()
        for m in metrics
        for other in (PIXELS, FROZEN)
    )
    lines += [
        "",
        goals(results) + f" The engine {'beats or equals' if beaten else 'does not beat'} both "
        "baselines (raw pixels, frozen ImageNet Lite0) on every figure of the table.",
    ]
    return "\n".join(lines)


def goals(results: dict) -> str:
    if not all(row in results for row in GOALS):
        return f"Goals (from the issue, for IRMA codes): {GOALS_TEXT}; not applicable to this class dataset."
    p1 = {row: {name: figures["P@1"] for name, figures in results[row]["methods"].items()} for row in GOALS}
    reached = [
        f"{row} P@1 {p1[row][ENGINE]:.3f} against {goal:.2f}: "
        f"**{'met' if p1[row][ENGINE] >= goal else 'not met'}** "
        f"(frozen ImageNet Lite0 in this run: {p1[row][FROZEN]:.3f})"
        for row, goal in GOALS.items()
    ]
    return f"Goals (from the issue): {GOALS_TEXT}. This run: " + "; ".join(reached) + "."


def plot(summary: dict, path: Path) -> None:
    shown = [row for row in ("full code", "anatomical", "class (all queries)") if row in summary["results"]]
    with saved_figure(path, ncols=len(shown), figsize=(6 * len(shown), 4), squeeze=False) as (_, axes):
        for axis, row in zip(axes[0], shown, strict=True):
            for method in (ENGINE, PIXELS, FROZEN, UNTRAINED):
                axis.plot(range(1, 11), summary["results"][row]["methods"][method]["curve"], marker="o", label=method)
            axis.set(title=f"precision@k, {row}", xlabel="k", ylabel="precision", ylim=(0, 1))
            axis.grid(alpha=0.3)
            axis.legend()


# -- refining a search (issue 16) -------------------------------------------------------------------------------

REFINE_GOAL = 0.10  # full-code P@10 gained by one round of refinement by example
CANVAS = 2  # the region benchmark's canvas: this many times the radiograph's width and height
BEFORE, NEXT, AFTER, KEPT = "before", "next 10, unrefined", "after (10 new)", "after, marked kept"
WHOLE, REGION = "whole canvas", "region"


def pasted(pixels: np.ndarray) -> tuple[np.ndarray, Region]:
    """A radiograph pasted into a black canvas CANVAS times its width and height, off-centre (a fifth of the
    spare width from the left, four fifths of the spare height from the top), and its region there."""
    height, width = pixels.shape
    canvas = np.zeros((CANVAS * height, CANVAS * width), pixels.dtype)
    x, y = (CANVAS - 1) * width // 5, 4 * (CANVAS - 1) * height // 5
    canvas[y : y + height, x : x + width] = pixels
    return canvas, Region(x, y, width, height)


def run_refine(args) -> dict:
    """Refinement by example and by region over the main run's gallery, queries and model."""
    tables = CodeTables.load(args.tables) if args.tables else None
    dataset = open_dataset(args.gallery or args.dataset)
    records = single_labelled(dataset)
    query_dataset = open_dataset(args.queries) if args.queries else None
    checkpoint, _ = trained(args, dataset, tables, fresh=False)
    gallery, queries, split = parts(args, records, single_labelled(query_dataset) if query_dataset else None)
    query_labels = [record.labels[0] for record in queries]
    rows = report_rows(checkpoint.schema.task == "irma-axes", query_labels)
    same = next(iter(rows.values()))[0]  # the full code (class datasets: the class)
    embedder = Embedder(checkpoint)
    args.work.mkdir(parents=True, exist_ok=True)
    found: dict[str, list[list[str]]] = {name: [] for name in (BEFORE, NEXT, AFTER, KEPT, WHOLE, REGION)}
    marked = []
    with tempfile.TemporaryDirectory(dir=args.work) as folder, Retrieval.open(folder, embedder) as retrieval:
        print(index_records(gallery, retrieval, dataset=dataset.name).text())
        stored = [gallery_code(row) for row in retrieval.engine.get(retrieval.engine.query())]
        print(f"refining {len(queries)} queries by example and by region")
        started = time.perf_counter()
        for chunk in batches(queries, 16):
            pixels = [load_pixels(record) for record in chunk]
            canvases = [pasted(image) for image in pixels]
            vectors = {
                BEFORE: embedder.embed(pixels).vectors,
                WHOLE: embedder.embed(canvas for canvas, _ in canvases).vectors,
                REGION: embedder.embed(region.crop(canvas) for canvas, region in canvases).vectors,
            }
            for n, record in enumerate(chunk):
                query = vectors[BEFORE][n]
                twenty = retrieval.search_vector(query, 20)
                first = twenty[:10]
                positive = tuple(hit.id for hit in first if same(gallery_code(hit)) == same(record.labels[0]))
                feedback = Feedback(positive, tuple(hit.id for hit in first if hit.id not in positive))
                marked.append((len(feedback.positive), len(feedback.negative)))
                answers = {
                    BEFORE: first,
                    NEXT: twenty[10:],
                    AFTER: retrieval.search_vector(query, 10, feedback=feedback),
                    KEPT: retrieval.search_vector(query, 10, feedback=replace(feedback, include_marked=True)),
                    WHOLE: retrieval.search_vector(vectors[WHOLE][n], 10),
                    REGION: retrieval.search_vector(vectors[REGION][n], 10),
                }
                for name, hits in answers.items():
                    found[name].append([gallery_code(hit) for hit in hits])
        seconds = time.perf_counter() - started
    results = {
        row: {
            name: {
                metric: figures(neighbours, query_labels, stored, view)[metric] for metric in ("P@1", "P@10", "curve")
            }
            for name, neighbours in found.items()
        }
        for row, (view, _) in rows.items()
    }
    counts = np.array(marked)
    return {
        "dataset": dataset.name,
        "queries_dataset": query_dataset.name if query_dataset else None,
        "split_sizes": {part: len(ids) for part, ids in split.items()},
        "gallery": len(gallery),
        "indexed": len(stored),
        "queries": len(queries),
        "runtime": embedder.runtime_description,
        "rocchio": vars(Feedback().rocchio),
        "canvas": CANVAS,
        "marked_positive_mean": float(counts[:, 0].mean()),
        "marked_negative_mean": float(counts[:, 1].mean()),
        "no_positive": int((counts[:, 0] == 0).sum()),
        "all_positive": int((counts[:, 1] == 0).sum()),
        "region_equals_original": found[REGION] == found[BEFORE],
        "seconds": seconds,
        "results": results,
    }


def refine_markdown(summary: dict) -> str:
    results = summary["results"]
    first = next(iter(results))
    weights = summary["rocchio"]
    lines = [
        "### Refining a search",
        "",
        (
            f"The main run's model, gallery ({summary['indexed']} images indexed) and {summary['queries']} test "
            f"queries, in {summary['runtime']}; {summary['seconds']:.0f} s for all of it below (each query "
            "embedded three times, five searches each)."
        ),
        "",
        "![refining](benchmarks/results/retrieval-refine.png)",
        "",
        (
            f"**By example.** A simulated user marks, among the first 10 results of each query, those with the "
            f"query's {first} positive and the others negative (on average {summary['marked_positive_mean']:.1f} "
            f"positive and {summary['marked_negative_mean']:.1f} negative; {summary['no_positive']} queries had no "
            f"positive, {summary['all_positive']} no negative). One Rocchio round (alpha {weights['alpha']}, beta "
            f"{weights['beta']}, gamma {weights['gamma']}, the service's defaults) brings 10 new results: the "
            "marked are left out, as the service does by default, so the after figure is over images the user has "
            "not seen; its fair reference is the next 10 results of the unrefined search (ranks 11 to 20), which "
            "the user would see by reading on. With the marked kept (`include_marked`), the refined top 10 "
            "against the first."
        ),
        "",
        f"| label | P@10 {BEFORE} | P@10 {NEXT} | P@10 {AFTER} | change (new vs next 10) | P@10 {KEPT} | change |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, methods in results.items():
        before, following, after, kept = (methods[name]["P@10"] for name in (BEFORE, NEXT, AFTER, KEPT))
        lines.append(
            f"| {row} | {before:.3f} | {following:.3f} | {after:.3f} | {after - following:+.3f} | {kept:.3f} | "
            f"{kept - before:+.3f} |"
        )
    full = results[first]
    gains = {
        "10 new against the next 10": full[AFTER]["P@10"] - full[NEXT]["P@10"],
        "marked kept against the first 10": full[KEPT]["P@10"] - full[BEFORE]["P@10"],
    }
    lines += [
        "",
        (
            f"Goal (issue 16): {first} P@10 +{REFINE_GOAL:.2f} after one round. This run: "
            + "; ".join(
                f"{name} {gain:+.3f}, **{'met' if gain >= REFINE_GOAL else 'not met'}**" for name, gain in gains.items()
            )
            + "."
        ),
        "",
        (
            f"**By region.** Each query radiograph pasted into a black canvas {summary['canvas']} times its width "
            "and height, off-centre (a fifth of the spare width from the left, four fifths of the spare height "
            "from the top), searched whole and with the region where the radiograph lies (cropped, then the "
            "checkpoint's preprocessing)."
            + (
                " The region's answers are exactly those of the radiograph itself, unpadded."
                if summary["region_equals_original"]
                else ""
            )
        ),
        "",
        f"| label | P@1 {WHOLE} | P@1 {REGION} | P@10 {WHOLE} | P@10 {REGION} |",
        "|---|---|---|---|---|",
    ]
    for row, methods in results.items():
        cells = [methods[name][metric] for metric in ("P@1", "P@10") for name in (WHOLE, REGION)]
        lines.append(f"| {row} | " + " | ".join(f"{value:.3f}" for value in cells) + " |")
    return "\n".join(lines)


def refine_plot(summary: dict, path: Path) -> None:
    results = summary["results"]
    labels = list(results)
    positions = np.arange(len(labels))
    panels = (("by example: P@10", "P@10", (BEFORE, NEXT, AFTER, KEPT)), ("by region: P@1", "P@1", (WHOLE, REGION)))
    with saved_figure(path, ncols=2, figsize=(13, 4)) as (_, axes):
        for axis, (title, metric, names) in zip(axes, panels, strict=True):
            width = 0.8 / len(names)
            for n, name in enumerate(names):
                values = [results[label][name][metric] for label in labels]
                axis.bar(positions + (n - (len(names) - 1) / 2) * width, values, width, label=name)
            axis.set(title=title, ylim=(0, 1), ylabel=metric)
            axis.set_xticks(positions, labels)
            axis.grid(alpha=0.3, axis="y")
            axis.legend(loc="lower left")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "dataset",
        type=Path,
        nargs="?",
        help="archive in any supported layout: trained on its training part, its test part queries",
    )
    parser.add_argument("--tables", type=Path, help="IRMA code tables folder (A.csv..D.csv), for the error scores")
    parser.add_argument("--gallery", type=Path, help="instead of DATASET: the archive to train on and index whole")
    parser.add_argument("--queries", type=Path, help="with --gallery: the archive whose images are the queries")
    parser.add_argument("--mode", choices=("heads", "finetune"), default="heads", help="training mode")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("benchmark-work/retrieval"),
        help="folder for the model, the engine and the caches",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the training")
    parser.add_argument(
        "--only",
        choices=("refine",),
        help="run one part alone: refine (by example and by region), with the model an earlier run left in WORK",
    )
    args = parser.parse_args()
    if (args.gallery is None) != (args.queries is None):
        parser.error("--gallery and --queries go together")
    if (args.dataset is None) == (args.gallery is None):
        parser.error("give either DATASET or --gallery and --queries")
    if args.only is None:
        run_and_publish("retrieval", run, args, plot=plot, plot_file="retrieval-precision.png", markdown=markdown)
    run_and_publish(
        "retrieval-refine",
        run_refine,
        args,
        plot=refine_plot,
        plot_file="retrieval-refine.png",
        markdown=refine_markdown,
    )


if __name__ == "__main__":
    main()
