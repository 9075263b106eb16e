"""``splitting_eigen``: every neuron's splitting eigenpairs over a whole data set."""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, is_dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from tqdm.auto import tqdm

from splitgrow import distributed as sgdist
from splitgrow._attrs import eval_mode
from splitgrow.graph.analyze import ModelStructure, analyze
from splitgrow.splitting.activations import DEFAULT_SURROGATE_BETA, describe_surrogate
from splitgrow.splitting.executor import BATCHNORM_MODES, Executor
from splitgrow.splitting.local import LayerRecipe, LocalProblem, choose_route
from splitgrow.splitting.solvers import WHICH, BlockSubspace, extreme_eigenpairs

METHODS = ("exact", "fast", "auto")
#: ``method="auto"`` uses the exact route while d is at most this and the matrices fit the budget
AUTO_MAX_D = 512
#: ... but on the general route, whose exact matrices cost d Hessian-vector products per batch
#: where the fast route needs about ``block`` per data pass, only while d is at most this
AUTO_MAX_D_GENERAL = 64
AUTO_MAX_BYTES = 1 << 30
#: ... and on the closed-form and chain routes (on the CPU; see AUTO_MAX_D_ACCELERATOR), only
#: while d is at most this when the fast route may iterate on statistics kept in memory
#: (``cache`` not ``False``): there it needs far fewer than d products (MobileNet width 128,
#: d = 129: R 3.3 against exact's 26; width 32, d = 33: 3–8 products, 0.06–1.3 epochs per layer
#: against exact's 0.3–3.8; d = 28: even, 3.1 against 3.5; ``benchmarks/results/eigen_cost_cpu.md``)
AUTO_MAX_D_IN_MEMORY = 32
#: on a GPU, closed-form and chain routes: exact only while d is at most this, whether or not the
#: fast route may iterate in memory; there the exact route's large batched products gain most and
#: the fast route's many small steps least (H200, MobileNet width 32, d = 33: exact 0.30 s against
#: fast 0.57 s; width 64, d = 65: exact 0.73 s against fast 0.52 s; width 128, N = 512, whose
#: statistics exceed the cache, d = 129: exact 3.2 s against fast with a data pass per block 1.1 s)
AUTO_MAX_D_ACCELERATOR = 48
#: the fast route's vectors per neuron and block: iterating in memory, where a block costs only
#: its products, or with a data pass per block
BLOCK_IN_MEMORY, BLOCK_PER_PASS = 1, 4
#: the fast route keeps each batch's statistics from its first data pass and iterates on them in
#: memory, with no further data pass, while they take at most this many bytes (``cache=None``)
CACHE_MAX_BYTES = 2 << 30
#: iterating in memory on a layer whose neurons share input patches x̃ (closed-form and chain
#: routes) with d at least this, the fast route starts from the problem projected on the top
#: ``SUBSPACE_START_COLUMNS`` principal directions of x̃ (randomised range finder)
SUBSPACE_START_MIN_D = 256
SUBSPACE_START_COLUMNS = 32  # uᵀS_iu costs n·k²·B·P: 64 columns cost more than they saved
#: ``method="exact"`` refuses a layer whose n matrices of d×d would take more than this
EXACT_MAX_BYTES = 8 << 30

LossFn = Callable[[Any, Any], Tensor]


@dataclass(frozen=True)
class SplitEigen:
    """Splitting eigenpairs of one layer's neurons, in neuron order.

    Attributes:
        values: ``(n,)`` eigenvalues: λ_min for ``which="min"`` or ``"both"``, λ_max for ``"max"``.
        vectors: ``(n, d)`` unit eigenvectors of ``values`` (largest component positive).
        max_values: ``(n,)`` λ_max when ``which="both"``, else ``None``.
        max_vectors: ``(n, d)`` eigenvectors of ``max_values`` when ``which="both"``.
        method: ``"exact"`` or ``"fast"`` (what ``"auto"`` chose).
        route: ``"closed-form"``, ``"chain"``, ``"general"`` or ``"zero"`` (see
            ``splitting.local``).
        surrogate: the second derivative used for ReLU-like activations.
        batchnorm: ``"running"`` or ``"batch"`` statistics.
        samples: number of samples the expectation was taken over.
        passes: data passes used (``1`` for exact, and for the fast route when it iterated on
            statistics kept in memory).
        residual: ``(n,)`` relative residual of the fast route (zeros for exact).
        columns: products S·v each neuron's eigenpairs were found from (the search space's
            size; ``d`` for exact). A wide layer's projected start (``SUBSPACE_START_MIN_D``)
            is not counted: its cost is about one block's.
    """

    values: Tensor
    vectors: Tensor
    max_values: Tensor | None
    max_vectors: Tensor | None
    method: str
    route: str
    surrogate: str
    batchnorm: str
    samples: int
    passes: int
    residual: Tensor
    columns: int


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """TF32 off for cuDNN convolutions and CUDA matrix products inside the block (restored
    after). PyTorch runs float32 convolutions in TF32 by default on Ampere and later GPUs, a
    10-bit mantissa (about 1e-3 relative), and the splitting statistics are sums whose terms
    cancel. No effect on the CPU."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, p.dtype
    raise ValueError("model has no parameters")


def _prepare_batch(
    batch: object, index: int, device: torch.device
) -> tuple[tuple[Any, ...], Any, int]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(
            f"batch {index} must be an (input, target) pair, got {type(batch).__name__}"
        )
    inputs, target = batch
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    tensors = [t for t in (*inputs, target) if isinstance(t, Tensor)]
    if not tensors or not isinstance(inputs[0], Tensor):
        raise TypeError(
            f"batch {index}: the input must be a tensor, got {type(inputs[0]).__name__}"
        )
    size = int(inputs[0].shape[0]) if inputs[0].dim() else 0
    if size == 0:
        raise ValueError(f"batch {index} is empty")
    for t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"batch {index} contains NaN or infinite values")
    inputs = tuple(t.to(device) if isinstance(t, Tensor) else t for t in inputs)
    if isinstance(target, Tensor):
        target = target.to(device)
    return inputs, target, size


def _slices(
    data: Iterable[Any], device: torch.device, micro_batch: int | None
) -> Iterator[tuple[int, tuple[Any, ...], Any, int]]:
    """``(batch index, inputs, target, size)`` for every batch, or for every slice of at most
    ``micro_batch`` samples of it (tensors whose first dimension is the batch are sliced)."""
    for index, batch in enumerate(data):
        inputs, target, size = _prepare_batch(batch, index, device)
        if micro_batch is None or size <= micro_batch:
            yield index, inputs, target, size
            continue
        if not (isinstance(target, Tensor) and target.dim() and target.shape[0] == size):
            raise ValueError(
                f"batch {index}: micro_batch needs a target tensor with the batch as its first "
                "dimension"
            )
        batched = [isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == size for t in inputs]
        for start in range(0, size, micro_batch):
            rows = slice(start, min(size, start + micro_batch))
            part = tuple(t[rows] if b else t for t, b in zip(inputs, batched, strict=True))
            yield index, part, target[rows], rows.stop - rows.start


def splitting_eigen(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    method: str = "exact",
    which: str = "min",
    layers: Iterable[str] | None = None,
    batchnorm: str = "running",
    surrogate_beta: float | None = DEFAULT_SURROGATE_BETA,
    tol: float = 2e-2,
    block: int | None = None,
    max_passes: int = 64,
    cache: bool | None = None,
    micro_batch: int | None = None,
    seed: int = 0,
    progress: bool = False,
    distributed: bool = False,
) -> dict[str, SplitEigen]:
    """Every neuron's splitting eigenpairs (DESIGN.md §1), keyed by layer name.

    S_i is the Hessian, at zero offsets, of the data set's mean loss of the split network in the
    offspring offsets ±δ_i; splitting neuron i along v by ε changes the loss by ε²/2·vᵀS_iv + O(ε⁴).

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace. Its parameters, buffers and
            train/eval flags are left exactly as they were.
        loss_fn: ``loss_fn(output, target)`` returning the mean loss of a batch.
        batches: iterable of ``(input, target)`` pairs (a ``DataLoader`` works). The expectation is
            over all samples: each batch weighs by its size.
        method: ``"exact"`` (full matrices, batched ``eigh``), ``"fast"`` (block subspace
            iteration on Hessian-vector products) or ``"auto"`` (exact while d ≤ 512 and the
            matrices fit in 1 GiB; on the general route, where each of the d columns costs a
            Hessian-vector product, only while d ≤ 64, and, unless ``cache`` is ``False``, on
            the closed-form and chain routes only while d ≤ 32; else fast. A layer that took the
            fast route only because its statistics could stay in memory is computed exactly
            after all, in a second data pass, when they turn out not to fit. On a GPU, the
            closed-form and chain routes are exact only while d ≤ 48, memory or not).
        which: ``"min"`` (default), ``"max"`` or ``"both"``.
        layers: names of the layers to compute; default every splittable layer.
        batchnorm: ``"running"`` statistics (default, the published convention) or ``"batch"``
            statistics, as training sees them.
        surrogate_beta: softplus sharpness β of the smooth second derivative given to ReLU-like
            activations; ``None`` for their exact (almost everywhere zero) second derivative.
        tol: fast route: residual ‖S_i x − θx‖ at which a Ritz pair (θ, x) is converged,
            relative to the layer's largest |θ| at that end. S_i then has an eigenvalue
            within ``tol`` × that scale of θ (the default 2e-2: within 2%, the accuracy
            ``benchmarks/eigen_cost.py`` checks; 1e-2 took 6 + 3 + 5 products per neuron
            instead of 5 + 3 + 4 on the three wide layers of its width-128 CNN), and x is within
            about ``tol`` × scale / gap of its eigenvector.
        block: fast route: vectors per neuron added to the search space per block of
            products. ``None`` (default): 1 while iterating in memory (a block costs only its
            products, and single vectors reach a given accuracy with the fewest), 4 with a data
            pass per block (fewer passes).
        max_passes: fast route: most blocks of products (data passes, or iterations on the
            statistics kept in memory).
        cache: fast route: keep each batch's statistics (layer inputs, outputs and
            back-propagated gradients, about what a training step keeps for its backward pass)
            from the first data pass and iterate on them in memory, so that the data are read
            and the network run once, however many blocks the solver takes. ``None`` (default):
            while they take at most 2 GiB (``CACHE_MAX_BYTES``), else a data pass per block;
            ``True``: whatever they take; ``False``: never. Layers on the general route always
            take data passes (their statistics are autograd graphs).
        micro_batch: run each batch in slices of at most this many samples (the statistics are
            sums over samples, so the result is the same up to rounding): less memory for the
            forward and backward passes, whose activations scale with the slice. Needs
            ``batchnorm="running"`` (slices would change batch statistics). ``None``: whole
            batches.
        seed: fast route: seed of the random initial vectors.
        progress: show a progress bar over the batches (on a terminal; not in logs).
        distributed: every process of torch.distributed's default group calls this together,
            each with its own share of the data (every process at least one batch): the
            statistics are summed over the processes (all-reduce) before they are divided by the
            number of samples, so each gets the eigenpairs of the union of the shares.

    Returns:
        ``{layer name: SplitEigen}`` in graph order.

    Raises:
        TypeError: ``model`` is not a module or ``loss_fn`` not callable.
        ValueError: a bad option, an unknown or unsplittable layer (naming it and why), an empty
            data set, a batch with NaN, a non-scalar or non-finite loss.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    sgdist.require(distributed, "splitting_eigen")
    _check_choice("method", method, METHODS)
    _check_choice("which", which, WHICH)
    _check_choice("batchnorm", batchnorm, BATCHNORM_MODES)
    if surrogate_beta is not None and not (
        isinstance(surrogate_beta, (int, float))
        and math.isfinite(surrogate_beta)
        and surrogate_beta > 0
    ):
        raise ValueError(
            f"surrogate_beta must be a positive number or None, got {surrogate_beta!r}"
        )
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"tol must be in (0, 1), got {tol!r}")
    if cache is not None and not isinstance(cache, bool):
        raise TypeError(f"cache must be True, False or None, got {cache!r}")
    for name, value in (("block", block), ("max_passes", max_passes), ("micro_batch", micro_batch)):
        if name in ("block", "micro_batch") and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if micro_batch is not None and batchnorm == "batch":
        raise ValueError(
            "micro_batch needs batchnorm='running': slices would change the batch statistics"
        )

    structure = analyze(model)
    names = _select_layers(structure, layers)
    device, dtype = _model_device_dtype(model)
    modules = dict(structure.graph_module.named_modules())
    recipes = {}
    for name in names:
        info, module = structure.layers[name], modules[name]
        recipes[name] = LayerRecipe(info, module, choose_route(info, module, batchnorm))
    executor = Executor(structure.graph_module, batchnorm, surrogate_beta)
    chosen = {
        name: _pick_method(
            method, r.info.n, r.info.d, dtype, r.route.kind, cache is not False, device
        )
        for name, r in recipes.items()
    }
    itemsize = torch.empty((), dtype=dtype).element_size()
    for name, how in chosen.items():
        n, d = recipes[name].info.n, recipes[name].info.d
        if how == "exact" and n * d * d * itemsize > EXACT_MAX_BYTES:
            raise ValueError(
                f"method='exact' needs {n * d * d * itemsize / 2**30:.1f} GiB for layer '{name}' "
                f"(n={n}, d={d}); use method='fast' or 'auto'"
            )

    # a DataLoader or list is iterated once per pass; only a one-shot iterator is kept in memory
    data: Iterable[Any] = list(batches) if isinstance(batches, Iterator) else batches
    gen = torch.Generator().manual_seed(seed)
    limit = 0.0 if cache is False else math.inf if cache else float(CACHE_MAX_BYTES)
    cacheable = {k for k, v in chosen.items() if v == "fast" and recipes[k].route.kind != "general"}
    solvers = {
        name: BlockSubspace(
            r.info.n, r.info.d, which, _first_block(block, name in cacheable and limit > 0),
            tol, gen, torch.device("cpu"),  # small, and its decompositions are faster there
            torch.promote_types(dtype, torch.float32),  # the products' digits, no more
        )
        for name, r in recipes.items()
        if chosen[name] == "fast"
    }  # fmt: skip
    # wide layers iterating in memory start from the projected problem: a random first block
    # would only add a column of little use to their search space
    deferred = (
        {k for k in cacheable if recipes[k].info.d >= SUBSPACE_START_MIN_D} if limit else set()
    )
    with eval_mode(model), full_float32():
        exact_names = [k for k, v in chosen.items() if v == "exact"]
        matrices, samples, kept = _data_pass(
            executor, recipes, loss_fn, data, device, exact_names, solvers, dtype, progress,
            distributed, sorted(cacheable) if limit > 0 else [], limit, micro_batch, deferred,
        )  # fmt: skip
        if distributed and not sgdist.all_agree(str(kept is not None)):
            kept = None  # every process iterates in memory, or none does
        late: list[str] = []  # auto's fast layers that counted on memory: exact after all
        if kept is None and method == "auto":
            late = [
                k for k in solvers
                if _pick_method(
                    method, recipes[k].info.n, recipes[k].info.d, dtype, recipes[k].route.kind,
                    False, device,
                ) == "exact"
            ]  # fmt: skip
            for k in late:
                chosen[k] = "exact"
                del solvers[k]
        in_memory = {k: solvers[k] for k in cacheable} if kept is not None else {}
        if kept is not None:
            _iterate_in_memory(kept, in_memory, dtype, samples, max_passes, distributed, device)
            del kept
        rest = {k: s for k, s in solvers.items() if k not in in_memory}
        for solver in rest.values():  # a data pass per block from here
            solver.set_block(block or BLOCK_PER_PASS)
        passes = 1
        if late:
            more, _, _ = _data_pass(
                executor, recipes, loss_fn, data, device, late, rest, dtype, progress,
                distributed, micro_batch=micro_batch,
            )  # fmt: skip
            matrices.update(more)
            passes += 1
        while any(not s.converged for s in rest.values()) and passes < max_passes:
            _data_pass(
                executor, recipes, loss_fn, data, device, [], rest, dtype, progress,
                distributed, micro_batch=micro_batch,
            )  # fmt: skip
            passes += 1

    surrogate = describe_surrogate(surrogate_beta)
    out: dict[str, SplitEigen] = {}
    for name in names:
        if chosen[name] == "exact":
            pairs = extreme_eigenpairs(matrices.pop(name), which)  # freed as soon as solved
            residual = torch.zeros(recipes[name].info.n, dtype=dtype, device=device)
            used, columns = 2 if name in late else 1, recipes[name].info.d
        else:
            pairs = solvers[name].result()  # on the CPU: moved below
            residual = solvers[name].residual.to(device, dtype)
            used, columns = 1 if name in in_memory else passes, solvers[name].size
        first = pairs["min" if which in ("min", "both") else "max"]
        second = pairs.get("max") if which == "both" else None
        out[name] = SplitEigen(
            values=first[0].to(device, dtype),
            vectors=first[1].to(device, dtype),
            max_values=None if second is None else second[0].to(device, dtype),
            max_vectors=None if second is None else second[1].to(device, dtype),
            method=chosen[name],
            route=recipes[name].route.kind,
            surrogate=surrogate,
            batchnorm=batchnorm,
            samples=samples,
            passes=used,
            residual=residual,
            columns=columns,
        )
    return out


def _select_layers(structure: ModelStructure, layers: Iterable[str] | None) -> list[str]:
    if layers is None:
        names = structure.splittable()
        if not names:
            reasons = "; ".join(f"{k}: {v.reason}" for k, v in structure.layers.items())
            raise ValueError(f"the model has no splittable layer ({reasons or 'no neuron layers'})")
        return names
    if isinstance(layers, str):
        raise TypeError("layers must be an iterable of layer names, not a single string")
    wanted = list(layers)
    for name in wanted:
        structure.require(name)
    return [k for k in structure.layers if k in set(wanted)]


def _first_block(block: int | None, in_memory: bool) -> int:
    if block is not None:
        return block
    return BLOCK_IN_MEMORY if in_memory else BLOCK_PER_PASS


def _pick_method(
    method: str,
    n: int,
    d: int,
    dtype: torch.dtype,
    route: str,
    in_memory: bool,
    device: torch.device,
) -> str:
    """``method``, or what ``"auto"`` picks for a layer (see :func:`splitting_eigen`) on
    ``device``; ``in_memory``: whether the fast route may iterate on statistics kept in memory."""
    if method != "auto":
        return method
    if route == "general" and d > AUTO_MAX_D_GENERAL:
        return "fast"
    if route in ("closed-form", "chain"):
        if device.type != "cpu" and d > AUTO_MAX_D_ACCELERATOR:
            return "fast"
        if device.type == "cpu" and in_memory and d > AUTO_MAX_D_IN_MEMORY:
            return "fast"
    nbytes = n * d * d * torch.empty((), dtype=dtype).element_size()
    return "exact" if d <= AUTO_MAX_D and nbytes <= AUTO_MAX_BYTES else "fast"


def _data_pass(
    executor: Executor,
    recipes: dict[str, LayerRecipe],
    loss_fn: LossFn,
    data: Iterable[Any],
    device: torch.device,
    exact_names: list[str],
    solvers: dict[str, BlockSubspace],
    dtype: torch.dtype,
    progress: bool,
    distributed: bool = False,
    keep_layers: Sequence[str] = (),
    limit: float = 0.0,
    micro_batch: int | None = None,
    deferred: Collection[str] = (),
) -> tuple[dict[str, Tensor], int, list[tuple[dict[str, LocalProblem], int]] | None]:
    """One pass over the data: accumulate exact matrices and the solvers' products S·V
    (summed over the processes when ``distributed``), except for the ``deferred`` solvers,
    whose problems are only kept (their pending block waits for the next pass or for the
    iteration in memory).

    Returns:
        The exact matrices, the number of samples, and each batch's local problems of the
        layers ``keep_layers`` with its size, or ``None`` when there are none or they would take
        more than ``limit`` bytes (then no more are kept from the moment that shows).
    """
    active = {k: s for k, s in solvers.items() if not s.converged}
    wanted = [recipes[k] for k in (*exact_names, *active)]
    taps: list[fx.Node] = [t for r in wanted for t in r.taps()]
    edge_taps = [t for r in wanted for t in r.edge_taps()]
    keep = [k for r in wanted for k in r.keep()]
    reads = [{*r.keep(), *r.taps(), *r.edge_taps()} for r in wanted]  # what each layer reads
    sums: dict[str, Tensor] = {}
    total = 0
    kept_problems: list[tuple[dict[str, LocalProblem], int]] | None = [] if keep_layers else None
    seen: set[int] = set()  # storages already counted
    footprint = 0
    bar = tqdm(data, desc="splitting", disable=None if progress else True, leave=False)
    for index, inputs, target, size in _slices(bar, device, micro_batch):
        # the taps' gradients are first derivatives: the surrogate's curvature is not needed
        with torch.enable_grad(), executor.first_order():
            output, kept, tapped = executor.forward(
                inputs, taps=taps, edge_taps=edge_taps, keep=keep
            )
            loss = loss_fn(output, target)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn must return a scalar tensor (the mean loss of the batch)")
            if not bool(torch.isfinite(loss)):
                value = float(loss.detach())
                raise ValueError(f"the loss of batch {index} is not finite ({value})")
            # none when every layer's chain is free of curvature
            grad_by_node = {n: g.detach() for n, g in tapped.gradients(loss).items()}
        del output, loss, tapped
        # one layer at a time, dropping the values and gradients no later layer reads: the
        # batch's raw statistics give way to the (smaller) local problems as they are built
        batch_kept: dict[str, LocalProblem] = {}
        for i, recipe in enumerate(wanted):
            name = recipe.info.name
            with torch.no_grad():  # statistics, not a graph (a PReLU's slope requires grad)
                problem = recipe.problem(executor, kept, grad_by_node)
            for node in reads[i]:
                if all(node not in later for later in reads[i + 1 :]):
                    kept.pop(node, None)
                    grad_by_node.pop(node, None)
            if name in deferred:
                contrib = None
            elif name in active:
                v = active[name].pending.to(device, dtype)
                contrib = problem.hvp(v).to(torch.float64) * size
            else:  # a fresh tensor: scaled in place (n·d² numbers: 5 GiB on a 256-wide conv)
                contrib = problem.matrices().mul_(size)
            if contrib is not None:
                sums[name] = contrib if name not in sums else sums[name].add_(contrib)
            if name in keep_layers:
                batch_kept[name] = problem
            del problem, contrib
        del kept, grad_by_node
        total += size
        if kept_problems is not None:
            kept_problems.append((batch_kept, size))
            footprint += sum(_footprint(p, seen) for p in batch_kept.values())
            if footprint > limit:
                kept_problems, seen = None, set()
        del batch_kept
    if distributed:
        total = sgdist.sum_statistics(sums, total, device)
    if total == 0:
        raise ValueError("batches is empty: at least one (input, target) pair is needed")
    for name, solver in active.items():
        if name not in deferred:
            solver.update(sums.pop(name) / total)
    if distributed and active:
        _check_solvers_agree(active)
    return {k: v.div_(total) for k, v in sums.items()}, total, kept_problems


def _check_solvers_agree(solvers: dict[str, BlockSubspace]) -> None:
    """Every process's solvers must take the same next step: they see the same summed products,
    so on machines of one kind they compute the same; on processors or libraries that round
    differently a borderline residual could differ, and the next collective would then
    mismatch or hang. Checked after each step (one small all-gather): an error instead."""
    state = ";".join(f"{name}:{s.converged}:{s.size}" for name, s in sorted(solvers.items()))
    if not sgdist.all_agree(hashlib.sha256(state.encode()).hexdigest()):
        raise RuntimeError(
            "the processes' eigen-solvers disagree on whether they have converged (their "
            "processors or math libraries round differently); run the splitting with "
            "method='exact', or on machines of one kind"
        )


def _footprint(obj: object, seen: set[int]) -> int:
    """Bytes of the tensor storages ``obj`` holds (a local problem's attributes, recursively)
    that are not in ``seen`` yet (their addresses are added to it)."""
    if isinstance(obj, Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return int(storage.nbytes())
    if isinstance(obj, (list, tuple)):
        return sum(_footprint(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(_footprint(o, seen) for o in obj.values())
    if isinstance(obj, LocalProblem) or (is_dataclass(obj) and not isinstance(obj, type)):
        return sum(_footprint(o, seen) for o in vars(obj).values())  # also patches, slices
    return 0


def _iterate_in_memory(
    kept: list[tuple[dict[str, LocalProblem], int]],
    solvers: dict[str, BlockSubspace],
    dtype: torch.dtype,
    total: int,
    max_passes: int,
    distributed: bool,
    device: torch.device,
) -> None:
    """The fast route's later blocks from the first pass's local problems: the same products
    S·V as a data pass computes (each batch weighed by its size, summed over the processes),
    with no forward or backward pass of the network."""
    _projected_start(kept, solvers, dtype, total, distributed, device)
    steps = 1  # the first data pass gave the first block (or the projected start did)
    while steps < max_passes:
        active = {k: s for k, s in solvers.items() if not s.converged}
        if not active:
            return
        sums: dict[str, Tensor] = {}
        for problems, size in kept:
            for name, solver in active.items():
                v = solver.pending.to(device, dtype)
                contrib = problems[name].hvp(v).to(torch.float64) * size
                sums[name] = contrib if name not in sums else sums[name] + contrib
        if distributed:
            sgdist.sum_statistics(sums, total, device)
        for name, solver in active.items():
            solver.update(sums[name] / total)
        if distributed:
            _check_solvers_agree(active)
        steps += 1


def _projected_start(
    kept: list[tuple[dict[str, LocalProblem], int]],
    solvers: dict[str, BlockSubspace],
    dtype: torch.dtype,
    total: int,
    distributed: bool,
    device: torch.device,
) -> None:
    """Start wide layers' solvers from the problem projected on the principal subspace of their
    input patches: u spans X̃ᵀX̃Ω for a random Ω (one power step), then uᵀS_iu for all neurons
    costs about as much as one of the fast route's blocks on these routes. Eigenvectors with
    large |λ| lean on directions in which the inputs vary (|vᵀS_iv| ≤ max|w|·vᵀX̃ᵀX̃v), so the
    Ritz vectors are a close start; the solver still iterates to its residual tolerance."""
    for name in sorted(solvers):
        solver = solvers[name]
        if solver.converged or solver.d < SUBSPACE_START_MIN_D:
            continue
        k = min(SUBSPACE_START_COLUMNS, solver.d)
        u = torch.randn(solver.d, k, generator=solver.gen, dtype=torch.float64).to(device)
        shared = True
        for _ in range(2):  # the range of X̃ᵀX̃Ω, then one power step
            acc = torch.zeros_like(u)
            for problems, _ in kept:
                g = problems[name].inputs_gram_times(u.to(dtype))
                if g is None:
                    shared = False
                    break
                acc += g.to(torch.float64)
            if not shared:
                break
            if distributed:
                sgdist.sum_statistics({name: acc}, total, device)
            u = torch.linalg.qr(acc.cpu())[0].to(device)  # one small QR: on the CPU
        if not shared:  # the same on every process: the route decides
            continue
        proj = torch.zeros(solver.n, k, k, dtype=torch.float64, device=device)
        for problems, size in kept:
            proj += problems[name].projected(u.to(dtype)).to(torch.float64) * size
        if distributed:
            sgdist.sum_statistics({name: proj}, total, device)
        solver.start_from(u, proj / total)
