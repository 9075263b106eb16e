"""The demo (``make demo``) and the benchmark scripts run and print what they promise."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from _runs import eigen_cost_agreement

from splitgrow import demo
from splitgrow.compare import CompareConfig, check_setting

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


def _compare_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_compare", ROOT / "benchmarks/compare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_benchmark_settings_are_valid_comparisons() -> None:
    """Every setting of ``benchmarks/compare.py`` that needs no downloaded data makes a valid
    comparison (its budget above the starting model, its growth schedule within its epochs), and
    the group names run what they say."""
    bench = _compare_script()
    offline = [name for name in bench.SETTINGS if not name.startswith("cifar")]
    assert bench.settings_named("all") == bench.OFFLINE
    assert bench.settings_named("heldout") == bench.HELD_OUT
    assert bench.settings_named("digits-cnn") == ["digits-cnn"]
    assert set(bench.OFFLINE) | set(bench.HELD_OUT) == set(offline)
    assert not set(bench.OFFLINE) & set(bench.HELD_OUT) and len(bench.HELD_OUT) == 5
    for name in offline:
        cfg = CompareConfig(**bench.SETTINGS[name])
        s = check_setting(cfg)
        assert s.rounds * s.epochs_per_round < s.epochs, name
        if name in bench.HELD_OUT:  # the library's defaults, not a schedule chosen for it
            assert "rounds" not in bench.SETTINGS[name], name
            assert "epochs_per_round" not in bench.SETTINGS[name], name


def test_compare_benchmark_writes_its_table(tmp_path: Path) -> None:
    """A quick run of one setting writes the table, with the command and the machine, where the
    script says, under the directory it runs in."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/compare.py"), "heldout-digits-mlp-1500",
         "--quick", "--methods", "s2d", "uniform", "--tag", "t"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "benchmarks/results/compare_heldout-digits-mlp-1500_quick_t.md").read_text()
    assert table.startswith("# compare: heldout-digits-mlp-1500\n")
    assert (
        "Command: `python benchmarks/compare.py heldout-digits-mlp-1500 --quick --methods s2d "
        "uniform --tag t`" in table
    )
    assert "Machine: " in table and "torch " in table
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    rows = {line.split("|")[1].strip(): line for line in lines}
    assert {"s2d", "uniform"} <= rows.keys()
    for method in ("s2d", "uniform"):  # a quick run (6 epochs) need not learn much
        cells = [c.strip() for c in rows[method].split("|")]
        assert 0.0 <= float(cells[2].split("±")[0]) <= 100.0, rows[method]
        assert 0 < int(cells[3]) <= 1500, rows[method]  # the setting's budget
    assert (tmp_path / "runs/bench-heldout-digits-mlp-1500_quick_t/results.json").is_file()
