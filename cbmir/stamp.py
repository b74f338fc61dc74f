"""The model stamp: which model's vectors an index holds. Made by the model side (`cbmir.embed.Embedder`),
recorded and checked by the index side (`cbmir.index.Engine`); it sits below both so that neither imports
the other.

An index records the stamp of the model that embedded its first images and refuses vectors and queries of
any other, so 512-d and 2048-d vectors, or two models' vectors of the same width, never mix. The index
knows nothing else of models: the stamp's identity is opaque JSON data (for a checkpoint: architecture,
label schema, preprocessing and creation time) compared by digest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cbmir.errors import CbmirError


class ModelStampError(CbmirError):
    """A model stamp that cannot be recorded: a dimension that is not a positive integer, or not JSON data."""


def stamp_digest(identity: Any) -> str | None:
    """The sha256 of a stamp identity's canonical JSON; None for no identity (an index without a model yet)."""
    if identity is None:
        return None
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class ModelStamp:
    """A model's identity (JSON data) and the dimension of its embeddings."""

    identity: Any
    dimension: int

    def __post_init__(self) -> None:
        if isinstance(self.dimension, bool) or not isinstance(self.dimension, int) or self.dimension < 1:
            raise ModelStampError(f"dimension={self.dimension!r}: expected a positive integer")
        try:
            json.dumps(self.identity, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ModelStampError(f"the model stamp must be JSON data ({error})") from None

    @property
    def digest(self) -> str | None:
        return stamp_digest(self.identity)

    def describe(self) -> str:
        return f"{describe_identity(self.identity)} / {self.dimension}-d"


def describe_identity(identity: Any) -> str:
    """A short name for a stamp identity: architecture, creation time and digest."""
    if identity is None:
        return "(unknown model)"
    parts = []
    if isinstance(identity, dict):
        architecture = identity.get("architecture")
        parts.append(architecture.get("name") if isinstance(architecture, dict) else architecture)
        parts.append(identity.get("created"))
    described = " ".join(str(part) for part in parts if part)
    digest = str(stamp_digest(identity))[:12]
    return f"{described} ({digest})" if described else digest
