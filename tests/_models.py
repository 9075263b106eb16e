"""Small float64 test models, in a registry: each model here is tested by every parametrised test.

Each factory takes a ``relu`` factory (the ReLU-like activation modules to use, so that the
brute-force reference can swap in an independent surrogate) and returns ``(model, batches)``;
BatchNorm layers get non-trivial running statistics. The loss is cross-entropy over 3 classes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Batches = list[tuple[Tensor, Tensor]]
Acts = Callable[[str], nn.Module]  # name ("relu", "relu6", "leaky", "hardtanh", "prelu") -> module


def default_acts(name: str) -> nn.Module:
    return {
        "relu": nn.ReLU(),
        "relu_inplace": nn.ReLU(inplace=True),
        "relu6": nn.ReLU6(),
        "leaky": nn.LeakyReLU(0.1),
        "hardtanh": nn.Hardtanh(-0.5, 1.0),
        "hardsigmoid": nn.Hardsigmoid(),
    }[name]


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(0.3 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            with torch.no_grad():
                m.weight.copy_(0.6 + torch.rand(n, generator=gen))
                m.bias.copy_(0.3 * torch.randn(n, generator=gen))


def _batches(shape: tuple[int, ...], sizes: list[int], gen: torch.Generator) -> Batches:
    out = []
    for s in sizes:
        x = torch.randn(s, *shape, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (s,), generator=gen)
        out.append((x, y))
    return out


class MLP(nn.Module):
    def __init__(self, acts: Acts) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Softplus(), nn.Linear(4, 3)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ReluMLP(nn.Module):
    """ReLU-like activations (surrogate), dropout, an in-place ReLU."""

    def __init__(self, acts: Acts) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.a1 = acts("relu_inplace")
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(6, 5)
        self.a2 = acts("leaky")
        self.fc3 = nn.Linear(5, 4, bias=False)
        self.a3 = acts("relu6")
        self.fc4 = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.a1(self.fc1(x)))
        x = self.a2(self.fc2(x))
        return self.fc4(self.a3(self.fc3(2.0 * x)))


class CNN1d(nn.Module):
    """Conv1d → BN → ReLU → max-pool → depthwise Conv1d chains, global average pool, Linear."""

    def __init__(self, acts: Acts) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 5, padding=2, bias=False)
        self.b1 = nn.BatchNorm1d(4)
        self.a1 = acts("relu")
        self.pool = nn.MaxPool1d(2)
        self.dw = nn.Conv1d(4, 4, 3, padding=1, groups=4)
        self.c2 = nn.Conv1d(4, 5, 3, stride=2)
        self.b2 = nn.BatchNorm1d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dw(self.pool(self.a1(self.b1(self.c1(x)))))
        x = F.gelu(self.b2(self.c2(x)))
        return self.fc(F.adaptive_avg_pool1d(x, 1).flatten(1))


class MobileBlock(nn.Module):
    """MobileNet-style: conv → BN → ReLU → depthwise → BN → ReLU6 → 1×1 → BN → SiLU → pool → fc.

    The first conv's chain holds a depthwise conv between two activations: the closed form is
    wrong there and the general route is used.
    """

    def __init__(self, acts: Acts) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.b1 = nn.BatchNorm2d(4)
        self.a1 = acts("relu")
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.b2 = nn.BatchNorm2d(4)
        self.a2 = acts("relu6")
        self.c2 = nn.Conv2d(4, 5, 1)
        self.b3 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5 * 2 * 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.a1(self.b1(self.c1(x)))
        x = self.a2(self.b2(self.dw(x)))
        x = F.silu(self.b3(self.c2(x)))
        x = F.avg_pool2d(x, 2)
        return self.fc(x.view(x.size(0), -1))


class Functional(nn.Module):
    """Functional calls, padding='same' and reflect padding (general route), PReLU per channel,
    Hardtanh, a CURVED step (x·sigmoid(x)), mean over spatial dims, Linear → BN1d → Hardsigmoid."""

    def __init__(self, acts: Acts) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding="same")
        self.p1 = nn.PReLU(3, init=0.2)
        self.c2 = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.a2 = acts("hardtanh")
        self.c3 = nn.Conv2d(4, 4, 1)
        self.fc1 = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)
        self.a3 = acts("hardsigmoid")
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.p1(self.c1(x))
        x = self.a2(self.c2(x) * 0.5 + 0.1)
        x = self.c3(x)
        x = x * torch.sigmoid(x)
        x = x.mean((2, 3))
        return self.fc2(self.a3(self.bn(self.fc1(x))))


REGISTRY: dict[str, tuple[Callable[[Acts], nn.Module], tuple[int, ...]]] = {
    "mlp": (MLP, (5,)),
    "relu_mlp": (ReluMLP, (5,)),
    "cnn1d": (CNN1d, (2, 12)),
    "mobile_block": (MobileBlock, (3, 4, 4)),
    "functional": (Functional, (2, 5, 5)),
}
SIZES = [4, 4, 3]  # an uneven last batch


def build(name: str, acts: Acts = default_acts, seed: int = 0) -> tuple[nn.Module, Batches]:
    """The registered model ``name`` in float64 with seeded weights, and its data batches."""
    factory, shape = REGISTRY[name]
    torch.manual_seed(seed)
    model = factory(acts).double()
    gen = torch.Generator().manual_seed(seed + 1)
    _randomise_bn(model, gen)
    model.eval()
    return model, _batches(shape, SIZES, gen)


def loss_fn(output: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(output, target)
