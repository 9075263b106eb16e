"""What to grow: strategies return a plan and never mutate a module."""

from splitgrow.strategies.energy import added_flops, energy_select
from splitgrow.strategies.s2d import added_parameters, s2d_select

__all__ = ["added_flops", "added_parameters", "energy_select", "s2d_select"]
