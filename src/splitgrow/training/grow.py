"""``grow``: alternate parametric training and splitting steepest descent.

Each round trains for a phase, then computes the splitting eigenpairs, selects the neurons with the
most negative λ_min across all splittable layers (a global grow ratio, λ_min < 0 only, per-layer
maximum widths, a parameter budget), splits them with a step size that is fixed, relative to each
neuron's weight norm, or chosen by a line search on the real loss of the split network, and
carries the optimizer state over to the grown model (or restarts it). A final phase trains the
last model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from splitgrow.data import Split
from splitgrow.graph.analyze import analyze
from splitgrow.metrics import flops, parameter_count
from splitgrow.splitting import splitting_eigen
from splitgrow.splitting.neurons import theta
from splitgrow.strategies.s2d import added_parameters, s2d_select
from splitgrow.surgery.optimizer import CARRY_MODES, carry_state
from splitgrow.surgery.split import GrowthMap, split_with_growth
from splitgrow.training.fit import OPTIMIZERS, evaluate, make_optimizer, train_phase

Batch = tuple[Tensor, Tensor]
EPS_MODES = ("fixed", "relative", "line-search")
TWIN_COSINE = 0.95


@dataclass(frozen=True)
class GrowConfig:
    """Every setting of a growth run (all fields plain values, so the config is JSON)."""

    rounds: int = 3  # splitting rounds; the model is split at most this many times
    epochs_per_round: int = 10  # epochs of each training phase (before every split)
    final_epochs: int | None = None  # epochs after the last split (default: epochs_per_round)
    optimizer: str = "sgd"  # "sgd" (with momentum) or "adam"
    lr: float = 0.05  # learning rate at the start of each phase
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 0.0  # L2 penalty of the optimizer
    schedule: str = "cosine"  # learning rate within a phase: "cosine" to 0, or "constant"
    plateau: float | None = None  # end a phase early when the epoch loss improves < this fraction
    batch_size: int = 128  # training batch size (batches reshuffled every epoch)
    grow_ratio: float = 0.3  # at most ceil(ratio · total width) neurons split per round
    max_widths: dict[str, int] = field(default_factory=dict)  # per-layer maximum widths
    method: str = "auto"  # eigen-solver: "exact", "fast" or "auto"
    eps_mode: str = "line-search"  # "fixed", "relative" (× ‖θ_i‖) or "line-search"
    eps: float = 0.1  # ε for "fixed"; the factor of ‖θ_i‖ for "relative"
    eps_grid: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # line search: × ‖θ_i‖
    carry: str = "copy"  # optimizer state after a split: "copy" to offspring, or "reset"
    directions: str = "eigen"  # split along the λ_min eigenvectors, or "random" unit directions
    batchnorm: str = "running"  # BatchNorm statistics of the splitting matrices
    surrogate_beta: float | None = 3.0  # softplus β of the ReLU-like surrogate (None: exact)
    eigen_samples: int | None = None  # splitting matrices over this many training samples
    budget_params: int | None = None  # never grow beyond this many parameters
    budget_flops: int | None = None  # stop growing once a forward pass costs this many FLOPs
    seed: int = 0  # data order, line-search batch and the fast solver's start
    progress: bool = False  # tqdm progress bars

    def __post_init__(self) -> None:
        def positive_int(name: str, value: Any, allow_zero: bool = False) -> None:
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or value < (0 if allow_zero else 1)
            ):
                kind = "non-negative" if allow_zero else "positive"
                raise ValueError(f"{name} must be a {kind} integer, got {value!r}")

        positive_int("rounds", self.rounds, allow_zero=True)
        positive_int("epochs_per_round", self.epochs_per_round)
        positive_int("batch_size", self.batch_size)
        if self.final_epochs is not None:
            positive_int("final_epochs", self.final_epochs)
        for name in ("budget_params", "budget_flops", "eigen_samples"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        choices = {
            "optimizer": OPTIMIZERS,
            "schedule": ("cosine", "constant"),
            "method": ("exact", "fast", "auto"),
            "eps_mode": EPS_MODES,
            "carry": CARRY_MODES,
            "directions": ("eigen", "random"),
            "batchnorm": ("running", "batch"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("lr", "eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not (0 < self.grow_ratio <= 1):
            raise ValueError(f"grow_ratio must be in (0, 1], got {self.grow_ratio!r}")
        if not self.eps_grid or any(not (g > 0) for g in self.eps_grid):
            raise ValueError(f"eps_grid must hold positive numbers, got {self.eps_grid!r}")


@dataclass
class GrowResult:
    """The grown model and one history record per round (see :func:`grow`)."""

    model: nn.Module
    history: list[dict[str, Any]]
    stopped: str  # "rounds", "budget", "stable" (no λ_min < 0) or "non-finite"


def _epoch_batches(
    data: Sequence[Batch], size: int, gen: torch.Generator
) -> Callable[[], list[Batch]]:
    split = Split(torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data]))
    return lambda: split.batches(size, shuffle=True, generator=gen)


def _twins(model: nn.Module, pairs: Mapping[str, list[tuple[int, int]]]) -> int:
    """Offspring pairs whose incoming weights still have cosine > 0.95."""
    modules = dict(model.named_modules())
    count = 0
    for layer, pp in pairs.items():
        if not pp:
            continue
        rows = theta(modules[layer])
        a = rows[[p for p, _ in pp]]
        b = rows[[o for _, o in pp]]
        cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
        count += int((cos > TWIN_COSINE).sum())
    return count


def grow(
    model: nn.Module,
    train_data: Sequence[Batch],
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    val_data: Sequence[Batch] | None = None,
    task: str = "classification",
    config: GrowConfig | None = None,
    on_record: Callable[[dict[str, Any], nn.Module], Any] | None = None,
) -> GrowResult:
    """Grow ``model`` by splitting steepest descent (module docstring).

    Args:
        model: the starting network (it is trained in place, then replaced by grown copies).
        train_data: training ``(input, target)`` batches (re-batched and reshuffled every epoch).
        loss_fn: mean loss of a batch.
        val_data: optional validation batches, evaluated after every phase.
        task: ``"classification"`` (accuracy is reported) or ``"regression"``.
        config: the settings (:class:`GrowConfig`).
        on_record: called with each history record as it is made and the model as that phase
            trained it, before its split (for logs and checkpoints).

    Returns:
        The final model, the history (one record per phase: parameters, FLOPs, train loss,
        validation loss/accuracy, neurons split per layer, λ_min statistics, ε, near-twin
        offspring pairs, wall time) and why growth stopped.
    """
    cfg = config or GrowConfig()
    if not train_data:
        raise ValueError("train_data is empty")
    gen = torch.Generator().manual_seed(cfg.seed)
    epoch_batches = _epoch_batches(train_data, cfg.batch_size, gen)
    example = train_data[0][0]
    eigen_data = list(train_data)
    if cfg.eigen_samples is not None:
        eigen_data = epoch_batches()
        keep, n = [], 0
        for x, y in eigen_data:
            keep.append((x[: cfg.eigen_samples - n], y[: cfg.eigen_samples - n]))
            n += len(keep[-1][1])
            if n >= cfg.eigen_samples:
                break
        eigen_data = keep
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
    pairs: dict[str, list[tuple[int, int]]] = {}
    history: list[dict[str, Any]] = []
    stopped = "rounds"
    start = time.perf_counter()
    for rnd in range(cfg.rounds + 1):
        last = rnd == cfg.rounds
        epochs = cfg.final_epochs if last and cfg.final_epochs else cfg.epochs_per_round
        phase = train_phase(
            model, optimizer, epoch_batches, loss_fn, epochs=epochs, schedule=cfg.schedule,
            plateau=cfg.plateau, progress=cfg.progress,
        )  # fmt: skip
        record: dict[str, Any] = {
            "round": rnd,
            "params": parameter_count(model),
            "flops": flops(model, example),
            "epochs": len(phase.epoch_losses),
            "epoch_losses": phase.epoch_losses,
            "train_loss": phase.epoch_losses[-1] if phase.epoch_losses else math.nan,
            "twins": _twins(model, pairs),
        }
        if val_data:
            record.update(
                {f"val_{k}": v for k, v in evaluate(model, val_data, loss_fn, task).items()}
            )
        trained = model
        if phase.stopped == "non-finite":
            stopped = "non-finite"
        elif not last:
            outcome = _split_round(model, cfg, loss_fn, eigen_data, record)
            if isinstance(outcome, str):
                stopped = outcome
            else:
                optimizer = carry_state(
                    optimizer, model, outcome.model, outcome.growth, mode=cfg.carry
                )
                model = outcome.model
                for layer, new_pairs in outcome.pairs.items():
                    pairs.setdefault(layer, []).extend(new_pairs)
        record["seconds"] = time.perf_counter() - start
        history.append(record)
        if on_record is not None:
            on_record(record, trained)
        if stopped != "rounds":
            break
    return GrowResult(model, history, stopped)


@dataclass
class _Split:
    """A split made by one round: the new model, how it grew, (parent, offspring) pairs."""

    model: nn.Module
    growth: GrowthMap
    pairs: dict[str, list[tuple[int, int]]]


def _split_round(
    model: nn.Module,
    cfg: GrowConfig,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    eigen_data: Sequence[Batch],
    record: dict[str, Any],
) -> _Split | str:
    """Compute eigenpairs, select and split (recorded in ``record``), or say why growth stops."""
    params = record["params"]
    if cfg.budget_params is not None and params >= cfg.budget_params:
        return "budget"
    if cfg.budget_flops is not None and record["flops"] >= cfg.budget_flops:
        return "budget"
    eig = splitting_eigen(
        model, loss_fn, eigen_data, method=cfg.method, batchnorm=cfg.batchnorm,
        surrogate_beta=cfg.surrogate_beta, seed=cfg.seed,
    )  # fmt: skip
    record["lambda_min"] = {
        k: {
            "min": float(e.values.min()),
            "median": float(e.values.median()),
            "negative": int((e.values < 0).sum()),
        }
        for k, e in eig.items()
    }
    structure = analyze(model)
    modules = dict(model.named_modules())
    widths = {k: structure.layers[k].n for k in eig}
    costs = {k: added_parameters(structure.layers[k], modules) for k in eig}
    budget = None if cfg.budget_params is None else cfg.budget_params - params
    chosen = s2d_select(
        {k: e.values for k, e in eig.items()}, widths, ratio=cfg.grow_ratio,
        max_widths=cfg.max_widths, costs=costs, budget=budget,
    )  # fmt: skip
    if not chosen:
        return (
            "budget"
            if budget is not None and any(v < 0 for e in eig.values() for v in e.values.tolist())
            else "stable"
        )
    if cfg.directions == "random":  # the baseline: same neurons, random unit directions
        gen = torch.Generator().manual_seed(cfg.seed + 7919 * int(record["round"]))
        vectors = {}
        for k, idx in chosen.items():
            v = torch.randn(len(idx), eig[k].vectors.shape[1], generator=gen, dtype=torch.float64)
            vectors[k] = (v / v.norm(dim=1, keepdim=True)).to(eig[k].vectors)
        plan = {k: (idx, vectors[k]) for k, idx in chosen.items()}
    else:
        plan = {k: (idx, eig[k].vectors[idx]) for k, idx in chosen.items()}
    norms = {
        k: theta(modules[k])[idx].norm(dim=1).to(eig[k].vectors.dtype) for k, idx in chosen.items()
    }
    if cfg.eps_mode == "fixed":
        eps: dict[str, Any] = {k: cfg.eps for k in plan}
        record["eps"] = cfg.eps
    elif cfg.eps_mode == "relative":
        eps = {k: cfg.eps * norms[k] for k in plan}
        record["eps"] = cfg.eps
    else:
        best = (math.inf, cfg.eps_grid[0])
        probe = list(eigen_data)[:1]
        for factor in cfg.eps_grid:
            trial, _ = split_with_growth(model, plan, eps={k: factor * norms[k] for k in plan})
            loss = evaluate(trial, probe, loss_fn, "regression")["loss"]
            best = min(best, (loss, factor))
        eps = {k: best[1] * norms[k] for k in plan}
        record["eps"] = best[1]
    new, growth = split_with_growth(model, plan, eps=eps)
    record["split"] = {k: int(v.numel()) for k, v in chosen.items()}
    pairs = {
        k: list(zip(idx.tolist(), range(widths[k], widths[k] + idx.numel()), strict=True))
        for k, idx in chosen.items()
    }
    return _Split(new, growth, pairs)
