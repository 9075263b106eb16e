"""The gradmax strategy: function-preserving ± pairs, scores against per-sample sums and autograd,
liveness under ReLU, faster training than random new neurons, option checks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _growmodels import (
    ACTS,
    Batches,
    all_candidates,
    context,
    digits_subset,
    mlp,
    model_and_data,
    train,
)
from torch import nn

from splitgrow import data
from splitgrow.cli import main
from splitgrow.graph.analyze import analyze
from splitgrow.strategies.base import STRATEGIES, strategy_for
from splitgrow.strategies.gradmax import GradMax
from splitgrow.strategies.probe import NewNeuronProbe, mixed_hessian
from splitgrow.strategies.s2d import added_parameters
from splitgrow.surgery.fresh import NewNeurons, add_fresh_neurons, add_neurons
from splitgrow.training import GrowConfig, grow


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
    expected = -2 * r**2 * sv[:pairs] ** 2  # a pair: two neurons of gradient norm² r²s²
    torch.testing.assert_close(cands.scores["2"], expected, rtol=1e-10, atol=1e-16)
    u = torch.linalg.svd(ref)[0][:, 0]  # the best pair's columns: ± r·u₁
    c = state.columns[0].reshape(-1)
    torch.testing.assert_close(c.abs(), r * u.abs(), rtol=1e-8, atol=1e-12)


def _assert_pair_gradients(g: torch.Tensor, scores: torch.Tensor) -> None:
    """The new neurons' incoming gradients ``g`` (2·pairs, d): opposite within a pair, and each
    of squared norm half its pair's −score."""
    torch.testing.assert_close(g[0::2], -g[1::2], rtol=1e-10, atol=1e-14)
    expected = -scores.repeat_interleave(2)[: g.shape[0]] / 2
    torch.testing.assert_close(g.pow(2).sum(1), expected, rtol=1e-8, atol=1e-14)


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
        _assert_pair_gradients(g, cands.scores[name])


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
        plan = GradMax().plan(ctx, cands, {"0": chosen["0"][:2]})  # two pairs in the hidden layer
        assert plan.new["0"].count == 4
        gen = torch.Generator().manual_seed(seed)
        grown, _, _ = add_neurons(model, plan.new, generator=gen)
        fresh, _, _ = add_fresh_neurons(model, {"0": 4}, generator=gen)
        gm.append(train(grown, x, y, 20, 0.3))
        rnd.append(train(fresh, x, y, 20, 0.3))
    mean_gm, mean_rnd = sum(gm) / 3, sum(rnd) / 3
    print(act, "gradmax", gm, "random", rnd)
    assert mean_gm < mean_rnd, (gm, rnd)


def test_a_candidate_is_a_pair_charged_as_two_neurons() -> None:
    model, batches = model_and_data("mlp", "tanh")
    ctx = context(model, batches)
    cands = GradMax().candidates(ctx)
    assert cands.size == {k: 2 for k in cands.scores}
    plan = GradMax().plan(ctx, cands, {"0": torch.tensor([0, 2])})
    assert plan.new["0"].count == 4
    out = plan.new["0"].outgoing
    cols = next(iter(out.values()))
    torch.testing.assert_close(cols[:, 0::2], -cols[:, 1::2])  # +c, −c per pair
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


# --- bias-free Conv → BatchNorm → ReLU: b in the new channels' BatchNorm bias ---------------


class BiasFreeCNN(nn.Module):
    """Conv(no bias) → BN → σ → Conv(no bias) → BN → σ → flatten (or average pool) → Linear."""

    def __init__(self, act: str, head: str) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(4)
        self.a1 = ACTS[act]()
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(4)
        self.a2 = ACTS[act]()
        self.head = head
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * 25 if head == "flatten" else 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a2(self.b2(self.c2(self.a1(self.b1(self.c1(x))))))
        return self.fc((h if self.head == "flatten" else self.pool(h)).flatten(1))


def _bias_free(act: str = "relu", head: str = "flatten") -> tuple[nn.Module, Batches]:
    """A trained-looking bias-free CNN (non-trivial BatchNorm affine and running statistics)."""
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = BiasFreeCNN(act, head).double()
    with torch.no_grad():
        for bn in (model.b1, model.b2):
            bn.running_mean.copy_(0.3 * torch.randn(4, generator=gen))
            bn.running_var.copy_(0.5 + torch.rand(4, generator=gen))
            bn.weight.copy_(0.8 + 0.4 * torch.rand(4, generator=gen))
            bn.bias.copy_(0.2 * torch.randn(4, generator=gen))
    x = torch.randn(20, 2, 5, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=gen)
    return model, [(x[:12], y[:12]), (x[12:], y[12:])]


@pytest.mark.parametrize("act", ["relu", "sigmoid"])
@pytest.mark.parametrize("head", ["flatten", "pool"])
def test_bias_free_conv_bn_function_unchanged_in_eval_and_train_mode(act: str, head: str) -> None:
    model, batches = _bias_free(act, head)
    ctx = context(model, batches, {"bias": 0.6})
    cands, chosen = all_candidates(GradMax(), ctx)
    assert cands.record["skipped"] == {}
    assert cands.record["bias_in"] == {"c1": "batchnorm", "c2": "batchnorm"}
    plan = GradMax().plan(ctx, cands, chosen)
    assert set(plan.new) == {"c1", "c2"}  # c1: Conv consumer c2; c2: Linear consumer fc
    grown, _, _ = add_neurons(model, plan.new, generator=torch.Generator().manual_seed(1))
    for name, bn in (("c1", "b1"), ("c2", "b2")):
        k = plan.new[name].count
        assert plan.new[name].chain_bias == 0.6
        assert float(dict(grown.named_modules())[name].weight.detach()[-k:].abs().max()) == 0.0
        new_bn = dict(grown.named_modules())[bn]
        old_bn = dict(model.named_modules())[bn]
        assert bool((new_bn.bias[-k:] == 0.6).all()) and bool((new_bn.weight[-k:] == 1.0).all())
        assert torch.equal(new_bn.bias[:4], old_bn.bias)
    x = torch.cat([b[0] for b in batches])
    model.eval()
    grown.eval()
    with torch.no_grad():
        assert float((grown(x) - model(x)).abs().max()) <= 1e-10
        # train mode: BatchNorm with batch statistics (on copies: it updates running stats)
        m_train, g_train = copy.deepcopy(model).train(), copy.deepcopy(grown).train()
        for batch in batches:
            assert float((g_train(batch[0]) - m_train(batch[0])).abs().max()) <= 1e-10
        assert torch.allclose(g_train.b2.running_mean[:4], m_train.b2.running_mean, atol=1e-12)


def test_bias_free_mixed_hessian_and_scores_match_a_per_sample_sum() -> None:
    """At the operating point (conv output 0, BatchNorm bias b): for unit c2 and its consumer fc
    (the output layer, after a flatten), M[(o, p), j] = (1/N) Σ_s g_s[o]·relu'(b)·x_s[j, p]/√(1+ε),
    x_s the unfolded input patches of c2 (eval-mode BatchNorm: running mean 0, var 1, weight 1)."""
    model, batches = _bias_free("relu", "flatten")
    bias, scale = 0.7, 1.3
    ctx = context(model, batches, {"bias": bias, "scale": scale})
    cands = GradMax().candidates(ctx)
    model.eval()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    n = len(y)
    ref = torch.zeros(3 * 25, 36, dtype=torch.float64)
    with torch.no_grad():
        patches = F.unfold(model.a1(model.b1(model.c1(x))), 3, padding=1)  # (n, 36, 25)
    c_bn = 1.0 / (1.0 + model.b2.eps) ** 0.5
    for s in range(n):
        out = model(x[s : s + 1]).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(out, y[s : s + 1]), out)
        # relu'(b) = 1 for b > 0; column index o·25 + p (the flatten: channel block, position)
        ref += torch.einsum("o,jp->opj", g[0], patches[s]).reshape(75, 36) * c_bn / n
    info = analyze(model).layers["c2"]
    probe = NewNeuronProbe(
        model, info, 1, F.cross_entropy, batches, torch.Generator().manual_seed(0), chain_bias=bias
    )
    m = mixed_hessian(probe, torch.zeros(1, 36, dtype=torch.float64))
    torch.testing.assert_close(m, ref, rtol=1e-10, atol=1e-14)
    sv = torch.linalg.svdvals(ref)
    r = scale * float(model.fc.weight.detach().reshape(3, 4, 25).pow(2).sum((0, 2)).sqrt().mean())
    state = cands.state["c2"]
    pairs = state.columns.shape[0]
    torch.testing.assert_close(state.singular, sv[:pairs], rtol=1e-10, atol=1e-14)
    expected = -2 * r**2 * sv[:pairs] ** 2  # a pair: two neurons of gradient norm² r²s²
    torch.testing.assert_close(cands.scores["c2"], expected, rtol=1e-10, atol=1e-16)
    # without b the bias-free ReLU unit is dead: M = 0
    dead = NewNeuronProbe(model, info, 1, F.cross_entropy, batches, torch.Generator())
    assert float(mixed_hessian(dead, torch.zeros(1, 36, dtype=torch.float64)).abs().max()) == 0.0


@pytest.mark.parametrize("head", ["flatten", "pool"])
def test_bias_free_scores_are_the_gradient_norms_of_the_inserted_neurons(head: str) -> None:
    """Plain autograd in the grown model (eval mode), Conv consumer (c1) and Linear (c2)."""
    model, batches = _bias_free("relu", head)
    ctx = context(model, batches)
    cands, chosen = all_candidates(GradMax(), ctx)
    plan = GradMax().plan(ctx, cands, chosen)
    n_total = sum(len(b[1]) for b in batches)
    assert set(plan.new) == {"c1", "c2"}
    for name, spec in plan.new.items():
        grown, _, _ = add_neurons(model, {name: spec}, generator=torch.Generator().manual_seed(1))
        grown.eval()
        layer = dict(grown.named_modules())[name]
        loss = sum(F.cross_entropy(grown(x), y) * len(y) / n_total for x, y in batches)
        assert isinstance(loss, torch.Tensor)
        (gw,) = torch.autograd.grad(loss, [layer.weight])
        count = spec.count
        g = gw[-count:].reshape(count, -1)
        _assert_pair_gradients(g, cands.scores[name])


def _firing(model: nn.Module, x: torch.Tensor, acts: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Each named activation module's output (train-mode forward, no running-stat update)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        dict(model.named_modules())[a].register_forward_hook(
            lambda _m, _i, out, a=a: seen.__setitem__(a, out.detach())
        )
        for a in acts
    ]
    probe = copy.deepcopy(model)  # the hooks are copied too
    probe.train()
    with torch.no_grad():
        probe(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("kind", ["bias-free", "conv-bias"])
def test_bn_pairs_stay_alive_in_train_mode(kind: str) -> None:
    """SGD with batch statistics moves every new conv neuron's fan-in and the neurons fire; the
    same neurons without the BatchNorm bias (zero fan-in, pre-activation 0) stay dead. With a conv
    bias b before BatchNorm (``kind="conv-bias"``) the batch mean would remove b: b goes to the
    BatchNorm too."""
    if kind == "bias-free":
        model, batches = _bias_free("relu", "flatten")
    else:
        model, batches = model_and_data("cnn", "relu")
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    ctx = context(model, batches)
    cands, chosen = all_candidates(GradMax(), ctx)
    assert cands.record["bias_in"] == {"c1": "batchnorm", "c2": "batchnorm"}
    plan = GradMax().plan(ctx, cands, chosen)
    plain = {
        k: NewNeurons(v.count, v.incoming, dict(v.outgoing)) for k, v in plan.new.items()
    }  # chain_bias left out
    variants = [(plan.new, True), (plain, False)]
    if kind == "conv-bias":  # b in the conv's bias instead: the batch mean removes it
        in_layer = {}
        for k, v in plain.items():
            theta = v.incoming.clone()  # type: ignore[union-attr]
            theta[:, -1] = 1.0
            in_layer[k] = NewNeurons(v.count, theta, dict(v.outgoing))
        variants.append((in_layer, False))
    for new, alive in variants:
        grown, _, _ = add_neurons(model, new, generator=torch.Generator().manual_seed(1))
        train(grown, x, y, 5, 0.05)
        fired = _firing(grown, x, ("a1", "a2"))
        for name, act in (("c1", "a1"), ("c2", "a2")):
            k = new[name].count
            w = dict(grown.named_modules())[name].weight.detach()[-k:].flatten(1)
            out = fired[act][:, -k:]  # (n, k, 5, 5)
            if alive:
                assert bool((w.abs().sum(1) > 1e-6).all()), f"{name}: every fan-in moved"
                assert bool((out.sum((0, 2, 3)) > 0).all()), f"{name}: every new neuron fires"
            else:
                assert float(w.abs().max()) == 0.0 and float(out.abs().max()) == 0.0


def test_skips_bias_free_units_whose_batchnorm_follows_the_activation() -> None:
    class AfterAct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
            self.b1 = nn.BatchNorm2d(4)
            self.c2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.b2 = nn.BatchNorm2d(4, affine=False)
            self.fc = nn.Linear(100, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.b1(torch.relu(self.c1(x)))  # BatchNorm after the activation
            return self.fc(torch.relu(self.b2(self.c2(h))).flatten(1))  # no BatchNorm bias

    model = AfterAct().double()
    _, batches = _bias_free()
    cands = GradMax().candidates(context(model, batches))
    skipped = cands.record["skipped"]
    assert set(skipped) == {"c1", "c2"} and not cands.scores
    assert "no gradient" in skipped["c1"] and "'b1' follows the activation" in skipped["c1"]
    assert "affine=False" in skipped["c2"]


def test_chain_bias_is_checked() -> None:
    model, _ = _bias_free()
    gen = torch.Generator().manual_seed(0)
    for beta, match in (
        (float("nan"), "chain_bias"),
        (torch.ones(3), r"chain_bias must be a float or have shape \(2,\)"),
        (torch.tensor([1.0, float("inf")]), "chain_bias contains NaN"),
        ("1", "chain_bias"),
    ):
        with pytest.raises(ValueError, match=match):
            add_neurons(model, {"c1": NewNeurons(2, chain_bias=beta)}, generator=gen)  # type: ignore[arg-type]
    mlp_model, _ = model_and_data("mlp", "relu")
    with pytest.raises(ValueError, match="no BatchNorm"):
        add_neurons(mlp_model, {"0": NewNeurons(2, chain_bias=1.0)}, generator=gen)
    grown, _, _ = add_neurons(
        model, {"c2": NewNeurons(2, chain_bias=torch.tensor([0.5, 1.5]))}, generator=gen
    )
    assert grown.b2.bias[-2:].tolist() == [0.5, 1.5] and torch.equal(grown.b1.bias, model.b1.bias)


def test_cli_grows_a_bias_free_conv_bn_cnn(tmp_path: Path) -> None:
    """The registry ``cnn`` (Conv(bias=False) → BN → ReLU blocks): every unit gets candidates."""
    out = tmp_path / "run"
    argv = ["grow", "--model", "cnn", "--dataset", "digits", "--widths", "4", "4", "4", "4",
            "--eigen-samples", "128", "--strategy", "gradmax", "--rounds", "2",
            "--epochs-per-round", "1", "--no-latency", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    history = json.loads((out / "results.json").read_text())["history"]
    convs = ["features.0", "features.3", "features.7", "features.10"]
    rounds = [r for r in history if "skipped" in r]
    assert len(rounds) == 2
    for r in rounds:
        assert r["skipped"] == {}
        # its four bias-free convs, each before a BatchNorm and a ReLU
        assert r["bias_in"] == dict.fromkeys(convs, "batchnorm")
        assert r.get("new") and all(v > 0 and v % 2 == 0 for v in r["new"].values())


def test_a_budget_for_one_pair_grows_one_pair_and_less_grows_nothing() -> None:
    """Selection charges a pair as two neurons: a budget that fits one pair grows exactly one,
    and one that fits a single neuron but no pair stops growth ("budget"), claiming nothing."""
    digits = data.load("digits", seed=0)
    torch.manual_seed(0)
    model = mlp("relu", (64, 6, 6, 10)).float()
    batches = [(x.flatten(1), y) for x, y in digits.train.batches(128)[:2]]
    start = sum(p.numel() for p in model.parameters())
    structure = analyze(model)
    modules = dict(model.named_modules())
    cheapest = min(added_parameters(structure.layers[k], modules) for k in structure.splittable())
    for extra, grows in ((2 * cheapest, True), (2 * cheapest - 1, False)):
        cfg = GrowConfig(rounds=1, epochs_per_round=1, strategy="gradmax",
                         budget_params=start + extra, grow_ratio=1.0)  # fmt: skip
        res = grow(copy.deepcopy(model), batches, loss_fn=F.cross_entropy, config=cfg)
        first = res.history[0]
        assert res.history[-1]["params"] <= start + extra
        if grows:
            assert sum(first["new"].values()) == 2 and res.history[-1]["params"] == start + extra
        else:
            assert "new" not in first and res.stopped == "budget"
