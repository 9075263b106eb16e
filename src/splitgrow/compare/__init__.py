"""``compare``: every method to the same parameter budget, on the same data and footing.

For each method the learning rate is first tuned on the validation split (the same grid and the
same number of trials for every method, at a seed of its own); then every method runs once per
seed with its tuned rate. s2d runs first in each seed: ``scratch`` trains its final architecture
from random initialisation, and ``grow-fresh`` repeats its growth schedule with new neurons.

The run directory gets ``config.json``, ``tuning.json`` (validation accuracy per method and
rate), ``log.jsonl`` and ``results.json`` (one record per method and seed, rewritten after each),
``table.md`` (mean ± std over seeds) and ``pareto.png``.

With ``distributed=True`` every process of torch.distributed's default group calls
:func:`run_compare` together (``splitgrow compare`` under torchrun): each method trains on every
process's share of every batch, rank 0 makes the other decisions (pruning, search, scores) and
broadcasts them, and rank 0 alone writes the run directory. Every record says ``world_size``
and, when distributed, whether every process ended the method with the same parameters
(``checksums_agree``).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from splitgrow import data as datasets
from splitgrow import distributed as sgdist
from splitgrow.compare.methods import (
    METHODS,
    NEEDS_S2D,
    Outcome,
    Setting,
    on_main,
    timed,
    uniform_widths,
    val_accuracy,
)
from splitgrow.metrics import flops, latency_ms, parameter_count
from splitgrow.models import MODELS, Architecture, widths_of
from splitgrow.runs import RunDir
from splitgrow.training import evaluate
from splitgrow.training.grow import check_final_shrink

TUNE_SEED = 1000  # the seed of the tuning runs (never one of the reported seeds)
#: methods that grow (and so need rounds ≥ 1): s2d's controls and those built on its run
GROWTH_METHODS = ("s2d", "s2d-fast", "random-split", "net2net", "grow-fresh", "scratch")


@dataclass(frozen=True)
class CompareConfig:
    """Settings of a comparison (plain values: the config is JSON)."""

    dataset: str = "mnist1d"
    model: str = "mlp"
    widths: list[int] | None = None  # starting widths (default: the model's)
    activation: str | None = None
    budget_params: int = 6000
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: int = 3
    epochs: int = 150  # training epochs of every method
    # growth: 5 rounds, then the rest of the epochs. Epochs per round, by default a third of the
    # epochs over the rounds, at most 5 (150 epochs: 5 × 5; 60 epochs, 6 rounds: 6 × 3). Longer
    # phases left too little for the final shape on digits (6 × 6 of 60 epochs: −0.8 for s2d, 10
    # seeds), and on MNIST-1D 10 × 10 of 150 did no better than 5 × 5 within noise
    # (benchmarks/results/schedule_digits.md)
    rounds: int = 5
    epochs_per_round: int | None = None
    grow_ratio: float = 0.5  # a cap per round: growth is spread to reach the budget
    final_shrink: float | None = 0.3  # growth methods: GrowConfig.final_shrink (None: off)
    # growth methods: the splitting statistics over at most this many training samples
    # (GrowConfig.eigen_samples, the same default; None: all)
    eigen_samples: int | None = 4096
    optimizer: str = "sgd"
    lr_grid: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.1])
    tune_trials: int = 3  # rates of the grid tried per method (the first ones)
    batch_size: int = 128
    nas_trials: int = 8
    prune_wide: float = 4.0
    prune_finetune: float = 1 / 3
    slim_penalty: float = 1e-4
    data_dir: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        defaulted = self.epochs_per_round is None
        if defaulted and isinstance(self.epochs, int):  # frozen: resolve it here
            rounds = self.rounds if isinstance(self.rounds, int) else 1
            object.__setattr__(
                self, "epochs_per_round", default_epochs_per_round(self.epochs, rounds)
            )
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods are listed twice: {self.methods}")
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose from {', '.join(MODELS)}")
        optional = ("eigen_samples",)  # None allowed
        for name in ("budget_params", "seeds", "epochs", "epochs_per_round", "batch_size",
                     "nas_trials", "tune_trials", *optional):  # fmt: skip
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                also = " or None" if name in optional else ""
                raise ValueError(f"{name} must be a positive integer{also}, got {value!r}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 0:
            raise ValueError(f"rounds must be a non-negative integer, got {self.rounds!r}")
        growing = [m for m in self.methods if m in GROWTH_METHODS]
        if growing and self.rounds < 1:
            raise ValueError(f"{', '.join(growing)} need at least one growth round (rounds ≥ 1)")
        assert self.epochs_per_round is not None  # checked above
        if self.rounds * self.epochs_per_round >= self.epochs:
            raise ValueError(
                f"rounds × epochs_per_round ({self.rounds} × {self.epochs_per_round}"
                f"{', its default' if defaulted else ''}) must be below epochs ({self.epochs}): "
                "the last phase needs at least one epoch"
            )
        if self.tune_trials > len(self.lr_grid):
            raise ValueError(
                f"tune_trials {self.tune_trials} > {len(self.lr_grid)} rates in lr_grid"
            )
        if not self.lr_grid or any(not (0 < lr < math.inf) for lr in self.lr_grid):
            raise ValueError(f"lr_grid must hold positive rates, got {self.lr_grid}")
        if not 0 < self.grow_ratio <= 1:
            raise ValueError(f"grow_ratio must be in (0, 1], got {self.grow_ratio}")
        check_final_shrink(self.final_shrink)
        if not self.prune_wide > 1:
            raise ValueError(f"prune_wide must be above 1, got {self.prune_wide}")
        if not 0 < self.prune_finetune < 1:
            raise ValueError(f"prune_finetune must be in (0, 1), got {self.prune_finetune}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")


def default_epochs_per_round(epochs: int, rounds: int) -> int:
    """A third of ``epochs`` spread over ``rounds`` growth phases, at least 1 and at most 5."""
    return max(1, min(5, epochs // (3 * max(1, rounds))))


def make_setting(cfg: CompareConfig) -> Setting:
    import torch.nn.functional as F

    data = datasets.load(cfg.dataset, seed=0, data_dir=cfg.data_dir)
    if data.task != "classification":
        raise ValueError(f"compare needs a classification data set; {cfg.dataset} is regression")
    spec = MODELS[cfg.model]
    arch = Architecture(
        cfg.model, list(cfg.widths or spec.default_widths),
        cfg.activation or spec.default_activation, data.in_shape, data.classes,
    )  # fmt: skip
    start = parameter_count(arch.build())
    if start > cfg.budget_params:
        raise ValueError(
            f"budget_params {cfg.budget_params} is smaller than the starting model ({start})"
        )
    assert cfg.epochs_per_round is not None  # resolved in CompareConfig.__post_init__
    return Setting(
        data=data, arch=arch, budget=cfg.budget_params, epochs=cfg.epochs, rounds=cfg.rounds,
        epochs_per_round=cfg.epochs_per_round, grow_ratio=cfg.grow_ratio,
        final_shrink=cfg.final_shrink, eigen_samples=cfg.eigen_samples, optimizer=cfg.optimizer,
        batch_size=cfg.batch_size, nas_trials=cfg.nas_trials,
        prune_wide=cfg.prune_wide, prune_finetune=cfg.prune_finetune,
        slim_penalty=cfg.slim_penalty, device=torch.device(cfg.device), loss_fn=F.cross_entropy,
    )  # fmt: skip


def check_setting(cfg: CompareConfig) -> Setting:
    """The comparison's setting, raising ``ValueError`` now for what would fail later: the
    data, the model, the budget."""
    s = make_setting(cfg)
    uniform_widths(s.arch, s.budget)
    return s


def _order(methods: Sequence[str]) -> list[str]:
    """s2d first when a method needs its run (it is added, unreported, if not asked for)."""
    first = "s2d" in methods or any(m in NEEDS_S2D for m in methods)
    return (["s2d"] if first else []) + [m for m in METHODS if m in methods and m != "s2d"]


def _record(
    method: str, seed: int, lr: float, out: Outcome, wall: float, s: Setting
) -> dict[str, Any]:
    test = evaluate(
        out.model,
        [(x.to(s.device), y.to(s.device)) for x, y in s.data.test.batches(512)],
        s.loss_fn,
        s.data.task,
    )
    return {
        "method": method,
        "seed": seed,
        "lr": lr,
        "params": parameter_count(out.model),
        "flops": flops(out.model, s.data.test.x[:1].to(s.device)),
        # ONNX Runtime, CPU, batch 1, one thread: median of 50 runs
        "latency_ms": latency_ms(out.model, s.data.test.x[:1], warmup=10, repeats=50)["ms"],
        "widths": widths_of(out.model),
        "test_acc": test["accuracy"],
        "test_loss": test["loss"],
        "val_acc": val_accuracy(out.model, s),
        "gradient_passes": round(out.epochs_run * len(s.data.train)),
        "train_flops": out.train_flops,
        "wall_s": wall,
        "trajectory": out.trajectory,
        "world_size": sgdist.world_size(),
        **{k: v for k, v in out.extra.items() if k not in ("counts",)},
    }


def run_compare(
    cfg: CompareConfig, out: str | Path, *, progress: bool = False,
    on_record: Callable[[dict[str, Any]], Any] | None = None, setting: Setting | None = None,
    distributed: bool = False,
) -> list[dict[str, Any]]:  # fmt: skip
    """Run the comparison into the run directory ``out``; returns the records. ``setting``:
    the one :func:`check_setting` made for ``cfg`` (else it is made here).

    ``distributed``: every process of torch.distributed's default group calls this together
    (see the module's notes); every process returns the same records (rank 0's), and only rank 0
    writes ``out`` and calls ``on_record``.
    """
    sgdist.require(distributed, "run_compare")
    s = dataclasses.replace(setting or make_setting(cfg), distributed=distributed)
    main = sgdist.is_main()
    run = RunDir(out) if main else None
    if run is not None:
        run.write_json("config.json", asdict(cfg))
    order = _order(cfg.methods)
    grid = cfg.lr_grid[: cfg.tune_trials]
    total = (len(grid) + cfg.seeds) * len(order)
    bar = tqdm(total=total, desc="compare", disable=None if progress and main else True)
    skipped: dict[str, str] = {}

    def attempt(
        method: str, lr: float, seed: int, ref: Outcome | None
    ) -> tuple[Outcome, float] | None:
        bar.set_postfix_str(f"{method} lr={lr} seed={seed}")
        if method in NEEDS_S2D and ref is None:
            skipped[method] = "it needs s2d's run, which did not run"
            bar.update(1)
            return None
        try:
            return timed(METHODS[method], s, lr, seed, ref)
        except ValueError as exc:  # a method that does not apply (prune-slim without BN …)
            skipped[method] = str(exc)
            return None
        finally:
            bar.update(1)

    # 1. tune the learning rate of every method on the validation split
    tuning: dict[str, dict[str, float]] = {m: {} for m in order}
    for lr in grid:
        refs: dict[str, Outcome] = {}
        for method in order:
            if method in skipped:
                bar.update(1)
                continue
            got = attempt(method, lr, TUNE_SEED, refs.get("s2d"))
            if got is not None:
                refs[method] = got[0]
                tuning[method][str(lr)] = on_main(partial(val_accuracy, got[0].model, s), s)
    best = {m: float(max(v, key=lambda k: v[k])) for m, v in tuning.items() if v}
    if run is not None:
        run.write_json("tuning.json", {"val_acc": tuning, "chosen_lr": best, "skipped": skipped})
    # 2. every method once per seed with its rate
    records: list[dict[str, Any]] = []
    for seed in range(cfg.seeds):
        ref = None
        for method in order:
            if method not in best:
                bar.update(1)
                continue
            got = attempt(method, best[method], seed, ref)
            if got is None:
                continue
            if method == "s2d":
                ref = got[0]
                if "s2d" not in cfg.methods:
                    continue
            # rank 0 evaluates; every rank gets its record (and so raises together below)
            record = on_main(partial(_record, method, seed, best[method], *got, s), s)
            if distributed:  # every process must end the method with the same parameters
                record["checksums_agree"] = sgdist.all_agree(sgdist.checksum(got[0].model))
            if record["params"] > cfg.budget_params:
                raise AssertionError(f"{method} ended above the budget: {record['params']}")
            records.append(record)
            if run is not None:
                run.log(record)
                run.write_json("results.json", records)
                if on_record is not None:
                    on_record(record)
    bar.close()
    if run is not None:
        (run.path / "table.md").write_text(table(records, cfg, skipped))
        pareto(records, run.path / "pareto.png", cfg.budget_params)
    return records


def _mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(
    records: Sequence[dict[str, Any]], cfg: CompareConfig, skipped: dict[str, str] | None = None
) -> str:
    """Markdown: per method, mean ± std over seeds of test accuracy and the costs."""
    start = cfg.widths or list(MODELS[cfg.model].default_widths)
    lines = [
        f"{cfg.dataset}, {cfg.model} from widths {start}, "
        f"budget {cfg.budget_params} parameters, {cfg.epochs} epochs, {cfg.optimizer}, "
        f"{cfg.seeds} seeds",
        "",
        "| method | test acc % | params | kFLOPs | latency ms | train GFLOPs | gradient passes "
        "| wall s | lr | widths (seed 0) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        rows = [r for r in records if r["method"] == method]
        if not rows:
            continue

        def col(key: str, rows: list[dict[str, Any]] = rows) -> list[float]:
            return [float(r[key]) for r in rows]

        lines.append(
            f"| {method} | {_mean_std([100 * a for a in col('test_acc')])} "
            f"| {statistics.mean(col('params')):.0f} | {statistics.mean(col('flops')) / 1e3:.1f} "
            f"| {statistics.mean(col('latency_ms')):.4f} "
            f"| {statistics.mean(col('train_flops')) / 1e9:.2f} "
            f"| {statistics.mean(col('gradient_passes')):.3g} | {_mean_std(col('wall_s'))} "
            f"| {rows[0]['lr']} | {rows[0]['widths']} |"
        )
    for method, why in (skipped or {}).items():
        lines.append(f"| {method} | not run: {why} | | | | | | | | |")
    lines += [
        "",
        "gradient passes: training samples × passes (forward + backward), all training included "
        "(the wide network and the search candidates too); the splitting phase is not in it but is "
        "in the wall time. train GFLOPs: Σ 3 × forward FLOPs per sample × samples trained. "
        "latency: ONNX Runtime on the CPU, batch 1, one thread, median of 50 runs.",
    ]
    return "\n".join(lines) + "\n"


def pareto(records: Sequence[dict[str, Any]], path: Path, budget: int) -> Path:
    """Test accuracy against parameters: a marker per method and seed, s2d's growth as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    markers = "os^vD<>pPX*h"
    for i, method in enumerate(METHODS):
        rows = [r for r in records if r["method"] == method]
        if not rows:
            continue
        ax.scatter(
            [r["params"] for r in rows], [100 * r["test_acc"] for r in rows],
            marker=markers[i % len(markers)], label=method, color=f"C{i % 10}", alpha=0.8,
        )  # fmt: skip
        if method == "s2d":
            for r in rows:
                p, a = zip(*r["trajectory"], strict=True) if r["trajectory"] else ((), ())
                ax.plot(p, [100 * v for v in a], color=f"C{i % 10}", alpha=0.4, linewidth=1)
    ax.axvline(budget, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("parameters (dotted: budget)")
    ax.set_ylabel("test accuracy %")
    ax.set_title("accuracy vs size (lines: s2d's growth, one per seed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = [
    "METHODS",
    "CompareConfig",
    "check_setting",
    "make_setting",
    "pareto",
    "run_compare",
    "table",
]
