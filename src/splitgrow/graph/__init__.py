"""Model structure by tracing: neuron layers, per-channel chains, consumers (no mutation)."""

from splitgrow.graph.analyze import ChainNode, Consumer, LayerInfo, ModelStructure, analyze, trace
from splitgrow.graph.ops import Layout, StepKind

__all__ = [
    "ChainNode",
    "Consumer",
    "LayerInfo",
    "Layout",
    "ModelStructure",
    "StepKind",
    "analyze",
    "trace",
]
