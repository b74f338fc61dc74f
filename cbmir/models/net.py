"""The network every registry entry builds, `RadiographNet`:

    0..255 image -> input scaling -> trunk (pooled features) -> neck (optional Linear + ReLU) -> heads

The neck's output (the trunk's, where there is no neck) is the penultimate layer: its activations are the
embedding used for similarity search, and every head is one layer on top of it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cbmir.errors import CbmirError


class ModelError(CbmirError):
    """An unknown model, a bad head or option, an input of the wrong shape, or weights that do not fit."""


@dataclass(frozen=True)
class ModelOutput:
    """One forward pass: `logits` maps each head name to N x n_classes raw logits (log-probabilities for the
    two-stage cascade, which `cross_entropy` treats the same way); `features` is the penultimate layer, not
    normalised (what the heads and the training losses see); `embedding` the N x embedding_dim search vectors,
    at unit L2 norm."""

    logits: dict[str, torch.Tensor]
    features: torch.Tensor
    embedding: torch.Tensor


class InputScaling(nn.Module):
    """(x - offset) / divisor, per channel or for all three: maps 0..255 pixels to the range the trunk's
    source trained on. The constants are buffers outside the state dict, so weight files hold weights only."""

    offset: torch.Tensor
    divisor: torch.Tensor

    def __init__(self, offset: float | Sequence[float], divisor: float | Sequence[float]):
        super().__init__()
        self.register_buffer("offset", torch.tensor(offset, dtype=torch.float32).reshape(-1, 1, 1), persistent=False)
        self.register_buffer("divisor", torch.tensor(divisor, dtype=torch.float32).reshape(-1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.offset) / self.divisor

    def extra_repr(self) -> str:
        return f"offset={self.offset.flatten().tolist()}, divisor={self.divisor.flatten().tolist()}"


@dataclass(frozen=True)
class Trunk:
    """A feature extractor and what the registry knows about it.

    `module` maps scaled N x 3 x H x W images to N x `out_features` pooled features. `blocks` names its
    parameterised stages from input to output, each a tuple of submodule names; together they cover every
    trunk parameter, and `RadiographNet.set_trainable` counts them. `source_head` holds the key prefixes of the
    source model's own classifier, which the trunk dropped: a checkpoint of the whole source model (say a
    torchvision ImageNet file) loads into the trunk with those keys skipped.
    """

    module: nn.Module
    out_features: int
    blocks: tuple[tuple[str, ...], ...]
    source_head: tuple[str, ...] = ()


@runtime_checkable
class StagedTrunk(Protocol):
    """A trunk module that also runs in two parts, `finish(*start(x, k), k)` being `forward(x)`: `start` runs
    the stem and stages before stage k, `finish` the stages from k (of `n_stages`) on what `start` gave; so
    fine-tuning the late stages can run on cached activations of the frozen early ones."""

    n_stages: int

    def start(self, x: torch.Tensor, stop: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def finish(self, x: torch.Tensor, pooled: list[torch.Tensor], first: int) -> torch.Tensor: ...


class Heads(nn.Module):
    """The classifier heads of a RadiographNet: maps the features to a dict of logits, one entry per head,
    and lists `sizes` (head name -> number of classes)."""

    sizes: dict[str, int]


class LinearHeads(Heads):
    """One Linear layer per head on the shared features, giving raw logits (softmax belongs to the loss)."""

    def __init__(self, in_features: int, sizes: Mapping[str, int]):
        super().__init__()
        self.sizes = dict(sizes)
        self.layers = nn.ModuleDict({name: nn.Linear(in_features, n) for name, n in sizes.items()})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: layer(features) for name, layer in self.layers.items()}


class RadiographNet(nn.Module):
    """Trunk, optional neck and heads, with the trunk's own input scaling built in; optionally a kept
    projection of the trunk in the search vectors (`keep_trunk`).

    Inputs are float N x 3 x input_size x input_size tensors with values 0..255.

    Freezing for head-only training and fine-tuning: `set_trainable(k)` makes the neck, the heads and the last
    k trunk blocks trainable (0: trunk frozen; -1: everything). BatchNorm layers whose parameters are frozen
    then stay in eval mode, also under `model.train()` (this class overrides `train`): they normalise with
    their stored running statistics and never update them, as the frozen weights around them expect.
    """

    trunk_mean: torch.Tensor  # with `keep_trunk`
    trunk_components: torch.Tensor

    def __init__(
        self,
        trunk: Trunk,
        heads: Heads,
        *,
        input_size: int,
        scaling: InputScaling,
        neck_dim: int | None,
    ):
        super().__init__()
        self.input_size = input_size
        self.scaling = scaling
        self.trunk = trunk.module
        self.trunk_dim = trunk.out_features
        if neck_dim is None:
            self.neck: nn.Module = nn.Identity()
            self.embedding_dim = trunk.out_features
        else:
            self.neck = nn.Sequential(nn.Linear(trunk.out_features, neck_dim), nn.ReLU())
            self.embedding_dim = neck_dim
        self.neck_dim = self.embedding_dim
        self.kept_trunk_dims = 0
        self.heads = heads
        self.head_sizes: dict[str, int] = dict(heads.sizes)
        self._blocks = trunk.blocks
        self._source_head = trunk.source_head
        # The create_model arguments that rebuild this architecture (without weights): create_model(**config).
        self.config: dict[str, Any] = {}

    @property
    def n_trunk_blocks(self) -> int:
        """How many trunk blocks `set_trainable` can unfreeze."""
        return len(self._blocks)

    @property
    def trunk_blocks(self) -> tuple[tuple[str, ...], ...]:
        """The trunk's parameterised stages from input to output, each a tuple of submodule names."""
        return self._blocks

    def trunk_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled trunk output before the neck, N x trunk_dim: what to cache for head-only training."""
        return self.trunk(self.scaling(self._checked_input(x)))

    def cached_stage(self, trunk_blocks: int) -> int | None:
        """Where training the last `trunk_blocks` trunk blocks can start from cached activations: the index of
        the first trained stage of a `StagedTrunk` whose stem stays frozen; None for other trunks (train them
        on images)."""
        trunk = self.trunk
        if isinstance(trunk, StagedTrunk) and 0 < trunk_blocks <= trunk.n_stages:
            return trunk.n_stages - trunk_blocks
        return None

    def trunk_start(self, x: torch.Tensor, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen part of the trunk up to `stage` (see `cached_stage`): the activation entering it and
        the pooled descriptors of the stages before it, what to cache for fine-tuning the stages after."""
        assert isinstance(self.trunk, StagedTrunk)
        return self.trunk.start(self.scaling(self._checked_input(x)), stage)

    def trunk_finish(self, activation: torch.Tensor, pooled: torch.Tensor, stage: int) -> torch.Tensor:
        """The trunk features from what `trunk_start` gave for `stage`."""
        assert isinstance(self.trunk, StagedTrunk)
        return self.trunk.finish(activation, [pooled], stage)

    def _checked_input(self, x: torch.Tensor) -> torch.Tensor:
        if not (
            isinstance(x, torch.Tensor)
            and x.is_floating_point()
            and x.dim() == 4
            and x.shape[1] == 3
            and x.shape[2] == x.shape[3] == self.input_size
        ):
            got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            size = self.input_size
            raise ModelError(f"model input must be a float tensor N x 3 x {size} x {size} (values 0..255), got {got}")
        return x

    def head_forward(self, trunk_features: torch.Tensor) -> ModelOutput:
        """Neck, heads and search vectors on (cached) trunk features."""
        features = self.neck(trunk_features)
        embedding = F.normalize(features, dim=1)
        if self.kept_trunk_dims:
            kept = F.normalize((trunk_features - self.trunk_mean) @ self.trunk_components, dim=1)
            embedding = torch.cat([embedding, kept], dim=1) * math.sqrt(0.5)  # two unit halves, equal weight
        return ModelOutput(logits=self.heads(features), features=features, embedding=embedding)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return self.head_forward(self.trunk_features(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The search vectors, N x embedding_dim, at unit L2 norm."""
        return self.forward(x).embedding

    def keep_trunk(self, dims: int) -> None:
        """Search with `dims` projections of the trunk's pooled features beside the neck's output (see the
        module docstring): the embedding grows by `dims`. The projection (`trunk_mean`, `trunk_components`:
        the training images' principal components, set by `fit_kept_trunk`) is part of the weights, never
        trained."""
        if isinstance(dims, bool) or not isinstance(dims, int) or not 0 < dims <= self.trunk_dim:
            raise ModelError(f"kept_trunk_dims must be an integer from 1 to the trunk's {self.trunk_dim}, got {dims!r}")
        self.register_buffer("trunk_mean", torch.zeros(self.trunk_dim))
        self.register_buffer("trunk_components", torch.zeros(self.trunk_dim, dims))
        self.kept_trunk_dims = dims
        self.embedding_dim = self.neck_dim + dims

    def fit_kept_trunk(self, trunk_features: np.ndarray) -> None:
        """Set the kept projection from trunk features of training images (N x trunk_dim): their mean and
        first `kept_trunk_dims` principal components."""
        if len(trunk_features) < 2:
            raise ModelError("fitting the kept trunk projection needs the trunk features of at least 2 images")
        features = np.asarray(trunk_features, dtype=np.float64)
        mean = features.mean(axis=0)
        _, _, components = np.linalg.svd(features - mean, full_matrices=False)
        rows = components[: self.kept_trunk_dims].T
        projection = np.zeros((self.trunk_dim, self.kept_trunk_dims))
        projection[:, : rows.shape[1]] = rows  # fewer images than dims: the remaining directions stay zero
        self.trunk_mean.copy_(torch.from_numpy(mean))
        self.trunk_components.copy_(torch.from_numpy(projection))

    def set_trainable(self, trunk_blocks: int) -> None:
        """Train the neck, the heads and the last `trunk_blocks` trunk blocks; freeze the rest of the trunk.
        0 freezes the whole trunk, -1 trains everything."""
        n = len(self._blocks)
        if isinstance(trunk_blocks, bool) or not isinstance(trunk_blocks, int) or not -1 <= trunk_blocks <= n:
            raise ModelError(
                f"trunk_blocks {trunk_blocks!r} is out of range: this trunk has {n} blocks, so give -1 (all), "
                f"0 (trunk frozen) or 1..{n}"
            )
        self.trunk.requires_grad_(trunk_blocks == -1)
        unfrozen = self._blocks[n - trunk_blocks :] if trunk_blocks > 0 else ()
        for block in unfrozen:
            for name in block:
                self.trunk.get_submodule(name).requires_grad_(True)
        self.neck.requires_grad_(True)
        self.heads.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> RadiographNet:
        """As `nn.Module.train`, but BatchNorm layers with frozen parameters stay in eval mode."""
        super().train(mode)
        if mode:
            for module in self.trunk.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in module.parameters(recurse=False)
                ):
                    module.eval()
        return self

    def load_trunk_state(self, state: Mapping[str, torch.Tensor], origin: str) -> None:
        """Load a trunk state dict strictly: every trunk tensor present with its shape and no other key, except
        keys of the source model's classifier (see `Trunk.source_head`), which are skipped. `origin` names
        where the weights come from, for the error message."""
        state = {key: value for key, value in state.items() if not key.startswith(self._source_head)}
        expected = self.trunk.state_dict()
        missing = [key for key in expected if key not in state]
        unexpected = [key for key in state if key not in expected]
        reshaped = [
            f"{key} {tuple(state[key].shape)} where the trunk has {tuple(value.shape)}"
            for key, value in expected.items()
            if key in state and state[key].shape != value.shape
        ]
        problems = [
            f"{label} {_listing(keys)}"
            for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", reshaped))
            if keys
        ]
        if problems:
            raise ModelError(
                f"{origin} does not fit the model's trunk: {'; '.join(problems)} "
                "(a trunk weights file is what torch.save(model.trunk.state_dict(), path) writes)"
            )
        self.trunk.load_state_dict(state, strict=True)


def _listing(items: list[str], shown: int = 5) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more
