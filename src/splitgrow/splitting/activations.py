"""Second derivatives of activations, and the smooth surrogate for piecewise-linear ones.

Smooth activations (tanh, sigmoid, softplus, GELU, SiLU, ELU …) need nothing here: autograd gives
their exact σ''. Piecewise-linear ones (ReLU, ReLU6, LeakyReLU, Hardtanh, Hardsigmoid) have σ'' = 0
almost everywhere, which makes every splitting matrix vanish. Each of them is a sum of shifted
ReLUs, ``σ(z) = a·z + b + Σ_k c_k·relu(z − t_k)``, and splitgrow gives it the second derivative of
the same sum with each ReLU replaced by softplus of sharpness β (β = 3 is the published choice):

    σ''_surrogate(z) = Σ_k c_k · β·s(β(z − t_k))·(1 − s(β(z − t_k))),   s = sigmoid.

The surrogate is applied as ``σ(z) + ½·σ''_surrogate(z₀)·(z − z₀)²`` with ``z₀ = z.detach()``: the
value and the first derivative stay exactly those of σ, the second derivative at z₀ is the
surrogate's, for every route (closed form, Hessian-vector products, brute-force Hessians).
Hardswish is piecewise quadratic and keeps its exact σ'' = 1/3 on (−3, 3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: (t_k, c_k): a ReLU kink at t_k with weight c_k (a tensor for per-channel PReLU slopes)
Kinks = Sequence[tuple[float, float | Tensor]]

DEFAULT_SURROGATE_BETA = 3.0

#: kinks of piecewise-linear activation modules, from the module's own settings
MODULE_KINKS: dict[type[nn.Module], Callable[[Any], Kinks]] = {
    nn.ReLU: lambda m: [(0.0, 1.0)],
    nn.ReLU6: lambda m: [(0.0, 1.0), (6.0, -1.0)],
    nn.LeakyReLU: lambda m: [(0.0, 1.0 - m.negative_slope)],
    nn.Hardtanh: lambda m: [(m.min_val, 1.0), (m.max_val, -1.0)],
    nn.Hardsigmoid: lambda m: [(-3.0, 1.0 / 6.0), (3.0, -1.0 / 6.0)],
}


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: float) -> float:
    if len(args) > i:
        return float(args[i])
    return float(kwargs.get(name, default))


#: kinks of piecewise-linear activation functions, from the call's arguments (input first)
FUNCTION_KINKS: dict[Callable[..., Any], Callable[[tuple[Any, ...], dict[str, Any]], Kinks]] = {
    F.relu: lambda a, k: [(0.0, 1.0)],
    torch.relu: lambda a, k: [(0.0, 1.0)],
    F.relu6: lambda a, k: [(0.0, 1.0), (6.0, -1.0)],
    F.leaky_relu: lambda a, k: [(0.0, 1.0 - _arg(a, k, 1, "negative_slope", 0.01))],
    F.hardtanh: lambda a, k: [
        (_arg(a, k, 1, "min_val", -1.0), 1.0),
        (_arg(a, k, 2, "max_val", 1.0), -1.0),
    ],
    F.hardsigmoid: lambda a, k: [(-3.0, 1.0 / 6.0), (3.0, -1.0 / 6.0)],
}

#: kinks of piecewise-linear tensor methods
METHOD_KINKS: dict[str, Callable[[tuple[Any, ...], dict[str, Any]], Kinks]] = {
    "relu": lambda a, k: [(0.0, 1.0)],
}


def softplus_second_derivative(z: Tensor, beta: float) -> Tensor:
    """σ''(z) of softplus with sharpness β: β·s(βz)·(1 − s(βz))."""
    s = torch.sigmoid(beta * z)
    return beta * s * (1.0 - s)


def surrogate_curvature(z: Tensor, kinks: Kinks, beta: float) -> Tensor:
    """The surrogate second derivative Σ_k c_k·softplus_β''(z − t_k) (module docstring)."""
    out = torch.zeros_like(z)
    for t, c in kinks:
        out = out + c * softplus_second_derivative(z - t, beta)
    return out


def with_surrogate(y: Tensor, z: Tensor, kinks: Kinks, beta: float) -> Tensor:
    """``y = σ(z)`` with the surrogate second derivative added at z₀ = z (value unchanged)."""
    z0 = z.detach()
    dz = z - z0
    return y + 0.5 * surrogate_curvature(z0, kinks, beta) * dz * dz


def describe_surrogate(beta: float | None) -> str:
    """A line for results: which second derivative piecewise-linear activations were given."""
    if beta is None:
        return "exact σ'' (zero almost everywhere for ReLU-like activations)"
    return f"ReLU-like activations: softplus(β={beta:g}) second derivative"
