"""split_neurons: function preserved at eps = 0 for every handler, consistent shapes, errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from _models import REGISTRY, build, loss_fn
from torch import Tensor, nn

import splitgrow
from splitgrow.graph import analyze
from splitgrow.surgery import SURGERY


def _outputs(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x) for x, _ in batches])


def _random_plan(
    model: nn.Module, layers: list[str], seed: int
) -> dict[str, tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    s = analyze(model)
    plan = {}
    for name in layers:
        info = s.layers[name]
        k = 1 + int(torch.randint(0, info.n, (1,), generator=gen))
        idx = torch.randperm(info.n, generator=gen)[:k]
        plan[name] = (idx, torch.randn(k, info.d, generator=gen, dtype=torch.float64))
    return plan


CASES = [(name, layer) for name in REGISTRY for layer in analyze(build(name)[0]).splittable()]


@pytest.mark.parametrize(("name", "layer"), CASES)
def test_eps_zero_preserves_function_per_layer(name: str, layer: str) -> None:
    model, batches = build(name)
    before = _outputs(model, batches)
    plan = _random_plan(model, [layer], seed=1)
    split = splitgrow.split_neurons(model, plan, eps=0.0)
    after = _outputs(split, batches)
    assert float((after - before).abs().max()) < 1e-10
    k = plan[layer][0].numel()
    new = dict(split.named_modules())[layer]
    assert new.weight.shape[0] == analyze(model).layers[layer].n + k
    assert float((_outputs(model, batches) - before).abs().max()) == 0.0  # input untouched


@pytest.mark.parametrize("name", list(REGISTRY))
def test_eps_zero_preserves_function_all_layers_at_once(name: str) -> None:
    model, batches = build(name)
    before = _outputs(model, batches)
    plan = _random_plan(model, analyze(model).splittable(), seed=2)
    split = splitgrow.split_neurons(model, plan, eps=0.0)
    assert float((_outputs(split, batches) - before).abs().max()) < 1e-10
    # the result is an ordinary model: it traces, and splits again
    again = splitgrow.split_neurons(
        split, _random_plan(split, analyze(split).splittable(), 3), eps=0
    )
    assert float((_outputs(again, batches) - before).abs().max()) < 1e-10


@pytest.mark.parametrize("name", list(REGISTRY))
def test_split_model_has_consistent_attributes_trains_saves_loads(name: str) -> None:
    model, batches = build(name)
    plan = _random_plan(model, analyze(model).splittable(), seed=4)
    split = splitgrow.split_neurons(model, plan, eps=0.1)
    for m in split.modules():
        if isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features)
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            assert m.weight.shape[:2] == (m.out_channels, m.in_channels // m.groups)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.weight.shape == m.running_mean.shape == (m.num_features,)
        if isinstance(m, nn.PReLU):
            assert m.weight.shape == (m.num_parameters,)
    assert "Linear" in repr(split)
    # trains: one optimizer step in train mode changes the loss
    split.train()
    opt = torch.optim.SGD(split.parameters(), lr=0.1)
    x, y = batches[0]
    loss = loss_fn(split(x), y)
    loss.backward()
    opt.step()
    # saves and loads its state into a model of the same shape
    buffer = io.BytesIO()
    torch.save(split.state_dict(), buffer)
    buffer.seek(0)
    clone = splitgrow.split_neurons(model, plan, eps=0.0)
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    assert float((_outputs(clone, batches) - _outputs(split, batches)).abs().max()) == 0.0


def test_offspring_rows_and_halved_columns() -> None:
    """The exact layout: parent θ+εv in place, offspring θ−εv appended; consumer columns halved."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    v = torch.randn(2, 4, dtype=torch.float64)
    split = splitgrow.split_neurons(model, {"0": (torch.tensor([2, 0]), v)}, eps=0.5)
    w0, b0, w1 = model[0].weight, model[0].bias, model[2].weight
    nw, nb, nw1 = split[0].weight, split[0].bias, split[2].weight
    assert torch.equal(nw[1], w0[1]) and torch.equal(nw[3], w0[3])
    assert torch.allclose(nw[2], w0[2] + 0.5 * v[0, :3]) and torch.allclose(
        nb[2], b0[2] + 0.5 * v[0, 3]
    )
    assert torch.allclose(nw[4], w0[2] - 0.5 * v[0, :3]) and torch.allclose(
        nb[4], b0[2] - 0.5 * v[0, 3]
    )
    assert torch.allclose(nw[5], w0[0] - 0.5 * v[1, :3])
    assert torch.allclose(nw1[:, 2], w1[:, 2] / 2) and torch.allclose(nw1[:, 4], w1[:, 2] / 2)
    assert torch.allclose(nw1[:, 5], w1[:, 0] / 2) and torch.equal(nw1[:, 1], w1[:, 1])
    assert (split[0].out_features, split[2].in_features) == (6, 6)


def test_flatten_block_columns() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4, 2)
    )
    split = splitgrow.split_neurons(model, {"0": (torch.tensor([1]), torch.zeros(1, 10))}, eps=0.0)
    w, nw = model[3].weight, split[3].weight
    assert nw.shape == (2, 16)
    assert torch.allclose(nw[:, 4:8], w[:, 4:8] / 2) and torch.allclose(nw[:, 12:16], w[:, 4:8] / 2)
    x = torch.randn(5, 1, 2, 2)
    assert torch.allclose(model(x), split(x), atol=1e-6)


def test_per_neuron_eps_tensor() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    v = torch.ones(2, 4, dtype=torch.float64)
    eps = torch.tensor([0.1, 0.3], dtype=torch.float64)
    split = splitgrow.split_neurons(model, {"0": (torch.tensor([0, 1]), v)}, eps={"0": eps})
    assert torch.allclose(
        split[0].weight[1] - model[0].weight[1], torch.full((3,), 0.3, dtype=torch.float64)
    )


def test_every_registered_handler_is_exercised() -> None:
    seen: set[type] = set()
    for name in REGISTRY:
        model, _ = build(name)
        s = analyze(model)
        modules = dict(model.named_modules())
        for info in s.layers.values():
            if info.splittable:
                seen.add(type(modules[info.name]))
                seen |= {type(modules[m]) for m in info.chain_modules()}
                seen |= {type(modules[c.name]) for c in info.consumers}
    assert set(SURGERY) <= seen


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


@pytest.mark.parametrize(
    ("plan", "eps", "error", "words"),
    [
        (
            {"9": (torch.tensor([0]), torch.zeros(1, 4))},
            0.1,
            ValueError,
            "layer '9' is not a neuron layer",
        ),
        ({"2": (torch.tensor([0]), torch.zeros(1, 5))}, 0.1, ValueError, "reach the model output"),
        (
            {"0": (torch.tensor([4]), torch.zeros(1, 4))},
            0.1,
            ValueError,
            r"indices must lie in \[0, 4\)",
        ),
        ({"0": (torch.tensor([-1]), torch.zeros(1, 4))}, 0.1, ValueError, "indices must lie"),
        ({"0": (torch.tensor([1, 1]), torch.zeros(2, 4))}, 0.1, ValueError, "duplicates"),
        ({"0": (torch.tensor([0.0]), torch.zeros(1, 4))}, 0.1, TypeError, "integer tensor"),
        ({"0": (torch.tensor([[0]]), torch.zeros(1, 4))}, 0.1, ValueError, r"shape \(k,\)"),
        (
            {"0": (torch.tensor([0]), torch.zeros(1, 3))},
            0.1,
            ValueError,
            r"shape \(1, 4\), got \(1, 3\)",
        ),
        ({"0": (torch.tensor([0]), torch.full((1, 4), float("nan")))}, 0.1, ValueError, "NaN"),
        (
            {"0": (torch.tensor([0]), torch.zeros(1, 4))},
            float("nan"),
            ValueError,
            "eps must be a finite",
        ),
        ({"0": (torch.tensor([0]), torch.zeros(1, 4))}, "big", ValueError, "eps must be a finite"),
        ({"0": torch.tensor([0])}, 0.1, TypeError, r"\(indices, directions\) pair"),
        ([("0", None)], 0.1, TypeError, "plan must be a mapping"),
    ],
)
def test_split_errors_name_the_problem(plan, eps, error, words) -> None:  # type: ignore[no-untyped-def]
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=words):
        splitgrow.split_neurons(model, plan, eps=eps)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
