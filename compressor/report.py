"""Tables (rich) and JSON for what compressor measured.

Every table renders in a terminal with colour and as plain text when the output is a file or
a pipe (rich decides); numbers are shown with SI prefixes (1.23 M params, 45.6 MMACs, 1.2 MB).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from rich import box
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from compressor.evaluate import EvaluationReport
    from compressor.passes.base import LayerRecord
    from compressor.profile import ModelProfile

DASH = "—"
_PREFIXES = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


# ----------------------------------------------------------------------------- numbers


def _three_digits(value: float) -> str:
    """Three significant digits, no exponent: 1.23, 45.6, 789."""
    if value == 0:
        return "0"
    digits = max(0, 2 - int(math.floor(math.log10(abs(value)))))
    text = f"{value:.{digits}f}"
    # rounding can carry into a fourth digit (999.6 -> 1000); that is still readable
    return text


def _si(value: float | None, unit: str = "", *, space: bool = True) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    sep = " " if space else ""
    for scale, prefix in _PREFIXES:
        if abs(value) >= scale:
            return f"{_three_digits(value / scale)}{sep}{prefix}{unit}"
    if float(value).is_integer():
        return f"{int(value)}{sep}{unit}".rstrip()
    return f"{_three_digits(value)}{sep}{unit}".rstrip()


def format_count(n: float | None) -> str:
    """1234567 -> '1.23 M'; 512 -> '512'."""
    return _si(n)


def format_macs(n: float | None) -> str:
    """45_600_000 -> '45.6 MMACs'."""
    return _si(n, "MACs")


def format_bytes(n: float | None) -> str:
    """1_234_567 -> '1.23 MB' (decimal prefixes, as file managers show)."""
    return _si(n, "B")


def format_ms(ms: float | None) -> str:
    """A duration given in milliseconds, three significant digits: '12.3 ms', '45.6 µs'."""
    if ms is None or not math.isfinite(ms):
        return DASH
    if ms >= 1000:
        return f"{_three_digits(ms / 1000)} s"
    if 0 < ms < 1:
        return f"{_three_digits(ms * 1000)} µs"
    return f"{_three_digits(ms)} ms"


def format_ratio(r: float | None) -> str:
    """0.4812 -> '0.481×'."""
    if r is None or not math.isfinite(r):
        return DASH
    return f"{_three_digits(r)}×"


def format_percent(fraction: float | None, digits: int = 2) -> str:
    """0.91234 -> '91.23 %'."""
    if fraction is None or not math.isfinite(fraction):
        return DASH
    return f"{fraction * 100:.{digits}f} %"


def format_points(delta: float | None) -> str:
    """A difference of fractions in percentage points: -0.012 -> '-1.20 pt'."""
    if delta is None or not math.isfinite(delta):
        return DASH
    return f"{delta * 100:+.2f} pt"


def format_float(value: float | None) -> str:
    """Small magnitudes (logit differences, errors) readably: 0.00123 -> '1.23e-03'."""
    if value is None or not math.isfinite(value):
        return DASH
    if value == 0:
        return "0"
    if 1e-2 <= abs(value) < 1e4:
        return _three_digits(value)
    return f"{value:.2e}"


def format_cosine(value: float | None) -> str:
    """A cosine similarity near 1 with the digits that tell models apart: '0.999874'."""
    if value is None or not math.isfinite(value):
        return DASH
    return f"{value:.6f}"


def format_shape(shape: Sequence[int] | None) -> str:
    """(64, 3, 3, 3) -> '64×3×3×3'."""
    if shape is None:
        return DASH
    if len(shape) == 0:
        return "scalar"
    return "×".join(str(d) for d in shape)


def format_params_macs(params: int, macs: int) -> str:
    """'1.23 M params, 45.6 MMACs'."""
    return f"{format_count(params)} params, {format_macs(macs)}"


def _before_after(before: str, after: str) -> str:
    return before if before == after else f"{before} → {after}"


# ----------------------------------------------------------------------------- JSON


def jsonable(obj: Any) -> Any:
    """Plain JSON types for ``obj``: dataclasses become dicts, numpy scalars and arrays become
    numbers and lists, mapping keys strings, paths strings, non-finite floats None (strict JSON
    has no NaN); anything else unknown becomes its ``str``."""
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, enum.Enum):
        return jsonable(obj.value)
    if isinstance(obj, PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        # field by field rather than dataclasses.asdict, which deep-copies every value
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(jsonable(k)): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    return str(obj)


def to_json(obj: Any, indent: int | None = 2) -> str:
    """``obj`` (dataclasses, dicts, numpy values ...) as a strict JSON string."""
    return json.dumps(jsonable(obj), indent=indent, allow_nan=False)


# ----------------------------------------------------------------------------- tables


def _table(title: str | None = None, caption: str | None = None) -> Table:
    # A rule under the header and no vertical lines: light to read, and narrow enough that
    # the per-layer tables fit in 80 columns (rich's width when output is piped).
    return Table(
        title=title,
        caption=caption,
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
        header_style="bold",
        title_style="bold",
        title_justify="left",
        caption_justify="left",
        caption_style="dim",
    )


def evaluation_table(report: EvaluationReport) -> Table:
    """The evaluation side by side: metric | reference | compressed | ratio or delta."""
    cand, ref, comp = report.candidate, report.reference, report.comparison
    title = f"{cand.name} vs {ref.name}" if ref is not None else cand.name
    caption = _evaluation_caption(report)
    table = _table(title, caption)
    table.min_width = 60  # room for the machine and the notes in the caption
    table.add_column("metric")
    if ref is not None:
        table.add_column("reference", justify="right")
    table.add_column("compressed" if ref is not None else "value", justify="right")
    if ref is not None:
        table.add_column("ratio / delta", justify="right")

    def row(metric: str, reference: str, candidate: str, change: str | Text = "", **kw):
        cells = [metric] + ([reference] if ref is not None else []) + [candidate]
        if ref is not None:
            cells.append(change)
        table.add_row(*cells, **kw)

    row(
        "accuracy",
        format_percent(ref.accuracy) if ref else "",
        format_percent(cand.accuracy),
        _signed(format_points(comp.accuracy_delta), comp.accuracy_delta) if comp else "",
    )
    if comp is not None:
        # outputs that are not class logits (embeddings, hidden states) have no top-1
        if comp.agreement is not None:
            row("top-1 agreement", DASH, format_percent(comp.agreement))
        row("cosine similarity, mean", DASH, format_cosine(comp.cosine_mean))
        row("cosine similarity, min", DASH, format_cosine(comp.cosine_min))
        what = "logit" if comp.output_kind == "logits" else "output"
        row(f"max |{what} diff|", DASH, format_float(comp.max_abs_logit_diff))
        row(f"mean |{what} diff|", DASH, format_float(comp.mean_abs_logit_diff), end_section=True)
    else:
        table.rows[-1].end_section = True

    batches = sorted(set(cand.latency) | (set(ref.latency) if ref else set()))
    for i, batch in enumerate(batches):
        c = cand.latency.get(batch)
        r = ref.latency.get(batch) if ref else None
        speedup = comp.speedup.get(batch) if comp else None
        row(
            f"latency p50, batch {batch}",
            format_ms(r.p50_ms) if r else DASH,
            format_ms(c.p50_ms) if c else DASH,
            _speedup(speedup),
        )
        row(
            f"latency p95, batch {batch}",
            format_ms(r.p95_ms) if r else DASH,
            format_ms(c.p95_ms) if c else DASH,
            end_section=i == len(batches) - 1,
        )

    row(
        "params",
        format_count(ref.params) if ref else "",
        format_count(cand.params),
        format_ratio(comp.params_ratio) if comp else "",
    )
    row(
        "MACs / sample",
        format_macs(ref.macs) if ref else "",
        format_macs(cand.macs),
        format_ratio(comp.macs_ratio) if comp else "",
    )
    row(
        "file size",
        format_bytes(ref.file_bytes) if ref else "",
        format_bytes(cand.file_bytes),
        format_ratio(comp.size_ratio) if comp else "",
    )
    if cand.int8_nodes or (ref is not None and ref.int8_nodes):
        row("int8 nodes", str(len(ref.int8_nodes)) if ref else "", str(len(cand.int8_nodes)))
    return table


def _signed(text: str, value: float | None) -> Text:
    if value is None or not math.isfinite(value) or value == 0:
        return Text(text)
    return Text(text, style="green" if value > 0 else "red")


def _speedup(speedup: float | None) -> Text:
    if speedup is None or not math.isfinite(speedup) or speedup <= 0:
        return Text(DASH)
    if speedup >= 1:
        return Text(f"{_three_digits(speedup)}× faster", style="green")
    return Text(f"{_three_digits(1 / speedup)}× slower", style="red")


def _evaluation_caption(report: EvaluationReport) -> str:
    machine = report.machine or {}
    inputs = (
        f"{report.samples} samples of {report.data}"
        if report.data
        else f"{report.samples} random inputs"
    )
    lines = [f"{inputs}, provider {report.provider}"]
    where = machine.get("gpu") or machine.get("cpu")
    if where:
        cores = machine.get("usable_cores") or machine.get("cores")
        lines.append(where + (f" ({cores} cores)" if cores and not machine.get("gpu") else ""))
    if machine.get("onnxruntime"):
        lines.append(f"onnxruntime {machine['onnxruntime']}")
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)


def _fixed(table: Table, header: str, **kw) -> None:
    """A column that never wraps (shapes, numbers): rich narrows the wrapping ones first."""
    table.add_column(header, no_wrap=True, **kw)


def layer_table(records: Iterable[LayerRecord], title: str | None = "layers") -> Table:
    """Per-layer table of a compression run; skipped layers are dimmed and show why.

    The error basis ('activations' or 'weights') goes in the header when all layers share
    it, else beside each error.
    """
    records = list(records)
    bases = {r.error_basis for r in records if r.error is not None and r.error_basis}
    common_basis = bases.pop() if len(bases) == 1 else None
    table = _table(title)
    table.add_column("layer", overflow="fold", min_width=8)
    _fixed(table, "op")
    _fixed(table, "shape")
    _fixed(table, "MACs", justify="right")
    _fixed(table, "params", justify="right")
    _fixed(
        table, f"rel. error\n({common_basis})" if common_basis else "rel. error", justify="right"
    )
    table.add_column("detail", overflow="fold", min_width=12)
    for r in records:
        skipped = r.skipped is not None
        shape = format_shape(r.shape_before)
        if r.shape_after is not None and not skipped:
            shape = _before_after(shape, format_shape(r.shape_after))
        macs, params = format_count(r.macs_before), format_count(r.params_before)
        if not skipped:
            macs = _before_after(macs, format_count(r.macs_after))
            params = _before_after(params, format_count(r.params_after))
        error = format_float(r.error)
        if r.error is not None and r.error_basis and common_basis is None:
            error += f" ({r.error_basis})"
        table.add_row(
            r.name,
            r.op,
            shape,
            macs,
            params,
            error,
            f"skipped: {r.skipped}" if skipped else r.detail,
            style="dim" if skipped else None,
        )
    if records:
        # a skipped layer keeps its cost
        before = sum(r.macs_before for r in records)
        after = sum(r.macs_before if r.skipped is not None else r.macs_after for r in records)
        p_before = sum(r.params_before for r in records)
        p_after = sum(r.params_before if r.skipped is not None else r.params_after for r in records)
        changed = sum(1 for r in records if r.skipped is None)
        table.add_section()
        table.add_row(
            "total",
            "",
            "",
            _before_after(format_count(before), format_count(after)),
            _before_after(format_count(p_before), format_count(p_after)),
            "",
            f"{changed} changed, {len(records) - changed} skipped",
            style="bold",
        )
    return table


def profile_table(
    profile: ModelProfile,
    *,
    title: str | None = "profile",
    only_costly: bool = False,
) -> Table:
    """Per-layer profile for ``compressor inspect``: shapes, params, MACs and share of MACs.

    Activation shapes are shown per sample (without the batch dimension, which the profile
    fixes at 1). ``only_costly`` leaves out layers with neither parameters nor MACs (the
    totals still count everything).
    """

    def per_sample(shape):
        return format_shape(shape[1:]) if shape else format_shape(shape)

    total_macs = profile.macs
    table = _table(title)
    table.add_column("layer", overflow="fold", min_width=8)
    _fixed(table, "op")
    _fixed(table, "input")
    _fixed(table, "output")
    _fixed(table, "weight")
    _fixed(table, "params", justify="right")
    _fixed(table, "MACs", justify="right")
    _fixed(table, "share", justify="right")
    for layer in profile.layers:
        if only_costly and not layer.params and not layer.macs:
            continue
        share = layer.macs / total_macs if total_macs else 0.0
        table.add_row(
            layer.name,
            layer.op,
            per_sample(layer.input_shape),
            per_sample(layer.output_shape),
            format_shape(layer.weight_shape) if layer.weight_shape else "",
            format_count(layer.params) if layer.params else "",
            format_count(layer.macs) if layer.macs else "",
            f"{share * 100:.1f} %" if layer.macs else "",
            style=None if layer.macs or layer.params else "dim",
        )
    table.add_section()
    table.add_row(
        "total",
        "",
        per_sample(profile.input_shape),
        "",
        "",
        format_count(profile.params),
        format_count(total_macs),
        "100 %" if total_macs else "",
        style="bold",
    )
    batch = profile.input_shape[0] if profile.input_shape else 1
    caption = [
        f"{format_params_macs(profile.params, total_macs)}"
        + (f", at batch {batch}" if batch != 1 else " per sample")
        + f"; {len(profile.layers)} nodes"
    ]
    if profile.inputs:
        caption.append(
            ("inputs: " if len(profile.inputs) > 1 else "input: ")
            + ", ".join(
                f"{i.name} {i.dtype} {format_shape(('N', *i.shape[1:]))}" for i in profile.inputs
            )
        )
    if profile.ops:
        caption.append(", ".join(f"{op} {n}" for op, n in sorted(profile.ops.items())))
    if profile.file_bytes is not None:
        caption.append(f"file size {format_bytes(profile.file_bytes)}")
    table.caption = "\n".join(caption)
    return table


class _Costs(Protocol):
    """Anything with totals: a ``ModelProfile`` or an ``evaluate.ModelStats``."""

    params: int
    macs: int
    file_bytes: int | None


_RATIO_OF = {"params": "params", "macs": "MACs", "size": "file size"}


def summary_table(
    before: _Costs,
    after: _Costs,
    *,
    requested_ratio: float | None = None,
    ratio_of: str = "params",
    output_error: float | None = None,
    agreement: float | None = None,
    samples: int | None = None,
    title: str | None = "compression summary",
    cosine_mean: float | None = None,
    cosine_min: float | None = None,
) -> Table:
    """Before/after totals of a compression run (for ``compressor compress``).

    ``requested_ratio`` is the target of ``ratio_of`` ('params', 'macs' or 'size'), compared
    with the ratio reached. ``output_error`` (relative, ||y' - y|| / ||y||), ``agreement``
    (top-1, fraction; None for outputs that are not class logits) and the cosine similarity
    of each sample's output to the original's (mean, min) are measured on ``samples``
    calibration inputs.
    """
    if ratio_of not in _RATIO_OF:
        raise ValueError(f"ratio_of must be one of {', '.join(_RATIO_OF)}, not {ratio_of!r}")
    table = _table(title)
    table.add_column("", style="bold")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("ratio", justify="right")

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    ratios = {
        "params": ratio(after.params, before.params),
        "macs": ratio(after.macs, before.macs),
        "size": ratio(after.file_bytes, before.file_bytes),
    }
    table.add_row(
        "params",
        format_count(before.params),
        format_count(after.params),
        format_ratio(ratios["params"]),
    )
    table.add_row(
        "MACs / sample",
        format_macs(before.macs),
        format_macs(after.macs),
        format_ratio(ratios["macs"]),
    )
    table.add_row(
        "file size",
        format_bytes(before.file_bytes),
        format_bytes(after.file_bytes),
        format_ratio(ratios["size"]),
        end_section=True,
    )
    if requested_ratio is not None:
        reached = ratios[ratio_of]
        hit = reached is not None and reached <= requested_ratio * 1.02  # 2 % slack for rounding
        table.add_row(
            f"{_RATIO_OF[ratio_of]} ratio",
            f"requested {format_ratio(requested_ratio)}",
            f"reached {format_ratio(reached)}",
            Text("met" if hit else "not met", style="green" if hit else "yellow"),
        )
    if output_error is not None:
        table.add_row("output rel. error", "", format_float(output_error), "")
    if agreement is not None:
        table.add_row("top-1 agreement", "", format_percent(agreement), "")
    if cosine_mean is not None:
        table.add_row("cosine similarity, mean", "", format_cosine(cosine_mean), "")
    if cosine_min is not None:
        table.add_row("cosine similarity, min", "", format_cosine(cosine_min), "")
    if output_error is not None or agreement is not None or cosine_mean is not None:
        on = f"{samples} calibration samples" if samples else "the calibration data"
        table.caption = f"measured on {on}"
        table.caption_justify = "left"
    return table
