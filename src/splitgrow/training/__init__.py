"""Training and evaluation, and the growth schedule that calls strategy → surgery."""

from splitgrow.training.fit import Phase, check_data, evaluate, make_optimizer, train_phase
from splitgrow.training.grow import GrowConfig, GrowResult, GrowState, grow

__all__ = [
    "GrowConfig",
    "GrowResult",
    "GrowState",
    "Phase",
    "check_data",
    "evaluate",
    "grow",
    "make_optimizer",
    "train_phase",
]
