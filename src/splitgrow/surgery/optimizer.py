"""Optimizer state after a split: carried over to parents and offspring, or restarted.

A split changes parameter shapes, so the optimizer must be rebuilt over the new parameters. With
``mode="copy"`` every per-parameter state tensor shaped like its parameter (SGD's momentum buffer,
Adam's moments …) grows exactly as the parameter did: each offspring row and each duplicated
consumer column gets a copy of its parent's state, and scalar state (Adam's step) is kept. With
``mode="reset"`` the new optimizer starts empty, as a fresh one would (the published recipe; a
fresh Adam causes a loss spike after every split).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from splitgrow.surgery.split import GrowthMap

CARRY_MODES = ("copy", "reset")


def _grow(value: Tensor, like: Tensor, growths: list[Any], fresh: bool = False) -> Tensor:
    value = value.clone()  # never share state with the old optimizer
    for g in growths:
        value = value.index_select(g.dim, g.source.to(value.device))
        if fresh:
            value.index_fill_(g.dim, g.new.nonzero().flatten().to(value.device), 0)
    if value.shape != like.shape:
        raise ValueError(
            f"optimizer state of shape {tuple(value.shape)} does not fit {tuple(like.shape)}"
        )
    return value


def carry_state(
    optimizer: torch.optim.Optimizer,
    old: nn.Module,
    new: nn.Module,
    growth: GrowthMap,
    *,
    mode: str = "copy",
    fresh: bool = False,
) -> torch.optim.Optimizer:
    """A new optimizer of the same class and settings over ``new``'s parameters.

    Args:
        optimizer: the optimizer of ``old`` (every parameter it holds must belong to ``old``).
        old: the model before the split.
        new: the model after the split (from :func:`~splitgrow.surgery.split.split_with_growth`).
        growth: how each parameter grew.
        mode: ``"copy"`` (state carried to parents and offspring) or ``"reset"`` (fresh state).
        fresh: the new slots hold new neurons, not offspring (``add_fresh_neurons``): their
            state starts at zero instead of a copy of the slot they were cut from.

    Raises:
        ValueError: an unknown mode, or an optimizer holding a tensor that is not a parameter of
            ``old``.
    """
    if mode not in CARRY_MODES:
        raise ValueError(f"mode must be one of {CARRY_MODES}, got {mode!r}")
    name_of = {id(p): name for name, p in old.named_parameters()}
    new_params = dict(new.named_parameters())
    groups = []
    for group in optimizer.param_groups:
        names = []
        for p in group["params"]:
            if id(p) not in name_of:
                raise ValueError(
                    "the optimizer holds a tensor that is not a parameter of the model"
                )
            names.append(name_of[id(p)])
        settings = {k: v for k, v in group.items() if k != "params"}
        groups.append((names, settings))
    rebuilt = type(optimizer)(
        [{"params": [new_params[n] for n in names], **settings} for names, settings in groups],
        **optimizer.defaults,
    )
    if mode == "reset":
        return rebuilt
    old_params = dict(old.named_parameters())
    for names, _ in groups:
        for name in names:
            state = optimizer.state.get(old_params[name])
            if not state:
                continue
            target = new_params[name]
            rebuilt.state[target] = {
                key: _grow(value, target, growth.get(name, []), fresh)
                if isinstance(value, Tensor) and value.shape == old_params[name].shape
                else (value.clone() if isinstance(value, Tensor) else value)
                for key, value in state.items()
            }
    return rebuilt
