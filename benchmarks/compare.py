"""Run ``splitgrow compare`` on the benchmark settings and write a result table per setting.

    .venv/bin/python benchmarks/compare.py mnist1d-mlp            # one setting
    .venv/bin/python benchmarks/compare.py all                    # the four main settings
    .venv/bin/python benchmarks/compare.py heldout                # the five held-out settings
    .venv/bin/python benchmarks/compare.py cifar10-mobilenet --data-dir ~/data/cifar10
    .venv/bin/python benchmarks/compare.py digits-mlp --quick     # a smoke run (minutes)
    .venv/bin/python benchmarks/compare.py mnist1d-mlp --methods s2d s3d --tag strategies

Each setting writes its run directory to ``runs/bench-<setting>[_quick][_<tag>]`` and its table,
with the command and the machine, to ``benchmarks/results/compare_<setting>[_quick][_<tag>].md``,
both under the current directory. Each setting runs its own number of seeds (for an offline one,
the one its committed table used) unless ``--seeds`` is given.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from splitgrow.cli import _samples as cli_samples
from splitgrow.compare import CompareConfig, run_compare

#: name → CompareConfig fields, seeds included. Budgets follow ../shared/anchors (MNIST-1D MLP
#: ≤ 6000 parameters, 150 epochs; 1-D CNN ≤ 8000, 100 epochs, growth 4 → ~22 over 5 rounds).
SETTINGS: dict[str, dict[str, Any]] = {
    "digits-mlp": {
        "dataset": "digits", "model": "mlp", "widths": [4, 4], "budget_params": 3000,
        "epochs": 60, "rounds": 6, "epochs_per_round": 3, "seeds": 5,
    },
    "digits-cnn": {
        "dataset": "digits", "model": "cnn", "widths": [4, 4, 4, 4], "budget_params": 4000,
        "epochs": 40, "rounds": 5, "epochs_per_round": 3, "nas_trials": 6, "seeds": 5,
    },
    "mnist1d-mlp": {
        "dataset": "mnist1d", "model": "mlp", "widths": [8, 8], "budget_params": 6000,
        "epochs": 150, "rounds": 5, "epochs_per_round": 5, "seeds": 5,
    },
    "mnist1d-cnn1d": {
        "dataset": "mnist1d", "model": "cnn1d", "widths": [4, 4, 4, 4], "budget_params": 8000,
        "epochs": 100, "rounds": 5, "epochs_per_round": 8, "nas_trials": 6, "seeds": 3,
    },
    "cifar10-mobilenet": {
        "dataset": "cifar10", "model": "mobilenetv1", "widths": [8, 8, 8, 8, 8, 8, 8],
        "budget_params": 60000, "epochs": 30, "rounds": 5, "epochs_per_round": 4,
        "nas_trials": 4, "tune_trials": 2, "seeds": 3,
    },
    # held out: settings never used to choose a default (rounds, epochs per round, ε, shrink);
    # they leave every growth and training option to `splitgrow compare`'s defaults
    # (CompareConfig), to check that what wins above is not fitted to the settings above
    "heldout-mnist1d-mlp3": {
        "dataset": "mnist1d", "model": "mlp", "widths": [8, 8, 8], "budget_params": 6000,
        "epochs": 150, "seeds": 3,
    },
    "heldout-digits-cnn-2k": {
        "dataset": "digits", "model": "cnn", "widths": [4, 4, 4, 4], "budget_params": 2000,
        "epochs": 40, "nas_trials": 6, "seeds": 3,
    },
    "heldout-digits-mlp-1500": {
        "dataset": "digits", "model": "mlp", "widths": [4, 4], "budget_params": 1500,
        "epochs": 60, "seeds": 5,
    },
    "heldout-digits-mlp3": {
        "dataset": "digits", "model": "mlp", "widths": [4, 4, 4], "budget_params": 3000,
        "epochs": 60, "seeds": 5,
    },
    "heldout-mnist1d-cnn1d-3k": {
        "dataset": "mnist1d", "model": "cnn1d", "widths": [4, 4, 4, 4], "budget_params": 3000,
        "epochs": 60, "nas_trials": 6, "seeds": 3,
    },
}  # fmt: skip
MAIN = ["digits-mlp", "digits-cnn", "mnist1d-mlp", "mnist1d-cnn1d"]
HELD_OUT = [name for name in SETTINGS if name.startswith("heldout-")]


def settings_named(name: str) -> list[str]:
    """The settings that the command-line name ``name`` runs ('all', 'heldout' or one)."""
    return {"all": MAIN, "heldout": HELD_OUT}.get(name, [name])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("setting", choices=[*SETTINGS, "all", "heldout"])
    p.add_argument("--data-dir", default=None, help="CIFAR-10 folder (python-pickle layout)")
    p.add_argument("--seeds", type=int, default=None, help="default: the setting's own")
    p.add_argument("--quick", action="store_true", help="a smoke run: few epochs, one seed")
    p.add_argument("--rounds", type=int, default=None, help="override the setting's rounds")
    p.add_argument("--epochs-per-round", type=int, default=None, help="override it too")
    p.add_argument(
        "--final-shrink", type=float, default=None, help="override final_shrink (λ in [0, 1])"
    )
    p.add_argument(  # absent unless given ('all' gives None)
        "--eigen-samples",
        type=cli_samples,
        default=argparse.SUPPRESS,
        metavar="N",
        help="override eigen_samples (a positive number, or 'all')",
    )
    p.add_argument("--tag", default="", help="suffix of the result file and run directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", nargs="+", default=None, help="only these methods")
    args = p.parse_args()
    names = settings_named(args.setting)
    for name in names:
        fields = dict(SETTINGS[name])
        if name.startswith("cifar"):
            if args.data_dir is None:
                p.error("cifar10-mobilenet needs --data-dir")
            fields["data_dir"] = args.data_dir
        if args.seeds is not None:
            fields["seeds"] = args.seeds
        if args.methods:
            fields["methods"] = args.methods
        for key in ("rounds", "epochs_per_round", "final_shrink"):
            if getattr(args, key) is not None:
                fields[key] = getattr(args, key)
        if "eigen_samples" in vars(args):
            fields["eigen_samples"] = args.eigen_samples
        if args.quick:
            fields.update(seeds=1, epochs=6, rounds=2, epochs_per_round=2, tune_trials=1,
                          nas_trials=2)  # fmt: skip
        cfg = CompareConfig(device=args.device, **fields)
        suffix = ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
        out = Path("runs") / f"bench-{name}{suffix}"
        start = time.time()
        run_compare(cfg, out, progress=True)
        minutes = (time.time() - start) / 60
        table = (out / "table.md").read_text()
        command = " ".join(["python", "benchmarks/compare.py", *sys.argv[1:]])
        report = (
            f"# compare: {name}\n\n"
            f"Command: `{command}` ({minutes:.0f} min, {time.strftime('%Y-%m-%d')})\n\n"
            f"Machine: {machine()}\n\n{table}"
        )
        target = Path("benchmarks/results") / f"compare_{name}{suffix}.md"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(report)
        print(report)


if __name__ == "__main__":
    main()
