"""The ImageCLEF InceptionV3 paper's preprocessing table, re-run on your IRMA-coded archive: which way to a
square image (resize / repetitive / constant padding) and which variant (plain / enhanced) helps on this data.

    python benchmarks/preprocessing_table.py ../shared/data/irma2007-dev --tables ../shared/data/irma-code-tables

Nkwentsha et al. (Tables I/II) trained InceptionV3 on each of the six preprocessings; its ImageNet weights
are not available here, so every cell trains the default CPU model (ImageNet EfficientNet-Lite0 with
regional pooling, IRMA axis heads) instead, with the same split, seed and training budget, and reports the
held-back part's full-code accuracy, loss (the classification objective on that part: the sum of the four
axis heads' log losses), per-axis accuracy, mean ImageCLEF error score and the training time (feature caching included).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cbmir.datasets import open_dataset
from cbmir.errors import CbmirError
from cbmir.imaging.preprocess import PRESETS
from cbmir.irma import AXES, CodeTables
from cbmir.train import choose_task, make_config, train
from common import run_and_publish, saved_figure

SPLIT = (0.7, 0.1, 0.2)
PAPER_BEST_CELL = "constant-enhanced"
PAPER_BEST = "constant padding + enhancement, 71.34% on 193 classes with InceptionV3"


def run(args) -> dict:
    tables = CodeTables.load(args.tables)
    dataset = open_dataset(args.dataset)
    if choose_task(dataset.records) != "irma-axes":
        raise CbmirError(f"{dataset.name}: the preprocessing table needs one IRMA code per image")
    overrides = {"epochs": args.epochs} if args.epochs else {}
    cells, split = {}, None
    for number, name in enumerate(PRESETS, 1):
        print(f"== cell {number}/{len(PRESETS)}: {name}")
        out = args.work / name
        shutil.rmtree(out, ignore_errors=True)  # no feature cache of an earlier run: time it all
        started = time.time()
        config = make_config(mode=args.mode, preset=name, split=SPLIT, seed=args.seed, **overrides)
        checkpoint = train(dataset, config, out, tables=tables)
        seconds = time.time() - started
        cell_split = json.loads((out / "split.json").read_text())
        if split is not None and cell_split != split:  # a preset that cannot read an image would drop it
            raise CbmirError(f"{name}: its split differs from the first cell's, so the cells are not comparable")
        split = cell_split
        test = checkpoint.card["metrics"]["test"]  # test.json summed up: irma accuracy, axis log losses added
        cells[name] = {
            "accuracy": test["accuracy"],
            "loss": test["loss"],
            "axis_accuracy": test["axis_accuracy"],
            "mean_error_score": test.get("mean_error_score"),
            "images": test["images"],
            "train_seconds": seconds,
        }
        print(f"   accuracy {test['accuracy']:.3f}, loss {test['loss']:.3f}, {seconds:.0f} s")
    assert split is not None, "every run trains at least one cell (PRESETS is not empty)"
    return {
        "dataset": dataset.name,
        "images": len(dataset.records),
        "mode": args.mode,
        "epochs": make_config(**overrides).epochs,
        "seed": args.seed,
        "split_sizes": {part: len(ids) for part, ids in split.items()},
        "cells": cells,
    }


def markdown(summary: dict) -> str:
    cells = summary["cells"]
    best = max(cell["accuracy"] for cell in cells.values())
    winners = [name for name, cell in cells.items() if cell["accuracy"] == best]
    sizes = summary["split_sizes"]
    lines = [
        (
            f"Dataset `{summary['dataset']}` ({summary['images']} images), split 70/10/20 with seed {summary['seed']} "
            f"(train {sizes['train']} / validation {sizes['validation']} / test {sizes['test']}), the same in every "
            f"cell; every cell: the default CPU model (ImageNet EfficientNet-Lite0, regionally pooled, with IRMA "
            f"axis heads, {summary['mode']} mode, up to {summary['epochs']} epochs with early stopping). "
            "The paper used "
            "InceptionV3, whose ImageNet weights are not available on this machine. Test loss: the sum of the four "
            "axis heads' log losses; error score: of the predictions with '*' where the validation-chosen threshold "
            "stops them."
        ),
        "",
        "![accuracy per preprocessing](benchmarks/results/preprocessing-table.png)",
        "",
        "| padding | variant | full-code accuracy | test loss | " + " | ".join(AXES) + " | mean error score | "
        "training s |",
        "|---|---|---|---|" + "---|" * len(AXES) + "---|---|",
    ]
    for name, cell in cells.items():
        padding, variant = name.split("-")
        accuracy = f"**{cell['accuracy']:.3f}**" if name in winners else f"{cell['accuracy']:.3f}"
        error = "n/a" if cell["mean_error_score"] is None else f"{cell['mean_error_score']:.3f}"
        lines.append(
            f"| {padding} | {variant} | {accuracy} | {cell['loss']:.3f} | "
            + " | ".join(f"{cell['axis_accuracy'][axis]:.3f}" for axis in AXES)
            + f" | {error} | {cell['train_seconds']:.0f} |"
        )
    held_back = next(iter(cells.values()))["images"]
    agrees = "is" if PAPER_BEST_CELL in winners else "is not"
    lines += [
        "",
        (
            f"Best here: {', '.join(winners)} ({best:.3f}). The paper's best: {PAPER_BEST}; here "
            f"{PAPER_BEST_CELL} {agrees} among the best."
        ),
        "",
        (
            f"Held-back images per cell: {held_back}; one image is {1 / held_back:.3f} of accuracy, so small "
            "differences are noise."
        ),
    ]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    names = list(summary["cells"])
    with saved_figure(path, figsize=(7, 3.5)) as (_, axis):
        axis.bar(names, [summary["cells"][name]["accuracy"] for name in names], color="#5a8fc4")
        axis.set(ylabel="full-code accuracy", ylim=(0, 1), title="Preprocessing (Table I presets), default CPU model")
        axis.tick_params(axis="x", rotation=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="an IRMA-coded archive (a folder with codes.csv)")
    parser.add_argument("--tables", type=Path, required=True, help="IRMA code tables folder (A.csv..D.csv)")
    parser.add_argument("--mode", choices=("heads", "finetune"), default="heads", help="training mode of every cell")
    parser.add_argument("--epochs", type=int, help="training budget per cell (default: the CPU default)")
    parser.add_argument(
        "--work", type=Path, default=Path("benchmark-work/preprocessing-table"), help="folder for the six checkpoints"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the training")
    args = parser.parse_args()
    run_and_publish("preprocessing_table", run, args, plot=plot, plot_file="preprocessing-table.png", markdown=markdown)


if __name__ == "__main__":
    main()
