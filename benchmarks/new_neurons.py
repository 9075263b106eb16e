"""New neurons inserted once into a trained small network, then trained on: does the choice of
their weights (GradMax, Firefly) beat random new neurons (random incoming, zero outgoing) or no
growth at all? Digits, 3 seeds, the same training after insertion for every method.

    .venv/bin/python benchmarks/new_neurons.py            # prints a markdown table

Each seed trains the starting network (widths 4) for 3 epochs, inserts 4 new neurons into each
unit the strategy can grow (random: the same units and counts as gradmax; firefly: new neurons
only, no splits), then trains every
variant for 2 more epochs (SGD 0.05, momentum 0.9, batches of 64) and reports the training loss
in eval mode.
"""

from __future__ import annotations

import copy
import statistics
import sys

import torch
import torch.nn.functional as F

from splitgrow import data
from splitgrow.models import Architecture
from splitgrow.strategies import RoundContext, strategy_for
from splitgrow.surgery.fresh import add_fresh_neurons, add_neurons
from splitgrow.training import evaluate, make_optimizer

DIGITS = data.load("digits", seed=0)


def train(model: torch.nn.Module, epochs: int, seed: int) -> float:
    opt = make_optimizer(model, "sgd", 0.05, 0.9, 0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for x, y in DIGITS.train.batches(64, shuffle=True, generator=gen):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    batches = DIGITS.train.batches(512)
    return float(evaluate(model, batches, F.cross_entropy, "classification")["loss"])


def grown(base: torch.nn.Module, method: str, seed: int) -> tuple[torch.nn.Module, dict]:
    gen = torch.Generator().manual_seed(seed)
    batches = DIGITS.train.batches(128)[:4]
    options = {"split": False} if method == "firefly" else {}  # new neurons only
    ctx = RoundContext(
        base, F.cross_entropy, batches, batches, "auto", "running", 3.0, seed, gen, False, options
    )
    st = strategy_for("gradmax" if method == "random" else method)
    cands = st.candidates(ctx)
    chosen = {k: torch.arange(min(4, len(v))) for k, v in cands.scores.items()}
    plan = st.plan(ctx, cands, chosen)
    counts = {k: v.count for k, v in plan.new.items()}
    if method == "random":
        model, _, _ = add_fresh_neurons(base, counts, generator=gen)
        return model, counts
    model, _, _ = add_neurons(base, plan.new, generator=gen)
    return model, counts


def main() -> None:
    lines = [
        "| model | method | train loss after 2 epochs (3 seeds) | mean | new neurons (seed 0) |",
        "|---|---|---|---|---|",
    ]
    for arch in ("mlp", "cnn"):
        widths = [4, 4] if arch == "mlp" else [4, 4, 4, 4]
        rows: dict[str, list[float]] = {}
        counts0: dict[str, dict] = {}
        for seed in range(3):
            torch.manual_seed(seed)
            base = Architecture(arch, widths, "relu", DIGITS.in_shape, 10).build()
            train(base, 3, seed)
            for method in ("none", "random", "gradmax", "firefly"):
                model, counts = (
                    (copy.deepcopy(base), {}) if method == "none" else grown(base, method, seed)
                )
                rows.setdefault(method, []).append(train(model, 2, seed + 10))
                if seed == 0:
                    counts0[method] = counts
        for method, losses in rows.items():
            shown = ", ".join(f"{v:.3f}" for v in losses)
            lines.append(
                f"| {arch} (ReLU{', BatchNorm' if arch == 'cnn' else ''}) | {method} | {shown} "
                f"| {statistics.mean(losses):.3f} | {counts0[method]} |"
            )
    print(f"torch {torch.__version__}, {sys.platform}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
