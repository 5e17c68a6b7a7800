"""The compression pipeline: load -> clean up -> calibrate -> method passes -> verify -> save.

Everything the ``compress`` command does is here, callable from Python::

    from compressor.pipeline import CompressOptions, compress
    result = compress(CompressOptions(model="vgg.pt", arch="vgg", method="svd", ratio=0.5,
                                      data="calib.npz", output="vgg_svd.onnx"))
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

import compressor
from compressor import io, runtime
from compressor.data import Dataset, Feeds, InputSpec, load_data, model_feeds, stand_in_feeds
from compressor.errors import OptionError, VerificationError
from compressor.evaluate import cosine_similarities, is_class_logits, run_outputs
from compressor.methods import METHODS
from compressor.passes.base import PassResult
from compressor.passes.calibrate import Calibration, streaming_batch_size
from compressor.passes.cleanup import CleanupPass
from compressor.profile import ModelProfile, profile_model
from compressor.progress import ProgressReporter
from compressor.recipe import QUANTIZE_CHOICES, Recipe, SpeedReport, parse_methods

RECIPE_KEY = "compressor.recipe"
MAX_IR_VERSION = 10  # onnxruntime >= 1.21 reads it; onnx >= 1.23 would write 14 by default


@dataclass(frozen=True)
class CompressOptions:
    """Everything ``compressor compress`` accepts."""

    model: str | Path
    output: str | Path
    method: str  # one method, or a comma list run in order ("prune,svd")
    # The fraction of MACs to keep; None: 0.5, or no MACs cap (1.0) when --speedup is given.
    ratio: float | None = None
    data: str | None = None
    calib_samples: int = 512
    arch: str | None = None
    # per sample, no batch: one shape (single input), or by input name (io.parse_input_shapes)
    input_shape: tuple[int, ...] | dict[str, tuple[int, ...]] | None = None
    trust_pickle: bool = False
    seed: int = 0
    provider: str = "cpu"
    # svd
    rank: int | None = None
    energy: float | None = None
    schemes: tuple[str, ...] = ("channel", "spatial")
    rank_multiple: int = 16
    # sketch
    sketches: int = 2
    sketch_rows: int | None = None
    refit: bool = True
    # diffconv
    threshold: float | None = None
    tolerance: float = 1e-4  # fast-conv: the largest relative error an algorithm may add
    # prune and lsh (refit above applies to them too)
    criterion: str = "l1"
    ranking: str = "global"
    min_channels_fraction: float = 0.1
    # Kept channel counts are multiples of this: onnxruntime's blocked convs run pruned
    # layers with other counts on a slower path (resnet20 at half the MACs: 0.66x the
    # original's batch-64 speed at 1, 1.0x at 8, 1.65x at 16; see docs/BENCHMARKS.md).
    channel_multiple: int = 8
    lsh_bits: int | None = None
    lsh_tables: int | None = None
    asymmetric: bool = False
    # latency as the objective: the model must run `speedup` times faster than the original,
    # measured by onnxruntime with `provider`, `threads` and `batch`
    speedup: float | None = None
    batch: int = 1
    threads: int | None = None
    quantize: str | None = None  # "int8": a last stage with onnxruntime's quantization tools

    def __post_init__(self):
        methods = parse_methods(self.method)
        if self.speedup is not None:
            if (isinstance(self.speedup, bool) or not isinstance(self.speedup, (int, float))
                    or not math.isfinite(self.speedup) or self.speedup <= 1):
                raise OptionError(
                    f"--speedup must be a number > 1 (times faster than the original), "
                    f"got {self.speedup}")
            if self.ratio is None and self.quantize is None and not any(
                    METHODS[m].measures_latency for m in methods):
                raise OptionError(
                    f"--speedup: {self.method} chooses by MACs only; give --ratio, or use a "
                    "method that chooses by measured latency: "
                    + ", ".join(m.name for m in METHODS.values() if m.measures_latency))
        if self.ratio is None:
            object.__setattr__(self, "ratio", 0.5 if self.speedup is None else 1.0)
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            raise OptionError(f"unknown --quantize '{self.quantize}': choose from "
                              + ", ".join(QUANTIZE_CHOICES))
        if self.batch < 1:
            raise OptionError(f"--batch must be >= 1, got {self.batch}")
        if self.threads is not None and self.threads < 1:
            raise OptionError(f"--threads must be >= 1, got {self.threads}")
        if not 0 < self.ratio <= 1:
            raise OptionError(
                f"--ratio must be in (0, 1] (the fraction of MACs to keep), got {self.ratio}"
            )
        if self.calib_samples < 1:
            raise OptionError(f"--calib-samples must be >= 1, got {self.calib_samples}")
        if self.channel_multiple < 1:
            raise OptionError(f"--channel-multiple must be >= 1, got {self.channel_multiple}")


@dataclass
class Verification:
    """Checks of the compressed model against the original on the same inputs."""

    inputs: str  # "calibration" or "random"
    samples: int
    agreement: float | None  # top-1; None when the output is not class logits (N, C)
    max_abs_diff: float
    mean_abs_diff: float
    relative_error: float
    checker: bool = True
    onnxruntime: bool = True
    # cosine similarity of each sample's flattened output to the original's: mean and worst
    # (judges embeddings and hidden states, which have no top-1; see compressor.evaluate)
    cosine_mean: float | None = None
    cosine_min: float | None = None


@dataclass
class CompressionResult:
    output: Path
    method: str
    ratio_requested: float
    before: ModelProfile
    after: ModelProfile
    passes: list[PassResult]
    verification: Verification
    notes: list[str] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)
    speed: SpeedReport | None = None  # measured against the original (--speedup, --quantize)
    stages: list = field(default_factory=list)  # StageRecord of each method stage
    # seconds per stage of the run: load, cleanup, each pass, the recipe's measuring, verify,
    # save, total
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ratio_reached(self) -> float:
        return self.after.macs / self.before.macs if self.before.macs else 1.0

    @property
    def layers(self):
        return [layer for p in self.passes for layer in p.layers]


def _noop(label: str, done: int, total: int) -> None:
    pass


class _Laps:
    """Wall-clock seconds of the pipeline's stages, taken as laps of one clock."""

    def __init__(self):
        self.started = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.last = now

    def breakdown(self, results: list[PassResult]) -> dict[str, float]:
        """The laps, with the recipe split into its passes (summed over recipe rounds) and
        what is left of it (latency measurements, serialisation) as ``recipe other``."""
        out = {k: v for k, v in self.laps.items() if k != "recipe"}
        passes: dict[str, float] = {}
        stages: dict[str, float] = {}
        for r in results:
            name = f"pass {r.stats.get('pass', 'unnamed')}"
            passes[name] = passes.get(name, 0.0) + float(r.stats.get("seconds", 0.0))
            # a pass's own stages (calibration forwards, statistics, decompositions, ...)
            for stage, seconds in (r.stats.get("seconds_by_stage") or {}).items():
                key = f"{name}: {stage}"
                stages[key] = stages.get(key, 0.0) + float(seconds)
        recipe = self.laps.get("recipe", 0.0)
        out.update(passes)
        out.update(stages)
        out["recipe other"] = max(0.0, recipe - sum(passes.values()))
        out["total"] = time.perf_counter() - self.started
        return out


def _load_calibration_data(opts: CompressOptions) -> Dataset | None:
    if opts.data is None:
        return None
    return load_data(opts.data, split="train", limit=opts.calib_samples)


def _fit_to_shape(data: Dataset, inputs: Sequence[InputSpec], source: str) -> Feeds:
    """The data's arrays as feeds of every model input (types converted, a single input's
    samples reshaped to fit), and notes on doubtful conversions."""
    return model_feeds(data, inputs, source=Path(source).name or source)


def verify(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    inputs: np.ndarray | Mapping[str, np.ndarray],
    provider: str = "cpu",
    label: str = "calibration",
    reference: np.ndarray | None = None,
) -> Verification:
    """onnx.checker, onnxruntime load and run, and output comparison with the original.

    ``inputs``: one array for a single-input model, or arrays by input name (every input
    fed). Top-1 agreement is measured where the first output is class logits; the cosine
    similarity of each sample's output always. ``reference``: the original's first output on
    ``inputs``, when it is known already (a calibration survey ran it); otherwise it runs."""
    try:
        onnx.checker.check_model(compressed, full_check=True)
    except Exception as e:  # onnx raises several types
        raise VerificationError(f"compressed model fails onnx.checker: {e}") from e
    # batches sized by the inputs' bytes, and one session alive at a time: at 256 images of
    # 224 x 224 the two sessions' activations took 8.9 GB for ResNet-50
    arrays = [inputs] if isinstance(inputs, np.ndarray) else list(inputs.values())
    batch = streaming_batch_size(sum(a[0].nbytes for a in arrays), 256)
    try:
        sess_new = runtime.session(compressed, provider=provider)
    except Exception as e:
        raise VerificationError(f"onnxruntime cannot load the compressed model: {e}") from e
    y_new = run_outputs(sess_new, inputs, batch)
    del sess_new
    y_ref = reference
    if y_ref is None:
        y_ref = run_outputs(runtime.session(original, provider=provider), inputs, batch)
    if y_new.shape != y_ref.shape:
        raise VerificationError(f"output shape changed: {y_ref.shape} -> {y_new.shape}")
    if not np.all(np.isfinite(y_new)):
        raise VerificationError("compressed model produces non-finite outputs")
    y_new64, y_ref64 = y_new.astype(np.float64), y_ref.astype(np.float64)
    diff = np.abs(y_new64 - y_ref64)
    agreement = None
    if is_class_logits(y_new.shape):
        agreement = float(np.mean(y_new.argmax(1) == y_ref.argmax(1)))
    cosine = cosine_similarities(y_new, y_ref)
    rel = float(np.linalg.norm(y_new64 - y_ref64) / max(np.linalg.norm(y_ref64), 1e-30))
    return Verification(
        label, len(y_new), agreement, float(diff.max()), float(diff.mean()), rel,
        cosine_mean=float(cosine.mean()), cosine_min=float(cosine.min()),
    )


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    versions = {
        "compressor": compressor.__version__,
        "onnx": onnx.__version__,
        "python": platform.python_version(),
    }
    for module in ("onnxruntime", "torch", "onnx_ir", "onnxscript", "numpy"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - optional
            pass
    return versions


def compress(opts: CompressOptions, progress: ProgressReporter | None = None) -> CompressionResult:
    """Compress ``opts.model`` with ``opts.method`` and write ``opts.output`` atomically."""
    report = progress or _noop
    laps = _Laps()
    output = Path(opts.output)
    if output.suffix.lower() != ".onnx":
        raise OptionError(f"output '{output}' must end in .onnx")

    data = _load_calibration_data(opts)
    loaded = io.load_model(
        opts.model,
        arch=opts.arch,
        input_shape=opts.input_shape,
        trust_pickle=opts.trust_pickle,
        sample_inputs=None if data is None else (data.inputs or data.x),
    )
    if Path(opts.model).resolve() == output.resolve():
        raise OptionError(f"output '{output}' is the input file; choose another -o")
    report("load model", 1, 1)
    laps.lap("load")

    model = ir.serde.deserialize_model(loaded.proto)
    cleanup = CleanupPass()(model)
    model = cleanup.model
    original = ir.serde.serialize_model(model)
    original.ir_version = min(original.ir_version, MAX_IR_VERSION)
    before = profile_model(original)
    report("clean up", 1, 1)
    laps.lap("cleanup")

    calibration = None
    notes = list(cleanup.notes)
    if data is not None:
        feeds = _fit_to_shape(data, loaded.inputs, str(opts.data))
        notes.extend(feeds.notes)
        calibration = Calibration(feeds.arrays, provider=opts.provider, progress=report)
    else:
        notes.append(f"no --data: {opts.method} runs in its data-free form")

    latency = None
    if opts.speedup is not None or opts.quantize is not None:
        from compressor.latency import LatencyContext, LatencyTable

        latency = LatencyTable(LatencyContext(opts.provider, opts.threads, opts.batch))
    recipe_run = Recipe(opts, calibration, latency, max_ir_version=MAX_IR_VERSION,
                        progress=report).run(original)
    model, results = recipe_run.model, recipe_run.results
    for r in results:
        notes.extend(r.notes)
    notes.extend(recipe_run.notes)
    laps.lap("recipe")

    compressed = ir.serde.serialize_model(model)
    compressed.ir_version = min(compressed.ir_version, MAX_IR_VERSION)
    after = profile_model(compressed)

    reference = None
    if calibration is not None:
        check_inputs, label = calibration.arrays, "calibration"
        reference = calibration.remembered_output(original)
    else:  # floats uniform in [0, 1); token ids within their vocabulary, masks ones
        check_inputs = stand_in_feeds(
            loaded.inputs, 64, model=original, seed=opts.seed, floats="uniform"
        ).arrays
        label = "random"
    verification = verify(original, compressed, check_inputs, opts.provider, label,
                          reference)
    report("verify", 1, 1)
    laps.lap("verify")

    recipe = {
        "method": opts.method,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("model", "output")},
        "source": {
            "file": Path(opts.model).name,
            "format": loaded.source_format,
            "sha256": _file_digest(Path(opts.model)),
        },
        "ratio_requested": opts.ratio,
        "ratio_reached": after.macs / before.macs if before.macs else 1.0,
        "versions": _versions(),
        "passes": recipe_run.passes,
        "stages": [asdict(stage) for stage in recipe_run.stages],
        "speed": None if recipe_run.speed is None else recipe_run.speed.as_dict(),
        "layers": [
            {
                "name": layer.name,
                "op": layer.op,
                "detail": layer.detail,
                "skipped": layer.skipped,
                "error": layer.error,
            }
            for r in results
            for layer in r.layers
        ],
        "verification": asdict(verification),
    }
    _set_metadata(compressed, RECIPE_KEY, json.dumps(recipe, default=str))
    io.save_model(compressed, output, input_path=opts.model)
    report("save", 1, 1)
    laps.lap("save")
    after = profile_model(compressed, file_bytes=output.stat().st_size)
    # the original as ONNX, so both sizes compare like with like (a .pt file is no measure)
    before = profile_model(original, file_bytes=len(original.SerializeToString()))
    return CompressionResult(
        output, opts.method, opts.ratio, before, after, results, verification, notes, recipe,
        speed=recipe_run.speed, stages=recipe_run.stages, timings=laps.breakdown(results),
    )


def _set_metadata(proto: onnx.ModelProto, key: str, value: str) -> None:
    for prop in proto.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    proto.metadata_props.add(key=key, value=value)


def read_recipe(proto: onnx.ModelProto) -> dict[str, Any] | None:
    """The compression recipe stored in a model compressed by compressor, if any."""
    for prop in proto.metadata_props:
        if prop.key == RECIPE_KEY:
            return json.loads(prop.value)
    return None
