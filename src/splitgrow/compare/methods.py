"""The methods ``compare`` runs: splitting, its naive-growth controls, training from scratch,
pruning a wide network (Torch-Pruning) and width search (Optuna), on one shared footing.

Every method gets the same data, the same number of training epochs, the same optimizer family
(and a learning rate tuned the same way), the same batch size, and must end at no more than the
parameter budget. Each returns a :class:`Outcome`: the final model and what it cost.

With ``Setting.distributed`` every process of torch.distributed's default group runs every
method together: training goes through ``train_phase``/``grow`` with ``distributed=True`` (each
process trains on its share of every batch), and every decision that is not training (Torch-
Pruning's pruned network, the search's widths and scores) is made on rank 0 and broadcast.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from splitgrow import distributed as sgdist
from splitgrow.data import Dataset, Split
from splitgrow.metrics import flops, parameter_count
from splitgrow.models import Architecture, widths_of
from splitgrow.training import GrowConfig, evaluate, grow, make_optimizer, train_phase
from splitgrow.training.grow import _seed

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Setting:
    """What every method shares (see :class:`splitgrow.compare.CompareConfig`)."""

    data: Dataset
    arch: Architecture  # the starting architecture (growth starts here; others scale it)
    budget: int  # parameters, never exceeded
    epochs: int  # training epochs of every method
    rounds: int  # growth rounds
    epochs_per_round: int  # growth: epochs between splits (the rest trains after the last)
    grow_ratio: float
    final_shrink: float | None  # growth methods: shrink and perturb before the last phase
    eigen_samples: int | None  # growth methods: splitting statistics over this many samples
    optimizer: str
    batch_size: int
    nas_trials: int  # candidates per search
    prune_wide: float  # the wide network's widths: this × the uniform network's at the budget
    prune_finetune: float  # fraction of the epochs that fine-tune after pruning
    slim_penalty: float  # network slimming: L1 coefficient on BatchNorm scales
    device: torch.device
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    distributed: bool = False  # every process of the default group runs every method together


T = TypeVar("T")


def on_main(fn: Callable[[], T], s: Setting) -> T:
    """``fn()``, evaluated on rank 0 and broadcast when ``s.distributed`` (an exception too)."""
    return sgdist.from_main(fn) if s.distributed else fn()


@dataclass
class Outcome:
    """A method's final model and what producing it cost."""

    model: nn.Module
    epochs_run: float = 0.0  # training sample-passes, in units of the training set
    train_flops: float = 0.0  # Σ 3 × forward FLOPs per sample × samples trained
    trajectory: list[tuple[int, float]] = field(default_factory=list)  # (params, test acc)
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific facts


def batches_of(split: Split, size: int, device: torch.device) -> list[Batch]:
    return [(x.to(device), y.to(device)) for x, y in split.batches(size)]


def _example(s: Setting) -> Tensor:
    return s.data.train.x[:1].to(s.device)


def build_model(arch: Architecture, seed: int, s: Setting) -> nn.Module:
    torch.manual_seed(seed)
    return arch.build().to(s.device)


def train(
    model: nn.Module, s: Setting, lr: float, epochs: int, seed: int, tag: str,
    after_backward: Callable[[], Any] | None = None,
) -> tuple[float, int, str]:  # fmt: skip
    """Train ``epochs`` epochs (one cosine phase); returns the training FLOPs spent, the epochs
    run and why the phase ended ("epochs" or "non-finite")."""
    split = s.data.train
    n = len(split)
    opt = make_optimizer(model, s.optimizer, lr, 0.9, 0.0)
    salt = sum(map(ord, tag))

    def epoch(e: int) -> list[Batch]:
        gen = torch.Generator().manual_seed(_seed(seed, salt, e))
        return [
            (x.to(s.device), y.to(s.device))
            for x, y in split.batches(s.batch_size, shuffle=True, generator=gen)
        ]

    phase = train_phase(
        model, opt, epoch, s.loss_fn, epochs=epochs, after_backward=after_backward,
        distributed=s.distributed,
    )  # fmt: skip
    run = phase.epoch + (phase.non_finite or {}).get("batch", 0) * s.batch_size / n
    return 3.0 * flops(model, _example(s)) * n * run, phase.epoch, phase.stopped


def test_accuracy(model: nn.Module, s: Setting) -> float:
    return evaluate(model, batches_of(s.data.test, 512, s.device), s.loss_fn, s.data.task).get(
        "accuracy", math.nan
    )


def val_accuracy(model: nn.Module, s: Setting) -> float:
    return evaluate(model, batches_of(s.data.val, 512, s.device), s.loss_fn, s.data.task).get(
        "accuracy", math.nan
    )


# ---------------------------------------------------------------------------------------------
# growth: s2d and its controls


def _growth(
    s: Setting, lr: float, seed: int, *, method: str = "auto", directions: str = "eigen",
    counts: list[dict[str, int]] | None = None, strategy: str = "s2d", selection: str = "per-layer",
) -> Outcome:  # fmt: skip
    final = s.epochs - s.rounds * s.epochs_per_round
    cfg = GrowConfig(
        rounds=s.rounds, epochs_per_round=s.epochs_per_round, final_epochs=final,
        optimizer=s.optimizer, lr=lr, batch_size=s.batch_size, grow_ratio=s.grow_ratio,
        method=method, directions=directions, counts=counts, budget_params=s.budget, seed=seed,
        reach_budget=counts is None, strategy=strategy, selection=selection,
        final_shrink=s.final_shrink, eigen_samples=s.eigen_samples,
    )  # fmt: skip
    trajectory: list[tuple[int, float]] = []
    eval_s = [0.0]

    def follow(record: dict[str, Any], trained: nn.Module) -> None:
        if not sgdist.is_main():  # rank 0's outcome is the one recorded
            return
        start = time.perf_counter()
        trajectory.append((record["params"], test_accuracy(trained, s)))
        eval_s[0] += time.perf_counter() - start

    model = build_model(s.arch, seed, s)
    res = grow(
        model,
        batches_of(s.data.train, s.batch_size, s.device),
        loss_fn=s.loss_fn,
        task=s.data.task,
        config=cfg,
        on_record=follow,
        distributed=s.distributed,
    )
    n = len(s.data.train)
    spent = sum(3.0 * r["flops"] * n * r["epochs"] for r in res.history)
    follow({"params": parameter_count(res.model)}, res.model)
    counts_made = [dict(r.get("split", {})) for r in res.history if "split" in r]
    return Outcome(
        res.model, float(sum(r["epochs"] for r in res.history)), spent, trajectory,
        {"counts": counts_made, "stopped": res.stopped, "eval_s": eval_s[0]},
    )  # fmt: skip


def s2d(s: Setting, lr: float, seed: int, ref: Outcome | None) -> Outcome:
    return _growth(s, lr, seed, method="exact")


def s2d_fast(s: Setting, lr: float, seed: int, ref: Outcome | None) -> Outcome:
    return _growth(s, lr, seed, method="fast")


def s2d_energy(s: Setting, lr: float, seed: int, ref: Outcome | None) -> Outcome:
    """s2d with energy-aware selection: least Σ λ within each round's share of the budget."""
    return _growth(s, lr, seed, selection="energy")


def s3d(s: Setting, lr: float, seed: int, ref: Outcome | None) -> Outcome:
    return _growth(s, lr, seed, strategy="s3d")


def gradmax(s: Setting, lr: float, seed: int, ref: Outcome | None) -> Outcome:
    return _growth(s, lr, seed, strategy="gradmax")


def firefly(s: Setting, lr: float, seed: int, ref: Outcome | None) -> Outcome:
    return _growth(s, lr, seed, strategy="firefly")


def random_split(s: Setting, lr: float, seed: int, ref: Outcome | None) -> Outcome:
    return _growth(s, lr, seed, directions="random")


def net2net(s: Setting, lr: float, seed: int, ref: Outcome | None) -> Outcome:
    return _growth(s, lr, seed, directions="net2net")


def grow_fresh(s: Setting, lr: float, seed: int, ref: Outcome | None) -> Outcome:
    assert ref is not None
    counts = [c for c in ref.extra["counts"]]
    return _growth(s, lr, seed, directions="fresh", counts=counts)


# ---------------------------------------------------------------------------------------------
# fixed architectures


def scratch(s: Setting, lr: float, seed: int, ref: Outcome | None) -> Outcome:
    """s2d's final architecture, from random initialisation, for all the epochs."""
    assert ref is not None
    model = build_model(s.arch.with_widths(widths_of(ref.model)), seed, s)
    return _trained(model, s, lr, seed, "scratch")


def _trained(model: nn.Module, s: Setting, lr: float, seed: int, tag: str) -> Outcome:
    spent, epochs, stopped = train(model, s, lr, s.epochs, seed, tag)
    return Outcome(model, float(epochs), spent, extra={"stopped": stopped})


def uniform_widths(arch: Architecture, budget: int) -> list[int]:
    """The starting widths × one multiplier, the largest whose model fits ``budget``."""
    return fit_shares(arch, [float(w) for w in arch.widths], budget)


def uniform(s: Setting, lr: float, seed: int, ref: Outcome | None) -> Outcome:
    model = build_model(s.arch.with_widths(uniform_widths(s.arch, s.budget)), seed, s)
    return _trained(model, s, lr, seed, "uniform")


# ---------------------------------------------------------------------------------------------
# pruning a wide network (Torch-Pruning)


def _classifier(model: nn.Module) -> nn.Module:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1]


def _prune_to_budget(model: nn.Module, s: Setting, make_pruner: Callable[..., Any]) -> nn.Module:
    """The largest pruning of ``model`` (a copy, by one ratio) that fits the budget."""

    def pruned(ratio: float) -> nn.Module:
        m = copy.deepcopy(model)
        pruner = make_pruner(m, ratio)
        pruner.step()
        return m

    lo, hi = 0.0, 1.0
    best = model if parameter_count(model) <= s.budget else None
    for _ in range(24):
        mid = (lo + hi) / 2
        m = pruned(mid)
        if parameter_count(m) <= s.budget:
            best, hi = m, mid
        else:
            lo = mid
    if best is None:
        raise ValueError(f"pruning cannot bring the wide model under {s.budget} parameters")
    return best


def _prune(s: Setting, lr: float, seed: int, slim: bool) -> Outcome:
    import torch_pruning as tp

    wide_widths = [max(1, round(s.prune_wide * w)) for w in uniform_widths(s.arch, s.budget)]
    model = build_model(s.arch.with_widths(wide_widths), seed, s)
    finetune = max(1, round(s.prune_finetune * s.epochs))
    wide_epochs = s.epochs - finetune
    example = s.data.train.x[:2].to(s.device)
    ignored = [_classifier(model)]
    after_backward = None
    if slim:
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise ValueError("prune-slim needs BatchNorm layers; this model has none")
        regularizer = tp.pruner.BNScalePruner(
            model, example, importance=tp.importance.BNScaleImportance(),
            reg=s.slim_penalty, ignored_layers=ignored,
        )  # fmt: skip
        after_backward = lambda: regularizer.regularize(model)  # noqa: E731
    spent, wide_run, stopped = train(
        model, s, lr, wide_epochs, seed, "wide", after_backward=after_backward
    )
    wide_params = parameter_count(model)

    def make_pruner(m: nn.Module, ratio: float) -> Any:
        head = [_classifier(m)]
        if slim:  # network slimming: one global threshold on the BatchNorm scales
            return tp.pruner.BNScalePruner(
                m, example, importance=tp.importance.BNScaleImportance(), pruning_ratio=ratio,
                global_pruning=True, ignored_layers=head,
            )  # fmt: skip
        # Li et al.: per layer, the filters of smallest L1 norm
        imp = tp.importance.MagnitudeImportance(p=1, group_reduction="first", normalizer=None)
        return tp.pruner.BasePruner(
            m, example, importance=imp, pruning_ratio=ratio, ignored_layers=head
        )

    # rank 0 prunes (every rank holds the same trained wide model) and hands the result over
    model = on_main(lambda: _prune_to_budget(model, s, make_pruner).cpu(), s).to(s.device)
    tuned, tune_run, tune_stopped = train(model, s, lr, finetune, seed, "finetune")
    return Outcome(
        model, float(wide_run + tune_run), spent + tuned,
        extra={"wide_widths": wide_widths, "wide_params": wide_params,
               "stopped": stopped if stopped != "epochs" else tune_stopped},
    )  # fmt: skip


def prune_l1(s: Setting, lr: float, seed: int, ref: Outcome | None) -> Outcome:
    return _prune(s, lr, seed, slim=False)


def prune_slim(s: Setting, lr: float, seed: int, ref: Outcome | None) -> Outcome:
    return _prune(s, lr, seed, slim=True)


# ---------------------------------------------------------------------------------------------
# width search (Optuna)


def fit_shares(arch: Architecture, shares: Sequence[float], budget: int) -> list[int]:
    """Widths proportional to ``shares``, scaled up as far as the budget allows."""
    base = arch.with_widths([1] * len(arch.widths))
    if parameter_count(base.build()) > budget:
        raise ValueError(f"budget {budget} is below the smallest model of this shape")

    def widths(scale: float) -> list[int]:
        return [max(1, int(scale * f)) for f in shares]

    def size(scale: float) -> int:
        return parameter_count(arch.with_widths(widths(scale)).build())

    lo, hi = 0.0, 1.0
    while size(hi) <= budget:
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if size(mid) <= budget else (lo, mid)
    return widths(lo)


def _search(s: Setting, lr: float, seed: int, sampler_name: str) -> Outcome:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = (
        optuna.samplers.RandomSampler(seed=seed)
        if sampler_name == "random"
        else optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(4, s.nas_trials))
    )
    study = optuna.create_study(direction="maximize", sampler=sampler)
    models: dict[int, nn.Module] = {}
    spent = 0.0
    passes: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        nonlocal spent
        shares = [trial.suggest_float(f"w{i}", 0.05, 1.0) for i in range(len(s.arch.widths))]
        # rank 0's sampler decides (the samplers see the same scores on every rank anyway)
        widths = on_main(lambda: fit_shares(s.arch, shares, s.budget), s)
        trial.set_user_attr("widths", widths)
        model = build_model(s.arch.with_widths(widths), _seed(seed, trial.number), s)
        flops_spent, epochs, stopped = train(model, s, lr, s.epochs, seed, f"nas{trial.number}")
        spent += flops_spent
        passes.append(epochs)
        models[trial.number] = model
        return on_main(lambda: val_accuracy(model, s) if stopped == "epochs" else 0.0, s)

    study.optimize(objective, n_trials=s.nas_trials)
    best = study.best_trial
    return Outcome(
        models[best.number], float(sum(passes)), spent,
        extra={"candidates": [t.user_attrs["widths"] for t in study.trials]},
    )  # fmt: skip


def nas_random(s: Setting, lr: float, seed: int, ref: Outcome | None) -> Outcome:
    return _search(s, lr, seed, "random")


def nas_tpe(s: Setting, lr: float, seed: int, ref: Outcome | None) -> Outcome:
    return _search(s, lr, seed, "tpe")


Method = Callable[[Setting, float, int, Outcome | None], Outcome]
#: every method, in the order compare runs them (s2d first: scratch and grow-fresh need its run)
METHODS: dict[str, Method] = {
    "s2d": s2d,
    "s2d-fast": s2d_fast,
    "s2d-energy": s2d_energy,
    "s3d": s3d,
    "gradmax": gradmax,
    "firefly": firefly,
    "random-split": random_split,
    "net2net": net2net,
    "grow-fresh": grow_fresh,
    "scratch": scratch,
    "uniform": uniform,
    "prune-l1": prune_l1,
    "prune-slim": prune_slim,
    "nas-random": nas_random,
    "nas-tpe": nas_tpe,
}
NEEDS_S2D = ("grow-fresh", "scratch")


def timed(
    fn: Method, s: Setting, lr: float, seed: int, ref: Outcome | None
) -> tuple[Outcome, float]:
    """The outcome and the seconds it took (less the growth trajectory's test evaluations)."""
    start = time.perf_counter()
    out = fn(s, lr, seed, ref)
    return out, time.perf_counter() - start - float(out.extra.get("eval_s", 0.0))
