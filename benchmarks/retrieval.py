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

With `--folds N`, instead of one split, DATASET's images are dealt into N folds stratified by label (seeded;
the dataset's own split, if any, is not used) and the main run is repeated once per fold: the model trains on
the other folds as on an archive with a train/test split (a stratified tenth of them kept back for
validation), all of them are the gallery and the fold's images the queries. Every figure is reported as its
mean, standard deviation and range over the folds, beside the model's full-code accuracy and the training
time of each fold, in a section of its own (no refinement). `--set NAME=VALUE` (repeatable, folds only) trains
with that training setting changed from the CPU default, e.g. `--set input_size=288`; such a run is
published in a section named after its settings, beside the default's, never in its place.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cbmir.checkpoint import Checkpoint, load_checkpoint
from cbmir.datasets import Dataset, Record, load_pixels, open_dataset
from cbmir.embed import Embedder, batches
from cbmir.errors import CbmirError
from cbmir.index import ImageRow
from cbmir.irma import AXES, CodeTables, IrmaCode, run_error_score
from cbmir.prepared import prepare_images
from cbmir.refine import Feedback, Region
from cbmir.search import BLENDED_NEIGHBOURS, Retrieval
from cbmir.train import TrainConfig, TrainingError, make_config, train
from common import frozen_features, run_and_publish, saved_figure
from indexer.pipeline import index_records

KS = (1, 5, 10)
METRICS = (*(f"P@{k}" for k in KS), "mAP@10", "vote@5")
SPLIT = (0.7, 0.1, 0.2)
ENGINE, PIXELS, FROZEN = "cbmir engine", "raw-pixel thumbnails", "frozen ImageNet Lite0"
# Not a baseline but a reference for what training adds: the engine's own trunk before any training.
UNTRAINED = "frozen regional Lite0 (the engine's untrained trunk)"
# The engine runs in its default runtime (ONNX Runtime on the exported graph); the same model in torch is a
# check that the runtime changes no figure.
ENGINE_TORCH = "cbmir engine, torch runtime"
GOALS = {("full code", "P@1"): 0.90, ("anatomical", "P@1"): 0.95, ("full code", "P@10"): 0.80}
GOALS_TEXT = (
    "full-code P@1 ≥ 0.90, anatomical P@1 ≥ 0.95 (frozen ImageNet features: about 0.80 and 0.88) and full-code "
    "P@10 ≥ 0.80"
)
View = Callable[[str], str]  # what 'the same' means: the part of a label two images must share
# The codes given to the queries whose error scores are reported: each method's kNN vote, the model's own
# predictions and the blended ones a search answers.
ERROR_KINDS = ("kNN-voted (top 5)", "predicted", "blended")
KIND_NAMES = {"predicted": "model", "blended": "blended"}
BLENDED_TEXT = (
    f"Blended codes: the model's probabilities blended with the known labels of the query's {BLENDED_NEIGHBOURS} "
    "nearest gallery images (`cbmir.labels.blend_with_neighbours`), what a search answers."
)


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


BEST_POSSIBLE = "best possible ranking"
BEST_METRICS = (*(f"P@{k}" for k in KS), "mAP@10")


def best_possible(query_labels: list[str], gallery_labels: list[str], view: View) -> dict[str, float]:
    """P@k and mAP@10 of the best ranking any method could return from this gallery (every image with the
    query's label first): below 1 wherever the gallery holds fewer than k images of a query's label, so a
    target above it cannot be met on this gallery by any embedding."""
    counts = Counter(view(label) for label in gallery_labels)
    found = np.array([counts[view(q)] for q in query_labels])
    return {**{f"P@{k}": float(np.minimum(found, k).mean() / k) for k in KS}, "mAP@10": float((found > 0).mean())}


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
    query's top 10, the model's predicted label per query and the engine's (blended with the top 10's known
    labels, as a search answers), and the labels the engine holds."""
    with Retrieval.open(folder, embedder) as retrieval:
        engine = retrieval.engine
        indexing = index_records(gallery, retrieval, dataset=name)
        print(indexing.text())
        stored = [row.true_code for row in engine.get(engine.query())]
        neighbours, predicted, blended = [], [], []
        for chunk in batches(queries, 32):
            embeddings = embedder.embed([load_pixels(record) for record in chunk])
            for row, vector in enumerate(embeddings.vectors):
                hits = engine.search(vector, BLENDED_NEIGHBOURS)
                neighbours.append([hit.true_code for hit in hits])
                blended.append(retrieval.blended_prediction(embeddings, hits, row).label)
            predicted += [prediction.label for prediction in embeddings.predictions]
    return {"neighbours": neighbours, "predicted": predicted, "blended": blended, "gallery_labels": stored}


def trained(args, dataset, tables: CodeTables | None, work: Path, *, fresh: bool) -> tuple[Checkpoint, float | None]:
    """The default CPU model trained on the dataset's training part in `work`/model, and the seconds training
    took: trained now when `fresh` (the main run times it, from no feature cache) or when `work`/model holds
    none, else the model an earlier run left there (None seconds)."""
    folder = work / "model"
    if not fresh and (folder / "split.json").is_file():
        print(f"reusing the model in {folder}")
        return load_checkpoint(folder), None
    shutil.rmtree(folder, ignore_errors=True)
    print(f"training on {dataset.name} ({len(dataset.records)} images, {model_description(args.mode, args.set)})")
    started = time.time()
    config = make_config(mode=args.mode, split=SPLIT, seed=args.seed, **args.set)
    checkpoint = train(dataset, config, folder, tables=tables)
    return checkpoint, time.time() - started


def parts(work: Path, records: list, query_set: list | None) -> tuple[list, list, dict]:
    """The gallery and the queries (see the module docstring), and the split of the model in `work`/model."""
    split = json.loads((work / "model" / "split.json").read_text())
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
    checkpoint, train_seconds = trained(args, dataset, tables, args.work, fresh=True)
    gallery, queries, split = parts(args.work, records, query_set)
    measured = measure(checkpoint, gallery, queries, args.work, dataset.name, tables)
    return {
        "dataset": dataset.name,
        "queries_dataset": query_dataset.name if query_dataset else None,
        "own_split": all(record.split for record in records),
        "seed": args.seed,
        "mode": args.mode,
        "split_sizes": {part: len(ids) for part, ids in split.items()},
        "gallery": len(gallery),
        "indexed": measured["indexed"],
        "queries": len(queries),
        "irma": checkpoint.schema.task == "irma-axes",
        "tables": tables is not None,
        "train_seconds": train_seconds,
        "runtime": measured["runtime"],
        "results": measured["results"],
        "error_scores": measured["error_scores"],
    }


def measure(
    checkpoint: Checkpoint, gallery: list, queries: list, work: Path, name: str, tables: CodeTables | None
) -> dict:
    """The figures of one gallery and its queries: per table row, the engine's (in its default runtime and in
    torch) and the baselines'; the error scores; the classifier's accuracy on the full code (class datasets:
    the class). Engines and caches go in `work`."""
    query_labels = [record.labels[0] for record in queries]
    irma = checkpoint.schema.task == "irma-axes"

    print(f"indexing {len(gallery)} gallery images, searching with {len(queries)} queries")
    work.mkdir(parents=True, exist_ok=True)
    embedder = Embedder(checkpoint)
    print(f"engine runtime: {embedder.runtime_description}")
    with tempfile.TemporaryDirectory(dir=work) as folder:
        engine = search_engine(gallery, queries, embedder, Path(folder), name)
    with tempfile.TemporaryDirectory(dir=work) as folder:
        in_torch = search_engine(gallery, queries, Embedder(checkpoint, runtime="torch"), Path(folder), name)

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
    for method, features in ((PIXELS, thumbnails), (FROZEN, frozen_features), (UNTRAINED, untrained)):
        order = knn(features(np.asarray(prepared_gallery.images)), features(np.asarray(prepared_queries.images)))
        methods[method] = ([[gallery_labels[j] for j in row] for row in order], gallery_labels)

    rows = report_rows(irma, query_labels)
    results = {}
    for row, (view, chosen) in rows.items():
        subset = [label for label, keep in zip(query_labels, chosen, strict=True) if keep]
        results[row] = {
            "queries": len(subset),
            "methods": {
                method: figures([n for n, keep in zip(neighbours, chosen, strict=True) if keep], subset, stored, view)
                for method, (neighbours, stored) in methods.items()
            },
            "best_possible": best_possible(subset, gallery_labels, view),
        }
    error_scores = {}
    if irma and tables:

        def mean_error(codes):
            return run_error_score(zip(query_labels, codes, strict=True), tables) / len(queries)

        for method, (neighbours, _) in methods.items():
            error_scores[method] = {
                "kNN-voted (top 5)": mean_error([vote([str(IrmaCode.parse(n)) for n in row[:5]]) for row in neighbours])
            }
        error_scores[ENGINE]["predicted"] = mean_error(engine["predicted"])
        error_scores[ENGINE]["blended"] = mean_error(engine["blended"])
    same = next(iter(rows.values()))[0]  # the full code (class datasets: the class)

    def accuracy(labels: list[str]) -> float:
        return float(np.mean([given == same(label) for given, label in zip(labels, query_labels, strict=True)]))

    return {
        "indexed": len(engine["gallery_labels"]),
        "runtime": embedder.runtime_description,
        "results": results,
        "error_scores": error_scores,
        "classifier_accuracy": accuracy(engine["predicted"]),
        "blended_accuracy": accuracy(engine["blended"]),
    }


def model_description(mode: str, changed: dict[str, object]) -> str:
    """'the default CPU model (finetune mode)', or with settings changed from it, which."""
    if not changed:
        return f"the default CPU model ({mode} mode)"
    settings = ", ".join(f"{name} {json.dumps(value)}" for name, value in changed.items())
    return f"the CPU default with {settings} ({mode} mode)"


def setting_value(text: str) -> tuple[str, object]:
    """NAME=VALUE from the command line: VALUE as JSON (numbers, true/false, lists), else as text."""
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


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
    lines += ["| label | queries | method | " + " | ".join(METRICS) + " |", "|---|---|---|" + "---|" * len(METRICS)]
    for row, result in results.items():
        best = {metric: max(figures[metric] for figures in result["methods"].values()) for metric in METRICS}
        for name, figures in result["methods"].items():
            cells = [f"**{figures[m]:.3f}**" if figures[m] == best[m] else f"{figures[m]:.3f}" for m in METRICS]
            lines.append(f"| {row} | {result['queries']} | {name} | " + " | ".join(cells) + " |")
        ideal = [f"*{result['best_possible'][m]:.3f}*" if m in BEST_METRICS else "–" for m in METRICS]
        lines.append(f"| {row} | {result['queries']} | *{BEST_POSSIBLE}* | " + " | ".join(ideal) + " |")
    lines += [
        "",
        f"*{BEST_POSSIBLE.capitalize()}*: what a search that lists every gallery image of the query's label first "
        "would reach; below 1 where a label has fewer than k images in the gallery, so no embedding can do better.",
    ]
    if summary["error_scores"]:
        lines += [
            "",
            (
                "Mean ImageCLEF error score of the codes given to the queries (lower is better; 0 right, "
                "1 wrong on every axis). The baselines have no classifier, only their kNN vote."
            ),
            "",
            "| method | kNN-voted codes (top 5) | model's predicted codes ('*' where it stops) | blended codes |",
            "|---|---|---|---|",
        ]
        for name, scores in summary["error_scores"].items():
            given = [f"{scores[kind]:.3f}" if kind in scores else "–" for kind in ERROR_KINDS]
            lines.append(f"| {name} | " + " | ".join(given) + " |")
        lines += ["", BLENDED_TEXT]
    elif summary["irma"]:
        lines += ["", "No error scores: give the IRMA code tables with --tables."]
    lines += [
        "",
        f"The engine ran in {summary.get('runtime', 'its default runtime')}; the same model in torch differs from "
        f"it by at most {runtime_gap(results):.3f} on any figure of the table.",
    ]
    lines += [
        "",
        goals(results) + f" The engine {'beats or equals' if beats_baselines(results) else 'does not beat'} both "
        "baselines (raw pixels, frozen ImageNet Lite0) on every figure of the table.",
    ]
    return "\n".join(lines)


def runtime_gap(results: dict) -> float:
    """The largest difference between the engine in its default runtime and in torch, over every figure."""
    return max(
        abs(result["methods"][ENGINE][m] - result["methods"][ENGINE_TORCH][m])
        for result in results.values()
        for m in METRICS
    )


def beats_baselines(results: dict) -> bool:
    """Whether the engine beats or equals both baselines (raw pixels, frozen ImageNet Lite0) on every figure."""
    return all(
        result["methods"][ENGINE][m] >= result["methods"][other][m]
        for result in results.values()
        for m in METRICS
        for other in (PIXELS, FROZEN)
    )


def goals(results: dict) -> str:
    if not all(row in results for row, _ in GOALS):
        return f"Goals (from the issue, for IRMA codes): {GOALS_TEXT}; not applicable to this class dataset."
    reached = []
    for (row, metric), goal in GOALS.items():
        engine, frozen = results[row]["methods"][ENGINE][metric], results[row]["methods"][FROZEN][metric]
        ideal = results[row]["best_possible"][metric]
        reached.append(
            f"{row} {metric} {engine:.3f} against {goal:.2f}: **{'met' if engine >= goal else 'not met'}** "
            f"(frozen ImageNet Lite0 in this run: {frozen:.3f}; the best possible ranking: {ideal:.3f}"
            + (", below the goal: no embedding can meet it on this gallery)" if ideal < goal else ")")
        )
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


# -- over folds (issue 17) ------------------------------------------------------------------------------------

FOLDS_NAME = "retrieval-folds"


def folds_section(dataset: Path, changed: dict[str, object]) -> str:
    """The BENCHMARKS.md section (and results file names) of a folds run: one per dataset folder and set of
    training settings changed from the default."""

    def text(value: object) -> str:
        return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))

    suffix = "".join(f"-{name}={text(value)}" for name, value in changed.items())
    return f"{FOLDS_NAME}-{dataset.name}{suffix}"


def fold_of(records: list[Record], folds: int, seed: int) -> dict[str, int]:
    """Each record's fold (0 to folds - 1), stratified by label: the images of each label, in a seeded order,
    dealt onto the folds in turn, each label going on from the fold where the previous one stopped. So the
    folds' sizes differ by at most one, and so do the counts of each label, which puts the images of a label
    with fewer images than folds in different folds. (The allocation of scikit-learn's StratifiedKFold, without
    its warning about every such label.)"""
    by_label: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for record in records:
        by_label[record.labels].append(record.id)
    rng = random.Random(seed)
    fold, dealt = {}, 0
    for label in sorted(by_label):
        ids = sorted(by_label[label])
        rng.shuffle(ids)
        for record_id in ids:
            fold[record_id] = dealt % folds
            dealt += 1
    return fold


def fold_dataset(dataset: Dataset, fold: dict[str, int], held_out: int) -> Dataset:
    """The dataset with a split of its own: fold `held_out` the test part, the other folds the training part,
    from which training keeps back its validation part as for any archive without one."""
    records = [replace(record, split="test" if fold[record.id] == held_out else "train") for record in dataset.records]
    return replace(dataset, name=f"{dataset.name} fold {held_out + 1}", records=records)


def spread(values: list[float]) -> dict[str, float]:
    """Mean, standard deviation (of a sample: the folds are a few of the possible splits), min and max."""
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)),
        "min": float(min(values)),
        "max": float(max(values)),
    }


def run_folds(args) -> dict:
    """The main run once per fold of DATASET (see the module docstring), and each figure's spread over them."""
    tables = CodeTables.load(args.tables) if args.tables else None
    dataset = open_dataset(args.dataset)
    records = single_labelled(dataset)
    if len(records) < args.folds:
        raise CbmirError(f"{dataset.name} has {len(records)} images, too few for {args.folds} folds")
    fold = fold_of(records, args.folds, args.seed)
    per_fold = []
    for held_out in range(args.folds):
        print(f"fold {held_out + 1} of {args.folds}")
        work = args.work / "folds" / f"fold-{held_out + 1}"
        checkpoint, train_seconds = trained(args, fold_dataset(dataset, fold, held_out), tables, work, fresh=True)
        gallery, queries, split = parts(work, records, None)
        gallery_labels = {record.labels[0] for record in gallery}
        per_fold.append(
            {
                "fold": held_out + 1,
                "split_sizes": {part: len(ids) for part, ids in split.items()},
                "gallery": len(gallery),
                "queries": len(queries),
                "unmatched_queries": sum(record.labels[0] not in gallery_labels for record in queries),
                "train_seconds": train_seconds,
                **measure(checkpoint, gallery, queries, work, dataset.name, tables),
            }
        )
    # Class datasets have a row per class with queries: only the classes with queries in every fold keep one.
    rows = [row for row in per_fold[0]["results"] if all(row in done["results"] for done in per_fold)]
    results = {
        row: {
            "queries": sum(done["results"][row]["queries"] for done in per_fold),
            "methods": {
                method: {
                    metric: spread([done["results"][row]["methods"][method][metric] for done in per_fold])
                    for metric in METRICS
                }
                for method in per_fold[0]["results"][row]["methods"]
            },
            "best_possible": {
                metric: spread([done["results"][row]["best_possible"][metric] for done in per_fold])
                for metric in BEST_METRICS
            },
        }
        for row in rows
    }
    error_scores = {
        method: {kind: spread([done["error_scores"][method][kind] for done in per_fold]) for kind in kinds}
        for method, kinds in per_fold[0]["error_scores"].items()
    }
    return {
        "section": folds_section(args.dataset, args.set),
        "dataset": dataset.name,
        "images": len(records),
        "folds": args.folds,
        "seed": args.seed,
        "mode": args.mode,
        "changed_settings": args.set,
        "irma": checkpoint.schema.task == "irma-axes",
        "tables": tables is not None,
        "runtime": per_fold[0]["runtime"],
        "train_seconds_total": sum(done["train_seconds"] for done in per_fold),
        "results": results,
        "error_scores": error_scores,
        "classifier_accuracy": spread([done["classifier_accuracy"] for done in per_fold]),
        "blended_accuracy": spread([done["blended_accuracy"] for done in per_fold]),
        "per_fold": per_fold,
    }


def folds_markdown(summary: dict) -> str:
    results, folds = summary["results"], summary["per_fold"]
    first = "full code" if summary["irma"] else "class (all queries)"  # the row of the classifier's figures
    unmatched = sum(done["unmatched_queries"] for done in folds)
    lines = [
        (
            f"Dataset `{summary['dataset']}`, its {summary['images']} images dealt into {summary['folds']} folds "
            f"stratified by label (seed {summary['seed']}; queries per fold: "
            + " / ".join(str(done["queries"]) for done in folds)
            + f"). For each fold, {model_description(summary['mode'], summary.get('changed_settings', {}))} "
            "trained on the other folds (a "
            f"stratified {SPLIT[1]:.0%} of them kept back for validation), all of their images indexed as the "
            "gallery, and the fold's images query it, never in the gallery and never trained on. Training took "
            + ", ".join(f"{done['train_seconds']:.0f}" for done in folds)
            + f" s in the folds, {summary['train_seconds_total']:.0f} s in all (feature caching included)."
            + (
                f" {unmatched} queries over all folds have a label that no image of their gallery has (the images "
                "of a label with fewer images than folds are spread over them): no method can find them an image "
                f"of the same {'full code' if summary['irma'] else 'class'}."
                if unmatched
                else ""
            )
        ),
        "",
        f"![over {summary['folds']} folds](benchmarks/results/{summary['section']}.png)",
        "",
        (
            f"Each cell: the mean over the {summary['folds']} folds ± their sample standard deviation (min–max); in "
            f"bold the best mean of the row. The queries are those of all folds. *{BEST_POSSIBLE.capitalize()}*: "
            "what a search that lists every gallery image of the query's label first would reach; below 1 where "
            "a label has fewer than k images in the gallery, so no embedding can do better."
        ),
        "",
    ]
    methods = (ENGINE, ENGINE_TORCH, PIXELS, FROZEN, UNTRAINED)
    lines += [
        "| label | queries | figure | " + " | ".join(methods) + f" | *{BEST_POSSIBLE}* |",
        "|---|---|---|" + "---|" * (len(methods) + 1),
    ]

    def cell(value: dict[str, float]) -> str:
        return f"{value['mean']:.3f} ± {value['std']:.3f} ({value['min']:.3f}–{value['max']:.3f})"

    def table_row(
        label: str,
        queries: int,
        figure: str,
        stats: dict[str, dict],
        *,
        lower_better: bool = False,
        ideal: dict[str, float] | None = None,
    ) -> str:
        choose = min if lower_better else max
        best = choose(value["mean"] for value in stats.values())
        cells = []
        for method in methods:
            if method not in stats:
                cells.append("–")
                continue
            text = cell(stats[method])
            cells.append(f"**{text}**" if stats[method]["mean"] == best else text)
        cells.append(f"*{cell(ideal)}*" if ideal else "–")
        return f"| {label} | {queries} | {figure} | " + " | ".join(cells) + " |"

    for row, result in results.items():
        for metric in METRICS:
            stats = {method: figures[metric] for method, figures in result["methods"].items()}
            lines.append(table_row(row, result["queries"], metric, stats, ideal=result["best_possible"].get(metric)))
    queries = results[first]["queries"]
    lines.append(table_row(first, queries, "classifier accuracy", {ENGINE: summary["classifier_accuracy"]}))
    lines.append(table_row(first, queries, "accuracy, blended", {ENGINE: summary["blended_accuracy"]}))
    for kind in ERROR_KINDS:
        stats = {method: scores[kind] for method, scores in summary["error_scores"].items() if kind in scores}
        if stats:
            figure = f"error score, {KIND_NAMES.get(kind, kind)} codes (lower is better)"
            lines.append(table_row(first, queries, figure, stats, lower_better=True))
    if summary["irma"] and not summary["error_scores"]:
        lines += ["", "No error scores: give the IRMA code tables with --tables."]
    means = {
        row: {
            "methods": {
                method: {m: figures[m]["mean"] for m in METRICS} for method, figures in result["methods"].items()
            },
            "best_possible": {m: value["mean"] for m, value in result["best_possible"].items()},
        }
        for row, result in results.items()
    }
    lines += [
        "",
        "Classifier accuracy: the share of queries whose code (class) the model predicts exactly, '*' counting as "
        f"wrong; blended, the same for the code a search answers. {BLENDED_TEXT}"
        + (
            " Error scores: the mean ImageCLEF error score of the codes given to the queries (0 right, 1 wrong on "
            "every axis): the model's predicted codes ('*' where it stops), the blended ones and each method's "
            "kNN vote."
            if summary["error_scores"]
            else ""
        ),
        "",
        (
            f"The engine ran in {summary['runtime']}; the same model in torch differs from it by at most "
            f"{max(runtime_gap(done['results']) for done in folds):.3f} on any figure of any fold."
        ),
        "",
        "On the means over the folds: "
        + goals(means)
        + f" The engine {'beats or equals' if beats_baselines(means) else 'does not beat'} both baselines (raw "
        "pixels, frozen ImageNet Lite0) on every figure of the table.",
    ]
    return "\n".join(lines)


def folds_plot(summary: dict, path: Path) -> None:
    """Per shown label, each figure's mean over the folds with its standard deviation as an error bar, the
    engine beside the baselines and the untrained trunk; then the error scores, when there are any."""
    shown = [row for row in ("full code", "anatomical", "class (all queries)") if row in summary["results"]]
    methods = (ENGINE, PIXELS, FROZEN, UNTRAINED)
    errors = summary["error_scores"]
    width = 0.8 / len(methods)

    def bars(axis, groups: tuple[str, ...], stats: dict[str, dict[str, dict]]) -> None:
        """A bar per method in each group it has a figure for, each method in the same colour in every panel."""
        for n, method in enumerate(methods):
            present = [k for k, group in enumerate(groups) if group in stats[method]]
            values = [stats[method][groups[k]] for k in present]
            axis.bar(
                np.array(present) + (n - (len(methods) - 1) / 2) * width,
                [value["mean"] for value in values],
                width,
                yerr=[value["std"] for value in values],
                capsize=2,
                color=f"C{n}",
                label=method,
            )
        axis.set_xticks(np.arange(len(groups)), groups)
        axis.grid(alpha=0.3, axis="y")

    panels = len(shown) + bool(errors)
    with saved_figure(path, ncols=panels, figsize=(6 * panels, 4.5), squeeze=False) as (_, axes):
        for axis, row in zip(axes[0], shown, strict=False):
            bars(axis, METRICS, summary["results"][row]["methods"])
            axis.set(title=f"{row}, mean ± sd over {summary['folds']} folds", ylim=(0, 1))
            axis.legend(loc="lower left", fontsize="small")
        if errors:
            bars(axes[0][-1], ERROR_KINDS, errors)
            axes[0][-1].set(title="mean error score of the codes given (lower is better)")


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
    checkpoint, _ = trained(args, dataset, tables, args.work, fresh=False)
    gallery, queries, split = parts(args.work, records, single_labelled(query_dataset) if query_dataset else None)
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
    parser.add_argument(
        "--mode",
        choices=("heads", "finetune"),
        default=TrainConfig().mode,
        help="training mode (default: the CPU default)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("benchmark-work/retrieval"),
        help="folder for the model, the engine and the caches",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (or folds) and the training")
    parser.add_argument(
        "--folds",
        type=int,
        metavar="N",
        help="instead of one split of DATASET: N >= 2 stratified folds, each queried against the others",
    )
    parser.add_argument(
        "--only",
        choices=("refine",),
        help="run one part alone: refine (by example and by region), with the model an earlier run left in WORK",
    )
    parser.add_argument(
        "--set",
        type=setting_value,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="with --folds: a training setting changed from the CPU default (repeatable), e.g. input_size=288",
    )
    args = parser.parse_args()
    args.set = dict(args.set)
    if args.set:
        if args.folds is None:
            parser.error("--set goes with --folds (a single split publishes the default's figures only)")
        owned = sorted(set(args.set) & {"mode", "seed", "split"})
        if owned:
            parser.error(f"--set {owned[0]}: the benchmark sets it (use --mode and --seed; the split is its own)")
        try:
            make_config(mode=args.mode, **args.set)
        except TrainingError as error:
            parser.error(f"--set: {error}")
    if args.folds is not None:
        if args.folds < 2:
            parser.error(f"--folds needs at least 2 folds, got {args.folds}")
        if args.gallery is not None or args.queries is not None:
            parser.error("--folds splits DATASET; it does not go with --gallery and --queries")
        if args.only is not None:
            parser.error("--folds does not go with --only (refining uses the model of one split)")
    if (args.gallery is None) != (args.queries is None):
        parser.error("--gallery and --queries go together")
    if (args.dataset is None) == (args.gallery is None):
        parser.error("give either DATASET or --gallery and --queries")
    if args.folds is not None:
        section = folds_section(args.dataset, args.set)
        run_and_publish(section, run_folds, args, plot=folds_plot, plot_file=f"{section}.png", markdown=folds_markdown)
        return
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
