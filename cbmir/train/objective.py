"""The losses and scores of training: the classification loss per head (class-balanced, optionally label
smoothed), the supervised contrastive loss on the embedding beside it, for IRMA axes with the code tables the
expected hierarchical error of the prediction (so mistakes land on near codes), and the accuracy of a batch."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from cbmir.irma import AXES, CodeTables, IrmaCode, axis_error
from cbmir.labels import LabelSchema
from cbmir.models import ModelOutput
from cbmir.train.config import TrainConfig


def supervised_contrastive_loss(features: torch.Tensor, groups: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Khosla et al. (2020) SupCon: pull embeddings of the same label together, push others apart. Rows with
    no positive in the batch are left out; 0 when no row has one."""
    z = F.normalize(features, dim=1)
    similarity = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    similarity = similarity.masked_fill(eye, float("-inf"))
    log_prob = similarity - torch.logsumexp(similarity, dim=1, keepdim=True)
    positives = (groups[:, None] == groups[None, :]) & ~eye
    counts = positives.sum(1)
    usable = counts > 0
    if not usable.any():
        return features.sum() * 0.0
    summed = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(1)
    return -(summed[usable] / counts[usable]).mean()


# A complete code whose other axes stand in while one axis's classes are compared (the error of an axis
# depends on that axis's values alone).
_STAND_IN = IrmaCode.parse("1121-120-200-700")


def axis_costs(schema: LabelSchema, tables: CodeTables) -> dict[str, np.ndarray]:
    """Per IRMA axis head, K x K: the ImageCLEF error of predicting class j where class i is true
    (`cbmir.irma.axis_error`), scaled to 0..1 (1: wrong from the first position)."""
    costs = {}
    for axis in AXES:
        codes = [dataclasses.replace(_STAND_IN, **{axis: value}) for value in schema.heads[axis]]
        costs[axis] = np.array(
            [[4 * axis_error(true, guess, axis, tables) for guess in codes] for true in codes], np.float32
        )
    return costs


class Objective:
    """The loss and the accuracy of a batch for a label schema: `targets` per head and `groups` (one id per
    distinct label set, for the contrastive loss) hold one row per sample of a part."""

    def __init__(
        self,
        schema: LabelSchema,
        targets: dict[str, np.ndarray],
        groups: np.ndarray,
        config: TrainConfig,
        costs: dict[str, np.ndarray] | None = None,
    ):
        """`costs` (`axis_costs`) adds `config.hierarchy_weight` times the expected error of each head's
        softmax to the training loss."""
        self.schema = schema
        self.costs = {head: torch.from_numpy(matrix) for head, matrix in (costs or {}).items()}
        self.targets = {head: torch.from_numpy(values) for head, values in targets.items()}
        self.groups = torch.from_numpy(groups)
        self.config = config
        self.weights = {head: self._weights(values, len(schema.heads[head])) for head, values in targets.items()}

    def _weights(self, values: np.ndarray, classes: int) -> torch.Tensor | None:
        """Per-class loss weights from the training counts (per finding for multi-label: the positive weight),
        scaled so the average sample weighs 1."""
        if self.config.class_balance == "none":
            return None
        power = 0.5 if self.config.class_balance == "sqrt" else 1.0
        if self.schema.task == "multi-label":
            positives = values.sum(0).clip(min=1)
            return torch.from_numpy(((len(values) - positives) / positives).clip(1, 100) ** power).float()
        counts = np.bincount(values, minlength=classes)
        weights = np.zeros(counts.shape, np.float64)
        weights[counts > 0] = counts[counts > 0] ** -power
        weights *= len(values) / (weights[values]).sum()
        return torch.from_numpy(weights).float()

    def loss(self, output: ModelOutput, rows: np.ndarray, *, train: bool) -> torch.Tensor:
        total = output.features.new_zeros(())
        for head, logits in output.logits.items():
            target = self.targets[head][rows]
            weight = self.weights[head] if train else None
            if self.schema.task == "multi-label":
                total = total + F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)
            else:
                smoothing = self.config.label_smoothing if train else 0.0
                total = total + F.cross_entropy(logits, target, weight=weight, label_smoothing=smoothing)
            if train and head in self.costs and self.config.hierarchy_weight > 0:
                expected = (logits.softmax(1) * self.costs[head][target]).sum(1)
                total = total + self.config.hierarchy_weight * expected.mean()
        if train and self.config.contrastive_weight > 0 and self.schema.task != "multi-label":
            total = total + self.config.contrastive_weight * supervised_contrastive_loss(
                output.features, self.groups[rows]
            )
        return total

    def correct(self, output: ModelOutput, rows: np.ndarray) -> float:
        """Summed accuracy of the batch: a sample is right when every head is (multi-label: per finding)."""
        if self.schema.task == "multi-label":
            logits = output.logits["label"]
            return float(((logits > 0).float() == self.targets["label"][rows]).float().mean(1).sum())
        right = torch.ones(len(rows), dtype=torch.bool)
        for head, logits in output.logits.items():
            right &= logits.argmax(1).cpu() == self.targets[head][rows]
        return float(right.sum())
