"""The fast-conv algorithms (WinogradConv F(2x2,3x3) / F(4x4,3x3), FFTConv, Im2colConv) vs
onnxruntime's Conv on every distinct convolution of the zoo and of torchvision-shaped ResNet-18,
ResNet-50 and VGG-16: time and error; whole models under fast-conv.

    python bench/bench_fast_conv.py [--batches 1,16,64] [--min-time 0.3] [--quick] [--from-json]
    python bench/bench_fast_conv.py --list-layers   # the layers and what applies, no timing

Layers: every distinct Conv (any kernel, stride, group, dilation) of the zoo models (their ONNX
exports, input shapes by shape inference) and of ResNet-18 / ResNet-50 / VGG-16 as
bench/archs.py defines them (torchvision's shapes, 224x224). Each layer is a one-node model per
algorithm that applies (Conv and Im2colConv: all; WinogradConv tile 2 and 4: 3x3 stride 1 group
1; FFTConv: stride 1 group 1 kernels > 1 whose spectra fit the op's budget; random weights,
bias) timed side by side at each batch (1, 16, 64) by ``compressor.latency.LatencyTable.compare``
(alternating order, spinning off, medians). Error: ||y - y64|| / ||y64|| against a float64 torch
convolution, on random normal inputs (batch 4).

Whole models: each zoo model (its bundled checkpoint) and ResNet-18 / ResNet-50 / VGG-16
(bench/archs.py, 224x224) through ``compressor compress --method fast-conv --batch 16`` (no
data: errors on random inputs), then original vs compressed side by side
(``LatencyTable.compare``) and the pipeline's own output check; the table says whether any
model got slower than with ORT's Conv alone.

FFTConv (``--fft-only`` adds or refreshes this table alone): ORT Conv vs FFTConv at batch 1, 16
and 64 on the zoo's stride-1 group-1 convolutions with kernels larger than 3x3 (where fast-conv
times FFT), plus 5x5 / 7x7 layers at 56x56 and a 3x3 one for comparison; same timing and error.

Targets (issue 13): F(4x4,3x3) >= 1.3x faster than Conv on 3x3 stride-1 layers with >= 64
channels at batch >= 16; ResNet-18 under fast-conv >= 1.15x faster at batch 16, cosine >= 0.9999;
no model ever slower than with ORT's Conv alone.
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
from compressor.recipe import MIN_GAIN  # noqa: E402

ZOO = ("lenet5", "vgg", "resnet20", "mobilenetv2")
ARCHS = ("resnet18", "resnet50", "vgg16")  # bench/archs.py, torchvision's shapes, 224x224
WHOLE_BATCH = 16
# Column name -> the one-node model's op: None Conv, 2 / 4 WinogradConv's tile, "fft" FFTConv,
# "im2col" Im2colConv.
ALGORITHMS = {"conv": None, "winograd2": 2, "winograd4": 4, "fft": "fft", "im2col": "im2col"}
LABELS = {"conv": "Conv", "winograd2": "F(2)", "winograd4": "F(4)", "fft": "FFT", "im2col": "im2col"}
FFT_ALGORITHMS = {"conv": None, "fft": "fft"}
FFT_BATCHES = [1, 16, 64]
# Large-kernel layers beside the zoo's: (C, M, map, kernel).
FFT_EXTRA = [(64, 64, 56, 5), (64, 64, 56, 7), (32, 32, 56, 7), (16, 16, 112, 7), (64, 64, 56, 3)]
TARGET = 1.3
LOAD_NOTE = "2 cores: the benchmark itself loads them to about 2; above that other jobs shared them"


def layer_model(c: int, m: int, h: int, w: int, pads, tile: int | str | None, seed: int = 0,
                kernel: int = 3, stride: int = 1, group: int = 1, dilation: int = 1,
                ) -> onnx.ModelProto:
    """One Conv (tile None), WinogradConv (tile 2 / 4), FFTConv (tile "fft") or Im2colConv
    (tile "im2col") node."""
    rng = np.random.default_rng(seed)
    fan_in = kernel * kernel * c // group
    weight = (rng.standard_normal((m, c // group, kernel, kernel)) / np.sqrt(fan_in)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    geometry = dict(kernel_shape=[kernel, kernel], pads=list(pads), strides=[stride, stride],
                    dilations=[dilation, dilation], group=group)
    if tile is None:
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], **geometry)
    elif tile == "fft":
        node = helper.make_node("FFTConv", ["x", "w", "b"], ["y"], domain=runtime.OP_DOMAIN,
                                **geometry)
    elif tile == "im2col":
        node = helper.make_node("Im2colConv", ["x", "w", "b"], ["y"], domain=runtime.OP_DOMAIN,
                                **geometry)
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


def layer_geometry(layer: dict) -> dict:
    """layer_model's keywords for a row (rows from before the stride / group columns: 3x3, 1)."""
    return dict(kernel=layer.get("k", 3), stride=layer.get("stride", 1),
                group=layer.get("group", 1), dilation=layer.get("dilation", 1))


def output_size(layer: dict) -> tuple[int, int]:
    g = layer_geometry(layer)
    span = g["dilation"] * (g["kernel"] - 1) + 1
    top, left, bottom, right = layer["pads"]
    return ((layer["h"] + top + bottom - span) // g["stride"] + 1,
            (layer["w"] + left + right - span) // g["stride"] + 1)


def applicable(layer: dict) -> dict:
    """The ALGORITHMS entries that compute this layer (what fast-conv may consider)."""
    from compressor.passes.fast_conv import fft_size

    g = layer_geometry(layer)
    plain = g["stride"] == 1 and g["group"] == 1 and g["dilation"] == 1
    names = ["conv", "im2col"]
    if plain and g["kernel"] == 3:
        names += ["winograd2", "winograd4"]
    if plain and g["kernel"] > 1:
        try:  # FFTConv refuses kernels whose spectra exceed its budget at every FFT size
            fft_size((g["kernel"], g["kernel"]), output_size(layer), layer["c"], layer["m"])
            names.append("fft")
        except ValueError:
            pass
    return {name: tile for name, tile in ALGORITHMS.items() if name in names}


def zoo_convs(kernel_ok, every_conv: bool = False) -> list[dict]:
    """Every stride-1 group-1 dilation-1 square-kernel Conv of the zoo whose kernel size passes
    ``kernel_ok`` (``every_conv``: any stride, group and dilation, square kernels): source, C,
    M, map, kernel, stride, group, dilation and pads."""
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
            strides = list(attrs.get("strides", [1, 1]))
            dilations = list(attrs.get("dilations", [1, 1]))
            group = attrs.get("group", 1)
            if (wshape is None or wshape[2] != wshape[3] or not kernel_ok(wshape[2])
                    or strides[0] != strides[1] or dilations[0] != dilations[1]
                    or (not every_conv and (group != 1 or strides != [1, 1] or dilations != [1, 1]))):
                continue
            x = shapes.get(node.input[0])
            layers.append(dict(source=name, c=x[1], m=wshape[0], h=x[2], w=x[3], k=wshape[2],
                               stride=strides[0], group=group, dilation=dilations[0],
                               pads=list(attrs.get("pads", [0, 0, 0, 0]))))
    return layers


def zoo_layers() -> list[dict]:
    return zoo_convs(lambda k: True, every_conv=True)


def arch_layers(name: str, kernel_ok=lambda k: True) -> list[dict]:
    """Every square-kernel Conv2d of bench/archs.py's ``name`` (torchvision's shapes) whose
    kernel passes ``kernel_ok``, with its input size at 224x224."""
    import archs
    import torch

    model = archs.definition(name)
    found = []

    def hook(module, inputs, _output):
        x = inputs[0]
        found.append(dict(source=name, c=module.in_channels, m=module.out_channels,
                          h=x.shape[2], w=x.shape[3], k=module.kernel_size[0],
                          stride=module.stride[0], group=module.groups,
                          dilation=module.dilation[0],
                          pads=[module.padding[0], module.padding[1]] * 2))

    for module in model.modules():
        if (isinstance(module, torch.nn.Conv2d) and kernel_ok(module.kernel_size[0])
                and module.kernel_size[0] == module.kernel_size[1]
                and module.stride[0] == module.stride[1]
                and module.dilation[0] == module.dilation[1]
                and isinstance(module.padding, tuple)):
            module.register_forward_hook(hook)
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 224, 224))
    return found


def resnet18_layers() -> list[dict]:
    """ResNet-18's 3x3 stride-1 layers (--quick)."""
    return [layer for layer in arch_layers("resnet18", lambda k: k == 3) if layer["stride"] == 1]


def all_layers() -> list[dict]:
    return distinct([layer for name in ARCHS for layer in arch_layers(name)] + zoo_layers())


def fft_layers() -> list[dict]:
    """The zoo's stride-1 group-1 convolutions with kernels larger than 3x3, and FFT_EXTRA."""
    layers = zoo_convs(lambda k: k > 3)
    for c, m, size, k in FFT_EXTRA:
        layers.append(dict(source="synthetic", c=c, m=m, h=size, w=size, k=k, pads=[k // 2] * 4))
    return layers


def distinct(layers: list[dict]) -> list[dict]:
    seen, out = set(), []
    for layer in layers:
        key = (layer["c"], layer["m"], layer["h"], layer["w"], tuple(layer_geometry(layer).values()),
               tuple(layer["pads"]))
        if key not in seen:
            seen.add(key)
            out.append(layer)
    return out


def error(layer: dict, tile: int | str | None) -> float:
    import torch

    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, layer["c"], layer["h"], layer["w"])).astype(np.float32)
    g = layer_geometry(layer)
    model = layer_model(layer["c"], layer["m"], layer["h"], layer["w"], layer["pads"], tile, **g)
    y = runtime.session(model).run(None, {"x": x})[0]
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    b = numpy_helper.to_array(model.graph.initializer[1]).astype(np.float64)
    top, left, bottom, right = layer["pads"]
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    exact = torch.nn.functional.conv2d(torch.from_numpy(xp), torch.from_numpy(w), torch.from_numpy(b),
                                       stride=g["stride"], dilation=g["dilation"],
                                       groups=g["group"]).numpy()
    return float(np.linalg.norm(y - exact) / np.linalg.norm(exact))


def measure(layers: list[dict], batches: list[int], min_time_s: float,
            algorithms: dict | None = None) -> list[dict]:
    """Per layer: the errors and, per batch, the times of ``algorithms`` (default: every one
    that applies to the layer)."""
    rows = []
    for layer in layers:
        chosen = applicable(layer) if algorithms is None else algorithms
        models = {a: layer_model(layer["c"], layer["m"], layer["h"], layer["w"], layer["pads"], t,
                                 **layer_geometry(layer))
                  for a, t in chosen.items()}
        row = dict(layer, errors={a: error(layer, t) for a, t in chosen.items()}, ms={})
        for batch in batches:
            table = LatencyTable(LatencyContext(batch=batch), LatencyCache(persistent=False))
            row["ms"][str(batch)] = table.compare(models, min_time_s=min_time_s)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def whole_model(name: str, batch: int, min_time_s: float) -> dict:
    """``name`` (a zoo model with its checkpoint, or one of ARCHS) through fast-conv at
    ``batch``, original vs compressed side by side."""
    import tempfile

    import archs

    from compressor.pipeline import CompressOptions, compress

    with tempfile.TemporaryDirectory() as tmp:
        original, compressed = Path(tmp) / f"{name}.onnx", Path(tmp) / f"{name}_fc.onnx"
        if name in ZOO:
            onnx.save(io.load_model(zoo.get(name).checkpoint, arch=name).proto, original)
        else:
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
    speed = result.speed  # the recipe's own whole-model check (fast-conv is speed-only)
    return dict(model=name, batch=batch, ms=ms, chosen=chosen,
                fell_back=bool(speed and speed.fell_back_to_original),
                recipe_measured=None if speed is None else max(h["measured"] for h in speed.history),
                cosine_min=result.verification.cosine_min,
                relative_error=result.verification.relative_error)


def whole_models() -> list[str]:
    """Every zoo model with a bundled checkpoint, then ARCHS."""
    return [name for name in ZOO if zoo.get(name).checkpoint.is_file()] + list(ARCHS)


def speedup(ms: dict, algorithm: str) -> str:
    return f"{ms['conv'] / ms[algorithm]:.2f}x" if algorithm in ms else "-"


def render(result: dict) -> str:
    batches = result["batches"]
    lines = [
        "## fast-conv: Winograd, FFT and im2col vs onnxruntime's Conv",
        "",
        "Every distinct convolution of the zoo and of ResNet-18 / ResNet-50 / VGG-16 (224x224)"
        + ("" if all("stride" in row for row in result["rows"]) else
           " (these rows were measured before the table covered them: 3x3 stride 1 only)")
        + ". One-node models, "
        "`LatencyTable.compare` (side by side, alternating, spinning off, medians); speedup = "
        "Conv's ms / the algorithm's ms, `-` where it does not apply. Error: relative L2 vs a "
        f"float64 convolution. Load average at start / end: {result['load'][0]} / "
        f"{result['load'][1]} ({LOAD_NOTE}).",
        "",
        "| layer | C->M | map | k/s/g | " + " | ".join(
            f"b{b} {LABELS[a]}" + (" ms" if a == "conv" else "")
            for b in batches for a in ALGORITHMS) + " | " + " | ".join(
            f"err {LABELS[a]}" for a in ALGORITHMS) + " |",
        "|---|---|---|---|" + "---|" * (len(batches) * len(ALGORITHMS) + len(ALGORITHMS)),
    ]
    hits, total = 0, 0
    for row in result["rows"]:
        g = layer_geometry(row)
        cells = [row["source"], f"{row['c']}->{row['m']}", f"{row['h']}x{row['w']}",
                 f"{g['kernel']}/{g['stride']}/{g['group']}"]
        for b in batches:
            ms = row["ms"][str(b)]
            cells += [f"{ms['conv']:.3g}"] + [speedup(ms, a) for a in ALGORITHMS if a != "conv"]
            if b >= 16 and min(row["c"], row["m"]) >= 64 and "winograd4" in ms:
                total += 1
                hits += ms["conv"] / ms["winograd4"] >= TARGET
        cells += [f"{row['errors'][a]:.1e}" if a in row["errors"] else "-" for a in ALGORITHMS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Target F(4x4) >= {TARGET}x Conv on layers with >= 64 channels at batch >= 16: "
              f"met on {hits} of {total} (layer, batch) pairs."]
    if "fft_rows" in result:
        lines += ["", render_fft(result)]
    wholes = result.get("whole", [])
    if wholes:
        lines += ["", f"### Whole models under `--method fast-conv` (batch {wholes[0]['batch']})", "",
                  "| model | Conv only ms | fast-conv ms | speedup | cosine min | rel. error | layers |",
                  "|---|---|---|---|---|---|---|"]
    for whole in wholes:
        ms = whole["ms"]
        chosen = ", ".join(f"{k} x{v}" for k, v in sorted(whole["chosen"].items()))
        if whole.get("fell_back"):
            chosen = (f"the original, kept: no round measured faster by {MIN_GAIN:g}x (best "
                      f"{whole['recipe_measured']:.2f}x)")
        lines.append(f"| {whole['model']} | {ms['original']:.1f} | {ms['fast-conv']:.1f} | "
                     f"{ms['original'] / ms['fast-conv']:.2f}x | {whole['cosine_min']:.8f} | "
                     f"{whole['relative_error']:.1e} | {chosen} |")
    if wholes:
        # a model that fell back is the original graph itself: its ratio is the timing's noise
        slower = [w["model"] for w in wholes
                  if not w.get("fell_back") and w["ms"]["fast-conv"] > w["ms"]["original"]]
        resnet18 = [w for w in wholes if w["model"] == "resnet18"]
        lines += [""]
        if resnet18:
            r = resnet18[0]
            lines.append(f"Target ResNet-18 >= 1.15x at cosine >= 0.9999: "
                         f"{r['ms']['original'] / r['ms']['fast-conv']:.2f}x at "
                         f"{r['cosine_min']:.8f}.")
        lines.append("Target no model slower than with ORT's Conv alone: " +
                     ("met." if not slower else f"not met ({', '.join(slower)} slower)."))
    return "\n".join(lines)


def render_fft(result: dict) -> str:
    batches = result["fft_batches"]
    lines = [
        "### FFTConv vs onnxruntime's Conv (stride 1, kernels > 3x3 and one 3x3 for comparison)",
        "",
        "Same timing and error as above; speedup = Conv's ms / FFTConv's ms (below 1: slower). "
        f"Load average at start / end: {result['fft_load'][0]} / {result['fft_load'][1]} "
        f"({LOAD_NOTE}).",
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
                        help="only the whole-model runs, added to the existing JSON's layers")
    parser.add_argument("--fft-only", action="store_true",
                        help="only the FFTConv table, added to the existing JSON")
    parser.add_argument("--list-layers", action="store_true",
                        help="print the distinct layers and the algorithms that apply; no timing")
    args = parser.parse_args()
    raw = SECTIONS / "fast_conv.json"
    if args.list_layers:
        layers = all_layers()
        for layer in layers:
            print(json.dumps(dict(layer, algorithms=list(applicable(layer)))))
        print(f"{len(layers)} distinct layers; whole models: {', '.join(whole_models())}")
        return
    if args.from_json:
        result = json.loads(raw.read_text())
    elif args.fft_only:
        result = json.loads(raw.read_text())
        result.update(fft_table(args.min_time))
        atomic_write(raw, json.dumps(result, indent=1))
    elif args.whole_only:
        result = json.loads(raw.read_text())
        result["whole"] = [whole_model(name, WHOLE_BATCH, 3.0) for name in whole_models()]
        atomic_write(raw, json.dumps(result, indent=1))
    else:
        batches = [16] if args.quick else [int(b) for b in args.batches.split(",")]
        layers = distinct(resnet18_layers()) if args.quick else all_layers()
        load0 = round(os.getloadavg()[0], 1)
        rows = measure(layers, batches, args.min_time)
        result = dict(batches=batches, rows=rows, load=[load0, round(os.getloadavg()[0], 1)])
        if not args.quick:
            result["whole"] = [whole_model(name, WHOLE_BATCH, 3.0) for name in whole_models()]
            result.update(fft_table(args.min_time))
        atomic_write(raw, json.dumps(result, indent=1))
    print(f"wrote {write_section('fast_conv', render(result))}")


if __name__ == "__main__":
    main()
