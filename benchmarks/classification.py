"""Classification benchmark: the trained engine against a logistic regression on frozen ImageNet
EfficientNet-Lite0 features, on the same split of an IRMA-coded archive, in one run.

    python benchmarks/classification.py ../shared/data/irma2007-dev --tables ../shared/data/irma-code-tables

For each run (a training mode and a contrastive-loss weight), the engine is trained with the CPU defaults
(a 70/10/20 split, seed 0)
and scored on the held-back 20%: accuracy of the full code and of each IRMA axis, and the ImageCLEF error
score. The baselines use the plain (un-augmented) Lite0 trunk features of the same images: one logistic
regression per axis (their answers joined into a code) and one over whole codes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cbmir.checkpoint import Checkpoint, load_checkpoint
from cbmir.datasets import open_dataset
from cbmir.embed import Embedder
from cbmir.irma import AXES, CodeTables, IrmaCode, run_error_score
from cbmir.prepared import prepare_images
from cbmir.train import make_config, train
from common import frozen_features, publish

SPLIT = (0.7, 0.1, 0.2)


def scores(truth: list[str], predicted: list[str], tables: CodeTables) -> dict[str, float]:
    parsed_truth, parsed_predicted = [IrmaCode.parse(c) for c in truth], [IrmaCode.parse(c) for c in predicted]
    figures = {"full_code": float(np.mean([t == p for t, p in zip(parsed_truth, parsed_predicted, strict=True)]))}
    for axis in AXES:
        figures[axis] = float(
            np.mean([t[axis] == p[axis] for t, p in zip(parsed_truth, parsed_predicted, strict=True)])
        )
    figures["mean_error_score"] = run_error_score(zip(truth, predicted, strict=True), tables) / len(truth)
    return figures


def retrieval(gallery: np.ndarray, gallery_codes: list, queries: np.ndarray, query_codes: list) -> dict[str, float]:
    """P@1 and P@5 of cosine nearest neighbours: full code and anatomical axis."""

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    order = np.argsort(-(unit(queries) @ unit(gallery).T), axis=1)[:, :5]
    figures = {}
    for name, key in (("full_code", str), ("anatomical", lambda code: code["anatomical"])):
        hits = np.array([[key(gallery_codes[j]) == key(query_codes[i]) for j in row] for i, row in enumerate(order)])
        figures[f"P@1 {name}"], figures[f"P@5 {name}"] = float(hits[:, 0].mean()), float(hits.mean())
    return figures


def logistic_baselines(checkpoint: Checkpoint, dataset, cache: Path, tables: CodeTables) -> dict[str, dict]:
    assert checkpoint.path is not None, "a trained checkpoint has a folder"
    split = json.loads((checkpoint.path / "split.json").read_text())
    by_id = {record.id: record for record in dataset.records}
    parts = {
        name: prepare_images([by_id[i] for i in split[name]], checkpoint.pipeline, cache, f"baseline {name}")
        for name in ("train", "test")
    }
    features = {name: frozen_features(np.asarray(part.images)) for name, part in parts.items()}
    codes = {name: [IrmaCode.parse(r.labels[0]) for r in part.records] for name, part in parts.items()}
    truth = [str(code) for code in codes["test"]]

    def fit_predict(labels: list[str]) -> np.ndarray:
        classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1))
        return classifier.fit(features["train"], labels).predict(features["test"])

    per_axis = {axis: fit_predict([code[axis] for code in codes["train"]]) for axis in AXES}
    joined = ["-".join(per_axis[axis][n] for axis in AXES) for n in range(len(truth))]
    flat = list(fit_predict([str(code) for code in codes["train"]]))
    frozen = retrieval(features["train"], codes["train"], features["test"], codes["test"])
    return {
        "logistic regression per axis (frozen Lite0)": {**scores(truth, joined, tables), **frozen},
        "logistic regression on whole codes (frozen Lite0)": {**scores(truth, flat, tables), **frozen},
    }


def engine_retrieval(folder: Path, dataset, cache: Path) -> dict[str, float]:
    checkpoint = load_checkpoint(folder)
    split = json.loads((folder / "split.json").read_text())
    by_id = {record.id: record for record in dataset.records}
    parts = {
        name: prepare_images([by_id[i] for i in split[name]], checkpoint.pipeline, cache, f"retrieval {name}")
        for name in ("train", "test")
    }
    embedder = Embedder(checkpoint)
    vectors = {name: embedder.embed_inputs(part.images).vectors for name, part in parts.items()}
    codes = {name: [IrmaCode.parse(r.labels[0]) for r in part.records] for name, part in parts.items()}
    return retrieval(vectors["train"], codes["train"], vectors["test"], codes["test"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--tables", type=Path, required=True, help="IRMA code tables folder (A.csv..D.csv)")
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["heads/0", "heads/0.5", "finetune/0.5"],
        help="training runs as MODE/CONTRASTIVE-WEIGHT (0 = classification loss only)",
    )
    parser.add_argument("--work", type=Path, default=Path("benchmark-work/classification"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--input-size", type=int, default=None, help="model input size (default: the model's)")
    args = parser.parse_args()
    tables = CodeTables.load(args.tables)
    dataset = open_dataset(args.dataset)
    rows, seconds, checkpoint = {}, {}, None
    for run in args.runs:
        mode, weight = run.split("/")
        started = time.time()
        config = make_config(
            mode=mode, split=SPLIT, seed=args.seed, input_size=args.input_size, contrastive_weight=float(weight)
        )
        out = args.work / run.replace("/", "-")
        shutil.rmtree(out, ignore_errors=True)  # no feature cache of an earlier run: the time includes caching
        checkpoint = train(dataset, config, out, tables=tables)
        folder = checkpoint.path
        assert folder is not None, "a trained checkpoint has a folder"
        seconds[run] = round(time.time() - started, 1)
        metrics = json.loads((folder / "test.json").read_text())
        irma = metrics["irma"]
        rows[f"cbmir {mode}, contrastive {weight} ({seconds[run]:.0f} s to train)"] = {
            "full_code": irma["accuracy"],
            **irma["axis_accuracy"],
            "mean_error_score": metrics.get("irma-with-unknown", irma).get("mean_error_score"),
            "test_images": irma["n"],
            **engine_retrieval(folder, dataset, args.work / "baseline-cache"),
        }
    assert checkpoint is not None, "--runs names at least one run"
    rows.update(logistic_baselines(checkpoint, dataset, args.work / "baseline-cache", tables))
    columns = ("full_code", *AXES, "mean_error_score", "P@1 full_code", "P@5 full_code", "P@1 anatomical")
    header = (
        "| method | full code | technical | directional | anatomical | biological | mean error score | "
        "retrieval P@1 code | P@5 code | P@1 anatomy |"
    )
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for method, figures in rows.items():
        cells = [f"{figures[key]:.3f}" for key in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    test_images = next(iter(rows.values()))["test_images"]
    retrieval_note = (
        "Retrieval: the held-back images as queries against the training images as gallery, cosine "
        "similarity of the embeddings (cbmir) or of the frozen Lite0 features (baselines)."
    )
    text = (
        f"Dataset `{dataset.name}` ({len(dataset.records)} images), split 70/10/20 with seed {args.seed}; "
        f"accuracy on the {test_images} held-back images. The cbmir error score is that of its predictions "
        "with '*' where the validation-chosen threshold stops them. " + retrieval_note + "\n\n" + "\n".join(lines)
    )
    publish("classification", {"dataset": str(args.dataset), "rows": rows, "train_seconds": seconds}, text)
    print(text)


if __name__ == "__main__":
    main()
