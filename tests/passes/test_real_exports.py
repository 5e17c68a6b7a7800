"""Structured pruning of graphs as torch's two exporters write them.

Small torch modules with the structures of models people deploy: a MobileNetV3-style inverted
residual with squeeze-excitation and HardSwish, a YOLO-style neck (C2f blocks: a conv's output
chunked in two halves, bottlenecks, Concat; nearest Upsample), a transformer encoder block in
plain torch ops (q/k/v Linear, reshape to heads, softmax attention, output projection,
LayerNorm, erf GELU) and convs behind Pads. Each goes through ``torch.onnx.export`` with
``dynamo=False`` (TorchScript) and ``dynamo=True``, with a dynamic batch, then through
``CleanupPass`` as the pipeline does, then through the dependency analysis and
``PruneChannelsPass``.
"""

from __future__ import annotations

import functools
import io
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import structural_nets as nets
import torch
import torch.nn.functional as F
from torch import nn

from compressor import runtime
from compressor.passes.cleanup import CleanupPass
from compressor.passes.dependency import ChannelTransform, analyze, shrink
from compressor.passes.prune import PruneChannelsPass, PruneConfig
from compressor.profile import profile_model

EXPORTERS = {"torchscript": False, "dynamo": True}


# ---------------------------------------------------------------------------- the modules


def _randomize_batchnorms(module: nn.Module, generator: torch.Generator) -> None:
    """Trained-looking BatchNorm statistics, so that folding gives every conv its own bias."""
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            n = bn.num_features
            bn.weight.data = 1 + 0.2 * torch.randn(n, generator=generator)
            bn.bias.data = 0.1 * torch.randn(n, generator=generator)
            bn.running_mean = 0.1 * torch.randn(n, generator=generator)
            bn.running_var = 1 + 0.2 * torch.rand(n, generator=generator)


class SqueezeExcite(nn.Module):
    """torchvision's MobileNetV3 SE: pool, reduce, ReLU, expand, hard sigmoid, scale."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(scale))))
        return scale * x


class InvertedResidual(nn.Module):
    def __init__(self, channels: int, expanded: int, reduced: int):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(channels, expanded, 1, bias=False),
                                    nn.BatchNorm2d(expanded), nn.Hardswish())
        self.depthwise = nn.Sequential(
            nn.Conv2d(expanded, expanded, 3, padding=1, groups=expanded, bias=False),
            nn.BatchNorm2d(expanded), nn.Hardswish())
        self.se = SqueezeExcite(expanded, reduced)
        self.project = nn.Sequential(nn.Conv2d(expanded, channels, 1, bias=False),
                                     nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.project(self.se(self.depthwise(self.expand(x))))


class MobileNetV3Like(nn.Module):
    """stem 16 -> two inverted residuals with SE (expanded 32 and 48, reduced 8) -> 1x1
    conv 32 + HardSwish -> pool -> Linear 10."""

    input_shape = (3, 16, 16)

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.Hardswish())
        self.block1 = InvertedResidual(16, 32, 8)
        self.block2 = InvertedResidual(16, 48, 8)
        self.head = nn.Conv2d(16, 32, 1)
        self.classifier = nn.Linear(32, 10)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        x = F.hardswish(self.head(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConvBnSiLU(nn.Module):
    def __init__(self, a: int, b: int, kernel: int = 1, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(a, b, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(b)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, channels: int, shortcut: bool):
        super().__init__()
        self.cv1 = ConvBnSiLU(channels, channels, 3)
        self.cv2 = ConvBnSiLU(channels, channels, 3)
        self.add = shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """Ultralytics' C2f: cv1's output chunked in two halves, a bottleneck on the second,
    all three concatenated into cv2."""

    def __init__(self, a: int, b: int, shortcut: bool):
        super().__init__()
        self.c = b // 2
        self.cv1 = ConvBnSiLU(a, 2 * self.c)
        self.cv2 = ConvBnSiLU(3 * self.c, b)
        self.m = nn.ModuleList([Bottleneck(self.c, shortcut)])

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class YoloNeck(nn.Module):
    """stem 16 s2 -> C2f 16 (shortcut) -> conv 32 s2 -> C2f 32 (shortcut) -> nearest x2
    Upsample -> Concat with the first C2f -> C2f 16 -> 1x1 conv 8 (the head)."""

    input_shape = (3, 32, 32)

    def __init__(self):
        super().__init__()
        self.stem = ConvBnSiLU(3, 16, 3, 2)
        self.p3 = C2f(16, 16, True)
        self.down = ConvBnSiLU(16, 32, 3, 2)
        self.p4 = C2f(32, 32, True)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.neck = C2f(48, 16, False)
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        p3 = self.p3(self.stem(x))
        p4 = self.p4(self.down(p3))
        return self.head(self.neck(torch.cat([self.up(p4), p3], 1)))


class EncoderBlock(nn.Module):
    """A pre-norm transformer encoder block in plain torch ops, as Hugging Face's BERT-style
    attention writes it (head count and widths are Python ints, batch and sequence read
    from the input), on [N, 6, 16] with 4 heads of 4 and a feed-forward width of 32.

    ``dead_heads`` / ``dead_hidden``: heads whose q, k, v rows and biases are zero, and
    feed-forward units whose first-layer row and bias are zero."""

    input_shape = (6, 16)
    heads, width, hidden = 4, 16, 32

    def __init__(self, dead_heads=(1, 3), dead_hidden=(0, 7, 8, 20, 31)):
        super().__init__()
        d, f = self.width, self.hidden
        self.head_dim = d // self.heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)
        with torch.no_grad():
            for layer in (self.ln1, self.ln2):
                layer.weight.uniform_(0.8, 1.2)
                layer.bias.uniform_(-0.1, 0.1)
            for h in dead_heads:
                rows = slice(h * self.head_dim, (h + 1) * self.head_dim)
                for layer in (self.q, self.k, self.v):
                    layer.weight[rows] = 0
                    layer.bias[rows] = 0
            self.fc1.weight[list(dead_hidden)] = 0
            self.fc1.bias[list(dead_hidden)] = 0
        self.dead_heads, self.dead_hidden = tuple(dead_heads), tuple(dead_hidden)

    def split_heads(self, x, batch, seq):
        return x.view(batch, seq, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x):
        batch, seq, _ = x.shape
        y = self.ln1(x)
        q = self.split_heads(self.q(y), batch, seq)
        k = self.split_heads(self.k(y), batch, seq)
        v = self.split_heads(self.v(y), batch, seq)
        attention = torch.softmax(q @ k.transpose(-2, -1) / self.head_dim ** 0.5, dim=-1)
        context = (attention @ v).transpose(1, 2).reshape(batch, seq, self.width)
        x = x + self.o(context)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PaddedConvs(nn.Module):
    """Pads before convs: zero (foldable into the conv), reflect, constant 0.5 (both stay
    Pads), then a Pad of the channel axis, which pruning must refuse."""

    input_shape = (3, 10, 10)

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.b = nn.Conv2d(8, 12, 3)
        self.c = nn.Conv2d(12, 8, 1)
        self.d = nn.Conv2d(10, 4, 1)

    def forward(self, x):
        x = F.relu(self.a(F.pad(x, (1, 1, 1, 1))))
        x = F.relu(self.b(F.pad(x, (1, 1, 1, 1), mode="reflect")))
        x = F.relu(self.c(F.pad(x, (0, 1, 0, 1), value=0.5)))
        return self.d(F.pad(x, (0, 0, 0, 0, 1, 1)))


MODULES = {"mobilenet_v3": MobileNetV3Like, "yolo_neck": YoloNeck,
           "encoder_block": EncoderBlock, "padded_convs": PaddedConvs}


@functools.cache
def _exported(name: str, exporter: str) -> bytes:
    """``MODULES[name]`` (seeded) exported with a dynamic batch and cleaned up, serialized."""
    torch.manual_seed(0)
    module = MODULES[name]().eval()
    _randomize_batchnorms(module, torch.Generator().manual_seed(1))
    x = torch.randn(1, *module.input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if EXPORTERS[exporter]:
            batch = torch.export.Dim("batch", min=1, max=64)
            proto = torch.onnx.export(module, (x,), dynamo=True, opset_version=18,
                                      dynamic_shapes=({0: batch},), verbose=False).model_proto
        else:
            buffer = io.BytesIO()
            torch.onnx.export(module, (x,), buffer, dynamo=False, opset_version=18,
                              input_names=["x"], dynamic_axes={"x": {0: "N"}})
            proto = onnx.load_from_string(buffer.getvalue())
    model = ir.serde.deserialize_model(proto)
    CleanupPass()(model)
    model.ir_version = min(model.ir_version, 10)
    return ir.serde.serialize_model(model).SerializeToString()


def _model(name: str, exporter: str) -> ir.Model:
    return ir.serde.deserialize_model(onnx.ModelProto.FromString(_exported(name, exporter)))


def _inputs(name: str) -> np.ndarray:
    return np.random.default_rng(2).standard_normal(
        (2, *MODULES[name].input_shape)).astype(np.float32)


def _run(model: ir.Model | onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    session = runtime.session(proto)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _weights(slices) -> list[tuple[int, ...]]:
    return sorted(tuple(s.value.shape) for s in slices if s.kind == "weight")


def _summary(graph) -> list[tuple]:
    """Each prunable group as (size, producing weight shapes, consuming weight shapes):
    exporter-independent (the two exporters name nodes and initializers differently)."""
    return sorted((g.size, tuple(_weights(g.producers)), tuple(_weights(g.consumers)))
                  for g in graph.prunable)


params = pytest.mark.parametrize("exporter", list(EXPORTERS))


# ---------------------------------------------------------------------------- the groups


@params
def test_squeeze_excitation_couples_the_expand_conv_with_the_feature_map(exporter):
    graph = analyze(_model("mobilenet_v3", exporter))
    assert _summary(graph) == sorted([
        # the residual stream: stem and both projections; read by both expands and the head
        (16, ((16, 3, 3, 3), (16, 32, 1, 1), (16, 48, 1, 1)),
         ((32, 16, 1, 1), (32, 16, 1, 1), (48, 16, 1, 1))),
        # expanded channels: expand, depthwise and the SE's expand conv are one group,
        # read by the SE's reduce conv and the projection
        (32, ((32, 1, 3, 3), (32, 8, 1, 1), (32, 16, 1, 1)), ((8, 32, 1, 1), (16, 32, 1, 1))),
        (48, ((48, 1, 3, 3), (48, 8, 1, 1), (48, 16, 1, 1)), ((8, 48, 1, 1), (16, 48, 1, 1))),
        # each SE's reduced width is a group of its own
        (8, ((8, 32, 1, 1),), ((32, 8, 1, 1),)),
        (8, ((8, 48, 1, 1),), ((48, 8, 1, 1),)),
        (32, ((32, 16, 1, 1),), ((10, 32),)),  # the head, read by the classifier
    ])
    fixed = [g for g in graph.groups.values() if not g.prunable]
    assert [(g.size, g.reason.startswith("reaches model output")) for g in fixed] == [(10, True)]


@params
def test_c2f_split_halves_upsample_and_concat_are_tracked(exporter):
    graph = analyze(_model("yolo_neck", exporter))
    summary = _summary(graph)
    assert len(summary) == 15
    # each C2f's cv1 output is cut in two halves that prune apart: the first goes straight
    # into the Concat, the second also feeds the bottleneck (and, with a shortcut, is the
    # residual stream its second conv writes into)
    for cv1, half, bottleneck, cv2 in (((16, 16, 1, 1), 8, (8, 8, 3, 3), (16, 24, 1, 1)),
                                       ((32, 32, 1, 1), 16, (16, 16, 3, 3), (32, 48, 1, 1)),
                                       ((16, 48, 1, 1), 8, (8, 8, 3, 3), (16, 24, 1, 1))):
        halves = [row for row in summary if cv1 in row[1]]
        assert [size for size, _, _ in halves] == [half, half]
        assert sorted(len(consumers) for _, _, consumers in halves) == [1, 2]
        assert all(cv2 in consumers for _, _, consumers in halves)
        assert any(bottleneck in consumers for _, _, consumers in halves)
    # the shortcut bottlenecks write into the second half; the neck's has no shortcut
    assert (8, ((8, 8, 3, 3), (16, 16, 1, 1)), ((8, 8, 3, 3), (16, 24, 1, 1))) in summary
    assert (16, ((16, 16, 3, 3), (32, 32, 1, 1)), ((16, 16, 3, 3), (32, 48, 1, 1))) in summary
    # the upsampled p4 and p3 side by side in the neck's first conv
    neck = next(la for la in graph.layers if la.weight_shape == (16, 48, 1, 1))
    assert [graph.groups[s.group].size for s in neck.in_layout] == [32, 16]
    up = next(v for v in graph.axes if v.producer() is not None
              and v.producer().op_type == "Resize")
    assert graph.axes[up].layout == neck.in_layout[:1]
    fixed = [g for g in graph.groups.values() if not g.prunable]
    assert [(g.size, g.reason.startswith("reaches model output")) for g in fixed] == [(8, True)]


@params
def test_encoder_heads_and_feed_forward_width_are_prunable(exporter):
    graph = analyze(_model("encoder_block", exporter))
    assert _summary(graph) == [
        (4, ((16, 16), (16, 16), (16, 16)), ((16, 16),)),  # heads: q, k, v -> output proj
        (32, ((16, 32),), ((32, 16),)),  # the feed-forward width
    ]
    heads = next(g for g in graph.prunable if g.size == 4)
    assert all(s.layout[0].block == 4 for s in heads.slices)  # whole heads of 4 channels
    assert sorted((s.kind, s.role, s.axis) for s in heads.slices) == sorted(
        [("weight", "produce", 1)] * 3 + [("param", "produce", 0)] * 3
        + [("weight", "consume", 0)])
    attention = [la for la in graph.layers if la.kind == "batched_matmul"]
    assert len(attention) == 2 and all(
        [s.group for s in la.out_layout] == [heads.id] for la in attention)
    (stream,) = [g for g in graph.groups.values() if not g.prunable]
    assert stream.size == 16 and "joins them with model input" in stream.reason
    # the LayerNorm on the residual stream carries its scale and bias with the channels
    assert sum(1 for s in stream.producers if s.node.op_type == "LayerNormalization") == 2


@params
def test_pads_pass_channels_unless_they_pad_the_channel_axis(exporter):
    graph = analyze(_model("padded_convs", exporter))
    assert _summary(graph) == [(8, ((8, 3, 3, 3),), ((12, 8, 3, 3),)),
                               (12, ((12, 8, 3, 3),), ((8, 12, 1, 1),))]
    fixed = {g.size: g.reason for g in graph.groups.values() if not g.prunable}
    assert set(fixed) == {8, 4}
    assert fixed[8].startswith("Pad '") and fixed[8].endswith("' pads the channel axis")  # c
    assert fixed[4].startswith("reaches model output")  # d


# ---------------------------------------------------------------------------- pruning


def _prunable_macs(graph, proto: onnx.ModelProto) -> tuple[int, int]:
    """MACs of the layers touching prunable groups: before (analysis) and in ``proto``."""
    prunable = {g.id for g in graph.prunable}
    names = {la.node.name: la.macs for la in graph.layers
             if any(s.group in prunable for s in (la.in_layout or ()) + (la.out_layout or ()))}
    after = {layer.name: layer.macs for layer in profile_model(proto).layers}
    return sum(names.values()), sum(after[name] for name in names)


@params
@pytest.mark.parametrize("name", list(MODULES))
def test_half_the_macs_gives_a_valid_smaller_model(name, exporter):
    model = _model(name, exporter)
    original = ir.serde.serialize_model(model)
    graph = analyze(_model(name, exporter))
    result = PruneChannelsPass(PruneConfig(ratio=0.5, criterion="l1"))(model)
    assert result.modified
    pruned = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(pruned, full_check=True)
    x = _inputs(name)
    y, y0 = _run(pruned, x), _run(original, x)
    assert y.shape == y0.shape and np.all(np.isfinite(y))
    before, after = _prunable_macs(graph, pruned)
    assert after <= 0.55 * before
    assert result.stats["ratio_reached"] <= 0.55
    assert len(pruned.SerializeToString()) < len(original.SerializeToString())


@params
@pytest.mark.parametrize("name", list(MODULES))
def test_ratio_one_keeps_the_outputs(name, exporter):
    model = _model(name, exporter)
    original = ir.serde.serialize_model(model)
    result = PruneChannelsPass(PruneConfig(ratio=1.0))(model)
    x = _inputs(name)
    np.testing.assert_array_equal(_run(result.model, x), _run(original, x))
    # keeping every channel through shrink itself rewrites every coupled constant the same
    model = _model(name, exporter)
    graph = analyze(model)
    shrink(model, graph, {g.id: ChannelTransform.keep(g.size, range(g.size))
                          for g in graph.prunable})
    np.testing.assert_array_equal(_run(model, x), _run(original, x))


@params
@pytest.mark.parametrize("name", ["mobilenet_v3", "yolo_neck", "padded_convs"])
def test_removing_zeroed_channels_is_exact(name, exporter):
    """Zero a third of every prunable group's channels in all their producers, then remove
    them: the outputs do not move when the coupling is right. (The convs behind the 0.5
    Pad are left out: a zeroed channel is 0.5 on its border, which its reader sees.)"""
    model = _model(name, exporter)
    graph = analyze(model)
    rng = np.random.default_rng(3)
    groups = graph.prunable
    if name == "padded_convs":
        groups = [g for g in groups if g.size == 8]
    transforms = {}
    for g in groups:
        dead = rng.choice(g.size, g.size // 3, replace=False)
        nets.kill_channels(graph, g, dead)
        transforms[g.id] = ChannelTransform.keep(g.size, np.setdiff1d(range(g.size), dead))
    reference = ir.serde.serialize_model(model)
    shrink(model, graph, transforms)
    pruned = ir.serde.serialize_model(model)
    onnx.checker.check_model(pruned, full_check=True)
    x = _inputs(name)
    np.testing.assert_allclose(_run(pruned, x), _run(reference, x), rtol=1e-4, atol=1e-5)
    assert profile_model(pruned).macs < profile_model(reference).macs


@params
def test_removing_zero_heads_and_feed_forward_units_is_exact(exporter):
    """The block is built with heads 1 and 3 and five feed-forward units zero in torch:
    removing those heads from q, k, v and the output projection's rows, and those units from
    both feed-forward layers, leaves the exported model's outputs as they were."""
    model = _model("encoder_block", exporter)
    original = ir.serde.serialize_model(model)
    graph = analyze(model)
    heads = next(g for g in graph.prunable if g.size == 4)
    hidden = next(g for g in graph.prunable if g.size == 32)
    dead_heads, dead_hidden = EncoderBlock().dead_heads, EncoderBlock().dead_hidden
    shrink(model, graph, {
        heads.id: ChannelTransform.keep(4, np.setdiff1d(range(4), dead_heads)),
        hidden.id: ChannelTransform.keep(32, np.setdiff1d(range(32), dead_hidden)),
    })
    pruned = ir.serde.serialize_model(model)
    onnx.checker.check_model(pruned, full_check=True)
    assert sorted(tuple(v.shape) for v in model.graph.initializers.values()
                  if v.const_value is not None and len(v.shape) == 2) == [
        (8, 16), (16, 8), (16, 8), (16, 8), (16, 27), (27, 16)]
    x = _inputs("encoder_block")
    np.testing.assert_allclose(_run(pruned, x), _run(original, x), rtol=1e-5, atol=1e-5)
    # saved: q, k, v outputs and the output projection's inputs (8 of 16), both attention
    # MatMuls (2 heads of 6 x 6 x 4), both feed-forward layers (5 of 32 units)
    assert profile_model(pruned).macs == profile_model(original).macs - (
        3 * 6 * 16 * 8 + 6 * 8 * 16 + 2 * 2 * 6 * 6 * 4 + 2 * 6 * 16 * 5)
