"""Randomly composed chains between a producer and its consumer, against the brute force.

Each case draws a producer (Linear, Conv1d, Conv2d), a chain of per-channel steps (BatchNorm,
activations smooth and piecewise-linear, depthwise convolutions, pools, dropout, scalar affine
maps, flatten) and a consumer, in float64, and checks: exact eigenvalues equal the brute-force
Hessian of the split network (both BatchNorm modes), the fast route agrees, and splitting at ε = 0
preserves the function.
"""

from __future__ import annotations

import random

import pytest
import torch
from _bruteforce import blocks, split_hessian
from _models import loss_fn
from torch import Tensor, nn

import splitgrow

ACTS = [nn.Tanh, nn.Softplus, nn.SiLU, nn.GELU, nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Sigmoid]


class Scale(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return 0.7 * x - 0.2


class Chain(nn.Module):
    def __init__(
        self, producer: nn.Module, steps: list[nn.Module], consumer: nn.Module, pool: bool
    ):
        super().__init__()
        self.producer, self.steps, self.consumer, self.pool = (
            producer,
            nn.Sequential(*steps),
            consumer,
            pool,
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.steps(self.producer(x))
        if self.pool:
            h = torch.flatten(h, 1)
        return self.consumer(h)


def _draw(rng: random.Random) -> tuple[nn.Module, tuple[int, ...]]:
    kind = rng.choice(["linear", "conv1d", "conv2d"])
    n = rng.randint(2, 4)
    steps: list[nn.Module] = []
    if kind == "linear":
        producer, shape = nn.Linear(3, n, bias=rng.random() < 0.7), (3,)
        for _ in range(rng.randint(1, 4)):
            steps.append(
                rng.choice(
                    [lambda: nn.BatchNorm1d(n), lambda: rng.choice(ACTS)(), nn.Dropout, Scale]
                )()
            )
        return Chain(producer, steps, nn.Linear(n, 3), pool=False), shape
    conv = nn.Conv1d if kind == "conv1d" else nn.Conv2d
    bn = nn.BatchNorm1d if kind == "conv1d" else nn.BatchNorm2d
    pool = nn.AvgPool1d if kind == "conv1d" else nn.AvgPool2d
    maxpool = nn.MaxPool1d if kind == "conv1d" else nn.MaxPool2d
    shape = (2, 8) if kind == "conv1d" else (2, 4, 4)
    producer = conv(2, n, 3, padding=1, bias=rng.random() < 0.5)
    size = 8 if kind == "conv1d" else 4
    for _ in range(rng.randint(1, 5)):
        choice = rng.choice(["bn", "act", "act", "dw", "pool", "scale"])
        if choice == "bn":
            steps.append(bn(n))
        elif choice == "act":
            steps.append(rng.choice(ACTS)())
        elif choice == "dw":
            steps.append(conv(n, n, 3, padding=1, groups=n, bias=rng.random() < 0.5))
        elif choice == "pool" and size >= 2:
            steps.append(rng.choice([pool, maxpool])(2))
            size //= 2
        else:
            steps.append(Scale())
    spatial = size if kind == "conv1d" else size * size
    if rng.random() < 0.5:
        return Chain(producer, steps, nn.Linear(n * spatial, 3), pool=True), shape
    head = nn.Sequential(conv(n, 3, 1), nn.Flatten(), nn.Linear(3 * spatial, 3))
    return Chain(producer, steps, head, pool=False), shape


def _case(seed: int) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model, shape = _draw(rng)
    model = model.double().eval()
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.3, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)
    batches = [
        (
            torch.randn(k, *shape, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (k,), generator=gen),
        )
        for k in (5, 3)
    ]
    return model, batches


@pytest.mark.parametrize("seed", range(40))
def test_random_chain_against_bruteforce(seed: int) -> None:
    model, batches = _case(seed)
    info = splitgrow.analyze(model).layers["producer"]
    assert info.splittable, info.reason
    for bn in ("running", "batch"):
        exact = splitgrow.splitting_eigen(model, loss_fn, batches, which="both", batchnorm=bn)[
            "producer"
        ]
        s = blocks(split_hessian(model, "producer", loss_fn, batches, batchnorm=bn, beta=3.0))
        ref = torch.linalg.eigvalsh(s)
        scale = max(float(ref.abs().max()), 1e-12)
        assert float((exact.values - ref[:, 0]).abs().max()) <= 1e-9 * scale, (bn, exact.route)
        assert float((exact.max_values - ref[:, -1]).abs().max()) <= 1e-9 * scale, (bn, exact.route)
        fast = splitgrow.splitting_eigen(model, loss_fn, batches, batchnorm=bn, method="fast")[
            "producer"
        ]
        assert float((fast.values - ref[:, 0]).abs().max()) <= 0.02 * scale
    plan = {
        "producer": (torch.tensor([0, info.n - 1]), torch.randn(2, info.d, dtype=torch.float64))
    }
    split = splitgrow.split_neurons(model, plan, eps=0.0).eval()
    with torch.no_grad():
        for x, _ in batches:
            assert float((split(x) - model(x)).abs().max()) < 1e-10


@pytest.mark.parametrize(
    "geometry",
    [
        {"kernel_size": 3, "padding": 1, "stride": 2},
        {"kernel_size": 3, "padding": "valid", "bias": True},
        {"kernel_size": (3, 2), "padding": (2, 1), "dilation": (2, 1)},
        {"kernel_size": (2, 3), "stride": (2, 1), "padding": (3, 1), "dilation": (1, 2)},
        {"kernel_size": 3, "padding": 1, "hooked": True},
    ],
)
def test_depthwise_after_a_conv_producer_takes_the_shifted_products(
    geometry: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """conv → BN → act → depthwise (strided, unpadded, dilated, with a bias) → BN → act → 1×1,
    on 6×7 inputs: the exact route's tangents through the depthwise conv come from shifted
    copies of the shared patches (``_depthwise_of_shared``), and its eigenvalues equal the brute
    force's and, with that path turned off, the conv's. A depthwise conv with a forward hook
    (which the shifted products would not run) goes through the conv."""
    geometry = dict(geometry)
    hooked = bool(geometry.pop("hooked", False))
    from splitgrow.splitting import local

    torch.manual_seed(0)
    n = 3
    steps = [
        nn.BatchNorm2d(n),
        nn.Softplus(),
        nn.Conv2d(n, n, groups=n, **{"bias": False, **geometry}),  # type: ignore[arg-type]
        nn.BatchNorm2d(n),
        nn.Tanh(),
    ]
    if hooked:
        steps[2].register_forward_hook(lambda module, args, out: 1.5 * out)
    head = nn.Sequential(nn.Conv2d(n, 2, 1), nn.Flatten(), nn.LazyLinear(3))
    model = Chain(nn.Conv2d(2, n, 3, padding=1), steps, head, pool=False).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 6, 7, generator=gen, dtype=torch.float64)
    model(x)  # the lazy head's size
    model.train()
    model(x)  # running statistics off their defaults
    model.eval()
    batches = [(x, torch.randint(0, 3, (4,), generator=gen))]
    taken: list[bool] = []
    real = local._depthwise_of_shared

    def spy(*args: object) -> object:
        out = real(*args)  # type: ignore[arg-type]
        taken.append(out is not None)
        return out

    monkeypatch.setattr(local, "_depthwise_of_shared", spy)
    exact = splitgrow.splitting_eigen(model, loss_fn, batches, which="both")["producer"]
    assert exact.route == "chain" and taken and any(taken) != hooked
    ref = torch.linalg.eigvalsh(
        blocks(split_hessian(model, "producer", loss_fn, batches, beta=3.0))
    )
    scale = float(ref.abs().max())
    assert float((exact.values - ref[:, 0]).abs().max()) <= 1e-9 * scale
    assert float((exact.max_values - ref[:, -1]).abs().max()) <= 1e-9 * scale
    monkeypatch.setattr(local, "_depthwise_of_shared", lambda *args: None)
    conv = splitgrow.splitting_eigen(model, loss_fn, batches, which="both")["producer"]
    torch.testing.assert_close(exact.values, conv.values, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(exact.max_values, conv.max_values, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize(
    "geometry",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": 3, "stride": (3, 2), "padding": (4, 0)},  # padding beyond the kernel
        {"kernel_size": (1, 5), "stride": (1, 4), "padding": (0, 2), "dilation": (3, 1)},
        {"kernel_size": (3, 2), "stride": (2, 3), "padding": (1, 2), "dilation": (2, 2)},
    ],
)
def test_depthwise_of_shared_is_the_conv_of_the_scaled_columns(
    geometry: dict[str, object],
) -> None:
    """The shifted products equal ``conv2d(base·scale)`` without the bias, as the conv path
    computes them, for strides, paddings, dilations and kernels that differ along the two axes
    of a non-square input; where they do not apply (``padding="same"``, a tangent base that
    differs between channels) the function declines."""
    from splitgrow.splitting.local import _depthwise_of_shared

    gen = torch.Generator().manual_seed(0)
    k, batch, n, h, w = 4, 3, 5, 9, 11
    cols = torch.randn(k, batch, 1, h, w, generator=gen, dtype=torch.float64)
    base = cols.expand(k, batch, n, h, w)
    scale = torch.rand(batch, n, h, w, generator=gen, dtype=torch.float64)
    conv = nn.Conv2d(n, n, groups=n, **geometry).double()  # type: ignore[arg-type]
    got = _depthwise_of_shared(conv, base, scale)
    assert got is not None
    folded = (base * scale).reshape(k * batch, n, h, w)
    expected = nn.functional.conv2d(
        folded, conv.weight, None, conv.stride, conv.padding, conv.dilation, groups=n
    )
    torch.testing.assert_close(
        got, expected.view(k, batch, *expected.shape[1:]), rtol=0, atol=1e-13
    )
    same = nn.Conv2d(n, n, 3, groups=n, padding="same").double()
    assert _depthwise_of_shared(same, base, scale) is None
    assert _depthwise_of_shared(conv, base.contiguous(), scale) is None
