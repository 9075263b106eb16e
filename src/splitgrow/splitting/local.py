"""Each layer's splitting matrices on one batch, from quantities of one forward/backward pass.

**General definition, local form.** In the split network the consumers of neuron i's channel read
m_i(δ) = ½[h_i(θ_i+δ) + h_i(θ_i−δ)], where h_i is the channel after its per-channel chain (the
consumers are linear, so halving and duplicating their columns averages the two offspring). As
m_i'(0) = 0, the Hessian of the loss in δ_i at 0 is

    S_i = ∂²/∂θ_i² Σ_q g_q · h_{i,q}(θ_i),      g = ∂L/∂(consumer inputs), held fixed,

and the Hessian is block-diagonal across neurons and layers (DESIGN.md §1). :class:`GeneralProblem`
evaluates exactly this: it re-runs the producer and its chain with parameters θ and takes second
derivatives by autograd. It is valid for any chain the structure analysis accepts, with running or
batch BatchNorm statistics.

**Closed form.** When the chain is: pointwise affine steps (eval BatchNorm, scalar affine, dropout,
identity) → one pointwise activation σ → only linear or piecewise-linear steps, then
h'' = σ''(z)·c²·x xᵀ and

    S_i = Σ_{b,p} g_{b,i,p} · σ''(z_{b,i,p}) · c_{i}² · x̃_{b,p} x̃_{b,p}ᵀ,

with g = ∂L/∂σ-output, z the activation input, c the affine scale, x̃ the input patch with a 1 for
the bias. :class:`ClosedFormProblem` computes it with matrix products. Without any curved step
S = 0. Both are tested against the brute-force Hessian of the split network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from splitgrow.graph.analyze import LayerInfo
from splitgrow.graph.ops import StepKind, first_input
from splitgrow.splitting import neurons
from splitgrow.splitting.executor import Executor

_CHUNK_ELEMENTS = 1 << 24  # bound on the temporary (k, B·P, d) tensor of the closed form


@dataclass(frozen=True)
class Route:
    """How a layer's splitting matrices are computed.

    ``kind`` is ``"closed-form"``, ``"zero"`` (no curvature in the chain: S = 0) or ``"general"``.
    For the closed form, ``prefix`` are the affine steps before the activation ``sigma``.
    """

    kind: str
    prefix: tuple[fx.Node, ...] = ()
    sigma: fx.Node | None = None


def _curved(kind: StepKind, batchnorm: str) -> bool:
    if kind == StepKind.BATCHNORM:
        return batchnorm == "batch"
    return kind in (StepKind.ACTIVATION, StepKind.CURVED)


def choose_route(info: LayerInfo, module: nn.Module, batchnorm: str) -> Route:
    """The cheapest route that is provably equal to the general definition for this layer."""
    kinds = {c.node: c.kind for c in info.chain}
    if not any(_curved(k, batchnorm) for k in kinds.values()):
        return Route("zero")
    if not neurons.handler(module).has_patches(module):
        return Route("general")
    members = set(kinds) | {c.node for c in info.consumers}
    prefix: list[fx.Node] = []
    cur = info.node
    assert cur is not None
    while True:
        users = [u for u in cur.users if u in members]
        if len(users) != 1 or len(cur.users) != 1 or users[0] not in kinds:
            return Route("general")
        nxt = users[0]
        kind = kinds[nxt]
        if kind == StepKind.AFFINE or (kind == StepKind.BATCHNORM and batchnorm == "running"):
            prefix.append(nxt)
            cur = nxt
            continue
        if kind != StepKind.ACTIVATION:
            return Route("general")
        sigma = nxt
        break
    rest = [k for node, k in kinds.items() if node is not sigma and node not in prefix]
    if any(_curved(k, batchnorm) for k in rest):
        return Route("general")
    return Route("closed-form", tuple(prefix), sigma)


@dataclass
class LayerRecipe:
    """What one layer needs from the forward pass, and how to turn it into a local problem."""

    info: LayerInfo
    module: nn.Module
    route: Route

    def taps(self) -> list[fx.Node]:
        sigma = self.route.sigma
        return [sigma] if sigma is not None and self.route.kind == "closed-form" else []

    def edge_taps(self) -> list[fx.Node]:
        return [c.node for c in self.info.consumers] if self.route.kind == "general" else []

    def keep(self) -> list[fx.Node]:
        info = self.info
        assert info.node is not None
        nodes = [first_input(info.node)]
        if self.route.kind == "closed-form":
            assert self.route.sigma is not None
            nodes += [info.node, first_input(self.route.sigma)]
        elif self.route.kind == "general":
            chain = {c.node for c in info.chain} | {info.node}
            nodes += [a for c in info.chain for a in c.node.all_input_nodes if a not in chain]
        return nodes

    def problem(
        self, ex: Executor, kept: dict[fx.Node, Any], grads: dict[fx.Node, Tensor]
    ) -> LocalProblem:
        info = self.info
        assert info.node is not None
        x = kept[first_input(info.node)].detach()
        th = neurons.theta(self.module).to(x.dtype)
        if self.route.kind == "zero":
            return ZeroProblem(th.shape[0], th.shape[1], th)
        if self.route.kind == "closed-form":
            sigma = self.route.sigma
            assert sigma is not None
            z = kept[first_input(sigma)].detach()
            y = kept[info.node].detach()
            scale = _affine_scale(ex, self.route.prefix, info.node, y)
            weights = grads[sigma] * ex.second_derivative(sigma, z) * scale.square()
            handler = neurons.handler(self.module)
            patches = handler.patches(self.module, x)
            assert patches is not None
            return ClosedFormProblem(
                patches.reshape(-1, th.shape[1]),
                handler.to_bnp(self.module, weights).transpose(0, 1).reshape(th.shape[0], -1),
                th,
            )
        chain_nodes = [c.node for c in info.chain]
        outside = {n: v for n, v in kept.items() if n is not first_input(info.node)}
        edges = [(c.node.args[0], grads[c.node]) for c in info.consumers]
        return GeneralProblem(ex, self.module, info.node, x, th, chain_nodes, outside, edges)


def _affine_scale(
    ex: Executor, prefix: tuple[fx.Node, ...], producer: fx.Node, y: Tensor
) -> Tensor:
    """c = ∂z/∂y of the pointwise affine prefix (elementwise, shaped like y)."""
    if not prefix:
        return torch.ones_like(y)
    with torch.enable_grad():
        y_ = y.detach().requires_grad_(True)
        (z,) = ex.run_chain(prefix, {producer: y_}, [prefix[-1]])
        (c,) = torch.autograd.grad(z, y_, torch.ones_like(z))
    return c


class LocalProblem:
    """One layer's splitting matrices S_b on one batch (for the batch's mean loss)."""

    n: int
    d: int

    def matrices(self) -> Tensor:
        """S_b for every neuron: ``(n, d, d)``."""
        raise NotImplementedError

    def hvp(self, v: Tensor) -> Tensor:
        """S_b v for every neuron and block column: ``v`` and result ``(n, d, m)``."""
        raise NotImplementedError


class ZeroProblem(LocalProblem):
    """No curved step between the layer and its consumers: S = 0 exactly."""

    def __init__(self, n: int, d: int, like: Tensor) -> None:
        self.n, self.d, self.like = n, d, like

    def matrices(self) -> Tensor:
        return self.like.new_zeros(self.n, self.d, self.d)

    def hvp(self, v: Tensor) -> Tensor:
        return torch.zeros_like(v)


class ClosedFormProblem(LocalProblem):
    """S_i = Σ_p w_{i,p} x̃_p x̃_pᵀ with x̃ ``(B·P, d)`` patches and w ``(n, B·P)`` weights."""

    def __init__(self, patches: Tensor, weights: Tensor, like: Tensor) -> None:
        self.x, self.w = patches, weights
        self.n, self.d = like.shape

    def matrices(self) -> Tensor:
        x, w = self.x, self.w
        out = x.new_empty(self.n, self.d, self.d)
        step = max(1, _CHUNK_ELEMENTS // max(1, x.numel()))
        for s in range(0, self.n, step):
            weighted = w[s : s + step, :, None] * x  # (k, B·P, d)
            out[s : s + step] = weighted.transpose(1, 2) @ x
        return out

    def hvp(self, v: Tensor) -> Tensor:
        n, d, m = v.shape
        xv = (self.x @ v.permute(1, 0, 2).reshape(d, n * m)).view(-1, n, m)  # (B·P, n, m)
        xv = xv * self.w.t().unsqueeze(-1)
        return (self.x.t() @ xv.reshape(-1, n * m)).view(d, n, m).permute(1, 0, 2)


class GeneralProblem(LocalProblem):
    """φ(θ) = Σ_edges ⟨g_e, chain_e(producer(x; θ))⟩; S_i = ∂²φ/∂θ_i² (module docstring)."""

    def __init__(
        self,
        ex: Executor,
        module: nn.Module,
        producer: fx.Node,
        x: Tensor,
        th: Tensor,
        chain: list[fx.Node],
        outside: dict[fx.Node, Any],
        edges: list[tuple[Any, Tensor]],
    ) -> None:
        self.n, self.d = th.shape
        with torch.enable_grad():
            self.theta = th.detach().requires_grad_(True)
            env = dict(outside)
            env[producer] = neurons.forward(module, x, self.theta)
            values = ex.run_chain(chain, env, [node for node, _ in edges])
            phi = sum((v * g).sum() for v, (_, g) in zip(values, edges, strict=True))
            (self.grad,) = torch.autograd.grad(phi, self.theta, create_graph=True)

    def _column(self, v: Tensor, retain: bool = True) -> Tensor:
        if not self.grad.requires_grad:  # φ linear in θ: no curvature reached autograd
            return torch.zeros_like(v)
        (out,) = torch.autograd.grad(
            self.grad, self.theta, v, retain_graph=retain, allow_unused=True
        )
        return torch.zeros_like(v) if out is None else out

    def matrices(self) -> Tensor:
        eye = torch.eye(self.d, dtype=self.theta.dtype, device=self.theta.device)
        cols = [self._column(eye[k].expand(self.n, self.d)) for k in range(self.d)]
        return torch.stack(cols, dim=2)

    def hvp(self, v: Tensor) -> Tensor:
        v = v.to(self.theta.dtype)
        return torch.stack([self._column(v[:, :, j]) for j in range(v.shape[2])], dim=2)
