"""compressor.pipeline from Python: the result object, the recipe, and failure safety."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from compressor import io, methods
from compressor.errors import OptionError, PassError, VerificationError
from compressor.methods import Method
from compressor.passes.base import Pass, PassResult
from compressor.pipeline import CompressOptions, compress, read_recipe


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1, stride=2), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(32 * 6 * 6, 10),
    ).eval()
    path = tmp_path_factory.mktemp("m") / "small.onnx"
    io.save_model(io.export_to_onnx(net, (1, 12, 12)), path)
    data = tmp_path_factory.mktemp("d") / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.random((96, 1, 12, 12), dtype=np.float32),
             y=rng.integers(0, 10, 96))
    return path, data


def test_compress_result_and_recipe(small_model, tmp_path):
    model, data = small_model
    out = tmp_path / "out.onnx"
    result = compress(CompressOptions(model=model, output=out, method="svd", ratio=0.6, rank_multiple=4,
                                      data=str(data)))
    assert result.output == out and out.exists()
    assert result.ratio_reached <= 0.6 * 1.01
    assert result.before.macs > result.after.macs
    assert result.verification.samples == 96 and result.verification.inputs == "calibration"
    assert 0 <= result.verification.agreement <= 1
    recipe = read_recipe(onnx.load(out))
    assert recipe["method"] == "svd"
    assert recipe["source"]["format"] == "onnx"
    assert recipe["ratio_reached"] == pytest.approx(result.ratio_reached)
    assert {"compressor", "onnx", "onnxruntime", "torch"} <= set(recipe["versions"])
    assert [layer["name"] for layer in recipe["layers"]] == [r.name for r in result.layers]


def test_verification_reads_the_original_outputs_the_survey_remembered(small_model, tmp_path,
                                                                        monkeypatch):
    """svd's survey ran the original to its outputs on the calibration samples: verification
    compares against those (the same figures as running the original again) and runs only
    the compressed model."""
    from compressor import pipeline

    model, data = small_model
    seen = []
    real_verify = pipeline.verify

    def verify(original, compressed, inputs, provider="cpu", label="calibration",
               reference=None):
        seen.append(reference)
        return real_verify(original, compressed, inputs, provider, label, reference)

    monkeypatch.setattr(pipeline, "verify", verify)
    out = tmp_path / "out.onnx"
    result = compress(CompressOptions(model=model, output=out, method="svd", ratio=0.6,
                                      rank_multiple=4, data=str(data)))
    assert len(seen) == 1 and seen[0] is not None and seen[0].shape == (96, 10)
    x = np.load(data)["x"]
    again = real_verify(onnx.load(model), onnx.load(out), x)
    assert result.verification.agreement == again.agreement
    assert result.verification.relative_error == pytest.approx(again.relative_error,
                                                               rel=1e-5, abs=1e-7)


def test_cleanup_folds_batchnorm_first(tmp_path):
    """The legacy exporter keeps BatchNormalization nodes; the pipeline folds them before the
    method runs, so the output has none and the conv is factorised with the BN inside."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(32 * 8 * 8, 10),
    )
    for module in net:
        if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial statistics
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    net.eval()
    model = tmp_path / "bn.onnx"
    torch.onnx.export(net, (torch.rand(2, 1, 8, 8),), model, dynamo=False,
                      do_constant_folding=False, input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    assert "BatchNormalization" in {n.op_type for n in onnx.load(model).graph.node}
    out = tmp_path / "out.onnx"
    result = compress(CompressOptions(model=model, output=out, method="svd", rank=32,
                                      schemes=("channel",)))
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(out).graph.node}
    assert result.verification.relative_error < 1e-4  # full rank: exact, BN included


class _BreakingPass(Pass):
    name = "breaking"

    def call(self, model):
        # rewire the output to a value of the wrong shape
        graph = model.graph
        first = next(iter(graph))
        graph.outputs[0] = first.outputs[0]
        return PassResult(model, True)


def test_verification_failure_writes_nothing(small_model, tmp_path, monkeypatch):
    model, data = small_model
    monkeypatch.setitem(methods.METHODS, "breaking",
                        Method("breaking", "test", lambda opts, calib: [_BreakingPass()]))
    out = tmp_path / "out.onnx"
    with pytest.raises(VerificationError, match="output shape changed"):
        compress(CompressOptions(model=model, output=out, method="breaking", data=str(data)))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_pass_errors_name_the_pass(small_model, tmp_path, monkeypatch):
    class Failing(Pass):
        name = "failing"

        def call(self, model):
            raise OptionError("cannot do this")

    model, data = small_model
    monkeypatch.setitem(methods.METHODS, "failing",
                        Method("failing", "test", lambda opts, calib: [Failing()]))
    with pytest.raises(PassError, match="failing: cannot do this"):
        compress(CompressOptions(model=model, output=tmp_path / "o.onnx", method="failing"))


def test_unknown_method_and_bad_output():
    with pytest.raises(OptionError, match="--method: unknown method 'nope'"):
        CompressOptions(model="m.onnx", output="o.onnx", method="nope")
    with pytest.raises(OptionError, match="--calib-samples"):
        CompressOptions(model="m.onnx", output="o.onnx", method="svd", calib_samples=0)
