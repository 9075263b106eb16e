"""The surrogate for piecewise-linear activations: exact value and slope, softplus curvature."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from splitgrow.splitting.activations import (
    FUNCTION_PIECEWISE,
    MODULE_PIECEWISE,
    piecewise_apply,
    softplus_second_derivative,
)

MODULES = [nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.2), nn.Hardtanh(-0.5, 2.0), nn.Hardsigmoid()]


def _z() -> torch.Tensor:
    # avoid the kinks themselves, where the slope is a one-sided choice
    return torch.linspace(-7.3, 7.3, 301, dtype=torch.float64)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("beta", [None, 3.0])
def test_value_and_slope_exact_curvature_surrogate(module: nn.Module, beta: float | None) -> None:
    pw = MODULE_PIECEWISE[type(module)](module)
    z = _z().requires_grad_(True)
    y = piecewise_apply(module(z), z, pw, beta)
    assert torch.equal(y.detach(), module(z.detach()))  # bit-for-bit value
    (d1,) = torch.autograd.grad(y.sum(), z, create_graph=True)
    z_ref = z.detach().requires_grad_(True)
    (d1_ref,) = torch.autograd.grad(module(z_ref).sum(), z_ref)
    # exact slope (PyTorch's own hardsigmoid backward rounds 1/6 to float32: 5e-9 off)
    assert torch.allclose(d1, d1_ref, rtol=0, atol=1e-8)
    d2 = torch.autograd.grad(d1.sum(), z)[0] if d1.requires_grad else torch.zeros_like(z)
    if beta is None:
        assert float(d2.abs().max()) == 0.0
        return
    # independent reference: the second derivative of the same sum of ReLUs with each ReLU
    # replaced by softplus_β, by finite differences of the sum itself
    h = 1e-4
    zz = z.detach()

    def smooth(u: torch.Tensor) -> torch.Tensor:
        return sum(c * F.softplus(u - t, beta=beta, threshold=100.0) for t, c in pw.kinks)  # type: ignore[misc]

    fd = (smooth(zz + h) - 2 * smooth(zz) + smooth(zz - h)) / h**2
    assert torch.allclose(d2, fd, rtol=1e-5, atol=1e-6)


def test_softplus_second_derivative_formula() -> None:
    z = _z().requires_grad_(True)
    (d1,) = torch.autograd.grad(
        F.softplus(z, beta=3.0, threshold=100.0).sum(), z, create_graph=True
    )
    (d2,) = torch.autograd.grad(d1.sum(), z)
    assert torch.allclose(softplus_second_derivative(z.detach(), 3.0), d2, atol=1e-12)


def test_function_table_matches_module_table() -> None:
    z = _z()
    pairs = [
        (F.relu, (z,), nn.ReLU()),
        (F.relu6, (z,), nn.ReLU6()),
        (F.leaky_relu, (z, 0.2), nn.LeakyReLU(0.2)),
        (F.hardtanh, (z, -0.5, 2.0), nn.Hardtanh(-0.5, 2.0)),
        (F.hardsigmoid, (z,), nn.Hardsigmoid()),
    ]
    for fn, args, module in pairs:
        a = FUNCTION_PIECEWISE[fn](args, {})
        b = MODULE_PIECEWISE[type(module)](module)
        assert a == b, fn
