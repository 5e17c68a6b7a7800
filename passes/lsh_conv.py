"""LSH convolution with per-input filter selection (CNN-SLIDE): Conv -> ``ai.compressor::LSHConv``.

At build time every output filter, flattened with its bias (``v = [w, b]``), is hashed into
``L`` tables of ``K``-bit SimHash codes after Shrivastava & Li's asymmetric transform for
maximum inner product search (Sign-ALSH: ``P(v) = [v', 1/2 - |v'|^2, 1/2 - |v'|^4, ...]`` with
every ``v'`` scaled to norm <= 0.75; a query ``Q(q) = [q, 1, 0, 0, ...]`` only meets the first
``D + 1`` columns of the hyperplanes, which are what the node stores). A query and a filter
then collide more often the larger ``w . q + b`` is: the filter's response to the query.

At run time the op hashes each sample's queries and computes only the filters in the buckets
they land in (union over tables and queries), writing zeros for the others. The queries:

* ``mean`` - one per sample, the mean input window over all output positions, so
  ``w . q + b`` is the filter's mean pre-activation: filters a ReLU would mostly zero are the
  ones left out;
* ``columns`` - one per output column, the mean window down that column (the report hashes
  input columns; this is the same idea in the filters' space). More local, but OW lookups
  select a larger union.

The pass calibrates, per layer and on the activations the layer really sees (earlier layers
already replaced), the query kind, ``K``, ``L`` and the random planes (a few seeded trials):
the choice with the least output error (after the ReLU that follows, when one does) whose
mean selected fraction stays within ``ratio`` (the hashing, well under 1% of a layer's MACs
with ``mean`` queries, is reported and counted in the MACs but not budgeted). On the zoo,
``mean`` wins on most layers.

Always-on filters: on the zoo's calibration data an oracle that picks, per sample, the filters
with the largest output is barely better than one fixed set of filters, and LSH alone is close
to a random pick at the same fraction. The calibration may therefore also put the filters
with the largest mean response in every bucket (how many is calibrated, 0 included), leaving
the tables to choose among the rest; the op does not change, only what the buckets hold.

Chained layers: when an LSHConv's input comes from another LSHConv through ReLU, pooling and
other ops that keep zero channels zero, the upstream node's ``selected`` output is wired to the
downstream node's ``channel_mask`` input, and the downstream GEMM skips those channels.

``reference_lsh_conv`` is the numpy statement of the op the compiled kernels are tested
against (same planes, same tables, same selected sets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch

from compressor.errors import OptionError, PassError
from compressor.passes.base import LayerRecord, Pass, PassConfig, PassResult
from compressor.passes.calibrate import Calibration
from compressor.passes.diffconv import ConvGeometry, window_patches
from compressor.passes.graph import NameScope, add_initializer, constant_array, conv_attributes
from compressor.profile import register_mac_counter
from compressor.runtime import OP_DOMAIN, OP_DOMAIN_VERSION

OP_TYPE = "LSHConv"
QUERIES = ("mean", "columns")
MAX_BITS = 16  # the op's limit: a table has 2^K buckets
ALSH_TERMS = 3  # Sign-ALSH: m appended norm powers
ALSH_MAX_NORM = 0.75  # U: filters scaled to norm <= U < 1
# Ops that map an all-zero channel to an all-zero channel, channel by channel.
ZERO_PRESERVING = ("Relu", "LeakyRelu", "MaxPool", "AveragePool", "GlobalMaxPool",
                   "GlobalAveragePool", "Identity", "Dropout")


# ---------------------------------------------------------------------------------------------
# Reference


def filter_vectors(weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """[M, D + 1]: each flattened filter with its bias (0 without one), float64."""
    m = weight.shape[0]
    b = np.zeros(m) if bias is None else np.asarray(bias, np.float64)
    return np.concatenate([weight.reshape(m, -1).astype(np.float64), b[:, None]], axis=1)


def alsh_transform(vectors: np.ndarray, terms: int = ALSH_TERMS,
                   max_norm: float = ALSH_MAX_NORM) -> np.ndarray:
    """Sign-ALSH preprocessing ``P``: [M, dim + terms]."""
    norms = np.linalg.norm(vectors, axis=1)
    scale = max_norm / max(float(norms.max()), 1e-30)
    scaled = vectors * scale
    squared = (norms * scale) ** 2
    extra = [0.5 - squared ** (2 ** i) for i in range(terms)]
    return np.concatenate([scaled, np.stack(extra, axis=1)], axis=1) if terms else scaled


def sign_codes(projections: np.ndarray) -> np.ndarray:
    """Codes from projections [..., K]: bit k set where projection k > 0 (int64)."""
    bits = (projections > 0).astype(np.int64)
    return (bits << np.arange(projections.shape[-1], dtype=np.int64)).sum(-1)


def bucket_bitsets(filter_codes: np.ndarray, bits: int, filters: int) -> np.ndarray:
    """The op's ``buckets`` input from each table's filter codes [L, M]: [L, 2^K, words] int64,
    bucket b of table l holding bit m when filter m's code in table l is b."""
    tables = filter_codes.shape[0]
    words = (filters + 63) // 64
    out = np.zeros((tables, 1 << bits, words), dtype=np.uint64)
    for table in range(tables):
        for m, code in enumerate(filter_codes[table]):
            out[table, code, m // 64] |= np.uint64(1) << np.uint64(m % 64)
    return out.view(np.int64)


def bucket_members(buckets: np.ndarray, filters: int) -> np.ndarray:
    """bool [L, 2^K, M]: the filters of every bucket (inverse of ``bucket_bitsets``)."""
    words = buckets.view(np.uint64)
    m = np.arange(filters)
    return ((words[..., m // 64] >> (m % 64).astype(np.uint64)) & np.uint64(1)).astype(bool)


def build_tables(weight: np.ndarray, bias: np.ndarray | None, full_planes: np.ndarray,
                 terms: int = ALSH_TERMS, always: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(planes [L, K, D + 1] float32, buckets [L, 2^K, words] int64) for the node, from
    hyperplanes over the transformed filter space ``full_planes`` [L, K, D + 1 + terms].
    Filters listed in ``always`` are put in every bucket (selected for every input)."""
    tables, bits, _ = full_planes.shape
    transformed = alsh_transform(filter_vectors(weight, bias), terms)
    codes = sign_codes(np.einsum("lkd,md->lmk", full_planes.astype(np.float64), transformed))
    buckets = bucket_bitsets(codes, bits, weight.shape[0])
    if always is not None and len(always):
        words = np.zeros(buckets.shape[-1], np.uint64)
        for m in always:
            words[m // 64] |= np.uint64(1) << np.uint64(m % 64)
        buckets = (buckets.view(np.uint64) | words).view(np.int64)
    dim = weight[0].size + 1
    return np.ascontiguousarray(full_planes[:, :, :dim], dtype=np.float32), buckets


def query_vectors(x: np.ndarray, kernel: tuple[int, int], geometry: ConvGeometry,
                  query: str = "mean", channel_mask: np.ndarray | None = None) -> np.ndarray:
    """The op's queries [N, Q, D + 1] (float64; last column 1): the mean window of each sample
    (Q = 1) or of each output column (Q = OW). Channels masked off count as zero."""
    if query not in QUERIES:
        raise ValueError(f"query must be one of {QUERIES}, got {query!r}")
    x = np.asarray(x, np.float32)
    if channel_mask is not None:
        x = x * np.asarray(channel_mask, bool)[:, :, None, None]
    patches = window_patches(x, kernel, geometry).astype(np.float64)  # [N, OH, OW, D]
    q = patches.mean(axis=(1, 2))[:, None, :] if query == "mean" else patches.mean(axis=1)
    return np.concatenate([q, np.ones(q.shape[:-1] + (1,))], axis=-1)


def query_projections(queries: np.ndarray, planes: np.ndarray) -> np.ndarray:
    """[N, Q, L, K] projections of queries [N, Q, D + 1] on planes [L, K, D + 1]."""
    return np.einsum("nqd,lkd->nqlk", queries, planes.astype(np.float64))


def select_filters(query_codes: np.ndarray, buckets: np.ndarray, filters: int) -> np.ndarray:
    """bool [N, M]: the union of the buckets that codes [N, Q, L] land in."""
    members = bucket_members(buckets, filters)  # [L, B, M]
    tables = np.arange(query_codes.shape[2])
    hits = members[tables[None, None, :], query_codes]  # [N, Q, L, M]
    return hits.any(axis=(1, 2))


def reference_lsh_conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                       planes: np.ndarray, buckets: np.ndarray,
                       geometry: ConvGeometry | None = None, query: str = "mean",
                       channel_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """LSHConv in numpy (float64 sums): (Y [N, M, OH, OW] float32, selected [N, M] bool)."""
    geometry = geometry or ConvGeometry()
    m, _, kh, kw = weight.shape
    x = np.asarray(x, np.float32)
    if channel_mask is not None:
        x = x * np.asarray(channel_mask, bool)[:, :, None, None]
    queries = query_vectors(x, (kh, kw), geometry, query)
    codes = sign_codes(query_projections(queries, planes))
    selected = select_filters(codes, buckets, m)
    patches = window_patches(x, (kh, kw), geometry).astype(np.float64)
    y = patches @ weight.reshape(m, -1).T.astype(np.float64)  # [N, OH, OW, M]
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    y = y * selected[:, None, None, :]
    return y.transpose(0, 3, 1, 2).astype(np.float32), selected


def conv_output(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                geometry: ConvGeometry) -> np.ndarray:
    """Dense Conv (float32, torch) for calibration statistics."""
    top, left, bottom, right = geometry.pads
    xt = torch.nn.functional.pad(torch.from_numpy(np.array(x, np.float32)),
                                 (left, right, top, bottom))
    y = torch.nn.functional.conv2d(
        xt, torch.from_numpy(np.array(weight, np.float32)),
        None if bias is None else torch.from_numpy(np.array(bias, np.float32)),
        stride=geometry.strides, dilation=geometry.dilations)
    return y.numpy()


# ---------------------------------------------------------------------------------------------
# MAC counter


def _output_hw(node, shapes) -> tuple[int, int] | None:
    out = shapes.get(node.output[0])
    if out is not None and len(out) == 4:
        return out[2], out[3]
    x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
    if x is None or w is None or len(x) != 4:
        return None
    attributes = {a.name: a for a in node.attribute}
    strides = list(attributes["strides"].ints) if "strides" in attributes else [1, 1]
    pads = list(attributes["pads"].ints) if "pads" in attributes else [0, 0, 0, 0]
    dilations = list(attributes["dilations"].ints) if "dilations" in attributes else [1, 1]
    return tuple(  # type: ignore[return-value]
        (x[2 + i] + pads[i] + pads[i + 2] - dilations[i] * (w[2 + i] - 1) - 1) // strides[i] + 1
        for i in range(2))


def expected_macs(node, shapes) -> int:
    """Dense Conv MACs of an LSH conv node scaled by its ``expected_kept`` attribute (the
    fraction measured on calibration data: computed filters and windows plus hashing)."""
    w = shapes.get(node.input[1])
    hw = _output_hw(node, shapes)
    if w is None or len(w) != 4 or hw is None:
        return 0
    dense = w[0] * hw[0] * hw[1] * math.prod(w[1:])
    for a in node.attribute:
        if a.name == "expected_kept":
            return int(round(dense * a.f))
    return dense


register_mac_counter(OP_TYPE, domain=OP_DOMAIN)(lambda node, shapes, inits: expected_macs(node, shapes))


# ---------------------------------------------------------------------------------------------
# Graph plumbing shared with passes/lsh_window.py


@dataclass
class ConvLayer:
    """An eligible Conv: its node, constant weight and bias, and geometry."""

    node: ir.Node
    weight: np.ndarray
    bias: np.ndarray | None
    geometry: ConvGeometry

    @property
    def name(self) -> str:
        return self.node.name or "Conv"

    @property
    def macs_per_position(self) -> int:
        """Dense Conv MACs per output position (all filters)."""
        return int(self.weight.size)


def eligible_convs(graph: ir.Graph, op_name: str) -> tuple[list[ConvLayer], list[LayerRecord]]:
    """The graph's 2-D group-1 Convs with constant float32 weights (in graph order), and a
    record with the reason for every other Conv."""
    layers, skipped = [], []
    for node in graph:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or f"Conv_{len(layers) + len(skipped)}"

        def skip(reason: str, name=name) -> None:
            skipped.append(LayerRecord(name=name, op="Conv", skipped=reason))

        weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if weight is None:
            skip("weight is not a constant")
            continue
        if weight.ndim != 4:
            skip(f"not a 2-D convolution (weight rank {weight.ndim})")
            continue
        if weight.dtype != np.float32:
            skip(f"weight dtype {weight.dtype} ({op_name} is float32)")
            continue
        attrs = conv_attributes(node, weight.shape)
        if isinstance(attrs, str):
            skip(attrs)
            continue
        if attrs.group != 1:
            skip(f"group={attrs.group}: {op_name} supports only group=1")
            continue
        bias = None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = constant_array(node.inputs[2])
            if bias is None:
                skip("bias is not a constant")
                continue
        shape = node.inputs[0].shape
        if shape is not None and len(shape) != 4:
            skip(f"not a 2-D convolution (input rank {len(shape)})")
            continue
        geometry = ConvGeometry(tuple(attrs.strides), tuple(attrs.pads), tuple(attrs.dilations))
        layers.append(ConvLayer(node, weight, None if bias is None else bias.astype(np.float32),
                                geometry))
    return layers, skipped


def activation_after(node: ir.Node):
    """The activation applied to the node's output when its only consumer is a Relu or a
    Clip with constant bounds (ReLU6), as a numpy function; else None."""
    uses = list(node.outputs[0].uses())
    if len(uses) != 1:
        return None
    consumer = uses[0][0] if isinstance(uses[0], tuple) else uses[0].node
    if consumer.op_type == "Relu":
        return lambda y: np.maximum(y, 0)
    if consumer.op_type == "Clip":
        bounds = [constant_array(v) if v is not None else None for v in consumer.inputs[1:3]]
        if len(consumer.inputs) > 1 and consumer.inputs[1] is not None and bounds[0] is None:
            return None
        low = float(bounds[0]) if bounds and bounds[0] is not None else -np.inf
        high = float(bounds[1]) if len(bounds) > 1 and bounds[1] is not None else np.inf
        return lambda y: np.clip(y, low, high)
    return None


def replace_conv(graph: ir.Graph, layer: ConvLayer, op_type: str, inputs: list,
                 attributes: list, num_outputs: int = 1) -> ir.Node:
    """Put a custom-op node in the Conv's place; its first output takes over the Conv's."""
    node = layer.node
    new = ir.Node(OP_DOMAIN, op_type, inputs, attributes, num_outputs=num_outputs, name=node.name)
    old_out, new_out = node.outputs[0], new.outputs[0]
    new_out.shape, new_out.type = old_out.shape, old_out.type
    name = old_out.name
    ir.convenience.replace_nodes_and_values(graph, node, [node], [new], [old_out], [new_out])
    new_out.name = name
    return new


def conv_attributes_list(layer: ConvLayer) -> list:
    kh, kw = layer.weight.shape[2:]
    g = layer.geometry
    return [
        ir.AttrInt64s("strides", list(g.strides)),
        ir.AttrInt64s("pads", list(g.pads)),
        ir.AttrInt64s("dilations", list(g.dilations)),
        ir.AttrInt64s("kernel_shape", [int(kh), int(kw)]),
    ]


def layer_inputs(calibration: Calibration, model: ir.Model, name: str, samples: int) -> np.ndarray:
    """The value ``name`` on the first ``samples`` calibration inputs of ``model``."""
    return calibration.subset(samples).collect(model, [name])[name]


# ---------------------------------------------------------------------------------------------
# Calibration


@dataclass
class Choice:
    """One (query, K, L, planes) candidate evaluated on calibration data."""

    query: str
    bits: int
    tables: int
    trial: int
    always: int  # filters in every bucket (the largest mean responses)
    selected_fraction: float
    hashing_fraction: float
    error: float
    selected: np.ndarray | None = field(default=None, repr=False)  # [N, M] bool, the pick only

    @property
    def cost(self) -> float:
        return self.selected_fraction + self.hashing_fraction


def plane_set(seed: int, tables: int, bits: int, dim: int) -> np.ndarray:
    """The hyperplanes of one trial, [L, K, dim]: prefixes give every smaller K and L."""
    return np.random.default_rng(seed).standard_normal((tables, bits, dim))


def evaluate_choices(layer: ConvLayer, x: np.ndarray, energy: np.ndarray, queries: tuple[str, ...],
                     bits_grid: list[int], tables_grid: list[int], trials: int, seed: int,
                     ratio: float, always_grid: list[int] | None = None
                     ) -> tuple[list[Choice], Choice, bool]:
    """Every (query, K, L, trial, always-on count) on inputs x: mean selected fraction, hashing
    cost and the relative output error sqrt(sum of unselected energy / total energy).
    Returns (choices, the pick, whether it meets ``ratio``): the least error whose mean
    selected fraction is within ``ratio`` (ties: cheaper, hashing included), else the one
    selecting least; only the pick keeps its selection on x."""
    m = layer.weight.shape[0]
    kh, kw = layer.weight.shape[2:]
    dim = layer.weight[0].size + 1
    n = energy.shape[0]
    oh, ow = output_size(x.shape, layer)
    total_energy = max(float(energy.sum()), 1e-30)
    transformed = alsh_transform(filter_vectors(layer.weight, layer.bias))
    max_bits, max_tables = max(bits_grid), max(tables_grid)
    dense = layer.macs_per_position * oh * ow
    order = np.argsort(-energy.sum(axis=0), kind="stable")
    always_masks = {}
    for count in always_grid or [0]:
        mask = np.zeros(m, bool)
        mask[order[:count]] = True
        always_masks[count] = mask
    choices: list[Choice] = []
    best: tuple[tuple, Choice, np.ndarray] | None = None
    cheapest: tuple[tuple, Choice, np.ndarray] | None = None
    for query in queries:
        queries_q = query_vectors(x, (kh, kw), layer.geometry, query)  # [N, Q, D + 1]
        q_count = queries_q.shape[1]
        for trial in range(trials):
            full = plane_set(seed + 7919 * trial, max_tables, max_bits, transformed.shape[1])
            filter_bits = np.einsum("lkd,md->lmk", full, transformed) > 0  # [L, M, K]
            query_bits = query_projections(queries_q, full[:, :, :dim]) > 0  # [N, Q, L, K]
            for bits in bits_grid:
                weights = 1 << np.arange(bits, dtype=np.int64)
                filter_codes = (filter_bits[:, :, :bits] * weights).sum(-1)  # [L, M]
                query_codes = (query_bits[..., :bits] * weights).sum(-1)  # [N, Q, L]
                hits = query_codes[:, :, :, None] == filter_codes[None, None, :, :]  # [N,Q,L,M]
                per_table = hits.any(axis=1)  # [N, L, M]
                union = np.zeros((n, m), bool)
                for tables in range(1, max_tables + 1):
                    union |= per_table[:, tables - 1]
                    if tables not in tables_grid:
                        continue
                    hashing = tables * bits * dim * q_count / dense
                    for count, mask in always_masks.items():
                        selected = union | mask
                        kept = float((energy * selected).sum())
                        error = math.sqrt(max(0.0, 1.0 - kept / total_energy))
                        choice = Choice(query, bits, tables, trial, count,
                                        float(selected.mean()), hashing, error)
                        choices.append(choice)
                        if choice.selected_fraction <= ratio + 1e-9:
                            key = (round(error, 6), choice.cost)
                            if best is None or key < best[0]:
                                best = (key, choice, selected)
                        key = (choice.selected_fraction, error)
                        if cheapest is None or key < cheapest[0]:
                            cheapest = (key, choice, selected)
    _, pick, selected = best if best is not None else cheapest
    pick.selected = selected.copy()
    return choices, pick, best is not None


def output_size(x_shape, layer: ConvLayer) -> tuple[int, int]:
    """(OH, OW) of the layer on inputs of shape x_shape."""
    kh, kw = layer.weight.shape[2:]
    (sh, sw), (dh, dw) = layer.geometry.strides, layer.geometry.dilations
    top, left, bottom, right = layer.geometry.pads
    return ((x_shape[2] + top + bottom - dh * (kh - 1) - 1) // sh + 1,
            (x_shape[3] + left + right - dw * (kw - 1) - 1) // sw + 1)


def output_energy(layer: ConvLayer, x: np.ndarray, activation) -> np.ndarray:
    """Per (sample, filter) squared norm of the layer's output (after its ReLU if any):
    what leaving that filter out of that sample costs."""
    y = conv_output(x, layer.weight, layer.bias, layer.geometry)
    if activation is not None:
        y = activation(y)
    return (y.astype(np.float64) ** 2).sum(axis=(2, 3))


def _clip_keeps_zero(node: ir.Node) -> bool:
    if node.op_type != "Clip":
        return False
    low = constant_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    high = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if len(node.inputs) > 1 and node.inputs[1] is not None and low is None:
        return False
    if len(node.inputs) > 2 and node.inputs[2] is not None and high is None:
        return False
    return (low is None or float(low) <= 0) and (high is None or float(high) >= 0)


# ---------------------------------------------------------------------------------------------
# Pass


@dataclass(frozen=True)
class LSHConvConfig(PassConfig):
    """ratio: mean fraction of each layer's filters to compute (its MACs, hashing aside).
    bits (K), tables (L), query ('mean' or 'columns'): fixed instead of calibrated.
    samples: calibration samples used per layer; trials: random plane sets tried per choice.
    chain: wire an upstream LSHConv's selected filters as the next one's channel mask.
    always_on: let calibration put the filters with the largest mean response in every bucket
    (how many is calibrated too; 0 is among the options)."""

    ratio: float = 0.5
    bits: int | None = None
    tables: int | None = None
    query: str | None = None
    max_bits: int = 12
    max_tables: int = 16
    samples: int = 128
    trials: int = 3
    chain: bool = True
    always_on: bool = True
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.ratio <= 1:
            raise OptionError(f"lsh-conv: --ratio must be in (0, 1], got {self.ratio}")
        if self.bits is not None and not 1 <= self.bits <= MAX_BITS:
            raise OptionError(f"lsh-conv: --lsh-bits must be in [1, {MAX_BITS}], got {self.bits}")
        if self.tables is not None and self.tables < 1:
            raise OptionError(f"lsh-conv: --lsh-tables must be >= 1, got {self.tables}")
        if self.query is not None and self.query not in QUERIES:
            raise OptionError(f"lsh-conv: query must be one of {', '.join(QUERIES)}, got {self.query}")
        if not 1 <= self.max_bits <= MAX_BITS or self.max_tables < 1:
            raise OptionError("lsh-conv: max_bits must be in [1, 16] and max_tables >= 1")
        if self.samples < 1 or self.trials < 1:
            raise OptionError("lsh-conv: samples and trials must be >= 1")


class LSHConvPass(Pass):
    """Replace eligible Conv nodes by LSHConv (``--method lsh-conv --ratio R``)."""

    name = "lsh-conv"
    config_class = LSHConvConfig

    def __init__(self, config: LSHConvConfig | None = None, calibration: Calibration | None = None):
        super().__init__(config)
        self.calibration = calibration

    def requires(self, model: ir.Model) -> None:
        if self.calibration is None:
            raise OptionError("lsh-conv needs calibration data (--data): K, L and the hash "
                              "tables are chosen on real queries")

    def call(self, model: ir.Model) -> PassResult:
        config: LSHConvConfig = self.config
        graph = model.graph
        names = NameScope(graph)
        layers, records = eligible_convs(graph, OP_TYPE)
        usable = []
        for layer in layers:
            if layer.weight.shape[0] < 2:
                records.append(LayerRecord(name=layer.name, op="Conv", skipped="a single filter"))
            else:
                usable.append(layer)
        upstream_of = chain_links(usable) if config.chain else {}
        feeds = set(upstream_of.values())
        bits_grid = [config.bits] if config.bits else list(range(1, config.max_bits + 1))
        tables_grid = [config.tables] if config.tables else list(range(1, config.max_tables + 1))
        queries = (config.query,) if config.query else QUERIES
        if usable:
            model.opset_imports[OP_DOMAIN] = OP_DOMAIN_VERSION
        nodes: dict[int, ir.Node] = {}
        selections: dict[int, np.ndarray] = {}
        notes: list[str] = []
        for index, layer in enumerate(usable):
            x = layer_inputs(self.calibration, model, layer.node.inputs[0].name, config.samples)
            activation = activation_after(layer.node)
            energy = output_energy(layer, x, activation)
            seed = config.seed + 1000 * index
            m = layer.weight.shape[0]
            always_grid = [0] if not config.always_on else sorted(
                {0} | {int(round(a * config.ratio * m)) for a in (0.25, 0.5, 0.75, 0.9, 1.0)})
            _, choice, met = evaluate_choices(layer, x, energy, queries, bits_grid, tables_grid,
                                              config.trials, seed, config.ratio, always_grid)
            if not met:
                notes.append(f"{layer.name}: no K, L selects <= {config.ratio:.0%} of its filters; "
                             f"took the most selective ({choice.selected_fraction:.0%})")
            full = plane_set(seed + 7919 * choice.trial, max(tables_grid), max(bits_grid),
                             layer.weight[0].size + 1 + ALSH_TERMS)
            always = np.argsort(-energy.sum(axis=0), kind="stable")[:choice.always]
            planes, buckets = build_tables(layer.weight, layer.bias,
                                           full[:choice.tables, :choice.bits], always=always)
            inputs = [layer.node.inputs[0], layer.node.inputs[1],
                      add_initializer(graph, names(f"{layer.name}_lsh_planes"), planes),
                      add_initializer(graph, names(f"{layer.name}_lsh_buckets"), buckets),
                      layer.node.inputs[2] if layer.bias is not None else None]
            active = np.ones((len(x), layer.weight.shape[1]), bool)
            if index in upstream_of:
                inputs.append(nodes[upstream_of[index]].outputs[1])
                active = selections[upstream_of[index]]
            while inputs[-1] is None:
                inputs.pop()
            computed = float((choice.selected.sum(1) * active.sum(1)).mean()
                             / (choice.selected.shape[1] * active.shape[1]))
            kept = computed + choice.hashing_fraction
            attributes = conv_attributes_list(layer) + [
                ir.AttrString("query", choice.query),
                ir.AttrFloat32("expected_kept", kept),
            ]
            node = replace_conv(graph, layer, OP_TYPE, inputs, attributes,
                                num_outputs=2 if index in feeds else 1)
            if index in feeds:
                node.outputs[1].name = names(f"{layer.name}_selected")
            nodes[index], selections[index] = node, choice.selected

            oh, ow = output_size(x.shape, layer)
            dense = layer.macs_per_position * oh * ow
            params = int(layer.weight.size + (0 if layer.bias is None else layer.bias.size))
            detail = (f"query={choice.query}, K={choice.bits}, L={choice.tables}, "
                      f"{choice.always} always-on: selects {choice.selected_fraction:.1%} of "
                      f"filters on calibration data, hashing {choice.hashing_fraction:.2%} of the "
                      "MACs")
            if index in upstream_of:
                detail += f"; chained: {active.mean():.0%} of input channels active"
            records.append(LayerRecord(
                name=layer.name, op="Conv", shape_before=tuple(layer.weight.shape),
                shape_after=tuple(layer.weight.shape), macs_before=dense,
                macs_after=int(round(dense * kept)), params_before=params,
                params_after=params + planes.size,
                error=choice.error,
                error_basis="calibration (after its activation)" if activation else "calibration",
                detail=detail))
        return finish_result(model, records, notes, chained=len(upstream_of))

    def ensures(self, model: ir.Model) -> None:
        check_domain_import(self.name, model)


def chain_links(layers: list[ConvLayer]) -> dict[int, int]:
    """index -> upstream index: layers whose input is another layer's output passed through
    zero-preserving ops only (so the upstream's unselected filters are zero channels here)."""
    position = {id(layer.node): i for i, layer in enumerate(layers)}
    links = {}
    for i, layer in enumerate(layers):
        value = layer.node.inputs[0]
        while value is not None and value.producer() is not None:
            producer = value.producer()
            if id(producer) in position:
                links[i] = position[id(producer)]
                break
            if producer.domain not in ("", "ai.onnx") or not (
                    producer.op_type in ZERO_PRESERVING or _clip_keeps_zero(producer)):
                break
            value = producer.inputs[0]
    return links


def finish_result(model: ir.Model, records: list[LayerRecord], notes: list[str],
                  **extra) -> PassResult:
    changed = [r for r in records if r.skipped is None]
    stats = {
        "replaced": len(changed),
        "skipped": len(records) - len(changed),
        "macs_before": sum(r.macs_before for r in changed),
        "macs_after": sum(r.macs_after for r in changed),
        **extra,
    }
    return PassResult(model=model, modified=bool(changed), layers=records, notes=notes,
                      stats=stats)


def check_domain_import(pass_name: str, model: ir.Model) -> None:
    for node in model.graph:
        if node.domain == OP_DOMAIN and OP_DOMAIN not in model.opset_imports:
            raise PassError(pass_name, f"{node.op_type} nodes without an opset import for {OP_DOMAIN}")
