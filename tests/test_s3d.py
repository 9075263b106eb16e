"""Signed splitting (s3d): the predicted second-order loss change against the real split as
ε → 0 in float64, the optimality of the signed split, and growth where s2d has stalled."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn.functional as F
from _models import build, loss_fn
from test_coupled import SelfResidual, SmoothResNet
from torch import Tensor, nn

from splitgrow import data, splitting_eigen
from splitgrow.cli import main
from splitgrow.strategies import STRATEGIES
from splitgrow.strategies.s3d import signed_scores, signed_split
from splitgrow.surgery.split import SignedSplit, signed_split_with_growth
from splitgrow.training import GrowConfig, grow

W = 2.0


def smooth(name: str) -> nn.Module:
    return {"relu": nn.Tanh(), "relu_inplace": nn.SiLU(), "relu6": nn.Tanh(), "leaky": nn.ELU(),
            "hardtanh": nn.Tanh(), "hardsigmoid": nn.Sigmoid()}[name]  # fmt: skip


def mean_loss(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> float:
    total = sum(len(y) for _, y in batches)
    with torch.no_grad():
        return sum(float(loss_fn(model(x), y)) * len(y) for x, y in batches) / total


def _coupled(cls: type[nn.Module], shape: tuple[int, ...]) -> tuple[nn.Module, list]:
    torch.manual_seed(3)
    model = cls().double().eval()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    batches = [
        (torch.randn(n, *shape, generator=gen, dtype=torch.float64),
         torch.randint(0, 3, (n,), generator=gen))
        for n in (4, 3)
    ]  # fmt: skip
    return model, batches


# not cnn1d: its max-pool makes the real loss kink where an offspring's window maximum switches,
# which at ε ~ 1e-3 already spoils the finite difference (the splitting matrix itself is tested
# against the brute-force Hessian elsewhere)
CASES = ["mlp", "mobile_block", "resnet", "self_residual"]


def _case(name: str) -> tuple[nn.Module, list]:
    if name == "resnet":
        return _coupled(SmoothResNet, (2, 5, 5))
    if name == "self_residual":
        return _coupled(SelfResidual, (5,))
    return build(name, acts=smooth)


@pytest.mark.parametrize("name", CASES)
def test_predicted_change_matches_the_real_split(name: str) -> None:
    """2·ΔL/ε² of the real signed split → its score as ε → 0, for the best positive and the best
    negative split of every unit (whichever wins); the error shrinks like ε (a signed split is
    not symmetric, so the remainder is O(ε³))."""
    model, batches = _case(name)
    base = mean_loss(model, batches)
    eig = splitting_eigen(model, loss_fn, batches, method="exact", which="both")
    checked = 0
    for layer, e in eig.items():
        assert e.max_values is not None and e.max_vectors is not None
        kinds = {True: -(1 - 1 / W) * e.max_values, False: e.values}  # negative / positive split
        for kind, score in kinds.items():  # both kinds for every unit, winning or not
            i = int(score.argmin())
            idx = torch.tensor([i])
            forced = torch.tensor([kind])
            plan = {layer: signed_split(idx, e.vectors[idx], e.max_vectors[idx], forced, W)}
            errors = []
            for eps in (1e-3, 2.5e-4):
                new, _ = signed_split_with_growth(model, plan, eps=eps)
                measured = 2 * (mean_loss(new, batches) - base) / eps**2
                errors.append(abs(measured - float(score[i])))
            scale = float(e.values.abs().max().clamp_min(e.max_values.abs().max()))
            assert errors[0] <= 2e-2 * scale, (layer, kind, errors, float(score[i]))
            assert errors[1] <= errors[0] / 2.5 + 1e-6 * scale, (layer, kind, errors)  # or noise
            checked += 1
    assert checked == 2 * len(eig)


def test_negative_split_uses_lambda_max_and_shares_of_opposite_sign() -> None:
    lam_min = torch.tensor([-1.0, 0.5, 0.2, -0.1], dtype=torch.float64)
    lam_max = torch.tensor([1.0, 3.0, 0.2, 4.0], dtype=torch.float64)
    score, negative = signed_scores(lam_min, lam_max, 2.0)
    assert negative.tolist() == [False, True, True, True]
    assert torch.allclose(score, torch.tensor([-1.0, -1.5, -0.1, -2.0], dtype=torch.float64))
    v = torch.eye(4, dtype=torch.float64)
    plan = signed_split(torch.arange(4), v, v.flip(0), negative, 2.0)
    assert plan.share.tolist() == [0.5, 2.0, 2.0, 2.0]  # offspring: 0.5, -1, -1, -1
    first = plan.share[:, None] * plan.parent + (1 - plan.share[:, None]) * plan.offspring
    assert float(first.abs().max()) == 0.0  # no first-order term
    with pytest.raises(ValueError, match="max_share"):
        signed_scores(lam_min, lam_max, 1.0)


@pytest.mark.parametrize("seed", range(3))
def test_the_signed_split_is_optimal_among_feasible_splits(seed: int) -> None:
    """For random S, no split with shares s, 1 − s of magnitude ≤ W and offsets of norm ≤ 1 whose
    first-order term vanishes does better than the score (random search)."""
    gen = torch.Generator().manual_seed(seed)
    d = 4
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    s_mat = a + a.T
    evals, evecs = torch.linalg.eigh(s_mat)
    score, negative = signed_scores(evals[:1], evals[-1:], W)
    plan = signed_split(torch.tensor([0]), evecs[:, :1].T, evecs[:, -1:].T, negative, W)
    s, p, o = float(plan.share[0]), plan.parent[0], plan.offspring[0]
    achieved = s * p @ s_mat @ p + (1 - s) * o @ s_mat @ o
    assert float(achieved) == pytest.approx(float(score[0]), rel=1e-12)
    assert float(p.norm()) <= 1 + 1e-12 and float(o.norm()) <= 1 + 1e-12
    shares = (1 - W) + (2 * W - 1) * torch.rand(20000, generator=gen, dtype=torch.float64)
    b = torch.randn(20000, d, generator=gen, dtype=torch.float64)
    b = b / b.norm(dim=1, keepdim=True) * torch.rand(20000, 1, generator=gen, dtype=torch.float64)
    ratio = ((1 - shares) / shares).abs()  # ‖a‖ = ratio·‖b‖ must be ≤ 1 too
    b = b / ratio.clamp_min(1.0)[:, None]
    aa = -((1 - shares) / shares)[:, None] * b
    values = shares * ((aa @ s_mat) * aa).sum(1) + (1 - shares) * ((b @ s_mat) * b).sum(1)
    assert float(values.min()) >= float(score[0]) - 1e-9


def test_signed_split_refuses_a_first_order_term_and_bad_shares() -> None:
    model, _ = build("mlp", acts=smooth)
    layer = next(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    d = model.get_submodule(layer).weight.shape[1] + 1
    v = torch.ones(1, d, dtype=torch.float64)
    bad = SignedSplit(torch.tensor([0]), v, v, torch.tensor([0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="must vanish"):
        signed_split_with_growth(model, {layer: bad}, eps=0.1)
    nan = SignedSplit(torch.tensor([0]), v, -v, torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="share"):
        signed_split_with_growth(model, {layer: nan}, eps=0.1)
    # at ε = 0 a signed split with shares 2 and −1 leaves the function unchanged
    ok = SignedSplit(torch.tensor([0, 1]), 0.5 * v.repeat(2, 1), v.repeat(2, 1),
                     torch.tensor([2.0, 2.0], dtype=torch.float64))  # fmt: skip
    x = torch.randn(6, 5, dtype=torch.float64)
    new, _ = signed_split_with_growth(model, {layer: ok}, eps=0.0)
    with torch.no_grad():
        assert float((new(x) - model(x)).abs().max()) < 1e-12


def _stalled() -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    """A softplus network whose outputs all lie above their targets, with positive output
    weights: every neuron's ∂L/∂a > 0 and σ'' > 0, so every S_i is positive semi-definite
    (λ_min ≥ 0: s2d is stalled) while λ_max > 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Softplus(), nn.Linear(4, 1)).double()
    with torch.no_grad():
        model[2].weight.abs_()
    x = torch.randn(64, 3, dtype=torch.float64)
    y = model(x).detach().squeeze(1) - 1.0 - x[:, 0] ** 2
    return model, [(x, y)]


def _mse(out: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(out.squeeze(-1), y)


def test_s3d_keeps_growing_where_s2d_has_stalled() -> None:
    cfg = dict(rounds=1, epochs_per_round=1, lr=1e-12, batch_size=64, method="exact",
               schedule="constant", surrogate_beta=None)  # fmt: skip
    model, data = _stalled()
    eig = splitting_eigen(model, _mse, data, method="exact", which="both")
    assert float(eig["0"].values.min()) >= -1e-12 and float(eig["0"].max_values.min()) > 0
    s2d = grow(model, data, loss_fn=_mse, task="regression", config=GrowConfig(**cfg))
    assert s2d.stopped == "stable" and "split" not in s2d.history[0]
    model, data = _stalled()
    s3d = grow(model, data, loss_fn=_mse, task="regression",
               config=GrowConfig(strategy="s3d", **cfg))  # fmt: skip
    first = s3d.history[0]
    assert first["split"] == {"0": 2}  # the grow ratio's ceil(0.3·4) neurons
    assert first["signed"]["0"]["negative_splits"] == 4
    assert first["predicted_loss_change"] < 0
    before, after = first["train_loss"], s3d.history[1]["train_loss"]
    assert after < before - 0.5 * abs(first["predicted_loss_change"]), (before, after)


def test_grow_refuses_s2d_baselines_with_another_strategy() -> None:
    with pytest.raises(ValueError, match="baselines of strategy 's2d'"):
        GrowConfig(strategy="s3d", directions="random")
    with pytest.raises(ValueError, match="strategy must be one of"):
        GrowConfig(strategy="nope")
    with pytest.raises(ValueError, match="max_share"):
        GrowConfig(strategy="s3d", signed_max_share=0.5)


def test_cli_grows_with_s3d(tmp_path) -> None:
    out = tmp_path / "run"
    argv = ["grow", "--model", "mlp", "--dataset", "digits", "--widths", "8", "8",
            "--strategy", "s3d", "--rounds", "2", "--epochs-per-round", "1", "--no-latency",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert json.loads((out / "config.json").read_text())["grow"]["strategy"] == "s3d"
    assert any(r.get("split") for r in results["history"])
    assert main(["grow", "--strategy", "nope", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_cli_grows_with_every_registered_strategy(tmp_path, strategy: str) -> None:
    out = tmp_path / strategy
    # an MLP: fast for every strategy (gradmax on a Conv→BN→ReLU CNN: test_gradmax.py)
    argv = ["grow", "--model", "mlp", "--dataset", "digits", "--widths", "6", "6",
            "--strategy", strategy, "--rounds", "2", "--epochs-per-round", "1", "--no-latency",
            "--budget-params", "3000", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    grown = [r for r in results["history"] if r.get("split") or r.get("new")]
    assert grown, results["history"]
    assert sum(results["widths"]) > 12 and results["params"] <= 3000


def test_cli_refuses_bad_strategy_options(tmp_path) -> None:
    base = ["grow", "--model", "mlp", "--widths", "4", "4", "--rounds", "1",
            "--epochs-per-round", "1", "--no-latency"]  # fmt: skip
    assert main([*base, "--strategy", "firefly", "--strategy-option", "steps=-1",
                 "--out", str(tmp_path / "a")]) == 2  # fmt: skip
    assert main([*base, "--strategy", "gradmax", "--strategy-option", "nope=1",
                 "--out", str(tmp_path / "b")]) == 2  # fmt: skip
    assert main([*base, "--strategy-option", "x=1", "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "a" / "results.json").exists()


def test_large_shares_on_a_float32_model() -> None:
    """W = 100 passes the first-order check in float32 (a relative tolerance, in float64)."""
    digits = data.load("digits", seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))
    cfg = GrowConfig(rounds=1, epochs_per_round=1, strategy="s3d", signed_max_share=100.0,
                     grow_ratio=1.0, eps_mode="fixed", eps=0.5)  # fmt: skip
    res = grow(model, digits.train.batches(128)[:2], loss_fn=F.cross_entropy, config=cfg)
    assert res.history[0].get("split"), res.history[0]


@pytest.mark.parametrize("selection", ["global", "per-layer"])
def test_predicted_loss_change_is_in_loss_units(selection: str) -> None:
    """The record's Σ ε²/2·score uses the raw scores whatever the ranking, and matches the real
    change of the split at a small ε."""
    G = importlib.import_module("splitgrow.training.grow")  # the module, not the function
    model, batches = _case("mlp")
    cfg = GrowConfig(rounds=2, strategy="s3d", selection=selection, eps_mode="fixed", eps=1e-3,
                     method="exact", grow_ratio=0.5)  # fmt: skip
    record = {"round": 0, "params": sum(p.numel() for p in model.parameters()), "flops": 0}
    record["start_params"] = record["params"]
    stages = G._split_round(model, cfg, loss_fn, batches, record, torch.Generator())
    eig = splitting_eigen(model, loss_fn, batches, method="exact", which="both")
    expected = 0.0
    for layer, pp in stages[0].pairs.items():
        score, _ = signed_scores(eig[layer].values, eig[layer].max_values, W)
        expected += 1e-6 / 2 * float(score[[p for p, _ in pp]].sum())
    assert record["predicted_loss_change"] == pytest.approx(expected, rel=1e-9)
    real = mean_loss(stages[0].model, batches) - mean_loss(model, batches)
    assert real == pytest.approx(expected, rel=0.05)
