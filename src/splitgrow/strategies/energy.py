"""Energy-aware selection: the split plan that lowers the loss most within a cost budget.

Splitting neuron i changes the loss by about ε²/2·λ_i (DESIGN.md §1), so with β_i ∈ {0, 1}
saying whether neuron i is split, a round solves the 0/1 knapsack

    minimise Σ_i β_i λ_i   subject to   Σ_i β_i c_i^r ≤ B^r  for every resource r (parameters,
                                         FLOPs), Σ_i β_i ≤ K (the grow ratio) and, per layer,
                                         Σ_{i ∈ layer} β_i ≤ its room below its maximum width,

over the neurons with λ_i < 0 (Wang et al., "Energy-aware neural architecture optimization with
fast splitting steepest descent", 2019). It is solved exactly as a mixed-integer linear programme
by SciPy's ``milp`` (HiGHS branch and bound, relative gap 0). Every neuron of a layer costs the
same, so only a layer's most negative ⌊B/c⌋ (and at most K, and at most its room) neurons can be
in an optimal plan; the others are left out of the programme, which keeps it small.

The costs are linear in the number of splits per layer; splitting a layer together with its
consumer adds the weights between their new neurons as well (see ``training.grow._added``), which
the caller trims afterwards so that the budget holds exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import Tensor, nn

from splitgrow.graph.analyze import LayerInfo, analyze
from splitgrow.strategies.s2d import occurrences


def added_flops(
    info: LayerInfo, modules: Mapping[str, nn.Module], rates: Mapping[str, float]
) -> int:
    """FLOPs (one forward pass, batch 1) that one split of a neuron of this unit adds.

    The same added weights as :func:`splitgrow.strategies.s2d.added_parameters` (each member's
    row, per-channel chain weights, every consumer's block of columns), each priced at its
    module's FLOPs per weight element (:func:`splitgrow.metrics.flops_per_weight`); biases and
    BatchNorm cost no counted FLOPs.

    Args:
        info: the unit.
        modules: ``dict(model.named_modules())``.
        rates: FLOPs per weight element per module.
    """
    added = 0.0
    members = info.members or []
    if members:
        for m in members:
            added += rates.get(m.name, 0.0) * (m.d - int(m.has_bias))
    else:
        added += rates.get(info.name, 0.0) * (info.d - int(info.has_bias))
    for c in info.chain:
        if c.module is not None:
            weight = getattr(modules[c.module], "weight", None)
            if isinstance(weight, Tensor):
                per = int(weight[0].numel())
                added += rates.get(c.module, 0.0) * per * occurrences(c.segments, info.name)
    for consumer in info.consumers:
        weight = modules[consumer.name].weight
        assert isinstance(weight, Tensor)
        columns = int(weight.shape[0]) * consumer.block * int(weight[0, 0].numel())
        added += rates.get(consumer.name, 0.0) * columns * occurrences(consumer.segments, info.name)
    return round(added)


def energy_select(
    values: Mapping[str, Tensor],
    widths: Mapping[str, int],
    *,
    costs: Mapping[str, Mapping[str, int]],
    budgets: Mapping[str, int],
    ratio: float = 1.0,
    max_widths: Mapping[str, int] | None = None,
) -> dict[str, Tensor]:
    """The neurons to split: minimum Σ β_i λ_i (λ_i < 0 only) within every budget (exact).

    Args:
        values: λ_min per neuron of each layer.
        widths: current width of each layer.
        costs: per resource (e.g. ``"params"``, ``"flops"``), what one split in each layer adds
            (non-negative integers).
        budgets: per resource of ``costs``, what a round may add (a non-negative integer).
        ratio: grow ratio: at most ``ceil(ratio · total width)`` neurons.
        max_widths: per-layer maximum widths.

    Returns:
        ``{layer: sorted indices}`` for the layers that get at least one split.

    Raises:
        ValueError: a budget without costs (or the reverse), a negative cost or budget, or a
            ratio outside (0, 1].
    """
    if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise ValueError(f"grow ratio must be in (0, 1], got {ratio!r}")
    if set(costs) != set(budgets):
        raise ValueError(f"costs are given for {sorted(costs)} but budgets for {sorted(budgets)}")
    for r, cap in budgets.items():
        if not isinstance(cap, (int, np.integer)) or cap < 0:
            raise ValueError(f"the {r} budget must be a non-negative integer, got {cap!r}")
        for layer in values:
            c = costs[r].get(layer)
            if c is None or c < 0:
                raise ValueError(f"the {r} cost of layer {layer!r} must be >= 0, got {c!r}")
    limit = math.ceil(ratio * sum(widths.values()))
    # candidates: per layer its most negative neurons, as many as could ever be chosen
    cand: list[tuple[str, int, float]] = []
    for layer, vals in values.items():
        room = (max_widths or {}).get(layer, math.inf) - widths[layer]
        most = min(room, limit)
        for r, cap in budgets.items():
            c = costs[r][layer]
            if c > 0:
                most = min(most, cap // c)
        if most <= 0:
            continue
        neg = [(float(v), i) for i, v in enumerate(vals.tolist()) if v < 0]
        cand += [(layer, i, v) for v, i in sorted(neg)[: int(most)]]
    if not cand:
        return {}
    lam = np.array([v for _, _, v in cand])
    rows: list[list[int]] = []
    upper: list[float] = []
    for r, cap in budgets.items():
        rows.append([costs[r][layer] for layer, _, _ in cand])
        upper.append(cap)
    rows.append([1] * len(cand))
    upper.append(limit)
    for layer in {layer for layer, _, _ in cand}:
        room = (max_widths or {}).get(layer, math.inf) - widths[layer]
        if room < len(cand):
            rows.append([int(c == layer) for c, _, _ in cand])
            upper.append(room)
    result = milp(
        c=lam / np.abs(lam).max(),  # scaled: HiGHS's tolerances are absolute
        constraints=LinearConstraint(np.array(rows, dtype=float), -np.inf, np.array(upper, float)),
        integrality=np.ones(len(cand)),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0.0},
    )
    if result.x is None:  # cannot happen: choosing nothing is feasible
        raise RuntimeError(f"energy selection: the solver failed: {result.message}")
    chosen: dict[str, list[int]] = {}
    for (layer, i, _), x in zip(cand, result.x, strict=True):
        if x > 0.5:
            chosen.setdefault(layer, []).append(i)
    return {k: torch.tensor(sorted(v), dtype=torch.long) for k, v in chosen.items()}


def added_latency(
    model: nn.Module, example: Tensor, units: Sequence[str], *, repeats: int = 50
) -> tuple[float, dict[str, int]]:
    """Measured CPU latency (ONNX Runtime, batch 1, one thread) and what one more neuron of each
    unit adds to it, in nanoseconds.

    Each unit's cost is measured, not modelled: the model is timed as it is and with that unit
    grown by half its width (ε = 0 copies, so the function is the same), and the difference is
    divided by the number of neurons added (never below 0). A latency this small is noisy: a
    unit whose growth is lost in the noise costs about 0, and then only the total budget (the
    latency measured every round) stops it.

    Returns:
        ``(latency of the model in ms, {unit: ns per added neuron})``.
    """
    from splitgrow.metrics import latency_ms
    from splitgrow.surgery.split import split_with_growth

    structure = analyze(model)
    base = latency_ms(model, example, warmup=10, repeats=repeats)["ms"]
    costs = {}
    for name in units:
        info = structure.require(name)
        k = max(1, info.n // 2)
        plan = {name: (torch.arange(k), torch.zeros(k, info.d, dtype=torch.float64))}
        wider, _ = split_with_growth(model, plan, eps=0.0)
        grown = latency_ms(wider, example, warmup=10, repeats=repeats)["ms"]
        costs[name] = max(0, round((grown - base) * 1e6 / k))
    return base, costs
