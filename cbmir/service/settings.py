"""What the query service is configured with, and the rule that keeps an unprotected service private."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from cbmir.errors import CbmirError

TOKEN_ENV = "CBMIR_TOKEN"
MEGABYTE = 1 << 20


class ServiceConfigError(CbmirError):
    """A service configuration that cannot be used (or would expose images to anyone)."""


@dataclass(frozen=True)
class ServiceSettings:
    """`token`: the bearer token every /v1 request must carry (None: no token, loopback only).
    `max_upload_bytes`: the largest request body; `max_pixels`: the largest image (checked in its header,
    before decoding). `allow_originals`: serve the original files, not only thumbnails. `cors_origins`:
    web origins allowed to call the API from a browser (none by default). `dicom_tags`: DICOM tags stored
    beside uploaded images on top of the technical ones; never set it to patient-identifying tags unless
    the index may hold them."""

    db: Path
    model: Path
    tables: Path | None = None
    token: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = 64 * MEGABYTE
    max_pixels: int = 50_000_000
    allow_originals: bool = False
    cors_origins: tuple[str, ...] = ()
    dicom_tags: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.token is not None and len(self.token) < 16:
            raise ServiceConfigError("the token must be at least 16 characters long (use a random one)")
        if self.max_upload_bytes < 1 or self.max_pixels < 1:
            raise ServiceConfigError("the upload and pixel limits must be positive")
        if "*" in self.cors_origins:
            raise ServiceConfigError("CORS origin '*' would let any web page read the images: name the origins")

    def check_binding(self) -> None:
        """Refuse to listen beyond this machine without a token."""
        if self.token is None and not is_loopback(self.host):
            raise ServiceConfigError(
                f"no token configured: refusing to listen on {self.host}, which other machines can reach. "
                f"Set a token (--token-file, or the {TOKEN_ENV} environment variable) or listen on 127.0.0.1"
            )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(token_file: Path | None) -> str | None:
    """The token from a file (its first line) or from $CBMIR_TOKEN; None when neither is given."""
    if token_file is not None:
        try:
            text = token_file.read_text().strip()
        except OSError as error:
            raise ServiceConfigError(f"cannot read the token file {token_file}: {error.strerror}") from None
        if not text:
            raise ServiceConfigError(f"the token file {token_file} is empty")
        return text.splitlines()[0].strip()
    return os.environ.get(TOKEN_ENV) or None
