"""The Pareto front of (cost, quality) points: hand-checked cases, and the definition itself
(no other point dominates a front point; every other point is dominated) as the reference on
random points."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from compressor.pareto import pareto_front


def test_hand_checked_front():
    #          A     B     C     D     E     F     G
    costs = [1.0, 0.5, 0.7, 0.5, 0.9, 0.3, 1.2]
    quality = [0.90, 0.80, 0.85, 0.70, 0.95, 0.60, 0.95]
    # F: cheapest. B: better than F. D: same cost as B, worse: dominated. C: better than B.
    # E: better than C. A: dearer and worse than E. G: as good as E but dearer: dominated.
    assert pareto_front(costs, quality) == [False, True, True, False, True, True, False]


def test_copies_of_a_front_point_are_all_on_it_and_missing_values_never():
    costs = [0.5, 0.5, None, 0.2, math.nan, 0.6]
    quality = [0.9, 0.9, 1.0, 0.5, 1.0, 0.9]
    assert pareto_front(costs, quality) == [True, True, False, True, False, False]


def test_empty_and_mismatched():
    assert pareto_front([], []) == []
    with pytest.raises(ValueError, match="2 costs but 1 qualities"):
        pareto_front([1.0, 2.0], [0.5])


def _dominates(a, b):
    return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), max_size=25))
def test_matches_the_definition(points):
    # small integer grids make ties and copies common
    front = pareto_front([p[0] for p in points], [p[1] for p in points])
    for i, p in enumerate(points):
        dominated = any(_dominates(q, p) for q in points)
        assert front[i] == (not dominated), (p, points)
