"""Deployable output: ONNX and TorchScript export checked against PyTorch, latency, FLOPs."""

from __future__ import annotations

import math
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from torch import nn

from splitgrow import split_neurons
from splitgrow.cli import main
from splitgrow.export import ExportMismatch, export_model
from splitgrow.graph import analyze
from splitgrow.metrics import flops, latency_ms
from splitgrow.models import Architecture, widths_of
from splitgrow.runs import RunDir


def _grown_resnet() -> tuple[nn.Module, Architecture]:
    """A ResNet-20 with neurons of two units split at ε = 0.3, BatchNorm statistics random."""
    torch.manual_seed(0)
    arch = Architecture("resnet", [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4], "relu", [3, 8, 8], 5)
    model = arch.build()
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
    layers = analyze(model).layers
    names = [k for k, v in layers.items() if v.splittable][:2]
    plan = {k: (torch.tensor([0, 2]), torch.randn(2, layers[k].d, generator=gen)) for k in names}
    grown = split_neurons(model, plan, eps=0.3)
    return grown, arch.with_widths(widths_of(grown))


def _case(name: str) -> tuple[nn.Module, Architecture]:
    if name == "resnet-grown":
        return _grown_resnet()
    torch.manual_seed(0)
    arch = {
        "mlp": Architecture("mlp", [6, 5], "tanh", [7], 3),
        "cnn": Architecture("cnn", [3, 4, 5, 6], "relu", [1, 8, 8], 10),
    }[name]
    return arch.build(), arch


def _run_exported(path: Path, fmt: str, x: torch.Tensor) -> torch.Tensor:
    """Independent of splitgrow.export: ONNX Runtime or torch.jit.load on the written file."""
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        return torch.jit.load(str(path))(x)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet-grown"])
def test_cli_export_matches_pytorch(
    name: str, fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, arch = _case(name)
    checkpoint = RunDir(tmp_path).save_model(model, arch)
    out = tmp_path / f"exported.{fmt}"
    assert (
        main(["export", "--checkpoint", str(checkpoint), "--format", fmt, "--out", str(out)]) == 0
    )
    printed = capsys.readouterr()
    assert printed.err == "" and len(printed.out.strip().splitlines()) == 1
    assert "outputs match PyTorch" in printed.out and ("latency" in printed.out) == (fmt == "onnx")
    # a batch size the export never saw, with values far from the traced ones
    x = 3 * torch.randn(5, *arch.in_shape, generator=torch.Generator().manual_seed(7))
    model.eval()
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(_run_exported(out, fmt, x), expected, atol=1e-5, rtol=1e-5)


def test_export_refuses_a_mismatch_and_writes_nothing(tmp_path: Path) -> None:
    class Noisy(nn.Module):  # differs on every call: no export can match it
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.rand(())

    out = tmp_path / "noisy.onnx"
    with pytest.raises(ExportMismatch, match="differ from PyTorch's"):
        export_model(Noisy(), [3], out, "torchscript")
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary
    with pytest.raises(ValueError, match="format must be one of"):
        export_model(Noisy(), [3], out, "tflite")


def test_a_float64_model_exports_as_a_float32_copy(tmp_path: Path) -> None:
    """Any device and dtype: the float32 CPU copy is exported; the model itself is untouched."""
    torch.manual_seed(0)
    model = Architecture("mlp", [5], "relu", [4], 3).build().double().train()
    diff = export_model(model, [4], tmp_path / "m.onnx", "onnx")
    assert 0 <= diff < 1e-4 and (tmp_path / "m.onnx").is_file()
    assert all(p.dtype == torch.float64 for p in model.parameters()) and model.training
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 4)
    (out,) = session.run(None, {"input": x.numpy()})
    assert torch.allclose(torch.from_numpy(out), model(x.double()).float(), atol=1e-5)


def test_latency_is_a_positive_finite_median() -> None:
    model, arch = _case("cnn")
    result = latency_ms(model, torch.zeros(1, *arch.in_shape), warmup=2, repeats=15)
    assert math.isfinite(result["ms"]) and 0 < result["ms"] < 1000
    assert result["runtime"] == f"onnxruntime {ort.__version__}"
    assert (result["threads"], result["batch"], result["repeats"]) == (1, 1, 15)
    with pytest.raises(ValueError, match="repeats must be an integer of at least 1"):
        latency_ms(model, torch.zeros(1, *arch.in_shape), repeats=0)


def test_flops_of_a_tiny_mlp_equal_a_hand_count() -> None:
    model, arch = _case("mlp")  # 7 → 6 → 5 → 3; a multiply-add counts 2, biases are not counted
    assert flops(model, torch.zeros(4, *arch.in_shape)) == 2 * (7 * 6 + 6 * 5 + 5 * 3)
    torch.manual_seed(0)  # a conv: 2 · C_out · C_in · k² per output position
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    assert flops(conv, torch.zeros(1, 2, 4, 4)) == 2 * (3 * 2 * 9 * 16 + 48 * 2)


def _saved(tmp_path: Path) -> Path:
    model, arch = _case("mlp")
    return RunDir(tmp_path).save_model(model, arch)


@pytest.mark.parametrize(
    "damage",
    ["missing", "truncated", "pickled-module", "foreign-shape", "no-architecture", "bad-format",
     "out-is-checkpoint", "out-folder-missing"],
)  # fmt: skip
def test_bad_checkpoints_and_arguments_exit_2_with_one_line(
    damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _saved(tmp_path)
    args = ["export", "--checkpoint", str(path), "--format", "onnx"]
    if damage == "missing":
        args[2] = str(tmp_path / "absent.pt")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "pickled-module":  # a whole pickled module: refused, never unpickled
        torch.save(nn.Linear(2, 2), path)
    elif damage == "foreign-shape":
        torch.save({"weight": torch.zeros(3, 3)}, path)
    elif damage == "no-architecture":
        path.with_suffix(".json").unlink()
    elif damage == "bad-format":
        args[4] = "tflite"
    elif damage == "out-is-checkpoint":
        args += ["--out", str(path)]
    else:
        args += ["--out", str(tmp_path / "nowhere" / "m.onnx")]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("splitgrow"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
