"""Importance criteria: plain callables over a group's weights and activations."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import structural_nets as nets

from compressor.errors import OptionError
from compressor.passes.calibrate import Calibration
from compressor.passes.dependency import analyze
from compressor.passes.importance import (
    ConsumerView,
    GroupView,
    activation,
    activation_means,
    channel_features,
    l1,
    l2,
    lsh_redundancy,
    make_criterion,
    reconstruction,
)


def _setup(proto):
    model = ir.serde.deserialize_model(onnx.ModelProto.FromString(proto.SerializeToString()))
    graph = analyze(model)
    groups = {g.origin.split("'")[1]: g for g in graph.groups.values()}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    return model, graph, groups, inits


def test_norms_of_a_residual_group_cover_every_producer():
    model, graph, groups, w = _setup(nets.residual_net(np.random.default_rng(0)))
    stem = groups["stem"]
    view = GroupView(stem, channel_features(graph, stem))
    expected_l1 = (np.abs(w["stem_w"]).reshape(8, -1).sum(1)
                   + np.abs(w["b_w"]).reshape(8, -1).sum(1))
    np.testing.assert_allclose(l1(view), expected_l1, rtol=1e-6)
    expected_l2 = np.sqrt(np.square(w["stem_w"]).reshape(8, -1).sum(1)
                          + np.square(w["b_w"]).reshape(8, -1).sum(1))
    np.testing.assert_allclose(l2(view), expected_l2, rtol=1e-6)


def test_depthwise_taps_are_part_of_the_channel():
    model, graph, groups, w = _setup(nets.mobile_net(np.random.default_rng(0)))
    hidden = groups["e"]
    features = channel_features(graph, hidden)
    np.testing.assert_allclose(features, np.concatenate(
        [w["e_w"].reshape(24, -1), w["dw_w"].reshape(24, -1)], axis=1), rtol=1e-6)


def test_activation_means_match_numpy(built):
    proto = nets.residual_net(np.random.default_rng(0))
    model, graph, groups, _ = _setup(proto)
    x = np.random.default_rng(1).random((16, 3, 8, 8), dtype=np.float32)
    calib = Calibration(x, batch_size=5)
    means = activation_means(calib, model, graph, [groups["stem"], groups["a"], groups["d"]])
    tensors = calib.collect(model, ["r1", "ra", "r2", "flat"])
    # the stem group is read at r0 (by conv a) and r1 (by c and s): averaged over both
    r0 = Calibration(x).collect(model, ["r0"])["r0"]
    expected = (np.abs(r0).mean((0, 2, 3)) + np.abs(tensors["r1"]).mean((0, 2, 3))) / 2
    np.testing.assert_allclose(means[groups["stem"].id], expected, rtol=1e-5)
    np.testing.assert_allclose(means[groups["a"].id], np.abs(tensors["ra"]).mean((0, 2, 3)),
                               rtol=1e-5)
    np.testing.assert_allclose(means[groups["d"].id], np.abs(tensors["flat"]).mean(0), rtol=1e-5)
    view = GroupView(groups["a"], np.zeros((6, 1)), means[groups["a"].id])
    np.testing.assert_array_equal(activation(view), means[groups["a"].id])


def test_activation_without_data_says_so():
    model, graph, groups, _ = _setup(nets.mlp(np.random.default_rng(0)))
    with pytest.raises(OptionError, match="needs calibration data"):
        activation(GroupView(groups["fc0"], np.zeros((12, 1))))


def test_lsh_scores_duplicates_as_redundant():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 20))
    weights = np.concatenate([base, base[:3] * 0.9], axis=0)  # channels 6..8 repeat 0..2
    model, graph, groups, _ = _setup(nets.mlp(rng))
    view = GroupView(groups["fc0"], weights)
    scores = lsh_redundancy(bits=8, tables=8, seed=0)(view)
    norms = np.linalg.norm(weights, axis=1)
    assert np.all(scores[6:] < 1e-6 * norms[6:])  # the weaker copies are worth nothing
    np.testing.assert_allclose(scores[:3], norms[:3])  # the stronger ones keep their norm
    assert np.all(scores[3:6] > 0.3 * norms[3:6])  # unrelated channels keep most of theirs


def test_make_criterion():
    assert make_criterion("l1") is l1 and make_criterion("activation") is activation
    assert callable(make_criterion("lsh", bits=4, tables=2))
    with pytest.raises(OptionError, match="unknown criterion 'taylor'"):
        make_criterion("taylor")


def _ls_error(weight, cov, keep_columns):
    """Relative error of the best W' on the kept inputs: tr(W S W^T) - explained."""
    k = np.asarray(keep_columns)
    explained = weight @ cov[:, k] @ np.linalg.solve(cov[np.ix_(k, k)], cov[k, :]) @ weight.T
    return (np.trace(weight @ cov @ weight.T) - np.trace(explained)) / np.trace(
        weight @ cov @ weight.T)


def test_reconstruction_removes_redundant_channels_first_and_matches_least_squares():
    rng = np.random.default_rng(0)
    n, per = 6, 2  # six channels of two input entries each (a 1x2 kernel)
    z = rng.standard_normal((4000, n * per))
    z[:, 10:12] = z[:, 0:2] * 0.5 + z[:, 4:6]  # channel 5 is a combination of channels 0 and 2
    cov = np.cov(z, rowvar=False, bias=True)
    weight = rng.standard_normal((3, n * per))
    columns = np.arange(n * per).reshape(n, per)
    _, _, groups, _ = _setup(nets.mlp(rng, hidden=(6, 8)))
    view = GroupView(groups["fc0"], np.zeros((n, 1)),
                     consumers=[ConsumerView(weight, columns, cov)])
    scores = reconstruction(view, ridge=1e-7)  # the covariance is singular: a tiny ridge
    order = np.argsort(scores)
    # channels 0, 2 and 5 are linearly dependent: one of them is free to remove
    assert order[0] in (0, 2, 5) and scores[order[0]] < 1e-5
    assert np.isinf(scores).sum() == 1 and np.all(np.diff(np.sort(scores)[:-1]) >= 0)
    # after the first two removals the score is the least-squares error of what is left
    kept = [c for c in range(n) if c not in order[:2]]
    expected = _ls_error(weight, cov, columns[kept].ravel())
    assert scores[order[1]] == pytest.approx(expected, rel=1e-4)
    assert getattr(reconstruction, "comparable", False)
    with pytest.raises(OptionError, match="needs calibration data"):
        reconstruction(GroupView(groups["fc0"], np.zeros((n, 1))))
