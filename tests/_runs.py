"""Helpers for tests that compare runs."""

from __future__ import annotations

from typing import Any


def strip_seconds(obj: Any) -> Any:
    """``obj`` without its wall times (the only thing a resumed run may not reproduce)."""
    if isinstance(obj, dict):
        return {k: strip_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [strip_seconds(v) for v in obj]
    return obj
