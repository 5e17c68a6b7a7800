"""LSHConv and LSHWindowConv vs onnxruntime's Conv: layer time, and zoo accuracy by --ratio.

    python bench/bench_lsh_conv.py [--quick] [--skip-models] [--skip-layers]

Layers: every distinct group-1 conv of the zoo models (trained checkpoints), fed its real input
activations (Fashion-MNIST images through the model), at batch 1 and 64. One-node models side
by side in one process: alternating order, spinning off, medians. LSHConv at selected
fractions 1, 0.5, 0.25, 0.1: real hashing (mean query, L = 8 tables of K = 8 bits over the
layer's window space) with bucket tables that all hold the same fraction of the filters, so
every sample computes exactly that fraction, hashing included. LSHWindowConv at the K whose
computed fraction of windows on these activations is closest to 0.5 and 0.25 (its hashing,
K (D + 1) per window, is part of its time).

Models: --method lsh-conv and lsh-window at --ratio 0.75, 0.5, 0.25 through the pipeline
(calibration on the bundled training images), accuracy and agreement with the original on the
bundled evaluation images.

Targets (issue): on CPU, LSHConv at fraction 0.25 >= 2.5x faster than Conv including hashing;
at fraction 1 within 1.3x of Conv.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, SECTIONS, atomic_write, write_section  # noqa: E402

from compressor import runtime  # noqa: E402
from compressor.passes.diffconv import ConvGeometry, window_patches  # noqa: E402
from compressor.passes.lsh_window import make_planes  # noqa: E402

FRACTIONS = (1.0, 0.5, 0.25, 0.10)
WINDOW_FRACTIONS = (0.5, 0.25)
TABLES, BITS = 8, 8
CALIB = ROOT / "models" / "data" / "fashion_mnist_calib.npz"
EVAL = ROOT / "models" / "data" / "fashion_mnist_eval.npz"


@dataclass
class Layer:
    source: str
    activations: np.ndarray  # [64, C, H, W]
    weight: np.ndarray
    bias: np.ndarray | None
    geometry: ConvGeometry

    @property
    def label(self) -> str:
        m, c, kh, kw = self.weight.shape
        h, w = self.activations.shape[2:]
        s = self.geometry.strides
        return f"{c}->{m} {kh}x{kw} @{h}x{w}" + (f" s{s[0]}" if s != (1, 1) else "")


def zoo_layers(batch: int = 64) -> list[Layer]:
    """Distinct group-1 convs of the trained zoo models, with their real input activations."""
    import torch

    from compressor.models import zoo

    data = np.load(EVAL)["x"][:batch].astype(np.float32).reshape(-1, 1, 28, 28)
    seen, layers = set(), []
    for name in zoo.names():
        if not zoo.get(name).checkpoint.is_file():
            continue
        model = zoo.load_pretrained(name)
        captured = []
        hooks = [m.register_forward_hook(lambda mod, inp, out, sink=captured: sink.append(
                     (mod, inp[0].detach().numpy().copy())))
                 for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1]
        with torch.no_grad():
            model(torch.from_numpy(data))
        for hook in hooks:
            hook.remove()
        for module, x in captured:
            if isinstance(module.padding, str):
                continue
            ph, pw = module.padding
            geometry = ConvGeometry(tuple(module.stride), (ph, pw, ph, pw), tuple(module.dilation))
            key = (x.shape[1:], module.out_channels, module.kernel_size, geometry)
            if key in seen:
                continue
            seen.add(key)
            bias = None if module.bias is None else module.bias.detach().numpy().astype(np.float32)
            layers.append(Layer(name, np.ascontiguousarray(x, np.float32),
                                module.weight.detach().numpy().astype(np.float32), bias, geometry))
    return layers


def one_node(op: str, x_shape, layer: Layer, extra_inits=(), **attributes):
    domain = "" if op == "Conv" else runtime.OP_DOMAIN
    inits = [numpy_helper.from_array(layer.weight, "W")]
    names = ["X", "W"]
    for name, array in extra_inits:
        inits.append(numpy_helper.from_array(array, name))
        names.append(name)
    if layer.bias is not None:
        inits.append(numpy_helper.from_array(layer.bias, "B"))
        names.append("B")
    g = layer.geometry
    node = helper.make_node(op, names, ["Y"], domain=domain, strides=list(g.strides),
                            pads=list(g.pads), dilations=list(g.dilations), **attributes)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


def lsh_conv_model(x_shape, layer: Layer, fraction: float, rng):
    """LSHConv whose every bucket holds the same round(fraction * M) filters."""
    m = layer.weight.shape[0]
    planes = rng.standard_normal((TABLES, BITS, layer.weight[0].size + 1)).astype(np.float32)
    words = np.zeros((m + 63) // 64, np.uint64)
    for f in rng.choice(m, max(1, int(round(fraction * m))), replace=False):
        words[f // 64] |= np.uint64(1) << np.uint64(f % 64)
    buckets = np.broadcast_to(words, (TABLES, 1 << BITS, len(words))).copy().view(np.int64)
    # planes and buckets go between W and B (the op's input order: X, W, planes, buckets, B)
    return one_node("LSHConv", x_shape, layer, [("P", planes), ("T", buckets)], query="mean")


def window_bits(layer: Layer, target: float) -> tuple[int, float]:
    """K whose computed fraction of windows on the layer's activations is closest to target."""
    kh, kw = layer.weight.shape[2:]
    patches = window_patches(layer.activations, (kh, kw), layer.geometry)
    n, oh, ow, d = patches.shape
    flat = patches.reshape(n, oh * ow, d)
    planes = make_planes(0, 32, flat.reshape(-1, d).mean(0)).astype(np.float64)
    bits = (flat @ planes[:, :-1].T + planes[:, -1]) > 0  # [N, windows, 32]
    best = (1, 1.0)
    for k in range(1, 33):
        codes = (bits[..., :k] << np.arange(k)).sum(-1)
        fraction = float(np.mean([len(np.unique(c)) for c in codes]) / (oh * ow))
        if abs(fraction - target) < abs(best[1] - target):
            best = (k, fraction)
    return best


def time_side_by_side(sessions: list, x: np.ndarray, budget_s: float, min_reps: int = 5) -> list[float]:
    feed = {"X": x}
    for s in sessions:
        s.run(None, feed)
    start = time.perf_counter()
    for s in sessions:
        s.run(None, feed)
    one = max(time.perf_counter() - start, 1e-5)
    reps = int(min(300, max(min_reps, budget_s / one)))
    samples = [[] for _ in sessions]
    for r in range(reps):
        order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
        for i in order:
            t = time.perf_counter()
            sessions[i].run(None, feed)
            samples[i].append(time.perf_counter() - t)
    return [statistics.median(s) for s in samples]


def layer_rows(quick: bool) -> list[dict]:
    layers = zoo_layers()
    if quick:
        layers = layers[:3]
    rng = np.random.default_rng(0)
    rows = []
    for layer in layers:
        windows = [(f, *window_bits(layer, f)) for f in WINDOW_FRACTIONS]
        for batch in (1, 64):
            x = np.ascontiguousarray(layer.activations[:batch])
            sessions = [runtime.session(one_node("Conv", x.shape, layer))]
            sessions += [runtime.session(lsh_conv_model(x.shape, layer, f, rng)) for f in FRACTIONS]
            for _, bits, _ in windows:
                kh, kw = layer.weight.shape[2:]
                mean = window_patches(layer.activations, (kh, kw), layer.geometry).reshape(
                    -1, layer.weight[0].size).mean(0)
                sessions.append(runtime.session(one_node(
                    "LSHWindowConv", x.shape, layer, [("P", make_planes(0, bits, mean))])))
            times = time_side_by_side(sessions, x, 0.5 if quick else 3.0)
            row = {"model": layer.source, "layer": layer.label, "batch": batch,
                   "conv_ms": times[0] * 1e3,
                   "lsh_ms": {str(f): t * 1e3 for f, t in zip(FRACTIONS, times[1:1 + len(FRACTIONS)], strict=True)},
                   "window": [{"target": f, "bits": k, "computed": c, "ms": t * 1e3}
                              for (f, k, c), t in zip(windows, times[1 + len(FRACTIONS):], strict=True)]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def model_rows(quick: bool, only: list[str] | None = None) -> list[dict]:
    from compressor import io
    from compressor.data import load_data
    from compressor.evaluate import evaluate
    from compressor.models import zoo
    from compressor.pipeline import CompressOptions, compress

    data = load_data(EVAL)
    names = [n for n in only or ("lenet5", "vgg", "resnet20", "mobilenetv2")
             if zoo.get(n).checkpoint.is_file()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names[:1] if quick else names:
            reference = io.load_model(zoo.get(name).checkpoint, arch=name).proto
            for method in ("lsh-conv", "lsh-window"):
                for ratio in (0.75, 0.5, 0.25):
                    out = Path(tmp) / f"{name}_{method}_{ratio}.onnx"
                    result = compress(CompressOptions(
                        model=zoo.get(name).checkpoint, arch=name, method=method, ratio=ratio,
                        data=str(CALIB), calib_samples=128, output=out))
                    report = evaluate(out, reference=reference, data=data, progress=False,
                                      latency_min_time_s=0.3)
                    c = report.comparison
                    replaced = sum(1 for layer in result.layers if layer.skipped is None)
                    row = {"model": name, "method": method, "ratio": ratio,
                           "macs_ratio": result.ratio_reached, "replaced": replaced,
                           "accuracy_ref": report.reference.accuracy,
                           "accuracy": report.candidate.accuracy, "agreement": c.agreement}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def markdown(layers: list[dict], models: list[dict], load: str) -> str:
    lines = ["## LSH convolutions (LSHConv, LSHWindowConv) vs onnxruntime Conv", ""]
    if layers:
        lines += [
            "Every distinct group-1 conv of the trained zoo models on its real input activations; "
            "one-node models side by side in one process (alternating order, spinning off, "
            f"medians; default threads). Load average while measuring: {load}. LSHConv: real "
            f"hashing (mean query, L={TABLES}, K={BITS}) into tables whose every bucket holds the "
            "same fraction of the filters. Entries are Conv time / op time (> 1: faster than "
            "Conv). LSHWindowConv: K chosen so the computed fraction of windows is near the "
            "target on these activations (shown), hashing included in its time.",
            "",
            "| model | layer | batch | Conv ms | LSHConv f=1 | f=0.5 | f=0.25 | f=0.1 | window ~0.5 | window ~0.25 |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in layers:
            conv = r["conv_ms"]
            cells = [f"{conv / r['lsh_ms'][str(f)]:.2f}x" for f in FRACTIONS]
            cells += [f"{conv / w['ms']:.2f}x (K={w['bits']}, {w['computed']:.0%})" for w in r["window"]]
            lines.append(f"| {r['model']} | {r['layer']} | {r['batch']} | {conv:.3f} | " + " | ".join(cells) + " |")
        lines.append("")
        verdicts = {"f=1 within 1.3x": [], "f=0.25 >= 2.5x faster": []}
        for batch in (1, 64):
            at = [r for r in layers if r["batch"] == batch]
            if not at:
                continue
            full = [r["conv_ms"] / r["lsh_ms"]["1.0"] for r in at]
            quarter = [r["conv_ms"] / r["lsh_ms"]["0.25"] for r in at]
            verdicts["f=1 within 1.3x"].append((batch, statistics.median(full) >= 1 / 1.3))
            verdicts["f=0.25 >= 2.5x faster"].append((batch, statistics.median(quarter) >= 2.5))
            lines.append(
                f"- batch {batch}: at f=1 LSHConv runs at {statistics.median(full):.2f}x Conv's speed "
                f"(median over layers, range {min(full):.2f}-{max(full):.2f}; target >= 0.77x, i.e. "
                f"within 1.3x: met on {sum(v >= 1 / 1.3 for v in full)}/{len(full)} layers); at "
                f"f=0.25 {statistics.median(quarter):.2f}x (range {min(quarter):.2f}-"
                f"{max(quarter):.2f}; target >= 2.5x: met on {sum(v >= 2.5 for v in quarter)}/"
                f"{len(quarter)} layers).")
        def said(target: str, results: list) -> str:
            met = [str(b) for b, ok in results if ok]
            missed = [str(b) for b, ok in results if not ok]
            return (f"{target}: met at batch {' and '.join(met)}" if met else f"{target}: not met") + (
                f"; missed at batch {' and '.join(missed)}" if met and missed else "")
        verdict = "; ".join(said(target, results) for target, results in verdicts.items()) + " (medians)."
        lines += [
            "",
            f"**Verdict: {verdict}** The CPU kernel is a direct convolution of the selected "
            "filters only (DiffConv's micro-kernel on channel tiles of the selected filters, or "
            "at stride 1 a row kernel for up to 16 of them (32 on long rows) or for layers with at most 32 "
            "multiply-adds per output; runtime_ext/ops/lsh_conv/README.md), so the "
            "multiply-adds scale with f. What does not scale with f: the hashing (window sums "
            "over the whole input and projections on L*K planes of D + 1 floats, per sample), "
            "gathering the selected filters' weights into tiles (per sample: the benchmark's "
            "tables select the same filters for every sample, but the kernel does not reuse "
            "them across samples), writing the unselected output channels' zeros (Y is as large "
            "as Conv's), and at batch 1 the per-call overhead of onnxruntime and Python that "
            "both sides pay. So the gain at f=0.25 is largest on layers with much work per "
            "output (3x3, many input channels) and smallest on 1x1 layers with few input "
            "channels, which are bounded by writing Y. The machine was shared and loaded (load "
            "average above): single entries are noisy; the medians are the figures to read.",
            "",
        ]
    if models:
        lines += [
            "Zoo models through the pipeline (calibration: 128 bundled training images; "
            "accuracy and agreement with the original on the bundled 2000 evaluation images; "
            "MACs kept from the ops' expected fractions, hashing included). Every group-1 conv "
            "gets the same --ratio and nothing is fine-tuned: per-layer errors compound, and the "
            "deeper residual models collapse even at 0.75. On calibration data a per-sample "
            "oracle is barely better than a fixed filter set (see runtime_ext/ops/lsh_conv/"
            "README.md), so LSHConv's calibration mostly ends up keeping fixed always-on filters.",
            "",
            "| model | method | --ratio | convs replaced | MACs kept | accuracy (orig → new) | agreement |",
            "|---|---|---:|---:|---:|---|---:|",
        ]
        for r in models:
            lines.append(
                f"| {r['model']} | {r['method']} | {r['ratio']} | {r['replaced']} | "
                f"{r['macs_ratio']:.2f} | {100 * r['accuracy_ref']:.2f} → {100 * r['accuracy']:.2f} | "
                f"{100 * r['agreement']:.1f}% |")
        lines.append("")
    lines.append("CUDA: the kernels build with nvcc 13 but no GPU was available to measure them; "
                 "`tests/runtime_ext/test_lsh_*.py -m cuda` checks them against the CPU kernels "
                 "on a GPU machine.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--models", help="comma-separated zoo models (default: all with checkpoints)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of docs/benchmarks/lsh_conv.json not measured now")
    args = parser.parse_args()
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    layers = [] if args.skip_layers else layer_rows(args.quick)
    models = [] if args.skip_models else model_rows(
        args.quick, args.models.split(",") if args.models else None)
    stored = SECTIONS / "lsh_conv.json"
    if args.merge and stored.is_file():
        old = json.loads(stored.read_text())
        load = old.get("load", load) if not layers else load
        layers = layers or old.get("layers", [])
        done = {(r["model"], r["method"], r["ratio"]) for r in models}
        models = [r for r in old.get("models", []) if (r["model"], r["method"], r["ratio"]) not in done] + models
        order = {"lenet5": 0, "vgg": 1, "resnet20": 2, "mobilenetv2": 3}
        models.sort(key=lambda r: (order.get(r["model"], 9), r["method"], -r["ratio"]))
    text = markdown(layers, models, load)
    print(text)
    atomic_write(SECTIONS / "lsh_conv.json",
                 json.dumps({"load": load, "layers": layers, "models": models}, indent=1))
    print(f"wrote {write_section('lsh_conv', text)}")


if __name__ == "__main__":
    main()
