"""The query service: HTTP API and web page over one index (see `cbmir.service.app`)."""

from cbmir.service.app import create_app
from cbmir.service.settings import ServiceConfigError, ServiceSettings, read_token_file

__all__ = ["ServiceConfigError", "ServiceSettings", "create_app", "read_token_file"]
