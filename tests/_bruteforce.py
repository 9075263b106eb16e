"""Slow, obviously correct references for the tests: the Hessian of the split network's loss.

The split network is built by ``split_neurons`` at eps = 0 with every neuron of one layer split
(rows ``[0, n)`` are the ``+`` offspring, rows ``[n, 2n)`` the ``−`` offspring); its loss over the
whole data set is then a function of the offsets δ through ``torch.func.functional_call``, and
``torch.autograd.functional.hessian`` differentiates it twice. Nothing of splitgrow's splitting
mathematics is used.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.func import functional_call

from splitgrow import split_neurons


def _theta_split(module: nn.Module, delta: Tensor) -> dict[str, Tensor]:
    w = module.weight
    n2 = w.shape[0]
    k = w[0].numel()
    has_bias = getattr(module, "bias", None) is not None
    if k == 2 * (delta.shape[1] - has_bias):
        # a member that also reads its own unit (x + b(x)): split after all, its input columns
        # were halved and duplicated, and so is the offset given in the old layout
        cols = delta[:, : k // 2] / 2
        delta = torch.cat([cols, cols, delta[:, k // 2 :]], dim=1)
    signed = torch.cat([delta, -delta])  # (2n, d)
    params = {"weight": w + signed[:, :k].reshape(n2, *w.shape[1:])}
    if getattr(module, "bias", None) is not None:
        params["bias"] = module.bias + signed[:, k]
    return params


def split_loss_fn(
    model: nn.Module,
    layer: str,
    loss_fn,
    batches,
    *,
    batchnorm: str = "running",
    beta=None,
    members: list[str] | None = None,
):
    """L(δ): the data set's mean loss of the split network, δ of shape (n, d).

    ``members`` are the coupled layers whose rows split together (default: ``[layer]``); δ is
    then their parameters side by side, in the order given. With ``beta``, ReLU-like
    activations of the split network get the independent surrogate.
    """
    members = members or [layer]
    n = dict(model.named_modules())[layer].weight.shape[0]
    zeros = torch.zeros(n, _d(model, members), dtype=torch.float64)
    template = split_neurons(model, {layer: (torch.arange(n), zeros)}, eps=0.0)
    if beta is not None:
        template = with_surrogates(template, beta)
    template.eval()
    if batchnorm == "batch":
        for m in template.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
    base = {k: v for k, v in template.named_parameters()}
    buffers = {k: v.clone() for k, v in template.named_buffers()}
    total = sum(int(x.shape[0]) for x, _ in batches)
    sizes = [_d(model, [m]) for m in members]

    def loss(delta: Tensor) -> Tensor:
        mods = dict(template.named_modules())
        params = dict(base)
        for member, part in zip(members, delta.split(sizes, dim=1), strict=True):
            for k, v in _theta_split(mods[member], part).items():
                params[f"{member}.{k}"] = v
        out = 0.0
        for x, y in batches:
            state = {**params, **{k: v.clone() for k, v in buffers.items()}}
            out = out + loss_fn(functional_call(template, state, (x,)), y) * (x.shape[0] / total)
        return out

    return loss


def _d(model: nn.Module, members: list[str]) -> int:
    mods = dict(model.named_modules())
    return sum(
        mods[m].weight[0].numel() + int(getattr(mods[m], "bias", None) is not None) for m in members
    )


def split_hessian(
    model, layer, loss_fn, batches, *, batchnorm="running", beta=None, members=None
) -> Tensor:
    """The full Hessian of L(δ) at δ = 0, shaped (n, d, n, d)."""
    model = copy.deepcopy(model)
    n, d = dict(model.named_modules())[layer].weight.shape[0], _d(model, members or [layer])
    f = split_loss_fn(
        model, layer, loss_fn, batches, batchnorm=batchnorm, beta=beta, members=members
    )
    zero = torch.zeros(n * d, dtype=torch.float64)
    h = torch.autograd.functional.hessian(lambda flat: f(flat.view(n, d)), zero)
    return h.view(n, d, n, d)


def blocks(h: Tensor) -> Tensor:
    """The diagonal blocks S_i of an (n, d, n, d) Hessian: (n, d, d)."""
    n = h.shape[0]
    return torch.stack([h[i, :, i, :] for i in range(n)])


def off_block_max(h: Tensor) -> float:
    """Largest |entry| outside the diagonal blocks."""
    n = h.shape[0]
    mask = torch.ones(n, n, dtype=torch.bool)
    mask.fill_diagonal_(False)
    return float(h.permute(0, 2, 1, 3)[mask].abs().max()) if n > 1 else 0.0


# ------------------------------------------------------------------------------------------
# An independent smooth surrogate for ReLU-like activations: custom autograd functions whose
# value and first derivative are exact and whose second derivative is softplus_β''. splitgrow
# implements its surrogate differently (a detached quadratic term); both must agree.


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, beta: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z)
        ctx.beta = beta
        return (z > 0).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (z,) = ctx.saved_tensors
        s = torch.sigmoid(ctx.beta * z)
        return g * ctx.beta * s * (1 - s), None


class _SmoothReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, beta: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z)
        ctx.beta = beta
        return z.clamp_min(0)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (z,) = ctx.saved_tensors
        return g * _Step.apply(z, ctx.beta), None


class SurrogateAct(nn.Module):
    """σ(z) = a·z + b + Σ c_k relu(z − t_k), with the smooth second derivative."""

    def __init__(self, a, b: float, kinks, beta: float, slope_shape=None) -> None:
        super().__init__()
        self.a, self.b, self.kinks, self.beta = a, b, kinks, beta

    def forward(self, z: Tensor) -> Tensor:
        a = self.a
        if isinstance(a, Tensor) and a.numel() > 1:
            a = a.view(1, -1, *([1] * (z.dim() - 2)))
        out = a * z + self.b
        for t, c in self.kinks:
            if isinstance(c, Tensor) and c.numel() > 1:
                c = c.view(1, -1, *([1] * (z.dim() - 2)))
            out = out + c * _SmoothReLU.apply(z - t, self.beta)
        return out


def _surrogate_for(m: nn.Module, beta: float) -> nn.Module | None:
    if type(m) is nn.ReLU:
        return SurrogateAct(0.0, 0.0, [(0.0, 1.0)], beta)
    if type(m) is nn.ReLU6:
        return SurrogateAct(0.0, 0.0, [(0.0, 1.0), (6.0, -1.0)], beta)
    if type(m) is nn.LeakyReLU:
        s = m.negative_slope
        return SurrogateAct(s, 0.0, [(0.0, 1.0 - s)], beta)
    if type(m) is nn.Hardtanh:
        return SurrogateAct(0.0, m.min_val, [(m.min_val, 1.0), (m.max_val, -1.0)], beta)
    if type(m) is nn.Hardsigmoid:
        return SurrogateAct(0.0, 0.0, [(-3.0, 1 / 6), (3.0, -1 / 6)], beta)
    if type(m) is nn.PReLU:
        a = m.weight.detach()
        return SurrogateAct(a, 0.0, [(0.0, 1.0 - a)], beta)
    return None


def with_surrogates(model: nn.Module, beta: float) -> nn.Module:
    """A copy of ``model`` with every ReLU-like module replaced by :class:`SurrogateAct`."""
    model = copy.deepcopy(model)

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            new = _surrogate_for(child, beta)
            if new is not None:
                setattr(parent, name, new)
            else:
                swap(child)

    swap(model)
    return model
