"""Evaluating a checkpoint on labelled radiographs: the report radiology papers show (accuracy, loss,
confusion matrix, per-class sensitivity ... balanced accuracy), ROC-AUC per finding for multi-label chest
data, and for IRMA codes the accuracy per axis and of the full code with the ImageCLEF error score.
Written as JSON and Markdown beside a confusion-matrix PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cbmir.checkpoint import Checkpoint
from cbmir.datasets import Dataset
from cbmir.embed import Embedder, Runtime
from cbmir.errors import CbmirError
from cbmir.irma import CodeTables, IrmaCode, IrmaCodeError, run_error_score
from cbmir.labels import LABEL_HEAD, decode_predictions
from cbmir.metrics import classification_report, irma_report, multilabel_report, plot_confusion_matrix, write_report
from cbmir.prepared import PreparedImages, prepare_images


class EvaluationError(CbmirError):
    """Nothing to evaluate, or data that does not fit the checkpoint."""


# Candidate thresholds for stopping an IRMA axis early with '*'.
THRESHOLDS = tuple(np.round(np.arange(0.0, 0.96, 0.05), 2))
# Fewer validation images than this choose no threshold. On the ~40 of an irma2007-dev fold, 5 of 8 trained
# models (5 folds, 3 more seeds of one) chose 0.6-0.7: on their test fold that moved the error score by -0.007
# to +0.007 (mean 0.000) and cut full-code accuracy by 0.05-0.12 each ('*' is never right).
MIN_THRESHOLD_IMAGES = 200


def predict_part(checkpoint: Checkpoint, part: PreparedImages, runtime: Runtime = "auto") -> dict[str, np.ndarray]:
    return Embedder(checkpoint, runtime=runtime).embed_inputs(part.images).probabilities


def choose_irma_threshold(checkpoint: Checkpoint, part: PreparedImages, tables: CodeTables | None) -> tuple[float, str]:
    """The `*` threshold that minimises the ImageCLEF error score on `part` (validation images), when there
    are at least `MIN_THRESHOLD_IMAGES` of them; else 0 (never stopping early)."""
    if tables is None:
        return 0.0, "no IRMA code tables given: predictions never stop early with '*'"
    probabilities = predict_part(checkpoint, part)
    truth = [record.labels[0] for record in part.records]
    scores = {}
    for threshold in THRESHOLDS:
        predicted = decode_predictions(checkpoint.schema, probabilities, irma_threshold=float(threshold))
        scores[float(threshold)] = run_error_score(zip(truth, [p.label for p in predicted], strict=True), tables)
    best = min(scores, key=lambda t: (scores[t], t))
    if len(truth) < MIN_THRESHOLD_IMAGES:
        return 0.0, (
            f"never stopping early: {len(truth)} validation images are too few to choose a threshold on (at least "
            f"{MIN_THRESHOLD_IMAGES}); on them, {best} would score {scores[best]:.3f} against {scores[0.0]:.3f}"
        )
    return best, (
        f"chosen on {len(truth)} validation images: error score {scores[best]:.3f} at threshold {best} "
        f"(never stopping: {scores[0.0]:.3f})"
    )


def evaluate_images(
    checkpoint: Checkpoint,
    part: PreparedImages,
    tables: CodeTables | None,
    out: Path,
    name: str,
    runtime: Runtime = "auto",
) -> dict[str, Any]:
    """Evaluate on preprocessed images, with the model in `runtime` (see `cbmir.embed`). Writes
    `name`.json/.md into `out` with a section per report (classification, findings, irma, and one per IRMA
    axis) and `name`-confusion.png; returns the headline."""
    schema = checkpoint.schema
    probabilities = predict_part(checkpoint, part, runtime)
    labels = [record.labels for record in part.records]
    sections: dict[str, dict[str, Any]] = {}
    headline: dict[str, Any] = {"images": len(labels)}
    if schema.task == "multi-label":
        targets = schema.targets(labels)[LABEL_HEAD].astype(bool)
        sections["findings"] = multilabel_report(targets, probabilities[LABEL_HEAD], schema.heads[LABEL_HEAD])
        headline["macro_roc_auc"] = sections["findings"]["averages"]["macro"].get("roc_auc")
    else:
        heads = [LABEL_HEAD] if schema.task == "single-label" else list(schema.heads)
        headline["loss"] = 0.0
        for head in heads:
            section = "classification" if head == LABEL_HEAD else f"axis-{head}"
            sections[section] = _head_report(
                schema.heads[head],
                [lab[0] for lab in labels],
                probabilities[head],
                axis=None if head == LABEL_HEAD else head,
            )
            headline["loss"] += sections[section]["log_loss"]
        headline["accuracy"] = sections["classification"]["accuracy"] if "classification" in sections else None
        shown = "classification" if "classification" in sections else "axis-anatomical"
        plot_confusion_matrix(
            np.array(sections[shown]["confusion_matrix"]),
            sections[shown]["classes"],
            out / f"{name}-confusion.png",
            title=f"{name}: {shown}",
        )
    if schema.task == "irma-axes" or (schema.task == "single-label" and _all_irma(labels)):
        # Accuracy counts the most likely code; the error score is that of the prediction as given, which may
        # stop early with '*' (the checkpoint's threshold), when it does.
        truth = [lab[0] for lab in labels]
        for section, threshold in (("irma", 0.0), ("irma-with-unknown", checkpoint.irma_threshold)):
            if section == "irma" or threshold > 0:
                predictions = decode_predictions(schema, probabilities, irma_threshold=threshold)
                sections[section] = irma_report(truth, [p.label for p in predictions], tables)
                if "mean_error_score" in sections[section]:
                    headline["mean_error_score"] = sections[section]["mean_error_score"]
        headline["accuracy"] = sections["irma"]["accuracy"]
        headline["axis_accuracy"] = sections["irma"]["axis_accuracy"]
    write_report(sections, out, name)
    return headline


def _head_report(classes, labels: list[str], probabilities: np.ndarray, axis: str | None) -> dict[str, Any]:
    """The classification report of one head; images whose label is outside the head's classes (a code never
    seen in training) count in `not_in_schema` and are left out of the per-class figures."""
    values = [IrmaCode.parse(label)[axis] for label in labels] if axis else labels
    index = {name: i for i, name in enumerate(classes)}
    known = [i for i, value in enumerate(values) if value in index]
    targets = np.array([index[values[i]] for i in known], np.int64)
    report = classification_report(targets, probabilities[known].argmax(1), classes, probabilities[known])
    report["not_in_schema"] = len(values) - len(known)
    return report


def _all_irma(labels) -> bool:
    try:
        return all(IrmaCode.parse(lab[0]).is_complete for lab in labels)
    except IrmaCodeError:
        return False


def evaluate_dataset(
    checkpoint: Checkpoint,
    dataset: Dataset,
    out: Path,
    tables: CodeTables | None,
    split: str | None = None,
    name: str = "evaluation",
    runtime: Runtime = "auto",
) -> dict[str, Any]:
    """Evaluate on a dataset read by `cbmir.datasets`, or on one split of it: the dataset's own split, or
    for a dataset without one, the split the checkpoint was trained with (its split.json)."""
    records = dataset.records
    if split is not None:
        records = [r for r in records if r.split == split] or _checkpoint_split(checkpoint, dataset, split)
    if not records:
        raise EvaluationError(f"no records to evaluate in {dataset.name}" + (f" (split {split!r})" if split else ""))
    part = prepare_images(records, checkpoint.pipeline, Path(out) / "cache", f"preprocess {dataset.name}")
    return evaluate_images(checkpoint, part, tables, Path(out), name, runtime)


def _checkpoint_split(checkpoint: Checkpoint, dataset: Dataset, split: str) -> list:
    listing = checkpoint.path / "split.json" if checkpoint.path else None
    if listing is None or not listing.is_file():
        return []
    ids = set(json.loads(listing.read_text()).get(split, []))
    return [record for record in dataset.records if record.id in ids]
