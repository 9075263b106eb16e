"""Resuming ``grow`` from any checkpoint ends bit for bit as the uninterrupted run; bad data and
non-finite losses are handled before they can do harm."""

from __future__ import annotations

import io
import json
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _runs import strip_seconds
from torch import nn

from splitgrow import data
from splitgrow.training import GrowConfig, grow
from splitgrow.training.fit import check_data
from splitgrow.training.grow import GrowState


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    return data.load("digits")


class DropoutNet(nn.Module):
    """A conv net with BatchNorm (buffers) and dropout (the global RNG) between splittable
    layers: resuming must restore both."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 8 * 8, 6)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.flatten(torch.tanh(self.bn(self.conv(x))), 1)
        return self.fc2(self.drop(torch.tanh(self.fc1(h))))


def _build() -> nn.Module:
    torch.manual_seed(3)
    return DropoutNet()


def _through_disk(state: GrowState) -> GrowState:
    """The state as a checkpoint gives it back: JSON and ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(state.tensors(), buffer)
    buffer.seek(0)
    meta = json.loads(json.dumps(state.meta()))
    return GrowState.from_parts(meta, torch.load(buffer, weights_only=True))


def _same_model(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_from_every_checkpoint_is_bit_for_bit(digits: data.Dataset, optimizer: str) -> None:
    train = digits.train.batches(64)[:6]
    val = digits.val.batches(512)
    cfg = GrowConfig(
        rounds=2, epochs_per_round=2, batch_size=64, optimizer=optimizer,
        lr=0.05 if optimizer == "sgd" else 0.01, grow_ratio=0.5, seed=5,
    )  # fmt: skip
    saved: list[GrowState] = []
    kw: dict[str, Any] = {"loss_fn": F.cross_entropy, "val_data": val, "config": cfg}
    ref = grow(
        _build(), train, **kw, on_checkpoint=lambda s: saved.append(_through_disk(s)),
        checkpoint_steps=4,
    )  # fmt: skip
    assert ref.stopped == "rounds" and [r["round"] for r in ref.history] == [0, 1, 2]
    assert sum(bool(r.get("split")) for r in ref.history) == 2
    # mid-epoch, epoch-end, after-split and final checkpoints are all there
    kinds = {(s.phase.batch > 0, s.phase.stopped, s.stopped) for s in saved}
    assert {(True, "", ""), (False, "", ""), (False, "epochs", "rounds")} <= kinds
    assert saved[-1].stopped == "rounds"
    for state in saved:
        torch.manual_seed(12345)  # a different global RNG: the checkpoint must restore it
        announced: list[int] = []
        res = grow(
            _build(), train, **kw, resume=state,
            on_record=lambda record, _m, seen=announced: seen.append(record["round"]),
        )  # fmt: skip
        where = f"resumed at round {state.round}, phase {state.phase}"
        assert _same_model(res.model, ref.model), where
        assert strip_seconds(res.history) == strip_seconds(ref.history), where
        assert res.stopped == ref.stopped
        # rounds finished before the checkpoint are not announced again
        assert announced == [r for r in (0, 1, 2) if r >= state.round and not state.stopped]


def test_resume_refuses_another_config_or_model(digits: data.Dataset) -> None:
    train = digits.train.batches(64)[:3]
    cfg = GrowConfig(rounds=1, epochs_per_round=1, batch_size=64, grow_ratio=0.5)
    saved: list[GrowState] = []
    grow(_build(), train, loss_fn=F.cross_entropy, config=cfg, on_checkpoint=saved.append)
    state = _through_disk(saved[-2])  # after the split
    with pytest.raises(ValueError, match="another config"):
        grow(_build(), train, loss_fn=F.cross_entropy, config=GrowConfig(rounds=1), resume=state)
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.Tanh(), nn.Linear(5, 10))
    with pytest.raises(ValueError, match="no splittable layer"):
        grow(other, train, loss_fn=F.cross_entropy, config=cfg, resume=state)
    with pytest.raises(ValueError, match="exactly the keys"):
        GrowState.from_parts({"round": 0}, state.tensors())
    with pytest.raises(ValueError, match="RNG"):
        GrowState.from_parts(state.meta(), {**state.tensors(), "rng": {}})


def test_non_finite_loss_stops_keeps_the_last_good_checkpoint(digits: data.Dataset) -> None:
    train = digits.train.batches(64)[:6]
    cfg = GrowConfig(rounds=2, epochs_per_round=3, batch_size=64, grow_ratio=0.5)
    calls = {"training": 0}

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(out, y)
        if torch.is_grad_enabled() and out.requires_grad:  # a training step, not an evaluation
            calls["training"] += 1
            if calls["training"] == 18 + 8:  # in round 1 (round 0 takes 3 epochs of 6 steps)
                return loss * math.inf
        return loss

    saved: list[GrowState] = []
    res = grow(_build(), train, loss_fn=loss_fn, config=cfg, on_checkpoint=saved.append)
    assert res.stopped == "non-finite" and len(res.history) == 2
    last = res.history[-1]
    assert set(last["non_finite"]) == {"epoch", "batch"} and last["non_finite"]["batch"] < 6
    assert last["epochs"] == last["non_finite"]["epoch"]  # the epochs that did finish
    # the model returned is the one from the start of the failing epoch: finite
    assert all(bool(torch.isfinite(v).all()) for v in res.model.state_dict().values())
    # no checkpoint was made after the loss became non-finite
    assert all(s.phase.non_finite is None for s in saved)
    assert all(all(bool(torch.isfinite(v).all()) for v in s.model.values()) for s in saved)


def _batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 1, 8, 8, generator=gen), torch.tensor([0, 1, 2, 3])) for _ in range(n)]


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda b: [], "train_data is empty"),
        (lambda b: [(b[0][0], b[0][1][:3])], "4 inputs but 3 targets"),
        (lambda b: [b[0], (torch.randn(4, 1, 7, 7), b[1][1])], r"shape \(1, 7, 7\), batch 0"),
        (lambda b: [(torch.randn(4, 3), b[0][1])], "do not fit the model"),
        (lambda b: [(b[0][0].index_fill(0, torch.tensor([1]), math.nan), b[0][1])], "NaN"),
        (lambda b: [(b[0][0], torch.tensor([0, 1, 2, 10]))], r"outside the model's \[0, 10\)"),
        (lambda b: [(b[0][0], torch.tensor([0, -1, 2, 3]))], r"labels in \[-1, 3\]"),
        (lambda b: [(b[0][0], b[0][1].float())], "1-D integer tensor"),
        (lambda b: [b[0][0]], "not an \\(input, target\\) pair"),
    ],
)
def test_bad_data_is_refused_before_training(edit: Any, words: str) -> None:
    model = _build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=words):
        grow(model, edit(_batches()), loss_fn=F.cross_entropy, config=GrowConfig(rounds=0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


def test_check_data_regression_and_val() -> None:
    x = torch.randn(5, 1)
    net = nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 1))
    check_data([(x, torch.randn(5))], net, "regression")
    with pytest.raises(ValueError, match="regression targets must be finite floats"):
        check_data([(x, torch.full((5,), math.inf))], net, "regression")
    with pytest.raises(ValueError, match="task must be"):
        check_data([(x, torch.randn(5))], net, "ranking")
    with pytest.raises(ValueError, match="val_data batch 0 contains NaN"):
        grow(
            _build(), _batches(), loss_fn=F.cross_entropy, config=GrowConfig(rounds=0),
            val_data=[(torch.full((4, 1, 8, 8), math.nan), torch.tensor([0, 1, 2, 3]))],
        )  # fmt: skip


def test_divergence_after_a_mid_epoch_resume_rolls_back_to_the_same_point() -> None:
    toy = data.load("toy1d")
    train = toy.train.batches(32)
    cfg = GrowConfig(rounds=0, epochs_per_round=3, batch_size=32, lr=0.5, seed=1)

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1))

    def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out.squeeze(-1), y)

    saved: list[GrowState] = []
    kw: dict[str, Any] = {"loss_fn": mse, "task": "regression", "config": cfg}
    ref = grow(build(), train, **kw, on_checkpoint=lambda s: saved.append(_through_disk(s)),
               checkpoint_steps=2)  # fmt: skip
    assert ref.stopped == "non-finite" and saved
    for state in saved:
        res = grow(build(), train, **kw, resume=state, checkpoint_steps=2)
        assert res.stopped == "non-finite"
        assert res.history[-1]["non_finite"] == ref.history[-1]["non_finite"]
        assert _same_model(res.model, ref.model), f"resumed at {state.phase}"


def test_tampered_progress_is_refused(digits: data.Dataset) -> None:
    train = digits.train.batches(64)[:3]
    cfg = GrowConfig(rounds=1, epochs_per_round=1, batch_size=64, grow_ratio=0.5)
    saved: list[GrowState] = []
    grow(_build(), train, loss_fn=F.cross_entropy, config=cfg,
         on_checkpoint=lambda s: saved.append(_through_disk(s)))  # fmt: skip
    good = saved[-2]  # after the split
    assert good.pairs  # the split made (parent, offspring) pairs

    def refused(words: str, **change: Any) -> None:
        meta = {**json.loads(json.dumps(good.meta())), **change}
        state = GrowState.from_parts(meta, good.tensors())
        with pytest.raises(ValueError, match=words):
            grow(_build(), train, loss_fn=F.cross_entropy, config=cfg, resume=state)

    layer = next(iter(good.pairs))
    refused(r"twin pair \[0, 999\]", pairs={layer: [[0, 999]]})
    refused("twin pairs name no layer 'nosuch'", pairs={"nosuch": [[0, 1]]})
    refused(r"round 7 is outside \[0, 1\]", round=7)
    refused("the history does not hold rounds", history=[1])
    refused("phase's progress is malformed", phase={**good.phase.to_json(), "batch": -1})
    refused("phase's progress is malformed", phase={**good.phase.to_json(), "batch": 999})
    refused("phase's progress is malformed", phase={**good.phase.to_json(), "stopped": "bogus"})
    refused("phase's progress is malformed", phase={**good.phase.to_json(), "non_finite": "x"})
    refused("epochs done of 1 planned", phase={**good.phase.to_json(), "epoch_losses": [1.0] * 5})
    refused("round True is outside", round=True)
