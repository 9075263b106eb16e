"""Splitting steepest descent: split the neurons with the most negative λ_min, across layers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from splitgrow.graph.analyze import LayerInfo
from splitgrow.splitting import SplitEigen, splitting_eigen
from splitgrow.strategies.base import Candidates, GrowPlan, RoundContext, register_strategy
from splitgrow.surgery.split import SignedSplit


def added_parameters(info: LayerInfo, modules: Mapping[str, nn.Module]) -> int:
    """Parameters one split of a neuron of this layer adds: its row, a copy of its per-channel
    chain parameters, and its block of columns in every consumer."""
    added = info.d
    for c in info.chain:
        if c.module is not None:  # one copy per block of the unit's channels it sees
            per = sum(int(p[0].numel()) for p in modules[c.module].parameters(recurse=False))
            added += per * occurrences(c.segments, info.name)
    for consumer in info.consumers:
        weight = modules[consumer.name].weight
        assert isinstance(weight, Tensor)
        columns = int(weight.shape[0]) * consumer.block * int(weight[0, 0].numel())
        added += columns * occurrences(consumer.segments, info.name)
    return added


def occurrences(segments: Sequence[tuple[str, int]], unit: str) -> int:
    """How many blocks of ``unit``'s channels a tensor holds (two after ``cat([h, h])``)."""
    return max(1, sum(name == unit for name, _ in segments))


def s2d_select(
    values: Mapping[str, Tensor],
    widths: Mapping[str, int],
    *,
    ratio: float,
    max_widths: Mapping[str, int] | None = None,
    costs: Mapping[str, int] | None = None,
    budget: int | None = None,
) -> dict[str, Tensor]:
    """Choose the neurons to split: the most negative λ_min over all layers, λ_min < 0 only.

    Args:
        values: λ_min per neuron of each layer.
        widths: current width of each layer.
        ratio: grow ratio: at most ``ceil(ratio · total width)`` neurons per round.
        max_widths: per-layer maximum widths (a layer at its maximum is skipped).
        costs: parameters added per split in each layer (with ``budget``).
        budget: parameters that may still be added this round.

    Returns:
        ``{layer: indices}`` for the layers that get at least one split.
    """
    if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise ValueError(f"grow ratio must be in (0, 1], got {ratio!r}")
    limit = math.ceil(ratio * sum(widths.values()))
    room = {k: (max_widths or {}).get(k, math.inf) - widths[k] for k in values}
    candidates = sorted(
        (float(v), layer, i)
        for layer, vals in values.items()
        for i, v in enumerate(vals.tolist())
        if v < 0
    )
    chosen: dict[str, list[int]] = {}
    spent = 0
    for _, layer, i in candidates:
        if limit <= 0:
            break
        if room[layer] <= 0:
            continue
        cost = (costs or {}).get(layer, 0)
        if budget is not None and spent + cost > budget:
            continue
        chosen.setdefault(layer, []).append(i)
        room[layer] -= 1
        spent += cost
        limit -= 1
    return {k: torch.tensor(sorted(v), dtype=torch.long) for k, v in chosen.items()}


def _eigen(ctx: RoundContext, which: str) -> dict[str, SplitEigen]:
    """Every splittable unit's splitting eigenpairs over the context's data (its share, summed
    over the processes when distributed)."""
    return splitting_eigen(
        ctx.model, ctx.loss_fn, ctx.share, method=ctx.method, which=which,
        batchnorm=ctx.batchnorm, surrogate_beta=ctx.surrogate_beta, seed=ctx.seed,
        distributed=ctx.distributed, micro_batch=ctx.micro_batch,
    )  # fmt: skip


def _summary(values: Mapping[str, Tensor]) -> dict[str, dict[str, float | int]]:
    return {
        k: {"min": float(v.min()), "median": float(v.median()), "negative": int((v < 0).sum())}
        for k, v in values.items()
    }


@register_strategy("s2d")
class SplittingSteepestDescent:
    """Splitting steepest descent (DESIGN.md §1): candidate i of a unit is its neuron i, scored by
    λ_min(S_i) (the loss changes by ε²/2·λ_min), split into θ ± ε·v_min with halved outputs."""

    kind = "split"
    distributed = True

    def check_options(self, options: Mapping[str, Any]) -> None:
        if options:
            raise ValueError(f"s2d takes no strategy options, got {sorted(options)}")

    def candidates(self, ctx: RoundContext) -> Candidates:
        eig = _eigen(ctx, "min")
        values = {k: e.values for k, e in eig.items()}
        return Candidates(values, eig, {"lambda_min": _summary(values)})

    def plan(self, ctx: RoundContext, cands: Candidates, chosen: Mapping[str, Tensor]) -> GrowPlan:
        eig: dict[str, SplitEigen] = cands.state
        out = {}
        for k, idx in chosen.items():
            v = eig[k].vectors[idx]
            out[k] = SignedSplit(idx, v, -v, torch.full((len(idx),), 0.5, dtype=torch.float64))
        return GrowPlan(split=out)
