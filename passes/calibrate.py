"""Calibration: run the model on real inputs and gather what data-aware passes need.

``Calibration.collect`` returns intermediate tensors; ``Calibration.stream`` feeds them batch
by batch to accumulators, so statistics such as input covariances never hold every activation
of the calibration set in memory at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
    """A batch of model inputs and the machinery to observe the model on them."""

    def __init__(
        self,
        inputs: np.ndarray,
        *,
        batch_size: int = 128,
        provider: str = "cpu",
        progress: ProgressFn | None = None,
    ):
        if inputs.ndim < 2 or len(inputs) == 0:
            raise DataError(f"calibration inputs must be a non-empty batch, got shape {inputs.shape}")
        self.inputs = np.ascontiguousarray(inputs, dtype=np.float32)
        self.batch_size = batch_size
        self.provider = provider
        self.progress = progress

    def __len__(self) -> int:
        return len(self.inputs)

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

    def stream(
        self,
        model: ir.Model,
        value_names: list[str],
        consume: Callable[[dict[str, np.ndarray]], None],
        label: str = "calibrating",
    ) -> None:
        """Run the model batch by batch; call ``consume`` with the named tensors of each batch."""
        sess = self._session_with_outputs(model, value_names)
        input_name = sess.get_inputs()[0].name
        total = len(self.inputs)
        for start in range(0, total, self.batch_size):
            batch = self.inputs[start : start + self.batch_size]
            outputs = sess.run(value_names, {input_name: batch})
            consume(dict(zip(value_names, outputs, strict=True)))
            if self.progress is not None:
                self.progress(label, min(start + self.batch_size, total), total)

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
        inputs = [s.get_inputs()[0].name for s in sessions]
        total = len(self.inputs)
        for start in range(0, total, self.batch_size):
            batch = self.inputs[start : start + self.batch_size]
            got = []
            for sess, input_name, (_, names) in zip(sessions, inputs, (first, second),
                                                    strict=True):
                got.append(dict(zip(names, sess.run(names, {input_name: batch}), strict=True)))
            consume(*got)
            if self.progress is not None:
                self.progress(label, min(start + self.batch_size, total), total)

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
