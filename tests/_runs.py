"""Helpers for tests that compare runs."""

from __future__ import annotations

from typing import Any


def strip_seconds(obj: Any) -> Any:
    """``obj`` without its wall times and measured latency (the only things a resumed run may
    not reproduce)."""
    if isinstance(obj, dict):
        timings = ("seconds", "latency_ms")
        return {k: strip_seconds(v) for k, v in obj.items() if k not in timings}
    if isinstance(obj, list):
        return [strip_seconds(v) for v in obj]
    return obj
