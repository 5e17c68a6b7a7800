"""WinogradConv on the CUDA provider (marked `cuda`, skipped without a GPU): the CUDA kernels
against the CPU op over random shapes, both tile sizes, within the algorithm's documented
error bound against ORT's Conv; errors name the op."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .conftest import needs_cuda, run_on_cuda
from .test_winograd_conv import ERROR_BOUND, conv_model, error_ratio, run

pytestmark = [pytest.mark.cuda, needs_cuda]

shapes = st.tuples(
    st.integers(1, 3),                                   # batch
    st.integers(1, 40), st.integers(1, 40),              # input, output channels
    st.integers(3, 13), st.integers(3, 13),              # map size (partial tiles)
    st.tuples(*[st.integers(0, 2)] * 4),                 # pads, asymmetric
    st.booleans(),                                       # bias
    st.sampled_from([2, 4]),                             # tile
)


def both(x, w, b, pads, tile):
    model = conv_model("WinogradConv", x.shape, w, b, pads=list(pads), tile=tile)
    cpu = run(model, {"X": x})
    cuda = run_on_cuda(model, {"X": x}, "WinogradConv")[0]
    return cpu, cuda


@settings(max_examples=30, deadline=None)
@given(shapes, st.integers(0, 2**31 - 1))
def test_cuda_matches_cpu_on_random_shapes(shape, seed):
    n, c, m, h, w_size, pads, with_bias, tile = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w_size)).astype(np.float32)
    w = rng.standard_normal((m, c, 3, 3)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32) if with_bias else None
    cpu, cuda = both(x, w, b, pads, tile)
    assert cuda.shape == cpu.shape
    # Both within the bound of ORT's Conv (a few eps of the plane's scale): a wrong tap, tile
    # or transform entry moves outputs by O(1), thousands of times more.
    assert error_ratio(cuda, x, w, b, pads) <= ERROR_BOUND[tile]
    np.testing.assert_allclose(cuda, cpu, rtol=1e-4, atol=1e-4 * np.abs(cpu).max())


@pytest.mark.parametrize("tile", [2, 4])
def test_cuda_large_layer(tile):
    """Batch 8 x 64 -> 96 channels at 28x28: many 64x64 GEMM tiles per transform-domain
    product."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 64, 28, 28)).astype(np.float32)
    w = (rng.standard_normal((96, 64, 3, 3)) * 0.1).astype(np.float32)
    b = rng.standard_normal(96).astype(np.float32)
    cpu, cuda = both(x, w, b, (1, 1, 1, 1), tile)
    assert error_ratio(cuda, x, w, b, (1, 1, 1, 1)) <= ERROR_BOUND[tile]
    np.testing.assert_allclose(cuda, cpu, rtol=1e-4, atol=1e-4 * np.abs(cpu).max())


def test_cuda_bad_shape_is_an_error_naming_the_op():
    x = np.ones((1, 4, 6, 6), np.float32)
    model = conv_model("WinogradConv", x.shape, np.ones((3, 2, 3, 3), np.float32))
    from compressor import runtime

    with pytest.raises(Exception, match="WinogradConv.*channel mismatch"):
        runtime.session(model, provider="cuda").run(None, {"X": x})
