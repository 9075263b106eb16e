"""Coupled channels (residual adds, elementwise products) and concatenations: units split as one
neuron, against the brute-force Hessian of the real split network, in float64."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn.functional as F
from _bruteforce import blocks, off_block_max, split_hessian
from torch import Tensor, nn

import splitgrow
from splitgrow.cli import main
from splitgrow.models import MODELS, Architecture, widths_of
from splitgrow.runs import load_model
from splitgrow.strategies.s2d import added_parameters
from splitgrow.surgery.fresh import add_fresh_neurons


class SmoothResNet(nn.Module):
    """Stem → identity block → projection block, smooth activations, BN everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(3)
        self.a1 = nn.Conv2d(3, 2, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(2)
        self.a2 = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.proj = nn.Conv2d(3, 4, 1, stride=2, bias=False)
        self.bnp = nn.BatchNorm2d(4)
        self.b1 = nn.Conv2d(3, 2, 3, stride=2, padding=1)
        self.b2 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.bn0(self.stem(x)))
        x = torch.tanh(x + self.bn2(self.a2(F.softplus(self.bn1(self.a1(x))))))
        s = self.bnp(self.proj(x))
        x = F.silu(s + self.bn3(self.b2(torch.tanh(self.b1(x)))))
        return self.fc(x.mean((2, 3)))


class SelfResidual(nn.Module):
    """``x + b(x)``: b reads the stream and writes into it (a consumer and a member)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x.flatten(1)))
        return self.out(torch.sigmoid(h + self.b(h)))


class Gated(nn.Module):
    """A gated unit tanh(a(x)) · sigmoid(b(x)): an elementwise product couples a and b."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(2, 3, 3, padding=1)
        self.out = nn.Conv2d(3, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.a(x)) * torch.sigmoid(self.b(x))).mean((2, 3))


class Dense(nn.Module):
    """Concatenations: BN over two blocks, a conv and a flatten-Linear reading the whole cat."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 2, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(5)
        self.c = nn.Conv2d(5, 2, 1)
        self.fc = nn.Linear(7 * 2 * 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        a = torch.tanh(self.a(x))
        h = torch.cat([a, torch.tanh(self.b(a))], dim=1)
        h = torch.cat([h, torch.sigmoid(self.c(F.softplus(self.bn(h))))], dim=1)
        return self.fc(torch.flatten(F.avg_pool2d(h, 2), 1))


class MLPCat(nn.Module):
    """2-D Linear outputs concatenated along dimension 1 (their features)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 3)
        self.b = nn.Linear(5, 2)
        self.c = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(torch.cat([torch.tanh(self.a(x)), torch.tanh(self.b(x))], dim=1))


class ResMLPBN(nn.Module):
    """A residual MLP block with BatchNorm1d on the branch only: a 2-D join of two layouts."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 3)
        self.b = nn.Linear(3, 3)
        self.bn = nn.BatchNorm1d(3)
        self.c = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        return self.c(torch.tanh(h + self.bn(self.b(h))))


class CatTwice(nn.Module):
    """One unit concatenated twice: a split copies its BatchNorm channel and columns twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.c = nn.Conv2d(6, 2, 1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        return self.fc(self.c(F.softplus(self.bn(torch.cat([h, h], 1)))).mean((2, 3)))


FLAT_INPUT = ("SelfResidual", "MLPCat", "ResMLPBN")

# (model, unit, its members in graph order)
CASES = [
    (SmoothResNet, "stem", ["stem", "a2"]),
    (SmoothResNet, "proj", ["proj", "b2"]),
    (SmoothResNet, "a1", ["a1"]),
    (SelfResidual, "a", ["a", "b"]),
    (Gated, "a", ["a", "b"]),
    (Dense, "a", ["a"]),
    (Dense, "b", ["b"]),
    (Dense, "c", ["c"]),
    (MLPCat, "a", ["a"]),
    (ResMLPBN, "a", ["a", "b"]),
    (CatTwice, "a", ["a"]),
]


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.6)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


def _data(seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(b, 2, 4, 4, generator=gen, dtype=torch.float64),
         torch.randint(0, 3, (b,), generator=gen))
        for b in (3, 2)
    ]  # fmt: skip


def _loss(out: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(out, target)


def test_units_name_their_members_and_consumers() -> None:
    s = splitgrow.analyze(SmoothResNet())
    assert s.splittable() == ["stem", "a1", "proj", "b1"]
    assert [m.name for m in s.layers["stem"].members] == ["stem", "a2"]
    assert sorted(c.name for c in s.layers["stem"].consumers) == ["a1", "b1", "proj"]
    assert s.layers["stem"].d == 2 * 9 + 2 * 9
    assert s.unit_of("b2") == "proj" and "unit 'proj'" in s.layers["b2"].reason
    dense = splitgrow.analyze(Dense()).layers
    fc = next(c for c in dense["b"].consumers if c.name == "fc")
    assert fc.segments == (("a", 3), ("b", 2), ("c", 2)) and fc.block == 4


@pytest.mark.parametrize(
    ("make", "unit", "members"), CASES, ids=lambda v: getattr(v, "__name__", str(v))
)
def test_unit_matrices_equal_the_brute_force_hessian(make, unit: str, members: list[str]) -> None:
    model = _randomise(make(), 0)
    data = _data()
    if make.__name__ in FLAT_INPUT:
        data = [(x.flatten(1)[:, :5], y) for x, y in data]
    eig = splitgrow.splitting_eigen(model, _loss, data, which="both")[unit]
    h = split_hessian(model, unit, _loss, data, members=members)
    s = blocks(h)
    scale = float(s.abs().max())
    assert scale > 1e-6
    assert off_block_max(h) <= 1e-12 * scale  # block-diagonal across the unit's neurons
    values = torch.linalg.eigvalsh(s)
    assert torch.allclose(eig.values, values[:, 0], atol=1e-9 * scale, rtol=0)
    assert eig.max_values is not None
    assert torch.allclose(eig.max_values, values[:, -1], atol=1e-9 * scale, rtol=0)
    sv = torch.einsum("nij,nj->ni", s, eig.vectors)
    assert torch.allclose(sv, eig.values[:, None] * eig.vectors, atol=1e-8 * scale, rtol=0)


@pytest.mark.parametrize(("make", "unit"), [(SmoothResNet, "stem"), (SmoothResNet, "proj"),
                                            (Dense, "a"), (Dense, "b"), (Gated, "a")])  # fmt: skip
def test_real_split_changes_the_loss_by_half_lambda_eps_squared(make, unit: str) -> None:
    model = _randomise(make(), 3)
    data = _data()
    eig = splitgrow.splitting_eigen(model, _loss, data)[unit]
    i = int(eig.values.argmin())

    @torch.no_grad()
    def loss(m: nn.Module) -> float:
        total = sum(float(_loss(m(x), y)) * len(x) for x, y in data)
        return total / sum(len(x) for x, _ in data)

    base = loss(model)
    eps = 1e-3
    plan = {unit: (torch.tensor([i]), eig.vectors[i : i + 1])}
    split = splitgrow.split_neurons(model, plan, eps=eps).eval()
    ratio = 2 * (loss(split) - base) / eps**2
    assert abs(ratio - float(eig.values[i])) <= 1e-4 * abs(float(eig.values[i])) + 1e-7


def _all_units_plan(model: nn.Module, gen: torch.Generator) -> dict:
    s = splitgrow.analyze(model)
    plan = {}
    for unit in s.splittable():
        info = s.layers[unit]
        k = min(info.n, 2)
        idx = torch.randperm(info.n, generator=gen)[:k]
        plan[unit] = (idx, torch.randn(k, info.d, generator=gen, dtype=torch.float64))
    return plan


@pytest.mark.parametrize("make", [SmoothResNet, SelfResidual, Gated, Dense, MLPCat, ResMLPBN,
                                  CatTwice])  # fmt: skip
def test_function_preserved_at_eps_zero(make) -> None:
    model = _randomise(make(), 5)
    x = _data()[0][0]
    x = x.flatten(1)[:, :5] if make.__name__ in FLAT_INPUT else x
    plan = _all_units_plan(model, torch.Generator().manual_seed(0))
    grown = splitgrow.split_neurons(model, plan, eps=0.0).eval()
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert torch.allclose(grown(x), model(x), atol=1e-12, rtol=0)
    # and again on the grown model: the segments of a concatenation moved, the maps follow
    again = splitgrow.split_neurons(grown, _all_units_plan(grown, torch.Generator()), eps=0.0)
    with torch.no_grad():
        assert torch.allclose(again.eval()(x), model(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("name", "widths"),
    [
        ("resnet", [3, 2, 4, 4, 3, 2, 5, 2, 3]),
        ("resnet", [2, 3, 3, 2, 4, 3]),
        ("mobilenetv2", [3, 4, 2, 5, 6, 3, 2, 4, 5, 3, 4]),
        ("densenet", [3, 2, 4, 1, 2]),
    ],
)
def test_registry_variants_preserve_function_and_rebuild(name: str, widths: list[int]) -> None:
    torch.manual_seed(0)
    arch = Architecture(name, widths, MODELS[name].default_activation, [2, 8, 8], 3)
    model = _randomise(arch.build(), 7)
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    plan = _all_units_plan(model, torch.Generator().manual_seed(1))
    grown = splitgrow.split_neurons(model, plan, eps=0.0).eval()
    with torch.no_grad():
        assert torch.allclose(grown(x), model(x), atol=1e-12, rtol=0)
    rebuilt = arch.with_widths(widths_of(grown)).build().double().eval()
    rebuilt.load_state_dict(grown.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), grown(x))


def test_added_parameter_cost_counts_every_copy() -> None:
    """What ``grow`` charges a split against the budget is what the split adds: copies inside a
    repeated concatenation, and a member reading its own unit (a new row meets a new column)."""
    added_by = importlib.import_module("splitgrow.training.grow")._added
    for make in (SmoothResNet, Dense, CatTwice, MLPCat, ResMLPBN, SelfResidual):
        model = make()
        s = splitgrow.analyze(model)
        modules = dict(model.named_modules())
        costs = {u: added_parameters(s.layers[u], modules) for u in s.splittable()}
        for unit in s.splittable():
            info = s.layers[unit]
            idx = torch.arange(min(2, info.n))
            grown = splitgrow.split_neurons(
                model, {unit: (idx, torch.zeros(len(idx), info.d))}, eps=0.0
            )
            added = sum(p.numel() for p in grown.parameters())
            added -= sum(p.numel() for p in model.parameters())
            assert added_by({unit: idx}, s, modules, costs) == added, (make.__name__, unit)


def test_members_of_a_blocked_unit_say_why() -> None:
    class StreamOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.b = nn.Linear(3, 3)
            self.c = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            h = torch.tanh(self.a(x))
            y = h + self.b(h)
            return self.c(torch.tanh(y)), y

    layers = splitgrow.analyze(StreamOut()).layers
    assert "reach the model output" in layers["a"].reason
    assert "'a', which cannot be split: its channels reach the model output" in layers["b"].reason


def test_fresh_neurons_in_coupled_units_and_concatenations() -> None:
    for make in (SmoothResNet, Dense):
        model = _randomise(make(), 2)
        x = _data()[0][0]
        counts = {u: 1 for u in splitgrow.analyze(model).splittable()}
        grown, growth, pairs = add_fresh_neurons(model, counts, generator=torch.Generator())
        with torch.no_grad():
            assert torch.allclose(grown.eval()(x), model(x), atol=1e-12, rtol=0)
        s = splitgrow.analyze(grown)
        for unit in counts:  # the new neurons' rows are drawn afresh in every member
            info = s.layers[unit]
            ((parent, child),) = pairs[unit]
            for m in info.members:
                w = dict(grown.named_modules())[m.name].weight
                assert not torch.equal(w[parent], w[child])
        assert all(g.new.any() for gs in growth.values() for g in gs)


# ------------------------------------------------------------------------------------------
# torchvision's standard definitions, written as ordinary modules at reduced width.


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """torchvision.models.resnet18's structure, base width ``w`` instead of 64."""

    def __init__(self, w: int = 4, num_classes: int = 5) -> None:
        super().__init__()
        self.inplanes = w
        self.conv1 = nn.Conv2d(3, w, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        self.layer1 = self._make_layer(w, 2)
        self.layer2 = self._make_layer(2 * w, 2, stride=2)
        self.layer3 = self._make_layer(4 * w, 2, stride=2)
        self.layer4 = self._make_layer(8 * w, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * w, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden, kernel=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision.models.mobilenet_v2's structure at width multiplier ``mult`` (channels rounded
    to multiples of 4), with a last conv of ``last`` channels instead of 1280."""

    def __init__(self, mult: float = 0.25, last: int = 32, num_classes: int = 5) -> None:
        super().__init__()

        def div(v: float) -> int:
            return max(4, int(v + 2) // 4 * 4)

        settings = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2],
                    [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]  # fmt: skip
        c = div(32 * mult)
        features: list[nn.Module] = [ConvBNReLU(3, c, stride=2)]
        for t, ch, n, s in settings:
            out = div(ch * mult)
            for i in range(n):
                features.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        features.append(ConvBNReLU(c, last, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


@pytest.mark.parametrize("make", [ResNet18, MobileNetV2])
def test_torchvision_style_models_trace_compute_and_split(make) -> None:
    torch.manual_seed(0)
    model = make().double().eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    data = [(x, torch.arange(4) % 5)]
    s = splitgrow.analyze(model)
    blocked = {k: v.reason for k, v in s.layers.items() if not v.splittable and v.unit is None}
    assert list(blocked) == ["fc" if make is ResNet18 else "classifier.1"], blocked
    eig = splitgrow.splitting_eigen(model, _loss, data, method="auto")
    assert set(eig) == set(s.splittable())
    if make is ResNet18:  # the four residual streams, each one unit with its shortcut convs
        streams = [u for u in s.splittable() if len(s.layers[u].members) > 1]
        assert streams == ["conv1", "layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2"]
        assert [m.name for m in s.layers["layer2.0.conv2"].members] == [
            "layer2.0.conv2",
            "layer2.0.downsample.0",
            "layer2.1.conv2",
        ]
        assert all(float(eig[u].values.min()) < 0 for u in streams)
    else:  # linear bottlenecks: the streams have no curvature at all
        streams = [u for u in s.splittable() if len(s.layers[u].members) > 1]
        assert len(streams) == 5 and all(eig[u].route == "zero" for u in streams)
    plan = {u: (e.values.argmin().reshape(1), e.vectors[e.values.argmin()][None]) for u, e in
            eig.items()}  # fmt: skip
    grown = splitgrow.split_neurons(model, plan, eps=0.0).eval()
    with torch.no_grad():
        assert torch.allclose(grown(x), model(x), atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    ("model", "widths"), [("resnet", ["4", "3", "4", "3", "4", "3"]), ("densenet", ["4", "3", "3"])]
)
def test_cli_grows_residual_and_dense_models_end_to_end(
    tmp_path, model: str, widths: list[str]
) -> None:
    out = tmp_path / model
    argv = ["grow", "--model", model, "--dataset", "digits", "--widths", *widths,
            "--rounds", "2", "--epochs-per-round", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    split = [r["split"] for r in results["history"] if r.get("split")]
    assert split, results["history"]  # at least one round split something
    assert sum(results["widths"]) > sum(int(w) for w in widths)
    grown, _ = load_model(out / "model.pt")
    assert sum(p.numel() for p in grown.parameters()) == results["params"]
    if model == "resnet":  # a stream unit grew: its projection and blocks' convs together
        s = splitgrow.analyze(grown)
        stream = s.layers["blocks.1.shortcut.0"]
        assert len(stream.members) == 2 and stream.n == results["widths"][2]
