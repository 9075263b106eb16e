"""Size and cost of a model: parameters, FLOPs (``torch.utils.flop_counter``) and CPU latency
(ONNX Runtime)."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from splitgrow._attrs import eval_mode


def parameter_count(model: nn.Module) -> int:
    """Number of trainable and frozen parameters."""
    return sum(p.numel() for p in model.parameters())


def flops(model: nn.Module, example: Tensor) -> int:
    """Floating-point operations of one forward pass on one sample (batch of 1), as counted by
    ``torch.utils.flop_counter`` (a multiply-add counts 2). The model's mode is restored."""
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example[:1])
    return int(counter.get_total_flops())


def latency_ms(
    model: nn.Module, example: Tensor, *, threads: int = 1, warmup: int = 20, repeats: int = 200
) -> dict[str, Any]:
    """CPU latency of one forward pass at batch 1 under ONNX Runtime.

    The model is exported to ONNX in memory (:func:`splitgrow.export.onnx_bytes`), run
    ``warmup`` times, then timed ``repeats`` times one call at a time; the median is reported.

    Args:
        model: the model, on any device and of any float dtype: a float32 CPU copy is timed
            (ONNX Runtime's CPU provider), and the model itself is left as it is.
        example: an input batch; its first sample is the timed input.
        threads: ONNX Runtime intra-op threads.
        warmup: untimed runs first.
        repeats: timed runs.

    Returns:
        ``{"ms": median milliseconds, "runtime": "onnxruntime <version>", "threads", "batch": 1,
        "warmup", "repeats", "statistic": "median"}`` (plain JSON).
    """
    import onnxruntime as ort

    from splitgrow.export import onnx_bytes, onnx_session

    for name, value, least in (
        ("threads", threads, 1),
        ("warmup", warmup, 0),
        ("repeats", repeats, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}")
    x = example[:1].detach().to("cpu", torch.float32)
    cpu = copy.deepcopy(model).to("cpu", torch.float32)
    session = onnx_session(onnx_bytes(cpu, x), threads=threads)
    feed = {"input": x.numpy()}
    run = session.run  # type: ignore[attr-defined]
    for _ in range(warmup):
        run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        run(None, feed)
        times.append(time.perf_counter_ns() - t0)
    return {
        "ms": statistics.median(times) / 1e6,
        "runtime": f"onnxruntime {ort.__version__}",
        "threads": threads,
        "batch": 1,
        "warmup": warmup,
        "repeats": repeats,
        "statistic": "median",
    }


def flops_per_weight(model: nn.Module, example: Tensor) -> dict[str, float]:
    """FLOPs of one forward pass (batch 1) per weight element, for every module with a weight.

    ``torch.utils.flop_counter`` counts a convolution or matrix product as 2 FLOPs per weight
    element per output position (biases, BatchNorm and activations are not counted), so a
    module's count divided by its weight's size is what one more weight element costs: for a
    Conv2d, 2·H_out·W_out; for a Linear on (1, features), 2. Modules it does not count get 0.
    """
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example[:1])
    counts = counter.get_flop_counts()
    root = type(model).__name__
    rates = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and weight.numel():
            total = sum(counts.get(f"{root}.{name}" if name else root, {}).values())
            rates[name] = float(total) / weight.numel() if name else 0.0
    return rates
