"""The command line through main(argv), the run directory, and safe checkpoint loading."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch

from splitgrow.cli import main
from splitgrow.models import Architecture
from splitgrow.runs import RunDir, load_model

FAST = ["--rounds", "1", "--epochs-per-round", "1", "--widths", "3", "3", "3", "3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(["grow", "--out", str(out), *FAST, "--eigen-micro-batch", "32"]) == 0
    return out


def test_grow_writes_a_readable_run_directory(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in (
        "config.json",
        "log.jsonl",
        "model.pt",
        "model.json",
        "results.json",
        "loss.png",
        "growth.png",
    ):
        assert (run / name).is_file(), name
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((run / "config.json").read_text())
    assert config["cli"]["rounds"] == 1 and config["architecture"]["model"] == "cnn"
    assert config["grow"]["eigen_micro_batch"] == 32
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    results = json.loads((run / "results.json").read_text())
    assert [r["round"] for r in log] == [0, 1] == [r["round"] for r in results["history"]]
    assert results["params"] == log[-1]["params"] > log[0]["params"]
    assert 0.0 <= results["test"]["accuracy"] <= 1.0
    # the final model's CPU latency under ONNX Runtime, and how it was measured
    assert math.isfinite(results["latency_ms"]) and results["latency_ms"] > 0
    assert results["latency"]["runtime"].startswith("onnxruntime ")
    assert results["latency"]["batch"] == 1 and results["latency"]["threads"] == 1
    assert results["widths"] == json.loads((run / "model.json").read_text())["widths"]
    # the grown model is rebuilt from the checkpoint without pickle and evaluates
    model, _ = load_model(run / "model.pt")
    assert sum(p.numel() for p in model.parameters()) == results["params"]
    first, _ = load_model(run / "round0.pt")  # the model as the first phase trained it
    assert sum(p.numel() for p in first.parameters()) == log[0]["params"]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "model.pt")]) == 0
    accuracy = float(capsys.readouterr().out.split("accuracy")[1])
    assert abs(accuracy - results["test"]["accuracy"]) < 1e-4  # printed with 4 decimals


def test_info_lists_registries(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "mnist1d" in out and "mobilenetv1" in out and "s2d" in out
    assert "strategies:  firefly, gradmax, s2d, s3d" in out


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        ([], "the following arguments are required: command"),
        (["grow", "--model", "resnet9000"], "invalid choice: 'resnet9000'"),
        (["grow", "--rounds", "-1"], "must be at least 0: -1"),
        (["grow", "--widths", "0"], "must be positive"),
        (["grow", "--eps", "nan"], "must be a positive number up to 1e+30"),
        (["grow", "--grow-ratio", "2"], "grow_ratio must be in"),
        (
            ["grow", "--widths", "3", "3", "3", "3", "--budget-params", "10"],
            "smaller than the starting model",
        ),
        (["grow", "--dataset", "cifar10"], "needs --data-dir"),
        (
            ["grow", "--device", "cuda"]
            if not torch.cuda.is_available()
            else ["grow", "--lr", "0"],
            "cuda" if not torch.cuda.is_available() else "positive",
        ),
        (["grow", "--model", "cnn1d"], "takes samples of rank 2"),
        (["eval", "--checkpoint", "/nonexistent/model.pt"], "does not exist"),
        (["grow", "--rounds", "2.5"], "not an integer: '2.5'"),
        (["grow", "--lr"], "expected one argument"),
        (["grow", "--round", "3"], "unrecognized arguments: --round"),  # no abbreviations
        (["grow", "--weight-decay", "-1"], "must be a non-negative number up to 1e+30"),
        (["grow", "--max-widths", "wide"], "expected LAYER=WIDTH, got 'wide'"),
        (["grow", "--max-widths", "conv=0"], "must be positive: 0"),
        (["grow", "--model", "mlp", "--max-widths", "fc9=9"], "no splittable layer 'fc9'"),
        (
            ["grow", "--model", "mlp", "--widths", "8", "8", "--max-widths", "1=4"],
            "--max-widths 1=4 is below that layer's starting width 8",
        ),
        (["grow", "--plateau", "-0.1"], "must be a positive number up to 1e+30"),
        (["grow", "--eigen-micro-batch", "0"], "--eigen-micro-batch: must be positive: 0"),
        (["grow", "--carry", "keep"], "invalid choice: 'keep'"),
        (["grow", "--lr", "1e39"], "must be a positive number up to 1e+30: 1e39"),
        (["compare", "--budget-params", "900", "--rounds", "0"], "need at least one growth round"),
    ],
)
def test_bad_input_one_line_exit_2(
    argv: list[str], words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*argv, "--out", str(tmp_path / "r")] if argv[:1] in (["grow"], ["compare"]) else argv
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # no run directory for a refused command


QUICK = ["--model", "mlp", "--widths", "4", "4", "--rounds", "1", "--epochs-per-round", "1"]


def test_run_directory_is_never_clobbered(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    def refused(argv: list[str], words: str) -> None:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and words in err, err

    afile = tmp_path / "afile"
    afile.write_text("mine")
    refused(["grow", *QUICK, "--out", str(afile)], f"--out {afile} is a file")
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    refused(["grow", *QUICK, "--out", str(run)], f"continue that run with --resume {run}")
    refused(["grow", "--resume", str(run)], f"{run / 'config.json'} is missing")
    refused(["grow", "--resume", str(tmp_path / "nope")], "no such run directory")
    refused(["grow", "--resume", str(run), "--lr", "0.1"], "drop --lr")
    assert main(["grow", *QUICK, "--out", str(run), "--overwrite"]) == 0
    assert (run / "notes.txt").read_text() == "mine"  # --overwrite removes run files only
    first = json.loads((run / "results.json").read_text())
    assert main(["grow", *QUICK, "--out", str(run), "--overwrite", "--rounds", "0"]) == 0
    assert json.loads((run / "results.json").read_text())["history"] != first["history"]
    assert len((run / "log.jsonl").read_text().splitlines()) == 1
    assert not (run / "round1.pt").exists()


def test_non_finite_loss_exit_1_keeps_a_usable_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = [*QUICK, "--widths", "8", "8", "--lr", "1e6", "--out", str(out)]
    assert main(["grow", *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("splitgrow: training stopped: the loss became non-finite in round 0")
    assert "model.pt holds the model from the last checkpoint moment before it" in err[-1]
    results = json.loads((out / "results.json").read_text())
    assert results["stopped"] == "non-finite" and "non_finite" in results["history"][-1]
    model, _ = load_model(out / "model.pt")
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _saved(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    arch = Architecture("mlp", [4], "relu", [3], 2)
    return RunDir(tmp_path).save_model(arch.build(), arch)


class _Payload:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path("/tmp/splitgrow_ckpt_pwned").write_text, ("pwned",))


def test_crafted_pickle_checkpoint_refused_and_not_executed(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    marker = Path("/tmp/splitgrow_ckpt_pwned")
    marker.unlink(missing_ok=True)
    torch.save({"weight": _Payload()}, path)  # torch.save pickles the payload object
    with pytest.raises(ValueError, match=f"checkpoint {path} cannot be read safely"):
        load_model(path)
    assert not marker.exists()
    assert main(["eval", "--checkpoint", str(path)]) == 2
    assert not marker.exists()


def test_truncated_foreign_and_mismatched_checkpoints(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot be read safely"):
        load_model(path)
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="cannot be read safely|not a state_dict"):
        load_model(path)
    path = _saved(tmp_path)
    (tmp_path / "model.json").write_text(
        json.dumps(Architecture("mlp", [5], "relu", [3], 2).to_json())
    )
    with pytest.raises(ValueError, match="does not fit architecture model.json"):
        load_model(path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match="architecture .* is not valid"):
        load_model(path)
    (tmp_path / "model.json").unlink()
    with pytest.raises(ValueError, match="no architecture file model.json"):
        load_model(path)


def test_toy_writes_results_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["toy", "--rounds", "2", "--iterations", "30", "--start", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for name in ("s2d", "random", "fixed"):
        assert results[name]["final_loss"] > 0 and results[name]["seconds"] > 0
    assert results["fixed"]["final_width"] == results["s2d"]["final_width"]
    assert (tmp_path / "toy.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert out.count("final MSE") == 3
