"""``add_neurons``: grow layers by new neurons with given (or default) incoming and outgoing
weights; ``add_fresh_neurons``: random incoming, zero outgoing weights.

The growth baseline "grow-fresh" uses ``add_fresh_neurons``: the model's function is unchanged at
insertion (the new neurons' outgoing weights are zero), and the new neurons start from PyTorch's
default initialisation instead of a copy of an existing neuron. Strategies that choose new neurons
(GradMax, Firefly) give their weights to ``add_neurons``. Both are built on the split surgery
(ε = 0 copies of some parents), then rewritten: parents' consumer columns restored, new columns
set (zero by default), new rows set (drawn afresh by default), their BatchNorm reset to the
identity (but for a given ``chain_bias`` in the unit's first BatchNorm).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from splitgrow._attrs import optional_tensor, tensor
from splitgrow.graph.analyze import ChainNode, LayerInfo, Segments, analyze
from splitgrow.surgery.split import GrowthMap, channel_map, offspring_pairs, split_with_growth


@dataclass(frozen=True)
class NewNeurons:
    """``count`` new neurons for one unit (see :func:`add_neurons`).

    Attributes:
        count: how many.
        incoming: ``(count, d)`` their parameters θ (θ layout: every member's weight row
            flattened, then its bias, members side by side); ``None``: PyTorch's default
            initialisation.
        outgoing: ``{consumer name: (out, count·block, *kernel)}`` their columns in each consumer
            (after a flatten, ``block`` columns per channel, channel after channel); a consumer
            left out gets zero columns, so the function is unchanged.
        chain_bias: the BatchNorm bias (β) of the new channels in the unit's first BatchNorm
            (first in graph order along its chain), a float for all of them or a ``(count,)``
            tensor; ``None``: 0, so that the new BatchNorm channel is the identity (running mean
            0, running variance 1, weight 1). With a zero-fan-in neuron of a bias-free layer and
            that BatchNorm before the activation, it sets the pre-activation to β in eval and in
            train mode (a constant zero channel normalises to 0).
    """

    count: int
    incoming: Tensor | None = None
    outgoing: Mapping[str, Tensor] = field(default_factory=dict)
    chain_bias: float | Tensor | None = None


def add_fresh_neurons(
    model: nn.Module, counts: Mapping[str, int], *, generator: torch.Generator
) -> tuple[nn.Module, GrowthMap, dict[str, list[tuple[int, int]]]]:
    """A copy of ``model`` with ``counts[layer]`` new neurons appended to each listed layer, with
    random incoming and zero outgoing weights (:func:`add_neurons`)."""
    for name, k in counts.items():
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"counts['{name}'] must be an integer, got {k!r}")
    return add_neurons(model, {k: NewNeurons(v) for k, v in counts.items()}, generator=generator)


def add_neurons(
    model: nn.Module, new: Mapping[str, NewNeurons], *, generator: torch.Generator
) -> tuple[nn.Module, GrowthMap, dict[str, list[tuple[int, int]]]]:
    """A copy of ``model`` with ``new[unit].count`` new neurons appended to each listed unit.

    The new channels sit where :func:`~splitgrow.surgery.split.split_neurons` puts offspring (at
    the end of their unit's block in every tensor). Per-channel modules between the unit and its
    consumers get an identity BatchNorm channel and a copy of another channel's depthwise filter
    or PReLU slope. With the default (zero) outgoing weights the function is unchanged.

    Returns:
        The new model, how every parameter grew (for
        :func:`~splitgrow.surgery.optimizer.carry_state`, which with ``fresh=True`` starts the
        new neurons' optimizer state at zero, as ``grow`` does) and
        ``{layer: [(neuron whose slot it was cut from, new neuron)]}``.

    Raises:
        ValueError: an unknown or unsplittable layer, a count outside ``[0, width]``, weights of
            the wrong shape or with NaN, an outgoing entry for a module that is not a consumer,
            a ``chain_bias`` of the wrong shape or not finite, or for a unit without an affine
            BatchNorm in its chain.
    """
    structure = analyze(model)
    ref = next(iter(model.parameters()))
    plan = {}
    for name, spec in new.items():
        info = structure.require(name)
        if not isinstance(spec, NewNeurons):
            raise TypeError(f"new['{name}'] must be NewNeurons, got {type(spec).__name__}")
        k = spec.count
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= info.n:
            raise ValueError(f"counts['{name}'] must be an integer in [0, {info.n}], got {k!r}")
        _check_weights(name, spec, info)
        _check_chain_bias(name, spec, info, model)
        if k:
            idx = torch.randperm(info.n, generator=generator)[:k]
            plan[name] = (idx, torch.zeros(k, info.d, dtype=torch.float64))
    grown, growth = split_with_growth(model, plan, eps=0.0)
    modules = dict(grown.named_modules())
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
            if len(consumer.segments) == 1:  # the unit's own channels only: columns in order
                unit = consumer.segments[0][0]
                given = new[unit].outgoing.get(consumer.name) if unit in plan else None
                if given is not None:
                    # a consumer that grows too keeps zero weights between new neurons
                    kept = structure.layers[structure.unit_of(consumer.name)].n
                    if tuple(given.shape) != tuple(weight[:kept, cols.new].shape):
                        raise ValueError(
                            f"new['{unit}'].outgoing['{consumer.name}'] must have shape "
                            f"{tuple(weight[:kept, cols.new].shape)}, got {tuple(given.shape)}"
                        )
                    weight[:kept, cols.new] = given.to(weight)
        for name in plan:
            info = structure.layers[name]
            incoming = new[name].incoming
            for member in info.members:
                layer = modules[member.name]
                weight = tensor(layer, "weight")
                bias = optional_tensor(layer, "bias")
                if incoming is None:
                    bound = 1.0 / math.sqrt(weight[0].numel())  # PyTorch's default init for both
                    weight[info.n :] = _uniform(weight[info.n :], bound, generator)
                    if bias is not None:
                        bias[info.n :] = _uniform(bias[info.n :], bound, generator)
                    continue
                rows = incoming[:, member.offset : member.offset + member.d].to(ref)
                k = member.d - int(member.has_bias)
                fresh_in = weight.new_zeros(weight.shape[1], dtype=torch.bool)
                if member.name in consumers:  # it reads a unit that grows too: θ gives the old
                    c = consumers[member.name]  # columns, those of the new channels stay zero
                    fresh_in = channel_map(c.segments, chosen, weight.device).columns(c.block).new
                fresh_rows = weight[info.n :]
                fresh_rows[:, fresh_in] = 0.0
                fresh_rows[:, ~fresh_in] = rows[:, :k].reshape(fresh_rows[:, ~fresh_in].shape)
                if bias is not None:
                    bias[info.n :] = rows[:, k]
        for module, segments in per_channel.items():
            chain = modules[module]
            if isinstance(chain, nn.modules.batchnorm._BatchNorm):
                fresh = channel_map(segments, chosen).new
                for attr, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                                    ("running_var", 1.0)):  # fmt: skip
                    t = optional_tensor(chain, attr)
                    if t is not None:
                        t[fresh.to(t.device)] = value
        for name in plan:
            beta = new[name].chain_bias
            if beta is None:
                continue
            node = first_batchnorm(structure.layers[name], modules)
            assert node is not None and node.module is not None  # checked above
            bias = tensor(modules[node.module], "bias")
            mine = _new_channels_of(node.segments, chosen, name).to(bias.device)
            bias[mine] = torch.as_tensor(beta, dtype=torch.float64).to(bias)
    return grown, growth, pairs


def first_batchnorm(info: LayerInfo, modules: Mapping[str, nn.Module]) -> ChainNode | None:
    """The first node of ``info``'s chain (in graph order) that is a BatchNorm module.

    Args:
        info: the unit.
        modules: ``dict(model.named_modules())`` of the model ``info`` describes.

    Returns:
        That chain node, or ``None`` when the chain holds no BatchNorm.
    """
    for c in info.chain:
        if c.module is not None and isinstance(
            modules.get(c.module), nn.modules.batchnorm._BatchNorm
        ):
            return c
    return None


def _new_channels_of(segments: Segments, chosen: Mapping[str, Tensor], unit: str) -> Tensor:
    """``(channels,)`` mask of ``unit``'s new channels in a tensor made of ``segments``."""
    new = channel_map(segments, chosen).new
    owner = []
    for seg, size in segments:
        idx = chosen.get(seg)
        owner += [seg == unit] * (size + (0 if idx is None else idx.numel()))
    return new & torch.tensor(owner, dtype=torch.bool)


def _check_chain_bias(name: str, spec: NewNeurons, info: LayerInfo, model: nn.Module) -> None:
    beta = spec.chain_bias
    if beta is None:
        return
    what = f"new['{name}'].chain_bias"
    if isinstance(beta, Tensor):
        if tuple(beta.shape) not in ((), (spec.count,)):
            raise ValueError(f"{what} must be a float or have shape ({spec.count},)")
        if not bool(torch.isfinite(beta).all()):
            raise ValueError(f"{what} contains NaN or infinite values")
    elif isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
        raise ValueError(f"{what} must be a finite float or a tensor, got {beta!r}")
    modules = dict(model.named_modules())
    node = first_batchnorm(info, modules)
    if node is None or node.module is None:
        raise ValueError(f"{what} is given but '{name}' has no BatchNorm in its chain")
    if optional_tensor(modules[node.module], "bias") is None:
        raise ValueError(
            f"{what} is given but BatchNorm '{node.module}' has no bias (affine=False)"
        )


def _check_weights(name: str, spec: NewNeurons, info: Any) -> None:
    k = spec.count
    if spec.incoming is not None:
        if not isinstance(spec.incoming, Tensor) or tuple(spec.incoming.shape) != (k, info.d):
            raise ValueError(f"new['{name}'].incoming must have shape ({k}, {info.d})")
        if not bool(torch.isfinite(spec.incoming).all()):
            raise ValueError(f"new['{name}'].incoming contains NaN or infinite values")
    consumers = {c.name: c for c in info.consumers}
    for cname, w in spec.outgoing.items():
        if cname not in consumers:
            raise ValueError(f"new['{name}'].outgoing: '{cname}' is not a consumer of '{name}'")
        if len(consumers[cname].segments) != 1:
            raise ValueError(
                f"new['{name}'].outgoing: '{cname}' reads a concatenation; only the zero columns "
                "of a plain consumer can be given"
            )
        if not isinstance(w, Tensor) or w.dim() < 2 or w.shape[1] != k * consumers[cname].block:
            raise ValueError(
                f"new['{name}'].outgoing['{cname}'] must have shape (out, {k}·block, …)"
            )
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"new['{name}'].outgoing['{cname}'] contains NaN or infinite values")


def _uniform(like: Tensor, bound: float, generator: torch.Generator) -> Tensor:
    draw = torch.rand(like.shape, generator=generator, dtype=torch.float64)
    return ((2 * draw - 1) * bound).to(like)
