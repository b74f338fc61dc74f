"""Training a radiograph model on this kind of machine: 2 CPU cores, no GPU.

Three modes:
- `heads` (the default): the pretrained trunk stays frozen; its features are computed once per image for a
  few augmented views and cached on disk, then the neck (the embedding layer) and the heads train on those
  features in seconds per epoch.
- `finetune`: `heads` first, then the last `finetune_blocks` trunk blocks train too, on images, at a lower rate.
- `full`: everything trains on images from the first epoch (the papers' from-scratch recipes; slow on CPU).

Each epoch validates; training stops early when the validation loss has not improved for `patience` epochs and
keeps the best weights. Every epoch of a stage is seeded from (seed, stage, epoch), so a run resumed from its
training state after an interruption ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cbmir.checkpoint import Checkpoint, new_card, save_checkpoint
from cbmir.datasets import Dataset, Record, stratified_split
from cbmir.embed import images_to_tensor
from cbmir.errors import CbmirError
from cbmir.evaluate import choose_irma_threshold, evaluate_images
from cbmir.imaging.preprocess import preset
from cbmir.irma import IrmaCode, IrmaCodeError
from cbmir.labels import TASKS, LabelSchema
from cbmir.metrics import plot_history
from cbmir.models import RadiographNet, create_model, model_info
from cbmir.prepared import PreparedImages, fingerprint, prepare_images

MODES = ("heads", "finetune", "full")
OPTIMIZERS = ("adam", "adamw", "sgd")
BALANCING = ("none", "sqrt", "inverse")
STATE_FILE = "training-state.pt"


class TrainingError(CbmirError):
    """A training setting or dataset that cannot work, found before any training starts."""


@dataclass
class TrainConfig:
    """Everything that decides a training run. The defaults are the CPU default: a frozen ImageNet
    EfficientNet-Lite0 trunk with regional pooling, a 512-d embedding layer and the heads, trained on cached
    features."""

    model: str = "efficientnet-lite0-regional"
    task: str = "auto"  # auto: irma-axes when every label is an IRMA code, multi-label when any record has != 1
    preset: str = "constant-enhanced"
    input_size: int | None = None  # default: the model's own input size
    pretrained: str = "packaged"  # packaged (the model's shipped weights, if any), none, or a trunk weights file
    embedding_dim: int | None = 512  # width of the embedding layer (neck); None: the model's default
    model_options: dict[str, Any] = field(default_factory=dict)
    mode: str = "heads"
    finetune_blocks: int = 4  # the last four stages of the default trunk, the ones its regional pooling reads
    optimizer: str = "adamw"
    lr: float = 1e-3
    lr_decay: float = 0.0  # Keras-style: lr / (1 + lr_decay * iteration), as in the ImageCLEF paper
    momentum: float = 0.0
    weight_decay: float = 1e-4
    batch_size: int = 32
    epochs: int = 60
    finetune_epochs: int = 12
    finetune_lr: float = 3e-4
    patience: int = 8
    views: int = 4  # cached feature views per training image in `heads` mode: 1 plain + augmented ones
    rotation: float = 10.0  # augmentation: largest rotation in degrees (also +-8% scale, +-4% shift, contrast)
    class_balance: str = "sqrt"  # loss weights per class: none, 1/sqrt(count) or 1/count
    contrastive_weight: float = 0.5  # supervised contrastive loss on the embedding, beside classification
    label_smoothing: float = 0.0
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # for datasets without their own split
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        self.split = tuple(self.split)
        choices = {"task": ("auto", *TASKS), "mode": MODES, "optimizer": OPTIMIZERS, "class_balance": BALANCING}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise TrainingError(f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        positive = ("lr", "batch_size", "epochs", "views", "finetune_lr")
        for name in positive:
            if not getattr(self, name) > 0:
                raise TrainingError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("patience", "finetune_epochs", "lr_decay", "momentum", "weight_decay", "rotation",
                     "contrastive_weight", "label_smoothing"):
            if getattr(self, name) < 0:
                raise TrainingError(f"{name} must not be negative, got {getattr(self, name)!r}")
        if len(self.split) != 3 or abs(sum(self.split) - 1) > 1e-6 or min(self.split) < 0:
            raise TrainingError(f"split must be three fractions (train, validation, test) adding to 1, got {self.split}")

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
        model="inceptionv3-imageclef", pretrained="none", embedding_dim=None, mode="full", optimizer="sgd",
        lr=0.01, lr_decay=1e-6, weight_decay=0.0, batch_size=16, epochs=25, patience=25, task="single-label",
        class_balance="none", contrastive_weight=0.0,
    ),
    "chowdhury-chest": dict(  # Chowdhury & Zhang: 64x64 three-block CNN, Adam lr 0.001
        model="chest-cnn-chowdhury", pretrained="none", embedding_dim=None, mode="full", optimizer="adam",
        lr=1e-3, weight_decay=0.0, preset="resize-plain", contrastive_weight=0.0, epochs=25,
    ),
    "tripathi-small": dict(  # Tripathi & Kumar: 5-conv CNN, Adam lr 1e-4, batch 32
        model="small-cnn-tripathi", pretrained="none", embedding_dim=None, mode="full", optimizer="adam",
        lr=1e-4, weight_decay=0.0, batch_size=32, contrastive_weight=0.0, epochs=25,
    ),
    "zamora-two-stage": dict(  # Zamora-Justo et al.: healthy vs sick, then which disease (AlexNets)
        model="alexnet-two-stage", pretrained="none", embedding_dim=None, mode="full", optimizer="adam",
        lr=1e-4, weight_decay=0.0, batch_size=32, contrastive_weight=0.0, epochs=25, task="single-label",
    ),
}


def make_config(recipe: str | None = None, **overrides: Any) -> TrainConfig:
    if recipe is not None and recipe not in RECIPES:
        raise TrainingError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TrainingError(f"unknown training setting(s): {', '.join(unknown)}")
    return TrainConfig(**{**RECIPES.get(recipe or "cpu-default", {}), **overrides})


# --- data ------------------------------------------------------------------------------------------------


def choose_task(records: Sequence[Record]) -> str:
    if any(len(record.labels) != 1 for record in records):
        return "multi-label"
    try:
        for record in records:
            IrmaCode.parse(record.labels[0])
    except IrmaCodeError:
        return "single-label"
    return "irma-axes"


def split_records(dataset: Dataset, config: TrainConfig) -> dict[str, list[Record]]:
    """The dataset's own train/validation/test split when every record has one, else a seeded stratified one."""
    if dataset.records and all(record.split for record in dataset.records):
        parts = {name: [r for r in dataset.records if r.split == name] for name in ("train", "validation", "test")}
        if parts["validation"]:
            return parts
        inner = stratified_split(parts["train"], (1 - config.split[1], config.split[1], 0.0), seed=config.seed)
        return {"train": inner["train"], "validation": inner["validation"], "test": parts["test"]}
    return stratified_split(dataset.records, config.split, seed=config.seed)


def datafingerprint(records: Sequence[Record]) -> str:
    """sha256 over the sorted (id, labels, file size) of the training records."""
    lines = []
    for record in sorted(records, key=lambda r: r.id):
        size = record.path.stat().st_size if record.path.exists() else -1
        lines.append(f"{record.id}\t{'|'.join(record.labels)}\t{size}")
    return fingerprint(lines)


def augment(image: np.ndarray, rng: np.random.Generator, rotation: float) -> np.ndarray:
    """A random small rotation, scale, shift and contrast change of a uint8 H x W x 3 image. No flips:
    left and right are not interchangeable in a radiograph."""
    side = image.shape[0]
    angle = rng.uniform(-rotation, rotation)
    scale = rng.uniform(0.92, 1.08)
    matrix = cv2.getRotationMatrix2D((side / 2, side / 2), angle, scale)
    matrix[:, 2] += rng.uniform(-0.04, 0.04, size=2) * side
    warped = cv2.warpAffine(image, matrix, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    gain, offset = rng.uniform(0.9, 1.1), rng.uniform(-12, 12)
    return np.clip(warped.astype(np.float32) * gain + offset, 0, 255).astype(np.uint8)


# --- losses and scores ------------------------------------------------------------------------------------


def supervised_contrastive_loss(features: torch.Tensor, groups: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Khosla et al. (2020) SupCon: pull embeddings of the same label together, push others apart. Rows with
    no positive in the batch are left out; 0 when no row has one."""
    z = F.normalize(features, dim=1)
    similarity = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    similarity = similarity.masked_fill(eye, float("-inf"))
    log_prob = similarity - torch.logsumexp(similarity, dim=1, keepdim=True)
    positives = (groups[:, None] == groups[None, :]) & ~eye
    counts = positives.sum(1)
    usable = counts > 0
    if not usable.any():
        return features.sum() * 0.0
    summed = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(1)
    return -(summed[usable] / counts[usable]).mean()


class Objective:
    """The loss and the accuracy of a batch for a label schema."""

    def __init__(self, schema: LabelSchema, targets: dict[str, np.ndarray], groups: np.ndarray, config: TrainConfig):
        self.schema = schema
        self.targets = {head: torch.from_numpy(values) for head, values in targets.items()}
        self.groups = torch.from_numpy(groups)
        self.config = config
        self.weights = {head: self._weights(values, len(schema.heads[head])) for head, values in targets.items()}

    def _weights(self, values: np.ndarray, classes: int) -> torch.Tensor | None:
        """Per-class loss weights from the training counts (per finding for multi-label: the positive weight),
        scaled so the average sample weighs 1."""
        if self.config.class_balance == "none":
            return None
        power = 0.5 if self.config.class_balance == "sqrt" else 1.0
        if self.schema.task == "multi-label":
            positives = values.sum(0).clip(min=1)
            return torch.from_numpy(((len(values) - positives) / positives).clip(1, 100) ** power).float()
        counts = np.bincount(values, minlength=classes)
        weights = np.zeros(counts.shape, np.float64)
        weights[counts > 0] = counts[counts > 0] ** -power
        weights *= len(values) / (weights[values]).sum()
        return torch.from_numpy(weights).float()

    def loss(self, output, rows: np.ndarray, *, train: bool) -> torch.Tensor:
        total = output.features.new_zeros(())
        for head, logits in output.logits.items():
            target = self.targets[head][rows]
            weight = self.weights[head] if train else None
            if self.schema.task == "multi-label":
                total = total + F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)
            else:
                smoothing = self.config.label_smoothing if train else 0.0
                total = total + F.cross_entropy(logits, target, weight=weight, label_smoothing=smoothing)
        if train and self.config.contrastive_weight > 0 and self.schema.task != "multi-label":
            total = total + self.config.contrastive_weight * supervised_contrastive_loss(
                output.features, self.groups[rows]
            )
        return total

    def correct(self, output, rows: np.ndarray) -> float:
        """Summed accuracy of the batch: a sample is right when every head is (multi-label: per finding)."""
        if self.schema.task == "multi-label":
            logits = output.logits["label"]
            return float(((logits > 0).float() == self.targets["label"][rows]).float().mean(1).sum())
        right = torch.ones(len(rows), dtype=torch.bool)
        for head, logits in output.logits.items():
            right &= logits.argmax(1).cpu() == self.targets[head][rows]
        return float(right.sum())


# --- the loop ---------------------------------------------------------------------------------------------


class FeatureFeed:
    """`heads` mode: cached trunk features, views x N x D for training (one random view per sample and epoch)
    and N x D for validation; the model runs only its neck and heads."""

    def __init__(self, train_views: np.ndarray, validation: np.ndarray):
        self.train_views, self.validation = torch.from_numpy(train_views), torch.from_numpy(validation)

    def train_batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        order = rng.permutation(self.train_views.shape[1])
        views = rng.integers(0, self.train_views.shape[0], size=len(order))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            yield self.train_views[views[start : start + len(rows)], rows], rows

    def validation_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        for start in range(0, len(self.validation), batch_size):
            rows = np.arange(start, min(start + batch_size, len(self.validation)))
            yield self.validation[rows], rows

    @staticmethod
    def forward(model: RadiographNet, x: torch.Tensor):
        return model.head_forward(x)


class ImageFeed:
    """`finetune` and `full` modes: preprocessed images, augmented afresh each epoch for training."""

    def __init__(self, train: np.ndarray, validation: np.ndarray, rotation: float, device: torch.device):
        self.train, self.validation, self.rotation, self.device = train, validation, rotation, device

    def train_batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        order = rng.permutation(len(self.train))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            images = np.stack([augment(self.train[row], rng, self.rotation) for row in rows])
            yield images_to_tensor(images, self.device), rows

    def validation_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        for start in range(0, len(self.validation), batch_size):
            rows = np.arange(start, min(start + batch_size, len(self.validation)))
            yield images_to_tensor(self.validation[rows], self.device), rows

    @staticmethod
    def forward(model: RadiographNet, x: torch.Tensor):
        return model(x)


def _optimizer(parameters, config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    parameters = [p for p in parameters if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=config.weight_decay)


def _epoch_seed(seed: int, stage: str, epoch: int) -> int:
    return int(fingerprint([str(seed), stage, str(epoch)])[:8], 16)


@dataclass
class StageResult:
    history: list[dict[str, float]]
    best_loss: float


def run_stage(
    stage: str,
    model: RadiographNet,
    feed: FeatureFeed | ImageFeed,
    objective: Objective,
    validation_objective: Objective,
    config: TrainConfig,
    *,
    epochs: int,
    lr: float,
    state_path: Path,
    saved: dict[str, Any] | None,
) -> StageResult:
    """Train one stage with validation each epoch and early stopping; after every epoch the whole training
    state is written to `state_path`, and `saved` (such a state for this stage) resumes after its last epoch."""
    optimizer = _optimizer(model.parameters(), config, lr)
    decay = config.lr_decay
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + decay * step))
    history: list[dict[str, float]] = []
    best_loss, best_state, stale, first = float("inf"), None, 0, 0
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        history, best_loss, best_state, stale = saved["history"], saved["best_loss"], saved["best_state"], saved["stale"]
        first = len(history)
    for epoch in range(first, epochs):
        if stale > config.patience:
            break
        seed = _epoch_seed(config.seed, stage, epoch)
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        model.train()
        loss_sum = correct = seen = 0.0
        batches = tqdm(feed.train_batches(rng, config.batch_size), desc=f"{stage} {epoch + 1}/{epochs}",
                       total=-(-len(objective.groups) // config.batch_size), unit="batch", leave=False)
        for x, rows in batches:
            output = feed.forward(model, x)
            loss = objective.loss(output, rows, train=True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(rows)
            correct += objective.correct(output, rows)
            seen += len(rows)
            batches.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        val_loss, val_accuracy = evaluate_feed(model, feed, validation_objective, config.batch_size)
        record = {"stage": stage, "epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                  "val_loss": val_loss, "val_accuracy": val_accuracy}
        history.append(record)
        tqdm.write(f"{stage} epoch {epoch + 1}: train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.3f}"
                   f" | val loss {val_loss:.4f} acc {val_accuracy:.3f}")
        if best_state is None or best_loss - val_loss > max(1e-4, 1e-3 * best_loss):  # not just rounding noise
            best_loss, stale = val_loss, 0
            best_state = {key: value.detach().clone() for key, value in model.state_dict().items()}
        else:
            stale += 1
        _write_state(state_path, {"stage": stage, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                  "scheduler": scheduler.state_dict(), "history": history, "best_loss": best_loss,
                                  "best_state": best_state, "stale": stale})
    if best_state is not None:
        model.load_state_dict(best_state)
    return StageResult(history, best_loss)


@torch.inference_mode()
def evaluate_feed(model: RadiographNet, feed, objective: Objective, batch_size: int) -> tuple[float, float]:
    model.eval()
    loss_sum = correct = seen = 0.0
    for x, rows in feed.validation_batches(batch_size):
        output = feed.forward(model, x)
        loss_sum += float(objective.loss(output, rows, train=False)) * len(rows)
        correct += objective.correct(output, rows)
        seen += len(rows)
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def _write_state(path: Path, state: dict[str, Any]) -> None:
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


@torch.inference_mode()
def trunk_feature_views(
    model: RadiographNet, images: np.ndarray, views: int, config: TrainConfig, device: torch.device, desc: str
) -> np.ndarray:
    """views x N x D trunk features: view 0 of the plain images, the others of seeded augmentations."""
    model.eval()
    result = np.zeros((views, len(images), model.trunk_dim), np.float32)
    batch = 16
    progress = tqdm(total=views * len(images), desc=desc, unit="img")
    for view in range(views):
        rng = np.random.default_rng(_epoch_seed(config.seed, "views", view))
        for start in range(0, len(images), batch):
            chunk = np.asarray(images[start : start + batch])
            if view:
                chunk = np.stack([augment(image, rng, config.rotation) for image in chunk])
            features = model.trunk_features(images_to_tensor(chunk, device))
            result[view, start : start + len(chunk)] = features.float().cpu().numpy()
            progress.update(len(chunk))
    progress.close()
    return result


# --- a whole run ------------------------------------------------------------------------------------------


def _build_model(config: TrainConfig, schema: LabelSchema) -> RadiographNet:
    options = dict(config.model_options)
    if config.input_size is not None:
        options["input_size"] = config.input_size
    if isinstance(options.get("healthy_class"), str):
        classes = schema.heads.get("label", ())
        if options["healthy_class"] not in classes:
            raise TrainingError(f"healthy_class {options['healthy_class']!r} is not a class of the data {list(classes)}")
        options["healthy_class"] = classes.index(options["healthy_class"])
    info = model_info(config.model)
    if config.pretrained == "packaged":
        pretrained: bool | str = info.pretrained is not None
        if not pretrained:
            tqdm.write(f"note: {config.model} has no packaged pretrained weights; its trunk starts from random init")
    elif config.pretrained == "none":
        pretrained = False
    else:
        pretrained = config.pretrained
    if config.mode == "heads" and not pretrained:
        raise TrainingError(f"mode 'heads' trains only the heads on a frozen trunk, which needs pretrained weights: "
                            f"{config.model} has none here; use mode 'full' or give pretrained=PATH")
    return create_model(config.model, schema.head_sizes, pretrained=pretrained,
                        embedding_dim=config.embedding_dim, **options)


def _check_data(parts: dict[str, list[Record]], schema: LabelSchema) -> None:
    for name in ("train", "validation"):
        if not parts[name]:
            raise TrainingError(f"the {name} part of the dataset is empty: more images are needed to train")
    if schema.task != "multi-label":
        targets = schema.targets([r.labels for r in parts["train"]])
        for head, values in targets.items():
            if len(np.unique(values)) < 2:
                raise TrainingError(f"the training part has a single class on head {head!r}: nothing to learn")


def train(dataset: Dataset, config: TrainConfig, out: Path, *, resume: bool = False, tables=None) -> Checkpoint:
    """Train on `dataset` and write a checkpoint folder to `out` (model, card, split, plots, evaluation).

    With `resume`, a training state left in `out` by an interrupted run with the same settings continues after
    its last finished epoch. `tables` (IRMA code tables) lets the per-axis model choose its `*` threshold on
    the validation part by the ImageCLEF error score; without them it never stops early.
    """
    out = Path(out)
    started = time.time()
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    torch.manual_seed(config.seed)
    if not dataset.records:
        raise TrainingError(f"dataset {dataset.name} has no usable records")
    task = choose_task(dataset.records) if config.task == "auto" else config.task
    schema = LabelSchema.from_labels(task, [record.labels for record in dataset.records])
    parts = split_records(dataset, config)
    _check_data(parts, schema)
    model = _build_model(config, schema)
    pipeline = preset(config.preset, size=model.input_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device, memory_format=torch.channels_last)

    out.mkdir(parents=True, exist_ok=True)
    settings = {"config": dataclasses.asdict(config), "task": task, "data": datafingerprint(parts["train"])}
    saved = _start_state(out, settings, resume)
    cache = out / "cache"
    prepared = {name: prepare_images(records, pipeline, cache, f"preprocess {name}") for name, records in parts.items()}
    failures = [failure for part in prepared.values() for failure in part.failures]
    for failure in failures:
        tqdm.write(f"skipped: {failure}")
    train_part, val_part = prepared["train"], prepared["validation"]
    group_ids: dict[str, int] = {}

    def objective_for(part: PreparedImages) -> Objective:
        labels = [record.labels for record in part.records]
        groups = np.array([group_ids.setdefault("|".join(lab), len(group_ids)) for lab in labels], np.int64)
        return Objective(schema, schema.targets(labels), groups, config)

    train_objective, val_objective = objective_for(train_part), objective_for(val_part)
    history: list[dict[str, float]] = []
    stages = ["heads"] if config.mode in ("heads", "finetune") else []
    stages += ["finetune"] if config.mode == "finetune" else ["full"] if config.mode == "full" else []
    for stage in stages:
        if stage in saved["finished"]:
            model.load_state_dict(saved["stage_models"][stage])
            history += saved["stage_history"][stage]
            continue
        if stage == "heads":
            model.set_trainable(0)
            feed: FeatureFeed | ImageFeed = FeatureFeed(
                _cached_views(model, train_part, config, cache, device, config.views, "train"),
                _cached_views(model, val_part, config, cache, device, 1, "validation")[0],
            )
            epochs, lr = config.epochs, config.lr
        else:
            model.set_trainable(config.finetune_blocks if stage == "finetune" else -1)
            feed = ImageFeed(train_part.images, val_part.images, config.rotation, device)
            epochs, lr = (config.finetune_epochs, config.finetune_lr) if stage == "finetune" else (config.epochs, config.lr)
        current = saved["current"]
        stage_state = current if current is not None and current["stage"] == stage else None
        result = run_stage(stage, model, feed, train_objective, val_objective, config, epochs=epochs, lr=lr,
                           state_path=out / f"{stage}-{STATE_FILE}", saved=stage_state)
        history += result.history
        saved = _record_finished_stage(out, saved, stage, model, result.history)
    model.eval()

    checkpoint = Checkpoint(model, new_card(model, schema, pipeline), out)
    if schema.task == "irma-axes":
        threshold, note = choose_irma_threshold(checkpoint, val_part, tables)
        checkpoint.card["irma_threshold"] = threshold
        checkpoint.card["irma_threshold_note"] = note
    metrics = {name: evaluate_images(checkpoint, part, tables, out, name)
               for name, part in prepared.items() if part.records and name != "train"}
    checkpoint.card.update(
        training={
            **settings,
            "dataset": dataset.name,
            "counts": {name: len(part.records) for name, part in prepared.items()},
            "skipped_files": failures,
            "seconds": round(time.time() - started, 1),
            "history": history,
        },
        metrics=metrics,
    )
    save_checkpoint(out, model, checkpoint.card)
    (out / "split.json").write_text(json.dumps({name: [r.id for r in part.records] for name, part in prepared.items()}))
    plot_history([{**entry, "epoch": number} for number, entry in enumerate(history, 1)], out / "history.png")
    (out / STATE_FILE).unlink()
    return checkpoint


def _cached_views(model: RadiographNet, part: PreparedImages, config: TrainConfig, cache: Path,
                  device: torch.device, views: int, name: str) -> np.ndarray:
    """Trunk feature views of a part, cached on disk: the trunk is frozen, so they never change for the same
    images, weights, views and augmentation."""
    key = fingerprint([json.dumps(model.config, sort_keys=True), str(config.pretrained), str(views),
                        str(config.seed), str(config.rotation)] + [r.id for r in part.records])[:16]
    path = cache / f"features-{key}.npy"
    if path.exists():
        return np.load(path)
    features = trunk_feature_views(model, part.images, views, config, device, f"trunk features ({name})")
    np.save(path.with_suffix(".tmp.npy"), features)
    os.replace(path.with_suffix(".tmp.npy"), path)
    return features


def _start_state(folder: Path, settings: dict[str, Any], resume: bool) -> dict[str, Any]:
    """The run's progress record. With `resume`, the one an interrupted run with the same settings left (its
    finished stages, and the last state of the stage it was in); otherwise a fresh one, replacing any old."""
    path = folder / STATE_FILE
    if resume and path.exists():
        saved = torch.load(path, weights_only=True)
        if saved["settings"] != settings:
            raise TrainingError(f"{path} holds a run with other settings or data; train into another folder")
        in_progress = sorted(folder.glob(f"*-{STATE_FILE}"))
        saved["current"] = torch.load(in_progress[0], weights_only=True) if in_progress else None
        tqdm.write(f"resuming: finished stages {saved['finished'] or 'none'}"
                   + (f", {saved['current']['stage']} after epoch {len(saved['current']['history'])}"
                      if saved["current"] else ""))
        return saved
    if resume:
        tqdm.write(f"note: nothing to resume in {folder}; starting afresh")
    for stale in folder.glob(f"*{STATE_FILE}"):
        stale.unlink()
    saved = {"settings": settings, "finished": [], "stage_models": {}, "stage_history": {}, "current": None}
    _write_state(path, saved)
    return saved


def _record_finished_stage(folder: Path, saved: dict[str, Any], stage: str, model: RadiographNet,
                           history: list[dict[str, float]]) -> dict[str, Any]:
    saved = {
        **saved,
        "finished": [*saved["finished"], stage],
        "stage_models": {**saved["stage_models"], stage: model.state_dict()},
        "stage_history": {**saved["stage_history"], stage: history},
        "current": None,
    }
    _write_state(folder / STATE_FILE, saved)
    (folder / f"{stage}-{STATE_FILE}").unlink(missing_ok=True)
    return saved
