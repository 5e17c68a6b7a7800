"""Zoo models x {svd, sketch} x MACs ratios: accuracy, agreement, MACs and latency vs original.

    python bench/bench_compression.py [--models vgg,resnet20] [--methods svd] [--ratios 0.5]

Accuracy is measured on the full Fashion-MNIST test set when the Debian package is installed,
else on the bundled 2000-image subset; calibration uses the bundled 512 training images. Latency
is measured side by side with the original in one process (alternating order, spinning off).
Target (issue 2): svd at ratio 0.5 on vgg and resnet20 gives >= 1.6x lower batch-64 latency at
<= 1.0 point accuracy loss, without fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, SECTIONS, atomic_write, write_section  # noqa: E402

from compressor import io  # noqa: E402
from compressor.data import load_data  # noqa: E402
from compressor.errors import DataError  # noqa: E402
from compressor.evaluate import evaluate  # noqa: E402
from compressor.models import zoo  # noqa: E402
from compressor.pipeline import CompressOptions, compress  # noqa: E402

CALIB = ROOT / "models" / "data" / "fashion_mnist_calib.npz"
EVAL = ROOT / "models" / "data" / "fashion_mnist_eval.npz"
TARGET_MODELS = ("vgg", "resnet20")


def _test_data():
    try:
        return load_data("fashion-mnist", split="test"), "Fashion-MNIST test (10000)"
    except DataError:
        return load_data(EVAL), "bundled Fashion-MNIST subset (2000)"


def run(models, methods, ratios, latency_time: float = 1.5) -> tuple[str, list[dict]]:
    data, data_name = _test_data()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            entry = zoo.get(name)
            reference = io.load_model(entry.checkpoint, arch=name).proto
            for method in methods:
                for ratio in ratios:
                    out = Path(tmp) / f"{name}_{method}_{ratio}.onnx"
                    result = compress(CompressOptions(
                        model=entry.checkpoint, arch=name, method=method, ratio=ratio,
                        data=str(CALIB), output=out))
                    report = evaluate(out, reference=reference, data=data, progress=False,
                                      latency_min_time_s=latency_time)
                    c = report.comparison
                    row = {
                        "model": name, "method": method, "ratio": ratio,
                        "macs_ratio": c.macs_ratio, "params_ratio": c.params_ratio,
                        "accuracy_ref": report.reference.accuracy,
                        "accuracy": report.candidate.accuracy,
                        "delta_points": 100 * c.accuracy_delta,
                        "agreement": c.agreement,
                        "speedup_b1": c.speedup.get(1), "speedup_b64": c.speedup.get(64),
                        "latency_b64_ms": report.candidate.latency[64].p50_ms,
                        "latency_b64_ref_ms": report.reference.latency[64].p50_ms,
                        "ratio_reached": result.ratio_reached,
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return _markdown(rows, data_name), rows


def _markdown(rows: list[dict], data_name: str) -> str:
    lines = [
        "## Compression: zoo models x methods x MACs ratio",
        "",
        f"Accuracy on {data_name}; calibration on the bundled 512 training images; no "
        "fine-tuning. Speedup = original p50 latency / compressed p50 latency, measured side "
        "by side (onnxruntime CPU, spinning off).",
        "",
        "| model | method | ratio | MACs kept | params kept | accuracy (orig → new) | Δ points "
        "| agreement | speedup b1 | speedup b64 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['ratio']} | {r['macs_ratio']:.3f} "
            f"| {r['params_ratio']:.3f} | {100 * r['accuracy_ref']:.2f} → {100 * r['accuracy']:.2f} "
            f"| {r['delta_points']:+.2f} | {100 * r['agreement']:.2f}% "
            f"| {r['speedup_b1']:.2f}x | {r['speedup_b64']:.2f}x |"
        )
    targets = [r for r in rows if r["model"] in TARGET_MODELS and r["method"] == "svd"
               and r["ratio"] == 0.5]
    if targets:
        lines += ["", "**Target** (svd, ratio 0.5, vgg and resnet20): >= 1.6x batch-64 speedup "
                  "at <= 1.0 point accuracy loss.", ""]
        for r in targets:
            ok = r["speedup_b64"] >= 1.6 and r["delta_points"] >= -1.0
            lines.append(f"- {r['model']}: {r['speedup_b64']:.2f}x at {r['delta_points']:+.2f} "
                         f"points — {'met' if ok else 'NOT met'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(zoo.names()))
    parser.add_argument("--methods", default="svd,sketch")
    parser.add_argument("--ratios", default="0.75,0.5,0.25")
    parser.add_argument("--latency-time", type=float, default=1.5,
                        help="seconds of timing per model and batch size")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    markdown, rows = run(args.models.split(","), args.methods.split(","),
                         [float(r) for r in args.ratios.split(",")], args.latency_time)
    print(markdown)
    if not args.no_write:
        atomic_write(SECTIONS / "compression.json", json.dumps(rows, indent=1))
        print(f"wrote {write_section('compression', markdown)}")


if __name__ == "__main__":
    main()
