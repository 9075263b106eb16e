"""New neurons of one unit as differentiable arguments of the model's loss (gradmax, firefly).

:class:`NewNeuronProbe` inserts ``count`` new neurons into a copy of the model with
:func:`~splitgrow.surgery.fresh.add_neurons` (the surgery the growth loop applies) and evaluates
the data set's mean loss with their incoming parameters θ ``(count, d)`` and their consumer
columns C ``(out, count·block, *kernel)`` given as tensors, so that autograd differentiates the
loss in them through whatever per-channel chain (BatchNorm, activation, pooling, flatten) and
consumer (Linear, or Conv through its input patches) the model has. BatchNorm uses its running
statistics and dropout is off (the model copy is in eval mode), as in every splitting computation.
The new channels' BatchNorm is the identity, except for the bias of the unit's first BatchNorm
when ``chain_bias`` is given (``NewNeurons.chain_bias``: gradmax's operating point of a
bias-free layer before BatchNorm).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from splitgrow._attrs import optional_tensor, tensor
from splitgrow.graph.analyze import LayerInfo
from splitgrow.surgery.fresh import NewNeurons, add_neurons

Batch = tuple[Tensor, Tensor]


def plain_consumer_reason(info: LayerInfo, modules: Mapping[str, nn.Module]) -> str | None:
    """Why new neurons of ``info``'s unit cannot be probed (``None`` when they can).

    The unit must be a single producer whose channels reach one plain Linear/Conv consumer that
    reads only this unit's channels, through per-channel operations whose only parameters are
    BatchNorm's (a depthwise filter or PReLU slope would be copied from a random neuron).
    """
    if not info.splittable:
        return f"not splittable: {info.reason}"
    if info.coupled:
        return "coupled with other layers (a residual add or concatenation)"
    if len(info.consumers) != 1:
        return f"its channels reach {len(info.consumers)} consumers, not one"
    consumer = info.consumers[0]
    if len(consumer.segments) != 1:
        return f"consumer '{consumer.name}' reads a concatenation"
    for c in info.chain:
        if c.module is None:
            continue
        module = modules[c.module]
        params = list(module.parameters(recurse=False))
        if params and not isinstance(module, nn.modules.batchnorm._BatchNorm):
            return (
                f"its chain holds '{c.module}' ({type(module).__name__}) with per-channel weights"
            )
    return None


def outgoing_norms(info: LayerInfo, modules: Mapping[str, nn.Module]) -> Tensor:
    """``(n,)`` norm of each existing neuron's columns in its (single) consumer."""
    consumer = info.consumers[0]
    weight = tensor(modules[consumer.name], "weight").detach()
    cols = weight.reshape(weight.shape[0], info.n, consumer.block, -1)  # (out, n, block, kernel)
    return cols.pow(2).sum(dim=(0, 2, 3)).sqrt()


class NewNeuronProbe:
    """The mean loss of ``model`` grown by ``count`` new neurons of ``unit`` (module docstring).

    Args:
        model: the model (not modified).
        info: the unit (``plain_consumer_reason(info, …)`` must be ``None``).
        count: new neurons, in ``[1, info.n]``.
        loss_fn: mean loss of a batch.
        data: the batches; the loss is their mean weighted by size.
        generator: random source of the insertion (which slots the surgery copies).
        chain_bias: the new channels' bias in the unit's first BatchNorm
            (:attr:`~splitgrow.surgery.fresh.NewNeurons.chain_bias`); ``None``: 0.
    """

    def __init__(
        self,
        model: nn.Module,
        info: LayerInfo,
        count: int,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        data: Sequence[Batch],
        generator: torch.Generator,
        chain_bias: float | None = None,
    ) -> None:
        self.info = info
        self.count = count
        self.loss_fn = loss_fn
        self.data = list(data)
        self.samples = sum(len(y) for _, y in self.data)
        if not self.samples:
            raise ValueError("data holds no samples")
        spec = NewNeurons(count, chain_bias=chain_bias)
        grown, _, _ = add_neurons(model, {info.name: spec}, generator=generator)
        grown.eval()
        self.grown = grown
        modules = dict(grown.named_modules())
        member = info.members[0]
        self.member = member.name
        layer = modules[member.name]
        self.weight = tensor(layer, "weight").detach()[: info.n]
        bias = optional_tensor(layer, "bias")
        self.bias = None if bias is None else bias.detach()[: info.n]
        consumer = info.consumers[0]
        self.consumer = consumer.name
        cweight = tensor(modules[consumer.name], "weight").detach()
        self.old_columns = cweight[:, : info.n * consumer.block]
        #: shape of C: (out, count·block, *kernel)
        self.out_shape = (cweight.shape[0], count * consumer.block, *cweight.shape[2:])
        self.ref = self.weight

    def params(self, theta: Tensor, columns: Tensor) -> dict[str, Tensor]:
        """The overridden parameters for new incoming θ ``(count, d)`` and columns C."""
        k = self.weight[0].numel()
        rows = theta[:, :k].reshape(self.count, *self.weight.shape[1:])
        out = {f"{self.member}.weight": torch.cat([self.weight, rows])}
        if self.bias is not None:
            out[f"{self.member}.bias"] = torch.cat([self.bias, theta[:, k]])
        out[f"{self.consumer}.weight"] = torch.cat([self.old_columns, columns], dim=1)
        return out

    def batch_loss(self, theta: Tensor, columns: Tensor, batch: Batch) -> Tensor:
        """This batch's share of the data set's mean loss (its mean loss × size / samples)."""
        x, y = batch
        out = functional_call(self.grown, self.params(theta, columns), (x,))
        return self.loss_fn(out, y) * (len(y) / self.samples)

    def loss(self, theta: Tensor, columns: Tensor) -> Tensor:
        """The data set's mean loss."""
        return sum(
            (self.batch_loss(theta, columns, b) for b in self.data),
            start=torch.zeros((), dtype=self.ref.dtype, device=self.ref.device),
        )

    def zero_columns(self) -> Tensor:
        """C = 0 (the function of the model unchanged), requiring grad."""
        return torch.zeros(self.out_shape, dtype=self.ref.dtype, device=self.ref.device)


def mixed_hessian(probe: NewNeuronProbe, theta: Tensor) -> Tensor:
    """M = ∂²L/∂C∂θ at C = 0 for one new neuron (``probe.count == 1``) with incoming ``theta``
    ``(1, d)``: ``(P, d)`` with P = out·block·kernel, so that a new neuron with columns c
    (flattened) gets the incoming gradient ∂L/∂θ = Mᵀc, exactly, while the function is unchanged.

    Computed by double back-propagation, one backward per row or column (the smaller side).
    """
    th = theta.detach().clone().requires_grad_(True)
    columns = probe.zero_columns().requires_grad_(True)
    d = th.numel()
    p = columns.numel()
    m = torch.zeros(p, d, dtype=th.dtype, device=th.device)
    for batch in probe.data:
        loss = probe.batch_loss(th, columns, batch)
        if d <= p:
            (g,) = torch.autograd.grad(loss, th, create_graph=True)
            g = g.reshape(-1)
            for j in range(d):
                (r,) = torch.autograd.grad(g[j], columns, retain_graph=True, allow_unused=True)
                if r is not None:
                    m[:, j] += r.reshape(-1)
        else:
            (g,) = torch.autograd.grad(loss, columns, create_graph=True)
            g = g.reshape(-1)
            for i in range(p):
                (r,) = torch.autograd.grad(g[i], th, retain_graph=True, allow_unused=True)
                if r is not None:
                    m[i] += r.reshape(-1)
    return m.detach()


def check_number(
    options: Mapping[str, object], key: str, default: float, *, low: float, strict: bool
) -> float:
    """``options[key]`` as a finite float ``> low`` (``strict``) or ``>= low``.

    Raises:
        ValueError: naming the key and the bad value.
    """
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"option {key!r} must be a finite number, got {value!r}")
    if value < low or (strict and value == low):
        op = ">" if strict else ">="
        raise ValueError(f"option {key!r} must be {op} {low:g}, got {value!r}")
    return float(value)


def check_int(
    options: Mapping[str, object], key: str, default: int | None, *, low: int
) -> int | None:
    """``options[key]`` as an integer ``>= low`` (or ``None`` when allowed by the default).

    Raises:
        ValueError: naming the key and the bad value.
    """
    value = options.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"option {key!r} must be an integer >= {low}, got {value!r}")
    return value


def check_keys(options: Mapping[str, object], known: Sequence[str], strategy: str) -> None:
    """Raise ``ValueError`` naming an unknown option key."""
    for key in options:
        if key not in known:
            raise ValueError(
                f"unknown {strategy} option {key!r}; known: {', '.join(sorted(known))}"
            )
