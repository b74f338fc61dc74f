"""A whole training run: data, model, the stages of its mode, evaluation and the checkpoint folder.

The run writes its resume state (`cbmir.train.state`) into the output folder as it goes and removes it
only after the checkpoint, the split and the plots are written; a run interrupted at any point and started
again with `resume` continues after its last finished epoch and ends with the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cbmir.checkpoint import Checkpoint, new_card, save_checkpoint
from cbmir.datasets import Dataset
from cbmir.evaluate import choose_irma_threshold, evaluate_images
from cbmir.export import export_graph
from cbmir.files import write_atomically
from cbmir.graph import GraphError
from cbmir.imaging.preprocess import preset
from cbmir.irma import CodeTables
from cbmir.labels import LabelSchema
from cbmir.metrics import plot_history
from cbmir.models import RadiographNet, create_model, model_info
from cbmir.models.inference import default_device
from cbmir.prepared import PreparedImages, prepare_images
from cbmir.train.config import TrainConfig, TrainingError
from cbmir.train.data import check_parts, choose_task, datafingerprint, split_records
from cbmir.train.loop import (
    FeatureFeed,
    Feed,
    ImageFeed,
    StageFeed,
    StageViews,
    ViewCache,
    features_from_stage,
    run_stage,
    trunk_feature_views,
)
from cbmir.train.objective import Objective, axis_costs
from cbmir.train.state import STATE_FILE, EpochRecord, record_finished_stage, start_state


def build_model(config: TrainConfig, schema: LabelSchema) -> RadiographNet:
    """The model the config names, with heads for the schema and its trunk's starting weights; a
    `TrainingError` when the options do not fit the data or `heads`/`finetune` mode has no pretrained trunk."""
    options = dict(config.model_options)
    if config.input_size is not None:
        options["input_size"] = config.input_size
    if isinstance(options.get("healthy_class"), str):
        classes = schema.heads.get("label", ())
        if options["healthy_class"] not in classes:
            raise TrainingError(
                f"healthy_class {options['healthy_class']!r} is not a class of the data {list(classes)}"
            )
        options["healthy_class"] = classes.index(options["healthy_class"])
    info = model_info(config.model)
    pretrained: bool | str
    if config.pretrained == "packaged":
        pretrained = info.pretrained is not None
        if not pretrained:
            tqdm.write(f"note: {config.model} has no packaged pretrained weights; its trunk starts from random init")
    elif config.pretrained == "none":
        pretrained = False
    else:
        pretrained = config.pretrained
    if config.mode in ("heads", "finetune") and not pretrained:
        raise TrainingError(
            f"mode {config.mode!r} starts by training the heads on a frozen trunk, which needs pretrained weights: "
            f"{config.model} has none here; use mode 'full' or give pretrained=PATH"
        )
    return create_model(
        config.model,
        schema.head_sizes,
        pretrained=pretrained,
        embedding_dim=config.embedding_dim,
        kept_trunk_dims=config.kept_trunk_dims,
        **options,
    )


def train(
    dataset: Dataset, config: TrainConfig, out: Path, *, resume: bool = False, tables: CodeTables | None = None
) -> Checkpoint:
    """Train on `dataset` and write a checkpoint folder to `out` (model, card, split, plots, evaluation).

    With `resume`, a training state left in `out` by an interrupted run with the same settings continues after
    its last finished epoch. `tables` (IRMA code tables) lets the per-axis model choose its `*` threshold on
    the validation part by the ImageCLEF error score; without them it never stops early. Uses torch's
    process-wide thread count as the program set it.
    """
    out = Path(out)
    started = time.time()
    torch.manual_seed(config.seed)
    if not dataset.records:
        raise TrainingError(f"dataset {dataset.name} has no usable records")
    task = choose_task(dataset.records) if config.task == "auto" else config.task
    schema = LabelSchema.from_labels(task, [record.labels for record in dataset.records])
    if config.hierarchy_weight > 0 and (task != "irma-axes" or tables is None):
        raise TrainingError(
            "hierarchy_weight needs IRMA-coded data and the IRMA code tables (--tables or $CBMIR_IRMA_TABLES), "
            f"to weigh each wrong code by its error score; this run has {task} labels"
            + ("" if tables is not None else " and no code tables")
        )
    parts = split_records(dataset, config)
    check_parts(parts, schema)
    model = build_model(config, schema)
    pipeline = preset(config.preset, size=model.input_size)
    device = default_device()
    model.to(device).to(memory_format=torch.channels_last)

    out.mkdir(parents=True, exist_ok=True)
    settings = {"config": dataclasses.asdict(config), "task": task, "data": datafingerprint(parts["train"])}
    saved = start_state(out, settings, resume)
    cache = out / "cache"
    prepared = {name: prepare_images(records, pipeline, cache, f"preprocess {name}") for name, records in parts.items()}
    failures = [failure for part in prepared.values() for failure in part.failures]
    for failure in failures:
        tqdm.write(f"skipped: {failure}")
    train_part, val_part = prepared["train"], prepared["validation"]
    group_ids: dict[str, int] = {}
    costs = axis_costs(schema, tables) if config.hierarchy_weight > 0 and tables is not None else None

    def objective_for(part: PreparedImages) -> Objective:
        labels = [record.labels for record in part.records]
        groups = np.array([group_ids.setdefault("|".join(lab), len(group_ids)) for lab in labels], np.int64)
        return Objective(schema, schema.targets(labels), groups, config, costs)

    train_objective, val_objective = objective_for(train_part), objective_for(val_part)
    history: list[EpochRecord] = []
    stages = ["heads"] if config.mode in ("heads", "finetune") else []
    stages += ["finetune"] if config.mode == "finetune" else ["full"] if config.mode == "full" else []
    views = ViewCache(model, config, cache, device)
    # Fine-tuning a trunk that runs in parts: both stages train on one cache of its frozen early stages.
    first = model.cached_stage(config.finetune_blocks) if config.mode == "finetune" else None
    staged = None
    if first is not None:
        train_stages = views.stages(train_part, config.views, first, "train")
        staged = StageFeed(first, train_stages, views.stages(val_part, 1, first, "validation"))
    for stage in stages:
        if stage in saved["finished"]:
            model.load_state_dict(saved["stage_models"][stage])
            history += saved["stage_history"][stage]
            continue
        feed: Feed
        if stage == "heads":
            model.set_trainable(0)
            if staged is not None:
                train_views = features_from_stage(model, staged.train, staged.stage)
                val_views = features_from_stage(model, staged.validation, staged.stage)
            else:
                train_views = views.features(train_part, config.views, "train")
                val_views = views.features(val_part, 1, "validation")
            feed = FeatureFeed(train_views, val_views[0])
            epochs, lr = config.epochs, config.lr
        elif stage == "finetune":
            model.set_trainable(config.finetune_blocks)
            if staged is not None:
                feed = staged
            else:
                feed = ImageFeed(train_part.images, val_part.images, config.rotation, device)
            epochs, lr = config.finetune_epochs, config.finetune_lr
        else:
            model.set_trainable(-1)
            feed = ImageFeed(train_part.images, val_part.images, config.rotation, device)
            epochs, lr = config.epochs, config.lr
        current = saved["current"]
        stage_state = current if current is not None and current["stage"] == stage else None
        result = run_stage(
            stage,
            model,
            feed,
            train_objective,
            val_objective,
            config,
            epochs=epochs,
            lr=lr,
            state_path=out / f"{stage}-{STATE_FILE}",
            saved=stage_state,
        )
        history += result.history
        saved = record_finished_stage(out, saved, stage, model, result.history)
    model.eval()
    if model.kept_trunk_dims:
        model.fit_kept_trunk(final_trunk_features(model, train_part, views, staged))

    checkpoint = Checkpoint(model, new_card(model, schema, pipeline), out)
    if schema.task == "irma-axes":
        threshold, note = choose_irma_threshold(checkpoint, val_part, tables)
        checkpoint.card["irma_threshold"] = threshold
        checkpoint.card["irma_threshold_note"] = note
    metrics = {
        name: evaluate_images(checkpoint, part, tables, out, name)
        for name, part in prepared.items()
        if part.records and name != "train"
    }
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
    export_for_inference(checkpoint, prepared)
    split = {name: [r.id for r in part.records] for name, part in prepared.items()}
    write_atomically(out / "split.json", json.dumps(split).encode())
    plot_history([{**entry, "epoch": number} for number, entry in enumerate(history, 1)], out / "history.png")
    (out / STATE_FILE).unlink()
    return checkpoint


def final_trunk_features(
    model: RadiographNet, part: PreparedImages, views: ViewCache, staged: StageFeed | None
) -> np.ndarray:
    """The trunk's pooled features of the part's images as trained (unaugmented): in `heads` mode the cached
    plain view, the trunk never having changed; from the plain view of the `staged` cache of the part where
    the late stages were fine-tuned on it; else computed now."""
    if views.config.mode == "heads":
        return views.features(part, views.config.views, "train")[0]
    if staged is not None:
        plain = StageViews(staged.train.activations[:1], staged.train.pooled[:1])
        return features_from_stage(model, plain, staged.stage)[0]
    return trunk_feature_views(model, part.images, 1, views.config, views.device, "trunk features (trained)")[0]


# Real images the exported graph is checked on against torch.
EXPORT_CHECK_IMAGES = 16


def export_for_inference(checkpoint: Checkpoint, prepared: dict[str, PreparedImages]) -> None:
    """Write the checkpoint's ONNX graph for inference (`cbmir.export`), checked on up to
    `EXPORT_CHECK_IMAGES` of its own validation (else test, else training) images. A model the exporter
    cannot handle, or whose graph does not match torch, keeps torch as its runtime, with a note."""
    part_name = next(
        name for name in ("validation", "test", "train") if name in prepared and len(prepared[name].images)
    )
    samples = np.asarray(prepared[part_name].images[:EXPORT_CHECK_IMAGES])
    try:
        export_graph(checkpoint, samples, described=f"{part_name} images of {checkpoint.card['training']['dataset']}")
    except GraphError as error:
        tqdm.write(f"note: no ONNX graph, this model runs in torch: {error}")
