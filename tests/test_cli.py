"""The command line end to end: every zoo model through compress, evaluate and inspect, and
the error paths a user meets, checked by message and exit code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from compressor import io, runtime
from compressor.cli import compress_command, main
from compressor.models import zoo
from compressor.pipeline import read_recipe

ROOT = Path(__file__).resolve().parent.parent
CALIB = ROOT / "models" / "data" / "fashion_mnist_calib.npz"
EVAL = ROOT / "models" / "data" / "fashion_mnist_eval.npz"


def invoke(*args, command=main):
    result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)
    return result


# The small nets run by default; the larger ones (about 4 minutes of the suite) with the slow
# tests (make test-all). Their methods are covered per model in tests/passes too.
FAST_ZOO = ("mlp", "lenet5")
ZOO_PARAMS = [name if name in FAST_ZOO else pytest.param(name, marks=pytest.mark.slow)
              for name in zoo.names()]


@pytest.mark.parametrize("arch", ZOO_PARAMS)
@pytest.mark.parametrize("method", ["svd", "sketch", "prune", "lsh"])
def test_compress_every_zoo_model(arch, method, tmp_path):
    out = tmp_path / f"{arch}.onnx"
    result = invoke(
        "compress",
        zoo.get(arch).checkpoint,
        "--arch",
        arch,
        "--method",
        method,
        "--ratio",
        "0.5",
        "--data",
        CALIB,
        "--calib-samples",
        "64",
        "-o",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["ratio_reached"] <= 0.5 * 1.02
    assert summary["verification"]["samples"] == 64
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version <= 10
    recipe = read_recipe(proto)
    assert recipe["method"] == method and recipe["options"]["ratio"] == 0.5
    assert recipe["source"]["format"] == "state_dict"
    x = np.load(CALIB)["x"][:8].astype(np.float32) / 255
    sess = runtime.session(proto)
    assert sess.run(None, {sess.get_inputs()[0].name: x})[0].shape == (8, 10)


def _conv_widths(proto: onnx.ModelProto) -> list[int]:
    inits = {t.name: t for t in proto.graph.initializer}
    return [inits[n.input[1]].dims[0] for n in proto.graph.node
            if n.op_type == "Conv" and n.input[1] in inits]


@pytest.mark.parametrize("multiple", [1, 8, 16])
def test_prune_keeps_channel_counts_in_multiples(multiple, tmp_path):
    """--channel-multiple (default 8): every pruned conv keeps a multiple of it (onnxruntime's
    blocked kernels), except layers narrower than the multiple, which keep their width."""
    original = _conv_widths(io.load_model(zoo.get("resnet20").checkpoint, arch="resnet20").proto)
    out = tmp_path / "m.onnx"
    args = ["compress", zoo.get("resnet20").checkpoint, "--arch", "resnet20", "-m", "prune",
            "--ratio", "0.5", "-o", out, "--json", "--channel-multiple", multiple]
    result = invoke(*(args if multiple != 8 else args[:-2]))
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ratio_reached"] <= 0.5 * 1.02
    widths = _conv_widths(onnx.load(out))
    assert len(widths) == len(original) and sum(widths) < sum(original)  # pruned, not removed
    assert all(w % multiple == 0 for w in widths if w >= multiple), widths
    if multiple == 1:  # the finest pruning leaves some width that no coarser multiple allows
        assert any(w % 8 for w in widths), widths


@pytest.mark.slow
@pytest.mark.parametrize("arch", zoo.names())
@pytest.mark.parametrize(
    "extra",
    [
        ["-m", "prune", "--criterion", "activation", "--per-layer"],
        ["-m", "prune", "--criterion", "lsh"],
        ["-m", "prune", "--criterion", "reconstruction"],
        ["-m", "lsh", "--asymmetric", "--lsh-bits", "4", "--lsh-tables", "8"],
    ],
)
def test_structural_methods_at_three_quarters(arch, extra, tmp_path):
    """prune and lsh at ratio 0.75 with their options: valid, on budget, and residual and
    depthwise groups shrunk consistently (ORT runs the result)."""
    out = tmp_path / f"{arch}.onnx"
    result = invoke("compress", zoo.get(arch).checkpoint, "--arch", arch, *extra, "--ratio",
                    "0.75", "--data", CALIB, "--calib-samples", "64", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["ratio_reached"] <= 0.75 * 1.02
    assert any(layer["skipped"] is None for layer in summary["layers"])
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    x = np.load(CALIB)["x"][:8].astype(np.float32) / 255
    sess = runtime.session(proto)
    assert sess.run(None, {sess.get_inputs()[0].name: x})[0].shape == (8, 10)


def test_compress_prints_layer_table_and_summary(tmp_path):
    out = tmp_path / "lenet.onnx"
    result = invoke(
        "compress",
        zoo.get("lenet5").checkpoint,
        "--arch",
        "lenet5",
        "-m",
        "svd",
        "--data",
        CALIB,
        "--calib-samples",
        "64",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    assert "MACs" in result.output and "requested" in result.output
    assert f"wrote {out}" in result.output.replace("\n", "")


def test_data_free_run_says_so(tmp_path):
    out = tmp_path / "mlp.onnx"
    result = invoke("compress", zoo.get("mlp").checkpoint, "--arch", "mlp", "-m", "svd", "-o", out)
    assert result.exit_code == 0, result.output
    assert "data-free" in result.output


def test_compress_console_script_alias(tmp_path):
    out = tmp_path / "mlp.onnx"
    result = invoke(
        zoo.get("mlp").checkpoint,
        "--arch",
        "mlp",
        "-m",
        "sketch",
        "-o",
        out,
        "-q",
        command=compress_command,
    )
    assert result.exit_code == 0 and out.exists()


def test_evaluate_against_reference_json(tmp_path):
    out = tmp_path / "lenet.onnx"
    invoke(
        "compress",
        zoo.get("lenet5").checkpoint,
        "--arch",
        "lenet5",
        "-m",
        "svd",
        "--data",
        CALIB,
        "--calib-samples",
        "64",
        "-o",
        out,
        "-q",
    )
    result = invoke(
        "evaluate",
        out,
        "--reference",
        zoo.get("lenet5").checkpoint,
        "--arch",
        "lenet5",
        "--data",
        EVAL,
        "--limit",
        "300",
        "--batch-size",
        "8",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert 0.5 < report["candidate"]["accuracy"] <= 1.0
    assert 0.0 <= report["comparison"]["agreement"] <= 1.0
    assert report["comparison"]["macs_ratio"] < 1.0


def test_inspect_shows_layers_and_recipe(tmp_path):
    out = tmp_path / "mlp.onnx"
    invoke("compress", zoo.get("mlp").checkpoint, "--arch", "mlp", "-m", "svd", "-o", out, "-q")
    result = invoke("inspect", out)
    assert result.exit_code == 0, result.output
    assert "Gemm" in result.output and "method svd" in result.output
    zoo_list = invoke("inspect", "--zoo")
    assert all(name in zoo_list.output for name in zoo.names())


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["compress", "missing.pt", "-m", "svd", "-o", "o.onnx"], "missing.pt", 1),
        (
            ["compress", "{ckpt}", "--arch", "mlp", "-m", "svd", "--ratio", "1.5", "-o", "o.onnx"],
            "--ratio must be in (0, 1]",
            2,
        ),
        (
            ["compress", "{ckpt}", "--arch", "mlp", "-m", "svd", "--ratio", "0", "-o", "o.onnx"],
            "--ratio must be in (0, 1]",
            2,
        ),
        (["compress", "{ckpt}", "-m", "svd", "-o", "o.onnx"], "--arch", 1),
        (
            ["compress", "{ckpt}", "--arch", "nosuchnet", "-m", "svd", "-o", "o.onnx"],
            "nosuchnet",
            2,
        ),
        (
            [
                "compress",
                "{ckpt}",
                "--arch",
                "mlp",
                "-m",
                "svd",
                "--data",
                "nowhere.npz",
                "-o",
                "o.onnx",
            ],
            "nowhere.npz",
            1,
        ),
        (
            [
                "compress",
                "{ckpt}",
                "--arch",
                "mlp",
                "-m",
                "svd",
                "--data",
                "digits",
                "-o",
                "o.onnx",
            ],
            "(1, 28, 28)",
            1,
        ),
        (["compress", "{ckpt}", "--arch", "mlp", "-m", "svd", "-o", "o.txt"], ".onnx", 2),
        (
            ["compress", "{ckpt}", "--arch", "mlp", "-m", "svd", "--rank", "0", "-o", "o.onnx"],
            "--rank must be >= 1",
            2,
        ),
        (
            ["compress", "{ckpt}", "--arch", "mlp", "-m", "prune", "--criterion", "taylor",
             "-o", "o.onnx"],
            "unknown --criterion 'taylor'",
            2,
        ),
        (
            ["compress", "{ckpt}", "--arch", "mlp", "-m", "prune", "--criterion", "activation",
             "-o", "o.onnx"],
            "needs calibration data",
            2,
        ),
        (
            ["compress", "{ckpt}", "--arch", "mlp", "-m", "lsh", "--lsh-bits", "0", "-o",
             "o.onnx"],
            "--lsh-bits must be in",
            2,
        ),
        (
            ["compress", "{ckpt}", "--arch", "mlp", "-m", "prune", "--channel-multiple", "0",
             "-o", "o.onnx"],
            "--channel-multiple must be >= 1",
            2,
        ),
        (
            ["compress", "{ckpt}", "--arch", "mlp", "-m", "svd", "--speedup", "1", "-o",
             "o.onnx"],
            "--speedup must be a number > 1",
            2,
        ),
        (
            ["compress", "{ckpt}", "--arch", "mlp", "-m", "svd", "--speedup", "fast", "-o",
             "o.onnx"],
            "'fast' is not a valid float",
            2,
        ),
        (
            ["compress", "{ckpt}", "--arch", "mlp", "-m", "svd,nosuch", "-o", "o.onnx"],
            "unknown method 'nosuch'",
            2,
        ),
        (
            ["compress", "{ckpt}", "--arch", "mlp", "-m", "prune,svd,prune", "-o", "o.onnx"],
            "'prune' is listed twice",
            2,
        ),
        (
            ["compress", "{ckpt}", "--arch", "mlp", "-m", "svd", "--quantize", "int4", "-o",
             "o.onnx"],
            "Invalid value for '--quantize': 'int4'",
            2,
        ),
        (
            ["compress", "{ckpt}", "--arch", "mlp", "-m", "sketch", "--speedup", "2", "-o",
             "o.onnx"],
            "sketch chooses by MACs only",
            2,
        ),
    ],
)
def test_errors_are_one_clear_line(args, message, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [a.replace("{ckpt}", str(zoo.get("mlp").checkpoint)) for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o.onnx").exists()


def test_never_overwrites_the_input(tmp_path):
    out = tmp_path / "m.onnx"
    invoke("compress", zoo.get("mlp").checkpoint, "--arch", "mlp", "-m", "svd", "-o", out, "-q")
    before = out.read_bytes()
    result = CliRunner().invoke(main, ["compress", str(out), "-m", "svd", "-o", str(out)])
    assert result.exit_code != 0 and "input" in result.output
    assert out.read_bytes() == before


def test_onnx_input_round_trip(tmp_path):
    """An ONNX produced by compressor can be compressed again (ONNX input path)."""
    first = tmp_path / "a.onnx"
    second = tmp_path / "b.onnx"
    invoke(
        "compress",
        zoo.get("lenet5").checkpoint,
        "--arch",
        "lenet5",
        "-m",
        "svd",
        "--ratio",
        "0.8",
        "-o",
        first,
        "-q",
    )
    result = invoke(
        "compress",
        first,
        "-m",
        "svd",
        "--ratio",
        "0.5",
        "--data",
        CALIB,
        "--calib-samples",
        "32",
        "-o",
        second,
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert read_recipe(onnx.load(second))["source"]["format"] == "onnx"


def test_speedup_reports_target_and_measurement(tmp_path, monkeypatch):
    """--speedup: the summary says the target, predicted and measured speedup (not a MACs
    target nobody gave), and --json carries the same figures and the stage timings."""
    monkeypatch.setenv("COMPRESSOR_CACHE_DIR", str(tmp_path / "cache"))
    common = ["compress", zoo.get("mlp").checkpoint, "--arch", "mlp", "-m", "svd",
              "--speedup", "1.2", "--data", CALIB, "--calib-samples", "64"]
    result = invoke(*common, "-o", tmp_path / "a.onnx")
    assert result.exit_code == 0, result.output
    assert "target 1.20x" in result.output and "measured speedup" in result.output
    assert "requested" not in result.output
    result = invoke(*common, "-o", tmp_path / "b.onnx", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["speed"]["target"] == 1.2 and report["speed"]["batch"] == 1
    assert report["speed"]["met"] == (report["speed"]["measured"] >= 1.2)
    assert {"load", "cleanup", "verify", "save", "total"} <= set(report["timings"])
    assert (tmp_path / "cache" / "latency.json").is_file()  # timings cached where asked
