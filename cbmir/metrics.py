"""Evaluation metrics and report files: pure functions on numpy arrays.

Three reports, each a plain JSON-ready dict with a ``kind`` key: `classification_report` (one label per
image), `multilabel_report` (any number of findings per image, e.g. the 14 NIH chest findings) and
`irma_report` (IRMA codes, with the ImageCLEF error score). `write_report` stores a report as JSON and as
Markdown; `plot_confusion_matrix` and `plot_history` draw PNGs.

A ratio whose denominator is zero (sensitivity of a class absent from the truth, PPV of a class never
predicted, ...) is None, never NaN, so the JSON stays valid and no reader mistakes it for a number.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cbmir.errors import CbmirError
from cbmir.files import write_atomically
from cbmir.irma import AXES, CodeTables, IrmaCode, IrmaCodeError, run_error_score


class MetricsError(CbmirError):
    """Inputs to a metric, report or plot that cannot be evaluated: wrong shape, length, type or value."""


# The one-vs-rest figures of every class, in report order, with their Markdown column titles.
FIGURES = {
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ppv": "PPV",
    "npv": "NPV",
    "precision": "Precision",
    "recall": "Recall",
    "f1": "F1",
    "prevalence": "Prevalence",
    "detection_rate": "Detection rate",
    "detection_prevalence": "Detection prevalence",
    "balanced_accuracy": "Balanced accuracy",
}
RANKING_FIGURES = {"roc_auc": "ROC-AUC", "average_precision": "Average precision"}
HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy")
ANNOTATED_CLASSES = 40
IRMA_TABLES_NOTE = (
    "error score omitted: it needs the IRMA code tables (A.csv .. D.csv); pass them as `tables` "
    "(cbmir.irma.CodeTables.load)"
)


# --- input checks ----------------------------------------------------------------------------------------


def _class_names(classes: Sequence[str]) -> list[str]:
    names = list(classes)
    if not names:
        raise MetricsError("no classes given: `classes` needs at least one name")
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise MetricsError(f"class {index} is {name!r}: class names must be non-empty text")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise MetricsError(f"class names must be unique, but {', '.join(map(repr, duplicates))} repeat")
    return names


def _labels(values: np.ndarray, what: str, n_classes: int) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise MetricsError(f"{what} must be one-dimensional (one label per image), got shape {array.shape}")
    if array.size == 0:
        raise MetricsError(f"{what} is empty: there is nothing to evaluate")
    if array.dtype.kind not in "iu":
        raise MetricsError(f"{what} must hold integer class indices, got dtype {array.dtype}")
    outside = (array < 0) | (array >= n_classes)
    if outside.any():
        index = int(np.flatnonzero(outside)[0])
        raise MetricsError(
            f"{what}[{index}] is {array[index]}, outside the class indices 0..{n_classes - 1} "
            f"({int(outside.sum())} label(s) out of range)"
        )
    return array


def _real_matrix(values: np.ndarray, what: str, shape: tuple[int, int]) -> np.ndarray:
    array = np.asarray(values)
    if array.shape != shape:
        raise MetricsError(f"{what} must have shape {shape}, got {array.shape}")
    if array.dtype.kind not in "iuf":
        raise MetricsError(f"{what} must hold numbers, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        row, column = np.argwhere(~np.isfinite(array))[0]
        raise MetricsError(f"{what}[{row}, {column}] is {array[row, column]}: every value must be finite")
    return array


# --- ratios and averages ---------------------------------------------------------------------------------


def _ratio(numerator: float, denominator: float) -> float | None:
    return None if denominator == 0 else float(numerator / denominator)


def _one_vs_rest(tp: int, fp: int, fn: int, tn: int) -> dict[str, float | int | None]:
    """The figures of one class against all others, as R caret's ``confusionMatrix`` defines them.

    F1 is computed as 2TP / (2TP + FP + FN), which equals the harmonic mean of precision and recall
    whenever both exist, and is still defined (0) when only one of them is: a class that is present but
    never predicted, or predicted but never present, has F1 0 rather than None (as in scikit-learn).
    Balanced accuracy is None when sensitivity or specificity is.
    """
    n = tp + fp + fn + tn
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    ppv = _ratio(tp, tp + fp)
    return {
        "sensitivity": sensitivity,
        "specificity": specificity,
        "ppv": ppv,
        "npv": _ratio(tn, tn + fn),
        "precision": ppv,
        "recall": sensitivity,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "prevalence": _ratio(tp + fn, n),
        "detection_rate": _ratio(tp, n),
        "detection_prevalence": _ratio(tp + fp, n),
        "balanced_accuracy": None if sensitivity is None or specificity is None else (sensitivity + specificity) / 2,
        "support": tp + fn,
    }


def _average(values: list[float | None], weights: list[int] | None = None) -> float | None:
    """The (weighted) mean of the values that are not None; None when no value (or no weight) remains."""
    if weights is None:
        weights = [1] * len(values)
    kept = [(value, weight) for value, weight in zip(values, weights) if value is not None]
    total = sum(weight for _, weight in kept)
    return None if total == 0 else float(sum(value * weight for value, weight in kept) / total)


def _averages(per_class: dict[str, dict], figures: Sequence[str], weighted: bool) -> dict[str, dict]:
    supports = [figures_of["support"] for figures_of in per_class.values()]
    kinds = {"macro": None, "weighted": supports} if weighted else {"macro": None}
    return {
        kind: {
            **{name: _average([row[name] for row in per_class.values()], weights) for name in figures},
            "support": sum(supports),
        }
        for kind, weights in kinds.items()
    }


# --- reports ---------------------------------------------------------------------------------------------


def classification_report(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    classes: Sequence[str],
    probabilities: np.ndarray | None = None,
) -> dict:
    """Accuracy, confusion matrix and per-class figures of a single-label classifier.

    The per-class figures are those of ``confusionMatrix`` in the R package caret (M. Kuhn, "Building
    Predictive Models in R Using the caret Package", J. Stat. Softw. 28(5), 2008; its ``byClass`` table),
    with each class taken one-vs-rest: sensitivity = recall = TP/(TP+FN), specificity = TN/(TN+FP),
    PPV = precision = TP/(TP+FP), NPV = TN/(TN+FN), prevalence = (TP+FN)/N, detection rate = TP/N,
    detection prevalence = (TP+FP)/N, balanced accuracy = (sensitivity+specificity)/2, plus F1 (see
    `_one_vs_rest`) and support (the class's count in `y_true`).

    A 0/0 ratio is None. The macro average is the plain mean over classes and the weighted average is
    weighted by support; both skip the classes whose figure is None, and are None when none is left.
    Their ``support`` is the number of images.

    The confusion matrix has a row per true class and a column per predicted class. With
    `probabilities` (N x C, rows summing to 1) the report adds the log loss, -mean(log p(true class)),
    with probabilities clipped to machine epsilon so that a confident mistake costs a large but finite loss.
    """
    names = _class_names(classes)
    truth = _labels(y_true, "y_true", len(names))
    predicted = _labels(y_pred, "y_pred", len(names))
    if truth.size != predicted.size:
        raise MetricsError(f"y_true has {truth.size} labels but y_pred has {predicted.size}: one each per image")
    n = int(truth.size)
    matrix = np.zeros((len(names), len(names)), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    per_class = {}
    for index, name in enumerate(names):
        tp = int(matrix[index, index])
        fn, fp = int(matrix[index].sum()) - tp, int(matrix[:, index].sum()) - tp
        per_class[name] = _one_vs_rest(tp, fp, fn, n - tp - fp - fn)
    report = {
        "kind": "classification",
        "n": n,
        "classes": names,
        "accuracy": float(np.trace(matrix) / n),
        "confusion_matrix": matrix.tolist(),
        "per_class": per_class,
        "averages": _averages(per_class, list(FIGURES), weighted=True),
    }
    if probabilities is not None:
        report["log_loss"] = _log_loss(truth, _probabilities(probabilities, (n, len(names))))
    return report


def _probabilities(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    array = _real_matrix(values, "probabilities", shape)
    if (array < 0).any() or (array > 1).any():
        raise MetricsError("probabilities must lie between 0 and 1")
    sums = array.sum(axis=1)
    off = np.flatnonzero(np.abs(sums - 1) > 1e-4)
    if off.size:
        raise MetricsError(
            f"probabilities row {off[0]} sums to {sums[off[0]]:.6g}, not 1 ({off.size} row(s) off): "
            f"pass class probabilities (e.g. a softmax), not raw scores"
        )
    return array


def _log_loss(truth: np.ndarray, probabilities: np.ndarray) -> float:
    eps = np.finfo(np.float64).eps
    chosen = probabilities[np.arange(truth.size), truth]
    return float(-np.mean(np.log(np.maximum(chosen, eps))))


def _roc_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve from ranks (the Mann-Whitney U statistic); ties count one half."""
    n_positive = int(positive.sum())
    n_negative = positive.size - n_positive
    if n_positive == 0 or n_negative == 0:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    ranks = (last - (counts - 1) / 2)[inverse]
    return float((ranks[positive].sum() - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative))


def _average_precision(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Sum over the distinct score thresholds of (recall step) x precision, as scikit-learn computes it."""
    n_positive = int(positive.sum())
    if n_positive == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    ranked_scores, ranked_truth = scores[order], positive[order]
    group_ends = np.r_[np.flatnonzero(np.diff(ranked_scores)), ranked_scores.size - 1]
    true_positives = np.cumsum(ranked_truth)[group_ends]
    precision = true_positives / (group_ends + 1)
    recall = true_positives / n_positive
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def multilabel_report(
    y_true: np.ndarray,
    scores: np.ndarray,
    classes: Sequence[str],
    threshold: float = 0.5,
) -> dict:
    """Per-finding ROC-AUC, average precision and one-vs-rest figures of a multi-label classifier.

    `y_true` is N x C (bool, or 0/1 integers), `scores` N x C (any finite real, e.g. sigmoid outputs). A
    finding counts as predicted when its score is >= `threshold`; the figures are those of
    `classification_report`. ROC-AUC is None when a finding has only positives or only negatives in
    `y_true`, average precision when it has no positive. The macro averages skip None values; their
    ``support`` is the number of positive labels over all findings.
    """
    names = _class_names(classes)
    truth = np.asarray(y_true)
    if truth.ndim != 2 or truth.shape[0] == 0 or truth.shape[1] != len(names):
        raise MetricsError(
            f"y_true must have shape (images, {len(names)}) with at least one image (one column per class), "
            f"got {truth.shape}"
        )
    if truth.dtype != np.bool_:
        if truth.dtype.kind not in "iu" or not np.isin(truth, (0, 1)).all():
            raise MetricsError(f"y_true must be boolean or hold only 0 and 1, got dtype {truth.dtype}")
        truth = truth.astype(bool)
    score_matrix = _real_matrix(scores, "scores", truth.shape)
    if not isinstance(threshold, Real) or isinstance(threshold, bool) or not math.isfinite(threshold):
        raise MetricsError(f"threshold must be a finite number, got {threshold!r}")
    predicted = score_matrix >= threshold
    per_class = {}
    for index, name in enumerate(names):
        positive, hit = truth[:, index], predicted[:, index]
        tp, fp, fn = int((positive & hit).sum()), int((~positive & hit).sum()), int((positive & ~hit).sum())
        per_class[name] = {
            "roc_auc": _roc_auc(positive, score_matrix[:, index]),
            "average_precision": _average_precision(positive, score_matrix[:, index]),
            **_one_vs_rest(tp, fp, fn, positive.size - tp - fp - fn),
        }
    return {
        "kind": "multilabel",
        "n": int(truth.shape[0]),
        "classes": names,
        "threshold": float(threshold),
        "per_class": per_class,
        "averages": _averages(per_class, [*RANKING_FIGURES, *FIGURES], weighted=False),
    }


def _codes(codes: Sequence[str], what: str) -> list[IrmaCode]:
    if isinstance(codes, str):
        raise MetricsError(f"{what} must be a sequence of IRMA codes, got a single text {codes!r}")
    parsed = []
    for index, code in enumerate(codes):
        try:
            parsed.append(IrmaCode.parse(code))
        except IrmaCodeError as error:
            raise MetricsError(f"{what}[{index}]: {error}") from error
    return parsed


def irma_report(
    true_codes: Sequence[str],
    predicted_codes: Sequence[str],
    tables: CodeTables | None,
) -> dict:
    """Accuracy of whole IRMA codes and of each axis, and the ImageCLEF error score when `tables` are given.

    A code or axis is correct when it equals the true one character for character; a ``*`` (not known) in
    the prediction therefore counts as not correct. The error score (`cbmir.irma.run_error_score`, the sum
    over images, and its mean per image) needs the IRMA code tables; without them it is omitted and
    ``note`` says why.
    """
    truth, predicted = _codes(true_codes, "true_codes"), _codes(predicted_codes, "predicted_codes")
    if len(truth) != len(predicted):
        raise MetricsError(f"{len(truth)} true codes but {len(predicted)} predicted codes: one each per image")
    if not truth:
        raise MetricsError("no IRMA codes given: there is nothing to evaluate")
    incomplete = next((index for index, code in enumerate(truth) if not code.is_complete), None)
    if incomplete is not None:
        raise MetricsError(
            f"true_codes[{incomplete}] is {str(truth[incomplete])!r}: a true code must not contain '*' (not known)"
        )
    n = len(truth)
    report = {
        "kind": "irma",
        "n": n,
        "accuracy": sum(t == p for t, p in zip(truth, predicted)) / n,
        "axis_accuracy": {axis: sum(t[axis] == p[axis] for t, p in zip(truth, predicted)) / n for axis in AXES},
    }
    if tables is None:
        report["note"] = IRMA_TABLES_NOTE
    else:
        total = run_error_score(zip(truth, predicted), tables)
        report["error_score"] = total
        report["mean_error_score"] = total / n
    return report


# --- report files ----------------------------------------------------------------------------------------


def _write_atomically(path: Path, data: bytes) -> None:
    try:
        write_atomically(path, data)
    except OSError as error:
        raise MetricsError(f"cannot write {path}: {error.strerror or error}") from error


def _cell(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return lines + ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]


def _figure_tables(report: dict, label: str, figures: dict[str, str]) -> list[str]:
    header = [label, "Support", *figures.values()]
    per_class = [
        [name, report["per_class"][name]["support"], *(report["per_class"][name][key] for key in figures)]
        for name in report["classes"]
    ]
    averages = [[kind, row["support"], *(row[key] for key in figures)] for kind, row in report["averages"].items()]
    return [
        f"## Per {label.lower()}", "", *_table(header, per_class), "",
        "## Averages", "", *_table(["Average", "Support", *figures.values()], averages),
    ]


def _classification_markdown(report: dict) -> list[str]:
    summary = [f"- Images: {report['n']}", f"- Classes: {len(report['classes'])}",
               f"- Accuracy: {_cell(report['accuracy'])}"]
    if "log_loss" in report:
        summary.append(f"- Log loss: {_cell(report['log_loss'])}")
    return [*summary, "", *_figure_tables(report, "Class", FIGURES)]


def _multilabel_markdown(report: dict) -> list[str]:
    summary = [f"- Images: {report['n']}", f"- Findings: {len(report['classes'])}",
               f"- Threshold: {report['threshold']:g} (a finding is predicted when its score is at least this)"]
    return [*summary, "", *_figure_tables(report, "Finding", {**RANKING_FIGURES, **FIGURES})]


def _irma_markdown(report: dict) -> list[str]:
    lines = [f"- Images: {report['n']}", f"- Accuracy (whole code): {_cell(report['accuracy'])}"]
    if "error_score" in report:
        lines += [f"- ImageCLEF error score: {_cell(report['error_score'])} "
                  f"(mean per image {_cell(report['mean_error_score'])})"]
    else:
        lines += [f"- Note: {report['note']}"]
    rows = [[axis, report["axis_accuracy"][axis]] for axis in AXES]
    return [*lines, "", "## Accuracy per axis", "", *_table(["Axis", "Accuracy"], rows)]


# Each report kind with the title and the body of its Markdown file.
MARKDOWN: dict[str, tuple[str, Callable[[dict], list[str]]]] = {
    "classification": ("Classification", _classification_markdown),
    "multilabel": ("Multi-label classification", _multilabel_markdown),
    "irma": ("IRMA codes", _irma_markdown),
}


def write_report(sections: Mapping[str, dict], folder: Path, name: str = "evaluation") -> tuple[Path, Path]:
    """Write reports as ``name.json`` (section name -> report; sorted keys, indent 2) and ``name.md`` (one
    chapter per section); returns both paths.

    Each file is written atomically. The folder is created when missing. Both texts are built before
    anything is written, so a report that cannot be rendered leaves no file behind.
    """
    if not isinstance(sections, Mapping) or not sections:
        raise MetricsError("no reports given: write_report takes a mapping of section name -> report")
    for section, report in sections.items():
        kind = report.get("kind") if isinstance(report, dict) else None
        if kind not in MARKDOWN:
            raise MetricsError(
                f"section {section!r} is not a cbmir report: 'kind' is {kind!r}, expected one of "
                f"{', '.join(MARKDOWN)} (build it with classification_report, multilabel_report or irma_report)"
            )
    if not name or Path(name).name != name or name.startswith("."):
        raise MetricsError(f"report name {name!r} must be a plain file name without folders or a leading dot")
    try:
        as_json = json.dumps(dict(sections), sort_keys=True, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as error:
        raise MetricsError(f"the report cannot be written as JSON: {error}") from error
    lines = [f"# Evaluation: {name}"]
    for section, report in sections.items():
        title, body = MARKDOWN[report["kind"]]
        lines += ["", f"## {section} ({title.lower()})", ""]
        lines += [f"#{line}" if line.startswith("#") else line for line in body(report)]
    markdown = "\n".join(lines) + "\n"
    folder = Path(folder)
    paths = folder / f"{name}.json", folder / f"{name}.md"
    for path, text in zip(paths, (as_json, markdown)):
        _write_atomically(path, text.encode("utf-8"))
    return paths


# --- plots -----------------------------------------------------------------------------------------------


def _save_png(figure: Figure, path: Path) -> Path:
    """Render with the Agg canvas (no pyplot, no global backend switch) and write the PNG atomically."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    path = Path(path)
    _write_atomically(path, buffer.getvalue())
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
    names = _class_names(classes)
    counts = _real_matrix(matrix, "matrix", (len(names), len(names)))
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
    for axes, quantity in zip(figure.subplots(1, 2), ("loss", "accuracy")):
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
