"""Figures for evaluations and benchmarks (matplotlib, no display needed).

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas rather than through
``pyplot``, so plotting never touches the global backend or leaks open figures, and PNGs are
written atomically (a temporary file, then ``os.replace``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from compressor.evaluate import EvaluationReport, LatencyStats

REFERENCE_GROUPS = ("original", "reference", "baseline")


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically; creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _get(point: Any, key: str, default: Any = None) -> Any:
    if isinstance(point, Mapping):
        return point.get(key, default)
    return getattr(point, key, default)


def plot_tradeoff(
    points: Iterable[Mapping[str, Any] | Any],
    path: str | os.PathLike,
    *,
    x: str = "macs_ratio",
    y: str = "accuracy",
    group: str = "method",
    reference: float | None = None,
    title: str | None = None,
    percent: bool = True,
) -> Path:
    """Accuracy (``y``) against cost ratio (``x``), one line per ``group`` (method or model).

    ``points`` are dicts or objects with the ``x``, ``y`` and ``group`` fields. The original
    model is drawn as a star at x = 1 and a dashed line: either ``reference`` (its ``y``), or
    points whose group is 'original', 'reference' or 'baseline'. ``percent`` shows fractions
    in [0, 1] as percentages.
    """
    groups: dict[str, list[tuple[float, float]]] = {}
    references: list[tuple[float, float]] = []
    for point in points:
        px, py = _get(point, x), _get(point, y)
        if px is None or py is None or not (math.isfinite(px) and math.isfinite(py)):
            continue
        name = str(_get(point, group, "model"))
        if name.lower() in REFERENCE_GROUPS:
            references.append((float(px), float(py)))
        else:
            groups.setdefault(name, []).append((float(px), float(py)))
    if reference is not None:
        references.append((1.0, float(reference)))
    scale = 100.0 if percent else 1.0

    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    for name, values in groups.items():
        values.sort()
        ax.plot([v[0] for v in values], [v[1] * scale for v in values], marker="o", label=name)
    for i, (rx, ry) in enumerate(references):
        ax.axhline(ry * scale, color="0.5", linestyle="--", linewidth=0.8)
        ax.plot(
            [rx],
            [ry * scale],
            marker="*",
            markersize=14,
            color="black",
            linestyle="none",
            label="original" if i == 0 else None,
        )
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(y.replace("_", " ") + (" (%)" if percent else ""))
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if groups or references:
        ax.legend(fontsize="small")
    return save_figure(fig, path)


def _p50_p95(value: LatencyStats | Mapping[str, float] | float) -> tuple[float, float | None]:
    if isinstance(value, (int, float)):
        return float(value), None
    p50 = _get(value, "p50_ms")
    return float(p50), _get(value, "p95_ms")


def _latency_bars(ax, latencies: Mapping[str, Mapping[int, Any]], batch: int) -> None:
    """One panel: p50 bars per model at ``batch``, whiskers up to p95, values on top."""
    heights, errors, labels, colors = [], [], [], []
    for i, (name, per_batch) in enumerate(latencies.items()):
        per_batch = {int(b): v for b, v in per_batch.items()}
        if batch not in per_batch:
            continue
        p50, p95 = _p50_p95(per_batch[batch])
        heights.append(p50)
        errors.append(max(0.0, (p95 if p95 is not None else p50) - p50))
        labels.append(name)
        colors.append(f"C{i % 10}")
    positions = list(range(len(heights)))
    ax.bar(positions, heights, yerr=[[0.0] * len(errors), errors], color=colors, capsize=3)
    for pos, height in zip(positions, heights, strict=True):
        ax.annotate(
            f"{height:.3g}",
            (pos, height),
            ha="center",
            va="bottom",
            fontsize="x-small",
            xytext=(0, 2),
            textcoords="offset points",
        )
    ax.set_xticks(positions, labels, rotation=20, ha="right", fontsize="small")
    ax.set_title(f"batch {batch}", fontsize="medium")
    ax.set_ylabel("latency p50 (ms)")
    ax.grid(True, axis="y", alpha=0.3)


def plot_latency(
    latencies: Mapping[str, Mapping[int, LatencyStats | Mapping[str, float] | float]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
) -> Path:
    """Bar chart of p50 latency per model, one panel per batch size, whiskers up to p95.

    ``latencies`` maps a model or method name to its latency by batch size, as
    ``evaluate.ModelStats.latency`` holds it (``LatencyStats``, dicts, or plain p50 floats).
    """
    batches = sorted({int(b) for per_batch in latencies.values() for b in per_batch})
    panel_width = 1.2 + 0.7 * max(1, len(latencies))
    fig = _figure(max(4.0, panel_width * max(1, len(batches))), 3.6)
    if not batches:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no latency measured", ha="center", va="center")
        ax.set_axis_off()
    else:
        axes = fig.subplots(1, len(batches), squeeze=False)[0]
        for ax, batch in zip(axes, batches, strict=True):
            _latency_bars(ax, latencies, batch)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_summary(report: EvaluationReport, path: str | os.PathLike) -> Path:
    """One figure for ``evaluate``: cost ratios compressed/reference (when there is a
    reference) beside p50 latency, one panel per batch size."""
    cand, ref, comp = report.candidate, report.reference, report.comparison
    models = {cand.name: cand.latency}
    if ref is not None:
        ref_name = f"{ref.name} (reference)" if ref.name == cand.name else ref.name
        models = {ref_name: ref.latency, cand.name: cand.latency}
    batches = sorted({b for latency in models.values() for b in latency})
    panels = (1 if comp is not None else 0) + max(1, len(batches))
    fig = _figure(3.0 * panels + 1.0, 3.6)
    axes = list(fig.subplots(1, panels, squeeze=False)[0])
    if comp is not None:
        ax = axes.pop(0)
        ratios = {
            "params": comp.params_ratio,
            "MACs": comp.macs_ratio,
            "file size": comp.size_ratio,
            **{f"p50 time, batch {b}": 1.0 / s for b, s in comp.speedup.items() if s > 0},
        }
        ratios = {k: v for k, v in ratios.items() if v is not None and math.isfinite(v)}
        ax.barh(list(ratios), list(ratios.values()), color="C1")
        ax.axvline(1.0, color="0.4", linestyle="--", linewidth=0.8)
        for i, value in enumerate(ratios.values()):
            ax.annotate(
                f"{value:.2f}×",
                (value, i),
                va="center",
                fontsize="x-small",
                xytext=(3, 0),
                textcoords="offset points",
            )
        ax.invert_yaxis()
        ax.set_xlabel("compressed / reference")
        ax.set_title("cost ratios", fontsize="medium")
    if not batches:
        axes[0].text(0.5, 0.5, "no latency measured", ha="center", va="center")
        axes[0].set_axis_off()
    for ax, batch in zip(axes, batches, strict=False):
        _latency_bars(ax, models, batch)
    fig.suptitle(f"{cand.name} on {report.provider}", fontsize="medium")
    return save_figure(fig, path)


def tradeoff_points(reports: Sequence[tuple[str, EvaluationReport]]) -> list[dict[str, Any]]:
    """Points for ``plot_tradeoff`` from (method, report) pairs; the reference of the first
    report with one becomes the 'original' point."""
    points: list[dict[str, Any]] = []
    for method, report in reports:
        if report.comparison is None:
            continue
        points.append(
            {
                "method": method,
                **dataclasses.asdict(report.comparison),
                "accuracy": report.candidate.accuracy,
            }
        )
    for _, report in reports:
        if report.reference is not None:
            points.append(
                {
                    "method": "original",
                    "macs_ratio": 1.0,
                    "params_ratio": 1.0,
                    "size_ratio": 1.0,
                    "accuracy": report.reference.accuracy,
                    "agreement": 1.0,
                }
            )
            break
    return points
