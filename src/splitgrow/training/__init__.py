"""Training and evaluation, and the growth schedule that calls strategy → surgery."""

from splitgrow.training.fit import Phase, evaluate, make_optimizer, train_phase
from splitgrow.training.grow import GrowConfig, GrowResult, grow

__all__ = ["GrowConfig", "GrowResult", "Phase", "evaluate", "grow", "make_optimizer", "train_phase"]
