"""Surgery: the only code that changes a layer's shape (registered per-layer-type handlers)."""

from splitgrow.surgery.handlers import SURGERY, register_surgery, surgery_for
from splitgrow.surgery.optimizer import CARRY_MODES, carry_state
from splitgrow.surgery.split import Growth, GrowthMap, split_neurons, split_with_growth

__all__ = [
    "CARRY_MODES",
    "SURGERY",
    "Growth",
    "GrowthMap",
    "carry_state",
    "register_surgery",
    "split_neurons",
    "split_with_growth",
    "surgery_for",
]
