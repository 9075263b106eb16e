"""``compare``: every method at the same budget, on the same footing, with a readable report."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

from splitgrow import data
from splitgrow.cli import _parser, main
from splitgrow.compare import METHODS, CompareConfig, run_compare
from splitgrow.compare import methods as methods_module
from splitgrow.compare.methods import fit_shares, uniform_widths
from splitgrow.metrics import parameter_count
from splitgrow.models import Architecture

TINY = {
    "dataset": "digits", "seeds": 2, "epochs": 4, "rounds": 2, "epochs_per_round": 1,
    "tune_trials": 2, "lr_grid": [0.02, 0.05], "nas_trials": 3,
}  # fmt: skip


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("cmp")
    cfg = CompareConfig(model="mlp", widths=[4, 4], budget_params=1200, **TINY)
    return out, run_compare(cfg, out)


def test_every_method_every_seed_within_budget(mlp_run: tuple[Path, list[dict]]) -> None:
    out, records = mlp_run
    ran = [m for m in METHODS if m != "prune-slim"]  # the MLP has no BatchNorm
    assert [(r["method"], r["seed"]) for r in records] == [(m, s) for s in (0, 1) for m in ran]
    keys = {"method", "seed", "params", "flops", "test_acc", "test_loss", "gradient_passes",
            "wall_s", "latency_ms"}  # fmt: skip
    for r in records:
        assert keys <= set(r) and 0 <= r["test_acc"] <= 1 and r["wall_s"] > 0
        assert 0 < r["latency_ms"] < 1000
        assert r["params"] <= 1200
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(records))
    tuning = json.loads((out / "tuning.json").read_text())
    assert "BatchNorm" in tuning["skipped"]["prune-slim"]
    for method, lr in tuning["chosen_lr"].items():
        scores = tuning["val_acc"][method]
        assert set(scores) == {"0.02", "0.05"} and scores[str(lr)] == max(scores.values())
    n = len(data.load("digits").train)
    by = {(r["method"], r["seed"]): r for r in records}
    for seed in (0, 1):
        s2d = by["s2d", seed]
        # scratch trains s2d's final architecture; grow-fresh repeats its growth schedule
        assert by["scratch", seed]["widths"] == s2d["widths"] == by["grow-fresh", seed]["widths"]
        assert s2d["gradient_passes"] == 4 * n == by["uniform", seed]["gradient_passes"]
        assert by["nas-random", seed]["gradient_passes"] == 3 * 4 * n  # every candidate counted
        assert by["prune-l1", seed]["wide_params"] > 1200 >= by["prune-l1", seed]["params"]
        assert len(s2d["trajectory"]) == 4  # after each of the 3 phases, and the final model
        assert len(by["nas-tpe", seed]["candidates"]) == 3
    table = (out / "table.md").read_text()
    for method in ran:
        assert f"| {method} | " in table
    assert "| prune-slim | not run: prune-slim needs BatchNorm" in table
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_slimming_on_a_batchnorm_cnn(tmp_path: Path) -> None:
    cfg = CompareConfig(
        model="cnn", widths=[4, 4, 4, 4], budget_params=2500,
        methods=["prune-slim", "prune-l1", "scratch"], **{**TINY, "seeds": 1, "tune_trials": 1},
    )  # fmt: skip
    records = run_compare(cfg, tmp_path)
    assert [r["method"] for r in records] == ["scratch", "prune-l1", "prune-slim"]
    slim = records[-1]
    assert slim["params"] <= 2500 < slim["wide_params"]
    # s2d ran (for scratch's architecture) but is not reported: it was not asked for
    assert json.loads((tmp_path / "tuning.json").read_text())["chosen_lr"].keys() >= {"s2d"}


def test_widths_that_fit_the_budget() -> None:
    arch = Architecture("mlp", [4, 8], "relu", [40], 10)
    widths = uniform_widths(arch, 6000)
    assert parameter_count(arch.with_widths(widths).build()) <= 6000
    bigger = [w + 1 for w in widths]
    assert parameter_count(arch.with_widths(bigger).build()) > 6000
    assert widths[1] >= 2 * widths[0] - 1  # the shape is kept
    shares = fit_shares(arch, [0.9, 0.1], 6000)
    assert shares[0] > shares[1] and parameter_count(arch.with_widths(shares).build()) <= 6000
    with pytest.raises(ValueError, match="below the smallest model"):
        uniform_widths(arch, 50)


@pytest.mark.parametrize(
    ("epochs", "rounds", "expected"),
    [(150, 5, 5), (60, 6, 3), (40, 5, 2), (100, 5, 5), (10, 5, 1), (20, 0, 5)],
)
def test_the_default_schedule_gives_growth_a_third_of_the_epochs(
    epochs: int, rounds: int, expected: int
) -> None:
    cfg = CompareConfig(epochs=epochs, rounds=rounds, methods=["uniform"])
    assert cfg.epochs_per_round == expected
    assert asdict(cfg)["epochs_per_round"] == expected  # config.json records what ran
    explicit = CompareConfig(epochs=epochs, rounds=1, epochs_per_round=2, methods=["uniform"])
    assert explicit.epochs_per_round == 2


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"methods": ["s2d", "magic"]}, "unknown methods ['magic']"),
        ({"rounds": 5, "epochs": 5}, "5 × 1, its default"),
        ({"rounds": 5, "epochs_per_round": 2, "epochs": 10}, "must be below epochs"),
        ({"tune_trials": 4}, "tune_trials 4 > 3 rates"),
        ({"prune_wide": 1.0}, "prune_wide must be above 1"),
        ({"seeds": 0}, "seeds must be a positive integer"),
        ({"eigen_samples": 0}, "eigen_samples must be a positive integer or None"),
    ],
)
def test_config_errors(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        CompareConfig(**kwargs)


def test_growth_methods_split_on_eigen_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every growth method computes its splitting statistics over ``eigen_samples`` training
    samples (None: all of them); the others never grow."""
    seen: list[tuple[str, int]] = []
    original = methods_module.grow

    def spy(*args: Any, **kwargs: Any) -> Any:
        res = original(*args, **kwargs)
        cfg = kwargs["config"]
        seen.extend((cfg.directions, r["eigen_samples"]) for r in res.history if "split" in r)
        return res

    monkeypatch.setattr(methods_module, "grow", spy)
    n = len(data.load("digits").train)
    for samples, expected in ((100, 100), (None, n)):
        seen.clear()
        cfg = CompareConfig(
            model="mlp", widths=[4, 4], budget_params=1200,
            **{**TINY, "seeds": 1, "tune_trials": 1}, eigen_samples=samples,
            methods=["s2d", "random-split", "uniform"],
        )  # fmt: skip
        run_compare(cfg, tmp_path / str(samples), progress=False)
        assert {d for d, _ in seen} == {"eigen", "random"}
        assert {k for _, k in seen} == {expected}


def test_compare_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", "--dataset", "digits", "--model", "mlp", "--widths", "4", "--budget-params",
            "700", "--methods", "s2d", "uniform", "--seeds", "1", "--epochs", "3", "--rounds", "1",
            "--epochs-per-round", "1", "--tune-trials", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| s2d | " in printed and "| uniform | " in printed and str(out) in printed
    assert json.loads((out / "config.json").read_text())["eigen_samples"] == 4096
    assert main(argv) == 2  # the run directory is not overwritten
    assert "already holds files" in capsys.readouterr().err
    assert main([*argv[:8], "20", *argv[9:], "--overwrite"]) == 2  # budget below the start
    assert "smaller than the starting model" in capsys.readouterr().err
    every = _parser().parse_args(["compare", "--budget-params", "9", "--eigen-samples", "All"])
    assert every.eigen_samples is None
    assert main([*argv, "--overwrite", "--eigen-samples", "0"]) == 2
    err = capsys.readouterr().err
    assert "--eigen-samples: expected a positive integer or 'all', got '0'" in err
    assert torch.__version__
