"""Graphs as real exporters write them (issue 11): prune and svd at MACs ratios 0.75 and 0.5 on
models exported by torch's two ONNX exporters, with output agreement or cosine similarity and
latency against the original, side by side.

    python bench/bench_real_graphs.py --quick     # ratio 0.5, batch 1
    python bench/bench_real_graphs.py [--models efficientnet_lite0-ts,minilm-ts]
        [--methods prune,svd] [--ratios 0.75,0.5] [--batches 1,16] [--redo] [--from-cache]

Models (seeded random weights: speed and tool cost only; accuracy claims need trained weights):

- ``efficientnet_lite0-ts`` / ``-dynamo``: bench/archs.py's EfficientNet-Lite0 (timm's
  ``tf_efficientnet_lite0`` shape, TF "SAME" padding computed from ``x.shape`` at run time),
  exported with the TorchScript exporter (the Shape -> Pad chains stay in the graph, the batch
  axis dynamic) and with ``dynamo=True`` (torch.export specialises the static spatial size, so
  the pads arrive as constants).
- ``minilm-ts``: bench/encoders.py's all-MiniLM-L6-v2-shaped sentence encoder (6 layers, hidden
  384, feed-forward 1536, 12 heads, sequence 128, vocabulary 30522; int64 ``input_ids`` and
  ``attention_mask``, dynamic batch; mean-pooled embedding), TorchScript exporter.
- ``mobilenet_v3_large-ts``: bench/archs.py's MobileNetV3-Large (squeeze-excitation, HardSwish,
  HardSigmoid), TorchScript exporter, dynamic batch.
- ``yolo_neck-ts`` / ``-dynamo``: a YOLOv8n-shaped detector defined below (C2f blocks: a conv's
  output chunked in halves, bottlenecks, Concat; SPPF; nearest Upsample + Concat in the FPN/PAN
  neck; the Detect head's per-scale maps reshaped with the batch read from ``x.shape`` and
  concatenated), at 320 x 320, dynamic batch. The TorchScript exporter writes each chunk as two
  Slices with bounds computed from the shape at run time, ``dynamo=True`` as a Split.

Each row runs ``compressor.pipeline.compress(CompressOptions(method=..., ratio=..., data=npz,
calib_samples=...))`` on the exported file, with seeded random calibration inputs (images;
token ids with padding masks for the encoder) in an .npz whose arrays are named as the model's
inputs, then ``compressor.evaluate.evaluate`` against the exported original on held-out seeded
random inputs: MACs ratio, top-1 agreement for class logits, cosine similarity of each sample's
output for embeddings and detection maps (mean and minimum), and p50 latency of both models
timed side by side in one process (alternating order, onnxruntime CPU, spinning off).

Rows are cached one by one in build/bench_real_graphs/rows.json with the compressed models
beside them, so a rerun skips finished rows (and only re-times a finished row for batch sizes
it lacks); ``--redo`` recomputes the selected ones. A row that fails records its error and the
run goes on. The section in docs/BENCHMARKS.md is rendered from every cached row.
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import json
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import archs  # noqa: E402
import encoders  # noqa: E402
from common import ROOT, SECTIONS, atomic_write, commit, write_section  # noqa: E402

from compressor.data import load_data  # noqa: E402
from compressor.evaluate import evaluate  # noqa: E402
from compressor.pipeline import CompressOptions, compress  # noqa: E402
from compressor.profile import profile_model  # noqa: E402

WORK = ROOT / "build" / "bench_real_graphs"
CACHE = WORK / "rows.json"
NAME = "real_graphs"
CALIB_SEED, HELDOUT_SEED = 1, 2
CALIB_SAMPLES = 32
HELDOUT_SAMPLES = 32
# ops of the structures this benchmark is about, counted in each export
NOTABLE_OPS = ("Split", "Slice", "Resize", "Concat", "HardSwish", "HardSigmoid",
               "GlobalAveragePool", "ReduceMean", "LayerNormalization", "Erf", "Softmax",
               "MatMul", "Gather")
# the targets: (model, method, ratio) -> MACs ratio at most, batch-1 speedup at least
TARGETS = {
    ("efficientnet_lite0-ts", "prune", 0.5): (0.55, 1.3),
    ("minilm-ts", "svd", 0.5): (0.55, 1.3),
}
TARGET_TEXT = {
    "efficientnet_lite0-ts": "EfficientNet-Lite0 with Shape-computed SAME padding "
                             "(TorchScript export), prune",
    "minilm-ts": "MiniLM-shaped encoder (6 x 384, ff 1536, 12 heads, seq 128), svd",
}


# --------------------------------------------------------------- the YOLOv8n-shaped model


class ConvBnSiLU(nn.Module):
    """Ultralytics' ``Conv``: conv (padding k // 2, no bias) + BatchNorm (eps 1e-3) + SiLU."""

    def __init__(self, a: int, b: int, kernel: int = 1, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(a, b, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(b, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, channels: int, shortcut: bool):
        super().__init__()
        self.cv1 = ConvBnSiLU(channels, channels, 3)
        self.cv2 = ConvBnSiLU(channels, channels, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """cv1's output chunked in two halves (an ONNX Split), ``n`` bottlenecks chained on the
    second, everything concatenated into cv2."""

    def __init__(self, a: int, b: int, n: int, shortcut: bool):
        super().__init__()
        self.c = b // 2
        self.cv1 = ConvBnSiLU(a, 2 * self.c)
        self.cv2 = ConvBnSiLU((2 + n) * self.c, b)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, a: int, b: int):
        super().__init__()
        self.cv1 = ConvBnSiLU(a, a // 2)
        self.cv2 = ConvBnSiLU(a // 2 * 4, b)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.pool(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class DetectHead(nn.Module):
    """Per scale: a box branch (4 x 16 distribution bins) and a class branch (80 classes),
    concatenated, reshaped to (N, 144, H*W) with the batch read at run time, and the scales
    concatenated: the raw (N, 144, anchors) map, before DFL decoding and anchor arithmetic."""

    def __init__(self, channels: tuple[int, ...], classes: int = 80, bins: int = 16):
        super().__init__()
        box, cls = max(16, channels[0] // 4, 4 * bins), max(channels[0], min(classes, 100))
        self.box = nn.ModuleList(nn.Sequential(ConvBnSiLU(c, box, 3), ConvBnSiLU(box, box, 3),
                                               nn.Conv2d(box, 4 * bins, 1)) for c in channels)
        self.cls = nn.ModuleList(nn.Sequential(ConvBnSiLU(c, cls, 3), ConvBnSiLU(cls, cls, 3),
                                               nn.Conv2d(cls, classes, 1)) for c in channels)
        self.outputs = 4 * bins + classes

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        shape = features[0].shape
        maps = [torch.cat([b(x), c(x)], 1) for x, b, c in zip(features, self.box, self.cls,
                                                                 strict=True)]
        return torch.cat([m.view(shape[0], self.outputs, -1) for m in maps], 2)


class YoloV8n(nn.Module):
    """YOLOv8n's layers (width 0.25, depth 0.33): backbone, SPPF, FPN/PAN neck with nearest
    Upsample + Concat, Detect head. 3,157,184 parameters: ultralytics' 3,157,200 less the DFL's
    fixed 16-weight conv, which decoding would use."""

    input_shape = (3, 320, 320)

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(ConvBnSiLU(3, 16, 3, 2), ConvBnSiLU(16, 32, 3, 2),
                                  C2f(32, 32, 1, True), ConvBnSiLU(32, 64, 3, 2),
                                  C2f(64, 64, 2, True))
        self.p4 = nn.Sequential(ConvBnSiLU(64, 128, 3, 2), C2f(128, 128, 2, True))
        self.p5 = nn.Sequential(ConvBnSiLU(128, 256, 3, 2), C2f(256, 256, 1, True),
                                SPPF(256, 256))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.top_down4 = C2f(384, 128, 1, False)
        self.top_down3 = C2f(192, 64, 1, False)
        self.down3 = ConvBnSiLU(64, 64, 3, 2)
        self.bottom_up4 = C2f(192, 128, 1, False)
        self.down4 = ConvBnSiLU(128, 128, 3, 2)
        self.bottom_up5 = C2f(384, 256, 1, False)
        self.detect = DetectHead((64, 128, 256))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.stem(x)
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        t4 = self.top_down4(torch.cat([self.up(p5), p4], 1))
        n3 = self.top_down3(torch.cat([self.up(t4), p3], 1))
        n4 = self.bottom_up4(torch.cat([self.down3(n3), t4], 1))
        n5 = self.bottom_up5(torch.cat([self.down4(n4), p5], 1))
        return self.detect([n3, n4, n5])


YOLO_PUBLISHED_PARAMETERS = 3_157_200 - 16


def smooth_images(n: int, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """``n`` seeded random "photographs" in [0, 1] (YOLO's input contract: no normalisation):
    smooth 7 x 7 colour fields bilinearly upsampled plus pixel noise, as archs.calibration
    draws them."""
    rng = np.random.default_rng(seed)
    channels, height, width = shape
    coarse = torch.from_numpy(rng.random((n, channels, 7, 7), dtype=np.float32))
    smooth = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    noise = rng.normal(0.0, 0.08, (n, channels, height, width)).astype(np.float32)
    return np.clip(smooth.numpy() + noise, 0.0, 1.0).astype(np.float32)


def build_yolo(seed: int = 0) -> YoloV8n:
    """Seeded random weights, BatchNorm statistics measured on random images (archs' recipe,
    so activations stay at a sane scale through the 60-odd convs)."""
    module = YoloV8n()
    torch.manual_seed(seed)
    archs._initialise(module)
    archs._measure_batchnorm(module, smooth_images(8, YoloV8n.input_shape, seed + 10_000))
    return module.eval()


# ------------------------------------------------------------------------------- subjects


@dataclass(frozen=True)
class Model:
    """How one benchmark subject is built, exported and fed."""

    name: str
    family: str  # "cnn" (class logits), "detector" or "encoder"
    exporter: str  # "torchscript" or "dynamo"
    build: Callable[[], nn.Module]
    examples: Callable[[int, int], dict[str, np.ndarray]]  # (n, seed) -> arrays by input name
    output: str
    describe: str


def _images(name: str) -> Callable[[int, int], dict[str, np.ndarray]]:
    return lambda n, seed: {"input": archs.calibration(name, n, seed)}


MODELS = {
    "efficientnet_lite0-ts": Model(
        "efficientnet_lite0-ts", "cnn", "torchscript", lambda: archs.build("efficientnet_lite0"),
        _images("efficientnet_lite0"), "logits",
        "EfficientNet-Lite0, SAME padding from x.shape (3 x 224 x 224)"),
    "efficientnet_lite0-dynamo": Model(
        "efficientnet_lite0-dynamo", "cnn", "dynamo", lambda: archs.build("efficientnet_lite0"),
        _images("efficientnet_lite0"), "logits",
        "EfficientNet-Lite0, SAME padding from x.shape (3 x 224 x 224)"),
    "minilm-ts": Model(
        "minilm-ts", "encoder", "torchscript", encoders.build,
        lambda n, seed: encoders.tokens(n, seed), encoders.OUTPUT_NAME,
        "MiniLM-L6-shaped encoder, int64 input_ids + attention_mask (N, 128)"),
    "mobilenet_v3_large-ts": Model(
        "mobilenet_v3_large-ts", "cnn", "torchscript", lambda: archs.build("mobilenet_v3_large"),
        _images("mobilenet_v3_large"), "logits",
        "MobileNetV3-Large, SE + HardSwish (3 x 224 x 224)"),
    "yolo_neck-ts": Model(
        "yolo_neck-ts", "detector", "torchscript", build_yolo,
        lambda n, seed: {"input": smooth_images(n, YoloV8n.input_shape, seed)}, "maps",
        "YOLOv8n-shaped: C2f Slice/Concat, SPPF, Upsample + Concat neck (3 x 320 x 320)"),
    "yolo_neck-dynamo": Model(
        "yolo_neck-dynamo", "detector", "dynamo", build_yolo,
        lambda n, seed: {"input": smooth_images(n, YoloV8n.input_shape, seed)}, "maps",
        "YOLOv8n-shaped: C2f Split/Concat, SPPF, Upsample + Concat neck (3 x 320 x 320)"),
}
DEFAULT_MODELS = ("efficientnet_lite0-ts", "efficientnet_lite0-dynamo", "minilm-ts",
                  "mobilenet_v3_large-ts", "yolo_neck-ts", "yolo_neck-dynamo")


def export(model: Model, path: Path) -> None:
    """``model`` through its exporter at opset 18, every input's batch axis dynamic."""
    module = model.build()
    example = tuple(torch.from_numpy(a) for a in model.examples(1, 99).values())
    names = list(model.examples(1, 99))
    tmp = path.with_name(f".{path.name}.tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if model.exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=1024)
            program = torch.onnx.export(
                module, example, dynamo=True, opset_version=18, input_names=names,
                output_names=[model.output], dynamic_shapes=tuple({0: batch} for _ in names),
                verbose=False)
            program.save(str(tmp))
        else:
            torch.onnx.export(
                module, example, str(tmp), dynamo=False, opset_version=18, input_names=names,
                output_names=[model.output],
                dynamic_axes={name: {0: "batch"} for name in (*names, model.output)})
    proto = onnx.load(str(tmp))
    if proto.ir_version > 10:  # onnxruntime here reads at most 13; the pipeline caps at 10
        proto.ir_version = 10
        onnx.save(proto, str(tmp))
    tmp.replace(path)


@dataclass
class Subject:
    model: Model
    path: Path  # the exported original
    calib: Path  # .npz, arrays named as the inputs
    heldout: Path
    facts: dict


def _op_counts(proto: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in proto.graph.node)


def prepare(model: Model, facts_cache: dict) -> Subject:
    """The exported original, the calibration and held-out data on disk, and facts about the
    export (parameters, MACs, the Shape and Pad nodes the exporter wrote and cleanup leaves)."""
    folder = WORK / "models"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{model.name}.onnx"
    calib, heldout = (folder / f"{model.name}_{kind}.npz" for kind in ("calib", "heldout"))
    facts = dict(facts_cache.get(model.name, {}))
    if not path.is_file() or "export_s" not in facts:
        print(f"exporting {model.name} ({model.exporter}; seeded random weights)", flush=True)
        started = time.perf_counter()
        export(model, path)
        facts = {"export_s": time.perf_counter() - started}
    if not calib.is_file():
        np.savez(calib, **model.examples(CALIB_SAMPLES, CALIB_SEED))
    if not heldout.is_file():
        np.savez(heldout, **model.examples(HELDOUT_SAMPLES, HELDOUT_SEED))
    if "notable_ops" not in facts:
        import onnx_ir as ir

        from compressor.passes.cleanup import CleanupPass

        proto = onnx.load(str(path))
        sample_shapes = {k: v.shape[1:] for k, v in np.load(calib).items()}
        profile = profile_model(proto, input_shapes=sample_shapes)
        ops = _op_counts(proto)
        facts.update(description=model.describe, exporter=model.exporter, family=model.family,
                     params=profile.params, macs=profile.macs,
                     nodes=len(proto.graph.node), shape_nodes=ops.get("Shape", 0),
                     pad_nodes=ops.get("Pad", 0),
                     notable_ops={op: ops[op] for op in NOTABLE_OPS if ops.get(op)})
        try:
            cleaned = CleanupPass()(ir.serde.deserialize_model(proto)).model
            after = _op_counts(ir.serde.serialize_model(cleaned))
            facts.update(cleaned_nodes=sum(after.values()),
                         cleaned_shape_nodes=after.get("Shape", 0),
                         cleaned_pad_nodes=after.get("Pad", 0))
        except Exception as exc:  # cleanup is another engineer's; record, go on
            facts["cleanup_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return Subject(model, path, calib, heldout, facts)


# ------------------------------------------------------------------------------- measuring


def _key(model: str, method: str, ratio: float) -> str:
    return f"{model}|{method}|{ratio:g}"


def _skipped(result) -> tuple[int, int, list[str]]:
    """Layers the passes changed and skipped, and the commonest skip reasons (counted)."""
    layers = result.layers
    reasons = collections.Counter((layer.skipped or "")[:160] for layer in layers
                                  if layer.skipped)
    return (sum(1 for layer in layers if layer.skipped is None), sum(reasons.values()),
            [f"{count} x {reason}" for reason, count in reasons.most_common(3)])


def compress_row(subj: Subject, method: str, ratio: float, calib_samples: int) -> dict:
    out = WORK / "out" / f"{subj.model.name}_{method}_{ratio:g}.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = compress(CompressOptions(model=subj.path, output=out, method=method, ratio=ratio,
                                      data=str(subj.calib), calib_samples=calib_samples))
    seconds = time.perf_counter() - started
    changed, skipped, reasons = _skipped(result)
    v = result.verification
    return {"output": str(out.relative_to(ROOT)), "compress_s": seconds,
            "ratio_reached": result.ratio_reached, "layers_changed": changed,
            "layers_skipped": skipped, "skip_reasons": reasons,
            "calib_samples": calib_samples,
            "verify_cosine_mean": v.cosine_mean, "verify_agreement": v.agreement,
            "stage_s": {k: round(s, 2) for k, s in result.timings.items()}}


def evaluate_row(subj: Subject, candidate: Path, batches: tuple[int, ...],
                 latency_time: float) -> dict:
    """Quality on the held-out inputs and latency side by side, via compressor.evaluate."""
    data = load_data(subj.heldout)
    report = evaluate(candidate, reference=subj.path, data=data, batch_sizes=batches,
                      latency_min_time_s=latency_time, progress=False)
    c = report.comparison
    return {
        "macs_ratio": c.macs_ratio, "params_ratio": c.params_ratio, "size_ratio": c.size_ratio,
        "output_kind": c.output_kind, "agreement": c.agreement,
        "cosine_mean": c.cosine_mean, "cosine_min": c.cosine_min, "samples": c.samples,
        "latency": {str(b): {"original_ms": report.reference.latency[b].p50_ms,
                             "compressed_ms": report.candidate.latency[b].p50_ms,
                             "runs": report.candidate.latency[b].runs,
                             "speedup": c.speedup[b]}
                    for b in batches if b in c.speedup},
    }


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _failure(exc: BaseException, stage: str) -> str:
    traceback.print_exc()
    return f"{stage}: {type(exc).__name__}: {exc}".splitlines()[0][:400]


def run(models, methods, ratios, batches_for, latency_time: float, calib_samples: int,
        redo: bool, cache_path: Path = CACHE) -> tuple[dict, dict]:
    """Every (model, method, ratio) row not finished in the cache; returns (rows, facts)."""
    cache = _load_json(cache_path)
    rows, facts = cache.get("rows", {}), cache.get("facts", {})

    def save() -> None:
        atomic_write(cache_path, json.dumps({"rows": rows, "facts": facts}, indent=1))

    for name in models:
        model = MODELS[name]
        batches = batches_for(model)
        subj = None
        if name in facts and "notable_ops" not in facts[name]:  # facts of an older version
            facts[name] = prepare(model, facts).facts
            save()
        for method in methods:
            for ratio in ratios:
                key = _key(name, method, ratio)
                row = rows.get(key)
                done = row is not None and "error" not in row and not redo
                missing = [] if not done else [b for b in batches
                                               if str(b) not in row.get("latency", {})]
                if done and not missing:
                    continue
                if subj is None:
                    try:
                        subj = prepare(model, facts)
                    except Exception as exc:  # an export failure fails the model's rows
                        error = _failure(exc, "export")
                        for m in methods:
                            for r in ratios:
                                rows[_key(name, m, r)] = {"model": name, "method": m,
                                                          "ratio": r, "error": error,
                                                          "commit": commit()}
                        save()
                        break
                    facts[name] = subj.facts
                    save()
                print(f"[{key}] {'re-timing' if done else 'compressing'} ...", flush=True)
                if not done:
                    row = {"model": name, "method": method, "ratio": ratio,
                           "family": model.family, "exporter": model.exporter,
                           "compressed_at": commit()}
                    try:
                        row.update(compress_row(subj, method, ratio, calib_samples))
                    except Exception as exc:  # a failed row is recorded, the rest run
                        row["error"] = _failure(exc, "compress")
                row.update(commit=commit(), load_before=os.getloadavg()[0],
                           when=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
                if "error" not in row:
                    try:
                        row.update(evaluate_row(subj, ROOT / row["output"], batches,
                                                latency_time))
                    except Exception as exc:
                        row["error"] = _failure(exc, "evaluate")
                row["load_after"] = os.getloadavg()[0]
                rows[key] = row
                save()
                print(json.dumps({k: v for k, v in row.items()
                                  if k not in ("stage_s", "skip_reasons")}), flush=True)
            else:
                continue
            break  # the export failed: on to the next model
    return rows, facts


# ------------------------------------------------------------------------------- rendering


def _speedup(row: dict, batch: int) -> float | None:
    entry = row.get("latency", {}).get(str(batch))
    return None if entry is None else entry["speedup"]


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _quality(row: dict) -> str:
    if row.get("output_kind") == "logits" and row.get("family") == "cnn":
        return f"agreement {100 * row['agreement']:.1f}%, cos {row['cosine_mean']:.4f}"
    return f"cos {row['cosine_mean']:.4f} (min {row['cosine_min']:.4f})"


def verdict_lines(rows: dict) -> list[str]:
    lines = ["**Targets (issue 11)**, judged from the rows below:", ""]
    for i, ((model, method, ratio), (max_macs, min_speedup)) in enumerate(TARGETS.items(), 1):
        head = (f"{i}. {TARGET_TEXT[model]} at `--ratio {ratio:g}`: <= {max_macs:g} of the MACs "
                f"and >= {min_speedup:g}x faster at batch 1")
        row = rows.get(_key(model, method, ratio))
        if row is None:
            lines.append(f"{head}: **not run**.")
            continue
        if "error" in row:
            lines.append(f"{head}: **NOT met** (the row failed: {row['error'][:200]}).")
            continue
        speedup = _speedup(row, 1)
        macs_ok = row["macs_ratio"] <= max_macs
        speed_ok = speedup is not None and speedup >= min_speedup
        lines.append(
            f"{head}: **{'met' if macs_ok and speed_ok else 'NOT met'}**: MACs "
            f"{row['macs_ratio']:.3f} ({'met' if macs_ok else 'not met'}), batch-1 speedup "
            f"{_x(speedup)} ({'met' if speed_ok else 'not met'}; "
            f"{row['latency']['1']['original_ms']:.1f} -> "
            f"{row['latency']['1']['compressed_ms']:.1f} ms), {_quality(row)}, compressed in "
            f"{row['compress_s']:.0f} s.")
    return lines


def _order(key: str) -> tuple:
    model, method, ratio = key.split("|")
    names = list(MODELS)
    return (names.index(model) if model in names else 99, method, -float(ratio))


def markdown(rows: dict, facts: dict) -> str:
    keys = sorted(rows, key=_order)
    ok = [rows[k] for k in keys if "error" not in rows[k]]
    loads = [v for r in ok for v in (r.get("load_before"), r.get("load_after")) if v]
    commits = sorted({rows[k].get("commit", "unknown") for k in keys})
    batches = sorted({int(b) for r in ok for b in r.get("latency", {})})
    lines = [
        "## Graphs as real exporters write them: prune and svd on exported CNNs, a detector "
        "and a sentence encoder",
        "",
        "Each row: the model exported by torch (`torch.onnx.export`, TorchScript exporter or "
        "`dynamo=True`, opset 18, dynamic batch), compressed with "
        "`compress(CompressOptions(method=..., ratio=..., data=calib.npz, calib_samples=...))` "
        f"on {CALIB_SAMPLES} seeded random calibration inputs (images; token ids with padding "
        "masks for the encoder, in an .npz whose arrays are named as the model's inputs), then "
        f"`evaluate` against the exported original on {HELDOUT_SAMPLES} held-out seeded random "
        "inputs. *MACs kept*: compressed / original MACs per sample as `evaluate` counts them; "
        "*quality*: top-1 agreement for the classifiers' logits, cosine similarity of each "
        "sample's output to the original's (mean, minimum) for the encoder's embedding and the "
        "detector's maps; *speedup*: original p50 / compressed p50, both timed side by side in "
        "one process (alternating order, onnxruntime CPU, spinning off, default threads). "
        "**Weights are seeded random**: these figures are for speed and for what the tool "
        "costs; accuracy claims need trained weights (random weights have flat singular "
        "spectra and no redundant filters, so quality here is a pessimistic floor, not a "
        "prediction). No fine-tuning.",
        "",
    ]
    if loads:
        lines += [f"The machine was shared while this ran (1-minute load average "
                  f"{min(loads):.1f}–{max(loads):.1f} on {os.cpu_count()} cores): timings are "
                  "noisy, ratios of models timed side by side less so.", ""]
    lines += verdict_lines(rows) + [""]
    lines += ["| model | export: nodes, Shape, Pad | after cleanup | other ops of note "
              "| params | MACs | export s |",
              "|---|---|---|---|---|---|---|"]
    for name in [n for n in MODELS if n in facts]:
        f = facts[name]
        if "macs" not in f:
            continue
        notable = ", ".join(f"{op} {n}" for op, n in f.get("notable_ops", {}).items()) or "—"
        cleaned = (f"failed: {f['cleanup_error'][:80]}" if "cleanup_error" in f else
                   f"{f['cleaned_nodes']}, {f['cleaned_shape_nodes']}, {f['cleaned_pad_nodes']}")
        lines.append(f"| {name}: {f['description']} | {f['nodes']}, {f['shape_nodes']}, "
                     f"{f['pad_nodes']} | {cleaned} | {notable} | {f['params'] / 1e6:.2f}M "
                     f"| {f['macs'] / 1e6:.0f}M | {f['export_s']:.0f} |")
    speed_cols = "".join(f" speedup b{b} (ms) |" for b in batches)
    ts, dynamo = (facts.get(f"efficientnet_lite0-{e}", {}) for e in ("ts", "dynamo"))
    if ts.get("cleaned_nodes") and ts.get("cleaned_nodes") == dynamo.get("cleaned_nodes"):
        lines += ["", f"After cleanup the two EfficientNet-Lite0 exports have the same "
                  f"{ts['cleaned_nodes']} nodes, no Shape or Pad, and their rows reach the same "
                  "MACs and quality: the spread between their speedups is this machine's "
                  "timing noise."]
    lines += ["", "*calib cos*: the pipeline's own verification, the cosine on the calibration "
              "inputs the refits were fitted on; *quality* is measured on held-out inputs, so "
              "the gap between the two is what the refits overfit.", "",
              f"| model | method | ratio | MACs kept | params kept | quality | calib cos "
              f"|{speed_cols} compress s | layers changed / skipped |",
              "|---|---|---|---|---|---|---|" + "---|" * len(batches) + "---|---|"]
    for k in keys:
        r = rows[k]
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | {r['ratio']:g} | failed: "
                         f"{r['error'][:160]} |" + " |" * (len(batches) + 5))
            continue
        speeds = ""
        for b in batches:
            entry = r["latency"].get(str(b))
            speeds += (" — |" if entry is None else
                       f" {entry['speedup']:.2f}x ({entry['original_ms']:.1f} → "
                       f"{entry['compressed_ms']:.1f}) |")
        lines.append(f"| {r['model']} | {r['method']} | {r['ratio']:g} | {r['macs_ratio']:.3f} "
                     f"| {r['params_ratio']:.3f} | {_quality(r)} | {r['verify_cosine_mean']:.4f} "
                     f"|{speeds} "
                     f"{r['compress_s']:.0f} | {r['layers_changed']} / {r['layers_skipped']} |")
    reasons = [(r["model"], r["method"], r["ratio"], r["skip_reasons"]) for r in
               (rows[k] for k in keys) if r.get("skip_reasons")]
    if reasons:
        lines += ["", "Why layers were left alone (commonest reasons per row, counted):", ""]
        for model, method, ratio, why in reasons:
            lines.append(f"- {model} {method} {ratio:g}: " + "; ".join(why))
    failed = [rows[k] for k in keys if "error" in rows[k]]
    if failed:
        lines += ["", f"{len(failed)} rows failed; the error is in the table and the JSON."]
    lines += ["", f"Rows measured at commit{'s' if len(commits) > 1 else ''} "
              + ", ".join(commits) + " (`+dirty`: with uncommitted work in the tree)."]
    return "\n".join(lines)


def _list(text: str, known, what: str) -> tuple[str, ...]:
    items = tuple(v for v in text.split(",") if v)
    for item in items:
        if item not in known:
            raise SystemExit(f"--{what}: unknown '{item}'; known: {', '.join(known)}")
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ratio 0.5 only, batch 1")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"known: {', '.join(MODELS)}")
    parser.add_argument("--methods", default="prune,svd")
    parser.add_argument("--ratios", default=None, help="default: 0.75,0.5 (--quick: 0.5)")
    parser.add_argument("--batches", default=None,
                        help="default: 1 (and 16 for the CNNs and the detector); --quick: 1")
    parser.add_argument("--calib-samples", type=int, default=CALIB_SAMPLES)
    parser.add_argument("--latency-time", type=float, default=3.0,
                        help="seconds of side-by-side timing per row and batch size")
    parser.add_argument("--redo", action="store_true", help="recompute cached rows")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--from-cache", action="store_true",
                        help="render the cached rows without running anything")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    models = _list(args.models, MODELS, "models")
    methods = _list(args.methods, ("prune", "svd"), "methods")
    ratios = tuple(float(r) for r in (args.ratios or ("0.5" if args.quick else "0.75,0.5"))
                   .split(",") if r)
    if args.batches:
        fixed = tuple(int(b) for b in args.batches.split(",") if b)

        def batches_for(model: Model) -> tuple[int, ...]:
            return fixed
    else:
        def batches_for(model: Model) -> tuple[int, ...]:
            return (1,) if args.quick or model.family == "encoder" else (1, 16)

    if args.from_cache:
        cache = _load_json(args.cache)
        rows, facts = cache.get("rows", {}), cache.get("facts", {})
    else:
        rows, facts = run(models, methods, ratios, batches_for, args.latency_time,
                          args.calib_samples, args.redo, args.cache)
    text = markdown(rows, facts)
    print(text)
    if not args.no_write and rows:
        atomic_write(SECTIONS / f"{NAME}.json", json.dumps(
            {"rows": [rows[k] for k in sorted(rows, key=_order)], "facts": facts}, indent=1))
        print(f"wrote {write_section(NAME, text)}")


if __name__ == "__main__":
    main()
