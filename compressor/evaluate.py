"""Evaluate a compressed ONNX model, alone or against its reference, with onnxruntime.

Accuracy is top-1 on labelled data; agreement, output differences and cosine similarity
compare the two models' first outputs on the same inputs; latency is timed side by side in one
run, alternating which model goes first each round, so that both see the same machine state.

Every input of the model is fed: the data's arrays by input name (``compressor.data``), or,
without data, random stand-ins (floats standard normal, token ids within the vocabulary of the
embedding they index, masks all ones; accuracy is then not measured).

Which outputs are class logits is decided by rank: a rank-2 output (N, C) with C >= 2 is
logits, judged by top-1 agreement (and accuracy on labels); anything else, such as an
embedding of rank 3 (N, seq, hidden) or a feature map, is judged by the cosine similarity of
each sample's flattened output to the reference's (mean and minimum over samples). Cosine
similarity is reported for logits too.
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
from compressor.data import (
    InputSpec,
    model_feeds,
    session_input_specs,
    stand_in_feeds,
)
from compressor.errors import (
    DataError,
    ModelLoadError,
    OptionError,
    UnsupportedModelError,
    VerificationError,
)
from compressor.passes.quantize import int8_nodes
from compressor.profile import ModelProfile, profile_model
from compressor.progress import progress_bars

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

    from compressor.data import Dataset

ModelLike = onnx.ModelProto | str | os.PathLike
Inputs = np.ndarray | Mapping[str, np.ndarray]  # one input's samples, or arrays by input name

DEFAULT_BATCH_SIZES = (1, 64)
RANDOM_SAMPLES = 256  # random inputs used for agreement when no data is given
RANDOM_SEED = 0


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
    int8_nodes: list[str] = field(default_factory=list)  # nodes run in int8 (QDQ)


@dataclass
class Comparison:
    """Candidate against reference. Ratios are candidate / reference (below 1: smaller).

    ``agreement`` is None when the output is not class logits (see the module docstring);
    the cosine similarities judge every output.
    """

    agreement: float | None  # fraction of inputs where both models' top-1 predictions agree
    max_abs_logit_diff: float  # of the first output, whatever it holds
    mean_abs_logit_diff: float
    speedup: dict[int, float]  # reference p50 / candidate p50, by batch size
    macs_ratio: float
    params_ratio: float
    size_ratio: float | None
    # candidate - reference, as a fraction: -0.012 means the candidate lost 1.2 points
    accuracy_delta: float | None
    samples: int = 0  # inputs agreement and differences were measured on
    # cosine similarity of each sample's flattened output to the reference's: mean and worst
    cosine_mean: float | None = None
    cosine_min: float | None = None
    output_kind: str = "logits"  # "logits" (N, C) or "features" (embeddings, hidden states)


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


def _input_specs(sess: InferenceSession) -> tuple[InputSpec, ...]:
    return session_input_specs(sess)


def _as_feeds(sess_specs: Sequence[InputSpec], x: Inputs) -> dict[str, np.ndarray]:
    """``x`` as a feed of every input in ``sess_specs``: one array feeds a single-input model
    whatever its input is called; a mapping is read by input name. Arrays are converted to the
    input's type within a kind (float to float, integer to integer); shapes are checked."""
    if not isinstance(x, Mapping):
        if len(sess_specs) != 1:
            names = ", ".join(spec.name for spec in sess_specs)
            raise DataError(
                f"the model has {len(sess_specs)} inputs ({names}); pass a dict of arrays by "
                "input name, not one array"
            )
        x = {sess_specs[0].name: x}
    feeds = {}
    for spec in sess_specs:
        if spec.name not in x:
            if len(sess_specs) == 1 and len(x) == 1:  # one input, one array: another name
                array = np.asarray(next(iter(x.values())))
            else:
                raise DataError(
                    f"no array for model input '{spec.name}' (arrays: {', '.join(x) or 'none'})"
                )
        else:
            array = np.asarray(x[spec.name])
        want = np.dtype(spec.dtype)
        if array.dtype != want:
            same_kind = (array.dtype.kind == "f") == (want.kind == "f") and (
                array.dtype.kind == "b"
            ) == (want.kind == "b")
            if not same_kind:
                raise DataError(
                    f"input '{spec.name}' has dtype {array.dtype} but the model expects "
                    f"{spec.describe()}"
                )
            array = array.astype(want)
        if array.ndim == 0 or not spec.accepts(array.shape[1:]):
            raise DataError(
                f"input '{spec.name}' has shape {array.shape} but the model expects "
                f"{spec.describe()}"
            )
        feeds[spec.name] = np.ascontiguousarray(array)
    counts = {len(a) for a in feeds.values()}
    if len(counts) > 1:
        detail = ", ".join(f"{name} {len(a)}" for name, a in feeds.items())
        raise DataError(f"the inputs have different numbers of samples ({detail})")
    return feeds


def _fixed_batch(specs: Sequence[InputSpec]) -> int | None:
    return next((spec.fixed_batch for spec in specs if spec.fixed_batch), None)


def run_outputs(
    sess: InferenceSession,
    x: Inputs,
    batch_size: int = 256,
    *,
    progress: bool | Callable[[str, int, int], None] = False,
    description: str = "running",
) -> np.ndarray:
    """The session's first output on ``x``, computed ``batch_size`` rows at a time.

    ``x`` is one array for a single-input model, or arrays by input name (every input fed).

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
    specs = _input_specs(sess)
    feeds = _as_feeds(specs, x)
    n = len(next(iter(feeds.values())))
    if n == 0:
        raise DataError("no inputs to run the model on")
    fixed = _fixed_batch(specs)
    step = fixed or max(1, int(batch_size))
    output_name = sess.get_outputs()[0].name
    chunks = []
    for start in range(0, n, step):
        batch = {name: array[start : start + step] for name, array in feeds.items()}
        rows = len(next(iter(batch.values())))
        if fixed and rows < step:  # pad with the first row: zeros may be no valid mask
            batch = {
                name: np.concatenate([a, np.repeat(a[:1], step - rows, axis=0)])
                for name, a in batch.items()
            }
        out = sess.run([output_name], batch)[0]
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
    x: Inputs,
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
    is fixed is timed only at that batch size. ``x`` is one array (single-input models) or
    arrays by input name; every session is fed the inputs it takes.
    """
    if not sessions:
        return {}
    names = list(sessions)
    specs = {name: _input_specs(s) for name, s in sessions.items()}
    all_feeds = {name: _as_feeds(specs[name], x) for name in names}
    outputs = {name: [s.get_outputs()[0].name] for name, s in sessions.items()}
    result: dict[str, dict[int, LatencyStats]] = {name: {} for name in names}
    for batch in dict.fromkeys(int(b) for b in batch_sizes):  # unique, in order
        if batch < 1:
            raise OptionError(f"batch size {batch} must be at least 1")
        active = [n for n in names if _fixed_batch(specs[n]) in (None, batch)]
        if not active:
            continue
        feeds = {
            n: {name: _batch_of(array, batch) for name, array in all_feeds[n].items()}
            for n in active
        }
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


def is_class_logits(shape: Sequence[int]) -> bool:
    """Whether an output of ``shape`` (batch first) is judged as class logits: rank 2,
    ``(N, C)`` with at least two classes. Rank 3 and above (hidden states ``(N, seq,
    hidden)``, feature maps) and single values per sample are not: they are judged by cosine
    similarity alone."""
    return len(shape) == 2 and shape[1] >= 2


def _top1(outputs: np.ndarray) -> np.ndarray:
    """Predicted class per sample: argmax over axis 1 of class logits (N, C)."""
    if not is_class_logits(outputs.shape):
        raise UnsupportedModelError(
            f"the model's first output has shape {outputs.shape}; expected class logits "
            "(batch, classes)"
        )
    return outputs.argmax(axis=1)


def _accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    predictions = _top1(outputs)
    labels = np.asarray(labels)
    if labels.shape != predictions.shape:
        raise DataError(f"labels have shape {labels.shape}; the model predicts {predictions.shape}")
    return float(np.mean(predictions == labels))


def cosine_similarities(candidate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample's flattened output to the reference's, in float64.

    Two all-zero samples are identical (1); one all-zero sample against another is 0."""
    a = np.asarray(candidate, np.float64).reshape(len(candidate), -1)
    b = np.asarray(reference, np.float64).reshape(len(reference), -1)
    if a.shape != b.shape:
        raise VerificationError(
            f"the candidate's output has shape {np.shape(candidate)} but the reference's has "
            f"{np.shape(reference)}"
        )
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.einsum("ij,ij->i", a, b)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)
    return np.clip(np.where(both_zero, 1.0, cosine), -1.0, 1.0)


def _inputs(
    data: Dataset | None,
    specs: Sequence[InputSpec],
    proto: onnx.ModelProto,
    random_samples: int,
) -> tuple[dict[str, np.ndarray], np.ndarray | None, list[str]]:
    """Feeds of every input, labels, and notes on how the data was fed."""
    if data is None:
        feeds, notes = stand_in_feeds(specs, random_samples, model=proto, seed=RANDOM_SEED)
        return feeds, None, notes
    feeds, notes = model_feeds(data, specs)
    n = len(next(iter(feeds.values())))
    y = None if data.y is None else np.asarray(data.y)
    if y is not None and len(y) != n:
        raise DataError(f"data '{data.name}' has {n} samples but {len(y)} labels")
    return feeds, y, notes


def _sample_shapes(feeds: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(array.shape[1:]) for name, array in feeds.items()}


def _reference_feeds(
    feeds: dict[str, np.ndarray], cand: Sequence[InputSpec], ref: Sequence[InputSpec]
) -> dict[str, np.ndarray]:
    """The candidate's feeds for the reference: by name, or the one input of both."""
    if len(cand) == 1 and len(ref) == 1:
        if not ref[0].accepts(feeds[cand[0].name].shape[1:]) and not (
            ref[0].shape is None or cand[0].shape is None
        ):
            raise OptionError(
                f"the reference takes inputs of shape {ref[0].describe()} but the candidate "
                f"takes {cand[0].describe()}: they are not the same model"
            )
        return {ref[0].name: feeds[cand[0].name]}
    names = {spec.name for spec in ref}
    if names != set(feeds):
        raise OptionError(
            f"the reference's inputs ({', '.join(s.name for s in ref)}) are not the "
            f"candidate's ({', '.join(s.name for s in cand)}): they are not the same model"
        )
    for spec in ref:
        if not spec.accepts(feeds[spec.name].shape[1:]):
            raise OptionError(
                f"the reference's input '{spec.name}' has shape {spec.describe()} but the "
                f"candidate's has {feeds[spec.name].shape[1:]} per sample: they are not the "
                "same model"
            )
    return feeds


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

    sessions = {"candidate": runtime.session(cand.proto, provider, threads)}
    if ref is not None:
        sessions["reference"] = runtime.session(ref.proto, provider, threads)
    specs = {n: _input_specs(s) for n, s in sessions.items()}
    x, y, feed_notes = _inputs(data, specs["candidate"], cand.proto, random_samples)
    feeds = {"candidate": x}
    if ref is not None:
        feeds["reference"] = _reference_feeds(x, specs["candidate"], specs["reference"])
    samples = len(next(iter(x.values())))
    if data is None:
        kind = "random inputs (floats standard normal)" if feed_notes else (
            "random standard-normal inputs"
        )
        notes.append(f"no data: {samples} {kind}; accuracy not measured")
    elif y is None:
        notes.append(f"data '{data.name}' has no labels; accuracy not measured")
    notes.extend(feed_notes)

    # the shapes fed fix the dimensions a graph leaves symbolic (a dynamic sequence length)
    cand_profile = profile_model(cand.proto, cand.file_bytes, _sample_shapes(x))
    ref_profile = (
        profile_model(ref.proto, ref.file_bytes, _sample_shapes(feeds["reference"]))
        if ref
        else None
    )

    with progress_bars(progress) as reporter:
        outputs = {
            n: run_outputs(s, feeds[n], progress=reporter, description=f"{n}: outputs")
            for n, s in sessions.items()
        }
    logits = is_class_logits(outputs["candidate"].shape)
    if y is not None and not logits:
        notes.append(
            f"data '{data.name}' has labels but the model's first output has shape "
            f"{outputs['candidate'].shape[1:]} per sample, not class logits (N, classes): "
            "accuracy not measured"
        )
        y = None
    accuracy = {n: (_accuracy(o, y) if y is not None else None) for n, o in outputs.items()}

    latency = measure_latency(  # a single input's one array feeds each whatever its name
        sessions, x, batch_sizes, runs=latency_runs, min_time_s=latency_min_time_s
    )
    for n, spec in specs.items():
        skipped = [b for b in batch_sizes if b not in latency[n]]
        if skipped:
            notes.append(
                f"{n} has a fixed batch size of {_fixed_batch(spec)}: "
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
            int8_nodes=int8_nodes(resolved.proto),
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
        samples=samples,
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
    """Compare two models' outputs on the same inputs and their measured stats: top-1
    agreement where the outputs are class logits (``is_class_logits``), differences and
    cosine similarity always."""
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
    logits = is_class_logits(candidate_outputs.shape)
    agreement = None
    if logits:
        agreement = float(np.mean(_top1(candidate_outputs) == _top1(reference_outputs)))
    cosine = cosine_similarities(candidate_outputs, reference_outputs)
    return Comparison(
        agreement=agreement,
        max_abs_logit_diff=float(diff.max()) if diff.size else 0.0,
        mean_abs_logit_diff=float(diff.mean()) if diff.size else 0.0,
        speedup=speedup,
        macs_ratio=_or_nan(_ratio(candidate.macs, reference.macs)),
        params_ratio=_or_nan(_ratio(candidate.params, reference.params)),
        size_ratio=_ratio(candidate.file_bytes, reference.file_bytes),
        accuracy_delta=accuracy_delta,
        samples=len(candidate_outputs),
        cosine_mean=float(cosine.mean()) if cosine.size else None,
        cosine_min=float(cosine.min()) if cosine.size else None,
        output_kind="logits" if logits else "features",
    )
