"""Measured latency: one timing mechanism and one on-disk cache for every choice made by time.

Like cuDNN's algorithm cache (``cudnn_conv_algo_search``, ORT's cached benchmark results), a
candidate is timed once per machine and runtime and the result is kept, keyed by the context
(CPU model, cores, onnxruntime version, provider, threads, batch) and the candidate's
signature (by default a hash of its graph without names or weight values: timing depends on
shapes, ops and attributes, not on which numbers the weights hold).

* ``LatencyContext``: where and how models are timed.
* ``LatencyCache``: the JSON file (``$COMPRESSOR_CACHE_DIR/latency.json``, else
  ``~/.cache/compressor/latency.json``), written atomically, merged with what other processes
  wrote meanwhile, and a corrupt file is reported and replaced, never fatal.
* ``LatencyTable``: ``time(model)`` (median ms of one ``session.run``, cached) for candidates,
  ``time_all(models)`` for the candidates of one choice (each against the first, side by
  side, on the scale of its single timing; cached),
  ``compare(models)`` (side by side, never cached) for whole models. Both run
  ``compressor.evaluate.measure_latency`` on ``compressor.runtime.session``s, spinning off.
* ``candidate_model``: a standalone model of a few nodes, to time a candidate in its context;
  ``fused_activation``/``activation_nodes``: the element-wise op after a layer that onnxruntime
  fuses into it, which a candidate must carry to be timed as it will run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from compressor import runtime
from compressor.errors import OptionError, UnsupportedModelError

CACHE_DIR_ENV = "COMPRESSOR_CACHE_DIR"
CACHE_FILE = "latency.json"
CACHE_FORMAT = 1
CANDIDATE_IR_VERSION = 10
# A whole model is timed once per pass as the baseline of its budget: longer than a candidate,
# since an error in it shifts every layer's share of the budget.
WHOLE_MODEL_MIN_TIME_S = 0.25
# Initializers up to this many elements keep their values in a signature (Resize scales, Clip
# bounds; shape tensors and axes); larger ones, the weights, count by dtype and dims only.
SIGNATURE_FLOAT_VALUES = 8
SIGNATURE_OTHER_VALUES = 1024
# Element-wise ops onnxruntime's CPU provider fuses into a preceding Conv (its MLAS activation
# kinds) or Gemm; timed with the layer when the layer's output has no other user.
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh"})


# --------------------------------------------------------------------------- context


@functools.cache
def _machine(provider: str) -> tuple[tuple[str, Any], ...]:
    import onnxruntime as ort

    from compressor.evaluate import machine_info

    info = machine_info(provider)
    fields = [("cpu", info["cpu"]), ("logical_cores", info["cores"]),
              ("usable_cores", info["usable_cores"]), ("onnxruntime", ort.__version__)]
    if provider == "cuda":
        fields.append(("gpu", info.get("gpu")))
    return tuple(fields)


@dataclass(frozen=True)
class LatencyContext:
    """Where models are timed: provider ('cpu' or 'cuda'), intra-op threads (None:
    onnxruntime's default), and the batch size (the first axis of every input)."""

    provider: str = "cpu"
    threads: int | None = None
    batch: int = 1

    def __post_init__(self):
        if self.provider not in runtime.PROVIDERS:
            raise OptionError(f"unknown provider '{self.provider}': choose "
                              f"{', '.join(runtime.PROVIDERS)}")
        if self.threads is not None and self.threads < 1:
            raise OptionError(f"--threads must be >= 1, got {self.threads}")
        if self.batch < 1:
            raise OptionError(f"--batch must be >= 1, got {self.batch}")

    def key(self) -> dict:
        """Everything a measured time depends on besides the model itself."""
        return {**dict(_machine(self.provider)), "provider": self.provider,
                "threads": self.threads, "batch": self.batch}


# --------------------------------------------------------------------------- cache


def default_cache_path() -> Path:
    root = os.environ.get(CACHE_DIR_ENV)
    base = Path(root) if root else Path.home() / ".cache" / "compressor"
    return base / CACHE_FILE


def cache_key(context: Mapping[str, Any], signature: str) -> str:
    text = json.dumps(dict(context), sort_keys=True) + "\n" + signature
    return hashlib.sha256(text.encode()).hexdigest()


class LatencyCache:
    """Measured times on disk, keyed by ``sha256(context key + signature)``.

    ``path`` None: the default file. ``persistent=False`` keeps entries in memory only. Reads
    are lazy; ``save`` writes atomically (a temporary file then ``os.replace``) after merging in
    whatever another process wrote since, so concurrent runs lose nothing but races on the
    same key. An unreadable file is warned about and treated as empty.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, persistent: bool = True):
        self.path = Path(path) if path is not None else default_cache_path()
        self.persistent = persistent
        self._entries: dict[str, dict[str, Any]] | None = None
        self._pending: dict[str, dict[str, Any]] = {}
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the file we last read
        self._save_failed = False

    def __len__(self) -> int:
        return len(self._load())

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _read(self) -> dict[str, dict[str, Any]]:
        if not self.persistent:
            return {}
        self._seen = self._stat()
        if self._seen is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
                raise ValueError(f"not a format-{CACHE_FORMAT} latency cache")
            entries = data["entries"]
            if not isinstance(entries, dict) or not all(
                    isinstance(v, dict) and isinstance(v.get("ms"), (int, float))
                    for v in entries.values()):
                raise ValueError("malformed entries")
            return entries
        except (OSError, ValueError, KeyError) as e:
            warnings.warn(f"latency cache {self.path} is unreadable ({e}); starting with an "
                          "empty cache (it is rewritten on the next save)", stacklevel=3)
            return {}

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._entries is None:
            self._entries = self._read()
        return self._entries

    def get(self, context: Mapping[str, Any], signature: str) -> float | None:
        entry = self._load().get(cache_key(context, signature))
        return None if entry is None else float(entry["ms"])

    def put(self, context: Mapping[str, Any], signature: str, ms: float) -> None:
        entry = {"ms": float(ms), "what": signature[:120], "at": int(time.time())}
        key = cache_key(context, signature)
        self._load()[key] = entry
        self._pending[key] = entry

    def save(self) -> None:
        """Write pending entries (merged with the file's current content) atomically."""
        if not self._pending or not self.persistent:
            self._pending.clear()
            return
        entries = self._load()
        if self._stat() != self._seen:  # someone else wrote: merge their entries under ours
            entries = {**self._read(), **self._pending}
            self._entries = entries
        payload = json.dumps({"format": CACHE_FORMAT, "entries": entries}, sort_keys=True)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".latency-", suffix=".json.tmp",
                                       dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(payload)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            if not self._save_failed:
                warnings.warn(f"cannot write the latency cache {self.path} ({e}); timings are "
                              "kept for this run only", stacklevel=2)
                self._save_failed = True
            return
        self._seen = self._stat()
        self._pending.clear()


# --------------------------------------------------------------------------- signatures


def graph_signature(proto: onnx.ModelProto) -> str:
    """sha256 of the model with every name replaced by its order of appearance, doc strings
    dropped, and initializers above a few elements (``SIGNATURE_FLOAT_VALUES`` float,
    ``SIGNATURE_OTHER_VALUES`` others) reduced to dtype and dims: two models that onnxruntime
    runs the same way get the same signature, whatever their weights."""
    g = proto.graph
    names: dict[str, str] = {"": ""}

    def canon(name: str) -> str:
        if name not in names:
            names[name] = f"v{len(names)}"
        return names[name]

    graph = onnx.GraphProto(name="g")
    for tensor in g.initializer:
        placeholder = onnx.TensorProto(name=canon(tensor.name), data_type=tensor.data_type,
                                       dims=tensor.dims)
        floating = tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                        onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
        limit = SIGNATURE_FLOAT_VALUES if floating else SIGNATURE_OTHER_VALUES
        if int(np.prod(tensor.dims)) <= limit:
            placeholder.CopyFrom(tensor)
            placeholder.name = names[tensor.name]
            placeholder.doc_string = ""
        graph.initializer.append(placeholder)
    for value in g.input:
        if value.name in names:  # an initializer also listed as input
            continue
        graph.input.append(_renamed_value(value, canon(value.name)))
    for node in g.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = ""
        copy.doc_string = ""
        del copy.input[:]
        del copy.output[:]
        copy.input.extend(canon(n) for n in node.input)
        copy.output.extend(canon(n) for n in node.output)
        graph.node.append(copy)
    for value in g.output:
        graph.output.append(_renamed_value(value, canon(value.name)))
    model = onnx.ModelProto(graph=graph)
    model.opset_import.extend(sorted(proto.opset_import, key=lambda o: o.domain))
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def _renamed_value(value: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    out = onnx.ValueInfoProto()
    out.CopyFrom(value)
    out.name = name
    out.doc_string = ""
    return out


# --------------------------------------------------------------------------- inputs


def _input_values(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in proto.graph.initializer}
    return [v for v in proto.graph.input if v.name not in inits]


def _random_feeds(proto: onnx.ModelProto, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the model's input dtypes, the first axis of each being ``batch``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in _input_values(proto):
        t = value.type.tensor_type
        if not value.type.HasField("tensor_type") or not t.HasField("shape"):
            raise UnsupportedModelError(f"input '{value.name}' is not a tensor of known rank: "
                                        "it cannot be timed")
        dims = list(t.shape.dim)
        if not dims:
            raise UnsupportedModelError(f"input '{value.name}' is a scalar; expected a batch")
        shape = [batch]
        if dims[0].HasField("dim_value") and dims[0].dim_value != batch:
            raise OptionError(f"input '{value.name}' has a fixed batch size of "
                              f"{dims[0].dim_value}: it cannot be timed at batch {batch}")
        for i, d in enumerate(dims[1:], start=1):
            if not d.HasField("dim_value"):
                raise UnsupportedModelError(
                    f"input '{value.name}' has a symbolic dimension {i} ('{d.dim_param}'); "
                    "pass --input-shape")
            shape.append(d.dim_value)
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        if dtype.kind == "f":
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[value.name] = rng.random(shape) < 0.5
        else:  # indices and the like: small values stay in range
            feeds[value.name] = rng.integers(0, 2, size=shape).astype(dtype)
    if not feeds:
        raise UnsupportedModelError("the model has no graph input: nothing to time")
    return feeds


def _latency_input(feeds: Mapping[str, np.ndarray]):
    """What ``measure_latency`` takes: the array for a single-input model, else the feeds."""
    if len(feeds) == 1:
        return next(iter(feeds.values()))
    return dict(feeds)


# --------------------------------------------------------------------------- the table


class LatencyTable:
    """Median milliseconds of candidates in one ``LatencyContext``, cached on disk.

    ``cache`` None: the default on-disk cache. ``min_time_s``, ``warmup`` and ``min_runs``
    bound one candidate's timing (tens of ms by default: the tool's own time matters, and a
    candidate of one or two layers is quick to run). ``hits``/``misses`` count cache lookups.
    Tests substitute a deterministic ``measure``.
    """

    def __init__(self, context: LatencyContext | None = None, cache: LatencyCache | None = None,
                 *, min_time_s: float = 0.05, warmup: int = 3, min_runs: int = 5,
                 seed: int = 0):
        if min_time_s < 0 or warmup < 0 or min_runs < 1:
            raise OptionError("latency timing needs min_time_s >= 0, warmup >= 0, min_runs >= 1")
        self.context = context if context is not None else LatencyContext()
        self.cache = cache if cache is not None else LatencyCache()
        self.min_time_s = min_time_s
        self.warmup = warmup
        self.min_runs = min_runs
        self.seed = seed
        self.hits = 0
        self.misses = 0
        self._key: dict | None = None

    @property
    def context_key(self) -> dict:
        if self._key is None:
            self._key = self.context.key()
        return self._key

    def time(self, proto: onnx.ModelProto | Callable[[], onnx.ModelProto],
             signature: str | None = None, *, min_time_s: float | None = None) -> float:
        """Median ms of one ``session.run`` at ``context.batch`` on random inputs, from the
        cache when this signature was timed before in this context.

        ``proto`` may be a function building the model, called only on a cache miss; then
        ``signature`` is required. ``min_time_s``: this timing's length, if not the table's
        (``WHOLE_MODEL_MIN_TIME_S`` for a whole model).
        """
        if signature is None:
            if callable(proto):
                raise TypeError("a model builder needs an explicit signature")
            signature = graph_signature(proto)
        cached = self.cache.get(self.context_key, signature)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        model = proto() if callable(proto) else proto
        ms = self.measure(model, self.min_time_s if min_time_s is None else min_time_s)
        if not (np.isfinite(ms) and ms > 0):
            raise UnsupportedModelError(f"timing gave {ms} ms: not a usable latency")
        self.cache.put(self.context_key, signature, ms)
        self.cache.save()
        return ms

    def time_all(self, protos: Sequence[onnx.ModelProto]) -> list[float]:
        """``time`` of the candidates of one choice that take the same inputs (one layer's
        algorithms or ranks), ``protos[0]`` the reference (the dense layer, ORT's Conv).

        The reference is timed alone, like every candidate ``time`` measures; each other
        candidate not cached is timed side by side with it, in alternating rounds, and kept as
        the reference's time times their ratio. A change in the machine's load while they run
        then falls on both alike, so the ratios that the choice and the prediction rest on
        stay right, and the times stay on the scale of single timings (all of the candidates
        side by side at once would evict each other's weights from the caches and inflate the
        times of the large ones; measured on mlp: its dense 784x512 layer 30% slower among
        svd's ranks). Each is cached."""
        first = self.time(protos[0])
        signatures = [graph_signature(p) for p in protos[1:]]
        out = [first]
        fresh = False
        for proto, signature in zip(protos[1:], signatures, strict=True):
            cached = self.cache.get(self.context_key, signature)
            if cached is not None:
                self.hits += 1
                out.append(cached)
                continue
            self.misses += 1
            reference_ms, ms = self.measure_all([protos[0], proto], 2 * self.min_time_s)
            ms = first * ms / reference_ms
            if not (np.isfinite(ms) and ms > 0):
                raise UnsupportedModelError(f"timing gave {ms} ms: not a usable latency")
            self.cache.put(self.context_key, signature, ms)
            out.append(ms)
            fresh = True
        if fresh:
            self.cache.save()
        return [float(ms) for ms in out]

    def measure_all(self, protos: Sequence[onnx.ModelProto], min_time_s: float) -> list[float]:
        """Time ``protos`` now, side by side (no cache). A table whose ``measure`` is
        substituted (tests) measures each through it instead."""
        if type(self).measure is not _TABLE_MEASURE:
            return [self.measure(p, min_time_s / len(protos)) for p in protos]
        times = self._median({str(i): p for i, p in enumerate(protos)}, None, min_time_s)
        return [times[str(i)] for i in range(len(protos))]

    def measure(self, proto: onnx.ModelProto, min_time_s: float) -> float:
        """Time ``proto`` now (no cache): median ms over at least ``min_runs`` runs lasting
        ``min_time_s``, after ``warmup`` runs. The one place a table measures: a test
        substitutes a deterministic function here."""
        return self._median({"model": proto}, None, min_time_s)["model"]

    def compare(self, models: Mapping[str, onnx.ModelProto],
                feeds: Mapping[str, np.ndarray] | None = None, *,
                min_time_s: float = 1.0) -> dict[str, float]:
        """Whole models side by side (the order alternating every round, spinning off),
        median ms of each; never cached. ``feeds``: input name -> rows (repeated or cut to
        ``context.batch``); random inputs of the first model's input types by default."""
        return self._median(models, feeds, min_time_s)

    def _median(self, models: Mapping[str, onnx.ModelProto],
                feeds: Mapping[str, np.ndarray] | None, min_time_s: float) -> dict[str, float]:
        from compressor.evaluate import measure_latency

        if not models:
            return {}
        batch = self.context.batch
        first = next(iter(models.values()))
        if feeds is None:
            feeds = _random_feeds(first, batch, self.seed)
        sessions = {name: runtime.session(proto, self.context.provider, self.context.threads)
                    for name, proto in models.items()}
        stats = measure_latency(sessions, x=_latency_input(feeds), batch_sizes=[batch],
                                warmup=self.warmup, min_time_s=min_time_s,
                                min_runs=self.min_runs)
        out = {}
        for name in models:
            if batch not in stats.get(name, {}):
                raise OptionError(f"model '{name}' could not be timed at batch {batch} "
                                  "(its batch dimension is fixed to another size)")
            out[name] = stats[name][batch].p50_ms
        return out


# The table's own ``measure``: one that differs (a subclass's, a patched one) is a test's.
_TABLE_MEASURE = LatencyTable.measure


# --------------------------------------------------------------------------- predictions


def predicted_whole_ms(whole_ms: float, dense_ms: float, chosen_ms: float) -> float:
    """The whole model's predicted time when layers that take ``dense_ms`` (their candidates'
    times, summed) take ``chosen_ms`` instead: the rest of the model as measured
    (``whole_ms - dense_ms``), plus the chosen layers. The one prediction every pass that
    chooses by measured time reports (svd, prune, fast-conv)."""
    return whole_ms - dense_ms + chosen_ms


def prediction_stats(whole_ms: float, predicted_ms: float) -> dict[str, float]:
    """A pass's stats for its prediction: the measured whole-model time before, the predicted
    time after and their ratio (``predicted_speedup``, which the recipe reads)."""
    return {
        "latency_ms_before": whole_ms,
        "predicted_latency_ms": predicted_ms,
        "predicted_speedup": whole_ms / predicted_ms if predicted_ms > 0 else float("inf"),
    }


# --------------------------------------------------------------------------- candidates


def candidate_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Mapping[str, tuple[Sequence[int], Any]],
    outputs: Sequence[str] | Mapping[str, tuple[Sequence[int] | None, Any]],
    initializers: Mapping[str, np.ndarray],
    opset: int | Sequence[onnx.OperatorSetIdProto] = 18,
) -> onnx.ModelProto:
    """A standalone model of ``nodes``, to time a candidate in context.

    inputs: name -> (shape, numpy dtype); outputs: names (their types inferred) or name ->
    (shape or None, dtype); initializers: name -> array; opset: the default domain's version or
    the opset imports to copy. IR version 10, which onnxruntime reads.
    """
    graph_inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(
        np.dtype(dtype)), list(shape)) for name, (shape, dtype) in inputs.items()]
    if isinstance(outputs, Mapping):
        graph_outputs = [helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
            None if shape is None else list(shape)) for name, (shape, dtype) in outputs.items()]
    else:
        graph_outputs = [onnx.ValueInfoProto(name=name) for name in outputs]
    tensors = [numpy_helper.from_array(np.asarray(array), name)
               for name, array in initializers.items()]
    graph = helper.make_graph(list(nodes), "candidate", graph_inputs, graph_outputs, tensors)
    if isinstance(opset, int):
        imports = [helper.make_opsetid("", opset)]
    else:
        imports = list(opset)
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = CANDIDATE_IR_VERSION
    if not isinstance(outputs, Mapping):
        inferred = onnx.shape_inference.infer_shapes(model)
        typed = {v.name: v for v in inferred.graph.output}
        for i, value in enumerate(model.graph.output):
            if typed.get(value.name) is not None and typed[value.name].type.HasField(
                    "tensor_type"):
                model.graph.output[i].CopyFrom(typed[value.name])
            else:
                raise UnsupportedModelError(f"candidate output '{value.name}' has no inferable "
                                            "type: give its dtype")
    return model


_FILLER = np.random.default_rng(0).standard_normal(4099).astype(np.float32) * 0.1


def filler(shape: Sequence[int], dtype=np.float32) -> np.ndarray:
    """Weights for a timing candidate: non-degenerate values at memcpy speed (a fixed random
    block repeated), since onnxruntime's float kernels run the same whatever the values."""
    return np.resize(_FILLER, tuple(int(d) for d in shape)).astype(dtype, copy=False)


def sole_user(value: ir.Value) -> ir.Node | None:
    """The one node reading ``value``, when it is not also a graph output; else None."""
    if value.is_graph_output():
        return None
    users = list(value.uses())
    return users[0].node if len(users) == 1 else None


def fused_activation(node: ir.Node) -> ir.Node | None:
    """The element-wise op after ``node`` that onnxruntime fuses with it (Relu, Clip, ...)
    when it is the only user of ``node``'s output and its other inputs are constants."""
    if len(node.outputs) != 1:
        return None
    out = node.outputs[0]
    user = sole_user(out)
    if user is None:
        return None
    if user.domain not in ("", "ai.onnx") or user.op_type not in FUSED_ACTIVATIONS:
        return None
    if user.inputs[0] is not out:
        return None
    for value in user.inputs[1:]:
        if value is not None and value.const_value is None:
            return None
    return user


def activation_nodes(activation: ir.Node | None, x: str, y: str = "y",
                     prefix: str = "act") -> tuple[list[onnx.NodeProto], dict[str, np.ndarray], str]:
    """``activation`` (from ``fused_activation``) as a NodeProto reading ``x`` and writing
    ``y``, with its constant inputs as initializers named after ``prefix``. Returns the nodes,
    the initializers and the name of the output: ``x`` itself when there is no activation."""
    if activation is None:
        return [], {}, x
    proto = ir.serde.serialize_node(activation)
    inputs, inits = [x], {}
    for i, value in enumerate(activation.inputs[1:], start=1):
        if value is None:
            inputs.append("")
            continue
        name = f"{prefix}_{i}"
        inits[name] = np.asarray(value.const_value.numpy())
        inputs.append(name)
    del proto.input[:]
    del proto.output[:]
    proto.input.extend(inputs)
    proto.output.extend([y])
    proto.name = prefix
    return [proto], inits, y
