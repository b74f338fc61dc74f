"""The training loop: feeds that give batches (cached trunk features for the heads stage, cached activations of
the frozen early stages when fine-tuning a trunk that runs in parts, augmented images otherwise), `run_stage`
(epochs with validation, early stopping on the validation loss, the stage's state written after every epoch)
and `evaluate_feed`; and those cached views, written to disk atomically.

Every epoch draws its randomness (shuffling, views, augmentation, dropout) from a seed made of (seed, stage,
epoch) alone, so an epoch run after a resume is the same as in an uninterrupted run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm import tqdm

from cbmir.files import write_atomically_with
from cbmir.imaging.augment import augment
from cbmir.models import ModelOutput, RadiographNet
from cbmir.models.inference import images_to_tensor
from cbmir.prepared import PreparedImages, fingerprint
from cbmir.train.config import TrainConfig
from cbmir.train.frozen import FrozenPass
from cbmir.train.objective import Objective
from cbmir.train.state import EpochRecord, write_state

Batch = tuple[torch.Tensor, ...]


class FeatureFeed:
    """The heads stage: cached trunk features, views x N x D for training (one random view per sample and epoch)
    and N x D for validation; the model runs only its neck and heads."""

    def __init__(self, train_views: np.ndarray, validation: np.ndarray):
        self.train_views, self.validation = torch.from_numpy(train_views), torch.from_numpy(validation)

    def train_batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[tuple[Batch, np.ndarray]]:
        view_count, count = self.train_views.shape[:2]
        for views, rows in _random_views(rng, view_count, count, batch_size):
            yield (self.train_views[views, rows],), rows

    def validation_batches(self, batch_size: int) -> Iterator[tuple[Batch, np.ndarray]]:
        for rows in _row_chunks(len(self.validation), batch_size):
            yield (self.validation[rows],), rows

    @staticmethod
    def forward(model: RadiographNet, batch: Batch) -> ModelOutput:
        return model.head_forward(batch[0])


class StageFeed:
    """`finetune` mode on a trunk that runs in parts (`RadiographNet.cached_stage`): cached views of what its
    frozen early stages give (`StageViews`), one random view per sample and epoch for training and the plain
    view for validation; the model runs its trained stages, neck and heads."""

    def __init__(self, stage: int, train: StageViews, validation: StageViews):
        self.stage, self.train, self.validation = stage, train, validation

    def train_batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[tuple[Batch, np.ndarray]]:
        view_count, count = self.train.activations.shape[:2]
        for views, rows in _random_views(rng, view_count, count, batch_size):
            yield self.train.batch(views, rows), rows

    def validation_batches(self, batch_size: int) -> Iterator[tuple[Batch, np.ndarray]]:
        for rows in _row_chunks(self.validation.activations.shape[1], batch_size):
            yield self.validation.batch(np.zeros(len(rows), np.int64), rows), rows

    def forward(self, model: RadiographNet, batch: Batch) -> ModelOutput:
        return model.head_forward(model.trunk_finish(batch[0], batch[1], self.stage))


class ImageFeed:
    """`full` mode, and `finetune` on other trunks: preprocessed images, augmented afresh each epoch for
    training."""

    def __init__(self, train: np.ndarray, validation: np.ndarray, rotation: float, device: torch.device):
        self.train, self.validation, self.rotation, self.device = train, validation, rotation, device

    def train_batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[tuple[Batch, np.ndarray]]:
        order = rng.permutation(len(self.train))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            images = np.stack([augment(self.train[row], rng, self.rotation) for row in rows])
            yield (images_to_tensor(images, self.device),), rows

    def validation_batches(self, batch_size: int) -> Iterator[tuple[Batch, np.ndarray]]:
        for rows in _row_chunks(len(self.validation), batch_size):
            yield (images_to_tensor(self.validation[rows], self.device),), rows

    @staticmethod
    def forward(model: RadiographNet, batch: Batch) -> ModelOutput:
        return model(batch[0])


Feed = FeatureFeed | StageFeed | ImageFeed


def _random_views(
    rng: np.random.Generator, view_count: int, count: int, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(views, rows) in batches: every sample once in a random order, each with one random cached view."""
    order = rng.permutation(count)
    views = rng.integers(0, view_count, size=count)
    for start in range(0, count, batch_size):
        yield views[start : start + batch_size], order[start : start + batch_size]


def _row_chunks(count: int, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, count, batch_size):
        yield np.arange(start, min(start + batch_size, count))


def make_optimizer(parameters: Iterable[torch.nn.Parameter], config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    trainable = [p for p in parameters if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(trainable, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=config.weight_decay)


def epoch_seed(seed: int, stage: str, epoch: int) -> int:
    """The seed of one epoch of one stage (or of one feature view, with stage "views")."""
    return int(fingerprint([str(seed), stage, str(epoch)])[:8], 16)


@dataclass
class StageResult:
    history: list[EpochRecord]
    best_loss: float


def run_stage(
    stage: str,
    model: RadiographNet,
    feed: Feed,
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
    optimizer = make_optimizer(model.parameters(), config, lr)
    decay = config.lr_decay
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + decay * step))
    history: list[EpochRecord] = []
    best_loss, best_state, stale, first = float("inf"), None, 0, 0
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        history, best_loss, best_state, stale = (
            saved["history"],
            saved["best_loss"],
            saved["best_state"],
            saved["stale"],
        )
        first = len(history)
    for epoch in range(first, epochs):
        if stale > config.patience:
            break
        seed = epoch_seed(config.seed, stage, epoch)
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        model.train()
        loss_sum = correct = seen = 0.0
        batches = tqdm(
            feed.train_batches(rng, config.batch_size),
            desc=f"{stage} {epoch + 1}/{epochs}",
            total=-(-len(objective.groups) // config.batch_size),
            unit="batch",
            leave=False,
        )
        for batch, rows in batches:
            output = feed.forward(model, batch)
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
        record: EpochRecord = {
            "stage": stage,
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_accuracy": correct / seen,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
        }
        history.append(record)
        tqdm.write(
            f"{stage} epoch {epoch + 1}: train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.3f}"
            f" | val loss {val_loss:.4f} acc {val_accuracy:.3f}"
        )
        if best_state is None or best_loss - val_loss > max(1e-4, 1e-3 * best_loss):  # not just rounding noise
            best_loss, stale = val_loss, 0
            best_state = {key: value.detach().clone() for key, value in model.state_dict().items()}
        else:
            stale += 1
        write_state(
            state_path,
            {
                "stage": stage,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": history,
                "best_loss": best_loss,
                "best_state": best_state,
                "stale": stale,
            },
        )
    if best_state is not None:
        model.load_state_dict(best_state)
    return StageResult(history, best_loss)


@torch.inference_mode()
def evaluate_feed(model: RadiographNet, feed: Feed, objective: Objective, batch_size: int) -> tuple[float, float]:
    """The mean loss and accuracy of the model on the feed's validation batches."""
    model.eval()
    loss_sum = correct = seen = 0.0
    for batch, rows in feed.validation_batches(batch_size):
        output = feed.forward(model, batch)
        loss_sum += float(objective.loss(output, rows, train=False)) * len(rows)
        correct += objective.correct(output, rows)
        seen += len(rows)
    return loss_sum / max(seen, 1), correct / max(seen, 1)


VIEW_BATCH = 16


def _view_chunks(
    images: np.ndarray, views: int, config: TrainConfig, desc: str
) -> Iterator[tuple[int, slice, np.ndarray]]:
    """(view, rows, prepared images) in chunks of `VIEW_BATCH`: view 0 plain, the others seeded augmentations."""
    progress = tqdm(total=views * len(images), desc=desc, unit="img")
    for view in range(views):
        rng = np.random.default_rng(epoch_seed(config.seed, "views", view))
        for start in range(0, len(images), VIEW_BATCH):
            chunk = np.asarray(images[start : start + VIEW_BATCH])
            if view:
                chunk = np.stack([augment(image, rng, config.rotation) for image in chunk])
            yield view, slice(start, start + len(chunk)), chunk
            progress.update(len(chunk))
    progress.close()


def trunk_feature_views(
    model: RadiographNet, images: np.ndarray, views: int, config: TrainConfig, device: torch.device, desc: str
) -> np.ndarray:
    """views x N x D trunk features: view 0 of the plain images, the others of seeded augmentations."""
    model.eval()
    frozen = FrozenPass(model, None, device, views * len(images), VIEW_BATCH)
    result = np.zeros((views, len(images), model.trunk_dim), np.float32)
    for view, rows, chunk in _view_chunks(images, views, config, desc):
        (result[view, rows],) = frozen(chunk)
    return result


@dataclass
class StageViews:
    """What the frozen stages before a trunk stage give for views x N images (`RadiographNet.trunk_start`):
    the activations entering the stage (float16, to halve the memory) and the pooled descriptors of the
    stages before it."""

    activations: np.ndarray
    pooled: np.ndarray

    def batch(self, views: np.ndarray, rows: np.ndarray) -> Batch:
        return torch.from_numpy(self.activations[views, rows]).float(), torch.from_numpy(self.pooled[views, rows])


def stage_views(
    model: RadiographNet,
    images: np.ndarray,
    views: int,
    stage: int,
    config: TrainConfig,
    device: torch.device,
    desc: str,
) -> StageViews:
    """`StageViews` of the images entering trunk stage `stage`: view 0 plain, the others seeded augmentations."""
    model.eval()
    frozen = FrozenPass(model, stage, device, views * len(images), VIEW_BATCH)
    activations: np.ndarray | None = None
    pooled: np.ndarray | None = None
    for view, rows, chunk in _view_chunks(images, views, config, desc):
        activation, descriptors = frozen(chunk)
        if activations is None or pooled is None:
            activations = np.zeros((views, len(images), *activation.shape[1:]), np.float16)
            pooled = np.zeros((views, len(images), descriptors.shape[1]), np.float32)
        activations[view, rows] = activation
        pooled[view, rows] = descriptors
    assert activations is not None and pooled is not None, "no images"
    return StageViews(activations, pooled)


@torch.inference_mode()
def features_from_stage(model: RadiographNet, views: StageViews, stage: int) -> np.ndarray:
    """views x N x D trunk features, from the `StageViews` taken at `stage` by the trunk as it is now."""
    model.eval()
    count, size = views.activations.shape[:2]
    result = np.zeros((count, size, model.trunk_dim), np.float32)
    for view in range(count):
        for rows in _row_chunks(size, 64):
            activation, pooled = views.batch(np.full(len(rows), view), rows)
            result[view, rows] = model.trunk_finish(activation, pooled, stage).float().cpu().numpy()
    return result


@dataclass(frozen=True)
class ViewCache:
    """Cached views of a model's frozen trunk in a folder, written atomically and named by everything they
    depend on (the trunk is frozen where they are taken, so they never change for the same images, weights,
    views and augmentation)."""

    model: RadiographNet
    config: TrainConfig
    folder: Path
    device: torch.device

    def features(self, part: PreparedImages, views: int, name: str) -> np.ndarray:
        """`trunk_feature_views` of a part."""
        arrays = self._cached(
            part,
            f"features {views}",
            lambda: {
                "features": trunk_feature_views(
                    self.model, part.images, views, self.config, self.device, f"trunk features ({name})"
                )
            },
        )
        return arrays["features"]

    def stages(self, part: PreparedImages, views: int, stage: int, name: str) -> StageViews:
        """`stage_views` of a part, entering trunk stage `stage`."""

        def compute() -> dict[str, np.ndarray]:
            desc = f"frozen trunk stages ({name})"
            result = stage_views(self.model, part.images, views, stage, self.config, self.device, desc)
            return {"activations": result.activations, "pooled": result.pooled}

        arrays = self._cached(part, f"stage {stage} {views}", compute)
        return StageViews(arrays["activations"], arrays["pooled"])

    def _cached(
        self, part: PreparedImages, what: str, compute: Callable[[], dict[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        config = self.config
        settings = [json.dumps(self.model.config, sort_keys=True), str(config.pretrained), what, str(config.seed)]
        key = fingerprint([*settings, str(config.rotation)] + [r.id for r in part.records])[:16]
        path = self.folder / f"{what.split()[0]}-{key}.npz"
        if path.exists():
            with np.load(path) as saved:
                return {name: saved[name] for name in saved.files}
        arrays = compute()
        write_atomically_with(path, lambda file: np.savez(file, **cast(dict[str, Any], arrays)))
        return arrays
