"""What to grow: strategies return a plan and never mutate a module.

Registered strategies (:data:`STRATEGIES`): ``s2d`` (splitting steepest descent), ``s3d`` (signed
splitting), ``gradmax`` (new neurons along the top singular vectors of the gradient correlation)
and ``firefly`` (new neurons and splits optimised jointly, scored by the first-order change).
Selection helpers: :func:`s2d_select` (most negative first, under a budget) and
:func:`energy_select` (an exact 0/1 knapsack under parameter and FLOPs budgets).
"""

from splitgrow.strategies import firefly as _firefly  # noqa: F401  (registers "firefly")
from splitgrow.strategies import gradmax as _gradmax  # noqa: F401  (registers "gradmax")
from splitgrow.strategies import s3d as _s3d  # noqa: F401  (registers "s3d")
from splitgrow.strategies.base import (
    STRATEGIES,
    Candidates,
    GrowPlan,
    RoundContext,
    Strategy,
    register_strategy,
    strategy_for,
)
from splitgrow.strategies.energy import added_flops, energy_select
from splitgrow.strategies.s2d import added_parameters, s2d_select

__all__ = [
    "STRATEGIES",
    "Candidates",
    "GrowPlan",
    "RoundContext",
    "Strategy",
    "added_flops",
    "added_parameters",
    "energy_select",
    "register_strategy",
    "s2d_select",
    "strategy_for",
]
