"""Size and cost of a model: parameters and FLOPs (``torch.utils.flop_counter``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from splitgrow._attrs import eval_mode


def parameter_count(model: nn.Module) -> int:
    """Number of trainable and frozen parameters."""
    return sum(p.numel() for p in model.parameters())


def flops(model: nn.Module, example: Tensor) -> int:
    """Floating-point operations of one forward pass on one sample (batch of 1), as counted by
    ``torch.utils.flop_counter`` (a multiply-add counts 2). The model's mode is restored."""
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example[:1])
    return int(counter.get_total_flops())
