"""LSH merging of neurons and filters (the Hashed Neural Networks idea, on the ONNX graph).

Each channel group's producing parameters (every filter or Gemm row writing the channel, its
bias, BatchNorm and depthwise entries) are hashed by SimHash: ``bits`` signed random
projections per table, ``tables`` tables, seeded. Channels sharing a bucket in any table are
candidates; walking the channels from the most active down, each unassigned one starts a
cluster and pulls in the unassigned candidates whose cosine similarity reaches ``threshold``
(so buckets are split where members are not similar enough). With ``asymmetric`` the tables
hold Shrivastava & Li's Sign-ALSH transform of the filters (norms appended) and each channel
queries them with its own direction, so candidates favour large inner products (MIPS) rather
than angle alone.

Each cluster becomes one channel: its producing parameters are the members' average weighted
by their mean activation on the calibration data, and each consumer's input columns of the
members are summed into the representative's (exact when the members are identical). With
calibration data the consumers are then refitted by least squares (``refit``; see
``prune.fit_to_original``). ``ratio`` picks ``bits``, ``tables`` and ``threshold``: the
highest threshold that meets the MACs budget, over a small grid of bits and tables.

The clustering loop runs in Cython (``_simhash.pyx``, built on first use); the numpy
reference with the same semantics is the fallback and the tests' oracle.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx_ir as ir

from compressor.errors import OptionError
from compressor.passes.base import Pass, PassConfig, PassResult
from compressor.passes.calibrate import Calibration
from compressor.passes.dependency import ChannelGroup, ChannelTransform
from compressor.passes.importance import activation_means, channel_features
from compressor.passes.prune import check_common, finish, min_channels, prepare

BITS_GRID = (4, 8, 12, 16)
TABLES_GRID = (2, 4, 8)
ALSH_TERMS = 3  # Sign-ALSH: m = 3 appended norm powers
ALSH_MAX_NORM = 0.75  # U: every data vector is scaled to norm <= U < 1
KERNELS = ("auto", "cython", "numpy")


@dataclass(frozen=True)
class LSHConfig(PassConfig):
    """ratio: fraction of the model's MACs to keep. bits (K), tables (L), threshold (cosine
    similarity a member needs to join a cluster): chosen to meet the ratio when None.
    asymmetric: Sign-ALSH (maximum inner product) candidates. refit: with calibration data,
    least-squares refit of the layers reading merged channels (else only their bias).
    min_channels_fraction: no group keeps fewer clusters than this fraction of its channels.
    kernel: ``cython``, ``numpy`` or ``auto`` (Cython when it builds)."""

    ratio: float = 0.5
    bits: int | None = None
    tables: int | None = None
    threshold: float | None = None
    asymmetric: bool = False
    refit: bool = True
    min_channels_fraction: float = 0.1
    ridge: float = 0.003
    max_rows_per_batch: int = 8192
    kernel: str = "auto"
    seed: int = 0

    def __post_init__(self):
        check_common(self.ratio, self.min_channels_fraction, 1)
        if self.bits is not None and not 1 <= self.bits <= 64:
            raise OptionError(f"--lsh-bits must be in [1, 64], got {self.bits}")
        if self.tables is not None and self.tables < 1:
            raise OptionError(f"--lsh-tables must be >= 1, got {self.tables}")
        if self.threshold is not None and not -1 <= self.threshold <= 1:
            raise OptionError(f"LSH threshold must be in [-1, 1], got {self.threshold}")
        if self.kernel not in KERNELS:
            raise OptionError(f"kernel must be one of {KERNELS}, got '{self.kernel}'")


# ---------------------------------------------------------------------------- hashing


class SimHash:
    """Signed random projections: ``tables`` tables of ``bits`` bits over ``dim``-vectors."""

    def __init__(self, bits: int, tables: int, dim: int, seed: int = 0):
        if not 1 <= bits <= 64:
            raise OptionError(f"SimHash bits must be in [1, 64], got {bits}")
        rng = np.random.default_rng(seed)
        self.bits, self.tables = bits, tables
        self.projections = rng.standard_normal((tables * bits, dim))

    def codes(self, vectors: np.ndarray) -> np.ndarray:
        """(tables, n) uint64 bucket codes of the rows of ``vectors``."""
        signs = (np.asarray(vectors, dtype=np.float64) @ self.projections.T) > 0
        signs = signs.reshape(len(vectors), self.tables, self.bits).transpose(1, 0, 2)
        weights = np.left_shift(np.uint64(1), np.arange(self.bits, dtype=np.uint64))
        return (signs.astype(np.uint64) * weights).sum(axis=2, dtype=np.uint64)


def sign_alsh(vectors: np.ndarray, terms: int = ALSH_TERMS,
              max_norm: float = ALSH_MAX_NORM) -> tuple[np.ndarray, np.ndarray]:
    """Shrivastava & Li's Sign-ALSH: data ``P(x) = [x U/M; 1/2 - |x'|^2; ...; 1/2 - |x'|^(2^m)]``
    and queries ``Q(q) = [q/|q|; 0; ...; 0]``, so that the sign-projection collision
    probability grows with the inner product ``q . x``."""
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    scaled = vectors * (max_norm / max(norms.max(initial=0.0), 1e-30))
    sq = np.square(np.linalg.norm(scaled, axis=1))
    powers = [0.5 - sq ** (2**i) for i in range(terms)]
    data = np.concatenate([scaled, np.stack(powers, axis=1)], axis=1)
    unit = vectors / np.maximum(norms, 1e-30)[:, None]
    queries = np.concatenate([unit, np.zeros((len(vectors), terms))], axis=1)
    return data, queries


@dataclass
class Tables:
    """One group's hash tables: codes sorted per table, and each channel's query codes."""

    sorted_codes: np.ndarray  # (tables, n) uint64
    sorted_index: np.ndarray  # (tables, n) int64
    query_codes: np.ndarray  # (tables, n) uint64


def build_tables(vectors: np.ndarray, bits: int, tables: int, seed: int,
                 asymmetric: bool = False) -> Tables:
    data, queries = sign_alsh(vectors) if asymmetric else (vectors, vectors)
    hasher = SimHash(bits, tables, data.shape[1], seed)
    codes = hasher.codes(data)
    query = codes if not asymmetric else hasher.codes(queries)
    index = np.argsort(codes, axis=1, kind="stable").astype(np.int64)
    return Tables(np.ascontiguousarray(np.take_along_axis(codes, index, axis=1)),
                  np.ascontiguousarray(index), np.ascontiguousarray(query))


def greedy_cluster_numpy(tables: Tables, unit: np.ndarray, order: np.ndarray,
                         threshold: float, max_merges: int) -> tuple[np.ndarray, int]:
    """Reference clustering: the semantics of ``_simhash.greedy_cluster``."""
    n = len(unit)
    labels = np.full(n, -1, dtype=np.int64)
    clusters = merges = comparisons = 0
    for i in order:
        if labels[i] >= 0:
            continue
        labels[i] = clusters
        clusters += 1
        for t in range(len(tables.sorted_codes)):
            if merges >= max_merges:
                break
            key = tables.query_codes[t, i]
            lo = np.searchsorted(tables.sorted_codes[t], key, side="left")
            hi = np.searchsorted(tables.sorted_codes[t], key, side="right")
            candidates = tables.sorted_index[t, lo:hi]
            candidates = candidates[labels[candidates] < 0]
            if not len(candidates):
                continue
            similar = unit[candidates] @ unit[i] >= threshold
            comparisons += len(candidates)
            hits = candidates[similar][: max_merges - merges]
            labels[hits] = labels[i]
            merges += len(hits)
    return labels, comparisons


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "compressor" / "pyxbld"


@functools.cache
def cython_kernel() -> ModuleType | None:
    """The compiled ``_simhash`` module: prebuilt, or built now with pyximport (cached in
    ``~/.cache/compressor``); None when no compiler is at hand."""
    name = "compressor.passes._simhash"
    try:
        return importlib.import_module(name)
    except ImportError:
        pass
    try:
        import pyximport

        importers = pyximport.install(build_dir=str(_cache_dir()), language_level=3,
                                      inplace=False)
        try:
            return importlib.import_module(name)
        finally:
            pyximport.uninstall(*importers)
    except Exception:  # noqa: BLE001 - no compiler, no Cython: the numpy path still works
        return None


def greedy_cluster(tables: Tables, unit: np.ndarray, order: np.ndarray, threshold: float,
                   max_merges: int, kernel: str = "auto") -> tuple[np.ndarray, int]:
    """Cluster labels by the greedy LSH walk, with the Cython kernel when available."""
    module = cython_kernel() if kernel in ("auto", "cython") else None
    if module is None:
        if kernel == "cython":
            raise OptionError("the Cython LSH kernel could not be built (no C compiler?)")
        return greedy_cluster_numpy(tables, unit, order, threshold, max_merges)
    return module.greedy_cluster(tables.sorted_codes, tables.sorted_index, tables.query_codes,
                                 np.ascontiguousarray(unit, dtype=np.float64),
                                 np.ascontiguousarray(order, dtype=np.int64), float(threshold),
                                 int(max_merges))


# ---------------------------------------------------------------------------- the pass


@dataclass
class _GroupData:
    group: ChannelGroup
    unit: np.ndarray
    vectors: np.ndarray
    order: np.ndarray
    weights: np.ndarray
    max_merges: int


class MergeChannelsPass(Pass):
    """Merge similar channels (LSH buckets split by cosine similarity) into activation-weighted
    representatives, folding the next layers' inputs, to meet a MACs budget."""

    name = "lsh"
    config_class = LSHConfig
    config: LSHConfig

    def __init__(self, config: LSHConfig | None = None,
                 calibration: Calibration | None = None):
        super().__init__(config)
        self.calibration = calibration

    def _cluster_all(self, data: list[_GroupData], tables: dict[int, Tables],
                     threshold: float) -> tuple[dict[int, np.ndarray], int]:
        labels, comparisons = {}, 0
        for d in data:
            lab, count = greedy_cluster(tables[d.group.id], d.unit, d.order, threshold,
                                        d.max_merges, self.config.kernel)
            labels[d.group.id] = lab
            comparisons += count
        return labels, comparisons

    def call(self, model: ir.Model) -> PassResult:
        cfg = self.config
        prep = prepare(model)
        graph = prep.graph
        notes: list[str] = []
        activations = {}
        if self.calibration is not None:
            activations = activation_means(self.calibration, model, graph, prep.groups)
        else:
            notes.append("no calibration data: representatives are plain averages and the "
                         "next layers are not refitted")
        data = []
        for g in prep.groups:
            vectors = channel_features(graph, g, kinds=("weight", "bias", "param"))
            norms = np.linalg.norm(vectors, axis=1)
            act = activations.get(g.id)
            priority = act if act is not None else norms
            data.append(_GroupData(
                g, vectors / np.maximum(norms, 1e-30)[:, None], vectors,
                np.argsort(-priority, kind="stable").astype(np.int64),
                act if act is not None else np.ones(g.size),
                g.size - min_channels(g, cfg.min_channels_fraction)))
        budget = prep.budget(cfg.ratio)
        bits_grid = (cfg.bits,) if cfg.bits is not None else BITS_GRID
        tables_grid = (cfg.tables,) if cfg.tables is not None else TABLES_GRID

        def macs_of(labels: dict[int, np.ndarray]) -> int:
            return graph.macs({gid: int(lab.max()) + 1 for gid, lab in labels.items()})

        best = None  # (threshold, -comparisons, bits, tables, labels)
        for bits in bits_grid:
            for n_tables in tables_grid:
                tables = {d.group.id: build_tables(d.vectors, bits, n_tables,
                                                   cfg.seed + d.group.id, cfg.asymmetric)
                          for d in data}
                if cfg.threshold is not None or cfg.ratio >= 1.0:
                    threshold = cfg.threshold if cfg.threshold is not None else 1.0 + 1e-9
                    labels, comparisons = self._cluster_all(data, tables, threshold)
                else:
                    threshold, labels, comparisons = self._search(data, tables, budget,
                                                                  macs_of)
                feasible = macs_of(labels) <= budget + 0.5 or cfg.threshold is not None
                key = (feasible, threshold, -comparisons)
                if best is None or key > best[0]:
                    best = (key, bits, n_tables, threshold, labels, comparisons)
        (feasible, _, _), bits, n_tables, threshold, labels, comparisons = best
        if not feasible:
            notes.append(f"ratio {cfg.ratio} is not reachable by merging: with every group at "
                         f"its fewest clusters the model keeps "
                         f"{(macs_of(labels) + prep.fixed_macs) / prep.total_macs:.3f} of its MACs")
        transforms = {}
        for d in data:
            lab = labels[d.group.id]
            k = int(lab.max()) + 1
            if k < d.group.size:
                clusters = [np.flatnonzero(lab == c) for c in range(k)]
                transforms[d.group.id] = ChannelTransform.merge(d.group.size, clusters, d.weights)

        def describe(group: ChannelGroup, t: ChannelTransform) -> str:
            return f"{t.kept} groups of {group.size}"

        records, stats = finish(
            model, prep.original, graph, transforms, describe, self.calibration,
            refit=cfg.refit, ridge=cfg.ridge,
            max_rows=cfg.max_rows_per_batch, seed=cfg.seed, total_macs=prep.total_macs)
        kernel = "cython" if cfg.kernel != "numpy" and cython_kernel() is not None else "numpy"
        stats.update({"bits": bits, "tables": n_tables, "threshold": threshold,
                      "comparisons": comparisons, "kernel": kernel,
                      "asymmetric": cfg.asymmetric})
        notes.append(f"LSH: {bits} bits x {n_tables} tables, similarity threshold "
                     f"{threshold:.3f} ({kernel} kernel)")
        return PassResult(model=model, modified=bool(transforms), layers=records, notes=notes,
                          stats=stats)

    def _search(self, data, tables, budget, macs_of):
        """The highest threshold whose clusters fit the budget (bisection; clusters only
        grow as the threshold falls)."""
        lo_labels, lo_count = self._cluster_all(data, tables, -1.0)
        if macs_of(lo_labels) > budget + 0.5:
            return -1.0, lo_labels, lo_count
        lo, hi = -1.0, 1.0 + 1e-9
        best = (-1.0, lo_labels, lo_count)
        for _ in range(16):
            mid = (lo + hi) / 2
            labels, count = self._cluster_all(data, tables, mid)
            if macs_of(labels) <= budget + 0.5:
                lo, best = mid, (mid, labels, count)
            else:
                hi = mid
        return best
