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
    signed = torch.cat([delta, -delta])  # (2n, d)
    params = {"weight": w + signed[:, :k].reshape(n2, *w.shape[1:])}
    if getattr(module, "bias", None) is not None:
        params["bias"] = module.bias + signed[:, k]
    return params


def split_loss_fn(model: nn.Module, layer: str, loss_fn, batches, *, batchnorm: str = "running"):
    """L(δ): the data set's mean loss of the split network, δ of shape (n, d)."""
    n = dict(model.named_modules())[layer].weight.shape[0]
    template = split_neurons(
        model,
        {layer: (torch.arange(n), torch.zeros(n, _d(model, layer), dtype=torch.float64))},
        eps=0.0,
    )
    template.eval()
    if batchnorm == "batch":
        for m in template.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
                m.momentum = 0.0  # the forward must not be affected; buffers are copies anyway
    base = {k: v for k, v in template.named_parameters()}
    buffers = {k: v.clone() for k, v in template.named_buffers()}
    total = sum(int(x.shape[0]) for x, _ in batches)

    def loss(delta: Tensor) -> Tensor:
        mod = dict(template.named_modules())[layer]
        params = dict(base)
        for k, v in _theta_split(mod, delta).items():
            params[f"{layer}.{k}"] = v
        out = 0.0
        for x, y in batches:
            state = {**params, **{k: v.clone() for k, v in buffers.items()}}
            out = out + loss_fn(functional_call(template, state, (x,)), y) * (x.shape[0] / total)
        return out

    return loss


def _d(model: nn.Module, layer: str) -> int:
    m = dict(model.named_modules())[layer]
    return m.weight[0].numel() + int(getattr(m, "bias", None) is not None)


def split_hessian(model, layer, loss_fn, batches, *, batchnorm: str = "running") -> Tensor:
    """The full Hessian of L(δ) at δ = 0, shaped (n, d, n, d)."""
    model = copy.deepcopy(model)
    n, d = dict(model.named_modules())[layer].weight.shape[0], _d(model, layer)
    f = split_loss_fn(model, layer, loss_fn, batches, batchnorm=batchnorm)
    h = torch.autograd.functional.hessian(
        lambda flat: f(flat.view(n, d)), torch.zeros(n * d, dtype=torch.float64)
    )
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
