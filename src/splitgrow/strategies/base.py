"""The strategy registry: what a growth strategy is given, and what it returns.

A strategy proposes *candidates* for growth in every unit, each with a score (its predicted change
of the training loss: negative helps), and builds a :class:`GrowPlan` for the candidates the
selection chose. It never mutates a module (DESIGN.md §2): ``grow`` selects under the round's
budgets, applies the plan with the surgery and carries the optimizer state over.

Register a new strategy with :func:`register_strategy`; ``grow(config=GrowConfig(strategy=…))``
and ``splitgrow grow --strategy …`` find it by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from splitgrow.surgery.fresh import NewNeurons
from splitgrow.surgery.split import SignedSplit

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class RoundContext:
    """What a strategy may look at in one growth round (read only)."""

    model: nn.Module  # the trained model of this round (never modify it)
    loss_fn: Callable[[Tensor, Tensor], Tensor]  # mean loss of a batch
    data: Sequence[Batch]  # the batches the splitting statistics are taken over
    share: Sequence[Batch]  # this process's share of ``data`` (``data`` itself unless distributed)
    method: str  # eigen-solver ("exact", "fast", "auto")
    batchnorm: str  # BatchNorm statistics of the splitting computations
    surrogate_beta: float | None  # softplus β of the ReLU-like surrogate
    seed: int
    generator: torch.Generator  # the round's random source (CPU)
    distributed: bool  # every process calls ``candidates`` together
    options: Mapping[str, Any] = field(default_factory=dict)  # the strategy's own settings
    micro_batch: int | None = None  # splitting statistics in slices of at most this many samples


@dataclass
class Candidates:
    """A strategy's candidates: ``scores[unit]`` is ``(m,)``, the predicted loss change of growing
    candidate j of that unit (only negative ones are taken); ``state`` is the strategy's own (what
    :meth:`Strategy.plan` needs); ``record`` a JSON summary for the round's history; ``size[unit]``
    how many neurons one candidate of that unit adds (1 when left out): the selection charges
    every budget and maximum width that many neurons per candidate."""

    scores: dict[str, Tensor]
    state: Any = None
    record: dict[str, Any] = field(default_factory=dict)
    size: dict[str, int] = field(default_factory=dict)


@dataclass
class GrowPlan:
    """One round's growth: signed splits of existing neurons (their directions at unit scale:
    ``grow`` scales them by ε) and new neurons (weights as given, applied after the splits)."""

    split: dict[str, SignedSplit] = field(default_factory=dict)
    new: dict[str, NewNeurons] = field(default_factory=dict)


class Strategy(Protocol):
    """A growth strategy (see the module docstring)."""

    #: ``"split"``: candidate j of a unit is its neuron j; ``"new"``: candidates are new neurons
    kind: str
    #: runs under torch.distributed (``candidates`` is then called by every process)
    distributed: bool

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming a bad or unknown option of ``options``."""
        ...

    def candidates(self, ctx: RoundContext) -> Candidates: ...

    def plan(self, ctx: RoundContext, cands: Candidates, chosen: Mapping[str, Tensor]) -> GrowPlan:
        """The plan for the ``chosen`` candidates (``{unit: candidate indices}``)."""
        ...


STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str) -> Callable[[type], type]:
    """Register a strategy class under ``name`` (class decorator; the class is instantiated)."""

    def deco(cls: type) -> type:
        STRATEGIES[name] = cls()
        return cls

    return deco


def strategy_for(name: str) -> Strategy:
    """The registered strategy ``name``.

    Raises:
        ValueError: naming the unknown strategy and the registered ones.
    """
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"unknown strategy {name!r}; registered: {', '.join(sorted(STRATEGIES))}"
        ) from None
