"""GradMax: new neurons of zero fan-in whose outgoing weights maximise their gradient.

Evci et al., "GradMax: Growing neural networks using gradient information" (ICLR 2022), made
function-preserving for every activation and alive under ReLU (docs/gradmax_firefly.md).

A new neuron with incoming parameters θ (zero weights, bias b) and consumer columns c gets the
incoming gradient ∂L/∂θ = Mᵀc, where M = ∂²L/∂C∂θ at C = 0 (``probe.mixed_hessian``; for a
Linear consumer after a pointwise chain ψ, M = E[Σ_pos g_pos ψ'(b) x̃_posᵀ], g the gradient at
the consumer's output and x̃ the neuron's input patch plus 1; a Conv consumer reads the channel
through its input patches, the unfold of GradMax's paper). For ‖c‖ = r the largest gradient
norm is r·s₁ (s₁ the top singular value of M), reached at c = r·u₁.

Each candidate is inserted as a **± pair**: two neurons with the same incoming parameters
(zero weights) and columns +c and −c, and a pre-activation b > 0 (``bias_site``): when the unit's
first BatchNorm has a bias and sits between the layer and the activation (Conv(bias=False) → BN
→ ReLU, the common CNN block), b is the new channels' BatchNorm bias
(``NewNeurons.chain_bias``) and the layer's bias, if any, stays 0: the zero conv output
normalises to 0 in eval mode (running mean 0, var 1) and in train mode (a constant channel), so
the pre-activation is b in both; a layer bias before BatchNorm would be removed by the batch
mean in train mode. Otherwise b is the layer's bias. The two channels are equal (same chain,
same BatchNorm channel, same padding), so they cancel exactly whatever σ(b) is, in eval and in
train mode: the function is unchanged at insertion for every activation, σ(0) ≠ 0 included.
With b > 0 a ReLU-like unit sits in its linear region and both neurons get the gradients ±Mᵀc,
so neither is dead (a single zero-fan-in ReLU neuron has relu'(0) = 0 and never moves). M is
computed at this operating point with BatchNorm's running statistics; in train mode a new
channel's batch variance starts at 0, so the first SGD steps on it are amplified by up to
1/√eps of BatchNorm (its scale invariance) and its output reaches full size at once.

Scores: the candidates of a unit are its *pairs* (``Candidates.size`` = 2: the loop charges two
neurons per candidate, as a pair costs). Pair j (columns +c_j and −c_j, c_j = r·u_j) scores
−2r²s_j²: each of its neurons has ‖∂L/∂θ‖² = r²s_j², and −‖∇L‖² is the rate dL/dt at which
gradient flow on the new incoming parameters starts to lower the loss (a first SGD step of
learning rate η lowers it by about η·2r²s_j²).

Options (``ctx.options``):
    ``scale`` (float > 0, default 1.0): r, the norm of each new neuron's columns, as a multiple of
        the mean column norm of the unit's existing neurons (of 1.0 when those are all zero).
    ``bias`` (float >= 0, default 1.0): b, the new neurons' pre-activation: the bias of the
        BatchNorm between the layer and the activation, else the layer's bias (recorded per unit
        in ``bias_in``: ``"batchnorm"``, ``"layer"`` or ``"none"``). A bias-free unit with no such
        BatchNorm (none, one after the activation, or one with ``affine=False``) keeps b = 0, and
        is skipped when its zero-fan-in neurons get no gradient (a ReLU-like chain), with the
        reason recorded.
    ``max_pairs`` (int >= 1 or None, default None): at most this many pairs per unit (otherwise
        ⌊n/2⌋, and at most the rank of M).
    ``rank_tol`` (float >= 0, default 1e-8): singular values below ``rank_tol``·s₁ are not offered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from splitgrow._attrs import optional_tensor
from splitgrow.graph.analyze import LayerInfo, analyze
from splitgrow.graph.ops import StepKind
from splitgrow.strategies.base import Candidates, GrowPlan, RoundContext, register_strategy
from splitgrow.strategies.probe import (
    NewNeuronProbe,
    check_int,
    check_keys,
    check_number,
    mixed_hessian,
    outgoing_norms,
    plain_consumer_reason,
)
from splitgrow.surgery.fresh import NewNeurons, first_batchnorm


def _signs(cols: Tensor) -> Tensor:
    """±1 per singular vector (column): the sign that makes its entries sum to a positive number,
    or, where that sum is rounding noise (a consumer whose gradients sum to zero, as a softmax
    head's do), the sign that makes its largest-magnitude entry positive. Either way the same
    on every device."""
    sums = cols.sum(0)
    noise = 64 * torch.finfo(cols.dtype).eps * cols.abs().sum(0)
    largest = cols.gather(0, cols.abs().argmax(0, keepdim=True))[0]
    by_sum = torch.where(sums < 0, -1.0, 1.0)
    by_largest = torch.where(largest < 0, -1.0, 1.0)
    return torch.where(sums.abs() <= noise, by_largest, by_sum).to(cols)


OPTIONS = ("scale", "bias", "max_pairs", "rank_tol")


@dataclass(frozen=True)
class GradMaxOptions:
    """The validated options (module docstring)."""

    scale: float = 1.0
    bias: float = 1.0
    max_pairs: int | None = None
    rank_tol: float = 1e-8

    @staticmethod
    def parse(options: Mapping[str, Any]) -> GradMaxOptions:
        """Validate ``options``.

        Raises:
            ValueError: naming an unknown key or a bad value.
        """
        check_keys(options, OPTIONS, "gradmax")
        return GradMaxOptions(
            scale=check_number(options, "scale", 1.0, low=0.0, strict=True),
            bias=check_number(options, "bias", 1.0, low=0.0, strict=False),
            max_pairs=check_int(options, "max_pairs", None, low=1),
            rank_tol=check_number(options, "rank_tol", 1e-8, low=0.0, strict=False),
        )


def bias_site(info: LayerInfo, modules: Mapping[str, nn.Module]) -> tuple[str, str]:
    """Where a new neuron's bias b goes, and why a neuron of zero fan-in may get no gradient.

    ``"batchnorm"`` when the unit's first BatchNorm has a bias and sits between the layer and
    the first activation (no activation or curved op before it in the chain): b is the new
    channels' BatchNorm bias (``NewNeurons.chain_bias``) and the layer's bias, if any, stays 0,
    so that the pre-activation is b in eval mode and with batch statistics (train mode) alike;
    a layer bias before BatchNorm would be removed by the batch mean in train mode. Otherwise
    ``"layer"`` when the layer has a bias, else ``"none"`` (b = 0).

    Args:
        info: the unit.
        modules: ``dict(model.named_modules())``.

    Returns:
        ``(site, reason)``: ``reason`` describes the arrangement for a skip record.
    """
    bn = first_batchnorm(info, modules)
    has_bias = info.members[0].has_bias
    if bn is not None and bn.module is not None:
        before = info.chain[: info.chain.index(bn)]
        after_act = any(c.kind in (StepKind.ACTIVATION, StepKind.CURVED) for c in before)
        affine = optional_tensor(modules[bn.module], "bias") is not None
        if affine and not after_act:
            return "batchnorm", f"a zero loss gradient; b is the bias of BatchNorm '{bn.module}'"
        if not has_bias:
            where = "follows the activation" if after_act else "has no bias (affine=False)"
            return "none", (
                f"a bias-free layer whose BatchNorm '{bn.module}' {where}: a ReLU-like unit "
                "at 0 is dead"
            )
    if has_bias:
        return "layer", "a zero loss gradient; b is the layer's bias"
    return "none", (
        "a bias-free layer without a BatchNorm before the activation: a ReLU-like unit at 0 is dead"
    )


@dataclass(frozen=True)
class UnitPairs:
    """One unit's pairs: incoming θ (d,), columns (pairs, out, block, *kernel) at norm r."""

    theta: Tensor
    columns: Tensor
    consumer: str
    singular: Tensor  # (pairs,) s_j
    chain_bias: float | None = None  # b in the first BatchNorm's bias (NewNeurons.chain_bias)


@register_strategy("gradmax")
class GradMax:
    """The ``"gradmax"`` strategy (module docstring)."""

    kind = "new"
    distributed = False

    def check_options(self, options: Mapping[str, Any]) -> None:
        GradMaxOptions.parse(options)

    def candidates(self, ctx: RoundContext) -> Candidates:
        """Score every eligible unit's candidate neurons (two per pair, best pair first)."""
        opts = GradMaxOptions.parse(ctx.options)
        structure = analyze(ctx.model)
        modules = dict(ctx.model.named_modules())
        scores: dict[str, Tensor] = {}
        state: dict[str, UnitPairs] = {}
        skipped: dict[str, str] = {}
        bias_in: dict[str, str] = {}  # unit: "batchnorm", "layer" or "none" (bias_site)
        for name in structure.splittable():
            info = structure.layers[name]
            why = plain_consumer_reason(info, modules)
            if why is None and info.n < 2:
                why = "width below 2 (a pair cannot be inserted)"
            if why is not None:
                skipped[name] = why
                continue
            member = info.members[0]
            at, why_zero = bias_site(info, modules)
            chain_bias = opts.bias if at == "batchnorm" else None
            probe = NewNeuronProbe(
                ctx.model, info, 1, ctx.loss_fn, ctx.data, ctx.generator, chain_bias=chain_bias
            )
            ref = probe.ref
            theta = torch.zeros(1, info.d, dtype=ref.dtype, device=ref.device)
            if at == "layer":
                theta[0, member.d - 1] = opts.bias
            m = mixed_hessian(probe, theta)
            u, s, _ = torch.linalg.svd(m, full_matrices=False)
            if s.numel() == 0 or float(s[0]) == 0.0:
                skipped[name] = f"zero-fan-in neurons get no gradient here ({why_zero})"
                continue
            keep = int((s > opts.rank_tol * s[0]).sum())
            pairs = min(keep, info.n // 2, opts.max_pairs or info.n)
            norms = outgoing_norms(info, modules)
            mean = float(norms.mean())
            r = opts.scale * (mean if mean > 0 else 1.0)
            u = u[:, :pairs].T * _signs(u[:, :pairs])[:, None]
            shape = probe.out_shape  # (out, block, *kernel) for one neuron
            columns = (r * u).reshape(pairs, *shape)
            state[name] = UnitPairs(theta[0], columns, probe.consumer, s[:pairs], chain_bias)
            bias_in[name] = at
            scores[name] = -2 * r**2 * s[:pairs] ** 2
        record: dict[str, Any] = {
            "skipped": skipped,
            "bias_in": bias_in,
            "top_singular": {k: float(v.singular[0]) for k, v in state.items()},
        }
        return Candidates(scores, state, record, size={k: 2 for k in scores})

    def plan(self, ctx: RoundContext, cands: Candidates, chosen: Mapping[str, Tensor]) -> GrowPlan:
        """New neurons for the chosen candidates: two per chosen pair.

        Raises:
            ValueError: a unit without candidates, or an index outside its candidates.
        """
        state: dict[str, UnitPairs] = cands.state
        new: dict[str, NewNeurons] = {}
        for name, idx in chosen.items():
            if name not in state:
                raise ValueError(f"chosen unit {name!r} has no gradmax candidates")
            unit = state[name]
            total = unit.columns.shape[0]
            pairs = sorted({int(i) for i in idx.tolist()})
            if pairs and (pairs[0] < 0 or pairs[-1] >= total):
                raise ValueError(f"chosen[{name!r}] must lie in [0, {total}), got {idx.tolist()}")
            if not pairs:
                continue
            cols = unit.columns[pairs]  # (p, out, block, *kernel)
            both = torch.stack([cols, -cols], dim=1).flatten(0, 1)  # +c, −c, +c, −c …
            outgoing = both.movedim(0, 1).flatten(1, 2)  # (out, 2p·block, *kernel)
            theta = unit.theta.expand(2 * len(pairs), -1).clone()
            new[name] = NewNeurons(
                2 * len(pairs), theta, {unit.consumer: outgoing}, chain_bias=unit.chain_bias
            )
        return GrowPlan(new=new)
