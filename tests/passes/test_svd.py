import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F

from compressor.errors import OptionError
from compressor.passes.calibrate import Calibration
from compressor.passes.svd import LowRankSVDPass, SVDConfig


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}


def test_full_rank_reproduces_the_model(convnet, rng, built):
    x = rng.random((4, 3, 12, 12), dtype=np.float32)
    for scheme in ("channel", "spatial"):
        result = LowRankSVDPass(SVDConfig(rank=10_000, schemes=(scheme,), allow_costlier=True))(
            convnet.ir()
        )
        changed = {r.name for r in result.changed}
        assert {"conv1", "conv2"} <= changed
        np.testing.assert_allclose(built.run(result.model, x), convnet.run(convnet.proto, x),
                                   rtol=1e-4, atol=1e-4)


def test_gemm_rank_r_is_the_truncated_svd(mlp, rng, built):
    """Data-free SVD of a Gemm is the Eckart-Young best rank-r approximation."""
    w1 = onnx.numpy_helper.to_array(next(i for i in mlp.proto.graph.initializer if i.name == "w1"))
    result = LowRankSVDPass(SVDConfig(rank=4, allow_costlier=True))(mlp.ir())
    rec = {r.name: r for r in result.layers}["fc1"]
    assert rec.detail == "channel rank 4"
    u, s, vt = np.linalg.svd(w1.astype(np.float64))
    expected_w = (u[:, :4] * s[:4]) @ vt[:4]
    weights = _weights(result.model)
    project = next(v for k, v in weights.items() if k.startswith("fc1") and "project" in k)
    lift = next(v for k, v in weights.items() if k.startswith("fc1") and "lift" in k)
    np.testing.assert_allclose(lift @ project, expected_w, atol=1e-4)
    assert rec.error == pytest.approx(np.sqrt(np.sum(s[4:] ** 2) / np.sum(s**2)), rel=1e-6)


def test_data_aware_matches_numpy_optimum_and_beats_data_free(mlp, rng, built):
    # correlated inputs: the weight-optimal factorisation is not the output-optimal one
    mix = rng.standard_normal((16, 16)) * np.linspace(0.05, 3, 16)
    x = (rng.standard_normal((512, 16)) @ mix).astype(np.float32)
    y_ref = built.run(mlp.proto, x)
    errors = {}
    for aware in (False, True):
        calib = Calibration(x) if aware else None
        result = LowRankSVDPass(SVDConfig(rank=3, allow_costlier=True), calib)(mlp.ir())
        y = built.run(result.model, x)
        errors[aware] = np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref)
    assert errors[True] < 0.8 * errors[False]

    # the first layer's output error on the data equals numpy's optimum
    w1 = onnx.numpy_helper.to_array(next(i for i in mlp.proto.graph.initializer if i.name == "w1"))
    result = LowRankSVDPass(SVDConfig(rank=3, allow_costlier=True), Calibration(x))(mlp.ir())
    xc = x.astype(np.float64) - x.mean(0)
    cov = xc.T @ xc / len(x)
    evals = np.sort(np.linalg.eigvalsh(w1 @ cov @ w1.T))[::-1]
    predicted = np.sqrt(evals[3:].sum() / evals.sum())
    rec = {r.name: r for r in result.layers}["fc1"]
    assert rec.error == pytest.approx(predicted, rel=1e-3)
    assert rec.error_basis == "calibration"


def test_conv_channel_factorisation_matches_torch(convnet, rng, built):
    """Data-free channel SVD equals the network with each conv weight replaced by its
    Eckart-Young rank-5 approximation (computed by numpy), run in torch."""
    x = rng.random((3, 3, 12, 12), dtype=np.float32)
    result = LowRankSVDPass(SVDConfig(rank=5, schemes=("channel",)))(convnet.ir())
    rec = {r.name: r for r in result.layers}
    assert rec["conv1"].detail == rec["conv2"].detail == rec["fc"].detail == "channel rank 5"
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in convnet.proto.graph.initializer}

    def rank5(w):
        u, s, vt = np.linalg.svd(w.reshape(len(w), -1).astype(np.float64))
        return torch.tensor(((u[:, :5] * s[:5]) @ vt[:5]).reshape(w.shape), dtype=torch.float32)

    t = torch.from_numpy(x)
    a = F.relu(F.conv2d(t, rank5(inits["c1w"]), torch.tensor(inits["c1b"]), padding=1))
    b = F.relu(F.conv2d(a, rank5(inits["c2w"]), torch.tensor(inits["c2b"]), padding=1, stride=2))
    d = F.conv2d(b, torch.tensor(inits["dww"]), padding=1, groups=24)
    y = d.flatten(1) @ rank5(inits["fw"]).T + torch.tensor(inits["fb"])
    np.testing.assert_allclose(built.run(result.model, x), y.numpy(), rtol=1e-4, atol=1e-4)


def test_ratio_is_met_and_reported(convnet, rng):
    x = rng.random((64, 3, 12, 12), dtype=np.float32)
    result = LowRankSVDPass(SVDConfig(ratio=0.6, rank_multiple=1), Calibration(x))(convnet.ir())
    assert result.stats["ratio_reached"] <= 0.6
    assert result.stats["macs_after"] == pytest.approx(
        result.stats["macs_before"] - sum(r.macs_before - r.macs_after for r in result.layers)
    )
    onnx.checker.check_model(ir.serde.serialize_model(result.model))


def test_skips_depthwise_and_unprofitable_layers_with_reasons(convnet):
    result = LowRankSVDPass(SVDConfig(ratio=0.9))(convnet.ir())
    rec = {r.name: r for r in result.layers}
    assert "depthwise conv (group=24)" in rec["dw"].skipped
    # conv1 (3 -> 16 channels, 27 inputs): no rank saves MACs
    assert rec["conv1"].skipped == "factorised form is not cheaper than dense"
    assert "no calibration data" in result.notes[0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 0.0}, r"--ratio must be in \(0, 1\]"),
        ({"ratio": 1.5}, r"--ratio must be in \(0, 1\]"),
        ({"rank": 0}, "--rank must be >= 1"),
        ({"energy": 2.0}, r"--energy must be in \(0, 1\]"),
        ({"schemes": ("diagonal",)}, "SVD schemes must be among"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(OptionError, match=message):
        SVDConfig(**kwargs)


def test_energy_mode_keeps_requested_energy(mlp):
    result = LowRankSVDPass(SVDConfig(energy=0.9, allow_costlier=True))(mlp.ir())
    for rec in result.changed:
        assert rec.error**2 <= 0.1 + 1e-9


def test_repr_shows_config():
    text = repr(LowRankSVDPass(SVDConfig(ratio=0.25)))
    assert text.startswith("LowRankSVDPass(ratio=0.25, rank=None")



def test_sequential_refit_lowers_the_network_error(deep_mlp, rng, built):
    """Asymmetric reconstruction fits each layer to its compressed inputs: on the calibration
    data the final output error is lower than fitting every layer to the original inputs."""
    x = (rng.standard_normal((1024, 24)) * np.linspace(0.1, 2, 24)).astype(np.float32)
    y_ref = built.run(deep_mlp.proto, x)
    errors = {}
    for sequential in (False, True):
        cfg = SVDConfig(ratio=0.45, rank_multiple=1, sequential=sequential)
        result = LowRankSVDPass(cfg, Calibration(x))(deep_mlp.ir())
        refitted = [r.name for r in result.layers if "refit" in r.detail]
        assert bool(refitted) is sequential
        y = built.run(result.model, x)
        errors[sequential] = np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref)
    assert errors[True] < errors[False]


def test_spatial_refit_lowers_the_error(convnet, rng, built):
    """Spatial SVD is data-free; refitting its 1 x k stage on calibration data must help."""
    x = rng.random((96, 3, 12, 12), dtype=np.float32)
    y_ref = built.run(convnet.proto, x)
    errors = {}
    for sequential in (False, True):
        cfg = SVDConfig(rank=8, schemes=("spatial",), rank_multiple=1, sequential=sequential)
        result = LowRankSVDPass(cfg, Calibration(x))(convnet.ir())
        assert any(r.detail.endswith("refit") for r in result.layers) is sequential
        errors[sequential] = np.linalg.norm(built.run(result.model, x) - y_ref) / np.linalg.norm(
            y_ref)
    assert errors[True] < errors[False]


def test_finer_rank_multiples_when_the_ratio_needs_them(convnet, rng):
    x = rng.random((64, 3, 12, 12), dtype=np.float32)
    result = LowRankSVDPass(SVDConfig(ratio=0.6), Calibration(x))(convnet.ir())
    assert result.stats["ratio_reached"] <= 0.6
    assert any("finer than multiples of 16" in note for note in result.notes)
