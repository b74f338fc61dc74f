"""The resume state of a training run, kept in its output folder until the run ends.

`STATE_FILE` holds the run's progress record: its settings (config, task, data fingerprint), the stages it
has finished with their weights and history. ``{stage}-{STATE_FILE}`` holds the whole state of the stage in
progress after its last finished epoch (model, optimizer, scheduler, history, best weights, patience count).
Both are written atomically and fsynced before the rename (`cbmir.files`), so after a crash either file is its
previous or its next whole version, never a torn one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict

import torch
from tqdm import tqdm

from cbmir.files import write_atomically_with
from cbmir.models import RadiographNet
from cbmir.train.config import TrainingError

STATE_FILE = "training-state.pt"


class EpochRecord(TypedDict):
    """One finished epoch in a stage's history (`epoch` counts from 1 within the stage)."""

    stage: str
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Write a training state (tensors and plain data, loadable with ``weights_only=True``) atomically."""
    write_atomically_with(path, lambda file: torch.save(state, file))


def start_state(folder: Path, settings: dict[str, Any], resume: bool) -> dict[str, Any]:
    """The run's progress record. With `resume`, the one an interrupted run with the same settings left (its
    finished stages, and the last state of the stage it was in); otherwise a fresh one, replacing any old."""
    path = folder / STATE_FILE
    if resume and path.exists():
        saved = torch.load(path, weights_only=True)
        if saved["settings"] != settings:
            raise TrainingError(f"{path} holds a run with other settings or data; train into another folder")
        in_progress = sorted(folder.glob(f"*-{STATE_FILE}"))
        saved["current"] = torch.load(in_progress[0], weights_only=True) if in_progress else None
        current = saved["current"]
        progress = f", {current['stage']} after epoch {len(current['history'])}" if current else ""
        tqdm.write(f"resuming: finished stages {saved['finished'] or 'none'}{progress}")
        return saved
    if resume:
        tqdm.write(f"note: nothing to resume in {folder}; starting afresh")
    for stale in folder.glob(f"*{STATE_FILE}"):
        stale.unlink()
    saved = {"settings": settings, "finished": [], "stage_models": {}, "stage_history": {}, "current": None}
    write_state(path, saved)
    return saved


def record_finished_stage(
    folder: Path, saved: dict[str, Any], stage: str, model: RadiographNet, history: list[EpochRecord]
) -> dict[str, Any]:
    """The progress record with `stage` finished (its final weights and history), written to `folder`; the
    stage's own in-progress state is removed after that."""
    saved = {
        **saved,
        "finished": [*saved["finished"], stage],
        "stage_models": {**saved["stage_models"], stage: model.state_dict()},
        "stage_history": {**saved["stage_history"], stage: history},
        "current": None,
    }
    write_state(folder / STATE_FILE, saved)
    (folder / f"{stage}-{STATE_FILE}").unlink(missing_ok=True)
    return saved
