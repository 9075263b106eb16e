"""splitgrow: grow small, fast neural networks by splitting steepest descent.

Public API:

* :func:`splitting_eigen` — every neuron's splitting eigenpairs over a data set;
* :func:`split_neurons` — split chosen neurons of a model (a new model; the input is untouched);
* :func:`analyze` — which layers are splittable, their per-channel chains and consumers, and why
  a layer is not splittable;
* :func:`grow` — the growth loop (:class:`GrowConfig`), resumable from a :class:`GrowState`
  (saved and read by :class:`splitgrow.runs.RunDir` and :func:`splitgrow.runs.load_state`).
"""

from splitgrow.graph import LayerInfo, ModelStructure, analyze
from splitgrow.splitting import SplitEigen, splitting_eigen
from splitgrow.surgery import split_neurons
from splitgrow.training import GrowConfig, GrowResult, GrowState, grow

__version__ = "0.1.0"

__all__ = [
    "GrowConfig",
    "GrowResult",
    "GrowState",
    "LayerInfo",
    "ModelStructure",
    "SplitEigen",
    "__version__",
    "analyze",
    "grow",
    "split_neurons",
    "splitting_eigen",
]
