"""compressor.recipe: method lists, stages sharing one target, measurement and rollback.

Timings come from a fake latency table (time = a fixed cost plus the MACs), so what the
recipe decides is deterministic; the real LatencyTable has its own tests.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import torch

from compressor import io
from compressor.errors import OptionError
from compressor.latency import LatencyCache, LatencyContext, LatencyTable
from compressor.pipeline import CompressOptions, compress, read_recipe
from compressor.profile import profile_model
from compressor.recipe import Recipe, SpeedReport, parse_methods


class FakeLatency(LatencyTable):
    """time = 0.1 ms + 1 ms per million MACs, cached in memory only; ``compare`` can be made
    to lie about the compressed model."""

    def __init__(self, compressed_factor: float = 1.0, measured_speedup: float | None = None):
        super().__init__(LatencyContext(), LatencyCache(persistent=False))
        self.compressed_factor = compressed_factor
        self.measured_speedup = measured_speedup  # compare: compressed = original / this
        self.compared = 0

    def measure(self, proto: onnx.ModelProto, min_time_s: float) -> float:
        return 0.1 + profile_model(proto).macs / 1e6

    def compare(self, models, feeds=None, *, min_time_s: float = 1.0):
        self.compared += 1
        times = {name: self.measure(m, min_time_s) for name, m in models.items()}
        if "compressed" in times:
            times["compressed"] *= self.compressed_factor
            if self.measured_speedup is not None:
                times["compressed"] = times["original"] / self.measured_speedup
        return times


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, padding=1, stride=2), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(64 * 6 * 6, 10),
    ).eval()
    path = tmp_path_factory.mktemp("m") / "small.onnx"
    io.save_model(io.export_to_onnx(net, (1, 12, 12)), path)
    data = tmp_path_factory.mktemp("d") / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.random((64, 1, 12, 12), dtype=np.float32))
    return path, data


def _patch_latency(monkeypatch, fake: FakeLatency) -> None:
    import compressor.latency

    monkeypatch.setattr(compressor.latency, "LatencyTable", lambda *a, **k: fake)


def test_parse_methods():
    assert parse_methods("prune,svd") == ("prune", "svd")
    assert parse_methods(" svd ") == ("svd",)
    with pytest.raises(OptionError, match="unknown method 'svdd'"):
        parse_methods("prune,svdd")
    with pytest.raises(OptionError, match="'svd' is listed twice"):
        parse_methods("svd,prune,svd")
    with pytest.raises(OptionError, match="comma list"):
        parse_methods("svd,")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(speedup=1.0), "--speedup must be a number > 1"),
        (dict(speedup=0.5), "--speedup must be a number > 1"),
        (dict(speedup=float("nan")), "--speedup must be a number > 1"),
        (dict(quantize="int4"), "unknown --quantize 'int4'"),
        (dict(batch=0), "--batch must be >= 1"),
        (dict(method="sketch", speedup=2.0), "sketch chooses by MACs only"),
    ],
)
def test_options_rejected(kwargs, message, tmp_path):
    base = dict(model="m.onnx", output=tmp_path / "o.onnx", method="svd")
    with pytest.raises(OptionError, match=message):
        CompressOptions(**{**base, **kwargs})


def test_ratio_default_depends_on_speedup(tmp_path):
    base = dict(model="m.onnx", output=tmp_path / "o.onnx", method="svd")
    assert CompressOptions(**base).ratio == 0.5
    assert CompressOptions(**base, speedup=2.0).ratio == 1.0  # no MACs cap
    assert CompressOptions(**base, speedup=2.0, ratio=0.7).ratio == 0.7
    # fast-conv takes no target but chooses by measured time: --speedup is measured for it
    assert CompressOptions(**{**base, "method": "fast-conv"}, speedup=1.2).ratio == 1.0


def test_composition_runs_in_order_and_shares_the_ratio(small_model, tmp_path):
    model, data = small_model
    out = tmp_path / "out.onnx"
    result = compress(CompressOptions(model=model, output=out, method="prune,svd", ratio=0.4,
                                      data=str(data), rank_multiple=4, channel_multiple=4))
    assert [s.method for s in result.stages] == ["prune", "svd"]
    # the first stage is asked for sqrt(0.4); the second for what is still missing
    assert result.stages[0].ratio_target == pytest.approx(0.4 ** 0.5)
    reached_first = result.stages[0].macs_ratio
    assert result.stages[1].ratio_target == pytest.approx(min(1.0, 0.4 / reached_first))
    assert result.ratio_reached <= 0.4 * 1.02
    recipe = read_recipe(onnx.load(out))
    assert recipe["method"] == "prune,svd"
    assert [p.split("(")[0] for p in recipe["passes"]] == ["PruneChannelsPass", "LowRankSVDPass"]
    assert [s["method"] for s in recipe["stages"]] == ["prune", "svd"]
    assert [r.stats["pass"] for r in result.passes] == ["prune", "svd"]
    assert any("pruned" in layer.detail for layer in result.passes[0].layers)
    assert any("rank" in layer.detail for layer in result.passes[1].layers)
    assert set(result.timings) >= {"load", "cleanup", "pass prune", "pass svd", "verify",
                                   "save", "total"}


def test_speedup_is_measured_and_reported(small_model, tmp_path, monkeypatch):
    model, data = small_model
    fake = FakeLatency()
    _patch_latency(monkeypatch, fake)
    out = tmp_path / "out.onnx"
    result = compress(CompressOptions(model=model, output=out, method="svd", speedup=2.0,
                                      data=str(data), rank_multiple=4))
    speed = result.speed
    assert isinstance(speed, SpeedReport) and fake.compared >= 1
    assert speed.measured == pytest.approx(speed.original_ms / speed.compressed_ms)
    assert speed.met is (speed.measured >= 2.0)
    assert speed.batch == 1 and speed.target == 2.0
    # the prediction is the pass's own, from its per-layer timings
    assert result.stages[0].predicted_speedup is not None
    assert speed.predicted == pytest.approx(result.stages[0].predicted_speedup)
    # with time proportional to MACs, reaching 2x means keeping about half the MACs or less
    if speed.met:
        assert result.ratio_reached < 0.55
    recipe = read_recipe(onnx.load(out))
    assert recipe["speed"]["target"] == 2.0 and recipe["speed"]["measured"] == pytest.approx(
        speed.measured)


def test_slower_model_is_rolled_back_then_falls_back_to_the_original(small_model, tmp_path,
                                                                       monkeypatch):
    """A compressed model measured slower than the original is never written: layers are
    rolled back round by round, and when every round is slower the cleaned original is."""
    model, data = small_model
    fake = FakeLatency(compressed_factor=100.0)  # every compressed model measures slower
    _patch_latency(monkeypatch, fake)
    out = tmp_path / "out.onnx"
    result = compress(CompressOptions(model=model, output=out, method="svd", speedup=1.5,
                                      data=str(data), rank_multiple=4))
    assert result.speed.fell_back_to_original
    assert result.speed.measured == pytest.approx(1.0) and result.speed.met is False
    assert any("rolling back" in n for n in result.notes)
    assert any("wrote the cleaned original" in n for n in result.notes)
    assert result.ratio_reached == pytest.approx(1.0)


@pytest.mark.parametrize("measured", [1.02, 1.08])
def test_a_gain_within_the_noise_margin_is_not_kept(small_model, tmp_path, monkeypatch,
                                                      measured):
    """Every round measured 1.02x (within MIN_GAIN, the timing's noise): rolled back, then the
    cleaned original is written; at 1.08x the compressed model is kept."""
    from compressor.recipe import MIN_GAIN

    assert 1.02 < MIN_GAIN < 1.08
    model, data = small_model
    _patch_latency(monkeypatch, FakeLatency(measured_speedup=measured))
    out = tmp_path / "out.onnx"
    result = compress(CompressOptions(model=model, output=out, method="svd", speedup=1.5,
                                      data=str(data), rank_multiple=4))
    if measured < MIN_GAIN:
        assert result.speed.fell_back_to_original and result.ratio_reached == pytest.approx(1.0)
        assert any(f"not faster than the original by {MIN_GAIN:g}x" in n for n in result.notes)
    else:
        assert not result.speed.fell_back_to_original and result.ratio_reached < 1.0
        assert result.speed.measured == pytest.approx(measured)
    assert result.speed.met is False


def test_rollback_order_prefers_layers_that_gain_least_per_error():
    from compressor.passes.base import LayerRecord, PassResult

    layers = [
        LayerRecord("cheap_gain", "Conv", macs_before=100, macs_after=90, error=0.1),
        LayerRecord("big_gain", "Conv", macs_before=100, macs_after=10, error=0.1),
        LayerRecord("skipped", "Conv", macs_before=100, macs_after=100, skipped="kept"),
    ]
    order = Recipe._rollback_order([PassResult(model=None, modified=True, layers=layers)])
    assert [r.name for r in order] == ["cheap_gain", "big_gain"]


def test_overshoot_is_corrected_and_the_closest_round_above_the_target_wins(
        small_model, tmp_path, monkeypatch):
    """Whole models measured twice as fast as the per-layer prediction: the first round
    overshoots, the next asks the stages for less, and the round kept meets the target with
    the least speedup past it (the least compressed)."""
    model, data = small_model
    fake = FakeLatency(compressed_factor=0.5)
    _patch_latency(monkeypatch, fake)
    out = tmp_path / "out.onnx"
    result = compress(CompressOptions(model=model, output=out, method="svd", speedup=1.6,
                                      data=str(data), rank_multiple=4))
    asked = [n for n in result.notes if "asking the stages for" in n]
    assert asked, result.notes
    assert result.speed.met and result.speed.rounds >= 2
    assert result.speed.measured < 1.6 * 2  # not the first round's overshoot
    # each round's prediction: its tables', corrected by what the round before measured
    # against its tables
    history = result.speed.history
    assert [h["round"] for h in history] == list(range(1, len(history) + 1))
    assert history[0]["predicted"] == history[0]["table_predicted"]
    for before, after in itertools.pairwise(history):
        correction = before["measured"] / before["table_predicted"]
        assert after["predicted"] == pytest.approx(after["table_predicted"] * correction)
    kept = history[result.speed.rounds - 1]
    assert result.speed.predicted == kept["predicted"]
