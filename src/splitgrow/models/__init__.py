"""Registered reference models, built from a width list (deterministic given the torch seed).

Every model is an ordinary ``nn.Module`` whose splittable layers are exactly the ones its width
list sizes, in order, so a grown model is rebuilt from its architecture (:class:`Architecture`,
plain JSON) and its ``state_dict`` without pickle:

    arch = Architecture("cnn1d", [8, 8, 8, 8], "relu", in_shape=[1, 40], classes=10)
    model = arch.build()
    grown = split_neurons(model, plan, eps=0.1)
    again = arch.with_widths(widths_of(grown)).build()
    again.load_state_dict(grown.state_dict())
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn


class Gaussian(nn.Module):
    """The radial-basis activation exp(−z²) of the 1-D toy network."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.exp(-(x * x))


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gaussian": Gaussian,
}


def activation(name: str) -> nn.Module:
    """A new activation module by name (see :data:`ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


@dataclass(frozen=True)
class ModelSpec:
    """How to build a registered model and which of its layers the widths size."""

    build: Callable[[Sequence[int], str, Sequence[int], int], nn.Module]
    default_widths: tuple[int, ...]
    default_activation: str
    input_rank: int | None  # dimensions of one sample (1 features, 2 signal, 3 image); None: any
    width_count: int | None = None  # fixed number of widths, or None for any
    doc: str = ""


MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, spec: ModelSpec) -> None:
    """Add a model to the registry (tests are parametrised over it)."""
    MODELS[name] = spec


@dataclass(frozen=True)
class Architecture:
    """Everything needed to rebuild a model: JSON-serialisable, no pickle.

    Attributes:
        model: registered model name.
        widths: the width of each sized layer, in order.
        activation: activation name.
        in_shape: the shape of one input sample (no batch dimension).
        classes: number of outputs.
    """

    model: str
    widths: list[int] = field(default_factory=list)
    activation: str = "relu"
    in_shape: list[int] = field(default_factory=list)
    classes: int = 10

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose from {', '.join(MODELS)}")
        spec = MODELS[self.model]
        if not self.widths or any(not isinstance(w, int) or w < 1 for w in self.widths):
            raise ValueError(f"widths must be positive integers, got {self.widths!r}")
        if spec.width_count is not None and len(self.widths) != spec.width_count:
            raise ValueError(
                f"model {self.model!r} takes {spec.width_count} widths, got {len(self.widths)}"
            )
        if not self.in_shape or any(not isinstance(s, int) or s < 1 for s in self.in_shape):
            raise ValueError(f"in_shape must be positive integers, got {self.in_shape!r}")
        if spec.input_rank is not None and len(self.in_shape) != spec.input_rank:
            raise ValueError(
                f"model {self.model!r} takes samples of rank {spec.input_rank}, "
                f"got shape {self.in_shape}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; choose from {', '.join(ACTIVATIONS)}"
            )
        if not isinstance(self.classes, int) or self.classes < 1:
            raise ValueError(f"classes must be a positive integer, got {self.classes!r}")

    def build(self) -> nn.Module:
        """A freshly initialised model of this architecture."""
        spec = MODELS[self.model]
        return spec.build(self.widths, self.activation, self.in_shape, self.classes)

    def with_widths(self, widths: Sequence[int]) -> Architecture:
        return replace(self, widths=[int(w) for w in widths])

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: object) -> Architecture:
        """Rebuild from :meth:`to_json`'s dict, refusing anything else with a clear error."""
        if not isinstance(data, dict):
            raise ValueError("architecture must be a JSON object")
        keys = {"model", "widths", "activation", "in_shape", "classes"}
        if set(data) != keys:
            raise ValueError(f"architecture must have exactly the keys {sorted(keys)}")
        return Architecture(
            model=data["model"],
            widths=list(data["widths"]),
            activation=data["activation"],
            in_shape=list(data["in_shape"]),
            classes=data["classes"],
        )


def sized_layers(model: nn.Module) -> list[nn.Module]:
    """The layers the width list sizes, in order (each model marks them ``sized``)."""
    return [m for m in model.modules() if getattr(m, "splitgrow_sized", False)]


def widths_of(model: nn.Module) -> list[int]:
    """The current widths of a (possibly grown) registered model."""
    out = []
    for m in sized_layers(model):
        weight = m.weight
        assert isinstance(weight, Tensor)
        out.append(int(weight.shape[0]))
    return out


def _sized(layer: nn.Module) -> nn.Module:
    layer.splitgrow_sized = True  # type: ignore[assignment]
    return layer


# ------------------------------------------------------------------------------------------
# The models.


def _mlp_layers(
    widths: Sequence[int], act: str, in_shape: Sequence[int], classes: int
) -> list[nn.Module]:
    layers: list[nn.Module] = []
    fan_in = in_shape[0]
    for w in widths:
        layers += [_sized(nn.Linear(fan_in, w)), activation(act)]
        fan_in = w
    layers.append(nn.Linear(fan_in, classes))
    return layers


def _mlp(widths: Sequence[int], act: str, in_shape: Sequence[int], classes: int) -> nn.Module:
    return nn.Sequential(*_mlp_layers(widths, act, in_shape, classes))


def _flat_mlp(widths: Sequence[int], act: str, in_shape: Sequence[int], classes: int) -> nn.Module:
    n = 1
    for s in in_shape:
        n *= s
    return nn.Sequential(nn.Flatten(), *_mlp_layers(widths, act, [n], classes))


class CNN1d(nn.Module):
    """Conv1d(k=5, no bias) → BN → act per width, stride 2 at layers 2 and 4; GAP; Linear."""

    def __init__(self, widths: Sequence[int], act: str, in_shape: Sequence[int], classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_shape[0]
        for i, w in enumerate(widths):
            stride = 2 if i in (1, 3) else 1
            conv = nn.Conv1d(c, w, 5, stride=stride, padding=2, bias=False)
            layers += [_sized(conv), nn.BatchNorm1d(w), activation(act)]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(2))


class CNN(nn.Module):
    """VGG-style: pairs of conv3×3 → BN → act, a 2×2 max-pool after each pair; GAP; Linear."""

    def __init__(self, widths: Sequence[int], act: str, in_shape: Sequence[int], classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_shape[0]
        for i, w in enumerate(widths):
            layers += [_sized(nn.Conv2d(c, w, 3, padding=1, bias=False)), nn.BatchNorm2d(w)]
            layers.append(activation(act))
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


class MobileNetV1(nn.Module):
    """CIFAR MobileNetV1: conv3×3 stem, then depthwise-separable blocks (depthwise 3×3 → BN →
    act → pointwise 1×1 → BN → act); stride 2 at the 2nd, 4th and 6th blocks; GAP; Linear.
    ``widths[0]`` is the stem, ``widths[i]`` the i-th block's pointwise width."""

    def __init__(self, widths: Sequence[int], act: str, in_shape: Sequence[int], classes: int):
        super().__init__()
        c = widths[0]
        layers: list[nn.Module] = [
            _sized(nn.Conv2d(in_shape[0], c, 3, padding=1, bias=False)),
            nn.BatchNorm2d(c),
            activation(act),
        ]
        for i, w in enumerate(widths[1:]):
            stride = 2 if i in (1, 3, 5) else 1
            layers += [
                nn.Conv2d(c, c, 3, stride=stride, padding=1, groups=c, bias=False),
                nn.BatchNorm2d(c),
                activation(act),
                _sized(nn.Conv2d(c, w, 1, bias=False)),
                nn.BatchNorm2d(w),
                activation(act),
            ]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))


class _Basic(nn.Module):
    """A ResNet basic block: conv3×3 → BN → act → conv3×3 → BN, plus the shortcut, → act. The
    shortcut is the identity, or conv1×1 → BN when the stride or the width changes (it is then
    declared first, so that ``widths_of`` meets it before the block's own conv)."""

    def __init__(self, c_in: int, inner: int, c_out: int, stride: int, act: str) -> None:
        super().__init__()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                _sized(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)), nn.BatchNorm2d(c_out)
            )
        self.conv1 = _sized(nn.Conv2d(c_in, inner, 3, stride=stride, padding=1, bias=False))
        self.bn1 = nn.BatchNorm2d(inner)
        self.act1 = activation(act)
        self.conv2 = nn.Conv2d(inner, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act2 = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        s = self.shortcut(x)  # first: a projection then names its stage's unit
        h = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(h + s)


class ResNet(nn.Module):
    """CIFAR ResNet (ResNet-20 with the default widths): a conv3×3 stem, three stages of basic
    blocks with real identity shortcuts (a 1×1 projection where a stage changes width or
    stride); GAP; Linear.

    The widths are ``[stage 1 width, its blocks' inner widths …, stage 2 width, …]``: three
    stages with the same number of blocks. A stage's width is one unit of coupled channels
    (its stem or projection, every block's second conv, and the identity shortcuts between them).
    """

    def __init__(self, widths: Sequence[int], act: str, in_shape: Sequence[int], classes: int):
        super().__init__()
        if len(widths) % 3 or len(widths) < 6:
            raise ValueError(
                "resnet takes [stage width, its blocks' inner widths …] for 3 stages with at "
                f"least one block each (a multiple of 3 widths, at least 6), got {len(widths)}"
            )
        per = len(widths) // 3
        stages = [widths[i * per : (i + 1) * per] for i in range(3)]
        self.stem = _sized(nn.Conv2d(in_shape[0], stages[0][0], 3, padding=1, bias=False))
        self.bn = nn.BatchNorm2d(stages[0][0])
        self.act = activation(act)
        blocks: list[nn.Module] = []
        c = stages[0][0]
        for s, (width, *inner) in enumerate(stages):
            for b, w in enumerate(inner):
                stride = 2 if s > 0 and b == 0 else 1
                blocks.append(_Basic(c, w, width, stride, act))
                c = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.act(self.bn(self.stem(x)))).mean((2, 3)))


class _Inverted(nn.Module):
    """A MobileNetV2 inverted residual: expand 1×1 → BN → act → depthwise 3×3 → BN → act →
    project 1×1 → BN (linear bottleneck), plus the identity when ``residual``."""

    def __init__(self, c_in: int, hidden: int, c_out: int, stride: int, act: str, residual: bool):
        super().__init__()
        self.residual = residual
        self.expand = _sized(nn.Conv2d(c_in, hidden, 1, bias=False))
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act1 = activation(act)
        self.dw = nn.Conv2d(hidden, hidden, 3, stride, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.act2 = activation(act)
        self.project = nn.Conv2d(hidden, c_out, 1, bias=False)
        if not residual:  # the first block of a stage starts its stage's stream: sized
            _sized(self.project)
        self.bn3 = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act2(self.bn2(self.dw(self.act1(self.bn1(self.expand(x))))))
        h = self.bn3(self.project(h))
        return x + h if self.residual else h


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2: conv3×3 stem, stages of inverted residual blocks (stride 1, 2, 2 …)
    whose later blocks add a real identity shortcut, a 1×1 head conv → BN → act; GAP; Linear.

    The widths are ``[stem, then per stage: first block's expansion, stage width, the other
    blocks' expansions …, head]``; the default has three stages of two blocks. A stage's width
    is one unit: the projections of all its blocks, joined by the shortcuts. Its channels pass
    only linear steps (the linear bottleneck), so their splitting matrices are zero: splitting
    grows the expansions, the stem and the head.
    """

    def __init__(self, widths: Sequence[int], act: str, in_shape: Sequence[int], classes: int):
        super().__init__()
        body = list(widths[1:-1])
        per = 0
        for k in range(1, len(body) // 2 + 1):  # stages of (k + 1) widths each, k ≥ 1 blocks
            if len(body) % (k + 1) == 0 and len(body) // (k + 1) == 3:
                per = k + 1
        if len(widths) < 5 or not per:
            raise ValueError(
                "mobilenetv2 takes [stem, per stage: expansion, width, expansions …, head] for "
                f"3 stages with the same number of blocks, got {len(widths)} widths"
            )
        self.stem = _sized(nn.Conv2d(in_shape[0], widths[0], 3, padding=1, bias=False))
        self.bn = nn.BatchNorm2d(widths[0])
        self.act = activation(act)
        blocks: list[nn.Module] = []
        c = widths[0]
        for s in range(3):
            first, width, *rest = body[s * per : (s + 1) * per]
            stride = 1 if s == 0 else 2
            blocks.append(_Inverted(c, first, width, stride, act, residual=False))
            blocks += [_Inverted(width, e, width, 1, act, residual=True) for e in rest]
            c = width
        self.blocks = nn.Sequential(*blocks)
        self.head_conv = _sized(nn.Conv2d(c, widths[-1], 1, bias=False))
        self.head_bn = nn.BatchNorm2d(widths[-1])
        self.head_act = activation(act)
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.act(self.bn(self.stem(x))))
        return self.head(self.head_act(self.head_bn(self.head_conv(h))).mean((2, 3)))


class DenseNet(nn.Module):
    """A small DenseNet: a conv3×3 stem, then dense layers that each read the concatenation of
    everything before them (pre-activation BN → act → conv3×3); BN → act over the whole
    concatenation, GAP, Linear. ``widths[0]`` is the stem, ``widths[i]`` the i-th layer's growth.
    Splitting a channel of an early layer lengthens its block inside every later concatenation.
    """

    def __init__(self, widths: Sequence[int], act: str, in_shape: Sequence[int], classes: int):
        super().__init__()
        self.stem = _sized(nn.Conv2d(in_shape[0], widths[0], 3, padding=1, bias=False))
        c = widths[0]
        self.norms = nn.ModuleList()
        self.acts = nn.ModuleList()
        self.convs = nn.ModuleList()
        for w in widths[1:]:
            self.norms.append(nn.BatchNorm2d(c))
            self.acts.append(activation(act))
            self.convs.append(_sized(nn.Conv2d(c, w, 3, padding=1, bias=False)))
            c += w
        self.norm = nn.BatchNorm2d(c)
        self.act = activation(act)
        self.head = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for norm, act, conv in zip(self.norms, self.acts, self.convs, strict=True):
            h = torch.cat([h, conv(act(norm(h)))], dim=1)
        return self.head(self.act(self.norm(h)).mean((2, 3)))


register_model(
    "mlp",
    ModelSpec(_flat_mlp, (16,), "relu", None, doc="fully connected, one width per hidden layer"),
)
register_model(
    "rbf1d",
    ModelSpec(_mlp, (2,), "gaussian", 1, width_count=1, doc="the 1-D toy: 1 → w RBF units → 1"),
)
register_model("cnn1d", ModelSpec(CNN1d, (8, 8, 8, 8), "relu", 2, doc="1-D CNN for mnist1d"))
register_model("cnn", ModelSpec(CNN, (8, 8, 16, 16), "relu", 3, doc="small VGG-style CNN"))
register_model(
    "mobilenetv1",
    ModelSpec(MobileNetV1, (16, 16, 32, 32, 64, 64, 64), "relu", 3, doc="CIFAR MobileNetV1"),
)
register_model(
    "resnet",
    ModelSpec(
        ResNet, (16, 16, 16, 16, 32, 32, 32, 32, 64, 64, 64, 64), "relu", 3,
        doc="CIFAR ResNet-20: [stage width, inner widths …] × 3, identity shortcuts",
    ),
)  # fmt: skip
register_model(
    "mobilenetv2",
    ModelSpec(
        MobileNetV2, (16, 32, 16, 32, 48, 24, 48, 64, 32, 64, 64), "relu6", 3,
        doc="CIFAR MobileNetV2: inverted residuals with identity shortcuts",
    ),
)  # fmt: skip
register_model(
    "densenet",
    ModelSpec(DenseNet, (16, 8, 8, 8), "relu", 3, doc="small DenseNet: dense concatenations"),
)
