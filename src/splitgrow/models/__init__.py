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
