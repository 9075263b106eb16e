"""The fast route (block subspace iteration on Hessian-vector products) against exact."""

from __future__ import annotations

import pytest
import torch
from _models import REGISTRY, build, loss_fn
from torch import nn

import splitgrow
from splitgrow.splitting import eigen as eigen_module
from splitgrow.splitting import local as local_module
from splitgrow.splitting import neurons
from splitgrow.splitting.local import ChainProblem, ClosedFormProblem, LocalProblem
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
    # the search space stays below d = 73 for c1 (both ends: 4 columns each per block)
    assert fast["c1"].columns <= 73 - 2 * 4
    assert fast["c1"].passes == 1  # iterated on the first pass's statistics, in memory


def test_fast_is_reproducible_with_seed() -> None:
    model, batches = build("mobile_block")
    a = splitgrow.splitting_eigen(model, loss_fn, batches, method="fast", seed=3)
    b = splitgrow.splitting_eigen(model, loss_fn, batches, method="fast", seed=3)
    for layer in a:
        assert torch.equal(a[layer].values, b[layer].values)


def test_auto_picks_by_d(monkeypatch: pytest.MonkeyPatch) -> None:
    model, batches = build("mobile_block")  # c1: chain route, d = 28; c2: closed form, d = 5
    res = splitgrow.splitting_eigen(model, loss_fn, batches, method="auto")
    assert {e.method for e in res.values()} == {"exact"}
    monkeypatch.setattr(eigen_module, "AUTO_MAX_D", 20)
    res = splitgrow.splitting_eigen(model, loss_fn, batches, method="auto")
    assert res["c1"].method == "fast" and res["c2"].method == "exact"
    assert res["c1"].passes == 1 and res["c1"].columns < 28  # in memory, before all of R^28


def test_auto_iterates_in_memory_above_its_d(monkeypatch: pytest.MonkeyPatch) -> None:
    """Closed-form and chain layers above AUTO_MAX_D_IN_MEMORY take the fast route in memory;
    when their statistics do not fit, they are computed exactly after all, in a second pass."""
    model, batches = build("mobile_block")  # c1: chain, d = 28; c2: closed form, d = 5
    exact = splitgrow.splitting_eigen(model, loss_fn, batches)
    monkeypatch.setattr(eigen_module, "AUTO_MAX_D_IN_MEMORY", 16)
    res = splitgrow.splitting_eigen(model, loss_fn, batches, method="auto")
    assert res["c1"].route == "chain" and res["c1"].method == "fast" and res["c1"].passes == 1
    assert res["c1"].columns < 28
    assert _agreement(res["c1"].values, exact["c1"].values) >= 0.95
    assert res["c2"].method == "exact"
    res = splitgrow.splitting_eigen(model, loss_fn, batches, method="auto", cache=False)
    assert {e.method for e in res.values()} == {"exact"}  # without memory: as before
    monkeypatch.setattr(eigen_module, "CACHE_MAX_BYTES", 1000)
    res = splitgrow.splitting_eigen(model, loss_fn, batches, method="auto")
    assert res["c1"].method == "exact" and res["c1"].passes == 2
    assert res["c2"].method == "exact" and res["c2"].passes == 1
    for layer, e in exact.items():
        assert torch.allclose(res[layer].values, e.values, rtol=0, atol=1e-12)


def test_auto_thresholds_depend_on_the_device() -> None:
    """On a GPU (measured on an H200) the closed-form and chain routes stay exact up to a larger
    d than on the CPU when the fast route could iterate in memory, and go fast above it even
    when it could not (there a data pass per block still beats d³ decompositions)."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # device objects: nothing runs there
    pick = eigen_module._pick_method
    small = eigen_module.AUTO_MAX_D_IN_MEMORY + 1
    assert small <= eigen_module.AUTO_MAX_D_ACCELERATOR
    assert pick("auto", 32, small, torch.float32, "chain", True, cpu) == "fast"
    assert pick("auto", 32, small, torch.float32, "chain", True, gpu) == "exact"
    wide = eigen_module.AUTO_MAX_D_ACCELERATOR + 1
    assert wide <= eigen_module.AUTO_MAX_D
    for in_memory in (True, False):
        assert pick("auto", 32, wide, torch.float32, "closed-form", in_memory, gpu) == "fast"
    assert pick("auto", 32, wide, torch.float32, "closed-form", False, cpu) == "exact"
    assert pick("auto", 32, 10, torch.float32, "general", False, gpu) == "exact"
    assert pick("fast", 32, small, torch.float32, "chain", True, gpu) == "fast"


def test_auto_takes_the_fast_route_for_wide_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the general route exact costs d Hessian-vector products: fast above a smaller d."""
    model, batches = build("functional")  # c3: x·sigmoid(x), the general route, d = 5
    res = splitgrow.splitting_eigen(model, loss_fn, batches, method="auto")
    assert res["c3"].route == "general" and res["c3"].method == "exact"
    monkeypatch.setattr(eigen_module, "AUTO_MAX_D_GENERAL", 4)
    res = splitgrow.splitting_eigen(model, loss_fn, batches, method="auto")
    assert res["c3"].method == "fast"
    assert {e.method for k, e in res.items() if k != "c3"} == {"exact"}


def _known_spectrum(
    n: int, d: int, gen: torch.Generator, low: float, high: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random symmetric ``d × d`` matrices (float64) with eigenvalues spread over [−1, 1]
    except the smallest, ``low``, and, if given, the largest, ``high``: their eigenvectors
    ``(n, d, d)`` (column 0 for ``low``) and the matrices."""
    q, _ = torch.linalg.qr(torch.randn(n, d, d, generator=gen, dtype=torch.float64))
    spectrum = torch.linspace(-1, 1, d, dtype=torch.float64).repeat(n, 1)
    spectrum[:, 0] = low
    if high is not None:
        spectrum[:, -1] = high
    return q, q @ torch.diag_embed(spectrum) @ q.transpose(1, 2)


@pytest.mark.parametrize("block", [1, 2])
def test_both_ends_converge_with_small_blocks(block: int) -> None:
    """which="both" grows the space at both ends, not only the minimum."""
    gen = torch.Generator().manual_seed(0)
    d, n = 60, 3
    _, s = _known_spectrum(n, d, gen, -3.0, 3.0)  # isolated ends
    solver = BlockSubspace(n, d, "both", block, 1e-6, gen, torch.device("cpu"))
    passes = 0
    while not solver.converged:
        solver.update(s @ solver.pending)
        passes += 1
    out = solver.result()
    assert torch.allclose(out["min"][0], torch.full((n,), -3.0, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(out["max"][0], torch.full((n,), 3.0, dtype=torch.float64), atol=1e-6)
    assert passes * max(block, 2) < d  # converged before the space became all of R^d


def test_float32_storage_holds_half_and_finds_the_same_pairs() -> None:
    """The search space kept in float32 (as for a float32 model's products): the same extreme
    pairs as the float64 solver to float32's rounding, in as many steps, in half the memory."""
    gen = torch.Generator().manual_seed(0)
    d, n = 60, 4
    _, s = _known_spectrum(n, d, gen, -3.0, 3.0)
    out, steps, solvers = {}, {}, {}
    for dtype in (torch.float64, torch.float32):
        solver = BlockSubspace(
            n, d, "both", 2, 1e-4, torch.Generator().manual_seed(1), torch.device("cpu"), dtype
        )
        steps[dtype] = 0
        while not solver.converged:
            solver.update((s @ solver.pending).to(dtype))  # products in the model's dtype
            steps[dtype] += 1
        out[dtype], solvers[dtype] = solver.result(), solver
    assert steps[torch.float32] == steps[torch.float64] < d // 2
    for end, value in (("min", -3.0), ("max", 3.0)):
        values, vectors = out[torch.float32][end]
        assert values.dtype == vectors.dtype == torch.float64
        assert torch.allclose(values, torch.full((n,), value, dtype=torch.float64), atol=1e-4)
        assert torch.allclose(values, out[torch.float64][end][0], atol=1e-5)
        assert torch.allclose(vectors, out[torch.float64][end][1], atol=1e-4)
    f32, f64 = solvers[torch.float32], solvers[torch.float64]
    for name in ("_rows", "_image_rows"):  # both large buffers, in half the bytes
        kept32, kept64 = getattr(f32, name), getattr(f64, name)
        assert kept32.dtype == torch.float32 and kept64.dtype == torch.float64
        assert kept32.shape == kept64.shape and 2 * kept32.nbytes == kept64.nbytes


def test_splitting_eigen_keeps_a_float32_models_search_space_in_float32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``splitting_eigen`` gives the fast route's solvers the model's dtype (float64 stays
    float64, which the brute-force tests here check)."""
    seen: list[torch.dtype] = []
    original = eigen_module.BlockSubspace

    def spy(*args: object, **kwargs: object) -> BlockSubspace:
        solver = original(*args, **kwargs)  # type: ignore[arg-type]
        seen.append(solver.dtype)
        return solver

    monkeypatch.setattr(eigen_module, "BlockSubspace", spy)
    for dtype in (torch.float32, torch.float64):
        model, batches = build("mobile_block")
        model = model.to(dtype)
        batches = [(x.to(dtype), y) for x, y in batches]
        seen.clear()
        splitgrow.splitting_eigen(model, loss_fn, batches, method="fast")
        assert seen and set(seen) == {dtype}


def test_fast_with_a_one_shot_generator_and_a_dataloader() -> None:
    """Several passes over data given as a generator (kept) or a DataLoader (re-iterated)."""
    model, batches = build("mobile_block")
    ref = splitgrow.splitting_eigen(model, loss_fn, batches, method="fast", cache=False)
    gen = splitgrow.splitting_eigen(
        model, loss_fn, (b for b in batches), method="fast", cache=False
    )
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    dl = splitgrow.splitting_eigen(model, loss_fn, loader, method="fast", cache=False)
    for layer, e in ref.items():
        assert e.passes > 1
        assert torch.allclose(gen[layer].values, e.values, rtol=0, atol=1e-12)
        assert torch.allclose(dl[layer].values, e.values, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_iterating_in_memory_equals_data_passes(name: str) -> None:
    """The statistics kept from the first pass give the same products as passes over the data:
    the same eigenpairs after the same number of blocks, with one pass instead of many."""
    model, batches = build(name)
    kw = {"method": "fast", "which": "both", "block": 2, "tol": 1e-6}
    passes = splitgrow.splitting_eigen(model, loss_fn, batches, cache=False, **kw)
    memory = splitgrow.splitting_eigen(model, loss_fn, batches, cache=True, **kw)
    default = splitgrow.splitting_eigen(model, loss_fn, batches, **kw)
    for layer, p in passes.items():
        m = memory[layer]
        assert m.columns == p.columns, layer
        assert torch.allclose(m.values, p.values, rtol=0, atol=1e-10), layer
        assert torch.allclose(m.max_values, p.max_values, rtol=0, atol=1e-10), layer
        assert torch.allclose(m.vectors, p.vectors, rtol=0, atol=1e-7), layer
        assert torch.equal(default[layer].values, m.values), layer  # small: kept by default
        if m.route == "general":  # never kept: data passes, only as many as it needs
            assert 1 < m.passes <= p.passes, layer
        else:
            assert m.passes == 1, layer


@pytest.mark.parametrize("start_min_d", [256, 8])
def test_the_cache_limit_falls_back_to_data_passes(
    monkeypatch: pytest.MonkeyPatch, start_min_d: int
) -> None:
    """Also for a layer whose first block waited for the projected start (``start_min_d`` 8:
    mobile_block's c1): its random block then comes from the next data pass."""
    monkeypatch.setattr(eigen_module, "SUBSPACE_START_MIN_D", start_min_d)
    model, batches = build("mobile_block")
    kw = {"method": "fast", "block": 2, "tol": 1e-8}
    memory = splitgrow.splitting_eigen(model, loss_fn, batches, cache=True, **kw)
    monkeypatch.setattr(eigen_module, "CACHE_MAX_BYTES", 1000)  # less than one batch keeps
    limited = splitgrow.splitting_eigen(model, loss_fn, batches, **kw)
    for layer, m in memory.items():
        assert m.passes == 1
        assert limited[layer].passes > 1
        assert torch.allclose(limited[layer].values, m.values, rtol=0, atol=1e-10)


@pytest.mark.parametrize("slice_elements", [1 << 20, 1])
def test_products_on_kept_statistics_equal_the_exact_matrices(
    monkeypatch: pytest.MonkeyPatch, slice_elements: int
) -> None:
    """Every local problem's S·V (fast route) against its explicit matrices (exact route), on
    the same batch: mobile_block holds a chain layer and a closed-form one, cnn1d closed-form
    layers with a max pool after the activation, mlp closed-form layers. The chain route's
    products run in slices of samples: the whole batch at once, or one sample per slice."""
    monkeypatch.setattr(local_module, "_HVP_SLICE_ELEMENTS", slice_elements)
    kept: list[dict[str, LocalProblem]] = []
    original = eigen_module._iterate_in_memory

    def capture(problems, *args, **kwargs):  # type: ignore[no-untyped-def]
        kept.extend(p for p, _ in problems)
        return original(problems, *args, **kwargs)

    monkeypatch.setattr(eigen_module, "_iterate_in_memory", capture)
    gen = torch.Generator().manual_seed(0)
    kinds = set()
    for name in ("mobile_block", "cnn1d", "mlp"):
        model, batches = build(name)
        kept.clear()
        splitgrow.splitting_eigen(model, loss_fn, batches, method="fast", cache=True)
        assert kept
        for problems in kept:
            for layer, problem in problems.items():
                kinds.add(type(problem).__name__)
                s = problem.matrices()
                n, d, _ = s.shape
                v = torch.randn(n, d, 3, generator=gen, dtype=torch.float64)
                expected = s @ v
                for _ in range(2):  # the second product reuses what the first computed
                    got = problem.hvp(v)
                    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12), (name, layer)
                # the projected problem uᵀSu, and X̃ᵀX̃u from the shared input patches
                u = torch.linalg.qr(torch.randn(d, 4, generator=gen, dtype=torch.float64))[0]
                ref = u.t() @ s @ u
                assert torch.allclose(problem.projected(u), ref, rtol=1e-9, atol=1e-12)
                gram_u = problem.inputs_gram_times(u)
                if isinstance(problem, ClosedFormProblem):
                    x = problem.x.dense().reshape(-1, d)
                else:
                    assert isinstance(problem, ChainProblem)
                    op = neurons.handler(problem.module).operator(problem.module, problem.x)
                    assert op is not None
                    x = op.dense().reshape(-1, d)
                assert gram_u is not None
                assert torch.allclose(gram_u, x.t() @ x @ u, rtol=1e-9, atol=1e-12)
                # the cache's size counts what the problem holds, patches and slices included
                held = [problem.x.x, problem.w] if isinstance(problem, ClosedFormProblem) else []
                if isinstance(problem, ChainProblem):
                    assert problem._state is not None  # the products above computed it
                    held = [problem.x, *problem._state[0].weights]
                    if name == "mobile_block" and layer == "c1":
                        # c1 → b1 → a1 → dw → b2 → a2: the products read a1's tangent scale
                        # (dw mixes positions) and no primal value; nothing else is kept
                        for part in problem._state:
                            assert [str(a.target) for a in part.scales] == ["a1"]
                            assert part.primal == {}
                            targets = {str(a.target) for a in part.pointwise}
                            assert targets == {"b1", "a1", "b2", "a2"}
                nbytes = {
                    t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held
                }
                assert eigen_module._footprint(problem, set()) >= sum(nbytes.values()) > 0
    assert {"ChainProblem", "ClosedFormProblem"} <= kinds


def test_bad_cache_argument() -> None:
    model, batches = build("mlp")
    with pytest.raises(TypeError, match="cache must be True, False or None"):
        splitgrow.splitting_eigen(model, loss_fn, batches, method="fast", cache="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("block", [1, 3])
def test_the_projected_matrix_is_kept_equal_to_the_spaces(block: int) -> None:
    """The solver extends qᵢᵀSqⱼ by its new rows and columns at each update (its buffers growing
    a few rows at a time): it equals the projection recomputed from the whole space, and the
    residuals are those of the Ritz pairs."""
    gen = torch.Generator().manual_seed(0)
    n, d = 4, 30
    a = torch.randn(n, d, d, generator=gen, dtype=torch.float64)
    s = a + a.transpose(1, 2)
    solver = BlockSubspace(n, d, "both", block, 1e-12, gen, torch.device("cpu"))
    for _ in range(5):
        solver.update(s @ solver.pending)
        q = solver.basis
        size = solver.size
        eye = torch.eye(size, dtype=torch.float64).expand(n, -1, -1)
        assert torch.allclose(q.transpose(1, 2) @ q, eye, atol=1e-12)
        full = q.transpose(1, 2) @ s @ q
        assert torch.allclose(solver._projected[:, :size, :size], full, atol=1e-12)
        norms = []
        for values, vectors in solver.result().values():  # both ends, each relative to its own
            res = (s @ vectors[:, :, None])[:, :, 0] - values[:, None] * vectors
            norms.append(res.norm(dim=1) / values.abs().max())
        expected = torch.stack(norms).max(dim=0).values
        assert torch.allclose(solver.residual, expected, rtol=1e-8, atol=1e-12)
    assert solver.size == 5 * max(block, 2)


def test_a_start_from_the_right_subspace_converges_at_once() -> None:
    """Ritz vectors of the problem projected on a subspace holding the wanted eigenvectors are
    those eigenvectors: one block of products confirms them."""
    gen = torch.Generator().manual_seed(0)
    n, d = 3, 40
    q, s = _known_spectrum(n, d, gen, -2.0)
    solver = BlockSubspace(n, d, "min", 1, 1e-8, gen, torch.device("cpu"))
    solver.update(s @ solver.pending)  # a random first column, as the first data pass gives
    # a shared 6-dimensional subspace holding every neuron's eigenvector of λ = −2
    u = torch.linalg.qr(
        torch.cat([q[:, :, 0].t(), torch.randn(d, 3, generator=gen, dtype=torch.float64)], 1)
    )[0]
    solver.start_from(u, u.t() @ s @ u)
    solver.update(s @ solver.pending)
    assert solver.converged and solver.size == 2
    values, vectors = solver.result()["min"]
    assert torch.allclose(values, torch.full((n,), -2.0, dtype=torch.float64), atol=1e-10)
    assert torch.allclose((vectors * q[:, :, 0]).sum(1).abs(), torch.ones(n, dtype=torch.float64))


def test_wide_layers_start_from_the_projected_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    """The projected start (here lowered to d >= 8, 6 directions) runs on the closed-form and
    chain routes, before any product (the first data pass computes no random block for these
    layers), and the eigenpairs still agree with exact."""
    monkeypatch.setattr(eigen_module, "SUBSPACE_START_MIN_D", 8)
    monkeypatch.setattr(eigen_module, "SUBSPACE_START_COLUMNS", 6)
    started: list[int] = []
    # (what, solver): holding the solver keeps it alive, so no later one takes its id
    events: list[tuple[str, BlockSubspace]] = []
    original, update = BlockSubspace.start_from, BlockSubspace.update

    def spy(self: BlockSubspace, u: torch.Tensor, projected: torch.Tensor) -> None:
        started.append(self.d)
        events.append(("start", self))
        assert self.size == 0, "a product came before the projected start"
        original(self, u, projected)

    def spy_update(self: BlockSubspace, images: torch.Tensor) -> None:
        events.append(("update", self))
        update(self, images)

    monkeypatch.setattr(BlockSubspace, "start_from", spy)
    monkeypatch.setattr(BlockSubspace, "update", spy_update)
    for name in ("mobile_block", "cnn1d"):
        model, batches = build(name)
        exact = splitgrow.splitting_eigen(model, loss_fn, batches, which="both")
        fast = splitgrow.splitting_eigen(model, loss_fn, batches, which="both", method="fast")
        for layer, e in exact.items():
            assert _agreement(fast[layer].values, e.values) >= 0.95, (name, layer)
            assert _agreement(fast[layer].max_values, e.max_values) >= 0.95, (name, layer)
    assert started == [28, 10, 13]  # mobile_block's chain layer c1, cnn1d's closed-form ones
    for solver in {id(s): s for what, s in events if what == "start"}.values():
        mine = [what for what, s in events if s is solver]
        assert mine[0] == "start" and "update" in mine


def test_kept_statistics_hold_no_autograd_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PReLU's slope requires grad; the weights w of its closed form must not carry a graph
    (every kept product would otherwise build one)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.PReLU(5, init=0.2), nn.Linear(5, 3)).double()
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 4, generator=gen, dtype=torch.float64), torch.arange(8) % 3)]
    kept: list[LocalProblem] = []
    original = eigen_module._iterate_in_memory

    def capture(problems, *args, **kwargs):  # type: ignore[no-untyped-def]
        kept.extend(p for batch, _ in problems for p in batch.values())
        return original(problems, *args, **kwargs)

    monkeypatch.setattr(eigen_module, "_iterate_in_memory", capture)
    splitgrow.splitting_eigen(model, loss_fn, batches, method="fast", cache=True)
    assert kept and all(isinstance(p, ClosedFormProblem) for p in kept)
    assert not any(p.w.requires_grad for p in kept if isinstance(p, ClosedFormProblem))


@pytest.mark.parametrize("name", ["mobile_block", "cnn1d", "functional"])
def test_micro_batches_give_the_same_eigenpairs(name: str) -> None:
    """Slices of 1 and 3 samples (batches of 4, 4, 3): the same statistics, summed per sample,
    on every route, exact and fast (in memory and with data passes)."""
    model, batches = build(name)
    for kw in ({}, {"method": "fast"}, {"method": "fast", "cache": False}):
        whole = splitgrow.splitting_eigen(model, loss_fn, batches, **kw)  # type: ignore[arg-type]
        for micro in (1, 3):
            part = splitgrow.splitting_eigen(model, loss_fn, batches, micro_batch=micro, **kw)  # type: ignore[arg-type]
            for layer, e in whole.items():
                assert part[layer].samples == e.samples
                scale = float(e.values.abs().max())
                if kw:  # the fast route: within its tolerance of the same exact answer
                    assert _agreement(part[layer].values, e.values) >= 0.95, (name, layer, micro)
                else:
                    assert torch.allclose(part[layer].values, e.values, rtol=0, atol=1e-10 * scale)


def test_micro_batch_errors() -> None:
    model, batches = build("mlp")
    with pytest.raises(ValueError, match="micro_batch must be a positive integer"):
        splitgrow.splitting_eigen(model, loss_fn, batches, micro_batch=0)
    with pytest.raises(ValueError, match="micro_batch needs batchnorm='running'"):
        splitgrow.splitting_eigen(model, loss_fn, batches, micro_batch=2, batchnorm="batch")
    x, _ = batches[0]
    with pytest.raises(ValueError, match="batch 0: micro_batch needs a target tensor"):
        splitgrow.splitting_eigen(model, lambda out, t: out.sum() * 0, [(x, None)], micro_batch=2)


def test_wide_batches_in_slices_give_the_same_eigenpairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wide layer's curvature weights σ''·g·c² and its closed-form products S·v are computed in
    slices of the batch. With slices of a few elements, every registry model's eigenpairs, exact
    and fast, are the unsliced ones to rounding (a vectorised sigmoid may round a slice's last
    elements otherwise, and the products are summed slice by slice)."""
    from splitgrow.splitting import activations

    kw = {"which": "both", "tol": 1e-10}
    want = {}
    for name in REGISTRY:
        model, batches = build(name)
        for method in ("exact", "fast"):
            want[name, method] = splitgrow.splitting_eigen(
                model, loss_fn, batches, method=method, **kw
            )
    sliced = {"weights": 0, "samples": 0}
    curvature = activations.softplus_second_derivative

    def counted(z: torch.Tensor, beta: float, shift: float = 0.0) -> torch.Tensor:
        sliced["weights"] += z.numel() <= 5
        return curvature(z, beta, shift)

    for cls in (neurons.ConvPatches, neurons.DensePatches):
        original = cls.samples

        def samples(self, start, stop, original=original):  # type: ignore[no-untyped-def]
            sliced["samples"] += 1
            return original(self, start, stop)

        monkeypatch.setattr(cls, "samples", samples)
    monkeypatch.setattr(activations, "SLICE_ELEMENTS", 5)
    monkeypatch.setattr("splitgrow.splitting.executor.softplus_second_derivative", counted)
    monkeypatch.setattr(local_module, "_HVP_SLICE_ELEMENTS", 7)
    for (name, method), w in want.items():
        model, batches = build(name)
        got = splitgrow.splitting_eigen(model, loss_fn, batches, method=method, **kw)
        for layer, e in w.items():
            g = got[layer]
            scale = float(e.values.abs().max()) + 1e-12
            tight = 1e-12 if method == "exact" else 1e-8
            assert torch.allclose(g.values, e.values, rtol=0, atol=tight * scale), (name, layer)
            if method == "exact":  # the same eigenvectors, up to sign
                assert torch.all((g.vectors * e.vectors).sum(-1).abs() > 1 - 1e-9), (name, layer)
    assert sliced["weights"] > 0 and sliced["samples"] > 0  # both sliced paths ran


def test_splitting_runs_in_full_float32_and_restores_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    """TF32 (PyTorch's default for cuDNN convolutions) is off inside the call, on as before after
    it, also when the call fails."""
    seen = []
    data_pass = eigen_module._data_pass

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return data_pass(*args, **kwargs)

    monkeypatch.setattr(eigen_module, "_data_pass", recording)
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        model, batches = build("cnn1d")
        splitgrow.splitting_eigen(model, loss_fn, batches, method="fast")
        assert seen and all(flags == (False, False) for flags in seen)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        nan = [(batches[0][0] * float("nan"), batches[0][1])]
        with pytest.raises(ValueError, match="NaN or infinite"):
            splitgrow.splitting_eigen(model, loss_fn, nan)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_a_late_start_never_grows_the_space_beyond_r_d() -> None:
    """start_from after products, with fewer columns left than it would add: the space stops at
    d, where the solver is exact."""
    gen = torch.Generator().manual_seed(0)
    n, d = 3, 7
    a = torch.randn(n, d, d, generator=gen, dtype=torch.float64)
    s = a + a.transpose(1, 2)
    solver = BlockSubspace(n, d, "both", 3, 1e-14, gen, torch.device("cpu"))
    solver.update(s @ solver.pending)
    solver.update(s @ solver.pending)  # 6 of 7 columns
    u = torch.linalg.qr(torch.randn(d, 5, generator=gen, dtype=torch.float64))[0]
    solver.start_from(u, u.t() @ s @ u)  # the wanted ends of 5 columns: 3, with room for 1
    solver.update(s @ solver.pending)
    assert solver.size == d and solver.converged
    values, _ = solver.result()["min"]
    assert torch.allclose(values, torch.linalg.eigvalsh(s)[:, 0], atol=1e-10)
