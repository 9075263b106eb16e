"""The growth baselines inside ``grow``: fresh neurons, Net2Net copies, fixed schedules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splitgrow import data
from splitgrow.graph import analyze
from splitgrow.models import Architecture, widths_of
from splitgrow.surgery.fresh import add_fresh_neurons
from splitgrow.training import GrowConfig, grow


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    return data.load("digits")


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    model = Architecture("cnn", [3, 4, 5, 6], "relu", [1, 8, 8], 10).build().double()
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8, dtype=torch.float64))
    return model.eval()


@pytest.mark.parametrize("which", ["one", "layer and its consumer", "all"])
def test_fresh_neurons_keep_the_function_and_are_fresh(which: str) -> None:
    model = _cnn()
    names = [k for k, v in analyze(model).layers.items() if v.splittable]
    chosen = {"one": names[:1], "layer and its consumer": names[1:3], "all": names}[which]
    counts = {k: 2 for k in chosen}
    x = torch.randn(7, 1, 8, 8, dtype=torch.float64)
    new, growth, pairs = add_fresh_neurons(
        model, counts, generator=torch.Generator().manual_seed(1)
    )
    new.eval()
    torch.testing.assert_close(new(x), model(x), rtol=1e-12, atol=1e-12)
    old_widths, new_widths = widths_of(model), widths_of(new)
    layers = analyze(model).layers
    modules = dict(new.named_modules())
    for name in chosen:
        n = layers[name].n
        assert [o for _, o in pairs[name]] == [n, n + 1]
        weight = modules[name].weight.detach()
        for parent, child in pairs[name]:
            assert not torch.allclose(weight[parent], weight[child])  # drawn afresh, not a copy
        for consumer in layers[name].consumers:
            cols = modules[consumer.name].weight.detach()[:, n * consumer.block :]
            if consumer.name not in chosen:
                assert torch.count_nonzero(cols) == 0  # zero outgoing weights
    assert sum(new_widths) == sum(old_widths) + 2 * len(chosen)
    assert all(f"{k}.weight" in growth for k in chosen)
    with pytest.raises(ValueError, match=r"must be an integer in \[0, 3\]"):
        add_fresh_neurons(model, {names[0]: 4}, generator=torch.Generator())


def test_grow_fresh_follows_a_fixed_schedule(digits: data.Dataset) -> None:
    torch.manual_seed(0)
    model = Architecture("mlp", [4, 4], "relu", [8, 8], 10).build()
    counts = [{"1": 2, "3": 1}, {"3": 3}]
    cfg = GrowConfig(rounds=3, epochs_per_round=1, directions="fresh", counts=counts)
    res = grow(model, digits.train.batches(128)[:3], loss_fn=F.cross_entropy, config=cfg)
    assert widths_of(res.model) == [6, 8]
    assert [r.get("split") for r in res.history] == [counts[0], counts[1], None, None]
    assert res.stopped == "schedule" and res.history[2]["growth_ended"] == "schedule"
    assert "lambda_min" not in res.history[0]  # no eigenpairs needed
    with pytest.raises(ValueError, match="needs directions='fresh'"):
        GrowConfig(counts=counts)


@pytest.mark.parametrize("directions", ["fresh", "net2net", "random"])
def test_growth_variants_keep_the_schedule(digits: data.Dataset, directions: str) -> None:
    torch.manual_seed(0)
    model = Architecture("mlp", [4], "tanh", [8, 8], 10).build()
    cfg = GrowConfig(rounds=2, epochs_per_round=1, directions=directions, grow_ratio=0.5)
    res = grow(model, digits.train.batches(128)[:3], loss_fn=F.cross_entropy, config=cfg)
    assert res.stopped == "rounds" and widths_of(res.model) == [9]  # 4 → 6 → 9
    if directions == "net2net":
        assert all(r["eps"] == 0.01 for r in res.history[:2])


def test_budget_holds_when_a_layer_and_its_consumer_split_together(digits: data.Dataset) -> None:
    torch.manual_seed(0)
    model = Architecture("cnn", [4, 4, 4, 4], "relu", [1, 8, 8], 10).build()
    start = sum(p.numel() for p in model.parameters())
    budget = start + 900
    cfg = GrowConfig(rounds=3, epochs_per_round=1, grow_ratio=1.0, budget_params=budget)
    res = grow(model, digits.train.batches(128)[:3], loss_fn=F.cross_entropy, config=cfg)
    splits = [r["split"] for r in res.history if r.get("split")]
    assert any(len(s) > 1 for s in splits)  # neighbouring layers did split in one round
    assert all(r["params"] <= budget for r in res.history)
    assert sum(p.numel() for p in res.model.parameters()) <= budget


def test_reach_budget_spreads_growth_over_the_rounds(digits: data.Dataset) -> None:
    torch.manual_seed(0)
    model = Architecture("mlp", [4], "tanh", [8, 8], 10).build()
    start = sum(p.numel() for p in model.parameters())
    budget = 4 * start
    cfg = GrowConfig(rounds=4, epochs_per_round=1, grow_ratio=1.0, budget_params=budget,
                     reach_budget=True)  # fmt: skip
    res = grow(model, digits.train.batches(128)[:3], loss_fn=F.cross_entropy, config=cfg)
    sizes = [r["params"] for r in res.history]
    for r, size in enumerate(sizes[1:]):  # never ahead of the geometric path to the budget
        assert size <= start * 4 ** ((r + 1) / 4) + 1
    assert sizes[-1] > 0.8 * budget and sizes[-1] <= budget
    with pytest.raises(ValueError, match="reach_budget needs budget_params"):
        GrowConfig(reach_budget=True)


def test_fixed_counts_skip_empty_rounds_and_respect_the_budget(digits: data.Dataset) -> None:
    torch.manual_seed(0)
    model = Architecture("mlp", [4, 4], "relu", [8, 8], 10).build()
    counts = [{"1": 2}, {}, {"3": 1}]
    cfg = GrowConfig(rounds=4, epochs_per_round=1, directions="fresh", counts=counts)
    res = grow(model, digits.train.batches(128)[:3], loss_fn=F.cross_entropy, config=cfg)
    assert widths_of(res.model) == [6, 5]  # the empty round is skipped, not the end
    assert [r.get("split") for r in res.history[:3]] == counts
    assert res.history[3]["growth_ended"] == "schedule"
    torch.manual_seed(0)
    model = Architecture("mlp", [4], "relu", [8, 8], 10).build()
    start = sum(p.numel() for p in model.parameters())
    cfg = GrowConfig(rounds=1, epochs_per_round=1, directions="fresh", counts=[{"1": 4}],
                     budget_params=start + 170)  # fmt: skip
    res = grow(model, digits.train.batches(128)[:3], loss_fn=F.cross_entropy, config=cfg)
    assert res.history[0]["split"] == {"1": 2}  # each new unit costs 64 + 1 + 10 = 75
    assert sum(p.numel() for p in res.model.parameters()) == start + 150


def test_fresh_neurons_start_without_optimizer_history(digits: data.Dataset) -> None:
    from splitgrow.surgery.optimizer import carry_state
    from splitgrow.training import make_optimizer

    torch.manual_seed(0)
    model = Architecture("mlp", [4], "relu", [8, 8], 10).build()
    opt = make_optimizer(model, "sgd", 0.1, 0.9, 0.0)
    x, y = digits.train.batches(64)[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    new, growth, _ = add_fresh_neurons(model, {"1": 2}, generator=torch.Generator())
    carried = carry_state(opt, model, new, growth, fresh=True)
    params = dict(new.named_parameters())
    rows = carried.state[params["1.weight"]]["momentum_buffer"]
    cols = carried.state[params["3.weight"]]["momentum_buffer"]
    assert torch.count_nonzero(rows[4:]) == 0 and torch.count_nonzero(cols[:, 4:]) == 0
    assert torch.equal(rows[:4], opt.state[model[1].weight]["momentum_buffer"])


def test_per_layer_selection_takes_each_layers_most_unstable_first(digits: data.Dataset) -> None:
    torch.manual_seed(0)
    model = Architecture("mlp", [4, 4], "tanh", [8, 8], 10).build()
    # at most ceil(0.25 · 8) = 2 splits: per layer, each layer's most negative λ scores −1
    cfg = GrowConfig(rounds=1, epochs_per_round=1, grow_ratio=0.25, selection="per-layer")
    res = grow(model, digits.train.batches(128)[:3], loss_fn=F.cross_entropy, config=cfg)
    lam = res.history[0]["lambda_min"]
    assert all(v["negative"] > 0 for v in lam.values())
    assert res.history[0]["split"] == {"1": 1, "3": 1}
    with pytest.raises(ValueError, match="selection must be one of"):
        GrowConfig(selection="random")


def _two_layer_split_round(
    monkeypatch: pytest.MonkeyPatch,
    model: nn.Sequential,
    cfg: GrowConfig,
    values: dict[str, Tensor] | None = None,
) -> dict[str, int]:
    """One split round of ``model`` (Linear 4→6, Tanh, Linear 6→6, Tanh, Linear 6→2) with
    λ_min faked: layer 0 [-100, -50, 1, …] and layer 2 [-0.01, -0.0099, -0.0098, -0.0097, 1, 1];
    returns the splits per layer."""
    import importlib
    import types

    G = importlib.import_module("splitgrow.training.grow")  # the module, not the function
    S2D = importlib.import_module("splitgrow.strategies.s2d")
    values = values or {
        "0": torch.tensor([-100.0, -50, 1, 1, 1, 1], dtype=torch.float64),
        "2": torch.tensor([-0.01, -0.0099, -0.0098, -0.0097, 1, 1], dtype=torch.float64),
    }
    fake = {
        k: types.SimpleNamespace(values=v, vectors=torch.randn(6, 5 if k == "0" else 7,
                                                               dtype=torch.float64))
        for k, v in values.items()
    }  # fmt: skip
    monkeypatch.setattr(S2D, "splitting_eigen", lambda *a, **k: fake)
    params = sum(p.numel() for p in model.parameters())
    batch = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    record = {"round": 0, "params": params, "flops": 0, "start_params": params}
    G._split_round(model, cfg, F.cross_entropy, batch, record, torch.Generator().manual_seed(0))
    return record["split"]


def _two_layer_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))


def test_budget_trim_ranks_by_the_selection_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """With per-layer selection, the neurons dropped to fit the budget are the ones that
    selection ranks last, not the ones with the largest raw λ."""
    torch.manual_seed(0)
    model = _two_layer_model()
    params = sum(p.numel() for p in model.parameters())
    cfg = GrowConfig(rounds=2, selection="per-layer", grow_ratio=0.5, eps_mode="fixed",
                     budget_params=params + 60)  # fmt: skip
    # per-layer scores: layer 0 [-1, -0.5], layer 2 [-1, -0.99, -0.98, -0.97]: 0's second goes
    assert _two_layer_split_round(monkeypatch, model, cfg) == {"0": 1, "2": 4}


def test_per_layer_selection_does_not_lift_round_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer whose most negative λ is round-off against the others' (−1e-17 against −100) is
    not scaled up to score −1: the two splits go to layer 0."""
    torch.manual_seed(0)
    values = {
        "0": torch.tensor([-100.0, -50, 1, 1, 1, 1], dtype=torch.float64),
        "2": torch.tensor([-1e-17, 1, 1, 1, 1, 1], dtype=torch.float64),
    }
    cfg = GrowConfig(rounds=2, selection="per-layer", grow_ratio=2 / 12, eps_mode="fixed")
    assert _two_layer_split_round(monkeypatch, _two_layer_model(), cfg, values) == {"0": 2}


def test_energy_selection_weighs_per_layer_normalised_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The knapsack maximises Σ −λ in units of each layer's most negative λ: layer 0's
    neurons cost 11 parameters and score 1, 0.5; layer 2's cost 9 and score 1, 0.99, 0.98, 0.97
    (raw λ would take both of layer 0's, worth 100 and 50). Within 41 parameters the best plan
    is one of layer 0 and three of layer 2 (11 + 27, plus 3 weights between the new neurons)."""
    torch.manual_seed(0)
    model = _two_layer_model()
    cfg = GrowConfig(rounds=2, selection="energy", grow_ratio=0.5, eps_mode="fixed",
                     round_budget_params=41)  # fmt: skip
    assert _two_layer_split_round(monkeypatch, model, cfg) == {"0": 1, "2": 3}


def test_final_shrink_mixes_with_a_fresh_init_before_the_last_phase() -> None:
    import importlib

    G = importlib.import_module("splitgrow.training.grow")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    before = [p.detach().clone() for p in model.parameters()]
    state = torch.get_rng_state()
    G._shrink_perturb(model, 1.0, 7)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    G._shrink_perturb(model, 0.0, 7)
    fresh = [p.detach().clone() for p in model.parameters()]
    G._shrink_perturb(model, 0.0, 7)  # the same seed gives the same fresh init
    assert all(torch.equal(a, p) for a, p in zip(fresh, model.parameters(), strict=True))
    assert not torch.equal(fresh[0], before[0])
    digits = data.load("digits", seed=0)
    x = [(b.flatten(1), y) for b, y in digits.train.batches(128)[:2]]
    net = nn.Sequential(nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 10))
    res = grow(net, x, loss_fn=F.cross_entropy, config=GrowConfig(rounds=2, epochs_per_round=1))
    assert [("shrink_perturb" in r) for r in res.history] == [False, True, False]
    with pytest.raises(ValueError, match="final_shrink"):
        GrowConfig(final_shrink=1.5)
