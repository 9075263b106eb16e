"""Fault injection for the crash-safety tests: a process kills itself with SIGKILL on cue.

``SPLITGROW_KILL_AT="point:n"`` makes the process send itself SIGKILL the n-th time it reaches
``point`` (``step``: after an optimizer step; ``split``: inside a splitting round, after the
eigenpairs; ``checkpoint``: halfway through writing a checkpoint). Unset, it costs one dictionary
lookup. It exists so that tests can kill a real ``splitgrow grow`` at an exact moment; a user
has no reason to set it.
"""

from __future__ import annotations

import os
import signal

_target: tuple[str, int] | None = None
_counts: dict[str, int] = {}
_parsed = False


def _parse() -> None:
    global _target, _parsed
    _parsed = True
    spec = os.environ.get("SPLITGROW_KILL_AT", "")
    point, _, n = spec.partition(":")
    if point and n.isdigit():
        _target = (point, int(n))


def reached(point: str) -> None:
    """Count one arrival at ``point``; die by SIGKILL if it is the one asked for."""
    if not _parsed:
        _parse()
    if _target is None or _target[0] != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == _target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
