"""The gradmax strategy: function-preserving ± pairs, scores against per-sample sums and autograd,
liveness under ReLU, faster training than random new neurons, option checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _growmodels import all_candidates, context, digits_subset, mlp, model_and_data, train
from torch import nn

from splitgrow.strategies.base import STRATEGIES, strategy_for
from splitgrow.strategies.gradmax import GradMax
from splitgrow.surgery.fresh import NewNeurons, add_fresh_neurons, add_neurons


def test_registered() -> None:
    s = strategy_for("gradmax")
    assert isinstance(s, GradMax) and s.kind == "new" and not s.distributed
    assert "gradmax" in STRATEGIES


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "relu"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_function_unchanged_at_insertion(kind: str, act: str) -> None:
    model, batches = model_and_data(kind, act)
    ctx = context(model, batches)
    cands, chosen = all_candidates(GradMax(), ctx)
    assert cands.scores and all(bool((v < 0).all()) for v in cands.scores.values())
    plan = GradMax().plan(ctx, cands, chosen)
    assert not plan.split and set(plan.new) == set(cands.scores)
    grown, _, _ = add_neurons(model, plan.new, generator=torch.Generator().manual_seed(1))
    model.eval()
    grown.eval()
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        assert float((grown(x) - model(x)).abs().max()) <= 1e-10
    for spec in plan.new.values():  # the new columns are really there (±c, non-zero)
        assert spec.count % 2 == 0 and spec.count >= 2
        cols = next(iter(spec.outgoing.values()))
        assert float(cols.abs().max()) > 0


def test_mixed_hessian_and_scores_match_a_per_sample_sum() -> None:
    """M = (1/N) Σ_s σ'(b)·g_s x̃_sᵀ for a Linear consumer that is the output layer."""
    model, batches = model_and_data("mlp", "tanh")
    bias, scale = 0.7, 1.3
    ctx = context(model, batches, {"bias": bias, "scale": scale})
    cands = GradMax().candidates(ctx)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    n = len(y)
    ref = torch.zeros(3, 7, dtype=torch.float64)
    for s in range(n):  # unit "2" (Linear 6→6), consumer "4" (the output layer)
        h = torch.tanh(model[0](x[s : s + 1]))  # the unit's input
        out = model(x[s : s + 1]).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(out, y[s : s + 1]), out)
        slope = 1 - torch.tanh(torch.tensor(bias, dtype=torch.float64)) ** 2
        xt = torch.cat([h[0], torch.ones(1, dtype=torch.float64)])
        ref += slope * torch.outer(g[0], xt) / n
    sv = torch.linalg.svdvals(ref)
    r = scale * float(model[4].weight.detach().norm(dim=0).mean())
    state = cands.state["2"]
    pairs = state.columns.shape[0]
    torch.testing.assert_close(state.singular, sv[:pairs], rtol=1e-10, atol=1e-14)
    expected = (-(r**2) * sv[:pairs] ** 2).repeat_interleave(2)
    torch.testing.assert_close(cands.scores["2"], expected, rtol=1e-10, atol=1e-16)
    u = torch.linalg.svd(ref)[0][:, 0]  # the best pair's columns: ± r·u₁
    c = state.columns[0].reshape(-1)
    torch.testing.assert_close(c.abs(), r * u.abs(), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_scores_are_the_gradient_norms_of_the_inserted_neurons(kind: str) -> None:
    """End to end: in the grown model, each new neuron's incoming gradient (plain autograd of the
    loss) has squared norm −score, and the two neurons of a pair get opposite gradients."""
    model, batches = model_and_data(kind, "sigmoid")
    ctx = context(model, batches)
    cands, chosen = all_candidates(GradMax(), ctx)
    plan = GradMax().plan(ctx, cands, chosen)
    n_total = sum(len(b[1]) for b in batches)
    for name, spec in plan.new.items():  # one unit at a time
        grown, _, _ = add_neurons(model, {name: spec}, generator=torch.Generator().manual_seed(1))
        grown.eval()
        layer = dict(grown.named_modules())[name]
        loss = sum(F.cross_entropy(grown(x), y) * len(y) / n_total for x, y in batches)
        assert isinstance(loss, torch.Tensor)
        gw, gb = torch.autograd.grad(loss, [layer.weight, layer.bias])
        count = spec.count
        g = torch.cat([gw[-count:].reshape(count, -1), gb[-count:, None]], dim=1)
        torch.testing.assert_close(g[0::2], -g[1::2], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(
            g.pow(2).sum(1), -cands.scores[name][:count], rtol=1e-8, atol=1e-14
        )


def _relu_setup(seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    x, y = digits_subset(seed, 200)
    torch.manual_seed(seed)
    model = mlp("relu", (64, 6, 10))
    train(model, x, y, 30, 0.3)
    return model, x, y


def test_relu_pairs_stay_alive_and_plain_zero_fan_in_stays_dead() -> None:
    model, x, y = _relu_setup(0)
    ctx = context(model, [(x, y)])
    cands, chosen = all_candidates(GradMax(), ctx)
    plan = GradMax().plan(ctx, cands, chosen)
    spec = plan.new["0"]
    k = spec.count
    gen = torch.Generator().manual_seed(0)
    pairs, _, _ = add_neurons(model, {"0": spec}, generator=gen)
    # the same columns on single neurons of zero fan-in (zero weights and bias)
    plain_spec = NewNeurons(k, torch.zeros(k, 65, dtype=torch.float64), dict(spec.outgoing))
    plain, _, _ = add_neurons(model, {"0": plain_spec}, generator=gen)
    with torch.no_grad():
        assert float((plain(x) - model(x)).abs().max()) <= 1e-10
        assert float((pairs(x) - model(x)).abs().max()) <= 1e-10
    for grown, alive in ((pairs, True), (plain, False)):
        train(grown, x, y, 10, 0.3)
        w = grown[0].weight.detach()[-k:]
        with torch.no_grad():
            act = torch.relu(grown[0](x))[:, -k:]
        if alive:
            assert bool((w.abs().sum(1) > 1e-6).all()), "every pair neuron's fan-in moved"
            assert bool((act.abs().sum(0) > 0).all()), "every pair neuron fires on the data"
        else:
            assert float(w.abs().max()) == 0.0 and float(act.abs().max()) == 0.0


@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_trains_faster_than_random_new_neurons(act: str) -> None:
    gm, rnd = [], []
    for seed in range(3):
        x, y = digits_subset(seed, 300)
        torch.manual_seed(seed)
        model = mlp(act, (64, 6, 10))
        train(model, x, y, 40, 0.3)
        ctx = context(model, [(x, y)], seed=seed)
        cands, chosen = all_candidates(GradMax(), ctx)
        plan = GradMax().plan(ctx, cands, {"0": chosen["0"][:4]})  # two pairs in the hidden layer
        assert plan.new["0"].count == 4
        gen = torch.Generator().manual_seed(seed)
        grown, _, _ = add_neurons(model, plan.new, generator=gen)
        fresh, _, _ = add_fresh_neurons(model, {"0": 4}, generator=gen)
        gm.append(train(grown, x, y, 20, 0.3))
        rnd.append(train(fresh, x, y, 20, 0.3))
    mean_gm, mean_rnd = sum(gm) / 3, sum(rnd) / 3
    print(act, "gradmax", gm, "random", rnd)
    assert mean_gm < mean_rnd, (gm, rnd)


def test_unpaired_choice_is_dropped_and_recorded() -> None:
    model, batches = model_and_data("mlp", "tanh")
    ctx = context(model, batches)
    cands = GradMax().candidates(ctx)
    plan = GradMax().plan(ctx, cands, {"0": torch.tensor([0, 1, 2])})
    assert plan.new["0"].count == 2
    assert cands.record["dropped_unpaired"] == {"0": [2]}
    with pytest.raises(ValueError, match="99"):
        GradMax().plan(ctx, cands, {"0": torch.tensor([99])})


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"scale": -1.0}, "scale"),
        ({"scale": 0}, "scale"),
        ({"bias": -0.5}, "bias"),
        ({"bias": float("nan")}, "bias"),
        ({"max_pairs": 0}, "max_pairs"),
        ({"max_pairs": 1.5}, "max_pairs"),
        ({"rank_tol": "x"}, "rank_tol"),
        ({"scael": 1.0}, "scael"),
    ],
)
def test_bad_options_raise_naming_them(options: dict[str, object], named: str) -> None:
    model, batches = model_and_data("mlp", "tanh")
    with pytest.raises(ValueError, match=named):
        GradMax().candidates(context(model, batches, options))


def test_skips_units_it_cannot_probe_and_says_why() -> None:
    class NoBiasReLU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(5, 4, bias=False)
            self.b = nn.Linear(4, 4)
            self.c = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))
            return self.c(torch.relu(self.b(h)))

    model = NoBiasReLU().double()
    _, batches = model_and_data("mlp", "relu")
    cands = GradMax().candidates(context(model, batches))
    assert "a" in cands.record["skipped"] and "a" not in cands.scores
    assert "no gradient" in cands.record["skipped"]["a"]
    assert "b" in cands.scores
