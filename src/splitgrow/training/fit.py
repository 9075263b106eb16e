"""Parametric training between splits, and evaluation over a data set."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from splitgrow import distributed as sgdist
from splitgrow import faults
from splitgrow._attrs import eval_mode, first_line

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


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` lives: its first parameter's (or buffer's) device; the CPU without any."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def on_device(batches: Sequence[Any], device: torch.device) -> list[Any]:
    """``batches`` with the tensors of each ``(input, target)`` pair on ``device`` (those already
    there are not copied); anything else is left as it is, for :func:`check_data` to name."""
    return [
        (tuple if isinstance(b, tuple) else list)(
            t.to(device) if isinstance(t, Tensor) else t for t in b
        )
        if isinstance(b, (tuple, list))
        else b
        for b in batches
    ]


def check_data(
    batches: Sequence[tuple[Tensor, Tensor]], model: nn.Module, task: str, name: str = "data"
) -> None:
    """Refuse data that would fail or poison training, before any training starts.

    Raises:
        ValueError: naming ``name`` and the problem: no batches, a batch that is not an
            ``(input, target)`` pair of tensors of equal length, inputs of differing or
            unfitting shapes, NaN or infinite values, classification targets that are not
            integers in ``[0, number of outputs)``.
    """
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    if len(batches) == 0:
        raise ValueError(f"{name} is empty")
    shape = None
    for i, batch in enumerate(batches):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"{name} batch {i} is not an (input, target) pair")
        x, y = batch
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise ValueError(
                f"{name} batch {i} must hold tensors, got {type(x).__name__}, {type(y).__name__}"
            )
        if x.dim() == 0 or len(x) == 0 or y.dim() == 0 or len(x) != len(y):
            raise ValueError(
                f"{name} batch {i}: {len(x) if x.dim() else 0} inputs but "
                f"{len(y) if y.dim() else 0} targets (both must be > 0 and equal)"
            )
        if shape is None:
            shape = tuple(x.shape[1:])
        elif tuple(x.shape[1:]) != shape:
            raise ValueError(
                f"{name} batch {i} has samples of shape {tuple(x.shape[1:])}, batch 0 has {shape}"
            )
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} batch {i} contains NaN or infinite inputs")
        if task == "regression" and (
            not y.is_floating_point() or not bool(torch.isfinite(y).all())
        ):
            raise ValueError(f"{name} batch {i}: regression targets must be finite floats")
        if task == "classification" and (y.is_floating_point() or y.is_complex() or y.dim() != 1):
            raise ValueError(
                f"{name} batch {i}: class targets must be a 1-D integer tensor, "
                f"got {y.dtype} of shape {tuple(y.shape)}"
            )
    try:
        with eval_mode(model), torch.no_grad():
            out = model(batches[0][0][:1].to(model_device(model)))
    except Exception as exc:
        raise ValueError(
            f"{name}: samples of shape {shape} do not fit the model: {first_line(exc)}"
        ) from exc
    if task == "classification":
        classes = out.shape[-1]
        for i, (_, y) in enumerate(batches):
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
                raise ValueError(
                    f"{name} batch {i} has labels in [{int(y.min())}, "
                    f"{int(y.max())}], outside the model's [0, {classes})"
                )


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], loss_fn: LossFn, task: str
) -> dict[str, float]:
    """Mean loss (weighted by batch size) and, for classification, accuracy. Eval mode inside;
    the model's flags are restored. Each batch is moved to the model's device."""
    total = loss_sum = correct = 0.0
    device = model_device(model)
    with eval_mode(model):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss_sum += float(loss_fn(out, y)) * len(y)
            if task == "classification":
                correct += float((out.argmax(1) == y).sum())
            total += len(y)
    if total == 0:
        raise ValueError("evaluate: no samples")
    result = {"loss": loss_sum / total}
    if task == "classification":
        result["accuracy"] = correct / total
    return result


@dataclass
class Phase:
    """Progress through one training phase: what it did so far, and enough to continue it exactly.

    Every field is a plain value (JSON), so a checkpoint can carry it.
    """

    epoch_losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    stopped: str = ""  # "" while running; then "epochs", "plateau" or "non-finite"
    batch: int = 0  # batches of the current epoch already taken
    step: int = 0  # optimizer steps taken in the phase
    loss_sum: float = 0.0  # Σ loss·batch size over the current epoch so far
    count: int = 0  # samples of the current epoch so far
    best: float = math.inf  # best epoch loss so far (for ``plateau``)
    base_lrs: list[float] = field(default_factory=list)  # each group's lr at the phase start
    non_finite: dict[str, int] | None = None  # where the loss became non-finite (epoch, batch)

    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return len(self.epoch_losses)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @staticmethod
    def from_json(data: dict[str, Any]) -> Phase:
        known = set(Phase.__dataclass_fields__)
        if not isinstance(data, dict) or not set(data) <= known:
            raise ValueError(f"not a training phase state: {data!r}"[:200])
        return Phase(**data)


def train_phase(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch_batches: Callable[[int], Sequence[tuple[Tensor, Tensor]]],
    loss_fn: LossFn,
    *,
    epochs: int,
    schedule: str = "cosine",
    plateau: float | None = None,
    on_epoch: Callable[[int, float], Any] | None = None,
    progress: bool = False,
    resume: Phase | None = None,
    on_checkpoint: Callable[[Phase], Any] | None = None,
    checkpoint_steps: int | None = None,
    after_backward: Callable[[], Any] | None = None,
    distributed: bool = False,
) -> Phase:
    """Train for up to ``epochs`` epochs; the learning rate follows ``schedule`` within the phase.

    Args:
        epoch_batches: ``epoch_batches(e)`` returns epoch ``e``'s batches. It must return the
            same batches for the same ``e`` (a resumed phase asks for its epoch again), and
            the same number of batches for every ``e``. Each batch is moved to the model's
            device (no copy where it already is).
        schedule: ``"cosine"`` (from the optimizer's lr to 0 over the phase) or ``"constant"``.
        plateau: end the phase early when the epoch's mean training loss improves on the best so
            far by less than this fraction of it (``None``: never).
        on_epoch: called with ``(epoch index, mean training loss)`` after each epoch.
        resume: a :class:`Phase` handed to ``on_checkpoint`` earlier: the phase continues from
            there (the model and optimizer must hold the state they held at that moment).
        on_checkpoint: called with the phase's progress after every epoch and every
            ``checkpoint_steps`` optimizer steps, at moments when the model, the optimizer and
            this progress together are enough to continue exactly (it is not called after a
            non-finite loss, so the last checkpoint stays good).
        checkpoint_steps: see ``on_checkpoint`` (``None``: at epoch ends only).
        after_backward: called between each backward pass and its optimizer step (to add a
            penalty's gradient, as network slimming does).
        distributed: every process of torch.distributed's default group calls this together
            with the same batches: each trains on its contiguous share of every batch with the
            model wrapped in ``DistributedDataParallel`` for the phase, each share's loss weighed
            by its size so that the averaged gradient is the whole batch's mean gradient; the
            losses (and a non-finite one) are summed over the processes, so every process takes
            the same decisions, and rank 0's buffers are broadcast when the phase ends.

    A non-finite loss stops the phase at once (``Phase.stopped == "non-finite"``, and
    ``Phase.non_finite`` says where): the step that produced it is not taken and the model's
    parameters and buffers are rolled back to the last checkpoint moment: where the epoch started,
    its last ``checkpoint_steps`` step, or where the phase was resumed — the same point in a
    resumed run as in the uninterrupted one.
    """
    if checkpoint_steps is not None and (
        not isinstance(checkpoint_steps, int) or checkpoint_steps < 1
    ):
        raise ValueError(f"checkpoint_steps must be a positive integer, got {checkpoint_steps!r}")
    phase = Phase(**copy.deepcopy(resume.to_json())) if resume is not None else Phase()
    if not phase.base_lrs:  # a phase that has not started
        phase.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
    elif len(phase.base_lrs) != len(optimizer.param_groups):
        raise ValueError("resume: the phase state does not match the optimizer's groups")
    base = phase.base_lrs
    if phase.stopped:  # resumed after the phase had ended
        return phase
    sgdist.require(distributed, "train_phase")
    net = sgdist.ddp(model) if distributed else model
    device = model_device(model)
    model.train()
    bar = tqdm(
        total=epochs,
        initial=phase.epoch,
        desc="training",
        leave=False,
        disable=None if progress else True,  # None: shown on a terminal only
    )
    try:
        while phase.epoch < epochs:
            batches = epoch_batches(phase.epoch)
            total_steps = epochs * max(1, len(batches))
            snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
            for x, y in batches[phase.batch :]:
                x, y = x.to(device), y.to(device)  # no copy where they already are
                if schedule == "cosine":
                    for g, lr in zip(optimizer.param_groups, base, strict=True):
                        g["lr"] = 0.5 * lr * (1 + math.cos(math.pi * phase.step / total_steps))
                optimizer.zero_grad(set_to_none=True)
                if distributed:
                    n = len(y)
                    x, y, share = sgdist.shard_batch(x, y)
                loss = loss_fn(net(x), y)
                if distributed:
                    loss_sum, count = sgdist.sum_loss(loss, share)
                    finite = math.isfinite(loss_sum)
                else:
                    finite = bool(torch.isfinite(loss))
                if not finite:
                    phase.stopped = "non-finite"
                    phase.non_finite = {"epoch": phase.epoch, "batch": phase.batch}
                    model.load_state_dict(snapshot)
                    break
                if distributed:  # DDP averages: weigh each share by its size
                    (loss * (share * sgdist.world_size() / n)).backward()
                else:
                    loss.backward()
                    loss_sum, count = float(loss.detach()) * len(y), len(y)
                if after_backward is not None:
                    after_backward()
                optimizer.step()
                phase.loss_sum += loss_sum
                phase.count += count
                phase.step += 1
                phase.batch += 1
                faults.reached("step")
                if (
                    checkpoint_steps is not None
                    and phase.step % checkpoint_steps == 0
                    and phase.batch < len(batches)
                ):
                    if on_checkpoint is not None:
                        on_checkpoint(phase)
                    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if phase.stopped == "non-finite":
                break
            mean = phase.loss_sum / max(phase.count, 1)
            epoch = phase.epoch
            phase.epoch_losses.append(mean)
            phase.batch, phase.loss_sum, phase.count = 0, 0.0, 0
            bar.update(1)
            if on_epoch is not None:
                on_epoch(epoch, mean)
            if (
                plateau is not None
                and phase.best < math.inf
                and phase.best - mean < plateau * abs(phase.best)
            ):
                phase.stopped = "plateau"
            phase.best = min(phase.best, mean)
            if not phase.stopped and phase.epoch >= epochs:
                phase.stopped = "epochs"
            if phase.stopped:
                for g, lr in zip(optimizer.param_groups, base, strict=True):
                    g["lr"] = lr
            if on_checkpoint is not None:
                on_checkpoint(phase)
            if phase.stopped:
                break
    finally:
        bar.close()
    if distributed:
        sgdist.sync_buffers(model)
    if not phase.stopped:  # epochs == 0
        phase.stopped = "epochs"
    for g, lr in zip(optimizer.param_groups, base, strict=True):
        g["lr"] = lr
    return phase
