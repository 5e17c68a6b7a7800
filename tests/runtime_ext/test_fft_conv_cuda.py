"""FFTConv on the CUDA provider (marked `cuda`, skipped without a GPU): the cuFFT kernel against
ORT's Conv and the float64 numpy reference over random shapes (kernels 1..7, maps including 1
and odd sizes, pads, bias), on many tiles and chunks, and against the CPU op; errors name the
op."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from compressor import runtime

from .conftest import needs_cuda, run_on_cuda
from .test_fft_conv import assert_matches, fft_model, make_case, run, shapes

pytestmark = [pytest.mark.cuda, needs_cuda]


def cuda_fft_conv(x, w, b, pads, weight_as_input=False):
    model = fft_model(x.shape, w, b, weight_as_input=weight_as_input, pads=list(pads))
    feeds = {"X": x, "W": w} if weight_as_input else {"X": x}
    return run_on_cuda(model, feeds, "FFTConv")[0]


@example(shape=(1, 1, 1, 1, 1, 1, 1, (0, 0, 0, 0), False), seed=0)  # one pixel, 1x1
@example(shape=(2, 3, 2, 1, 1, 7, 7, (3, 3, 3, 3), True), seed=1)   # 1x1 map, 7x7 kernel
@settings(max_examples=40, deadline=None)
@given(shapes(24, 40), st.integers(0, 2**31 - 1))
def test_cuda_matches_ort_conv_and_the_reference_on_random_shapes(shape, seed):
    x, w, b, pads = make_case(shape, seed)
    assert_matches(cuda_fft_conv(x, w, b, pads), x, w, b, pads)


@pytest.mark.parametrize("n, c, m, size, k", [
    (1, 64, 64, 56, 5), (2, 32, 48, 56, 7), (4, 8, 16, 224, 7), (3, 16, 8, 33, 3),
])
def test_cuda_large_maps_and_channels_match_the_cpu_op(n, c, m, size, k):
    """Many overlap-save tiles over the batch, many 64 x 64 GEMM tiles per frequency."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((n, c, size, size)).astype(np.float32)
    w = rng.standard_normal((m, c, k, k)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    pads = (k // 2,) * 4
    cuda = cuda_fft_conv(x, w, b, pads)
    assert_matches(cuda, x, w, b, pads)
    cpu = run(fft_model(x.shape, w, b, pads=list(pads)), {"X": x})[0]
    np.testing.assert_allclose(cuda, cpu, rtol=1e-4, atol=1e-4 * np.abs(cpu).max())


def test_cuda_weight_as_graph_input():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 17, 12)).astype(np.float32)
    w = rng.standard_normal((5, 6, 5, 3)).astype(np.float32)
    pads = (2, 1, 2, 1)
    assert_matches(cuda_fft_conv(x, w, None, pads, weight_as_input=True), x, w, None, pads)


def test_cuda_one_session_two_map_sizes():
    """Two FFT sizes in one session: the kernel's cuFFT plans are kept per size."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((4, 3, 7, 7)).astype(np.float32)
    session = runtime.session(fft_model([1, 3, "H", "W"], w, None, pads=[3, 3, 3, 3]),
                              provider="cuda")
    for size in (9, 60, 9):
        x = rng.standard_normal((1, 3, size, size)).astype(np.float32)
        assert_matches(session.run(None, {"X": x})[0], x, w, None, (3, 3, 3, 3))


def test_cuda_bad_shape_is_an_error_naming_the_op():
    x = np.ones((1, 4, 7, 7), np.float32)
    model = fft_model(x.shape, np.ones((3, 2, 5, 5), np.float32), None)
    with pytest.raises(Exception, match="FFTConv.*channel mismatch"):
        runtime.session(model, provider="cuda").run(None, {"X": x})
