"""The demo (``make demo``) and the benchmark scripts run and print what they promise."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _runs import eigen_cost_agreement

from splitgrow import demo

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_and_preserves_function(capsys: pytest.CaptureFixture[str]) -> None:
    demo.main()
    out = capsys.readouterr().out
    accuracy = float(re.search(r"test accuracy ([\d.]+)%", out).group(1))  # type: ignore[union-attr]
    assert accuracy > 90.0
    assert "not splittable: its channels reach the model output directly" in out
    before, after = re.search(r"training loss ([\d.]+) → ([\d.]+) \(unchanged\)", out).groups()  # type: ignore[union-attr]
    assert before == after
    # at the smaller ε the real loss change is close to the second-order prediction
    real, pred = map(
        float, re.search(r"ε = 0.03: real ΔL = (\S+), second-order ε²/2·Σλ = (\S+)", out).groups()
    )  # type: ignore[union-attr]
    assert real < 0 and pred < 0
    assert abs(real - pred) < 0.5 * abs(pred)


def test_eigen_cost_benchmark_runs_small() -> None:
    rows = eigen_cost_agreement("--width", "4", "--samples", "16", "--batch", "8", "--repeats", "1")
    assert rows.keys() == {"exact", "fast", "auto"}
    for good, total in rows.values():
        assert good >= 0.95 * total


def test_eigen_cost_benchmark_compares_on_the_same_weights() -> None:
    """Measured in one process (as on CUDA), the training epoch's memory trains the model: it
    comes before the calls, so that the exact reference computed after them (no ``exact`` among
    the methods) is on their weights. Measured after them, this setting gave 3/64."""
    rows = eigen_cost_agreement(
        "--peaks-in-process", "--model", "cnn", "--width", "16", "--image", "8",
        "--samples", "32", "--batch", "16", "--repeats", "1", "--methods", "fast,auto",
    )  # fmt: skip
    assert rows.keys() == {"fast", "auto"}
    for good, total in rows.values():
        assert total == 64 and good >= 0.95 * total
