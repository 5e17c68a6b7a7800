"""LSH merging: SimHash, the Cython kernel against its numpy reference, exact merging of
duplicates (residual groups included), budgets and records."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import structural_nets as nets
from hypothesis import given, settings
from hypothesis import strategies as st

from compressor import runtime
from compressor.errors import OptionError
from compressor.passes.calibrate import Calibration
from compressor.passes.lsh_merge import (
    LSHConfig,
    MergeChannelsPass,
    SimHash,
    build_tables,
    cython_kernel,
    greedy_cluster,
    greedy_cluster_numpy,
    sign_alsh,
)


def _ir(proto):
    return ir.serde.deserialize_model(onnx.ModelProto.FromString(proto.SerializeToString()))


def _run(model, x):
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    sess = runtime.session(proto)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _input(proto, n, seed=0):
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]]
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def test_simhash_collides_on_direction_and_is_seeded():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((5, 16))
    hasher = SimHash(12, 3, 16, seed=7)
    codes = hasher.codes(np.concatenate([v, 3.0 * v, -v]))
    assert codes.shape == (3, 15) and codes.dtype == np.uint64
    np.testing.assert_array_equal(codes[:, :5], codes[:, 5:10])  # scale does not matter
    assert np.all(codes[:, :5] ^ codes[:, 10:] == (1 << 12) - 1)  # opposite: every bit flips
    np.testing.assert_array_equal(codes, SimHash(12, 3, 16, seed=7).codes(
        np.concatenate([v, 3.0 * v, -v])))


def test_sign_alsh_turns_inner_products_into_angles():
    """P(x) . Q(q) is proportional to x . q for every x (Shrivastava & Li), so sign random
    projections of the transformed vectors favour large inner products, not just angles."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 8)) * rng.random((20, 1)) * 5
    data, queries = sign_alsh(x)
    assert data.shape == queries.shape == (20, 11)
    assert np.linalg.norm(data[:, :8], axis=1).max() == pytest.approx(0.75)
    ratio = (queries @ data.T) / (x / np.linalg.norm(x, axis=1, keepdims=True) @ x.T)
    np.testing.assert_allclose(ratio, ratio[0, 0], rtol=1e-9)


@pytest.mark.skipif(cython_kernel() is None, reason="no C compiler for the Cython kernel")
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), dim=st.integers(1, 12), bits=st.integers(1, 10),
       tables=st.integers(1, 5), threshold=st.floats(-1, 0.999), asymmetric=st.booleans(),
       seed=st.integers(0, 1000), max_merges=st.integers(0, 60))
def test_cython_kernel_matches_numpy_reference(n, dim, bits, tables, threshold, asymmetric,
                                               seed, max_merges):
    # thresholds stay below 1: duplicates' similarity is 1 up to rounding, and numpy's and
    # the kernel's dot products round differently
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, dim))
    v[n // 2:] = v[: n - n // 2] * 2  # some exact duplicates
    unit = v / np.linalg.norm(v, axis=1, keepdims=True)
    t = build_tables(v, bits, tables, seed, asymmetric)
    order = rng.permutation(n).astype(np.int64)
    fast, _ = greedy_cluster(t, unit, order, threshold, max_merges, kernel="cython")
    slow, _ = greedy_cluster_numpy(t, unit, order, threshold, max_merges)
    np.testing.assert_array_equal(fast, slow)
    assert n - (fast.max() + 1) <= max_merges


def test_merging_duplicate_neurons_is_exact():
    proto = nets.mlp(np.random.default_rng(0), hidden=(12, 8), duplicate=True)
    x = _input(proto, 32)
    for calibration in (None, Calibration(x)):
        cfg = LSHConfig(threshold=0.99999, bits=8, tables=4, refit=False)
        result = MergeChannelsPass(cfg, calibration)(_ir(proto))
        rec = {r.name: r for r in result.layers}
        assert rec["fc0"].detail == "6 groups of 12"
        np.testing.assert_allclose(_run(result.model, x), _run(proto, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("duplicate", [("stem",), ("proj",), ("stem", "a", "c", "proj")])
def test_merging_duplicate_filters_of_residual_groups_is_exact(duplicate):
    proto = nets.residual_net(np.random.default_rng(1), batchnorm=False, duplicate=duplicate)
    x = _input(proto, 8)
    result = MergeChannelsPass(LSHConfig(threshold=0.99999, bits=8, tables=4))(_ir(proto))
    out = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(out, full_check=True)
    np.testing.assert_allclose(_run(out, x), _run(proto, x), rtol=1e-5, atol=1e-5)
    merged = {g["origin"]: g["kept"] for g in result.stats["groups"] if g["kept"] < g["channels"]}
    origins = {"stem": "Conv 'stem'", "a": "Conv 'a'", "c": "Conv 'c'", "proj": "Conv 'd'"}
    assert set(merged) == {origins[d] for d in duplicate}


@pytest.mark.parametrize("build", [nets.residual_net, nets.mobile_net, nets.concat_net,
                                   nets.transformer_mlp, nets.unsupported_net])
def test_budget_is_met_and_graph_stays_valid(build):
    proto = build(np.random.default_rng(0))
    result = MergeChannelsPass(LSHConfig(ratio=0.6))(_ir(proto))
    out = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(out, full_check=True)
    assert result.stats["ratio_reached"] <= 0.6 + 1e-9 or "not reachable" in " ".join(
        result.notes)
    assert _run(out, _input(proto, 2)).shape == (2, 10)
    assert {"bits", "tables", "threshold", "comparisons", "kernel"} <= set(result.stats)


def test_representatives_are_weighted_by_activation_and_refit_helps():
    proto = nets.residual_net(np.random.default_rng(2), batchnorm=False)
    x = _input(proto, 96, seed=3)
    y_ref = _run(proto, x)
    errors = {}
    for refit in (False, True):
        result = MergeChannelsPass(LSHConfig(ratio=0.6, refit=refit, asymmetric=refit),
                                   Calibration(x))(_ir(proto))
        assert any("groups of" in r.detail for r in result.layers)
        y = _run(result.model, x)
        errors[refit] = np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref)
    assert errors[True] < errors[False]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 1.5}, r"--ratio must be in \(0, 1\]"),
        ({"bits": 65}, "--lsh-bits must be in"),
        ({"tables": 0}, "--lsh-tables must be >= 1"),
        ({"threshold": 2.0}, "threshold must be in"),
        ({"kernel": "cuda"}, "kernel must be one of"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(OptionError, match=message):
        LSHConfig(**kwargs)
