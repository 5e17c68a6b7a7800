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
from compressor.passes.budget import Option, allocate
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
    rank_multiple: int = 16
    max_rows_per_batch: int = 20000

    def __post_init__(self):
        if not 0 < self.ratio <= 1:
            raise OptionError(f"--ratio must be in (0, 1], got {self.ratio}")
        if self.sketches < 1:
            raise OptionError(f"--sketches must be >= 1, got {self.sketches}")
        if self.rows is not None and self.rows < 1:
            raise OptionError(f"--sketch-rows must be >= 1, got {self.rows}")


MAX_CANDIDATES = 24  # sketch sizes evaluated per layer
KEPT_DENSE = "kept dense: the ratio is met with less error in other layers"


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

    def call(self, model: ir.Model) -> PassResult:
        cfg: SketchConfig = self.config
        found = survey(model, self.calibration, cfg.max_rows_per_batch, cfg.seed)
        total_macs, layers, moments = found.total_macs, found.layers, found.moments
        records = found.skipped
        notes: list[str] = []
        refit = cfg.refit and self.calibration is not None
        if self.calibration is None:
            notes.append("no calibration data: data-free sketch (signs averaged, no refit)")
        sketches = [
            _LayerSketch(layer, cfg, cfg.seed + i, moments.get(layer.name), refit)
            for i, layer in enumerate(layers)
        ]
        rows = self._choose_rows(sketches, total_macs, notes)
        names = NameScope(model.graph)
        for sketch, k in zip(sketches, rows, strict=True):
            layer = sketch.layer
            if k is None:
                reason = (KEPT_DENSE if sketch.affordable(1)
                          else "sketching does not reduce this layer's MACs")
                records.append(layer.record(skipped=reason, error=0.0))
                continue
            project, lift, sq, energy = sketch.solve(k)
            m = sketch.moments
            bias = mean_correction(layer, lift @ project, m.mean if m is not None else None)
            rank = k * cfg.sketches
            replace_with_two_stage(model, layer, project, lift, bias, names, f"sketch{rank}")
            records.append(layer.record(
                shape_after=(rank, *layer.original_weight_shape[1:]),
                macs_after=layer.two_stage_macs(rank),
                params_after=layer.two_stage_params(rank),
                error=relative_error(sq, energy),
                error_basis="calibration" if m is not None else "weights",
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

    def _choose_rows(self, sketches: list[_LayerSketch], total_macs: int,
                     notes: list[str]) -> list[int | None]:
        """k per layer (None: stays dense): fixed by config, or the ks that meet ``ratio``
        with the least predicted output error (``budget.allocate`` over a grid of k)."""
        cfg: SketchConfig = self.config
        if cfg.rows is not None:
            return [cfg.rows if sk.affordable(cfg.rows) else None for sk in sketches]
        fixed = total_macs - sum(sk.layer.dense_macs for sk in sketches)
        budget = cfg.ratio * total_macs - fixed
        step = max(1, cfg.rank_multiple // cfg.sketches)
        while True:
            options = [sk.options(step) for sk in sketches]
            allocation = allocate(options, budget)
            if allocation.feasible or step == 1:
                break
            step = max(1, step // 2)
        if not allocation.feasible:
            notes.append(f"ratio {cfg.ratio} is not reachable by sketching: the cheapest "
                         f"sketches keep {(allocation.macs + fixed) / total_macs:.3f}")
        return [o.payload for o in allocation.choices]


class _LayerSketch:
    """One layer's sketches: for a given k, the (seeded) sketch, its lift and its error."""

    def __init__(self, layer: LinearLayer, cfg: SketchConfig, seed: int, moments, refit: bool):
        self.layer, self.cfg, self.seed, self.moments, self.refit = layer, cfg, seed, moments, refit
        self.cov = moments.covariance if moments is not None else None
        w = layer.weight
        self.energy = (float(np.sum((w @ self.cov) * w)) if self.cov is not None
                       else float(np.sum(w**2)))

    def affordable(self, k: int) -> bool:
        return k >= 1 and self.layer.two_stage_macs(k * self.cfg.sketches) < self.layer.dense_macs

    def solve(self, k: int):
        """project (s*k, d), lift (o, s*k), squared error and energy of the approximation."""
        cfg, layer, w = self.cfg, self.layer, self.layer.weight
        signs = sign_matrices(layer.outputs, k, cfg.sketches, self.seed)
        project = np.concatenate([r.T @ w for r in signs], axis=0)
        lift = np.concatenate(list(signs), axis=1) / cfg.sketches
        if self.refit and self.cov is not None:
            gram = project @ self.cov @ project.T
            ridge = 1e-6 * np.trace(gram) / gram.shape[0] + 1e-12
            lift = np.linalg.solve(gram + ridge * np.eye(gram.shape[0]),
                                   project @ self.cov @ w.T).T
        delta = w - lift @ project
        sq = (float(np.sum((delta @ self.cov) * delta)) if self.cov is not None
              else float(np.sum(delta**2)))
        return project, lift, sq, self.energy

    def options(self, step: int) -> list[Option]:
        opts = [Option(self.layer.dense_macs, 0.0, None)]
        ks = [k for k in range(step, self.layer.outputs + 1, step) if self.affordable(k)]
        if len(ks) > MAX_CANDIDATES:
            idx = np.unique(np.linspace(0, len(ks) - 1, MAX_CANDIDATES).round().astype(int))
            ks = [ks[i] for i in idx]
        for k in ks:
            sq = self.solve(k)[2]
            rel = sq / self.energy if self.energy > 0 else 0.0
            loss = -math.log(max(1.0 - rel, 1e-9)) if rel < 1 else 30.0 + rel
            opts.append(Option(self.layer.two_stage_macs(k * self.cfg.sketches), loss, k))
        return opts
