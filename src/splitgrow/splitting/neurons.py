"""Per-layer-type neuron parameters θ_i (DESIGN.md §1), in a registered table.

θ_i is the weight row of neuron i flattened in PyTorch order, followed by its bias when the layer
has one. Each handler gives:

* ``theta(module)``: all neurons' parameters as one ``(n, d)`` tensor;
* ``forward(module, x, theta)``: the layer's output with parameters ``theta``;
* ``patches(module, x)``: the input each neuron sees at every output position, ``(B, P, d)``
  (bias column included), or ``None`` when not available (the closed form is then not used);
* ``to_bnp(module, y)``: a per-output tensor shaped like the layer output, as ``(B, n, P)`` with
  positions in the same order as ``patches``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from splitgrow._attrs import attr, optional_tensor, tensor
from splitgrow.graph.analyze import LayerInfo


class NeuronHandler(Protocol):
    def has_patches(self, module: nn.Module) -> bool: ...

    def patches(self, module: nn.Module, x: Tensor) -> Tensor | None: ...

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


def _with_bias(module: nn.Module, cols: Tensor) -> Tensor:
    if optional_tensor(module, "bias") is None:
        return cols
    return torch.cat([cols, cols.new_ones(*cols.shape[:-1], 1)], dim=-1)


@dataclass(frozen=True)
class LinearHandler:
    """``nn.Linear`` on inputs ``(B, *, F)``: positions are the middle dimensions."""

    def has_patches(self, module: nn.Module) -> bool:
        return True

    def patches(self, module: nn.Module, x: Tensor) -> Tensor:
        return _with_bias(module, x.reshape(x.shape[0], -1, x.shape[-1]))

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

    def patches(self, module: nn.Module, x: Tensor) -> Tensor | None:
        if not self.has_patches(module):
            return None
        pad_attr = attr(module, "padding")
        kernel: tuple[int, ...] = tuple(attr(module, "kernel_size"))
        dilation: tuple[int, ...] = tuple(attr(module, "dilation"))
        stride: tuple[int, ...] = tuple(attr(module, "stride"))
        padding: tuple[int, ...] = (0,) * len(kernel) if pad_attr == "valid" else tuple(pad_attr)
        if all(k == 1 for k in kernel) and all(q == 0 for q in padding):
            # a pointwise convolution: the patches are the (strided) pixels, no unfold needed
            x = x[(slice(None), slice(None), *(slice(None, None, st) for st in stride))]
            return _with_bias(module, x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2))
        if isinstance(module, nn.Conv1d):  # as a Conv2d with a trailing unit dimension
            x = x.unsqueeze(-1)
            kernel, dilation, stride, padding = (
                (kernel[0], 1),
                (dilation[0], 1),
                (stride[0], 1),
                (padding[0], 0),
            )
        cols = F.unfold(x, kernel_size=kernel, dilation=dilation, padding=padding, stride=stride)
        return _with_bias(module, cols.transpose(1, 2))  # (B, P, C·k…)

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
