"""bench/bench_real_graphs.py: the YOLOv8n-shaped model has ultralytics' layer sizes and
exports with the ops real exports have, the row cache skips finished rows and re-times missing batch
sizes, a failing row is recorded and the rest still run, and the targets are judged from the
rows with their figures."""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from compressor import runtime

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_real_graphs as bench  # noqa: E402


def test_yolo_has_ultralytics_parameter_count():
    assert sum(p.numel() for p in bench.YoloV8n().parameters()) == \
        bench.YOLO_PUBLISHED_PARAMETERS == 3_157_184


def test_yolo_export_has_chunks_upsample_concat_and_runs_like_torch():
    torch.manual_seed(0)
    module = bench.YoloV8n().eval()  # default init: the graph, not the statistics, is tested
    x = torch.from_numpy(bench.smooth_images(2, (3, 64, 64), seed=0))
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x[:1],), buffer, dynamo=False, opset_version=18,
                          input_names=["input"], output_names=["maps"],
                          dynamic_axes={"input": {0: "batch"}, "maps": {0: "batch"}})
        expected = module(x).numpy()
    proto = onnx.load_from_string(buffer.getvalue())
    ops = {n.op_type for n in proto.graph.node}
    # the TorchScript exporter writes chunk(2, 1) as two Slices of bounds computed from the
    # shape at run time (dynamo writes a Split)
    assert {"Slice", "Resize", "Concat", "Shape", "Div", "MaxPool"} <= ops
    got = runtime.session(proto).run(None, {"input": x.numpy()})[0]
    assert got.shape == (2, 144, 8 * 8 + 4 * 4 + 2 * 2)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


def test_smooth_images_are_seeded_pixels():
    a = bench.smooth_images(3, (3, 16, 16), seed=4)
    assert a.dtype == np.float32 and a.shape == (3, 3, 16, 16)
    assert a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a, bench.smooth_images(3, (3, 16, 16), seed=4))


# ------------------------------------------------------------------ cache and failures


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """prepare/compress_row/evaluate_row replaced by recorders: the run loop alone."""
    calls = []

    def prepare(model, facts):
        calls.append(("prepare", model.name))
        return bench.Subject(model, tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "h.npz",
                             {"export_s": 1.0, "notable_ops": {"Split": 2}})

    def compress_row(subj, method, ratio, calib_samples):
        calls.append(("compress", subj.model.name, method, ratio))
        if method == "svd" and ratio == 0.75:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
        return {"output": "build/x.onnx", "compress_s": 2.0}

    def evaluate_row(subj, candidate, batches, latency_time):
        calls.append(("evaluate", subj.model.name, tuple(batches)))
        return {"latency": {str(b): {"speedup": 1.5} for b in batches}}

    monkeypatch.setattr(bench, "prepare", prepare)
    monkeypatch.setattr(bench, "compress_row", compress_row)
    monkeypatch.setattr(bench, "evaluate_row", evaluate_row)
    return calls, tmp_path / "rows.json"


def test_a_failing_row_is_recorded_and_the_others_run(fake):
    calls, cache = fake
    rows, facts = bench.run(["yolo_neck-ts"], ["prune", "svd"], [0.75, 0.5], lambda m: (1,),
                            1.0, 8, redo=False, cache_path=cache)
    assert set(rows) == {"yolo_neck-ts|prune|0.75", "yolo_neck-ts|prune|0.5",
                         "yolo_neck-ts|svd|0.75", "yolo_neck-ts|svd|0.5"}
    failed = rows["yolo_neck-ts|svd|0.75"]
    assert failed["error"] == "compress: RuntimeError: mat1 and mat2 shapes cannot be multiplied"
    assert "latency" not in failed
    assert rows["yolo_neck-ts|svd|0.5"]["latency"] == {"1": {"speedup": 1.5}}
    assert [c[0] for c in calls].count("prepare") == 1
    assert facts == {"yolo_neck-ts": {"export_s": 1.0, "notable_ops": {"Split": 2}}}


def test_rerun_skips_finished_rows_retries_failed_ones_and_times_missing_batches(fake):
    calls, cache = fake
    bench.run(["yolo_neck-ts"], ["prune", "svd"], [0.75], lambda m: (1,), 1.0, 8,
              redo=False, cache_path=cache)
    calls.clear()
    rows, _ = bench.run(["yolo_neck-ts"], ["prune", "svd"], [0.75], lambda m: (1, 16), 1.0, 8,
                        redo=False, cache_path=cache)
    # prune 0.75 finished: re-timed at both sizes, not compressed again; svd 0.75 failed:
    # compressed again (and failed again)
    assert calls == [("prepare", "yolo_neck-ts"), ("evaluate", "yolo_neck-ts", (1, 16)),
                     ("compress", "yolo_neck-ts", "svd", 0.75)]
    assert set(rows["yolo_neck-ts|prune|0.75"]["latency"]) == {"1", "16"}
    calls.clear()
    bench.run(["yolo_neck-ts"], ["prune"], [0.75], lambda m: (1, 16), 1.0, 8, redo=False,
              cache_path=cache)
    assert calls == []


# ------------------------------------------------------------------------------ verdicts


def _row(macs: float, speedup: float, **extra) -> dict:
    return {"macs_ratio": macs, "compress_s": 61.0, "family": "cnn", "output_kind": "logits",
            "agreement": 0.75, "cosine_mean": 0.99, "cosine_min": 0.98,
            "latency": {"1": {"speedup": speedup, "original_ms": 16.0,
                              "compressed_ms": 16.0 / speedup}}, **extra}


def test_verdicts_say_met_or_not_with_the_figures():
    rows = {"efficientnet_lite0-ts|prune|0.5": _row(0.5, 1.64),
            "minilm-ts|svd|0.5": _row(0.5, 1.21, family="encoder")}
    first, second = bench.verdict_lines(rows)[2:]
    assert "**met**: MACs 0.500 (met), batch-1 speedup 1.64x (met; 16.0 -> 9.8 ms)" in first
    assert "agreement 75.0%" in first and "compressed in 61 s" in first
    assert "**NOT met**: MACs 0.500 (met), batch-1 speedup 1.21x (not met" in second
    assert "cos 0.9900 (min 0.9800)" in second


def test_verdicts_for_failed_and_missing_rows():
    rows = {"efficientnet_lite0-ts|prune|0.5": {"error": "compress: RuntimeError: boom"}}
    first, second = bench.verdict_lines(rows)[2:]
    assert first.endswith("**NOT met** (the row failed: compress: RuntimeError: boom).")
    assert second.endswith("**not run**.")
    rows = {"efficientnet_lite0-ts|prune|0.5": _row(0.58, 2.0)}
    assert "**NOT met**: MACs 0.580 (not met)" in bench.verdict_lines(rows)[2]
