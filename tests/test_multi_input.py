"""Models with several inputs and integer inputs, end to end: a small nn.TransformerEncoder
sentence encoder (int64 token ids and attention mask) exported by both torch exporters, and a
CNN with two float images. compress calibrates and verifies on every input, evaluate judges
embeddings by cosine similarity against torch, inspect lists every input; errors name the
input, the file and what the model expects."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from compressor import io, runtime
from compressor.cli import main
from compressor.data import load_data
from compressor.errors import DataError, ModelLoadError, OptionError
from compressor.evaluate import cosine_similarities, evaluate
from compressor.passes.calibrate import Calibration
from compressor.pipeline import CompressOptions, compress
from compressor.report import evaluation_table

VOCAB, HIDDEN, HEADS, LAYERS, SEQ = 50, 32, 4, 2, 16
SAMPLES = 32
FAST = {"latency_runs": 2, "batch_sizes": (1,), "progress": False}


class SentenceEncoder(nn.Module):
    """Token embedding + positions -> 2 encoder layers with a key padding mask -> the
    mask-weighted mean over tokens (N, hidden), or the hidden states (N, seq, hidden)."""

    def __init__(self, pooled: bool = True):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.positions = nn.Parameter(torch.randn(1, SEQ, HIDDEN) * 0.1)
        layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, dim_feedforward=64, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.pooled = pooled

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embed(input_ids) + self.positions,
                              src_key_padding_mask=attention_mask == 0)
        if not self.pooled:
            return hidden
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class TwoImageNet(nn.Module):
    """A grey image and a colour image, each through its own conv, joined for 10 logits."""

    def __init__(self):
        super().__init__()
        self.grey = nn.Conv2d(1, 8, 3, padding=1)
        self.colour = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, grey: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([torch.relu(self.grey(grey)), torch.relu(self.colour(colour))], 1)
        return self.fc(joined.flatten(1))


def token_batch(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and a padding mask: every third sample is padded after 10 tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (n, SEQ))
    mask = np.ones((n, SEQ), np.int64)
    mask[::3, 10:] = 0
    return ids, mask


def torch_outputs(module: nn.Module, *arrays: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(*(torch.from_numpy(a) for a in arrays)).numpy()


def onnx_outputs(path_or_proto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    proto = onnx.load(path_or_proto) if not isinstance(path_or_proto, onnx.ModelProto) else (
        path_or_proto
    )
    return runtime.session(proto).run(None, feeds)[0]


def export(module: nn.Module, path, dynamo: bool, *, dynamic_seq: bool = False) -> None:
    ids, mask = (torch.from_numpy(a) for a in token_batch(2, 0))
    names = ["input_ids", "attention_mask"]
    if dynamo:
        batch = torch.export.Dim("batch", min=1)
        kwargs = {"dynamic_shapes": ({0: batch}, {0: batch})}
    else:
        axes = {0: "batch", 1: "seq"} if dynamic_seq else {0: "batch"}
        kwargs = {"dynamic_axes": {name: axes for name in names}}
    torch.onnx.export(module, (ids, mask), str(path), dynamo=dynamo, input_names=names,
                      opset_version=18, **kwargs)


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    torch.manual_seed(0)
    return SentenceEncoder().eval()


@pytest.fixture(scope="module")
def hidden_encoder(encoder) -> SentenceEncoder:
    module = SentenceEncoder(pooled=False).eval()
    module.load_state_dict(encoder.state_dict())
    return module


@pytest.fixture(scope="module")
def files(tmp_path_factory, encoder, hidden_encoder):
    folder = tmp_path_factory.mktemp("multi")
    paths = {
        "legacy": folder / "legacy.onnx",
        "dynamo": folder / "dynamo.onnx",
        "hidden": folder / "hidden.onnx",
        "dynamic-seq": folder / "dynamic_seq.onnx",
    }
    export(encoder, paths["legacy"], dynamo=False)
    export(encoder, paths["dynamo"], dynamo=True)
    export(hidden_encoder, paths["hidden"], dynamo=False)
    export(encoder, paths["dynamic-seq"], dynamo=False, dynamic_seq=True)
    ids, mask = token_batch(SAMPLES, 1)
    paths["calib"] = folder / "calib.npz"
    np.savez(paths["calib"], input_ids=ids, attention_mask=mask)
    return paths


def test_both_exports_load_with_both_inputs_typed(files, encoder):
    ids, mask = token_batch(5, 2)
    expected = torch_outputs(encoder, ids, mask)
    for exporter in ("legacy", "dynamo"):
        loaded = io.load_model(files[exporter])
        assert [(s.name, s.dtype, s.shape) for s in loaded.inputs] == [
            ("input_ids", np.dtype(np.int64), (SEQ,)),
            ("attention_mask", np.dtype(np.int64), (SEQ,)),
        ]
        got = onnx_outputs(loaded.proto, {"input_ids": ids, "attention_mask": mask})
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_compress_calibrates_on_both_inputs_and_verifies(exporter, files, encoder, tmp_path,
                                                         monkeypatch):
    seen: list[dict[str, tuple]] = []
    feed_of = Calibration._feed  # the one place calibration sessions get their feeds

    def spy(self, *args, **kwargs):
        feed = feed_of(self, *args, **kwargs)
        seen.append({name: (a.dtype, a.shape[1:]) for name, a in feed.items()})
        return feed

    monkeypatch.setattr(Calibration, "_feed", spy)
    out = tmp_path / "svd.onnx"
    result = compress(CompressOptions(model=files[exporter], output=out, method="svd", ratio=0.5,
                                      rank_multiple=1, data=str(files["calib"])))
    # every calibration batch fed both inputs as int64 (never cast to float)
    assert seen and all(
        batch == {"input_ids": (np.dtype(np.int64), (SEQ,)),
                  "attention_mask": (np.dtype(np.int64), (SEQ,))}
        for batch in seen
    )
    assert result.ratio_reached <= 0.5 * 1.01
    changed = [layer for layer in result.layers if layer.skipped is None]
    assert changed and all(layer.op in ("MatMul", "Gemm") for layer in changed)
    # the verification's cosine is the compressed model's against torch, on the same inputs
    data = np.load(files["calib"])
    ids, mask = data["input_ids"], data["attention_mask"]
    compressed = onnx_outputs(str(out), {"input_ids": ids, "attention_mask": mask})
    cosine = cosine_similarities(compressed, torch_outputs(encoder, ids, mask))
    v = result.verification
    assert v.inputs == "calibration" and v.samples == SAMPLES
    assert v.cosine_mean == pytest.approx(cosine.mean(), abs=1e-5)
    assert v.cosine_min == pytest.approx(cosine.min(), abs=1e-5)
    assert 0.5 < v.cosine_min < v.cosine_mean < 1.0 - 1e-4  # half the MACs: close, not exact


def test_full_rank_is_exact_against_torch(files, encoder, tmp_path):
    out = tmp_path / "full.onnx"
    result = compress(CompressOptions(model=files["legacy"], output=out, method="svd", ratio=1.0,
                                      rank_multiple=1, data=str(files["calib"])))
    ids, mask = token_batch(7, 3)
    got = onnx_outputs(str(out), {"input_ids": ids, "attention_mask": mask})
    np.testing.assert_allclose(got, torch_outputs(encoder, ids, mask), atol=1e-5, rtol=1e-4)
    assert result.verification.cosine_min > 1 - 1e-9


def test_compress_without_data_uses_stand_ins_within_the_vocabulary(files, tmp_path):
    result = compress(CompressOptions(model=files["legacy"], output=tmp_path / "o.onnx",
                                      method="svd", ratio=0.5, rank_multiple=1))
    assert result.verification.inputs == "random" and result.verification.samples == 64
    assert np.isfinite(result.verification.cosine_mean)


def test_evaluate_judges_hidden_states_by_cosine(files, hidden_encoder, tmp_path):
    out = tmp_path / "hidden_svd.onnx"
    compress(CompressOptions(model=files["hidden"], output=out, method="svd", ratio=0.5,
                             rank_multiple=1, data=str(files["calib"])))
    data = load_data(files["calib"])
    report = evaluate(out, reference=files["hidden"], data=data, **FAST)
    comp = report.comparison
    assert comp.output_kind == "features" and comp.agreement is None  # (N, seq, hidden)
    ids, mask = data.inputs["input_ids"], data.inputs["attention_mask"]
    compressed = onnx_outputs(str(out), {"input_ids": ids, "attention_mask": mask})
    expected = cosine_similarities(compressed, torch_outputs(hidden_encoder, ids, mask))
    assert comp.cosine_mean == pytest.approx(expected.mean(), abs=1e-5)
    assert comp.cosine_min == pytest.approx(expected.min(), abs=1e-5)
    assert comp.samples == SAMPLES and report.candidate.macs < report.reference.macs
    assert report.candidate.accuracy is None

    text = _render(evaluation_table(report))
    assert "cosine similarity, mean" in text and "cosine similarity, min" in text
    assert "top-1 agreement" not in text and "max |output diff|" in text
    loaded = json.loads(json.dumps(report.to_dict()))
    assert loaded["comparison"]["cosine_min"] == pytest.approx(comp.cosine_min)
    assert loaded["comparison"]["agreement"] is None


def test_pooled_embedding_is_rank_two_so_agreement_is_reported_too(files):
    report = evaluate(files["legacy"], reference=files["dynamo"], **FAST, random_samples=16)
    comp = report.comparison
    assert comp.output_kind == "logits" and comp.agreement == 1.0
    assert comp.cosine_min > 1 - 1e-9  # the two exports compute the same thing
    assert any("input_ids 0..49" in note and "attention_mask all ones" in note
               for note in report.notes)


def _render(table) -> str:
    from rich.console import Console

    console = Console(width=160, record=True)
    console.print(table)
    return console.export_text()


# ----------------------------------------------------------------------------- the CLI


def invoke(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def test_inspect_lists_every_input(files):
    result = invoke("inspect", files["dynamo"])
    assert result.exit_code == 0, result.output
    assert "inputs: input_ids int64 N×16, attention_mask int64 N×16" in result.output
    profile = json.loads(invoke("inspect", files["legacy"], "--json").output)["profile"]
    assert profile["inputs"] == [
        {"name": "input_ids", "dtype": "int64", "shape": [1, SEQ]},
        {"name": "attention_mask", "dtype": "int64", "shape": [1, SEQ]},
    ]


def test_dynamic_sequence_takes_its_length_from_input_shape(files):
    path = files["dynamic-seq"]
    missing = invoke("inspect", path)
    assert missing.exit_code == 1
    assert "shape of input 'input_ids'" in missing.output
    assert "--input-shape input_ids:DIMS" in missing.output
    result = invoke("inspect", path, "--input-shape", "input_ids:16",
                    "--input-shape", "attention_mask:16", "--json")
    assert result.exit_code == 0, result.output
    profile = json.loads(result.output)["profile"]
    assert [i["shape"] for i in profile["inputs"]] == [[1, SEQ], [1, SEQ]]
    fixed = io.load_model(path, input_shape={"input_ids": (16,), "attention_mask": (16,)})
    dense = io.load_model(files["legacy"])
    assert profile["macs"] == io_macs(fixed.proto) == io_macs(dense.proto) > 0


def io_macs(proto) -> int:
    from compressor.profile import profile_model

    return profile_model(proto).macs


def test_dynamic_sequence_takes_its_length_from_the_data(files, tmp_path):
    result = compress(CompressOptions(model=files["dynamic-seq"], output=tmp_path / "o.onnx",
                                      method="svd", ratio=0.5, rank_multiple=1,
                                      data=str(files["calib"])))
    assert result.before.inputs[0].shape == (1, SEQ)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input-shape", "input_ids:16;attention_mask:16"],
         "--input-shape 'input_ids:16;attention_mask:16': expected DIMS"),
        (["--input-shape", "input_ids:16", "--input-shape", "16"],
         "a shape without a name is for a single-input model"),
        (["--input-shape", "input_ids:sixteen"], "expected DIMS for a single-input model"),
        (["--input-shape", "input_id:16"],
         "--input-shape names input 'input_id', but {model} has inputs: input_ids, "
         "attention_mask"),
        (["--input-shape", "16"], "{model} has 2 inputs (input_ids, attention_mask): name each"),
    ],
)
def test_bad_input_shapes_are_one_clear_line(args, message, files):
    result = invoke("inspect", files["dynamic-seq"], *args)
    assert result.exit_code == 2, result.output
    assert message.format(model=files["dynamic-seq"]) in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_missing_array_wrong_shape_and_dtype_name_the_input_and_file(files, tmp_path):
    def run(**arrays):
        path = tmp_path / "calib.npz"
        np.savez(path, **arrays)
        compress(CompressOptions(model=files["legacy"], output=tmp_path / "o.onnx",
                                 method="svd", data=str(path)))

    ids, mask = token_batch(8, 4)
    with pytest.raises(DataError) as exc:
        run(x=ids, y=np.zeros(8, np.int64))
    assert str(exc.value) == (
        "calib.npz has no array for model input 'input_ids' (arrays: x, y)"
    )
    with pytest.raises(DataError) as exc:
        run(input_ids=ids, attention_mask=mask[:, :12])
    assert str(exc.value) == (
        "calib.npz: input 'attention_mask' has shape (8, 12) but the model expects (N, 16) int64"
    )
    with pytest.raises(DataError) as exc:
        run(input_ids=ids.astype(np.float32), attention_mask=mask)
    assert str(exc.value) == (
        "calib.npz: input 'input_ids' has dtype float32 but the model expects (N, 16) int64"
    )


# ----------------------------------------------------------------------------- two images


@pytest.fixture(scope="module")
def two_images(tmp_path_factory):
    torch.manual_seed(0)
    net = TwoImageNet().eval()
    folder = tmp_path_factory.mktemp("two")
    path = folder / "two.onnx"
    example = (torch.rand(2, 1, 8, 8), torch.rand(2, 3, 8, 8))
    torch.onnx.export(net, example, str(path), dynamo=False, input_names=["grey", "colour"],
                      dynamic_axes={"grey": {0: "batch"}, "colour": {0: "batch"}},
                      opset_version=18)
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (24, 1, 8, 8), dtype=np.uint8)  # pixels: scaled by 1/255
    colour = rng.random((24, 3, 8, 8), dtype=np.float32)
    data = folder / "images.npz"
    np.savez(data, colour=colour, grey=grey, y=rng.integers(0, 10, 24))
    return net, path, data


def test_two_float_inputs_compress_and_evaluate(two_images, tmp_path):
    net, path, data = two_images
    out = tmp_path / "two_svd.onnx"
    result = compress(CompressOptions(model=path, output=out, method="svd", ratio=0.6,
                                      rank_multiple=1, data=str(data)))
    assert not any("without scaling" in note for note in result.notes)  # uint8: pixels
    assert result.ratio_reached <= 0.6 * 1.01
    stored = np.load(data)
    grey, colour = stored["grey"].astype(np.float32) / 255, stored["colour"]
    expected = torch_outputs(net, grey, colour)
    np.testing.assert_allclose(
        onnx_outputs(str(path), {"grey": grey, "colour": colour}), expected, atol=1e-5
    )
    report = evaluate(out, reference=path, data=load_data(data), **FAST)
    compressed = onnx_outputs(str(out), {"grey": grey, "colour": colour})
    assert report.comparison.output_kind == "logits"
    assert report.comparison.agreement == pytest.approx(
        np.mean(compressed.argmax(1) == expected.argmax(1))
    )
    assert report.candidate.accuracy == pytest.approx(np.mean(compressed.argmax(1) == stored["y"]))


def test_integer_pixels_for_a_float_input_are_fed_unscaled_with_a_note(two_images, tmp_path):
    _, path, _ = two_images
    rng = np.random.default_rng(1)
    data = tmp_path / "ints.npz"
    grey = rng.integers(0, 256, (8, 1, 8, 8)).astype(np.int32)
    grey.flat[:2] = 0, 255
    np.savez(data, grey=grey, colour=rng.random((8, 3, 8, 8), dtype=np.float32))
    result = compress(CompressOptions(model=path, output=tmp_path / "o.onnx", method="svd",
                                      ratio=0.6, rank_multiple=1, data=str(data)))
    notes = [n for n in result.notes if "without scaling" in n]
    assert len(notes) == 1
    assert "array 'grey' is int32 (values 0..255)" in notes[0]
    assert "model input 'grey' is float32" in notes[0]


def test_torchscript_with_two_inputs_takes_types_and_shapes_from_the_data(two_images, tmp_path):
    net, _, data = two_images
    scripted = tmp_path / "two.pt"
    torch.jit.save(torch.jit.script(net), scripted)
    with pytest.raises(ModelLoadError, match="shape of input 'grey'.*--input-shape grey:DIMS"):
        io.load_model(scripted)
    stored = dict(np.load(data))
    loaded = io.load_model(scripted, sample_inputs=stored)
    assert [(s.name, s.shape) for s in loaded.inputs] == [("grey", (1, 8, 8)),
                                                           ("colour", (3, 8, 8))]
    by_shape = io.load_model(scripted, input_shape={"grey": (1, 8, 8), "colour": (3, 8, 8)})
    grey = np.random.default_rng(2).random((3, 1, 8, 8), dtype=np.float32)
    colour = np.random.default_rng(3).random((3, 3, 8, 8), dtype=np.float32)
    for model in (loaded, by_shape):
        np.testing.assert_allclose(onnx_outputs(model.proto, {"grey": grey, "colour": colour}),
                                   torch_outputs(net, grey, colour), atol=1e-5)
    with pytest.raises(OptionError, match="names input 'gray', but .* has inputs: grey, colour"):
        io.load_model(scripted, input_shape={"gray": (1, 8, 8)})


@pytest.mark.slow
def test_torch_export_program_of_the_encoder(encoder, tmp_path):
    ids, mask = (torch.from_numpy(a) for a in token_batch(2, 0))
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(encoder, (ids, mask), dynamic_shapes=({0: batch}, {0: batch}))
    path = tmp_path / "encoder.pt2"
    torch.export.save(program, path)
    loaded = io.load_model(path)  # int64 examples from the program's own inputs
    assert [(s.name, s.dtype) for s in loaded.inputs] == [("input_ids", np.dtype(np.int64)),
                                                          ("attention_mask", np.dtype(np.int64))]
    ids5, mask5 = token_batch(5, 5)
    np.testing.assert_allclose(
        onnx_outputs(loaded.proto, {"input_ids": ids5, "attention_mask": mask5}),
        torch_outputs(encoder, ids5, mask5), atol=1e-5, rtol=1e-4,
    )
