"""Tiny float64 models and helpers shared by the gradmax and firefly tests."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splitgrow import data
from splitgrow.strategies.base import RoundContext, Strategy

Batches = list[tuple[Tensor, Tensor]]
ACTS: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU}


class CNN(nn.Module):
    """Conv → BN → σ → Conv → BN → σ → flatten → Linear (3 classes), 5×5 inputs."""

    def __init__(self, act: str) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.b1 = nn.BatchNorm2d(4)
        self.a1 = ACTS[act]()
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.b2 = nn.BatchNorm2d(4)
        self.a2 = ACTS[act]()
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.a1(self.b1(self.c1(x)))
        x = self.a2(self.b2(self.c2(x)))
        return self.fc(x.flatten(1))


def mlp(act: str, widths: tuple[int, ...] = (5, 6, 6, 3)) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(ACTS[act]())
    return nn.Sequential(*layers).double()


def model_and_data(kind: str, act: str, seed: int = 0) -> tuple[nn.Module, Batches]:
    """A model (BatchNorm with non-trivial running statistics) and two unequal batches."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "mlp":
        model = mlp(act)
        x = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    else:
        model = CNN(act).double()
        x = torch.randn(20, 2, 5, 5, generator=gen, dtype=torch.float64)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.3 * torch.randn(4, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(4, generator=gen))
    y = torch.randint(0, 3, (20,), generator=gen)
    return model, [(x[:12], y[:12]), (x[12:], y[12:])]


def context(
    model: nn.Module, batches: Batches, options: Mapping[str, Any] | None = None, seed: int = 0,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> RoundContext:  # fmt: skip
    return RoundContext(
        model=model, loss_fn=loss_fn, data=batches, share=batches, method="exact",
        batchnorm="running", surrogate_beta=3.0, seed=seed,
        generator=torch.Generator().manual_seed(seed), distributed=False,
        options=dict(options or {}),
    )  # fmt: skip


def all_candidates(strategy: Strategy, ctx: RoundContext) -> tuple[Any, dict[str, Tensor]]:
    cands = strategy.candidates(ctx)
    return cands, {k: torch.arange(v.numel()) for k, v in cands.scores.items()}


def digits_subset(seed: int, n: int = 300) -> tuple[Tensor, Tensor]:
    ds = data.load("digits", seed=0)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds.train), generator=gen)[:n]
    return ds.train.x[idx].double().flatten(1), ds.train.y[idx]


def train(model: nn.Module, x: Tensor, y: Tensor, steps: int, lr: float) -> float:
    """Full-batch SGD; returns the final training loss."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))
