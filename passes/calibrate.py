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
import torch.nn.functional as F

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

    def _session_with_outputs(self, model: ir.Model, names: Iterable[str]):
        proto = ir.serde.serialize_model(model)
        proto = onnx.ModelProto.FromString(proto.SerializeToString())  # never touch the caller's
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


def conv_patches(x: np.ndarray, attrs: ConvAttributes) -> np.ndarray:
    """im2col rows of a 2-D Conv input: (N * out positions, C * kh * kw), channel-major like
    the flattened ONNX weight, so ``patches @ W.reshape(M, -1).T`` is the convolution."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    top, left, bottom, right = attrs.pads
    if any(attrs.pads):
        t = F.pad(t, (left, right, top, bottom))
    cols = F.unfold(t, attrs.kernel, dilation=attrs.dilations, stride=attrs.strides)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]).numpy()


def feature_rows(x: np.ndarray) -> np.ndarray:
    """Rows of a Gemm/MatMul input: everything but the last axis is a sample axis."""
    return x.reshape(-1, x.shape[-1])


def subsample_rows(rows: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``limit`` rows, drawn without replacement (for large im2col matrices)."""
    if rows.shape[0] <= limit:
        return rows
    return rows[rng.choice(rows.shape[0], size=limit, replace=False)]
