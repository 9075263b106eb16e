"""grow(): the S2D loop on tiny configurations; selection; training phases; config validation."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import splitgrow
from splitgrow import data
from splitgrow.models import Architecture, widths_of
from splitgrow.strategies import s2d_select
from splitgrow.training import GrowConfig, evaluate, grow, make_optimizer, train_phase


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    return data.load("digits", seed=0)


def _model(
    d: data.Dataset, name: str = "cnn", widths: tuple[int, ...] = (3, 3, 3, 3)
) -> torch.nn.Module:
    torch.manual_seed(0)
    return Architecture(name, list(widths), "relu", d.in_shape, 10).build()


def test_grow_records_every_round_and_grows(digits: data.Dataset) -> None:
    model = _model(digits)
    cfg = GrowConfig(rounds=2, epochs_per_round=1, grow_ratio=0.5, eps_mode="line-search")
    train = digits.train.batches(128)[:4]
    res = grow(model, train, loss_fn=F.cross_entropy, val_data=digits.val.batches(256), config=cfg)
    assert res.stopped == "rounds" and len(res.history) == 3
    params = [r["params"] for r in res.history]
    assert params == sorted(params) and params[-1] > params[0]
    for before in res.history[:-1]:
        assert sum(before["split"].values()) >= 1
        assert 0 < before["eps"] <= 1.0
        assert set(before["lambda_min"]) == set(splitgrow.analyze(model).splittable())
    assert widths_of(res.model) != [3, 3, 3, 3]
    assert sum(widths_of(res.model)) == 12 + sum(
        sum(r.get("split", {}).values()) for r in res.history
    )
    last = res.history[-1]
    assert 0 <= last["val_accuracy"] <= 1 and math.isfinite(last["val_loss"])
    assert isinstance(last["twins"], int) and last["flops"] > res.history[0]["flops"]


def test_line_search_traces_the_model_once(
    digits: data.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ε line search splits one model once per grid point; it reuses the round's analysis of
    the model, so it costs no torch.fx trace beyond what a fixed ε costs."""
    analyze_module = importlib.import_module("splitgrow.graph.analyze")  # not the function
    traces = [0]
    original = analyze_module.trace

    def counted(model: torch.nn.Module) -> torch.fx.GraphModule:
        traces[0] += 1
        return original(model)

    monkeypatch.setattr(analyze_module, "trace", counted)
    train = digits.train.batches(128)[:2]
    counts = {}
    for mode in ("fixed", "line-search"):
        traces[0] = 0
        cfg = GrowConfig(rounds=2, epochs_per_round=1, grow_ratio=0.5, eps_mode=mode)
        res = grow(_model(digits, "mlp", (3, 3)), train, loss_fn=F.cross_entropy, config=cfg)
        assert all(sum(r["split"].values()) >= 1 for r in res.history[:-1]), mode
        counts[mode] = traces[0]
    assert len(cfg.eps_grid) == 6 and counts["line-search"] == counts["fixed"] > 0


@pytest.mark.parametrize("eps_mode", ["fixed", "relative"])
@pytest.mark.parametrize("carry", ["copy", "reset"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_grow_options(digits: data.Dataset, eps_mode: str, carry: str, optimizer: str) -> None:
    cfg = GrowConfig(
        rounds=1, epochs_per_round=1, eps_mode=eps_mode, carry=carry, optimizer=optimizer,
        lr=0.01, method="fast", schedule="constant",
    )  # fmt: skip
    res = grow(
        _model(digits, "mlp", (6,)),
        digits.train.batches(128)[:3],
        loss_fn=F.cross_entropy,
        config=cfg,
    )
    assert len(res.history) == 2 and res.history[1]["params"] > res.history[0]["params"]


def test_budget_and_max_widths(digits: data.Dataset) -> None:
    model = _model(digits, "mlp", (4, 4))
    start = splitgrow.metrics.parameter_count(model)
    cfg = GrowConfig(rounds=4, epochs_per_round=1, grow_ratio=1.0, budget_params=start + 150,
                     max_widths={"3": 5})  # fmt: skip
    res = grow(model, digits.train.batches(128)[:3], loss_fn=F.cross_entropy, config=cfg)
    assert all(r["params"] <= start + 150 for r in res.history)
    assert res.stopped == "budget"
    assert widths_of(res.model)[1] <= 5


def test_stable_when_no_negative_eigenvalue(digits: data.Dataset) -> None:
    # ReLU without the surrogate: σ'' = 0 almost everywhere, so no λ_min < 0 in the first layer
    model = _model(digits, "mlp", (4,))
    cfg = GrowConfig(rounds=2, epochs_per_round=1, surrogate_beta=None)
    res = grow(model, digits.train.batches(128)[:2], loss_fn=F.cross_entropy, config=cfg)
    assert res.stopped == "stable" and res.history[0]["growth_ended"] == "stable"
    # growth ended after round 0; one last phase trains the 2 epochs rounds 1 and 2 would have had
    assert len(res.history) == 2 and res.history[1]["epochs"] == 2
    assert res.history[1]["params"] == res.history[0]["params"]


def test_s2d_select_orders_limits_and_budgets() -> None:
    values = {"a": torch.tensor([-3.0, 1.0, -1.0]), "b": torch.tensor([-2.0, -0.5])}
    widths = {"a": 3, "b": 2}
    assert {k: v.tolist() for k, v in s2d_select(values, widths, ratio=0.4).items()} == {
        "a": [0],
        "b": [0],
    }
    got = s2d_select(values, widths, ratio=1.0, max_widths={"a": 4})
    assert {k: v.tolist() for k, v in got.items()} == {"a": [0], "b": [0, 1]}  # λ ≥ 0 never split
    got = s2d_select(values, widths, ratio=1.0, costs={"a": 10, "b": 3}, budget=13)
    assert {k: v.tolist() for k, v in got.items()} == {"a": [0], "b": [0]}
    with pytest.raises(ValueError, match="grow ratio"):
        s2d_select(values, widths, ratio=0.0)


def test_train_phase_plateau_and_non_finite(digits: data.Dataset) -> None:
    model = _model(digits, "mlp", (8,))
    opt = make_optimizer(model, "adam", 1e-2, 0.0, 0.0)
    batches = digits.train.batches(256)
    phase = train_phase(model, opt, lambda _: batches, F.cross_entropy, epochs=50, plateau=0.5)
    assert phase.stopped == "plateau" and len(phase.epoch_losses) < 50
    assert opt.param_groups[0]["lr"] == 1e-2  # restored after the cosine schedule
    bad = [(x, y) for x, y in batches]
    phase = train_phase(model, opt, lambda _: bad, lambda out, y: out.sum() * math.inf, epochs=3)
    assert phase.stopped == "non-finite" and phase.epoch_losses == []
    result = evaluate(model, digits.test.batches(512), F.cross_entropy, "classification")
    assert 0 <= result["accuracy"] <= 1


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"rounds": -1}, "rounds must be a non-negative integer"),
        ({"epochs_per_round": 0}, "epochs_per_round must be a positive integer"),
        ({"optimizer": "lbfgs"}, "optimizer must be one of"),
        ({"eps_mode": "auto"}, "eps_mode must be one of"),
        ({"carry": "keep"}, "carry must be one of"),
        ({"lr": -1.0}, "lr must be a positive number"),
        ({"grow_ratio": 1.5}, "grow_ratio must be in"),
        ({"eps_grid": ()}, "eps_grid must hold positive numbers"),
        ({"budget_params": 0}, "budget_params must be a positive integer"),
        ({"eigen_micro_batch": 0}, "eigen_micro_batch must be a positive integer"),
        ({"eigen_micro_batch": 8, "batchnorm": "batch"}, "eigen_micro_batch needs batchnorm"),
    ],
)
def test_config_errors(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        GrowConfig(**kwargs)


def test_eigen_micro_batch_reaches_the_solver_and_changes_nothing(
    digits: data.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """grow's eigen_micro_batch: splitting_eigen runs each batch in slices of that many samples,
    and the round's λ_min and splits are those of whole batches."""
    from splitgrow.strategies import s2d as s2d_module

    seen: list[int | None] = []
    original = s2d_module.splitting_eigen

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(kwargs.get("micro_batch"))
        return original(*args, **kwargs)

    monkeypatch.setattr(s2d_module, "splitting_eigen", spy)
    train = digits.train.batches(64)[:3]
    runs = []
    for micro in (None, 16):
        cfg = GrowConfig(rounds=1, epochs_per_round=1, eigen_micro_batch=micro, eps_mode="fixed")
        runs.append(grow(_model(digits), train, loss_fn=F.cross_entropy, config=cfg).history[0])
    assert seen == [None, 16]
    whole, sliced = runs
    assert whole["split"] == sliced["split"]
    for layer, summary in whole["lambda_min"].items():
        assert sliced["lambda_min"][layer]["negative"] == summary["negative"]
        assert math.isclose(sliced["lambda_min"][layer]["min"], summary["min"], rel_tol=1e-4)


def test_random_directions_split_the_same_neurons(digits: data.Dataset) -> None:
    train = digits.train.batches(128)[:3]
    runs = {}
    for directions in ("eigen", "random"):
        cfg = GrowConfig(rounds=1, epochs_per_round=1, directions=directions, eps_mode="fixed")
        runs[directions] = grow(
            _model(digits, "mlp", (6,)), train, loss_fn=F.cross_entropy, config=cfg
        )
    eigen, rand = runs["eigen"], runs["random"]
    assert eigen.history[0]["split"] == rand.history[0]["split"]  # same selection by λ_min
    w_e = eigen.model[1].weight.detach()
    w_r = rand.model[1].weight.detach()
    assert w_e.shape == w_r.shape and not torch.allclose(w_e, w_r)  # different directions


def test_flops_budget_stops_growth(digits: data.Dataset) -> None:
    model = _model(digits, "mlp", (4,))
    start = splitgrow.metrics.flops(model, digits.train.x[:1])
    cfg = GrowConfig(rounds=5, epochs_per_round=1, grow_ratio=1.0, budget_flops=start + 1)
    res = grow(model, digits.train.batches(128)[:2], loss_fn=F.cross_entropy, config=cfg)
    # one split, then over budget: the last phase trains the 4 epochs left in the schedule
    assert res.stopped == "budget" and len(res.history) == 3
    assert [r["epochs"] for r in res.history] == [1, 1, 4]
    assert res.history[-1]["flops"] > start
