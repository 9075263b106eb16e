"""Workers for tests/test_distributed.py: each runs in one of several spawned processes.

``spawn(fn, world, folder, *args)`` starts ``world`` processes joined by gloo through a file in
``folder``; each calls ``fn(rank, world, *args)`` and saves what it returns to
``folder/rank<r>.pt``; the list of those results comes back, in rank order.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _models import REGISTRY, build, loss_fn
from torch import Tensor

from splitgrow import distributed as sgdist
from splitgrow import splitting_eigen
from splitgrow.compare import CompareConfig, make_setting, run_compare
from splitgrow.data import Split
from splitgrow.models import Architecture
from splitgrow.training import GrowConfig, GrowState, grow

Batches = list[tuple[Tensor, Tensor]]


def spawn(fn_name: str, world: int, folder: Path, *args: Any) -> list[Any]:
    mp.spawn(_entry, args=(world, str(folder), fn_name, args), nprocs=world, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _entry(rank: int, world: int, folder: str, fn_name: str, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world
    )
    try:
        out = globals()[fn_name](rank, world, *args)
        torch.save(out, Path(folder) / f"rank{rank}.pt")
    except BaseException:
        sgdist.shutdown()
        raise
    # tear down together, as the CLI does: a rank that left alone sometimes died with SIGABRT
    sgdist.shutdown(together=True)


# ---------------------------------------------------------------------------------------------
# splitting statistics


def eigen_all(rank: int, world: int) -> dict[str, Any]:
    """Every registry model, exact and fast, on this rank's share of its batches."""
    out: dict[str, Any] = {}
    for name in REGISTRY:
        model, batches = build(name)
        share = sgdist.shard_samples(batches, rank, world)
        for method in ("exact", "fast"):
            eig = splitting_eigen(
                model, loss_fn, share, method=method, which="both", tol=1e-6, distributed=True
            )
            out[f"{name}/{method}"] = {
                k: (e.values, e.vectors, e.max_values, e.samples, e.passes) for k, e in eig.items()
            }
    # a rank without samples: every rank raises (none waits forever)
    model, batches = build("mlp")
    try:
        splitting_eigen(model, loss_fn, batches if rank == 0 else [], distributed=True)
        out["empty"] = "no error"
    except ValueError as exc:
        out["empty"] = str(exc)
    return out


# ---------------------------------------------------------------------------------------------
# growth


def synthetic(n: int = 97, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` float64 samples of 6 features, 3 classes from a random teacher."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    teacher = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    y = torch.tanh(x @ teacher) + 0.3 * torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return x, y.argmax(1)


def mlp(widths: tuple[int, ...] = (3, 3)) -> torch.nn.Module:
    torch.manual_seed(0)
    return Architecture("mlp", list(widths), "tanh", [6], 3).build().double()


CONFIGS: dict[str, dict[str, Any]] = {
    # exact eigenpairs, ε by line search (rank 0 decides), SGD; batches 32, 32, 32, 1: the last
    # one leaves rank 1 without a sample
    "exact": {"rounds": 2, "epochs_per_round": 2, "batch_size": 32, "method": "exact",
              "grow_ratio": 0.5, "lr": 0.1},
    # fast eigenpairs, Adam, relative ε, uneven shares (batches 25, 25, 25, 22 → 13/12, 11/11);
    # the splitting statistics over a drawn subset of 61 of the 97 samples (25, 25, 11)
    "fast": {"rounds": 2, "epochs_per_round": 1, "batch_size": 25, "method": "fast",
             "eps_mode": "relative", "optimizer": "adam", "lr": 0.01, "grow_ratio": 0.5,
             "eigen_samples": 61, "checkpoint": True},
}  # fmt: skip


def grow_run(
    distributed: bool, name: str, resume: GrowState | None = None
) -> tuple[dict[str, Tensor], list[dict[str, Any]], str, list[GrowState]]:
    kwargs = dict(CONFIGS[name])
    keep = kwargs.pop("checkpoint", False)
    cfg = GrowConfig(**kwargs)
    x, y = synthetic()
    states: list[GrowState] = []

    def on_checkpoint(state: GrowState) -> None:  # keep the one taken right after round 0's split
        if keep and state.round == 1 and state.phase.epoch == 0 and not state.phase.step:
            states.append(_copy_state(state))

    res = grow(
        mlp(), [(x[i : i + 20], y[i : i + 20]) for i in range(0, len(y), 20)],
        loss_fn=F.cross_entropy, config=cfg, distributed=distributed, resume=resume,
        on_checkpoint=on_checkpoint,
    )  # fmt: skip
    state = {k: v.detach().clone() for k, v in res.model.state_dict().items()}
    return state, res.history, sgdist.checksum(res.model), states


def _copy_state(state: GrowState) -> GrowState:
    return GrowState.from_parts(
        copy.deepcopy(state.meta()),
        {
            "model": {k: v.clone() for k, v in state.model.items()},
            "optimizer": copy.deepcopy(state.optimizer),
            "rng": {k: v.clone() for k, v in state.rng.items()},
        },
    )


def grow_all(rank: int, world: int, resume: GrowState | None) -> dict[str, Any]:
    out: dict[str, Any] = {name: grow_run(True, name) for name in CONFIGS}
    if resume is not None:  # continue a single-process checkpoint on several processes
        # (a private copy: spawn hands both processes the same shared-memory tensors)
        out["resumed"] = grow_run(True, "fast", _copy_state(resume))
    # BatchNorm: per-rank batch statistics in training; every rank must still end identical
    torch.manual_seed(0)
    model = Architecture("cnn1d", [2, 2, 2, 2], "relu", [1, 12], 3).build().double()
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(40, 1, 12, generator=gen, dtype=torch.float64)
    ys = torch.randint(0, 3, (40,), generator=gen)
    cfg = GrowConfig(rounds=1, epochs_per_round=1, batch_size=10, method="exact", lr=0.05)
    res = grow(model, [(xs, ys)], loss_fn=F.cross_entropy, config=cfg, distributed=True)
    out["bn"] = (sgdist.checksum(res.model), res.history)
    assert math.isfinite(res.history[-1]["train_loss"])
    try:  # fewer samples than processes: refused on every rank, before any collective call
        grow(mlp(), [synthetic(1)], loss_fn=F.cross_entropy, config=cfg, distributed=True)
        out["too_few"] = "no error"
    except ValueError as exc:
        out["too_few"] = str(exc)
    return out


# ---------------------------------------------------------------------------------------------
# compare

#: a tiny comparison: one growth method and the one built on its run, pruning and a search
COMPARE = CompareConfig(
    dataset="digits", model="mlp", widths=[4, 4], activation="tanh", budget_params=600,
    methods=["s2d", "grow-fresh", "prune-l1", "nas-tpe"], seeds=1, epochs=6, rounds=2,
    epochs_per_round=1, lr_grid=[0.5], tune_trials=1, batch_size=32, nas_trials=2,
)  # fmt: skip


@contextmanager
def float64() -> Iterator[None]:
    """Models built inside are float64 (``Architecture.build`` follows the default dtype), and
    torch uses one thread (on tiny models threads only contend: 10× slower on 2 busy cores)."""
    old, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
        torch.set_num_threads(threads)


def compare_run(out: Path, distributed: bool) -> list[dict[str, Any]]:
    """:data:`COMPARE` in float64 on a part of digits (121 training samples: batches of 32, 32,
    32, 25, so shares of 16/16 and 13/12)."""
    s = make_setting(COMPARE)

    def part(split: Split, n: int) -> Split:
        return Split(split.x[:n].double(), split.y[:n])

    data = dataclasses.replace(
        s.data, train=part(s.data.train, 121), val=part(s.data.val, 60),
        test=part(s.data.test, 60),
    )  # fmt: skip
    with float64():
        return run_compare(
            COMPARE, out, setting=dataclasses.replace(s, data=data), distributed=distributed
        )


def compare_all(rank: int, world: int, folder: str) -> list[dict[str, Any]]:
    # each rank names its own folder: only rank 0's may come to exist
    return compare_run(Path(folder) / f"run{rank}", True)
