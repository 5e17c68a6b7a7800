"""Importance criteria for channel groups: plain callables ``GroupView -> scores``.

As in Torch-Pruning, criteria know nothing of graphs or passes: a ``GroupView`` hands them each
channel's producing weights (all producers of the group side by side: a residual group sees
every conv that writes into the sum) and, with calibration data, each channel's mean absolute
activation where the next layers read it. Higher score = more important.

- ``l1`` / ``l2``: norm of the channel's producing weights (filters, Gemm rows, depthwise taps).
- ``activation``: mean |activation| on the calibration data.
- ``lsh``: redundancy. Channels whose filters collide in a SimHash bucket point the same way;
  in each bucket the strongest keeps its norm and every other member's norm is discounted by
  its cosine similarity to the closest stronger member, so near-duplicates go first.
- ``reconstruction``: what the next layers lose. Channels are removed greedily, each time the
  one whose removal least raises the next layers' least-squares reconstruction error on the
  calibration data (He et al. 2017, ThiNet), and score that error, relative to the layers'
  output energy: comparable across groups, so a global ranking needs no normalisation.

A criterion with ``comparable = True`` returns scores on one scale for every group.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from compressor.errors import OptionError
from compressor.passes.calibrate import Calibration
from compressor.passes.dependency import ChannelGroup, DependencyGraph, ParamSlice

CRITERIA = ("l1", "l2", "activation", "lsh", "reconstruction")


@dataclass
class ConsumerView:
    """One layer reading a group, as ``y = W x``: ``columns[c]`` are the entries of ``x``
    that come from the group's channel c; ``covariance`` is that of ``x`` on calibration
    data."""

    weight: np.ndarray  # (outputs, fan_in)
    columns: np.ndarray  # (n, k) int
    covariance: np.ndarray  # (fan_in, fan_in)


@dataclass
class GroupView:
    """What a criterion sees of one group."""

    group: ChannelGroup
    weights: np.ndarray  # (n, D): each channel's producing weights, side by side
    activation: np.ndarray | None = None  # (n,): mean |activation| on calibration data
    consumers: list[ConsumerView] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.group.size


Criterion = Callable[[GroupView], np.ndarray]


def _slice_rows(s: ParamSlice, group: ChannelGroup, sizes: Mapping[int, int]) -> list[np.ndarray]:
    """The entries of parameter slice ``s`` that belong to ``group``, as (n, -1) rows."""
    array = np.asarray(s.value.const_value.numpy(), dtype=np.float64)
    rows = []
    offset = 0
    for seg in s.layout:
        length = sizes[seg.group] * seg.block
        if seg.group == group.id:
            part = np.take(array, np.arange(offset, offset + length), axis=s.axis)
            rows.append(np.moveaxis(part, s.axis, 0).reshape(group.size, -1))
        offset += length
    return rows


def channel_features(graph: DependencyGraph, group: ChannelGroup,
                     kinds: Sequence[str] = ("weight",)) -> np.ndarray:
    """(n, D): every producing parameter slice of ``kinds`` of each channel, side by side."""
    sizes = {gid: g.size for gid, g in graph.groups.items()}
    rows = [r for s in group.producers if s.kind in kinds for r in _slice_rows(s, group, sizes)]
    if not rows:
        return np.zeros((group.size, 0))
    return np.concatenate(rows, axis=1)


def read_tensors(graph: DependencyGraph, group: ChannelGroup) -> list[ir.Value]:
    """The tensors of ``group`` that its consuming layers read."""
    values = []
    for s in group.consumers:
        x = s.node.inputs[0]
        if x is not None and x in graph.axes and x not in values:
            values.append(x)
    return values


def activation_means(calibration: Calibration, model: ir.Model, graph: DependencyGraph,
                     groups: Sequence[ChannelGroup]) -> dict[int, np.ndarray]:
    """Mean |activation| of each channel of ``groups`` on the calibration data, where the
    consuming layers read it (averaged over those tensors and, for flattened channels, over
    each channel's block of features)."""
    reads = {g.id: read_tensors(graph, g) for g in groups}
    values = list(dict.fromkeys(v for vs in reads.values() for v in vs))
    sums = {v.name: None for v in values}
    counts = dict.fromkeys(sums, 0)

    def consume(batch: dict[str, np.ndarray]) -> None:
        for v in values:
            x = np.abs(batch[v.name])
            axis = graph.axes[v].axis
            moved = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
            total = moved.sum(0, dtype=np.float64)
            sums[v.name] = total if sums[v.name] is None else sums[v.name] + total
            counts[v.name] += moved.shape[0]

    if values:
        calibration.stream(model, [v.name for v in values], consume, label="activations")
    sizes = {gid: g.size for gid, g in graph.groups.items()}
    result: dict[int, np.ndarray] = {}
    for g in groups:
        per_tensor = []
        for v in reads[g.id]:
            entries = sums[v.name] / max(counts[v.name], 1)
            offset = 0
            for seg in graph.axes[v].layout:
                length = sizes[seg.group] * seg.block
                if seg.group == g.id:
                    per_tensor.append(entries[offset:offset + length].reshape(g.size, -1).mean(1))
                offset += length
        result[g.id] = np.mean(per_tensor, axis=0) if per_tensor else np.zeros(g.size)
    return result


# ---------------------------------------------------------------------------- criteria


def l1(view: GroupView) -> np.ndarray:
    """L1 norm of each channel's producing weights."""
    return np.abs(view.weights).sum(axis=1)


def l2(view: GroupView) -> np.ndarray:
    """L2 norm of each channel's producing weights."""
    return np.sqrt(np.square(view.weights).sum(axis=1))


def activation(view: GroupView) -> np.ndarray:
    """Mean |activation| of each channel on the calibration data."""
    if view.activation is None:
        raise OptionError("criterion 'activation' needs calibration data: pass --data")
    return np.asarray(view.activation, dtype=np.float64)


def lsh_redundancy(bits: int = 6, tables: int = 4, seed: int = 0) -> Criterion:
    """Norm discounted by redundancy: channels that share a SimHash bucket (``bits`` signed
    random projections, in any of ``tables`` tables) with a stronger channel score
    ``norm * (1 - cos)`` against the most similar stronger one."""

    def score(view: GroupView) -> np.ndarray:
        from compressor.passes.lsh_merge import SimHash

        w = view.weights
        norms = np.sqrt(np.square(w).sum(axis=1))
        unit = w / np.maximum(norms, 1e-30)[:, None]
        codes = SimHash(bits, tables, w.shape[1], seed).codes(w)
        best_similarity = np.full(len(w), -np.inf)
        for table in codes:
            order = np.argsort(table, kind="stable")
            boundaries = np.flatnonzero(np.diff(table[order])) + 1
            for bucket in np.split(order, boundaries):
                if len(bucket) < 2:
                    continue
                bucket = bucket[np.argsort(-norms[bucket], kind="stable")]
                sims = unit[bucket] @ unit[bucket].T
                for i in range(1, len(bucket)):  # i: against the stronger members 0..i-1
                    j = bucket[i]
                    best_similarity[j] = max(best_similarity[j], sims[i, :i].max())
        discount = np.where(np.isfinite(best_similarity), np.clip(best_similarity, 0.0, 1.0), 0.0)
        return norms * (1.0 - discount)

    return score


def reconstruction(view: GroupView, ridge: float = 1e-3) -> np.ndarray:
    """Greedy backward elimination on the consumers' input covariances.

    With S the inverse covariance of the kept inputs and A the least-squares weights on them,
    dropping channel c (input entries b) raises the squared error by ``tr(A_b S_bb^-1 A_b^T)``;
    both are downdated in place after each removal. The score of the i-th channel removed is
    the total relative error after removing it; the last channel standing scores +inf.
    """
    if not view.consumers:
        raise OptionError("criterion 'reconstruction' needs calibration data: pass --data")
    n = view.size
    states = []
    for c in view.consumers:
        cov = np.asarray(c.covariance, dtype=np.float64)
        cov = cov + ridge * max(np.trace(cov) / len(cov), 1e-12) * np.eye(len(cov))
        energy = float(np.sum((c.weight @ cov) * c.weight))
        states.append([np.linalg.inv(cov), c.weight.astype(np.float64).copy(),
                       np.arange(len(cov)), np.asarray(c.columns), max(energy, 1e-30)])
    alive = list(range(n))
    scores = np.full(n, np.inf)
    total = 0.0
    while len(alive) > 1:
        costs = np.zeros(len(alive))
        for inv, weight, kept, columns, energy in states:
            position = {int(col): i for i, col in enumerate(kept)}
            blocks = np.array([[position[int(col)] for col in columns[c]] for c in alive])
            s_bb = inv[blocks[:, :, None], blocks[:, None, :]]  # (m, k, k)
            a_b = weight[:, blocks].transpose(1, 0, 2)  # (m, out, k)
            solved = np.linalg.solve(s_bb, a_b.transpose(0, 2, 1))  # (m, k, out)
            costs += np.einsum("mok,mko->m", a_b, solved) / energy
        best = int(np.argmin(costs))
        channel = alive.pop(best)
        total += max(float(costs[best]), 0.0)
        scores[channel] = total
        for state in states:
            inv, weight, kept, columns, energy = state
            position = {int(col): i for i, col in enumerate(kept)}
            b = np.array([position[int(col)] for col in columns[channel]])
            rest = np.setdiff1d(np.arange(len(kept)), b)
            s_bb_inv = np.linalg.inv(inv[np.ix_(b, b)])
            s_rb = inv[np.ix_(rest, b)]
            state[1] = weight[:, rest] - weight[:, b] @ s_bb_inv @ s_rb.T
            state[0] = inv[np.ix_(rest, rest)] - s_rb @ s_bb_inv @ s_rb.T
            state[2] = kept[rest]
    return scores


reconstruction.comparable = True  # type: ignore[attr-defined]


def make_criterion(name: str, *, bits: int = 6, tables: int = 4, seed: int = 0) -> Criterion:
    """The criterion called ``name`` (one of ``CRITERIA``)."""
    if name == "l1":
        return l1
    if name == "l2":
        return l2
    if name == "activation":
        return activation
    if name == "lsh":
        return lsh_redundancy(bits, tables, seed)
    if name == "reconstruction":
        return reconstruction
    raise OptionError(f"unknown criterion '{name}': choose from {', '.join(CRITERIA)}")
