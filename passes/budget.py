"""Choosing one option per layer so the whole model meets a budget with the least loss.

Each layer offers options (MACs, optionally a measured cost such as milliseconds, and a loss);
the dense form is always one of them at loss 0. We minimise the sum of losses subject to the
total cost fitting the budget: a Lagrangian sweep finds the best point on each layer's lower
convex hull, then a greedy pass spends whatever budget is left on the upgrades that buy the
most loss per unit of cost.

``key`` says what the budget counts: ``"macs"`` (the default, as every MACs-ratio caller has
it) or ``"cost"`` (``Option.cost``, the MACs where an option has none). A measured cost is not
monotone in the MACs, so with ``key="cost"`` every option measured slower than its layer's
dense option is dropped first (``Allocation.dropped`` keeps them, so a pass can say why a layer
stayed dense). ``macs_budget`` adds a MACs cap that must hold as well (``--speedup`` with
``--ratio``): the two constraints are priced together, for a few mixes of the two, and the
least-loss allocation meeting both is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

KEYS = ("macs", "cost")
# Why a layer the pipeline rolled back (measured slower in the final model) stays dense.
EXCLUDED_REASON = "kept dense (rolled back: measured slower)"
_MIXES = 9  # MACs/cost weightings tried when both constraints bind


@dataclass(frozen=True)
class Option:
    """One form of a layer. ``cost``: its measured cost (e.g. ms); None: the MACs are the cost.
    ``dense``: the layer's unchanged form, which no chosen option may be measured slower than."""

    macs: int
    loss: float
    payload: Any = None  # what the pass needs to apply this choice
    cost: float | None = None
    dense: bool = False

    def value(self, key: str) -> float:
        """What this option spends of a budget counted in ``key``."""
        if key == "macs" or self.cost is None:
            return self.macs
        if key == "cost":
            return self.cost
        raise ValueError(f"budget key must be one of {KEYS}, got {key!r}")


@dataclass(frozen=True)
class Allocation:
    choices: tuple[Option, ...]
    macs: int
    loss: float
    feasible: bool
    cost: float = 0.0  # total Option.value("cost") of the choices (the MACs where no cost)
    # per layer, the options dropped because they were measured slower than the dense one
    dropped: tuple[tuple[Option, ...], ...] = ()


def drop_slower_than_dense(options: Sequence[Option]) -> tuple[list[Option], list[Option]]:
    """(kept, dropped): the options whose cost exceeds the dense option's go. Without an option
    marked dense, or without a measured cost on it, nothing is dropped."""
    dense = [o for o in options if o.dense and o.cost is not None]
    if not dense:
        return list(options), []
    limit = min(o.cost for o in dense)
    kept = [o for o in options if o.value("cost") <= limit]
    dropped = [o for o in options if o.value("cost") > limit]
    return kept, dropped


def allocate(
    layers: Sequence[Sequence[Option]],
    budget: float,
    *,
    key: str = "macs",
    macs_budget: float | None = None,
) -> Allocation:
    """One option per layer with total ``key`` <= budget (and total MACs <= ``macs_budget``
    when given) and the least total loss.

    If even the cheapest options exceed the budget, returns the cheapest (by ``key``) with
    ``feasible=False``.
    """
    if key not in KEYS:
        raise ValueError(f"budget key must be one of {KEYS}, got {key!r}")
    dropped: tuple[tuple[Option, ...], ...] = ()
    if key == "cost":
        split = [drop_slower_than_dense(opts) for opts in layers]
        layers = [kept for kept, _ in split]
        dropped = tuple(tuple(gone) for _, gone in split)
    if not layers:
        return Allocation((), 0, 0.0, True, 0.0, dropped)

    def primary(o: Option) -> float:
        return o.value(key)

    eps = 1.0 if key == "macs" else 1e-12
    if macs_budget is not None and key == "macs":
        budget = min(budget, macs_budget)
        macs_budget = None
    if macs_budget is None:
        choices, feasible = _allocate(layers, [(primary, budget, eps)])
    else:
        choices, feasible = _allocate_both(layers, (primary, budget, eps),
                                           (lambda o: o.macs, macs_budget, 1.0))
    return Allocation(tuple(choices), sum(o.macs for o in choices),
                      sum(o.loss for o in choices), feasible,
                      sum(o.value("cost") for o in choices), dropped)


Value = Callable[[Option], float]
Constraint = tuple[Value, float, float]  # (what an option spends, budget, smallest step)


def _total(choices: Sequence[Option], value: Value) -> float:
    return sum(value(o) for o in choices)


def _fits(choices: Sequence[Option], constraints: Sequence[Constraint]) -> bool:
    return all(_total(choices, value) <= limit for value, limit, _ in constraints)


def _allocate(layers: Sequence[Sequence[Option]],
              constraints: Sequence[Constraint]) -> tuple[list[Option], bool]:
    """The single-constraint solver (the first constraint priced); the others, if any, must
    hold too and are checked (used by ``_allocate_both`` with a mixed price)."""
    value, budget, _ = constraints[0]
    cheapest = [min(opts, key=lambda o: (value(o), o.loss)) for opts in layers]
    if not _fits(cheapest, constraints):
        return cheapest, False
    best = [min(opts, key=lambda o: (o.loss, value(o))) for opts in layers]
    if _fits(best, constraints):
        return best, True

    def pick(opts: Sequence[Option], lam: float) -> Option:
        return min(opts, key=lambda o: (o.loss + lam * value(o), value(o)))

    def fits_at(lam: float) -> bool:
        return _fits([pick(opts, lam) for opts in layers], constraints)

    lo, hi = 0.0, 1.0
    while not fits_at(hi):
        hi *= 4.0
        if hi > 1e300:  # only the cheapest fit, and only at an infinite price
            return cheapest, True
    for _ in range(100):
        mid = (lo + hi) / 2
        if fits_at(mid):
            hi = mid
        else:
            lo = mid
    choices = [pick(opts, hi) for opts in layers]
    return _spend_slack(layers, choices, constraints), True


def _allocate_both(layers: Sequence[Sequence[Option]], first: Constraint,
                   second: Constraint) -> tuple[list[Option], bool]:
    """Both constraints must hold: price them together as (1 - w) first/budget + w
    second/budget for a few w, solve each, keep the least loss that meets both."""
    both = [first, second]
    best: list[Option] | None = None
    for i in range(_MIXES):
        w = i / (_MIXES - 1)
        scale1 = (1.0 - w) / max(first[1], 1e-300)
        scale2 = w / max(second[1], 1e-300)

        def mixed(o: Option, s1=scale1, s2=scale2) -> float:
            return s1 * first[0](o) + s2 * second[0](o)

        # the mixed price, both real constraints checked
        choices, feasible = _allocate(layers, [(mixed, float("inf"), 1e-12), *both])
        if feasible and (best is None or sum(o.loss for o in choices) < sum(o.loss for o in best)):
            best = choices
    if best is None:
        cheapest = [min(opts, key=lambda o: (first[0](o), o.loss)) for opts in layers]
        return cheapest, False
    return best, True


def _spend_slack(layers: Sequence[Sequence[Option]], choices: list[Option],
                 constraints: Sequence[Constraint]) -> list[Option]:
    """Greedily upgrade layers (lower loss, more cost) while every budget allows; the first
    constraint's spending prices the upgrade."""
    value, _, eps = constraints[0]
    choices = list(choices)
    while True:
        slacks = [limit - _total(choices, v) for v, limit, _ in constraints]
        best_gain, best = 0.0, None
        for i, opts in enumerate(layers):
            current = choices[i]
            for o in opts:
                gain = current.loss - o.loss
                if gain <= 0:
                    continue
                if any(v(o) - v(current) > slack
                       for (v, _, _), slack in zip(constraints, slacks, strict=True)):
                    continue
                rate = gain / max(value(o) - value(current), eps)
                if rate > best_gain:
                    best_gain, best = rate, (i, o)
        if best is None:
            return choices
        choices[best[0]] = best[1]
