"""Where an image's pixels live, as one value: `Location`. It is built from a dataset record and parsed from
the text an index stores in exactly one place, here.

Kinds: a ``file`` (an image file), a ``member`` of an archive (one row of a split of a MedMNIST ``.npz``),
or a ``pacs`` instance (one DICOM instance on a DICOMweb server). The stored text of the first two is the one
indexes have always held, so indexes built before this type still open:

- a file: its path in posix form (absolute for everything the indexer and the service write);
- a member: the archive's path, ``#``, then ``<split>/<index>`` (``/data/pneumoniamnist.npz#test/12``);
- a PACS instance: ``dicomweb+`` then the instance's WADO-RS URL,
  ``dicomweb+http://pacs:8042/dicom-web/studies/<study>/series/<series>/instances/<sop>``. No path text starts
  with a URL scheme, and the text never holds credentials (they come from settings, `cbmir.pacs`).

The member is what follows the last ``#`` when that has the form ``<word>/<digits>``; any other ``#`` is part
of a file name (``/scans/case#2.png`` is a file).

Reading the pixels of a location is `cbmir.datasets.read_pixels`: the readers of archive members belong to
their dataset layouts, and fetching from a PACS to `cbmir.pacs`, which all sit above this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast, get_args

from cbmir.errors import CbmirError

if TYPE_CHECKING:
    from cbmir.datasets.records import Record

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = get_args(Split)
LocationKind = Literal["file", "member", "pacs"]

# What follows the last "#" of a member's text; an unknown split in this form is an error, not a file name.
_MEMBER = re.compile(r"#(?P<split>[A-Za-z]+)/(?P<index>[0-9]+)$")
PACS_SCHEME = "dicomweb+"
_UID = r"[0-9]+(?:\.[0-9]+)*"
_UID_TEXT = re.compile(_UID)
_PACS_TEXT = re.compile(
    rf"{re.escape(PACS_SCHEME)}(?P<server>https?://[^?#]+?)/studies/(?P<study>{_UID})"
    rf"/series/(?P<series>{_UID})/instances/(?P<sop>{_UID})"
)


class LocationError(CbmirError):
    """A location text or value that does not say where an image is."""


@dataclass(frozen=True)
class ArchiveMember:
    """One image of an archive: row `index` of the images of split `split`."""

    split: Split
    index: int

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise LocationError(f"archive member split {self.split!r} is not one of {', '.join(SPLITS)}")
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0:
            raise LocationError(f"archive member index {self.index!r} is not a non-negative integer")

    def __str__(self) -> str:
        return f"{self.split}/{self.index}"


def is_uid(text: object) -> bool:
    """Whether `text` is a DICOM UID: digits and dots, at most 64 characters."""
    return isinstance(text, str) and len(text) <= 64 and _UID_TEXT.fullmatch(text) is not None


def without_credentials(text: str) -> str:
    """`text` with the user and password of any URL in it masked, as messages show it."""
    return re.sub(r"//[^/@\s]*@", "//***@", text)


@dataclass(frozen=True)
class PacsInstance:
    """One DICOM instance on the DICOMweb server at `server` (its base URL, without credentials), named by
    its Study, Series and SOP Instance UIDs."""

    server: str
    study: str
    series: str
    sop: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "server", self.server.rstrip("/"))
        if not re.fullmatch(r"https?://[^/?#@\s]+(/[^?#@\s]*)?", self.server):
            raise LocationError(
                f"DICOMweb server {without_credentials(self.server)!r} is not an http(s) URL without "
                "credentials, query or fragment"
            )
        for field, uid in (("study", self.study), ("series", self.series), ("instance", self.sop)):
            if not is_uid(uid):
                raise LocationError(f"{field} UID {uid!r} is not a DICOM UID (digits and dots, at most 64)")

    @property
    def url(self) -> str:
        """The instance's WADO-RS URL."""
        return f"{self.server}/studies/{self.study}/series/{self.series}/instances/{self.sop}"


@dataclass(frozen=True)
class Location:
    """Where the pixels of one image are: the file `path`, the `member` of the archive at `path`, or a PACS
    `instance` (whose `path` is that of its URL, which names no file)."""

    path: Path = Path()
    member: ArchiveMember | None = None
    instance: PacsInstance | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.instance is not None:
            if self.member is not None or self.path != Path():
                raise LocationError("a PACS instance has no file path or archive member")
            return
        if self.path == Path():
            raise LocationError("no file path")
        if self.member is None and _MEMBER.search(self.path.as_posix()):
            raise LocationError(
                f"file {self.path.as_posix()!r} ends like an archive member (#split/index), so its location "
                "could not be told apart from one: rename the file or its folder"
            )

    @classmethod
    def of(cls, record: Record) -> Location:
        """Where a dataset record's pixels are. File paths are made absolute, so that the stored location
        is found from any working folder."""
        path = record.path.absolute()
        if record.index is None:
            return cls(path)
        if record.split is None:
            raise LocationError(f"record {record.id!r} of {record.source!r} has an array index but no split")
        return cls(path, ArchiveMember(record.split, record.index))

    @classmethod
    def pacs(cls, server: str, study: str, series: str, sop: str) -> Location:
        """The location of a DICOM instance on the DICOMweb server at base URL `server`."""
        return cls(instance=PacsInstance(server, study, series, sop))

    @classmethod
    def parse(cls, text: str) -> Location:
        """The location a stored text names; `LocationError` naming the text and the reason when it names none."""
        try:
            if not text.strip():
                raise LocationError("empty")
            if text.startswith(PACS_SCHEME):
                found = _PACS_TEXT.fullmatch(text)
                if found is None:
                    raise LocationError("not a DICOMweb instance URL (.../studies/UID/series/UID/instances/UID)")
                return cls.pacs(found["server"], found["study"], found["series"], found["sop"])
            found = _MEMBER.search(text)
            if found is None:
                return cls(Path(text))
            member = ArchiveMember(cast(Split, found["split"]), int(found["index"]))  # which checks the split
            return cls(Path(text[: found.start()]), member)
        except LocationError as error:
            raise LocationError(f"location {without_credentials(text)!r}: {error}") from None

    def __str__(self) -> str:
        if self.instance is not None:
            return PACS_SCHEME + self.instance.url
        path = self.path.as_posix()
        return path if self.member is None else f"{path}#{self.member}"

    @property
    def kind(self) -> LocationKind:
        if self.instance is not None:
            return "pacs"
        return "file" if self.member is None else "member"

    @property
    def is_file(self) -> bool:
        """Whether the pixels are a file of their own (which can be served as the original)."""
        return self.kind == "file"

    @property
    def name(self) -> str:
        """What people see: the file name, with ``#split/index`` for an archive member, or the SOP Instance UID."""
        if self.instance is not None:
            return self.instance.sop
        return self.path.name if self.member is None else f"{self.path.name}#{self.member}"
