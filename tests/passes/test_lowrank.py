"""lowrank's ReferenceRows: the survey's rows kept for the refits, and refits read from them
equal to refits that walk the original model."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from compressor import io
from compressor.models import zoo
from compressor.passes.calibrate import Calibration
from compressor.passes.cleanup import CleanupPass
from compressor.passes.lowrank import ReferenceRows, gather_cross_moments, survey
from compressor.passes.walk import CalibrationWalk


class _Layer:
    def __init__(self, name: str, weight: np.ndarray):
        self.name, self.weight = name, weight
        self.outputs, self.fan_in = weight.shape


def test_rows_come_back_as_outputs_when_narrower_else_as_inputs():
    rng = np.random.default_rng(0)
    narrow, wide = _Layer("narrow", rng.standard_normal((3, 8))), _Layer(
        "wide", rng.standard_normal((12, 8)))
    rows = rng.standard_normal((5 * 4, 8)).astype(np.float32)  # 5 samples, 4 rows each
    with ReferenceRows() as kept:
        for layer in (narrow, wide):
            kept.add(layer, 0, rows[:8], 2)
            kept.add(layer, 2, rows[8:], 3)
        kept.sealed()
        assert kept.outputs("narrow") and not kept.outputs("wide") and "other" not in kept
        np.testing.assert_allclose(kept.read("narrow", 1, 4), rows[4:16] @ narrow.weight.T,
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(kept.read("wide", 0, 5), rows)
        with pytest.raises(ValueError, match="hold 5 samples, not 6"):
            kept.read("wide", 4, 6)
        with pytest.raises(ValueError, match="in sample order"):
            kept.add(wide, 7, rows[:4], 1)
        kept.discard("wide")  # rows that cannot be paired by sample: none kept, ever
        kept.add(wide, 5, rows[:4], 1)
        assert "wide" not in kept and "narrow" in kept
        folder = kept._folder
        assert folder.exists() and len(list(folder.iterdir())) == 1
    assert not folder.exists()


@pytest.mark.parametrize("arch", ["resnet20", "lenet5"])
def test_refit_moments_from_kept_rows_equal_a_walk_of_the_original(arch):
    """Every layer's paired moments, the reference side read from the survey's rows or from
    a walk of the original model, agree (the current model is the original here)."""
    entry = zoo.get(arch)
    model = CleanupPass()(ir.serde.deserialize_model(
        io.load_model(entry.checkpoint, arch=arch).proto)).model
    x = np.random.default_rng(1).standard_normal((9, *entry.input_shape)).astype(np.float32)
    calibration = Calibration(x, batch_size=4)
    found = survey(model, calibration, max_rows_per_batch=2000, keep_reference_rows=True)
    with found.reference_rows as kept:
        assert all(layer.name in kept for layer in found.layers)
        for layer in found.layers:
            with CalibrationWalk(calibration, found.proto) as walk:
                walked = gather_cross_moments(walk, model, layer, 2000)
            with CalibrationWalk(calibration, found.proto) as walk:
                read = gather_cross_moments(walk, model, layer, 2000, reference_rows=kept)
            assert read.count == walked.count > 0
            for got, want in zip(read.output_statistics(layer.weight),
                                 walked.output_statistics(layer.weight), strict=True):
                scale = max(float(np.abs(want).max()), 1e-6)
                np.testing.assert_allclose(got, want, atol=2e-4 * scale)
            np.testing.assert_allclose(read.covariance_hat, walked.covariance_hat,
                                       atol=2e-4 * float(np.abs(walked.covariance_hat).max()))
