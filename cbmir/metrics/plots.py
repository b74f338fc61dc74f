"""Plots as PNG files: a confusion matrix and training curves, drawn with matplotlib's Agg canvas (no pyplot,
no global backend switch) and written atomically."""

from __future__ import annotations

import io
from collections.abc import Sequence
from numbers import Real
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cbmir.files import write_atomically
from cbmir.metrics.checks import MetricsError, class_names, real_matrix

HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy")
ANNOTATED_CLASSES = 40


def _save_png(figure: Figure, path: Path) -> Path:
    """Render with the Agg canvas (no pyplot, no global backend switch) and write the PNG atomically."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    path = Path(path)
    try:
        write_atomically(path, buffer.getvalue())
    except OSError as error:
        raise MetricsError(f"cannot write {path}: {error.strerror or error}") from error
    return path


def plot_confusion_matrix(
    matrix: np.ndarray | Sequence[Sequence[int]],
    classes: Sequence[str],
    path: Path,
    title: str = "Confusion matrix",
) -> Path:
    """Draw a confusion matrix (rows true, columns predicted) as a PNG; returns `path`.

    Colours show each cell as a fraction of its row (the true class), so rare classes are as readable as
    common ones; the cells carry the counts. Beyond `ANNOTATED_CLASSES` classes the counts are left out and
    the tick labels shrink with the cells.
    """
    names = class_names(classes)
    counts = real_matrix(matrix, "matrix", (len(names), len(names)))
    if (counts < 0).any() or (counts != np.round(counts)).any():
        raise MetricsError("matrix must hold counts: non-negative whole numbers")
    row_sums = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, row_sums, out=np.zeros_like(counts), where=row_sums > 0)
    size = len(names)
    cell = min(0.45, 18 / size)  # inches per cell
    side = max(5.0, cell * size + 3)
    figure = Figure(figsize=(side + 1.2, side), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, shrink=0.8, label="fraction of the true class")
    label_size = min(10.0, cell * 72 * 0.6)
    axes.set_xticks(range(size), labels=names, rotation=90, fontsize=label_size)
    axes.set_yticks(range(size), labels=names, fontsize=label_size)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    if size <= ANNOTATED_CLASSES:
        count_size = min(10.0, max(5.0, cell * 72 * 0.3))
        for (row, column), count in np.ndenumerate(counts):
            colour = "white" if fractions[row, column] > 0.5 else "black"
            axes.text(column, row, f"{int(count)}", ha="center", va="center", color=colour, fontsize=count_size)
    return _save_png(figure, path)


def plot_history(history: list[dict], path: Path) -> Path:
    """Draw training curves as a PNG, loss and accuracy per epoch side by side; returns `path`.

    Each entry of `history` is one epoch with the keys epoch, train_loss, val_loss, train_accuracy and
    val_accuracy; a NaN value (e.g. a diverged loss) leaves a gap in its line.
    """
    if not isinstance(history, Sequence) or not history:
        raise MetricsError("history is empty: it needs one dict per epoch")
    for index, entry in enumerate(history):
        if not isinstance(entry, dict):
            raise MetricsError(f"history[{index}] is a {type(entry).__name__}, expected a dict")
        missing = [key for key in HISTORY_KEYS if key not in entry]
        if missing:
            raise MetricsError(
                f"history[{index}] lacks {', '.join(missing)}; every epoch needs {', '.join(HISTORY_KEYS)}"
            )
        for key in HISTORY_KEYS:
            if not isinstance(entry[key], Real) or isinstance(entry[key], bool):
                raise MetricsError(f"history[{index}][{key!r}] is {entry[key]!r}, expected a number")
    column = {key: [float(entry[key]) for entry in history] for key in HISTORY_KEYS}
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    for axes, quantity in zip(figure.subplots(1, 2), ("loss", "accuracy"), strict=True):
        for split in ("train", "val"):
            label = "training" if split == "train" else "validation"
            axes.plot(column["epoch"], column[f"{split}_{quantity}"], marker="o", markersize=3, label=label)
        axes.set_title(quantity)
        axes.set_xlabel("epoch")
        axes.set_ylabel(quantity)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
    return _save_png(figure, path)
