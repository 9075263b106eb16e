"""Running under ``torch.distributed`` (torchrun): every process holds a whole replica.

The plumbing the rest of the package calls, so that the training loop, the splitting statistics
and the growth schedule each gain only a few lines:

* :func:`init_from_env` starts the default process group from torchrun's environment variables
  (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``): gloo on CPU,
  NCCL on CUDA.
* :func:`shard_batch` and :func:`shard_samples` give each process its contiguous part of a batch
  or of a list of batches; the union over the processes is exactly the whole.
* :func:`sum_statistics` all-reduces (sums) the splitting statistics and sample counts, so every
  process gets the eigenpairs of all the shares together, as one process would over the same
  samples (DESIGN.md §1: expectations over all samples).
* :func:`from_main` runs a decision on rank 0 and broadcasts it (or its exception) to every rank.
* :func:`checksum` and :func:`all_agree` check that every rank holds the same model.

Outside ``torch.distributed`` nothing here is called: the callers check a flag first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

T = TypeVar("T")
Batch = tuple[Tensor, Tensor]
#: what torchrun sets in every process it starts
ENV_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether this process was started by torchrun (or alike) as one of several."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def active() -> bool:
    """Whether the default process group is initialised (any world size)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 outside ``torch.distributed``)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Number of processes (1 outside ``torch.distributed``)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process is rank 0 (always true outside ``torch.distributed``): the only
    one that writes the run directory and prints."""
    return rank() == 0


def backend_for(device: str) -> str:
    """``"nccl"`` for ``"cuda"``, ``"gloo"`` for ``"cpu"``.

    Raises:
        ValueError: an unknown device kind, no CUDA device for ``"cuda"``, or the backend is not
            built into this torch.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        if not dist.is_nccl_available():
            raise ValueError("--device cuda under torchrun needs NCCL, which this torch lacks")
        return "nccl"
    if not dist.is_gloo_available():
        raise ValueError("--device cpu under torchrun needs gloo, which this torch lacks")
    return "gloo"


def init_from_env(device: str) -> torch.device:
    """Start the default process group from torchrun's environment; the device of this process.

    Args:
        device: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL; the process uses GPU ``LOCAL_RANK``).

    Raises:
        ValueError: a torchrun variable is missing or malformed, the backend is unavailable, or
            ``LOCAL_RANK`` names a GPU this machine does not have.
    """
    missing = [k for k in ENV_VARS if k not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE is set but {', '.join(missing)} not: start the processes with torchrun"
        )
    try:
        local = int(os.environ["LOCAL_RANK"])
        size = int(os.environ["WORLD_SIZE"])
        global_rank = int(os.environ["RANK"])
    except ValueError as exc:
        raise ValueError(f"torchrun's environment is malformed: {exc}") from None
    if not 0 <= global_rank < size:
        raise ValueError(f"RANK {global_rank} is outside [0, WORLD_SIZE={size})")
    backend = backend_for(device)
    where = torch.device("cpu")
    if device == "cuda":
        count = torch.cuda.device_count()
        if not 0 <= local < count:
            raise ValueError(f"LOCAL_RANK {local} names a GPU, but this machine has {count}")
        where = torch.device("cuda", local)
        torch.cuda.set_device(where)
    dist.init_process_group(backend=backend)
    return where


def shutdown(together: bool = False) -> None:
    """Destroy the default process group if one is initialised.

    ``together`` (the run ended normally on this rank): wait at a barrier first, so that every
    rank tears the group down at the same moment. A rank that finished early (rank 0 still
    writing the run directory) and tore down alone sometimes died with SIGABRT under gloo
    ("terminate called without an active exception"). Not after an exception, which a rank may
    meet alone: the barrier would wait for ranks that never come.
    """
    if active():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def shard_bounds(n: int, world: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``index`` of ``n`` items cut into ``world`` contiguous parts
    whose sizes differ by at most one (the first ``n mod world`` parts are the larger)."""
    base, extra = divmod(n, world)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def shard_batch(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, int]:
    """This process's contiguous part of one (global) batch, and its number of samples.

    When the batch has fewer samples than there are processes, a process left without any gets
    the whole batch and ``0``: it still runs forward and backward (DDP needs every rank's
    gradients), and the caller weighs its loss by ``0``.
    """
    start, stop = shard_bounds(len(y), world_size(), rank())
    if stop == start:
        return x, y, 0
    return x[start:stop], y[start:stop], stop - start


def shard_samples(batches: Sequence[Batch], index: int, world: int) -> list[Batch]:
    """Part ``index`` of the sample stream of ``batches`` (all samples in order, cut into
    ``world`` contiguous parts as :func:`shard_bounds` does), cut again at the batch edges.

    Raises:
        ValueError: fewer samples than parts (a part would be empty).
    """
    sizes = [len(b[1]) for b in batches]
    total = sum(sizes)
    if total < world:
        raise ValueError(f"{total} samples cannot be shared among {world} processes")
    start, stop = shard_bounds(total, world, index)
    out, offset = [], 0
    for (x, y), size in zip(batches, sizes, strict=True):
        lo, hi = max(start, offset) - offset, min(stop, offset + size) - offset
        if lo < hi:
            out.append((x[lo:hi], y[lo:hi]))
        offset += size
    return out


def sum_loss(loss: Tensor, samples: int) -> tuple[float, int]:
    """Σ over the processes of ``loss · samples`` and of ``samples`` (one all-reduce).

    A non-finite loss on any process makes the sum non-finite (``0 · inf`` is NaN too), so every
    process sees it and stops at the same step.
    """
    stats = torch.stack(
        [loss.detach().to(torch.float64) * samples, loss.new_tensor(samples, dtype=torch.float64)]
    )
    dist.all_reduce(stats)
    return float(stats[0]), round(float(stats[1]))


def sum_statistics(sums: dict[str, Tensor], total: int, device: torch.device) -> int:
    """All-reduce (sum) every tensor of ``sums`` in place and the sample count ``total``.

    Every process must hold the same keys with tensors of the same shapes, which is so when each
    one has at least one batch; that is checked first (on every process, so all raise together).

    Returns:
        The number of samples over all processes.

    Raises:
        ValueError: some process had no samples (naming it).
    """
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([total], dtype=torch.int64, device=device))
    empty = [i for i, c in enumerate(counts) if int(c) == 0]
    if empty:
        raise ValueError(
            f"process {empty[0]} of {len(counts)} has no samples: give every process at least "
            "one batch"
        )
    for name in sorted(sums):
        t = sums[name]
        if t.is_contiguous():
            dist.all_reduce(t)
        else:  # NCCL refuses strided tensors (a permuted product, a QR factor); gloo does not
            summed = t.contiguous()
            dist.all_reduce(summed)
            t.copy_(summed)
    return sum(int(c) for c in counts)


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(v, device) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _move(getattr(obj, f.name), device) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **changes)
    return obj


def from_main(fn: Callable[[], T], device: torch.device | None = None) -> T:
    """``fn()`` evaluated on rank 0 only and broadcast to every rank (pickled).

    An exception raised by ``fn`` on rank 0 is raised on every rank, so that none waits forever.
    With ``device``, tensors in the result (in dicts, lists, tuples and dataclasses) travel on
    the CPU and arrive on ``device`` (a CUDA tensor pickled on rank 0 would land on its GPU).
    """
    box: list[Any] = [None]
    if is_main():
        try:
            value = fn()
            box[0] = ("ok", value if device is None else _move(value, torch.device("cpu")))
        except Exception as exc:
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value if device is None else _move(value, device)


def checksum(model: nn.Module) -> str:
    """SHA-256 of the model's state (every parameter and buffer: names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def all_agree(text: str) -> bool:
    """Whether every rank passed the same string (one all-gather)."""
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, text)
    return len(set(gathered)) == 1


def sync_buffers(model: nn.Module) -> None:
    """Broadcast rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them before each forward pass, but every rank's last forward then updates its
    own copy from its own samples: this makes them equal again once a phase ends.
    """
    for buf in model.buffers():
        dist.broadcast(buf, src=0)


def ddp(model: nn.Module) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` (rank 0's parameters and buffers are
    broadcast as it is built, and buffers again before every forward pass)."""
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def require(flag: bool, what: str) -> None:
    """Raise when ``flag`` (a caller's ``distributed=True``) is set without a process group."""
    if flag and not active():
        raise ValueError(
            f"{what}: distributed=True needs torch.distributed's default process group "
            "(torch.distributed.init_process_group, or splitgrow under torchrun)"
        )
