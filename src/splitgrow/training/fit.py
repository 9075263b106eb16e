"""Parametric training between splits, and evaluation over a data set."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

LossFn = Callable[[Tensor, Tensor], Tensor]
OPTIMIZERS = ("sgd", "adam")


def make_optimizer(
    model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """SGD with momentum or Adam over the model's parameters."""
    if name == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
        )
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], loss_fn: LossFn, task: str
) -> dict[str, float]:
    """Mean loss (weighted by batch size) and, for classification, accuracy. Eval mode inside;
    the model's flags are restored."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    total = loss_sum = correct = 0.0
    try:
        for x, y in batches:
            out = model(x)
            loss_sum += float(loss_fn(out, y)) * len(y)
            if task == "classification":
                correct += float((out.argmax(1) == y).sum())
            total += len(y)
    finally:
        for m, flag in flags.items():
            m.training = flag
    if total == 0:
        raise ValueError("evaluate: no samples")
    result = {"loss": loss_sum / total}
    if task == "classification":
        result["accuracy"] = correct / total
    return result


@dataclass
class Phase:
    """What one training phase did: per-epoch mean training loss, and why it ended."""

    epoch_losses: list[float] = field(default_factory=list)
    stopped: str = "epochs"  # "epochs", "plateau" or "non-finite"


def train_phase(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch_batches: Callable[[], Sequence[tuple[Tensor, Tensor]]],
    loss_fn: LossFn,
    *,
    epochs: int,
    schedule: str = "cosine",
    plateau: float | None = None,
    on_epoch: Callable[[int, float], Any] | None = None,
    progress: bool = False,
) -> Phase:
    """Train for up to ``epochs`` epochs; the learning rate follows ``schedule`` within the phase.

    Args:
        epoch_batches: returns one epoch's batches (reshuffled by the caller as it likes).
        schedule: ``"cosine"`` (from the optimizer's lr to 0 over the phase) or ``"constant"``.
        plateau: end the phase early when the epoch's mean training loss improves on the best so
            far by less than this fraction of it (``None``: never).
        on_epoch: called with ``(epoch index, mean training loss)`` after each epoch.

    A non-finite loss stops the phase at once (``Phase.stopped == "non-finite"``); the step that
    produced it is not taken.
    """
    base = [g["lr"] for g in optimizer.param_groups]
    first = epoch_batches()  # its length sets the schedule; it is also the first epoch
    total_steps = epochs * max(1, len(first))
    phase = Phase()
    best = math.inf
    model.train()
    step = 0
    for epoch in tqdm(range(epochs), desc="training", disable=not progress, leave=False):
        loss_sum = count = 0.0
        for x, y in first if epoch == 0 else epoch_batches():
            if schedule == "cosine":
                for g, lr in zip(optimizer.param_groups, base, strict=True):
                    g["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total_steps))
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            if not bool(torch.isfinite(loss)):
                phase.stopped = "non-finite"
                break
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            count += len(y)
            step += 1
        if phase.stopped == "non-finite":
            break
        mean = loss_sum / max(count, 1)
        phase.epoch_losses.append(mean)
        if on_epoch is not None:
            on_epoch(epoch, mean)
        if plateau is not None and best < math.inf and best - mean < plateau * abs(best):
            phase.stopped = "plateau"
            break
        best = min(best, mean)
    for g, lr in zip(optimizer.param_groups, base, strict=True):
        g["lr"] = lr
    return phase
