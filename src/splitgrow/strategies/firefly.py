"""Firefly: new neurons and splits of existing ones, scored by their leading-order loss change.

Wu et al., "Firefly neural architecture descent: a general approach for growing neural
networks" (NeurIPS 2020), in a simple, function-preserving form (docs/gradmax_firefly.md).

Every unit gets two kinds of candidates, scored on one scale: the leading-order change of the
loss when the candidate is grown with a probe step ε (the ``eps`` option, relative):

* **New neurons** (units with one plain consumer, see ``probe.plain_consumer_reason``): ``m``
  neurons with small random incoming parameters θ_j and columns ε·r·c_j (‖c_j‖ = 1, r the mean
  column norm of the unit's neurons). The loss changes by ε·r·⟨G_j(θ_j), c_j⟩ + O(ε²), where
  G_j = ∂L/∂C_j at C = 0 is the gradient at the neuron's columns. The best c_j is −G_j/‖G_j‖;
  θ_j is then optimised jointly for all ``m`` candidates by ``steps`` steps of normalised
  gradient ascent on Σ_j ‖G_j(θ_j)‖ with each ‖θ_j‖ kept at its initial value (double
  back-propagation). Score: −ε·r·‖G_j‖.
* **Splits** of existing neuron i along v (θ_i ± ε‖θ_i‖v, outgoing weights halved): the first
  order vanishes (a split is symmetric), so the leading term is ½(ε‖θ_i‖)²·vᵀS_iv. v is the
  eigenvector of λ_min(S_i) (``splitting_eigen``), the exact minimiser that Firefly's few
  gradient steps on v approximate. Score: ½(ε‖θ_i‖)²·λ_min,i.

What the plan holds: splits at unit scale (the loop scales them by its ε, as for S2D); new
neurons with the optimised θ_j and, by default (``outgoing="zero"``), **zero** columns, so that
the function is exactly unchanged at insertion; their first training step then moves the columns
along −G_j, which the θ_j were chosen to make large. ``outgoing="eps"`` gives them the columns
ε·r·c_j instead (the function then changes by the predicted first-order amount).

The candidates of a unit are sorted best first; candidate j is either a split or a new neuron
(``Candidates.state`` says which); each costs one neuron, as the loop charges.

Options (``ctx.options``):
    ``candidates`` (int >= 0, default 4): new-neuron candidates per unit (at most its width).
    ``steps`` (int >= 0, default 10): gradient steps on the new neurons' incoming parameters.
    ``lr`` (float > 0, default 0.1): each step moves θ_j by ``lr``·‖θ_j‖ (then back to its norm).
    ``init_scale`` (float > 0, default 1.0): θ_j start uniform in ±``init_scale``/√fan-in
        (1.0: PyTorch's default initialisation, as random new neurons).
    ``eps`` (float > 0, default 0.1): the probe step ε of the scores.
    ``split`` (bool, default True): offer splits of existing neurons too.
    ``outgoing`` (``"zero"`` or ``"eps"``, default ``"zero"``): the new neurons' columns in the
        plan.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from splitgrow.graph.analyze import analyze
from splitgrow.splitting.eigen import splitting_eigen
from splitgrow.splitting.neurons import unit_theta
from splitgrow.strategies.base import Candidates, GrowPlan, RoundContext, register_strategy
from splitgrow.strategies.probe import (
    NewNeuronProbe,
    check_int,
    check_keys,
    check_number,
    outgoing_norms,
    plain_consumer_reason,
)
from splitgrow.surgery.fresh import NewNeurons
from splitgrow.surgery.split import SignedSplit, channel_map

OPTIONS = ("candidates", "steps", "lr", "init_scale", "eps", "split", "outgoing")
OUTGOING = ("zero", "eps")


@dataclass(frozen=True)
class FireflyOptions:
    """The validated options (module docstring)."""

    candidates: int = 4
    steps: int = 10
    lr: float = 0.1
    init_scale: float = 1.0
    eps: float = 0.1
    split: bool = True
    outgoing: str = "zero"

    @staticmethod
    def parse(options: Mapping[str, Any]) -> FireflyOptions:
        """Validate ``options``.

        Raises:
            ValueError: naming an unknown key or a bad value.
        """
        check_keys(options, OPTIONS, "firefly")
        split = options.get("split", True)
        if not isinstance(split, bool):
            raise ValueError(f"option 'split' must be a bool, got {split!r}")
        outgoing = options.get("outgoing", "zero")
        if outgoing not in OUTGOING:
            raise ValueError(f"option 'outgoing' must be one of {OUTGOING}, got {outgoing!r}")
        return FireflyOptions(
            candidates=check_int(options, "candidates", 4, low=0) or 0,
            steps=check_int(options, "steps", 10, low=0) or 0,
            lr=check_number(options, "lr", 0.1, low=0.0, strict=True),
            init_scale=check_number(options, "init_scale", 1.0, low=0.0, strict=True),
            eps=check_number(options, "eps", 0.1, low=0.0, strict=True),
            split=split,
            outgoing=str(outgoing),
        )


@dataclass
class UnitCandidates:
    """One unit's candidates, best first: ``order[j]`` is ``("split", i)`` or ``("new", j)``."""

    order: list[tuple[str, int]]
    split_vectors: Tensor | None = None  # (n, d) unit split directions
    theta: Tensor | None = None  # (m, d) new neurons' incoming parameters
    columns: Tensor | None = None  # (m, out, block, *kernel) columns ε·r·c_j
    consumer: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def optimise_new(probe: NewNeuronProbe, theta: Tensor, steps: int, lr: float) -> Tensor:
    """``steps`` steps of normalised gradient ascent on Σ_j ‖G_j(θ_j)‖, each ‖θ_j‖ kept."""
    radius = theta.norm(dim=1, keepdim=True)
    th = theta.detach().clone()
    for _ in range(steps):
        th.requires_grad_(True)
        grads = new_gradients(probe, th, create_graph=True)
        (ascent,) = torch.autograd.grad(grads.norm(dim=1).sum(), th)
        with torch.no_grad():
            size = ascent.norm(dim=1, keepdim=True)
            step = torch.where(size > 0, ascent / size.clamp_min(1e-300), 0.0)
            th = th.detach() + lr * radius * step
            th = th * radius / th.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return th.detach()


def new_gradients(probe: NewNeuronProbe, theta: Tensor, create_graph: bool = False) -> Tensor:
    """``(m, out·block·kernel)``: G_j = ∂L/∂C_j at C = 0 for new neurons with incoming ``theta``."""
    columns = probe.zero_columns().requires_grad_(True)
    (g,) = torch.autograd.grad(probe.loss(theta, columns), columns, create_graph=create_graph)
    out, m = g.shape[0], probe.count
    return g.reshape(out, m, -1).transpose(0, 1).reshape(m, -1)


@register_strategy("firefly")
class Firefly:
    """The ``"firefly"`` strategy (module docstring)."""

    kind = "new"
    distributed = False

    def check_options(self, options: Mapping[str, Any]) -> None:
        FireflyOptions.parse(options)

    def candidates(self, ctx: RoundContext) -> Candidates:
        """Score every unit's splits and new neurons on one scale, best first."""
        opts = FireflyOptions.parse(ctx.options)
        structure = analyze(ctx.model)
        modules = dict(ctx.model.named_modules())
        eig = {}
        if opts.split:
            eig = splitting_eigen(
                ctx.model, ctx.loss_fn, ctx.data, method=ctx.method, batchnorm=ctx.batchnorm,
                surrogate_beta=ctx.surrogate_beta, seed=ctx.seed, micro_batch=ctx.micro_batch,
            )  # fmt: skip
        scores: dict[str, Tensor] = {}
        state: dict[str, UnitCandidates] = {}
        skipped: dict[str, str] = {}
        for name in structure.splittable():
            info = structure.layers[name]
            parts: list[Tensor] = []
            kinds: list[tuple[str, int]] = []
            unit = UnitCandidates([])
            if name in eig:
                norms = unit_theta(info, modules).norm(dim=1).to(eig[name].values)
                parts.append(0.5 * (opts.eps * norms) ** 2 * eig[name].values)
                kinds += [("split", i) for i in range(info.n)]
                unit.split_vectors = eig[name].vectors
            why = plain_consumer_reason(info, modules)
            m = min(opts.candidates, info.n)
            if why is None and m > 0:
                probe = NewNeuronProbe(ctx.model, info, m, ctx.loss_fn, ctx.data, ctx.generator)
                ref = probe.ref
                fan_in = info.d - int(info.members[0].has_bias)
                bound = opts.init_scale / math.sqrt(max(fan_in, 1))
                draw = torch.rand(m, info.d, generator=ctx.generator, dtype=torch.float64)
                theta = ((2 * draw - 1) * bound).to(ref)
                theta = optimise_new(probe, theta, opts.steps, opts.lr)
                grads = new_gradients(probe, theta).detach()
                size = grads.norm(dim=1)
                mean = float(outgoing_norms(info, modules).mean())
                r = mean if mean > 0 else 1.0
                c = -grads / size.clamp_min(1e-300)[:, None]
                unit.theta = theta
                unit.columns = (opts.eps * r * c).reshape(m, probe.out_shape[0], -1)
                unit.columns = unit.columns.reshape(m, *_one(probe.out_shape, m))
                unit.consumer = probe.consumer
                parts.append(-opts.eps * r * size)
                kinds += [("new", j) for j in range(m)]
            elif why is not None:
                skipped[name] = f"no new neurons: {why}"
            if not parts:
                continue
            values = torch.cat([p.to(parts[0]) for p in parts])
            order = torch.argsort(values, stable=True)
            unit.order = [kinds[int(i)] for i in order]
            scores[name] = values[order]
            state[name] = unit
        record: dict[str, Any] = {
            "skipped": skipped,
            "new_candidates": {k: sum(t == "new" for t, _ in v.order) for k, v in state.items()},
        }
        return Candidates(scores, state, record)

    def plan(self, ctx: RoundContext, cands: Candidates, chosen: Mapping[str, Tensor]) -> GrowPlan:
        """Splits (unit scale, symmetric) and new neurons for the chosen candidates.

        Raises:
            ValueError: a unit without candidates, or an index outside its candidates.
        """
        opts = FireflyOptions.parse(ctx.options)
        state: dict[str, UnitCandidates] = cands.state
        plan = GrowPlan()
        for name, idx in chosen.items():
            if name not in state:
                raise ValueError(f"chosen unit {name!r} has no firefly candidates")
            unit = state[name]
            picked = sorted({int(i) for i in idx.tolist()})
            if picked and (picked[0] < 0 or picked[-1] >= len(unit.order)):
                raise ValueError(
                    f"chosen[{name!r}] must lie in [0, {len(unit.order)}), got {idx.tolist()}"
                )
            splits = sorted(i for t, i in (unit.order[p] for p in picked) if t == "split")
            news = sorted(j for t, j in (unit.order[p] for p in picked) if t == "new")
            if splits:
                assert unit.split_vectors is not None
                at = torch.tensor(splits, dtype=torch.long)
                v = unit.split_vectors[at]
                half = torch.full((len(splits),), 0.5, dtype=torch.float64)
                plan.split[name] = SignedSplit(at, v, -v, half)
            if news:
                assert unit.theta is not None and unit.columns is not None
                at = torch.tensor(news, dtype=torch.long)
                cols = unit.columns[at]  # (k, out, block, *kernel)
                if opts.outgoing == "zero":
                    cols = torch.zeros_like(cols)
                outgoing = cols.movedim(0, 1).flatten(1, 2)  # (out, k·block, *kernel)
                plan.new[name] = NewNeurons(len(news), unit.theta[at], {unit.consumer: outgoing})
        if plan.split and plan.new:
            plan.new = _in_split_model(ctx, plan)
        return plan


def _in_split_model(ctx: RoundContext, plan: GrowPlan) -> dict[str, NewNeurons]:
    """The new neurons in the shapes of the model after ``plan.split`` (the loop applies the
    splits first): an incoming weight on a split channel is halved between parent and offspring
    (the split's own rule, so the pre-activation is unchanged at ε = 0), and a split consumer's
    offspring row copies its parent's columns."""
    structure = analyze(ctx.model)
    modules = dict(ctx.model.named_modules())
    chosen = {k: v.idx for k, v in plan.split.items()}
    reads = {c.name: c for info in structure.layers.values() for c in info.consumers}
    out: dict[str, NewNeurons] = {}
    for name, spec in plan.new.items():
        info = structure.layers[name]
        member = info.members[0]
        theta = spec.incoming
        assert theta is not None
        consumer = reads.get(member.name)
        if consumer is not None and any(u in chosen for u, _ in consumer.segments):
            weight = modules[member.name].weight
            assert isinstance(weight, Tensor)
            cmap = channel_map(consumer.segments, chosen).columns(consumer.block)
            k = member.d - int(member.has_bias)
            rows = theta[:, :k].reshape(spec.count, weight.shape[1], -1)
            rows = rows[:, cmap.source] * cmap.scale.to(rows)[None, :, None]
            theta = torch.cat([rows.reshape(spec.count, -1), theta[:, k:]], dim=1)
        outgoing = {}
        for cname, cols in spec.outgoing.items():
            cunit = structure.unit_of(cname)
            if cunit in chosen:
                source = channel_map(((cunit, structure.layers[cunit].n),), chosen).source
                cols = cols[source]
            outgoing[cname] = cols
        out[name] = NewNeurons(spec.count, theta, outgoing)
    return out


def _one(out_shape: tuple[int, ...], m: int) -> tuple[int, ...]:
    """One neuron's column shape ``(out, block, *kernel)`` from the probe's
    ``(out, m·block, …)``."""
    return (out_shape[0], out_shape[1] // m, *out_shape[2:])
