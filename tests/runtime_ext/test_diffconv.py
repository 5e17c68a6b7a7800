"""DiffConv in onnxruntime: parity with ORT's Conv at threshold 0, with the numpy reference of
the differential algorithm at threshold > 0, error paths, and CUDA against CPU."""

from __future__ import annotations

import shutil
import subprocess
import threading

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from compressor import runtime
from compressor.errors import RuntimeLibraryError
from compressor.passes.diffconv import ConvGeometry, reference_diffconv

from .conftest import conv_model, needs_cuda, run, run_on_cuda

PATHS = ["auto", "conv", "dense", "sparse"]  # COMPRESSOR_DIFFCONV_PATH: every CPU code path


@pytest.fixture(params=PATHS)
def cpu_path(request, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_DIFFCONV_PATH", request.param)
    return request.param


@pytest.fixture(params=["avx512", "portable"])
def helpers(request, monkeypatch):
    """COMPRESSOR_DIFFCONV_PORTABLE: the AVX-512 helpers (where the CPU has them) or the
    portable ones, which other CPUs run."""
    monkeypatch.setenv("COMPRESSOR_DIFFCONV_PORTABLE", "1" if request.param == "portable" else "0")
    return request.param


def attributes(strides, pads, dilations, **extra):
    return dict(strides=list(strides), pads=list(pads), dilations=list(dilations), **extra)


def ort_conv(x, w, b, strides, pads, dilations):
    model = conv_model("Conv", x.shape, w, b, **attributes(strides, pads, dilations))
    return run(model, {"X": x})[0]


def diffconv(x, w, b, strides, pads, dilations, threshold=0.0, restart=16, counts=True, **kw):
    model = conv_model(
        "DiffConv", x.shape, w, b, counts=counts,
        **attributes(strides, pads, dilations, threshold=float(threshold), restart=restart), **kw,
    )
    return run(model, {"X": x})


def tolerance(x, w):
    # Float32 sums of K products, plus the differential form's cancellations.
    k = w[0].size
    return 1e-5 * k * float(np.abs(x).max() + 1) * float(np.abs(w).max() + 1)


# --- library --------------------------------------------------------------------------------


def test_library_exports_only_register_custom_ops(library):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not installed")
    out = subprocess.run([nm, "-D", "--defined-only", library], capture_output=True, text=True, check=True)
    symbols = [line.split()[-1] for line in out.stdout.splitlines() if line.strip()]
    assert symbols == ["RegisterCustomOps"]


def test_library_path_env_override(monkeypatch, library):
    monkeypatch.setenv(runtime.LIBRARY_ENV, library)
    assert runtime.library_path() == library
    monkeypatch.setenv(runtime.LIBRARY_ENV, "/nonexistent/libcompressor_ops.so")
    with pytest.raises(RuntimeLibraryError, match=runtime.LIBRARY_ENV):
        runtime.library_path()


def test_library_missing_says_how_to_build(monkeypatch, tmp_path):
    import compressor

    monkeypatch.delenv(runtime.LIBRARY_ENV, raising=False)
    monkeypatch.setattr(compressor, "__path__", [str(tmp_path)])
    with pytest.raises(RuntimeLibraryError, match="pip install -e"):
        runtime.library_path()


def test_plain_onnxruntime_without_library_gets_how_to_load():
    w = np.ones((2, 1, 3, 3), np.float32)
    model = conv_model("DiffConv", (1, 1, 5, 5), w).SerializeToString()
    with pytest.raises(RuntimeLibraryError, match="register_custom_ops_library"):
        runtime.inference_session(model, providers=["CPUExecutionProvider"])
    assert runtime.uses_custom_ops(model)
    assert not runtime.uses_custom_ops(conv_model("Conv", (1, 1, 5, 5), w))


def test_library_loaded_twice_and_two_sessions_at_once(library):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 16, 16)).astype(np.float32)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    model = conv_model("DiffConv", x.shape, w, pads=[1, 1, 1, 1]).SerializeToString()
    sessions = []
    for _ in range(2):
        so = ort.SessionOptions()
        so.register_custom_ops_library(library)
        sessions.append(ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]))
    expected = ort_conv(x, w, None, (1, 1), (1, 1, 1, 1), (1, 1))
    results, errors = [[], []], []

    def work(i):
        try:
            for _ in range(20):
                results[i].append(sessions[i].run(None, {"X": x})[0])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for outputs in results:
        for y in outputs:
            np.testing.assert_allclose(y, expected, atol=1e-4)


# --- parity with ORT Conv at threshold 0 ---------------------------------------------------


@pytest.mark.parametrize(
    "strides,pads,dilations",
    [((1, 1), (0, 0, 0, 0), (1, 1)), ((1, 1), (1, 1, 1, 1), (1, 1)), ((2, 2), (1, 2, 0, 3), (1, 1)),
     ((1, 3), (2, 0, 1, 1), (2, 1)), ((3, 1), (0, 0, 0, 0), (1, 2))],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_exact_matches_ort_conv(cpu_path, strides, pads, dilations, with_bias):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 17, 19)).astype(np.float32)
    w = rng.standard_normal((21, 5, 3, 3)).astype(np.float32)
    b = rng.standard_normal(21).astype(np.float32) if with_bias else None
    y, counts = diffconv(x, w, b, strides, pads, dilations, restart=5)
    expected = ort_conv(x, w, b, strides, pads, dilations)
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, atol=tolerance(x, w), rtol=1e-4)
    _, performed, dense = reference_diffconv(x, w, b, ConvGeometry(strides, pads, dilations), 0.0, 5)
    assert counts.tolist() == [performed, dense]


def test_bias_only_and_padding_only_cases():
    x = np.zeros((1, 2, 4, 4), np.float32)
    w = np.ones((3, 2, 3, 3), np.float32)
    b = np.array([1.5, -2.0, 0.25], np.float32)
    y, counts = diffconv(x, w, b, (1, 1), (1, 1, 1, 1), (1, 1))
    np.testing.assert_array_equal(y, np.broadcast_to(b[None, :, None, None], (1, 3, 4, 4)))
    # All-zero input: only the restart windows (ow = 0) are multiplied.
    assert counts.tolist() == [3 * 4 * 18, 3 * 16 * 18]
    x = np.ones((1, 1, 3, 3), np.float32)
    w = np.ones((1, 1, 3, 3), np.float32)
    y, _ = diffconv(x, w, None, (1, 1), (1, 1, 1, 1), (1, 1))
    np.testing.assert_array_equal(y[0, 0], [[4, 6, 4], [6, 9, 6], [4, 6, 4]])


def test_weight_given_as_graph_input_and_no_counts_output():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 4, 9, 9)).astype(np.float32)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    model = conv_model("DiffConv", x.shape, w, weight_as_input=True, threshold=0.3)
    (y,) = run(model, {"X": x, "W": w})
    expected, _, _ = reference_diffconv(x, w, None, ConvGeometry(), 0.3)
    np.testing.assert_allclose(y, expected, atol=tolerance(x, w))


conv_cases = st.fixed_dictionaries(
    dict(
        n=st.integers(1, 3), c=st.integers(1, 6), m=st.integers(1, 40), h=st.integers(1, 12),
        w=st.integers(1, 12), kh=st.integers(1, 4), kw=st.integers(1, 4), sh=st.integers(1, 3),
        sw=st.integers(1, 3), dh=st.integers(1, 2), dw=st.integers(1, 2),
        pads=st.tuples(*[st.integers(0, 2)] * 4), bias=st.booleans(), restart=st.integers(1, 20),
        seed=st.integers(0, 2**31 - 1),
    )
)


def make_case(case):
    rng = np.random.default_rng(case["seed"])
    t, left, bottom, right = case["pads"]
    assume(case["h"] + t + bottom >= case["dh"] * (case["kh"] - 1) + 1)
    assume(case["w"] + left + right >= case["dw"] * (case["kw"] - 1) + 1)
    # Smooth-ish inputs with exact zeros, like activations after ReLU.
    x = rng.standard_normal((case["n"], case["c"], case["h"], case["w"])).astype(np.float32)
    x = np.maximum(np.round(x * 4) / 4, 0).astype(np.float32)
    w = rng.standard_normal((case["m"], case["c"], case["kh"], case["kw"])).astype(np.float32)
    b = rng.standard_normal(case["m"]).astype(np.float32) if case["bias"] else None
    geometry = ConvGeometry((case["sh"], case["sw"]), case["pads"], (case["dh"], case["dw"]))
    return x, w, b, geometry


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=conv_cases)
def test_property_threshold_zero_matches_ort_conv(case):
    x, w, b, g = make_case(case)
    y, counts = diffconv(x, w, b, g.strides, g.pads, g.dilations, restart=case["restart"])
    expected = ort_conv(x, w, b, g.strides, g.pads, g.dilations)
    np.testing.assert_allclose(y, expected, atol=tolerance(x, w), rtol=1e-4)
    _, performed, dense = reference_diffconv(x, w, b, g, 0.0, case["restart"])
    assert counts.tolist() == [performed, dense]


@pytest.mark.parametrize("portable", ["0", "1"])
@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=25, deadline=None)
@given(case=conv_cases, threshold=st.sampled_from([0.0, 0.25, 0.5, 1.0, 3.0]))
def test_property_threshold_matches_reference(path, portable, case, threshold):
    # Same skipped set (counts equal exactly) and same result up to rounding, with the AVX-512
    # helpers and with the portable ones.
    x, w, b, g = make_case(case)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPRESSOR_DIFFCONV_PATH", path)
        mp.setenv("COMPRESSOR_DIFFCONV_PORTABLE", portable)
        y, counts = diffconv(x, w, b, g.strides, g.pads, g.dilations, threshold, case["restart"])
    expected, performed, dense = reference_diffconv(x, w, b, g, threshold, case["restart"])
    assert counts.tolist() == [performed, dense]
    np.testing.assert_allclose(y, expected, atol=tolerance(x, w), rtol=1e-4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "n,c,m,size,strides,dilations",
    [
        (1, 40, 130, 9, (1, 1), (1, 1)),   # three channel tiles (64, 64, 2), input channel blocks
        (2, 16, 64, 12, (2, 2), (1, 1)),   # stride 2: column phases, row classes
        (1, 24, 48, 11, (1, 2), (2, 1)),   # dilation and stride mixed
        (3, 64, 96, 7, (1, 1), (1, 1)),    # several images, sparse groups of one kernel entry
    ],
)
def test_wide_layers_match_reference(path, n, c, m, size, strides, dilations, helpers, monkeypatch):
    # Wide layers take the blocked code paths the small property cases do not reach: several
    # 64-channel output tiles, input channels in L1-sized blocks, sparse passes of fewer
    # kernel entries than a class holds.
    monkeypatch.setenv("COMPRESSOR_DIFFCONV_PATH", path)
    rng = np.random.default_rng(n * 1000 + c)
    x = np.maximum(np.round(rng.standard_normal((n, c, size, size)) * 4) / 4, 0).astype(np.float32)
    w = (rng.standard_normal((m, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    g = ConvGeometry(strides, (1, 1, 1, 1), dilations)
    for threshold in (0.0, 0.3, 1.0):
        y, counts = diffconv(x, w, b, g.strides, g.pads, g.dilations, threshold, restart=5)
        expected, performed, dense = reference_diffconv(x, w, b, g, threshold, 5)
        assert counts.tolist() == [performed, dense]
        np.testing.assert_allclose(y, expected, atol=1e-4 * (1 + np.abs(expected).max()), rtol=1e-4)


def test_pool_and_calling_thread_give_the_same_result(cpu_path):
    # Small calls run on the calling thread, one unit per image; this batch (1e5 outputs and
    # more) runs on ORT's pool in blocks of rows. Image by image, both must agree, and match
    # the reference of the differential algorithm.
    rng = np.random.default_rng(21)
    x = np.maximum(np.round(rng.standard_normal((5, 12, 26, 26)) * 4) / 4, 0).astype(np.float32)
    w = (rng.standard_normal((32, 12, 3, 3)) / np.sqrt(9 * 12)).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    g = ConvGeometry((1, 1), (1, 1, 1, 1), (1, 1))
    assert x.shape[0] * 32 * 26 * 26 >= 1e5 > 32 * 26 * 26
    for threshold in (0.0, 0.3):
        model = conv_model("DiffConv", x.shape, w, b, counts=True,
                           **attributes(g.strides, g.pads, g.dilations, threshold=threshold, restart=7))
        single = conv_model("DiffConv", (1, *x.shape[1:]), w, b, counts=True,
                            **attributes(g.strides, g.pads, g.dilations, threshold=threshold, restart=7))
        y, counts = run(model, {"X": x}, threads=2)
        per_image = [run(single, {"X": x[i:i + 1]}) for i in range(x.shape[0])]
        np.testing.assert_allclose(y, np.concatenate([p[0] for p in per_image]), rtol=1e-5, atol=1e-5)
        assert counts.tolist() == [sum(p[1][0] for p in per_image), sum(p[1][1] for p in per_image)]
        expected, performed, dense = reference_diffconv(x, w, b, g, threshold, 7)
        assert counts.tolist() == [performed, dense]
        np.testing.assert_allclose(y, expected, atol=1e-4 * (1 + np.abs(expected).max()), rtol=1e-4)


def test_threshold_skips_multiplications_and_bounds_error():
    rng = np.random.default_rng(5)
    # A smooth image: neighbouring columns differ little.
    base = np.cumsum(rng.standard_normal((1, 8, 28, 28)) * 0.05, axis=3).astype(np.float32)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    exact = ort_conv(base, w, None, (1, 1), (1, 1, 1, 1), (1, 1))
    previous = None
    for threshold in [0.0, 0.02, 0.05, 0.2]:
        y, (performed, dense) = diffconv(base, w, None, (1, 1), (1, 1, 1, 1), (1, 1), threshold)
        error = np.linalg.norm(y - exact) / np.linalg.norm(exact)
        if previous is not None:
            assert performed <= previous
        previous = performed
        if threshold == 0.0:
            assert error < 1e-5
    assert previous < 0.5 * dense


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,message",
    [
        (dict(threshold=-1.0), "threshold must be"),
        (dict(group=2), "group=2"),
        (dict(strides=[0, 1]), "strides"),
        (dict(strides=[1, 1, 1]), "strides"),
        (dict(pads=[1, 1, 1]), "pads"),
        (dict(pads=[-1, 0, 0, 0]), "pads"),
        (dict(dilations=[0, 1]), "dilations"),
        (dict(restart=0), "restart"),
        (dict(auto_pad="SAME_UPPER"), "auto_pad"),
        (dict(threshold="big"), "threshold"),
        (dict(kernel_shape=[5, 5]), "kernel_shape"),
    ],
)
def test_bad_attributes_are_ort_errors_naming_the_op(extra, message):
    x = np.ones((1, 2, 6, 6), np.float32)
    w = np.ones((3, 2, 3, 3), np.float32)
    model = conv_model("DiffConv", x.shape, w, **extra)
    with pytest.raises(Exception, match=message) as info:
        run(model, {"X": x})
    assert "DiffConv" in str(info.value)


@pytest.mark.parametrize(
    "x_shape,w_shape,bias_shape,message",
    [
        ((2, 6, 6), (3, 2, 3, 3), None, "input X must be 4-D"),
        ((1, 2, 6, 6, 1), (3, 2, 3, 3), None, "input X must be 4-D"),
        ((1, 2, 6, 6), (3, 2, 3), None, "weight W must be 4-D"),
        ((1, 4, 6, 6), (3, 2, 3, 3), None, "channel mismatch"),
        ((1, 2, 6, 6), (3, 2, 3, 3), (4,), "bias B must be 1-D \\[3\\]"),
        ((1, 2, 2, 2), (3, 2, 3, 3), None, "does not fit"),
    ],
)
def test_bad_shapes_are_ort_errors_naming_the_op(x_shape, w_shape, bias_shape, message):
    x = np.ones(x_shape, np.float32)
    w = np.ones(w_shape, np.float32)
    b = np.ones(bias_shape, np.float32) if bias_shape else None
    model = conv_model("DiffConv", x_shape, w, b)
    with pytest.raises(Exception, match=message) as info:
        run(model, {"X": x})
    assert "DiffConv" in str(info.value)


def test_empty_batch():
    w = np.ones((3, 2, 3, 3), np.float32)
    model = conv_model("DiffConv", (0, 2, 6, 6), w, counts=True)
    y, counts = run(model, {"X": np.ones((0, 2, 6, 6), np.float32)})
    assert y.shape == (0, 3, 4, 4)
    assert counts.tolist() == [0, 0]


# --- CUDA ------------------------------------------------------------------------------------

@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("threshold", [0.0, 0.5])
@settings(max_examples=15, deadline=None)
@given(case=conv_cases)
def test_cuda_matches_cpu(threshold, case):
    x, w, b, g = make_case(case)
    model = conv_model(
        "DiffConv", x.shape, w, b, counts=True,
        **attributes(g.strides, g.pads, g.dilations, threshold=threshold, restart=case["restart"]),
    )
    cpu_y, cpu_counts = run(model, {"X": x}, provider="cpu")
    cuda_y, cuda_counts = run_on_cuda(model, {"X": x}, "DiffConv")
    np.testing.assert_allclose(cuda_y, cpu_y, atol=tolerance(x, w), rtol=1e-4)
    assert cuda_counts.tolist() == cpu_counts.tolist()


@pytest.mark.cuda
@needs_cuda
def test_cuda_bad_shape_is_an_error_naming_the_op():
    x = np.ones((1, 4, 6, 6), np.float32)
    model = conv_model("DiffConv", x.shape, np.ones((3, 2, 3, 3), np.float32))
    with pytest.raises(Exception, match="DiffConv.*channel mismatch"):
        run(model, {"X": x}, provider="cuda")
