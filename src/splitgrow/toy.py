"""The 1-D toy: does splitting produce "cliff points" and end below a fixed-size network?

Regression of sin(2x) + 0.5·sin(5x + 1) + exp(−4(x − 1)²) on 300 points in [−3, 3] with one hidden
layer of RBF units (exp(−z²)). Three runs with the same optimiser and the same number of
full-batch iterations:

* ``s2d``: start from ``start`` neurons, split every neuron with λ_min < 0 along its eigenvector
  every ``iterations`` iterations (the width doubles at most), ε by line search;
* ``random``: the same schedule and the same neurons, random unit directions;
* ``fixed``: the final width from random initialisation, trained for all the iterations.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from splitgrow import data as datasets
from splitgrow.models import Architecture, widths_of
from splitgrow.runs import RunDir
from splitgrow.training import GrowConfig, grow, make_optimizer, train_phase


def _mse(out: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(out.squeeze(-1), y)


def run_toy(
    out: str | Path,
    *,
    start: int = 2,
    rounds: int = 4,
    iterations: int = 1000,
    lr: float = 0.01,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the three methods, write ``results.json`` and ``toy.png`` into ``out``."""
    data = datasets.load("toy1d")
    batch = [(data.train.x, data.train.y)]
    run = RunDir(out)
    results: dict[str, Any] = {"iterations_per_round": iterations, "rounds": rounds}
    curves: dict[str, list[float]] = {}
    splits: dict[str, list[int]] = {}
    widths: dict[str, int] = {}
    for directions in ("eigen", "random"):
        torch.manual_seed(seed)
        model = Architecture("rbf1d", [start], "gaussian", [1], 1).build()
        cfg = GrowConfig(  # the loss curves through every split: no shrink before the last phase
            rounds=rounds, epochs_per_round=iterations, optimizer="adam", lr=lr,
            schedule="constant", grow_ratio=1.0, batch_size=len(data.train), method="exact",
            eps_mode="line-search", directions=directions, seed=seed, final_shrink=None,
        )  # fmt: skip
        t0 = time.perf_counter()
        res = grow(model, batch, loss_fn=_mse, task="regression", config=cfg)
        name = "s2d" if directions == "eigen" else "random"
        curves[name] = [loss for r in res.history for loss in r["epoch_losses"]]
        ends = [sum(r["epochs"] for r in res.history[: i + 1]) for i in range(len(res.history))]
        splits[name] = [e for e, r in zip(ends, res.history, strict=True) if r.get("split")]
        widths[name] = widths_of(res.model)[0]
        results[name] = {
            "final_loss": curves[name][-1],
            "final_width": widths[name],
            "stopped": res.stopped,
            "seconds": time.perf_counter() - t0,
            "params_per_round": [r["params"] for r in res.history],
        }
    torch.manual_seed(seed)
    final = widths["s2d"]
    model = Architecture("rbf1d", [final], "gaussian", [1], 1).build()
    opt = make_optimizer(model, "adam", lr, 0.0, 0.0)
    t0 = time.perf_counter()
    phase = train_phase(
        model, opt, lambda _epoch: batch, _mse, epochs=len(curves["s2d"]), schedule="constant"
    )
    curves["fixed"] = phase.epoch_losses
    results["fixed"] = {
        "final_loss": phase.epoch_losses[-1],
        "final_width": final,
        "seconds": time.perf_counter() - t0,
    }
    run.write_json("results.json", results)
    _plot(run.path / "toy.png", curves, splits)
    return results


def _plot(path: Path, curves: dict[str, list[float]], splits: dict[str, list[int]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, losses) in enumerate(curves.items()):
        ax.plot(range(1, len(losses) + 1), losses, label=name, color=f"C{i}")
        for s in splits.get(name, []):
            ax.axvline(s + 0.5, color=f"C{i}", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("iteration (dotted: splits)")
    ax.set_ylabel("training MSE")
    ax.set_title("1-D toy: splitting vs random splits vs fixed width")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
