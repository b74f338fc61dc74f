"""The ImageCLEF InceptionV3 paper's preprocessing table, re-run on your IRMA-coded archive: which padding
(resize / repetitive / constant) and which variant (plain / enhanced) helps on this data.

    python benchmarks/preprocessing_table.py ../shared/data/irma2007-dev --tables ../shared/data/irma-code-tables

Nkwentsha et al. (Tables I/II) trained InceptionV3 on each of the six preprocessings; its ImageNet weights
are not installable here, so every cell trains the default CPU model (ImageNet EfficientNet-Lite0, IRMA axis
heads) instead, with the same split, seed and training budget, and reports the held-back part's full-code
accuracy, loss (the classification objective on that part), per-axis accuracy and mean ImageCLEF error score.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, publish, saved_figure

from cbmir.datasets import open_dataset
from cbmir.errors import CbmirError
from cbmir.imaging.preprocess import PRESETS
from cbmir.irma import AXES, CodeTables
from cbmir.train import make_config, train

SPLIT = (0.7, 0.1, 0.2)
PAPER_BEST = "constant padding + enhancement: 71.34% on 193 classes (InceptionV3, ImageCLEF 2009)"


def run(args) -> dict:
    tables = CodeTables.load(args.tables)
    dataset = open_dataset(args.dataset)
    overrides = {"epochs": args.epochs} if args.epochs else {}
    cells = {}
    for name in PRESETS:
        print(f"== {name}")
        shutil.rmtree(args.work / name, ignore_errors=True)  # no feature cache of an earlier run: time it all
        started = time.time()
        config = make_config(mode=args.mode, preset=name, split=SPLIT, seed=args.seed, **overrides)
        checkpoint = train(dataset, config, args.work / name, tables=tables)
        test = checkpoint.card["metrics"]["test"]
        report = json.loads((args.work / name / "test.json").read_text())
        error = report.get("irma-with-unknown", report["irma"]).get("mean_error_score")
        cells[name] = {"accuracy": test["accuracy"], "loss": test["loss"], "axis_accuracy": test["axis_accuracy"],
                       "mean_error_score": error, "images": test["images"], "train_seconds": time.time() - started}
    return {"dataset": dataset.name, "images": len(dataset.records), "mode": args.mode,
            "epochs": make_config(**overrides).epochs, "seed": args.seed, "cells": cells}


def markdown(summary: dict) -> str:
    cells = summary["cells"]
    best = max(cell["accuracy"] for cell in cells.values())
    lines = [
        (f"Dataset `{summary['dataset']}` ({summary['images']} images), split 70/10/20 with seed {summary['seed']}; "
         f"every cell: the default CPU model (ImageNet EfficientNet-Lite0 with IRMA axis heads, {summary['mode']} "
         f"mode, up to {summary['epochs']} epochs with early stopping). The paper used InceptionV3, whose ImageNet "
         f"weights are not available on this machine. The paper's best: {PAPER_BEST}."),
        "",
        "![accuracy per preprocessing](benchmarks/results/preprocessing-table.png)",
        "",
        "| padding | variant | full-code accuracy | test loss | " + " | ".join(AXES) + " | mean error score | "
        "training s |",
        "|---|---|---|---|" + "---|" * len(AXES) + "---|---|",
    ]
    for name, cell in cells.items():
        padding, variant = name.split("-")
        accuracy = f"**{cell['accuracy']:.3f}**" if cell["accuracy"] == best else f"{cell['accuracy']:.3f}"
        error = "n/a" if cell["mean_error_score"] is None else f"{cell['mean_error_score']:.3f}"
        lines.append(f"| {padding} | {variant} | {accuracy} | {cell['loss']:.3f} | "
                     + " | ".join(f"{cell['axis_accuracy'][axis]:.3f}" for axis in AXES)
                     + f" | {error} | {cell['train_seconds']:.0f} |")
    lines += ["", f"Held-back images per cell: {next(iter(cells.values()))['images']}; at this size one image is "
                  f"{1 / next(iter(cells.values()))['images']:.3f} of accuracy, so small differences are noise."]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    names = list(summary["cells"])
    with saved_figure(path, figsize=(7, 3.5)) as (_, axis):
        axis.bar(names, [summary["cells"][name]["accuracy"] for name in names], color="#5a8fc4")
        axis.set(ylabel="full-code accuracy", ylim=(0, 1), title="Preprocessing (Table I presets), default CPU model")
        axis.tick_params(axis="x", rotation=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path, help="an IRMA-coded archive")
    parser.add_argument("--tables", type=Path, required=True, help="IRMA code tables folder (A.csv..D.csv)")
    parser.add_argument("--mode", default="heads", help="training mode of every cell")
    parser.add_argument("--epochs", type=int, help="training budget per cell (default: the CPU default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("benchmark-work/preprocessing-table"))
    args = parser.parse_args()
    try:
        summary = run(args)
    except CbmirError as error:
        sys.exit(f"error: {error}")
    RESULTS.mkdir(exist_ok=True)
    plot(summary, RESULTS / "preprocessing-table.png")
    text = markdown(summary)
    publish("preprocessing_table", summary, text)
    print(text)


if __name__ == "__main__":
    main()
