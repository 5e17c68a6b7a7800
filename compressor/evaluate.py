"""Evaluate a compressed ONNX model, alone or against its reference, with onnxruntime.

Accuracy is top-1 on labelled data; agreement and logit differences compare the two models'
first outputs on the same inputs; latency is timed side by side in one run, alternating which
model goes first each round, so that both see the same machine state. Without data, random
standard-normal inputs of the model's input shape stand in (accuracy is then not measured).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from compressor import runtime
from compressor.errors import (
    DataError,
    ModelLoadError,
    OptionError,
    UnsupportedModelError,
    VerificationError,
)
from compressor.profile import ModelProfile, profile_model
from compressor.progress import progress_bars

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

    from compressor.data import Dataset

ModelLike = onnx.ModelProto | str | os.PathLike

DEFAULT_BATCH_SIZES = (1, 64)
RANDOM_SAMPLES = 256  # random inputs used for agreement when no data is given
RANDOM_SEED = 0

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


@dataclass
class LatencyStats:
    """Wall-clock time of one ``session.run`` call at one batch size."""

    batch: int
    p50_ms: float
    p95_ms: float
    mean_ms: float
    runs: int


@dataclass
class ModelStats:
    """What one model costs and how well it does."""

    name: str
    path: str | None
    params: int
    macs: int  # per sample (batch 1)
    file_bytes: int | None
    accuracy: float | None  # top-1 on labelled data, fraction in [0, 1]
    latency: dict[int, LatencyStats] = field(default_factory=dict)  # by batch size


@dataclass
class Comparison:
    """Candidate against reference. Ratios are candidate / reference (below 1: smaller)."""

    agreement: float  # fraction of inputs where both models' top-1 predictions are equal
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    speedup: dict[int, float]  # reference p50 / candidate p50, by batch size
    macs_ratio: float
    params_ratio: float
    size_ratio: float | None
    # candidate - reference, as a fraction: -0.012 means the candidate lost 1.2 points
    accuracy_delta: float | None
    samples: int = 0  # inputs agreement and differences were measured on


@dataclass
class EvaluationReport:
    """Result of ``evaluate``: both models' stats, their comparison, and where it ran."""

    candidate: ModelStats
    reference: ModelStats | None
    comparison: Comparison | None
    provider: str
    data: str | None  # data set name; None when random inputs stood in
    machine: dict[str, Any]
    samples: int = 0  # inputs the outputs were computed on
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: batch-size keys become strings, non-finite floats None."""
        from compressor.report import jsonable

        return jsonable(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvaluationReport:
        """Inverse of ``to_dict`` (for benchmark scripts that read saved reports back)."""

        def stats(s: Mapping[str, Any] | None) -> ModelStats | None:
            if s is None:
                return None
            latency = {int(b): LatencyStats(**v) for b, v in s.get("latency", {}).items()}
            return ModelStats(**{**s, "latency": latency})

        comparison = None
        if d.get("comparison") is not None:
            c = d["comparison"]
            comparison = Comparison(
                **{**c, "speedup": {int(b): v for b, v in c["speedup"].items()}}
            )
        return cls(
            candidate=stats(d["candidate"]),
            reference=stats(d.get("reference")),
            comparison=comparison,
            provider=d["provider"],
            data=d.get("data"),
            machine=dict(d.get("machine", {})),
            samples=d.get("samples", 0),
            notes=list(d.get("notes", [])),
        )


# ----------------------------------------------------------------------------- sessions, inputs


@dataclass(frozen=True)
class _InputSpec:
    name: str
    sample_shape: tuple[int, ...]  # without the batch dimension
    dtype: type
    fixed_batch: int | None  # set when the model's batch dimension is a number


def _input_spec(sess: InferenceSession) -> _InputSpec:
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise UnsupportedModelError(f"the model has {len(inputs)} inputs ({names}); expected one")
    value = inputs[0]
    if value.type not in _ORT_DTYPES:
        raise UnsupportedModelError(
            f"input '{value.name}' is {value.type}; expected a float tensor"
        )
    shape = list(value.shape)
    if not shape:
        raise UnsupportedModelError(f"input '{value.name}' is a scalar; expected a batch")
    for i, d in enumerate(shape[1:], start=1):
        if not isinstance(d, int):
            raise UnsupportedModelError(
                f"input '{value.name}' has a symbolic dimension {i} ('{d}'); pass --input-shape"
            )
    fixed = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    return _InputSpec(value.name, tuple(shape[1:]), _ORT_DTYPES[value.type], fixed)


def run_outputs(
    sess: InferenceSession,
    x: np.ndarray,
    batch_size: int = 256,
    *,
    progress: bool | Callable[[str, int, int], None] = False,
    description: str = "running",
) -> np.ndarray:
    """The session's first output on ``x``, computed ``batch_size`` rows at a time.

    ``progress`` is True for a progress bar on an interactive stderr, or a callable
    ``(label, done, total)`` such as a ``compressor.progress.ProgressReporter`` already open.
    A model whose batch dimension is fixed runs at that batch size, the last batch padded
    with zeros (and the padding's outputs dropped).
    """
    if callable(progress):
        return _run_outputs(sess, x, batch_size, progress, description)
    with progress_bars(bool(progress)) as reporter:
        return _run_outputs(sess, x, batch_size, reporter, description)


def _run_outputs(sess, x, batch_size, reporter, description) -> np.ndarray:
    spec = _input_spec(sess)
    x = np.ascontiguousarray(x, dtype=spec.dtype)
    if x.shape[1:] != spec.sample_shape:
        raise DataError(
            f"inputs have shape {x.shape[1:]} per sample; the model takes {spec.sample_shape}"
        )
    n = len(x)
    if n == 0:
        raise DataError("no inputs to run the model on")
    step = spec.fixed_batch or max(1, int(batch_size))
    output_name = sess.get_outputs()[0].name
    chunks = []
    for start in range(0, n, step):
        batch = x[start : start + step]
        rows = len(batch)
        if spec.fixed_batch and rows < step:
            pad = np.zeros((step - rows, *batch.shape[1:]), dtype=batch.dtype)
            batch = np.concatenate([batch, pad])
        out = sess.run([output_name], {spec.name: batch})[0]
        chunks.append(np.asarray(out)[:rows])
        reporter(description, start + rows, n)
    return np.concatenate(chunks)


def _batch_of(x: np.ndarray, batch: int) -> np.ndarray:
    """The first ``batch`` rows of ``x``, repeating rows when ``x`` has fewer."""
    if len(x) >= batch:
        return np.ascontiguousarray(x[:batch])
    reps = -(-batch // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:batch])


def measure_latency(
    sessions: Mapping[str, InferenceSession],
    x: np.ndarray,
    batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES,
    *,
    warmup: int = 3,
    runs: int | None = None,
    min_time_s: float = 1.0,
    min_runs: int = 5,
    max_runs: int = 10_000,
) -> dict[str, dict[int, LatencyStats]]:
    """Time ``session.run`` for every session at every batch size, side by side.

    Each round runs every session once, the order rotating from round to round (A, B then
    B, A, ...), so drifts in clock speed or cache state fall on all sessions alike. With
    ``runs`` set, exactly that many rounds; otherwise rounds continue until ``min_time_s``
    has passed (at least ``min_runs``, at most ``max_runs``). A session whose batch dimension
    is fixed is timed only at that batch size.
    """
    if not sessions:
        return {}
    names = list(sessions)
    specs = {name: _input_spec(s) for name, s in sessions.items()}
    outputs = {name: [s.get_outputs()[0].name] for name, s in sessions.items()}
    result: dict[str, dict[int, LatencyStats]] = {name: {} for name in names}
    for batch in dict.fromkeys(int(b) for b in batch_sizes):  # unique, in order
        if batch < 1:
            raise OptionError(f"batch size {batch} must be at least 1")
        active = [n for n in names if specs[n].fixed_batch in (None, batch)]
        if not active:
            continue
        feeds = {n: {specs[n].name: _batch_of(x, batch).astype(specs[n].dtype)} for n in active}
        for n in active:
            for _ in range(warmup):
                sessions[n].run(outputs[n], feeds[n])
        times: dict[str, list[float]] = {n: [] for n in active}
        started = time.perf_counter()
        rounds = 0
        while True:
            if runs is not None:
                if rounds >= runs:
                    break
            elif rounds >= max_runs or (
                rounds >= min_runs and time.perf_counter() - started >= min_time_s
            ):
                break
            shift = rounds % len(active)
            for n in active[shift:] + active[:shift]:
                t0 = time.perf_counter()
                sessions[n].run(outputs[n], feeds[n])
                times[n].append(time.perf_counter() - t0)
            rounds += 1
        for n in active:
            ms = np.asarray(times[n]) * 1e3
            if len(ms) == 0:
                continue
            result[n][batch] = LatencyStats(
                batch=batch,
                p50_ms=float(statistics.median(ms)),
                p95_ms=float(np.percentile(ms, 95)),
                mean_ms=float(ms.mean()),
                runs=len(ms),
            )
    return result


# ----------------------------------------------------------------------------- evaluation


def machine_info(provider: str = "cpu") -> dict[str, Any]:
    """The machine and runtime that measurements were taken on."""
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "provider": provider,
    }
    if provider == "cuda":
        info["gpu"] = _gpu_name()
    return info


def _gpu_name() -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def _load_onnx(path: Path) -> tuple[onnx.ModelProto, int]:
    """The model at ``path`` with its external data, and the bytes it takes on disk (the
    file plus the external-data files it names)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
        locations = {
            entry.value
            for tensor in proto.graph.initializer
            if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data
            if entry.key == "location"
        }
        if locations:
            onnx.load_external_data_for_model(proto, str(path.parent))
    except Exception as e:  # protobuf raises its own DecodeError, OSError for data files
        raise ModelLoadError(f"{path}: not a readable ONNX model ({e})") from e
    size = path.stat().st_size + sum(
        (path.parent / location).stat().st_size for location in locations
    )
    return proto, size


@dataclass
class _Resolved:
    proto: onnx.ModelProto
    path: str | None
    name: str
    file_bytes: int


def _resolve(model: Any, default_name: str) -> _Resolved:
    """A ModelProto, a path, or a ``compressor.io.LoadedModel`` -> proto, path, name, size.

    The size is the ONNX file's when the model is an ONNX file on disk, else the serialized
    graph's (a torch checkpoint's size would not compare with an ONNX file's).
    """
    if isinstance(model, onnx.ModelProto):
        name = model.graph.name or default_name
        return _Resolved(model, None, name, model.ByteSize())
    if hasattr(model, "proto") and isinstance(model.proto, onnx.ModelProto):  # LoadedModel
        source = getattr(model, "source", None)
        path = Path(source) if source else None
        if path is not None and path.suffix == ".onnx" and path.is_file():
            size = _load_onnx(path)[1]
        else:
            size = model.proto.ByteSize()
        return _Resolved(
            model.proto, str(path) if path else None, path.stem if path else default_name, size
        )
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such model file")
        if path.suffix == ".onnx":
            proto, size = _load_onnx(path)
            return _Resolved(proto, str(path), path.stem, size)
        from compressor.io import load_model  # torch checkpoints and the like

        return _resolve(load_model(path), path.stem)
    raise TypeError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")


def _top1(outputs: np.ndarray) -> np.ndarray:
    """Predicted class per sample: argmax over axis 1 (the class axis of (N, C, ...))."""
    if outputs.ndim < 2:
        raise UnsupportedModelError(
            f"the model's first output has shape {outputs.shape}; expected (batch, classes)"
        )
    return outputs.argmax(axis=1)


def _accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    predictions = _top1(outputs)
    labels = np.asarray(labels)
    if labels.shape != predictions.shape:
        raise DataError(f"labels have shape {labels.shape}; the model predicts {predictions.shape}")
    return float(np.mean(predictions == labels))


def _inputs(
    data: Dataset | None, sample_shape: tuple[int, ...], random_samples: int
) -> tuple[np.ndarray, np.ndarray | None]:
    if data is None:
        rng = np.random.default_rng(RANDOM_SEED)
        return rng.standard_normal((random_samples, *sample_shape), dtype=np.float32), None
    x = np.asarray(data.x)
    if x.ndim == 0 or x.shape[1:] != tuple(sample_shape):
        raise DataError(
            f"data '{data.name}' has samples of shape {x.shape[1:]}; the model takes "
            f"{tuple(sample_shape)} (pass --input-shape to reshape the data)"
        )
    if len(x) == 0:
        raise DataError(f"data '{data.name}' is empty")
    y = None if data.y is None else np.asarray(data.y)
    if y is not None and len(y) != len(x):
        raise DataError(f"data '{data.name}' has {len(x)} samples but {len(y)} labels")
    return x, y


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def evaluate(
    candidate: ModelLike,
    *,
    reference: ModelLike | None = None,
    data: Dataset | None = None,
    provider: str = "cpu",
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    latency_runs: int | None = None,
    latency_min_time_s: float = 1.0,
    threads: int | None = None,
    random_samples: int = RANDOM_SAMPLES,
    progress: bool = True,
    plot_path: str | os.PathLike | None = None,
    candidate_name: str | None = None,
    reference_name: str | None = None,
) -> EvaluationReport:
    """Measure ``candidate`` (and compare it with ``reference``) on ``data``.

    Models are ONNX protos, paths (ONNX, or anything ``compressor.io.load_model`` reads) or
    ``LoadedModel``s. Without ``data`` (or with unlabelled data) accuracy is None and the
    report's notes say so. ``latency_runs`` fixes the number of timed rounds per batch size;
    by default rounds run for ``latency_min_time_s``. ``plot_path`` writes a summary PNG.
    """
    notes: list[str] = []
    cand = _resolve(candidate, "candidate")
    ref = _resolve(reference, "reference") if reference is not None else None
    cand_profile = profile_model(cand.proto, cand.file_bytes)
    ref_profile = profile_model(ref.proto, ref.file_bytes) if ref else None

    sessions = {"candidate": runtime.session(cand.proto, provider, threads)}
    if ref is not None:
        sessions["reference"] = runtime.session(ref.proto, provider, threads)
    specs = {n: _input_spec(s) for n, s in sessions.items()}
    sample_shape = specs["candidate"].sample_shape
    if ref is not None and specs["reference"].sample_shape != sample_shape:
        raise OptionError(
            f"the reference takes inputs of shape {specs['reference'].sample_shape} per sample "
            f"but the candidate takes {sample_shape}: they are not the same model"
        )

    x, y = _inputs(data, sample_shape, random_samples)
    if data is None:
        notes.append(f"no data: {len(x)} random standard-normal inputs; accuracy not measured")
    elif y is None:
        notes.append(f"data '{data.name}' has no labels; accuracy not measured")

    with progress_bars(progress) as reporter:
        outputs = {
            n: run_outputs(s, x, progress=reporter, description=f"{n}: outputs")
            for n, s in sessions.items()
        }
    accuracy = {n: (_accuracy(o, y) if y is not None else None) for n, o in outputs.items()}

    latency = measure_latency(
        sessions, x, batch_sizes, runs=latency_runs, min_time_s=latency_min_time_s
    )
    for n, spec in specs.items():
        skipped = [b for b in batch_sizes if b not in latency[n]]
        if skipped:
            notes.append(
                f"{n} has a fixed batch size of {spec.fixed_batch}: "
                f"latency at batch {', '.join(map(str, skipped))} not measured"
            )

    def model_stats(n: str, resolved: _Resolved, profile: ModelProfile, name: str | None):
        return ModelStats(
            name=name or resolved.name,
            path=resolved.path,
            params=int(profile.params),
            macs=int(profile.macs),
            file_bytes=resolved.file_bytes,
            accuracy=accuracy[n],
            latency=latency[n],
        )

    cand_stats = model_stats("candidate", cand, cand_profile, candidate_name)
    ref_stats = comparison = None
    if ref is not None:
        ref_stats = model_stats("reference", ref, ref_profile, reference_name)
        comparison = compare_outputs(
            outputs["candidate"], outputs["reference"], cand_stats, ref_stats
        )

    report = EvaluationReport(
        candidate=cand_stats,
        reference=ref_stats,
        comparison=comparison,
        provider=provider,
        data=data.name if data is not None else None,
        machine=machine_info(provider),
        samples=len(x),
        notes=notes,
    )
    if plot_path is not None:
        from compressor.plots import plot_summary

        plot_summary(report, plot_path)
    return report


def compare_outputs(
    candidate_outputs: np.ndarray,
    reference_outputs: np.ndarray,
    candidate: ModelStats,
    reference: ModelStats,
) -> Comparison:
    """Compare two models' outputs on the same inputs and their measured stats."""
    if candidate_outputs.shape != reference_outputs.shape:
        raise VerificationError(
            f"the candidate's output has shape {candidate_outputs.shape} but the reference's "
            f"has {reference_outputs.shape}"
        )
    diff = np.abs(candidate_outputs.astype(np.float64) - reference_outputs.astype(np.float64))
    speedup = {
        b: reference.latency[b].p50_ms / candidate.latency[b].p50_ms
        for b in candidate.latency
        if b in reference.latency and candidate.latency[b].p50_ms > 0
    }
    accuracy_delta = None
    if candidate.accuracy is not None and reference.accuracy is not None:
        accuracy_delta = candidate.accuracy - reference.accuracy
    return Comparison(
        agreement=float(np.mean(_top1(candidate_outputs) == _top1(reference_outputs))),
        max_abs_logit_diff=float(diff.max()) if diff.size else 0.0,
        mean_abs_logit_diff=float(diff.mean()) if diff.size else 0.0,
        speedup=speedup,
        macs_ratio=_or_nan(_ratio(candidate.macs, reference.macs)),
        params_ratio=_or_nan(_ratio(candidate.params, reference.params)),
        size_ratio=_ratio(candidate.file_bytes, reference.file_bytes),
        accuracy_delta=accuracy_delta,
        samples=len(candidate_outputs),
    )
