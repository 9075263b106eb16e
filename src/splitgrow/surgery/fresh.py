"""``add_fresh_neurons``: grow layers by new neurons with random incoming, zero outgoing weights.

The growth baseline "grow-fresh": the model's function is unchanged at insertion (the new
neurons' outgoing weights are zero), and the new neurons start from PyTorch's default
initialisation instead of a copy of an existing neuron. Built on the split surgery (ε = 0 copies
of some parents), then rewritten: parents' consumer columns restored, offspring columns zeroed,
offspring rows drawn afresh, their BatchNorm reset to the identity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from splitgrow._attrs import optional_tensor, tensor
from splitgrow.graph.analyze import analyze
from splitgrow.surgery.split import GrowthMap, channel_map, offspring_pairs, split_with_growth


def add_fresh_neurons(
    model: nn.Module, counts: Mapping[str, int], *, generator: torch.Generator
) -> tuple[nn.Module, GrowthMap, dict[str, list[tuple[int, int]]]]:
    """A copy of ``model`` with ``counts[layer]`` new neurons appended to each listed layer.

    Returns:
        The new model, how every parameter grew (for
        :func:`~splitgrow.surgery.optimizer.carry_state`, which with ``fresh=True`` starts the
        new neurons' optimizer state at zero, as ``grow`` does) and
        ``{layer: [(neuron whose slot it was cut from, new neuron)]}``.

    Raises:
        ValueError: an unknown or unsplittable layer, or a count outside ``[0, width]``.
    """
    structure = analyze(model)
    plan = {}
    for name, k in counts.items():
        info = structure.require(name)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= info.n:
            raise ValueError(f"counts['{name}'] must be an integer in [0, {info.n}], got {k!r}")
        if k:
            idx = torch.randperm(info.n, generator=generator)[:k]
            plan[name] = (idx, torch.zeros(k, info.d, dtype=torch.float64))
    new, growth = split_with_growth(model, plan, eps=0.0)
    modules = dict(new.named_modules())
    chosen = {name: idx for name, (idx, _) in plan.items()}
    per_channel: dict[str, Any] = {}
    consumers: dict[str, Any] = {}
    pairs = {}
    for name, (idx, _) in plan.items():
        info = structure.layers[name]
        pairs[name] = offspring_pairs(info.n, idx)
        per_channel.update({c.module: c.segments for c in info.chain if c.module is not None})
        consumers.update({c.name: c for c in info.consumers})
    with torch.no_grad():
        for consumer in consumers.values():
            weight = tensor(modules[consumer.name], "weight")
            cols = channel_map(consumer.segments, chosen, weight.device).columns(consumer.block)
            weight[:, cols.split & ~cols.new] *= 2.0  # undo the split's halving
            weight[:, cols.new] = 0.0
        for name in plan:
            info = structure.layers[name]
            for member in info.members:
                layer = modules[member.name]
                weight = tensor(layer, "weight")
                bound = 1.0 / math.sqrt(weight[0].numel())  # PyTorch's default init for both
                weight[info.n :] = _uniform(weight[info.n :], bound, generator)
                bias = optional_tensor(layer, "bias")
                if bias is not None:
                    bias[info.n :] = _uniform(bias[info.n :], bound, generator)
        for module, segments in per_channel.items():
            chain = modules[module]
            if isinstance(chain, nn.modules.batchnorm._BatchNorm):
                fresh = channel_map(segments, chosen).new
                for attr, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                                    ("running_var", 1.0)):  # fmt: skip
                    t = optional_tensor(chain, attr)
                    if t is not None:
                        t[fresh.to(t.device)] = value
    return new, growth, pairs


def _uniform(like: Tensor, bound: float, generator: torch.Generator) -> Tensor:
    draw = torch.rand(like.shape, generator=generator, dtype=torch.float64)
    return ((2 * draw - 1) * bound).to(like)
