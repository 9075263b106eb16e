"""A real ``splitgrow grow`` process killed with SIGKILL at chosen moments, then resumed with
``--resume``, ends with the same model files, log and results as a run that was never killed.

The kills come from ``SPLITGROW_KILL_AT`` (``splitgrow.faults``): the process sends itself SIGKILL
at an exact point — after an optimizer step, inside a splitting round, or halfway through
writing a checkpoint. One more test kills at a moment chosen from outside.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _runs import cli, strip_seconds

from splitgrow.cli import main

# 12 steps per epoch, 2 epochs per phase, 3 phases; a checkpoint every 5 steps, at every epoch
# end, after each split and at the end: 21 checkpoints, 2 file writes each.
ARGS = [
    "--model", "mlp", "--widths", "8", "8", "--rounds", "2", "--epochs-per-round", "2",
    "--checkpoint-every", "5", "--seed", "3",
]  # fmt: skip


def _cli(*argv: str, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    return cli(*argv, kill_at=kill_at)


def _assert_same_run(ref: Path, got: Path) -> None:
    assert strip_seconds(json.loads((got / "results.json").read_text())) == strip_seconds(
        json.loads((ref / "results.json").read_text())
    )
    logs = [
        [strip_seconds(json.loads(line)) for line in (d / "log.jsonl").read_text().splitlines()]
        for d in (ref, got)
    ]
    assert logs[0] == logs[1]
    names = sorted(p.name for p in ref.glob("*.pt"))
    assert names == sorted(p.name for p in got.glob("*.pt")) and "model.pt" in names
    for name in names:
        a = torch.load(ref / name, weights_only=True)
        b = torch.load(got / name, weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not list((got / "checkpoints").glob(".*.tmp"))  # leftovers of a kill are cleaned


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["grow", *ARGS, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize(
    "kill_at",
    [
        "step:7",  # round 0, mid-epoch, after the checkpoint at step 5
        "step:30",  # round 1, second epoch
        "split:2",  # inside the second splitting round
        "checkpoint:1",  # while writing the very first checkpoint (none complete yet)
        "checkpoint:10",  # while writing a later one, between its two files
        "checkpoint:41",  # while writing the final checkpoint, after the last split
    ],
)
def test_killed_and_resumed_run_equals_the_uninterrupted_one(
    reference: Path, tmp_path: Path, kill_at: str
) -> None:
    out = tmp_path / "run"
    killed = _cli("grow", *ARGS, "--out", str(out), kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "results.json").exists()
    assert main(["grow", "--resume", str(out)]) == 0
    _assert_same_run(reference, out)


def test_killed_twice_then_resumed(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _cli("grow", *ARGS, "--out", str(out), kill_at="step:20").returncode == -9
    again = _cli("grow", "--resume", str(out), kill_at="split:1")
    assert again.returncode == -signal.SIGKILL and "resuming" in again.stderr
    assert main(["grow", "--resume", str(out)]) == 0
    _assert_same_run(reference, out)
    # resuming a finished run changes nothing
    before = json.loads((out / "results.json").read_text())
    assert main(["grow", "--resume", str(out)]) == 0
    assert strip_seconds(json.loads((out / "results.json").read_text())) == strip_seconds(before)


def test_killed_from_outside_while_growing(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "SPLITGROW_KILL_AT"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitgrow.cli", "grow", *ARGS, "--epochs-per-round", "6",
         "--out", str(out)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    try:  # kill as soon as the first round is logged: somewhere in the second round
        while not (out / "log.jsonl").exists() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "results.json").exists(), "the run ended before it could be killed"
    ref = tmp_path / "ref"
    assert main(["grow", *ARGS, "--epochs-per-round", "6", "--out", str(ref)]) == 0
    assert main(["grow", "--resume", str(out)]) == 0
    _assert_same_run(ref, out)


class _Payload:
    """Unpickling this would create a file: it must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (Path.touch, (self.marker,))


def _newest(run: Path) -> Path:
    return max((run / "checkpoints").iterdir(), key=lambda d: d.name)


def test_crafted_or_broken_checkpoints_are_refused(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert _cli("grow", *ARGS, "--out", str(out), kill_at="step:30").returncode == -9
    folder = _newest(out)
    state_pt, state_json = folder / "state.pt", folder / "state.json"
    good_pt, good_json = state_pt.read_bytes(), state_json.read_text()
    marker = tmp_path / "pwned"

    def refused(words: str) -> None:
        capsys.readouterr()
        assert main(["grow", "--resume", str(out)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and words in err, err
        assert not (out / "results.json").exists()

    # a pickle payload where the tensors should be
    state_pt.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    refused(f"checkpoint {state_pt} cannot be read safely")
    assert not marker.exists()
    # the same payload inside a torch zip file
    torch.save({"model": _Payload(marker)}, state_pt)
    refused(f"checkpoint {state_pt} cannot be read safely")
    assert not marker.exists()
    state_pt.write_bytes(good_pt[: len(good_pt) // 2])  # truncated
    refused(f"checkpoint {state_pt} cannot be read safely")
    torch.save({"weights": torch.zeros(3)}, state_pt)  # a foreign file of tensors
    refused("is not a splitgrow run state")
    state_pt.write_bytes(good_pt)
    state_json.write_text(good_json[:40])
    refused(f"checkpoint {state_json} is not valid JSON")
    state_json.write_text(json.dumps({"round": 1}))
    refused("exactly the keys")
    state_json.write_text(good_json)
    # a state made with other settings than config.json's
    config = json.loads((out / "config.json").read_text())
    config["argv"] = [*config["argv"], "--lr", "0.01"]
    (out / "config.json").write_text(json.dumps(config))
    refused(f"was made with other settings than {out / 'config.json'}")
    (out / "config.json").write_text("{not json")
    refused("is not a splitgrow config")
    # the files a user might get wrong are untouched by a refused resume: fix them, and it runs
    config["argv"] = config["argv"][:-2]
    (out / "config.json").write_text(json.dumps(config))
    assert main(["grow", "--resume", str(out)]) == 0
    _assert_same_run(reference, out)


def test_resume_keeps_a_setting_whose_default_changed_since(tmp_path: Path) -> None:
    """A run started before ``--eigen-samples`` defaulted to 4096 (its saved command has no such
    option, and it ran on all samples) resumes with the value it ran with, not today's default."""
    out = tmp_path / "run"
    argv = ["grow", *ARGS, "--rounds", "1", "--out", str(out)]
    assert main([*argv, "--eigen-samples", "all"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["cli"]["eigen_samples"] is None and config["grow"]["eigen_samples"] is None
    config["argv"] = [a for a in config["argv"] if a not in ("--eigen-samples", "all")]
    (out / "config.json").write_text(json.dumps(config))
    before = json.loads((out / "results.json").read_text())
    assert main(["grow", "--resume", str(out)]) == 0  # exit 2 ("other settings") before
    assert strip_seconds(json.loads((out / "results.json").read_text())) == strip_seconds(before)
