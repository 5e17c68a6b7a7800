"""fast-conv: the per-layer choice by (synthetic) measured time within the error tolerance,
ORT's Conv kept with the reason for unsupported layers, the numpy reference of Winograd, the
MAC counter, and a zoo model through the pipeline."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor import runtime
from compressor.errors import OptionError
from compressor.latency import LatencyCache, LatencyContext, LatencyTable
from compressor.passes.fast_conv import (
    DIRECT_OP_TYPE,
    FFT_OP_TYPE,
    IM2COL_OP_TYPE,
    OP_TYPE,
    FastConvConfig,
    FastConvPass,
    fft_macs,
    reference_winograd,
)
from compressor.profile import profile_model


def _algorithm(proto: onnx.ModelProto) -> str:
    if any(n.op_type == "QuantizeLinear" and "context" not in n.name for n in proto.graph.node):
        return "int8"  # ORT's Conv in QDQ form, as the int8 stage would write it
    for node in proto.graph.node:
        if node.name.startswith("context_"):  # the 1x1 Convs standing for its neighbours
            continue
        if node.op_type == IM2COL_OP_TYPE:
            return "im2col"
        if node.op_type == FFT_OP_TYPE:
            return "fft"
        if node.op_type == DIRECT_OP_TYPE:
            return "direct"
        if node.op_type == OP_TYPE:
            tile = next(a.i for a in node.attribute if a.name == "tile")
            return f"winograd{tile}"
        if node.op_type == "Conv":
            return "conv"
    raise AssertionError("no conv in the candidate")


def _channels(proto: onnx.ModelProto) -> int:
    return proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value


class FakeLatency(LatencyTable):
    """ms from ``times[(input channels, algorithm)]`` for a candidate (the layer, its
    activation, a MaxPool), ``whole_ms`` for a whole model; in memory only; records the
    candidates it timed, and the whole models in ``wholes``."""

    def __init__(self, times: dict[tuple[int, str], float], batch: int = 16,
                 whole_ms: float = 100.0):
        super().__init__(LatencyContext(batch=batch), LatencyCache(persistent=False))
        self.times = times
        self.whole_ms = whole_ms
        self.timed: list[tuple[int, str, tuple]] = []
        self.pooled: dict[tuple[int, str], bool] = {}  # whether the candidate ends in a MaxPool
        self.neighbours: dict[tuple[int, str], tuple[str, ...]] = {}  # their stand-ins
        self.wholes = 0

    def measure(self, proto: onnx.ModelProto, min_time_s: float) -> float:
        nodes = [n for n in proto.graph.node if not n.name.startswith("context_")]
        quantized = any(n.op_type == "QuantizeLinear" for n in nodes)
        if len(nodes) > 2 and nodes[-1].op_type != "MaxPool" and not quantized:
            self.wholes += 1
            return self.whole_ms
        dims = tuple(d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim)
        key = (_channels(proto), _algorithm(proto))
        self.timed.append((*key, dims))
        self.pooled[key] = nodes[-1].op_type == "MaxPool"
        self.neighbours[key] = tuple(n.name for n in proto.graph.node if n.name.startswith("context_"))
        return self.times[key]


def conv_net(rng) -> onnx.ModelProto:
    """x [N, 3, 11, 13] -> 3x3 (3->16, bias, Relu) -> 3x3 stride 2 (16->16) -> 1x1 (16->24)
    -> 3x3 group 2 (24->24) -> 3x3 dilation 2 (24->32, pads 2) -> 3x3 (32->8, asymmetric pads,
    no bias) -> GlobalAveragePool -> Flatten."""
    specs = [  # name, cin, cout, kernel, attributes, bias
        ("c0", 3, 16, 3, dict(pads=[1, 1, 1, 1]), True),
        ("s2", 16, 16, 3, dict(pads=[1, 1, 1, 1], strides=[2, 2]), True),
        ("k1", 16, 24, 1, dict(), True),
        ("g2", 24, 24, 3, dict(pads=[1, 1, 1, 1], group=2), True),
        ("d2", 24, 32, 3, dict(pads=[2, 2, 2, 2], dilations=[2, 2]), True),
        ("c5", 32, 8, 3, dict(pads=[0, 1, 2, 0]), False),
    ]
    nodes, inits, prev = [], [], "x"
    for name, cin, cout, k, attrs, bias in specs:
        group = attrs.get("group", 1)
        w = (rng.standard_normal((cout, cin // group, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{name}_w"))
        inputs = [prev, f"{name}_w"]
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), f"{name}_b"))
            inputs.append(f"{name}_b")
        nodes.append(helper.make_node("Conv", inputs, [f"{name}_y"], name=name, kernel_shape=[k, k], **attrs))
        prev = f"{name}_y"
        if name == "c0":
            nodes.append(helper.make_node("Relu", [prev], ["c0_r"], name="relu"))
            prev = "c0_r"
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["y"])]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 11, 13])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model)


class FakeCalibration:
    def __init__(self, x: np.ndarray):
        self.inputs = x

    def collect(self, model: ir.Model, value_names: list[str]) -> dict[str, np.ndarray]:
        from compressor.passes.calibrate import Calibration

        return Calibration({"x": self.inputs}).collect(model, value_names)


def run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return runtime.session(proto).run(None, {"x": x})[0]


def compress(proto, latency, calibration=None, **config):
    model = ir.serde.deserialize_model(proto)
    result = FastConvPass(FastConvConfig(**config), calibration, latency=latency)(model)
    out = ir.serde.serialize_model(result.model)
    out.ir_version = 10
    return result, out


SUPPORTED = (3, 32)  # input channels of the layers Winograd applies to (c0, c5)
WINOGRAD = ("winograd2", "winograd4")  # the tests of Winograd's choice time only it
TIME_ORDERS = list(itertools.permutations([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("order", TIME_ORDERS)
def test_never_picks_a_slower_algorithm(order):
    rng = np.random.default_rng(0)
    proto = conv_net(rng)
    algorithms = ("conv", "winograd2", "winograd4")
    times = {}
    for c in (3, 16, 24, 32):
        for i, a in enumerate(algorithms):
            times[(c, a)] = order[(i + c) % 3]
    table = FakeLatency(times)
    result, out = compress(proto, table, FakeCalibration(rng.standard_normal((4, 3, 11, 13)).astype(np.float32)),
                           algorithms=WINOGRAD)
    layers = {r.name: r for r in result.layers}
    for name, c in zip(("c0", "c5"), SUPPORTED, strict=True):
        record = layers[name]
        fastest = min(algorithms, key=lambda a: times[(c, a)])
        assert record.latency_after_ms == min(times[(c, a)] for a in algorithms)
        assert record.latency_before_ms == times[(c, "conv")]
        assert record.changed == (fastest != "conv")
        node = next(n for n in out.graph.node if n.name == name)
        if fastest == "conv":
            assert node.op_type == "Conv" and "fastest" in record.skipped
        else:
            assert node.op_type == OP_TYPE
            assert next(a.i for a in node.attribute if a.name == "tile") == int(fastest[-1])
            assert record.error is not None and 0 <= record.error <= 1e-4
    # each supported layer timed at batch 16 on its real input shape, every algorithm
    timed = sorted(set(table.timed))  # Conv, the reference, is also timed beside each other
    assert timed == sorted([(3, a, (16, 3, 11, 13)) for a in algorithms]
                           + [(32, a, (16, 32, 6, 7)) for a in algorithms])


@pytest.mark.parametrize("int8_ms", [0.5, 1.5, None])
def test_int8_conv_is_weighed_when_the_int8_stage_follows(int8_ms):
    """With the int8 stage after it, a layer whose Conv is faster in int8 than the fastest
    algorithm stays a Conv for that stage; otherwise the algorithm wins as before. Without
    the int8 stage (None) no int8 form is timed."""
    rng = np.random.default_rng(0)
    proto = conv_net(rng)
    times = {}
    for c in (3, 16, 24, 32):
        times.update({(c, "conv"): 2.0, (c, "winograd2"): 1.0, (c, "winograd4"): 3.0,
                      (c, "int8"): int8_ms})
    table = FakeLatency(times)
    calibration = FakeCalibration(rng.standard_normal((4, 3, 11, 13)).astype(np.float32))
    result, out = compress(proto, table, calibration, algorithms=WINOGRAD,
                           int8_after=int8_ms is not None)
    layers = {r.name: r for r in result.layers}
    ops = {n.name: n.op_type for n in out.graph.node}
    for name, c in zip(("c0", "c5"), SUPPORTED, strict=True):
        record = layers[name]
        if int8_ms is None:
            assert all(a != "int8" for _, a, _ in table.timed)
            assert ops[name] == OP_TYPE and "int8" not in record.detail
        elif int8_ms < 1.0:
            assert ops[name] == "Conv"
            assert "kept ORT's Conv for the int8 stage" in record.skipped
            assert "int8 Conv 0.5 ms" in record.skipped and "Winograd F(2x2,3x3) 1 ms" in record.skipped
        else:
            assert ops[name] == OP_TYPE and record.skipped is None
            assert "int8 Conv 1.5 ms" in record.detail
        if int8_ms is not None:  # the int8 form timed on the layer's real input shape
            assert (c, "int8", (16, *((3, 11, 13) if c == 3 else (32, 6, 7)))) in table.timed
    np.testing.assert_allclose(run(out, calibration.inputs), run(proto, calibration.inputs),
                               rtol=1e-4, atol=1e-4)


def test_int8_conv_is_not_timed_where_conv_is_fastest_already():
    rng = np.random.default_rng(0)
    times = {(c, a): t for c in (3, 16, 24, 32)
             for a, t in (("conv", 1.0), ("winograd2", 2.0), ("winograd4", 3.0), ("int8", 0.1))}
    table = FakeLatency(times)
    result, _ = compress(conv_net(rng), table, algorithms=WINOGRAD, int8_after=True)
    assert all(a != "int8" for _, a, _ in table.timed)
    assert "kept ORT's Conv: it is fastest" in {r.name: r for r in result.layers}["c0"].skipped


@pytest.mark.parametrize("im2col_ms", [0.5, 3.0])
def test_im2col_is_kept_only_where_it_is_measured_fastest(im2col_ms):
    """Im2colConv (asked for) against Conv at 1 ms and Winograd at 2 ms: picked at 0.5 ms,
    never at 3 ms; where picked, the model's outputs are the original's."""
    rng = np.random.default_rng(6)
    proto = conv_net(rng)
    ms = {"conv": 1.0, "winograd2": 2.0, "winograd4": 2.0, "im2col": im2col_ms}
    times = {(c, a): t for c in (3, 16, 24, 32) for a, t in ms.items()}
    result, out = compress(proto, FakeLatency(times),
                           algorithms=("winograd2", "winograd4", "im2col"))
    layers = {r.name: r for r in result.layers}
    for name in ("c0", "c5"):
        record, node = layers[name], next(n for n in out.graph.node if n.name == name)
        assert record.latency_after_ms == min(ms.values())
        if im2col_ms < ms["conv"]:
            assert node.op_type == IM2COL_OP_TYPE and node.domain == runtime.OP_DOMAIN
            assert record.changed and "im2col + GEMM" in record.detail
            assert record.macs_after == record.macs_before  # same products as Conv
        else:
            assert node.op_type == "Conv" and "fastest" in record.skipped
    x = rng.standard_normal((2, 3, 11, 13)).astype(np.float32)
    reference, y = run(proto, x), run(out, x)
    assert np.linalg.norm(y - reference) / np.linalg.norm(reference) < 1e-5


def large_kernel_net(rng) -> onnx.ModelProto:
    """x [N, 3, 20, 18] -> 7x7 (3->8, pads 3, bias) -> 3x3 (8->12, pads 1) -> 5x5 stride 2
    (12->12) -> 5x5 (12->6, asymmetric pads, no bias)."""
    specs = [("k7", 3, 8, 7, dict(pads=[3, 3, 3, 3]), True), ("k3", 8, 12, 3, dict(pads=[1, 1, 1, 1]), True),
             ("s5", 12, 12, 5, dict(pads=[2, 2, 2, 2], strides=[2, 2]), True),
             ("k5", 12, 6, 5, dict(pads=[2, 0, 1, 2]), False)]
    nodes, inits, prev = [], [], "x"
    for name, cin, cout, k, attrs, bias in specs:
        w = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{name}_w"))
        inputs = [prev, f"{name}_w"]
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), f"{name}_b"))
            inputs.append(f"{name}_b")
        nodes.append(helper.make_node("Conv", inputs, [f"{name}_y"], name=name, kernel_shape=[k, k], **attrs))
        prev = f"{name}_y"
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 20, 18])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model)


@pytest.mark.parametrize("order", TIME_ORDERS)
def test_fft_is_picked_on_large_kernels_only_when_fastest(order):
    """Synthetic times in every order for Conv / FFT on the 5x5 and 7x7 layers (Winograd does
    not apply there) and for the 3x3 layer's algorithms (FFT is not timed there): the fastest
    is kept, never a slower one; FFTConv's outputs are the original's."""
    rng = np.random.default_rng(7)
    proto = large_kernel_net(rng)
    times = {(3, "conv"): order[0], (3, "fft"): order[1], (12, "conv"): order[0],
             (12, "fft"): order[2], (8, "conv"): order[0], (8, "winograd2"): order[1],
             (8, "winograd4"): order[2], (3, "direct"): 10.0, (12, "direct"): 10.0,
             (8, "direct"): 10.0}
    table = FakeLatency(times)
    result, out = compress(proto, table)
    layers = {r.name: r for r in result.layers}
    for name, c, k, (oh, ow) in (("k7", 3, 7, (20, 18)), ("k5", 12, 5, (9, 7))):
        record, node = layers[name], next(n for n in out.graph.node if n.name == name)
        fastest = min(("conv", "fft"), key=lambda a: times[(c, a)])
        assert record.latency_after_ms == min(times[(c, "conv")], times[(c, "fft")])
        if fastest == "fft":
            assert node.op_type == FFT_OP_TYPE and node.domain == runtime.OP_DOMAIN
            assert record.changed and "FFT" in record.detail and record.error <= 1e-4
            assert record.macs_after == fft_macs((k, k), (oh, ow), c, record.shape_before[0])
        else:
            assert node.op_type == "Conv" and "fastest" in record.skipped
    assert "strides [2, 2]" in layers["s5"].skipped
    timed = {(c, a) for c, a, _ in table.timed}
    assert (8, "fft") not in timed and (8, "winograd4") in timed  # the 3x3 layer
    assert (3, "winograd2") not in timed and (3, "fft") in timed  # the 7x7 layer
    x = rng.standard_normal((2, 3, 20, 18)).astype(np.float32)
    reference, y = run(proto, x), run(out, x)
    assert np.linalg.norm(y - reference) / np.linalg.norm(reference) < 1e-5


def test_fft_is_not_tried_where_its_kernel_spectra_would_not_fit():
    """FFTConv refuses spectra over 1 GiB (an error naming the op): the pass does not time it."""
    from compressor.passes.fast_conv import inapplicable_reason

    huge = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (8192, 8192, 7, 7), (0,) * 4)
    assert "1 GiB" in inapplicable_reason("fft", huge)
    assert inapplicable_reason("fft", np.zeros((64, 64, 7, 7), np.float32)) is None
    assert "larger than 3x3" in inapplicable_reason("fft", np.zeros((64, 64, 3, 3), np.float32))


def test_unsupported_layers_keep_conv_with_the_reason():
    rng = np.random.default_rng(1)
    proto = conv_net(rng)
    times = {(c, a): (5.0 if a == "conv" else 1.0) for c in (3, 16, 24, 32)
             for a in ("conv", "winograd2", "winograd4")}
    result, out = compress(proto, FakeLatency(times), algorithms=WINOGRAD)
    layers = {r.name: r for r in result.layers}
    assert "strides [2, 2]" in layers["s2"].skipped
    assert "kernel 1x1" in layers["k1"].skipped
    assert "group=2" in layers["g2"].skipped
    assert "dilations [2, 2]" in layers["d2"].skipped
    for name in ("s2", "k1", "g2", "d2"):
        assert "kept ORT's Conv" in layers[name].skipped
        assert next(n for n in out.graph.node if n.name == name).op_type == "Conv"
    assert layers["c0"].changed and layers["c5"].changed
    assert layers["c0"].error_basis == "random"  # no calibration data
    x = rng.standard_normal((3, 3, 11, 13)).astype(np.float32)
    reference, y = run(proto, x), run(out, x)
    assert np.linalg.norm(y - reference) / np.linalg.norm(reference) < 1e-5


def test_error_above_tolerance_keeps_conv():
    rng = np.random.default_rng(2)
    proto = conv_net(rng)
    times = {(c, a): (5.0 if a == "conv" else 1.0) for c in (3, 16, 24, 32)
             for a in ("conv", "winograd2", "winograd4")}
    result, out = compress(proto, FakeLatency(times), tolerance=0.0, algorithms=WINOGRAD)
    layers = {r.name: r for r in result.layers}
    # F(4x4)'s rounding differs from Conv's on every layer; F(2x2) too on c5's 32 channels
    assert "Winograd F(4x4,3x3) error" in layers["c5"].skipped
    assert "> tolerance" in layers["c5"].skipped
    assert next(n for n in out.graph.node if n.name == "c5").op_type == "Conv"


def test_config_is_validated():
    with pytest.raises(OptionError, match="tolerance"):
        FastConvConfig(tolerance=-1.0)
    with pytest.raises(OptionError, match="unknown algorithm"):
        FastConvConfig(algorithms=("fourier",))


def test_mac_counter_counts_the_transform_domain_products():
    rng = np.random.default_rng(3)
    proto = conv_net(rng)
    times = {(c, a): (5.0 if a != "winograd4" else 1.0) for c in (3, 16, 24, 32)
             for a in ("conv", "winograd2", "winograd4")}
    result, out = compress(proto, FakeLatency(times), algorithms=WINOGRAD)
    before, after = profile_model(proto), profile_model(out)
    # c0: 11x13 output in 3x4 tiles of 4x4 -> 12 tiles * 36 * 3 * 16; c5: 6x6 output -> 2x2 tiles
    winograd = 12 * 36 * 3 * 16 + 4 * 36 * 32 * 8
    direct = 11 * 13 * 16 * 27 + 6 * 6 * 8 * 288
    assert before.macs - after.macs == direct - winograd
    assert result.stats["macs_after"] == winograd


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("pads", [(0, 0, 0, 0), (1, 1, 1, 1), (2, 0, 1, 2)])
def test_reference_winograd_is_conv(tile, pads):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 5, 7, 9))
    w = rng.standard_normal((6, 5, 3, 3))
    b = rng.standard_normal(6)
    top, left, bottom, right = pads
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    exact = torch.nn.functional.conv2d(torch.from_numpy(xp), torch.from_numpy(w), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(reference_winograd(x, w, b, pads, tile), exact, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tile", [2, 4])
def test_kernel_matches_the_float32_reference(tile):
    """The compiled op against the numpy statement computed in float32 (same stages)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 20, 9, 10)).astype(np.float32)
    w = rng.standard_normal((12, 20, 3, 3)).astype(np.float32)
    node = helper.make_node(OP_TYPE, ["x", "w"], ["y"], domain=runtime.OP_DOMAIN, pads=[1, 2, 0, 1], tile=tile)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid(runtime.OP_DOMAIN, 1)])
    proto.ir_version = 10
    y = run(proto, x)
    exact = reference_winograd(x, w, None, (1, 2, 0, 1), tile)
    approx = reference_winograd(x, w, None, (1, 2, 0, 1), tile, dtype=np.float32)
    # the kernel's error against float64 is of the float32 reference's order
    assert np.abs(y - exact).max() <= 4 * np.abs(approx - exact).max() + 1e-6


def _whole_model_speed(monkeypatch, speedup: float) -> None:
    """LatencyTable.compare (the recipe's whole-model check) reports the compressed model
    ``speedup`` times faster than the original whenever it holds a custom op."""
    def compare(self, models, feeds=None, *, min_time_s=1.0):
        def custom(proto):
            return any(n.domain == runtime.OP_DOMAIN for n in proto.graph.node)
        return {name: 1.0 / speedup if custom(proto) else 1.0 for name, proto in models.items()}

    monkeypatch.setattr(LatencyTable, "compare", compare)


def _vgg_fast_conv(tmp_path, monkeypatch):
    from compressor.models import zoo
    from compressor.pipeline import CompressOptions
    from compressor.pipeline import compress as run_pipeline

    checkpoint = zoo.get("vgg").checkpoint
    monkeypatch.setenv("COMPRESSOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(LatencyTable, "measure",
                        lambda self, proto, min_time_s: {"conv": 3.0, "winograd2": 2.0, "winograd4": 1.0,
                                                                 "direct": 4.0}[_algorithm(proto)])
    return run_pipeline(CompressOptions(
        model=checkpoint, arch="vgg", method="fast-conv", calib_samples=32, batch=16,
        data=str(zoo.DATA_DIR / "fashion_mnist_calib.npz"), output=tmp_path / "vgg.onnx"))


def test_vgg_through_the_pipeline_equals_the_original(tmp_path, monkeypatch):
    """The zoo's vgg (3x3 stride-1 convs) compressed with --method fast-conv, timing faked to
    favour F(4x4) per layer and the whole model measured 1.5x faster: every 3x3 conv becomes
    WinogradConv and the outputs equal the original's."""
    _whole_model_speed(monkeypatch, 1.5)
    result = _vgg_fast_conv(tmp_path, monkeypatch)
    assert result.speed.measured == pytest.approx(1.5) and not result.speed.fell_back_to_original
    proto = onnx.load(str(result.output))
    onnx.checker.check_model(proto)
    kinds = [n.op_type for n in proto.graph.node if n.op_type in ("Conv", OP_TYPE)]
    assert OP_TYPE in kinds
    layers = [layer for r in result.passes for layer in r.layers]
    assert all(layer.error <= 1e-4 for layer in layers if layer.changed)
    # the pipeline's own check: the compressed model against the original on calibration data
    assert result.verification.relative_error < 1e-4
    assert result.verification.agreement == 1.0


def test_fast_conv_measured_slower_in_the_whole_model_writes_the_original(tmp_path, monkeypatch):
    """Every layer faster on its own, the whole model measured slower (0.9x; custom ops break
    ORT's fused layout chains): without any --speedup the layers are rolled back round by
    round and the cleaned original is written, saying so."""
    _whole_model_speed(monkeypatch, 0.9)
    result = _vgg_fast_conv(tmp_path, monkeypatch)
    assert result.speed.fell_back_to_original and result.speed.target is None
    assert any("rolling back" in n for n in result.notes)
    assert any("wrote the cleaned original" in n for n in result.notes)
    proto = onnx.load(str(result.output))
    assert not [n for n in proto.graph.node if n.domain == runtime.OP_DOMAIN]


def lenet_like(rng) -> onnx.ModelProto:
    """x [N, 1, 28, 28] -> 5x5 (1->6, pads 2, bias) -> Relu -> MaxPool -> 5x5 (6->16) -> Relu
    -> 3x3 (16->4, pads 1) whose output is also a graph output beside its Relu."""
    nodes, inits = [], []
    for name, cin, cout, k in (("c1", 1, 6, 5), ("c2", 6, 16, 5), ("c3", 16, 4, 3)):
        w = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"{name}_w"),
                  numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), f"{name}_b")]
    nodes = [
        helper.make_node("Conv", ["x", "c1_w", "c1_b"], ["c1_y"], name="c1", kernel_shape=[5, 5], pads=[2] * 4),
        helper.make_node("Relu", ["c1_y"], ["c1_r"], name="r1"),
        helper.make_node("MaxPool", ["c1_r"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "c2_w", "c2_b"], ["c2_y"], name="c2", kernel_shape=[5, 5]),
        helper.make_node("Relu", ["c2_y"], ["c2_r"], name="r2"),
        helper.make_node("Conv", ["c2_r", "c3_w", "c3_b"], ["c3_y"], name="c3", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["c3_y"], ["y"], name="r3"),
    ]
    graph = helper.make_graph(nodes, "lenet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("c3_y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model)


@pytest.mark.parametrize("direct_ms", [0.5, 3.0])
def test_direct_is_kept_only_where_fastest_and_takes_the_relu_in(direct_ms):
    """DirectConv against Conv at 1 ms (FFT at 2 ms, Winograd at 2 ms): picked at 0.5 ms with
    the Relu after the Conv fused into it, except where the Conv's output has another user
    (c3's is a graph output); never at 3 ms; the model's outputs are the original's."""
    rng = np.random.default_rng(9)
    proto = lenet_like(rng)
    ms = {"conv": 1.0, "winograd2": 2.0, "winograd4": 2.0, "fft": 2.0, "direct": direct_ms}
    table = FakeLatency({(c, a): t for c in (1, 6, 16) for a, t in ms.items()}, batch=64)
    result, out = compress(proto, table, FakeCalibration(rng.standard_normal((4, 1, 28, 28)).astype(np.float32)))
    layers = {r.name: r for r in result.layers}
    nodes = {n.name: n for n in out.graph.node}
    ops = [n.op_type for n in out.graph.node]
    if direct_ms < 1.0:
        for name in ("c1", "c2", "c3"):
            assert nodes[name].op_type == DIRECT_OP_TYPE and nodes[name].domain == runtime.OP_DOMAIN
            assert layers[name].changed and layers[name].latency_after_ms == direct_ms
            assert layers[name].macs_after == layers[name].macs_before
        activation = {n: next((a.s.decode() for a in nodes[n].attribute if a.name == "activation"), "")
                      for n in ("c1", "c2", "c3")}
        pool = {n: next((list(a.ints) for a in nodes[n].attribute if a.name == "pool"), [])
                for n in ("c1", "c2", "c3")}
        assert activation == {"c1": "Relu", "c2": "Relu", "c3": ""}
        assert pool == {"c1": [2, 2], "c2": [], "c3": []}  # c1's Relu feeds a 2x2 MaxPool
        assert "r1" not in nodes and "r2" not in nodes and "r3" in nodes
        assert ops.count("Relu") == 1 and "MaxPool" not in ops
        assert "the Relu and MaxPool after it fused in" in layers["c1"].detail
        assert "the Relu after it fused in" in layers["c2"].detail
    else:
        assert DIRECT_OP_TYPE not in ops and ops.count("Conv") == 3
    # timed in context: the candidate for c1 at batch 64 on its real input shape, every
    # algorithm with the MaxPool after it (DirectConv with it inside)
    assert (1, "direct", (64, 1, 28, 28)) in table.timed
    assert table.pooled == {(1, "conv"): True, (1, "fft"): True, (1, "direct"): False,
                            (6, "conv"): False, (6, "fft"): False, (6, "direct"): False,
                            (16, "conv"): False, (16, "winograd2"): False,
                            (16, "winograd4"): False, (16, "direct"): False}
    # between Conv neighbours, 1x1 Convs stand for them: c1 feeds c2 (through its pool), c2
    # feeds c3 (through its Relu), c3 reads c2's Relu (a Conv's, unless c2 became DirectConv
    # before c3 was timed) and is a graph output
    assert table.neighbours[(1, "conv")] == ("context_after",)
    assert table.neighbours[(6, "direct")] == ("context_after",)
    assert table.neighbours[(16, "direct")] == (() if direct_ms < 1.0 else ("context_before",))
    # the prediction: the whole model's 100 ms, less what the replaced layers saved
    if direct_ms < 1.0:
        assert table.wholes == 1
        predicted = 100.0 - 3 * (1.0 - direct_ms)
        assert result.stats["predicted_latency_ms"] == pytest.approx(predicted)
        assert result.stats["predicted_speedup"] == pytest.approx(100.0 / predicted)
    else:
        assert table.wholes == 0 and "predicted_speedup" not in result.stats
    x = rng.standard_normal((3, 1, 28, 28)).astype(np.float32)
    session_in, session_out = runtime.session(proto), runtime.session(out)
    for a, b in zip(session_in.run(None, {"x": x}), session_out.run(None, {"x": x}), strict=True):
        assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-5


def test_direct_is_not_timed_on_cuda():
    """DirectConv has no CUDA kernel: on the CUDA provider it is never a candidate."""
    from compressor.passes.fast_conv import DEFAULT_ALGORITHMS, timed_algorithms

    w5, w3 = np.zeros((16, 6, 5, 5), np.float32), np.zeros((16, 6, 3, 3), np.float32)
    assert timed_algorithms(DEFAULT_ALGORITHMS, w5, "cpu") == ("fft", "direct")
    assert timed_algorithms(DEFAULT_ALGORITHMS, w5, "cuda") == ("fft",)
    assert timed_algorithms(DEFAULT_ALGORITHMS, w3, "cuda") == ("winograd2", "winograd4")


def test_conv_neighbours_follow_the_graph():
    """c0 (graph input; its Relu feeds the stride-2 Conv) has a Conv after it; c5 (reads the
    dilated Conv; feeds GlobalAveragePool) has one before it; k1 sits between two Convs."""
    from compressor.latency import fused_activation
    from compressor.passes.fast_conv import conv_neighbours

    model = ir.serde.deserialize_model(conv_net(np.random.default_rng(11)))
    nodes = {n.name: n for n in model.graph}
    found = {name: conv_neighbours(nodes[name], fused_activation(nodes[name]) or nodes[name])
             for name in ("c0", "k1", "c5")}
    assert found == {"c0": (False, True), "k1": (True, True), "c5": (True, False)}


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_the_method_weighs_int8_exactly_when_the_int8_stage_follows(quantize):
    from compressor.methods import METHODS
    from compressor.pipeline import CompressOptions

    opts = CompressOptions(model="m.onnx", output="o.onnx", method="fast-conv", quantize=quantize)
    (fast_conv,) = METHODS["fast-conv"].build(opts, None, latency=FakeLatency({}))
    assert fast_conv.config.int8_after is (quantize == "int8")
