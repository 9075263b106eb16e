"""The firefly strategy: function preserved at insertion (splits then new neurons, as the loop
applies them), scores against autograd and the splitting eigenvalues, faster training than
random new neurons, option checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _growmodels import all_candidates, context, digits_subset, mlp, model_and_data, train

from splitgrow.splitting.eigen import splitting_eigen
from splitgrow.strategies.base import strategy_for
from splitgrow.strategies.firefly import Firefly
from splitgrow.surgery.fresh import NewNeurons, add_fresh_neurons, add_neurons
from splitgrow.surgery.split import signed_split_with_growth

FAST = {"steps": 3, "candidates": 2}


def test_registered() -> None:
    s = strategy_for("firefly")
    assert isinstance(s, Firefly) and s.kind == "new" and not s.distributed


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "relu"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_function_unchanged_at_insertion(kind: str, act: str) -> None:
    model, batches = model_and_data(kind, act)
    ctx = context(model, batches, FAST)
    cands, chosen = all_candidates(Firefly(), ctx)
    plan = Firefly().plan(ctx, cands, chosen)
    assert plan.split and plan.new
    gen = torch.Generator().manual_seed(1)
    split, _ = signed_split_with_growth(model, plan.split, eps=0.0)
    grown, _, _ = add_neurons(split, plan.new, generator=gen)
    model.eval()
    grown.eval()
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        assert float((grown(x) - model(x)).abs().max()) <= 1e-10


def test_eps_columns_in_the_split_model_match_those_in_the_original() -> None:
    """With ``outgoing="eps"`` the new neurons change the function; after the splits (at ε = 0)
    they must change it exactly as they would in the original model."""
    model, batches = model_and_data("mlp", "tanh")
    ctx = context(model, batches, {**FAST, "outgoing": "eps"})
    cands, chosen = all_candidates(Firefly(), ctx)
    plan = Firefly().plan(ctx, cands, chosen)
    news_only = Firefly().plan(
        ctx, cands, {k: v[[cands.state[k].order[int(i)][0] == "new" for i in v]] for k, v in
                     chosen.items()},
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    split, _ = signed_split_with_growth(model, plan.split, eps=0.0)
    a, _, _ = add_neurons(split, plan.new, generator=gen)
    b, _, _ = add_neurons(model, news_only.new, generator=gen)
    x = torch.cat([b_[0] for b_ in batches])
    a.eval()
    b.eval()
    model.eval()
    with torch.no_grad():
        assert float((a(x) - model(x)).abs().max()) > 1e-6
        assert float((a(x) - b(x)).abs().max()) <= 1e-10


def test_scores_match_autograd_and_eigenvalues() -> None:
    model, batches = model_and_data("mlp", "sigmoid")
    eps = 0.2
    ctx = context(model, batches, {**FAST, "eps": eps})
    cands = Firefly().candidates(ctx)
    eig = splitting_eigen(model, F.cross_entropy, batches, method="exact")
    n_total = sum(len(b[1]) for b in batches)
    for name, unit in cands.state.items():
        scores = cands.scores[name]
        assert bool((scores[1:] >= scores[:-1]).all()), "best first"
        layer = dict(model.named_modules())[name]
        theta = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1)
        news = [(p, j) for p, (t, j) in enumerate(unit.order) if t == "new"]
        for p, (t, i) in enumerate(unit.order):
            if t == "split":
                expected = 0.5 * (eps * theta[i].norm()) ** 2 * eig[name].values[i]
                torch.testing.assert_close(scores[p], expected, rtol=1e-8, atol=1e-14)
        consumer = unit.consumer
        cw = dict(model.named_modules())[consumer].weight.detach()
        r = float(cw.norm(dim=0).mean())
        for p, j in news:  # −ε·r·‖∂L/∂c‖ of that neuron alone, by plain autograd
            spec = NewNeurons(1, unit.theta[j : j + 1].clone())
            one, _, _ = add_neurons(model, {name: spec}, generator=torch.Generator())
            one.eval()
            cons = dict(one.named_modules())[consumer]
            loss = sum(F.cross_entropy(one(x), y) * len(y) / n_total for x, y in batches)
            assert isinstance(loss, torch.Tensor)
            (g,) = torch.autograd.grad(loss, cons.weight)
            expected = -eps * r * g[:, -1].norm()
            torch.testing.assert_close(scores[p], expected, rtol=1e-8, atol=1e-14)


def test_optimised_fan_in_beats_its_start() -> None:
    model, batches = model_and_data("mlp", "tanh")
    base = Firefly().candidates(context(model, batches, {"steps": 0, "split": False}))
    tuned = Firefly().candidates(context(model, batches, {"steps": 10, "split": False}))
    for name in base.scores:  # same draw (same seed), then 10 steps: larger gradients
        assert float(tuned.scores[name].sum()) < float(base.scores[name].sum())


def test_trains_faster_than_random_new_neurons() -> None:
    ff, rnd = [], []
    for seed in range(3):
        x, y = digits_subset(seed, 300)
        torch.manual_seed(seed)
        model = mlp("tanh", (64, 6, 10))
        train(model, x, y, 40, 0.3)
        ctx = context(model, [(x, y)], {"split": False, "candidates": 4}, seed=seed)
        cands, chosen = all_candidates(Firefly(), ctx)
        plan = Firefly().plan(ctx, cands, {"0": chosen["0"]})
        assert plan.new["0"].count == 4 and not plan.split
        gen = torch.Generator().manual_seed(seed)
        grown, _, _ = add_neurons(model, plan.new, generator=gen)
        fresh, _, _ = add_fresh_neurons(model, {"0": 4}, generator=gen)
        ff.append(train(grown, x, y, 20, 0.3))
        rnd.append(train(fresh, x, y, 20, 0.3))
    print("firefly", ff, "random", rnd)
    assert sum(ff) / 3 < sum(rnd) / 3, (ff, rnd)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"steps": -1}, "steps"),
        ({"candidates": 1.5}, "candidates"),
        ({"lr": 0}, "lr"),
        ({"eps": -0.1}, "eps"),
        ({"init_scale": float("inf")}, "init_scale"),
        ({"split": "yes"}, "split"),
        ({"outgoing": "half"}, "outgoing"),
        ({"stepz": 3}, "stepz"),
    ],
)
def test_bad_options_raise_naming_them(options: dict[str, object], named: str) -> None:
    model, batches = model_and_data("mlp", "tanh")
    with pytest.raises(ValueError, match=named):
        Firefly().candidates(context(model, batches, options))
