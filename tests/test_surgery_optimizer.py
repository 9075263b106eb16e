"""Optimizer state through a split: copied to parents and offspring, or restarted."""

from __future__ import annotations

import pytest
import torch
from _models import build, loss_fn
from torch import nn

from splitgrow.graph import analyze
from splitgrow.surgery import carry_state, split_with_growth


def _trained(
    name: str, opt_cls: type, **kw: float
) -> tuple[nn.Module, torch.optim.Optimizer, list]:
    model, batches = build(name)
    model.train()
    opt = opt_cls(model.parameters(), **kw)
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return model, opt, batches


@pytest.mark.parametrize(
    ("opt_cls", "kw", "key"),
    [
        (torch.optim.Adam, {"lr": 1e-2}, "exp_avg"),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, "momentum_buffer"),
    ],
)
def test_state_copied_to_offspring_rows_and_duplicated_columns(opt_cls, kw, key) -> None:  # type: ignore[no-untyped-def]
    model, opt, batches = _trained("mobile_block", opt_cls, **kw)
    info = analyze(model).layers["c1"]
    idx = torch.tensor([2, 0])
    new, growth = split_with_growth(
        model, {"c1": (idx, torch.randn(2, info.d, dtype=torch.float64))}, eps=0.1
    )
    carried = carry_state(opt, model, new, growth, mode="copy")
    old_p, new_p = dict(model.named_parameters()), dict(new.named_parameters())
    s_old = opt.state[old_p["c1.weight"]][key]
    s_new = carried.state[new_p["c1.weight"]][key]
    assert s_new.shape == new_p["c1.weight"].shape
    assert torch.equal(s_new[:4], s_old) and torch.equal(s_new[4:], s_old[idx])
    for chain_param in ("b1.weight", "dw.weight", "b2.bias"):  # per-channel modules of the chain
        a, b = opt.state[old_p[chain_param]][key], carried.state[new_p[chain_param]][key]
        assert torch.equal(b, torch.cat([a, a[idx]]))
    a, b = opt.state[old_p["c2.weight"]][key], carried.state[new_p["c2.weight"]][key]
    assert torch.equal(b, torch.cat([a, a[:, idx]], dim=1))  # consumer columns duplicated
    a, b = opt.state[old_p["fc.weight"]][key], carried.state[new_p["fc.weight"]][key]
    assert torch.equal(a, b) and a is not b  # untouched layers keep their state, not shared
    if opt_cls is torch.optim.Adam:
        assert torch.equal(
            carried.state[new_p["c1.weight"]]["step"], opt.state[old_p["c1.weight"]]["step"]
        )
    assert carried.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    # and it trains on
    x, y = batches[0]
    carried.zero_grad()
    loss_fn(new(x), y).backward()
    carried.step()


def test_flatten_block_columns_and_reset_mode() -> None:
    model, opt, _ = _trained("mobile_block", torch.optim.Adam, lr=1e-2)
    info = analyze(model).layers["c2"]  # consumer fc reads blocks of 4 columns per channel
    idx = torch.tensor([1])
    new, growth = split_with_growth(
        model, {"c2": (idx, torch.zeros(1, info.d, dtype=torch.float64))}, eps=0
    )
    carried = carry_state(opt, model, new, growth)
    a = opt.state[dict(model.named_parameters())["fc.weight"]]["exp_avg"]
    b = carried.state[dict(new.named_parameters())["fc.weight"]]["exp_avg"]
    assert torch.equal(b, torch.cat([a, a[:, 4:8]], dim=1))
    fresh = carry_state(opt, model, new, growth, mode="reset")
    assert len(fresh.state) == 0 and fresh.param_groups[0]["lr"] == 1e-2
    assert [p.shape for p in fresh.param_groups[0]["params"]] == [p.shape for p in new.parameters()]


def test_carry_errors() -> None:
    model, opt, _ = _trained("mlp", torch.optim.SGD, lr=0.1)
    new, growth = split_with_growth(model, {}, eps=0.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        carry_state(opt, model, new, growth, mode="keep")
    other = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        carry_state(other, model, new, growth)
