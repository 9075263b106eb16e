"""Per-layer-type surgery, in a registered table (the only code that changes a layer's shape).

Verbs, in the manner of Torch-Pruning's handlers:

* ``split_out(module, idx, delta)``: neuron layer; rows ``idx`` become θ + δ and offspring θ − δ
  are appended as new output channels ``n, n+1, …`` (``delta`` is ``(k, d)`` in θ layout);
* ``gather_out(module, source)``: per-channel module in a chain (BatchNorm, depthwise conv,
  PReLU); new channel ``j`` is a copy of old channel ``source[j]``;
* ``gather_in(module, source, scale, block)``: consumer; new input column block ``j`` (``block``
  columns per channel after a flatten) is old block ``source[j]`` times ``scale[j]`` (½ for both
  halves of a split channel).

Register a handler for a new module type with :func:`register_surgery`.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from splitgrow._attrs import optional_tensor, tensor


class Surgery(Protocol):
    def split_out(self, module: nn.Module, idx: Tensor, delta: Tensor) -> None: ...

    def gather_out(self, module: nn.Module, source: Tensor) -> None: ...

    def gather_in(self, module: nn.Module, source: Tensor, scale: Tensor, block: int) -> None: ...


SURGERY: dict[type[nn.Module], Surgery] = {}


def register_surgery(*types: type[nn.Module]):
    """Register a surgery handler class for the given module types (class decorator)."""

    def deco(cls):
        for t in types:
            SURGERY[t] = cls()
        return cls

    return deco


def surgery_for(module: nn.Module) -> Surgery:
    """The registered handler for ``module``'s type."""
    try:
        return SURGERY[type(module)]
    except KeyError:
        raise ValueError(f"no surgery handler for {type(module).__name__}") from None


def _replace(module: nn.Module, name: str, value: Tensor) -> None:
    old = tensor(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))
    else:
        setattr(module, name, value.detach().clone())


def _set_size(module: nn.Module, name: str, value: int) -> None:
    """Update a size attribute (``in_features``, ``num_features`` …) after a shape change."""
    setattr(module, name, int(value))


def _gather_rows(t: Tensor, source: Tensor) -> Tensor:
    return t.detach().index_select(0, source.to(t.device))


def _split_rows(module: nn.Module, idx: Tensor, delta: Tensor) -> None:
    weight = tensor(module, "weight").detach()
    n = weight.shape[0]
    rows = weight.reshape(n, -1)
    k = rows.shape[1]
    parent, offspring = rows.clone(), rows.index_select(0, idx) - delta[:, :k]
    parent[idx] += delta[:, :k]
    _replace(module, "weight", torch.cat([parent, offspring]).reshape(-1, *weight.shape[1:]))
    bias = optional_tensor(module, "bias")
    if bias is not None:
        b = bias.detach().clone()
        off = b.index_select(0, idx) - delta[:, k]
        b[idx] += delta[:, k]
        _replace(module, "bias", torch.cat([b, off]))


def _gather_columns(weight: Tensor, source: Tensor, scale: Tensor, block: int) -> Tensor:
    """Column blocks of dim 1 gathered by ``source`` and scaled (weight ``(out, n·block, …)``)."""
    out, cols = weight.shape[0], weight.shape[1]
    w = weight.detach().reshape(out, cols // block, block, *weight.shape[2:])
    w = w.index_select(1, source.to(w.device))
    shape = [1, -1] + [1] * (w.dim() - 2)
    w = w * scale.to(device=w.device, dtype=w.dtype).reshape(shape)
    return w.reshape(out, -1, *weight.shape[2:])


@register_surgery(nn.Linear)
class LinearSurgery:
    def split_out(self, module: nn.Module, idx: Tensor, delta: Tensor) -> None:
        _split_rows(module, idx, delta)
        _set_size(module, "out_features", tensor(module, "weight").shape[0])

    def gather_out(self, module: nn.Module, source: Tensor) -> None:
        raise ValueError("a Linear layer is not a per-channel operation")

    def gather_in(self, module: nn.Module, source: Tensor, scale: Tensor, block: int) -> None:
        weight = _gather_columns(tensor(module, "weight"), source, scale, block)
        _replace(module, "weight", weight)
        _set_size(module, "in_features", weight.shape[1])


@register_surgery(nn.Conv1d, nn.Conv2d)
class ConvSurgery:
    def split_out(self, module: nn.Module, idx: Tensor, delta: Tensor) -> None:
        _split_rows(module, idx, delta)
        _set_size(module, "out_channels", tensor(module, "weight").shape[0])

    def gather_out(self, module: nn.Module, source: Tensor) -> None:
        """A depthwise convolution: channel j gets the filter (and bias) of ``source[j]``."""
        _replace(module, "weight", _gather_rows(tensor(module, "weight"), source))
        bias = optional_tensor(module, "bias")
        if bias is not None:
            _replace(module, "bias", _gather_rows(bias, source))
        c = tensor(module, "weight").shape[0]
        for name in ("in_channels", "out_channels", "groups"):
            _set_size(module, name, c)

    def gather_in(self, module: nn.Module, source: Tensor, scale: Tensor, block: int) -> None:
        weight = _gather_columns(tensor(module, "weight"), source, scale, block)
        _replace(module, "weight", weight)
        _set_size(module, "in_channels", weight.shape[1])


@register_surgery(nn.BatchNorm1d, nn.BatchNorm2d)
class BatchNormSurgery:
    def split_out(self, module: nn.Module, idx: Tensor, delta: Tensor) -> None:
        raise ValueError("BatchNorm holds no neurons")

    def gather_out(self, module: nn.Module, source: Tensor) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            value = optional_tensor(module, name)
            if value is not None:
                _replace(module, name, _gather_rows(value, source))
        _set_size(module, "num_features", int(source.numel()))

    def gather_in(self, module: nn.Module, source: Tensor, scale: Tensor, block: int) -> None:
        raise ValueError("BatchNorm is not a consumer")


@register_surgery(nn.PReLU)
class PReLUSurgery:
    def split_out(self, module: nn.Module, idx: Tensor, delta: Tensor) -> None:
        raise ValueError("PReLU holds no neurons")

    def gather_out(self, module: nn.Module, source: Tensor) -> None:
        _replace(module, "weight", _gather_rows(tensor(module, "weight"), source))
        _set_size(module, "num_parameters", tensor(module, "weight").shape[0])

    def gather_in(self, module: nn.Module, source: Tensor, scale: Tensor, block: int) -> None:
        raise ValueError("PReLU is not a consumer")
