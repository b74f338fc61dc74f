"""What a model's heads mean: the label schema (task, head names, class names), turning dataset labels into
training targets, and turning head outputs back into labels or IRMA codes.

Three tasks:
- `single-label`: one softmax head "label" (chest classes, or full IRMA codes as one flat class each, as the
  ImageCLEF paper did);
- `multi-label`: one sigmoid head "label" (the 14 NIH findings; an image may have none);
- `irma-axes`: four softmax heads, one per IRMA axis (technical, directional, anatomical, biological), so each
  axis has its own prediction and confidence, unseen combinations can be predicted, and a prediction can stop
  early with `*` where the model is unsure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from cbmir.errors import CbmirError
from cbmir.irma import AXES, IrmaCode, IrmaCodeError

Task = Literal["single-label", "multi-label", "irma-axes"]
TASKS: tuple[Task, ...] = get_args(Task)
LABEL_HEAD = "label"


class LabelError(CbmirError):
    """A label outside the schema, or a schema that cannot be built from the data."""


@dataclass(frozen=True)
class LabelSchema:
    task: Task
    heads: Mapping[str, tuple[str, ...]]

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise LabelError(f"task {self.task!r} is not one of {', '.join(TASKS)}")
        expected = list(AXES) if self.task == "irma-axes" else [LABEL_HEAD]
        if list(self.heads) != expected:
            raise LabelError(f"a {self.task} schema has the heads {expected}, got {list(self.heads)}")
        for head, classes in self.heads.items():
            if self.task != "multi-label" and len(classes) < 2:
                raise LabelError(
                    f"head {head!r} has {len(classes)} class(es) {list(classes)}: a classifier needs at least 2"
                )
            if not classes:
                raise LabelError(f"head {head!r} has no classes")
            if len(set(classes)) != len(classes):
                raise LabelError(f"head {head!r} lists a class twice")

    @classmethod
    def from_labels(cls, task: Task, labels: Sequence[Sequence[str]]) -> LabelSchema:
        """The schema covering every label in `labels` (one tuple of labels per record), classes sorted."""
        if task == "irma-axes":
            codes = [_one_code(record_labels) for record_labels in labels]
            return cls(task, {axis: tuple(sorted({code[axis] for code in codes})) for axis in AXES})
        if task == "single-label":
            for record_labels in labels:
                if len(record_labels) != 1:
                    raise LabelError(f"single-label task, but a record has the labels {list(record_labels)}")
        return cls(task, {LABEL_HEAD: tuple(sorted({label for record_labels in labels for label in record_labels}))})

    @property
    def head_sizes(self) -> dict[str, int]:
        return {head: len(classes) for head, classes in self.heads.items()}

    def targets(self, labels: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
        """Training targets per head: class indices (int64), or for multi-label a 0/1 float32 matrix.
        A label outside the schema is an error naming it."""
        if self.task == "multi-label":
            index = {name: i for i, name in enumerate(self.heads[LABEL_HEAD])}
            matrix = np.zeros((len(labels), len(index)), np.float32)
            for row, record_labels in enumerate(labels):
                for label in record_labels:
                    matrix[row, self._index(index, label, LABEL_HEAD)] = 1.0
            return {LABEL_HEAD: matrix}
        if self.task == "irma-axes":
            codes = [_one_code(record_labels) for record_labels in labels]
            return {
                axis: np.array([self._index(self._lookup(axis), code[axis], axis) for code in codes], np.int64)
                for axis in AXES
            }
        lookup = self._lookup(LABEL_HEAD)
        return {
            LABEL_HEAD: np.array([self._index(lookup, _single(record_labels), LABEL_HEAD) for record_labels in labels])
        }

    def _lookup(self, head: str) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.heads[head])}

    def _index(self, lookup: Mapping[str, int], label: str, head: str) -> int:
        if label not in lookup:
            shown = ", ".join(list(lookup)[:8]) + (", ..." if len(lookup) > 8 else "")
            raise LabelError(f"label {label!r} is not in the schema of head {head!r} ({shown})")
        return lookup[label]

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "heads": {head: list(classes) for head, classes in self.heads.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelSchema:
        try:
            heads = data["heads"]
            order = AXES if data["task"] == "irma-axes" else list(heads)  # JSON with sorted keys loses the order
            return cls(data["task"], {head: tuple(heads[head]) for head in order})
        except (KeyError, TypeError, AttributeError) as error:
            raise LabelError(f"malformed label schema record ({error!r})") from None


def _single(record_labels: Sequence[str]) -> str:
    if len(record_labels) != 1:
        raise LabelError(f"expected exactly one label, got {list(record_labels)}")
    return record_labels[0]


def _one_code(record_labels: Sequence[str]) -> IrmaCode:
    code = IrmaCode.parse(_single(record_labels))
    if not code.is_complete:
        raise LabelError(f"true IRMA code {code} contains '*': training labels must be complete codes")
    return code


@dataclass(frozen=True)
class AxisPrediction:
    code: str  # the axis code, with trailing '*' where the model stopped
    confidence: float  # probability mass of the predicted prefix


def predict_irma_axes(
    probabilities: Mapping[str, np.ndarray], schema: LabelSchema, threshold: float
) -> list[tuple[str, dict[str, AxisPrediction]]]:
    """Per image, the predicted IRMA code and each axis's prediction, stopping early with `*`.

    On each axis the code is chosen position by position: among the schema's axis codes that share the prefix
    chosen so far, the next character is the one carrying the most probability; when that mass falls below
    `threshold`, this position and all later ones become `*` ("not known"), which the ImageCLEF error score
    charges half of a wrong answer. `threshold` 0 never stops early.
    """
    if schema.task != "irma-axes":
        raise LabelError(f"IRMA axis prediction needs an irma-axes schema, not {schema.task}")
    count = len(next(iter(probabilities.values())))
    per_axis = {axis: [_descend(row, schema.heads[axis], threshold) for row in probabilities[axis]] for axis in AXES}
    results = []
    for i in range(count):
        axes = {axis: per_axis[axis][i] for axis in AXES}
        results.append(("-".join(axes[axis].code for axis in AXES), axes))
    return results


def _descend(row: np.ndarray, classes: Sequence[str], threshold: float) -> AxisPrediction:
    length = len(classes[0])
    candidates = list(range(len(classes)))
    prefix, mass = "", 1.0
    for position in range(length):
        totals: dict[str, float] = {}
        for index in candidates:
            char = classes[index][position]
            totals[char] = totals.get(char, 0.0) + float(row[index])
        char, char_mass = max(totals.items(), key=lambda item: item[1])
        if char_mass < threshold:
            return AxisPrediction(prefix + "*" * (length - position), mass)
        prefix, mass = prefix + char, char_mass
        candidates = [index for index in candidates if classes[index][position] == char]
    return AxisPrediction(prefix, mass)


@dataclass(frozen=True)
class Prediction:
    """What the model says about one image: the label (class name, IRMA code, or for multi-label the
    findings above 0.5 joined by '|'), its confidence, the top classes per head, and per-axis IRMA predictions.
    `neighbours`: how many known labels of similar indexed images were blended in (`blend_with_neighbours`);
    0 for the model's own prediction."""

    label: str
    confidence: float
    top: dict[str, list[tuple[str, float]]]
    axes: dict[str, AxisPrediction] | None = None
    neighbours: int = 0


# Blending a prediction with the known labels of the nearest indexed images: half the model's probabilities,
# half the neighbours' votes weighted by exp(similarity / 0.05). Over 5 folds of irma2007-dev (the finetune
# default, the 10 nearest gallery images; BENCHMARKS.md) full-code accuracy 0.755 -> 0.772 and the error score
# 0.054 -> 0.049; on kermany-600x2 accuracy 0.972 either way. (Chosen from weights 0.25 / 0.5 / 0.75,
# temperatures 0.05 and none, 5 / 10 / 20 neighbours, on those folds.)
NEIGHBOUR_WEIGHT = 0.5
NEIGHBOUR_TEMPERATURE = 0.05


def blend_with_neighbours(
    schema: LabelSchema, probabilities: Mapping[str, np.ndarray], neighbours: Sequence[tuple[str, float]]
) -> tuple[dict[str, np.ndarray], int]:
    """One image's probabilities (a vector per head) blended with the votes of `neighbours`, each the known
    label of a similar image (its IRMA code or class) and its similarity: per head, (1 - NEIGHBOUR_WEIGHT) x
    the model's probabilities + NEIGHBOUR_WEIGHT x each class's share of the neighbours' weights
    exp(similarity / NEIGHBOUR_TEMPERATURE). A neighbour whose label a head does not know (not an IRMA code,
    or a code or class the model was never trained on) does not vote on that head, and a head without votes
    keeps the model's probabilities; multi-label findings are never blended. Returns the probabilities and
    how many neighbours voted on at least one head."""
    blended = {head: np.asarray(values, np.float64) for head, values in probabilities.items()}
    if schema.task == "multi-label" or not neighbours:
        return blended, 0
    top = max(similarity for _, similarity in neighbours)
    weights = [float(np.exp((similarity - top) / NEIGHBOUR_TEMPERATURE)) for _, similarity in neighbours]
    voters: set[int] = set()
    for head, classes in schema.heads.items():
        index = {name: position for position, name in enumerate(classes)}
        votes = np.zeros(len(classes))
        for n, ((label, _), weight) in enumerate(zip(neighbours, weights, strict=True)):
            position = index.get(_head_class(schema, head, label) or "")
            if position is not None:
                votes[position] += weight
                voters.add(n)
        if votes.sum() > 0:
            blended[head] = (1 - NEIGHBOUR_WEIGHT) * blended[head] + NEIGHBOUR_WEIGHT * votes / votes.sum()
    return blended, len(voters)


def _head_class(schema: LabelSchema, head: str, label: str) -> str | None:
    """What a known label says about one head: its axis code (IRMA axes; None if the label is not an IRMA code
    or the axis is not known to the end), else the label itself."""
    if schema.task != "irma-axes":
        return label
    try:
        axis_code = IrmaCode.parse(label)[head]
    except IrmaCodeError:
        return None
    return None if "*" in axis_code else axis_code


def probabilities_from_logits(schema: LabelSchema, logits: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Softmax per head (sigmoid for multi-label). Log-probabilities, as the two-stage cascade emits, pass
    through softmax unchanged."""
    result = {}
    for head, values in logits.items():
        values = np.asarray(values, np.float64)
        if schema.task == "multi-label":
            result[head] = 1.0 / (1.0 + np.exp(-values))
        else:
            shifted = np.exp(values - values.max(axis=1, keepdims=True))
            result[head] = shifted / shifted.sum(axis=1, keepdims=True)
    return result


def decode_predictions(
    schema: LabelSchema, probabilities: Mapping[str, np.ndarray], *, irma_threshold: float = 0.0, top: int = 3
) -> list[Prediction]:
    """One `Prediction` per row of the per-head probabilities."""
    count = len(next(iter(probabilities.values())))
    tops = [
        {head: _top(matrix[n], schema.heads[head], top) for head, matrix in probabilities.items()} for n in range(count)
    ]
    if schema.task == "irma-axes":
        return [
            Prediction(code, float(np.prod([axis.confidence for axis in axes.values()])), tops[n], axes)
            for n, (code, axes) in enumerate(predict_irma_axes(probabilities, schema, irma_threshold))
        ]
    matrix, classes = probabilities[LABEL_HEAD], schema.heads[LABEL_HEAD]
    if schema.task == "multi-label":
        predictions = []
        for n, row in enumerate(matrix):
            found = [classes[i] for i in np.flatnonzero(row >= 0.5)]
            confidence = float(row[row >= 0.5].min()) if found else float(1.0 - row.max())
            predictions.append(Prediction("|".join(found), confidence, tops[n]))
        return predictions
    return [Prediction(tops[n][LABEL_HEAD][0][0], tops[n][LABEL_HEAD][0][1], tops[n]) for n in range(count)]


def _top(row: np.ndarray, classes: Sequence[str], count: int) -> list[tuple[str, float]]:
    return [(classes[i], float(row[i])) for i in np.argsort(-row, kind="stable")[:count]]
