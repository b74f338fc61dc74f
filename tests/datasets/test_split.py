"""Tests of cbmir.datasets.split: stratified, deterministic, loses nothing, keeps small classes in train."""

from collections import Counter
from pathlib import Path

import pytest

from cbmir.datasets import DatasetError, Record, stratified_split

# --- splitting --------------------------------------------------------------------------------------------


def labelled(counts: dict[str, int]) -> list[Record]:
    return [
        Record(f"{label}{n}", Path(f"{label}{n}.png"), (label,), "set")
        for label, count in counts.items()
        for n in range(count)
    ]


def assert_partition(records, splits):
    assert list(splits) == ["train", "validation", "test"]
    ids = [r.id for part in splits.values() for r in part]
    assert sorted(ids) == sorted(r.id for r in records)


def test_stratified_split_is_stratified_deterministic_and_loses_nothing():
    records = labelled({"a": 50, "b": 30, "c": 20})
    splits = stratified_split(records)
    assert_partition(records, splits)
    assert {name: Counter(r.label for r in part) for name, part in splits.items()} == {
        "train": {"a": 40, "b": 24, "c": 16},
        "validation": {"a": 5, "b": 3, "c": 2},
        "test": {"a": 5, "b": 3, "c": 2},
    }
    assert stratified_split(list(reversed(records))) == {k: list(reversed(v)) for k, v in splits.items()}
    assert stratified_split(records, seed=1) != splits
    assert stratified_split(records, seed=1) == stratified_split(records, seed=1)


def test_stratified_split_keeps_small_classes_in_train():
    records = labelled({"big": 40, "single": 1, "pair": 2, "five": 5})
    splits = stratified_split(records)
    assert_partition(records, splits)
    held_out = Counter(r.label for name in ("validation", "test") for r in splits[name])
    assert held_out == {"big": 8, "five": 2}
    two_way = stratified_split(records, fractions=(0.5, 0, 0.5))
    assert Counter(r.label for r in two_way["test"]) == {"big": 20, "pair": 1, "five": 3} and not two_way["validation"]


def test_stratified_split_multi_label_pools_rare_combinations():
    records = [
        Record(f"r{n}", Path(f"r{n}"), labels, "set")
        for n, labels in enumerate(
            [()] * 30
            + [("Mass",)] * 10
            + [("Edema", "Mass"), ("Effusion", "Mass"), ("Edema", "Effusion")] * 4
            + [("Hernia", "Mass")]
        )
    ]
    splits = stratified_split(records)
    assert_partition(records, splits)
    assert [len(part) for part in splits.values()] == [43, 5, 5]
    assert any(len(r.labels) == 2 for name in ("validation", "test") for r in splits[name])
    assert ("Hernia", "Mass") in {r.labels for r in splits["train"]}


def test_stratified_split_checks_fractions_and_accepts_nothing():
    with pytest.raises(DatasetError, match="fractions"):
        stratified_split(labelled({"a": 3}), fractions=(0.8, 0.3, 0.1))
    assert stratified_split([]) == {"train": [], "validation": [], "test": []}
