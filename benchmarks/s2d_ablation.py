"""Which settings make splitting work: s2d variants on the MNIST-1D MLP setting of ``compare``.

Every variant grows an MLP from widths [8, 8] to at most 6000 parameters with SGD (lr 0.1,
momentum 0.9, cosine per phase) for 150 epochs in all, and reports test accuracy per seed, the
mean, the offspring pairs still near-twins at the end, and the ε the line search picked.

    .venv/bin/python benchmarks/s2d_ablation.py            # all variants, seeds 0-2 (~5 min)
    .venv/bin/python benchmarks/s2d_ablation.py --seeds 1  # quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from splitgrow.compare import CompareConfig, make_setting
from splitgrow.compare.methods import batches_of, build_model, test_accuracy
from splitgrow.training import GrowConfig, grow

BASE: dict[str, Any] = {
    "rounds": 10, "epochs_per_round": 10, "final_epochs": 50, "optimizer": "sgd", "lr": 0.1,
    "batch_size": 128, "grow_ratio": 0.5, "method": "exact", "budget_params": 6000,
    "reach_budget": True,
}  # fmt: skip
SHORT = {"rounds": 5, "epochs_per_round": 5, "final_epochs": 125}
VARIANTS: dict[str, dict[str, Any]] = {
    "10 rounds × 10 epochs, ε line search (the published recipe)": {},
    "… ε = 0.5‖θ‖": {"eps_mode": "relative", "eps": 0.5},
    "5 rounds × 5 epochs, ε line search": SHORT,
    "5 × 5, ε = 0.5‖θ‖": {**SHORT, "eps_mode": "relative", "eps": 0.5},
    "5 × 5, ε = 1.0‖θ‖": {**SHORT, "eps_mode": "relative", "eps": 1.0},
    "5 × 5, ε line search over {0.3, 0.5, 1}‖θ‖": {**SHORT, "eps_grid": (0.3, 0.5, 1.0)},
    "5 × 5, ε = 0.5‖θ‖, random directions": {
        **SHORT, "eps_mode": "relative", "eps": 0.5, "directions": "random",
    },
    "5 × 5, fresh neurons (grow-fresh)": {**SHORT, "directions": "fresh"},
}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    s = make_setting(
        CompareConfig(dataset="mnist1d", model="mlp", widths=[8, 8], budget_params=6000)
    )
    lines = [
        "| variant | test acc % per seed | mean | twins at the end | ε picked (seed 0) | s |",
        "|---|---|---|---|---|---|",
    ]
    for name, change in VARIANTS.items():
        accs, twins, eps, seconds = [], [], None, 0.0
        for seed in range(args.seeds):
            cfg = GrowConfig(**{**BASE, **change, "seed": seed})
            start = time.perf_counter()
            res = grow(
                build_model(s.arch, seed, s), batches_of(s.data.train, 128, s.device),
                loss_fn=s.loss_fn, config=cfg,
            )  # fmt: skip
            seconds += time.perf_counter() - start
            accs.append(100 * test_accuracy(res.model, s))
            twins.append(res.history[-1]["twins"])
            if seed == 0:
                eps = [r["eps"] for r in res.history if "eps" in r]
        lines.append(
            f"| {name} | {', '.join(f'{a:.1f}' for a in accs)} | {statistics.mean(accs):.1f} "
            f"| {twins} | {eps} | {seconds:.0f} |"
        )
        print(lines[-1], flush=True)
    command = " ".join(["python", "benchmarks/s2d_ablation.py", *sys.argv[1:]])
    report = "\n".join(
        ["# s2d ablation on MNIST-1D, MLP [8, 8] → ≤ 6000 parameters", "",
         f"Command: `{command}` ({time.strftime('%Y-%m-%d')})", "", *lines, ""]
    )  # fmt: skip
    Path("benchmarks/results/s2d_ablation_mnist1d_mlp.md").write_text(report)


if __name__ == "__main__":
    main()
