"""Search filters: which images a search may return. Validated and normalised when made, so that two
filters that mean the same are equal (and share a cache entry); the store translates them to its query."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from cbmir.index.errors import QueryError
from cbmir.irma import IrmaCode, IrmaCodeError, matches

CodeSource = Literal["best", "true", "predicted"]
CODE_SOURCES: tuple[CodeSource, ...] = get_args(CodeSource)
# Filters field -> the IRMA axis its prefix applies to.
AXIS_FILTERS = {
    "technical": "technical",
    "directional": "directional",
    "anatomy": "anatomical",
    "biology": "biological",
}
_ZERO_CODE = IrmaCode("0000", "000", "000", "000")


@dataclass(frozen=True)
class Filters:
    """Restrictions of a search, all combined with AND; None means "any".

    `technical`, `directional`, `anatomy` and `biology` are IRMA axis prefixes (anatomy ``9``: any leg
    region); `code` is a full IRMA code. They apply to the code chosen by `on`: ``best`` (the true code
    where known, else the predicted one), ``true`` or ``predicted``. `dataset` must equal the image's
    dataset; `label` matches the true label or any extra label, ignoring case.
    """

    technical: str | None = None
    directional: str | None = None
    anatomy: str | None = None
    biology: str | None = None
    code: str | None = None
    on: CodeSource = "best"
    dataset: str | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        for name, axis in AXIS_FILTERS.items():
            prefix = getattr(self, name)
            if prefix is None:
                continue
            try:
                matches(_ZERO_CODE, axis, prefix)  # validates the prefix; the code it is tested on is irrelevant
            except IrmaCodeError as error:
                raise QueryError(f"filter {name}={prefix!r}: {error}") from None
            object.__setattr__(self, name, prefix.strip().lower())
        if self.code is not None:
            try:
                object.__setattr__(self, "code", str(IrmaCode.parse(self.code)))
            except IrmaCodeError as error:
                raise QueryError(f"filter code={self.code!r}: {error}") from None
        if self.on not in CODE_SOURCES:
            raise QueryError(f"filter on={self.on!r}: expected one of {', '.join(CODE_SOURCES)}")
        for name in ("dataset", "label"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise QueryError(f"filter {name}={value!r}: expected a non-empty text")

    @property
    def is_empty(self) -> bool:
        return all(getattr(self, name) is None for name in (*AXIS_FILTERS, "code", "dataset", "label"))
