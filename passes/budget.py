"""Choosing one option per layer so the whole model meets a MACs budget with the least loss.

Each layer offers options (MACs, loss); the dense form is always one of them at loss 0. We
minimise the sum of losses subject to the total MACs fitting the budget: a Lagrangian sweep
finds the best point on each layer's lower convex hull, then a greedy pass spends whatever
budget is left on the upgrades that buy the most loss per MAC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Option:
    macs: int
    loss: float
    payload: Any = None  # what the pass needs to apply this choice


@dataclass(frozen=True)
class Allocation:
    choices: tuple[Option, ...]
    macs: int
    loss: float
    feasible: bool


def _pick(options: Sequence[Option], lam: float) -> Option:
    return min(options, key=lambda o: (o.loss + lam * o.macs, o.macs))


def allocate(layers: Sequence[Sequence[Option]], budget: float) -> Allocation:
    """One option per layer with total MACs <= budget and the least total loss.

    If even the cheapest options exceed the budget, returns them with ``feasible=False``.
    """
    if not layers:
        return Allocation((), 0, 0.0, True)
    cheapest = [min(opts, key=lambda o: (o.macs, o.loss)) for opts in layers]
    if sum(o.macs for o in cheapest) > budget:
        return Allocation(tuple(cheapest), sum(o.macs for o in cheapest),
                          sum(o.loss for o in cheapest), False)
    best = [min(opts, key=lambda o: (o.loss, o.macs)) for opts in layers]
    if sum(o.macs for o in best) <= budget:
        choices = best
    else:
        lo, hi = 0.0, 1.0
        while sum(o.macs for o in (_pick(opts, hi) for opts in layers)) > budget:
            hi *= 4.0
        for _ in range(100):
            mid = (lo + hi) / 2
            if sum(o.macs for o in (_pick(opts, mid) for opts in layers)) > budget:
                lo = mid
            else:
                hi = mid
        choices = [_pick(opts, hi) for opts in layers]
        choices = _spend_slack(layers, choices, budget)
    return Allocation(tuple(choices), sum(o.macs for o in choices),
                      sum(o.loss for o in choices), True)


def _spend_slack(
    layers: Sequence[Sequence[Option]], choices: list[Option], budget: float
) -> list[Option]:
    """Greedily upgrade layers (lower loss, more MACs) while the budget allows."""
    choices = list(choices)
    while True:
        slack = budget - sum(o.macs for o in choices)
        best_gain, best = 0.0, None
        for i, opts in enumerate(layers):
            current = choices[i]
            for o in opts:
                extra = o.macs - current.macs
                gain = current.loss - o.loss
                if gain <= 0 or extra > slack:
                    continue
                rate = gain / max(extra, 1)
                if rate > best_gain:
                    best_gain, best = rate, (i, o)
        if best is None:
            return choices
        choices[best[0]] = best[1]
