"""Typed access to module attributes (``nn.Module.__getattr__`` is typed ``Tensor | Module``),
and two small helpers every layer of the package uses."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode inside; every module's own training flag restored afterwards."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
