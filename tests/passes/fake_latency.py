"""A deterministic latency table for the passes that choose by measured time (svd, prune):
tests assert what a pass chooses, never how fast this machine happens to be."""

from __future__ import annotations

import onnx

from compressor.latency import LatencyCache, LatencyContext, LatencyTable
from compressor.profile import profile_model


def fake_ms(proto: onnx.ModelProto, penalty=None) -> float:
    """Each Conv/Gemm/MatMul costs 1 ms per million MACs plus 2 us, plus ``penalty(layer
    profile)``. Additive over layers and bilinear in a layer's (input, output) widths, so a
    pass's prediction (and prune's interpolation between measured widths) can be checked
    exactly against the same rule applied to the compressed model."""
    return sum(layer.macs * 1e-6 + 0.002 + (penalty(layer) if penalty else 0.0)
               for layer in profile_model(proto).layers
               if layer.op in ("Conv", "Gemm", "MatMul"))


class FakeTable(LatencyTable):
    """A LatencyTable timing with ``fake_ms``, cached in memory only."""

    def __init__(self, penalty=None):
        super().__init__(LatencyContext(), LatencyCache(persistent=False))
        self.penalty = penalty

    def measure(self, proto, min_time_s):
        return fake_ms(proto, self.penalty)
