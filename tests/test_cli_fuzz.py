"""Property: whatever the command line, ``splitgrow`` answers with an exit code — 0, or 2 and one
line on stderr that starts with "splitgrow" — and never a traceback.

Command lines are drawn by Hypothesis from the real option names, values that are right, wrong or
odd for them, and random text. The work behind a valid ``grow``, ``toy`` or ``compare`` command
(training) is replaced by a sentinel, so the property covers the whole of the argument handling:
parsing, data loading, model building, budget and layer checks, run-directory checks and
``--resume``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitgrow import cli
from splitgrow import data as datasets

SUBPARSERS = cli._parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
JUNK = [
    "", " ", "abc", "-1", "2.5", "nan", "inf", "-inf", "1e9", "99999999999999999999", "=", "x=3",
    "1=2", "/nonexistent", ".", "resnet", "cuda", "--", "-", "--bogus", "-h", "\x00", "é",
]  # fmt: skip
junk = st.one_of(st.sampled_from(JUNK), st.text(max_size=5))


def _values(action: argparse.Action) -> st.SearchStrategy[str]:
    """Values for one option: mostly of the right kind (in range or just out of it), some junk."""
    kind = action.type
    if action.choices:
        good: st.SearchStrategy[str] = st.sampled_from(sorted(map(str, action.choices)))
    elif kind in (cli._positive_int, cli._non_negative_int):
        good = st.integers(-1, 40).map(str)
    elif kind in (cli._positive_float, cli._non_negative_float):
        good = st.sampled_from(["0.05", "0.3", "1", "2", "0", "-0.5", "1e-9", "1e30"])
    elif kind is cli._layer_width:
        layers = st.sampled_from(["1", "3", "features.0", "features.3", "fc", "hidden.0", ""])
        good = st.tuples(layers, st.integers(-1, 40)).map(lambda t: f"{t[0]}={t[1]}")
    else:  # paths
        good = st.sampled_from(["DIR", "RUN", "FILE", "new", "/nonexistent", ".", "RUN/model.pt"])
    return st.one_of(good, good, good, junk)


def _option(action: argparse.Action) -> st.SearchStrategy[list[str]]:
    name = st.sampled_from(action.option_strings)
    if action.nargs == 0:
        return name.map(lambda n: [n])
    most = 3 if action.nargs == "+" else 1
    return st.tuples(name, st.lists(_values(action), min_size=1, max_size=most)).map(
        lambda t: [t[0], *t[1]]
    )


def _command(name: str) -> st.SearchStrategy[list[str]]:
    actions = [a for a in SUBPARSERS[name]._actions if a.option_strings]
    options = st.lists(st.one_of([_option(a) for a in actions]), max_size=6)
    body = options.map(lambda groups: [t for g in groups for t in g])
    with_junk = st.tuples(body, st.integers(0, 12), junk).map(
        lambda t: [*t[0][: t[1]], t[2], *t[0][t[1] :]]
    )
    return st.one_of(body, body, body, with_junk).map(lambda tokens: [name, *tokens])


command_lines = st.one_of(
    *[_command(name) for name in sorted(SUBPARSERS)],
    _command("grow"),  # the command with the most to check, twice as often
    st.lists(st.one_of(junk, st.sampled_from(sorted(SUBPARSERS))), max_size=4),
)


PLANTED = json.dumps({"argv": ["grow", "--model", "mlp", "--widths", "3", "--out", "RUN"]})


class Started(Exception):
    """Raised in place of the training of a command that was accepted."""


_real_load = datasets.load
_cache: dict[tuple[str, int], datasets.Dataset] = {}


def _small_load(name: str, *, seed: int = 0, data_dir: Any = None) -> datasets.Dataset:
    """The real loader (so its checks run), but bundled data sets cut small and cached."""
    if name not in ("digits", "mnist1d", "toy1d") or data_dir is not None:
        return _real_load(name, seed=seed, data_dir=data_dir)
    key = (name, 0)
    if key not in _cache:
        _cache[key] = _real_load(name, seed=0)
    d = _cache[key]
    cut = lambda s: datasets.Split(s.x[:64], s.y[:64])  # noqa: E731
    return datasets.Dataset(d.name, cut(d.train), cut(d.val), cut(d.test), d.task, d.classes)


def _start(*args: Any, **kwargs: Any) -> Any:
    raise Started


@contextlib.contextmanager
def _sandbox() -> Iterator[Path]:
    """A fresh working directory with ``DIR`` (empty), ``RUN`` (the folder of a run that made no
    checkpoint yet) and ``FILE`` (not a checkpoint)."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            Path("DIR").mkdir()
            Path("RUN").mkdir()
            Path("RUN/config.json").write_text(PLANTED)
            Path("FILE").write_text("not a checkpoint")
            yield Path(tmp)
        finally:
            os.chdir(old)


def _run(argv: list[str]) -> tuple[Any, str, str, bool]:
    """Exit code (or "started"), stdout, stderr, and whether a run's config.json was written."""
    out, err = io.StringIO(), io.StringIO()
    with (
        _sandbox() as root,
        mock.patch.object(cli, "grow", _start),
        mock.patch.object(cli, "run_toy", _start),
        mock.patch.object(cli, "run_compare", _start),
        mock.patch.object(cli.datasets, "load", _small_load),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            code: Any = cli.main(argv)
        except Started:
            code = "started"
        made_run = any(p.read_text() != PLANTED for p in root.glob("**/config.json"))
    return code, out.getvalue(), err.getvalue(), made_run


@settings(
    max_examples=250,
    deadline=None,
    derandomize=True,  # the same examples in every CI run
    suppress_health_check=[HealthCheck.too_slow],
)
@given(command_lines)
def test_any_command_line_gets_an_exit_code_never_a_traceback(argv: list[str]) -> None:
    code, out, err, made_run = _run(argv)
    assert code in (0, 2, "started"), (argv, code, err)
    assert "Traceback" not in err + out
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("splitgrow"), (argv, err)
    if code == 0 and argv[:1] != ["info"]:
        assert "usage:" in out  # only --help, and info, succeed without doing work
    if code == "started" and argv[:1] == ["grow"] and "--resume" not in argv:
        assert made_run  # the run directory was made before the work started
    if code == 2:
        assert not made_run  # and never for a refused command


@pytest.mark.parametrize(
    "argv",
    [
        ["grow", "--model", "mlp", "--widths", "3", "3"],
        ["grow", "--dataset", "mnist1d", "--model", "cnn1d", "--max-widths", "features.0=9"],
        ["grow", "--dataset", "toy1d", "--model", "rbf1d", "--widths", "2"],
        ["toy", "--start", "3"],
        ["compare", "--budget-params", "900", "--dataset", "digits", "--widths", "4"],
    ],
)
def test_valid_command_lines_reach_the_work(argv: list[str]) -> None:
    """The sentinel is reached for valid commands: the property above is not vacuous."""
    code, _, err, made_run = _run(argv)
    assert code == "started", err
    assert made_run == (argv[0] == "grow")  # compare writes its config inside run_compare


def test_the_property_sees_real_errors() -> None:
    code, _, err, _ = _run(["grow", "--widths", "3", "--budget-params", "1"])
    assert code == 2 and "smaller than the starting model" in err
    code, _, err, _ = _run(["eval", "--checkpoint", "FILE"])
    assert code == 2 and "FILE" in err and torch.__version__  # names the file
