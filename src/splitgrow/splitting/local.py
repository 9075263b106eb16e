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
S = 0.

**Jacobian chain.** When the chain holds only linear steps (depthwise convs, pools, flatten, eval
BatchNorm …) and pointwise activations, in any number and order, :class:`ChainProblem` sums one
such term per activation, with the Jacobian of the activation's input pushed forward through the
chain. Every route is tested against the brute-force Hessian of the split network.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.func import functional_call, jvp, vmap

from splitgrow._attrs import optional_tensor
from splitgrow.graph.analyze import LayerInfo
from splitgrow.graph.ops import Layout, StepKind, first_input
from splitgrow.splitting import neurons
from splitgrow.splitting.activations import slice_elements
from splitgrow.splitting.executor import Executor

# on the CPU; larger on an accelerator (activations.slice_elements)
_CHUNK_ELEMENTS = 1 << 21  # bound on the elements of each chunk's temporaries (tangents, features)
_HVP_SLICE_ELEMENTS = 1 << 20  # a slice's elements of the layer output, for S·v
HVP_CHUNK = 32  # Hessian-vector products of the general route batched in one backward pass


@dataclass(frozen=True)
class Route:
    """How a layer's splitting matrices are computed.

    ``kind`` is ``"closed-form"``, ``"chain"``, ``"general"`` or ``"zero"`` (no curvature in the
    chain: S = 0). For the closed form, ``prefix`` are the affine steps before the activation
    ``sigma``.
    """

    kind: str
    prefix: tuple[fx.Node, ...] = ()
    sigma: fx.Node | None = None


def _curved(kind: StepKind, batchnorm: str) -> bool:
    if kind == StepKind.BATCHNORM:
        return batchnorm == "batch"
    return kind in (StepKind.ACTIVATION, StepKind.CURVED)


def _outside_inputs(info: LayerInfo) -> list[fx.Node]:
    """Values the chain reads that it does not compute itself (held at their recorded value)."""
    inside = {c.node for c in info.chain} | {m.node for m in info.members}
    seen = {a: None for c in info.chain for a in c.node.all_input_nodes if a not in inside}
    return list(seen)


def _fixed_inputs(info: LayerInfo) -> list[fx.Node]:
    """What the general route holds fixed: the members' inputs, then the chain's outside values."""
    members = [first_input(m.node) for m in info.members]
    return list({a: None for a in (*members, *_outside_inputs(info))})


def choose_route(info: LayerInfo, module: nn.Module, batchnorm: str) -> Route:
    """The cheapest route that is provably equal to the general definition for this layer."""
    kinds = {c.node: c.kind for c in info.chain}
    if not any(_curved(k, batchnorm) for k in kinds.values()):
        return Route("zero")
    if info.coupled:  # several producers, or a join: only the general definition applies
        return Route("general")
    # the Jacobian-chain form: linear steps and pointwise activations only, per sample
    chain_ok = not _outside_inputs(info) and all(
        k in (StepKind.AFFINE, StepKind.LINEAR, StepKind.ACTIVATION, StepKind.META)
        or (k == StepKind.BATCHNORM and batchnorm == "running")
        for k in kinds.values()
    )
    fallback = Route("chain") if chain_ok else Route("general")
    if not neurons.handler(module).has_patches(module):
        return fallback
    members = set(kinds) | {c.node for c in info.consumers}
    prefix: list[fx.Node] = []
    cur = info.node
    assert cur is not None
    while True:
        users = [u for u in cur.users if u in members]
        if len(users) != 1 or len(cur.users) != 1 or users[0] not in kinds:
            return fallback
        nxt = users[0]
        kind = kinds[nxt]
        if kind == StepKind.AFFINE or (kind == StepKind.BATCHNORM and batchnorm == "running"):
            prefix.append(nxt)
            cur = nxt
            continue
        if kind != StepKind.ACTIVATION:
            return fallback
        sigma = nxt
        break
    rest = [k for node, k in kinds.items() if node is not sigma and node not in prefix]
    if any(_curved(k, batchnorm) for k in rest):
        return fallback
    return Route("closed-form", tuple(prefix), sigma)


@dataclass
class LayerRecipe:
    """What one layer needs from the forward pass, and how to turn it into a local problem."""

    info: LayerInfo
    module: nn.Module
    route: Route

    def activations(self) -> list[fx.Node]:
        return [c.node for c in self.info.chain if c.kind == StepKind.ACTIVATION]

    def taps(self) -> list[fx.Node]:
        sigma = self.route.sigma
        if self.route.kind == "chain":
            return self.activations()
        return [sigma] if sigma is not None and self.route.kind == "closed-form" else []

    def edge_taps(self) -> list[fx.Node]:
        return [c.node for c in self.info.consumers] if self.route.kind == "general" else []

    def keep(self) -> list[fx.Node]:
        info = self.info
        assert info.node is not None
        nodes = [first_input(info.node)]
        if self.route.kind in ("closed-form", "chain"):  # closed form: σ's input is recomputed
            nodes.append(info.node)
        elif self.route.kind == "general":
            nodes += [a for a in _fixed_inputs(info) if a not in nodes]
        return nodes

    def problem(
        self, ex: Executor, kept: dict[fx.Node, Any], grads: dict[fx.Node, Tensor]
    ) -> LocalProblem:
        info = self.info
        assert info.node is not None
        x = kept[first_input(info.node)].detach()
        if info.assumes_2d and x.dim() != 2:
            raise ValueError(
                f"layer '{info.name}' gets {x.dim()}-D inputs, but its BatchNorm1d/PReLU acts on "
                "dimension 1, which then does not hold its neurons: the layer is not splittable"
            )
        if self.route.kind == "zero":
            return ZeroProblem(info.n, info.d, x.new_zeros(()))
        th = neurons.theta(self.module).to(x.dtype)
        if self.route.kind == "closed-form":
            sigma = self.route.sigma
            assert sigma is not None
            y = kept[info.node].detach()
            z, scale = _affine_prefix(ex, self.route.prefix, info.node, y)
            # w = σ''(z)·g·c², in place in the fresh c (large: one value per output)
            weights = ex.curvature_weights(sigma, z, grads[sigma], scale.square_())
            handler = neurons.handler(self.module)
            patches = handler.operator(self.module, x)
            assert patches is not None
            return ClosedFormProblem(patches, handler.to_bnp(self.module, weights), th)
        chain_nodes = [c.node for c in info.chain]
        if self.route.kind == "chain":
            acts = self.activations()
            layouts = {c.node: c.layout for c in info.chain}
            return ChainProblem(
                ex,
                self.module,
                info.node,
                x,
                kept[info.node].detach(),
                th,
                chain_nodes,
                {c.node: c.kind for c in info.chain},
                [(a, layouts[a], grads[a]) for a in acts],
            )
        outside = {a: kept[a] for a in _outside_inputs(info)}  # members' inputs: below
        members = [
            (ex.modules[m.name], m.node, kept[first_input(m.node)].detach(),
             neurons.theta(ex.modules[m.name]).to(x.dtype))
            for m in info.members
        ]  # fmt: skip
        edges: dict[Any, Tensor] = {}  # one term per tensor read, its consumers' gradients summed
        for c in info.consumers:
            g = grads[c.node]
            edges[c.node.args[0]] = g if c.node.args[0] not in edges else edges[c.node.args[0]] + g
        return GeneralProblem(ex, members, chain_nodes, outside, list(edges.items()))


def _affine_prefix(
    ex: Executor, prefix: tuple[fx.Node, ...], producer: fx.Node, y: Tensor
) -> tuple[Tensor, Tensor]:
    """z, the pointwise affine prefix's value at y (σ's input: recomputed, so that the forward
    pass need not keep it), and c = ∂z/∂y (elementwise, shaped like y)."""
    if not prefix:
        return y, torch.ones_like(y)
    with torch.enable_grad(), ex.first_order():
        y_ = y.detach().requires_grad_(True)
        (z,) = ex.run_chain(prefix, {producer: y_}, [prefix[-1]])
        # elementwise: ∂(Σz)/∂y = c, and the sum's gradient is an expanded 1 (no ones_like(z))
        (c,) = torch.autograd.grad(z.sum(), y_)
    # a prefix that does not scale (dropout, identity, + constant) passes the sum's expanded 1
    # through: a fresh, dense c, since the caller squares it in place
    return z.detach(), c if c.is_contiguous() else c.contiguous()


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

    def projected(self, u: Tensor) -> Tensor:
        """uᵀ S_b u for every neuron, ``u`` ``(d, k)``: ``(n, k, k)``. Here from k products
        S·v; routes that share input patches x̃ across neurons do it for less."""
        su = self.hvp(u.expand(self.n, *u.shape))  # (n, d, k)
        return u.t() @ su

    def inputs_gram_times(self, u: Tensor) -> Tensor | None:
        """X̃ᵀX̃ u ``(d, k)`` for the batch's input patches X̃ ``(B·P, d)`` shared by all neurons,
        or ``None`` where the route has none."""
        return None


class ZeroProblem(LocalProblem):
    """No curved step between the layer and its consumers: S = 0 exactly."""

    def __init__(self, n: int, d: int, like: Tensor) -> None:
        self.n, self.d, self.like = n, d, like

    def matrices(self) -> Tensor:
        return self.like.new_zeros(self.n, self.d, self.d)

    def hvp(self, v: Tensor) -> Tensor:
        return torch.zeros_like(v)

    def projected(self, u: Tensor) -> Tensor:
        return self.like.new_zeros(self.n, u.shape[1], u.shape[1])


# Σ w x̃x̃ᵀ goes through x̃⊗x̃ features (d(d+1)/2 per row) in one GEMM for d up to this and at
# least d/2 neurons; with fewer neurons, or larger d, forming the features costs more than the
# grouped products save. Measured at d = 10, 28, 48 and M = 4096 rows: 1.8-3.0x faster at
# n = 32, 1.8-4.5x slower at n = 4, about even near n = d/2 (8-16 at d = 28, 24 at d = 48)
GEMM_MAX_D = 48


def _chunk_elements(like: Tensor) -> int:
    return slice_elements(_CHUNK_ELEMENTS, like.device)


def _hvp_slice_elements(like: Tensor) -> int:
    return slice_elements(_HVP_SLICE_ELEMENTS, like.device)


def weighted_grams(x: Tensor, w: Tensor) -> Tensor:
    """S_i = Σ_p w_{i,p} x_p x_pᵀ for every i: ``x`` ``(M, d)``, ``w`` ``(n, M)`` → ``(n, d, d)``.

    For small d, one matrix product per chunk of rows, W ``(n, M)`` @ [x_p ⊗ x_p] ``(M, ·)``:
    the x_p are shared by all neurons, so nothing is repeated n times, and the product is one
    large GEMM rather than n small ones. Only the upper triangle's d(d+1)/2 features are formed
    (each row's x_a·x_{b≥a}, written block by block into one buffer), and the result is mirrored:
    half the GEMM of all d². For larger d, or fewer than d/2 neurons, the features cost more than
    they save, and the neurons are done in groups, (w_i ⊙ x)ᵀ x.
    """
    n, d = w.shape[0], x.shape[1]
    if d <= GEMM_MAX_D and 2 * n >= d:
        return _grams_from_features(x, w)
    return _grams_grouped(x, w)


def _grams_from_features(x: Tensor, w: Tensor) -> Tensor:
    n, d = w.shape[0], x.shape[1]
    upper = torch.triu_indices(d, d, device=x.device)
    k = upper.shape[1]
    tri = x.new_zeros(n, k)
    step = max(1, _chunk_elements(x) // k)
    features = x.new_empty(min(step, x.shape[0]), k)
    for s in range(0, x.shape[0], step):
        rows = x[s : s + step]
        f = features[: rows.shape[0]]
        at = 0
        for a in range(d):  # the features x_a·x_b, b ≥ a, of every row
            torch.mul(rows[:, a : a + 1], rows[:, a:], out=f[:, at : at + d - a])
            at += d - a
        tri.addmm_(w[:, s : s + step], f)
    out = x.new_empty(n, d, d)
    out[:, upper[0], upper[1]] = tri
    out[:, upper[1], upper[0]] = tri
    return out


def _grams_grouped(x: Tensor, w: Tensor) -> Tensor:
    n, d = w.shape[0], x.shape[1]
    grams = x.new_empty(n, d, d)
    step = max(1, _chunk_elements(x) // max(1, x.numel()))
    for s in range(0, n, step):
        weighted = w[s : s + step, :, None] * x  # (k, M, d)
        grams[s : s + step] = weighted.transpose(1, 2) @ x
    return grams


class ClosedFormProblem(LocalProblem):
    """S_i = Σ_p w_{i,p} x̃_p x̃_pᵀ with patches X̃ ``(B·P, d)`` (an operator: a convolution's are
    never unfolded to compute S·v) and w ``(B, n, P)`` weights."""

    def __init__(self, patches: neurons.Patches, weights: Tensor, like: Tensor) -> None:
        self.x, self.w = patches, weights
        self.n, self.d = like.shape

    def _flat_weights(self) -> Tensor:
        return self.w.transpose(0, 1).reshape(self.n, -1)  # (n, B·P)

    def matrices(self) -> Tensor:
        return weighted_grams(self.x.dense().reshape(-1, self.d), self._flat_weights())

    def hvp(self, v: Tensor) -> Tensor:
        """In slices of samples, each with at most ``_HVP_SLICE_ELEMENTS`` products X̃v: a wide
        layer's products on a whole batch are as large as its activations."""
        n, d, m = v.shape
        flat = v.permute(1, 0, 2).reshape(d, n * m)
        batch, _, p = self.w.shape
        step = max(1, _hvp_slice_elements(v) // max(1, n * m * p))
        out: Tensor | None = None
        for a in range(0, batch, step):
            x = self.x if step >= batch else self.x.samples(a, a + step)
            xv = x.times(flat)  # (b, n·m, P)
            b = xv.shape[0]
            xv = xv.view(b, n, m, p) * self.w[a : a + step].unsqueeze(2)
            g = x.t_times(xv.view(b, n * m, p))
            out = g if out is None else out.add_(g)
        assert out is not None
        return out.view(d, n, m).permute(1, 0, 2)

    def projected(self, u: Tensor) -> Tensor:
        xu = self.x.times(u).transpose(1, 2).reshape(-1, u.shape[1])  # (B·P, k)
        return weighted_grams(xu, self._flat_weights())

    def inputs_gram_times(self, u: Tensor) -> Tensor:
        return self.x.t_times(self.x.times(u))


class GeneralProblem(LocalProblem):
    """φ(θ) = Σ_edges ⟨g_e, value_e(θ)⟩; S_i = ∂²φ/∂θ_i² (module docstring).

    The producers (one, or every member of a coupled unit) are re-run on their recorded inputs
    with parameters θ, and the chain after them in graph order; everything else the chain reads is
    held at its recorded value. θ of a unit is its members' rows side by side, and the Hessian
    stays block-diagonal across neurons: every step acts on each channel separately.
    """

    def __init__(
        self,
        ex: Executor,
        members: list[tuple[nn.Module, fx.Node, Tensor, Tensor]],
        chain: list[fx.Node],
        outside: dict[fx.Node, Any],
        edges: list[tuple[Any, Tensor]],
    ) -> None:
        self.n = members[0][3].shape[0]
        self.d = sum(th.shape[1] for *_, th in members)
        self.sizes = [th.shape[1] for *_, th in members]
        producers = {node: (module, x) for module, node, x, _ in members}
        position = {node: i for i, node in enumerate(members[0][1].graph.nodes)}
        steps = sorted([*chain, *producers], key=position.__getitem__)
        with torch.enable_grad():
            self.thetas = [th.detach().requires_grad_(True) for *_, th in members]
            by_node = dict(zip(producers, self.thetas, strict=True))
            env = dict(outside)
            for node in steps:
                if node in producers:
                    module, x = producers[node]
                    env[node] = neurons.forward(module, x, by_node[node])
                    continue
                args = fx.node.map_arg(node.args, lambda a: env[a])
                kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
                env[node] = ex.run_node(node, args, kwargs)
            phi = sum((env[node] * g).sum() for node, g in edges)
            assert isinstance(phi, Tensor)
            self.grads = torch.autograd.grad(phi, self.thetas, create_graph=True)
        self.theta = self.thetas[0]
        self._batched = True

    def _columns(self, v: Tensor) -> Tensor:
        """S·v for the columns of ``v`` ``(n, d, m)``: m Hessian-vector products, batched with
        ``vmap`` in chunks (one at a time where an operation has no batching rule)."""
        pairs = [(g, t) for g, t in zip(self.grads, self.thetas, strict=True) if g.requires_grad]
        if not pairs:  # φ linear in θ: no curvature reached autograd
            return torch.zeros_like(v)
        grads, wrt = [g for g, _ in pairs], [t for _, t in pairs]
        index = [next(i for i, t in enumerate(self.thetas) if t is w) for w in wrt]
        out = torch.zeros_like(v)
        offsets = [0, *itertools.accumulate(self.sizes)]
        chunk = max(1, min(v.shape[2], HVP_CHUNK))
        for s in range(0, v.shape[2], chunk):
            cols = v[:, :, s : s + chunk].permute(2, 0, 1)  # (m, n, d)
            parts = cols.split(self.sizes, dim=2)
            got: tuple[Tensor | None, ...] = ()
            if self._batched:
                try:
                    got = torch.autograd.grad(
                        grads, wrt, [parts[i].contiguous() for i in index],
                        retain_graph=True, is_grads_batched=True, allow_unused=True,
                    )  # fmt: skip
                except RuntimeError:  # an operation without a batching rule: one at a time
                    self._batched = False
            if not self._batched:
                per = [
                    torch.autograd.grad(
                        grads,
                        wrt,
                        [parts[i][j] for i in index],
                        retain_graph=True,
                        allow_unused=True,
                    )
                    for j in range(cols.shape[0])
                ]
                got = tuple(
                    None
                    if per[0][k] is None
                    else torch.stack([q[k] for q in per if q[k] is not None])
                    for k in range(len(wrt))
                )
            for i, g in zip(index, got, strict=True):
                if g is not None:
                    out[:, offsets[i] : offsets[i + 1], s : s + chunk] = g.permute(1, 2, 0)
        return out

    def matrices(self) -> Tensor:
        eye = torch.eye(self.d, dtype=self.theta.dtype, device=self.theta.device)
        return self._columns(eye.expand(self.n, self.d, self.d))

    def hvp(self, v: Tensor) -> Tensor:
        return self._columns(v.to(self.theta.dtype))


def _times(base: Tensor, scale: Tensor) -> Tensor:
    """``base · scale`` (broadcast) into a new contiguous tensor. A plain product of an expanded
    base takes the operands' stride order, and the reshape that follows would copy it again."""
    if torch.is_grad_enabled() and (base.requires_grad or scale.requires_grad):
        return (base * scale).contiguous()  # out= is not recorded by autograd
    out = torch.empty(
        torch.broadcast_shapes(base.shape, scale.shape), dtype=base.dtype, device=base.device
    )
    return torch.mul(base, scale, out=out)


def _depthwise_of_shared(
    conv: nn.Conv2d | None, base: Tensor, scale: Tensor | None
) -> Tensor | None:
    """The tangents of a depthwise conv's output, ``conv(base·scale)`` without its bias, when
    every channel's tangent base is the same: ``base`` ``(k, B, n, H, W)`` with stride 0 along the
    channels (a convolution producer's patch columns, broadcast to its n neurons), ``scale``
    ``(B, n, H, W)`` the pointwise slopes between. ``None`` where that does not hold.

    With X_t and s_t the k shared columns and the scale as read by kernel offset t (slices of
    their zero-padded copies), channel i's output is Σ_t w_{i,t}·s_{t,i} ⊙ X_t: a few broadcast
    products written straight into ``(B, n, k, H', W')``, the layout of the Gram products that
    read them, where the conv needs the k·n products base·scale materialised first. Returned as a
    ``(k, B, n, H', W')`` view of that layout. On MobileNet's first layer (k = 28, n = 32,
    32×32) the exact route took 12-15% less time this way than through the conv; slicing
    without copying X_t made the products slower than the conv."""
    if conv is None or scale is None or base.dim() != 5 or base.stride(2) != 0:
        return None
    if torch.is_grad_enabled() and (base.requires_grad or scale.requires_grad):
        return None  # written with out= and in place: not for autograd
    k, batch, n = base.shape[:3]
    if conv.in_channels != n or scale.shape != (batch, n, *base.shape[3:]):
        return None
    padding = (0, 0) if conv.padding == "valid" else conv.padding
    if isinstance(padding, str):  # "same": left to the conv
        return None
    (kh, kw), (ph, pw) = conv.kernel_size, padding
    (dh, dw), (sh, sw) = conv.dilation, conv.stride
    size = neurons.conv_output_size(
        base.shape[3:], conv.kernel_size, conv.stride, padding, conv.dilation
    )
    pad = (pw, pw, ph, ph)
    cols = torch.nn.functional.pad(base[:, :, 0].transpose(0, 1), pad)  # (B, k, H+2p, W+2p)
    slopes = torch.nn.functional.pad(scale, pad)  # (B, n, H+2p, W+2p)
    weights = conv.weight.detach().reshape(n, kh * kw)
    out = torch.empty(batch, n, k, *size, dtype=base.dtype, device=base.device)
    for t, (i, j) in enumerate(itertools.product(range(kh), range(kw))):
        # kernel offset t: the inputs it reads for every output position
        rows = slice(i * dh, i * dh + sh * (size[0] - 1) + 1, sh)
        columns = slice(j * dw, j * dw + sw * (size[1] - 1) + 1, sw)
        s_t = slopes[:, :, rows, columns] * weights[:, t, None, None]  # (B, n, H', W')
        x_t = cols[:, :, rows, columns].contiguous()  # (B, k, H', W')
        if t == 0:
            torch.mul(s_t[:, :, None], x_t[:, None], out=out)
        else:
            out.addcmul_(s_t[:, :, None], x_t[:, None])
    return out.permute(2, 0, 1, 3, 4)


def _to_bnp(t: Tensor, layout: Layout, n: int) -> Tensor:
    """A chain tensor ``(B, …)`` in layout ``layout`` as ``(B, n, P)`` (channel-major blocks)."""
    if layout.cdim == -1 and t.dim() > 2:
        t = t.movedim(-1, 1)
    return t.reshape(t.shape[0], n, -1)


class ChainProblem(LocalProblem):
    """The Jacobian-chain form, for chains of linear steps and pointwise activations.

    For such a chain the Hessian of φ(θ) = Σ g·h(θ) is a sum over its activations σ_k:

        S_i = Σ_k Σ_{b,q} G_{k,b,i,q} · σ_k''(u_{k,b,i,q}) · J_{k,b,i,q} J_{k,b,i,q}ᵀ,

    with u_k the activation's input, G_k = ∂L/∂(its output) and J_k = ∂u_k/∂θ_i, the linear steps
    contributing nothing (DESIGN.md §1, "Chains, still in closed form"; the first term is the
    usual closed form). J is pushed forward by ``torch.func.jvp``, vectorised with ``vmap`` over
    the d basis directions, in slices of samples (every step acts per sample).
    """

    def __init__(
        self,
        ex: Executor,
        module: nn.Module,
        producer: fx.Node,
        x: Tensor,
        y: Tensor,
        th: Tensor,
        chain: list[fx.Node],
        kinds: dict[fx.Node, StepKind],
        acts: list[tuple[fx.Node, Layout, Tensor]],
    ) -> None:
        self.ex, self.module, self.producer, self.chain = ex, module, producer, chain
        self.kinds = kinds
        self.x, self.y, self.th = x, y, th
        self.n, self.d = th.shape
        self.acts = acts
        self.inputs = [first_input(a) for a, _, _ in acts]
        self._state: list[_SliceState] | None = None  # see _hvp_state

    def _primal(
        self, y: Tensor
    ) -> tuple[dict[fx.Node, Any], dict[fx.Node, Tensor | None], dict[fx.Node, Tensor | None]]:
        """The chain's values for the layer output ``y``; each node's tangent scale (the product of
        the pointwise slopes since the last step that mixes positions; ``None`` right after such
        a step); and the offsets f(0) of affine steps without a bias (``None`` where zero)."""
        primal: dict[fx.Node, Any] = {self.producer: y}
        scales: dict[fx.Node, Tensor | None] = {self.producer: None}
        offsets: dict[fx.Node, Tensor | None] = {}
        for node in self.chain:
            args = fx.node.map_arg(node.args, lambda a: primal[a])
            kwargs = fx.node.map_arg(node.kwargs, lambda a: primal[a])
            kind = self.kinds[node]
            if kind == StepKind.META:
                primal[node] = self.ex.run_node(node, args, kwargs)
                continue
            chain_in = [a for a in node.all_input_nodes if a in scales]
            if kind != StepKind.LINEAR and len(chain_in) == 1 and node.args[0] is chain_in[0]:
                value, slope = self._pointwise(node, args, kwargs)
                before = scales[chain_in[0]]
                primal[node] = value
                scales[node] = slope if before is None else before * slope
                continue
            primal[node] = self._run(node, chain_in, primal, [primal[a] for a in chain_in])
            scales[node] = None
            if not _is_selection(node, self.ex.modules) and self._bias(node) is None:
                # any other affine step A·u + b: its tangent is A·t = f(t) − f(0)
                zeros = [torch.zeros_like(primal[a]) for a in chain_in]
                offset = self._run(node, chain_in, primal, zeros)
                offsets[node] = offset if bool(offset.any()) else None
        return primal, scales, offsets

    def _tangents(
        self,
        t: Tensor,
        primal: dict[fx.Node, Any],
        pointwise: Collection[fx.Node],
        scales: dict[fx.Node, Tensor | None],
        offsets: dict[fx.Node, Tensor | None],
    ) -> list[Tensor]:
        """Tangent bases of the activation inputs u_k for the batch of tangents ``t`` ``(m, …)``
        of the layer output: the tangent of u_k is ``base · scale`` with the scale from
        :meth:`_primal`. Pointwise steps (``pointwise``) only change the unbatched scale; steps
        that mix positions (pools, depthwise convs, reshapes) materialise it, reading ``scales``
        of their inputs only, and are pushed with the m tangents folded into the batch; except a
        depthwise conv that reads a conv producer's patch columns through pointwise steps only,
        whose output is built from them directly (:func:`_depthwise_of_shared`).
        Equivalent to ``vmap(jvp(chain))`` without repeating the primal."""
        base: dict[fx.Node, Tensor] = {self.producer: t}
        for node in self.chain:
            if self.kinds[node] == StepKind.META:
                continue
            chain_in = [a for a in node.all_input_nodes if a in base]
            if node in pointwise:  # the scale holds its slope
                base[node] = base[chain_in[0]]
                continue
            if (
                len(chain_in) == 1
                and isinstance(self.module, nn.Conv2d)
                and base[chain_in[0]] is base[self.producer]
            ):
                # the conv producer's patch columns, through pointwise steps only
                a = chain_in[0]
                pushed = _depthwise_of_shared(
                    self._depthwise(node), base[a], scales[a] if a in pointwise else None
                )
                if pushed is not None:
                    base[node] = pushed
                    continue
            full = [
                _times(base[a], scales[a]) if a in pointwise else base[a]  # type: ignore[arg-type]
                for a in chain_in
            ]
            base[node] = self._push_linear(node, chain_in, primal, full, offsets.get(node))
        return [base[a] for a in self.inputs]

    def _push(
        self, y: Tensor, t: Tensor
    ) -> tuple[list[Tensor], list[tuple[Tensor, Tensor | None]]]:
        """Activation inputs u_k for the layer output ``y``, and their tangents for the
        tangents ``t`` of ``y``, each as ``(base, scale)``: ``base · scale``, see
        :meth:`_tangents`."""
        primal, scales, offsets = self._primal(y)
        pointwise = {node for node, scale in scales.items() if scale is not None}
        bases = self._tangents(t, primal, pointwise, scales, offsets)
        return [primal[a] for a in self.inputs], [
            (b, scales[a]) for b, a in zip(bases, self.inputs, strict=True)
        ]

    def _pointwise(
        self, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Tensor, Tensor]:
        """Value and elementwise derivative of a pointwise step at its (single) chain input."""
        slope = self.ex.slope(node, args, kwargs)
        if slope is not None:  # a piecewise-linear activation: no autograd needed
            with torch.no_grad(), self.ex.first_order():
                return self.ex.run_node(node, args, kwargs), slope
        with torch.enable_grad(), self.ex.first_order():
            u = args[0].detach().requires_grad_(True)
            out = self.ex.run_node(node, (u, *args[1:]), kwargs)
            (slope,) = torch.autograd.grad(out, u, torch.ones_like(out), allow_unused=True)
        return out.detach(), torch.zeros_like(u) if slope is None else slope

    def _depthwise(self, node: fx.Node) -> nn.Conv2d | None:
        """The step's module if it is a plain depthwise 2-D conv (one filter per channel, zero
        padding, no hooks: the tangents read its weight, not its forward) called on its chain
        input alone, else ``None``."""
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            return None
        module = self.ex.modules[str(node.target)]
        if (
            type(module) is not nn.Conv2d
            or module.groups != module.in_channels
            or module.out_channels != module.in_channels
            or module.padding_mode != "zeros"
            or module._forward_hooks
            or module._forward_pre_hooks
        ):
            return None
        return module

    def _bias(self, node: fx.Node) -> Tensor | None:
        if node.op != "call_module":
            return None
        return optional_tensor(self.ex.modules[str(node.target)], "bias")

    def _run(
        self,
        node: fx.Node,
        chain_in: list[fx.Node],
        primal: dict[fx.Node, Any],
        values: list[Tensor],
        without_bias: bool = False,
    ) -> Any:
        """The step ``node`` with ``values`` for its chain inputs and the primal for the rest."""
        env = dict(primal)
        env.update(zip(chain_in, values, strict=True))
        args = fx.node.map_arg(node.args, lambda a: env[a])
        kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
        bias = self._bias(node)
        if without_bias and bias is not None:  # a depthwise conv: A·u without its + b
            module = self.ex.modules[str(node.target)]
            return functional_call(module, {"bias": torch.zeros_like(bias)}, args, kwargs)
        with self.ex.first_order():
            return self.ex.run_node(node, args, kwargs)

    def _push_linear(
        self,
        node: fx.Node,
        chain_in: list[fx.Node],
        primal: dict[fx.Node, Any],
        tangents: list[Tensor],
        offset: Tensor | None,
    ) -> Tensor:
        """Tangents of a step that may mix positions, vectorised over their first dimension."""

        def run(*values: Tensor) -> Any:
            return self._run(node, chain_in, primal, list(values), without_bias=True)

        if _is_selection(node, self.ex.modules):  # max pools: select where the primal does
            base = tuple(primal[a] for a in chain_in)
            return vmap(lambda *ts: jvp(run, base, ts)[1])(*tangents)
        if len(chain_in) == 1 and len(node.all_input_nodes) == 1:
            # a per-sample op on one tensor: fold the tangents into the batch dimension
            t = tangents[0]
            out = run(t.reshape(-1, *t.shape[2:]))
            pushed = out.reshape(t.shape[0], t.shape[1], *out.shape[1:])
        else:
            contiguous = [t.contiguous() for t in tangents]  # views inside vmap need it
            pushed = vmap(run)(*contiguous)
        return pushed if offset is None else pushed - offset

    def _weights(self, us: list[Tensor], rows: slice) -> list[Tensor]:
        """w_k = G_k·σ_k''(u_k), shaped like u_k, for the samples ``rows``."""
        return [
            grad[rows] * self.ex.second_derivative(node, u)
            for (node, _, grad), u in zip(self.acts, us, strict=True)
        ]

    def _basis_tangents(
        self, x: Tensor, y: Tensor, patches: Tensor | None, u: Tensor | None = None
    ) -> Tensor:
        """∂y/∂θ_{·,j} for every basis direction j (the columns of ``u``, default the d unit
        vectors), all neurons at once: ``(k, *y.shape)``. ``patches`` are already times u."""
        if patches is None:
            dirs = torch.eye(self.d, dtype=y.dtype, device=y.device) if u is None else u.t()
            basis = dirs[:, None, :].expand(dirs.shape[0], self.n, self.d)
            return vmap(lambda e: neurons.forward(self.module, x, e))(basis)
        k = patches.shape[-1]
        t = patches.permute(2, 0, 1)  # (k, B, P)
        if isinstance(self.module, nn.Linear):
            return t.reshape(k, *y.shape[:-1], 1).expand(k, *y.shape)
        return t.reshape(k, y.shape[0], 1, *y.shape[2:]).expand(k, *y.shape)

    def _patches(self, x: Tensor) -> neurons.Patches | None:
        return neurons.handler(self.module).operator(self.module, x)

    def projected(self, u: Tensor) -> Tensor:
        return self.matrices(u)

    @torch.no_grad()
    def inputs_gram_times(self, u: Tensor) -> Tensor | None:
        out = u.new_zeros(u.shape)
        step = max(1, _chunk_elements(u) // max(1, self.y[0].numel() * self.d))
        for s in range(0, self.x.shape[0], step):
            patches = self._patches(self.x[s : s + step])
            if patches is None:
                return None
            out += patches.t_times(patches.times(u))
        return out

    @torch.no_grad()
    def matrices(self, u: Tensor | None = None) -> Tensor:
        """S_b for every neuron ``(n, d, d)``, or uᵀ S_b u ``(n, k, k)`` for ``u`` ``(d, k)``:
        the same Jacobian-chain sums over the k directions u instead of the d unit vectors."""
        d = self.d if u is None else u.shape[1]
        out = self.th.new_zeros(self.n, d, d)
        per_sample = max(1, self.y[0].numel() * d)
        step = max(1, _chunk_elements(self.y) // per_sample)
        for s in range(0, self.y.shape[0], step):
            rows = slice(s, s + step)
            x, y = self.x[rows], self.y[rows]
            op = self._patches(x)
            patches = None  # X̃ (B, P, d), or X̃u (B, P, k)
            if op is not None:
                patches = op.dense() if u is None else op.times(u).transpose(1, 2)
            basis = self._basis_tangents(x, y, patches, u)
            us, tangents = self._push(y, basis)
            layouts = [layout for _, layout, _ in self.acts]
            for layout, wu, (ut, scale) in zip(
                layouts, self._weights(us, rows), tangents, strict=True
            ):
                if scale is not None:  # J = base·scale: fold scale² into the weights
                    wu = wu * scale.square()
                w = _to_bnp(wu, layout, self.n)  # (B, n, P)
                if ut is basis and patches is not None:
                    # no step that mixes positions before this activation: J_i = x̃·scale_i,
                    # the closed form's Σ w x̃ x̃ᵀ, with x̃ shared by all neurons
                    flat = w.permute(1, 0, 2).reshape(self.n, -1)  # (n, B·P)
                    out += weighted_grams(patches.reshape(-1, d), flat)
                    continue
                if layout.cdim == -1 and ut.dim() > 3:
                    ut = ut.movedim(-1, 2)  # (d, B, …, n) → (d, B, n, …)
                j = ut.reshape(d, ut.shape[1], self.n, -1).permute(1, 2, 0, 3)  # (B, n, d, P)
                if j.shape[3] >= d:
                    # every (d, P) matrix of this view has unit stride along P: the batched
                    # product runs without copying the tangents into another layout, and its
                    # (B, n, d, d) result is no larger than the tangents
                    jw = torch.empty_like(j)
                    torch.mul(j, w[:, :, None, :], out=jw)
                    out += torch.matmul(jw, j.transpose(2, 3)).sum(0)
                else:  # few positions per sample: contract over samples and positions at once
                    jn = j.permute(1, 2, 0, 3).reshape(self.n, d, -1)  # (n, d, B·P)
                    wn = w.permute(1, 0, 2).reshape(self.n, 1, -1)
                    out += (jn * wn) @ jn.transpose(1, 2)
        return out

    def _hvp_state(self) -> list[_SliceState]:
        """What every product S·v on this batch reuses, computed at the first, per slice of
        samples: the primal inputs of the steps that mix positions, the tangent scales and
        offsets, and the weights w_k·scale_k². Slices keep the temporaries of a product small
        (large fresh allocations cost more than the arithmetic on them: ~4× on CPU)."""
        if self._state is not None:
            return self._state
        step = max(1, _hvp_slice_elements(self.y) // max(1, self.y[0].numel()))
        self._state = []
        for s in range(0, self.y.shape[0], step):
            rows = slice(s, s + step)
            with torch.no_grad():
                primal, scales, offsets = self._primal(self.y[rows])
                us = [primal[a] for a in self.inputs]
                weights = [
                    w if scales[a] is None else w * scales[a].square()  # type: ignore[union-attr]
                    for w, a in zip(self._weights(us, rows), self.inputs, strict=True)
                ]
            # keep only what the products read: the primal inputs of the steps that mix
            # positions where a tangent does not replace them (every input of a max pool, which
            # selects where the primal does), and the scales of those steps' inputs
            pointwise = frozenset(node for node, scale in scales.items() if scale is not None)
            mixing = [node for node in self.chain if node in scales and node not in pointwise]
            primal = {
                a: primal[a] for node in mixing for a in node.all_input_nodes
                if a not in scales or _is_selection(node, self.ex.modules)
            }  # fmt: skip
            scales = {
                a: scales[a] for node in mixing for a in node.all_input_nodes if a in pointwise
            }  # fmt: skip
            self._state.append(_SliceState(rows, primal, pointwise, scales, offsets, weights))
        return self._state

    def hvp(self, v: Tensor) -> Tensor:
        """S·v for every column of ``v`` ``(n, d, m)`` at once, as the gradient in v of
        ½ Σ_k Σ w_k·(J_k v)²: push J·v forward (the m columns folded into the batch), then one
        backward pass, per slice of samples. The primal, scales and weights are computed at the
        first product and kept with the problem."""
        v = v.detach().to(self.th.dtype)
        out = torch.zeros_like(v)
        for part in self._hvp_state():
            x = self.x[part.rows]
            with torch.enable_grad():
                vv = v.requires_grad_(True)
                ydot = vmap(lambda col, x=x: neurons.forward(self.module, x, col), in_dims=2)(vv)
                bases = self._tangents(ydot, part.primal, part.pointwise, part.scales, part.offsets)
                q = torch.zeros((), dtype=v.dtype, device=v.device)
                for w, base in zip(part.weights, bases, strict=True):
                    q = q + (w * base.square()).sum()
                (cols,) = torch.autograd.grad(q / 2, vv)
            out += cols
        return out


@dataclass
class _SliceState:
    """A slice of a chain problem's samples, with what its products S·v reuse."""

    rows: slice
    primal: dict[fx.Node, Any]  # only what the steps that mix positions read
    pointwise: frozenset[fx.Node]  # the steps whose tangent is their input's times a scale
    scales: dict[fx.Node, Tensor | None]  # only those of the mixing steps' inputs
    offsets: dict[fx.Node, Tensor | None]
    weights: list[Tensor]


_SELECTIONS: tuple[Any, ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    torch.nn.functional.max_pool1d,
    torch.nn.functional.max_pool2d,
    torch.nn.functional.adaptive_max_pool1d,
    torch.nn.functional.adaptive_max_pool2d,
)


def _is_selection(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Piecewise-linear steps that select inputs (max pools): linear only around the primal."""
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], _SELECTIONS[:4])
    return node.op == "call_function" and node.target in _SELECTIONS[4:]
