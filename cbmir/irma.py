"""IRMA codes: parsing, decoding with the IRMA code tables, prefix filters and the ImageCLEF error score.

An IRMA code ``TTTT-DDD-AAA-BBB`` describes a radiograph on four independent axes: technical (imaging
modality), directional (body orientation), anatomical (body region) and biological (organ system). Each
axis is hierarchical: every position refines the one before it (anatomical ``9`` leg, ``91`` foot, ``913``
tarsal bones). A position is a digit or a lowercase letter; ``0`` means "unspecified / no further detail".

Predictions may also use ``*`` for "not known". Once a position is ``*``, every later position of that
axis must be ``*`` too: a refinement of something unknown has no meaning, and the ImageCLEF scoring treats
every position after an unknown one as unknown anyway.

Parsing, prefix matching and the code structure need nothing but the code. Turning codes into text and
counting the branches for the error score need the IRMA code tables (``A.csv`` .. ``D.csv``), which are
IRMA project data that cbmir does not ship: pass their folder to `CodeTables.load` (the programs
take it from ``--tables`` or ``CBMIR_IRMA_TABLES``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cbmir.errors import CbmirError

AXES = ("technical", "directional", "anatomical", "biological")
AXIS_ALIASES = {"t": "technical", "d": "directional", "a": "anatomical", "b": "biological"}
AXIS_LENGTHS = {"technical": 4, "directional": 3, "anatomical": 3, "biological": 3}
TABLE_FILES = {"technical": "A.csv", "directional": "B.csv", "anatomical": "C.csv", "biological": "D.csv"}
TABLES_ENV = "CBMIR_IRMA_TABLES"  # named in messages; read by cbmir.settings

NOT_KNOWN = "*"
_CODE_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyz")
_FORMAT_HINT = "expected TTTT-DDD-AAA-BBB (groups of 4, 3, 3 and 3 characters) or the same 13 characters without dashes"


class IrmaCodeError(CbmirError):
    """A text that is not a valid IRMA code, axis name or axis prefix."""


class CodeTableError(CbmirError):
    """An IRMA code table file that cannot be read."""


class CodeTablesNotFoundError(CodeTableError):
    """The IRMA code tables are not where they were looked for."""


def axis_name(axis: str) -> str:
    """The full axis name for a full name or a one-letter alias (T, D, A, B), in any case."""
    key = axis.strip().lower() if isinstance(axis, str) else None
    if key in AXES:
        return key
    if key in AXIS_ALIASES:
        return AXIS_ALIASES[key]
    raise IrmaCodeError(f"unknown IRMA axis {axis!r}: expected one of {', '.join(AXES)} or the short forms T, D, A, B")


def _axis_problem(axis: str, value: str) -> str | None:
    """Why `value` (already lower case) is not a valid `axis` part, or None when it is."""
    if len(value) != AXIS_LENGTHS[axis]:
        return f"the {axis} axis {value!r} has {len(value)} characters, expected {AXIS_LENGTHS[axis]}"
    star = None
    for position, char in enumerate(value, 1):
        if char == NOT_KNOWN:
            star = star or position
        elif char not in _CODE_CHARS:
            return f"{axis} axis position {position} is {char!r}; allowed are digits, letters a-z and '*' (not known)"
        elif star is not None:
            return (
                f"{axis} axis position {position} is {char!r} after '*' at position {star}; once a position "
                f"is not known every later position of the axis must be '*' too"
            )
    return None


@dataclass(frozen=True)
class IrmaCode:
    """One IRMA code, validated and in lower case. Build it with `IrmaCode.parse`."""

    technical: str
    directional: str
    anatomical: str
    biological: str

    def __post_init__(self) -> None:
        for axis in AXES:
            value = getattr(self, axis)
            if not isinstance(value, str):
                raise IrmaCodeError(f"the {axis} axis must be text, got {type(value).__name__} {value!r}")
            value = value.lower()
            problem = _axis_problem(axis, value)
            if problem:
                raise IrmaCodeError(f"invalid IRMA code {self._dashed()!r}: {problem}")
            object.__setattr__(self, axis, value)

    def _dashed(self) -> str:
        return "-".join(str(getattr(self, axis)) for axis in AXES)

    @classmethod
    def parse(cls, text: str) -> IrmaCode:
        """Parse ``TTTT-DDD-AAA-BBB`` or its 13-character form without dashes (surrounding blanks ignored)."""
        if not isinstance(text, str):
            raise IrmaCodeError(f"an IRMA code must be text, got {type(text).__name__} {text!r}")
        stripped = text.strip()
        if "-" in stripped:
            parts = stripped.split("-")
            if len(parts) != len(AXES):
                raise IrmaCodeError(f"invalid IRMA code {text!r}: {len(parts)} dash-separated groups, {_FORMAT_HINT}")
        elif len(stripped) == sum(AXIS_LENGTHS.values()):
            parts, start = [], 0
            for axis in AXES:
                parts.append(stripped[start : start + AXIS_LENGTHS[axis]])
                start += AXIS_LENGTHS[axis]
        else:
            raise IrmaCodeError(f"invalid IRMA code {text!r}: {len(stripped)} characters, {_FORMAT_HINT}")
        for axis, part in zip(AXES, parts, strict=True):
            problem = _axis_problem(axis, part.lower())
            if problem:
                raise IrmaCodeError(f"invalid IRMA code {text!r}: {problem}")
        return cls(*parts)

    def __str__(self) -> str:
        return self._dashed()

    def __getitem__(self, axis: str) -> str:
        """The code of one axis by full name or alias: ``code["A"] == code.anatomical``."""
        return getattr(self, axis_name(axis))

    @property
    def is_complete(self) -> bool:
        """True when no position is ``*`` (not known)."""
        return NOT_KNOWN not in str(self)


def as_code(code: IrmaCode | str) -> IrmaCode:
    """`code` itself, or parsed when it is text."""
    return code if isinstance(code, IrmaCode) else IrmaCode.parse(code)


def matches(code: IrmaCode | str, axis: str, prefix: str) -> bool:
    """Whether `code` lies under `prefix` on `axis`: anatomical ``9`` matches every leg code ``9xx``.

    The prefix is compared literally: ``90`` (leg, unspecified) does not match ``912``, and a position that
    is ``*`` in the code matches no prefix character.
    """
    name = axis_name(axis)
    if not isinstance(prefix, str):
        raise IrmaCodeError(f"an IRMA {name} prefix must be text, got {type(prefix).__name__} {prefix!r}")
    wanted = prefix.strip().lower()
    if not wanted:
        raise IrmaCodeError(f"empty IRMA {name} prefix: give at least the first position, e.g. '9'")
    if len(wanted) > AXIS_LENGTHS[name]:
        raise IrmaCodeError(
            f"IRMA {name} prefix {prefix!r} has {len(wanted)} characters but the axis has only {AXIS_LENGTHS[name]}"
        )
    for position, char in enumerate(wanted, 1):
        if char not in _CODE_CHARS:
            raise IrmaCodeError(
                f"IRMA {name} prefix {prefix!r}: position {position} is {char!r}; a prefix may only hold "
                f"digits and letters a-z"
            )
    return as_code(code)[name].startswith(wanted)


def significant(value: str) -> str:
    """The part of an axis code that carries information: without trailing ``*`` and trailing zeros.

    Trailing zeros mean "no further detail", so ``700`` is just ``7`` (abdomen). An axis that is all zeros
    keeps its first ``0``, which the tables define as "unspecified".
    """
    value = value.rstrip(NOT_KNOWN)
    return value.rstrip("0") or value[:1]


_REMARK = re.compile(r"\s*\([^()]*\)$")


def short_text(text: str) -> str:
    """A table text without its trailing parenthesised remark: 'anteroposterior (AP, coronal)' -> 'anteroposterior'."""
    return _REMARK.sub("", text) or text


@dataclass(frozen=True)
class AxisTable:
    """The code table of one axis: each code prefix with its text."""

    axis: str
    path: Path
    entries: Mapping[str, str]
    issues: tuple[str, ...] = ()
    _next_chars: Mapping[str, frozenset[str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        following: dict[str, set[str]] = {}
        for code in self.entries:
            following.setdefault(code[:-1], set()).add(code[-1])
        object.__setattr__(self, "_next_chars", {k: frozenset(v) for k, v in following.items()})

    def next_chars(self, prefix: str) -> frozenset[str]:
        """The characters the table defines right after `prefix` (the branches below it)."""
        return self._next_chars.get(prefix, frozenset())

    @classmethod
    def load(cls, axis: str, path: Path) -> AxisTable:
        """Read a ``code;text`` table, tolerating the quirks of the IRMA files.

        Blank lines and bare ``;`` lines are skipped; CR, CRLF and CR CR LF line ends are all accepted; the
        text is UTF-8 when it decodes as such and Latin-1 otherwise. Two quirks are repaired and recorded in
        `issues`: a line that is not ``code;text`` continues the text of the entry before it (a wrapped
        line), and when a code is defined twice the definition that appears after its parent's line
        wins (an entry read before its parent is out of place, most likely a typo for another code).
        """
        axis = axis_name(axis)
        try:
            raw = path.read_bytes()
        except OSError as error:
            raise CodeTableError(f"cannot read the IRMA {axis} table {path}: {error.strerror}") from error
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        entries: dict[str, str] = {}
        misplaced: set[str] = set()
        issues: list[str] = []
        previous: str | None = None
        for number, line in enumerate(re.split(r"\r*\n|\r", text), 1):
            line = line.strip()
            code, _, label = (part.strip() for part in line.partition(";"))
            code = code.lower()
            if not code and not label:
                continue
            if not code or len(code) > AXIS_LENGTHS[axis] or not set(code) <= _CODE_CHARS:
                if previous is None:
                    raise CodeTableError(
                        f"{path} line {number}: {line!r} is not 'code;text' with a {axis} code of 1 to "
                        f"{AXIS_LENGTHS[axis]} digits or letters"
                    )
                entries[previous] = f"{entries[previous]} {line.replace(';', ' ', 1)}"
                issues.append(f"{path.name} line {number}: {line!r} read as the continuation of {previous}")
                continue
            in_place = len(code) == 1 or code[:-1] in entries
            if code in entries:
                replace = code in misplaced and in_place
                kept, dropped = (label, entries[code]) if replace else (entries[code], label)
                issues.append(f"{path.name} line {number}: {code} defined twice; kept {kept!r}, ignored {dropped!r}")
                if not replace:
                    previous = None
                    continue
                misplaced.discard(code)
            elif not in_place:
                misplaced.add(code)
            entries[code] = label
            previous = code
        return cls(axis, path, entries, tuple(issues))


@dataclass(frozen=True)
class CodeTables:
    """The four IRMA code tables, keyed by axis name."""

    tables: Mapping[str, AxisTable]

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> CodeTables:
        """Load ``A.csv`` .. ``D.csv`` from `folder` (programs take it from ``--tables`` or
        ``$CBMIR_IRMA_TABLES``, through `cbmir.settings`)."""
        where = f"the folder {folder}"
        base = Path(folder).expanduser()
        missing = [name for name in TABLE_FILES.values() if not (base / name).is_file()]
        if missing:
            raise CodeTablesNotFoundError(
                f"IRMA code tables not found in {where}: missing {', '.join(missing)}. Put the IRMA tables "
                f"{_file_list()} in that folder, or set {TABLES_ENV} to the folder that holds them"
            )
        return cls({axis: AxisTable.load(axis, base / name) for axis, name in TABLE_FILES.items()})

    def __getitem__(self, axis: str) -> AxisTable:
        return self.tables[axis_name(axis)]

    def decode(self, code: IrmaCode | str, *, full: bool = False) -> dict[str, list[str]]:
        """The texts of each axis, from the most general level to the most specific.

        Trailing zeros ("no further detail") add nothing, an all-zero axis reads "unspecified", an axis that
        is all ``*`` reads "not known", and a level missing from the table ends that axis with a
        ``[not in X.csv: code]`` marker. Texts lose their trailing parenthesised remark unless `full`.
        """
        parsed = as_code(code)
        decoded: dict[str, list[str]] = {}
        for axis in AXES:
            value = significant(parsed[axis])
            if not value:
                decoded[axis] = ["not known"]
                continue
            table, texts = self.tables[axis], []
            for end in range(1, len(value) + 1):
                text = table.entries.get(value[:end])
                if text is None:
                    texts.append(f"[not in {table.path.name}: {value[:end]}]")
                    break
                texts.append(text if full else short_text(text))
            decoded[axis] = texts
        return decoded

    def describe(self, code: IrmaCode | str) -> str:
        """One line: the levels of each axis joined by commas, the axes by slashes."""
        return " / ".join(", ".join(texts) for texts in self.decode(code).values())

    def validate(self, code: IrmaCode | str) -> list[str]:
        """The levels of `code` that the tables do not define, one message each; empty when all are known."""
        parsed = as_code(code)
        problems = []
        for axis in AXES:
            value, table = significant(parsed[axis]), self.tables[axis]
            for end in range(1, len(value) + 1):
                if value[:end] not in table.entries:
                    known = sorted(value[: end - 1] + char for char in table.next_chars(value[: end - 1]))
                    problems.append(
                        f"{parsed}: {axis} code {value[:end]!r} is not in {table.path.name}"
                        + (f" (known there: {', '.join(known)})" if known else "")
                    )
                    break
        return problems

    def branch_counts(self, code: IrmaCode | str, axis: str) -> list[int]:
        """b_i for each position i of `axis`: how many codes are possible there under the code's own prefix.

        The count is the set of characters the table defines at position i below the first i-1 positions of
        `code`, plus ``0`` and plus the code's own character. ``0`` ("unspecified / no further detail") is a
        valid choice at every level but the tables only list it below codes that have children, so it is
        added where a leaf would otherwise have no branch at all; a code the (incomplete) tables lack is
        evidently possible, so its own character counts too. Thus b_i >= 1 always, and '0' counts once.
        """
        name = axis_name(axis)
        value, table = as_code(code)[name], self.tables[name]
        return [len(table.next_chars(value[:i]) | {"0", value[i]}) for i in range(len(value))]


def _file_list() -> str:
    return ", ".join(f"{name} ({axis})" for axis, name in TABLE_FILES.items())


def axis_error(true: IrmaCode | str, predicted: IrmaCode | str, axis: str, tables: CodeTables) -> float:
    """The hierarchical error of one axis, between 0 (correct) and 0.25 (wrong from the first position).

    error = sum_i (1/b_i) (1/i) delta_i over the positions i of the axis, where b_i is
    `CodeTables.branch_counts` of the true code, delta_i is 0 for a correct position, 0.5 for ``*`` and 1
    for a wrong one, and every position after the first wrong (or ``*``) one counts as wrong (or not
    known). The sum is divided by its value for a completely wrong axis and scaled to 0.25, so that the four
    axes of an image add up to at most 1.

    This is the evaluation scheme of the ImageCLEF 2007 medical image annotation task, as described in
    T. Deselaers, H. Müller, T. M. Deserno et al., "The CLEF 2007 Medical Image Annotation Task" (overview
    of the ImageCLEF 2007 medical image annotation task) and T. Deselaers, T. M. Deserno, H. Müller,
    "Automatic medical image annotation in ImageCLEF 2007: overview, results, and discussion", Pattern
    Recognition Letters 29 (2008); T. Tommasi and T. Deselaers kept it for the later IRMA annotation tasks.
    How b_i is counted from the code tables is cbmir's choice, see `CodeTables.branch_counts`.
    """
    name = axis_name(axis)
    true_code, predicted_code = as_code(true), as_code(predicted)
    if not true_code.is_complete:
        raise IrmaCodeError(f"the true code {str(true_code)!r} contains '*': a reference code must be fully known")
    counts = tables.branch_counts(true_code, name)
    worst = total = 0.0
    delta = 0.0
    positions = zip(true_code[name], predicted_code[name], counts, strict=True)
    for position, (truth, guess, branches) in enumerate(positions, 1):
        if delta == 0.0 and guess != truth:
            delta = 0.5 if guess == NOT_KNOWN else 1.0
        weight = 1.0 / (branches * position)
        total += delta * weight
        worst += weight
    return 0.25 * total / worst


def error_score(true: IrmaCode | str, predicted: IrmaCode | str, tables: CodeTables) -> float:
    """The ImageCLEF 2007 error of one image: the sum of the four `axis_error` values, between 0 and 1."""
    return sum(axis_error(true, predicted, axis, tables) for axis in AXES)


def run_error_score(pairs: Iterable[tuple[IrmaCode | str, IrmaCode | str]], tables: CodeTables) -> float:
    """The score of a run: the sum of `error_score` over its (true, predicted) pairs."""
    return sum(error_score(true, predicted, tables) for true, predicted in pairs)
