"""The data of a training run: which task its labels call for, its train/validation/test parts, the
fingerprint of its training records, and the checks that those parts can train a model at all."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cbmir.datasets import Dataset, Record, stratified_split
from cbmir.irma import IrmaCode, IrmaCodeError
from cbmir.labels import LabelSchema, Task
from cbmir.prepared import fingerprint
from cbmir.train.config import TrainConfig, TrainingError


def choose_task(records: Sequence[Record]) -> Task:
    """multi-label when any record has other than one label, irma-axes when every label is an IRMA code,
    else single-label."""
    if any(len(record.labels) != 1 for record in records):
        return "multi-label"
    try:
        for record in records:
            IrmaCode.parse(record.labels[0])
    except IrmaCodeError:
        return "single-label"
    return "irma-axes"


def split_records(dataset: Dataset, config: TrainConfig) -> dict[str, list[Record]]:
    """The dataset's own train/validation/test split when every record has one, else a seeded stratified one."""
    if dataset.records and all(record.split for record in dataset.records):
        parts = {name: [r for r in dataset.records if r.split == name] for name in ("train", "validation", "test")}
        if parts["validation"]:
            return parts
        inner = stratified_split(parts["train"], (1 - config.split[1], config.split[1], 0.0), seed=config.seed)
        return {"train": inner["train"], "validation": inner["validation"], "test": parts["test"]}
    return stratified_split(dataset.records, config.split, seed=config.seed)


def datafingerprint(records: Sequence[Record]) -> str:
    """sha256 over the sorted (id, labels, file size) of the training records."""
    lines = []
    for record in sorted(records, key=lambda r: r.id):
        size = record.path.stat().st_size if record.path.exists() else -1
        lines.append(f"{record.id}\t{'|'.join(record.labels)}\t{size}")
    return fingerprint(lines)


def check_parts(parts: dict[str, list[Record]], schema: LabelSchema) -> None:
    """A `TrainingError` when the training or validation part is empty, or a head has a single class in the
    training part."""
    for name in ("train", "validation"):
        if not parts[name]:
            raise TrainingError(f"the {name} part of the dataset is empty: more images are needed to train")
    if schema.task != "multi-label":
        targets = schema.targets([r.labels for r in parts["train"]])
        for head, values in targets.items():
            if len(np.unique(values)) < 2:
                raise TrainingError(f"the training part has a single class on head {head!r}: nothing to learn")
