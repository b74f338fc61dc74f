"""Writing files so that a reader (or the next run after a crash) never sees half of one.

Every file cbmir writes to be read back later (reports, plots, caches, training state, checkpoints, stored
images) goes through `write_atomically_with`: the content goes to a temporary file beside the target, is
flushed and fsynced, and only then renamed over the target. At any moment the target is the old file or the
whole new one, also after a power cut; a failed write leaves no temporary file behind, and the temporary
files of a killed writer (``.NAME.XXXXXXXX.tmp``) are what `remove_temporaries` clears.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMPORARY_SUFFIX = ".tmp"


def write_atomically_with(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call `write` on a temporary binary file beside `path` (e.g. ``lambda file: np.save(file, array)``),
    fsync it, then rename it over `path`; creates the folder when missing. Raises what `write` or the file
    system raised (an `OSError` for a failed write), leaving neither the temporary file nor a partial `path`."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}")
    created = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "xb") as file:
            created = True
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if created:
            temporary.unlink(missing_ok=True)
        raise


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` the way `write_atomically_with` does."""
    write_atomically_with(path, lambda file: file.write(data))


def remove_temporaries(folder: Path) -> None:
    """Remove the temporary files that writers killed mid-write left in `folder` (not below it). Only for a
    folder nothing is writing into at the moment, such as a service's at its start."""
    for path in folder.glob(f".*{TEMPORARY_SUFFIX}"):
        path.unlink(missing_ok=True)


def file_digest(path: Path, *, sync: bool = False) -> tuple[int, str]:
    """Size and sha256 (hex) of a file; with `sync`, the file is also fsynced on the way."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(file.fileno())
    return size, digest.hexdigest()
