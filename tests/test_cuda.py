"""CUDA: with the model on a GPU, every public path runs there and agrees with the CPU.

Skipped where torch sees no CUDA device (as in CI). ``SPLITGROW_TEST_DEVICE=cpu`` runs the same
checks with the CPU standing in for the GPU: a check of the tests themselves, not of CUDA.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _models import REGISTRY, build, loss_fn
from _runs import cli, eigen_cost_agreement

import splitgrow
from splitgrow import data
from splitgrow.cli import main
from splitgrow.compare import METHODS, CompareConfig, run_compare
from splitgrow.models import Architecture
from splitgrow.runs import load_model
from splitgrow.strategies import STRATEGIES
from splitgrow.training import GrowConfig, grow

DEVICE = torch.device(os.environ.get("SPLITGROW_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device"
)


def _on_device(module: torch.nn.Module) -> bool:
    tensors = [*module.parameters(), *module.buffers()]
    return bool(tensors) and all(t.device.type == DEVICE.type for t in tensors)


@pytest.mark.parametrize("method", ["exact", "fast", "auto"])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_eigenpairs_on_the_device_equal_the_cpu_ones(name: str, method: str) -> None:
    """float64; the batches stay on the CPU and are moved batch by batch. The fast route runs to
    a tight tolerance, so that both devices stop at converged values."""
    model, batches = build(name)
    kw = {"method": method, "which": "both", "tol": 1e-9}
    want = splitgrow.splitting_eigen(model, loss_fn, batches, **kw)
    got = splitgrow.splitting_eigen(copy.deepcopy(model).to(DEVICE), loss_fn, batches, **kw)
    assert got.keys() == want.keys()
    for layer, w in want.items():
        g = got[layer]
        assert g.values.device.type == DEVICE.type and g.vectors.device.type == DEVICE.type
        # 1e-6 of each end's scale: CUDA's float64 hardsigmoid is off by 3e-8 (a float32 1/6)
        for got_end, want_end in ((g.values, w.values), (g.max_values, w.max_values)):
            assert got_end is not None and want_end is not None
            scale = float(want_end.abs().max()) + 1e-12
            assert torch.allclose(got_end.cpu(), want_end, rtol=0, atol=1e-6 * scale), layer
        # same eigenvector up to sign, where λ_min is well separated (exact: always here)
        if method == "exact":
            cos = (g.vectors.cpu() * w.vectors).sum(-1).abs()
            assert torch.all(cos > 1 - 1e-6), layer


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_split_neurons_on_the_device(name: str) -> None:
    model, batches = build(name)
    eig = splitgrow.splitting_eigen(model, loss_fn, batches)
    plan = {
        k: (torch.tensor([0, e.values.numel() - 1]), e.vectors[[0, -1]]) for k, e in eig.items()
    }
    want = splitgrow.split_neurons(model, plan, eps=0.1)
    on = {k: (i.to(DEVICE), v.to(DEVICE)) for k, (i, v) in plan.items()}
    got = splitgrow.split_neurons(copy.deepcopy(model).to(DEVICE), on, eps=0.1)
    assert _on_device(got)
    x = batches[0][0]
    out = want(x).detach()  # 1e-7 of the output's scale: CUDA's float64 hardsigmoid, as above
    assert torch.allclose(got(x.to(DEVICE)).cpu(), out, rtol=0, atol=1e-7 * float(out.abs().max()))


@pytest.fixture(scope="module")
def digits64() -> tuple[list, list]:
    d = data.load("digits", seed=0)
    train = [(x.double(), y) for x, y in d.train.batches(128)[:4]]
    val = [(x.double(), y) for x, y in d.val.batches(256)]
    return train, val


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_grow_on_the_device_equals_the_cpu(digits64: tuple[list, list], strategy: str) -> None:
    """Every strategy, float64, two rounds: the same splits and the same weights as on the CPU
    (the data order, line-search batch and solver starts come from CPU generators)."""
    train, val = digits64
    torch.manual_seed(0)
    model = Architecture("mlp", [6, 6], "relu", [1, 8, 8], 10).build().double()
    cfg = GrowConfig(rounds=2, epochs_per_round=1, grow_ratio=0.5, strategy=strategy, batch_size=64)
    runs = {}
    for where in ("cpu", DEVICE):
        start = copy.deepcopy(model).to(where)
        runs[str(where)] = grow(start, train, loss_fn=F.cross_entropy, val_data=val, config=cfg)
    want, got = runs["cpu"], runs[str(DEVICE)]
    assert _on_device(got.model)
    for key in ("split", "new"):  # what was split, and what was added (gradmax adds)
        assert [r.get(key) for r in got.history] == [r.get(key) for r in want.history], key
    assert [r["params"] for r in got.history] == [r["params"] for r in want.history]
    assert got.stopped == want.stopped
    for (k, a), (_, b) in zip(
        got.model.state_dict().items(), want.model.state_dict().items(), strict=True
    ):
        assert torch.allclose(a.cpu(), b, rtol=1e-6, atol=1e-8), k


FAST = [
    "--dataset", "digits", "--model", "cnn", "--widths", "4", "4", "4", "4",
    "--rounds", "2", "--epochs-per-round", "1", "--checkpoint-every", "5", "--seed", "3",
]  # fmt: skip


def _cli(*argv: str, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    # full float32 convolutions, as in the calling process
    return cli(*argv, kill_at=kill_at, NVIDIA_TF32_OVERRIDE="0")


def test_cli_grow_on_the_device_killed_resumed_evaluated_exported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--device cuda``: killed inside the second split, resumed there, then evaluated and
    exported from its checkpoint (which loads on the CPU). TF32 convolutions off, so that the
    float32 runs agree closely enough to make the same splits."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    ref = tmp_path / "ref"
    assert main(["grow", *FAST, "--device", DEVICE.type, "--out", str(ref)]) == 0
    out = tmp_path / "run"
    killed = _cli("grow", *FAST, "--device", DEVICE.type, "--out", str(out), kill_at="split:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert main(["grow", "--resume", str(out), "--device", DEVICE.type]) == 0
    a, b = (json.loads((d / "results.json").read_text()) for d in (ref, out))
    assert a["widths"] == b["widths"] and a["params"] == b["params"]
    assert [r["split"] for r in a["history"][:-1]] == [r["split"] for r in b["history"][:-1]]
    assert abs(a["test"]["accuracy"] - b["test"]["accuracy"]) < 0.05
    model, _ = load_model(out / "model.pt")  # saved from the device, rebuilt on the CPU
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert main(["eval", "--checkpoint", str(out / "model.pt")]) == 0
    assert main(["export", "--checkpoint", str(out / "model.pt"), "--format", "onnx"]) == 0
    # a run killed on the device resumes on the CPU
    moved = tmp_path / "moved"
    killed = _cli("grow", *FAST, "--device", DEVICE.type, "--out", str(moved), kill_at="step:9")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert main(["grow", "--resume", str(moved), "--device", "cpu"]) == 0
    c = json.loads((moved / "results.json").read_text())  # CPU rounding: splits may differ
    assert len(c["history"]) == len(a["history"]) and c["params"] > c["history"][0]["params"]
    assert abs(c["test"]["accuracy"] - a["test"]["accuracy"]) < 0.05


def test_compare_every_method_on_the_device(tmp_path: Path) -> None:
    cfg = CompareConfig(
        dataset="digits", model="cnn", widths=[3, 3, 3, 3], budget_params=3000, seeds=1,
        epochs=4, rounds=2, epochs_per_round=1, tune_trials=1, lr_grid=[0.05], nas_trials=2,
        device=DEVICE.type,
    )  # fmt: skip
    records = run_compare(cfg, tmp_path / "cmp")
    assert [r["method"] for r in records] == list(METHODS)
    for r in records:
        assert r["params"] <= 3000 and 0 <= r["test_acc"] <= 1 and r["wall_s"] > 0, r["method"]
        assert r["test_acc"] > 0.2, r["method"]  # twice chance: it learned on the device
    assert (tmp_path / "cmp" / "pareto.png").is_file()


def test_eigen_cost_benchmark_on_the_device() -> None:
    """The speed benchmark on the device: its timed calls agree with an exact reference on the
    same weights (``test_demo_and_benchmarks`` checks that order on the CPU)."""
    rows = eigen_cost_agreement(
        "--device", DEVICE.type, "--model", "cnn", "--width", "16", "--image", "8",
        "--samples", "32", "--batch", "16", "--repeats", "1", "--methods", "fast,auto",
    )  # fmt: skip
    assert rows.keys() == {"fast", "auto"}
    for good, total in rows.values():
        assert total == 64 and good >= 0.95 * total


def test_cli_grow_under_torchrun_on_the_device(tmp_path: Path) -> None:
    """The launcher's environment on the device: with one process the CLI takes its plain path
    (no process group: one GPU cannot hold two NCCL ranks), and the run equals one without
    torchrun. NCCL itself: the strided all-reduce test below."""
    src = str(Path(splitgrow.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    env.pop("SPLITGROW_KILL_AT", None)
    argv = ["grow", "--model", "mlp", "--dataset", "digits", "--widths", "6", "--rounds", "1",
            "--epochs-per-round", "2", "--device", DEVICE.type, "--no-latency"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "splitgrow.cli", *argv, "--out", str(tmp_path / "dist")]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("dist", "one"))
    assert a["world_size"] == 1 and a["widths"] == b["widths"]
    assert [r["split"] for r in a["history"][:-1]] == [r["split"] for r in b["history"][:-1]]


def test_strided_statistics_sum_in_place_across_processes(tmp_path: Path) -> None:
    """NCCL refuses strided tensors (the fast route's products are permuted views and QR
    factors); ``sum_statistics`` sums them in place all the same. One process: NCCL on the GPU
    (gloo for the CPU stand-in)."""
    import torch.distributed as dist

    from splitgrow import distributed as sgdist

    backend = "nccl" if DEVICE.type == "cuda" else "gloo"
    if DEVICE.type == "cuda":
        torch.cuda.set_device(DEVICE.index or 0)
    dist.init_process_group(backend, init_method=f"file://{tmp_path}/rdv", rank=0, world_size=1)
    try:
        strided = torch.arange(24.0, device=DEVICE).view(2, 3, 4).permute(1, 0, 2)
        plain = torch.ones(3, device=DEVICE, dtype=torch.float64)
        want = strided.clone()
        sums = {"a": strided, "b": plain}
        assert not strided.is_contiguous()
        assert sgdist.sum_statistics(sums, 7, DEVICE) == 7
        assert sums["a"] is strided and torch.equal(strided, want)  # one process: the same
        assert torch.equal(plain, torch.ones(3, device=DEVICE, dtype=torch.float64))
    finally:
        dist.destroy_process_group()
