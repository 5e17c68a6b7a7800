"""DiffConv vs onnxruntime's Conv on the zoo's convolution layers: time, multiplications and
the accuracy each threshold costs.

    python bench/bench_diffconv.py [--models vgg,resnet20] [--rounds N] [--quick]

1. Settings per zoo model. ``compressor compress --method diffconv --ratio r`` chooses each
   layer's threshold from calibration data (bundled training images) so that it keeps at most
   ``r`` of the multiplications. Besides ``exact`` (threshold 0) and fixed keep fractions of 25%
   and 10%, ``r`` is bisected for the smallest value whose top-1 accuracy stays within 0.5 and
   within 1 point of the original, judged on the bundled 2000-image evaluation subset; the
   accuracy then reported is on the full Fashion-MNIST test set when it is installed.
2. Whole models: accuracy, the ops' own multiplication counters, and latency against the
   original ONNX model (``compressor.evaluate``: side by side, spinning off).
3. Layers: every DiffConv node of those models on its real input activations (the exact
   model's, eval images) at batch 1 and 64, as a one-node Conv model and one-node DiffConv
   models at each setting's threshold, side by side in one process: alternating order,
   spinning off, medians over rounds spread over the run (the machine is shared; the load
   average is recorded, and the same ratios in process CPU time, which other jobs barely move).

Targets (issue 3): threshold 0 within 1.5x of Conv's time; faster than Conv where >= 75% of
the multiplications are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, SECTIONS, atomic_write, write_section  # noqa: E402

from compressor import io, runtime  # noqa: E402
from compressor.data import load_data  # noqa: E402
from compressor.errors import DataError  # noqa: E402
from compressor.evaluate import evaluate  # noqa: E402
from compressor.models import zoo  # noqa: E402
from compressor.pipeline import CompressOptions, compress  # noqa: E402

CALIB = ROOT / "models" / "data" / "fashion_mnist_calib.npz"
EVAL = ROOT / "models" / "data" / "fashion_mnist_eval.npz"
MODELS = ("lenet5", "vgg", "resnet20", "mobilenetv2")
BUDGETS = (0.5, 1.0)  # accuracy points the searched settings may lose
FIXED_KEEP = (0.25, 0.10)
BISECTION_STEPS = 6
LAYER_BATCHES = (1, 64)


@dataclass
class Setting:
    """One way to compress a model: a --ratio and what it gave."""

    label: str  # "exact", "-0.5 pt", "keep 25%", ...
    ratio: float
    path: Path
    thresholds: list[float]  # per DiffConv node, in graph order
    search_accuracy: float  # on the bundled eval subset
    report: dict = field(default_factory=dict)


@dataclass
class Layer:
    model: str
    name: str
    weight: np.ndarray
    bias: np.ndarray | None
    attributes: dict  # strides, pads, dilations
    activations: np.ndarray  # [64, C, H, W]

    @property
    def label(self) -> str:
        m, c, kh, kw = self.weight.shape
        h, w = self.activations.shape[2:]
        strided = " s2" if list(self.attributes["strides"]) != [1, 1] else ""
        return f"{c}->{m} {kh}x{kw} @{h}x{w}{strided}"


def load_average() -> str:
    try:
        return ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover - not on Linux
        return "unknown"


def test_data():
    try:
        return load_data("fashion-mnist", split="test"), "the Fashion-MNIST test set (10000)"
    except DataError:
        return load_data(EVAL), "the bundled Fashion-MNIST subset (2000)"


def accuracy(path: Path, x: np.ndarray, y: np.ndarray, batch: int = 250) -> float:
    sess = runtime.session(path)
    name = sess.get_inputs()[0].name
    logits = np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    return float((logits.argmax(axis=1) == y).mean())


def diffconv_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if n.domain == runtime.OP_DOMAIN and n.op_type == "DiffConv"]


def thresholds_of(path: Path) -> list[float]:
    proto = onnx.load(str(path))
    return [next((a.f for a in n.attribute if a.name == "threshold"), 0.0) for n in diffconv_nodes(proto)]


class ModelSearch:
    """Compressions of one zoo model at chosen ratios, cached, with their search accuracy."""

    def __init__(self, name: str, workdir: Path, search: tuple[np.ndarray, np.ndarray]):
        self.name, self.workdir, self.search = name, workdir, search
        self.cache: dict[float, Setting] = {}

    def at(self, ratio: float, label: str = "") -> Setting:
        ratio = round(ratio, 4)
        if ratio not in self.cache:
            path = self.workdir / f"{self.name}_{ratio}.onnx"
            compress(CompressOptions(model=zoo.get(self.name).checkpoint, arch=self.name,
                                     method="diffconv", ratio=ratio, data=str(CALIB), output=path))
            self.cache[ratio] = Setting(label, ratio, path, thresholds_of(path),
                                        accuracy(path, *self.search))
        setting = self.cache[ratio]
        return Setting(label or setting.label, ratio, setting.path, setting.thresholds,
                       setting.search_accuracy)

    def within(self, budget: float, reference: float, steps: int) -> Setting:
        """Smallest ratio (bisection) whose search accuracy is at most ``budget`` points below
        ``reference``; ratio 1 (threshold 0, exact) always qualifies."""
        good, bad = 1.0, 0.02
        for _ in range(steps):
            middle = (good + bad) / 2
            if 100 * (reference - self.at(middle).search_accuracy) <= budget:
                good = middle
            else:
                bad = middle
        return self.at(good, f"-{budget:g} pt")


def model_settings(name: str, workdir: Path, search, steps: int) -> list[Setting]:
    finder = ModelSearch(name, workdir, search)
    exact = finder.at(1.0, "exact")
    settings = [exact] + [finder.within(b, exact.search_accuracy, steps) for b in BUDGETS]
    settings += [finder.at(keep, f"keep {keep:.0%}") for keep in FIXED_KEEP]
    print(f"{name}: " + ", ".join(f"{s.label} r={s.ratio:.3f} acc={s.search_accuracy:.4f}"
                                  for s in settings), file=sys.stderr, flush=True)
    return settings


def counted_macs(path: Path, x: np.ndarray) -> float:
    """performed / dense multiplications over the model's DiffConv nodes, from the ops' own
    counters on inputs x."""
    proto = onnx.load(str(path))
    outputs = []
    for i, node in enumerate(diffconv_nodes(proto)):
        while len(node.output) < 2:
            node.output.append("")
        node.output[1] = f"__counts_{i}"
        outputs.append(helper.make_tensor_value_info(node.output[1], TensorProto.INT64, [2]))
    proto.graph.output.extend(outputs)
    sess = runtime.session(proto)
    counts = sess.run([o.name for o in outputs], {sess.get_inputs()[0].name: x})
    return sum(float(c[0]) for c in counts) / max(sum(float(c[1]) for c in counts), 1.0)


def model_layers(name: str, exact: Path, x: np.ndarray) -> list[Layer]:
    """Every DiffConv node of the exact model with the activations it sees on x."""
    proto = onnx.load(str(exact))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    nodes = diffconv_nodes(proto)
    probe = onnx.load(str(exact))
    known = {o.name for o in probe.graph.output}
    for node in nodes:
        if node.input[0] not in known:
            probe.graph.output.append(helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, None))
            known.add(node.input[0])
    sess = runtime.session(probe)
    wanted = [n.input[0] for n in nodes]
    values = dict(zip(wanted, sess.run(wanted, {sess.get_inputs()[0].name: x}), strict=True))
    layers = []
    for node in nodes:
        attrs = {a.name: list(a.ints) for a in node.attribute if a.name in ("strides", "pads", "dilations")}
        bias = inits[node.input[2]] if len(node.input) > 2 and node.input[2] else None
        layers.append(Layer(name, node.name, inits[node.input[1]], bias, attrs,
                            np.ascontiguousarray(values[node.input[0]], dtype=np.float32)))
    return layers


def one_node(op: str, x_shape, layer: Layer, counts: bool = False, **extra) -> onnx.ModelProto:
    domain = runtime.OP_DOMAIN if op == "DiffConv" else ""
    inits = [numpy_helper.from_array(layer.weight, "W")]
    inputs = ["X", "W"]
    if layer.bias is not None:
        inits.append(numpy_helper.from_array(layer.bias, "B"))
        inputs.append("B")
    outputs = ["Y", "counts"] if counts else ["Y"]
    node = helper.make_node(op, inputs, outputs, domain=domain, **layer.attributes, **extra)
    graph_outputs = [helper.make_tensor_value_info(o, TensorProto.INT64 if o == "counts" else TensorProto.FLOAT, None)
                     for o in outputs]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))],
                              graph_outputs, inits)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


def time_side_by_side(sessions: list, x: np.ndarray, budget_s: float) -> list[tuple[float, float]]:
    """(median wall seconds, median process CPU seconds) per run of each session, run in
    alternating order. CPU time (all threads of the process) hardly moves when other jobs
    take the cores, wall time does; the targets are about wall time."""
    feed = {"X": x}
    for s in sessions:
        s.run(None, feed)
    start = time.perf_counter()
    sessions[0].run(None, feed)
    one = max(time.perf_counter() - start, 1e-5)
    reps = int(min(200, max(5, budget_s / (len(sessions) * one))))
    wall = [[] for _ in sessions]
    cpu = [[] for _ in sessions]
    for r in range(reps):
        order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
        for i in order:
            t, c = time.perf_counter(), time.process_time()
            sessions[i].run(None, feed)
            wall[i].append(time.perf_counter() - t)
            cpu[i].append(time.process_time() - c)
    return [(statistics.median(w), statistics.median(c)) for w, c in zip(wall, cpu, strict=True)]


@dataclass
class Case:
    layer: Layer
    batch: int
    settings: list[tuple[str, float]]  # (label, threshold)
    x: np.ndarray
    sessions: list  # Conv, then DiffConv at each setting
    rounds: list[list[tuple[float, float]]] = field(default_factory=list)


def time_layers(layers_settings: list[tuple[Layer, list[tuple[str, float]]]], rounds: int,
                budget_s: float) -> list[dict]:
    cases = []
    for layer, settings in layers_settings:
        for batch in LAYER_BATCHES:
            x = np.ascontiguousarray(layer.activations[:batch])
            sessions = [runtime.session(one_node("Conv", x.shape, layer))]
            sessions += [runtime.session(one_node("DiffConv", x.shape, layer, threshold=float(t)))
                         for _, t in settings]
            cases.append(Case(layer, batch, settings, x, sessions))
    # Rounds over every case, so a burst of load from other users hits one round of a case.
    for index in range(rounds):
        for case in cases:
            case.rounds.append(time_side_by_side(case.sessions, case.x, budget_s))
        print(f"layer round {index + 1}/{rounds} done (load {load_average()})", file=sys.stderr, flush=True)
    rows = []
    for case in cases:
        layer, x = case.layer, case.x
        wall = [statistics.median(r[i][0] for r in case.rounds) for i in range(len(case.sessions))]
        cpu = [statistics.median(r[i][1] for r in case.rounds) for i in range(len(case.sessions))]
        reference = case.sessions[0].run(None, {"X": x})[0]
        for i, (label, t) in enumerate(case.settings, start=1):
            counted = runtime.session(one_node("DiffConv", x.shape, layer, counts=True, threshold=float(t)))
            y, (performed, dense) = counted.run(None, {"X": x})
            error = float(np.linalg.norm(y - reference) / max(np.linalg.norm(reference), 1e-30))
            rows.append({"model": layer.model, "layer": layer.name, "shape": layer.label,
                         "batch": case.batch, "setting": label, "threshold": float(t),
                         "performed": float(performed) / float(dense), "conv_ms": 1e3 * wall[0],
                         "diffconv_ms": 1e3 * wall[i], "ratio": wall[i] / wall[0],
                         "cpu_ratio": cpu[i] / cpu[0], "error": error})
    return rows


def run(models, rounds: int, steps: int, quick: bool) -> dict:
    data, data_name = test_data()
    search = load_data(EVAL)
    search_xy = (search.x.astype(np.float32), search.y)
    x_layers = np.ascontiguousarray(search.x[:max(LAYER_BATCHES)], dtype=np.float32)
    load_before = load_average()
    model_rows, layer_settings = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            settings = model_settings(name, Path(tmp), search_xy, steps)
            reference = io.load_model(zoo.get(name).checkpoint, arch=name).proto
            for s in settings:
                report = evaluate(s.path, reference=reference, data=data, progress=False,
                                  latency_min_time_s=0.3 if quick else 1.0, candidate_name=s.label)
                c = report.comparison
                model_rows.append({
                    "model": name, "setting": s.label, "ratio": s.ratio,
                    "performed": counted_macs(s.path, x_layers),
                    "accuracy_ref": report.reference.accuracy, "accuracy": report.candidate.accuracy,
                    "search_accuracy": s.search_accuracy,
                    "delta_points": 100 * c.accuracy_delta, "agreement": c.agreement,
                    "speedup_b1": c.speedup.get(1), "speedup_b64": c.speedup.get(64),
                })
                print(json.dumps(model_rows[-1]), file=sys.stderr, flush=True)
            layers = model_layers(name, settings[0].path, x_layers)
            if quick:
                layers = layers[:2]
            for i, layer in enumerate(layers):
                layer_settings.append((layer, [(s.label, s.thresholds[i]) for s in settings]))
        layer_rows = time_layers(layer_settings, rounds, 0.3 if quick else 1.0)
    return {"data": data_name, "load_before": load_before, "load_after": load_average(),
            "rounds": rounds, "models": model_rows, "layers": layer_rows}


def _speed(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def markdown(result: dict) -> str:
    models, layers = result["models"], result["layers"]
    lines = [
        "## Differential convolution (DiffConv) vs onnxruntime Conv",
        "",
        "Every group-1 Conv of the zoo models becomes a DiffConv (`compressor compress --method "
        "diffconv --ratio r`, thresholds chosen per layer from 512 bundled training images). "
        "Settings per model: `exact` (threshold 0); `-0.5 pt` and `-1 pt`, the smallest `r` "
        f"(bisection, {BISECTION_STEPS} steps) whose accuracy on the bundled 2000 evaluation images "
        "stays within 0.5 / 1 point of the original; `keep 25%`, `keep 10%`: `r` = 0.25, 0.1. "
        "`performed` is the ops' own count of multiplications / dense (64 evaluation images): the "
        "algorithm's count, restart windows plus kept differences. The kernel does exactly that "
        "work on its sparse path; when many differences are kept it runs a dense product over the "
        "difference image instead (skipped differences multiplied as zeros), which is faster there "
        "but saves no time, so time falls only where few differences are kept.",
        "",
        "### Whole models",
        "",
        f"Accuracy on {result['data']}, no fine-tuning; latency side by side with the original "
        "ONNX model (spinning off).",
        "",
        "| model | setting | --ratio | performed | accuracy (orig → new) | Δ pt | agreement | speedup b1 | speedup b64 |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in models:
        lines.append(
            f"| {r['model']} | {r['setting']} | {r['ratio']:.3f} | {r['performed']:.1%} | "
            f"{100 * r['accuracy_ref']:.2f} → {100 * r['accuracy']:.2f} | {r['delta_points']:+.2f} | "
            f"{r['agreement']:.1%} | {_speed(r['speedup_b1'])} | {_speed(r['speedup_b64'])} |")
    lines += [
        "",
        "### Layers",
        "",
        "Each DiffConv node on its real input activations, as one-node models side by side with a "
        "one-node Conv in one process (alternating order, spinning off, default thread count; "
        f"median of per-round medians over {result['rounds']} rounds). Load average (1, 5, 15 min) "
        f"before: {result['load_before']}; after: {result['load_after']} ({os.cpu_count()} cores, "
        "shared with other users' jobs). Ratios are DiffConv / Conv (below 1: faster); the CPU "
        "column is the same ratio in process CPU time, which other jobs barely move. Error is "
        "||y - Conv|| / ||Conv||.",
        "",
        "| model | layer | batch | setting | threshold | performed | Conv ms | DiffConv / Conv | CPU time | rel. error |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in layers:
        lines.append(
            f"| {r['model']} | {r['shape']} | {r['batch']} | {r['setting']} | {r['threshold']:.3g} | "
            f"{r['performed']:.1%} | {r['conv_ms']:.3f} | {r['ratio']:.2f}x | {r['cpu_ratio']:.2f}x | "
            f"{r['error']:.1e} |")
    exact = [r for r in layers if r["setting"] == "exact"]
    wall = [r["ratio"] for r in exact]
    cpu = [r["cpu_ratio"] for r in exact]
    lines += [
        "",
        f"**Threshold 0 (exact)**, target within 1.5x of Conv: median {statistics.median(wall):.2f}x "
        f"(range {min(wall):.2f}-{max(wall):.2f}x), within 1.5x in {sum(v <= 1.5 for v in wall)} "
        f"of {len(wall)} cases; in CPU time median {statistics.median(cpu):.2f}x, within 1.5x in "
        f"{sum(v <= 1.5 for v in cpu)} of {len(cpu)}.",
    ]
    skipped = [r for r in layers if r["performed"] <= 0.25]
    if skipped:
        wall = [r["ratio"] for r in skipped]
        cpu = [r["cpu_ratio"] for r in skipped]
        slower = [f"{r['model']} {r['shape']} b{r['batch']} {r['setting']} ({r['performed']:.0%}): "
                  f"{r['ratio']:.2f}x" for r in skipped if r["ratio"] >= 1.0]
        lines.append(
            f"**Where >= 75% of the multiplications were skipped** (performed <= 25%), target faster "
            f"than Conv: median {statistics.median(wall):.2f}x, faster in {len(wall) - len(slower)} of "
            f"{len(wall)} cases; in CPU time median {statistics.median(cpu):.2f}x, less in "
            f"{sum(v < 1.0 for v in cpu)} of {len(cpu)}."
            + (f" Not faster: {'; '.join(slower)}." if slower else ""))
    for budget in BUDGETS:
        label = f"-{budget:g} pt"
        rows = [r for r in layers if r["setting"] == label]
        if rows:
            wall = [r["ratio"] for r in rows]
            performed = [r["performed"] for r in rows]
            lines.append(
                f"**Within {budget:g} point of accuracy** ({label}): layers perform a median "
                f"{statistics.median(performed):.0%} of the multiplications and run at a median "
                f"{statistics.median(wall):.2f}x Conv's time (faster in {sum(v < 1 for v in wall)} of "
                f"{len(wall)} cases).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="zoo models (comma-separated)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds per layer (default 3)")
    parser.add_argument("--steps", type=int, default=BISECTION_STEPS, help="bisection steps per budget")
    parser.add_argument("--quick", action="store_true", help="two layers per model, short timing, no files")
    parser.add_argument("--from-json", action="store_true", help="re-render docs/benchmarks/diffconv.json")
    args = parser.parse_args()
    raw = SECTIONS / "diffconv.json"
    if args.from_json:
        result = json.loads(raw.read_text())
    else:
        result = run([m for m in args.models.split(",") if m], max(1, args.rounds), args.steps, args.quick)
    text = markdown(result)
    print(text)
    if args.quick:
        return
    if not args.from_json:
        atomic_write(raw, json.dumps(result, indent=1))
    print(f"wrote {write_section('diffconv', text)}")


if __name__ == "__main__":
    main()
