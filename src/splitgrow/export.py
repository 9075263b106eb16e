"""Deployable output: a model exported to ONNX or TorchScript, checked against PyTorch.

ONNX goes through ``torch.onnx.export(..., dynamo=False)``, the TorchScript-based exporter: it
needs nothing beyond ``onnx`` (no ``onnxscript``), handles every registered model, and takes a
fraction of a second on them. PyTorch marks it deprecated, so its warning is silenced here; the
``dynamo=True`` exporter would need ``onnxscript`` as another dependency. The batch dimension is
dynamic in both formats, so the file runs on any batch size; :func:`export_model` checks that by
comparing outputs on a batch of another size than the one traced.
"""

from __future__ import annotations

import copy
import io
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from splitgrow._attrs import eval_mode

FORMATS = ("onnx", "torchscript")
OPSET = 17  # ONNX operator set of the exported graphs
TOLERANCE = 1e-5  # exported vs PyTorch outputs, float32: |Δ| ≤ TOLERANCE · (1 + |y|)


class ExportMismatch(RuntimeError):
    """The exported model's outputs differ from PyTorch's beyond :data:`TOLERANCE`."""


def onnx_bytes(model: nn.Module, example: Tensor) -> bytes:
    """The model as an ONNX graph (opset :data:`OPSET`, dynamic batch), in memory.

    Args:
        model: any module the TorchScript-based exporter traces (its mode is restored).
        example: an input batch, shape (N, *in_shape); its values do not matter.
    """
    buffer = io.BytesIO()
    with eval_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
        # the legacy exporter writes to a file object too (typed as a path only)
        torch.onnx.export(
            model,
            (example,),
            buffer,  # type: ignore[arg-type]
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    return buffer.getvalue()


def onnx_session(graph: bytes | str | Path, threads: int = 1) -> object:
    """An ONNX Runtime CPU session on ``threads`` intra-op threads (and one inter-op thread)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    source = graph if isinstance(graph, bytes) else str(graph)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _run_exported(path: Path, fmt: str, x: Tensor) -> Tensor:
    if fmt == "onnx":
        session = onnx_session(path)
        (array,) = session.run(None, {"input": x.numpy()})  # type: ignore[attr-defined]
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation warning
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        out: Tensor = loaded(x)
    return out


def export_model(
    model: nn.Module, in_shape: tuple[int, ...] | list[int], path: str | Path, fmt: str,
    *, test_batch: int = 8, seed: int = 0,
) -> float:  # fmt: skip
    """Write ``model`` to ``path`` in format ``fmt`` and check it against PyTorch.

    A float32 copy of the model on the CPU is traced on a batch of 2 and compared on a seeded
    standard-normal batch of ``test_batch`` samples; the file is written atomically, and only
    once it matches.

    Args:
        model: the model, on any device and in any floating dtype: a float32 copy of it on the
            CPU is what is exported and compared (the model itself is left as it was).
        in_shape: the shape of one sample.
        path: the file to write.
        fmt: ``"onnx"`` (checked with ONNX Runtime) or ``"torchscript"`` (``torch.jit.trace``,
            checked with ``torch.jit.load``).
        test_batch: samples of the comparison batch.
        seed: seed of the comparison batch.

    Returns:
        The largest absolute difference between the exported model's outputs and PyTorch's.

    Raises:
        ValueError: an unknown ``fmt`` or a ``test_batch`` below 1.
        ExportMismatch: the outputs differ by more than :data:`TOLERANCE` (nothing is written).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if isinstance(test_batch, bool) or not isinstance(test_batch, int) or test_batch < 1:
        raise ValueError(f"test_batch must be a positive integer, got {test_batch!r}")
    path = Path(path)
    shape = tuple(int(s) for s in in_shape)
    model = copy.deepcopy(model).to("cpu", torch.float32)
    gen = torch.Generator().manual_seed(seed)
    traced_on = torch.randn(2, *shape, generator=gen)
    x = torch.randn(test_batch, *shape, generator=gen)
    with eval_mode(model), torch.no_grad():
        expected = model(x)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if fmt == "onnx":
            tmp.write_bytes(onnx_bytes(model, traced_on))
        else:
            with eval_mode(model), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript's deprecation warning
                traced = torch.jit.trace(model, (traced_on,))
                torch.jit.save(traced, str(tmp))
        got = _run_exported(tmp, fmt, x)
        if got.shape != expected.shape:
            raise ExportMismatch(
                f"the exported model gives outputs of shape {tuple(got.shape)}, PyTorch "
                f"{tuple(expected.shape)}"
            )
        diff = (got - expected).abs()
        if not bool((diff <= TOLERANCE * (1 + expected.abs())).all()):
            raise ExportMismatch(
                f"the exported model's outputs differ from PyTorch's by up to "
                f"{float(diff.max()):.3g} (tolerance {TOLERANCE:g})"
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return float(diff.max())
