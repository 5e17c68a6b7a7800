"""The zoo: every model builds, loads its bundled checkpoint and earns its recorded accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compressor.data import load_data
from compressor.errors import ModelLoadError, OptionError
from compressor.models import zoo

ACCURACY = json.loads((zoo.CHECKPOINT_DIR / "accuracy.json").read_text())
EVAL_FILE = zoo.DATA_DIR / "fashion_mnist_eval.npz"


@pytest.fixture(scope="module")
def eval_subset():
    return load_data(EVAL_FILE, input_shape=(1, 28, 28), num_classes=10)


def test_registry_lists_the_five_models():
    assert zoo.names() == ["mlp", "lenet5", "vgg", "resnet20", "mobilenetv2"]
    assert set(ACCURACY) == set(zoo.names())


@pytest.mark.parametrize("name", zoo.names())
def test_model_builds_and_outputs_logits(name):
    entry = zoo.get(name)
    assert entry.name == name and entry.input_shape == (1, 28, 28) and entry.num_classes == 10
    model = entry.build().eval()
    with torch.no_grad():
        out = model(torch.rand(3, *entry.input_shape))
    assert out.shape == (3, entry.num_classes) and out.dtype == torch.float32
    # Normalisation is plain arithmetic on constants: nothing of it in the state dict.
    assert not any(key.startswith("normalize") for key in model.state_dict())


@pytest.mark.parametrize("name", zoo.names())
def test_checkpoint_earns_its_recorded_accuracy(name, eval_subset):
    entry = zoo.get(name)
    state = torch.load(entry.checkpoint, map_location="cpu", weights_only=True)
    assert all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())
    model = zoo.load_pretrained(name)
    assert not model.training
    with torch.inference_mode():
        predictions = np.concatenate(
            [
                model(torch.from_numpy(eval_subset.x[i : i + 500])).argmax(1).numpy()
                for i in range(0, len(eval_subset.x), 500)
            ]
        )
    accuracy = 100 * float((predictions == eval_subset.y).mean())
    record = ACCURACY[name]
    assert abs(accuracy - record["eval_subset_accuracy"]) <= 0.1
    assert record["params"] == sum(p.numel() for p in model.parameters())
    assert record["test_accuracy"] > 85


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(OptionError, match=r"unknown zoo model 'alexnet'.*mlp, lenet5, vgg"):
        zoo.get("alexnet")
    with pytest.raises(OptionError, match="resnet20, mobilenetv2"):
        zoo.load_pretrained("alexnet")


def test_missing_or_corrupt_checkpoint_is_a_model_load_error(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "CHECKPOINT_DIR", tmp_path)
    with pytest.raises(ModelLoadError, match=r"mlp\.pt: no bundled checkpoint for 'mlp'"):
        zoo.load_pretrained("mlp")
    (tmp_path / "mlp.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match=r"mlp\.pt: cannot load checkpoint for 'mlp'"):
        zoo.load_pretrained("mlp")
    torch.save(zoo.get("lenet5").build().state_dict(), tmp_path / "mlp.pt")
    with pytest.raises(ModelLoadError, match="cannot load checkpoint"):
        zoo.load_pretrained("mlp")


def test_bundled_data_files():
    for name, count in (("fashion_mnist_eval.npz", 2000), ("fashion_mnist_calib.npz", 512)):
        with np.load(zoo.DATA_DIR / name) as archive:
            assert archive["x"].shape == (count, 1, 28, 28) and archive["x"].dtype == np.uint8
            assert archive["y"].shape == (count,) and archive["y"].dtype == np.int64
            assert set(np.unique(archive["y"])) == set(range(10))
