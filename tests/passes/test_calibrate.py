import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from two_inputs import two_input_model, two_inputs

from compressor.errors import DataError
from compressor.models import zoo
from compressor.passes.calibrate import Calibration, CrossMoments, Moments, conv_patches
from compressor.passes.graph import ConvAttributes


@settings(max_examples=25, deadline=None)
@given(
    c=st.integers(1, 4), h=st.integers(3, 9), w=st.integers(3, 9), kh=st.integers(1, 3),
    kw=st.integers(1, 3), stride=st.integers(1, 2), dil=st.integers(1, 2), pad=st.integers(0, 2),
)
def test_conv_patches_equal_torch_unfold(c, h, w, kh, kw, stride, dil, pad):
    if h + 2 * pad < dil * (kh - 1) + 1 or w + 2 * pad < dil * (kw - 1) + 1:
        return
    x = np.random.default_rng(0).standard_normal((2, c, h, w)).astype(np.float32)
    attrs = ConvAttributes((kh, kw), (stride, stride), (pad, pad, pad, pad), (dil, dil), 1)
    expected = F.unfold(torch.from_numpy(x), (kh, kw), dilation=dil, padding=pad, stride=stride)
    expected = expected.transpose(1, 2).reshape(-1, c * kh * kw).numpy()
    np.testing.assert_array_equal(conv_patches(x, attrs), expected)


def test_conv_patches_subsample_is_a_subset():
    x = np.random.default_rng(1).standard_normal((3, 2, 6, 6)).astype(np.float32)
    attrs = ConvAttributes((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    full = conv_patches(x, attrs)
    some = conv_patches(x, attrs, max_rows=10, rng=np.random.default_rng(0))
    assert some.shape == (10, 18)
    assert all((full == row).all(1).any() for row in some)


def test_conv_patches_rows_in_any_order_with_uneven_pads():
    """Rows named by index come back in the index's order, whatever samples they mix, and
    asymmetric pads pad each side as ONNX says (torch's unfold of the same padded input)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 7, 9)).astype(np.float32)
    attrs = ConvAttributes((3, 2), (2, 1), (0, 2, 1, 0), (1, 2), 1)  # top, left, bottom, right
    padded = np.pad(x, ((0, 0), (0, 0), (0, 1), (2, 0)))
    full = F.unfold(torch.from_numpy(padded), (3, 2), dilation=(1, 2), stride=(2, 1))
    full = full.transpose(1, 2).reshape(-1, 3 * 3 * 2).numpy()
    index = rng.permutation(len(full))[:17]
    np.testing.assert_array_equal(conv_patches(x, attrs, index=index), full[index])


def test_cross_moments_match_numpy_over_batches():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((900, 6)) * 2 + 0.5
    x_hat = np.concatenate([x[:, :4] + 0.1 * rng.standard_normal((900, 4)),
                            rng.standard_normal((900, 1))], axis=1)  # a narrower x_hat
    m = CrossMoments.zeros(6, 5)
    for start in range(0, 900, 250):
        m.add(x[start:start + 250], x_hat[start:start + 250])
    joint = np.cov(np.concatenate([x, x_hat], axis=1).T, bias=True)
    assert m.count == 900
    np.testing.assert_allclose(m.mean_hat, x_hat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(m.cross_covariance, joint[:6, 6:], atol=2e-5)
    np.testing.assert_allclose(m.covariance_hat, joint[6:, 6:], atol=2e-5)


def test_projected_cross_moments_are_those_of_the_projected_rows():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((700, 9)) * 1.5 - 0.3
    x_hat = x[:, :7] + 0.2 * rng.standard_normal((700, 7))
    w = rng.standard_normal((3, 9))
    projected, plain = CrossMoments.zeros(9, 7, project=w), CrossMoments.zeros(9, 7)
    for start in range(0, 700, 300):
        projected.add(x[start:start + 300], x_hat[start:start + 300])
        plain.add(x[start:start + 300], x_hat[start:start + 300])
    y = x @ w.T
    joint = np.cov(np.concatenate([y, x_hat], axis=1).T, bias=True)
    mean_y, cross_y = projected.output_statistics(w)
    np.testing.assert_allclose(mean_y, y.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cross_y, joint[:3, 3:], atol=5e-5)
    np.testing.assert_allclose(projected.covariance_hat, joint[3:, 3:], atol=2e-5)
    # unprojected moments give the same for any W, and a projection is checked for its W
    for got, want in zip(plain.output_statistics(w), (mean_y, cross_y), strict=True):
        np.testing.assert_allclose(got, want, atol=5e-5)
    with pytest.raises(ValueError, match=r"outputs of a \(3, 9\) matrix, not a \(2, 9\)"):
        projected.output_statistics(w[:2])
    # rows given as outputs already: the same moments as projecting them here
    given = CrossMoments.zeros(3, 7, outputs=True)
    given.add(y, x_hat)
    for got, want in zip(given.output_statistics(w), (mean_y, cross_y), strict=True):
        np.testing.assert_allclose(got, want, atol=5e-5)
    with pytest.raises(ValueError, match="outputs of a"):
        given.output_statistics(w[:2])
    with pytest.raises(ValueError, match=r"must be \(k, 9\)"):
        CrossMoments.zeros(9, 7, project=w[:, :8])


def test_moments_match_numpy():
    rows = np.random.default_rng(2).standard_normal((500, 7)) * 3 + 1
    m = Moments.zeros(7)
    m.add(rows[:200])
    m.add(rows[200:])
    np.testing.assert_allclose(m.mean, rows.mean(0), rtol=1e-5)
    np.testing.assert_allclose(m.covariance, np.cov(rows.T, bias=True), rtol=1e-4, atol=1e-4)


def test_collect_returns_intermediate_tensors(mlp, built):
    x = np.random.default_rng(3).standard_normal((300, 16)).astype(np.float32)
    calib = Calibration(x, batch_size=128)
    got = calib.collect(mlp.ir(), ["h", "y"])
    assert got["h"].shape == (300, 32)
    np.testing.assert_allclose(got["y"], built.run(mlp.proto, x), rtol=1e-5, atol=1e-5)


def test_empty_calibration_is_rejected():
    with pytest.raises(DataError, match="non-empty batch"):
        Calibration(np.zeros((0, 3), dtype=np.float32))


def test_feeds_batch_every_input_in_order_and_keep_integer_types():
    inputs = two_inputs(10)
    calib = Calibration(inputs, batch_size=4)
    assert len(calib) == 10 and calib.input_names == ("x", "ids")
    batches = list(calib.feeds())
    assert [len(b["x"]) for b in batches] == [4, 4, 2]
    assert all(b["ids"].dtype == np.int64 for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["ids"] for b in batches]), inputs["ids"])
    only_ids = list(calib.feeds(batch_size=3, input_names=["ids"]))
    assert [list(b) for b in only_ids] == [["ids"]] * 4 and len(only_ids[-1]["ids"]) == 1
    with pytest.raises(DataError, match="no samples for model input 'mask' \\(it has: x, ids\\)"):
        next(calib.feeds(input_names=["x", "mask"]))
    with pytest.raises(DataError, match="2 inputs \\(x, ids\\); iterate Calibration.feeds"):
        _ = calib.inputs


def test_stream_and_collect_feed_both_inputs():
    inputs = two_inputs(10)
    got = Calibration(inputs, batch_size=3).collect(ir.serde.deserialize_model(two_input_model()),
                                                   ["y", "h"])
    np.testing.assert_allclose(got["y"], inputs["x"] * 2 + inputs["ids"], rtol=1e-6)
    assert got["h"].dtype == np.int64
    np.testing.assert_array_equal(got["h"], inputs["ids"] + 1)


def test_subset_keeps_every_input_and_the_settings():
    calib = Calibration(two_inputs(10), batch_size=4, provider="cpu")
    subset = calib.subset(3)
    assert len(subset) == 3 and subset.batch_size == 4 and subset.input_names == ("x", "ids")
    np.testing.assert_array_equal(subset.arrays["ids"], calib.arrays["ids"][:3])
    single = Calibration(np.ones((5, 2), np.float64)).subset(2)
    assert single.inputs.shape == (2, 2) and single.inputs.dtype == np.float32
    assert single.input_names == ()


def test_one_unnamed_array_feeds_a_single_input_model_of_any_name(mlp):
    x = np.random.default_rng(5).standard_normal((6, 16)).astype(np.float32)
    calib = Calibration(x, batch_size=4)
    assert [list(f) for f in calib.feeds(input_names=["whatever"])] == [["whatever"]] * 2
    with pytest.raises(DataError, match="one unnamed array: pass the model's input name"):
        next(calib.feeds())
    with pytest.raises(DataError, match="the model has 2 inputs \\(x, ids\\)"):
        calib.collect(ir.serde.deserialize_model(two_input_model()), ["y"])


def test_inputs_of_different_lengths_are_rejected():
    with pytest.raises(DataError, match="different numbers of samples \\(x 3, ids 2\\)"):
        Calibration({"x": np.zeros((3, 3), np.float32), "ids": np.zeros((2, 3), np.int64)})
    with pytest.raises(DataError, match="calibration input 'ids' must be a non-empty batch"):
        Calibration({"ids": np.zeros((0, 3), np.int64)})


# -- streaming statistics (issue 12) ------------------------------------------------------

def _all_at_once(proto: onnx.ModelProto, names: list[str], x: np.ndarray) -> dict:
    """Every named tensor on every sample from one onnxruntime run (the reference)."""
    from compressor import runtime

    whole = onnx.ModelProto.FromString(proto.SerializeToString())
    present = {o.name for o in whole.graph.output}
    whole.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names
                              if n not in present)
    sess = runtime.session(whole)
    return dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x}), strict=True))


@pytest.mark.parametrize("arch", zoo.names())
def test_streamed_statistics_equal_all_at_once_on_every_zoo_model(arch):
    from compressor import io
    from compressor.passes.cleanup import CleanupPass
    from compressor.passes.lowrank import (
        batch_rows,
        gather_moments,
        layer_rows,
        rows_per_sample,
        survey,
    )


    entry = zoo.get(arch)
    model = CleanupPass()(ir.serde.deserialize_model(
        io.load_model(entry.checkpoint, arch=arch).proto)).model
    x = np.random.default_rng(5).standard_normal((23, *entry.input_shape)).astype(np.float32)
    layers = survey(model, None).layers
    assert layers
    max_rows = 1500  # 12 rows per sample: a subset of every conv's positions
    streamed = gather_moments(Calibration(x, batch_size=4), model, layers, max_rows)
    reference = _all_at_once(ir.serde.serialize_model(model),
                             list(dict.fromkeys(layer.input_name for layer in layers)), x)
    for layer in layers:
        everything = reference[layer.input_name]
        index = batch_rows(layer, everything, 0, rows_per_sample(max_rows), 0)
        rows = layer_rows(layer, everything, index=index).astype(np.float64)
        got = streamed[layer.name]
        assert got.count == len(rows), layer.name
        scale = float(np.abs(rows).max()) + 1e-12
        np.testing.assert_allclose(got.mean, rows.mean(0), rtol=1e-4, atol=1e-5 * scale)
        np.testing.assert_allclose(got.covariance, np.cov(rows.T, bias=True), rtol=1e-3,
                                   atol=1e-5 * scale * scale, err_msg=layer.name)


def test_rows_are_drawn_per_sample_whatever_the_batches():
    from compressor.passes.calibrate import sampled_rows

    whole = sampled_rows(0, 10, 50, 7, seed=3)
    parts = [sampled_rows(0, 4, 50, 7, 3), sampled_rows(4, 6, 50, 7, 3) + 4 * 50]
    np.testing.assert_array_equal(whole, np.concatenate(parts))
    assert len(whole) == 70 and len(set(whole.tolist())) == 70
    assert np.all(whole // 50 == np.repeat(np.arange(10), 7))  # 7 positions of each sample
    np.testing.assert_array_equal(sampled_rows(0, 3, 5, 7, 3), np.arange(15))  # all rows


def test_stream_runs_only_the_prefix_and_caps_the_batch_by_bytes(mlp, monkeypatch):
    from compressor.passes import calibrate

    x = np.random.default_rng(3).standard_normal((50, 16)).astype(np.float32)
    pruned = calibrate.prefix_model(mlp.proto, ["h"])
    assert [n.name for n in pruned.graph.node] == ["fc1"]
    assert [o.name for o in pruned.graph.output] == ["h"]
    # a first batch of one sample measures h: 32 floats, 128 bytes, and x is 64 bytes, counted
    # 16 times for onnxruntime's own activations: 1152 bytes a sample, so 8100 bytes give 7
    monkeypatch.setattr(calibrate, "MAX_BATCH_BYTES", 8100)
    sizes = []
    Calibration(x, batch_size=128).stream(mlp.ir(), ["h"], lambda b: sizes.append(len(b["h"])))
    assert sizes == [1] + [7] * 7
    sizes.clear()
    Calibration(x, batch_size=5).stream(mlp.ir(), ["h"], lambda b: sizes.append(len(b["h"])))
    assert sizes == [1] + [5] * 9 + [4]  # the calibration's own batch size is the other cap
    with pytest.raises(DataError, match="no tensor named 'nope'"):
        calibrate.prefix_model(mlp.proto, ["nope"])


def test_a_stream_remembers_the_first_output_by_digest_while_it_is_small(mlp, built,
                                                                          monkeypatch):
    from compressor.passes import calibrate

    x = np.random.default_rng(4).standard_normal((50, 16)).astype(np.float32)
    digest = calibrate.model_digest(mlp.proto)
    calib = Calibration(x, batch_size=16)
    seen = []
    calib.stream(mlp.ir(), ["h"], lambda b: seen.append(sorted(b)), remember_as=digest)
    assert seen and all(names == ["h"] for names in seen)  # consume sees what it asked for
    np.testing.assert_allclose(calib.remembered_output(mlp.proto), built.run(mlp.proto, x),
                               rtol=1e-5, atol=1e-5)
    assert calib.remembered_output(calibrate.prefix_model(mlp.proto, ["h"])) is None
    # 10 floats a sample for 50 samples is 2000 bytes: past a budget of 1000 none is kept
    monkeypatch.setattr(calibrate, "MAX_REMEMBERED_BYTES", 1000)
    small = Calibration(x, batch_size=16)
    small.stream(mlp.ir(), ["h"], lambda b: None, remember_as=digest)
    assert small.remembered_output(mlp.proto) is None
    assert digest == calibrate.model_digest(onnx.ModelProto.FromString(
        mlp.proto.SerializeToString())) != calibrate.model_digest(
        calibrate.prefix_model(mlp.proto, ["h"]))


def test_a_stream_with_range_hands_consume_each_batch_s_samples(mlp):
    x = np.random.default_rng(5).standard_normal((23, 16)).astype(np.float32)
    ranges = []
    Calibration(x, batch_size=8).stream(
        mlp.ir(), ["h"], lambda b, start, stop: ranges.append((start, stop, len(b["h"]))),
        with_range=True)
    assert ranges == [(0, 1, 1), (1, 9, 8), (9, 17, 8), (17, 23, 6)]


def test_stage_clock_adds_up_every_entry():
    from compressor.passes.calibrate import StageClock

    clock = StageClock()
    for _ in range(3):
        with clock("work"):
            pass
    clock.add("work", 1.5)
    assert set(clock.seconds) == {"work"} and 1.5 <= clock.seconds["work"] < 1.6


def test_streaming_batch_size_is_set_by_the_sample_bytes():
    from compressor.passes import calibrate

    image = 3 * 224 * 224 * 4  # one float32 ImageNet image
    assert calibrate.streaming_batch_size(image) == calibrate.MAX_BATCH_BYTES // (
        calibrate.ACTIVATION_FACTOR * image) == 27
    assert calibrate.streaming_batch_size(100, cap=5) == 5  # small inputs: the cap
    assert calibrate.streaming_batch_size(2**40) == 1  # never below one sample
