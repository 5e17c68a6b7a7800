"""The pass framework: a pass is a class with a frozen config, run on an ``onnx_ir.Model``,
returning a result that says, layer by layer, what it changed and why it skipped what it skipped.

Modelled on ``onnx_ir.passes`` (one ``call`` method, ``requires``/``ensures`` hooks, a manager
that names the failing pass), with two additions: per-layer statistics in the result, and a
readable ``repr`` that shows the config.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_ir as ir

from compressor.errors import CompressionError, PassError

Shape = tuple[int, ...]


@dataclass
class LayerRecord:
    """What a pass did to one layer (node), or why it left it alone.

    ``error`` is the relative output error of the layer, ||y' - y|| / ||y||, on calibration
    activations when the pass had them, else on the weights alone (``error_basis`` says which).
    """

    name: str
    op: str
    shape_before: Shape | None = None
    shape_after: Shape | None = None
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    error: float | None = None
    error_basis: str = ""
    detail: str = ""
    skipped: str | None = None
    latency_before_ms: float | None = None  # measured, when the pass chose by time
    latency_after_ms: float | None = None  # measured or predicted for the chosen form

    @property
    def changed(self) -> bool:
        return self.skipped is None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PassResult:
    """Result of a pass: the model, whether it changed, and per-layer records."""

    model: ir.Model
    modified: bool
    layers: list[LayerRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def skipped(self) -> list[LayerRecord]:
        return [layer for layer in self.layers if layer.skipped is not None]

    @property
    def changed(self) -> list[LayerRecord]:
        return [layer for layer in self.layers if layer.skipped is None]


@dataclass(frozen=True)
class PassConfig:
    """Base of every pass config; subclasses are frozen dataclasses of plain values."""


class Pass(abc.ABC):
    """A graph transformation with a frozen config.

    Subclasses set ``name`` and ``config_class`` and implement ``call``. ``__call__`` runs
    ``requires`` → ``call`` → ``ensures`` and turns any failure into a ``PassError`` naming the pass.
    """

    name: ClassVar[str] = "pass"
    config_class: ClassVar[type[PassConfig]] = PassConfig

    def __init__(self, config: PassConfig | None = None):
        config = config if config is not None else self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}")
        self.config = config

    def requires(self, model: ir.Model) -> None:  # noqa: B027 - optional hook
        """Check pre-conditions; raise ``PassError`` if the model cannot be processed."""

    def ensures(self, model: ir.Model) -> None:  # noqa: B027 - optional hook
        """Check post-conditions; raise ``PassError`` if the output is inconsistent."""

    @abc.abstractmethod
    def call(self, model: ir.Model) -> PassResult:
        """Transform ``model`` in place and report what changed."""

    def __call__(self, model: ir.Model) -> PassResult:
        try:
            self.requires(model)
            result = self.call(model)
            self.ensures(result.model)
        except PassError:
            raise
        except CompressionError as e:
            raise PassError(self.name, str(e)) from e
        return result

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config)
        )
        return f"{type(self).__name__}({fields})"


class PassManager:
    """Runs passes in order; a failure names the pass; results are kept in order."""

    def __init__(
        self,
        passes: Sequence[Pass],
        on_start: Callable[[Pass, int, int], None] | None = None,
    ):
        self.passes = list(passes)
        self.on_start = on_start

    def __call__(self, model: ir.Model) -> tuple[ir.Model, list[PassResult]]:
        results: list[PassResult] = []
        for i, p in enumerate(self.passes):
            if self.on_start is not None:
                self.on_start(p, i, len(self.passes))
            started = time.perf_counter()
            result = p(model)
            result.stats.setdefault("seconds", time.perf_counter() - started)
            result.stats.setdefault("pass", p.name)
            model = result.model
            results.append(result)
        return model, results

    def __repr__(self) -> str:
        return "PassManager([" + ", ".join(repr(p) for p in self.passes) + "])"
