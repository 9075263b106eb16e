"""The demo (``make demo``) and the benchmark scripts run and print what they promise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

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
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "eigen_cost.py"),
        "--width", "4", "--samples", "16", "--batch", "8", "--repeats", "1",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout
    rows = [
        line for line in out.splitlines() if line.startswith("| exact") or line.startswith("| fast")
    ]
    assert len(rows) == 2
    for row in rows:
        good, total = map(int, row.split("|")[4].strip().split("/"))
        assert good >= 0.95 * total
