"""Second derivatives of activations, and the smooth surrogate for piecewise-linear ones.

Smooth activations (tanh, sigmoid, softplus, GELU, SiLU, ELU …) need nothing here: autograd gives
their exact σ''. Piecewise-linear ones (ReLU, ReLU6, LeakyReLU, Hardtanh, Hardsigmoid) have σ'' = 0
almost everywhere, which makes every splitting matrix vanish. Each of them is a sum of shifted
ReLUs, ``σ(z) = a·z + b + Σ_k c_k·relu(z − t_k)``, and splitgrow gives it the second derivative of
the same sum with each ReLU replaced by softplus of sharpness β (β = 3 is the published choice):

    σ''_surrogate(z) = Σ_k c_k · β·s(β(z − t_k))·(1 − s(β(z − t_k))),   s = sigmoid.

The surrogate is applied as ``σ(z₀) + σ'(z₀)·(z − z₀) + ½·σ''_surrogate(z₀)·(z − z₀)²`` with
``z₀ = z.detach()`` (:func:`piecewise_apply`): the value and the first derivative stay exactly
those of σ, the second derivative at z₀ is the surrogate's, for every route (closed form,
Hessian-vector products, and the tests' brute-force Hessians).
Hardswish is piecewise quadratic and keeps its exact σ'' = 1/3 on (−3, 3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_SURROGATE_BETA = 3.0

#: (t_k, c_k): a ReLU kink at t_k with weight c_k (a tensor for per-channel PReLU slopes)
Kinks = Sequence[tuple[float, float | Tensor]]


@dataclass(frozen=True)
class Piecewise:
    """σ(z) = slope·z + const + Σ_k c_k·relu(z − t_k): the kinks and the slope left of them."""

    slope: float | Tensor
    kinks: Kinks
    #: whether the op's own backward gives exactly :func:`piecewise_slope` (in every dtype and at
    #: the kinks): true of ReLU, LeakyReLU and PReLU (one kink, the left slope at it). PyTorch's
    #: hardtanh/ReLU6 give 0 at their upper kink where the convention here (slope right of a
    #: kink only past it) gives 1, and its hardsigmoid scales by a float32 1/6 (a relative
    #: error of 3e-8 in float64)
    exact_backward: bool = True


_RELU = Piecewise(0.0, [(0.0, 1.0)])
_RELU6 = Piecewise(0.0, [(0.0, 1.0), (6.0, -1.0)], exact_backward=False)
_HARDSIGMOID = Piecewise(0.0, [(-3.0, 1.0 / 6.0), (3.0, -1.0 / 6.0)], exact_backward=False)


def _leaky(slope: float) -> Piecewise:
    return Piecewise(slope, [(0.0, 1.0 - slope)])


def _hardtanh(lo: float, hi: float) -> Piecewise:
    return Piecewise(0.0, [(lo, 1.0), (hi, -1.0)], exact_backward=False)


#: piecewise-linear activation modules, from the module's own settings
MODULE_PIECEWISE: dict[type[nn.Module], Callable[[Any], Piecewise]] = {
    nn.ReLU: lambda m: _RELU,
    nn.ReLU6: lambda m: _RELU6,
    nn.LeakyReLU: lambda m: _leaky(m.negative_slope),
    nn.Hardtanh: lambda m: _hardtanh(m.min_val, m.max_val),
    nn.Hardsigmoid: lambda m: _HARDSIGMOID,
}


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: float) -> float:
    if len(args) > i:
        return float(args[i])
    return float(kwargs.get(name, default))


#: piecewise-linear activation functions, from the call's arguments (input first)
FUNCTION_PIECEWISE: dict[
    Callable[..., Any], Callable[[tuple[Any, ...], dict[str, Any]], Piecewise]
] = {
    F.relu: lambda a, k: _RELU,
    torch.relu: lambda a, k: _RELU,
    F.relu6: lambda a, k: _RELU6,
    F.leaky_relu: lambda a, k: _leaky(_arg(a, k, 1, "negative_slope", 0.01)),
    F.hardtanh: lambda a, k: _hardtanh(
        _arg(a, k, 1, "min_val", -1.0), _arg(a, k, 2, "max_val", 1.0)
    ),
    F.hardsigmoid: lambda a, k: _HARDSIGMOID,
}

#: piecewise-linear tensor methods
METHOD_PIECEWISE: dict[str, Callable[[tuple[Any, ...], dict[str, Any]], Piecewise]] = {
    "relu": lambda a, k: _RELU,
}


#: elements per slice of :func:`softplus_second_derivative`'s temporaries (on the CPU; see
#: :func:`slice_elements`)
SLICE_ELEMENTS = 1 << 20
#: how many times larger the slices of the splitting's temporaries are on an accelerator
ACCELERATOR_SLICE_SCALE = 16


def slice_elements(budget: int, device: torch.device) -> int:
    """``budget``, an element budget of the splitting's slices or chunks on the CPU, on
    ``device``.

    On the CPU, slices of about 2^20 elements keep temporaries in cache and large fresh
    allocations (which cost more than the arithmetic on them) away; on a GPU each operation's
    launch and the host's work for it cost more than its arithmetic at that size, and the call is
    bound by their number (the H200 ran 32 000 kernels and was busy 80 ms of a 1.4 s call), so
    there the slices are ``ACCELERATOR_SLICE_SCALE`` times larger. The answer does not depend on
    the slicing beyond rounding."""
    return budget if device.type == "cpu" else budget * ACCELERATOR_SLICE_SCALE


def softplus_second_derivative(z: Tensor, beta: float, shift: float = 0.0) -> Tensor:
    """σ''(z − shift) of softplus with sharpness β: β·s·(1 − s), s = sigmoid(β·(z − shift)).

    A new contiguous tensor shaped like ``z``, computed in slices: its temporaries stay small
    (on a wide layer's batch, ``z`` is as large as a layer's activations)."""
    step = slice_elements(SLICE_ELEMENTS, z.device)
    if z.numel() <= step:
        s = torch.sigmoid(beta * (z - shift) if shift else beta * z)
        return s.sub_(s.square()).mul_(beta)  # in place: two temporaries the size of z, not four
    out = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    flat, dst = z.reshape(-1), out.view(-1)
    for a in range(0, flat.numel(), step):
        part = flat[a : a + step]
        s = torch.sigmoid(beta * (part - shift) if shift else beta * part)
        dst[a : a + step] = s.sub_(s.square()).mul_(beta)
    return out


def piecewise_slope(z: Tensor, pw: Piecewise) -> Tensor:
    """σ'(z) of a piecewise-linear activation (right of a kink only past it), like ``z``."""
    slope: Tensor | float = pw.slope
    for t, c in pw.kinks:
        slope = slope + c * (z > t).to(z.dtype)
    return slope.expand_as(z) if isinstance(slope, Tensor) else torch.full_like(z, slope)


def piecewise_apply(y: Tensor, z: Tensor, pw: Piecewise, beta: float | None) -> Tensor:
    """σ(z) with value ``y`` (computed by the real op), exact slope, surrogate curvature.

    Returns ``y₀ + σ'(z₀)·(z − z₀) + ½·σ''_β(z₀)·(z − z₀)²`` at z₀ = z.detach(): the value is
    bit-for-bit the op's, the first derivative is the exact slope from the kinks, and the second
    derivative is the surrogate's (zero when ``beta`` is ``None``). No op's own double backward is
    needed (``hardsigmoid`` has none in PyTorch).
    """
    if not (torch.is_grad_enabled() and z.requires_grad):
        return y  # no derivative will be taken: the value alone
    z0 = z.detach()
    dz = z - z0
    slope = piecewise_slope(z0, pw)
    if beta is None:
        return y.detach() + slope * dz
    curvature: Tensor | float = 0.0
    for t, c in pw.kinks:
        curvature = curvature + c * softplus_second_derivative(z0, beta, t)
    return y.detach() + slope * dz + 0.5 * curvature * dz * dz


def describe_surrogate(beta: float | None) -> str:
    """A line for results: which second derivative piecewise-linear activations were given."""
    if beta is None:
        return "exact σ'' (zero almost everywhere for ReLU-like activations)"
    return f"ReLU-like activations: softplus(β={beta:g}) second derivative"
