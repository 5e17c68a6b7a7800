"""Calibration: run the model on real inputs and gather what data-aware passes need.

``Calibration.collect`` returns intermediate tensors; ``Calibration.stream`` feeds them batch
by batch to accumulators, so statistics such as input covariances never hold every activation
of the calibration set in memory at once. A model with several inputs (token ids and an
attention mask, two images) gets every input, batch by batch; integer inputs keep their type.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import torch

from compressor import runtime
from compressor.errors import DataError
from compressor.passes.graph import ConvAttributes

ProgressFn = Callable[[str, int, int], None]


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
        batch_size: int = 128,
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
        if isinstance(model, ir.Model):
            model = ir.serde.serialize_model(model)
        proto = onnx.ModelProto.FromString(model.SerializeToString())  # never touch the caller's
        present = {o.name for o in proto.graph.output}
        for name in names:
            if name not in present:
                proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                present.add(name)
        return runtime.session(proto, provider=self.provider)

    def _report(self, label: str, start: int) -> None:
        if self.progress is not None:
            total = len(self)
            self.progress(label, min(start + self.batch_size, total), total)

    def stream(
        self,
        model: ir.Model,
        value_names: list[str],
        consume: Callable[[dict[str, np.ndarray]], None],
        label: str = "calibrating",
    ) -> None:
        """Run the model batch by batch; call ``consume`` with the named tensors of each batch."""
        sess = self._session_with_outputs(model, value_names)
        wanted = [i.name for i in sess.get_inputs()]
        for i, feed in enumerate(self.feeds(input_names=wanted)):
            outputs = sess.run(value_names, feed)
            consume(dict(zip(value_names, outputs, strict=True)))
            self._report(label, i * self.batch_size)

    def stream_pair(
        self,
        first: tuple[ir.Model | onnx.ModelProto, list[str]],
        second: tuple[ir.Model | onnx.ModelProto, list[str]],
        consume: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], None],
        label: str = "calibrating",
    ) -> None:
        """Run two models on the same batches (e.g. the original and the partly compressed
        one) and call ``consume`` with both sets of named tensors."""
        sessions = [self._session_with_outputs(m, names) for m, names in (first, second)]
        feeds = [self.feeds(input_names=[i.name for i in s.get_inputs()]) for s in sessions]
        for i, pair in enumerate(zip(*feeds, strict=True)):
            got = []
            for sess, feed, (_, names) in zip(sessions, pair, (first, second), strict=True):
                got.append(dict(zip(names, sess.run(names, feed), strict=True)))
            consume(*got)
            self._report(label, i * self.batch_size)

    def collect(self, model: ir.Model, value_names: list[str]) -> dict[str, np.ndarray]:
        """The named intermediate tensors on every calibration input, concatenated on axis 0."""
        parts: dict[str, list[np.ndarray]] = {name: [] for name in value_names}

        def keep(batch: dict[str, np.ndarray]) -> None:
            for name, array in batch.items():
                parts[name].append(array)

        self.stream(model, value_names, keep)
        return {name: np.concatenate(arrays, axis=0) for name, arrays in parts.items()}


@dataclass
class Moments:
    """Running first and second moments of feature vectors (float64)."""

    count: int
    total: np.ndarray  # (d,)
    outer: np.ndarray  # (d, d)

    @classmethod
    def zeros(cls, dim: int) -> Moments:
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    def add(self, rows: np.ndarray) -> None:
        rows64 = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
        self.count += rows.shape[0]
        self.total += rows64.sum(0, dtype=torch.float64).numpy()
        self.outer += (rows64.T @ rows64).double().numpy()

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def covariance(self) -> np.ndarray:
        """Centered covariance E[(x - mu)(x - mu)^T]."""
        mean = self.mean
        return self.outer / max(self.count, 1) - np.outer(mean, mean)


@dataclass
class CrossMoments:
    """Running moments of paired vectors: x from the original model, x_hat from the
    compressed one, at the same positions of the same inputs."""

    count: int
    total: np.ndarray  # sum of x
    total_hat: np.ndarray  # sum of x_hat
    cross: np.ndarray  # sum of x x_hat^T
    outer_hat: np.ndarray  # sum of x_hat x_hat^T

    @classmethod
    def zeros(cls, dim: int, dim_hat: int | None = None) -> CrossMoments:
        dim_hat = dim if dim_hat is None else dim_hat
        return cls(0, np.zeros(dim), np.zeros(dim_hat), np.zeros((dim, dim_hat)),
                   np.zeros((dim_hat, dim_hat)))

    def add(self, rows: np.ndarray, rows_hat: np.ndarray) -> None:
        x = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
        xh = torch.from_numpy(np.ascontiguousarray(rows_hat, dtype=np.float32))
        self.count += rows.shape[0]
        self.total += x.sum(0, dtype=torch.float64).numpy()
        self.total_hat += xh.sum(0, dtype=torch.float64).numpy()
        self.cross += (x.T @ xh).double().numpy()
        self.outer_hat += (xh.T @ xh).double().numpy()

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def mean_hat(self) -> np.ndarray:
        return self.total_hat / max(self.count, 1)

    @property
    def cross_covariance(self) -> np.ndarray:
        """E[(x - mu)(x_hat - mu_hat)^T]."""
        return self.cross / max(self.count, 1) - np.outer(self.mean, self.mean_hat)

    @property
    def covariance_hat(self) -> np.ndarray:
        return self.outer_hat / max(self.count, 1) - np.outer(self.mean_hat, self.mean_hat)


def conv_patches(
    x: np.ndarray,
    attrs: ConvAttributes,
    max_rows: int | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """im2col rows of a 2-D Conv input: (rows, C * kh * kw), channel-major like the flattened
    ONNX weight, so ``patches @ W.reshape(M, -1).T`` is the convolution at those positions.

    Every output position of every sample, or a random subset of ``max_rows`` of them,
    gathered directly (never materialising the full im2col matrix).
    """
    top, left, bottom, right = attrs.pads
    padded = np.pad(x.astype(np.float32, copy=False),
                    ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, c, h, w = padded.shape
    (kh, kw), (sh, sw), (dh, dw) = attrs.kernel, attrs.strides, attrs.dilations
    h_out = (h - dh * (kh - 1) - 1) // sh + 1
    w_out = (w - dw * (kw - 1) - 1) // sw + 1
    total = n * h_out * w_out
    if max_rows is not None and total > max_rows:
        rng = rng or np.random.default_rng(0)
        flat = rng.choice(total, size=max_rows, replace=False)
    else:
        flat = np.arange(total)
    sample, rest = np.divmod(flat, h_out * w_out)
    oh, ow = np.divmod(rest, w_out)
    rows = (oh * sh)[:, None] + (np.arange(kh) * dh)[None, :]  # (R, kh)
    cols = (ow * sw)[:, None] + (np.arange(kw) * dw)[None, :]  # (R, kw)
    patches = padded[sample[:, None, None, None], np.arange(c)[None, :, None, None],
                     rows[:, None, :, None], cols[:, None, None, :]]
    return patches.reshape(len(flat), c * kh * kw)


def feature_rows(x: np.ndarray) -> np.ndarray:
    """Rows of a Gemm/MatMul input: everything but the last axis is a sample axis."""
    return x.reshape(-1, x.shape[-1])
