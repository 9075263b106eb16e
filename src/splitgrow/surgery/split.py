"""``split_neurons``: split chosen neurons of a model into two offspring each."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from splitgrow._attrs import optional_tensor, tensor
from splitgrow.graph.analyze import LayerInfo, ModelStructure, Segments, analyze
from splitgrow.surgery.handlers import surgery_for

Plan = Mapping[str, tuple[Tensor, Tensor]]


def _check_entry(
    name: str, info: LayerInfo, entry: Any, eps: Any, ref: Tensor
) -> tuple[Tensor, Tensor]:
    if not isinstance(entry, (tuple, list)) or len(entry) != 2:
        raise TypeError(f"plan['{name}'] must be an (indices, directions) pair")
    idx, dirs = entry
    if not isinstance(idx, Tensor) or idx.dtype not in (
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
    ):
        raise TypeError(f"plan['{name}'] indices must be an integer tensor")
    if idx.dim() != 1:
        raise ValueError(f"plan['{name}'] indices must have shape (k,), got {tuple(idx.shape)}")
    idx = idx.to(device=ref.device, dtype=torch.long)
    k = idx.numel()
    if k and (int(idx.min()) < 0 or int(idx.max()) >= info.n):
        raise ValueError(f"plan['{name}'] indices must lie in [0, {info.n}), got {idx.tolist()}")
    if int(torch.unique(idx).numel()) != k:
        raise ValueError(f"plan['{name}'] indices contain duplicates: {idx.tolist()}")
    if not isinstance(dirs, Tensor) or not dirs.is_floating_point():
        raise TypeError(f"plan['{name}'] directions must be a floating-point tensor")
    if tuple(dirs.shape) != (k, info.d):
        raise ValueError(
            f"plan['{name}'] directions must have shape ({k}, {info.d}), got {tuple(dirs.shape)}"
        )
    if not bool(torch.isfinite(dirs).all()):
        raise ValueError(f"plan['{name}'] directions contain NaN or infinite values")
    e = eps.get(name, 0.0) if isinstance(eps, Mapping) else eps
    if isinstance(e, Tensor):
        if e.dim() > 1 or (e.dim() == 1 and e.numel() != k) or not bool(torch.isfinite(e).all()):
            raise ValueError(f"eps for '{name}' must be a finite scalar or a ({k},) tensor")
        e = e.to(device=ref.device, dtype=ref.dtype).reshape(-1, 1) if e.dim() else float(e)
    elif isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e):
        raise ValueError(f"eps must be a finite number, got {e!r}")
    return idx, dirs.to(device=ref.device, dtype=ref.dtype) * e


@dataclass(frozen=True)
class Growth:
    """How one parameter or buffer grew: along ``dim``, new slot ``j`` copies old slot
    ``source[j]``; ``new[j]`` says whether slot ``j`` is an added one (an offspring)."""

    dim: int
    source: Tensor
    new: Tensor


#: ``{qualified parameter or buffer name: growths, in the order they were applied}``
GrowthMap = dict[str, list[Growth]]


@dataclass(frozen=True)
class ChannelMap:
    """Where every channel of a tensor comes from after a split (:func:`channel_map`).

    Attributes:
        source: ``(new size,)`` old channel of each new channel.
        new: ``(new size,)`` ``True`` for the appended offspring channels.
        split: ``(new size,)`` ``True`` for both channels of a split pair.
        scale: ``(new size,)`` factor of each channel's consumer columns: 1, or a split pair's
            shares (½ and ½ for a symmetric split; s and 1 − s for a signed one).
    """

    source: Tensor
    new: Tensor
    split: Tensor
    scale: Tensor

    def columns(self, block: int) -> ChannelMap:
        """The same map over a consumer's input columns, ``block`` per channel."""
        offsets = torch.arange(block, device=self.source.device)
        return ChannelMap(
            (self.source[:, None] * block + offsets).reshape(-1),
            self.new.repeat_interleave(block),
            self.split.repeat_interleave(block),
            self.scale.repeat_interleave(block),
        )


def offspring_pairs(n: int, idx: Tensor) -> list[tuple[int, int]]:
    """``(parent, offspring)`` of a split of a width-``n`` unit: the j-th listed neuron's
    offspring is appended as neuron ``n + j``."""
    return list(zip(idx.tolist(), range(n, n + int(idx.numel())), strict=True))


def channel_map(
    segments: Segments,
    chosen: Mapping[str, Tensor],
    device: torch.device | None = None,
    shares: Mapping[str, Tensor] | None = None,
) -> ChannelMap:
    """The new channel order of a tensor made of ``segments`` when the units ``chosen`` split.

    Each block keeps its old channels in order, then gets the offspring of its split channels, so
    that a concatenation's later blocks shift but stay together. ``shares[unit]`` (``(k,)``, in
    the order of ``chosen[unit]``) is each parent's share of its outgoing weights, the offspring
    getting the rest; ½ by default.
    """
    source, new, split, scale = [], [], [], []
    offset = 0
    f64 = torch.float64
    for name, size in segments:
        source.append(torch.arange(offset, offset + size, device=device))
        new.append(torch.zeros(size, dtype=torch.bool, device=device))
        halved = torch.zeros(size, dtype=torch.bool, device=device)
        factor = torch.ones(size, dtype=f64, device=device)
        split.append(halved)
        scale.append(factor)
        idx = chosen.get(name)
        if idx is not None and idx.numel():
            idx = idx.to(device)
            share = (shares or {}).get(name)
            share = (
                torch.full((idx.numel(),), 0.5, dtype=f64, device=device)
                if share is None
                else share.to(device=device, dtype=f64)
            )
            halved[idx] = True
            factor[idx] = share
            source.append(offset + idx)
            new.append(torch.ones(idx.numel(), dtype=torch.bool, device=device))
            split.append(torch.ones(idx.numel(), dtype=torch.bool, device=device))
            scale.append(1.0 - share)
        offset += size
    return ChannelMap(torch.cat(source), torch.cat(new), torch.cat(split), torch.cat(scale))


def split_neurons(
    model: nn.Module, plan: Plan, *, eps: float | Mapping[str, float | Tensor]
) -> nn.Module:
    """A copy of ``model`` with the planned neurons split (DESIGN.md §1, "Split").

    Neuron i of layer L listed in ``plan[L] = (indices (k,), directions (k, d))`` becomes
    θ_i + ε·v and gains an offspring θ_i − ε·v, appended as output channel ``n + j`` (j-th listed).
    Every consumer's input columns of channel i (a whole block after a flatten) are halved and
    duplicated; BatchNorm parameters and running statistics, depthwise filters and PReLU slopes are
    copied. A unit of coupled layers (a residual stream) splits row i of every member, with the
    member's slice of the direction; after a concatenation the copy sits at the end of its
    input's block of channels. At ε = 0 the new model computes the same function. When a layer
    and its consumer are both split, the rows are split first, then the columns halved (in all
    rows).

    Args:
        model: the model; it is not modified.
        plan: ``{layer name: (indices, directions)}``; directions in θ layout (weight row
            flattened in PyTorch order, then the bias).
        eps: step size ε: one number, or per layer a number or a ``(k,)`` tensor.

    Returns:
        A new model of the same module classes, with consistent ``in_features``,
        ``out_channels``, ``num_features``, ``groups`` …

    Raises:
        TypeError/ValueError: naming the bad layer, index, shape or value; ``ValueError`` naming
            the blocking operation when a layer is not splittable.
    """
    return split_with_growth(model, plan, eps=eps)[0]


def split_with_growth(
    model: nn.Module, plan: Plan, *, eps: float | Mapping[str, float | Tensor]
) -> tuple[nn.Module, GrowthMap]:
    """:func:`split_neurons`, also returning which old slot every new row and column copies
    (what :func:`splitgrow.surgery.optimizer.carry_state` needs to grow optimizer state)."""
    if not isinstance(plan, Mapping):
        raise TypeError(
            "plan must be a mapping of layer name to (indices, directions), "
            f"got {type(plan).__name__}"
        )
    structure = analyze(model)
    ref = next(iter(model.parameters()))
    entries = {}
    for name, entry in plan.items():
        info = structure.require(name)
        idx, delta = _check_entry(name, info, entry, eps, ref)
        entries[name] = _Entry(info, idx, delta, -delta, None)
    return _split(model, entries, ref)


@dataclass(frozen=True)
class SignedSplit:
    """A signed split of neurons ``idx`` of one unit (see :func:`signed_split_with_growth`).

    Attributes:
        idx: ``(k,)`` neurons to split.
        parent: ``(k, d)`` offset direction of each parent (θ layout, all members side by side).
        offspring: ``(k, d)`` offset direction of each offspring.
        share: ``(k,)`` the parent's share s of the outgoing weights; the offspring gets 1 − s.
            s·parent + (1 − s)·offspring must vanish, so that the split has no first-order effect.
    """

    idx: Tensor
    parent: Tensor
    offspring: Tensor
    share: Tensor


def signed_split_with_growth(
    model: nn.Module,
    plan: Mapping[str, SignedSplit],
    *,
    eps: float | Mapping[str, float | Tensor],
) -> tuple[nn.Module, GrowthMap]:
    """A copy of ``model`` with neurons split into offspring of unequal, possibly opposite,
    output weights (signed splitting, docs/signed_splitting.md).

    Neuron i becomes θ_i + ε·a_i with outgoing weights s_i·c_i and gains an offspring
    θ_i + ε·b_i with outgoing weights (1 − s_i)·c_i (appended as in :func:`split_neurons`). With
    s = ½ and b = −a this is :func:`split_neurons`. At ε = 0 the function is unchanged.

    Raises:
        TypeError/ValueError: naming the bad layer, index, shape or value; a first-order term
            s·a + (1 − s)·b that does not vanish.
    """
    return signed_split_traced(model, analyze(model), plan, eps=eps)


def signed_split_traced(
    model: nn.Module,
    structure: ModelStructure,
    plan: Mapping[str, SignedSplit],
    *,
    eps: float | Mapping[str, float | Tensor],
) -> tuple[nn.Module, GrowthMap]:
    """:func:`signed_split_with_growth` with ``structure`` = ``analyze(model)`` already at hand
    (a line search splits one model many times; tracing it once saves a trace per split).
    ``structure`` must be the analysis of this very model, unchanged since."""
    if not isinstance(plan, Mapping):
        raise TypeError(f"plan must be a mapping of layer name to SignedSplit, got {plan!r}")
    ref = next(iter(model.parameters()))
    entries = {}
    for name, entry in plan.items():
        if not isinstance(entry, SignedSplit):
            raise TypeError(f"plan['{name}'] must be a SignedSplit, got {type(entry).__name__}")
        info = structure.require(name)
        idx, a = _check_entry(name, info, (entry.idx, entry.parent), eps, ref)
        _, b = _check_entry(name, info, (entry.idx, entry.offspring), eps, ref)
        share = entry.share
        if (
            not isinstance(share, Tensor)
            or tuple(share.shape) != (idx.numel(),)
            or not bool(torch.isfinite(share).all())
        ):
            raise ValueError(f"plan['{name}'].share must be a finite ({idx.numel()},) tensor")
        share = share.to(device=ref.device, dtype=torch.float64)
        # the first-order term in float64, relative to its parts (the directions as given)
        s = share[:, None]
        pa = entry.parent.to(device=ref.device, dtype=torch.float64)
        pb = entry.offspring.to(device=ref.device, dtype=torch.float64)
        mean = (s * pa + (1 - s) * pb).abs().max() if idx.numel() else torch.zeros(())
        scale = ((s * pa).abs().max() + ((1 - s) * pb).abs().max()) if idx.numel() else 0.0
        tiny = 1e3 * torch.finfo(entry.parent.dtype).eps  # the directions' own rounding
        if float(mean) > tiny * max(float(scale), 1e-30):
            raise ValueError(
                f"plan['{name}']: share·parent + (1 − share)·offspring must vanish (a split has "
                f"no first-order effect), got {float(mean):.3g}"
            )
        entries[name] = _Entry(info, idx, a, b, share)
    return _split(model, entries, ref)


@dataclass(frozen=True)
class _Entry:
    info: LayerInfo
    idx: Tensor
    parent: Tensor  # (k, d) offset of each parent (already × ε)
    offspring: Tensor  # (k, d) offset of each offspring
    share: Tensor | None  # (k,) parent's share of the outgoing weights (None: ½)


def _shift_rows(module: nn.Module, rows: Tensor, shift: Tensor) -> None:
    """Add ``shift`` (``(k, d)``, θ layout) to rows ``rows`` of a neuron layer."""
    weight = tensor(module, "weight")
    flat = weight.view(weight.shape[0], -1)
    k = flat.shape[1]
    flat[rows] += shift[:, :k]
    bias = optional_tensor(module, "bias")
    if bias is not None:
        bias[rows] += shift[:, k]


def _split(
    model: nn.Module, entries: Mapping[str, _Entry], ref: Tensor
) -> tuple[nn.Module, GrowthMap]:
    new = copy.deepcopy(model)
    modules = dict(new.named_modules())
    growth: GrowthMap = {}
    chosen = {name: e.idx for name, e in entries.items()}
    shares = {name: e.share for name, e in entries.items() if e.share is not None}

    def grew(module: str, dim: int, cmap: ChannelMap) -> None:
        """Record that every tensor of ``module`` grew along ``dim`` (all of them do)."""
        m = modules[module]
        tensors = [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]
        for tname, value in tensors:
            if value.dim() > dim and value.shape[dim] == cmap.source.numel():
                growth.setdefault(f"{module}.{tname}", []).append(
                    Growth(dim, cmap.source, cmap.new)
                )

    # every per-channel module and consumer once, with the blocks of the channels it sees
    per_channel: dict[str, Any] = {}
    consumers: dict[str, Any] = {}
    for e in entries.values():
        info = e.info
        for c in info.chain:
            if c.module is not None:
                per_channel[c.module] = c.segments
        for consumer in info.consumers:
            consumers[consumer.name] = consumer
    with torch.no_grad():
        for name, e in entries.items():
            info, idx = e.info, e.idx
            rows = channel_map(((name, info.n),), chosen, ref.device)  # n rows, then offspring
            half, mean = (e.parent - e.offspring) / 2, (e.parent + e.offspring) / 2
            symmetric = e.share is None
            for member in info.members:
                part = slice(member.offset, member.offset + member.d)
                surgery_for(modules[member.name]).split_out(
                    modules[member.name], idx, half[:, part]
                )
                if not symmetric:  # both rows move by the mean offset as well
                    copies = torch.arange(info.n, info.n + idx.numel(), device=idx.device)
                    _shift_rows(
                        modules[member.name], torch.cat([idx, copies]), mean[:, part].repeat(2, 1)
                    )
                grew(member.name, 0, rows)
        for module, segments in per_channel.items():
            cmap = channel_map(segments, chosen, ref.device)
            surgery_for(modules[module]).gather_out(modules[module], cmap.source)
            grew(module, 0, cmap)
        for consumer in consumers.values():
            cmap = channel_map(consumer.segments, chosen, ref.device, shares)
            surgery_for(modules[consumer.name]).gather_in(
                modules[consumer.name], cmap.source, cmap.scale, consumer.block
            )
            grew(consumer.name, 1, cmap.columns(consumer.block))
    return new, growth
