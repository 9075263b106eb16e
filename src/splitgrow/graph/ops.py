"""The table of operations a neuron's channel may pass through on its way to a consumer.

A *neuron layer* (producer) is an ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` with ``groups=1``.
Between a producer and its *consumers* (the next Linear/Conv layers, which are linear in their
input) the channel may pass through per-channel operations only: BatchNorm, activations,
depthwise convolutions, pooling, dropout, flatten, identity, scalar arithmetic. Each entry in this
module's registries says how an operation changes the channel *layout* and what kind of step it is
(DESIGN.md §1: the closed form needs to know which steps have curvature).

Users can extend the tables with :func:`register_module_rule`, :func:`register_function_rule` and
:func:`register_method_rule`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Container
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from splitgrow._attrs import attr


class Blocked(Exception):
    """Raised by a rule when a channel cannot pass through an operation; the message says why."""


@dataclass(frozen=True)
class Layout:
    """Where the producer's channels sit in a tensor of the chain.

    Attributes:
        ndim: number of dimensions (batch included), or ``None`` when unknown (a Linear producer
            applied to inputs of unknown rank: channels are then the last dimension).
        cdim: the channel dimension: ``1`` or ``-1`` (last).
        flat: ``True`` after a spatial map was flattened: channel ``c`` then owns a contiguous block
            of features ``[c·P, (c+1)·P)`` whose size ``P`` the consumer determines.
        unit: ``True`` when every spatial dimension is known to have size 1 (after an adaptive
            pool to 1 or a mean with ``keepdim=True``), so that ``squeeze`` may drop them.
    """

    ndim: int | None
    cdim: int
    flat: bool = False
    unit: bool = False

    def channels_at_dim1(self) -> bool:
        """Whether channels are dimension 1 (``cdim=1``, or a 2-D channel-last tensor)."""
        return self.cdim == 1 or self.ndim in (None, 2)


class StepKind(Enum):
    """What an operation does to the second-order behaviour of the chain."""

    AFFINE = "affine"  # pointwise affine map per channel (eval BatchNorm, dropout, x*2, identity)
    LINEAR = "linear"  # linear or piecewise linear, may mix positions (pools, depthwise, flatten)
    ACTIVATION = "activation"  # pointwise non-linear σ with σ'' ≠ 0
    CURVED = "curved"  # non-linear and not a single pointwise σ (e.g. x * sigmoid(x))
    BATCHNORM = "batchnorm"  # affine with running statistics, non-linear with batch statistics
    META = "meta"  # reads a size or shape of a chain tensor (no channel data flows through)


@dataclass(frozen=True)
class Step:
    """The result of passing a chain tensor through one operation."""

    layout: Layout
    kind: StepKind
    copies_module: bool = False  # the op is a module with per-channel parameters to duplicate
    assumes_2d: bool = False  # valid only if a Linear producer's output is 2-D (checked on data)


@dataclass(frozen=True)
class RuleContext:
    """What a rule may look at: the traced module table and the producer's channel count."""

    modules: dict[str, nn.Module]
    n: int  # channels of the tensor the rule is applied to
    chain: Container[fx.Node]  # tensors that carry splittable channels

    def module(self, node: fx.Node) -> nn.Module:
        return self.modules[str(node.target)]


Rule = Callable[[fx.Node, Layout, RuleContext], Step]

MODULE_RULES: dict[type[nn.Module], Rule] = {}
FUNCTION_RULES: dict[Callable[..., Any], Rule] = {}
METHOD_RULES: dict[str, Rule] = {}


def register_module_rule(*types: type[nn.Module]) -> Callable[[Rule], Rule]:
    """Register ``rule`` for calls of modules of the given types (decorator)."""

    def deco(rule: Rule) -> Rule:
        for t in types:
            MODULE_RULES[t] = rule
        return rule

    return deco


def register_function_rule(*fns: Callable[..., Any]) -> Callable[[Rule], Rule]:
    """Register ``rule`` for calls of the given functions (decorator)."""

    def deco(rule: Rule) -> Rule:
        for f in fns:
            FUNCTION_RULES[f] = rule
        return rule

    return deco


def register_method_rule(*names: str) -> Callable[[Rule], Rule]:
    """Register ``rule`` for calls of the given tensor methods (decorator)."""

    def deco(rule: Rule) -> Rule:
        for name in names:
            METHOD_RULES[name] = rule
        return rule

    return deco


def describe(node: fx.Node) -> str:
    """A short human-readable name for a traced operation."""
    if node.op == "call_module":
        return f"module '{node.target}'"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return f"function '{name}'"
    if node.op == "call_method":
        return f"method '.{node.target}()'"
    if node.op == "output":
        return "the model output"
    return f"{node.op} '{node.target}'"


def first_input(node: fx.Node) -> fx.Node:
    """The node's first argument, which must be another node (a tensor of the graph)."""
    arg = node.args[0]
    if not isinstance(arg, fx.Node):
        raise TypeError(f"{describe(node)}: first argument is not a traced tensor")
    return arg


def lookup_rule(node: fx.Node, modules: dict[str, nn.Module]) -> Rule | None:
    """The registered rule for ``node``, or ``None`` when the operation is not supported."""
    if node.op == "call_module":
        return MODULE_RULES.get(type(modules[str(node.target)]))
    if node.op == "call_function":
        return FUNCTION_RULES.get(node.target) if callable(node.target) else None
    if node.op == "call_method":
        return METHOD_RULES.get(str(node.target))
    return None


# --------------------------------------------------------------------------------------------
# Producers and consumers: the layers that hold neurons.


def is_neuron_layer(module: nn.Module) -> bool:
    """Linear, Conv1d and Conv2d with ``groups=1`` hold neurons (and are linear consumers)."""
    if type(module) is nn.Linear:
        return True
    return type(module) in (nn.Conv1d, nn.Conv2d) and attr(module, "groups") == 1


def is_depthwise(module: nn.Module) -> bool:
    """A depthwise convolution: one filter per channel (``groups == in == out channels``)."""
    if type(module) not in (nn.Conv1d, nn.Conv2d):
        return False
    groups = attr(module, "groups")
    return bool(
        groups > 1 and groups == attr(module, "in_channels") == attr(module, "out_channels")
    )


def producer_layout(module: nn.Module) -> Layout:
    """The layout of a neuron layer's output channels."""
    if isinstance(module, nn.Linear):
        return Layout(ndim=None, cdim=-1)
    if isinstance(module, nn.Conv1d):
        return Layout(ndim=3, cdim=1)
    return Layout(ndim=4, cdim=1)


def consumer_block(module: nn.Module, layout: Layout, n: int) -> int:
    """How many input columns of consumer ``module`` belong to each producer channel.

    Raises:
        Blocked: when the consumer does not take the channels as contiguous column blocks.
    """
    if isinstance(module, nn.Linear):
        if not (layout.cdim == -1 or layout.ndim == 2):
            raise Blocked(
                f"Linear consumer applied to a {layout.ndim}-D map whose channels are not the "
                "last dimension"
            )
        if not layout.flat:
            if module.in_features != n:
                raise Blocked(
                    f"consumer has in_features={module.in_features}, expected {n} (a Linear "
                    "layer applied to inputs with more than 2 dimensions, then reshaped?)"
                )
            return 1
        if module.in_features % n:
            raise Blocked(
                f"flattened consumer in_features={module.in_features} is not a multiple of {n}"
            )
        return module.in_features // n
    expected = 3 if isinstance(module, nn.Conv1d) else 4
    if layout.flat or layout.cdim != 1 or layout.ndim != expected:
        raise Blocked(f"{type(module).__name__} consumer does not see the channels at dimension 1")
    if module.in_channels != n:
        raise Blocked(f"consumer has in_channels={module.in_channels}, expected {n}")
    return 1


# --------------------------------------------------------------------------------------------
# Modules.

POINTWISE_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.LogSigmoid,
)
DROPOUTS: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
BATCHNORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)


def _need_spatial(layout: Layout, ndim: int, what: str) -> None:
    if layout.flat or layout.cdim != 1 or layout.ndim != ndim:
        raise Blocked(f"{what} expects a {ndim}-D map with channels at dimension 1")


@register_module_rule(*POINTWISE_ACTIVATIONS)
def _activation_module(node: fx.Node, layout: Layout, ctx: RuleContext) -> Step:
    return Step(layout, StepKind.ACTIVATION)


@register_module_rule(nn.PReLU)
def _prelu(node: fx.Node, layout: Layout, ctx: RuleContext) -> Step:
    m = ctx.module(node)
    if m.num_parameters == 1:
        return Step(layout, StepKind.ACTIVATION)
    if layout.flat or not layout.channels_at_dim1() or m.num_parameters != ctx.n:
        raise Blocked(f"PReLU with {m.num_parameters} parameters does not act per producer channel")
    return Step(layout, StepKind.ACTIVATION, copies_module=True, assumes_2d=layout.ndim is None)


@register_module_rule(*DROPOUTS, nn.Identity)
def _identity(node: fx.Node, layout: Layout, ctx: RuleContext) -> Step:
    return Step(layout, StepKind.AFFINE)


@register_module_rule(*BATCHNORMS)
def _batchnorm(node: fx.Node, layout: Layout, ctx: RuleContext) -> Step:
    m = ctx.module(node)
    if isinstance(m, nn.BatchNorm2d):
        _need_spatial(layout, 4, "BatchNorm2d")
    elif layout.flat or not layout.channels_at_dim1() or layout.ndim not in (None, 2, 3):
        raise Blocked("BatchNorm1d does not see the producer's channels at dimension 1")
    if m.num_features != ctx.n:
        raise Blocked(f"BatchNorm has num_features={m.num_features}, expected {ctx.n}")
    ndim = 2 if layout.ndim is None else layout.ndim
    # without running statistics it always normalises with the batch's: not an affine map
    kind = StepKind.BATCHNORM if getattr(m, "running_mean", None) is not None else StepKind.CURVED
    return Step(Layout(ndim, 1), kind, copies_module=True, assumes_2d=layout.ndim is None)


@register_module_rule(nn.Conv1d, nn.Conv2d)
def _depthwise(node: fx.Node, layout: Layout, ctx: RuleContext) -> Step:
    m = ctx.module(node)
    if not is_depthwise(m):
        groups, cin, cout = attr(m, "groups"), attr(m, "in_channels"), attr(m, "out_channels")
        if groups == cin and cout != cin:
            raise Blocked(f"depthwise convolution with channel multiplier {cout // cin} (only 1)")
        raise Blocked(f"grouped convolution with groups={groups} mixes channels in groups")
    _need_spatial(layout, 3 if isinstance(m, nn.Conv1d) else 4, "depthwise convolution")
    if m.in_channels != ctx.n:
        raise Blocked(f"depthwise convolution has {m.in_channels} channels, expected {ctx.n}")
    return Step(Layout(layout.ndim, 1), StepKind.LINEAR, copies_module=True)


def _to_one(size: Any) -> bool:
    """Whether an adaptive pool's ``output_size`` makes every spatial dimension 1."""
    sizes = size if isinstance(size, (tuple, list)) else (size,)
    return all(s == 1 for s in sizes)


@register_module_rule(nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)
def _pool1d(node: fx.Node, layout: Layout, ctx: RuleContext) -> Step:
    _need_spatial(layout, 3, "1-D pooling")
    unit = _to_one(getattr(ctx.module(node), "output_size", None))
    return Step(Layout(3, 1, unit=unit), StepKind.LINEAR)


@register_module_rule(nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
def _pool2d(node: fx.Node, layout: Layout, ctx: RuleContext) -> Step:
    _need_spatial(layout, 4, "2-D pooling")
    unit = _to_one(getattr(ctx.module(node), "output_size", None))
    return Step(Layout(4, 1, unit=unit), StepKind.LINEAR)


def _flatten_from(layout: Layout, start: int, end: int) -> Step:
    if start != 1 or end != -1:
        raise Blocked(
            f"flatten(start_dim={start}, end_dim={end}) does not keep channels contiguous"
        )
    if not layout.channels_at_dim1() or (layout.flat and layout.ndim != 2):
        raise Blocked("flatten of a map whose channels are not dimension 1")
    if layout.ndim in (None, 2):
        return Step(Layout(2, 1, layout.flat), StepKind.LINEAR)
    return Step(Layout(2, 1, flat=True), StepKind.LINEAR)


@register_module_rule(nn.Flatten)
def _flatten_module(node: fx.Node, layout: Layout, ctx: RuleContext) -> Step:
    m = ctx.module(node)
    return _flatten_from(layout, attr(m, "start_dim"), attr(m, "end_dim"))


# --------------------------------------------------------------------------------------------
# Functions and methods.

ACTIVATION_FUNCTIONS: tuple[Callable[..., Any], ...] = (
    F.relu,
    torch.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    torch.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.softplus,
    F.softsign,
    F.hardtanh,
    F.hardsigmoid,
    F.hardswish,
    F.logsigmoid,
    F.tanhshrink,
    torch.sigmoid,
    torch.tanh,
    F.sigmoid,
    F.tanh,
    torch.exp,
)


@register_function_rule(*ACTIVATION_FUNCTIONS)
@register_method_rule("relu", "sigmoid", "tanh", "exp")
def _activation_call(node: fx.Node, layout: Layout, ctx: RuleContext) -> Step:
    return Step(layout, StepKind.ACTIVATION)


@register_function_rule(F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout)
@register_method_rule("contiguous")
def _identity_call(node: fx.Node, layout: Layout, ctx: RuleContext) -> Step:
    return Step(layout, StepKind.AFFINE)


@register_function_rule(torch.flatten)
@register_method_rule("flatten")
def _flatten_call(node: fx.Node, layout: Layout, ctx: RuleContext) -> Step:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    if not isinstance(start, int) or not isinstance(end, int):
        raise Blocked(f"{describe(node)} with non-constant dimensions")
    return _flatten_from(layout, start, end)


def _size_source(arg: Any, dim: int) -> fx.Node | None:
    """The tensor whose size ``arg`` reads when it is ``t.size(dim)``, ``t.shape[dim]`` or
    ``t.size()[dim]``; else ``None``."""
    if not isinstance(arg, fx.Node):
        return None
    if arg.op == "call_method" and arg.target == "size" and len(arg.args) > 1:
        src = arg.args[0]
        return src if arg.args[1] == dim and isinstance(src, fx.Node) else None
    if arg.op == "call_function" and arg.target is operator.getitem and arg.args[1] == dim:
        whole = arg.args[0]
        if not isinstance(whole, fx.Node):
            return None
        src = whole.args[0] if whole.args else None
        reads_shape = whole.op == "call_function" and whole.target is getattr
        reads_shape = reads_shape and whole.args[1] == "shape"
        reads_size = whole.op == "call_method" and whole.target == "size" and len(whole.args) == 1
        if (reads_shape or reads_size) and isinstance(src, fx.Node):
            return src
    return None


@register_method_rule("view", "reshape")
def _view(node: fx.Node, layout: Layout, ctx: RuleContext) -> Step:
    shape = list(node.args[1:])
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = list(shape[0])
    batch = len(shape) in (2, 3) and _size_source(shape[0], 0) is not None  # any tensor's batch
    if batch and len(shape) == 2 and shape[1] == -1:
        return _flatten_from(layout, 1, -1)
    if batch and len(shape) == 3 and _size_source(shape[1], 1) in ctx.chain and shape[2] == -1:
        # x.view(B, C, -1): the spatial dimensions flattened, channels stay at dimension 1
        if layout.flat or layout.cdim != 1 or layout.ndim is None or layout.ndim < 3:
            raise Blocked(f"{describe(node)} of a tensor without spatial dimensions")
        return Step(Layout(3, 1), StepKind.LINEAR)
    raise Blocked(
        f"{describe(node)} with shape {tuple(str(s) for s in shape)}: only x.view(x.size(0), -1) "
        "keeps channels contiguous and stays valid after a split"
    )


def _pool_fn(ndim: int) -> Rule:
    def rule(node: fx.Node, layout: Layout, ctx: RuleContext) -> Step:
        _need_spatial(layout, ndim, describe(node))
        name = getattr(node.target, "__name__", "")
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        unit = name.startswith("adaptive") and _to_one(size)
        return Step(Layout(ndim, 1, unit=unit), StepKind.LINEAR)

    return rule


register_function_rule(F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d)(
    _pool_fn(3)
)
register_function_rule(F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d)(
    _pool_fn(4)
)


@register_function_rule(torch.mean, torch.sum)
@register_method_rule("mean", "sum")
def _reduce(node: fx.Node, layout: Layout, ctx: RuleContext) -> Step:
    dims: Any = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if layout.flat or layout.cdim != 1 or layout.ndim is None or layout.ndim < 3:
        raise Blocked(f"{describe(node)} over a tensor whose spatial dimensions are unknown")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    spatial = set(range(2, layout.ndim))
    if {d % layout.ndim for d in dims if isinstance(d, int)} != spatial or len(dims) != len(
        spatial
    ):
        raise Blocked(
            f"{describe(node)} must reduce exactly the spatial dimensions {sorted(spatial)}"
        )
    if keepdim:
        return Step(Layout(layout.ndim, 1, unit=True), StepKind.LINEAR)
    return Step(Layout(2, 1), StepKind.LINEAR)


ARITHMETIC: dict[Any, str] = {
    operator.add: "add",
    operator.sub: "sub",
    operator.mul: "mul",
    operator.truediv: "div",
    torch.add: "add",
    torch.sub: "sub",
    torch.mul: "mul",
    torch.div: "div",
}


@register_function_rule(*ARITHMETIC)
@register_method_rule("add", "sub", "mul", "div")
def _arith(node: fx.Node, layout: Layout, ctx: RuleContext) -> Step:
    name = ARITHMETIC.get(node.target, str(node.target))
    a, b = node.args[0], node.args[1]
    if not all(isinstance(x, (fx.Node, int, float)) for x in (a, b)):
        raise Blocked(f"{describe(node)} with a non-scalar constant")
    both = isinstance(a, fx.Node) and isinstance(b, fx.Node)
    if not both:
        if name == "div" and isinstance(b, fx.Node):
            return Step(layout, StepKind.CURVED)  # scalar / x
        constant = b if isinstance(a, fx.Node) else a
        if isinstance(constant, (int, float)) and not math.isfinite(constant):
            raise Blocked(f"{describe(node)} with a non-finite constant")
        return Step(layout, StepKind.AFFINE)
    return Step(layout, StepKind.LINEAR if name in ("add", "sub") else StepKind.CURVED)


@register_method_rule("squeeze")
def _squeeze(node: fx.Node, layout: Layout, ctx: RuleContext) -> Step:
    dims = node.args[1:] or ([node.kwargs["dim"]] if "dim" in node.kwargs else [])
    if layout.flat or layout.cdim != 1 or layout.ndim is None or len(dims) != 1:
        raise Blocked(f"{describe(node)} needs one explicit spatial dimension")
    dim = dims[0]
    if not isinstance(dim, int) or dim % layout.ndim < 2:
        raise Blocked(f"{describe(node)} of dimension {dim}: only spatial dimensions may go")
    if not layout.unit:
        raise Blocked(f"{describe(node)} of a spatial dimension not known to have size 1")
    ndim = layout.ndim - 1
    return Step(Layout(ndim, 1, unit=ndim > 2), StepKind.LINEAR)


@register_function_rule(operator.pow, torch.pow)
@register_method_rule("pow")
def _pow(node: fx.Node, layout: Layout, ctx: RuleContext) -> Step:
    exponent = node.args[1] if len(node.args) > 1 else node.kwargs.get("exponent")
    if not isinstance(exponent, (int, float)) or not isinstance(node.args[0], fx.Node):
        raise Blocked(f"{describe(node)} with a non-constant exponent")
    return Step(layout, StepKind.CURVED)


@register_function_rule(operator.neg, torch.neg)
@register_method_rule("neg")
def _neg(node: fx.Node, layout: Layout, ctx: RuleContext) -> Step:
    return Step(layout, StepKind.AFFINE)


# --------------------------------------------------------------------------------------------
# Non-tensor ("meta") nodes: shapes and sizes may be read from a chain tensor.

_META_METHODS = {"size", "dim", "numel"}
_META_ATTRS = {"shape", "ndim", "dtype", "device"}


def is_meta(node: fx.Node) -> bool:
    """Whether ``node`` computes a shape, size or other non-tensor value (not channel data)."""
    if node.op == "call_method" and node.target in _META_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _META_ATTRS
    if node.op == "call_function" and node.target in (
        operator.getitem,
        operator.mul,
        operator.floordiv,
        operator.add,
        operator.sub,
    ):
        inputs = node.all_input_nodes
        return bool(inputs) and all(is_meta(a) for a in inputs)
    return False
