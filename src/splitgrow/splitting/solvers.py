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
    """Columns of ``block`` made orthonormal and orthogonal to ``basis`` (both ``(n, d, ·)``; the
    block in float64, the basis in the solver's storage dtype, in which the projection runs)."""

    def unit(t: Tensor) -> Tensor:
        return t / t.norm(dim=1, keepdim=True).clamp_min(1e-300)

    def project(t: Tensor) -> Tensor:
        if not basis.shape[2]:
            return t
        return t - (basis @ (basis.transpose(1, 2) @ t.to(basis.dtype))).to(t.dtype)

    block = unit(block)
    for attempt in range(4):
        q, r = torch.linalg.qr(project(block))
        # columns (nearly) inside the space. With a float32 basis such a column keeps rounding
        # noise of about 1e-7 and is not restarted: the second pass below makes that noise an
        # orthonormal direction. (Restarting below 100 float32 eps instead was tried: one more
        # product on two layers of the width-128 benchmark, the same agreement.)
        weak = r.diagonal(dim1=1, dim2=2).abs() < 1e-8
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
            ``update`` and ``start_from`` take tensors on any device.
        dtype: storage of the search space and its images S·q, ``(n, size, d)`` each, the
            solver's only large state: float64 (default), or the products' own dtype (float32
            products carry no more digits; a width-256 layer of 3×3 convolutions holds 2 × 19 MB
            per 4 columns in float64). Products against the stored rows (the projected
            problem's new entries, the residual vectors, a new block's projection against the
            space) run in that dtype; the projected problems are kept and decomposed, residual
            norms taken and new blocks orthonormalised (QR) in float64. In float32 a residual
            cannot fall much below about 1e-6 of the scale, so a ``tol`` under that is never met
            and the solver runs on until the space is the whole of R^d.
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
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.n, self.d, self.which, self.tol = n, d, which, tol
        self.device, self.dtype = device, dtype
        self.set_block(block)
        self.gen = generator
        f64 = torch.float64
        # the search space and its images S·q as rows (n, capacity, d), grown in place, and the
        # projected matrix qᵢᵀ S qⱼ, extended by the new rows and columns at each update
        self._rows = torch.zeros(n, 0, d, dtype=dtype, device=device)
        self._image_rows = torch.zeros(n, 0, d, dtype=dtype, device=device)
        self._projected = torch.zeros(n, 0, 0, dtype=f64, device=device)
        self._size = 0
        start = torch.randn(n, d, self.block, generator=generator, dtype=torch.float64).to(device)
        self.pending = _orthonormalize(start, self.basis, generator)
        self.converged = False
        self.values = torch.zeros(n, 0, dtype=f64, device=device)
        self.coords = torch.zeros(n, 0, 0, dtype=f64, device=device)
        self.residual = torch.full((n,), float("inf"), dtype=f64, device=device)

    @property
    def basis(self) -> Tensor:
        """The orthonormal search space ``(n, d, size)`` (a view)."""
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
            new = old.new_zeros(self.n, cap, self.d)
            new[:, : self._size] = old[:, : self._size]
            setattr(self, name, new)
        projected = self._projected.new_zeros(self.n, cap, cap)
        projected[:, : self._size, : self._size] = self._projected[:, : self._size, : self._size]
        self._projected = projected

    def update(self, images: Tensor) -> None:
        """Take S·pending ``(n, d, m)``, solve the projected problem, choose the next block."""
        m, old = self.pending.shape[2], self._size
        self._grow(m)
        size = old + m
        self._rows[:, old:size] = self.pending.transpose(1, 2)
        self._image_rows[:, old:size] = images.to(self.device, self.dtype).transpose(1, 2)
        q, y = self._rows[:, :size], self._image_rows[:, :size]
        # new columns qᵢᵀ S q_new for every i, symmetrised with the new rows q_newᵀ S qᵢ
        cols = (q @ y[:, old:].transpose(1, 2)).double()  # (n, size, m)
        rows = (y @ q[:, old:].transpose(1, 2)).double()  # (n, size, m): (S qᵢ)ᵀ q_new
        cols[:, :old] = 0.5 * (cols[:, :old] + rows[:, :old])
        new = cols[:, old:]
        cols[:, old:] = 0.5 * (new + new.transpose(1, 2))
        self._projected[:, :size, old:size] = cols
        self._projected[:, old:size, :old] = cols[:, :old].transpose(1, 2)
        self._size = size
        self.values, self.coords = torch.linalg.eigh(self._projected[:, :size, :size])
        wanted = self._wanted(size)
        c = self.coords[:, :, wanted].transpose(1, 2).to(self.dtype)  # (n, w, size)
        theta = self.values[:, wanted, None].to(self.dtype)
        res = (c @ y - (c @ q) * theta).double()  # residual rows (n, w, d)
        res_norm = res.norm(dim=2)  # (n, len(wanted))
        ends = [0] if self.which == "min" else [size - 1] if self.which == "max" else [0, size - 1]
        # each end relative to its own largest |θ| over the neurons, as its accuracy is judged
        scales = self.values[:, ends].abs().amax(dim=0).clamp_min(torch.finfo(torch.float64).tiny)
        tracked = torch.stack([res_norm[:, wanted.index(e)] for e in ends], dim=1)
        self.residual = (tracked / scales).max(dim=1).values
        room = self.d - size
        if room <= 0 or bool((self.residual <= self.tol).all()):
            self.converged = True
            self.pending = self.basis[:, :, :0]
            return
        nxt = res[:, : min(self.block, room)].transpose(1, 2)
        self.pending = _orthonormalize(nxt, self.basis, self.gen)

    def start_from(self, u: Tensor, projected: Tensor) -> None:
        """Make the next block the Ritz vectors, at the wanted ends, of the problem projected on
        the columns of ``u`` ``(d, k)`` (``projected``: uᵀ S_i u, ``(n, k, k)``): a start far
        better than random where S's extreme eigenvectors lie mostly in span(u)."""
        room = self.d - self._size
        if self.converged or room <= 0:
            return
        _, coords = torch.linalg.eigh(projected.to(self.device, torch.float64))
        wanted = self._wanted(coords.shape[2])[:room]  # never beyond the whole of R^d
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

    def result(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The current Ritz pairs at the requested ends (values ``(n,)``, vectors ``(n, d)``)."""
        out = {}
        size = self._size
        for end, col in (("min", 0), ("max", size - 1)):
            if self.which in (end, "both"):
                coords = self.coords[:, None, :, col].to(self.dtype)
                vec = (coords @ self._rows[:, :size]).double()  # (n, 1, d)
                out[end] = (self.values[:, col], canonical_sign(vec[:, 0]))
        return out
