"""splitting_eigen (exact) against the brute-force Hessian of the split network, in float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _bruteforce import blocks, off_block_max, split_hessian, split_loss_fn
from _models import REGISTRY, build, loss_fn
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import splitgrow

CASES = [(name, bn) for name in REGISTRY for bn in ("running", "batch")]


def _close(a: torch.Tensor, b: torch.Tensor, scale: float, rel: float = 1e-9) -> None:
    assert float((a - b).abs().max()) <= rel * max(scale, 1e-30), (a, b)


@pytest.mark.parametrize(("name", "batchnorm"), CASES)
def test_exact_matrices_equal_bruteforce_hessian(name: str, batchnorm: str) -> None:
    model, batches = build(name)
    res = splitgrow.splitting_eigen(model, loss_fn, batches, which="both", batchnorm=batchnorm)
    assert res, "every registry model has splittable layers"
    for layer, eig in res.items():
        h = split_hessian(model, layer, loss_fn, batches, batchnorm=batchnorm, beta=3.0)
        s = blocks(h)
        scale = float(s.abs().max())
        assert scale > 0, f"{name}/{layer}: the brute-force splitting matrices vanish"
        # block-diagonal across neurons, as DESIGN.md §1 states
        assert off_block_max(h) <= 1e-12 * scale
        values = torch.linalg.eigvalsh(s)
        _close(eig.values, values[:, 0], scale)
        _close(eig.max_values, values[:, -1], scale)
        # eigenvectors: unit norm, satisfy S v = λ v for the brute-force S
        assert torch.allclose(eig.vectors.norm(dim=1), torch.ones(len(values), dtype=torch.float64))
        sv = torch.einsum("nij,nj->ni", s, eig.vectors)
        _close(sv, eig.values[:, None] * eig.vectors, scale, 1e-8)
        assert eig.vectors.dtype == torch.float64
        assert eig.vectors.shape == (eig.values.shape[0], s.shape[1])


def test_routes_cover_closed_form_general_and_batch_mode() -> None:
    """The registry exercises both routes; batch-mode BatchNorm never uses the closed form."""
    routes = set()
    for name in REGISTRY:
        model, batches = build(name)
        layers = splitgrow.analyze(model).layers
        for bn in ("running", "batch"):
            res = splitgrow.splitting_eigen(model, loss_fn, batches, batchnorm=bn)
            routes |= {(bn, e.route) for e in res.values()}
            for layer, e in res.items():
                has_bn = any(c.kind.value == "batchnorm" for c in layers[layer].chain)
                if bn == "batch" and has_bn:
                    assert e.route == "general", (name, layer)
    assert {
        ("running", "closed-form"),
        ("running", "chain"),
        ("running", "general"),
        ("batch", "general"),
    } <= routes


def test_mobile_block_first_layer_uses_chain_route() -> None:
    """A depthwise conv between two activations: the closed form would be wrong there."""
    model, batches = build("mobile_block")
    res = splitgrow.splitting_eigen(model, loss_fn, batches)
    assert res["c1"].route == "chain"
    assert res["c2"].route == "closed-form"
    res = splitgrow.splitting_eigen(model, loss_fn, batches, batchnorm="batch")
    assert res["c1"].route == res["c2"].route == "general"


def test_surrogate_beta_none_uses_exact_relu_curvature() -> None:
    model, batches = build("relu_mlp")
    res = splitgrow.splitting_eigen(model, loss_fn, batches, surrogate_beta=None)
    # fc1 → ReLU → dropout → fc2: zero curvature almost everywhere without a surrogate
    assert float(res["fc1"].values.abs().max()) == 0.0
    h = split_hessian(model, "fc2", loss_fn, batches, beta=None)
    values = torch.linalg.eigvalsh(blocks(h))
    _close(res["fc2"].values, values[:, 0], float(values.abs().max()) + 1e-30)
    assert "exact" in res["fc1"].surrogate
    assert "softplus" in splitgrow.splitting_eigen(model, loss_fn, batches)["fc1"].surrogate


def test_surrogate_beta_changes_the_curvature() -> None:
    model, batches = build("relu_mlp")
    a = splitgrow.splitting_eigen(model, loss_fn, batches, surrogate_beta=3.0)["fc1"].values
    b = splitgrow.splitting_eigen(model, loss_fn, batches, surrogate_beta=10.0)["fc1"].values
    h = split_hessian(model, "fc1", loss_fn, batches, beta=10.0)
    ref = torch.linalg.eigvalsh(blocks(h))[:, 0]
    _close(b, ref, float(ref.abs().max()))
    assert not torch.allclose(a, b)


def test_functional_relu_matches_module_relu() -> None:
    """F.relu / torch.relu / x.relu() in a custom forward get the same surrogate as nn.ReLU."""

    class Net(torch.nn.Module):
        def __init__(self, how: str) -> None:
            super().__init__()
            self.how = how
            self.fc1, self.fc2 = torch.nn.Linear(5, 6), torch.nn.Linear(6, 3)
            self.act = torch.nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc1(x)
            h = {
                "module": lambda t: self.act(t),
                "F": torch.nn.functional.relu,
                "torch": torch.relu,
                "method": lambda t: t.relu(),
            }[self.how](h)
            return self.fc2(h)

    _, batches = build("mlp")
    results = []
    for how in ("module", "F", "torch", "method"):
        torch.manual_seed(3)
        net = Net(how).double()
        results.append(splitgrow.splitting_eigen(net, loss_fn, batches)["fc1"].values)
    for r in results[1:]:
        assert torch.equal(r, results[0])
    assert float(results[0].abs().max()) > 0


def test_uneven_batches_weigh_by_size() -> None:
    model, batches = build("cnn1d")
    whole = (torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    a = splitgrow.splitting_eigen(model, loss_fn, batches, which="both")
    b = splitgrow.splitting_eigen(model, loss_fn, [whole], which="both")
    for layer in a:
        scale = float(b[layer].values.abs().max())
        _close(a[layer].values, b[layer].values, scale, 1e-12)
        _close(a[layer].max_values, b[layer].max_values, scale, 1e-12)
        assert a[layer].samples == b[layer].samples == 11


def test_dataloader_and_generator_inputs() -> None:
    model, batches = build("mlp")
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    a = splitgrow.splitting_eigen(model, loss_fn, loader)
    b = splitgrow.splitting_eigen(model, loss_fn, iter(batches))
    for layer in a:
        assert torch.allclose(a[layer].values, b[layer].values, rtol=0, atol=1e-15)


def test_which_selects_min_max_both() -> None:
    model, batches = build("mobile_block")
    lo = splitgrow.splitting_eigen(model, loss_fn, batches, which="min")
    hi = splitgrow.splitting_eigen(model, loss_fn, batches, which="max")
    both = splitgrow.splitting_eigen(model, loss_fn, batches, which="both")
    for layer in lo:
        assert torch.equal(lo[layer].values, both[layer].values)
        assert torch.equal(hi[layer].values, both[layer].max_values)
        assert lo[layer].max_values is None and hi[layer].max_values is None
        assert bool((hi[layer].values >= lo[layer].values).all())


def test_layers_argument_restricts_and_keeps_values() -> None:
    model, batches = build("mobile_block")
    full = splitgrow.splitting_eigen(model, loss_fn, batches)
    part = splitgrow.splitting_eigen(model, loss_fn, batches, layers=["c2"])
    assert list(part) == ["c2"]
    assert torch.equal(part["c2"].values, full["c2"].values)


def _state(model: torch.nn.Module) -> tuple:
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: m.training for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


@pytest.mark.parametrize("batchnorm", ["running", "batch"])
def test_model_state_left_exactly_as_it_was(batchnorm: str) -> None:
    model, batches = build("mobile_block")
    model.train()
    model.b2.eval()  # a mixed state must come back as it was
    model.c2.weight.requires_grad_(False)
    before = _state(model)
    splitgrow.splitting_eigen(model, loss_fn, batches, batchnorm=batchnorm, method="fast")
    splitgrow.splitting_eigen(model, loss_fn, batches, batchnorm=batchnorm)
    after = _state(model)
    assert before[1] == after[1] and before[2] == after[2]
    for k, v in before[0].items():
        assert torch.equal(v, after[0][k]), k
    assert all(p.grad is None for p in model.parameters())


def test_frozen_model_still_works() -> None:
    """Gradients are taken with taps, not through the parameters' requires_grad."""
    model, batches = build("cnn1d")
    ref = splitgrow.splitting_eigen(model, loss_fn, batches)
    frozen = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        out = splitgrow.splitting_eigen(frozen, loss_fn, batches)
    for layer in ref:
        assert torch.equal(ref[layer].values, out[layer].values)


def test_real_split_matches_second_order_prediction() -> None:
    """2·ΔL/ε² → λ_min as ε → 0, for the real split made by split_neurons (smooth model)."""
    model, batches = build("mlp")
    res = splitgrow.splitting_eigen(model, loss_fn, batches)

    def data_loss(m: torch.nn.Module) -> float:
        total = sum(len(y) for _, y in batches)
        with torch.no_grad():
            return sum(float(loss_fn(m(x), y)) * len(y) for x, y in batches) / total

    base = data_loss(model)
    for layer, eig in res.items():
        for i in range(eig.values.shape[0]):
            plan = {layer: (torch.tensor([i]), eig.vectors[i : i + 1])}
            errs = []
            for eps in (1e-1, 1e-2, 1e-3):
                split = splitgrow.split_neurons(model, plan, eps=eps)
                errs.append(abs(2 * (data_loss(split) - base) / eps**2 - float(eig.values[i])))
            scale = float(eig.values.abs().max())
            assert errs[2] < 1e-4 * scale + 1e-9, (layer, i, errs)
            assert errs[1] <= errs[0] + 1e-12  # converges as ε → 0


def test_no_random_direction_beats_the_min_eigenvector() -> None:
    model, batches = build("mobile_block")
    res = splitgrow.splitting_eigen(model, loss_fn, batches)
    gen = torch.Generator().manual_seed(5)
    for layer, eig in res.items():
        f = split_loss_fn(model, layer, loss_fn, batches, beta=3.0)
        n, d = eig.vectors.shape
        eps = 1e-3
        base = float(f(torch.zeros(n, d, dtype=torch.float64)).detach())
        for _ in range(20):
            u = torch.randn(n, d, generator=gen, dtype=torch.float64)
            u = u / u.norm(dim=1, keepdim=True)
            for i in range(n):
                delta = torch.zeros(n, d, dtype=torch.float64)
                delta[i] = eps * u[i]
                curv = 2 * (float(f(delta).detach()) - base) / eps**2
                assert curv >= float(eig.values[i]) - 1e-5 * float(eig.values.abs().max())


class NoRunningStats(torch.nn.Module):
    """BatchNorm without running statistics normalises with batch statistics in every mode."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(5, 6)
        self.bn = torch.nn.BatchNorm1d(6, track_running_stats=False)
        self.fc2 = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


@pytest.mark.parametrize("batchnorm", ["running", "batch"])
def test_batchnorm_without_running_statistics(batchnorm: str) -> None:
    torch.manual_seed(0)
    model = NoRunningStats().double().eval()
    _, batches = build("mlp")
    res = splitgrow.splitting_eigen(model, loss_fn, batches, batchnorm=batchnorm)
    assert res["fc1"].route == "general"
    ref = torch.linalg.eigvalsh(blocks(split_hessian(model, "fc1", loss_fn, batches)))[:, 0]
    _close(res["fc1"].values, ref, float(ref.abs().max()))
    assert float(ref.abs().max()) > 1e-3


class ViewAfterConv(torch.nn.Module):
    """x.view(B, -1) right after pointwise steps: the tangents reach the view non-contiguous."""

    def __init__(self) -> None:
        super().__init__()
        self.c = torch.nn.Conv2d(2, 3, 3)
        self.fc = torch.nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c(x))
        return self.fc(torch.tanh(h.view(h.size(0), -1)))


def test_view_inside_a_chain_route() -> None:
    torch.manual_seed(0)
    model = ViewAfterConv().double()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 2, 4, 4, generator=gen, dtype=torch.float64), torch.arange(5) % 3)]
    res = splitgrow.splitting_eigen(model, loss_fn, batches)
    assert res["c"].route == "chain"
    ref = torch.linalg.eigvalsh(blocks(split_hessian(model, "c", loss_fn, batches)))[:, 0]
    _close(res["c"].values, ref, float(ref.abs().max()))


def test_batchnorm1d_after_linear_on_3d_inputs_is_refused_on_data() -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = torch.nn.Linear(5, 4)
            self.bn = torch.nn.BatchNorm1d(4)
            self.g = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4, 5): BN normalises dim 1
            return self.g(torch.tanh(self.bn(self.f(x)))).mean(1)

    model = Net().double().eval()
    batches = [(torch.randn(3, 4, 5, dtype=torch.float64), torch.zeros(3, dtype=torch.long))]
    with pytest.raises(ValueError, match="layer 'f' gets 3-D inputs, but its BatchNorm1d/PReLU"):
        splitgrow.splitting_eigen(model, loss_fn, batches)


@pytest.mark.parametrize(
    ("n", "d", "chunk", "path"),
    [
        (7, 5, None, "features"),
        (7, 5, 40, "features"),
        (7, 60, None, "grouped"),  # d above GEMM_MAX_D
        (2, 9, None, "grouped"),  # fewer than d/2 neurons
    ],
)
def test_weighted_grams_both_paths_match_the_definition(
    n: int, d: int, chunk: int | None, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from splitgrow.splitting import local

    if chunk is not None:  # 40 elements: 2 rows of 15 features per chunk, the last of 1 row
        monkeypatch.setattr(local, "_CHUNK_ELEMENTS", chunk)
    taken: list[str] = []
    for name, attr in (("features", "_grams_from_features"), ("grouped", "_grams_grouped")):
        real = getattr(local, attr)

        def spy(x: torch.Tensor, w: torch.Tensor, real=real, name=name) -> torch.Tensor:
            taken.append(name)
            return real(x, w)

        monkeypatch.setattr(local, attr, spy)
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(301, d, generator=gen, dtype=torch.float64)
    w = torch.randn(n, 301, generator=gen, dtype=torch.float64)
    expected = torch.einsum("ip,pa,pb->iab", w, x, x)
    got = local.weighted_grams(x, w)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert taken == [path]
    if path == "features":  # the upper triangle, mirrored: exactly symmetric
        assert torch.equal(got, got.transpose(1, 2))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d])
@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_conv_patches_equal_unfold(stride: int, conv: type, bias: bool) -> None:
    """The 1×1 shortcut (strided pixels, no unfold) gives unfold's patches."""
    from splitgrow.splitting import neurons

    module = conv(3, 4, 1, stride=stride, bias=bias)
    x = torch.randn(2, 3, *([5, 7] if conv is nn.Conv2d else [9]))
    op = neurons.handler(module).operator(module, x)
    got = None if op is None else op.dense()
    x2 = x if conv is nn.Conv2d else x.unsqueeze(-1)
    k = (1, 1)
    ref = F.unfold(x2, kernel_size=k, stride=(stride, stride) if conv is nn.Conv2d else (stride, 1))
    ref = ref.transpose(1, 2)
    if bias:
        ref = torch.cat([ref, torch.ones(*ref.shape[:-1], 1)], dim=-1)
    assert got is not None and torch.equal(got, ref)
    y = module(x)
    assert got.shape[1] == y[0, 0].numel()  # one patch per output position


CONV_CASES = [
    (nn.Conv2d, dict(kernel_size=3, padding=1)),
    (nn.Conv2d, dict(kernel_size=(3, 2), stride=2, dilation=(1, 2), padding=(1, 0), bias=False)),
    (nn.Conv2d, dict(kernel_size=1, stride=2)),
    (nn.Conv1d, dict(kernel_size=5, stride=2, padding=2, dilation=2)),
    (nn.Conv1d, dict(kernel_size=1, bias=False)),
    (nn.Conv2d, dict(kernel_size=2, padding="valid")),
]


@pytest.mark.parametrize(("conv", "kwargs"), CONV_CASES)
def test_patch_operator_equals_its_dense_patches(conv: type, kwargs: dict) -> None:
    """A convolution's patch operator computes X̃u (a convolution with u as filters) and X̃ᵀy
    (its filter gradient) as the unfolded patches do, and the patches rebuild the output."""
    from splitgrow.splitting import neurons

    gen = torch.Generator().manual_seed(0)
    module = conv(3, 4, **kwargs).double()
    x = torch.randn(2, 3, *([7, 6] if conv is nn.Conv2d else [11]), generator=gen).double()
    h = neurons.handler(module)
    op = h.operator(module, x)
    assert op is not None
    dense = op.dense()  # (B, P, d)
    th = neurons.theta(module)
    assert dense.shape[-1] == op.d == th.shape[1]
    # the patches give the layer's output: y_{b,i,p} = θ_i·x̃_{b,p}
    ref_y = h.to_bnp(module, module(x))
    torch.testing.assert_close(op.times(th.t()), ref_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((dense @ th.t()).transpose(1, 2), ref_y, rtol=1e-12, atol=1e-12)
    u = torch.randn(op.d, 5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(op.times(u), (dense @ u).transpose(1, 2), rtol=1e-12, atol=1e-12)
    y = torch.randn(x.shape[0], 5, dense.shape[1], generator=gen, dtype=torch.float64)
    flat = dense.reshape(-1, op.d)
    expected = flat.t() @ y.transpose(1, 2).reshape(-1, 5)
    torch.testing.assert_close(op.t_times(y), expected, rtol=1e-12, atol=1e-12)


def test_linear_patch_operator_on_sequences() -> None:
    from splitgrow.splitting import neurons

    gen = torch.Generator().manual_seed(0)
    module = nn.Linear(6, 4).double()
    x = torch.randn(3, 5, 6, generator=gen, dtype=torch.float64)  # (B, T, F): positions T
    h = neurons.handler(module)
    op = h.operator(module, x)
    assert op is not None
    torch.testing.assert_close(
        op.times(neurons.theta(module).t()), h.to_bnp(module, module(x)), rtol=1e-12, atol=1e-12
    )
    y = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64)
    expected = torch.einsum("bpd,bkp->dk", op.dense(), y)
    torch.testing.assert_close(op.t_times(y), expected, rtol=1e-12, atol=1e-12)


class _KinkNet(nn.Module):
    """Integer weights and inputs: the second activation's inputs hit its kinks exactly."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.f0, self.f1, self.f2 = nn.Linear(2, 3), nn.Linear(3, 3), nn.Linear(3, 3)
        self.a0, self.act = nn.ReLU(), act
        with torch.no_grad():
            self.f0.weight.copy_(torch.tensor([[1.0, 1], [2, 1], [1, 0]]))
            self.f0.bias.fill_(0.0)
            self.f1.weight.copy_(torch.tensor([[1.0, 1, 0], [0, 1, 1], [1, 0, 1]]))
            self.f1.bias.fill_(-1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f2(torch.tanh(self.act(self.f1(self.a0(self.f0(x))))))


@pytest.mark.parametrize(
    "act",
    [nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.1), nn.Hardtanh(0.0, 6.0), nn.Hardtanh(-1.0, 2.0)],
    ids=["relu", "relu6", "leaky", "hardtanh-0-6", "hardtanh--1-2"],
)
def test_gradients_at_exact_kinks_follow_the_surrogate_convention(act: nn.Module) -> None:
    """Activation inputs exactly at a kink (integer data): the splitting matrices of f0 take the
    slope convention of the brute force (right of a kink only past it), which PyTorch's own
    hardtanh/ReLU6 backward does not follow at the upper kink."""
    torch.manual_seed(0)
    model = _KinkNet(act).double().eval()
    x = torch.tensor([[1.0, 1], [2, 0], [0, 0], [3, 1], [1, -1], [1, 3]]).double()
    with torch.no_grad():
        pre = {float(v) for v in model.f1(model.a0(model.f0(x))).flatten()}
    if isinstance(act, nn.Hardtanh):  # ReLU6 too
        assert {act.min_val, act.max_val} <= pre
    else:
        assert 0.0 in pre
    data = [(x, torch.tensor([0, 1, 2, 0, 1, 2]))]
    ref = torch.linalg.eigvalsh(blocks(split_hessian(model, "f0", loss_fn, data, beta=3.0)))
    got = splitgrow.splitting_eigen(model, loss_fn, data, layers=["f0"], surrogate_beta=3.0)["f0"]
    scale = float(ref.abs().max())
    assert float((got.values - ref[:, 0]).abs().max()) <= 1e-9 * scale


@pytest.mark.parametrize("which", ["min", "max", "both"])
def test_exact_eigenpairs_in_groups_of_neurons(which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Neurons go through eigh in groups (bounded memory on wide layers); any grouping gives the
    same pairs, each the extreme eigenpair of its own matrix."""
    from splitgrow.splitting import solvers

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, 5, generator=gen, dtype=torch.float64)
    whole = solvers.extreme_eigenpairs(a, which)
    monkeypatch.setattr(solvers, "EIGH_GROUP_ELEMENTS", 2 * 25)  # groups of 2, one of 1
    grouped = solvers.extreme_eigenpairs(a, which)
    assert whole.keys() == grouped.keys() == ({"min", "max"} if which == "both" else {which})
    sym = 0.5 * (a + a.transpose(1, 2))
    for end, (values, vectors) in grouped.items():
        assert torch.equal(values, whole[end][0]) and torch.equal(vectors, whole[end][1])
        ref = torch.linalg.eigvalsh(sym)[:, 0 if end == "min" else -1]
        assert torch.allclose(values, ref, atol=1e-12)
        residual = sym @ vectors[:, :, None] - values[:, None, None] * vectors[:, :, None]
        assert residual.abs().max() < 1e-12


class _Prefix(torch.nn.Module):
    """fc1 → a prefix that does not scale its input → activation → fc2."""

    def __init__(self, prefix: str, act: torch.nn.Module) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(5, 4), torch.nn.Linear(4, 3)
        self.drop, self.prefix, self.act = torch.nn.Dropout(0.3), prefix, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.prefix == "dropout":  # a Python branch: the trace holds the one taken
            h = self.drop(h)
        elif self.prefix == "plus":
            h = h + 1.0
        else:
            h = h.contiguous()
        return self.fc2(self.act(h))


@pytest.mark.parametrize("method", ["exact", "fast"])
@pytest.mark.parametrize(
    ("prefix", "act"),
    [("dropout", torch.nn.ReLU()), ("plus", torch.nn.Tanh()), ("identity", torch.nn.ReLU())],
)
def test_closed_form_after_a_prefix_that_does_not_scale(
    prefix: str, act: torch.nn.Module, method: str
) -> None:
    """Dropout (eval), + a constant or an identity between a layer and its activation: ∂z/∂y
    comes back from autograd as an expanded 1, which the closed form then owns and squares."""
    torch.manual_seed(0)
    model = _Prefix(prefix, act).double().eval()
    _, batches = build("mlp")
    res = splitgrow.splitting_eigen(model, loss_fn, batches, method=method, tol=1e-10)
    assert res["fc1"].route == "closed-form"
    ref = torch.linalg.eigvalsh(blocks(split_hessian(model, "fc1", loss_fn, batches, beta=3.0)))
    _close(res["fc1"].values, ref[:, 0], float(ref.abs().max()), 1e-8)
