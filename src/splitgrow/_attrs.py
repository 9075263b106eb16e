"""Typed access to module attributes (``nn.Module.__getattr__`` is typed ``Tensor | Module``)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


def tensor(module: nn.Module, name: str) -> Tensor:
    """``module.<name>`` as a tensor (parameter or buffer).

    Raises:
        TypeError: naming the module and attribute when it is not a tensor.
    """
    value = getattr(module, name, None)
    if not isinstance(value, Tensor):
        raise TypeError(f"{type(module).__name__}.{name} is not a tensor")
    return value


def optional_tensor(module: nn.Module, name: str) -> Tensor | None:
    """``module.<name>`` when it is a tensor, else ``None`` (e.g. a layer without bias)."""
    value = getattr(module, name, None)
    return value if isinstance(value, Tensor) else None


def attr(module: nn.Module, name: str) -> Any:
    """A plain (non-tensor) attribute such as ``kernel_size`` or ``groups``."""
    return getattr(module, name)
