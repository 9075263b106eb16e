"""Runs a traced model for the splitting computations, without touching its state.

The executor walks the ``torch.fx`` graph node by node and substitutes, wherever they occur:

* BatchNorm: running statistics (``batchnorm="running"``) or batch statistics
  (``batchnorm="batch"``), computed functionally so that no buffer is ever updated;
* dropout: the identity (the splitting matrix is an expectation of the deterministic network);
* piecewise-linear activations: exact value and slope, surrogate second derivative
  (``activations.piecewise_apply``);
* in-place activations: their out-of-place versions, so that recorded tensors stay valid.

It can add *taps* to chosen values: identity steps that record the gradient passing through them,
so that one backward pass returns ∂L/∂(value) for each of them, whatever the ``requires_grad``
flags of the model (:class:`Taps`). A tap neither copies its value nor allocates a leaf of its
size.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from splitgrow.graph.ops import DROPOUTS
from splitgrow.splitting import activations
from splitgrow.splitting.activations import (
    FUNCTION_PIECEWISE,
    METHOD_PIECEWISE,
    MODULE_PIECEWISE,
    Piecewise,
    piecewise_apply,
    piecewise_slope,
    softplus_second_derivative,
)

BATCHNORM_MODES = ("running", "batch")

_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout}
# functions whose ``inplace`` flag may be passed positionally: position of that argument
_INPLACE_POSITION = {F.relu: 1, F.relu6: 1, F.selu: 1, F.leaky_relu: 2, F.elu: 2, F.celu: 2}
_INPLACE_POSITION[F.hardtanh] = 3


class _Tap(torch.autograd.Function):
    """The identity on ``value`` that records the gradient reaching it in ``store[key]``.
    ``anchor``, a scalar leaf requiring grad, makes every tap part of the graph that a backward
    pass to it runs through, whatever the model's ``requires_grad`` flags."""

    @staticmethod
    def forward(
        ctx: Any, value: Tensor, anchor: Tensor, store: dict[Any, Tensor], key: Any
    ) -> Tensor:
        ctx.store, ctx.key = store, key
        return value.view_as(value)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        store, key = ctx.store, ctx.key
        store[key] = grad if key not in store else store[key] + grad
        return (grad if ctx.needs_input_grad[0] else None), None, None, None


class Taps:
    """The taps of one :meth:`Executor.forward`: :meth:`gradients` runs the backward pass."""

    def __init__(self) -> None:
        self.anchor: Tensor | None = None  # made at the first tap, on its device
        self.store: dict[fx.Node, Tensor] = {}
        self.like: dict[fx.Node, tuple[torch.Size, torch.dtype, torch.device]] = {}

    def add(self, key: fx.Node, value: Tensor) -> Tensor:
        self.like[key] = (value.shape, value.dtype, value.device)
        if self.anchor is None:
            self.anchor = torch.zeros((), device=value.device, requires_grad=True)
        out: Tensor = _Tap.apply(value, self.anchor, self.store, key)
        return out

    def gradients(self, loss: Tensor) -> dict[fx.Node, Tensor]:
        """∂loss/∂(value) at every tap (zeros where the loss does not depend on it)."""
        if self.anchor is not None:
            torch.autograd.grad(loss, self.anchor, allow_unused=True)
        out = {}
        for key, (shape, dtype, device) in self.like.items():
            g = self.store.pop(key, None)
            out[key] = torch.zeros(shape, dtype=dtype, device=device) if g is None else g
        return out


class Executor:
    """Evaluates a traced model with the substitutions listed in the module docstring.

    Args:
        graph_module: the traced model (``splitgrow.graph.trace``).
        batchnorm: ``"running"`` or ``"batch"`` statistics for every BatchNorm.
        surrogate_beta: softplus sharpness β of the ReLU-like surrogate, or ``None`` for the exact
            (almost everywhere zero) second derivative.
    """

    def __init__(
        self, graph_module: fx.GraphModule, batchnorm: str, surrogate_beta: float | None
    ) -> None:
        self.gm = graph_module
        self.modules = dict(graph_module.named_modules())
        self.nodes = list(graph_module.graph.nodes)
        self.batchnorm = batchnorm
        self.beta = surrogate_beta
        self._curvature = True
        self._out_of_place: dict[str, nn.Module] = {}
        last_use: dict[fx.Node, int] = {}
        for i, node in enumerate(self.nodes):
            for a in node.all_input_nodes:
                last_use[a] = i
        self._last_use = last_use

    # ---------------------------------------------------------------------------------------
    def _beta(self) -> float | None:
        return self.beta if self._curvature else None

    @contextlib.contextmanager
    def first_order(self) -> Iterator[None]:
        """Within this block values and first derivatives are exact but the surrogate's
        curvature is left out (it only matters to second derivatives): cheaper. Piecewise-linear
        activations are then the ops themselves where their own backward is exact (it may
        differ from :func:`~splitgrow.splitting.activations.piecewise_slope` only at a kink)."""
        previous, self._curvature = self._curvature, False
        try:
            yield
        finally:
            self._curvature = previous

    def run_node(self, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Evaluate one node of the graph on already evaluated arguments."""
        if node.op == "call_module":
            return self._call_module(str(node.target), args, kwargs)
        if node.op == "call_function":
            return self._call_function(node.target, args, kwargs)
        if node.op == "call_method":
            obj, *rest = args
            name = str(node.target)
            if name.endswith("_") and not name.endswith("__") and hasattr(obj, name[:-1]):
                name = name[:-1]  # in-place method: use its out-of-place twin
            y = getattr(obj, name)(*rest, **kwargs)
            if name in METHOD_PIECEWISE:
                y = self._apply(y, obj, METHOD_PIECEWISE[name](args, kwargs))
            return y
        if node.op == "get_attr":
            value: Any = self.gm
            for part in str(node.target).split("."):
                value = getattr(value, part)
            return value
        raise RuntimeError(f"unexpected node {node.op} in the traced graph")

    def _call_module(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        m = self.modules[name]
        if isinstance(m, _BatchNorm):
            return self.batch_norm(m, args[0])
        if isinstance(m, DROPOUTS):
            return args[0]
        if getattr(m, "inplace", False):
            if name not in self._out_of_place:
                twin = copy.copy(m)
                twin.inplace = False
                self._out_of_place[name] = twin
            m = self._out_of_place[name]
        y = m(*args, **kwargs)
        pw = self._module_piecewise(m, args[0])
        return y if pw is None else self._apply(y, args[0], pw)

    def _apply(self, y: Tensor, z: Tensor, pw: Piecewise) -> Tensor:
        """A piecewise-linear activation's value ``y`` at ``z``, with exact slope and the
        surrogate's curvature; within :meth:`first_order` the op itself where its own backward
        is exact (no copies of z for the linearisation)."""
        if not self._curvature and pw.exact_backward:
            return y
        return piecewise_apply(y, z, pw, self._beta())

    def _module_piecewise(self, m: nn.Module, z: Tensor) -> Piecewise | None:
        if isinstance(m, nn.PReLU):  # slope a left of 0, kink weight 1 − a (per channel)
            a: Tensor = m.weight
            if a.numel() > 1:
                a = a.reshape(1, -1, *([1] * max(z.dim() - 2, 0)))
            return Piecewise(a, [(0.0, 1.0 - a)])
        pw = MODULE_PIECEWISE.get(type(m))
        return None if pw is None else pw(m)

    def _piecewise(
        self, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Piecewise | None:
        """The piecewise-linear activation ``node`` is, or ``None``."""
        if node.op == "call_module":
            m = self.modules[str(node.target)]
            if isinstance(m, (_BatchNorm, *DROPOUTS)):
                return None
            return self._module_piecewise(m, args[0])
        if node.op == "call_function" and node.target in FUNCTION_PIECEWISE:
            return FUNCTION_PIECEWISE[node.target](args, kwargs)
        if node.op == "call_method":
            name = str(node.target)
            name = name[:-1] if name.endswith("_") and not name.endswith("__") else name
            if name in METHOD_PIECEWISE:
                return METHOD_PIECEWISE[name](args, kwargs)
        return None

    def _call_function(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if fn in _DROPOUT_FUNCTIONS:
            return args[0]
        if kwargs.get("inplace"):
            kwargs = {**kwargs, "inplace": False}
        pos = _INPLACE_POSITION.get(fn)
        if pos is not None and len(args) > pos and args[pos]:
            args = (*args[:pos], False, *args[pos + 1 :])
        y = fn(*args, **kwargs)
        if fn in FUNCTION_PIECEWISE:
            y = self._apply(y, args[0], FUNCTION_PIECEWISE[fn](args, kwargs))
        return y

    def batch_norm(self, m: _BatchNorm, x: Tensor) -> Tensor:
        """BatchNorm with the chosen statistics; never updates the running buffers."""
        if self.batchnorm == "batch" or m.running_mean is None:
            return F.batch_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps)
        return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    # ---------------------------------------------------------------------------------------
    def forward(
        self,
        inputs: tuple[Any, ...],
        *,
        taps: Iterable[fx.Node] = (),
        edge_taps: Iterable[fx.Node] = (),
        keep: Iterable[fx.Node] = (),
    ) -> tuple[Any, dict[fx.Node, Any], Taps]:
        """Run the whole model.

        Args:
            inputs: the model's positional inputs.
            taps: nodes whose output gets a tap (its gradient is ∂L/∂output).
            edge_taps: consumer nodes whose first argument gets a tap (its gradient is the
                gradient reaching the consumer through that edge only).
            keep: nodes whose values are returned.

        Returns:
            ``(output, kept values, taps)``; ``taps.gradients(loss)`` gives the gradients by
            node (call it while grad mode is on, before the graph is freed).
        """
        taps, edge_taps, keep = set(taps), set(edge_taps), set(keep)
        env: dict[fx.Node, Any] = {}
        kept: dict[fx.Node, Any] = {}
        leaves = Taps()
        placeholders = iter(inputs)
        output: Any = None
        for i, node in enumerate(self.nodes):
            value: Any
            if node.op == "placeholder":
                value = next(placeholders, node.args[0] if node.args else None)
            elif node.op == "output":
                output = fx.node.map_arg(node.args[0], lambda a: env[a])
                break
            else:
                args = fx.node.map_arg(node.args, lambda a: env[a])
                kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
                if node in edge_taps:
                    args = (leaves.add(node, args[0]), *args[1:])
                value = self.run_node(node, args, kwargs)
            if node in taps:
                value = leaves.add(node, value)
            env[node] = value
            if node in keep:
                kept[node] = value
            for a in node.all_input_nodes:
                if self._last_use.get(a) == i:
                    env.pop(a, None)
        return output, kept, leaves

    def run_chain(
        self, chain: Iterable[fx.Node], env: Mapping[fx.Node, Any], wanted: Iterable[fx.Node]
    ) -> list[Any]:
        """Evaluate the chain nodes in order from ``env`` (producer output and outside values)."""
        local = dict(env)
        for node in chain:
            args = fx.node.map_arg(node.args, lambda a: local[a])
            kwargs = fx.node.map_arg(node.kwargs, lambda a: local[a])
            local[node] = self.run_node(node, args, kwargs)
        return [local[w] for w in wanted]

    def slope(self, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
        """σ'(z) of a piecewise-linear activation node at its input ``args[0]`` in closed form,
        or ``None`` for any other node."""
        pw = self._piecewise(node, args, kwargs)
        return None if pw is None else piecewise_slope(args[0].detach(), pw)

    def second_derivative(self, node: fx.Node, z: Tensor) -> Tensor:
        """σ''(z) of a pointwise activation node, surrogate included (elementwise)."""
        args = (z, *fx.node.map_arg(node.args[1:], lambda a: a))
        pw = self._piecewise(node, args, dict(node.kwargs))
        if pw is not None:  # closed form: the surrogate's curvature at the kinks, or zero
            beta = self._beta()
            out: Tensor | None = None
            if beta is not None:
                for t, c in pw.kinks:
                    term = softplus_second_derivative(z.detach(), beta, t)
                    term = term if isinstance(c, float) and c == 1.0 else term.mul_(c)
                    out = term if out is None else out.add_(term)
            return torch.zeros_like(z) if out is None else out
        return self._autograd_second_derivative(node, args)

    def curvature_weights(self, node: fx.Node, z: Tensor, g: Tensor, c2: Tensor) -> Tensor:
        """σ''(z)·g·c² (:meth:`second_derivative`), written into ``c2``, a fresh tensor the
        caller gives up, and returned. A ReLU-like's surrogate curvature is computed in slices,
        with no temporary the size of z, each element's product in the whole-tensor order."""
        args = (z, *fx.node.map_arg(node.args[1:], lambda a: a))
        pw = self._piecewise(node, args, dict(node.kwargs))
        beta = self._beta()
        if (
            pw is not None
            and beta is not None
            and len(pw.kinks) == 1
            and isinstance(pw.kinks[0][1], float)
            and z.shape == g.shape == c2.shape
            and c2.is_contiguous()
        ):
            (t, c), dst = pw.kinks[0], c2.view(-1)
            flat_z, flat_g = z.detach().reshape(-1), g.reshape(-1)
            step = activations.slice_elements(activations.SLICE_ELEMENTS, z.device)
            for a in range(0, flat_z.numel(), step):
                part = slice(a, a + step)
                w = softplus_second_derivative(flat_z[part], beta, t)
                w = w if c == 1.0 else w.mul_(c)
                dst[part] = w.mul_(flat_g[part]).mul_(dst[part])
            return c2
        return c2.copy_(self.second_derivative(node, z).mul_(g).mul_(c2))

    def _autograd_second_derivative(self, node: fx.Node, args: tuple[Any, ...]) -> Tensor:
        z = args[0]
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            args = (z, *args[1:])
            y = self.run_node(node, args, dict(node.kwargs))
            (d1,) = torch.autograd.grad(y.sum(), z, create_graph=True)
            if not d1.requires_grad:  # σ' constant: σ'' = 0, plus the surrogate if any
                return torch.zeros_like(z)
            (d2,) = torch.autograd.grad(d1.sum(), z, allow_unused=True)
        return torch.zeros_like(z) if d2 is None else d2


__all__ = ["BATCHNORM_MODES", "Executor", "Taps"]
