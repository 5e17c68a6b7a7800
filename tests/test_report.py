"""Tables render as plain text with the expected numbers; JSON is strict; plots are PNGs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from compressor.evaluate import Comparison, EvaluationReport, LatencyStats, ModelStats
from compressor.passes.base import LayerRecord
from compressor.profile import profile_model
from compressor.report import (
    evaluation_table,
    format_bytes,
    format_count,
    format_macs,
    format_ms,
    format_percent,
    format_points,
    format_ratio,
    format_shape,
    jsonable,
    layer_table,
    profile_table,
    summary_table,
    to_json,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def render(table, width: int = 120) -> str:
    console = Console(record=True, width=width, color_system=None)
    console.print(table)
    return console.export_text()


def row_label(line: str) -> str:
    """The first cell of a rendered row (cells are separated by two or more spaces)."""
    return line.strip().split("  ")[0]


def sample_report(with_reference: bool = True) -> EvaluationReport:
    candidate = ModelStats(
        name="vgg_svd",
        path="out/vgg_svd.onnx",
        params=1_234_567,
        macs=45_600_000,
        file_bytes=1_200_000,
        accuracy=0.9012,
        latency={
            1: LatencyStats(1, p50_ms=0.5, p95_ms=0.75, mean_ms=0.55, runs=100),
            64: LatencyStats(64, p50_ms=12.0, p95_ms=14.5, mean_ms=12.4, runs=40),
        },
    )
    reference = ModelStats(
        name="vgg",
        path="models/vgg.onnx",
        params=4_000_000,
        macs=150_000_000,
        file_bytes=16_000_000,
        accuracy=0.9132,
        latency={
            1: LatencyStats(1, p50_ms=1.0, p95_ms=1.5, mean_ms=1.1, runs=100),
            64: LatencyStats(64, p50_ms=30.0, p95_ms=33.0, mean_ms=30.5, runs=40),
        },
    )
    comparison = Comparison(
        agreement=0.975,
        max_abs_logit_diff=0.8125,
        mean_abs_logit_diff=0.00123,
        speedup={1: 2.0, 64: 2.5},
        macs_ratio=45.6 / 150,
        params_ratio=1_234_567 / 4_000_000,
        size_ratio=0.075,
        accuracy_delta=0.9012 - 0.9132,
        samples=1000,
    )
    return EvaluationReport(
        candidate=candidate,
        reference=reference if with_reference else None,
        comparison=comparison if with_reference else None,
        provider="cpu",
        data="fashion_mnist_eval",
        machine={"cpu": "Test CPU 9000", "cores": 8, "onnxruntime": "1.31.1"},
        samples=1000,
        notes=["a note for the reader"],
    )


# ----------------------------------------------------------------------------- formatting


@pytest.mark.parametrize(
    "value, text",
    [(0, "0"), (512, "512"), (1_234_567, "1.23 M"), (45_600, "45.6 k"), (3e9, "3.00 G")],
)
def test_format_count(value, text):
    assert format_count(value) == text


def test_formatters():
    assert format_macs(45_600_000) == "45.6 MMACs"
    assert format_macs(192) == "192 MACs"
    assert format_bytes(1_200_000) == "1.20 MB"
    assert format_bytes(None) == "—"
    assert format_ms(12.34) == "12.3 ms"
    assert format_ms(0.0456) == "45.6 µs"
    assert format_ms(2500) == "2.50 s"
    assert format_ratio(0.4812) == "0.481×"
    assert format_ratio(float("nan")) == "—"
    assert format_percent(0.91234) == "91.23 %"
    assert format_points(-0.012) == "-1.20 pt"
    assert format_shape((64, 3, 3, 3)) == "64×3×3×3"
    assert format_shape(()) == "scalar"


# ----------------------------------------------------------------------------- tables


def test_evaluation_table_side_by_side():
    text = render(evaluation_table(sample_report()))
    assert "vgg_svd vs vgg" in text
    for header in ("metric", "reference", "compressed", "ratio / delta"):
        assert header in text
    lines = {row_label(line): line for line in text.splitlines()}
    assert "91.32 %" in lines["accuracy"] and "90.12 %" in lines["accuracy"]
    assert "-1.20 pt" in lines["accuracy"]
    assert "97.50 %" in lines["top-1 agreement"]
    assert "0.812" in lines["max |logit diff|"]
    assert "1.23e-03" in lines["mean |logit diff|"]
    assert "1.00 ms" in lines["latency p50, batch 1"] and "500 µs" in lines["latency p50, batch 1"]
    assert "2.00× faster" in lines["latency p50, batch 1"]
    assert "2.50× faster" in lines["latency p50, batch 64"]
    assert "33.0 ms" in lines["latency p95, batch 64"]
    assert "4.00 M" in lines["params"] and "1.23 M" in lines["params"]
    assert "0.309×" in lines["params"]
    assert "150 MMACs" in lines["MACs / sample"] and "45.6 MMACs" in lines["MACs / sample"]
    assert "16.0 MB" in lines["file size"] and "1.20 MB" in lines["file size"]
    assert "0.0750×" in lines["file size"]
    assert "1000 samples of fashion_mnist_eval" in text and "Test CPU 9000 (8 cores)" in text
    assert "note: a note for the reader" in text


def test_evaluation_table_without_reference():
    text = render(evaluation_table(sample_report(with_reference=False)))
    header = next(line for line in text.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "value"]
    assert "agreement" not in text
    assert "90.12 %" in text and "45.6 MMACs" in text and "500 µs" in text


def test_slower_candidate_says_slower():
    report = sample_report()
    report.comparison.speedup = {1: 0.5, 64: 2.5}
    assert "2.00× slower" in render(evaluation_table(report))


def test_layer_table_shows_changes_and_skip_reasons():
    records = [
        LayerRecord(
            "conv1",
            "Conv",
            shape_before=(64, 3, 3, 3),
            shape_after=(16, 3, 3, 3),
            macs_before=1_000_000,
            macs_after=400_000,
            params_before=1728,
            params_after=700,
            error=0.0123,
            error_basis="activations",
            detail="rank 16",
        ),
        LayerRecord(
            "fc",
            "Gemm",
            shape_before=(10, 512),
            macs_before=5120,
            params_before=5130,
            skipped="weight is not a constant",
        ),
    ]
    table = layer_table(records)
    text = render(table)
    assert "64×3×3×3 → 16×3×3×3" in text
    assert "1.00 M → 400 k" in text and "1.73 k → 700" in text
    header = next(line for line in text.splitlines() if line.startswith("layer "))
    assert "(activations)" in header  # the one basis goes in the header
    assert "0.0123" in text and "rank 16" in text
    assert "skipped: weight is not a constant" in text
    assert "1 changed, 1 skipped" in text
    assert "1.01 M → 405 k" in text  # totals keep the skipped layer's cost
    assert table.rows[1].style == "dim" and table.rows[0].style is None

    mixed = records + [LayerRecord("fc2", "Gemm", error=0.5, error_basis="weights")]
    text = render(layer_table(mixed))
    assert "0.0123 (activations)" in text and "0.500 (weights)" in text


def _small_cnn() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w"], ["y"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        initializer=[
            numpy_helper.from_array(rng.standard_normal((2, 1, 3, 3)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.standard_normal((10, 32)).astype(np.float32), "fc_w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def test_profile_table_has_layers_shares_and_totals():
    profile = profile_model(_small_cnn(), file_bytes=2048)
    text = render(profile_table(profile))
    conv_macs, fc_macs = 2 * 16 * 9, 32 * 10  # 288 and 320 of 608
    rows = {row_label(line): line.split() for line in text.splitlines()}
    # per-sample shapes: the batch dimension is left out
    assert rows["conv"] == [
        "conv",
        "Conv",
        "1×4×4",
        "2×4×4",
        "2×1×3×3",
        "18",
        str(conv_macs),
        "47.4",
        "%",
    ]
    assert rows["fc"] == ["fc", "Gemm", "32", "10", "10×32", "320", str(fc_macs), "52.6", "%"]
    assert rows["relu"] == ["relu", "Relu", "2×4×4", "2×4×4"]
    assert rows["total"] == ["total", "1×4×4", "338", "608", "100", "%"]
    assert "338 params, 608 MACs per sample; 4 nodes" in text
    assert "Conv 1, Flatten 1, Gemm 1, Relu 1" in text
    assert "file size 2.05 kB" in text
    assert "relu" not in render(profile_table(profile, only_costly=True))


def test_summary_table_compares_requested_and_reached_ratio():
    @dataclass
    class Totals:
        params: int
        macs: int
        file_bytes: int | None

    before, after = Totals(4_000_000, 150_000_000, 16_000_000), Totals(2_000_000, 72_000_000, None)
    text = render(
        summary_table(
            before,
            after,
            requested_ratio=0.5,
            ratio_of="macs",
            output_error=0.031,
            agreement=0.97,
            samples=512,
        )
    )
    assert "4.00 M" in text and "2.00 M" in text and "0.500×" in text
    assert "150 MMACs" in text and "72.0 MMACs" in text and "0.480×" in text
    assert "requested 0.500×" in text and "reached 0.480×" in text and "met" in text
    assert "0.0310" in text and "97.00 %" in text and "512 calibration samples" in text
    missed = render(summary_table(before, after, requested_ratio=0.3, ratio_of="params"))
    assert "params ratio" in missed and "not met" in missed
    with pytest.raises(ValueError, match="ratio_of"):
        summary_table(before, after, ratio_of="flops")


def test_summary_table_takes_profiles():
    profile = profile_model(_small_cnn(), file_bytes=2048)
    text = render(summary_table(profile, profile))
    assert "608 MACs" in text and "1.00×" in text and "2.05 kB" in text


# ----------------------------------------------------------------------------- JSON


def test_to_json_handles_dataclasses_numpy_and_non_finite():
    @dataclass
    class Point:
        value: np.float32
        count: np.int64
        array: np.ndarray
        path: Path
        by_batch: dict

    point = Point(
        np.float32(0.5), np.int64(3), np.arange(3), Path("a/b.onnx"), {np.int64(1): math.nan}
    )
    loaded = json.loads(to_json(point))
    assert loaded == {
        "value": 0.5,
        "count": 3,
        "array": [0, 1, 2],
        "path": "a/b.onnx",
        "by_batch": {"1": None},
    }
    assert jsonable(float("inf")) is None


def test_report_json_round_trip():
    report = sample_report()
    assert EvaluationReport.from_dict(json.loads(to_json(report))) == report
    assert EvaluationReport.from_dict(report.to_dict()) == report


# ----------------------------------------------------------------------------- plots


@pytest.fixture
def plots():
    pytest.importorskip("matplotlib")
    from compressor import plots

    return plots


def test_plot_tradeoff_writes_png(tmp_path, plots):
    points = [
        {"method": "svd", "macs_ratio": 0.5, "accuracy": 0.90},
        {"method": "svd", "macs_ratio": 0.25, "accuracy": 0.85},
        {"method": "prune", "macs_ratio": 0.5, "accuracy": 0.88},
        {"method": "original", "macs_ratio": 1.0, "accuracy": 0.91},
        {"method": "prune", "macs_ratio": 0.3, "accuracy": None},  # not measured: skipped
    ]
    path = plots.plot_tradeoff(points, tmp_path / "tradeoff.png", title="vgg")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["tradeoff.png"]


def test_plot_tradeoff_from_reports(tmp_path, plots):
    points = plots.tradeoff_points([("svd", sample_report())])
    assert {p["method"] for p in points} == {"svd", "original"}
    assert plots.plot_tradeoff(points, tmp_path / "t.png", reference=0.91).exists()


def test_plot_latency_writes_png(tmp_path, plots):
    report = sample_report()
    latencies = {"vgg": report.reference.latency, "svd": report.candidate.latency, "x": {1: 0.7}}
    path = plots.plot_latency(latencies, tmp_path / "sub" / "latency.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert plots.plot_latency({}, tmp_path / "empty.png").exists()


def test_plot_summary_without_reference(tmp_path, plots):
    path = plots.plot_summary(sample_report(with_reference=False), tmp_path / "s.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_failed_save_leaves_no_temp_file(tmp_path, plots, monkeypatch):
    from matplotlib.figure import Figure

    def fail(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        plots.plot_latency({"a": {1: 1.0}}, tmp_path / "l.png")
    assert list(tmp_path.iterdir()) == []
