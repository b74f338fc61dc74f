"""Training, checkpoints, the embedder and evaluation, on tiny synthetic phantoms (three IRMA codes)."""

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

import cbmir.train.loop as loop
from cbmir.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cbmir.datasets import Dataset, Record, load_pixels, open_dataset
from cbmir.embed import Embedder
from cbmir.irma import CodeTables
from cbmir.models import ModelError, create_model
from cbmir.models.inference import images_to_tensor
from cbmir.synthetic import write_synthetic_archive
from cbmir.train import STATE_FILE, TrainConfig, TrainingError, make_config, train
from cbmir.train.frozen import MIN_ONNX_VIEWS, TOLERANCE, FrozenPass
from cbmir.train.state import write_state
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return write_synthetic_archive(tmp_path_factory.mktemp("phantoms"), per_kind=8, longest_side=96, seed=1)


def small_cnn(**overrides) -> TrainConfig:
    """The 64-px chest CNN from scratch: fast enough for tests."""
    return make_config("chowdhury-chest", **{"epochs": 3, "batch_size": 8, **overrides})


@pytest.fixture(scope="module")
def trained(archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoint")
    return train(open_dataset(archive), small_cnn(), out), out


def test_training_writes_a_complete_checkpoint_folder(trained):
    checkpoint, out = trained
    for name in ("model.pt", "card.json", "split.json", "history.png", "test.json", "test.md", "test-confusion.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*training-state.pt"))
    card = json.loads((out / "card.json").read_text())
    assert card["architecture"]["name"] == "chest-cnn-chowdhury"
    assert card["labels"]["task"] == "irma-axes"
    assert card["preprocessing"]["size"] == 64 and card["preprocessing"]["padding"] == "none"
    assert len(card["training"]["data"]) == 64  # sha256 of the training records
    assert card["training"]["config"]["lr"] == 1e-3 and card["training"]["config"]["optimizer"] == "adam"
    assert {"torch", "numpy", "cbmir"} <= set(card["versions"])
    assert len(card["training"]["history"]) == 3
    assert set(card["metrics"]) == {"validation", "test"}
    split = json.loads((out / "split.json").read_text())
    assert sum(len(ids) for ids in split.values()) == 24


def test_a_checkpoint_reproduces_its_metrics_in_a_fresh_process(trained, archive, tmp_path):
    _, out = trained
    recorded = json.loads((out / "card.json").read_text())["metrics"]["test"]
    script = (
        "import json, sys; from pathlib import Path\n"
        "from cbmir.checkpoint import load_checkpoint; from cbmir.datasets import open_dataset\n"
        "from cbmir.evaluate import evaluate_dataset\n"
        "figures = evaluate_dataset(load_checkpoint(sys.argv[1]), open_dataset(sys.argv[2]), Path(sys.argv[3]),"
        " None, split='test')\n"
        "print(json.dumps(figures))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(out), str(archive), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    again = json.loads(result.stdout.strip().splitlines()[-1])
    assert again["images"] == recorded["images"]
    assert again["accuracy"] == pytest.approx(recorded["accuracy"])
    assert again["axis_accuracy"] == pytest.approx(recorded["axis_accuracy"])
    assert again["loss"] == pytest.approx(recorded["loss"], rel=1e-5)


def test_embedder_gives_unit_vectors_and_irma_predictions(trained, archive):
    _, out = trained
    embedder = Embedder(load_checkpoint(out), batch_size=4)
    pixels = [np.full((80, 60), value, np.uint8) for value in (10, 120, 250)]
    embeddings = embedder.embed(pixels)
    assert embeddings.vectors.shape == (3, embedder.dimension) and embeddings.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings.vectors, axis=1), 1.0, rtol=1e-5)
    assert all(
        len(p.label) == 16 and set(p.axes or ()) == {"technical", "directional", "anatomical", "biological"}
        for p in embeddings.predictions
    )


def test_an_interrupted_run_resumes_to_the_same_weights(archive, tmp_path, monkeypatch):
    config = small_cnn(epochs=4, patience=10)
    dataset = open_dataset(archive)
    reference = train(dataset, config, tmp_path / "whole").model.state_dict()

    real_evaluate_feed, calls = loop.evaluate_feed, []

    def killed_in_epoch_three(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_evaluate_feed(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate_feed", killed_in_epoch_three)
    with pytest.raises(KeyboardInterrupt):
        train(dataset, config, tmp_path / "interrupted")
    monkeypatch.setattr(loop, "evaluate_feed", real_evaluate_feed)
    resumed = train(dataset, config, tmp_path / "interrupted", resume=True)
    assert len(resumed.card["training"]["history"]) == 4
    for key, value in reference.items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, msg=key)


def test_resuming_with_other_settings_is_refused(archive, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "evaluate_feed", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train(open_dataset(archive), small_cnn(), tmp_path)
    monkeypatch.undo()
    with pytest.raises(TrainingError, match="other settings"):
        train(open_dataset(archive), small_cnn(lr=0.5), tmp_path, resume=True)


def test_heads_mode_trains_on_cached_features_of_the_pretrained_lite0(archive, tmp_path):
    config = make_config(mode="heads", epochs=3, views=2, embedding_dim=64, batch_size=8)
    checkpoint = train(open_dataset(archive), config, tmp_path)
    assert checkpoint.card["architecture"]["name"] == "efficientnet-lite0-regional"
    assert checkpoint.model.neck_dim == 64 and checkpoint.model.embedding_dim == 64 + 128  # the kept trunk
    assert checkpoint.card["embedding_dim"] == 192 and checkpoint.card["architecture"]["kept_trunk_dims"] == 128
    cached = [np.load(path)["features"] for path in (tmp_path / "cache").glob("features-*.npz")]
    assert sorted(len(views) for views in cached) == [1, 2]  # train views, validation
    # the kept projection: the principal components of the training images' plain trunk features (as
    # scikit-learn finds them, up to each component's sign)
    plain = next(views for views in cached if len(views) == 2)[0]
    model = load_checkpoint(tmp_path).model
    ours = (plain - model.trunk_mean.numpy()) @ model.trunk_components.numpy()
    theirs = PCA(n_components=min(len(plain), 128)).fit_transform(plain)
    used = min(len(plain) - 1, 128)  # centred features of n images span n - 1 directions
    np.testing.assert_allclose(np.abs(ours[:, :used]), np.abs(theirs[:, :used]), atol=1e-3)
    vectors = model.embed(torch.zeros(2, 3, model.input_size, model.input_size))
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(2))
    trunk = [name for name, _ in checkpoint.model.named_parameters() if name.startswith("trunk.")]
    loaded = load_checkpoint(tmp_path)
    pretrained = create_model(
        "efficientnet-lite0-regional", loaded.schema.head_sizes, pretrained=True, embedding_dim=64
    )
    for name in trunk[:5]:  # the frozen trunk is still the ImageNet one
        torch.testing.assert_close(loaded.model.get_parameter(name), pretrained.get_parameter(name))


def test_finetune_mode_trains_only_the_last_four_stages_of_the_default_trunk(archive, tmp_path):
    config = make_config(
        mode="finetune",
        finetune_blocks=4,
        epochs=2,
        finetune_epochs=1,
        views=1,
        embedding_dim=32,
        batch_size=8,
        input_size=64,
    )
    checkpoint = train(open_dataset(archive), config, tmp_path)
    stages = [row["stage"] for row in checkpoint.card["training"]["history"]]
    assert stages == ["heads", "heads", "finetune"]
    imagenet = create_model(
        "efficientnet-lite0-regional", checkpoint.schema.head_sizes, pretrained=True, embedding_dim=32, input_size=64
    )
    moved: dict[str, bool] = {}
    for name, value in imagenet.trunk.named_parameters():
        block = name.split(".")[1] if name.startswith("blocks.") else "stem"
        moved[block] = moved.get(block, False) or not torch.equal(checkpoint.model.trunk.get_parameter(name), value)
    assert moved == {"stem": False, "0": False, "1": False, "2": False, "3": True, "4": True, "5": True, "6": True}
    # Both stages trained on one cache of the frozen stages (the activations entering stage 3), none of images.
    assert [path.name.split("-")[0] for path in (tmp_path / "cache").glob("*.npz")] == ["stage", "stage"]
    # The kept projection is fitted on the fine-tuned trunk: the mean of its features of the training images.
    split = json.loads((tmp_path / "split.json").read_text())["train"]
    embedder = Embedder(load_checkpoint(tmp_path), runtime="torch")
    records = {record.id: record for record in open_dataset(archive).records}
    inputs = np.stack([embedder.prepare(load_pixels(records[image_id])) for image_id in split])
    with torch.inference_mode():
        features = checkpoint.model.trunk_features(images_to_tensor(inputs, torch.device("cpu")))
    torch.testing.assert_close(checkpoint.model.trunk_mean, features.mean(0), atol=1e-4, rtol=1e-4)


def test_multi_label_training_reports_roc_auc(archive, tmp_path):
    rows = [line.split(";") for line in (archive / "codes.csv").read_text().splitlines()[1:]]
    findings = {"1123-127-500-000": ("Effusion",), "1121-110-411-700": (), "1121-120-200-700": ("Effusion", "Mass")}
    records = [
        Record(image_id, archive / "images" / f"{image_id}.png", findings[code], "phantoms") for image_id, code in rows
    ]
    dataset = Dataset("phantoms", records, "multi-label", ("Effusion", "Mass"))
    checkpoint = train(dataset, small_cnn(), tmp_path)
    assert checkpoint.schema.task == "multi-label"
    report = json.loads((tmp_path / "test.json").read_text())
    assert set(report["findings"]["per_class"]) == {"Effusion", "Mass"}


@pytest.mark.parametrize("enough", [True, False])
def test_the_irma_threshold_is_chosen_on_enough_validation_images_with_the_code_tables(
    archive, tmp_path, monkeypatch, enough
):
    tables = CodeTables.load(shared_path("irma-code-tables"))
    if enough:
        monkeypatch.setattr("cbmir.evaluate.MIN_THRESHOLD_IMAGES", 1)
    checkpoint = train(open_dataset(archive), small_cnn(epochs=1, hierarchy_weight=0.5), tmp_path, tables=tables)
    assert checkpoint.card["training"]["config"]["hierarchy_weight"] == 0.5  # the tables weigh the wrong codes
    note = checkpoint.card["irma_threshold_note"]
    if enough:
        assert 0.0 <= checkpoint.card["irma_threshold"] < 1.0 and note.startswith("chosen on")
    else:  # the phantoms' few validation images
        assert checkpoint.card["irma_threshold"] == 0.0 and "too few to choose a threshold on" in note
    assert "mean_error_score" in checkpoint.card["metrics"]["test"]


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: make_config(model="vgg99"), ModelError, "unknown model 'vgg99'"),
        (lambda: make_config(recipe="fast"), TrainingError, "unknown recipe 'fast'"),
        (lambda: make_config(colour=True), TrainingError, "unknown training setting"),
        (lambda: make_config(mode="turbo"), TrainingError, "mode 'turbo'"),
        (lambda: make_config(lr=0), TrainingError, "lr must be positive"),
        (lambda: make_config(split=(0.5, 0.5, 0.5)), TrainingError, "split must be"),
        (lambda: make_config(model="chest-cnn-chowdhury"), TrainingError, "needs pretrained weights"),
        (lambda: make_config(hierarchy_weight=0.5), TrainingError, "hierarchy_weight needs .* no code tables"),
    ],
)
def test_bad_settings_fail_before_training(archive, tmp_path, make, error, message):
    with pytest.raises(error, match=message):
        train(open_dataset(archive), make(), tmp_path)
    assert not (tmp_path / "cache").exists()


def test_unusable_datasets_fail_before_training(archive, tmp_path):
    empty = Dataset("empty", [], "single-label", ())
    with pytest.raises(TrainingError, match="no usable records"):
        train(empty, small_cnn(), tmp_path)
    one_class = [Record(f"r{i}", archive / "images" / "x.png", ("normal",), "x") for i in range(10)]
    with pytest.raises(Exception, match="at least 2"):
        train(Dataset("one", one_class, "single-label", ("normal",)), small_cnn(task="single-label"), tmp_path)


def test_config_file_with_a_recipe_and_overrides(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"recipe": "tripathi-small", "epochs": 2}))
    config = TrainConfig.from_file(path, seed=7)
    assert (config.model, config.lr, config.batch_size, config.epochs, config.seed) == (
        "small-cnn-tripathi",
        1e-4,
        32,
        2,
        7,
    )
    path.write_text("[1, 2]")
    with pytest.raises(TrainingError, match="expected a JSON object"):
        TrainConfig.from_file(path)


def test_loading_a_broken_checkpoint_names_the_problem(trained, tmp_path):
    with pytest.raises(CheckpointError, match="card.json is missing"):
        load_checkpoint(tmp_path)
    _, out = trained
    (tmp_path / "card.json").write_text((out / "card.json").read_text())
    (tmp_path / "model.pt").write_bytes(b"not weights")
    checkpoint = load_checkpoint(tmp_path)  # the card is sound: the weights are read when the model is needed
    with pytest.raises(CheckpointError, match="model.pt: weights do not load"):
        _ = checkpoint.model


def test_a_failed_save_keeps_the_old_checkpoint_whole(trained, tmp_path, monkeypatch):
    checkpoint, out = trained
    for name in ("card.json", "model.pt"):
        (tmp_path / name).write_bytes((out / name).read_bytes())

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, checkpoint.model, {**checkpoint.card, "created": "later"})
    assert sorted(os.listdir(tmp_path)) == ["card.json", "model.pt"]  # no staging folder left
    assert load_checkpoint(tmp_path).card == json.loads((out / "card.json").read_text())


def test_a_failed_state_write_keeps_the_previous_state(tmp_path):
    path = tmp_path / STATE_FILE
    write_state(path, {"stage": "heads", "history": [1.0]})
    with pytest.raises(TypeError, match="cannot pickle"):
        write_state(path, {"stage": "heads", "history": [threading.Lock()]})
    assert torch.load(path, weights_only=True) == {"stage": "heads", "history": [1.0]}
    assert os.listdir(tmp_path) == [STATE_FILE]


@pytest.mark.parametrize("losses, epochs_run", [([3.0, 2.0, 1.0, 0.5], 4), ([1.0, 1.0, 1.0, 1.0], 3)])
def test_early_stopping_waits_patience_epochs_without_improvement(archive, tmp_path, monkeypatch, losses, epochs_run):
    scripted = iter(losses)
    monkeypatch.setattr(loop, "evaluate_feed", lambda *args, **kwargs: (next(scripted), 0.5))
    checkpoint = train(open_dataset(archive), small_cnn(epochs=4, patience=1), tmp_path)
    assert len(checkpoint.card["training"]["history"]) == epochs_run


@pytest.fixture(scope="module")
def lite0_64():
    return create_model("efficientnet-lite0-regional", {"label": 2}, pretrained=True, embedding_dim=32, input_size=64)


def test_the_frozen_pass_runs_in_onnx_runtime_and_gives_torchs_numbers(lite0_64):
    stage = 2  # the stem and two stages frozen: a quicker export than the default's six
    frozen = FrozenPass(lite0_64, stage, torch.device("cpu"), views=MIN_ONNX_VIEWS, batch=16)
    images = np.random.default_rng(0).integers(0, 256, (37, 64, 64, 3), dtype=np.uint8)
    first = frozen(images[:16])  # torch's answer, and the graph checked against it
    assert frozen.runtime == "ONNX Runtime"
    in_torch = FrozenPass(lite0_64, stage, torch.device("cpu"), views=MIN_ONNX_VIEWS - 1, batch=16)
    for chunk in (images[:16], images[16:32], images[32:]):  # the last one short of the graph's fixed batch
        ours, theirs = frozen(chunk), in_torch(chunk)
        assert in_torch.runtime == "torch" and [part.shape[0] for part in ours] == [len(chunk)] * 2
        for got, expected in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(got, expected, atol=TOLERANCE * np.abs(expected).max(initial=1.0))
    np.testing.assert_array_equal(first[0], in_torch(images[:16])[0])


def test_a_frozen_graph_that_does_not_match_torch_is_not_used(lite0_64, monkeypatch, capsys):
    monkeypatch.setattr("cbmir.train.frozen.TOLERANCE", 0.0)  # ONNX Runtime sums in another order: ~1e-6 apart
    frozen = FrozenPass(lite0_64, 1, torch.device("cpu"), views=MIN_ONNX_VIEWS, batch=16)
    images = np.random.default_rng(1).integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)
    frozen(images)
    assert frozen.runtime == "torch" and "its ONNX graph does not match torch" in capsys.readouterr().out
