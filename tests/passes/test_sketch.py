import numpy as np
import onnx
import pytest

from compressor.errors import OptionError
from compressor.passes.calibrate import Calibration
from compressor.passes.sketch import SketchConfig, TensorSketchPass, sign_matrices


def _init(proto, name):
    return onnx.numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == name))


def test_data_free_sketch_matches_numpy_reference(mlp, rng, built):
    """Outputs equal x @ W'^T + b with W' = (1/s) sum_i R_i R_i^T W from the same seeded signs."""
    cfg = SketchConfig(sketches=3, rows=4, seed=7)
    result = TensorSketchPass(cfg)(mlp.ir())
    x = rng.standard_normal((5, 16)).astype(np.float32)
    w1, b1, w2, b2 = (_init(mlp.proto, n).astype(np.float64) for n in ("w1", "b1", "w2", "b2"))

    def sketched(w, seed):
        signs = sign_matrices(w.shape[0], 4, 3, seed)
        return sum(r @ r.T @ w for r in signs) / 3

    layers = [r.name for r in result.layers]
    order = {name: i for i, name in enumerate(layers)}
    w1s = sketched(w1, 7 + order["fc1"]) if result.layers[order["fc1"]].changed else w1
    w2s = sketched(w2, 7 + order["fc2"]) if result.layers[order["fc2"]].changed else w2
    h = np.maximum(x @ w1s.T + b1, 0)
    np.testing.assert_allclose(built.run(result.model, x), h @ w2s.T + b2, rtol=1e-4, atol=1e-4)


def test_sign_matrices_are_unbiased():
    """E[R R^T] = I: the average over many draws approaches the identity."""
    acc = np.zeros((6, 6))
    draws = 2000
    for seed in range(draws):
        r = sign_matrices(6, 3, 1, seed)[0]
        acc += r @ r.T
    np.testing.assert_allclose(acc / draws, np.eye(6), atol=0.08)
    assert set(np.unique(np.abs(sign_matrices(5, 4, 2, 0)))) == {0.5}


def test_refit_lowers_output_error(convnet, rng, built):
    x = rng.random((128, 3, 12, 12), dtype=np.float32)
    y_ref = built.run(convnet.proto, x)
    errors = {}
    for refit in (False, True):
        result = TensorSketchPass(SketchConfig(ratio=0.5, refit=refit), Calibration(x))(convnet.ir())
        y = built.run(result.model, x)
        errors[refit] = np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref)
        assert result.stats["ratio_reached"] <= 0.5 + 1e-9
        assert result.stats["data_aware"] is refit
    assert errors[True] < 0.5 * errors[False]


def test_layers_report_sketch_shape_and_skip_reasons(convnet):
    result = TensorSketchPass(SketchConfig(ratio=0.5, sketches=2))(convnet.ir())
    rec = {r.name: r for r in result.layers}
    assert "depthwise" in rec["dw"].skipped
    changed = result.changed
    assert changed, "some layer must be sketched at ratio 0.5"
    for r in changed:
        assert r.shape_after[0] % 2 == 0 and r.macs_after < r.macs_before
        assert r.detail.startswith("2 sketches x ")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"ratio": -1}, "--ratio"), ({"sketches": 0}, "--sketches"), ({"rows": 0}, "--sketch-rows")],
)
def test_config_errors(kwargs, message):
    with pytest.raises(OptionError, match=message):
        SketchConfig(**kwargs)
