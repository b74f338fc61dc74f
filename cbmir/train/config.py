"""What decides a training run: `TrainConfig` (checked when made, so a bad setting fails before any work),
the papers' recipes (`RECIPES`) and `make_config`, which starts from a recipe and applies overrides."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from cbmir.errors import CbmirError
from cbmir.labels import Task

# auto: irma-axes when every label is an IRMA code, multi-label when any record has other than one label.
TaskChoice = Literal["auto", Task]
Mode = Literal["heads", "finetune", "full"]
Optimizer = Literal["adam", "adamw", "sgd"]
ClassBalance = Literal["none", "sqrt", "inverse"]  # loss weights per class: none, 1/sqrt(count) or 1/count
TASK_CHOICES: tuple[TaskChoice, ...] = get_args(TaskChoice)
MODES: tuple[Mode, ...] = get_args(Mode)
OPTIMIZERS: tuple[Optimizer, ...] = get_args(Optimizer)
BALANCING: tuple[ClassBalance, ...] = get_args(ClassBalance)


class TrainingError(CbmirError):
    """A training setting or dataset that cannot work, found before any training starts."""


@dataclass
class TrainConfig:
    """Everything that decides a training run. The defaults are the CPU default: an ImageNet EfficientNet-Lite0
    trunk with regional pooling, a 512-d embedding layer and the heads, trained on cached features, then with
    the trunk's last stage fine-tuned on cached activations of the frozen ones."""

    model: str = "efficientnet-lite0-regional"
    task: TaskChoice = "auto"
    preset: str = "constant-enhanced"
    # Default: the model's own input size. Over the 5 folds of irma2007-dev (BENCHMARKS.md, the input_size=288
    # section), the default trunk at 288 px instead of 224: full-code P@1 0.792 vs 0.788, classifier accuracy 0.745
    # vs 0.755, in about 1.4x the training time (190-237 s per fold of 520).
    input_size: int | None = None
    pretrained: str = "packaged"  # packaged (the model's shipped weights, if any), none, or a trunk weights file
    embedding_dim: int | None = 512  # width of the embedding layer (neck); None: the model's default
    # Projections of the trunk's features searched beside the neck's output (RadiographNet.keep_trunk; 0: none):
    # over 5 folds of irma2007-dev (heads mode), full-code P@1 0.751 -> 0.789 for 128 more dimensions.
    kept_trunk_dims: int = 128
    model_options: dict[str, Any] = field(default_factory=dict)
    # Over 5 folds of irma2007-dev, fine-tuning the last stage (on cached activations, about 10 s more than
    # `heads`) lifted P@10 0.600 -> 0.612, mAP@10 0.728 -> 0.747 and the classifier's full-code accuracy 0.709
    # -> 0.732, with P@1 even (0.789 -> 0.788); an epoch on 500 images costs about 8 s to fine-tune the last
    # two stages, 20 s the last four (2 cores).
    mode: Mode = "finetune"
    finetune_blocks: int = 1
    optimizer: Optimizer = "adamw"
    lr: float = 1e-3
    lr_decay: float = 0.0  # Keras-style: lr / (1 + lr_decay * iteration), as in the ImageCLEF paper
    momentum: float = 0.0
    weight_decay: float = 1e-4
    batch_size: int = 32
    epochs: int = 60
    finetune_epochs: int = 12
    finetune_lr: float = 3e-4
    patience: int = 8
    views: int = 4  # cached views per training image (heads and finetune modes): 1 plain + augmented ones
    rotation: float = 10.0  # augmentation: largest rotation in degrees (also +-8% scale, +-4% shift, contrast)
    class_balance: ClassBalance = "sqrt"
    contrastive_weight: float = 0.5  # supervised contrastive loss on the embedding, beside classification
    # 0.1 over the 5 folds of irma2007-dev (ad hoc): classifier accuracy 0.749 vs 0.755, full-code P@1 0.785 vs 0.788.
    label_smoothing: float = 0.0
    # IRMA axes, with code tables: weight of the expected hierarchical error. At 0.5, on the first 3 of the 5 folds
    # of irma2007-dev (ad hoc): classifier full-code accuracy 0.728 vs 0.751 without, error score 0.055 vs 0.051.
    hierarchy_weight: float = 0.0
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # for datasets without their own split
    seed: int = 0

    def __post_init__(self) -> None:
        choices: dict[str, tuple[str, ...]] = {
            "task": TASK_CHOICES,
            "mode": MODES,
            "optimizer": OPTIMIZERS,
            "class_balance": BALANCING,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise TrainingError(f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        kept = self.kept_trunk_dims
        if isinstance(kept, bool) or not isinstance(kept, int) or kept < 0:
            raise TrainingError(f"kept_trunk_dims must be a whole number, 0 or more, got {self.kept_trunk_dims!r}")
        for name in ("lr", "batch_size", "epochs", "views", "finetune_lr"):
            if not getattr(self, name) > 0:
                raise TrainingError(f"{name} must be positive, got {getattr(self, name)!r}")
        not_negative = ("patience", "finetune_epochs", "lr_decay", "momentum", "weight_decay", "rotation")
        for name in (*not_negative, "contrastive_weight", "label_smoothing", "hierarchy_weight"):
            if getattr(self, name) < 0:
                raise TrainingError(f"{name} must not be negative, got {getattr(self, name)!r}")
        split = tuple(self.split)
        if len(split) != 3 or abs(sum(split) - 1) > 1e-6 or min(split) < 0:
            raise TrainingError(f"split must be three fractions (train, validation, test) adding to 1, got {split}")
        self.split = (split[0], split[1], split[2])

    @classmethod
    def from_file(cls, path: Path, **overrides: Any) -> TrainConfig:
        """A config from a JSON file (a `recipe` key starts from that recipe), then `overrides`."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise TrainingError(f"config file {path}: {error}") from None
        if not isinstance(data, dict):
            raise TrainingError(f"config file {path}: expected a JSON object")
        recipe = data.pop("recipe", None)
        return make_config(recipe, **{**data, **overrides})


# The papers' settings, for users with the time or a GPU; `make_config(recipe, ...)` starts from one.
RECIPES: dict[str, dict[str, Any]] = {
    "cpu-default": {},
    "imageclef-inceptionv3": dict(  # Nkwentsha et al.: InceptionV3, Dense 1024 ReLU, SGD lr 0.01 decay 1e-6
        model="inceptionv3-imageclef",
        pretrained="none",
        embedding_dim=None,
        kept_trunk_dims=0,  # the papers search with the penultimate layer alone
        mode="full",
        optimizer="sgd",
        lr=0.01,
        lr_decay=1e-6,
        weight_decay=0.0,
        batch_size=16,
        epochs=25,
        patience=25,
        task="single-label",
        class_balance="none",
        contrastive_weight=0.0,
    ),
    "chowdhury-chest": dict(  # Chowdhury & Zhang: 64x64 three-block CNN, Adam lr 0.001
        model="chest-cnn-chowdhury",
        pretrained="none",
        embedding_dim=None,
        kept_trunk_dims=0,  # the papers search with the penultimate layer alone
        mode="full",
        optimizer="adam",
        lr=1e-3,
        weight_decay=0.0,
        preset="resize-plain",
        contrastive_weight=0.0,
        epochs=25,
    ),
    "tripathi-small": dict(  # Tripathi & Kumar: 5-conv CNN, Adam lr 1e-4, batch 32
        model="small-cnn-tripathi",
        pretrained="none",
        embedding_dim=None,
        kept_trunk_dims=0,  # the papers search with the penultimate layer alone
        mode="full",
        optimizer="adam",
        lr=1e-4,
        weight_decay=0.0,
        batch_size=32,
        contrastive_weight=0.0,
        epochs=25,
    ),
    "zamora-two-stage": dict(  # Zamora-Justo et al.: healthy vs sick, then which disease (AlexNets)
        model="alexnet-two-stage",
        pretrained="none",
        embedding_dim=None,
        kept_trunk_dims=0,  # the papers search with the penultimate layer alone
        mode="full",
        optimizer="adam",
        lr=1e-4,
        weight_decay=0.0,
        batch_size=32,
        contrastive_weight=0.0,
        epochs=25,
        task="single-label",
    ),
}


def make_config(recipe: str | None = None, **overrides: Any) -> TrainConfig:
    """The settings of `recipe` (default: cpu-default) with `overrides`; an unknown recipe or setting name is
    a `TrainingError` naming it."""
    if recipe is not None and recipe not in RECIPES:
        raise TrainingError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TrainingError(f"unknown training setting(s): {', '.join(unknown)}")
    return TrainConfig(**{**RECIPES.get(recipe or "cpu-default", {}), **overrides})
