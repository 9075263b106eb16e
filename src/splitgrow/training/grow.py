"""``grow``: alternate parametric training and splitting steepest descent.

Each round trains for a phase, then computes the splitting eigenpairs, selects the neurons with the
most negative λ_min across all splittable layers (a global grow ratio, λ_min < 0 only, per-layer
maximum widths, a parameter budget), splits them with a step size that is fixed, relative to each
neuron's weight norm, or chosen by a line search on the real loss of the split network, and
carries the optimizer state over to the grown model (or restarts it). A final phase trains the
last model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from splitgrow import distributed as sgdist
from splitgrow import faults
from splitgrow.data import Split
from splitgrow.graph.analyze import analyze
from splitgrow.metrics import flops, flops_per_weight, latency_ms, parameter_count
from splitgrow.splitting.neurons import unit_theta
from splitgrow.strategies import STRATEGIES, Candidates, RoundContext, Strategy, strategy_for
from splitgrow.strategies.energy import added_flops, added_latency, energy_select
from splitgrow.strategies.s2d import added_parameters, occurrences, s2d_select
from splitgrow.strategies.s3d import check_max_share
from splitgrow.surgery.fresh import NewNeurons, add_fresh_neurons, add_neurons
from splitgrow.surgery.optimizer import CARRY_MODES, carry_state
from splitgrow.surgery.split import (
    GrowthMap,
    SignedSplit,
    offspring_pairs,
    signed_split_traced,
    split_with_growth,
)
from splitgrow.training.fit import (
    OPTIMIZERS,
    Phase,
    check_data,
    evaluate,
    make_optimizer,
    model_device,
    on_device,
    train_phase,
)

Batch = tuple[Tensor, Tensor]
EPS_MODES = ("fixed", "relative", "line-search")
DIRECTIONS = ("eigen", "random", "net2net", "fresh")
SELECTIONS = ("global", "per-layer", "energy")
NORMALISE_FLOOR = 1e-6  # per-layer units below this fraction of the largest are round-off
MAX_SETTING = 1e30  # learning rates, ε and penalties above this overflow float32 arithmetic
NET2NET_NOISE = 0.01  # net2net: offspring differ by ±1% of the neuron's norm
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
    # how the selected neurons grow: "eigen" (split along the λ_min eigenvectors), "random"
    # (split along random unit directions), "net2net" (copies plus 1% noise, no line search),
    # "fresh" (new neurons with random incoming and zero outgoing weights, as many per layer)
    directions: str = "eigen"
    # per round, how many new neurons per layer (replaces the λ selection; directions "fresh" only)
    counts: list[dict[str, int]] | None = None
    batchnorm: str = "running"  # BatchNorm statistics of the splitting matrices
    surrogate_beta: float | None = 3.0  # softplus β of the ReLU-like surrogate (None: exact)
    # the splitting statistics over at most this many training samples (None: all): when the
    # data has more, one shuffle drawn per run picks them, the same every round. A round's
    # statistics cost several epochs over the samples they read (R of benchmarks/eigen_cost.py),
    # so on a large data set all of them would cost more than the training. 4096 reads all of
    # digits (1294) and MNIST-1D (3500); against all (10 seeds), 2048 of MNIST-1D's samples lost
    # 0.1 point on the MLP and the 1-D CNN, 512 lost 0.2–0.6 (benchmarks/results/eigen_samples.md)
    eigen_samples: int | None = 4096
    # splitting statistics in slices of at most this many samples: the same eigenpairs (up to
    # rounding) with the memory of a pass over that many (splitting_eigen's micro_batch; needs
    # batchnorm "running")
    eigen_micro_batch: int | None = None
    budget_params: int | None = None  # never grow beyond this many parameters
    # which λ_min compete: "per-layer" (default: each layer's values divided by its most negative
    # one, so layers whose curvature is on a smaller scale are not starved; +1.3 points on the
    # digits CNN and +0.9 on the MNIST-1D MLP against "global", benchmarks/s2d_ablation.py),
    # "global" (raw values across layers, the published rule) or "energy" (the plan of least
    # Σ λ_i, per-layer normalised, within the round's parameter and FLOPs budgets, an exact 0/1
    # knapsack; needs a budget)
    selection: str = "per-layer"
    # grow geometrically to budget_params by the last round: round r (of R) adds at most
    # P₀·(B/P₀)^((r+1)/R) − P parameters (P₀: the starting size), so growth spreads over the rounds
    reach_budget: bool = False
    budget_flops: int | None = None  # stop growing once a forward pass costs this many FLOPs
    # selection "energy" only: what one round's splits may add (parameters; FLOPs of one forward
    # pass at batch 1); the total budgets above bound every round too, and then hold exactly
    round_budget_params: int | None = None
    round_budget_flops: int | None = None
    # measured CPU latency (ONNX Runtime, batch 1, one thread, ms): stop growing once the model
    # takes this long, measured every round; with selection "energy", each unit's added latency
    # per neuron is measured too, and a round adds at most the rest of the budget (and at most
    # round_budget_latency_ms)
    budget_latency_ms: float | None = None
    round_budget_latency_ms: float | None = None
    # what grows (a registered strategy, splitgrow.strategies): "s2d" (split along the λ_min
    # eigenvectors), "s3d" (signed splitting: also splits with outputs of opposite sign where
    # λ_max > 0) …; ``directions`` other than "eigen" are baselines of "s2d" only
    strategy: str = "s2d"
    signed_max_share: float = 2.0  # s3d: largest magnitude W of an offspring's output share
    # the strategy's own settings (see its module: gradmax scale, bias …; firefly candidates,
    # steps, lr …); s3d's max_share is signed_max_share
    strategy_options: dict[str, Any] = field(default_factory=dict)
    # before the last training phase, θ ← λ·θ + (1 − λ)·θ_fresh with θ_fresh a fresh default
    # initialisation of the grown architecture ("shrink and perturb", Ash & Adams 2020, against
    # the generalisation gap of warm-started training), and a fresh optimizer; None: off.
    # Measured (benchmarks/results/final_shrink.md): +2.2 points on MNIST-1D, +1.9 on digits CNN
    final_shrink: float | None = 0.3
    seed: int = 0  # data order, line-search batch and the fast solver's start
    progress: bool = False  # tqdm progress bars (shown on a terminal only)

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
        for name in (
            "budget_params", "budget_flops", "eigen_samples", "eigen_micro_batch",
            "round_budget_params", "round_budget_flops",
        ):  # fmt: skip
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        choices = {
            "optimizer": OPTIMIZERS,
            "schedule": ("cosine", "constant"),
            "method": ("exact", "fast", "auto"),
            "eps_mode": EPS_MODES,
            "carry": CARRY_MODES,
            "directions": DIRECTIONS,
            "selection": SELECTIONS,
            "batchnorm": ("running", "batch"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.eigen_micro_batch is not None and self.batchnorm == "batch":
            raise ValueError(
                "eigen_micro_batch needs batchnorm='running': slices would change the batch "
                "statistics"
            )
        for name in ("lr", "eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value <= MAX_SETTING):
                raise ValueError(
                    f"{name} must be a positive number up to {MAX_SETTING:g}, got {value!r}"
                )
        for name in ("momentum", "weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= MAX_SETTING):
                raise ValueError(
                    f"{name} must be a non-negative number up to {MAX_SETTING:g}, got {value!r}"
                )
        if not isinstance(self.strategy, str) or self.strategy not in STRATEGIES:
            raise ValueError(
                f"strategy must be one of {tuple(sorted(STRATEGIES))}, got {self.strategy!r}"
            )
        if self.strategy != "s2d" and (self.directions != "eigen" or self.counts is not None):
            raise ValueError(
                f"directions={self.directions!r} and counts are baselines of strategy 's2d', "
                f"not of {self.strategy!r}"
            )
        check_max_share(self.signed_max_share)
        if not isinstance(self.strategy_options, dict):
            raise ValueError(f"strategy_options must be a dict, got {self.strategy_options!r}")
        STRATEGIES[self.strategy].check_options(_options(self))
        check_final_shrink(self.final_shrink)
        if not (0 < self.grow_ratio <= 1):
            raise ValueError(f"grow_ratio must be in (0, 1], got {self.grow_ratio!r}")
        if self.counts is not None:
            if self.directions != "fresh":
                raise ValueError("counts (a fixed growth schedule) needs directions='fresh'")
            if not isinstance(self.counts, list) or not all(
                isinstance(c, dict)
                and all(isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in c.items())
                for c in self.counts
            ):
                raise ValueError(
                    f"counts must be a list of {{layer: count}} dicts, got {self.counts!r}"
                )
        for name in ("budget_latency_ms", "round_budget_latency_ms"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, (int, float)) and 0 < value <= MAX_SETTING
            ):
                raise ValueError(f"{name} must be a positive number of ms, got {value!r}")
        rounds = (self.round_budget_params, self.round_budget_flops, self.round_budget_latency_ms)
        if self.selection != "energy" and any(b is not None for b in rounds):
            raise ValueError(
                "round_budget_params, round_budget_flops and round_budget_latency_ms need "
                "selection='energy'"
            )
        totals = (self.budget_params, self.budget_flops, self.budget_latency_ms)
        if self.selection == "energy" and all(b is None for b in (*rounds, *totals)):
            raise ValueError(
                "selection='energy' needs a budget: budget_params, budget_flops, "
                "budget_latency_ms or a round budget"
            )
        if self.reach_budget and (self.budget_params is None or self.rounds < 1):
            raise ValueError("reach_budget needs budget_params and at least one round")
        if not self.eps_grid or any(not (g > 0) for g in self.eps_grid):
            raise ValueError(f"eps_grid must hold positive numbers, got {self.eps_grid!r}")

    def to_json(self) -> dict[str, Any]:
        """The settings that shape the results, as JSON gives them back (without ``progress``)."""
        out: dict[str, Any] = json.loads(json.dumps(dict(self.__dict__)))
        out.pop("progress", None)
        return out


@dataclass
class GrowResult:
    """The grown model and one history record per round (see :func:`grow`)."""

    model: nn.Module
    history: list[dict[str, Any]]
    # why growth stopped: "rounds", "budget", "stable" (no λ_min < 0), "schedule" (``counts``
    # ran out) or "non-finite"; after all but the last, a final phase trained the epochs left
    stopped: str


@dataclass
class GrowState:
    """A growth run at a checkpoint: with the same starting model, data and config, enough to
    continue it bit for bit (see ``grow(resume=…)``).

    ``meta()`` is plain JSON and ``tensors()`` holds only tensors and plain containers, so a
    checkpoint is saved and loaded without pickled objects (``torch.load(weights_only=True)``).
    """

    round: int  # the round whose training phase is in progress
    phase: Phase  # progress through that phase
    history: list[dict[str, Any]]  # records of the finished rounds
    plans: list[dict[str, list[int]]]  # per split made so far: {layer: parent neurons}
    pairs: dict[str, list[list[int]]]  # (parent, offspring) pairs, for the twin count
    ended: str  # "" while growing; why growth ended early (then one last phase trains)
    stopped: str  # "" while the run goes on; why it stopped once it has
    elapsed: float  # seconds of work so far
    config: dict[str, Any]  # the GrowConfig (a resume must use the same one)
    model: dict[str, Tensor]  # state_dict of the model as it is now
    optimizer: dict[str, Any]  # state_dict of its optimizer
    rng: dict[str, Any]  # torch's global RNG states (CPU, and CUDA where used)

    META_KEYS = (
        "round", "phase", "history", "plans", "pairs", "ended", "stopped", "elapsed", "config",
    )  # fmt: skip

    def meta(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.META_KEYS}
        out["phase"] = self.phase.to_json()
        return out

    def tensors(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer, "rng": self.rng}

    @staticmethod
    def from_parts(meta: Any, tensors: Any) -> GrowState:
        """Rebuild from :meth:`meta` and :meth:`tensors` (as read back), checking their form."""
        if not isinstance(meta, dict) or set(meta) != set(GrowState.META_KEYS):
            raise ValueError(f"the metadata must have exactly the keys {list(GrowState.META_KEYS)}")
        if not isinstance(tensors, dict) or set(tensors) != {"model", "optimizer", "rng"}:
            raise ValueError("the tensors must be a dict of model, optimizer and rng")
        model = tensors["model"]
        if not isinstance(model, dict) or not all(isinstance(v, Tensor) for v in model.values()):
            raise ValueError("the model state is not a dict of tensors")
        rng = tensors["rng"]
        if not isinstance(rng, dict) or not isinstance(rng.get("cpu"), Tensor):
            raise ValueError("the RNG state is missing")
        if not isinstance(tensors["optimizer"], dict):
            raise ValueError("the optimizer state is not a dict")
        types: dict[str, Any] = {
            "round": int, "history": list, "plans": list, "pairs": dict, "ended": str,
            "stopped": str,
            "elapsed": (int, float), "config": dict,
        }  # fmt: skip
        for key, kind in types.items():
            if not isinstance(meta[key], kind):
                raise ValueError(f"{key} has the wrong type ({type(meta[key]).__name__})")
        return GrowState(
            round=meta["round"], phase=Phase.from_json(meta["phase"]), history=meta["history"],
            plans=meta["plans"], pairs=meta["pairs"], ended=meta["ended"], stopped=meta["stopped"],
            elapsed=float(meta["elapsed"]), config=meta["config"], model=model,
            optimizer=tensors["optimizer"], rng=rng,
        )  # fmt: skip


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (each epoch of each round gets its own data order)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _phase_epochs(cfg: GrowConfig, rnd: int, ended: bool) -> int:
    """Epochs of round ``rnd``'s training phase; after growth ended early, one last phase
    trains for all the epochs left in the schedule."""

    def planned(r: int) -> int:
        return cfg.final_epochs if r == cfg.rounds and cfg.final_epochs else cfg.epochs_per_round

    return sum(planned(r) for r in range(rnd, cfg.rounds + 1)) if ended else planned(rnd)


def _check_progress(state: GrowState, cfg: GrowConfig, batches_per_epoch: int) -> None:
    """The counters of a checkpoint must be ones this config and data can reach."""
    if isinstance(state.round, bool) or not 0 <= state.round <= cfg.rounds:
        raise ValueError(f"resume: round {state.round} is outside [0, {cfg.rounds}]")
    done = state.round + (1 if state.stopped else 0)
    if len(state.history) != done or not all(
        isinstance(r, dict) and r.get("round") == i for i, r in enumerate(state.history)
    ):
        raise ValueError(f"resume: the history does not hold rounds 0 … {done - 1} in order")
    if len(state.plans) > 2 * state.round:  # a round: its splits, then its new neurons
        raise ValueError(f"resume: {len(state.plans)} splits recorded before round {state.round}")
    known = ("", "rounds", "budget", "stable", "schedule", "non-finite")
    if state.ended not in known or state.stopped not in known:
        raise ValueError(f"resume: unknown stop reasons {state.ended!r}, {state.stopped!r}")
    ph = state.phase
    ints = (ph.batch, ph.step, ph.count)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints) or not (
        isinstance(ph.epoch_losses, list)
        and all(isinstance(v, (int, float)) for v in [*ph.epoch_losses, ph.loss_sum, ph.best])
        and isinstance(ph.base_lrs, list)
        and all(isinstance(v, (int, float)) for v in ph.base_lrs)
        and ph.stopped in ("", "epochs", "plateau")
        and ph.non_finite is None
        and ph.batch <= batches_per_epoch
    ):
        raise ValueError("resume: the training phase's progress is malformed")
    epochs = _phase_epochs(cfg, state.round, bool(state.ended))
    if len(ph.epoch_losses) > epochs:
        raise ValueError(
            f"resume: the phase has {len(ph.epoch_losses)} epochs done of {epochs} planned"
        )


def _check_pairs(pairs: Any, model: nn.Module) -> None:
    layers = analyze(model).layers
    for name, pp in pairs.items():
        if name not in layers:
            raise ValueError(f"resume: twin pairs name no layer {name!r}")
        n = layers[name].n
        for pair in pp:
            if (
                not isinstance(pair, list)
                or len(pair) != 2
                or not all(isinstance(i, int) and 0 <= i < n for i in pair)
            ):
                raise ValueError(f"resume: twin pair {pair!r} of {name!r} is not in [0, {n})")


def _replay(model: nn.Module, plans: Sequence[Any]) -> nn.Module:
    """``model`` reshaped by the splits in ``plans`` (its values are then overwritten)."""
    for i, plan in enumerate(plans):
        if not isinstance(plan, Mapping):
            raise ValueError(f"split {i} of the checkpoint is not a mapping")
        layers = analyze(model).layers
        entries = {}
        for name, idx in plan.items():
            if name not in layers or not layers[name].splittable:
                raise ValueError(f"split {i} of the checkpoint names no splittable layer {name!r}")
            if not isinstance(idx, list) or not all(
                isinstance(j, int) and not isinstance(j, bool) for j in idx
            ):
                raise ValueError(f"split {i} of the checkpoint: indices of {name!r} are not ints")
            entries[name] = (
                torch.tensor(idx, dtype=torch.long),
                torch.zeros(len(idx), layers[name].d, dtype=torch.float64),
            )
        model, _ = split_with_growth(model, entries, eps=0.0)
    return model


def check_final_shrink(value: Any) -> None:
    """``final_shrink`` must be ``None`` or a number λ in [0, 1]."""
    if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 1):
        raise ValueError(f"final_shrink must be in [0, 1] or None, got {value!r}")


def _shrink_perturb(model: nn.Module, lam: float, seed: int) -> None:
    """θ ← λ·θ + (1 − λ)·θ_fresh in place, θ_fresh from each module's ``reset_parameters`` under
    ``seed`` (the global RNG is left as it was); buffers (BatchNorm statistics) are kept.
    θ_fresh is drawn on the CPU, so a model on a GPU gets the same one."""
    fresh = copy.deepcopy(model).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU's alone: the CUDA RNG is untouched
        for m in fresh.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
    with torch.no_grad():
        for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
            p.mul_(lam).add_(q.to(p.device), alpha=1.0 - lam)


def _twins(model: nn.Module, pairs: Mapping[str, Sequence[Sequence[int]]]) -> int:
    """Offspring pairs whose incoming weights still have cosine > 0.95."""
    modules = dict(model.named_modules())
    structure = analyze(model) if any(pairs.values()) else None
    count = 0
    for layer, pp in pairs.items():
        if not pp or structure is None:
            continue
        rows = unit_theta(structure.layers[layer], modules)
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
    resume: GrowState | None = None,
    on_checkpoint: Callable[[GrowState], Any] | None = None,
    checkpoint_steps: int | None = None,
    distributed: bool = False,
) -> GrowResult:
    """Grow ``model`` by splitting steepest descent (module docstring).

    Args:
        model: the starting network (it is trained in place, then replaced by grown copies).
            To resume, pass a model built exactly as the first time (its values do not matter).
        train_data: training ``(input, target)`` batches (re-batched and reshuffled every epoch:
            epoch ``e`` of round ``r`` gets its own order, from the seed, ``r`` and ``e``); moved
            once to the model's device.
        loss_fn: mean loss of a batch.
        val_data: optional validation batches, evaluated after every phase (moved likewise).
        task: ``"classification"`` (accuracy is reported) or ``"regression"``.
        config: the settings (:class:`GrowConfig`).
        on_record: called with each history record as it is made and the model as that phase
            trained it, before its split (for logs and checkpoints).
        resume: a :class:`GrowState` given to ``on_checkpoint`` by an earlier call with the same
            model, data and config: the run continues from there and ends as the uninterrupted
            run would have (bit for bit on CPU). Records made before it are not announced again.
        on_checkpoint: called with the run's :class:`GrowState` after every epoch (and every
            ``checkpoint_steps`` optimizer steps), after every split, and when growth ends;
            never after a non-finite loss, so that the last checkpoint stays the last good one.
            The state's tensors are the live ones: save them before returning.
        checkpoint_steps: see ``on_checkpoint``.
        distributed: every process of torch.distributed's default group calls ``grow``
            together, with the same model, data and config (and ``resume``). Each training batch
            is shared among the processes and the model trained under
            ``DistributedDataParallel`` (``config.batch_size`` is the batch of all processes
            together); the splitting statistics are summed over the processes' shares of the
            splitting data; rank 0 selects the neurons and ε and broadcasts its plan; every
            process applies it, and each split's record says under ``checksums_agree`` whether
            every process then holds the same parameters and buffers. The callbacks run on every
            process: write files from rank 0 only.

    Returns:
        The final model, the history (one record per phase: parameters, FLOPs, train loss,
        validation loss/accuracy, neurons split per layer, λ_min statistics, ε, near-twin
        offspring pairs, wall time) and why growth stopped. After a non-finite loss the model is
        the one from the start of the epoch where it happened, ``stopped`` is ``"non-finite"``
        and the last record's ``non_finite`` says where.

    Raises:
        ValueError: bad data (:func:`~splitgrow.training.fit.check_data`), or a ``resume`` state
            of another config or model.
    """
    cfg = config or GrowConfig()
    sgdist.require(distributed, "grow")
    if distributed and not strategy_for(cfg.strategy).distributed:
        raise ValueError(f"strategy {cfg.strategy!r} does not run under torch.distributed yet")
    if distributed and cfg.budget_latency_ms is not None:
        raise ValueError(
            "budget_latency_ms is measured per process, so it cannot steer a distributed run"
        )
    device = model_device(model)  # the data follows the model, moved once
    train_data = on_device(train_data, device)
    check_data(train_data, model, task, "train_data")
    if val_data:
        val_data = on_device(val_data, device)
        check_data(val_data, model, task, "val_data")
    split = Split(torch.cat([b[0] for b in train_data]), torch.cat([b[1] for b in train_data]))
    if distributed and len(split) < sgdist.world_size():
        raise ValueError(
            f"train_data has {len(split)} samples, fewer than the {sgdist.world_size()} processes"
        )

    def batches_of(rnd: int) -> Callable[[int], list[Batch]]:
        def epoch(e: int) -> list[Batch]:
            gen = torch.Generator().manual_seed(_seed(cfg.seed, rnd, e))
            return split.batches(cfg.batch_size, shuffle=True, generator=gen)

        return epoch

    example = train_data[0][0]
    eigen_data = list(train_data)
    if cfg.eigen_samples is not None and len(split) > cfg.eigen_samples:
        eigen_data, n = [], 0
        for x, y in batches_of(-1)(0):  # a shuffle of its own
            eigen_data.append((x[: cfg.eigen_samples - n], y[: cfg.eigen_samples - n]))
            n += len(eigen_data[-1][1])
            if n >= cfg.eigen_samples:
                break
    # each process computes the splitting statistics over its share (summed over processes)
    eigen_share = (
        sgdist.shard_samples(eigen_data, sgdist.rank(), sgdist.world_size())
        if distributed
        else eigen_data
    )
    history: list[dict[str, Any]] = []
    plans: list[dict[str, list[int]]] = []
    pairs: dict[str, list[list[int]]] = {}
    rnd, phase_state, elapsed, ended = 0, None, 0.0, ""
    if resume is not None:
        if resume.config != cfg.to_json():
            raise ValueError("resume: the checkpoint was made with another config")
        _check_progress(resume, cfg, math.ceil(len(split) / cfg.batch_size))
        try:
            model = _replay(model, resume.plans)
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"resume: the checkpoint's splits do not fit this model: {exc}"
            ) from exc
        _check_pairs(resume.pairs, model)
        try:
            model.load_state_dict(resume.model)
        except RuntimeError as exc:
            raise ValueError("resume: the checkpoint's model does not fit this model") from exc
        optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
        try:
            optimizer.load_state_dict(resume.optimizer)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"resume: the optimizer state does not fit: {exc}") from exc
        try:
            torch.set_rng_state(resume.rng["cpu"])
            if "cuda" in resume.rng and device.type == "cuda":
                torch.cuda.set_rng_state(resume.rng["cuda"], device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"resume: the RNG state is not valid: {exc}") from exc
        history, plans, pairs = list(resume.history), list(resume.plans), dict(resume.pairs)
        rnd, phase_state, elapsed = resume.round, resume.phase, resume.elapsed
        ended = resume.ended
        if resume.stopped:
            return GrowResult(model, history, resume.stopped)
    else:
        optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
    start = time.perf_counter() - elapsed

    def checkpoint(phase: Phase, stopped: str = "") -> None:
        if on_checkpoint is None:
            return
        on_checkpoint(
            GrowState(
                round=rnd, phase=Phase.from_json(copy.deepcopy(phase.to_json())),
                history=list(history), plans=list(plans),
                pairs={k: list(v) for k, v in pairs.items()},
                ended=ended, stopped=stopped, elapsed=time.perf_counter() - start,
                config=cfg.to_json(),
                model=model.state_dict(), optimizer=optimizer.state_dict(),
                rng=_rng_state(device),
            )
        )  # fmt: skip

    stopped = ""
    gen = torch.Generator().manual_seed(_seed(cfg.seed, -2))
    while True:
        last = rnd == cfg.rounds or bool(ended)
        epochs = _phase_epochs(cfg, rnd, bool(ended))
        phase = train_phase(
            model, optimizer, batches_of(rnd), loss_fn, epochs=epochs, schedule=cfg.schedule,
            plateau=cfg.plateau, progress=cfg.progress, resume=phase_state,
            on_checkpoint=checkpoint, checkpoint_steps=checkpoint_steps, distributed=distributed,
        )  # fmt: skip
        phase_state = None
        record: dict[str, Any] = {
            "round": rnd,
            "params": parameter_count(model),
            "flops": flops(model, example),
            **(
                {"latency_ms": latency_ms(model, example, warmup=10, repeats=50)["ms"]}
                if cfg.budget_latency_ms is not None
                else {}
            ),
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
            record["non_finite"] = phase.non_finite
        elif not last:
            gen.manual_seed(_seed(cfg.seed, -3, rnd))
            record["start_params"] = history[0]["params"] if history else record["params"]
            outcome = _split_round(
                model, cfg, loss_fn, eigen_data, record, gen, eigen_share, distributed
            )
            del record["start_params"]
            if isinstance(outcome, str):
                ended = outcome
                record["growth_ended"] = outcome
            elif outcome is not None:
                for stage in outcome:  # the splits, then the new neurons
                    optimizer = carry_state(
                        optimizer, model, stage.model, stage.growth, mode=cfg.carry,
                        fresh=stage.fresh,
                    )  # fmt: skip
                    model = stage.model
                    plans.append({k: [p for p, _ in v] for k, v in stage.pairs.items()})
                    for layer, new_pairs in stage.pairs.items():
                        pairs.setdefault(layer, []).extend([list(p) for p in new_pairs])
                if distributed:  # every process must now hold the same model
                    record["checksums_agree"] = sgdist.all_agree(sgdist.checksum(model))
        if (
            cfg.final_shrink is not None
            and not stopped
            and not last
            and (rnd + 1 == cfg.rounds or ended)
        ):  # the next phase is the last: shrink and perturb the grown model, restart the optimizer
            _shrink_perturb(model, cfg.final_shrink, _seed(cfg.seed, -4))
            optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
            record["shrink_perturb"] = cfg.final_shrink
        record["seconds"] = time.perf_counter() - start
        history.append(record)
        if on_record is not None:
            on_record(record, trained)
        if stopped or last:
            break
        rnd += 1
        checkpoint(Phase())  # the next phase, not yet started, with the split model
    if not stopped:
        stopped = ended or "rounds"
        checkpoint(phase, stopped)
    return GrowResult(model, history, stopped)


_BY_EIGEN = object()  # _scheduled: the eigenpairs decide this round


@dataclass
class _Plan:
    """What a round grows: new neurons per layer with default weights (``fresh``), or signed
    splits (directions at unit scale) with their ε, then new neurons with given weights."""

    fresh: dict[str, int] | None = None
    split: dict[str, SignedSplit] = field(default_factory=dict)
    eps: dict[str, Any] = field(default_factory=dict)
    new: dict[str, NewNeurons] = field(default_factory=dict)


@dataclass
class _Split:
    """One surgery of a round: the new model, how it grew, (parent, offspring) pairs, and whether
    the new slots are new neurons (their optimizer state starts at zero)."""

    model: nn.Module
    growth: GrowthMap
    pairs: dict[str, list[tuple[int, int]]]
    fresh: bool


def _split_round(
    model: nn.Module,
    cfg: GrowConfig,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    eigen_data: Sequence[Batch],
    record: dict[str, Any],
    gen: torch.Generator,
    eigen_share: Sequence[Batch] | None = None,
    distributed: bool = False,
) -> list[_Split] | str | None:
    """Ask the strategy for candidates, select and grow (recorded in ``record``): the round's
    surgeries in order, why growth stops, or (``None``) skip this round.

    With ``distributed``, every process computes the candidates over its ``eigen_share`` of
    ``eigen_data`` (summed over the processes); rank 0 alone selects the neurons and ε (the line
    search probes the first batch of ``eigen_data``) and broadcasts its plan and record; every
    process applies that plan.
    """
    plan = _scheduled(model, cfg, record)
    if plan is _BY_EIGEN:
        strategy = strategy_for(cfg.strategy)
        ctx = RoundContext(
            model=model, loss_fn=loss_fn, data=eigen_data,
            share=eigen_data if eigen_share is None else eigen_share, method=cfg.method,
            batchnorm=cfg.batchnorm, surrogate_beta=cfg.surrogate_beta, seed=cfg.seed,
            generator=gen, distributed=distributed, options=_options(cfg),
            micro_batch=cfg.eigen_micro_batch,
        )  # fmt: skip
        cands = strategy.candidates(ctx)
        faults.reached("split")
        record["eigen_samples"] = sum(len(y) for _, y in eigen_data)  # all processes' shares
        record.update(cands.record)
        if distributed:
            device = model_device(model)
            plan, rank0 = sgdist.from_main(
                lambda: (
                    _select(model, cfg, loss_fn, eigen_data, record, gen, strategy, ctx, cands),
                    record,
                ),
                device,
            )
            record.update(rank0)
        else:
            plan = _select(model, cfg, loss_fn, eigen_data, record, gen, strategy, ctx, cands)
    if not isinstance(plan, _Plan):
        return plan
    if plan.fresh is not None:
        new, growth, pairs = add_fresh_neurons(model, plan.fresh, generator=gen)
        record["split"] = dict(plan.fresh)
        return [_Split(new, growth, pairs, fresh=True)]
    stages = []
    if plan.split:
        structure = analyze(model)
        layers = structure.layers
        new, growth = signed_split_traced(model, structure, plan.split, eps=plan.eps)
        record["split"] = {k: int(e.idx.numel()) for k, e in plan.split.items()}
        pairs = {k: offspring_pairs(layers[k].n, e.idx) for k, e in plan.split.items()}
        stages.append(_Split(new, growth, pairs, fresh=False))
        model = new
    if plan.new:
        new, growth, pairs = add_neurons(model, plan.new, generator=gen)
        record["new"] = {k: v.count for k, v in plan.new.items()}
        stages.append(_Split(new, growth, pairs, fresh=True))
    return stages


def _options(cfg: GrowConfig) -> dict[str, Any]:
    """The strategy's own settings, from the config."""
    if cfg.strategy == "s3d":
        return {"max_share": cfg.signed_max_share, **cfg.strategy_options}
    return dict(cfg.strategy_options)


def _scheduled(model: nn.Module, cfg: GrowConfig, record: dict[str, Any]) -> Any:
    """The decisions made before any eigenpair: why growth stops (a budget is reached, a fixed
    schedule ran out), ``None`` (a round the schedule skips), a :class:`_Plan` of the schedule's
    new neurons, or ``_BY_EIGEN`` (the eigenpairs decide)."""
    params = record["params"]
    if cfg.budget_params is not None and params >= cfg.budget_params:
        return "budget"
    if cfg.budget_flops is not None and record["flops"] >= cfg.budget_flops:
        return "budget"
    if cfg.budget_latency_ms is not None and record["latency_ms"] >= cfg.budget_latency_ms:
        return "budget"
    if cfg.counts is None:
        return _BY_EIGEN
    # a fixed schedule (grow-fresh with another run's counts)
    rnd = int(record["round"])
    if rnd >= len(cfg.counts):
        return "schedule"
    counts = {k: v for k, v in cfg.counts[rnd].items() if v}
    if counts and cfg.budget_params is not None:  # never past the budget
        structure = analyze(model)
        modules = dict(model.named_modules())
        costs = {k: added_parameters(structure.require(k), modules) for k in counts}
        while counts:
            as_idx = {k: torch.arange(v) for k, v in counts.items()}
            if params + _added(as_idx, structure, modules, costs) <= cfg.budget_params:
                break
            top = max(counts, key=lambda k: counts[k])
            counts[top] -= 1
            counts = {k: v for k, v in counts.items() if v}
    if not counts:
        record["split"] = {}
        return None  # a round the schedule (or the budget) skips
    return _Plan(fresh=counts)


def _select(
    model: nn.Module,
    cfg: GrowConfig,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    eigen_data: Sequence[Batch],
    record: dict[str, Any],
    gen: torch.Generator,
    strategy: Strategy,
    ctx: RoundContext,
    cands: Candidates,
) -> _Plan | str | None:
    """The candidates to grow under the round's budgets, their directions and ε (recorded in
    ``record``), why growth stops, or ``None`` (skip this round); never mutates ``model``."""
    params = record["params"]
    structure = analyze(model)
    modules = dict(model.named_modules())
    values = dict(cands.scores)
    raw = dict(values)  # the predicted loss changes (values may be rescaled for ranking)
    widths = {k: structure.layers[k].n for k in values}
    costs = {k: added_parameters(structure.layers[k], modules) for k in values}
    # a candidate may add several neurons (gradmax's pairs): selection charges them all
    size = {k: int(cands.size.get(k, 1)) for k in values}

    def per_candidate(c: Mapping[str, int]) -> dict[str, int]:
        return {k: c[k] * size[k] for k in values}

    def neurons(plan: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: torch.arange(int(v.numel()) * size[k]) for k, v in plan.items()}

    max_widths = {  # in candidates
        k: widths[k] + max(0, w - widths[k]) // size[k]
        for k, w in cfg.max_widths.items()
        if k in values
    }
    budget = None if cfg.budget_params is None else cfg.budget_params - params
    if cfg.reach_budget and cfg.budget_params is not None and budget is not None:
        start = float(record["start_params"])
        target = start * (cfg.budget_params / start) ** ((record["round"] + 1) / cfg.rounds)
        budget = min(budget, max(0, int(target) - params))
    if cfg.selection in ("per-layer", "energy"):  # each layer's λ in units of its most negative
        # ... but never of less than NORMALISE_FLOOR of the largest such unit, so that a layer
        # whose λ are round-off is not lifted to the others' scale
        units = {k: float(-v.min()) for k, v in values.items()}
        floor = max([NORMALISE_FLOOR * u for u in units.values()] + [1e-30])
        values = {k: v / max(units[k], floor) for k, v in values.items()}
    flop_budget: int | None = None  # FLOPs this round may add (selection "energy" only)
    rates: dict[str, float] = {}
    flop_costs: dict[str, int] = {}
    latency_budget: int | None = None  # ns this round may add (selection "energy" only)
    latency_costs: dict[str, int] = {}
    if cfg.selection == "energy":
        rates = flops_per_weight(model, eigen_data[0][0][:1])
        flop_costs = {k: added_flops(structure.layers[k], modules, rates) for k in values}
        caps = [b for b in (budget, cfg.round_budget_params) if b is not None]
        budget = min(caps) if caps else None
        caps = [b for b in (cfg.round_budget_flops,) if b is not None]
        if cfg.budget_flops is not None:
            caps.append(max(0, cfg.budget_flops - int(record["flops"])))
        flop_budget = min(caps) if caps else None
        caps = [b for b in (cfg.round_budget_latency_ms,) if b is not None]
        if cfg.budget_latency_ms is not None:
            caps.append(max(0.0, cfg.budget_latency_ms - float(record["latency_ms"])))
        if caps:
            _, latency_costs = added_latency(model, eigen_data[0][0], list(values))
            latency_budget = round(min(caps) * 1e6)  # ns
        limits = {
            "params": (budget, per_candidate(costs)),
            "flops": (flop_budget, per_candidate(flop_costs)),
            "latency": (latency_budget, per_candidate(latency_costs) if latency_costs else {}),
        }
        chosen = energy_select(
            values, widths, ratio=cfg.grow_ratio, max_widths=max_widths,
            costs={r: c for r, (b, c) in limits.items() if b is not None},
            budgets={r: b for r, (b, _) in limits.items() if b is not None},
        )  # fmt: skip
    else:
        chosen = s2d_select(
            values, widths, ratio=cfg.grow_ratio, max_widths=max_widths,
            costs=per_candidate(costs),
            budget=budget,
        )  # fmt: skip

    def over(plan: Mapping[str, Tensor]) -> bool:
        plan = neurons(plan)
        if budget is not None and _added(plan, structure, modules, costs) > budget:
            return True
        if latency_budget is not None and (
            sum(latency_costs[k] * int(v.numel()) for k, v in plan.items()) > latency_budget
        ):
            return True
        return flop_budget is not None and (
            _added(plan, structure, modules, flop_costs, rates) > flop_budget
        )

    if budget is not None or flop_budget is not None or latency_budget is not None:
        # a layer split with its consumer adds k·k' cross weights: trim
        while chosen and over(chosen):
            layer, i = max(
                ((k, i) for k, idx in chosen.items() for i in range(idx.numel())),
                key=lambda t: float(values[t[0]][chosen[t[0]][t[1]]]),  # as selected
            )
            keep = torch.ones(chosen[layer].numel(), dtype=torch.bool)
            keep[i] = False
            chosen = {k: (v[keep] if k == layer else v) for k, v in chosen.items()}
            chosen = {k: v for k, v in chosen.items() if v.numel()}
    if cfg.selection == "energy":
        record["energy"] = {
            "objective": sum(float(values[k][v].sum()) for k, v in chosen.items()),
            "params_added": _added(neurons(chosen), structure, modules, costs),
            "flops_added": _added(neurons(chosen), structure, modules, flop_costs, rates),
            "budget_params": budget,
            "budget_flops": flop_budget,
            **(
                {
                    "latency_added_ms": sum(
                        latency_costs[k] * int(v.numel()) for k, v in neurons(chosen).items()
                    )
                    / 1e6,
                    "budget_latency_ms": latency_budget / 1e6,
                    "latency_ms_per_neuron": {k: c / 1e6 for k, c in latency_costs.items()},
                }
                if latency_budget is not None
                else {}
            ),
        }
    if not chosen:
        unstable = any(x < 0 for v in values.values() for x in v.tolist())
        if unstable and cfg.reach_budget and record["round"] + 1 < cfg.rounds:
            record["split"] = {}
            return None  # this round's share of the budget is spent; later rounds get more
        budgeted = budget is not None or flop_budget is not None or latency_budget is not None
        return "budget" if budgeted and unstable else "stable"
    if cfg.directions == "fresh":
        return _Plan(fresh={k: int(v.numel()) for k, v in chosen.items()})
    grown = strategy.plan(ctx, cands, chosen)
    record.update(cands.record)  # what the plan added to it (e.g. gradmax's unpaired neurons)
    plan = dict(grown.split)
    if cfg.directions in ("random", "net2net"):  # baselines: same neurons, random directions
        for k, e in plan.items():
            v = torch.randn(len(e.idx), e.parent.shape[1], generator=gen, dtype=torch.float64)
            v = (v / v.norm(dim=1, keepdim=True)).to(e.parent)
            plan[k] = SignedSplit(e.idx, v, -v, e.share)
    if not plan:
        return _Plan(new=grown.new)
    norms = {
        k: unit_theta(structure.layers[k], modules)[e.idx].norm(dim=1).to(e.parent.dtype)
        for k, e in plan.items()
    }
    if cfg.directions == "net2net":
        eps: dict[str, Any] = {k: NET2NET_NOISE * norms[k] for k in plan}
        record["eps"] = NET2NET_NOISE
    elif cfg.eps_mode == "fixed":
        eps = {k: cfg.eps for k in plan}
        record["eps"] = cfg.eps
    elif cfg.eps_mode == "relative":
        eps = {k: cfg.eps * norms[k] for k in plan}
        record["eps"] = cfg.eps
    else:
        best = (math.inf, cfg.eps_grid[0])
        probe = list(eigen_data)[:1]
        for factor in cfg.eps_grid:
            trial, _ = signed_split_traced(
                model, structure, plan, eps={k: factor * norms[k] for k in plan}
            )
            loss = evaluate(trial, probe, loss_fn, "regression")["loss"]
            best = min(best, (loss, factor))
        eps = {k: best[1] * norms[k] for k in plan}
        record["eps"] = best[1]
    if cfg.directions == "eigen" and strategy.kind == "split":  # Σ ε²/2·score: second order
        record["predicted_loss_change"] = sum(
            float(
                (torch.as_tensor(eps[k]).double().cpu() ** 2 * raw[k][e.idx].double().cpu()).sum()
                / 2
            )
            for k, e in plan.items()
        )
    return _Plan(split=plan, eps=eps, new=grown.new)


def _added(
    chosen: Mapping[str, Tensor], structure: Any, modules: Mapping[str, nn.Module],
    costs: Mapping[str, int], rates: Mapping[str, float] | None = None,
) -> int:  # fmt: skip
    """Parameters the split adds: each neuron's cost, plus the weights between new neurons of a
    layer and new neurons of its consumer (which neither cost counts). With ``rates`` (FLOPs per
    weight element of each module) and FLOPs ``costs``: the FLOPs it adds."""
    total = sum(costs[k] * int(v.numel()) for k, v in chosen.items())
    for k, v in chosen.items():
        for consumer in structure.layers[k].consumers:
            unit = structure.unit_of(consumer.name)
            if unit in chosen:
                weight = modules[consumer.name].weight
                assert isinstance(weight, Tensor)
                kernel = int(weight[0, 0].numel())
                blocks = occurrences(consumer.segments, k)
                cross = (
                    int(v.numel()) * int(chosen[unit].numel()) * consumer.block * kernel * blocks
                )
                total += cross if rates is None else round(rates.get(consumer.name, 0.0) * cross)
    return total
