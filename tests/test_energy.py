"""Energy-aware selection: exact against brute force, within budget, FLOPs costs as measured."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from splitgrow import data, split_neurons
from splitgrow.graph import analyze
from splitgrow.metrics import flops, flops_per_weight, parameter_count
from splitgrow.models import MODELS, Architecture
from splitgrow.strategies import added_flops, energy_select
from splitgrow.strategies.energy import added_latency
from splitgrow.training import GrowConfig, grow
from splitgrow.training.grow import _added


def _brute_force(values, widths, costs, budgets, ratio, max_widths):  # type: ignore[no-untyped-def]
    """The least Σ λ over every feasible subset of the λ < 0 neurons (enumerated)."""
    cand = [(k, i, float(v)) for k, vals in values.items() for i, v in enumerate(vals) if v < 0]
    limit = math.ceil(ratio * sum(widths.values()))
    best = 0.0
    for r in range(len(cand) + 1):
        for subset in itertools.combinations(cand, r):
            if r > limit or any(
                sum(costs[res][k] for k, _, _ in subset) > cap for res, cap in budgets.items()
            ):
                continue
            per = {k: sum(1 for c, _, _ in subset if c == k) for k in values}
            if any(per[k] > max_widths.get(k, math.inf) - widths[k] for k in values):
                continue
            best = min(best, sum(v for _, _, v in subset))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_energy_select_is_optimal_and_within_budget(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    layers = [f"l{j}" for j in range(int(torch.randint(1, 4, (1,), generator=gen)))]
    values = {
        k: torch.randn(int(torch.randint(1, 6, (1,), generator=gen)), generator=gen) for k in layers
    }
    widths = {k: len(v) for k, v in values.items()}
    costs = {
        res: {k: int(torch.randint(0, 40, (1,), generator=gen)) for k in layers}
        for res in ("params", "flops")[: 1 + seed % 2]
    }
    budgets = {res: int(torch.randint(0, 100, (1,), generator=gen)) for res in costs}
    ratio = float(torch.rand((), generator=gen)) * 0.9 + 0.1
    max_widths = {layers[0]: widths[layers[0]] + 1} if seed % 3 == 0 else {}
    chosen = energy_select(
        values, widths, costs=costs, budgets=budgets, ratio=ratio, max_widths=max_widths
    )
    for res, cap in budgets.items():  # never over a budget, the ratio or a maximum width
        assert sum(costs[res][k] * len(v) for k, v in chosen.items()) <= cap
    assert sum(len(v) for v in chosen.values()) <= math.ceil(ratio * sum(widths.values()))
    for k, v in chosen.items():
        assert len(v) <= max_widths.get(k, math.inf) - widths[k]
        assert bool((values[k][v] < 0).all()) and len(set(v.tolist())) == len(v)
    got = sum(float(values[k][v].sum()) for k, v in chosen.items())
    best = _brute_force(values, widths, costs, budgets, ratio, max_widths)
    scale = max(float(v.abs().max()) for v in values.values())
    assert got == pytest.approx(best, abs=1e-6 * scale)


def test_energy_beats_greedy_where_greedy_is_not_optimal() -> None:
    # greedy by λ takes the −3 neuron (cost 10) and then nothing fits; the optimum is 2 × −2
    values = {"a": torch.tensor([-3.0]), "b": torch.tensor([-2.0, -2.0])}
    costs = {"params": {"a": 10, "b": 5}}
    chosen = energy_select(values, {"a": 1, "b": 2}, costs=costs, budgets={"params": 10})
    assert {k: v.tolist() for k, v in chosen.items()} == {"b": [0, 1]}


def test_energy_select_rejects_bad_input() -> None:
    values = {"a": torch.tensor([-1.0])}
    with pytest.raises(ValueError, match="budgets for"):
        energy_select(values, {"a": 1}, costs={"params": {"a": 1}}, budgets={})
    with pytest.raises(ValueError, match="the params budget must be a non-negative integer"):
        energy_select(values, {"a": 1}, costs={"params": {"a": 1}}, budgets={"params": -1})
    with pytest.raises(ValueError, match="needs a budget"):
        GrowConfig(selection="energy")
    with pytest.raises(ValueError, match="need selection='energy'"):
        GrowConfig(round_budget_flops=10)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_added_flops_equal_the_measured_change(name: str) -> None:
    """One neuron per unit, and two units with their consumers at once (cross terms)."""
    spec = MODELS[name]
    shape = {1: [6], 2: [1, 12], 3: [3, 8, 8]}.get(spec.input_rank or 1, [6])
    torch.manual_seed(0)
    model = Architecture(
        name, [4] * len(spec.default_widths), spec.default_activation, shape, 5
    ).build()
    x = torch.zeros(1, *shape)
    structure = analyze(model)
    modules = dict(model.named_modules())
    rates = flops_per_weight(model, x)
    base = flops(model, x)
    units = structure.splittable()
    costs = {k: added_flops(structure.layers[k], modules, rates) for k in units}
    plans = [{k: torch.tensor([0])} for k in units] + [{k: torch.tensor([0, 2]) for k in units}]
    for plan in plans:
        split = split_neurons(
            model,
            {k: (v, torch.zeros(len(v), structure.layers[k].d)) for k, v in plan.items()},
            eps=0.0,
        )
        assert flops(split, x) - base == _added(plan, structure, modules, costs, rates), plan


@pytest.mark.parametrize("resource", ["params", "flops"])
def test_grow_with_energy_selection_keeps_each_round_within_budget(resource: str) -> None:
    digits = data.load("digits", seed=0)
    torch.manual_seed(0)
    model = Architecture("cnn", [3, 3, 3, 3], "relu", digits.in_shape, 10).build()
    batches = digits.train.batches(64)[:2]
    cap = {"params": 400, "flops": 40_000}[resource]
    cfg = GrowConfig(
        rounds=2,
        epochs_per_round=1,
        eps_mode="fixed",
        grow_ratio=1.0,
        selection="energy",
        **{f"round_budget_{resource}": cap},
    )
    res = grow(model, batches, loss_fn=torch.nn.functional.cross_entropy, config=cfg)
    grew = 0
    for before, after in itertools.pairwise(res.history):
        energy = before["energy"]
        key = "params" if resource == "params" else "flops"
        assert after[key] - before[key] == energy[f"{key}_added"] <= cap  # measured = predicted
        assert energy[f"budget_{key}"] == cap and energy["objective"] <= 0
        grew += after[key] > before[key]
    assert grew >= 1 and parameter_count(res.model) == res.history[-1]["params"]


def test_energy_selection_never_passes_the_total_flops_budget() -> None:
    digits = data.load("digits", seed=0)
    torch.manual_seed(0)
    model = Architecture("cnn", [3, 3, 3, 3], "relu", digits.in_shape, 10).build()
    start = flops(model, digits.train.x[:1])
    cfg = GrowConfig(
        rounds=2, epochs_per_round=1, eps_mode="fixed", grow_ratio=1.0, selection="energy",
        budget_flops=start + 30_000,
    )  # fmt: skip
    res = grow(
        model, digits.train.batches(64)[:2], loss_fn=torch.nn.functional.cross_entropy, config=cfg
    )
    assert start < res.history[-1]["flops"] <= start + 30_000


def test_latency_budgets_bound_every_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """With each unit's measured cost replaced by a known one (1 µs per neuron), a round budget
    of 2.5 µs lets at most two neurons split per round; the real measurement is non-negative."""
    import importlib

    G = importlib.import_module("splitgrow.training.grow")  # the module, not the function
    digits = data.load("digits", seed=0)
    torch.manual_seed(0)
    model = Architecture("cnn", [3, 3, 3, 3], "relu", digits.in_shape, 10).build()
    base, measured = added_latency(model, digits.train.x[:1], analyze(model).splittable())
    assert base > 0 and set(measured) == set(analyze(model).splittable())
    assert all(isinstance(c, int) and c >= 0 for c in measured.values())
    monkeypatch.setattr(G, "added_latency", lambda m, x, units: (0.01, {u: 1000 for u in units}))
    batches = digits.train.batches(64)[:2]
    cfg = GrowConfig(rounds=2, epochs_per_round=1, eps_mode="fixed", grow_ratio=1.0,
                     selection="energy", round_budget_latency_ms=0.0025)  # fmt: skip
    res = grow(model, batches, loss_fn=torch.nn.functional.cross_entropy, config=cfg)
    for record in res.history[:-1]:
        assert record["energy"]["budget_latency_ms"] == 0.0025
        assert sum(record.get("split", {}).values()) == 2  # the knapsack fills the budget
        assert record["energy"]["latency_added_ms"] == 0.002


def test_total_latency_budget_stops_growth() -> None:
    digits = data.load("digits", seed=0)
    torch.manual_seed(0)
    model = Architecture("mlp", [4, 4], "relu", digits.in_shape, 10).build()
    cfg = GrowConfig(rounds=2, epochs_per_round=1, budget_latency_ms=1e-6)
    res = grow(model, digits.train.batches(64)[:2], loss_fn=torch.nn.functional.cross_entropy,
               config=cfg)  # fmt: skip
    assert res.stopped == "budget" and res.history[0]["growth_ended"] == "budget"
    assert res.history[0]["latency_ms"] > 1e-6 and "split" not in res.history[0]
    with pytest.raises(ValueError, match="budget_latency_ms must be a positive number"):
        GrowConfig(budget_latency_ms=-1.0)
    with pytest.raises(ValueError, match="need selection='energy'"):
        GrowConfig(round_budget_latency_ms=1.0)
