"""splitting_eigen refuses bad input with errors that name the bad value."""

from __future__ import annotations

import pytest
import torch
from _models import build, loss_fn
from torch import nn

import splitgrow


def _call(**kw):  # type: ignore[no-untyped-def]
    model, batches = build("mlp")
    args = {"model": model, "loss_fn": loss_fn, "batches": batches}
    args.update(kw)
    return splitgrow.splitting_eigen(
        args.pop("model"), args.pop("loss_fn"), args.pop("batches"), **args
    )


@pytest.mark.parametrize(
    ("kw", "error", "words"),
    [
        ({"model": "net"}, TypeError, "torch.nn.Module, got str"),
        ({"loss_fn": 3}, TypeError, "loss_fn must be callable"),
        (
            {"method": "quick"},
            ValueError,
            "method must be one of 'exact', 'fast', 'auto', got 'quick'",
        ),
        ({"which": "middle"}, ValueError, "which must be one of"),
        ({"batchnorm": "train"}, ValueError, "batchnorm must be one of 'running', 'batch'"),
        ({"surrogate_beta": -1.0}, ValueError, "surrogate_beta must be a positive number"),
        ({"surrogate_beta": float("nan")}, ValueError, "surrogate_beta"),
        ({"tol": 0.0}, ValueError, "tol must be in"),
        ({"block": 0}, ValueError, "block must be a positive integer"),
        ({"max_passes": 1.5}, ValueError, "max_passes must be a positive integer"),
        ({"layers": ["net.9"]}, ValueError, "layer 'net.9' is not a neuron layer"),
        ({"layers": ["net.4"]}, ValueError, "layer 'net.4' is not splittable: its channels reach"),
        ({"layers": "net.0"}, TypeError, "not a single string"),
        ({"batches": []}, ValueError, "batches is empty"),
        ({"batches": iter([])}, ValueError, "batches is empty"),
        (
            {"batches": [torch.zeros(2, 5)]},
            ValueError,
            r"batch 0 must be an \(input, target\) pair",
        ),
        ({"batches": [(torch.zeros(0, 5), torch.zeros(0))]}, ValueError, "batch 0 is empty"),
        ({"batches": [("x", torch.zeros(2))]}, TypeError, "batch 0: the input must be a tensor"),
    ],
)
def test_bad_arguments(kw, error, words) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=words):
        _call(**kw)


def test_nan_batch_named() -> None:
    _, batches = build("mlp")
    x, y = batches[1]
    x = x.clone()
    x[0, 0] = float("nan")
    bad = [batches[0], (x, y)]
    with pytest.raises(ValueError, match="batch 1 contains NaN or infinite values"):
        _call(batches=bad)


def test_wrong_shape_reported_by_model() -> None:
    with pytest.raises(RuntimeError):
        _call(batches=[(torch.zeros(3, 7, dtype=torch.float64), torch.zeros(3, dtype=torch.long))])


def test_loss_must_be_scalar_and_finite() -> None:
    with pytest.raises(ValueError, match="scalar tensor"):
        _call(loss_fn=lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"))
    with pytest.raises(ValueError, match="loss of batch 0 is not finite"):
        _call(loss_fn=lambda out, y: out.sum() * float("inf"))


def test_model_without_splittable_layers() -> None:
    model = nn.Sequential(nn.Linear(3, 2)).double()
    batches = [(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(
        ValueError, match="no splittable layer .*0: its channels reach the model output"
    ):
        splitgrow.splitting_eigen(model, loss_fn, batches)


def test_exact_refuses_matrices_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    from splitgrow.splitting import eigen

    monkeypatch.setattr(eigen, "EXACT_MAX_BYTES", 100)
    with pytest.raises(
        ValueError, match="method='exact' needs .* for layer 'net.0' .*use method='fast'"
    ):
        _call()
    assert _call(method="fast")  # the fast route still works
