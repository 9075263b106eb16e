"""Model structure: which layers hold splittable neurons, their per-channel chains and consumers.

The model is traced with ``torch.fx`` (so a custom ``forward`` works, not only ``nn.Sequential``).
For every neuron layer (producer) the channels are followed forward through the traced graph: each
operation they reach must be a registered per-channel operation (``graph.ops``) or a linear
consumer. Anything else blocks the layer, and the reason is kept for the user.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import fx, nn

from splitgrow._attrs import eval_mode, optional_tensor, tensor
from splitgrow.graph.ops import (
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


@dataclass(frozen=True)
class Consumer:
    """A layer that reads the producer's channels: its input columns are halved and duplicated."""

    name: str  # qualified module name
    node: fx.Node
    block: int  # input columns per producer channel (1, or the spatial size after a flatten)


@dataclass(frozen=True)
class ChainNode:
    """One operation on the path from a producer to its consumers."""

    node: fx.Node
    kind: StepKind
    module: str | None  # qualified module name when the op is a module with per-channel state
    layout: Layout


@dataclass
class LayerInfo:
    """What splitgrow knows about one neuron layer.

    Attributes:
        name: qualified name in ``model.named_modules()``.
        kind: module class name (``"Linear"``, ``"Conv2d"`` …).
        n: number of neurons (output features or channels).
        d: parameters per neuron: the weight row flattened in PyTorch order, then the bias if any.
        has_bias: whether the layer has a bias (its last component in ``d``).
        splittable: whether its neurons can be split.
        reason: why not, when ``splittable`` is ``False``.
        chain: per-channel operations between the layer and its consumers, in graph order.
        consumers: the layers whose inputs are the channels.
        assumes_2d: the chain (BatchNorm1d, PReLU) acts on dimension 1, which holds the neurons
            only when this Linear layer gets 2-D inputs; ``splitting_eigen`` checks it on data.
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

    def chain_modules(self) -> list[str]:
        """Modules in the chain whose per-channel parameters must be duplicated by a split."""
        return [c.module for c in self.chain if c.module is not None]


@dataclass
class ModelStructure:
    """The traced model and one :class:`LayerInfo` per neuron layer, in graph order."""

    graph_module: fx.GraphModule
    layers: dict[str, LayerInfo]

    def splittable(self) -> list[str]:
        """Names of the splittable layers, in graph order."""
        return [k for k, v in self.layers.items() if v.splittable]

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


def analyze(model: nn.Module) -> ModelStructure:
    """Trace ``model`` and describe every neuron layer (see :class:`LayerInfo`).

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace.

    Returns:
        The traced graph and the layers, splittable or not with the reason.
    """
    gm = trace(model)
    modules = dict(gm.named_modules())
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    nodes = list(gm.graph.nodes)
    layers: dict[str, LayerInfo] = {}
    for i, node in enumerate(nodes):
        if node.op != "call_module":
            continue
        name = str(node.target)
        module = modules[name]
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        n, d, has_bias = _neuron_dims(module)
        info = LayerInfo(name, type(module).__name__, n, d, has_bias, splittable=False, node=node)
        if not is_neuron_layer(module):
            if type(module) in (nn.Linear, nn.Conv1d, nn.Conv2d):  # a grouped convolution
                continue
            info.reason = (
                f"{type(module).__name__} is a subclass of a neuron layer (e.g. a weight_norm "
                "or spectral_norm parametrization); only plain Linear/Conv1d/Conv2d are split"
            )
            layers[name] = info
            continue
        layers[name] = info
        try:
            if calls[name] > 1:
                raise Blocked(f"module '{name}' is called {calls[name]} times (shared weights)")
            _follow(info, node, nodes[i + 1 :], modules, calls)
            info.splittable = True
        except Blocked as why:
            info.reason = str(why)
            info.chain, info.consumers = [], []
    return ModelStructure(gm, layers)


def _follow(
    info: LayerInfo,
    producer: fx.Node,
    later: list[fx.Node],
    modules: dict[str, nn.Module],
    calls: Counter[str],
) -> None:
    """Fill ``info.chain`` and ``info.consumers`` by following the producer's channels forward."""
    layouts: dict[fx.Node, Layout] = {producer: producer_layout(modules[info.name])}
    ctx = RuleContext(modules, info.n, set(layouts))
    for node in later:
        reached = [a for a in node.all_input_nodes if a in layouts]
        if not reached:
            continue
        if node.op == "output":
            raise Blocked("its channels reach the model output directly")
        if is_meta(node):  # kept in the chain so that re-running it reads the actual sizes
            info.chain.append(ChainNode(node, StepKind.META, None, layouts[reached[0]]))
            continue
        if len({layouts[a] for a in reached}) > 1:
            raise Blocked(f"{describe(node)} combines the channels in two different layouts")
        layout = layouts[reached[0]]
        if node.op == "call_module" and is_neuron_layer(modules[str(node.target)]):
            if len(node.args) != 1 or node.kwargs or node.args[0] not in layouts:
                raise Blocked(f"{describe(node)} takes the channels in an unsupported argument")
            if calls[str(node.target)] > 1:
                raise Blocked(
                    f"consumer {describe(node)} is called more than once (shared weights)"
                )
            block = consumer_block(modules[str(node.target)], layout, info.n)
            info.consumers.append(Consumer(str(node.target), node, block))
            continue
        rule = lookup_rule(node, modules)
        if rule is None:
            raise Blocked(
                f"its channels reach {describe(node)}, which is not a per-channel operation"
            )
        outside = [a for a in node.all_input_nodes if a not in layouts and not is_meta(a)]
        if outside:
            raise Blocked(
                f"{describe(node)} combines the channels with another tensor "
                f"('{outside[0].name}'), e.g. a residual add or a concatenation"
            )
        step = rule(node, layout, ctx)
        module_name = None
        if step.copies_module:
            module_name = str(node.target)
            if calls[module_name] > 1:
                raise Blocked(f"{describe(node)} is called more than once (shared weights)")
        info.assumes_2d = info.assumes_2d or step.assumes_2d
        info.chain.append(ChainNode(node, step.kind, module_name, step.layout))
        layouts[node] = step.layout
        ctx.chain.add(node)
    if not info.consumers:
        raise Blocked("no linear layer consumes its channels")
