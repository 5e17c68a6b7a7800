"""bench/bench_fast_conv.py without timing: which algorithms each layer gets, the errors of the
one-node models it times, and the verdicts its table draws from rows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_fast_conv  # noqa: E402


def _layer(k=3, stride=1, group=1, c=8, m=8, size=12):
    return dict(source="t", c=c, m=m, h=size, w=size, k=k, stride=stride, group=group,
                dilation=1, pads=[k // 2] * 4)


@pytest.mark.parametrize("layer, expected", [
    (_layer(), {"conv", "im2col", "winograd2", "winograd4", "fft"}),
    (_layer(k=5), {"conv", "im2col", "fft"}),
    (_layer(k=1), {"conv", "im2col"}),
    (_layer(stride=2), {"conv", "im2col"}),
    (_layer(group=8), {"conv", "im2col"}),
    (_layer(k=7, c=8192, m=8192, size=56), {"conv", "im2col"}),  # spectra over FFTConv's 1 GiB
])
def test_each_layer_gets_the_algorithms_that_compute_it(layer, expected):
    assert set(bench_fast_conv.applicable(layer)) == expected


@pytest.mark.parametrize("layer", [_layer(), _layer(k=5), _layer(k=3, stride=2, group=8)])
def test_every_timed_model_computes_the_layer(layer):
    """The one-node model of each algorithm is the same convolution (float64 torch reference)."""
    for tile in bench_fast_conv.applicable(layer).values():
        assert bench_fast_conv.error(layer, tile) < 1e-5


def _whole(model, original, fast, cosine=0.99999):
    return dict(model=model, batch=16, ms={"original": original, "fast-conv": fast},
                chosen={"Conv": 1}, cosine_min=cosine, relative_error=1e-6)


def _result(wholes):
    ms = {"conv": 2.0, "winograd2": 1.0, "winograd4": 1.0, "im2col": 4.0}
    row = dict(_layer(c=64, m=64), errors={"conv": 1e-7}, ms={"16": ms})
    return dict(batches=[16], rows=[row], load=[1.0, 1.0], whole=wholes)


def test_no_model_slower_is_met_only_when_every_model_is_at_least_as_fast():
    met = bench_fast_conv.render(_result([_whole("resnet18", 10, 8), _whole("vgg", 5, 5)]))
    assert "no model slower than with ORT's Conv alone: met." in met
    missed = bench_fast_conv.render(_result([_whole("resnet18", 10, 8), _whole("vgg", 5, 6)]))
    assert "not met (vgg slower)" in missed


def test_a_model_that_kept_its_original_graph_is_not_counted_slower():
    """fast-conv fell back to the original (the recipe measured no gain): the same graph timed
    twice, 5.0 vs 5.1 ms, is noise, and the row says which graph was written."""
    kept = dict(_whole("vgg", 5.0, 5.1), fell_back=True, recipe_measured=0.93, chosen={})
    text = bench_fast_conv.render(_result([_whole("resnet18", 10, 8), kept]))
    assert "no model slower than with ORT's Conv alone: met." in text
    assert "the original, kept: no round measured faster by 1.05x (best 0.93x)" in text


def test_table_marks_algorithms_that_do_not_apply():
    text = bench_fast_conv.render(_result([]))
    row = next(line for line in text.splitlines() if line.startswith("| t |"))
    # Conv ms, F(2), F(4), FFT (not timed: -), im2col; then the errors.
    assert "| 2 | 2.00x | 2.00x | - | 0.50x |" in row
    assert "Target F(4x4) >= 1.3x Conv on layers with >= 64 channels at batch >= 16: met on 1 of 1" in text
