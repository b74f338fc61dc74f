"""Splitting records into train/validation/test when an archive does not say which is which."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence

from cbmir.datasets.records import DatasetError, Record
from cbmir.locations import SPLITS


def stratified_split(
    records: Sequence[Record], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0
) -> dict[str, list[Record]]:
    """Split records into train/validation/test, stratified by label, the same way for the same seed.

    Each stratum (a label; for multi-label records the exact label combination; for unlabelled ones a single
    stratum) gives ``round(n * fraction)`` records to validation and to test, but always keeps at least one
    in train. So a class too small to spread (a singleton, or anything that rounds to 0) stays in train.
    Multi-label combinations are mostly rare, so the combinations too small to spread are pooled and the
    pool is split as one stratum; in addition any record carrying a label seen on no other record stays in
    train. Each split keeps the order of `records`; the result depends on records' ids, not on their order.
    """
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise DatasetError(
            f"fractions must be three non-negative numbers (train, validation, test) summing to 1, got {fractions}"
        )
    label_counts = Counter(label for record in records for label in record.labels)
    strata: dict[tuple[str, ...], list[int]] = defaultdict(list)
    assigned: dict[int, str] = {}
    for position, record in enumerate(records):
        if any(label_counts[label] == 1 for label in record.labels):
            assigned[position] = "train"
        else:
            strata[record.labels].append(position)

    def held_out(size: int) -> list[int]:
        counts = [int(size * fraction + 0.5) for fraction in fractions[1:]]
        while sum(counts) and size - sum(counts) < 1:
            counts[counts.index(max(counts))] -= 1
        return counts

    groups = [strata[key] for key in sorted(strata)]
    if any(len(record.labels) > 1 for record in records):
        rare = [group for group in groups if not any(held_out(len(group)))]
        pool = [position for group in rare for position in group]
        groups = [group for group in groups if any(held_out(len(group)))] + [pool]
    rng = random.Random(seed)
    for group in groups:
        members = sorted(group, key=lambda position: records[position].id)
        rng.shuffle(members)
        validation, test = held_out(len(members))
        for rank, position in enumerate(members):
            assigned[position] = "validation" if rank < validation else "test" if rank < validation + test else "train"
    return {
        split: [record for position, record in enumerate(records) if assigned[position] == split] for split in SPLITS
    }
