"""WinogradConv F(2x2,3x3) / F(4x4,3x3) vs onnxruntime's Conv on 3x3 stride-1 layers: time and
error.

    python bench/bench_fast_conv.py [--batches 1,16,64] [--min-time 0.3] [--quick] [--from-json]

Layers: every distinct 3x3 stride-1 group-1 Conv of the zoo models (their ONNX exports, input
shapes by shape inference) and of ResNet-18 as bench/archs.py defines it (torchvision's shapes,
224x224). Each layer is a one-node model (Conv, WinogradConv tile 2, tile 4; random weights,
bias) timed side by side at each batch by ``compressor.latency.LatencyTable.compare``
(alternating order, spinning off, medians). Error: ||y - y64|| / ||y64|| against a float64
torch convolution, on random normal inputs (batch 4).

Whole model: ResNet-18 (bench/archs.py, 224x224) through ``compressor compress --method
fast-conv --batch 16`` (no data: errors on random inputs), then original vs compressed side by
side (``LatencyTable.compare``) and the pipeline's own output check.

FFTConv (``--fft-only`` adds or refreshes this table alone): ORT Conv vs FFTConv at batch 1 and
16 on the zoo's stride-1 group-1 convolutions with kernels larger than 3x3 (where fast-conv
times FFT), plus 5x5 / 7x7 layers at 56x56 and a 3x3 one for comparison; same timing and error.

Targets (issue 13): F(4x4,3x3) >= 1.3x faster than Conv on 3x3 stride-1 layers with >= 64
channels at batch >= 16; ResNet-18 under fast-conv >= 1.15x faster at batch 16, cosine >= 0.9999.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SECTIONS, atomic_write, write_section  # noqa: E402

from compressor import io, runtime  # noqa: E402
from compressor.latency import LatencyCache, LatencyContext, LatencyTable  # noqa: E402
from compressor.models import zoo  # noqa: E402

ZOO = ("lenet5", "vgg", "resnet20", "mobilenetv2")
ALGORITHMS = {"conv": None, "winograd2": 2, "winograd4": 4}
FFT_ALGORITHMS = {"conv": None, "fft": "fft"}
FFT_BATCHES = [1, 16]
# Large-kernel layers beside the zoo's: (C, M, map, kernel).
FFT_EXTRA = [(64, 64, 56, 5), (64, 64, 56, 7), (32, 32, 56, 7), (16, 16, 112, 7), (64, 64, 56, 3)]
TARGET = 1.3


def layer_model(c: int, m: int, h: int, w: int, pads, tile: int | str | None, seed: int = 0,
                kernel: int = 3) -> onnx.ModelProto:
    """One Conv (tile None), WinogradConv (tile 2 / 4) or FFTConv (tile "fft") node."""
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((m, c, kernel, kernel)) / np.sqrt(kernel * kernel * c)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    if tile is None:
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[kernel, kernel],
                                pads=list(pads))
    elif tile == "fft":
        node = helper.make_node("FFTConv", ["x", "w", "b"], ["y"], domain=runtime.OP_DOMAIN,
                                pads=list(pads), kernel_shape=[kernel, kernel])
    else:
        node = helper.make_node("WinogradConv", ["x", "w", "b"], ["y"], domain=runtime.OP_DOMAIN,
                                pads=list(pads), tile=tile)
    graph = helper.make_graph(
        [node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, h, w])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid(runtime.OP_DOMAIN, 1)])
    model.ir_version = 10
    return model


def zoo_convs(kernel_ok) -> list[dict]:
    """Every stride-1 group-1 dilation-1 square-kernel Conv of the zoo whose kernel size passes
    ``kernel_ok``: source, C, M, map, kernel and pads."""
    layers = []
    for name in ZOO:
        entry = zoo.get(name)
        if not entry.checkpoint.is_file():
            continue
        proto = onnx.shape_inference.infer_shapes(io.load_model(entry.checkpoint, arch=name).proto)
        shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                  for v in [*proto.graph.value_info, *proto.graph.input]}
        inits = {t.name: list(t.dims) for t in proto.graph.initializer}
        for node in proto.graph.node:
            if node.op_type != "Conv":
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            wshape = inits.get(node.input[1])
            if (wshape is None or wshape[2] != wshape[3] or not kernel_ok(wshape[2])
                    or attrs.get("group", 1) != 1
                    or list(attrs.get("strides", [1, 1])) != [1, 1]
                    or list(attrs.get("dilations", [1, 1])) != [1, 1]):
                continue
            x = shapes.get(node.input[0])
            layers.append(dict(source=name, c=wshape[1], m=wshape[0], h=x[2], w=x[3], k=wshape[2],
                               pads=list(attrs.get("pads", [0, 0, 0, 0]))))
    return layers


def zoo_layers() -> list[dict]:
    return zoo_convs(lambda k: k == 3)


def resnet18_layers() -> list[dict]:
    import archs
    import torch

    model = archs.definition("resnet18")
    found = []

    def hook(module, inputs, _output):
        x = inputs[0]
        found.append(dict(source="resnet18", c=module.in_channels, m=module.out_channels,
                          h=x.shape[2], w=x.shape[3], pads=[module.padding[0], module.padding[1]] * 2))

    for module in model.modules():
        if (isinstance(module, torch.nn.Conv2d) and module.kernel_size == (3, 3)
                and module.stride == (1, 1) and module.groups == 1 and module.dilation == (1, 1)):
            module.register_forward_hook(hook)
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 224, 224))
    return found


def fft_layers() -> list[dict]:
    """The zoo's stride-1 group-1 convolutions with kernels larger than 3x3, and FFT_EXTRA."""
    layers = zoo_convs(lambda k: k > 3)
    for c, m, size, k in FFT_EXTRA:
        layers.append(dict(source="synthetic", c=c, m=m, h=size, w=size, k=k, pads=[k // 2] * 4))
    return layers


def distinct(layers: list[dict]) -> list[dict]:
    seen, out = set(), []
    for layer in layers:
        key = (layer["c"], layer["m"], layer["h"], layer["w"], layer.get("k", 3), tuple(layer["pads"]))
        if key not in seen:
            seen.add(key)
            out.append(layer)
    return out


def error(layer: dict, tile: int | str | None) -> float:
    import torch

    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, layer["c"], layer["h"], layer["w"])).astype(np.float32)
    model = layer_model(layer["c"], layer["m"], layer["h"], layer["w"], layer["pads"], tile,
                        kernel=layer.get("k", 3))
    y = runtime.session(model).run(None, {"x": x})[0]
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    b = numpy_helper.to_array(model.graph.initializer[1]).astype(np.float64)
    top, left, bottom, right = layer["pads"]
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    exact = torch.nn.functional.conv2d(torch.from_numpy(xp), torch.from_numpy(w), torch.from_numpy(b)).numpy()
    return float(np.linalg.norm(y - exact) / np.linalg.norm(exact))


def measure(layers: list[dict], batches: list[int], min_time_s: float,
            algorithms: dict = ALGORITHMS) -> list[dict]:
    rows = []
    for layer in layers:
        models = {a: layer_model(layer["c"], layer["m"], layer["h"], layer["w"], layer["pads"], t,
                                 kernel=layer.get("k", 3))
                  for a, t in algorithms.items()}
        row = dict(layer, errors={a: error(layer, t) for a, t in algorithms.items()}, ms={})
        for batch in batches:
            table = LatencyTable(LatencyContext(batch=batch), LatencyCache(persistent=False))
            row["ms"][str(batch)] = table.compare(models, min_time_s=min_time_s)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def whole_model(name: str, batch: int, min_time_s: float) -> dict:
    import tempfile

    import archs

    from compressor.pipeline import CompressOptions, compress

    with tempfile.TemporaryDirectory() as tmp:
        original, compressed = Path(tmp) / f"{name}.onnx", Path(tmp) / f"{name}_fc.onnx"
        archs.export(name, original)
        result = compress(CompressOptions(model=original, output=compressed, method="fast-conv",
                                          batch=batch))
        table = LatencyTable(LatencyContext(batch=batch), LatencyCache(persistent=False))
        ms = table.compare({"original": onnx.load(original), "fast-conv": onnx.load(compressed)},
                           min_time_s=min_time_s)
    layers = [layer for r in result.passes for layer in r.layers]
    chosen = {}
    for layer in layers:
        key = "Conv" if not layer.changed else layer.detail.split(" (")[0]
        chosen[key] = chosen.get(key, 0) + 1
    return dict(model=name, batch=batch, ms=ms, chosen=chosen,
                cosine_min=result.verification.cosine_min,
                relative_error=result.verification.relative_error)


def render(result: dict) -> str:
    batches = result["batches"]
    lines = [
        "## fast-conv: Winograd vs onnxruntime's Conv (3x3, stride 1)",
        "",
        "One-node models, `LatencyTable.compare` (side by side, alternating, spinning off, "
        "medians); speedup = Conv's ms / WinogradConv's ms. Error: relative L2 vs a float64 "
        f"convolution. Load average at start / end: {result['load'][0]} / {result['load'][1]} "
        "(2 cores shared with other jobs: single ratios are noisy).",
        "",
        "| layer | C->M | map | " + " | ".join(
            f"b{b} Conv ms | b{b} F(2) | b{b} F(4)" for b in batches) + " | err Conv | err F(2) | err F(4) |",
        "|---|---|---|" + "---|---|---|" * len(batches) + "---|---|---|",
    ]
    hits, total = 0, 0
    for row in result["rows"]:
        cells = [row["source"], f"{row['c']}->{row['m']}", f"{row['h']}x{row['w']}"]
        for b in batches:
            ms = row["ms"][str(b)]
            cells += [f"{ms['conv']:.3g}", f"{ms['conv'] / ms['winograd2']:.2f}x",
                      f"{ms['conv'] / ms['winograd4']:.2f}x"]
            if b >= 16 and min(row["c"], row["m"]) >= 64:
                total += 1
                hits += ms["conv"] / ms["winograd4"] >= TARGET
        cells += [f"{row['errors'][a]:.1e}" for a in ALGORITHMS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Target F(4x4) >= {TARGET}x Conv on layers with >= 64 channels at batch >= 16: "
              f"met on {hits} of {total} (layer, batch) pairs."]
    if "fft_rows" in result:
        lines += ["", render_fft(result)]
    for whole in result.get("whole", []):
        ms = whole["ms"]
        chosen = ", ".join(f"{k} x{v}" for k, v in sorted(whole["chosen"].items()))
        lines += ["", f"Whole model: {whole['model']} at batch {whole['batch']} under `--method "
                  f"fast-conv`: {ms['original']:.0f} ms -> {ms['fast-conv']:.0f} ms "
                  f"({ms['original'] / ms['fast-conv']:.2f}x; target 1.15x), output cosine min "
                  f"{whole['cosine_min']:.8f}, relative error {whole['relative_error']:.1e}; "
                  f"layers: {chosen}."]
    return "\n".join(lines)


def render_fft(result: dict) -> str:
    batches = result["fft_batches"]
    lines = [
        "### FFTConv vs onnxruntime's Conv (stride 1, kernels > 3x3 and one 3x3 for comparison)",
        "",
        "Same timing and error as above; speedup = Conv's ms / FFTConv's ms (below 1: slower). "
        f"Load average at start / end: {result['fft_load'][0]} / {result['fft_load'][1]} (2 cores "
        "shared with 3 other engineers' jobs: noisy).",
        "",
        "| layer | C->M | map | kernel | " + " | ".join(f"b{b} Conv ms | b{b} FFT" for b in batches)
        + " | err Conv | err FFT |",
        "|---|---|---|---|" + "---|---|" * len(batches) + "---|---|",
    ]
    for row in result["fft_rows"]:
        cells = [row["source"], f"{row['c']}->{row['m']}", f"{row['h']}x{row['w']}",
                 f"{row['k']}x{row['k']}"]
        for b in batches:
            ms = row["ms"][str(b)]
            cells += [f"{ms['conv']:.3g}", f"{ms['conv'] / ms['fft']:.2f}x"]
        cells += [f"{row['errors'][a]:.1e}" for a in FFT_ALGORITHMS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fft_table(min_time_s: float) -> dict:
    load0 = round(os.getloadavg()[0], 1)
    rows = measure(distinct(fft_layers()), FFT_BATCHES, min_time_s, FFT_ALGORITHMS)
    return dict(fft_batches=FFT_BATCHES, fft_rows=rows,
                fft_load=[load0, round(os.getloadavg()[0], 1)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds per comparison")
    parser.add_argument("--quick", action="store_true", help="ResNet-18's layers only, batch 16")
    parser.add_argument("--from-json", action="store_true", help="re-render docs/benchmarks/fast_conv.json")
    parser.add_argument("--whole-only", action="store_true",
                        help="only the whole-model run, added to the existing JSON's layers")
    parser.add_argument("--fft-only", action="store_true",
                        help="only the FFTConv table, added to the existing JSON")
    args = parser.parse_args()
    raw = SECTIONS / "fast_conv.json"
    if args.from_json:
        result = json.loads(raw.read_text())
    elif args.fft_only:
        result = json.loads(raw.read_text())
        result.update(fft_table(args.min_time))
        atomic_write(raw, json.dumps(result, indent=1))
    elif args.whole_only:
        result = json.loads(raw.read_text())
        result["whole"] = [whole_model("resnet18", 16, 3.0)]
        atomic_write(raw, json.dumps(result, indent=1))
    else:
        batches = [16] if args.quick else [int(b) for b in args.batches.split(",")]
        layers = distinct(resnet18_layers() + ([] if args.quick else zoo_layers()))
        load0 = round(os.getloadavg()[0], 1)
        rows = measure(layers, batches, args.min_time)
        result = dict(batches=batches, rows=rows, load=[load0, round(os.getloadavg()[0], 1)])
        if not args.quick:
            result["whole"] = [whole_model("resnet18", 16, 3.0)]
            result.update(fft_table(args.min_time))
        atomic_write(raw, json.dumps(result, indent=1))
    print(f"wrote {write_section('fast_conv', render(result))}")


if __name__ == "__main__":
    main()
