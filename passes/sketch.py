"""Tensor sketching of Conv kernels and matrix-product weights (the CNN-SLIDE/MILF report).

For a layer ``y = W x + b`` with W of shape (outputs o, fan-in d), draw s random sign matrices
``R_i`` (o x k, entries +-1/sqrt(k), seeded) and keep the sketches ``S_i = R_i^T W`` (k x d).
Since E[R_i R_i^T] = I, ``W ~ (1/s) sum_i R_i S_i``. Exported with standard ONNX ops: a Conv
with s*k filters (the stacked sketches, original kernel) then a 1 x 1 Conv whose weight is the
averaged sign matrices ``[R_1 ... R_s] / s`` (for Gemm/MatMul, two products).

Data-free this is the report's unbiased estimator. With calibration data the lift is refitted
by least squares on the real inputs, ``L = W Sigma S^T (S Sigma S^T)^-1``, and the bias
absorbs the mean: the same random sketch, the best lift for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from compressor.errors import OptionError
from compressor.passes.base import Pass, PassConfig, PassResult
from compressor.passes.calibrate import Calibration
from compressor.passes.graph import NameScope
from compressor.passes.lowrank import (
    LinearLayer,
    mean_correction,
    relative_error,
    replace_with_two_stage,
    survey,
)


@dataclass(frozen=True)
class SketchConfig(PassConfig):
    """ratio: fraction of the model's MACs to keep (chooses k per layer unless ``rows`` is set).
    sketches: s, the number of sketches averaged. rows: k, rows per sketch, for every layer.
    refit: with calibration data, solve the lift by least squares instead of averaging signs."""

    ratio: float = 0.5
    sketches: int = 2
    rows: int | None = None
    refit: bool = True
    seed: int = 0
    max_rows_per_batch: int = 20000

    def __post_init__(self):
        if not 0 < self.ratio <= 1:
            raise OptionError(f"--ratio must be in (0, 1], got {self.ratio}")
        if self.sketches < 1:
            raise OptionError(f"--sketches must be >= 1, got {self.sketches}")
        if self.rows is not None and self.rows < 1:
            raise OptionError(f"--sketch-rows must be >= 1, got {self.rows}")


def sign_matrices(outputs: int, rows: int, sketches: int, seed: int) -> np.ndarray:
    """s random sign matrices (s, o, k), entries +-1/sqrt(k)."""
    rng = np.random.default_rng(seed)
    signs = rng.integers(0, 2, size=(sketches, outputs, rows)) * 2.0 - 1.0
    return signs / math.sqrt(rows)


class TensorSketchPass(Pass):
    """Replace Conv/Gemm/MatMul weights by averaged random sketches."""

    name = "sketch"
    config_class = SketchConfig

    def __init__(self, config: SketchConfig | None = None, calibration: Calibration | None = None):
        super().__init__(config)
        self.calibration = calibration

    def _rows_for(self, layer: LinearLayer, fraction: float) -> int:
        """Largest k whose two-stage cost stays within ``fraction`` of the layer's MACs."""
        s = self.config.sketches
        per_rank = layer.two_stage_macs(1)
        return int(fraction * layer.dense_macs // (per_rank * s))

    def call(self, model: ir.Model) -> PassResult:
        cfg: SketchConfig = self.config
        found = survey(model, self.calibration, cfg.max_rows_per_batch, cfg.seed)
        total_macs, layers, moments = found.total_macs, found.layers, found.moments
        records = found.skipped
        notes: list[str] = []
        refit = cfg.refit and self.calibration is not None
        if self.calibration is None:
            notes.append("no calibration data: data-free sketch (signs averaged, no refit)")
        rows = self._choose_rows(layers, total_macs)
        names = NameScope(model.graph)
        for i, layer in enumerate(layers):
            k = rows[layer.name]
            if k < 1 or (layer.two_stage_macs(k * cfg.sketches) >= layer.dense_macs):
                records.append(layer.record(
                    skipped="sketching does not reduce this layer's MACs", error=0.0))
                continue
            signs = sign_matrices(layer.outputs, k, cfg.sketches, cfg.seed + i)
            project = np.concatenate([r.T @ layer.weight for r in signs], axis=0)  # (s*k, d)
            lift = np.concatenate(list(signs), axis=1) / cfg.sketches  # (o, s*k)
            m = moments.get(layer.name)
            cov = m.covariance if m is not None else None
            if refit and cov is not None:
                gram = project @ cov @ project.T
                ridge = 1e-6 * np.trace(gram) / gram.shape[0] + 1e-12
                lift = np.linalg.solve(gram + ridge * np.eye(gram.shape[0]),
                                       project @ cov @ layer.weight.T).T
            approx = lift @ project
            bias = mean_correction(layer, approx, m.mean if m is not None else None)
            delta = layer.weight - approx
            if cov is not None:
                energy = float(np.sum((layer.weight @ cov) * layer.weight))
                sq = float(np.sum((delta @ cov) * delta))
            else:
                energy, sq = float(np.sum(layer.weight**2)), float(np.sum(delta**2))
            rank = k * cfg.sketches
            replace_with_two_stage(model, layer, project, lift, bias, names, f"sketch{rank}")
            records.append(layer.record(
                shape_after=(rank, *layer.original_weight_shape[1:]),
                macs_after=layer.two_stage_macs(rank),
                params_after=layer.two_stage_params(rank),
                error=relative_error(sq, energy),
                error_basis="calibration" if cov is not None else "weights",
                detail=f"{cfg.sketches} sketches x {k} rows" + (", lift refit" if refit else ""),
            ))
        macs_after = total_macs - sum(r.macs_before - r.macs_after for r in records)
        return PassResult(
            model=model,
            modified=any(r.skipped is None for r in records),
            layers=records,
            notes=notes,
            stats={"macs_before": total_macs, "macs_after": macs_after,
                   "ratio_reached": macs_after / total_macs if total_macs else 1.0,
                   "data_aware": refit},
        )

    def _choose_rows(self, layers: list[LinearLayer], total_macs: int) -> dict[str, int]:
        """k per layer: fixed by config, or one per-layer MACs fraction found by bisection so
        the whole model meets ``ratio``."""
        cfg: SketchConfig = self.config
        if cfg.rows is not None:
            return {layer.name: cfg.rows for layer in layers}

        def plan(fraction: float) -> tuple[dict[str, int], int]:
            rows, macs = {}, total_macs
            for layer in layers:
                k = self._rows_for(layer, fraction)
                rows[layer.name] = k
                if k >= 1 and layer.two_stage_macs(k * cfg.sketches) < layer.dense_macs:
                    macs -= layer.dense_macs - layer.two_stage_macs(k * cfg.sketches)
            return rows, macs

        budget = cfg.ratio * total_macs
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            if plan(mid)[1] <= budget:
                lo = mid
            else:
                hi = mid
        return plan(lo)[0]
