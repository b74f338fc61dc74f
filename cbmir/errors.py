"""The error hierarchy: every failure a user can cause is a `CbmirError` with a message that names the
file or field and the reason, so the CLI and the service can report it without a traceback."""


class CbmirError(Exception):
    """Base of every error caused by bad input or configuration (not by a bug)."""
