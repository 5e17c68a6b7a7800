"""Calibration: run the model on real inputs and gather what data-aware passes need.

``Calibration.collect`` returns intermediate tensors; ``Calibration.stream`` feeds them batch
by batch to accumulators, so statistics such as input covariances never hold every activation
of the calibration set in memory at once. A model with several inputs (token ids and an
attention mask, two images) gets every input, batch by batch; integer inputs keep their type.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from scipy.linalg.blas import dger, sgemm, ssyrk

from compressor import runtime
from compressor.errors import DataError
from compressor.passes.graph import ConvAttributes

ProgressFn = Callable[[str, int, int], None]

DEFAULT_BATCH_SIZE = 128
# What one streamed batch of requested intermediate tensors may take: the batch size shrinks
# below the calibration's so that a model with large activations (ResNet-50 at 224 x 224: ~100
# MB of conv inputs per image) keeps its peak memory set by the model, not by --calib-samples.
MAX_BATCH_BYTES = 256 * 2**20
# onnxruntime's own intermediate tensors are not among the requested outputs: a batch is also
# sized as if each sample's live activations took this many times its input (ResNet's stem
# output alone is 5.3 times a 224 x 224 image, with the block input live beside it)
ACTIVATION_FACTOR = 16


# A stream asked to remember the model's first output keeps it for every sample only up to
# this many bytes (class logits: kilobytes; a segmentation map at full resolution is not kept)
MAX_REMEMBERED_BYTES = 64 * 2**20


def model_digest(proto: onnx.ModelProto) -> str:
    """A digest of the model's serialised bytes: equal digests, the same model."""
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


def streaming_batch_size(sample_bytes: int, cap: int = DEFAULT_BATCH_SIZE) -> int:
    """Samples per onnxruntime run so that its live activations, taken as ``ACTIVATION_FACTOR``
    times the inputs, stay within ``MAX_BATCH_BYTES`` (at most ``cap``): ResNet-50 at
    224 x 224 runs 27 images at a time, not 256 (whose activations took 8.9 GB)."""
    return max(1, min(cap, MAX_BATCH_BYTES // max(1, ACTIVATION_FACTOR * sample_bytes)))


class StageClock:
    """Wall-clock seconds by named stage, accumulated over every entry into it.

    ``with clock("statistics"): ...`` adds the block's time to ``seconds["statistics"]``; the
    figures go into a pass's ``stats["seconds_by_stage"]`` (the pipeline shows them in its
    timings). Nested stages are timed both: the outer one includes the inner.
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @contextmanager
    def __call__(self, stage: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - started)


@contextmanager
def timed(clock: StageClock | None, stage: str):
    """``with timed(clock, stage):`` adds the block's time to ``clock`` (nothing without one)."""
    if clock is None:
        yield
    else:
        with clock(stage):
            yield


def prefix_model(model: ir.Model | onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """The part of ``model`` that computes ``names``, with exactly them as its outputs (a copy:
    the caller's model is untouched). onnxruntime runs every node of a graph whatever is
    fetched, so observing an early layer would otherwise pay for the whole network. A graph
    with subgraphs (If, Loop) is kept whole: a subgraph may read any outer value."""
    if isinstance(model, ir.Model):
        proto = ir.serde.serialize_model(model)
    else:
        proto = onnx.ModelProto.FromString(model.SerializeToString())
    graph = proto.graph
    produced = {o for node in graph.node for o in node.output}
    available = produced | {v.name for v in graph.input} | {t.name for t in graph.initializer}
    missing = [n for n in names if n not in available]
    if missing:
        raise DataError(f"the model has no tensor named '{missing[0]}' to observe")
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in graph.node for a in node.attribute):
        present = {o.name for o in graph.output}
        for name in names:
            if name not in present:
                graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                present.add(name)
        return proto
    needed = set(names)
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    initializers = [t for t in graph.initializer if t.name in needed]
    # every graph input stays: feeds name them all, whether this part reads them or not
    init_names = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in init_names or v.name in needed]
    outputs = [onnx.helper.make_empty_tensor_value_info(n) for n in dict.fromkeys(names)]
    sub = onnx.helper.make_graph(kept, graph.name, inputs, outputs, initializers)
    out = onnx.helper.make_model(sub, opset_imports=proto.opset_import,
                                 functions=proto.functions)
    out.ir_version = proto.ir_version
    return out


class Calibration:
    """Calibration samples of a model's inputs and the machinery to observe the model on them.

    ``inputs`` is a mapping from input name to array, every array holding the same number of
    samples on axis 0 (a model with several inputs: ``{"input_ids": int64 (N, 128),
    "attention_mask": int64 (N, 128)}``), or one array for a single-input model, which is fed
    to whatever the model's only input is called. Float arrays are stored as float32 for one
    unnamed array (as the float models of the zoo take them) and as given in a mapping (the
    caller matched them to the model's types, ``compressor.data.model_feeds``); integer and
    bool arrays always keep their type.

    To run a session of the model (or of a model with the same inputs: an int8 copy, a
    candidate being timed) on the samples, batch by batch::

        names = [i.name for i in session.get_inputs()]
        for feed in calibration.feeds(batch_size=64, input_names=names):
            session.run(None, feed)
    """

    def __init__(
        self,
        inputs: np.ndarray | Mapping[str, np.ndarray],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        provider: str = "cpu",
        progress: ProgressFn | None = None,
    ):
        if isinstance(inputs, Mapping):
            if not inputs:
                raise DataError("calibration inputs must name at least one model input")
            arrays = {str(name): np.asarray(a) for name, a in inputs.items()}
            for name, array in arrays.items():
                if array.ndim < 1 or len(array) == 0:
                    raise DataError(
                        f"calibration input '{name}' must be a non-empty batch, got shape "
                        f"{array.shape}"
                    )
            counts = {name: len(array) for name, array in arrays.items()}
            if len(set(counts.values())) > 1:
                detail = ", ".join(f"{name} {n}" for name, n in counts.items())
                raise DataError(f"calibration inputs have different numbers of samples ({detail})")
            self._arrays: dict[str, np.ndarray] = {
                name: np.ascontiguousarray(array) for name, array in arrays.items()
            }
            self._unnamed: np.ndarray | None = None
        else:
            inputs = np.asarray(inputs)
            if inputs.ndim < 2 or len(inputs) == 0:
                raise DataError(
                    f"calibration inputs must be a non-empty batch, got shape {inputs.shape}"
                )
            if inputs.dtype.kind == "f" or inputs.dtype.kind not in "biu":
                inputs = inputs.astype(np.float32, copy=False)
            self._arrays = {}
            self._unnamed = np.ascontiguousarray(inputs)
        if batch_size < 1:
            raise DataError(f"calibration batch size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.provider = provider
        self.progress = progress
        self._remembered: dict[str, np.ndarray] = {}  # first output by model digest

    def __len__(self) -> int:
        if self._unnamed is not None:
            return len(self._unnamed)
        return len(next(iter(self._arrays.values())))

    @property
    def input_names(self) -> tuple[str, ...]:
        """The model inputs the samples are named for; empty for one unnamed array (it feeds
        whatever a single-input model calls its input)."""
        return tuple(self._arrays)

    @property
    def inputs(self) -> np.ndarray:
        """The samples of a single-input calibration (its one array, named or not). A
        calibration of several inputs has no single array: use ``feeds`` or ``arrays``."""
        if self._unnamed is not None:
            return self._unnamed
        if len(self._arrays) == 1:
            return next(iter(self._arrays.values()))
        raise DataError(
            f"the calibration has {len(self._arrays)} inputs ({', '.join(self._arrays)}); "
            "iterate Calibration.feeds() instead of reading one array"
        )

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """Every input's samples by name (empty for one unnamed array: see ``inputs``)."""
        return dict(self._arrays)

    def subset(self, count: int) -> Calibration:
        """The first ``count`` samples of every input, with the same batch size and provider
        (and no progress reports: a subset serves one step of a pass)."""
        if count < 1:
            raise DataError(f"a calibration subset needs at least one sample, got {count}")
        inputs = (
            self._unnamed[:count]
            if self._unnamed is not None
            else {name: array[:count] for name, array in self._arrays.items()}
        )
        return Calibration(inputs, batch_size=self.batch_size, provider=self.provider)

    def feeds(
        self, batch_size: int | None = None, input_names: Sequence[str] | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """The samples as onnxruntime feeds, ``batch_size`` samples at a time (default: the
        calibration's; the last batch may be shorter), in order.

        Each feed maps input name -> array slice (views, not copies), ready for
        ``session.run(outputs, feed)``. ``input_names`` selects the inputs a session takes
        (``[i.name for i in session.get_inputs()]``); a calibration of one unnamed array
        needs it to name that array (one name). Default: every input the calibration holds.
        Raises ``DataError`` when a wanted input has no samples.
        """
        size = self.batch_size if batch_size is None else int(batch_size)
        if size < 1:
            raise DataError(f"calibration batch size must be positive, got {size}")
        arrays = self._select(input_names)
        total = len(self)
        for start in range(0, total, size):
            yield {name: array[start : start + size] for name, array in arrays.items()}

    def _select(self, input_names: Sequence[str] | None) -> dict[str, np.ndarray]:
        if self._unnamed is not None:
            if input_names is None:
                raise DataError(
                    "the calibration holds one unnamed array: pass the model's input name "
                    "to feeds(input_names=[...])"
                )
            if len(input_names) != 1:
                raise DataError(
                    f"the model has {len(input_names)} inputs ({', '.join(input_names)}) but "
                    "the calibration data is one unnamed array; give one array per input"
                )
            return {input_names[0]: self._unnamed}
        if input_names is None:
            return dict(self._arrays)
        missing = [name for name in input_names if name not in self._arrays]
        if missing:
            raise DataError(
                f"the calibration has no samples for model input '{missing[0]}' (it has: "
                f"{', '.join(self._arrays)})"
            )
        return {name: self._arrays[name] for name in input_names}

    def _session_with_outputs(self, model: ir.Model | onnx.ModelProto, names: Iterable[str]):
        """A session of the part of ``model`` that computes ``names``."""
        return runtime.session(prefix_model(model, list(names)), provider=self.provider)

    def _batches(self, run: Callable[[int, int], int], label: str) -> None:
        """Call ``run(start, stop)`` over the samples in order, for one sample first; ``run``
        returns the bytes its outputs took, which sets the following batches' size: at most
        the calibration's batch size, and at most ``MAX_BATCH_BYTES`` of outputs plus
        ``ACTIVATION_FACTOR`` times the inputs (onnxruntime's own live activations)."""
        total, start, size = len(self), 0, 1
        while start < total:
            stop = min(start + size, total)
            used = run(start, stop)
            if start == 0:
                per_sample = max(1, used // (stop - start)
                                 + ACTIVATION_FACTOR * self._sample_bytes())
                size = max(1, min(self.batch_size, MAX_BATCH_BYTES // per_sample))
            start = stop
            if self.progress is not None:
                self.progress(label, stop, total)

    def _sample_bytes(self) -> int:
        """Bytes of one sample of every input."""
        arrays = [self._unnamed] if self._unnamed is not None else self._arrays.values()
        return sum(a[0].nbytes for a in arrays)

    def remembered_output(self, model: onnx.ModelProto) -> np.ndarray | None:
        """The model's first output on every sample, if a ``stream(..., remember_as=
        model_digest(model))`` ran it (verification then need not run it again). The digest
        is taken only when something is remembered."""
        if not self._remembered:
            return None
        return self._remembered.get(model_digest(model))

    def _feed(self, input_names: Sequence[str], start: int, stop: int) -> dict[str, np.ndarray]:
        return {name: array[start:stop] for name, array in self._select(input_names).items()}

    def stream(
        self,
        model: ir.Model | onnx.ModelProto,
        value_names: list[str],
        consume: Callable[[dict[str, np.ndarray]], None],
        label: str = "calibrating",
        clock: StageClock | None = None,
        stage: str = "calibration",
        remember_as: str | None = None,
        with_range: bool = False,
    ) -> None:
        """Run the model batch by batch; call ``consume`` with the named tensors of each batch.

        Only the part of the model those tensors need runs, in batches no larger than the
        calibration's batch size nor than ``MAX_BATCH_BYTES`` of requested tensors allow
        (measured on a first batch of one sample), so memory holds one batch whatever the
        number of samples. With ``clock``, the forward passes add to ``"<stage> forward"`` and
        ``consume`` to ``"<stage> statistics"``.

        ``remember_as`` (the model's ``model_digest``): also run the model to its first
        output and keep that for every sample (``remembered_output``), when it takes at most
        ``MAX_REMEMBERED_BYTES``: a survey of every layer's inputs runs nearly the whole
        model anyway, and the pipeline's verification then runs only the compressed one.
        ``with_range``: ``consume(tensors, start, stop)``, with the batch's samples (a tensor's
        first axis need not be the samples: a (sequence, batch, features) activation)."""
        graph_output = None
        if remember_as is not None:
            proto = model if isinstance(model, onnx.ModelProto) else None
            outputs = (proto.graph.output if proto is not None else model.graph.outputs)
            if len(outputs) and outputs[0].name:
                graph_output = outputs[0].name
        fetched = list(dict.fromkeys(value_names + ([graph_output] if graph_output else [])))
        sess = self._session_with_outputs(model, fetched)
        wanted = [i.name for i in sess.get_inputs()]
        kept: list[np.ndarray] | None = [] if graph_output else None
        kept_bytes = 0

        def run(start: int, stop: int) -> int:
            nonlocal kept, kept_bytes
            with timed(clock, f"{stage} forward"):
                outputs = dict(zip(fetched, sess.run(fetched, self._feed(wanted, start, stop)),
                                   strict=True))
            if kept is not None:
                kept.append(outputs[graph_output])
                kept_bytes += outputs[graph_output].nbytes
                if kept_bytes * len(self) > MAX_REMEMBERED_BYTES * stop:
                    kept = None  # its outputs on every sample would be too large to keep
            with timed(clock, f"{stage} statistics"):
                wanted_tensors = {name: outputs[name] for name in value_names}
                if with_range:
                    consume(wanted_tensors, start, stop)
                else:
                    consume(wanted_tensors)
            return sum(outputs[name].nbytes for name in value_names)

        self._batches(run, label)
        if kept is not None and remember_as is not None:
            self._remembered[remember_as] = np.concatenate(kept, axis=0)

    def collect(self, model: ir.Model, value_names: list[str]) -> dict[str, np.ndarray]:
        """The named intermediate tensors on every calibration input, concatenated on axis 0."""
        parts: dict[str, list[np.ndarray]] = {name: [] for name in value_names}

        def keep(batch: dict[str, np.ndarray]) -> None:
            for name, array in batch.items():
                parts[name].append(array)

        self.stream(model, value_names, keep)
        return {name: np.concatenate(arrays, axis=0) for name, arrays in parts.items()}


def _mirror_upper(upper: np.ndarray, dtype: type = np.float64, block: int = 512) -> np.ndarray:
    """The symmetric matrix whose upper triangle ssyrk filled (zeros below), as ``dtype``.

    Mirrored band by band: ``full += full.T`` on the whole matrix made numpy copy it first
    (the operands overlap), a third d x d matrix beside the float32 sums and their float64
    copy (ResNet-50's 4608-wide layers: 170 MB a worker, in its decompositions' peak)."""
    full = upper.astype(dtype)
    d = len(full)
    for start in range(0, d, block):
        stop = min(start + block, d)
        full[start:stop, :start] = full[:start, start:stop].T  # the strip above, mirrored
        diagonal = full[start:stop, start:stop]
        diagonal += np.triu(diagonal, 1).T
    return full


def _centered(total: np.ndarray, count: int, mean: np.ndarray,
              mean_other: np.ndarray) -> np.ndarray:
    """total / count - mean mean_other^T, in place in ``total`` (a float64 sum of products):
    no d x d temporaries (three of them per 4608-wide layer were 0.5 GB at once)."""
    total /= max(count, 1)
    # dger, BLAS's rank-1 update, works on Fortran-ordered matrices: a C-ordered one is
    # updated through its transpose
    if total.flags.f_contiguous:
        return dger(-1.0, mean, mean_other, a=total, overwrite_a=1)
    return dger(-1.0, mean_other, mean, a=total.T, overwrite_a=1).T


@dataclass
class Moments:
    """Running first and second moments of feature vectors: sums in float64, the second
    moment in float32 (each batch's Gram matrix is a float32 product anyway, and a survey
    holds one d x d matrix per layer at once: ResNet-50's take 0.5 GB so, 1 GB in float64).

    BLAS's ssyrk adds each batch into the upper triangle in place (``outer_upper``; the
    lower triangle stays zero): no d x d copy per batch, where a survey of ResNet-50 at
    224 x 224 runs batches of a few images."""

    count: int
    total: np.ndarray  # (d,)
    outer_upper: np.ndarray  # (d, d) float32, Fortran order: the upper triangle of sum x x^T

    @classmethod
    def zeros(cls, dim: int) -> Moments:
        return cls(0, np.zeros(dim), np.zeros((dim, dim), np.float32, order="F"))

    def add(self, rows: np.ndarray) -> None:
        rows32 = np.ascontiguousarray(rows, dtype=np.float32)
        self.count += rows.shape[0]
        self.total += rows32.sum(0, dtype=np.float64)
        if rows32.shape[0]:
            self.outer_upper = ssyrk(1.0, rows32.T, beta=1.0, c=self.outer_upper, trans=0,
                                     overwrite_c=1)

    @property
    def outer(self) -> np.ndarray:
        """sum x x^T (float64)."""
        return _mirror_upper(self.outer_upper)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def covariance(self) -> np.ndarray:
        """Centered covariance E[(x - mu)(x - mu)^T] (float64)."""
        return _centered(self.outer, self.count, self.mean, self.mean)


@dataclass
class CrossMoments:
    """Running moments of paired vectors: x from the original model, x_hat from the
    compressed one, at the same positions of the same inputs.

    Like ``Moments``, the products accumulate in float32 in place, in Fortran order: BLAS's
    sgemm adds each batch's x^T x_hat into ``cross`` (beta = 1) and ssyrk its x_hat^T x_hat
    into the upper triangle of ``outer_hat_upper``. A product per batch converted to float64
    and added (two d x d passes in memory, and a transposed one to mirror the Gram matrix)
    took two thirds of the time on ResNet-50's 4608-wide layers, whose batches are a few
    images of 49 positions.

    With ``project`` (a k x d matrix P), the x side is y = P x: each batch's rows are
    multiplied by P^T first, and ``mean`` and ``cross_covariance`` are those of y. A refit
    needs only Cov(W x, x_hat) of a layer's weight W: accumulated so it costs k (d + d_hat)
    per row instead of d d_hat (a 3 x 3 conv's outputs are a ninth of its fan-in)."""

    count: int
    total: np.ndarray  # sum of x, or of y = P x (float64)
    total_hat: np.ndarray  # sum of x_hat (float64)
    cross: np.ndarray  # sum of x x_hat^T: (d or k, d_hat) float32, Fortran order
    outer_hat_upper: np.ndarray  # upper triangle of sum x_hat x_hat^T: float32, Fortran order
    project: np.ndarray | None = None  # P: (k, d) float32
    outputs: bool = False  # the x side is a layer's outputs y = W x (projected, or given so)

    @classmethod
    def zeros(cls, dim: int, dim_hat: int | None = None,
              project: np.ndarray | None = None, outputs: bool = False) -> CrossMoments:
        """``outputs``: the rows ``add`` will get on the x side are a layer's outputs
        y = W x already (``dim`` outputs wide), as ``project`` by W would make them."""
        dim_hat = dim if dim_hat is None else dim_hat
        if project is not None:
            if project.ndim != 2 or project.shape[1] != dim:
                raise ValueError(f"a projection of {dim}-wide rows must be (k, {dim}), got "
                                 f"{project.shape}")
            project = np.asfortranarray(project, dtype=np.float32)
            dim, outputs = project.shape[0], True
        return cls(0, np.zeros(dim), np.zeros(dim_hat),
                   np.zeros((dim, dim_hat), np.float32, order="F"),
                   np.zeros((dim_hat, dim_hat), np.float32, order="F"), project, outputs)

    def add(self, rows: np.ndarray, rows_hat: np.ndarray) -> None:
        x = np.ascontiguousarray(rows, dtype=np.float32)
        if self.project is not None and x.shape[0]:
            # P x^T on x^T's Fortran view (no copy of the rows): its transpose is the rows
            # of y, C-ordered as the products below read them
            x = sgemm(1.0, self.project, x.T).T
        xh = np.ascontiguousarray(rows_hat, dtype=np.float32)
        self.count += x.shape[0]
        self.total += x.sum(0, dtype=np.float64)
        self.total_hat += xh.sum(0, dtype=np.float64)
        if x.shape[0]:
            # x.T and xh.T are Fortran-ordered views: no copies
            self.cross = sgemm(1.0, x.T, xh.T, trans_b=1, beta=1.0, c=self.cross,
                               overwrite_c=1)
            self.outer_hat_upper = ssyrk(1.0, xh.T, beta=1.0, c=self.outer_hat_upper,
                                         trans=0, overwrite_c=1)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def mean_hat(self) -> np.ndarray:
        return self.total_hat / max(self.count, 1)

    @property
    def cross_covariance(self) -> np.ndarray:
        """E[(x - mu)(x_hat - mu_hat)^T] (float64; of y = P x with a projection)."""
        return _centered(self.cross.astype(np.float64), self.count, self.mean, self.mean_hat)

    def output_statistics(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The mean of y = W x and Cov(y, x_hat) (float64), for the W these moments were
        projected by (or whose outputs they were given) or, otherwise, any W (k x d)."""
        if self.outputs:
            shape = None if self.project is None else self.project.shape
            if (shape is not None and weight.shape != shape) or weight.shape[0] != len(self.total):
                raise ValueError(f"these moments are of the outputs of a "
                                 f"{shape or (len(self.total), '?')} matrix, not a "
                                 f"{weight.shape} one")
            return self.mean, self.cross_covariance
        return weight @ self.mean, weight @ self.cross_covariance

    @property
    def covariance_hat(self) -> np.ndarray:
        """E[(x_hat - mu_hat)(x_hat - mu_hat)^T] (float64)."""
        return _centered(_mirror_upper(self.outer_hat_upper), self.count, self.mean_hat,
                         self.mean_hat)


def conv_patches(
    x: np.ndarray,
    attrs: ConvAttributes,
    max_rows: int | None = None,
    rng: np.random.Generator | None = None,
    index: np.ndarray | None = None,
) -> np.ndarray:
    """im2col rows of a 2-D Conv input: (rows, C * kh * kw), channel-major like the flattened
    ONNX weight, so ``patches @ W.reshape(M, -1).T`` is the convolution at those positions.

    Every output position of every sample, a random subset of ``max_rows`` of them, or the
    rows ``index`` names (flat: sample * positions + position, see ``sampled_rows``),
    gathered directly (never materialising the full im2col matrix).
    """
    top, left, bottom, right = attrs.pads
    x = x.astype(np.float32, copy=False)
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right))) if any(attrs.pads) else x
    (kh, kw), (sh, sw), (dh, dw) = attrs.kernel, attrs.strides, attrs.dilations
    n, c, hp, wp = padded.shape
    h_out = (hp - dh * (kh - 1) - 1) // sh + 1
    w_out = (wp - dw * (kw - 1) - 1) // sw + 1
    total = n * h_out * w_out
    if index is not None:
        flat = np.asarray(index)
    elif max_rows is not None and total > max_rows:
        rng = rng or np.random.default_rng(0)
        flat = rng.choice(total, size=max_rows, replace=False)
    else:
        flat = np.arange(total)
    sample, rest = np.divmod(flat, h_out * w_out)
    oh, ow = np.divmod(rest, w_out)
    # Each row's kh * kw window positions in its sample's flattened plane. Gathering them
    # sample by sample along the plane (np.take on axis 1 of a (C, H * W) image) reads each
    # channel's plane in order; indexing a (n, C, ...) view by row reads C planes per row
    # (1.3-1.6x slower on ResNet-50's layers).
    offsets = ((np.arange(kh) * dh)[:, None] * wp + np.arange(kw) * dw).reshape(-1)
    where = (oh * sh * wp + ow * sw)[:, None] + offsets
    images = padded.reshape(n, c, hp * wp)
    out = np.empty((len(flat), c, kh * kw), np.float32)
    order = np.argsort(sample, kind="stable")
    bounds = np.searchsorted(sample[order], np.arange(n + 1))
    for j in range(n):
        rows = order[bounds[j]:bounds[j + 1]]
        if len(rows):
            out[rows] = np.take(images[j], where[rows], axis=1).transpose(1, 0, 2)
    return out.reshape(len(flat), c * kh * kw)


def feature_rows(x: np.ndarray) -> np.ndarray:
    """Rows of a Gemm/MatMul input: everything but the last axis is a sample axis."""
    return x.reshape(-1, x.shape[-1])


def conv_output_positions(x_shape: Sequence[int], attrs: ConvAttributes) -> int:
    """Output positions per sample of a 2-D Conv reading a tensor of ``x_shape``."""
    top, left, bottom, right = attrs.pads
    h, w = x_shape[2] + top + bottom, x_shape[3] + left + right
    (kh, kw), (sh, sw), (dh, dw) = attrs.kernel, attrs.strides, attrs.dilations
    return ((h - dh * (kh - 1) - 1) // sh + 1) * ((w - dw * (kw - 1) - 1) // sw + 1)


def sampled_rows(first_sample: int, samples: int, positions: int, per_sample: int | None,
                 seed: int) -> np.ndarray:
    """Flat row indices (sample * positions + position, within the batch) of at most
    ``per_sample`` positions of each sample, drawn with a generator seeded by the sample's
    index in the calibration set: the same rows whatever the batches are, so statistics do
    not depend on the batch size (``None``: every row)."""
    if per_sample is None or positions <= per_sample:
        return np.arange(samples * positions)
    picks = [_sample_positions(seed, first_sample + j, positions, per_sample) + j * positions
             for j in range(samples)]
    return np.concatenate(picks)


@functools.lru_cache(maxsize=1 << 16)
def _sample_positions(seed: int, sample: int, positions: int, per_sample: int) -> np.ndarray:
    """The positions ``sampled_rows`` draws for one sample. Every layer with as many output
    positions draws the same ones, so they are drawn once (a generator per sample per layer
    per batch took 5 s of ResNet-50's refit at 200 samples)."""
    picks = np.random.default_rng((seed, sample)).choice(positions, size=per_sample,
                                                         replace=False)
    picks.flags.writeable = False
    return picks
