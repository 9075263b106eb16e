"""The fast route (block subspace iteration on Hessian-vector products) against exact."""

from __future__ import annotations

import pytest
import torch
from _models import REGISTRY, build, loss_fn
from torch import nn

import splitgrow
from splitgrow.splitting import eigen as eigen_module
from splitgrow.splitting.solvers import BlockSubspace


def _agreement(fast: torch.Tensor, exact: torch.Tensor) -> float:
    """Fraction of neurons within 2% of the layer's largest |λ| (the issue's measure)."""
    scale = float(exact.abs().max())
    return float(((fast - exact).abs() <= 0.02 * scale).double().mean())


@pytest.mark.parametrize("name", list(REGISTRY))
@pytest.mark.parametrize("which", ["min", "both"])
def test_fast_agrees_with_exact_on_registry(name: str, which: str) -> None:
    model, batches = build(name)
    exact = splitgrow.splitting_eigen(model, loss_fn, batches, which=which)
    fast = splitgrow.splitting_eigen(model, loss_fn, batches, which=which, method="fast")
    for layer, e in exact.items():
        f = fast[layer]
        assert f.method == "fast" and e.method == "exact"
        assert _agreement(f.values, e.values) >= 0.95, layer
        if which == "both":
            assert _agreement(f.max_values, e.max_values) >= 0.95, layer
        assert torch.allclose(f.vectors.norm(dim=1), torch.ones_like(f.values))


class Wide(nn.Module):
    """c1 has d = 8·3·3 + 1 = 73: larger than the search space the fast route needs."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(8, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.c2 = nn.Conv2d(12, 10, 1)
        self.fc = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.bn(self.c1(x)))
        h = nn.functional.softplus(self.c2(h)).mean((2, 3))
        return self.fc(h)


def test_fast_converges_before_the_whole_space_on_larger_d() -> None:
    torch.manual_seed(0)
    model = Wide().double().eval()
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(16, 8, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,)))
        for _ in range(3)
    ]
    exact = splitgrow.splitting_eigen(model, loss_fn, batches, which="both")
    fast = splitgrow.splitting_eigen(
        model, loss_fn, batches, which="both", method="fast", tol=1e-3, block=4
    )
    for layer, e in exact.items():
        f = fast[layer]
        assert _agreement(f.values, e.values) >= 0.95
        assert _agreement(f.max_values, e.max_values) >= 0.95
        assert float(f.residual.max()) <= 1e-3
    # the search space stays well below d = 73 for c1: fewer passes than d / block
    assert fast["c1"].passes < 73 // 4


def test_fast_is_reproducible_with_seed() -> None:
    model, batches = build("mobile_block")
    a = splitgrow.splitting_eigen(model, loss_fn, batches, method="fast", seed=3)
    b = splitgrow.splitting_eigen(model, loss_fn, batches, method="fast", seed=3)
    for layer in a:
        assert torch.equal(a[layer].values, b[layer].values)


def test_auto_picks_by_d(monkeypatch: pytest.MonkeyPatch) -> None:
    model, batches = build("mobile_block")  # c1: d = 28, c2: d = 5
    res = splitgrow.splitting_eigen(model, loss_fn, batches, method="auto")
    assert {e.method for e in res.values()} == {"exact"}
    monkeypatch.setattr(eigen_module, "AUTO_MAX_D", 20)
    res = splitgrow.splitting_eigen(model, loss_fn, batches, method="auto")
    assert res["c1"].method == "fast" and res["c2"].method == "exact"


def test_auto_takes_the_fast_route_for_wide_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the general route exact costs d Hessian-vector products: fast above a smaller d."""
    model, batches = build("functional")  # c3: x·sigmoid(x), the general route, d = 5
    res = splitgrow.splitting_eigen(model, loss_fn, batches, method="auto")
    assert res["c3"].route == "general" and res["c3"].method == "exact"
    monkeypatch.setattr(eigen_module, "AUTO_MAX_D_GENERAL", 4)
    res = splitgrow.splitting_eigen(model, loss_fn, batches, method="auto")
    assert res["c3"].method == "fast"
    assert {e.method for k, e in res.items() if k != "c3"} == {"exact"}


@pytest.mark.parametrize("block", [1, 2])
def test_both_ends_converge_with_small_blocks(block: int) -> None:
    """which="both" grows the space at both ends, not only the minimum."""
    gen = torch.Generator().manual_seed(0)
    d, n = 60, 3
    q, _ = torch.linalg.qr(torch.randn(n, d, d, generator=gen, dtype=torch.float64))
    spectrum = torch.linspace(-1, 1, d, dtype=torch.float64).repeat(n, 1)
    spectrum[:, 0], spectrum[:, -1] = -3.0, 3.0  # isolated ends
    s = q @ torch.diag_embed(spectrum) @ q.transpose(1, 2)
    solver = BlockSubspace(n, d, "both", block, 1e-6, gen, torch.device("cpu"))
    passes = 0
    while not solver.converged:
        solver.update(s @ solver.pending)
        passes += 1
    out = solver.result()
    assert torch.allclose(out["min"][0], torch.full((n,), -3.0, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(out["max"][0], torch.full((n,), 3.0, dtype=torch.float64), atol=1e-6)
    assert passes * max(block, 2) < d  # converged before the space became all of R^d


def test_fast_with_a_one_shot_generator_and_a_dataloader() -> None:
    """Several passes over data given as a generator (kept) or a DataLoader (re-iterated)."""
    model, batches = build("mobile_block")
    ref = splitgrow.splitting_eigen(model, loss_fn, batches, method="fast")
    gen = splitgrow.splitting_eigen(model, loss_fn, (b for b in batches), method="fast")
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    dl = splitgrow.splitting_eigen(model, loss_fn, loader, method="fast")
    for layer, e in ref.items():
        assert e.passes > 1
        assert torch.allclose(gen[layer].values, e.values, rtol=0, atol=1e-12)
        assert torch.allclose(dl[layer].values, e.values, rtol=0, atol=1e-12)
