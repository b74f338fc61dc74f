"""Training a radiograph model on this kind of machine: 2 CPU cores, no GPU.

Three modes:
- `heads` (the default): the pretrained trunk stays frozen; its features are computed once per image for a
  few augmented views and cached on disk, then the neck (the embedding layer) and the heads train on those
  features in seconds per epoch.
- `finetune`: `heads` first, then the last `finetune_blocks` trunk blocks train too, at a lower rate. On a trunk
  that runs in parts (the default's, `cbmir.models.net.StagedTrunk`) both stages train on one cache of what its
  frozen early stages give for the same augmented views, so fine-tuning costs the trained stages alone; other
  trunks fine-tune on images, augmented afresh each epoch.
- `full`: everything trains on images from the first epoch (the papers' from-scratch recipes; slow on CPU).

Each epoch validates; training stops early when the validation loss has not improved for `patience` epochs and
keeps the best weights. Every epoch of a stage is seeded from (seed, stage, epoch), so a run resumed from its
training state after an interruption ends with the same weights as an uninterrupted one.

The modules: `config` (`TrainConfig`, `RECIPES`, `make_config`), `data` (task, split and checks of the
records), `objective` (losses and scores), `loop` (feeds, `run_stage`, `evaluate_feed`, cached trunk
features), `state` (the resume state in the output folder) and `run` (`train`, a whole run). Image
augmentation is `cbmir.imaging.augment`. torch's thread count is the program's to set, never set here.
"""

from cbmir.train.config import (
    BALANCING,
    MODES,
    OPTIMIZERS,
    RECIPES,
    ClassBalance,
    Mode,
    Optimizer,
    TaskChoice,
    TrainConfig,
    TrainingError,
    make_config,
)
from cbmir.train.data import choose_task, split_records
from cbmir.train.run import train
from cbmir.train.state import STATE_FILE

__all__ = [
    "BALANCING",
    "MODES",
    "OPTIMIZERS",
    "RECIPES",
    "STATE_FILE",
    "ClassBalance",
    "Mode",
    "Optimizer",
    "TaskChoice",
    "TrainConfig",
    "TrainingError",
    "choose_task",
    "make_config",
    "split_records",
    "train",
]
