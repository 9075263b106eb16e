"""Helpers for tests that compare runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def cli(*argv: str, kill_at: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m splitgrow.cli ARGV`` in a child process (``env`` added to its environment);
    ``kill_at`` sets ``SPLITGROW_KILL_AT`` (``splitgrow.faults``), which is unset otherwise."""
    full = {k: v for k, v in os.environ.items() if k != "SPLITGROW_KILL_AT"} | env
    if kill_at is not None:
        full["SPLITGROW_KILL_AT"] = kill_at
    return subprocess.run(
        [sys.executable, "-m", "splitgrow.cli", *argv],
        env=full, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def eigen_cost_agreement(*argv: str) -> dict[str, tuple[int, int]]:
    """``benchmarks/eigen_cost.py ARGV`` in a child process: each method's λ_min within 2% of
    exact, as ``(good, total)``."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "eigen_cost.py"
    done = subprocess.run(
        [sys.executable, str(script), *argv], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out: dict[str, tuple[int, int]] = {}
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 4 and "/" in cells[4] and cells[4].replace("/", "").isdigit():
            good, total = cells[4].split("/")
            out[cells[1]] = (int(good), int(total))
    return out


def strip_seconds(obj: Any) -> Any:
    """``obj`` without its wall times and measured latency (the only things a resumed run may
    not reproduce)."""
    if isinstance(obj, dict):
        timings = ("seconds", "latency_ms")
        return {k: strip_seconds(v) for k, v in obj.items() if k not in timings}
    if isinstance(obj, list):
        return [strip_seconds(v) for v in obj]
    return obj
