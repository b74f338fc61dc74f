"""A PACS reached over DICOMweb: find image instances (QIDO-RS) and fetch one (WADO-RS), through the
maintained `dicomweb-client` library.

Credentials come from typed settings (`PacsSettings`: ``CBMIR_PACS_USER`` + ``CBMIR_PACS_PASSWORD`` for HTTP
basic, or ``CBMIR_PACS_TOKEN`` for a bearer token), never from a URL or a command line; a server URL that
carries credentials is refused. Every failure is a `PacsError` naming the server or instance and the reason:
`PacsAuthError` (401/403, the same for every request, so callers stop), `PacsNotFoundError` (404: an
instance deleted since it was found) and `PacsUnavailableError` (unreachable, timed out, 429 or 5xx), which
is tried again with exponential backoff before it is raised.

An instance is asked for in Explicit VR Little Endian first, so that the server decodes what it can; a
server that cannot transcode it is asked for the stored transfer syntax, which `cbmir.imaging.io` decodes
where a decoder is installed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, TypeVar
from urllib.parse import quote

import requests
from dicomweb_client.api import DICOMwebClient
from pydantic import Field, SecretStr, field_validator
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from cbmir.errors import CbmirError
from cbmir.locations import LocationError, PacsInstance
from cbmir.settings import Settings

T = TypeVar("T")

# Modalities of radiographs: computed and digital radiography.
RADIOGRAPH_MODALITIES = ("CR", "DX")
_TRANSIENT = {408, 429, 500, 502, 503, 504}
# Answers of a server asked for a transfer syntax it cannot produce (Orthanc says 500 when transcoding fails).
_NOT_TRANSCODED = {400, 406, 415, 500, 501}
_PAGE = 1000
_STUDY, _SERIES, _SOP, _SOP_CLASS, _MODALITY = "0020000D", "0020000E", "00080018", "00080016", "00080060"


class PacsSettings(Settings):
    """`pacs_url`: the DICOMweb server searched by PACS image (service and CLI). `pacs_user` and
    `pacs_password` (HTTP basic) or `pacs_token` (bearer): its credentials. `pacs_timeout_seconds`: the limit
    on each request; `pacs_attempts` and `pacs_backoff_seconds`: how often, and after what first wait
    (doubling), a request that may pass later is tried. `viewer_url`: the link to an image in the viewer, a
    template with ``{study}``, ``{series}`` and ``{instance}`` (an OHIF or Orthanc Explorer URL)."""

    pacs_url: str | None = None
    pacs_user: str | None = None
    pacs_password: SecretStr | None = None
    pacs_token: SecretStr | None = None
    pacs_timeout_seconds: float = Field(default=30.0, gt=0)
    pacs_attempts: int = Field(default=4, ge=1)
    pacs_backoff_seconds: float = Field(default=0.5, ge=0)
    viewer_url: str | None = None

    @field_validator("viewer_url")
    @classmethod
    def _known_fields(cls, template: str | None) -> str | None:
        if template is not None:
            try:
                template.format(study="s", series="r", instance="i")
            except (KeyError, IndexError, ValueError) as error:
                fields = "{study}, {series} and {instance}"
                raise ValueError(f"{template!r} may use only {fields} ({error})") from None
        return template

    def viewer_link_of(self, extra: Mapping[str, Any]) -> str | None:
        """The viewer's URL for a stored image (from the UIDs kept in its metadata), when a viewer is
        configured and the image came from DICOM."""
        uids = pacs_uids(extra)
        if self.viewer_url is None or uids is None:
            return None
        return self.viewer_url.format(**{name: quote(uid, safe="") for name, uid in uids.items()})


def pacs_uids(extra: Mapping[str, Any]) -> dict[str, str] | None:
    """The study, series and instance UIDs kept beside an image that came from DICOM, else None."""
    uids = {
        "study": extra.get("StudyInstanceUID"),
        "series": extra.get("SeriesInstanceUID"),
        "instance": extra.get("SOPInstanceUID"),
    }
    if not all(isinstance(uid, str) and uid for uid in uids.values()):
        return None
    return {name: str(uid) for name, uid in uids.items()}


class PacsError(CbmirError):
    """A DICOMweb request that failed; the message names the server or instance and the reason."""


class PacsAuthError(PacsError):
    """The server refused the credentials (401) or the access (403)."""


class PacsNotFoundError(PacsError):
    """The server does not hold the instance (any more)."""


class PacsUnavailableError(PacsError):
    """The server could not be reached or failed in a way that may pass later."""


@dataclass(frozen=True)
class FoundInstance:
    """An instance a search found: where it is, its SOP class and its series' modality."""

    instance: PacsInstance
    sop_class: str
    modality: str

    @property
    def not_an_image(self) -> str | None:
        """Why the instance is known, from its SOP class alone, to hold no image (a report, a presentation
        state); None when it may hold one (an image storage class, or a class this library does not know)."""
        if not self.sop_class:
            return None
        uid = UID(self.sop_class)
        if uid.name == self.sop_class or "Image Storage" in uid.name:
            return None
        return f"not an image (SOP class {uid.name})"


class Pacs:
    """One DICOMweb server: base URL `server` (QIDO-RS and WADO-RS below it) and the `settings` that hold its
    credentials and patience."""

    def __init__(self, server: str, settings: PacsSettings):
        try:
            self.server = PacsInstance(server, "1", "1", "1").server  # its URL check, credentials refused
        except LocationError as error:
            raise PacsError(str(error)) from None
        self.settings = settings
        session = requests.Session()
        # DICOM pixels barely compress, and a server gzipping every instance costs more CPU than the
        # network saves (Orthanc: ~7 ms an instance, a third of the sync's rate on this machine).
        session.headers["Accept-Encoding"] = "identity"
        if settings.pacs_token is not None:
            session.headers["Authorization"] = f"Bearer {settings.pacs_token.get_secret_value()}"
        elif settings.pacs_user is not None:
            password = settings.pacs_password.get_secret_value() if settings.pacs_password else ""
            session.auth = (settings.pacs_user, password)
        self._client = DICOMwebClient(self.server, session=session, timeout=settings.pacs_timeout_seconds)
        self._client.set_http_retry_params(retry=False)  # retried here, with the settings' backoff

    def find(
        self,
        *,
        modalities: tuple[str, ...] = RADIOGRAPH_MODALITIES,
        study_dates: str | None = None,
        attributes: Mapping[str, str] | None = None,
    ) -> Iterator[FoundInstance]:
        """The instances matching the filters, page by page, each once: of any of `modalities` (none: every
        modality), studies in the DICOM date range `study_dates` (``20240101-20241231``, ``20240101-``), and
        equal to the QIDO `attributes` (keyword or tag: value)."""
        seen: set[str] = set()
        for modality in modalities or (None,):
            filters = dict(attributes or {})
            if modality is not None:
                filters["Modality"] = modality
            if study_dates is not None:
                filters["StudyDate"] = study_dates
            offset = 0
            while True:
                page = self._request(
                    f"search of {self.server} ({_describe(filters)})",
                    partial(
                        self._client.search_for_instances,
                        search_filters=filters,
                        fields=["StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "Modality"],
                        limit=_PAGE,
                        offset=offset,
                    ),
                )
                for attributes_found in page:
                    found = self._found(attributes_found)
                    if found is not None and found.instance.sop not in seen:
                        seen.add(found.instance.sop)
                        yield found
                if len(page) < _PAGE:
                    break
                offset += len(page)

    def _found(self, attributes: dict) -> FoundInstance | None:
        def value(tag: str) -> str:
            values = attributes.get(tag, {}).get("Value") or [""]
            return str(values[0])

        try:
            instance = PacsInstance(self.server, value(_STUDY), value(_SERIES), value(_SOP))
        except LocationError:
            return None  # an answer without usable UIDs names nothing that could be fetched
        return FoundInstance(instance, value(_SOP_CLASS), value(_MODALITY))

    def fetch(self, instance: PacsInstance) -> Dataset:
        """The instance's data set: uncompressed where the server can transcode it, else as stored."""
        where = f"instance {instance.sop} of {self.server}"

        def retrieve(transfer_syntax: str) -> Callable[[], Dataset]:
            return partial(
                self._client.retrieve_instance,
                instance.study,
                instance.series,
                instance.sop,
                media_types=(("application/dicom", transfer_syntax),),
            )

        try:
            return self._request(f"fetch of {where}", retrieve(ExplicitVRLittleEndian), fallback=_NOT_TRANSCODED)
        except _NotTranscoded:
            return self._request(f"fetch of {where}", retrieve("*"))

    def _request(self, what: str, call: Callable[[], T], fallback: set[int] | None = None) -> T:
        """`call`'s answer, tried up to `pacs_attempts` times while its failure may pass later. A status in
        `fallback` raises `_NotTranscoded` at once instead."""
        attempts, wait = self.settings.pacs_attempts, self.settings.pacs_backoff_seconds
        for attempt in range(1, attempts + 1):
            try:
                return call()
            except requests.HTTPError as error:
                status = error.response.status_code if error.response is not None else 0
                if fallback and status in fallback:
                    raise _NotTranscoded() from None
                if status in (401, 403):
                    reason = "refused the credentials" if status == 401 else "refused access"
                    raise PacsAuthError(
                        f"{what}: the server {reason} (HTTP {status}); set CBMIR_PACS_USER and "
                        "CBMIR_PACS_PASSWORD, or CBMIR_PACS_TOKEN"
                    ) from None
                if status == 404:
                    raise PacsNotFoundError(f"{what}: not found on the server (HTTP 404)") from None
                failure: PacsError = (
                    PacsUnavailableError(f"{what}: the server answered HTTP {status}")
                    if status in _TRANSIENT
                    else PacsError(f"{what}: the server answered HTTP {status}")
                )
            except requests.Timeout:
                failure = PacsUnavailableError(f"{what}: no answer within {self.settings.pacs_timeout_seconds:g} s")
            except requests.ConnectionError as error:
                failure = PacsUnavailableError(f"{what}: cannot connect ({_first_line(error)})")
            except requests.exceptions.ChunkedEncodingError as error:  # the server went away mid-answer
                failure = PacsUnavailableError(f"{what}: the connection broke during the answer ({_first_line(error)})")
            except (ValueError, requests.RequestException) as error:  # an answer that is not DICOM or JSON
                raise PacsError(f"{what}: unusable answer ({_first_line(error)})") from None
            if not isinstance(failure, PacsUnavailableError) or attempt == attempts:
                raise failure
            time.sleep(wait * 2 ** (attempt - 1))
        raise AssertionError("unreachable: the last attempt raises")


class _NotTranscoded(Exception):
    """The server cannot send the instance in the transfer syntax asked for."""


def _describe(filters: Mapping[str, str]) -> str:
    return ", ".join(f"{key}={value}" for key, value in filters.items()) or "all instances"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


@lru_cache(maxsize=8)
def pacs_client(server: str, settings: PacsSettings | None = None) -> Pacs:
    """The client of `server`, made once per process and settings (None: the environment's)."""
    from cbmir.settings import load_settings

    return Pacs(server, settings or load_settings(PacsSettings))
