"""Signed splitting (S3D): offspring may carry outgoing weights of opposite sign.

A neuron θ with outgoing weights c splits into θ + ε·a (outgoing s·c) and θ + ε·b (outgoing
(1 − s)·c). When s·a + (1 − s)·b = 0 the loss changes by

    ΔL = ε²/2 · (s·aᵀSa + (1 − s)·bᵀSb) + O(ε³)

with S the neuron's splitting matrix (docs/signed_splitting.md). With every offspring moving at
most ε (‖a‖, ‖b‖ ≤ 1) and every share at most W in magnitude (``max_share``), the best split is

* positive (s = ½, a = −b = v_min): ΔL ≈ ε²/2 · λ_min, the S2D split;
* negative (s = W, a = (1 − 1/W)·v_max, b = v_max): ΔL ≈ −ε²/2 · (1 − 1/W)·λ_max;

whichever is more negative. So a neuron whose λ_min ≥ 0 ("splitting-stable", where S2D stops) can
still lower the loss when λ_max > 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from splitgrow.splitting import SplitEigen
from splitgrow.strategies.base import Candidates, GrowPlan, RoundContext, register_strategy
from splitgrow.strategies.s2d import _eigen, _summary
from splitgrow.surgery.split import SignedSplit

#: the default bound W on the magnitude of an offspring's share of the outgoing weights
MAX_SHARE = 2.0


def signed_scores(
    lambda_min: Tensor, lambda_max: Tensor, max_share: float = MAX_SHARE
) -> tuple[Tensor, Tensor]:
    """Each neuron's best second-order coefficient and whether its best split is negative.

    Returns:
        ``(score, negative)``: ``score = min(λ_min, −(1 − 1/W)·λ_max)`` (the loss changes by
        ε²/2·score), and ``negative`` (bool) where the negative split wins.

    Raises:
        ValueError: ``max_share`` is not a finite number above 1.
    """
    check_max_share(max_share)
    negative_score = -(1.0 - 1.0 / max_share) * lambda_max
    negative = negative_score < lambda_min
    return torch.where(negative, negative_score, lambda_min), negative


def check_max_share(max_share: float) -> None:
    if not (isinstance(max_share, (int, float)) and math.isfinite(max_share) and max_share > 1):
        raise ValueError(f"max_share must be a finite number above 1, got {max_share!r}")


def signed_split(
    idx: Tensor, v_min: Tensor, v_max: Tensor, negative: Tensor, max_share: float = MAX_SHARE
) -> SignedSplit:
    """The optimal signed split of neurons ``idx`` at unit scale (module docstring).

    Args:
        idx: ``(k,)`` neurons.
        v_min, v_max: ``(k, d)`` unit eigenvectors of their λ_min and λ_max.
        negative: ``(k,)`` bool, the neurons that take the negative split.
        max_share: W, the largest magnitude of a share.
    """
    check_max_share(max_share)
    neg = negative.to(v_min.device)[:, None]
    w = max_share
    parent = torch.where(neg, (1.0 - 1.0 / w) * v_max, v_min)
    offspring = torch.where(neg, v_max, -v_min)
    f64 = torch.float64
    share = torch.where(negative, torch.tensor(w, dtype=f64), torch.tensor(0.5, dtype=f64))
    return SignedSplit(idx, parent, offspring, share)


@register_strategy("s3d")
class SignedSplitting:
    """Signed splitting: candidate i of a unit is its neuron i, scored by its best (positive or
    negative) split's second-order coefficient. Option ``max_share`` (float > 1, default 2): W."""

    kind = "split"
    distributed = True

    def check_options(self, options: Mapping[str, Any]) -> None:
        unknown = set(options) - {"max_share"}
        if unknown:
            raise ValueError(f"unknown s3d options {sorted(unknown)}; known: ['max_share']")
        check_max_share(options.get("max_share", MAX_SHARE))

    def candidates(self, ctx: RoundContext) -> Candidates:
        w = float(ctx.options.get("max_share", MAX_SHARE))
        eig = _eigen(ctx, "both")
        scores, negative = {}, {}
        for k, e in eig.items():
            assert e.max_values is not None
            scores[k], negative[k] = signed_scores(e.values, e.max_values, w)
        record = {
            "lambda_min": _summary({k: e.values for k, e in eig.items()}),
            "signed": {
                k: {"min": float(v.min()), "negative_splits": int((negative[k] & (v < 0)).sum())}
                for k, v in scores.items()
            },
        }
        return Candidates(scores, (eig, negative, w), record)

    def plan(self, ctx: RoundContext, cands: Candidates, chosen: Mapping[str, Tensor]) -> GrowPlan:
        eig: dict[str, SplitEigen]
        eig, negative, w = cands.state
        out = {}
        for k, idx in chosen.items():
            max_vectors = eig[k].max_vectors
            assert max_vectors is not None
            out[k] = signed_split(idx, eig[k].vectors[idx], max_vectors[idx], negative[k][idx], w)
        return GrowPlan(split=out)
