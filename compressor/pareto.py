"""The Pareto front of (cost, quality) points: which choices no other choice beats on both.

A point dominates another when it costs no more and is no worse, and is strictly better on at
least one of the two. Two coordinates only, so a sort and one scan do it (O(n log n)); a
library for n-dimensional fronts (pymoo, paretoset) would be a dependency for ten lines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def pareto_front(costs: Sequence[float | None], qualities: Sequence[float | None]) -> list[bool]:
    """For each point, whether it is on the front (lowest cost, highest quality).

    Points with a missing or non-finite coordinate are never on the front and never dominate.
    Identical points do not dominate each other: all copies of a front point are on it.
    """
    if len(costs) != len(qualities):
        raise ValueError(f"{len(costs)} costs but {len(qualities)} qualities")
    valid = [
        i
        for i, (c, q) in enumerate(zip(costs, qualities, strict=True))
        if c is not None and q is not None and math.isfinite(c) and math.isfinite(q)
    ]
    # cheapest first, and among equal costs the best first: a point is on the front exactly
    # when it is better than every point before it (or a copy of the last front point)
    valid.sort(key=lambda i: (costs[i], -qualities[i]))
    on_front = [False] * len(costs)
    best: float | None = None
    last: tuple[float, float] | None = None
    for i in valid:
        point = (float(costs[i]), float(qualities[i]))
        if best is None or point[1] > best:
            on_front[i] = True
            best, last = point[1], point
        elif point == last:
            on_front[i] = True
    return on_front
