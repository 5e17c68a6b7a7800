"""bench/bench_latency.py's verdicts: each of the issue's targets judged right from rows."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_latency  # noqa: E402

from compressor.models import zoo  # noqa: E402


def _row(model, recipe, measured, accuracy, batch=64, target=2.0, predicted=None, ref=0.9):
    row = {"model": model, "family": "zoo", "recipe": recipe, "batch": batch,
           "target": None if recipe in bench_latency.BASELINES else target,
           "measured": measured, "predicted": predicted, "accuracy": accuracy,
           "accuracy_ref": ref, "delta_points": 100 * (accuracy - ref), "commit": "abc",
           "macs_ratio": 0.5, "compress_s": 1.0, "agreement": 0.99}
    row["met"] = None if row["target"] is None else measured >= row["target"]
    return row


def _all_zoo(speed: float, delta: float) -> list[dict]:
    return [_row(m, "prune", speed, 0.9 + delta / 100) for m in zoo.names()]


def test_target_one_met_only_when_every_zoo_model_is_fast_within_one_point():
    lines = bench_latency.verdict_lines(_all_zoo(2.1, -0.5))
    assert "**met**" in lines[2] and "NOT met" not in lines[2]
    # one model 2.1x but 1.5 points down, its other row within 1 point but 1.8x
    rows = _all_zoo(2.1, -0.5)
    rows[0] = _row(rows[0]["model"], "prune", 2.1, 0.885)
    rows.append(_row(rows[0]["model"], "svd", 1.8, 0.899))
    line = bench_latency.verdict_lines(rows)[2]
    assert "**NOT met**" in line and f"{rows[0]['model']} 1.80x (svd @2, -0.10 points) NOT met" in line
    # a zoo model not run at all is not a pass
    line = bench_latency.verdict_lines(_all_zoo(2.1, -0.5)[1:])[2]
    assert "**NOT met**" in line and f"not run: {zoo.names()[0]}" in line


def test_target_two_names_the_slower_rows():
    rows = _all_zoo(2.1, 0.0) + [_row("lenet5", "svd", 0.93, 0.9, batch=1, target=1.5)]
    line = bench_latency.verdict_lines(rows)[3]
    assert "**NOT met**" in line and "1 of 6 compressed rows below 1.00x" in line
    assert "lenet5 svd b1 @1.5 0.93x" in line
    assert "**met**" in bench_latency.verdict_lines(_all_zoo(1.01, 0.0))[3]


def test_target_two_lists_rows_that_wrote_the_original_apart():
    """A recipe that wrote the cleaned original timed at 0.99x is the original's noise, not
    a slower model; a compressed one at 0.99x is slower."""
    fell_back = dict(_row("vgg", "fast-conv", 0.99, 0.9), fell_back_to_original=True)
    line = bench_latency.verdict_lines(_all_zoo(2.1, 0.0) + [fell_back])[3]
    assert "**met**" in line and "0 of 5 compressed rows" in line
    assert "1 rows wrote the cleaned original" in line and "0.99x" in line
    slower = _row("vgg", "fast-conv", 0.99, 0.9)
    assert "**NOT met**" in bench_latency.verdict_lines(_all_zoo(2.1, 0.0) + [slower])[3]


def test_target_three_is_relative_error_of_measured_against_predicted():
    rows = [_row("vgg", "svd", 2.0, 0.9, predicted=2.2),  # -9%: within
            _row("mlp", "svd", 1.0, 0.9, predicted=1.25)]  # -20%: not
    line = bench_latency.verdict_lines(rows)[4]
    assert "**NOT met**" in line and "1 of 2 rows within" in line and "worst -20%" in line
    assert "**met**" in bench_latency.verdict_lines(rows[:1])[4]
    assert "no row has a prediction" in bench_latency.verdict_lines(_all_zoo(2, 0))[4]


def test_target_four_needs_faster_at_equal_or_better_accuracy_than_ort_int8():
    base, base_u8 = bench_latency.BASELINES
    rows = [_row("vgg", base, 3.3, 0.94), _row("vgg", "prune", 3.5, 0.939),
            _row("vgg", "svd", 3.0, 0.95)]
    line = bench_latency.verdict_lines(rows)[5]
    # the faster row is less accurate; the accurate one is slower
    assert "**NOT met**" in line and "ours 3.00x at 95.00% (svd @2) NOT met" in line
    rows.append(_row("vgg", "prune+svd", 3.4, 0.94))
    line = bench_latency.verdict_lines(rows)[5]
    assert "**met**" in line and "ours 3.40x at 94.00%" in line
    # a baseline at a batch where none of ours ran is not compared
    rows.append(_row("vgg", base, 2.0, 0.94, batch=1))
    assert "b1" not in bench_latency.verdict_lines(rows)[5]
    # every baseline must be beaten: a faster uint8 one is not
    rows.append(_row("vgg", base_u8, 3.6, 0.94))
    line = bench_latency.verdict_lines(rows)[5]
    assert "**NOT met**" in line and f"{base_u8} 3.60x at 94.00%, ours 3.40x" in line


def test_failed_rows_are_shown_and_left_out_of_the_verdicts():
    rows = _all_zoo(2.1, 0.0) + [{"model": "vgg", "family": "zoo", "recipe": "svd",
                                  "batch": 1, "target": 3.0, "commit": "abc",
                                  "error": "PassError: boom"}]
    text = bench_latency.markdown(rows)
    assert "failed: PassError: boom" in text and "1 rows failed" in text
    assert "0 of 5 compressed rows below 1.00x" in text
