"""The model registry: every model builds, traces, has its sized layers splittable, and a grown
model is rebuilt from its JSON architecture plus state_dict."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import splitgrow
from splitgrow.models import MODELS, Architecture, widths_of

SHAPES = {
    "mlp": [1, 8, 8],
    "rbf1d": [1],
    "cnn1d": [1, 40],
    "cnn": [3, 16, 16],
    "mobilenetv1": [3, 32, 32],
    "resnet": [1, 8, 8],
    "mobilenetv2": [1, 8, 8],
    "densenet": [1, 8, 8],
}


def _arch(name: str) -> Architecture:
    spec = MODELS[name]
    classes = 1 if name == "rbf1d" else 10
    return Architecture(
        name, list(spec.default_widths), spec.default_activation, SHAPES[name], classes
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_builds_splits_and_rebuilds(name: str) -> None:
    torch.manual_seed(0)
    arch = _arch(name)
    model = arch.build().double().eval()
    x = torch.randn(3, *arch.in_shape, dtype=torch.float64)
    out = model(x)
    assert out.shape == (3, arch.classes)
    assert widths_of(model) == arch.widths
    structure = splitgrow.analyze(model)
    sized = [n for n, m in model.named_modules() if getattr(m, "splitgrow_sized", False)]
    # every sized layer names one unit (a residual stream's first producer), in order
    assert structure.splittable() == sized, {k: v.reason for k, v in structure.layers.items()}
    # grow every sized layer by one neuron, rebuild from JSON + state_dict, same function
    plan = {}
    for layer in sized:
        info = structure.layers[layer]
        plan[layer] = (torch.tensor([0]), torch.randn(1, info.d, dtype=torch.float64))
    grown = splitgrow.split_neurons(model, plan, eps=0.1).eval()
    grown_arch = Architecture.from_json(
        json.loads(json.dumps(arch.with_widths(widths_of(grown)).to_json()))
    )
    assert grown_arch.widths == [w + 1 for w in arch.widths]
    rebuilt = grown_arch.build().double().eval()
    rebuilt.load_state_dict(grown.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), grown(x))


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"model": "resnet9000"}, "unknown model 'resnet9000'"),
        ({"widths": []}, "widths must be positive integers"),
        ({"widths": [4, 0]}, "widths must be positive integers"),
        ({"activation": "swoosh"}, "unknown activation 'swoosh'"),
        ({"in_shape": [40]}, "takes samples of rank 2"),
        ({"classes": 0}, "classes must be a positive integer"),
    ],
)
def test_bad_architectures(kwargs: dict, words: str) -> None:
    base = {
        "model": "cnn1d",
        "widths": [4, 4],
        "activation": "relu",
        "in_shape": [1, 40],
        "classes": 10,
    }
    base.update(kwargs)
    with pytest.raises(ValueError, match=words):
        Architecture(**base)


def test_rbf1d_takes_one_width_and_from_json_refuses_foreign_data() -> None:
    with pytest.raises(ValueError, match="takes 1 widths"):
        Architecture("rbf1d", [2, 2], "gaussian", [1], 1)
    with pytest.raises(ValueError, match="exactly the keys"):
        Architecture.from_json({"model": "mlp", "widths": [3], "evil": 1})
    with pytest.raises(ValueError, match="JSON object"):
        Architecture.from_json([1, 2])


def test_gaussian_rbf_layer_is_splittable_with_exact_curvature() -> None:
    torch.manual_seed(0)
    model = Architecture("rbf1d", [3], "gaussian", [1], 1).build().double()
    x = torch.linspace(-2, 2, 20, dtype=torch.float64).unsqueeze(1)
    res = splitgrow.splitting_eigen(model, nn.functional.mse_loss, [(x, torch.sin(x))])
    assert res["0"].values.shape == (3,)
