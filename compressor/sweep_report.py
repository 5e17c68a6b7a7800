"""A sweep's report: three plots and one self-contained HTML page.

``write_report(results, folder)`` reads what ``compressor.sweep.run_sweep`` returned (or
``results.json``) and writes into ``folder``:

* ``pareto.png``: quality (accuracy, or agreement with the original on unlabelled data)
  against latency relative to the original, one panel per timed batch size, the Pareto front
  drawn as a staircase through its points;
* ``accuracy_vs_ratio.png``: quality against the fraction of MACs kept, one line per series
  (method and its options), with ``compressor.plots.plot_tradeoff``;
* ``runtime_vs_ratio.png``: measured latency relative to the original against MACs kept;
* ``report.html``: the plots embedded (base64), the table of trials sortable by any column
  (a few lines of inline JavaScript, nothing fetched), the front highlighted, and the command
  line that reproduces each trial.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor import report as fmt
from compressor.plots import _figure, plot_tradeoff, save_figure

PARETO_PNG = "pareto.png"
ACCURACY_PNG = "accuracy_vs_ratio.png"
RUNTIME_PNG = "runtime_vs_ratio.png"
REPORT_HTML = "report.html"


def series_name(trial: Mapping[str, Any]) -> str:
    """The line a trial belongs to in the plots: its method and the options it varied."""
    options = " ".join(f"{k}={_value(v)}" for k, v in sorted(trial.get("options", {}).items()))
    return f"{trial['method']} {options}".strip()


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return "none" if v is None else str(v)


def _timed(trials: Sequence[Mapping[str, Any]], batch: str) -> list[Mapping[str, Any]]:
    return [
        t for t in trials
        if t.get("status") == "done" and t.get("speedup", {}).get(batch)
        and t.get("quality") is not None
    ]


def _metric(results: Mapping[str, Any]) -> str:
    """accuracy (labelled data), agreement (top-1 with the original) or cosine (outputs'
    similarity to the original's), as the trials measured it."""
    metrics = {t.get("quality_metric") for t in results["trials"] if t.get("quality_metric")}
    return metrics.pop() if len(metrics) == 1 else "accuracy"


_METRIC_LABELS = {
    "accuracy": "accuracy",
    "agreement": "agreement with the original",
    "cosine": "cosine similarity to the original",
}


def _metric_label(results: Mapping[str, Any]) -> str:
    return _METRIC_LABELS[_metric(results)]


# ----------------------------------------------------------------------------- plots


def plot_pareto(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Quality against relative latency, one panel per batch size, the front marked."""
    trials = results["trials"]
    original = results.get("original", {})
    batches = [str(b) for b in results["sweep"]["batch_sizes"]]
    series = sorted({series_name(t) for t in trials if t.get("status") == "done"})
    colours = {name: f"C{i % 10}" for i, name in enumerate(series)}
    fig = _figure(5.2 * len(batches) + 0.6, 4.4)
    axes = fig.subplots(1, len(batches), squeeze=False)[0]
    metric = _metric_label(results)
    for ax, batch in zip(axes, batches, strict=True):
        timed = _timed(trials, batch)
        front_keys = set(results.get("pareto", {}).get(batch, []))
        for name in series:
            points = [t for t in timed if series_name(t) == name]
            if points:
                ax.plot(
                    [1.0 / t["speedup"][batch] for t in points],
                    [100 * t["quality"] for t in points],
                    marker="o", linestyle="none", color=colours[name], label=name,
                )
        front = [(1.0 / t["speedup"][batch], 100 * t["quality"]) for t in timed
                 if t["key"] in front_keys]
        quality = original.get("quality")
        if quality is not None:
            if "original" in front_keys:
                front.append((1.0, 100 * quality))
            ax.plot([1.0], [100 * quality], marker="*", markersize=14, color="black",
                    linestyle="none", label="original")
        if front:
            front.sort()
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.3",
                    linewidth=1.0, zorder=1)
            ax.plot([p[0] for p in front], [p[1] for p in front], marker="o", markersize=12,
                    markerfacecolor="none", markeredgecolor="red", linestyle="none",
                    label="Pareto front")
        if not timed:
            ax.text(0.5, 0.5, "no trial timed", ha="center", va="center",
                    transform=ax.transAxes)
        ax.axvline(1.0, color="0.6", linestyle="--", linewidth=0.8)
        ax.set_xlabel("p50 latency relative to the original (1 / speedup)")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"batch {batch}", fontsize="medium")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.suptitle(f"{Path(results['sweep']['model']).name}: {metric} vs latency",
                 fontsize="medium")
    return save_figure(fig, path)


def plot_accuracy_vs_ratio(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    key = _metric(results)
    points = [
        {"series": series_name(t), "macs_ratio": t["macs_ratio"], key: t["quality"]}
        for t in results["trials"]
        if t.get("status") in ("done", "compressed") and t.get("quality") is not None
    ]
    return plot_tradeoff(points, path, x="macs_ratio", y=key, group="series",
                         reference=results.get("original", {}).get("quality"),
                         title="quality vs compression ratio")


def plot_runtime_vs_ratio(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    points = []
    for t in results["trials"]:
        if t.get("status") != "done":
            continue
        for batch, speedup in t.get("speedup", {}).items():
            if speedup:
                points.append({"series": f"{series_name(t)}, batch {batch}",
                               "macs_ratio": t["macs_ratio"],
                               "latency_vs_original": 1.0 / speedup})
    return plot_tradeoff(points, path, x="macs_ratio", y="latency_vs_original", group="series",
                         reference=1.0, percent=False,
                         title="measured p50 latency (relative to the original) vs MACs kept")


# ----------------------------------------------------------------------------- the page


@dataclass(frozen=True)
class Column:
    header: str
    value: Callable[[Mapping[str, Any]], Any]  # the sort key (a number, a string or None)
    text: Callable[[Mapping[str, Any]], str]  # what the cell shows
    title: str = ""


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(
        v) else None


def _latency(t: Mapping[str, Any], batch: str) -> float | None:
    stats = t.get("latency_ms", {}).get(batch) or t.get("latency_p50_ms", {}).get(batch)
    if isinstance(stats, Mapping):
        return _num(stats.get("p50_ms"))
    return _num(stats)


def _columns(batches: Sequence[str]) -> list[Column]:
    columns = [
        Column("trial", lambda t: t["key"], lambda t: t["key"]),
        Column("method", lambda t: t.get("method"), lambda t: t.get("method", "")),
        Column("target", lambda t: _num(t.get("ratio")) or _num(t.get("speedup_target")),
               lambda t: _target(t), "requested MACs ratio, or latency target"),
        Column("options", lambda t: _options(t), lambda t: _options(t)),
        Column("status", lambda t: t.get("status"), lambda t: t.get("status", "")),
        Column("MACs kept", lambda t: _num(t.get("macs_ratio")),
               lambda t: _fraction(t.get("macs_ratio"))),
        Column("params kept", lambda t: _num(t.get("params_ratio")),
               lambda t: _fraction(t.get("params_ratio"))),
        Column("size", lambda t: _num(t.get("file_bytes")),
               lambda t: fmt.format_bytes(_num(t.get("file_bytes")))),
        Column("accuracy", lambda t: _num(t.get("accuracy")),
               lambda t: fmt.format_percent(_num(t.get("accuracy")))),
        Column("Δ points", lambda t: _num(t.get("accuracy_delta")),
               lambda t: fmt.format_points(_num(t.get("accuracy_delta")))),
        Column("agreement", lambda t: _num(t.get("agreement")),
               lambda t: fmt.format_percent(_num(t.get("agreement"))),
               "top-1 agreement with the original"),
        Column("cosine", lambda t: _num(t.get("cosine_mean")),
               lambda t: fmt.format_float(_num(t.get("cosine_mean"))),
               "mean cosine similarity of the outputs to the original's"),
    ]
    for batch in batches:
        columns += [
            Column(f"p50 b{batch}", lambda t, b=batch: _latency(t, b),
                   lambda t, b=batch: fmt.format_ms(_latency(t, b)),
                   f"median latency of one run at batch {batch}"),
            Column(f"speedup b{batch}", lambda t, b=batch: _num(t.get("speedup", {}).get(b)),
                   lambda t, b=batch: _speedup(t.get("speedup", {}).get(b)),
                   f"original's p50 / this model's p50 at batch {batch}, side by side"),
        ]
    columns += [
        Column("front", lambda t: ",".join(map(str, t.get("pareto", []))) or None,
               lambda t: " ".join(f"b{b}" for b in t.get("pareto", [])),
               "on the Pareto front (quality vs latency) at these batch sizes"),
        Column("time (s)", lambda t: _num(_trial_seconds(t)),
               lambda t: "" if _trial_seconds(t) is None else f"{_trial_seconds(t):.1f}",
               "compression and evaluation, plus timing"),
    ]
    return columns


def _trial_seconds(t: Mapping[str, Any]) -> float | None:
    parts = [t.get("trial_seconds"), t.get("timing_seconds")]
    parts = [p for p in parts if isinstance(p, (int, float))]
    return sum(parts) if parts else None


def _target(t: Mapping[str, Any]) -> str:
    if t.get("speedup_target") is not None:
        return f"{t['speedup_target']:g}x faster"
    if t.get("ratio") is not None:
        return f"ratio {t['ratio']:g}"
    return ""


def _options(t: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_value(v)}" for k, v in sorted(t.get("options", {}).items()))


def _fraction(v: Any) -> str:
    v = _num(v)
    return "" if v is None else f"{v:.3f}"


def _speedup(v: Any) -> str:
    v = _num(v)
    return "" if v is None else f"{v:.2f}x"


def _sort_attr(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 12.5px; }
th, td { padding: 3px 7px; border-bottom: 1px solid #ddd; text-align: right; vertical-align: top; }
td { white-space: nowrap; }
td.text, th.text { text-align: left; white-space: normal; }
td.command { min-width: 30em; }
td.nowrap { white-space: nowrap; }
th { cursor: pointer; background: #f3f3f3; position: sticky; top: 0; user-select: none; }
th[aria-sort=ascending]::after { content: " \\25B2"; }
th[aria-sort=descending]::after { content: " \\25BC"; }
tr.front td { background: #e7f6e7; font-weight: 600; }
tr.failed td { color: #a00; }
tr.original td { background: #eef2fb; }
code { font-size: 11.5px; white-space: pre-wrap; word-break: break-all; }
.plots img { max-width: 100%; border: 1px solid #eee; margin: 0.4em 0; }
.note { color: #555; max-width: 60em; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 12px; }
dt { font-weight: 600; }
"""

# Click a header: sort by it (numbers as numbers), again: the other way. Empty cells last.
_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var headers = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(headers, function (th, column) {
    th.addEventListener("click", function () {
      var ascending = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(headers, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var key = function (row) {
        var cell = row.cells[column];
        var raw = cell.getAttribute("data-sort");
        if (raw === null) { raw = cell.textContent.trim(); }
        if (raw === "") { return null; }
        var number = Number(raw);
        return isNaN(number) ? raw : number;
      };
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || y === null) { return (x === null) - (y === null); }
        if (typeof x !== typeof y) { x = String(x); y = String(y); }
        var order = x < y ? -1 : x > y ? 1 : 0;
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def _embed(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def _original_row(results: Mapping[str, Any]) -> dict[str, Any]:
    original = dict(results.get("original") or {})
    return {
        "key": "original",
        "method": "",
        "options": {},
        "status": "reference",
        "macs_ratio": 1.0 if original.get("macs") else None,
        "params_ratio": 1.0 if original.get("params") else None,
        "file_bytes": original.get("file_bytes"),
        "accuracy": original.get("accuracy"),
        "agreement": 1.0,
        "cosine_mean": 1.0,
        "latency_p50_ms": original.get("latency_p50_ms", {}),
        "speedup": {b: 1.0 for b in original.get("latency_p50_ms", {})},
        "pareto": [int(b) for b, keys in results.get("pareto", {}).items() if "original" in keys],
    }


def render_html(results: Mapping[str, Any], images: Sequence[Path]) -> str:
    """The report page (plots embedded from ``images``)."""
    sweep = results["sweep"]
    batches = [str(b) for b in sweep["batch_sizes"]]
    columns = _columns(batches)
    text_columns = {"trial", "method", "options", "status", "front"}
    rows = []
    for trial in [_original_row(results), *results["trials"]]:
        classes = []
        if trial.get("pareto"):
            classes.append("front")
        if trial.get("status") == "failed":
            classes.append("failed")
        if trial["key"] == "original":
            classes.append("original")
        cells = []
        for column in columns:
            cls = ""
            if column.header in text_columns:
                wraps = column.header in ("options", "status")
                cls = ' class="text"' if wraps else ' class="text nowrap"'
            cells.append(
                f'<td{cls} data-sort="{html.escape(_sort_attr(column.value(trial)))}">'
                f"{html.escape(column.text(trial))}</td>"
            )
        command = trial.get("command")
        detail = ""
        if command:
            detail = f"<code>{html.escape(command)}</code>"
            if trial.get("evaluate_command"):
                detail += f"<br><code>{html.escape(trial['evaluate_command'])}</code>"
        if trial.get("status") == "failed":
            detail = (f"<b>{html.escape(trial.get('failed_phase', ''))} failed:</b> "
                      f"{html.escape(str(trial.get('error', '')))}<br>{detail}")
        cells.append(f'<td class="text command" data-sort="">{detail}</td>')
        rows.append(
            f'<tr class="{" ".join(classes)}" data-key="{html.escape(trial["key"])}">'
            + "".join(cells) + "</tr>"
        )
    header = "".join(
        f'<th class="{"text" if c.header in text_columns else ""}" '
        f'title="{html.escape(c.title)}">{html.escape(c.header)}</th>'
        for c in columns
    ) + '<th class="text" title="compress, then evaluate">command</th>'

    run, machine, counts = results.get("run", {}), results.get("machine", {}), results["counts"]
    facts = {
        "model": f"{sweep['model']}" + (f" (--arch {sweep['arch']})" if sweep.get("arch") else ""),
        "calibration data": sweep.get("data") or "none (data-free methods)",
        "evaluation data": (sweep.get("eval_data") or "none: random inputs, agreement only")
        + (f" (first {sweep['eval_limit']})" if sweep.get("eval_limit") else ""),
        "grid": f"methods {', '.join(sweep['methods'])}; ratios "
        f"{', '.join(map(str, sweep['ratios'])) or '-'}; speedups "
        f"{', '.join(map(str, sweep['speedups'])) or '-'}"
        + "".join(f"; {k} {', '.join(map(_value, v))}" for k, v in sweep["options"].items()),
        "trials": f"{counts['trials']}: {counts['done']} done, {counts['failed']} failed"
        + (f", {counts['compressed']} not timed" if counts.get("compressed") else ""),
        "ran": f"{run.get('executor', '?')}, {run.get('workers', '?')} worker(s)"
        + (f" on {run['ray_address']}" if run.get("ray_address") else "")
        + (f", Ray {run['ray_version']}" if run.get("ray_version") else "")
        + (f", {run['seconds']:.0f} s" if isinstance(run.get("seconds"), (int, float)) else ""),
        "machine": f"{machine.get('cpu', '?')}, {machine.get('usable_cores', '?')} usable cores, "
        f"onnxruntime {machine.get('onnxruntime', '?')} ({machine.get('provider', '?')})",
    }
    facts_html = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>"
                         for k, v in facts.items())
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in results.get("notes", []))
    plots = "".join(_embed(p) for p in images)
    title = f"Sweep of {Path(sweep['model']).name}"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<dl>{facts_html}</dl>
<p class="note">{html.escape(results.get("timing", ""))}</p>
{f"<ul class='note'>{notes}</ul>" if notes else ""}
<h2>Trials</h2>
<p class="note">Click a column header to sort by it (again: the other way). Highlighted rows are
on the Pareto front of quality against latency at the batch sizes in the <i>front</i> column.
Speedup: the original's p50 latency / the trial's, measured side by side.</p>
<table class="sortable" id="trials">
<thead><tr>{header}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody>
</table>
<h2>Plots</h2>
<div class="plots">{plots}</div>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def write_report(results: Mapping[str, Any], folder: str | os.PathLike) -> Path:
    """Write the three plots and ``report.html`` into ``folder``; returns the page's path."""
    from compressor.io import atomic_write_bytes

    folder = Path(folder)
    images = [
        plot_pareto(results, folder / PARETO_PNG),
        plot_accuracy_vs_ratio(results, folder / ACCURACY_PNG),
        plot_runtime_vs_ratio(results, folder / RUNTIME_PNG),
    ]
    page = folder / REPORT_HTML
    atomic_write_bytes(page, render_html(results, images).encode("utf-8"))
    return page
