"""Model structure: which neurons can be split, their per-channel regions and consumers.

The model is traced with ``torch.fx`` (so a custom ``forward`` works, not only ``nn.Sequential``).
Every neuron layer (*producer*: Linear, Conv1d, Conv2d with ``groups=1``) starts a block of
channels. The blocks are followed forward through the traced graph: each operation they reach must
be a registered per-channel operation (``graph.ops``), a linear *consumer* (the next neuron layer,
where the block ends), or one of the two joins:

* an elementwise add/sub/mul/div of two such tensors couples the channels: channel ``i`` of every
  producer feeding the join must split together. The coupled producers form one *unit* (a
  residual stream: a ResNet's stem, its blocks' last convolutions and projection shortcuts); an
  identity shortcut has no parameters and just carries the channel to the next join;
* ``torch.cat`` along the channel dimension lays the blocks side by side: a split channel of one
  input gets its new copy at the end of that input's block, and every per-channel module and
  consumer after the concatenation is gathered accordingly (:attr:`Consumer.segments`).

A *unit* is what ``splitting_eigen``, ``split_neurons`` and ``grow`` see as one layer: it is named
after its first producer in graph order, its neuron i has the parameters of all its producers'
rows i, concatenated in graph order, and the other producers are reported as coupled into it.
Anything else blocks the units that reach it, and the reason is kept for the user.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from splitgrow._attrs import eval_mode, optional_tensor, tensor
from splitgrow.graph.ops import (
    ARITHMETIC,
    Blocked,
    Layout,
    RuleContext,
    StepKind,
    consumer_block,
    describe,
    is_meta,
    is_neuron_layer,
    lookup_rule,
    producer_layout,
)

#: ``(unit name, channels)`` blocks of a tensor's channel dimension, in order
Segments = tuple[tuple[str, int], ...]

_CATS: tuple[Any, ...] = (torch.cat, torch.concat, torch.concatenate)


@dataclass(frozen=True)
class Consumer:
    """A layer that reads the unit's channels: its input columns are halved and duplicated.

    ``segments`` are the blocks of its input's channels (more than one after a concatenation);
    each channel owns ``block`` consecutive input columns (the spatial size after a flatten).
    """

    name: str  # qualified module name
    node: fx.Node
    block: int
    segments: Segments = ()


@dataclass(frozen=True)
class ChainNode:
    """One operation that the unit's channels pass through on the way to its consumers."""

    node: fx.Node
    kind: StepKind
    module: str | None  # qualified module name when the op is a module with per-channel state
    layout: Layout
    segments: Segments = ()  # blocks of the channels of its (first) channel input
    joins: bool = False  # combines two tensors of the region (a residual add, a concatenation)


@dataclass(frozen=True)
class Member:
    """One producer of a unit: its rows are a slice ``[offset, offset + d)`` of the unit's θ."""

    name: str
    node: fx.Node
    d: int
    has_bias: bool
    offset: int


@dataclass
class LayerInfo:
    """What splitgrow knows about one neuron layer, or one unit of coupled layers.

    Attributes:
        name: qualified name in ``model.named_modules()`` (of the unit's first producer).
        kind: module class name (``"Linear"``, ``"Conv2d"`` …).
        n: number of neurons (output features or channels).
        d: parameters per neuron: the weight row flattened in PyTorch order, then the bias if any;
            for a unit, every member's in graph order.
        has_bias: whether the (first) layer has a bias.
        splittable: whether its neurons can be split.
        reason: why not, when ``splittable`` is ``False``.
        chain: per-channel operations between the producers and the consumers, in graph order.
        consumers: the layers whose inputs are the channels.
        assumes_2d: the chain (BatchNorm1d, PReLU) acts on dimension 1, which holds the neurons
            only when this Linear layer gets 2-D inputs; ``splitting_eigen`` checks it on data.
        members: the producers whose channels are coupled (one for a plain layer).
        unit: for a producer coupled into another layer's unit, that unit's name.
    """

    name: str
    kind: str
    n: int
    d: int
    has_bias: bool
    splittable: bool
    reason: str = ""
    node: fx.Node | None = None
    chain: list[ChainNode] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    assumes_2d: bool = False  # a Linear layer whose chain is valid only on 2-D inputs
    members: list[Member] = field(default_factory=list)
    unit: str | None = None

    def chain_modules(self) -> list[str]:
        """Modules in the chain whose per-channel parameters must be duplicated by a split."""
        return [c.module for c in self.chain if c.module is not None]

    @property
    def coupled(self) -> bool:
        """Whether the unit has several producers or its channels meet others at a join."""
        return len(self.members) > 1 or any(c.joins for c in self.chain)


@dataclass
class ModelStructure:
    """The traced model and one :class:`LayerInfo` per neuron layer, in graph order."""

    graph_module: fx.GraphModule
    layers: dict[str, LayerInfo]

    def splittable(self) -> list[str]:
        """Names of the splittable layers (units), in graph order."""
        return [k for k, v in self.layers.items() if v.splittable]

    def unit_of(self, layer: str) -> str:
        """The unit a layer's neurons belong to (its own name unless it is coupled)."""
        info = self.layers.get(layer)
        return layer if info is None or info.unit is None else info.unit

    def require(self, name: str) -> LayerInfo:
        """The info of a splittable layer ``name``.

        Raises:
            ValueError: naming the layer, when it is unknown or not splittable (with the reason).
        """
        if name not in self.layers:
            known = ", ".join(self.layers) or "none"
            raise ValueError(f"layer '{name}' is not a neuron layer of the model (known: {known})")
        info = self.layers[name]
        if not info.splittable:
            raise ValueError(f"layer '{name}' is not splittable: {info.reason}")
        return info


def trace(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` with ``torch.fx`` in eval mode; the model's train/eval flags are restored.

    Raises:
        TypeError: when ``model`` is not an ``nn.Module``.
        ValueError: when the model cannot be traced symbolically (data-dependent control flow).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        with eval_mode(model):
            return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many kinds of errors for untraceable code
        raise ValueError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); "
            "forward() must be symbolically traceable (no control flow on tensor values)"
        ) from exc


def _neuron_dims(module: nn.Module) -> tuple[int, int, bool]:
    weight = tensor(module, "weight")
    has_bias = optional_tensor(module, "bias") is not None
    n = int(weight.shape[0])
    d = int(weight[0].numel()) + int(has_bias)
    return n, d, has_bias


@dataclass(frozen=True)
class _Desc:
    """A tensor of the region: its layout and the blocks of its channels (by producer)."""

    layout: Layout | None  # None: the tensor is past a blocking operation
    segments: tuple[tuple[str, int], ...]

    @property
    def size(self) -> int:
        return sum(s for _, s in self.segments)


@dataclass(frozen=True)
class _Traced:
    """One operation on region tensors, as traced (before the units are known)."""

    node: fx.Node
    kind: StepKind
    module: str | None
    layout: Layout
    channels: _Desc  # its (first) channel input
    producers: frozenset[str]  # every producer whose channels reach it
    joins: bool
    assumes_2d: bool


class _Units:
    """Union–find over producers, with the first reason that blocks each."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}
        self.blocked: dict[str, str] = {}

    def add(self, name: str) -> None:
        self.parent[name] = name

    def find(self, name: str) -> str:
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def union(self, a: str, b: str, order: dict[str, int]) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the earlier producer names the unit
            first, second = (ra, rb) if order[ra] < order[rb] else (rb, ra)
            self.parent[second] = first

    def block(self, names: Any, reason: str) -> None:
        for name in names:
            self.blocked.setdefault(name, reason)


def analyze(model: nn.Module) -> ModelStructure:
    """Trace ``model`` and describe every neuron layer and unit (see :class:`LayerInfo`).

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace.

    Returns:
        The traced graph and the layers, splittable or not with the reason.
    """
    gm = trace(model)
    modules = dict(gm.named_modules())
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    nodes = list(gm.graph.nodes)
    order = {node: i for i, node in enumerate(nodes)}
    layers: dict[str, LayerInfo] = {}
    units = _Units()
    rank: dict[str, int] = {}
    desc: dict[fx.Node, _Desc] = {}
    steps: list[_Traced] = []
    metas: list[tuple[fx.Node, _Desc]] = []
    consumed: list[tuple[fx.Node, str, int, _Desc]] = []

    def names(*ds: _Desc) -> set[str]:
        return {u for d in ds for u, _ in d.segments}

    for node in nodes:
        reached = [a for a in node.all_input_nodes if a in desc]
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if module is not None and is_neuron_layer(module):
            producer = _producer(node, module, layers, calls, units, rank)
            if reached:
                _consume(node, module, reached, desc, calls, units, consumed)
            desc[node] = _Desc(producer_layout(module), ((producer, layers[producer].n),))
            continue
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and type(module) not in (
            nn.Linear, nn.Conv1d, nn.Conv2d,
        ):  # fmt: skip
            n, d, has_bias = _neuron_dims(module)
            layers[str(node.target)] = LayerInfo(
                str(node.target), type(module).__name__, n, d, has_bias, splittable=False,
                node=node, reason=f"{type(module).__name__} is a subclass of a neuron layer (e.g. "
                "a weight_norm or spectral_norm parametrization); only plain Linear/Conv1d/Conv2d "
                "are split",
            )  # fmt: skip
        # other convolutions (depthwise, grouped) are operations on the channels, or block them
        if not reached:
            continue
        inputs = [desc[a] for a in reached]
        involved = names(*inputs)
        if node.op == "output":
            units.block(involved, "its channels reach the model output directly")
            continue
        if is_meta(node):  # kept in the chain so that re-running it reads the actual sizes
            metas.append((node, inputs[0]))
            continue
        dead = [d for d in inputs if d.layout is None]
        if dead:  # past a blocking operation: whatever meets it cannot be split either
            culprit = sorted(names(*dead))[0]
            units.block(
                involved - names(*dead),
                f"{describe(node)} combines its channels with those of '{culprit}', which "
                f"cannot be split ({units.blocked.get(culprit, 'blocked')})",
            )
            desc[node] = _Desc(None, tuple((u, 0) for u in involved))
            continue
        try:
            out, step = _step(node, reached, desc, modules, calls, units, rank)
        except Blocked as why:
            units.block(involved, str(why))
            desc[node] = _Desc(None, tuple((u, 0) for u in involved))
            continue
        desc[node] = out
        steps.append(step)

    return ModelStructure(gm, _units(layers, units, steps, metas, consumed, order, rank))


def _producer(
    node: fx.Node,
    module: nn.Module,
    layers: dict[str, LayerInfo],
    calls: Counter[str],
    units: _Units,
    rank: dict[str, int],
) -> str:
    """Register a neuron layer, whose channels start a block."""
    name = str(node.target)
    n, d, has_bias = _neuron_dims(module)
    layers[name] = LayerInfo(name, type(module).__name__, n, d, has_bias, False, node=node)
    units.add(name)
    rank[name] = len(rank)
    if calls[name] > 1:
        units.block([name], f"module '{name}' is called {calls[name]} times (shared weights)")
    return name


def _consume(
    node: fx.Node,
    module: nn.Module,
    reached: list[fx.Node],
    desc: dict[fx.Node, _Desc],
    calls: Counter[str],
    units: _Units,
    consumed: list[tuple[fx.Node, str, int, _Desc]],
) -> None:
    """A neuron layer reading region tensors: a consumer, or a block with the reason."""
    involved = {u for a in reached for u, _ in desc[a].segments}
    try:
        if len(node.args) != 1 or node.kwargs or node.args[0] not in desc:
            raise Blocked(f"{describe(node)} takes the channels in an unsupported argument")
        if calls[str(node.target)] > 1:
            raise Blocked(f"consumer {describe(node)} is called more than once (shared weights)")
        d = desc[reached[0]]
        if d.layout is None:
            return
        block = consumer_block(module, d.layout, d.size)
    except Blocked as why:
        units.block(involved, str(why))
        return
    consumed.append((node, str(node.target), block, d))


def _step(
    node: fx.Node,
    reached: list[fx.Node],
    desc: dict[fx.Node, _Desc],
    modules: dict[str, nn.Module],
    calls: Counter[str],
    units: _Units,
    rank: dict[str, int],
) -> tuple[_Desc, _Traced]:
    """Pass the region tensors ``reached`` through ``node`` (joins included)."""
    inputs = [desc[a] for a in reached]
    first = inputs[0]
    producers = frozenset(u for d in inputs for u, _ in d.segments)
    assert first.layout is not None
    if node.op == "call_function" and node.target in _CATS:
        out, two_d = _cat(node, desc)
        assert out.layout is not None
        return out, _Traced(node, StepKind.LINEAR, None, out.layout, first, producers, True, two_d)
    layout, two_d = _common_layout(node, [d.layout for d in inputs])
    rule = lookup_rule(node, modules)
    if rule is None:
        raise Blocked(f"its channels reach {describe(node)}, which is not a per-channel operation")
    outside = [a for a in node.all_input_nodes if a not in desc and not is_meta(a)]
    if outside:
        raise Blocked(
            f"{describe(node)} combines the channels with another tensor "
            f"('{outside[0].name}'), e.g. a residual add of a tensor that no splittable layer "
            "produces"
        )
    joins = len(reached) > 1
    if joins:
        if _arith_name(node) is None:
            raise Blocked(f"{describe(node)} combines two tensors of channels")
        _couple(node, inputs, units, rank)
    ctx = RuleContext(modules, first.size, desc)
    step = rule(node, layout, ctx)
    module_name = None
    if step.copies_module:
        module_name = str(node.target)
        if calls[module_name] > 1:
            raise Blocked(f"{describe(node)} is called more than once (shared weights)")
    out = _Desc(step.layout, first.segments)
    traced = _Traced(
        node, step.kind, module_name, step.layout, first, producers, joins,
        step.assumes_2d or two_d,
    )  # fmt: skip
    return out, traced


def _arith_name(node: fx.Node) -> str | None:
    if node.op == "call_function":
        return ARITHMETIC.get(node.target)
    if node.op == "call_method" and node.target in ("add", "sub", "mul", "div"):
        return str(node.target)
    return None


def _couple(node: fx.Node, inputs: list[_Desc], units: _Units, rank: dict[str, int]) -> None:
    """An elementwise join of region tensors: channel i of every input splits together."""
    shapes = {tuple(s for _, s in d.segments) for d in inputs}
    if len(shapes) > 1:
        sizes = " and ".join(str(d.size) for d in inputs)
        raise Blocked(
            f"{describe(node)} joins {sizes} channels made of differently sized blocks "
            "(broadcasting, or a concatenation added to another tensor)"
        )
    for d in inputs[1:]:
        for (a, _), (b, _) in zip(inputs[0].segments, d.segments, strict=True):
            units.union(a, b, rank)


_LINEAR_OUT = Layout(None, -1)  # a Linear layer's output, of unknown rank
_TWO_D = Layout(2, 1)  # a 2-D (batch, features) tensor, e.g. after BatchNorm1d


def _common_layout(node: fx.Node, layouts: list[Layout | None]) -> tuple[Layout, bool]:
    """The layout shared by the inputs of a join, and whether it holds only for 2-D inputs (a
    Linear output next to a BatchNorm1d output: both are 2-D then, which is checked on data)."""
    distinct = set(layouts)
    if len(distinct) == 1 and layouts[0] is not None:
        return layouts[0], False
    if distinct == {_LINEAR_OUT, _TWO_D}:
        return _TWO_D, True
    raise Blocked(f"{describe(node)} combines the channels in two different layouts")


def _cat(node: fx.Node, desc: dict[fx.Node, _Desc]) -> tuple[_Desc, bool]:
    """``torch.cat`` of region tensors along the channel dimension: the blocks side by side
    (and whether that holds only for 2-D inputs)."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)):
        raise Blocked(f"{describe(node)} of a list that is not traced element by element")
    parts = []
    for t in tensors:
        if not isinstance(t, fx.Node) or t not in desc:
            what = t.name if isinstance(t, fx.Node) else type(t).__name__
            raise Blocked(
                f"{describe(node)} concatenates the channels with '{what}', whose channels no "
                "splittable layer produces"
            )
        parts.append(desc[t])
    layout, two_d = _common_layout(node, [d.layout for d in parts])
    if layout.flat:
        raise Blocked(
            f"{describe(node)} of flattened maps: concatenate the maps along the channels "
            "before flattening them"
        )
    if layout == _LINEAR_OUT and dim == 1:  # Linear outputs: channels at dim 1 only if 2-D
        layout, two_d = _TWO_D, True
    channel_dims = {layout.cdim}
    if layout.ndim is not None:
        channel_dims.add(layout.cdim % layout.ndim)
        channel_dims.add(layout.cdim % layout.ndim - layout.ndim)
    if not isinstance(dim, int) or dim not in channel_dims:
        raise Blocked(
            f"{describe(node)} along dimension {dim}, not the channel dimension: it would mix "
            "positions of different channels"
        )
    return _Desc(layout, tuple(s for d in parts for s in d.segments)), two_d


def _units(
    layers: dict[str, LayerInfo],
    units: _Units,
    steps: list[_Traced],
    metas: list[tuple[fx.Node, _Desc]],
    consumed: list[tuple[fx.Node, str, int, _Desc]],
    order: dict[fx.Node, int],
    rank: dict[str, int],
) -> dict[str, LayerInfo]:
    """Gather the traced facts into one :class:`LayerInfo` per unit, named by its root."""
    find = units.find
    roots = {name: find(name) for name in units.parent}
    blocked: dict[str, str] = {}
    for name, why in units.blocked.items():
        blocked.setdefault(roots[name], why if roots[name] == name else f"{name}: {why}")

    def resolve(d: _Desc) -> Segments:
        return tuple((roots[u], s) for u, s in d.segments)

    for name, root in roots.items():
        info = layers[name]
        if root != name:
            info.unit = root
            info.reason = (
                f"its channels are coupled with those of '{root}' (a residual add or an "
                f"elementwise product): split it as part of unit '{root}'"
            )
    for root in set(roots.values()):
        info = layers[root]
        members = sorted((n for n, r in roots.items() if r == root), key=rank.__getitem__)
        offset = 0
        for m in members:
            mi = layers[m]
            assert mi.node is not None
            info.members.append(Member(m, mi.node, mi.d, mi.has_bias, offset))
            offset += mi.d
        widths = {layers[m].n for m in members}
        if len(widths) > 1:
            blocked.setdefault(root, f"coupled layers {members} have different widths {widths}")
        info.d = offset
    for t in steps:
        segs = resolve(t.channels)
        for root in {roots[u] for u in t.producers}:
            info = layers[root]
            info.chain.append(ChainNode(t.node, t.kind, t.module, t.layout, segs, t.joins))
            info.assumes_2d = info.assumes_2d or t.assumes_2d
    for node, d in metas:
        layout = d.layout or Layout(None, 1)
        for root in {u for u, _ in resolve(d)}:
            layers[root].chain.append(ChainNode(node, StepKind.META, None, layout))
    for node, name, block, d in consumed:
        segs = resolve(d)
        for root in {u for u, _ in segs}:
            layers[root].consumers.append(Consumer(name, node, block, segs))
    for root in set(roots.values()):
        info = layers[root]
        info.chain.sort(key=lambda c: order[c.node])
        if root in blocked:
            info.reason = blocked[root]
        elif not info.consumers:
            info.reason = "no linear layer consumes its channels"
        else:
            info.splittable = True
        if not info.splittable:
            info.chain, info.consumers = [], []
    for name, root in roots.items():
        if root != name and not layers[root].splittable:
            layers[name].reason = (
                f"its channels are coupled with those of '{root}', which cannot be split: "
                f"{layers[root].reason}"
            )
    return layers
