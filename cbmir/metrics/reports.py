"""The three reports, each a plain JSON-ready dict with a ``kind`` key: `classification_report` (one label
per image), `multilabel_report` (any number of findings per image) and `irma_report` (IRMA codes, with the
ImageCLEF error score), and the one-vs-rest ratios and averages they are made of.

A ratio whose denominator is zero is None, never NaN, so the JSON stays valid and no reader mistakes it for a
number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import numpy as np

from cbmir.irma import AXES, CodeTables, IrmaCode, IrmaCodeError, run_error_score
from cbmir.metrics.checks import MetricsError, class_labels, class_names, real_matrix

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
IRMA_TABLES_NOTE = (
    "error score omitted: it needs the IRMA code tables (A.csv .. D.csv); pass them as `tables` "
    "(cbmir.irma.CodeTables.load)"
)


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
    kept = [(value, weight) for value, weight in zip(values, weights, strict=True) if value is not None]
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
    names = class_names(classes)
    truth = class_labels(y_true, "y_true", len(names))
    predicted = class_labels(y_pred, "y_pred", len(names))
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
    array = real_matrix(values, "probabilities", shape)
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
    names = class_names(classes)
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
    score_matrix = real_matrix(scores, "scores", truth.shape)
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
        "accuracy": sum(t == p for t, p in zip(truth, predicted, strict=True)) / n,
        "axis_accuracy": {
            axis: sum(t[axis] == p[axis] for t, p in zip(truth, predicted, strict=True)) / n for axis in AXES
        },
    }
    if tables is None:
        report["note"] = IRMA_TABLES_NOTE
    else:
        total = run_error_score(zip(truth, predicted, strict=True), tables)
        report["error_score"] = total
        report["mean_error_score"] = total / n
    return report
