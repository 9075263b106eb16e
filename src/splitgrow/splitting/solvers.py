"""Eigen-solvers for many small symmetric matrices at once (one per neuron).

* :func:`extreme_eigenpairs`: exact, batched ``torch.linalg.eigh`` of ``(n, d, d)`` matrices.
* :class:`BlockSubspace`: the fast route. For every neuron it grows an orthonormal search space
  from a random block by adding the residuals of the wanted Ritz pairs (a block Davidson / Lanczos
  method without preconditioner), and after each block of products S·V it solves the projected
  problem exactly (Rayleigh–Ritz). It needs only products S·V, which for all neurons of all layers
  cost one Hessian-vector pass over the data per block column. It stops when every wanted Ritz
  pair's residual ‖S x − θ x‖ is below ``tol`` times the layer's largest |θ| at that end (for a
  symmetric matrix the eigenvalue error is at most that residual), or when the space is the
  whole of R^d (it is then exact).
"""

from __future__ import annotations

import torch
from torch import Tensor

WHICH = ("min", "max", "both")
GROW_ROWS = 4  # rows the search space's buffers grow by
EIGH_GROUP_ELEMENTS = 1 << 24  # matrix entries per group of neurons in one batched eigh
LOCK_MIN_COLUMNS = 3  # with lock, a neuron is frozen only once its space has this many columns
LOCK_TOL_FACTOR = 0.25  # ... and its residual is below this fraction of the tolerance


def canonical_sign(vectors: Tensor) -> Tensor:
    """Flip each row so that its largest-magnitude component is positive (rows ``(n, d)``)."""
    idx = vectors.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(vectors.gather(1, idx))
    return vectors * torch.where(sign == 0, torch.ones_like(sign), sign)


def extreme_eigenpairs(matrices: Tensor, which: str) -> dict[str, tuple[Tensor, Tensor]]:
    """Smallest and/or largest eigenpairs of symmetric ``(n, d, d)`` matrices.

    The neurons go through ``eigh`` in groups of at most ``EIGH_GROUP_ELEMENTS`` matrix entries:
    its symmetrised copy, eigenvectors and workspace are then a group's, not all n neurons'. Each
    matrix is decomposed on its own either way, so the answer is the same (on CUDA, whose batched
    solver depends on the batch's size, the same to rounding).

    Returns:
        ``{"min": (values (n,), vectors (n, d)), "max": …}`` for the requested ends.
    """
    n, d = matrices.shape[0], matrices.shape[-1]
    step = max(1, EIGH_GROUP_ELEMENTS // max(1, d * d))
    ends = {e: col for e, col in (("min", 0), ("max", -1)) if which in (e, "both")}
    parts: dict[str, list[tuple[Tensor, Tensor]]] = {e: [] for e in ends}
    for s in range(0, max(n, 1), step):
        group = matrices[s : s + step]
        values, vectors = torch.linalg.eigh(0.5 * (group + group.transpose(1, 2)))
        for e, col in ends.items():  # copies: the group's eigenvectors are freed
            parts[e].append((values[:, col].clone(), vectors[:, :, col].clone()))
        del values, vectors
    return {
        e: (torch.cat([v for v, _ in p]), canonical_sign(torch.cat([x for _, x in p])))
        for e, p in parts.items()
    }


def _orthonormalize(block: Tensor, basis: Tensor, generator: torch.Generator) -> Tensor:
    """Columns of ``block`` made orthonormal and orthogonal to ``basis`` (both ``(n, d, ·)``)."""

    def unit(t: Tensor) -> Tensor:
        return t / t.norm(dim=1, keepdim=True).clamp_min(1e-300)

    def project(t: Tensor) -> Tensor:
        return t - basis @ (basis.transpose(1, 2) @ t) if basis.shape[2] else t

    block = unit(block)
    for attempt in range(4):
        q, r = torch.linalg.qr(project(block))
        weak = r.diagonal(dim1=1, dim2=2).abs() < 1e-8  # columns (nearly) inside the space
        if not bool(weak.any()) or attempt == 3:
            break
        # restart those columns from random vectors
        noise = unit(torch.randn(q.shape, generator=generator, dtype=q.dtype).to(q.device))
        block = torch.where(weak.unsqueeze(1), noise, q)
    q, _ = torch.linalg.qr(project(q))  # a second pass restores orthogonality (Kahan–Parlett)
    return q


class BlockSubspace:
    """Rayleigh–Ritz on a growing search space, for ``n`` neurons of dimension ``d`` at once.

    Args:
        n, d: number of neurons and their dimension.
        which: ``"min"``, ``"max"`` or ``"both"``.
        block: columns added per step (per neuron).
        tol: relative residual at which a Ritz pair is converged.
        generator: random source of the initial block (CPU generator; reproducible).
        device: where the state lives (``splitting_eigen`` keeps it on the CPU: it is small, and
            on a GPU its many tiny decompositions cost more than the copies of the products).
            The state is kept in float64; ``update`` and ``start_from`` take tensors on any
            device.
        lock: freeze each neuron once its Ritz pairs meet ``LOCK_TOL_FACTOR`` times the
            tolerance, with at least ``LOCK_MIN_COLUMNS`` columns (a space of one or two can
            hold a converged pair of an inner eigenvalue); its result is kept and it leaves the
            iteration: ``pending``, ``basis`` and the images given to ``update`` are then those
            of the neurons ``neurons`` only. Worth it where the products of a subset of neurons
            cost less (the closed form's); without it every neuron iterates until all have
            converged.
    """

    def __init__(
        self,
        n: int,
        d: int,
        which: str,
        block: int,
        tol: float,
        generator: torch.Generator,
        device: torch.device,
        lock: bool = False,
    ) -> None:
        self.n, self.d, self.which, self.tol = n, d, which, tol
        self.device, self.lock = device, lock
        # the neurons still iterating (their ids), and what the frozen ones left: each wanted
        # end's value and vector, the residual, and the largest |θ| at each end among them
        self._active = torch.arange(n, device=device)
        self._final: dict[str, tuple[Tensor, Tensor]] = {
            end: (
                torch.zeros(n, dtype=torch.float64, device=device),
                torch.zeros(n, d, dtype=torch.float64, device=device),
            )
            for end in ("min", "max")
            if which in (end, "both")
        }
        self._final_residual = torch.zeros(n, dtype=torch.float64, device=device)
        self._frozen_scale = torch.zeros(2, dtype=torch.float64, device=device)
        self.set_block(block)
        self.gen = generator
        f64 = torch.float64
        # the search space and its images S·q as rows (n, capacity, d), grown in place, and the
        # projected matrix qᵢᵀ S qⱼ, extended by the new rows and columns at each update
        self._rows = torch.zeros(n, 0, d, dtype=f64, device=device)
        self._image_rows = torch.zeros(n, 0, d, dtype=f64, device=device)
        self._projected = torch.zeros(n, 0, 0, dtype=f64, device=device)
        self._size = 0
        start = torch.randn(n, d, self.block, generator=generator, dtype=torch.float64).to(device)
        self.pending = _orthonormalize(start, self.basis, generator)
        self.converged = False
        self.values = torch.zeros(n, 0, dtype=f64, device=device)
        self.coords = torch.zeros(n, 0, 0, dtype=f64, device=device)
        self._residual = torch.full((n,), float("inf"), dtype=f64, device=device)

    @property
    def neurons(self) -> Tensor | None:
        """The ids of the neurons still iterating (those of ``pending``), or ``None`` for all."""
        return None if self._active.numel() == self.n else self._active

    @property
    def residual(self) -> Tensor:
        """Every neuron's relative residual ``(n,)``; a frozen neuron's as it was when frozen."""
        if self.neurons is None:
            return self._residual
        out = self._final_residual.clone()
        out[self._active] = self._residual
        return out

    @property
    def basis(self) -> Tensor:
        """The orthonormal search space ``(n, d, size)`` (a view; the iterating neurons')."""
        return self._rows[:, : self._size].transpose(1, 2)

    def _grow(self, m: int) -> None:
        """Room for ``m`` more rows, ``GROW_ROWS`` at a time: a copy of the space every few
        blocks, and never more than a few rows unused (doubling would hold up to twice the
        space, for the few blocks a solver takes)."""
        need = self._size + m
        if need <= self._rows.shape[1]:
            return
        cap = min(need + GROW_ROWS - 1, self.d + m)
        for name in ("_rows", "_image_rows"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], cap, self.d)
            new[:, : self._size] = old[:, : self._size]
            setattr(self, name, new)
        projected = self._projected.new_zeros(self._projected.shape[0], cap, cap)
        projected[:, : self._size, : self._size] = self._projected[:, : self._size, : self._size]
        self._projected = projected

    def update(self, images: Tensor) -> None:
        """Take S·pending ``(n, d, m)`` (the iterating neurons' with ``lock``), solve the
        projected problem, choose the next block."""
        m, old = self.pending.shape[2], self._size
        self._grow(m)
        size = old + m
        self._rows[:, old:size] = self.pending.transpose(1, 2)
        self._image_rows[:, old:size] = images.to(self.device, torch.float64).transpose(1, 2)
        q, y = self._rows[:, :size], self._image_rows[:, :size]
        # new columns qᵢᵀ S q_new for every i, symmetrised with the new rows q_newᵀ S qᵢ
        cols = q @ y[:, old:].transpose(1, 2)  # (n, size, m)
        rows = y @ q[:, old:].transpose(1, 2)  # (n, size, m): (S qᵢ)ᵀ q_new
        cols[:, :old] = 0.5 * (cols[:, :old] + rows[:, :old])
        new = cols[:, old:]
        cols[:, old:] = 0.5 * (new + new.transpose(1, 2))
        self._projected[:, :size, old:size] = cols
        self._projected[:, old:size, :old] = cols[:, :old].transpose(1, 2)
        self._size = size
        self.values, self.coords = torch.linalg.eigh(self._projected[:, :size, :size])
        wanted = self._wanted(size)
        c = self.coords[:, :, wanted].transpose(1, 2)  # (n, w, size)
        res = c @ y - (c @ q) * self.values[:, wanted, None]  # residual rows (n, w, d)
        res_norm = res.norm(dim=2)  # (n, len(wanted))
        ends = [0] if self.which == "min" else [size - 1] if self.which == "max" else [0, size - 1]
        # each end relative to its own largest |θ| over the neurons (the frozen ones included),
        # as its accuracy is judged
        scales = torch.maximum(
            self.values[:, ends].abs().amax(dim=0), self._frozen_scale[: len(ends)]
        ).clamp_min(torch.finfo(torch.float64).tiny)
        tracked = torch.stack([res_norm[:, wanted.index(e)] for e in ends], dim=1)
        self._residual = (tracked / scales).max(dim=1).values
        room = self.d - size
        done = self._residual <= self.tol
        if room <= 0 or bool(done.all()):
            self.converged = True
            self.pending = self.basis[:, :, :0]
            return
        frozen = self._residual <= self.tol * LOCK_TOL_FACTOR
        if self.lock and size >= LOCK_MIN_COLUMNS and bool(frozen.any()):
            self._freeze(frozen, ends)
            res = res[~frozen]
        nxt = res[:, : min(self.block, room)].transpose(1, 2)
        self.pending = _orthonormalize(nxt, self.basis, self.gen)

    def _freeze(self, done: Tensor, ends: list[int]) -> None:
        """Keep the results of the iterating neurons ``done`` (a mask) and drop them from the
        iteration."""
        ids = self._active[done]
        for end, (values, vectors) in self._ritz_pairs().items():
            self._final[end][0][ids] = values[done]
            self._final[end][1][ids] = vectors[done]
        self._final_residual[ids] = self._residual[done]
        frozen = self.values[done][:, ends].abs().amax(dim=0)
        self._frozen_scale[: len(ends)] = torch.maximum(self._frozen_scale[: len(ends)], frozen)
        keep = ~done
        self._active = self._active[keep]
        self._rows, self._image_rows = self._rows[keep], self._image_rows[keep]
        self._projected = self._projected[keep]
        self.values, self.coords = self.values[keep], self.coords[keep]
        self._residual = self._residual[keep]

    def start_from(self, u: Tensor, projected: Tensor) -> None:
        """Make the next block the Ritz vectors, at the wanted ends, of the problem projected on
        the columns of ``u`` ``(d, k)`` (``projected``: uᵀ S_i u, ``(n, k, k)``): a start far
        better than random where S's extreme eigenvectors lie mostly in span(u)."""
        if self.converged:
            return
        projected = projected.to(self.device, torch.float64)[self._active]
        _, coords = torch.linalg.eigh(projected)
        wanted = self._wanted(coords.shape[2])
        x = u.to(self.device, torch.float64) @ coords[:, :, wanted]  # (n, d, len(wanted))
        self.pending = _orthonormalize(x, self.basis, self.gen)

    def set_block(self, block: int) -> None:
        """Columns added per later step (the next pending block keeps its size)."""
        # "both" tracks two ends: at least one new column for each
        self.block = min(max(2 if self.which == "both" else 1, block), self.d)

    @property
    def size(self) -> int:
        """Columns of the search space so far (products S·v per neuron)."""
        return self._size

    def _wanted(self, size: int) -> list[int]:
        k = min(self.block, size)
        if self.which == "min":
            return list(range(k))
        if self.which == "max":
            return list(range(size - 1, size - 1 - k, -1))
        lo = list(range(max(1, k // 2)))
        hi = [size - 1 - i for i in range(max(1, k - len(lo))) if size - 1 - i not in lo]
        return lo + hi

    def _ritz_pairs(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The iterating neurons' current Ritz pairs at the requested ends."""
        out = {}
        size = self._size
        for end, col in (("min", 0), ("max", size - 1)):
            if self.which in (end, "both"):
                vec = self.coords[:, None, :, col] @ self._rows[:, :size]  # (·, 1, d)
                out[end] = (self.values[:, col], canonical_sign(vec[:, 0]))
        return out

    def result(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Every neuron's Ritz pairs at the requested ends (values ``(n,)``, vectors ``(n, d)``):
        the current ones, or those kept when the neuron was frozen."""
        current = self._ritz_pairs()
        if self.neurons is None:
            return current
        out = {}
        for end, (values, vectors) in current.items():
            all_values, all_vectors = (t.clone() for t in self._final[end])
            all_values[self._active], all_vectors[self._active] = values, vectors
            out[end] = (all_values, all_vectors)
        return out
