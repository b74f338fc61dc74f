"""What the query service is configured with, and the rule that keeps an unprotected service private."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Self

from pydantic import BeforeValidator, Field, model_validator

from cbmir.errors import CbmirError
from cbmir.index.database import is_database_url
from cbmir.locations import LocationError, PacsInstance
from cbmir.pacs import PacsSettings
from cbmir.refine import Rocchio
from cbmir.settings import ENV_PREFIX

TOKEN_ENV = f"{ENV_PREFIX}TOKEN"
MEGABYTE = 1 << 20


def _index_location(value: object) -> object:
    """A PostgreSQL URL stays text; any other text is a folder."""
    return Path(value) if isinstance(value, str) and not is_database_url(value) else value


IndexLocation = Annotated[Path | str, BeforeValidator(_index_location)]
"""An index: its folder, or the ``postgresql://`` URL of its store (with `vectors`, from `Settings`)."""


class ServiceConfigError(CbmirError):
    """A service configuration that cannot be used (or would expose images to anyone)."""


class ServiceSettings(PacsSettings):
    """`db`: the index, a folder or a PostgreSQL URL (its vectors then in `vectors`, from `Settings`).
    `token`: the bearer token every /v1 request must carry (None: no token, loopback only).
    `max_upload_bytes`: the largest request body; `body_timeout_seconds`: the longest a request body may
    pause before it is answered 408; `max_pixels` (from `Settings`): the largest image.
    `allow_originals`: serve the original files, not only thumbnails. `cors_origins`: web origins allowed to
    call the API from a browser (none by default). `dicom_tags`: DICOM tags stored beside uploaded images on
    top of the technical ones; never set it to patient-identifying tags unless the index may hold them.
    `max_batch` and `batch_wait_ms`: concurrent searches are joined into one model run of up to `max_batch`
    images, which waits up to `batch_wait_ms` for more searches before it starts (see `cbmir.embed`).
    `max_decoding`: the most images decoded at once (uploads, thumbnails); more wait for a turn, so memory
    stays bounded however many large uploads arrive together (see `cbmir.service.catalog`).
    `failed_logins_per_minute`: wrong tokens a client may send in a minute before it is answered 429.
    `rocchio_alpha`, `rocchio_beta`, `rocchio_gamma`: the weights of a search refined by example, of the
    query, of the images marked relevant and of those marked not (see `cbmir.refine`).
    From `PacsSettings`: the PACS that ``POST /v1/search/pacs`` fetches from (`pacs_url` and its
    credentials, timeout and retries) and the viewer that each hit links to (`viewer_url`).
    Each is also read from ``CBMIR_<NAME>`` (``CBMIR_TOKEN``, ``CBMIR_PACS_URL``...)."""

    db: IndexLocation
    model: Path
    token: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_upload_bytes: int = Field(default=64 * MEGABYTE, ge=1)
    body_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    allow_originals: bool = False
    cors_origins: tuple[str, ...] = ()
    dicom_tags: tuple[str, ...] = ()
    max_batch: int = Field(default=16, ge=1, le=256)
    batch_wait_ms: float = Field(default=0.0, ge=0, le=1000)
    max_decoding: int = Field(default=2, ge=1)
    failed_logins_per_minute: int = Field(default=10, ge=1)
    rocchio_alpha: float = Field(default=Rocchio.alpha, gt=0, le=100)
    rocchio_beta: float = Field(default=Rocchio.beta, ge=0, le=100)
    rocchio_gamma: float = Field(default=Rocchio.gamma, ge=0, le=100)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.token is not None and len(self.token) < 16:
            raise ServiceConfigError("the token must be at least 16 characters long (use a random one)")
        if "*" in self.cors_origins:
            raise ServiceConfigError("CORS origin '*' would let any web page read the images: name the origins")
        if self.pacs_url is not None:
            try:  # checked now, not at the first search by PACS image: the URL check of every PACS location
                PacsInstance(self.pacs_url, "1", "1", "1")
            except LocationError:  # not quoted: it may hold a password
                raise ServiceConfigError(
                    "CBMIR_PACS_URL is not a DICOMweb base URL: it must be http(s), with no query, fragment or "
                    "credentials (set those in CBMIR_PACS_USER and CBMIR_PACS_PASSWORD, or CBMIR_PACS_TOKEN)"
                ) from None
        return self

    def rocchio(self) -> Rocchio:
        return Rocchio(self.rocchio_alpha, self.rocchio_beta, self.rocchio_gamma)

    def check_binding(self, has_users: bool) -> None:
        """Refuse to listen beyond this machine when no token is needed (no server token, no users)."""
        if self.token is None and not has_users and not is_loopback(self.host):
            raise ServiceConfigError(
                f"no token configured: refusing to listen on {self.host}, which other machines can reach. "
                f"Add users ('cbmir users add'), set a token (--token-file, or the {TOKEN_ENV} environment "
                "variable) or listen on 127.0.0.1"
            )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token_file(token_file: Path) -> str:
    """The token in a file: its first line."""
    try:
        text = token_file.read_text().strip()
    except OSError as error:
        raise ServiceConfigError(f"cannot read the token file {token_file}: {error.strerror}") from None
    if not text:
        raise ServiceConfigError(f"the token file {token_file} is empty")
    return text.splitlines()[0].strip()
