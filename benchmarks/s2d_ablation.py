"""Which settings make splitting work: s2d variants on settings of ``compare``.

``mnist1d-mlp``: an MLP grown from widths [8, 8] to at most 6000 parameters with SGD (lr 0.1,
momentum 0.9, cosine per phase) for 150 epochs in all. ``digits-cnn``: the small CNN from widths
[4, 4, 4, 4] to at most 4000 parameters, SGD lr 0.05, 40 epochs. Each variant reports test
accuracy per seed, the mean, the offspring pairs still near-twins at the end, and ε and the
widths of seed 0.

    .venv/bin/python benchmarks/s2d_ablation.py                       # mnist1d-mlp (~5 min)
    .venv/bin/python benchmarks/s2d_ablation.py --setting digits-cnn  # (~4 min)
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
from splitgrow.models import widths_of
from splitgrow.training import GrowConfig, grow

MLP_BASE: dict[str, Any] = {
    "rounds": 10, "epochs_per_round": 10, "final_epochs": 50, "optimizer": "sgd", "lr": 0.1,
    "batch_size": 128, "grow_ratio": 0.5, "method": "exact", "budget_params": 6000,
    "reach_budget": True,
}  # fmt: skip
SHORT = {"rounds": 5, "epochs_per_round": 5, "final_epochs": 125}
MLP_VARIANTS: dict[str, dict[str, Any]] = {
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
    "5 × 5, λ per layer (selection='per-layer')": {**SHORT, "selection": "per-layer"},
}  # fmt: skip
CNN_BASE: dict[str, Any] = {
    "rounds": 5, "epochs_per_round": 5, "final_epochs": 15, "optimizer": "sgd", "lr": 0.05,
    "batch_size": 128, "grow_ratio": 0.5, "method": "exact", "budget_params": 4000,
    "reach_budget": True,
}  # fmt: skip
CNN_VARIANTS: dict[str, dict[str, Any]] = {
    "5 × 5, global selection (the published rule)": {},
    "… λ per layer (selection='per-layer')": {"selection": "per-layer"},
    "… per layer, ε = 0.3‖θ‖": {"selection": "per-layer", "eps_mode": "relative", "eps": 0.3},
    "… fresh neurons (grow-fresh)": {"directions": "fresh"},
}  # fmt: skip
SETTINGS: dict[str, tuple[CompareConfig, dict[str, Any], dict[str, dict[str, Any]], str]] = {
    "mnist1d-mlp": (
        CompareConfig(dataset="mnist1d", model="mlp", widths=[8, 8], budget_params=6000),
        MLP_BASE, MLP_VARIANTS, "MNIST-1D, MLP [8, 8] → ≤ 6000 parameters",
    ),
    "digits-cnn": (
        CompareConfig(dataset="digits", model="cnn", widths=[4, 4, 4, 4], budget_params=4000),
        CNN_BASE, CNN_VARIANTS, "digits, CNN [4, 4, 4, 4] → ≤ 4000 parameters",
    ),
}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--setting", choices=list(SETTINGS), default="mnist1d-mlp")
    args = p.parse_args()
    torch.set_num_threads(1)
    compare_cfg, base, variants, title = SETTINGS[args.setting]
    s = make_setting(compare_cfg)
    lines = [
        "| variant | test acc % per seed | mean | twins at the end | ε (seed 0) | widths (seed 0) "
        "| s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, change in variants.items():
        accs: list[float] = []
        twins: list[int] = []
        eps: Any = None
        widths: Any = None
        seconds = 0.0
        for seed in range(args.seeds):
            cfg = GrowConfig(**{**base, **change, "seed": seed})
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
                widths = widths_of(res.model)
        lines.append(
            f"| {name} | {', '.join(f'{a:.1f}' for a in accs)} | {statistics.mean(accs):.1f} "
            f"| {twins} | {eps} | {widths} | {seconds:.0f} |"
        )
        print(lines[-1], flush=True)
    command = " ".join(["python", "benchmarks/s2d_ablation.py", *sys.argv[1:]])
    report = "\n".join(
        [f"# s2d ablation on {title}", "",
         f"Command: `{command}` ({time.strftime('%Y-%m-%d')})", "", *lines, ""]
    )  # fmt: skip
    name = args.setting.replace("-", "_")
    Path(f"benchmarks/results/s2d_ablation_{name}.md").write_text(report)


if __name__ == "__main__":
    main()
