"""Typed settings, read in one place: every ``CBMIR_*`` environment variable a cbmir program honours is a
field here (or of `cbmir.service.settings.ServiceSettings`), and values given explicitly (command-line
options, constructor arguments) take precedence over the environment. An invalid value is a
`SettingsError` naming the field (and its environment variable) and the reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from cbmir.errors import CbmirError
from cbmir.imaging.io import DEFAULT_MAX_PIXELS

ENV_PREFIX = "CBMIR_"
S = TypeVar("S", bound="Settings")


class SettingsError(CbmirError):
    """A setting with a value that cannot be used."""


class Settings(BaseSettings):
    """`irma_tables`: the folder of the IRMA code tables A.csv..D.csv (for words and the error score).
    `threads`: the model's threads, torch's for training and both runtimes' for inference (None: every core).
    `runtime`: the inference runtime, onnx, torch or auto (onnx where the checkpoint has a current graph;
    see `cbmir.embed`). `max_pixels`: the largest image read, in pixels, checked in its header before
    decoding (indexing, search, the service). `vectors`: the local folder of the vectors (and the files kept
    beside them) of an index whose store is a PostgreSQL database (None: ``cbmir-vectors/<host>-<port>-<dbname>``
    in the working folder; see `cbmir.index.engine.vector_folder`)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True)

    irma_tables: Path | None = None
    threads: int | None = Field(default=None, ge=1)
    runtime: Literal["auto", "torch", "onnx"] = "auto"
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)
    vectors: Path | None = None


def load_settings(kind: type[S], **given: Any) -> S:
    """`kind` from the environment, with the `given` values (those not None) taking precedence."""
    try:
        return kind(**{name: value for name, value in given.items() if value is not None})
    except ValidationError as error:
        problems = []
        for problem in error.errors():
            name = ".".join(str(part) for part in problem["loc"]) or "settings"
            problems.append(f"{name} (${ENV_PREFIX}{name.upper()}): {problem['msg']}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
