"""A walk through two models over the calibration set, each part of each model run once.

A sequential refit fits each layer, in graph order, to the inputs that the already compressed
layers before it produce. Observing those inputs by running the model from its graph inputs
for every layer costs a forward pass of the whole prefix per layer: quadratic in depth (ResNet-50's
53 layers at 200 samples spent 896 s there). ``CalibrationWalk`` instead keeps, for each batch of
the calibration set, the *frontier* of each model: the tensors already computed that a node not
yet run still reads (a ResNet block's input and its branch's current tensor). Asking for the next
layer's input runs only the nodes between the frontier and it, on the stored frontier, and moves
the frontier forward. Over a whole walk every node of each model runs once per batch.

The frontier is stored per batch (in files in a temporary folder that the walk removes; in
memory up to ``memory_bytes`` first, if asked), so peak memory is set by the model and one batch, not by the number
of calibration samples. The batches are fixed when the walk starts, so a stored batch always
meets the same samples in every later segment. The segments' sessions allocate from one shared
onnxruntime arena (``runtime.shared_cpu_arena``), warm from the first segment on, which the walk
hands back when it closes.

The caller changes the current model as it goes. A change where the walk has not been yet
(replacing the layer whose input was just observed) costs nothing; a change to a node the walk
has already run (new weights for it, a node put in its place), or a request for a tensor the
walk has dropped, restarts that model's walk from its graph inputs: correct, at the cost of one
prefix. A graph with subgraphs (If, Loop; a subgraph may read any outer value) is run from its
inputs for each request instead.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from compressor import runtime
from compressor.errors import DataError
from compressor.passes import calibrate
from compressor.passes.calibrate import (
    Calibration,
    StageClock,
    prefix_model,
    timed,
)

# Stored frontier batches beyond this many bytes go to files in a temporary folder (the page
# cache, not the process, holds them). None by default: whatever is kept in memory grows with
# the number of samples, and memory is to be set by the model and one batch.
WALK_MEMORY_BYTES = 0

Consume = Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], None]


class _Store:
    """Frontier tensors by (model, value name, batch index): in memory up to a byte budget,
    then one .npy file each.

    Files are written behind: ``put`` hands the array to a writer thread and returns, so the
    write (into the page cache, and whatever wait for the disk the kernel imposes) overlaps
    the next segment's run and statistics; at most ``max_pending`` arrays wait to be written,
    held in memory meanwhile, and a ``get`` of one of them reads it from there. A failed
    write raises at the next call that waits for it."""

    def __init__(self, memory_bytes: int, max_pending: int = 2):
        self.memory_bytes = memory_bytes
        self.max_pending = max_pending
        self._memory: dict[tuple[str, str, int], np.ndarray] = {}
        self._files: dict[tuple[str, str, int], Path] = {}
        self._file_sizes: dict[tuple[str, str, int], int] = {}
        self._pending: dict[tuple[str, str, int], tuple[Future, np.ndarray]] = {}
        self._writer: ThreadPoolExecutor | None = None
        self._folder: Path | None = None
        self._written = 0  # files ever written: each gets a name of its own
        self.memory_used = 0
        self.file_bytes = 0
        self.peak_bytes = 0

    def put(self, key: tuple[str, str, int], array: np.ndarray) -> None:
        self.drop_key(key)
        if self.memory_used + array.nbytes <= self.memory_bytes:
            self._memory[key] = array
            self.memory_used += array.nbytes
        else:
            if self._folder is None:
                self._folder = Path(tempfile.mkdtemp(prefix="compressor-walk-"))
                self._writer = ThreadPoolExecutor(max_workers=1,
                                                  thread_name_prefix="compressor-walk")
            self._written += 1
            path = self._folder / f"{self._written}-{key[0]}-{key[2]}.npy"
            assert self._writer is not None
            self._pending[key] = (self._writer.submit(_save, path, array), array)
            self._files[key] = path
            self._file_sizes[key] = array.nbytes
            self.file_bytes += array.nbytes
            self._settle(self.max_pending)
        self.peak_bytes = max(self.peak_bytes, self.memory_used + self.file_bytes)

    def _settle(self, keep: int) -> None:
        """Forget the writes that are done, and wait for the oldest until at most ``keep``
        are pending (raising a write's error)."""
        for key in [k for k, (future, _) in self._pending.items() if future.done()]:
            self._pending.pop(key)[0].result()
        while len(self._pending) > keep:
            self._pending.pop(next(iter(self._pending)))[0].result()

    def get(self, key: tuple[str, str, int]) -> np.ndarray:
        if key in self._memory:
            return self._memory[key]
        if key in self._pending:
            return self._pending[key][1]
        return np.load(self._files[key], allow_pickle=False)

    def drop_key(self, key: tuple[str, str, int]) -> None:
        array = self._memory.pop(key, None)
        if array is not None:
            self.memory_used -= array.nbytes
        pending = self._pending.pop(key, None)
        if pending is not None and not pending[0].cancel():
            pending[0].result()  # being written: let it finish before the file goes
        path = self._files.pop(key, None)
        if path is not None:
            self.file_bytes -= self._file_sizes.pop(key)
            path.unlink(missing_ok=True)

    def drop(self, tag: str, name: str) -> None:
        for key in [k for k in (*self._memory, *self._files) if k[0] == tag and k[1] == name]:
            self.drop_key(key)

    def close(self) -> None:
        try:
            self._settle(0)
        finally:
            for future, _ in self._pending.values():
                future.cancel()
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
            self._pending.clear()
            self._memory.clear()
            self._files.clear()
            self._file_sizes.clear()
            self.memory_used = self.file_bytes = 0
            if self._folder is not None:
                shutil.rmtree(self._folder, ignore_errors=True)
                self._folder = None


def _save(path: Path, array: np.ndarray) -> None:
    try:
        np.save(path, array, allow_pickle=False)
    except OSError as e:
        raise DataError(f"the calibration walk could not store a frontier tensor in "
                        f"{path.parent} ({e.strerror or e}); free space there or set TMPDIR "
                        f"to a folder with room") from e


@dataclass
class _Track:
    """Where one model's walk stands: the values computed so far, and those of them stored
    because a node not yet run reads them (name -> dtype)."""

    tag: str
    model: ir.Model | None = None
    computed: set[str] = field(default_factory=set)
    live: dict[str, np.dtype] = field(default_factory=dict)
    ran: list[tuple[ir.Node, tuple]] = field(default_factory=list)  # node, its fingerprint


@dataclass
class _Plan:
    """One segment of one model: what it reads, runs and returns."""

    session: object | None  # None: every wanted tensor is already stored
    inputs: list[str]  # graph inputs and stored tensors the segment reads
    outputs: list[str]  # what it returns: wanted tensors and the new frontier
    wanted: list[str]
    computed: set[str]  # the track's computed values after it
    live: list[str]  # the track's frontier after it
    new: dict[str, np.dtype | None] = field(default_factory=dict)  # frontier it stores
    ran: list[ir.Node] = field(default_factory=list)


class CalibrationWalk:
    """Walk a reference model and a current (being compressed) model over the calibration set
    together, in graph order (see the module's docstring).

    ``stream(current, reference_names, current_names, consume)`` calls ``consume(ref, now)``
    once per batch with the named tensors of the reference and of ``current`` for the same
    samples. Use it as a context manager, or call ``close()``, to free the stored frontier.
    """

    def __init__(
        self,
        calibration: Calibration,
        reference: ir.Model | onnx.ModelProto,
        *,
        clock: StageClock | None = None,
        stage: str = "refit",
        memory_bytes: int = WALK_MEMORY_BYTES,
    ):
        self.calibration = calibration
        self.clock = clock
        self.stage = stage
        if isinstance(reference, onnx.ModelProto):
            reference = ir.serde.deserialize_model(reference)
        self._reference = _Track("reference", reference)
        self._current = _Track("current")
        self._store = _Store(memory_bytes)
        self.segments_run = 0
        self.restarts = 0
        # one batch size for the whole walk, so a stored batch meets the same samples in every
        # segment, sized like Calibration.stream's batches
        size = calibrate.streaming_batch_size(calibration._sample_bytes(), calibration.batch_size)
        total = len(calibration)
        self._bounds = [(start, min(start + size, total)) for start in range(0, total, size)]

    def __enter__(self) -> CalibrationWalk:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._store.close()
        runtime.shrink_shared_arena()  # what the segments needed at most, handed back

    @property
    def stored_bytes_peak(self) -> int:
        """The most bytes of frontier tensors held at once (memory and files)."""
        return self._store.peak_bytes

    def stream(
        self,
        current: ir.Model,
        reference_names: Sequence[str],
        current_names: Sequence[str],
        consume: Consume,
        label: str = "refit",
    ) -> None:
        """Run each model from its frontier to the named tensors, batch by batch, and call
        ``consume(reference_tensors, current_tensors)`` for each batch."""
        if self._current.model is None:
            self._current.model = current
        elif self._current.model is not current:
            raise ValueError("a CalibrationWalk follows one current model; start a new walk "
                             "for another")
        plans = [(track, self._plan(track, list(dict.fromkeys(names))))
                 for track, names in ((self._reference, reference_names),
                                      (self._current, current_names))]
        total = len(self.calibration)
        for index, (start, stop) in enumerate(self._bounds):
            got = []
            with timed(self.clock, f"{self.stage} forward"):
                for track, plan in plans:
                    got.append(self._run(track, plan, index, start, stop))
            with timed(self.clock, f"{self.stage} statistics"):
                consume(*got)
            if self.calibration.progress is not None:
                self.calibration.progress(label, stop, total)
        for track, plan in plans:
            self._advance(track, plan)

    # -- planning ------------------------------------------------------------------------
    def _plan(self, track: _Track, wanted: list[str]) -> _Plan:
        model = track.model
        assert model is not None
        if not wanted:
            return _Plan(None, [], [], [], track.computed, list(track.live))
        if _has_subgraphs(model):  # run from the graph inputs, store nothing
            proto = prefix_model(model, wanted)
            session = runtime.session(proto, provider=self.calibration.provider,
                                      shared_arena=True)
            inputs = [i.name for i in session.get_inputs()]
            return _Plan(session, inputs, wanted, wanted, set(), [])
        if track.computed and self._stale(track):
            self._restart(track)
        try:
            return self._segment(track, model, wanted)
        except _Dropped:
            self._restart(track)
            return self._segment(track, model, wanted)

    def _stale(self, track: _Track) -> bool:
        """Whether a node the walk ran has changed since (other inputs or weights) or has
        been replaced in the graph."""
        assert track.model is not None
        producer = {o.name: node for node in track.model.graph for o in node.outputs if o.name}
        return any(not _same(_fingerprint(node), fingerprint)
                   or any(producer.get(o.name) is not node for o in node.outputs if o.name)
                   for node, fingerprint in track.ran)

    def _restart(self, track: _Track) -> None:
        for name in list(track.live):
            self._store.drop(track.tag, name)
        track.computed, track.live, track.ran = set(), {}, []
        self.restarts += 1

    def _segment(self, track: _Track, model: ir.Model, wanted: list[str]) -> _Plan:
        graph = model.graph
        graph_inputs = {v.name: v for v in graph.inputs if v.name not in graph.initializers}
        producer: dict[str, ir.Node] = {}
        for node in graph:
            for out in node.outputs:
                if out.name:
                    producer[out.name] = node
        needed: dict[int, ir.Node] = {}
        inputs: dict[str, None] = {}
        initializers: dict[str, ir.Value] = {}
        stack, seen = list(reversed(wanted)), set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in track.live or name in graph_inputs:
                inputs[name] = None
            elif name in graph.initializers:
                initializers[name] = graph.initializers[name]
            elif name in producer:
                node = producer[name]
                if name in track.computed:  # computed, then dropped: nothing read it then
                    raise _Dropped(name)
                if id(node) not in needed:
                    needed[id(node)] = node
                    stack.extend(v.name for v in node.inputs if v is not None and v.name)
            else:
                raise DataError(f"the model has no tensor named '{name}' to observe")

        ran = [node for node in graph if id(node) in needed]
        computed = track.computed | {o.name for node in ran for o in node.outputs if o.name}
        live: dict[str, None] = {}
        for node in graph:
            if all(o.name in computed for o in node.outputs if o.name):
                continue  # already run, or run by this segment
            for value in node.inputs:
                if value is not None and value.name in computed:
                    live[value.name] = None
        outputs = list(dict.fromkeys(
            [n for n in wanted if n not in inputs]
            + [n for n in live if n not in track.live and n not in inputs]))
        session = None
        if outputs:
            proto = self._segment_proto(track, model, ran, list(inputs), outputs, initializers,
                                        graph_inputs)
            session = runtime.session(proto, provider=self.calibration.provider,
                                      shared_arena=True)
            self.segments_run += 1
        new = {n: None for n in live if n not in track.live}
        return _Plan(session, list(inputs), outputs, wanted, computed, list(live), new, ran)

    def _segment_proto(self, track: _Track, model: ir.Model, nodes: list[ir.Node],
                       inputs: list[str], outputs: list[str],
                       initializers: dict[str, ir.Value],
                       graph_inputs: dict[str, ir.Value]) -> onnx.ModelProto:
        input_infos = []
        for name in inputs:
            if name in graph_inputs:
                input_infos.append(ir.serde.serialize_value(graph_inputs[name]))
            else:
                elem = onnx.helper.np_dtype_to_tensor_dtype(track.live[name])
                input_infos.append(onnx.helper.make_tensor_value_info(name, elem, None))
        tensors = []
        for name, value in initializers.items():
            tensor = ir.serde.serialize_tensor(value.const_value)
            tensor.name = name
            tensors.append(tensor)
        graph = onnx.helper.make_graph(
            [ir.serde.serialize_node(n) for n in nodes], f"{track.tag}_segment", input_infos,
            [onnx.helper.make_empty_tensor_value_info(n) for n in outputs], tensors)
        opsets = [onnx.helper.make_opsetid(domain, version)
                  for domain, version in model.opset_imports.items()]
        functions = [ir.serde.serialize_function(f) for f in model.functions.values()]
        proto = onnx.helper.make_model(graph, opset_imports=opsets, functions=functions)
        proto.ir_version = model.ir_version
        return proto

    # -- running -------------------------------------------------------------------------
    def _run(self, track: _Track, plan: _Plan, index: int, start: int,
             stop: int) -> dict[str, np.ndarray]:
        if not plan.wanted:
            return {}
        fed = [n for n in plan.inputs if n not in track.live]  # graph inputs
        results = dict(self.calibration._feed(fed, start, stop)) if fed else {}
        results.update({name: self._store.get((track.tag, name, index))
                        for name in plan.inputs if name in track.live})
        if plan.session is not None:
            outputs = plan.session.run(plan.outputs, {n: results[n] for n in plan.inputs})
            results.update(zip(plan.outputs, outputs, strict=True))
            for name, array in zip(plan.outputs, outputs, strict=True):
                if name in plan.new:
                    self._store.put((track.tag, name, index), array)
                    plan.new[name] = array.dtype
        return {name: results[name] for name in plan.wanted}

    def _advance(self, track: _Track, plan: _Plan) -> None:
        if not plan.wanted:
            return
        track.computed = plan.computed
        track.ran.extend((node, _fingerprint(node)) for node in plan.ran)
        keep = set(plan.live)
        for name in [n for n in track.live if n not in keep]:
            del track.live[name]
            self._store.drop(track.tag, name)
        for name, dtype in plan.new.items():
            assert dtype is not None, f"frontier tensor '{name}' was not stored"
            track.live[name] = dtype


class _Dropped(Exception):
    """A tensor asked for was computed and dropped (the walk restarts that model)."""


def _fingerprint(node: ir.Node) -> tuple:
    """What a node computes from: its input values, the constants they hold, and its
    attributes and their values (the objects themselves, held so that none is freed and its
    id reused; compared by identity: a rewrite puts new ones in place)."""
    parts: list[object] = []
    for value in node.inputs:
        parts += [value, None if value is None else value.const_value]
    for name, attr in node.attributes.items():
        parts += [name, attr, getattr(attr, "value", None)]
    return tuple(parts)


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _has_subgraphs(model: ir.Model) -> bool:
    return any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for node in model.graph for attr in node.attributes.values()
               if isinstance(attr, ir.Attr))
