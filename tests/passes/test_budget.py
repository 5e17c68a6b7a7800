import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compressor.passes.budget import Option, allocate


def _layer(dense, points):
    return [Option(dense, 0.0)] + [Option(m, loss) for m, loss in points]


def test_everything_dense_when_budget_allows():
    layers = [_layer(100, [(50, 0.1)]), _layer(200, [(80, 0.3)])]
    result = allocate(layers, 300)
    assert result.feasible and result.macs == 300 and result.loss == 0.0


def test_infeasible_returns_cheapest():
    layers = [_layer(100, [(50, 0.1)]), _layer(200, [(80, 0.3)])]
    result = allocate(layers, 100)
    assert not result.feasible and result.macs == 130


def test_prefers_the_cheap_loss():
    # saving 100 MACs: layer A costs loss 0.1, layer B costs 0.5 for the same saving
    layers = [_layer(200, [(100, 0.1)]), _layer(200, [(100, 0.5)])]
    result = allocate(layers, 300)
    assert result.choices[0].macs == 100 and result.choices[1].macs == 200


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(1, 99), st.floats(0, 5)), min_size=1, max_size=4),
                min_size=1, max_size=4),
       st.floats(0.3, 1.0))
def test_feasible_and_close_to_brute_force(raw, fraction):
    layers = [_layer(100, points) for points in raw]
    budget = fraction * 100 * len(layers)
    result = allocate(layers, budget)
    combos = [c for c in itertools.product(*layers) if sum(o.macs for o in c) <= budget]
    if not combos:
        assert not result.feasible
        return
    best = min(sum(o.loss for o in c) for c in combos)
    assert result.feasible and result.macs <= budget
    # Lagrangian + greedy is not exact; it must stay near the optimum on these small cases
    assert result.loss <= best + max(o.loss for layer in layers for o in layer) + 1e-9


# ----------------------------------------------------------------------------- measured cost


def _timed(dense_ms, points):
    """A layer: dense at loss 0, then (ms, loss) options; MACs fall with each option so that
    a MACs budget and a time budget disagree."""
    opts = [Option(1000, 0.0, "dense", cost=dense_ms, dense=True)]
    opts += [Option(900 - 100 * i, loss, i, cost=ms) for i, (ms, loss) in enumerate(points)]
    return opts


def _brute(layers, fits):
    combos = [c for c in itertools.product(*layers) if fits(c)]
    return min((sum(o.loss for o in c) for c in combos), default=None)


def test_cost_key_meets_a_reachable_target_with_least_loss():
    # Layer A saves 1 ms for loss 0.1; layer B saves 1 ms for loss 0.4 but 2 ms for 0.5.
    layers = [_timed(3.0, [(2.0, 0.1)]), _timed(3.0, [(2.0, 0.4), (1.0, 0.5)])]
    result = allocate(layers, 5.0, key="cost")
    assert result.feasible and result.cost <= 5.0
    assert [o.payload for o in result.choices] == [0, "dense"]
    result = allocate(layers, 3.0, key="cost")
    assert [o.payload for o in result.choices] == [0, 1] and result.cost == 3.0
    # counted in MACs (the default) the measured costs play no part
    by_macs = allocate(layers, 1800)
    assert by_macs.macs <= 1800 and by_macs.cost > 3.0


def test_cost_falls_back_to_macs_without_a_measurement():
    assert Option(7, 0.0).value("cost") == 7 and Option(7, 0.0, cost=0.5).value("cost") == 0.5
    assert Option(7, 0.0, cost=0.5).value("macs") == 7
    with pytest.raises(ValueError, match="budget key"):
        allocate([[Option(1, 0.0)]], 1, key="ms")


def test_never_picks_an_option_slower_than_dense_and_says_which_went():
    # the low-loss option is measured slower than dense: cheaper in MACs, dearer in time
    layers = [_timed(2.0, [(2.5, 0.01), (1.0, 0.3)]), _timed(2.0, [(1.5, 0.2)])]
    for budget in (10.0, 3.5, 2.5, 0.1):
        result = allocate(layers, budget, key="cost")
        for option, layer in zip(result.choices, layers, strict=True):
            assert option.value("cost") <= layer[0].cost
        assert [o.payload for o in result.dropped[0]] == [0] and result.dropped[1] == ()
    everything_slower = [_timed(1.0, [(1.5, 0.0), (1.2, 0.1)])]
    result = allocate(everything_slower, 0.5, key="cost")
    assert result.choices[0].dense and len(result.dropped[0]) == 2


def test_infeasible_cost_target_returns_the_cheapest():
    layers = [_timed(3.0, [(2.0, 0.1), (1.5, 0.9)]), _timed(2.0, [(1.0, 0.4)])]
    result = allocate(layers, 1.0, key="cost")
    assert not result.feasible
    assert [o.payload for o in result.choices] == [1, 0] and result.cost == 2.5


def test_macs_cap_beside_the_cost_budget_holds_too():
    # time alone would take layer B's option 0 (fast, few MACs saved); the MACs cap needs
    # layer A's option 1 as well
    layers = [Option(1000, 0.0, "a-dense", 2.0, True), Option(400, 0.3, "a1", 1.9),
              Option(600, 0.1, "a0", 1.5)], [Option(1000, 0.0, "b-dense", 2.0, True),
                                             Option(900, 0.05, "b0", 1.0)]
    result = allocate(layers, 3.0, key="cost", macs_budget=1400)
    assert result.feasible and result.cost <= 3.0 and result.macs <= 1400
    assert {o.payload for o in result.choices} == {"a1", "b0"}
    assert not allocate(layers, 3.0, key="cost", macs_budget=1000).feasible
    # a MACs cap on a MACs budget is just the smaller budget
    assert allocate(layers, 5000, macs_budget=1500).macs <= 1500


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.floats(0.1, 3.0), st.floats(0, 5)), min_size=1,
                         max_size=4), min_size=1, max_size=4),
       st.floats(0.3, 1.2), st.one_of(st.none(), st.floats(0.5, 1.0)))
def test_cost_allocation_is_feasible_and_close_to_brute_force(raw, fraction, macs_fraction):
    layers = [_timed(2.0, points) for points in raw]
    budget = fraction * 2.0 * len(layers)
    macs_budget = None if macs_fraction is None else macs_fraction * 1000 * len(layers)
    result = allocate(layers, budget, key="cost", macs_budget=macs_budget)
    kept = [[o for o in layer if o.value("cost") <= 2.0] for layer in layers]

    def fits(c):
        return (sum(o.value("cost") for o in c) <= budget
                and (macs_budget is None or sum(o.macs for o in c) <= macs_budget))

    best = _brute(kept, fits)
    assert all(o.value("cost") <= 2.0 for o in result.choices)
    if best is None:
        assert not result.feasible
        return
    assert result.feasible and fits(result.choices)
    # the sweep is not exact; it must stay near the optimum on these small cases
    assert result.loss <= best + max(o.loss for layer in kept for o in layer) + 1e-9
