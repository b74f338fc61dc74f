"""The training loop: feeds that give batches (cached trunk features in `heads` mode, augmented images
otherwise), `run_stage` (epochs with validation, early stopping on the validation loss, the stage's state
written after every epoch) and `evaluate_feed`; and the trunk feature views of `heads` mode, cached on disk.

Every epoch draws its randomness (shuffling, views, augmentation, dropout) from a seed made of (seed, stage,
epoch) alone, so an epoch run after a resume is the same as in an uninterrupted run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cbmir.files import write_atomically_with
from cbmir.imaging.augment import augment
from cbmir.models import ModelOutput, RadiographNet
from cbmir.models.inference import images_to_tensor
from cbmir.prepared import PreparedImages, fingerprint
from cbmir.train.config import TrainConfig
from cbmir.train.objective import Objective
from cbmir.train.state import EpochRecord, write_state


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
    def forward(model: RadiographNet, x: torch.Tensor) -> ModelOutput:
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
    def forward(model: RadiographNet, x: torch.Tensor) -> ModelOutput:
        return model(x)


Feed = FeatureFeed | ImageFeed


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
    for x, rows in feed.validation_batches(batch_size):
        output = feed.forward(model, x)
        loss_sum += float(objective.loss(output, rows, train=False)) * len(rows)
        correct += objective.correct(output, rows)
        seen += len(rows)
    return loss_sum / max(seen, 1), correct / max(seen, 1)


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
        rng = np.random.default_rng(epoch_seed(config.seed, "views", view))
        for start in range(0, len(images), batch):
            chunk = np.asarray(images[start : start + batch])
            if view:
                chunk = np.stack([augment(image, rng, config.rotation) for image in chunk])
            features = model.trunk_features(images_to_tensor(chunk, device))
            result[view, start : start + len(chunk)] = features.float().cpu().numpy()
            progress.update(len(chunk))
    progress.close()
    return result


def cached_views(
    model: RadiographNet,
    part: PreparedImages,
    config: TrainConfig,
    cache: Path,
    device: torch.device,
    views: int,
    name: str,
) -> np.ndarray:
    """Trunk feature views of a part, cached on disk (written atomically): the trunk is frozen, so they never
    change for the same images, weights, views and augmentation."""
    settings = [json.dumps(model.config, sort_keys=True), str(config.pretrained), str(views), str(config.seed)]
    key = fingerprint([*settings, str(config.rotation)] + [r.id for r in part.records])[:16]
    path = cache / f"features-{key}.npy"
    if path.exists():
        return np.load(path)
    features = trunk_feature_views(model, part.images, views, config, device, f"trunk features ({name})")
    write_atomically_with(path, lambda file: np.save(file, features))
    return features
