"""bench/encoders.py: the MiniLM-shaped encoder has all-MiniLM-L6-v2's parameter count and
layout, its token batches look as a tokenizer pads them, and its ONNX export (dynamic batch,
int64 inputs) computes what torch computes, padding masked out."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from compressor import runtime

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import encoders  # noqa: E402


@pytest.fixture(scope="module")
def model() -> encoders.MiniLMEncoder:
    return encoders.build(seed=0)


def test_parameter_count_is_the_published_models_without_its_pooler(model):
    assert encoders.parameter_count(model) == encoders.PUBLISHED_PARAMETERS == 22_565_376
    assert len(model.layers) == 6
    layer = model.layers[0]
    assert layer.attention.query.weight.shape == (384, 384)
    assert layer.intermediate.weight.shape == (1536, 384)
    assert layer.attention.heads * layer.attention.head_dim == 384


def test_same_seed_same_weights():
    a, b = encoders.build(seed=3), encoders.build(seed=3)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    assert not torch.equal(a.layers[0].attention.query.weight,
                           encoders.build(seed=4).layers[0].attention.query.weight)


def test_tokens_are_cls_words_sep_then_padding():
    arrays = encoders.tokens(50, seed=1)
    assert list(arrays) == list(encoders.INPUT_NAMES)
    ids, mask = arrays["input_ids"], arrays["attention_mask"]
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape == (50, 128)
    lengths = mask.sum(1)
    assert lengths.min() >= 8 and lengths.max() <= 128 and len(set(lengths)) > 10
    for row, n in zip(ids, lengths, strict=True):
        assert row[0] == encoders.CLS_ID and row[n - 1] == encoders.SEP_ID
        assert np.all(row[1:n - 1] >= encoders.FIRST_WORD_ID)
        assert np.all(row[1:n - 1] < encoders.VOCABULARY)
        assert np.all(row[n:] == encoders.PAD_ID)
    assert np.all(mask == (np.arange(128) < lengths[:, None]))
    np.testing.assert_array_equal(encoders.tokens(50, seed=1)["input_ids"], ids)
    with pytest.raises(ValueError, match="at least one sample"):
        encoders.tokens(0)


def test_padding_does_not_change_the_embedding(model):
    """Mean pooling over the mask and the additive mask bias: tokens after the mask (any ids)
    leave the embedding alone."""
    arrays = encoders.tokens(2, seed=5)
    ids, mask = (torch.from_numpy(a) for a in arrays.values())
    other = ids.clone()
    other[mask == 0] = 2000
    with torch.no_grad():
        np.testing.assert_allclose(model(other, mask).numpy(), model(ids, mask).numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_export_runs_in_onnxruntime_like_torch_at_any_batch(model, tmp_path):
    path = encoders.export(tmp_path / "minilm.onnx", seed=0)
    proto = onnx.load(str(path))
    assert proto.ir_version <= 10
    inputs = {i.name: i for i in proto.graph.input}
    assert list(inputs) == list(encoders.INPUT_NAMES)
    for value in inputs.values():
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[1].dim_value == 128
    # the export reads the hidden states' shape at run time for the head reshapes
    assert sum(n.op_type == "Shape" for n in proto.graph.node) >= 6
    session = runtime.session(str(path))
    for n in (1, 3):
        arrays = encoders.tokens(n, seed=10 + n)
        with torch.no_grad():
            expected = model(*(torch.from_numpy(a) for a in arrays.values())).numpy()
        got = session.run(None, arrays)[0]
        assert got.shape == (n, 384)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
