"""What every dataset reader returns: `Record`s (one per usable image), the `Problem`s it left out, and the
`Dataset` holding both.

A reader never drops anything silently: a row or file with a problem is left out of `Dataset.records` and
listed in `Dataset.problems` with its file, line and reason, one of `PROBLEM_KINDS`; with ``strict=True``
(`finish`) the reader raises `DatasetError` instead. Errors in the layout itself (no such folder, a table
without its key columns) always raise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args

from cbmir.errors import CbmirError
from cbmir.locations import SPLITS, Split

# Folder names (compared lower case) that mark a split in class-folder and NIH trees.
SPLIT_ALIASES: dict[str, Split] = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "test": "test",
}
Task = Literal["single-label", "multi-label", "unlabelled"]
TASKS: tuple[Task, ...] = get_args(Task)
ProblemKind = Literal[
    "unreadable-row", "duplicate-id", "invalid-code", "unknown-label", "missing-file", "unlisted-file"
]
PROBLEM_KINDS: dict[ProblemKind, str] = {
    "unreadable-row": "table rows that could not be read",
    "duplicate-id": "rows or files repeating an id already read",
    "invalid-code": "IRMA codes that do not parse",
    "unknown-label": "labels outside the known classes",
    "missing-file": "rows whose image file was not found",
    "unlisted-file": "image files that no row labels or that lie outside the class layout",
}


class DatasetError(CbmirError):
    """A dataset layout that cannot be read, or (with ``strict=True``) one with problems."""


@dataclass(frozen=True)
class Record:
    """One image of a dataset. `labels` holds one label for single-label sets, any number for multi-label.
    `index` is the image's row in an archive split (MedMNIST), None for image files."""

    id: str
    path: Path
    labels: tuple[str, ...]
    source: str
    split: Split | None = None
    index: int | None = None
    # Excluded from the hash because a mapping is not hashable; still compared.
    extra: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))

    def __reduce__(self) -> tuple[Any, ...]:
        # A MappingProxyType does not pickle; rebuild from a plain dict so records can go to worker processes.
        return (Record, (self.id, self.path, self.labels, self.source, self.split, self.index, dict(self.extra)))

    @property
    def label(self) -> str:
        """The single label; an error for records with no label or several."""
        if len(self.labels) != 1:
            raise DatasetError(
                f"record {self.id!r} of {self.source!r} has {len(self.labels)} labels {list(self.labels)}, "
                "not exactly one: use `labels` for multi-label or unlabelled data"
            )
        return self.labels[0]


@dataclass(frozen=True)
class Problem:
    """Why one row or file was left out. `line` is the table line (for .npz archives, the array row), None
    for problems found in the file tree."""

    kind: ProblemKind
    file: Path
    line: int | None
    row: str
    detail: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else str(self.file)
        row = f" {self.row!r}" if self.row else ""
        return f"{where}:{row} {self.detail}"


@dataclass(frozen=True)
class Dataset:
    """What a reader found: the usable records, their task and sorted classes, and what it left out and why."""

    name: str
    records: list[Record]
    task: Task
    classes: tuple[str, ...]
    problems: tuple[Problem, ...] = ()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def problem_counts(self) -> dict[ProblemKind, int]:
        """Number of problems per kind, in the order of `PROBLEM_KINDS`, kinds without problems left out."""
        counts = Counter(problem.kind for problem in self.problems)
        return {kind: counts[kind] for kind in PROBLEM_KINDS if counts[kind]}

    def summary(self, examples: int = 3) -> str:
        """A few lines for people: size, task, classes, splits and each kind of problem with its first rows."""
        splits = Counter(record.split for record in self.records if record.split)
        split_text = ", ".join(f"{split} {splits[split]}" for split in SPLITS if splits[split]) or "none"
        lines = [
            f"{self.name}: {len(self.records)} records, {self.task}, {len(self.classes)} classes; splits: {split_text}"
        ]
        if not self.problems:
            lines.append("problems: none")
        for kind, count in self.problem_counts.items():
            lines.append(f"{kind}: {count} ({PROBLEM_KINDS[kind]}), left out of the records")
            shown = [problem for problem in self.problems if problem.kind == kind][:examples]
            lines.extend(f"  {problem}" for problem in shown)
            if count > len(shown):
                lines.append(f"  ... and {count - len(shown)} more")
        return "\n".join(lines)


def finish(name: str, records: list[Record], task: Task, problems: list[Problem], strict: bool) -> Dataset:
    """The dataset a reader found, its classes sorted; with `strict`, a `DatasetError` if it had problems."""
    dataset = Dataset(
        name=name,
        records=records,
        task=task,
        classes=tuple(sorted({label for record in records for label in record.labels})),
        problems=tuple(problems),
    )
    if strict and problems:
        raise DatasetError(f"dataset has problems (strict mode):\n{dataset.summary()}")
    return dataset


def require_folder(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: {what} folder not found")


def split_of(relative: Path) -> Split | None:
    """The split named by the first train/validation/test folder (or alias) on a relative path, if any."""
    for part in relative.parent.parts:
        if part.lower() in SPLIT_ALIASES:
            return SPLIT_ALIASES[part.lower()]
    return None
