"""Surgery: the only code that changes a layer's shape (registered per-layer-type handlers)."""

from splitgrow.surgery.handlers import SURGERY, register_surgery, surgery_for
from splitgrow.surgery.split import split_neurons

__all__ = ["SURGERY", "register_surgery", "split_neurons", "surgery_for"]
