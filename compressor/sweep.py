"""Sweeps: every combination of methods x targets x method options, each one a trial that is
compressed, verified and evaluated against the original, run on Ray or in this process.

    from compressor.sweep import SweepSpec, run_sweep
    results = run_sweep(SweepSpec(model="lenet5.pt", arch="lenet5", methods=("svd", "prune"),
                                  ratios=(0.75, 0.5), data="calib.npz", eval_data="eval.npz",
                                  output="sweep"), workers=2)

A trial has two phases:

* **compression**: ``compressor.pipeline.compress`` (which verifies), then
  ``compressor.evaluate.evaluate`` against the original for accuracy, agreement, MACs,
  parameters and file size. Trials run in parallel, one core each.
* **timing**: the compressed model beside the original (``evaluate.measure_latency``, batch 1
  and 64, alternating order, spinning off), one trial at a time holding the machine's cores,
  once every compression has finished: timed beside running compressions, a model would be
  measured against them. For the same reason the compressions that time candidates
  themselves (``--speedups``, ``--quantize``) run one at a time, holding the cores.

Each phase's result is written to the sweep folder as soon as it comes (atomically), so a
rerun skips what is done; a failed trial is recorded with its error and the sweep goes on.

``--workers 1`` runs in this process without Ray: a local Ray takes seconds to start and its
workers as long again to import the pipeline (docs/benchmarks/sweep.md has the figures), and
one worker gains nothing from it. More workers, or ``ray_address``, run on Ray (the ``sweep``
extra).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import platform
import re
import shlex
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.errors import CompressionError, OptionError
from compressor.io import atomic_write_bytes

RESULTS_FILE = "results.json"
MANIFEST_FILE = "sweep.json"
TRIALS_DIR = "trials"
MODELS_DIR = "models"
ORIGINAL_FILE = "original.onnx"
DEFAULT_BATCH_SIZES = (1, 64)
INSTALL_RAY = "pip install 'compressor[sweep]'"

# CompressOptions fields a sweep can vary, each given as a comma list (``--criterion l1,l2``).
# Which methods each one applies to is read from the methods themselves (method_options).
SWEEP_OPTIONS = (
    "rank",
    "energy",
    "rank_multiple",
    "sketches",
    "sketch_rows",
    "refit",
    "threshold",
    "criterion",
    "ranking",
    "min_channels_fraction",
    "channel_multiple",
    "lsh_bits",
    "lsh_tables",
    "asymmetric",
    "seed",
    "quantize",
)
# Read by the pipeline for every method, not by a method's passes.
PIPELINE_OPTIONS = frozenset({"seed", "quantize"})
CHAIN = "+"  # "prune+svd": one trial runs prune then svd (compress's --method prune,svd)

TIMING_NOTE = (
    "Latency was timed one trial at a time, each timing holding the machine's cores, after all "
    "compressions had finished (compressions ran in parallel, one core each, except those that "
    "time candidates themselves, for latency targets or int8, which ran one at a time holding "
    "the cores). Each compressed "
    "model was timed beside the original in the same run (alternating order, onnxruntime "
    "spinning off), so speedups compare like with like; absolute times vary from trial to "
    "trial with the machine's load."
)

Value = Any  # an option value: int, float, str, bool or None


# ----------------------------------------------------------------------------- options


def _compress_options_class():
    from compressor.pipeline import CompressOptions

    return CompressOptions


def _compress_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(_compress_options_class())}


def _base_type(name: str) -> type:
    """The scalar type of CompressOptions field ``name`` (int for ``int | None``)."""
    import typing

    hints = typing.get_type_hints(_compress_options_class())
    hint = hints[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = args[0]
    if base not in (int, float, str, bool):
        raise OptionError(f"--{_flag(name)} cannot be swept (it is not a number, word or flag)")
    return base


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _optional(name: str) -> bool:
    import typing

    hint = typing.get_type_hints(_compress_options_class())[name]
    return type(None) in typing.get_args(hint)


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def parse_values(name: str, text: str | Sequence[Value]) -> tuple[Value, ...]:
    """The values of option ``name`` to try: ``"l1,l2"`` -> ``("l1", "l2")``, typed as the
    CompressOptions field is (``"none"`` for an optional field's default)."""
    if name not in SWEEP_OPTIONS:
        raise OptionError(
            f"'{name}' is not an option a sweep can vary: choose from "
            + ", ".join(_flag(n) for n in SWEEP_OPTIONS)
        )
    if name not in _compress_fields():
        raise OptionError(f"--{_flag(name)}: this version of the pipeline has no such option")
    items = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    if not items or any(item == "" for item in items):
        raise OptionError(f"--{_flag(name)} '{text}': give a comma list of values, e.g. 1,2")
    base = _base_type(name)
    values: list[Value] = []
    for item in items:
        if not isinstance(item, str):
            values.append(item)
        elif item.lower() == "none" and _optional(name):
            values.append(None)
        elif base is bool:
            if item.lower() not in _TRUE | _FALSE:
                raise OptionError(f"--{_flag(name)}: '{item}' is not true or false")
            values.append(item.lower() in _TRUE)
        else:
            try:
                values.append(base(item))
            except ValueError:
                kind = "an integer" if base is int else "a number"
                raise OptionError(f"--{_flag(name)}: '{item}' is not {kind}") from None
    if len(set(map(repr, values))) != len(values):
        raise OptionError(f"--{_flag(name)} '{text}' lists a value twice")
    return tuple(values)


class _ReadRecorder:
    """Stands in for CompressOptions and records which fields are read."""

    def __init__(self, defaults: Any):
        self._defaults = defaults
        self.read: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        self.read.add(name)
        return getattr(self._defaults, name)


_method_options_cache: dict[str, frozenset[str]] = {}


def method_options(method: str) -> frozenset[str]:
    """The sweepable options that apply to ``method`` (one method, or a chain ``a+b``).

    A method's builder in ``compressor.methods`` is the one place that says which options its
    passes take: it is run once on default options (without data), recording the fields it
    reads. The pipeline-level options (seed, quantize) apply to every method.
    """
    names = method.split(CHAIN)
    found: set[str] = set(PIPELINE_OPTIONS & set(_compress_fields()))
    for name in names:
        if name not in _method_options_cache:
            from compressor.methods import METHODS

            if name not in METHODS:
                raise OptionError(f"unknown method '{name}': choose from {', '.join(METHODS)}")
            defaults = _compress_options_class()(model="model", output="out.onnx", method=name)
            recorder = _ReadRecorder(defaults)
            # A builder may refuse data-free defaults (lsh-conv needs data) once it has read
            # its options; what it read is all we want.
            with contextlib.suppress(Exception):
                METHODS[name].build(recorder, None)
            _method_options_cache[name] = frozenset(recorder.read & set(SWEEP_OPTIONS))
        found |= _method_options_cache[name]
    return frozenset(found)


def _chooses_by_latency(method: str) -> bool:
    from compressor.methods import METHODS

    return any(getattr(METHODS[m], "chooses_by_latency", False) for m in method.split(CHAIN))


def _format_value(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# ----------------------------------------------------------------------------- trials


@dataclass(frozen=True)
class Trial:
    """One point of the grid: a method (or chain), one target, and the method options varied."""

    method: str
    ratio: float | None = None  # fraction of MACs to keep
    speedup: float | None = None  # or: times faster than the original (latency target)
    options: tuple[tuple[str, Value], ...] = ()  # sorted by name

    @property
    def key(self) -> str:
        """A stable, file-name-safe name: ``prune-ratio0.5-criterion=l1``."""
        parts = [self.method]
        if self.ratio is not None:
            parts.append(f"ratio{_format_value(float(self.ratio))}")
        if self.speedup is not None:
            parts.append(f"speedup{_format_value(float(self.speedup))}x")
        parts += [f"{name}={_format_value(value)}" for name, value in self.options]
        return re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join(parts))

    @property
    def target(self) -> str:
        if self.speedup is not None:
            return f"{_format_value(float(self.speedup))}x faster"
        return f"{_format_value(float(self.ratio))} of MACs"

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "method": self.method,
            "ratio": self.ratio,
            "speedup_target": self.speedup,
            "options": dict(self.options),
        }


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class SweepSpec:
    """Everything ``compressor sweep`` accepts, except how it runs (workers, Ray address)."""

    model: str | os.PathLike
    output: str | os.PathLike  # the sweep folder
    methods: tuple[str, ...]
    ratios: tuple[float, ...] = ()
    speedups: tuple[float, ...] = ()
    # option name -> the values to try, e.g. (("criterion", ("l1", "activation")),)
    options: tuple[tuple[str, tuple[Value, ...]], ...] = ()
    data: str | None = None  # calibration data, as compress --data
    eval_data: str | None = None  # evaluation data, as evaluate --data
    eval_limit: int | None = None
    calib_samples: int = 512
    arch: str | None = None
    input_shape: tuple[int, ...] | Mapping[str, tuple[int, ...]] | None = None  # as compress
    trust_pickle: bool = False
    provider: str = "cpu"
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES  # timed, side by side with the original
    threads: int | None = None  # onnxruntime intra-op threads for timing (None: all)
    latency_min_time_s: float = 1.0  # per model and batch size
    speedup_batch: int = 1  # the batch size latency targets are met at (compress --batch)

    def __post_init__(self):
        from compressor.methods import METHODS

        methods = tuple(str(m).strip() for m in self.methods)
        object.__setattr__(self, "methods", methods)
        if not methods or any(not m for m in methods):
            raise OptionError("--methods: give a comma list of methods, e.g. svd,prune")
        for method in methods:
            for name in method.split(CHAIN):
                if name not in METHODS:
                    raise OptionError(
                        f"--methods: unknown method '{name}' in '{method}': choose from "
                        f"{', '.join(METHODS)} (join methods with {CHAIN} to chain them)"
                    )
        if len(set(methods)) != len(methods):
            raise OptionError("--methods lists a method twice")
        if not self.ratios and not self.speedups:
            raise OptionError("give the targets to sweep: --ratios and/or --speedups")
        for r in self.ratios:
            if not 0 < r <= 1:
                raise OptionError(f"--ratios: {r} is not in (0, 1] (the fraction of MACs to keep)")
        if self.speedups:
            if "speedup" not in _compress_fields():
                raise OptionError("--speedups: this version of the pipeline has no latency "
                                  "targets; sweep --ratios")
            for s in self.speedups:
                if not (math.isfinite(s) and s > 1):
                    raise OptionError(f"--speedups: {s} is not a speedup > 1")
            if not any(_chooses_by_latency(m) for m in methods):
                raise OptionError(
                    "--speedups: none of " + ", ".join(methods) + " chooses by measured latency"
                )
        for name, values in (("ratios", self.ratios), ("speedups", self.speedups)):
            if len(set(values)) != len(values):
                raise OptionError(f"--{name} lists a value twice")
        options = tuple((name, parse_values(name, values)) for name, values in self.options)
        object.__setattr__(self, "options", tuple(sorted(options)))
        for name, _ in self.options:
            if not any(name in method_options(m) for m in methods):
                users = [m for m in METHODS if name in method_options(m)]
                raise OptionError(
                    f"--{_flag(name)} applies to none of the methods swept "
                    f"({', '.join(methods)}); it is an option of {', '.join(users) or 'none'}"
                )
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise OptionError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise OptionError(f"--eval-limit must be >= 1, got {self.eval_limit}")
        if self.threads is not None and self.threads < 1:
            raise OptionError(f"--threads must be >= 1, got {self.threads}")

    # -- the grid

    def trials(self) -> list[Trial]:
        """Every combination, method by method: targets (ratios, then speedups) x the values
        of the options that apply to the method. Speedup targets go only to methods that
        choose by measured latency."""
        trials: list[Trial] = []
        for method in self.methods:
            applicable = [(n, v) for n, v in self.options if n in method_options(method)]
            targets: list[tuple[float | None, float | None]] = [(r, None) for r in self.ratios]
            if _chooses_by_latency(method):
                targets += [(None, s) for s in self.speedups]
            for (ratio, speedup), combo in itertools.product(
                targets, itertools.product(*(values for _, values in applicable))
            ):
                options = tuple(zip((n for n, _ in applicable), combo, strict=True))
                trials.append(Trial(method, ratio, speedup, options))
        keys = [t.key for t in trials]
        if len(set(keys)) != len(keys):  # pragma: no cover - only if sanitising merged two
            raise OptionError("two trials of this sweep would have the same name")
        return trials

    def notes(self) -> list[str]:
        skipped = [m for m in self.methods if not _chooses_by_latency(m)]
        if self.speedups and skipped:
            return [f"--speedups: {', '.join(skipped)} choose by MACs only: swept by --ratios"]
        return []

    def compress_kwargs(self, trial: Trial) -> dict[str, Any]:
        """CompressOptions arguments for ``trial`` (without model, data and output)."""
        fields = _compress_fields()
        kwargs: dict[str, Any] = {
            "method": trial.method.replace(CHAIN, ","),
            "calib_samples": self.calib_samples,
            "arch": self.arch,
            "input_shape": self.input_shape,
            "trust_pickle": self.trust_pickle,
            "provider": self.provider,
        }
        if trial.ratio is not None:
            kwargs["ratio"] = trial.ratio
        if trial.speedup is not None:
            kwargs["speedup"] = trial.speedup
            kwargs["batch"] = self.speedup_batch
            if self.threads is not None:
                kwargs["threads"] = self.threads
        kwargs.update(dict(trial.options))
        return {k: v for k, v in kwargs.items() if k in fields}

    # -- reproducing

    def command(self, trial: Trial, output: str | os.PathLike) -> str:
        """The ``compressor compress`` command line that makes ``trial``'s model."""
        kwargs = self.compress_kwargs(trial)
        defaults = {
            name: f.default
            for name, f in _compress_fields().items()
            if f.default is not dataclasses.MISSING
        }
        args = ["compressor", "compress", str(self.model), "--method", kwargs.pop("method")]
        for name in ("ratio", "speedup", "batch", "threads"):
            if name in kwargs:
                value = kwargs.pop(name)
                if name in ("ratio", "speedup") or value != defaults.get(name):
                    args += [f"--{name}", _format_value(value)]
        if self.data is not None:
            args += ["--data", str(self.data)]
        for name, value in kwargs.items():
            if value == defaults.get(name, dataclasses.MISSING) and name != "arch":
                continue
            if value is None:
                continue
            args += _command_flag(name, value)
        args += ["-o", str(output)]
        return shlex.join(args)

    def evaluate_command(self, output: str | os.PathLike) -> str:
        """The ``compressor evaluate`` command line that measures a trial's model."""
        args = ["compressor", "evaluate", str(output), "--reference", str(self.model)]
        if self.arch:
            args += ["--arch", self.arch]
        if self.input_shape:
            args += _input_shape_flags(self.input_shape)
        if self.trust_pickle:
            args += ["--trust-pickle"]
        if self.eval_data is not None:
            args += ["--data", str(self.eval_data)]
        if self.eval_limit is not None:
            args += ["--limit", str(self.eval_limit)]
        if self.threads is not None:
            args += ["--threads", str(self.threads)]
        if self.provider != "cpu":
            args += ["--provider", self.provider]
        return shlex.join(args)

    # -- resuming

    def identity(self) -> dict[str, Any]:
        """What a trial's results depend on besides the trial itself: a rerun into the same
        folder must agree on all of it to reuse finished trials."""

        def source(spec: str | os.PathLike | None) -> dict[str, Any] | None:
            if spec is None:
                return None
            path = Path(spec)
            if path.is_file():
                return {"file": path.name, "sha256": _digest(path)}
            return {"name": str(spec)}

        return {
            "model": source(self.model),
            "arch": self.arch,
            "input_shape": self.input_shape,
            "data": source(self.data),
            "calib_samples": self.calib_samples,
            "eval_data": source(self.eval_data),
            "eval_limit": self.eval_limit,
            "provider": self.provider,
            "batch_sizes": list(self.batch_sizes),
            "threads": self.threads,
            "speedup_batch": self.speedup_batch,
        }


def _input_shape_flags(shape: tuple[int, ...] | Mapping[str, tuple[int, ...]]) -> list[str]:
    """``--input-shape 1,28,28``, or one ``--input-shape NAME:DIMS`` per named input."""
    if isinstance(shape, Mapping):
        return [arg for name, dims in shape.items()
                for arg in ("--input-shape", f"{name}:{','.join(map(str, dims))}")]
    return ["--input-shape", ",".join(map(str, shape))]


def _command_flag(name: str, value: Value) -> list[str]:
    """compress's flags for CompressOptions field ``name`` set to ``value``."""
    if name == "refit":
        return [] if value else ["--no-refit"]
    if name == "ranking":
        return ["--per-layer"] if value == "per-layer" else ["--global-ranking"]
    if name == "schemes":
        return [arg for scheme in value for arg in ("--scheme", scheme)]
    if name == "input_shape":
        return _input_shape_flags(value)
    if isinstance(value, bool):
        return [f"--{_flag(name)}"] if value else []
    return [f"--{_flag(name)}", _format_value(value)]


# ----------------------------------------------------------------------------- trial inputs


@dataclass(frozen=True)
class FileInput:
    """A file a trial reads: its path here, and its bytes when the trial may run elsewhere
    (a Ray worker on another machine writes them to a temporary file of the same name, which
    the compressed model's recipe then names as its data)."""

    path: str
    content: bytes | None = None

    def local_path(self) -> str:
        if self.content is None:
            return self.path
        return str(_materialise(Path(self.path).name, self.content))


_materialised: dict[tuple[str, str], Path] = {}


def _materialise(name: str, content: bytes) -> Path:
    digest = hashlib.sha256(content).hexdigest()
    if (name, digest) not in _materialised:
        folder = Path(tempfile.gettempdir()) / f"compressor-sweep-{digest[:16]}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        if not path.is_file() or _digest(path) != digest:
            atomic_write_bytes(path, content)
        _materialised[(name, digest)] = path
    return _materialised[(name, digest)]


@dataclass(frozen=True)
class TrialInputs:
    """What every trial needs, made once by the driver (and put in Ray's object store once)."""

    model: FileInput
    data: FileInput | str | None  # a file, or a folder / named data set passed as it is
    reference: bytes  # the original as ONNX (as the driver loaded and exported it)
    eval_data: Any  # compressor.data.Dataset or None (random inputs stand in)
    timing_inputs: Any  # numpy array: the first max(batch_sizes) evaluation samples

    def data_spec(self) -> str | None:
        return self.data.local_path() if isinstance(self.data, FileInput) else self.data


def _file_input(spec: str | os.PathLike | None, ship: bool) -> FileInput | str | None:
    if spec is None:
        return None
    path = Path(spec)
    if path.is_file():
        return FileInput(str(path), path.read_bytes() if ship else None)
    return str(spec)


# ----------------------------------------------------------------------------- the trial


def _host() -> str:
    return socket.gethostname()


def compress_trial(spec: SweepSpec, trial: Trial, inputs: TrialInputs) -> tuple[dict, bytes]:
    """The compression phase of ``trial``: compress (which verifies), then evaluate against
    the original without timing. Returns the trial's record and the compressed ONNX bytes."""
    from compressor.evaluate import evaluate
    from compressor.pipeline import CompressOptions, compress

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compressor-trial-") as work:
        output = Path(work) / f"{trial.key}.onnx"
        model = inputs.model.local_path()
        opts = CompressOptions(
            model=model, output=output, data=inputs.data_spec(), **spec.compress_kwargs(trial)
        )
        result = compress(opts)
        compressed_s = time.perf_counter()
        import onnx

        report = evaluate(
            output,
            reference=onnx.ModelProto.FromString(inputs.reference),
            data=inputs.eval_data,
            provider=spec.provider,
            batch_sizes=(),
            progress=False,
            candidate_name=trial.key,
            reference_name="original",
        )
        content = output.read_bytes()
    comparison = report.comparison
    candidate, reference = report.candidate, report.reference
    # quality: accuracy on labelled data, else top-1 agreement with the original (class
    # logits), else the mean cosine similarity of the outputs (embeddings, feature maps)
    cosine_mean = getattr(comparison, "cosine_mean", None)
    quality_metric, quality = next(
        ((name, value) for name, value in (("accuracy", candidate.accuracy),
                                           ("agreement", comparison.agreement),
                                           ("cosine", cosine_mean)) if value is not None),
        ("agreement", None),
    )
    record = {
        **trial.as_dict(),
        "status": "compressed",
        "quality": quality,
        "quality_metric": quality_metric,
        "accuracy": candidate.accuracy,
        "reference_accuracy": reference.accuracy,
        "accuracy_delta": comparison.accuracy_delta,
        "agreement": comparison.agreement,
        "cosine_mean": cosine_mean,
        "cosine_min": getattr(comparison, "cosine_min", None),
        "max_abs_logit_diff": comparison.max_abs_logit_diff,
        "mean_abs_logit_diff": comparison.mean_abs_logit_diff,
        "eval_samples": report.samples,
        "eval_data": report.data,
        "macs": candidate.macs,
        "params": candidate.params,
        "file_bytes": candidate.file_bytes,
        "reference_macs": reference.macs,
        "reference_params": reference.params,
        "reference_file_bytes": reference.file_bytes,
        "macs_ratio": comparison.macs_ratio,
        "params_ratio": comparison.params_ratio,
        "size_ratio": comparison.size_ratio,
        "ratio_reached": result.ratio_reached,
        "verification": dataclasses.asdict(result.verification),
        "notes": list(result.notes) + list(report.notes),
        "compress_seconds": compressed_s - started,
        "evaluate_seconds": time.perf_counter() - compressed_s,
        "host": _host(),
    }
    speed = getattr(result, "speed", None)
    if speed is not None:
        record["speed_during_compression"] = speed.as_dict()
    return record, content


def time_trial(
    candidate: bytes,
    reference: bytes,
    inputs: Any,
    batch_sizes: Sequence[int],
    provider: str = "cpu",
    threads: int | None = None,
    min_time_s: float = 1.0,
) -> dict[str, Any]:
    """The timing phase: the candidate beside the original, every batch size, side by side."""
    from compressor import runtime
    from compressor.evaluate import measure_latency

    started = time.perf_counter()
    sessions = {
        "candidate": runtime.session(candidate, provider, threads),
        "reference": runtime.session(reference, provider, threads),
    }
    latency = measure_latency(sessions, inputs, batch_sizes, min_time_s=min_time_s)
    cand, ref = latency["candidate"], latency["reference"]
    return {
        "latency_ms": {str(b): dataclasses.asdict(s) for b, s in cand.items()},
        "reference_latency_ms": {str(b): dataclasses.asdict(s) for b, s in ref.items()},
        "speedup": {
            str(b): ref[b].p50_ms / cand[b].p50_ms for b in cand if b in ref and cand[b].p50_ms > 0
        },
        "timing_seconds": time.perf_counter() - started,
        "timing_host": _host(),
    }


# ----------------------------------------------------------------------------- the folder


def _write_json(path: Path, obj: Any) -> None:
    from compressor.report import jsonable

    text = json.dumps(jsonable(obj), indent=1, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode())


class SweepFolder:
    """The sweep's folder: ``sweep.json`` (what the trials depend on), ``trials/KEY.json``
    (one record per trial, written as each phase ends), ``models/KEY.onnx``,
    ``original.onnx``, and the outputs (``results.json``, the plots, ``report.html``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise OptionError(f"-o {self.path}: exists and is not a folder")

    def model_path(self, key: str) -> Path:
        return self.path / MODELS_DIR / f"{key}.onnx"

    def record_path(self, key: str) -> Path:
        return self.path / TRIALS_DIR / f"{key}.json"

    def check_identity(self, identity: dict[str, Any]) -> None:
        """Record what the trials depend on, or check that a previous run agrees."""
        manifest = self.path / MANIFEST_FILE
        if manifest.is_file():
            try:
                previous = json.loads(manifest.read_text())["identity"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise OptionError(
                    f"{manifest}: unreadable ({e}); delete it or choose another -o"
                ) from None
            current = json.loads(json.dumps(identity))
            differ = sorted(k for k in current.keys() | previous.keys()
                            if current.get(k) != previous.get(k))
            if differ:
                raise OptionError(
                    f"-o {self.path} holds a sweep of other inputs (differs in: "
                    f"{', '.join(differ)}): choose another folder, or delete it to start over"
                )
            return
        from compressor import __version__

        _write_json(manifest, {"identity": identity, "compressor": __version__})

    def load(self, key: str) -> dict[str, Any] | None:
        path = self.record_path(key)
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # unreadable: the trial runs again
        return record if isinstance(record, dict) and record.get("key") == key else None

    def save(self, record: dict[str, Any]) -> None:
        _write_json(self.record_path(record["key"]), record)

    def save_model(self, key: str, content: bytes) -> Path:
        path = self.model_path(key)
        atomic_write_bytes(path, content)
        return path


# ----------------------------------------------------------------------------- executors


@dataclass
class _Task:
    trial: Trial
    phase: str  # "compress" or "time"
    handle: Any
    started: float


class InProcessExecutor:
    """Runs trials one after another in this process (``--workers 1``)."""

    name = "in-process"
    slots = 1
    timing_cores = None

    def submit(self, fn: Callable, args: tuple, timing: bool = False) -> Any:
        """``timing``: the task times models and must run alone (here, everything does)."""
        return (fn, args)

    def put(self, value: Any) -> Any:
        return value

    def wait(self, handles: Sequence[Any]) -> tuple[Any, Any, BaseException | None]:
        fn, args = handles[0]
        try:
            return handles[0], fn(*args), None
        except Exception as e:  # a failed trial is recorded, not raised
            return handles[0], None, e

    def close(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name, "workers": 1}


def _import_ray():
    try:
        import ray
    except ImportError:
        raise CompressionError(
            f"sweeps with more than one worker run on Ray, which is not installed: {INSTALL_RAY}"
        ) from None
    return ray


class RayExecutor:
    """Runs trials as Ray tasks: on a Ray started here with ``workers`` CPUs (usage statistics
    off, dashboard off, bound to 127.0.0.1), or on the cluster at ``address``."""

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None):
        ray = _import_ray()
        self._ray = ray
        self.address = address
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        started = time.perf_counter()
        self._owned = not ray.is_initialized()
        if self._owned:
            quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
            try:
                if address:
                    ray.init(address=address, **quiet)
                else:
                    ray.init(
                        num_cpus=workers,
                        include_dashboard=False,
                        _node_ip_address="127.0.0.1",
                        **quiet,
                    )
            except Exception as e:  # ConnectionError, RuntimeError, ValueError ...
                where = f"the Ray cluster at {address}" if address else "a local Ray"
                raise CompressionError(f"cannot start {where}: {e}") from e
        self.start_seconds = time.perf_counter() - started
        self.slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
        node_cpus = [
            int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")
        ]
        # a timing task takes a whole node's CPUs (the smallest node's, so it fits anywhere),
        # so no other task of this sweep or anyone else's shares the cores it is timed on
        self.timing_cores = max(1, min((c for c in node_cpus if c > 0), default=1))
        self._compress = ray.remote(num_cpus=1, max_retries=0)(compress_trial)
        self._compress_alone = ray.remote(num_cpus=self.timing_cores, max_retries=0)(
            compress_trial
        )
        self._time = ray.remote(num_cpus=self.timing_cores, max_retries=0)(time_trial)

    def put(self, value: Any) -> Any:
        return self._ray.put(value)

    def submit(self, fn: Callable, args: tuple, timing: bool = False) -> Any:
        if fn is compress_trial:
            return (self._compress_alone if timing else self._compress).remote(*args)
        if fn is time_trial:
            return self._time.remote(*args)
        # another function (tests inject their own): the same resources as the phase's
        resources = {"num_cpus": self.timing_cores if timing else 1, "max_retries": 0}
        return self._ray.remote(**resources)(fn).remote(*args)

    def wait(self, handles: Sequence[Any]) -> tuple[Any, Any, BaseException | None]:
        ready, _ = self._ray.wait(list(handles), num_returns=1)
        handle = ready[0]
        try:
            return handle, self._ray.get(handle), None
        except self._ray.exceptions.RayTaskError as e:
            # the trial's own exception (a CompressionError with its message), when Ray has it
            cause = e.as_instanceof_cause() if hasattr(e, "as_instanceof_cause") else e
            original = getattr(e, "cause", None)
            return handle, None, original if isinstance(original, BaseException) else cause
        except Exception as e:  # worker died, out of memory, ...
            return handle, None, e

    def close(self) -> None:
        if self._owned:
            self._ray.shutdown()

    def describe(self) -> dict[str, Any]:
        return {
            "executor": self.name,
            "workers": self.slots,
            "ray_address": self.address,
            "ray_version": self._ray.__version__,
            "ray_start_seconds": self.start_seconds,
            "timing_cores": self.timing_cores,
        }


def make_executor(workers: int = 1, ray_address: str | None = None):
    """In this process for one local worker; on Ray otherwise."""
    if workers < 1:
        raise OptionError(f"--workers must be >= 1, got {workers}")
    if ray_address is None and workers == 1:
        return InProcessExecutor()
    return RayExecutor(None if ray_address else workers, ray_address)


# ----------------------------------------------------------------------------- progress


class SweepObserver:
    """Told what the sweep does; the CLI's rich display is one (``sweep_progress``)."""

    def planned(self, total: int, skipped: int, to_compress: int, to_time: int) -> None: ...

    def started(self, trial: Trial, phase: str) -> None: ...

    def finished(self, trial: Trial, phase: str, record: dict[str, Any], seconds: float) -> None:
        ...


class _RichObserver(SweepObserver):
    def __init__(self, progress, console):
        self.progress, self.console = progress, console
        self.counts = {"done": 0, "running": 0, "failed": 0}
        self.seconds: list[float] = []
        self.tasks: dict[str, int] = {}

    def _status(self) -> str:
        c = self.counts
        mean = f" · {sum(self.seconds) / len(self.seconds):.1f} s/trial" if self.seconds else ""
        return f"done {c['done']} · running {c['running']} · failed {c['failed']}{mean}"

    def _refresh(self) -> None:
        self.progress.update(self.tasks["compress"], status=self._status())

    def planned(self, total, skipped, to_compress, to_time):
        self.counts["done"] = skipped
        if skipped:
            self.console.print(f"{skipped} of {total} trials already in the folder: skipped")
        self.tasks["compress"] = self.progress.add_task(
            "compress", total=to_compress, status=self._status()
        )
        self.tasks["time"] = self.progress.add_task(
            "time (one at a time)", total=to_compress + to_time, status=""
        )

    def started(self, trial, phase):
        self.counts["running"] += 1
        self._refresh()

    def finished(self, trial, phase, record, seconds):
        self.counts["running"] -= 1
        failed = record.get("status") == "failed"
        if failed:
            self.counts["failed"] += 1
            self.progress.advance(self.tasks["time"])  # it will not be timed
            if phase == "compress":
                self.progress.advance(self.tasks["compress"])
            self.console.print(
                f"[red]failed[/] {trial.key} ({phase}, {seconds:.1f} s): {record.get('error')}",
                highlight=False,
            )
        elif phase == "compress":
            self.progress.advance(self.tasks["compress"])
            self.seconds.append(seconds)
        else:
            self.counts["done"] += 1
            self.progress.advance(self.tasks["time"])
            speedups = " ".join(f"b{b} {s:.2f}x" for b, s in record.get("speedup", {}).items())
            quality = record.get("quality")
            q = "" if quality is None else f"{record['quality_metric']} {100 * quality:.2f}%, "
            self.console.print(f"done {trial.key}: {q}{speedups}", highlight=False)
        self._refresh()


@contextlib.contextmanager
def sweep_progress(enabled: bool = True) -> Iterator[SweepObserver]:
    """A rich display on stderr (bars, trials done / running / failed, time per trial) when
    ``enabled`` and stderr is a terminal; else a silent observer."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(file=sys.stderr)
    if not enabled or not console.is_terminal:
        yield SweepObserver()
        return
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
    ) as progress:
        yield _RichObserver(progress, console)


# ----------------------------------------------------------------------------- the sweep


def _error_record(trial: Trial, phase: str, error: BaseException, base: dict | None) -> dict:
    record = dict(base) if base else trial.as_dict()
    record.update(
        status="failed",
        failed_phase=phase,
        error=str(error) or type(error).__name__,
        error_type=type(error).__name__,
    )
    if not isinstance(error, CompressionError):  # a bug: keep where it happened
        record["traceback"] = "".join(
            traceback.format_exception(type(error), error, error.__traceback__)
        )
    return record


def _prepare(spec: SweepSpec, folder: SweepFolder, ship: bool) -> tuple[TrialInputs, dict]:
    """Load the original once (written to the folder as ONNX) and the evaluation data."""
    import numpy as np

    from compressor import io
    from compressor.data import load_data
    from compressor.evaluate import RANDOM_SAMPLES, RANDOM_SEED, evaluate

    loaded = io.load_model(
        spec.model, arch=spec.arch, input_shape=spec.input_shape, trust_pickle=spec.trust_pickle
    )
    reference = loaded.proto.SerializeToString()
    original_path = folder.path / ORIGINAL_FILE
    if not original_path.is_file() or original_path.read_bytes() != reference:
        atomic_write_bytes(original_path, reference)
    eval_data = None
    if spec.eval_data is not None:
        eval_data = load_data(
            spec.eval_data, split="test", limit=spec.eval_limit, input_shape=loaded.input_shape
        )
        timing = np.ascontiguousarray(eval_data.x[: max(spec.batch_sizes)])
    else:
        rng = np.random.default_rng(RANDOM_SEED)
        timing = rng.standard_normal((RANDOM_SAMPLES, *loaded.input_shape), dtype=np.float32)
    # the original alone, once: its accuracy and costs for the report
    original = evaluate(
        loaded.proto, data=eval_data, provider=spec.provider, batch_sizes=(), progress=False,
        candidate_name="original",
    )
    inputs = TrialInputs(
        model=_file_input(spec.model, ship),
        data=_file_input(spec.data, ship),
        reference=reference,
        eval_data=eval_data,
        timing_inputs=timing,
    )
    return inputs, {
        "accuracy": original.candidate.accuracy,
        "macs": original.candidate.macs,
        "params": original.candidate.params,
        "file_bytes": original.candidate.file_bytes,
        "path": str(original_path),
        "input_shape": loaded.input_shape,
    }


def run_sweep(
    spec: SweepSpec,
    *,
    workers: int = 1,
    ray_address: str | None = None,
    retry_failed: bool = False,
    observer: SweepObserver | None = None,
    executor: Any = None,
    compress_fn: Callable = compress_trial,
    time_fn: Callable = time_trial,
    report: bool = True,
) -> dict[str, Any]:
    """Run every trial of ``spec`` not already finished in ``spec.output``; write
    ``results.json`` (and, with ``report``, the plots and ``report.html``); return the results.

    Finished trials (and failed ones, unless ``retry_failed``) are read back, not rerun; a
    trial compressed but not yet timed is only timed. ``compress_fn`` and ``time_fn`` are the
    two phases (tests replace them).
    """
    observer = observer or SweepObserver()
    if executor is None and (workers > 1 or ray_address):
        _import_ray()  # a missing Ray is said before anything is written
    folder = SweepFolder(spec.output)
    trials = spec.trials()
    folder.path.mkdir(parents=True, exist_ok=True)
    folder.check_identity(spec.identity())

    records: dict[str, dict[str, Any]] = {}
    to_compress: list[Trial] = []
    to_time: list[Trial] = []
    for trial in trials:
        record = folder.load(trial.key)
        status = None if record is None else record.get("status")
        if status == "done" or (status == "failed" and not retry_failed):
            records[trial.key] = record
        elif status == "compressed" and folder.model_path(trial.key).is_file():
            records[trial.key] = record
            to_time.append(trial)
        else:
            to_compress.append(trial)
    observer.planned(len(trials), len(records) - len(to_time), len(to_compress), len(to_time))

    sweep_started = time.perf_counter()
    original: dict[str, Any] | None = None
    run_info: dict[str, Any] = {"executor": "none: every trial was already in the folder"}
    if to_compress or to_time:
        owned = executor is None
        if executor is None:
            executor = make_executor(workers, ray_address)
        try:
            original = _run_phases(spec, folder, trials, records, to_compress, to_time,
                                   executor, observer, compress_fn, time_fn)
            run_info = executor.describe()
        finally:
            if owned:
                executor.close()

    results = _results(spec, trials, records, original, run_info,
                       time.perf_counter() - sweep_started, folder)
    _write_json(folder.path / RESULTS_FILE, results)
    if report:
        from compressor.sweep_report import write_report

        write_report(results, folder.path)
    return results


def _run_phases(spec, folder, trials, records, to_compress, to_time, executor, observer,
                compress_fn, time_fn) -> dict[str, Any]:
    """Both phases of the trials still to do; updates ``records``; returns the original's
    summary."""
    # Files travel in Ray's object store only to a cluster: a local Ray reads them where they
    # are, so the models' recipes name the same files as the commands that reproduce them.
    inputs, original = _prepare(spec, folder, ship=bool(getattr(executor, "address", None)))
    inputs_handle = executor.put(inputs)
    reference_handle = executor.put(inputs.reference)
    timing_handle = executor.put(inputs.timing_inputs)

    # compression phase: as many at once as the executor has slots; then, one at a time
    # holding the cores, the compressions that time candidates themselves (latency targets,
    # int8 nodes kept only where measured faster)
    parallel = [t for t in to_compress if not _measures_latency(t)]
    exclusive = [t for t in to_compress if _measures_latency(t)]
    running: dict[Any, _Task] = {}
    while parallel or exclusive or running:
        while parallel and len(running) < executor.slots:
            trial = parallel.pop(0)
            handle = executor.submit(compress_fn, (spec, trial, inputs_handle))
            running[_hashable(handle)] = _Task(trial, "compress", handle, time.perf_counter())
            observer.started(trial, "compress")
        if not running:
            trial = exclusive.pop(0)
            handle = executor.submit(compress_fn, (spec, trial, inputs_handle), timing=True)
            running[_hashable(handle)] = _Task(trial, "compress", handle, time.perf_counter())
            observer.started(trial, "compress")
        handle, value, error = executor.wait([t.handle for t in running.values()])
        task = running.pop(_hashable(handle))
        seconds = time.perf_counter() - task.started
        if error is None:
            record, content = value
            record = {**task.trial.as_dict(), **record}
            model_path = folder.save_model(task.trial.key, content)
            record["model"] = str(model_path)
            record["command"] = spec.command(task.trial, model_path)
            record["evaluate_command"] = spec.evaluate_command(model_path)
            to_time.append(task.trial)
        else:
            record = _error_record(task.trial, "compress", error, None)
            record["command"] = spec.command(task.trial, folder.model_path(task.trial.key))
        record["trial_seconds"] = seconds
        folder.save(record)
        records[task.trial.key] = record
        observer.finished(task.trial, "compress", record, seconds)

    # timing phase: one trial at a time, nothing else of this sweep running
    order = {t.key: i for i, t in enumerate(trials)}
    for trial in sorted(to_time, key=lambda t: order[t.key]):
        base = records[trial.key]
        content = folder.model_path(trial.key).read_bytes()
        args = (
            content,
            reference_handle,
            timing_handle,
            spec.batch_sizes,
            spec.provider,
            spec.threads,
            spec.latency_min_time_s,
        )
        observer.started(trial, "time")
        started = time.perf_counter()
        handle = executor.submit(time_fn, args, timing=True)
        _, value, error = executor.wait([handle])
        seconds = time.perf_counter() - started
        if error is None:
            record = {**base, **value, "status": "done"}
        else:
            record = _error_record(trial, "time", error, base)
        folder.save(record)
        records[trial.key] = record
        observer.finished(trial, "time", record, seconds)
    return original


def _measures_latency(trial: Trial) -> bool:
    """Whether compressing ``trial`` times models itself, and so must run alone."""
    return trial.speedup is not None or dict(trial.options).get("quantize") is not None


def _hashable(handle: Any) -> Any:
    return handle if not isinstance(handle, tuple) else id(handle)


def _original_summary(records: Sequence[dict], original: dict | None) -> dict[str, Any]:
    """The original's row: costs from the driver (or a trial's record), its latency the
    median of what every timing measured beside the trials."""
    import statistics

    summary: dict[str, Any] = dict(original or {})
    first = next((r for r in records if "reference_macs" in r), None)
    if first is not None:
        summary.setdefault("accuracy", first.get("reference_accuracy"))
        summary.setdefault("macs", first.get("reference_macs"))
        summary.setdefault("params", first.get("reference_params"))
        summary.setdefault("file_bytes", first.get("reference_file_bytes"))
    latency: dict[str, float] = {}
    for batch in sorted({b for r in records for b in r.get("reference_latency_ms", {})}, key=int):
        values = [r["reference_latency_ms"][batch]["p50_ms"] for r in records
                  if batch in r.get("reference_latency_ms", {})]
        latency[batch] = statistics.median(values)
    summary["latency_p50_ms"] = latency
    summary["quality"] = summary.get("accuracy")
    if summary["quality"] is None and first is not None:
        summary["quality"] = 1.0  # its agreement or cosine similarity with itself
    return summary


def _results(spec, trials, records, original, run_info, seconds, folder) -> dict[str, Any]:
    from compressor.evaluate import machine_info
    from compressor.pareto import pareto_front

    ordered = [records[t.key] for t in trials if t.key in records]
    original_summary = _original_summary(ordered, original)
    fronts: dict[str, list[str]] = {}
    for batch in map(str, spec.batch_sizes):
        timed = [r for r in ordered if r.get("status") == "done" and batch in r.get("speedup", {})]
        # cost: time relative to the original, measured side by side (1 / speedup); the
        # original itself is a choice at cost 1
        costs = [1.0 / r["speedup"][batch] for r in timed] + [1.0]
        qualities = [r.get("quality") for r in timed] + [original_summary.get("quality")]
        on_front = pareto_front(costs, qualities)
        fronts[batch] = [r["key"] for r, on in zip(timed, on_front, strict=False) if on]
        if on_front[-1]:
            fronts[batch].append("original")
    for record in ordered:
        record["pareto"] = [int(b) for b, keys in fronts.items() if record["key"] in keys]
    counts = {s: sum(1 for r in ordered if r.get("status") == s)
              for s in ("done", "failed", "compressed")}
    return {
        "sweep": {
            "model": str(spec.model),
            "arch": spec.arch,
            "methods": list(spec.methods),
            "ratios": list(spec.ratios),
            "speedups": list(spec.speedups),
            "options": {name: list(values) for name, values in spec.options},
            "data": spec.data,
            "eval_data": spec.eval_data,
            "eval_limit": spec.eval_limit,
            "calib_samples": spec.calib_samples,
            "batch_sizes": list(spec.batch_sizes),
            "threads": spec.threads,
            "latency_min_time_s": spec.latency_min_time_s,
            "folder": str(folder.path),
            "identity": spec.identity(),
        },
        "run": {**run_info, "seconds": seconds, "python": platform.python_version()},
        "machine": machine_info(spec.provider),
        "timing": TIMING_NOTE,
        "notes": spec.notes(),
        "counts": {"trials": len(ordered), **counts},
        "original": original_summary,
        "pareto": fronts,
        "trials": ordered,
    }


def load_results(folder: str | os.PathLike) -> dict[str, Any]:
    """``results.json`` of a sweep folder."""
    path = Path(folder) / RESULTS_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise OptionError(f"{path}: no such file (run the sweep first)") from None
    except ValueError as e:
        raise OptionError(f"{path}: not valid JSON ({e})") from None


def results_schema_errors(results: Mapping[str, Any]) -> list[str]:
    """What is missing or mistyped in a results dict (empty when it is well formed)."""
    errors: list[str] = []
    if not isinstance(results.get("trials"), list):
        return ["'trials' is not a list"]
    required = {"key": str, "method": str, "status": str, "options": dict}
    for i, trial in enumerate(results["trials"]):
        for name, kind in required.items():
            if not isinstance(trial.get(name), kind):
                errors.append(f"trials[{i}].{name} is not a {kind.__name__}")
        if trial.get("ratio") is None and trial.get("speedup_target") is None:
            errors.append(f"trials[{i}] has neither a ratio nor a speedup_target")
        if trial.get("status") == "failed" and not trial.get("error"):
            errors.append(f"trials[{i}] failed without an error")
        if trial.get("status") == "done":
            for name in ("quality", "macs", "params", "file_bytes", "macs_ratio"):
                if not isinstance(trial.get(name), (int, float)):
                    errors.append(f"trials[{i}].{name} is not a number")
            if trial.get("quality_metric") not in ("accuracy", "agreement", "cosine"):
                errors.append(f"trials[{i}].quality_metric is not accuracy, agreement or cosine")
            for name in ("accuracy", "agreement"):  # None: unlabelled data, not class logits
                if name not in trial:
                    errors.append(f"trials[{i}] has no {name} (None when not measured)")
            for name in ("speedup", "latency_ms"):
                if not isinstance(trial.get(name), dict) or not trial[name]:
                    errors.append(f"trials[{i}].{name} is not a dict by batch size")
            if not isinstance(trial.get("command"), str):
                errors.append(f"trials[{i}].command is not a string")
    return errors

