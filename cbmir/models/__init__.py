"""Models for cbmir: a registry of radiograph CNNs (`create_model(name, heads)`), each a `RadiographNet` whose
classifier heads predict labels and whose penultimate layer is the search embedding."""

from cbmir.models import architectures as _architectures  # noqa: F401  (registers the models)
from cbmir.models.net import ModelError, ModelOutput, RadiographNet
from cbmir.models.registry import ModelInfo, create_model, list_models, model_info, register_model

__all__ = [
    "ModelError",
    "ModelInfo",
    "ModelOutput",
    "RadiographNet",
    "create_model",
    "list_models",
    "model_info",
    "register_model",
]
