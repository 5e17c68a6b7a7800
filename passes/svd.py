"""Low-rank factorisation by SVD of Conv, Gemm and MatMul weights.

Two schemes for a k x k Conv, one for a matrix product:

* channel: ``W`` (outputs x C*k*k) ~ ``U_r (U_r^T W)``: a k x k Conv to r channels then a
  1 x 1 Conv back to the outputs (for Gemm/MatMul, two thinner products). With calibration
  data, ``U_r`` are the top eigenvectors of the output covariance ``W Sigma W^T`` (Sigma the
  covariance of the layer's real inputs), which minimises the layer's output error on that data
  rather than the weight error; the bias absorbs the mean of what was cut.
* spatial: a k x 1 Conv to r channels then a 1 x k Conv (Jaderberg et al.'s scheme 2), from
  the SVD of W rearranged as (C*k) x (outputs*k); its output error is measured with the same
  input covariance so the two schemes are compared on equal terms.

Per-layer ranks meet ``ratio`` (the fraction of the model's MACs to keep) with the least total
predicted loss (``budget.allocate``); a layer whose factorised form costs as much as the dense
one stays dense.

With ``speedup`` and a ``LatencyTable`` the budget is time: every candidate (dense, and each
rank of each scheme on the rank grid) is timed in its real context, the layer's real input
shape at the table's batch plus the activation onnxruntime fuses after it, and the whole model
once (T). The chosen forms must fit ``T / speedup - (T - sum of the layers' dense times)``; a
form measured slower than its dense layer is never chosen. ``ratio`` then caps the MACs too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from scipy.linalg.lapack import dpotrf, dpotrs

from compressor.errors import OptionError
from compressor.latency import (
    WHOLE_MODEL_MIN_TIME_S,
    LatencyTable,
    activation_nodes,
    candidate_model,
    filler,
    fused_activation,
    predicted_whole_ms,
    prediction_stats,
)
from compressor.passes.base import LayerRecord, Pass, PassConfig, PassResult
from compressor.passes.budget import EXCLUDED_REASON, Option, allocate
from compressor.passes.calibrate import Calibration, CrossMoments, StageClock
from compressor.passes.graph import (
    ConvAttributes,
    NameScope,
    add_initializer,
    conv_node,
    replace_node,
)
from compressor.passes.linalg import map_per_core
from compressor.passes.lowrank import (
    LinearLayer,
    ReferenceRows,
    Survey,
    gather_cross_moments,
    mean_correction,
    relative_error,
    replace_with_two_stage,
    survey,
)
from compressor.passes.walk import CalibrationWalk

SCHEMES = ("channel", "spatial")
MAX_SPATIAL_RANKS = 24
MIN_ROWS_PER_FEATURE = 4  # calibration rows per fan-in feature needed for the sequential refit
REFIT_RIDGE = 1e-3  # ridge of the refit, relative to the mean input variance


@dataclass(frozen=True)
class SVDConfig(PassConfig):
    """ratio: fraction of the model's MACs to keep (used unless rank or energy is set).
    rank: one rank for every layer. energy: per layer, keep this fraction of the output energy.
    allow_costlier: factorise even where it does not save MACs (for tests of the exact case).
    rank_multiple: ranks are multiples of this (or the full rank): onnxruntime's blocked
    (NCHWc) convolutions work in blocks of 16 channels on AVX-512 (8 on AVX2), so a rank of 8
    saves MACs but not time (measured: a 3x3 conv to 8 channels ran at 5 GMAC/s, to 16 at
    ~18 GMAC/s per core).
    sequential: with calibration data, fit each channel-factorised layer, in graph order, to
    the inputs it sees once the layers before it are compressed (asymmetric reconstruction,
    Zhang et al. 2016), so errors do not pile up through the network.
    speedup: with a latency table, make the model this many times faster by measured time
    (``ratio`` then caps the MACs as well: 1.0 for no cap). exclude: names of layers to leave
    dense (the pipeline rolls back layers measured slower in the final model through it)."""

    ratio: float = 0.5
    rank: int | None = None
    energy: float | None = None
    schemes: tuple[str, ...] = SCHEMES
    allow_costlier: bool = False
    rank_multiple: int = 16
    sequential: bool = True
    max_rows_per_batch: int = 20000
    seed: int = 0
    speedup: float | None = None
    exclude: frozenset[str] = frozenset()

    def __post_init__(self):
        if not 0 < self.ratio <= 1:
            raise OptionError(f"--ratio must be in (0, 1], got {self.ratio}")
        if self.speedup is not None:
            if not self.speedup >= 1:
                raise OptionError(f"--speedup must be >= 1 (how many times faster), "
                                  f"got {self.speedup}")
            if self.rank is not None or self.energy is not None:
                raise OptionError("--speedup chooses the ranks by time: it cannot be combined "
                                  "with --rank or --energy")
        object.__setattr__(self, "exclude", frozenset(self.exclude))
        if self.rank_multiple < 1:
            raise OptionError(f"rank multiple must be >= 1, got {self.rank_multiple}")
        if self.rank is not None and self.rank < 1:
            raise OptionError(f"--rank must be >= 1, got {self.rank}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise OptionError(f"--energy must be in (0, 1], got {self.energy}")
        unknown = set(self.schemes) - set(SCHEMES)
        if unknown or not self.schemes:
            raise OptionError(f"SVD schemes must be among {SCHEMES}, got {self.schemes}")


@dataclass(frozen=True)
class _Choice:
    scheme: str
    rank: int
    sq_error: float  # predicted squared output error, relative to the output energy


def _loss(relative_sq_error: float) -> float:
    # -log of the kept output energy: Zhang et al.'s product-of-energies objective, additive.
    return -math.log(max(1.0 - relative_sq_error, 1e-9))


@dataclass
class _Timing:
    """What the latency allocation decided for one layer."""

    dense_ms: float
    chosen_ms: float
    reason: str | None  # why it stayed dense, when it did


class LowRankSVDPass(Pass):
    """Factorise Conv/Gemm/MatMul layers by (data-aware) SVD to meet a MACs budget, or, with
    ``speedup``, a measured-time budget."""

    name = "svd"
    config_class = SVDConfig

    def __init__(self, config: SVDConfig | None = None, calibration: Calibration | None = None,
                 latency: LatencyTable | None = None):
        super().__init__(config)
        self.calibration = calibration
        self.latency = latency

    def call(self, model: ir.Model) -> PassResult:
        cfg: SVDConfig = self.config
        clock = StageClock()
        sequential = self.calibration is not None and cfg.sequential
        found = survey(model, self.calibration, cfg.max_rows_per_batch, cfg.seed, clock,
                       keep_reference_rows=sequential)
        try:
            return self._call(model, found, clock)
        finally:
            if found.reference_rows is not None:
                found.reference_rows.close()

    def _call(self, model: ir.Model, found: Survey, clock: StageClock) -> PassResult:
        cfg: SVDConfig = self.config
        proto, total_macs, layers, moments = found.proto, found.total_macs, found.layers, found.moments
        records = found.skipped
        notes: list[str] = []
        data_aware = self.calibration is not None
        if not data_aware:
            notes.append("no calibration data: SVD minimises weight error, not output error")

        by_ratio = cfg.rank is None and cfg.energy is None and cfg.speedup is None

        def analyse(layer: LinearLayer) -> _LayerAnalysis:
            m = moments.pop(layer.name, None)  # its covariance lives on in the analysis
            cov, mean = (np.eye(layer.fan_in), None) if m is None else (m.covariance, m.mean)
            del m  # the float32 sums: not held through the decompositions
            analysis = _LayerAnalysis(layer, cov, mean, cfg)
            del cov
            if analysis._spatial is None:
                analysis.cov = None  # only spatial errors read it: memory set by 3 x 3 layers
            else:
                # and in float32 (its sums are float32 products), before the spatial errors
                # factorise it: two float64 copies per worker were ResNet-50's peak
                analysis.cov = analysis.cov.astype(np.float32)
            if by_ratio:
                analysis.options()  # the spatial errors: a d x d factorisation each
            return analysis

        wanted = [layer for layer in layers if layer.name not in cfg.exclude]
        with clock("decompositions"):
            report = None
            if self.calibration is not None and self.calibration.progress is not None:
                def report(done: int, total: int) -> None:
                    self.calibration.progress("decompositions", done, total)
            analyses = dict(zip((layer.name for layer in wanted),
                                map_per_core(analyse, wanted, progress=report), strict=True))

        outside_macs = total_macs - sum(layer.dense_macs for layer in layers)
        fixed_macs = total_macs - sum(a.layer.dense_macs for a in analyses.values())
        timing: dict[str, _Timing] = {}
        latency_stats: dict[str, float | int] = {}
        if cfg.rank is not None or cfg.energy is not None:
            chosen = {name: a.fixed_choice() for name, a in analyses.items()}
        elif cfg.speedup is not None:
            chosen, timing, latency_stats = self._choose_by_latency(proto, analyses, total_macs,
                                                                    notes)
        else:
            budget = cfg.ratio * total_macs - fixed_macs
            multiple = cfg.rank_multiple
            while True:
                for analysis in analyses.values():
                    analysis.multiple = multiple
                with clock("rank options"):
                    allocation = allocate([a.options() for a in analyses.values()], budget)
                if allocation.feasible or multiple == 1:
                    break
                multiple = max(1, multiple // 2)
            if multiple != cfg.rank_multiple and allocation.feasible:
                notes.append(f"ratio {cfg.ratio} needs ranks finer than multiples of "
                             f"{cfg.rank_multiple}: used multiples of {multiple} (slower per MAC)")
            if not allocation.feasible:
                notes.append(
                    f"ratio {cfg.ratio} is not reachable by SVD alone: every layer at its "
                    f"cheapest form keeps {(allocation.macs + fixed_macs) / total_macs:.3f}"
                )
            chosen = {name: o.payload
                      for name, o in zip(analyses, allocation.choices, strict=True)}

        # The options are chosen and cached: only their spatial errors read the covariances
        # (ResNet-50's 3 x 3 layers hold 0.8 GB of them in float64), and only a channel
        # rewrite without a refit the eigenvectors. Free them before the refit's walk.
        for name, analysis in analyses.items():
            analysis.cov = None
            if chosen.get(name) is None or chosen[name].scheme != "channel":
                analysis.eigvecs = None
        sequential = data_aware and cfg.sequential
        to_write = sum(1 for layer in layers if chosen.get(layer.name) is not None)
        # the refits read each layer's inputs in the original and the compressed network from
        # one walk through both, so no prefix of either runs twice
        walk = CalibrationWalk(self.calibration, proto, clock=clock) if sequential else None
        walk_stats = {}
        try:
            self._write(model, layers, analyses, chosen, timing, records, walk, clock,
                        to_write, found.reference_rows)
            if walk is not None:
                walk_stats = {"refit_segments": walk.segments_run,
                              "refit_restarts": walk.restarts,
                              "refit_stored_bytes_peak": walk.stored_bytes_peak}
        finally:
            if walk is not None:
                walk.close()
        macs_after = outside_macs + sum(r.macs_after for r in records if r.macs_before)
        return PassResult(
            model=model,
            modified=any(r.skipped is None for r in records),
            layers=records,
            notes=notes,
            stats={"macs_before": total_macs, "macs_after": macs_after,
                   "ratio_reached": macs_after / total_macs if total_macs else 1.0,
                   "data_aware": data_aware, **latency_stats, **walk_stats,
                   "seconds_by_stage": clock.seconds},
        )

    def _write(self, model: ir.Model, layers: list[LinearLayer],
               analyses: dict[str, _LayerAnalysis], chosen: dict, timing: dict[str, _Timing],
               records: list[LayerRecord], walk: CalibrationWalk | None, clock: StageClock,
               to_write: int, reference_rows: ReferenceRows | None = None) -> None:
        """Rewrite every chosen layer in graph order, refitting it on the walk when there is
        one (the reference side from the survey's ``reference_rows``), and record each
        layer."""
        cfg: SVDConfig = self.config
        names = NameScope(model.graph)
        basis = "calibration" if self.calibration is not None else "weights"
        upstream_changed = False
        written = 0
        for layer in layers:
            if layer.name in cfg.exclude:
                records.append(layer.record(skipped=EXCLUDED_REASON, error=0.0))
                continue
            analysis, choice = analyses[layer.name], chosen[layer.name]
            timed = timing.get(layer.name)
            measured = ({} if timed is None else
                        {"latency_before_ms": timed.dense_ms, "latency_after_ms": timed.chosen_ms})
            if choice is None:
                reason = analysis.dense_reason
                if cfg.rank is None and cfg.energy is None and len(analysis.options()) > 1:
                    reason = "kept dense: the ratio is met with less error in other layers"
                if timed is not None and timed.reason is not None:
                    reason = timed.reason
                records.append(layer.record(skipped=reason, error=0.0, **measured))
                continue
            error = relative_error(choice.sq_error, 1.0)
            # The refit solves a least-squares problem in the layer's fan-in: with fewer
            # samples than a few times that (a Gemm after Flatten sees one row per image) it
            # would fit the calibration set and nothing else.
            enough = self.calibration is not None and (
                len(self.calibration) * layer.positions >= MIN_ROWS_PER_FEATURE * layer.fan_in)
            written += 1
            label = f"refit layer {written}/{to_write}: {layer.name}"
            if walk is not None and upstream_changed and choice.scheme == "channel" and enough:
                paired = gather_cross_moments(walk, model, layer, cfg.max_rows_per_batch,
                                              cfg.seed, label=label,
                                              reference_rows=reference_rows)
                with clock("refit solve"):
                    macs, params, shape_after, detail, error = analysis.apply_asymmetric(
                        model, choice, names, paired)
            else:
                with clock("rewrite"):
                    macs, params, shape_after, detail = analysis.apply(model, choice, names)
                if walk is not None and choice.scheme == "spatial" and enough:
                    error = analysis.refit_spatial(model, walk, label, reference_rows)
                    detail += ", refit"
            upstream_changed = True
            records.append(layer.record(
                shape_after=shape_after, macs_after=macs, params_after=params,
                error=error, error_basis=basis, detail=detail, **measured,
            ))

    def _choose_by_latency(self, proto: onnx.ModelProto, analyses: dict[str, _LayerAnalysis],
                           total_macs: int, notes: list[str]):
        """Ranks by measured time: every candidate of every layer that has one is timed in
        context, the whole model once, and the allocation fits the time budget (and the MACs
        cap of ``ratio`` < 1). Returns the choices, per-layer timings and the pass's stats."""
        cfg: SVDConfig = self.config
        if self.latency is None:
            self.latency = LatencyTable()
        table = self.latency
        hits, misses = table.hits, table.misses
        whole_ms = table.time(proto, min_time_s=WHOLE_MODEL_MIN_TIME_S)
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 18)
        timed = [a for a in analyses.values() if len(a.options()) > 1]
        option_sets = [a.timed_options(table, opset) for a in timed]
        dense_ms = sum(opts[0].cost for opts in option_sets)
        target_ms = whole_ms / cfg.speedup
        budget = target_ms - (whole_ms - dense_ms)
        macs_budget = None
        if cfg.ratio < 1:
            macs_budget = cfg.ratio * total_macs - (
                total_macs - sum(a.layer.dense_macs for a in timed))
        allocation = allocate(option_sets, budget, key="cost", macs_budget=macs_budget)
        predicted_ms = predicted_whole_ms(whole_ms, dense_ms, allocation.cost)
        if predicted_ms > target_ms * (1 + 1e-9):
            notes.append(f"speedup {cfg.speedup:g} not reachable by svd alone: predicted "
                         f"{whole_ms / predicted_ms:.2f}x ({predicted_ms:.3f} ms of "
                         f"{whole_ms:.3f} ms)")
        elif not allocation.feasible:
            kept = (allocation.macs + total_macs - sum(a.layer.dense_macs for a in timed))
            notes.append(f"ratio {cfg.ratio} (the MACs cap beside --speedup) is not reachable "
                         f"together with speedup {cfg.speedup:g} by svd alone: the fastest "
                         f"forms keep {kept / total_macs:.3f} of the MACs")
        chosen = {name: None for name in analyses}
        timing = {}
        for analysis, opts, option, dropped in zip(timed, option_sets, allocation.choices,
                                                   allocation.dropped, strict=True):
            chosen[analysis.layer.name] = option.payload
            reason = None
            if option.payload is None:
                if len(dropped) == len(opts) - 1:
                    fastest = min(o.cost for o in dropped)
                    reason = (f"kept dense: every factorised form measured slower than dense "
                              f"(fastest {fastest:.4f} ms, dense {opts[0].cost:.4f} ms)")
                else:
                    reason = "kept dense: the speedup is met with less error in other layers"
            timing[analysis.layer.name] = _Timing(opts[0].cost, option.value("cost"), reason)
        stats = {
            **prediction_stats(whole_ms, predicted_ms),
            "latency_cache_hits": table.hits - hits,
            "latency_cache_misses": table.misses - misses,
        }
        return chosen, timing, stats


class _LayerAnalysis:
    """The rank/scheme options of one layer and how to apply them."""

    def __init__(self, layer: LinearLayer, cov: np.ndarray, mean: np.ndarray | None,
                 cfg: SVDConfig):
        self.layer = layer
        self.cov = cov
        self.mean = mean
        self.cfg = cfg
        self.multiple = cfg.rank_multiple
        self._options: dict[int, list[Option]] = {}
        w = layer.weight
        self.eigvals, self.eigvecs = _output_eigen(w, cov)
        self.energy = float(self.eigvals.sum())
        self.output_energy = float(np.sum((w @ cov) * w))  # E||W (x - mu)||^2
        self.max_rank = min(w.shape)
        self.dense_reason = "factorised form is not cheaper than dense"
        self._spatial = self._spatial_svd() if "spatial" in cfg.schemes else None
        if "channel" not in cfg.schemes and self._spatial is None:
            self.dense_reason = "spatial SVD applies only to k x k convolutions (k >= 2)"

    # -- options ---------------------------------------------------------------------------
    def _channel_choices(self, ranks: list[int] | None = None) -> list[_Choice]:
        if "channel" not in self.cfg.schemes:
            return []
        tail = np.concatenate([np.cumsum(self.eigvals[::-1])[::-1], [0.0]])
        out = []
        for r in ranks or self._rank_grid(self.max_rank):
            if not self._affordable(self.layer.two_stage_macs(r)):
                break
            rel = tail[r] / self.energy if self.energy > 0 else 0.0
            out.append(_Choice("channel", r, float(rel)))
        return out

    def _spatial_svd(self):
        layer = self.layer
        if layer.kind != "conv" or min(layer.conv.kernel) < 2:
            return None
        o = layer.outputs
        c, kh, kw = layer.original_weight_shape[1:]
        w4 = layer.weight.reshape(o, c, kh, kw)
        a = w4.transpose(1, 2, 0, 3).reshape(c * kh, o * kw)
        u, s, vt = np.linalg.svd(a, full_matrices=False)
        return u, s, vt, (o, c, kh, kw)

    def _spatial_macs(self, rank: int) -> int:
        layer = self.layer
        kh, kw = layer.conv.kernel
        c = layer.original_weight_shape[1]
        h_out, w_out = layer.output_shape[2:]
        w_in = layer.input_shape[3]
        return rank * c * kh * h_out * w_in + layer.outputs * rank * kw * h_out * w_out

    def _spatial_weights(self, rank: int):
        u, s, vt, (o, c, kh, kw) = self._spatial
        root = np.sqrt(s[:rank])
        vertical = (u[:, :rank] * root).T.reshape(rank, c, kh, 1)
        horizontal = (root[:, None] * vt[:rank]).reshape(rank, o, kw).transpose(1, 0, 2)
        horizontal = horizontal.reshape(o, rank, 1, kw)
        composite = np.einsum("orj,rci->ocij", horizontal[:, :, 0, :], vertical[:, :, :, 0])
        return vertical, horizontal, composite.reshape(o, -1)

    def _spatial_choices(self, ranks: list[int] | None = None) -> list[_Choice]:
        if self._spatial is None:
            return []
        ranks = [r for r in ranks or self._rank_grid(len(self._spatial[1]))
                 if self._affordable(self._spatial_macs(r))]
        if len(ranks) > MAX_SPATIAL_RANKS:
            idx = np.unique(np.linspace(0, len(ranks) - 1, MAX_SPATIAL_RANKS).round().astype(int))
            ranks = [ranks[i] for i in idx]
        errors = self._spatial_errors(ranks)
        return [_Choice("spatial", r, sq / self.energy if self.energy > 0 else 0.0)
                for r, sq in zip(ranks, errors, strict=True)]

    def _spatial_errors(self, ranks: list[int]) -> list[float]:
        """tr(D_r Sigma D_r^T) for each rank r, D_r = W - (its spatial rank-r form).

        With Sigma = L L^T, that is ||W L - sum_{i<r} T_i L||^2, T_i the i-th spatial
        component (horizontal_i x vertical_i); T_i L = h_i @ M_i with M_i the vertical filter
        contracted with L, all components in one product. The residual is updated component
        block by block, so the cost is one d x d factorisation plus about (largest rank) x d^2,
        not (number of ranks) x outputs x d^2 (ResNet-50's 3 x 3 convs: 8x less)."""
        if not ranks:
            return []
        factor = _psd_factor(self.cov)
        if factor is None:  # not factorisable even with a ridge: the direct products
            out = []
            for r in ranks:
                delta = self.layer.weight - self._spatial_weights(r)[2]
                out.append(float(np.sum((delta @ self.cov) * delta)))
            return out
        u, s, vt, (o, c, kh, kw) = self._spatial
        top = max(ranks)
        root = np.sqrt(s[:top])
        vertical = (u[:, :top] * root).T.reshape(top, c, kh)  # (R, c, kh)
        horizontal = (root[:, None] * vt[:top]).reshape(top, o, kw)  # (R, o, kw)
        lr = factor.reshape(c, kh, kw, -1)
        residual = self.layer.weight @ factor  # (o, d)
        del factor
        out, done = [], 0
        for r in sorted(set(ranks)):
            # M[i, b, :] = sum_{c, a} vertical[i, c, a] L[(c, a, b), :], for this block of
            # components only: all of them at once were (rank x kw x d) floats beside L
            m = np.einsum("ica,cabd->ibd", vertical[done:r], lr, optimize=True)
            block_h = horizontal[done:r].transpose(1, 0, 2).reshape(o, -1)  # (o, blk * kw)
            residual -= block_h @ m.reshape(-1, m.shape[2])
            done = r
            out.append((r, float(np.sum(residual * residual))))
        by_rank = dict(out)
        return [by_rank[r] for r in ranks]

    def _rank_grid(self, max_rank: int) -> list[int]:
        step = self.multiple
        grid = list(range(step, max_rank, step)) + [max_rank]
        return grid

    def _affordable(self, macs: int) -> bool:
        return self.cfg.allow_costlier or macs < self.layer.dense_macs

    def _macs(self, choice: _Choice) -> int:
        if choice.scheme == "channel":
            return self.layer.two_stage_macs(choice.rank)
        return self._spatial_macs(choice.rank)

    def options(self) -> list[Option]:
        """Dense plus every affordable (scheme, rank), for the current rank multiple."""
        if self.multiple not in self._options:
            opts = [Option(self.layer.dense_macs, 0.0, None)]
            for choice in self._channel_choices() + self._spatial_choices():
                opts.append(Option(self._macs(choice), _loss(choice.sq_error), choice))
            self._options[self.multiple] = opts
        return self._options[self.multiple]

    def timed_options(self, table: LatencyTable, opset: int) -> list[Option]:
        """``options()`` with their measured cost (ms), the dense option first and marked."""
        activation = fused_activation(self.layer.node)
        options = self.options()
        # Side by side (time_all): the allocation compares each rank with dense.
        times = table.time_all([self.timing_model(option.payload, table.context.batch,
                                                  activation, opset) for option in options])
        return [Option(option.macs, option.loss, option.payload, cost=ms,
                       dense=option.payload is None) for option, ms in zip(options, times,
                                                                           strict=True)]

    def timing_model(self, choice: _Choice | None, batch: int, activation: ir.Node | None,
                     opset: int) -> onnx.ModelProto:
        """The layer alone, dense (``choice`` None) or factorised as ``apply`` writes it, on
        its real input shape at ``batch``, followed by the activation onnxruntime fuses with
        it (after the second stage, for a factorised form). Weights are fillers: the time
        does not depend on their values."""
        layer = self.layer
        x_shape = (batch, *layer.input_shape[1:])
        inits: dict[str, np.ndarray] = {}

        def weight(name: str, shape) -> str:
            inits[name] = filler(shape)
            return name

        has_bias = layer.bias is not None or self.mean is not None
        o, fan_in = layer.outputs, layer.fan_in
        if choice is None:
            if layer.kind == "conv":
                inputs = ["x", weight("w", layer.original_weight_shape)]
                if layer.bias is not None:
                    inputs.append(weight("b", (o,)))
                nodes = [_conv_proto(inputs, "z", layer.conv)]
            elif layer.kind == "gemm":
                node = ir.serde.serialize_node(layer.node)
                inputs = ["x", weight("w", layer.original_weight_shape)]
                if len(layer.node.inputs) > 2 and layer.node.inputs[2] is not None:
                    inputs.append(weight("b", layer.node.inputs[2].const_value.shape))
                del node.input[:]
                del node.output[:]
                node.input.extend(inputs)
                node.output.append("z")
                node.name = "dense"
                nodes = [node]
            else:
                nodes = [onnx.helper.make_node(
                    "MatMul", ["x", weight("w", layer.original_weight_shape)], ["z"])]
        elif choice.scheme == "channel":
            r = choice.rank
            bias = [weight("b", (o,))] if has_bias else []
            if layer.kind == "conv":
                kh, kw = layer.conv.kernel
                one = ConvAttributes((1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1)
                nodes = [
                    _conv_proto(["x", weight("w1", (r, fan_in // (kh * kw), kh, kw))], "h",
                                layer.conv),
                    _conv_proto(["h", weight("w2", (o, r, 1, 1)), *bias], "z", one),
                ]
            elif layer.kind == "gemm":
                nodes = [
                    onnx.helper.make_node("Gemm", ["x", weight("w1", (r, fan_in))], ["h"],
                                          transB=1),
                    onnx.helper.make_node("Gemm", ["h", weight("w2", (o, r)), *bias], ["z"],
                                          transB=1),
                ]
            else:
                nodes = [
                    onnx.helper.make_node("MatMul", ["x", weight("w1", (fan_in, r))], ["h"]),
                    onnx.helper.make_node("MatMul", ["h", weight("w2", (r, o))],
                                          ["u" if bias else "z"]),
                ]
                if bias:
                    nodes.append(onnx.helper.make_node("Add", ["u", *bias], ["z"]))
        else:
            r = choice.rank
            c, kh, kw = layer.original_weight_shape[1:]
            v_attrs, h_attrs = _spatial_attributes(layer.conv)
            nodes = [
                _conv_proto(["x", weight("wv", (r, c, kh, 1))], "h", v_attrs),
                _conv_proto(["h", weight("wh", (o, r, 1, kw)), weight("b", (o,))], "z",
                            h_attrs),
            ]
        act, act_inits, out = activation_nodes(activation, "z", "y")
        inits.update(act_inits)
        return candidate_model(nodes + act, {"x": (x_shape, np.float32)},
                               {out: (None, np.float32)}, inits, opset)

    def fixed_choice(self) -> _Choice | None:
        """The choice under --rank or --energy (the cheapest that satisfies it)."""
        if self.cfg.rank is not None:
            choices = self._channel_choices([min(self.cfg.rank, self._scheme_max("channel"))])
            choices += self._spatial_choices([min(self.cfg.rank, self._scheme_max("spatial"))])
            if "channel" in self.cfg.schemes or self._spatial is not None:
                self.dense_reason = f"rank {self.cfg.rank} does not reduce this layer's MACs"
            return min(choices, key=lambda c: c.sq_error, default=None)
        target = 1.0 - self.cfg.energy
        choices = self._channel_choices() + self._spatial_choices()
        choices = [c for c in choices if c.sq_error <= target + 1e-12]
        self.dense_reason = f"keeping {self.cfg.energy:.3g} of the output energy needs the dense form"
        return min(choices, key=self._macs, default=None)

    def _scheme_max(self, scheme: str) -> int:
        if scheme == "channel" or self._spatial is None:
            return self.max_rank
        return len(self._spatial[1])

    # -- rewriting -------------------------------------------------------------------------
    def apply_asymmetric(self, model: ir.Model, choice: _Choice, names: NameScope,
                         paired: CrossMoments):
        """Channel factorisation fitted to the compressed network's inputs: the rank-r W'
        minimising E||W (x - mu) - W' (x_hat - mu_hat)||^2 (reduced-rank regression)."""
        layer, r = self.layer, choice.rank
        mean_y, cross_y = paired.output_statistics(layer.weight)  # Cov(W x, x_hat)
        cov_hat = paired.covariance_hat
        ridge = REFIT_RIDGE * max(np.trace(cov_hat) / len(cov_hat), 1e-12)
        w_ls = _solve_ridged(cov_hat, ridge, cross_y.T).T
        basis = _output_eigen(w_ls, cov_hat)[1][:, :r]
        project = basis.T @ w_ls
        approx = basis @ project
        bias = (np.zeros(layer.outputs) if layer.bias is None else layer.bias.copy())
        bias += mean_y - approx @ paired.mean_hat
        replace_with_two_stage(model, layer, project, basis, bias, names, f"svd{r}")
        energy = self.output_energy
        sq = (energy - 2 * float(np.sum(approx * cross_y))
              + float(np.sum((approx @ cov_hat) * approx)))
        error = relative_error(sq, energy)
        shape_after = (r, *layer.original_weight_shape[1:])
        return (layer.two_stage_macs(r), layer.two_stage_params(r), shape_after,
                f"channel rank {r}, refit", error)

    def apply(self, model: ir.Model, choice: _Choice, names: NameScope):
        layer = self.layer
        r = choice.rank
        if choice.scheme == "channel":
            basis = self.eigvecs[:, :r]
            project = basis.T @ layer.weight
            approx = basis @ project
            bias = mean_correction(layer, approx, self.mean)
            replace_with_two_stage(model, layer, project, basis, bias, names, f"svd{r}")
            shape_after = (r, *layer.original_weight_shape[1:])
            detail = f"channel rank {r}"
            return layer.two_stage_macs(r), layer.two_stage_params(r), shape_after, detail
        vertical, horizontal, composite = self._spatial_weights(r)
        bias = mean_correction(layer, composite, self.mean)
        self._replace_spatial(model, vertical, horizontal, bias, names, r)
        params = vertical.size + horizontal.size + layer.outputs
        return self._spatial_macs(r), params, tuple(vertical.shape), f"spatial rank {r}"

    def refit_spatial(self, model: ir.Model, walk: CalibrationWalk,
                      label: str | None = None,
                      reference_rows: ReferenceRows | None = None) -> float:
        """Keep the vertical k x 1 stage; solve the horizontal 1 x k stage and the bias by
        least squares so the layer's output on the compressed network's inputs matches the
        original layer's output on the original inputs. Returns the relative output error."""
        layer, cfg = self.layer, self.cfg
        hidden, h_attrs, weight_value, bias_value = self._spatial_nodes
        paired = gather_cross_moments(walk, model, layer, cfg.max_rows_per_batch, cfg.seed,
                                      current_value=hidden, current_conv=h_attrs, label=label,
                                      reference_rows=reference_rows)
        cov_z = paired.covariance_hat
        mean_y, cross_yz = paired.output_statistics(layer.weight)  # Cov(y, z) with y = W x
        ridge = REFIT_RIDGE * max(np.trace(cov_z) / len(cov_z), 1e-12)
        h = _solve_ridged(cov_z, ridge, cross_yz.T).T
        bias = (np.zeros(layer.outputs) if layer.bias is None else layer.bias.copy())
        bias += mean_y - h @ paired.mean_hat
        weight_value.const_value = ir.tensor(
            h.reshape(weight_value.const_value.shape).astype(np.float32), name=weight_value.name)
        bias_value.const_value = ir.tensor(bias.astype(np.float32), name=bias_value.name)
        energy = self.output_energy
        sq = energy - 2 * float(np.sum(h * cross_yz)) + float(np.sum((h @ cov_z) * h))
        return relative_error(sq, energy)

    def _replace_spatial(self, model, vertical, horizontal, bias, names: NameScope, rank: int):
        layer = self.layer
        graph = model.graph
        base = names(f"{layer.name}_svd{rank}")
        v_attrs, h_attrs = _spatial_attributes(layer.conv)
        wv = add_initializer(graph, names(base + "_vertical"), vertical)
        first = conv_node(layer.node.inputs[0], wv, None, v_attrs, names(base + "_vertical"))
        wh = add_initializer(graph, names(base + "_horizontal"), horizontal)
        if bias is None:
            bias = np.zeros(layer.outputs)
        b = add_initializer(graph, names(base + "_bias"), bias)
        second = conv_node(first.outputs[0], wh, b, h_attrs, names(base + "_horizontal"))
        first.outputs[0].name = names(base + "_hidden")
        replace_node(graph, layer.node, [first, second])
        self._spatial_nodes = (first.outputs[0].name, h_attrs, wh, b)


def _output_eigen(w: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, >= 0) and eigenvectors of the output covariance W cov W^T:
    min(outputs, fan-in) of them, the most a rank can use.

    With more outputs than inputs (ResNet-50's expanding 1 x 1 convs: 2048 x 512) the
    outputs-side matrix has rank at most the fan-in: the left singular vectors of W L
    (L L^T = cov) give the same from an outputs x fan-in SVD, 16x less work there than the
    2048 x 2048 eigendecomposition."""
    o, d = w.shape
    factor = _psd_factor(cov) if o > d else None
    if factor is not None:
        u, singular, _ = np.linalg.svd(w @ factor, full_matrices=False)
        return singular * singular, u
    output_cov = w @ cov @ w.T
    eigvals, eigvecs = np.linalg.eigh((output_cov + output_cov.T) / 2)
    order = np.argsort(eigvals)[::-1]
    return np.clip(eigvals[order], 0.0, None), eigvecs[:, order]


def _solve_ridged(cov: np.ndarray, ridge: float, b: np.ndarray) -> np.ndarray:
    """(cov + ridge I)^-1 b for a covariance: by Cholesky (``_ridged_cholesky``), or LU when
    it is not numerically definite. ``cov + ridge * np.eye(d)`` and a factor beside it were
    four d x d matrices at once: 0.7 GB for ResNet-50's 4608-wide refits, the peak of a run
    at 512 samples."""
    factor = _ridged_cholesky(cov, ridge)
    if factor is not None:
        x, info = dpotrs(factor, np.asarray(b, dtype=np.float64), lower=1)
        if info == 0:
            return x
    del factor
    a = np.array(cov, dtype=np.float64)
    a[np.diag_indices_from(a)] += ridge
    return np.linalg.solve(a, b)


def _ridged_cholesky(cov: np.ndarray, ridge: float) -> np.ndarray | None:
    """L (lower, zeros above) with L L^T = cov + ridge I, or None when that is not definite.

    LAPACK's dpotrf (OpenBLAS, blocked) factorises the one float64 copy in place: 2.4x
    torch's Cholesky on a 4608 x 4608 covariance, and no second d x d matrix (the peak of
    ResNet-50's decompositions, two layers at a time)."""
    matrix = np.array(cov, dtype=np.float64, order="F")
    matrix[np.diag_indices_from(matrix)] += ridge
    factor, info = dpotrf(matrix, lower=1, clean=1, overwrite_a=1)
    return factor if info == 0 else None


def _psd_factor(cov: np.ndarray) -> np.ndarray | None:
    """L with L L^T = cov (+ a ridge of 1e-10 of its mean variance, raised while Cholesky
    fails on a singular covariance); None when even 1e-4 does not make it definite."""
    scale = max(float(np.trace(cov)) / max(len(cov), 1), 1e-300)
    for ridge in (1e-10, 1e-8, 1e-6, 1e-4):
        factor = _ridged_cholesky(cov, ridge * scale)
        if factor is not None:
            return factor
    return None


def _spatial_attributes(attrs: ConvAttributes) -> tuple[ConvAttributes, ConvAttributes]:
    """The k x 1 and 1 x k convolutions of spatial SVD, splitting strides, pads, dilations."""
    top, left, bottom, right = attrs.pads
    vertical = ConvAttributes((attrs.kernel[0], 1), (attrs.strides[0], 1), (top, 0, bottom, 0),
                              (attrs.dilations[0], 1), 1)
    horizontal = ConvAttributes((1, attrs.kernel[1]), (1, attrs.strides[1]),
                                (0, left, 0, right), (1, attrs.dilations[1]), 1)
    return vertical, horizontal


def _conv_proto(inputs: list[str], output: str, attrs: ConvAttributes) -> onnx.NodeProto:
    return onnx.helper.make_node(
        "Conv", inputs, [output], kernel_shape=list(attrs.kernel), strides=list(attrs.strides),
        pads=list(attrs.pads), dilations=list(attrs.dilations), group=attrs.group)
