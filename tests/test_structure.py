"""Model structure by tracing: splittable layers, chains, consumers, and reasons for refusal."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from _models import REGISTRY, build
from torch import Tensor, nn

import splitgrow
from splitgrow.graph import analyze


def test_registry_layers_described() -> None:
    model, _ = build("mobile_block")
    s = analyze(model)
    assert s.splittable() == ["c1", "c2"]
    c1 = s.layers["c1"]
    assert (c1.kind, c1.n, c1.d, c1.has_bias) == ("Conv2d", 4, 3 * 9 + 1, True)
    assert c1.chain_modules() == ["b1", "dw", "b2"]
    assert [(c.name, c.block) for c in c1.consumers] == [("c2", 1)]
    c2 = s.layers["c2"]
    assert [(c.name, c.block) for c in c2.consumers] == [("fc", 4)]  # 2×2 pixels per channel
    assert not s.layers["fc"].splittable
    assert "model output" in s.layers["fc"].reason


def test_no_bias_and_conv1d_dims() -> None:
    model, _ = build("cnn1d")
    c1 = analyze(model).layers["c1"]
    assert (c1.n, c1.d, c1.has_bias) == (4, 2 * 5, False)


class InputResidual(nn.Module):
    """A residual add of the model input: its channels cannot grow."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(x + torch.tanh(self.a(x)))


class SpatialCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 3, 1)
        self.b = nn.Conv2d(2, 3, 1)
        self.out = nn.Conv2d(3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.cat([self.a(x), self.b(x)], dim=2)).mean((2, 3))


class Chunked(nn.Module):
    """A channel split whose sizes are fixed in forward(): growing one part moves the cut."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 4, 1)
        self.out = nn.Conv2d(2, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        p, q = self.a(x).chunk(2, dim=1)
        return self.out(torch.tanh(p) * q).mean((2, 3))


class FixedView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 4 * 4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.c(x)).view(-1, 32))


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(2, 4, 1)
        self.g = nn.Conv2d(4, 4, 3, groups=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.g(self.c(x)).mean((2, 3)))


class SoftmaxChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.sm = nn.Softmax(dim=1)
        self.b = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.sm(self.a(x)))


class LayerNormConsumer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.ln = nn.LayerNorm(4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.ln(self.a(x)))


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


class LinearOnSpatial(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.c(x)).mean((1, 2))


@pytest.mark.parametrize(
    ("model", "layer", "words"),
    [
        (InputResidual(), "a", "combines the channels with another tensor ('x')"),
        (SpatialCat(), "a", "along dimension 2, not the channel dimension"),
        (SpatialCat(), "b", "along dimension 2, not the channel dimension"),
        (Chunked(), "a", "method '.chunk()'"),
        (FixedView(), "c", "view"),
        (Grouped(), "c", "groups=2"),
        (SoftmaxChain(), "a", "module 'sm'"),
        (LayerNormConsumer(), "a", "module 'ln'"),
        (Shared(), "a", "called 2 times"),
        (LinearOnSpatial(), "c", "not the last dimension"),
    ],
)
def test_blocked_layers_report_the_blocking_operation(
    model: nn.Module, layer: str, words: str
) -> None:
    info = analyze(model).layers[layer]
    assert not info.splittable
    assert words in info.reason
    plan = {layer: (torch.tensor([0]), torch.zeros(1, info.d))}
    with pytest.raises(
        ValueError, match=f"layer '{layer}' is not splittable: .*{re.escape(words)}"
    ):
        splitgrow.split_neurons(model, plan, eps=0.1)


def test_residual_model_couples_the_stream_into_one_unit() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Linear(3, 4)
            self.a = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = self.stem(x)
            return self.out(h + torch.tanh(self.a(torch.sigmoid(h))))

    s = analyze(Net())
    assert s.splittable() == ["stem"]
    stem = s.layers["stem"]
    assert [m.name for m in stem.members] == ["stem", "a"]
    assert (stem.n, stem.d) == (4, 4 + 5)
    assert sorted(c.name for c in stem.consumers) == ["a", "out"]
    assert s.unit_of("a") == "stem" and not s.layers["a"].splittable
    assert "coupled with those of 'stem'" in s.layers["a"].reason


def test_untraceable_model_gives_clear_error() -> None:
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2)

        def forward(self, x: Tensor) -> Tensor:
            if x.sum() > 0:
                return self.a(x)
            return x

    with pytest.raises(ValueError, match="cannot trace Dynamic"):
        analyze(Dynamic())


def test_not_a_module() -> None:
    with pytest.raises(TypeError, match="torch.nn.Module"):
        analyze("model")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(REGISTRY))
def test_tracing_restores_training_flags(name: str) -> None:
    model, _ = build(name)
    model.train()
    analyze(model)
    assert all(m.training for m in model.modules())


class Squeezed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv1d(2, 3, 3)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(torch.tanh(self.c(x))).squeeze(-1))


class GapByView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.c(x)) ** 2
        return self.fc(h.view(h.size(0), h.size(1), -1).mean(-1))


@pytest.mark.parametrize("model", [Squeezed(), GapByView()], ids=["squeeze", "view-mean-pow"])
def test_more_global_pool_idioms_are_splittable(model: nn.Module) -> None:
    s = analyze(model)
    assert s.layers["c"].splittable, s.layers["c"].reason
    assert [(c.name, c.block) for c in s.layers["c"].consumers] == [("fc", 1)]


def test_parametrized_layer_reported_with_reason() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    net[0] = nn.utils.parametrizations.weight_norm(net[0])
    info = analyze(net).layers["0"]
    assert not info.splittable and "weight_norm" in info.reason


def test_depthwise_multiplier_named() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(1, 2, 1)
            self.dw = nn.Conv2d(2, 4, 3, groups=2)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(self.dw(self.c(x)).mean((2, 3)))

    assert "channel multiplier 2" in analyze(Net()).layers["c"].reason


class SqueezeNotUnit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv1d(2, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:  # on length 6 the map is 4 long, like n
        return self.fc(torch.tanh(self.c(x)).squeeze(2))


class ViewOtherSize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.c(x))
        return self.fc(h.view(h.size(0), x.size(1), -1).mean(-1))


class KeywordConsumer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f1 = nn.Linear(3, 4)
        self.f2 = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.f2(input=torch.tanh(self.f1(x)))


@pytest.mark.parametrize(
    ("model", "layer", "words"),
    [
        (SqueezeNotUnit(), "c", "not known to have size 1"),
        (ViewOtherSize(), "c", "view"),
        (KeywordConsumer(), "f1", "unsupported argument"),
    ],
)
def test_reshapes_that_would_break_after_a_split_are_refused(
    model: nn.Module, layer: str, words: str
) -> None:
    info = analyze(model).layers[layer]
    assert not info.splittable and words in info.reason, info.reason
