"""Per-layer-type neuron parameters θ_i (DESIGN.md §1), in a registered table.

θ_i is the weight row of neuron i flattened in PyTorch order, followed by its bias when the layer
has one. Each handler gives:

* ``theta(module)``: all neurons' parameters as one ``(n, d)`` tensor;
* ``forward(module, x, theta)``: the layer's output with parameters ``theta``;
* ``operator(module, x)``: the input each neuron sees at every output position (bias column
  included), the patches X̃ ``(B·P, d)``, as a :class:`Patches` operator that multiplies by X̃ and
  X̃ᵀ without forming X̃ (a convolution's unfolded patches are k× its input; ``dense()`` forms
  them), or ``None`` when not available (the closed form is then not used);
* ``to_bnp(module, y)``: a per-output tensor shaped like the layer output, as ``(B, n, P)`` with
  positions in the same order as the patches.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from splitgrow._attrs import attr, optional_tensor, tensor
from splitgrow.graph.analyze import LayerInfo


class Patches(Protocol):
    """A batch's input patches X̃ ``(B·P, d)`` as an operator; products keep the ``(B, k, P)``
    layout of the layer's output (samples, columns, positions)."""

    @property
    def d(self) -> int:
        """The patch length: a neuron's parameter count."""
        ...

    def times(self, u: Tensor) -> Tensor:
        """X̃u for ``u`` ``(d, k)``, as ``(B, k, P)``."""
        ...

    def t_times(self, y: Tensor) -> Tensor:
        """X̃ᵀy for ``y`` ``(B, k, P)``, as ``(d, k)``."""
        ...

    def samples(self, start: int, stop: int) -> Patches:
        """The patches of samples ``start`` to ``stop`` (a view)."""
        ...

    def dense(self) -> Tensor:
        """X̃ itself, ``(B, P, d)``."""
        ...


class NeuronHandler(Protocol):
    def has_patches(self, module: nn.Module) -> bool: ...

    def operator(self, module: nn.Module, x: Tensor) -> Patches | None: ...

    def to_bnp(self, module: nn.Module, y: Tensor) -> Tensor: ...


def theta(module: nn.Module) -> Tensor:
    """All neurons' parameters θ as an ``(n, d)`` tensor (a detached copy)."""
    w = tensor(module, "weight").detach()
    rows = w.reshape(w.shape[0], -1)
    bias = optional_tensor(module, "bias")
    if bias is not None:
        rows = torch.cat([rows, bias.detach().reshape(-1, 1)], dim=1)
    return rows.clone()


def unit_theta(info: LayerInfo, modules: Mapping[str, nn.Module]) -> Tensor:
    """A unit's θ ``(n, d)``: every member's rows, concatenated in graph order."""
    return torch.cat([theta(modules[m.name]) for m in info.members], dim=1)


def unpack(module: nn.Module, th: Tensor) -> dict[str, Tensor]:
    """Split θ ``(n, d)`` back into the module's ``weight`` (and ``bias``) shapes."""
    w = tensor(module, "weight")
    k = w[0].numel()
    params = {"weight": th[:, :k].reshape(th.shape[0], *w.shape[1:])}
    if optional_tensor(module, "bias") is not None:
        params["bias"] = th[:, k]
    return params


def forward(module: nn.Module, x: Tensor, th: Tensor) -> Tensor:
    """The layer's output on ``x`` with parameters ``th`` (differentiable in ``th``)."""
    return functional_call(module, unpack(module, th), (x,))


def _with_bias(bias: bool, cols: Tensor) -> Tensor:
    """Patches ``cols`` ``(…, C·k…)`` with the bias's column of ones appended if ``bias``."""
    if not bias:
        return cols
    return torch.cat([cols, cols.new_ones(*cols.shape[:-1], 1)], dim=-1)


@dataclass
class DensePatches:
    """Patches held as the tensor ``x`` ``(B, P, d)``."""

    x: Tensor

    @property
    def d(self) -> int:
        return self.x.shape[-1]

    def times(self, u: Tensor) -> Tensor:
        return (self.x @ u).transpose(1, 2)

    def t_times(self, y: Tensor) -> Tensor:
        return self.x.reshape(-1, self.d).t() @ y.transpose(1, 2).reshape(-1, y.shape[1])

    def samples(self, start: int, stop: int) -> DensePatches:
        return DensePatches(self.x[start:stop])

    def dense(self) -> Tensor:
        return self.x


def conv_output_size(
    spatial: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> list[int]:
    """A convolution's output size along each spatial axis (PyTorch's rule, numeric padding)."""
    return [
        (n + 2 * p - q * (kk - 1) - 1) // s + 1
        for n, kk, s, p, q in zip(spatial, kernel, stride, padding, dilation, strict=True)
    ]


@dataclass
class ConvPatches:
    """A convolution's patches, kept as its input ``x`` ``(B, C, *spatial)``: X̃u is the
    convolution of x with the k columns of u as filters (bias row as their biases), and X̃ᵀy
    the gradient of such a convolution in its filters. Both cost what the layer's forward pass
    costs for k output channels, and nothing is unfolded."""

    x: Tensor
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    bias: bool

    @property
    def d(self) -> int:
        return self.x.shape[1] * math.prod(self.kernel) + int(self.bias)

    def _conv_args(self) -> tuple[list[int], list[int], list[int], bool, list[int], int]:
        zeros = [0] * len(self.kernel)
        return list(self.stride), list(self.padding), list(self.dilation), False, zeros, 1

    def times(self, u: Tensor) -> Tensor:
        k, ck = u.shape[1], self.d - int(self.bias)
        filters = u[:ck].t().reshape(k, self.x.shape[1], *self.kernel)
        bias = u[ck].contiguous() if self.bias else None
        y = torch.ops.aten.convolution(self.x, filters, bias, *self._conv_args())
        return y.reshape(y.shape[0], k, -1)

    def t_times(self, y: Tensor) -> Tensor:
        k = y.shape[1]
        size = conv_output_size(
            self.x.shape[2:], self.kernel, self.stride, self.padding, self.dilation
        )
        shape = (k, self.x.shape[1], *self.kernel)
        g = torch.ops.aten.convolution_backward(
            y.reshape(y.shape[0], k, *size),
            self.x,
            y.new_empty(1).expand(shape),
            None,
            *self._conv_args(),
            (False, True, False),
        )[1]
        g = g.reshape(k, -1).t()
        if self.bias:
            g = torch.cat([g, y.sum((0, 2))[None]])
        return g

    def samples(self, start: int, stop: int) -> ConvPatches:
        return dataclasses.replace(self, x=self.x[start:stop])

    def dense(self) -> Tensor:
        kernel, dilation, stride, padding = self.kernel, self.dilation, self.stride, self.padding
        x = self.x
        if x.dim() == 3:  # Conv1d: as a Conv2d with a trailing unit dimension
            x = x.unsqueeze(-1)
            kernel, dilation, stride, padding = (
                (kernel[0], 1),
                (dilation[0], 1),
                (stride[0], 1),
                (padding[0], 0),
            )
        if all(k == 1 for k in kernel) and all(q == 0 for q in padding):
            # a pointwise convolution: the patches are the (strided) pixels, no unfold needed
            x = x[(slice(None), slice(None), *(slice(None, None, st) for st in stride))]
            cols = x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)
        else:
            cols = F.unfold(
                x, kernel_size=kernel, dilation=dilation, padding=padding, stride=stride
            ).transpose(1, 2)  # (B, P, C·k…)
        return _with_bias(self.bias, cols)


@dataclass(frozen=True)
class LinearHandler:
    """``nn.Linear`` on inputs ``(B, *, F)``: positions are the middle dimensions."""

    def has_patches(self, module: nn.Module) -> bool:
        return True

    def operator(self, module: nn.Module, x: Tensor) -> Patches:
        bias = optional_tensor(module, "bias") is not None
        return DensePatches(_with_bias(bias, x.reshape(x.shape[0], -1, x.shape[-1])))

    def to_bnp(self, module: nn.Module, y: Tensor) -> Tensor:
        return y.reshape(y.shape[0], -1, y.shape[-1]).transpose(1, 2)


@dataclass(frozen=True)
class ConvHandler:
    """``nn.Conv1d``/``nn.Conv2d`` (groups=1); positions are output pixels.

    Patches need zero padding given as numbers (or ``"valid"``); other convolutions use the
    general route.
    """

    def has_patches(self, module: nn.Module) -> bool:
        return bool(attr(module, "padding_mode") == "zeros" and attr(module, "padding") != "same")

    def operator(self, module: nn.Module, x: Tensor) -> Patches | None:
        if not self.has_patches(module):
            return None
        pad_attr = attr(module, "padding")
        kernel: tuple[int, ...] = tuple(attr(module, "kernel_size"))
        padding: tuple[int, ...] = (0,) * len(kernel) if pad_attr == "valid" else tuple(pad_attr)
        return ConvPatches(
            x,
            kernel,
            tuple(attr(module, "stride")),
            padding,
            tuple(attr(module, "dilation")),
            optional_tensor(module, "bias") is not None,
        )

    def to_bnp(self, module: nn.Module, y: Tensor) -> Tensor:
        return y.reshape(y.shape[0], y.shape[1], -1)


HANDLERS: dict[type[nn.Module], NeuronHandler] = {
    nn.Linear: LinearHandler(),
    nn.Conv1d: ConvHandler(),
    nn.Conv2d: ConvHandler(),
}


def handler(module: nn.Module) -> NeuronHandler:
    """The registered handler for a neuron layer's type."""
    return HANDLERS[type(module)]
