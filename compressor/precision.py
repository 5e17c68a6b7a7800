"""The precision study (``compressor precision``): each layer's output error per algorithm
and number format, against a float64 direct reference, on the layer's real inputs.

Every Conv and every Gemm/MatMul with a constant weight is fed its inputs from calibration
data (``passes/calibrate.py``) and computed by each algorithm of
``compressor.precision_algorithms`` in each format; the error is the relative Frobenius norm
||y - y_ref|| / ||y_ref|| and the largest absolute difference. An algorithm that does not
apply to a layer or a format is recorded with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from compressor import precision_algorithms as algorithms
from compressor.errors import OptionError, UnsupportedModelError
from compressor.passes.diffconv import ConvGeometry
from compressor.passes.graph import constant_array, conv_attributes
from compressor.precision_algorithms import FORMATS, PRECISIONS, Layer, LogAddTable, NotApplicable

DEFAULT_RANKS = (0.25, 0.5)
DEFAULT_SAMPLES = 8
LOG_ADD_ENTRIES = 64  # entries of the approximate log-domain addition's correction table
INT8_NA = {
    "winograd2": "Winograd's transforms (1/2 in G) make non-integer operands",
    "winograd4": "Winograd's transforms (1/4, 1/6, 1/24 in G) make non-integer operands",
    "fft": "spectra are complex, not int8 values",
    "log": "log-domain operands are logarithms, not linear int8 values",
    "log-add": "log-domain operands are logarithms, not linear int8 values",
}


def _apply(name: str, rank: float | None = None) -> Callable:
    table = LogAddTable(LOG_ADD_ENTRIES)
    return {
        "direct": algorithms.direct,
        "im2col": algorithms.im2col,
        "winograd2": lambda layer, x, fmt: algorithms.winograd(layer, x, fmt, 2),
        "winograd4": lambda layer, x, fmt: algorithms.winograd(layer, x, fmt, 4),
        "fft": algorithms.fft,
        "svd": lambda layer, x, fmt: algorithms.svd(layer, x, fmt, rank),
        "log": algorithms.log_domain,
        "log-add": lambda layer, x, fmt: algorithms.log_domain(layer, x, fmt, table),
    }[name]


ALGORITHMS = {
    "direct": "direct",
    "im2col": "im2col + GEMM",
    "winograd2": "Winograd F(2x2,3x3)",
    "winograd4": "Winograd F(4x4,3x3)",
    "fft": "FFT",
    "svd": "SVD at each --ranks fraction",
    "log": "log-domain products, linear sums",
    "log-add": f"log-domain products and sums ({LOG_ADD_ENTRIES}-entry correction table)",
}


def _comma_list(text: str | Sequence[str], option: str, known: Sequence[str]) -> tuple[str, ...]:
    names = tuple(p.strip() for p in text.split(",")) if isinstance(text, str) else tuple(text)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise OptionError(f"{option}: unknown name '{unknown[0] if unknown else ''}'; choose "
                          f"from {', '.join(known)}")
    return tuple(dict.fromkeys(names))


def parse_ranks(text: str) -> tuple[float, ...]:
    """'0.25,0.5' -> (0.25, 0.5): fractions of each layer's full rank, in (0, 1]."""
    try:
        ranks = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise OptionError(f"--ranks: '{text}' is not a comma list of numbers, e.g. 0.25,0.5") \
            from None
    bad = [r for r in ranks if not (0 < r <= 1)]
    if bad:
        raise OptionError(f"--ranks: {bad[0]:g} is not a fraction of the rank in (0, 1]")
    return tuple(dict.fromkeys(ranks))


@dataclass(frozen=True)
class PrecisionConfig:
    algorithms: tuple[str, ...] = tuple(ALGORITHMS)
    precisions: tuple[str, ...] = PRECISIONS
    ranks: tuple[float, ...] = DEFAULT_RANKS
    layers: tuple[str, ...] | None = None
    samples: int = DEFAULT_SAMPLES

    def __post_init__(self):
        _comma_list(self.algorithms, "--algorithms", tuple(ALGORITHMS))
        _comma_list(self.precisions, "--precisions", PRECISIONS)
        if self.samples < 1:
            raise OptionError(f"--samples: must be at least 1, got {self.samples}")

    def variants(self) -> list[tuple[str, float | None]]:
        """(algorithm, rank) pairs: svd once per rank."""
        return [(a, r) for a in self.algorithms
                for r in (self.ranks if a == "svd" else (None,))]


def variant_name(algorithm: str, rank: float | None) -> str:
    return algorithm if rank is None else f"svd@{rank:g}"


@dataclass
class Measurement:
    layer: str
    op: str
    algorithm: str
    precision: str
    relative_error: float | None = None
    max_abs_error: float | None = None
    reason: str | None = None  # why n/a


@dataclass
class PrecisionStudy:
    model: str
    samples: int
    layers: list[dict[str, Any]]
    measurements: list[Measurement]
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why it is not studied
    log_add_table: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "samples": self.samples, "layers": self.layers,
                "skipped": self.skipped, "log_add_table": self.log_add_table,
                "measurements": self.measurements}


# ------------------------------------------------------------------------------ layers


def find_layers(model: ir.Model) -> tuple[list[tuple[Layer, str]], dict[str, str]]:
    """Every Conv and Gemm/MatMul with a constant weight, with the name of its input tensor;
    and, by name, the ones left out and why."""
    found, skipped = [], {}
    for index, node in enumerate(model.graph):
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or f"{node.op_type}_{index}"
        layer = _layer(node, name)
        if isinstance(layer, str):
            skipped[name] = layer
        else:
            found.append((layer, node.inputs[0].name))
    return found, skipped


def _layer(node: ir.Node, name: str) -> Layer | str:
    weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None:
        return "weight is not a constant"
    weight = weight.astype(np.float64)
    bias = constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
    if node.op_type == "Conv":
        attrs = conv_attributes(node, weight.shape)
        if isinstance(attrs, str):
            return attrs
        top, left, bottom, right = attrs.pads
        geometry = ConvGeometry(attrs.strides, (top, left, bottom, right), attrs.dilations)
        return Layer(name, "Conv", weight, None if bias is None else bias.astype(np.float64),
                     geometry, attrs.group)
    if weight.ndim != 2:
        return f"weight of rank {weight.ndim} (a 2-D weight only)"
    if node.op_type == "MatMul":
        return Layer(name, "MatMul", weight)
    attributes = node.attributes
    if attributes.get_int("transA", 0):
        return "transA=1"
    if attributes.get_int("transB", 0):
        weight = weight.T
    weight = weight * attributes.get_float("alpha", 1.0)
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        if bias is None:
            return "bias is not a constant"
        bias = np.broadcast_to(bias.astype(np.float64), (weight.shape[1],)) \
            * attributes.get_float("beta", 1.0)
    return Layer(name, "Gemm", weight, bias)


# ------------------------------------------------------------------------------ the study


def errors(y: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(relative Frobenius error, max absolute error) of ``y`` against ``reference``."""
    diff = y.astype(np.float64) - reference
    norm = float(np.linalg.norm(reference))
    with np.errstate(invalid="ignore", over="ignore"):
        frobenius = float(np.linalg.norm(diff))
        return (frobenius / norm if norm > 0 else frobenius), float(np.max(np.abs(diff)))


def structural_reason(algorithm: str, layer: Layer) -> str | None:
    """Why ``algorithm`` does not apply to the layer whatever the precision, or None."""
    if algorithm in ("winograd2", "winograd4"):
        return algorithms.winograd_applies(layer)
    if algorithm in ("im2col", "fft") and not layer.is_conv:
        return "not a convolution"
    if algorithm == "fft" and layer.group != 1:
        return f"group={layer.group}: one spectrum per group is not emulated"
    return None


def measure_layer(layer: Layer, x: np.ndarray, config: PrecisionConfig) -> list[Measurement]:
    """Every (algorithm, precision) of ``config`` on one layer fed ``x``."""
    x = x.astype(np.float64)
    reference = algorithms.direct(layer, x, FORMATS["fp64"])
    activation_scale = float(algorithms.quantize_symmetric(x)[1].item())
    out = []
    for algorithm, rank in config.variants():
        label = variant_name(algorithm, rank)
        for precision in config.precisions:
            m = Measurement(layer.name, layer.op, label, precision)
            try:
                reason = structural_reason(algorithm, layer)
                if reason is not None:
                    raise NotApplicable(reason)
                if precision == "int8":
                    if algorithm in INT8_NA:
                        raise NotApplicable(INT8_NA[algorithm])
                    y = algorithms.int8_gemm_layer(layer, x, activation_scale, rank)
                else:
                    y = _apply(algorithm, rank)(layer, x, FORMATS[precision])
                m.relative_error, m.max_abs_error = errors(y, reference)
            except NotApplicable as e:
                m.reason = str(e)
            out.append(m)
    return out


def log_add_table_error(table: LogAddTable | None = None) -> dict[str, float]:
    """The approximate log-domain addition's largest error in log2 units (a relative error
    of 2^e - 1 on the sum) over |d| = |log2 a - log2 b| in [0, 2 reach): same-sign
    operands, and opposite-sign ones from one table step up (below it their sum cancels to
    zero in the table)."""
    table = table or LogAddTable(LOG_ADD_ENTRIES)
    step = table.reach / table.entries
    exact = LogAddTable(None)
    out = {"entries": table.entries, "reach": table.reach}
    for key, same, first in (("same_sign_max_log2_error", True, 0.0),
                             ("opposite_sign_max_log2_error", False, step)):
        d = np.linspace(first, 2 * table.reach, 100_001)
        signs = np.full(d.shape, same)
        out[key] = float(np.max(np.abs(table.corrections(d, signs)
                                       - exact.corrections(d, signs))))
    return out


def run_study(
    model: str | Path,
    data: str,
    config: PrecisionConfig,
    *,
    arch: str | None = None,
    input_shape=None,
    trust_pickle: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> PrecisionStudy:
    """Load ``model`` and ``data`` as ``compress`` does, gather each layer's inputs on the
    first ``config.samples`` samples and measure every algorithm and precision."""
    from compressor import io
    from compressor.data import load_data, model_feeds
    from compressor.passes.calibrate import Calibration
    from compressor.passes.cleanup import CleanupPass

    dataset = load_data(data, split="train", limit=config.samples)
    loaded = io.load_model(model, arch=arch, input_shape=input_shape, trust_pickle=trust_pickle,
                           sample_inputs=dataset.inputs or dataset.x)
    graph_model = CleanupPass()(ir.serde.deserialize_model(loaded.proto)).model
    layers, skipped = find_layers(graph_model)
    if not layers:
        raise UnsupportedModelError(f"{model}: no Conv, Gemm or MatMul layer with a constant "
                                    "weight to study")
    if config.layers is not None:
        known = {layer.name for layer, _ in layers}
        unknown = [n for n in config.layers if n not in known]
        if unknown:
            raise OptionError(f"--layers: no layer '{unknown[0]}' in {model} (layers: "
                              f"{', '.join(sorted(known))})")
        layers = [(layer, name) for layer, name in layers if layer.name in config.layers]
    feeds = model_feeds(dataset, loaded.inputs, source=str(data))
    inputs = Calibration(feeds.arrays).collect(graph_model, list(dict.fromkeys(n for _, n in layers)))
    measurements, described = [], []
    for done, (layer, input_name) in enumerate(layers):
        x = inputs[input_name]
        described.append({"name": layer.name, "op": layer.op, "input_shape": list(x.shape),
                          "weight_shape": list(layer.weight.shape), "group": layer.group})
        measurements.extend(measure_layer(layer, x, config))
        if progress is not None:
            progress("precision: layers", done + 1, len(layers))
    return PrecisionStudy(str(model), len(dataset), described, measurements, skipped,
                          log_add_table_error())


# ------------------------------------------------------------------------------ output


def _cell(m: Measurement) -> str:
    if m.reason is not None:
        return "n/a"
    if m.relative_error is None or not math.isfinite(m.relative_error):
        return "overflow"
    return f"{m.relative_error:.1e} | {m.max_abs_error:.1e}"


def results_table(study: PrecisionStudy):
    """A rich table: one row per layer and algorithm, one column per precision (relative
    error | max abs error)."""
    from compressor.report import _table

    precisions = list(dict.fromkeys(m.precision for m in study.measurements))
    reasons = sorted({m.reason for m in study.measurements if m.reason})
    caption = ("cells: relative Frobenius error | max abs error, vs float64 direct; "
               f"{study.samples} samples. n/a: " + "; ".join(reasons)) if reasons else None
    table = _table(title=f"precision: {study.model}", caption=caption)
    for header in ("layer", "algorithm", *precisions):
        table.add_column(header, justify="left" if header in ("layer", "algorithm") else "right")
    rows: dict[tuple[str, str], dict[str, Measurement]] = {}
    for m in study.measurements:
        rows.setdefault((m.layer, m.algorithm), {})[m.precision] = m
    previous = None
    for (layer, algorithm), cells in rows.items():
        table.add_row(layer if layer != previous else "", algorithm,
                      *(_cell(cells[p]) if p in cells else "" for p in precisions))
        previous = layer
    return table


def aggregate(study: PrecisionStudy) -> dict[str, dict[str, float]]:
    """Median relative error over the layers it applies to, by algorithm and precision."""
    values: dict[str, dict[str, list[float]]] = {}
    for m in study.measurements:
        if m.relative_error is not None and math.isfinite(m.relative_error):
            values.setdefault(m.algorithm, {}).setdefault(m.precision, []).append(m.relative_error)
    return {a: {p: float(np.median(v)) for p, v in by.items()} for a, by in values.items()}


ERROR_FLOOR = 1e-18  # an exact result (0) drawn on the log axis


def plot_study(study: PrecisionStudy, path: str | Path) -> Path:
    """Error vs precision (log axis), one line per algorithm: the median over layers."""
    from compressor.plots import _figure, save_figure

    precisions = [p for p in PRECISIONS if any(m.precision == p for m in study.measurements)]
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot()
    for algorithm, by in aggregate(study).items():
        points = [(i, max(by[p], ERROR_FLOOR)) for i, p in enumerate(precisions) if p in by]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=algorithm)
    ax.set_xticks(range(len(precisions)), precisions)
    ax.set_yscale("log")
    ax.set_xlabel("precision")
    ax.set_ylabel("relative error vs float64 (median over layers)")
    ax.set_title(f"{Path(study.model).name}: {len(study.layers)} layers, "
                 f"{study.samples} samples", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return save_figure(fig, path)


def write_json(study: PrecisionStudy, path: str | Path) -> Path:
    """The study as JSON at ``path``, written atomically."""
    from compressor.io import atomic_write_bytes
    from compressor.report import to_json

    atomic_write_bytes(Path(path), to_json(study.to_dict()).encode())
    return Path(path)


def check_output(path: Path | None, option: str, suffix: str | None = None) -> None:
    """Raise ``OptionError`` before any work when ``path`` cannot be an output file."""
    if path is None:
        return
    if suffix is not None and path.suffix.lower() != suffix:
        raise OptionError(f"{option}: '{path}' must end in {suffix}")
    if path.is_dir():
        raise OptionError(f"{option}: '{path}' is a directory; give a file name")
