"""Writing files so that a reader (or the next run after a crash) never sees half of one."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path`. Raises the
    `OSError` of a failed write, leaving neither the temporary file nor a partial `path` behind."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    created = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "xb") as file:
            created = True
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if created:
            temporary.unlink(missing_ok=True)
        raise
