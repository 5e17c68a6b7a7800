"""Loading models into ONNX, and saving ONNX models atomically.

Every supported source becomes an ``onnx.ModelProto`` whose inputs (one or several; float,
integer or bool) have a dynamic batch dimension and fixed other dimensions:

- ``.onnx``: loaded, checked with ``onnx.checker``; symbolic non-batch dims (a dynamic sequence
  length, say) are fixed from the input shapes, else from the calibration data's arrays;
- TorchScript archives (``torch.jit.save``): exported with the TorchScript-based exporter, since
  ``torch.export`` cannot trace a ``ScriptModule``;
- ``torch.export`` archives (``.pt2``): the program's module is exported again; the program
  must have been exported with a dynamic batch (a fixed one is baked into its reshapes);
- ``torch.save`` files: a state dict (needs ``arch``, a model-zoo name) or, only when the user
  trusts the file, a pickled ``nn.Module``.

Torch modules are exported on example inputs built from the input shapes and types: the
program's own for ``.pt2``, else the data arrays' (a TorchScript file records no dtypes: without
data every input is float32). Integer examples are zeros, masks ones.

Input shapes are per sample, without the batch: ``(1, 28, 28)`` for a single-input model, or
a mapping ``{"input_ids": (128,), "attention_mask": (128,)}`` naming each input
(``parse_input_shapes`` reads the ``--input-shape`` options into one or the other).

Problems a user can fix raise ``ModelLoadError`` / ``OptionError`` with one line naming the file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import re
import secrets
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError

from compressor.data import InputSpec, graph_input_specs
from compressor.errors import ModelLoadError, OptionError, UnsupportedModelError

Shape = tuple[int, ...]
# Per-sample input shapes: one shape for a single-input model, or one per input name.
InputShapes = Shape | Mapping[str, Shape]

# onnxruntime 1.31 reads IR versions up to 13; we stay conservative so older runtimes load our
# output too. onnx >= 1.23 writes a newer IR by default, so everything we emit is capped here.
MAX_IR_VERSION = 10
MIN_OPSET = 17
DEFAULT_OPSET = 18
# protobuf cannot serialise a message of 2 GiB or more; leave headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = int(1.8 * 1024**3)
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
TORCH_SUFFIXES = (".pt", ".pth", ".pt2", ".ts")
SUPPORTED_SUFFIXES = (".onnx", *TORCH_SUFFIXES)


@dataclass
class LoadedModel:
    """A model loaded from ``source`` and converted to ONNX.

    ``inputs`` lists every graph input with its type and per-sample shape (all known);
    ``input_shape`` and ``input_name`` are the first input's.
    """

    proto: onnx.ModelProto
    source: Path
    source_format: str  # "onnx" | "torchscript" | "torch.export" | "state_dict" | "pickle"
    input_shape: Shape  # per sample, no batch dimension
    input_name: str
    torch_module: torch.nn.Module | None  # the torch original, for reference evaluation
    inputs: tuple[InputSpec, ...] = field(default=())

    @property
    def input_shapes(self) -> dict[str, Shape]:
        """Per-sample shape of every input, by name."""
        return {spec.name: tuple(spec.shape or ()) for spec in self.inputs}  # type: ignore[misc]

    @property
    def input_shape_option(self) -> InputShapes:
        """The input shapes as ``load_model(input_shape=...)`` takes them for another copy of
        this model (the reference of a compressed one): the shape itself for a single input
        (whose name an exporter may have changed), else the shapes by name."""
        return self.input_shape if len(self.inputs) <= 1 else self.input_shapes


# ----------------------------------------------------------------------------------- helpers


INPUT_SHAPE_SYNTAX = (
    "DIMS for a single-input model (1,28,28) or NAME:DIMS for each input of a model with "
    "several (input_ids:128), the dimensions per sample without the batch; repeat "
    "--input-shape for each input"
)


def parse_input_shape(text: str) -> Shape:
    """Parse a per-sample shape such as ``"1,28,28"`` or ``"1x28x28"`` (no batch dimension)."""
    cleaned = text.strip().strip("()[]").strip()
    parts = re.split(r"[,xX]", cleaned) if re.search(r"[,xX]", cleaned) else cleaned.split()
    try:
        shape = tuple(int(p.strip()) for p in parts)
    except ValueError:  # an empty part ("1,,28") or not a number
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise OptionError(
            f"--input-shape '{text}': expected positive per-sample dimensions without the "
            "batch, like 1,28,28 or 1x28x28"
        )
    return shape


def parse_input_shapes(texts: str | Sequence[str]) -> InputShapes | None:
    """Parse ``--input-shape`` options: ``["1,28,28"]`` -> ``(1, 28, 28)`` (a single-input
    model); ``["input_ids:128", "attention_mask:128"]`` -> ``{"input_ids": (128,), ...}``.

    One unnamed shape, or one ``NAME:DIMS`` per input; mixing the two, naming an input twice
    or a malformed option raises ``OptionError``. No options: None.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        return None
    named: dict[str, Shape] = {}
    unnamed: list[Shape] = []
    for text in texts:
        malformed = OptionError(f"--input-shape '{text}': expected {INPUT_SHAPE_SYNTAX}")
        name, _, dims = text.rpartition(":")
        name = name.strip()
        if ";" in text or "=" in text or (":" in text and not name):
            raise malformed
        if name in named:
            raise OptionError(f"--input-shape names input '{name}' twice")
        try:
            shape = parse_input_shape(dims)
        except OptionError:
            raise malformed from None
        if name:
            named[name] = shape
        else:
            unnamed.append(shape)
    if unnamed and (named or len(unnamed) > 1):
        raise OptionError(
            "--input-shape: a shape without a name is for a single-input model; name each "
            f"input's shape instead ({INPUT_SHAPE_SYNTAX})"
        )
    return unnamed[0] if unnamed else named


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def _format_shape(shape: Shape) -> str:
    return ",".join(str(d) for d in shape)


def _cap_ir_version(proto: onnx.ModelProto) -> onnx.ModelProto:
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    return proto


def _zoo():
    """The model zoo module, or None when it cannot be imported."""
    try:
        from compressor.models import zoo
    except ImportError:  # pragma: no cover - the zoo ships with the package
        return None
    return zoo


def _zoo_names() -> str:
    zoo = _zoo()
    return ", ".join(zoo.names()) if zoo is not None else "see the model zoo"


# -------------------------------------------------------------------------- torch -> ONNX


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the exporters' progress prints, warnings and log lines (they are not ours)."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),  # graph dumps on failure
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _set_eval(module: torch.nn.Module) -> torch.nn.Module:
    try:
        module.eval()
    except Exception:  # noqa: BLE001 - ExportedProgram.module() refuses: its mode is fixed
        pass
    return module


def _export_dynamo(
    module: torch.nn.Module,
    examples: tuple[torch.Tensor, ...],
    names: list[str],
    path: Path,
    opset: int,
) -> None:
    # Dim(min=1) with a batch-2 example: torch.export specialises 0/1 sizes, so a batch-1
    # example could fix the batch to 1. One Dim for every input: they share the batch.
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        module,
        examples,
        str(path),
        dynamo=True,
        dynamic_shapes=tuple({0: batch} for _ in examples),
        input_names=names,
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        verbose=False,
    )


def _export_torchscript(
    module: torch.nn.Module,
    examples: tuple[torch.Tensor, ...],
    names: list[str],
    path: Path,
    opset: int,
) -> None:
    torch.onnx.export(
        module,
        examples,
        str(path),
        dynamo=False,
        dynamic_axes={**{name: {0: "batch"} for name in names}, OUTPUT_NAME: {0: "batch"}},
        input_names=names,
        output_names=[OUTPUT_NAME],
        opset_version=opset,
    )


def _example(spec: InputSpec, batch: int = 2) -> torch.Tensor:
    """An export example of ``spec``: floats uniform in [0, 1), masks ones, other integers
    zeros (a valid index into any table)."""
    shape = (batch, *(spec.shape or ()))
    dtype = torch.from_numpy(np.zeros(0, spec.dtype)).dtype
    if dtype.is_floating_point:
        return torch.rand(shape).to(dtype)
    if spec.is_mask:
        return torch.ones(shape, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


def _describe_inputs(specs: Sequence[InputSpec]) -> str:
    if len(specs) == 1 and np.dtype(specs[0].dtype) == np.float32:
        return f"input shape (batch,{_format_shape(tuple(specs[0].shape or ()))})"
    listed = ", ".join(
        f"{s.name} (batch,{_format_shape(tuple(s.shape or ()))}) {np.dtype(s.dtype).name}"
        for s in specs
    )
    return f"inputs {listed}"


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost cause: the exporters wrap the useful message in generic advice."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def export_to_onnx(
    module: torch.nn.Module,
    input_shape: Shape | Sequence[InputSpec],
    *,
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """Export ``module`` (put in eval mode) to ONNX, the batch dynamic, first output ``logits``.

    ``input_shape`` is one per-sample shape (a single float input, named ``input``: the
    shape ``(batch, *input_shape)``), or one ``InputSpec`` per argument of ``forward``, in
    order, which name the ONNX inputs and give their types and per-sample shapes.

    Uses the ``torch.export``-based exporter; TorchScript modules, which it cannot trace, go
    through the TorchScript-based one. There is no fallback from the first to the second:
    tracing would silently bake in whichever branch of data-dependent control flow the
    example input took. Raises ``UnsupportedModelError`` when the export fails.
    """
    if opset < MIN_OPSET:
        raise OptionError(f"opset {opset} is too old: compressor needs opset >= {MIN_OPSET}")
    _set_eval(module)
    if input_shape and isinstance(input_shape[0], InputSpec):
        specs = list(input_shape)  # type: ignore[arg-type]
    else:
        shape = tuple(input_shape)  # type: ignore[arg-type]
        specs = [InputSpec(INPUT_NAME, np.dtype(np.float32), shape)]
    examples = tuple(_example(spec) for spec in specs)
    names = [INPUT_NAME] if len(specs) == 1 else [spec.name for spec in specs]
    is_script = isinstance(module, torch.jit.ScriptModule | torch.jit.ScriptFunction)
    exporter = _export_torchscript if is_script else _export_dynamo
    with tempfile.TemporaryDirectory(prefix="compressor-export-") as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            with _quiet_export(), torch.no_grad():
                exporter(module, examples, names, path, opset)
        except Exception as exc:  # noqa: BLE001 - the exporters raise many kinds
            raise UnsupportedModelError(
                f"cannot export {type(module).__name__} with {_describe_inputs(specs)} to "
                f"ONNX: {_first_line(_root_cause(exc))}"
            ) from exc
        # Loads external data (written next to the file for > 2 GB models) too.
        proto = onnx.load(str(path))
    return _cap_ir_version(proto)


# ---------------------------------------------------------------------------------- ONNX


def _graph_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {init.name for init in proto.graph.initializer}
    return [value for value in proto.graph.input if value.name not in initializers]


def _onnx_input_shape(value: onnx.ValueInfoProto) -> tuple[int | None, ...] | None:
    """Per-sample dims of a graph input (None for symbolic ones), or None if the rank is unknown."""
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims = tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in dims[1:])


def _fix_onnx_input(path: Path, value: onnx.ValueInfoProto, shape: Shape) -> None:
    """Fix the non-batch dims of ``value`` to ``shape``; keep (or make) the batch dynamic."""
    tensor_type = value.type.tensor_type
    known = _onnx_input_shape(value)
    if known is not None:
        if len(known) != len(shape):
            raise ModelLoadError(
                f"{path}: input '{value.name}' has {len(known)} per-sample dimensions, "
                f"but the input shape is {_format_shape(shape)}"
            )
        for have, want in zip(known, shape, strict=True):
            if have is not None and have != want:
                expected = ",".join("?" if d is None else str(d) for d in known)
                raise ModelLoadError(
                    f"{path}: input '{value.name}' has per-sample shape {expected}, "
                    f"which does not match input shape {_format_shape(shape)}"
                )
    dims = tensor_type.shape.dim
    if known is None:
        tensor_type.shape.Clear()
        tensor_type.shape.dim.add().dim_param = "batch"
        for d in shape:
            tensor_type.shape.dim.add().dim_value = d
        return
    if not dims[0].HasField("dim_value") and not dims[0].HasField("dim_param"):
        dims[0].dim_param = "batch"
    for dim, d in zip(list(dims)[1:], shape, strict=True):
        dim.Clear()
        dim.dim_value = d


def _check_onnx(path: Path, proto: onnx.ModelProto) -> None:
    try:
        if proto.ByteSize() < EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(proto)
        else:  # the in-memory checker refuses protos over 2 GB: check the file instead
            onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ModelLoadError(f"{path}: not a valid ONNX model: {_first_line(exc)}") from exc


def _upgrade_opset(path: Path, proto: onnx.ModelProto) -> onnx.ModelProto:
    version = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if version is None or version >= MIN_OPSET:
        return proto
    try:
        return onnx.version_converter.convert_version(proto, DEFAULT_OPSET)
    except Exception as exc:  # noqa: BLE001 - the converter raises several kinds
        raise ModelLoadError(
            f"{path}: uses opset {version}, and converting it to opset {DEFAULT_OPSET} "
            f"failed: {_first_line(exc)}"
        ) from exc


def _load_onnx_proto(path: Path) -> onnx.ModelProto:
    try:
        proto = onnx.load(str(path))
    except DecodeError as exc:
        raise ModelLoadError(
            f"{path}: not a valid ONNX file (truncated or corrupt: {_first_line(exc)})"
        ) from exc
    except (OSError, ValueError) as exc:  # external data missing, unreadable file
        raise ModelLoadError(f"{path}: cannot read the ONNX model: {_first_line(exc)}") from exc
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise ModelLoadError(f"{path}: not a valid ONNX file (it contains no graph)")
    _check_onnx(path, proto)
    return _cap_ir_version(_upgrade_opset(path, proto))


# --------------------------------------------------------------------------------- torch


def _zip_names(path: Path) -> list[str] | None:
    """Entries of a zip archive, None if the file is not a zip; ModelLoadError if corrupt."""
    with path.open("rb") as f:
        magic = f.read(4)
    if magic[:2] != b"PK":
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(
            f"{path}: corrupt or truncated zip archive ({_first_line(exc)})"
        ) from exc


def _torch_archive_format(names: list[str] | None) -> str:
    """'torchscript', 'torch.export' or 'torch.save' from a torch file's zip entries."""
    if names is None:
        return "torch.save"  # the legacy (pre-1.6) non-zip pickle format
    # Entries sit under a top-level folder named after the file.
    stripped = [name.split("/", 1)[1] if "/" in name else name for name in names]
    if any(s == "constants.pkl" or s.startswith("code/") for s in stripped):
        return "torchscript"
    if any(
        s in ("archive_format", "models/model.json") or s.startswith("serialized_exported_program")
        for s in stripped
    ):
        return "torch.export"
    return "torch.save"


def _find_state_dict(obj: object) -> Mapping[str, torch.Tensor] | None:
    """``obj`` if it is a state dict, or one nested under a usual checkpoint key."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return obj
        for key in ("state_dict", "model_state_dict", "model"):
            nested = obj.get(key)
            if isinstance(nested, Mapping):
                found = _find_state_dict(nested)
                if found is not None:
                    return found
    return None


def _torch_load(path: Path, trust_pickle: bool) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler names the class it refused; other failures are damage.
        if not trust_pickle and re.search(r"unsupported (global|class)", str(exc), re.IGNORECASE):
            raise ModelLoadError(
                f"{path}: contains pickled code (e.g. a whole nn.Module), which could run "
                "arbitrary code when loaded; pass --trust-pickle if you trust the file, or "
                "save a state dict and pass --arch"
            ) from exc
        raise ModelLoadError(f"{path}: corrupt torch file: {_first_line(exc)}") from exc
    except (AttributeError, ModuleNotFoundError) as exc:  # class of a pickled module is gone
        raise ModelLoadError(
            f"{path}: the pickled model needs code that cannot be imported: {_first_line(exc)}"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, ...
        raise ModelLoadError(
            f"{path}: not a readable torch file (truncated or corrupt: {_first_line(exc)})"
        ) from exc


def _load_state_dict(path: Path, state: Mapping[str, torch.Tensor], arch: str) -> torch.nn.Module:
    zoo = _zoo()
    if zoo is None:  # pragma: no cover - the zoo ships with the package
        raise ModelLoadError(f"{path}: --arch needs the model zoo, which cannot be imported")
    module = zoo.get(arch).build()
    expected = set(module.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected)):
            if keys:
                more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
                parts.append(f"{label}: {', '.join(keys[:4])}{more}")
        raise ModelLoadError(
            f"{path}: the state dict does not fit --arch {arch}; " + "; ".join(parts)
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # same keys, different shapes
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        more = f" (+{len(lines) - 3} more)" if len(lines) > 3 else ""
        detail = "; ".join(lines[:3]) or _first_line(exc)
        raise ModelLoadError(
            f"{path}: the state dict does not fit --arch {arch}: {detail}{more}"
        ) from exc
    return module


@dataclass(frozen=True)
class _ProgramInput:
    name: str
    dtype: np.dtype | None
    dynamic_batch: bool
    shape: Shape | None  # per sample; None when a non-batch dimension is symbolic


def _exported_inputs(path: Path, program: torch.export.ExportedProgram) -> list[_ProgramInput]:
    """The program's tensor inputs: name, dtype, whether the batch is symbolic, shape."""
    user_inputs = list(program.graph_signature.user_inputs)
    if not user_inputs:
        raise UnsupportedModelError(f"{path}: the exported program has no inputs")
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    found = []
    for name in user_inputs:
        node = placeholders.get(name)
        value = node.meta.get("val") if node is not None else None
        if not isinstance(value, torch.Tensor) or value.dim() < 1:
            found.append(_ProgramInput(name, None, True, None))
            continue
        dims = tuple(value.shape)
        dtype = torch.empty(0, dtype=value.dtype).numpy().dtype
        static = all(isinstance(d, int) for d in dims[1:])
        shape = tuple(int(d) for d in dims[1:]) if static else None
        found.append(_ProgramInput(name, dtype, not isinstance(dims[0], int), shape))
    return found


def _forward_names(module: torch.nn.Module) -> list[str]:
    """The names of ``forward``'s tensor arguments, in order (TorchScript's schema, or the
    Python signature's positional parameters)."""
    import inspect

    if isinstance(module, torch.jit.ScriptModule):
        try:
            return [arg.name for arg in module.forward.schema.arguments[1:]]
        except (AttributeError, RuntimeError):  # pragma: no cover - no forward method
            return []
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - a builtin forward
        return []
    return [
        p.name
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]


# ---------------------------------------------------------------------------------- load


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, not a model file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: the file is empty (0 bytes)")


DataArrays = np.ndarray | Mapping[str, np.ndarray]


def _data_array(data: DataArrays | None, name: str, single: bool) -> np.ndarray | None:
    """The calibration array for input ``name``: by name, or a single input's only array."""
    if data is None:
        return None
    if isinstance(data, Mapping):
        if name in data:
            return np.asarray(data[name])
        if single and "x" in data:
            return np.asarray(data["x"])
        return None
    return np.asarray(data) if single else None


def _check_input_shape_names(
    path: Path, input_shape: InputShapes | None, names: list[str]
) -> None:
    if isinstance(input_shape, Mapping):
        for name in input_shape:
            if name not in names:
                raise OptionError(
                    f"--input-shape names input '{name}', but {path} has inputs: "
                    + ", ".join(names)
                )
    elif input_shape is not None and len(names) > 1:
        raise OptionError(
            f"{path} has {len(names)} inputs ({', '.join(names)}): name each input's shape, "
            f"e.g. --input-shape {names[0]}:DIMS (per sample, without the batch)"
        )


def _resolve_shapes(
    path: Path,
    inputs: Sequence[tuple[str, Shape | None, str]],
    input_shape: InputShapes | None,
    zoo_shape: Shape | None,
    data: DataArrays | None,
    data_shape: Shape | None,
) -> dict[str, Shape]:
    """Per-sample shape of every input ``(name, shape the file records or None, why not)``:
    the user's, else the zoo entry's, the file's, the data's, in that order."""
    names = [name for name, _, _ in inputs]
    _check_input_shape_names(path, input_shape, names)
    single = len(inputs) == 1
    shapes = {}
    for name, recorded, why_not in inputs:
        given = input_shape.get(name) if isinstance(input_shape, Mapping) else (
            input_shape if single else None
        )
        array = _data_array(data, name, single)
        from_data = tuple(array.shape[1:]) if array is not None and array.ndim >= 1 else None
        for shape in (given, zoo_shape if single else None, recorded, from_data,
                      data_shape if single else None):
            if shape:
                shapes[name] = tuple(int(d) for d in shape)
                break
        else:
            if single:
                raise ModelLoadError(
                    f"cannot determine the input shape of {path}{why_not}: pass --input-shape"
                )
            raise ModelLoadError(
                f"cannot determine the shape of input '{name}' of {path}{why_not}: pass "
                f"--input-shape {name}:DIMS (per sample, without the batch)"
            )
    return shapes


def _torch_specs(
    names: list[str],
    dtypes: Mapping[str, np.dtype | None],
    shapes: Mapping[str, Shape],
    data: DataArrays | None,
) -> list[InputSpec]:
    """Example specs of a torch module's inputs: the program's dtype, else the data's (uint8
    pixels feed a float input), else float32."""
    single = len(names) == 1
    specs = []
    for name in names:
        dtype = dtypes.get(name)
        if dtype is None:
            array = _data_array(data, name, single)
            dtype = np.dtype(np.float32)
            if array is not None and array.dtype != np.uint8 and (
                array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer)
            ):
                dtype = array.dtype
        specs.append(InputSpec(name, np.dtype(dtype), shapes[name]))
    return specs


def load_model(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    input_shape: InputShapes | None = None,
    trust_pickle: bool = False,
    sample_input_shape: Shape | None = None,
    sample_inputs: DataArrays | None = None,
) -> LoadedModel:
    """Load the model at ``path`` and convert it to ONNX.

    ``arch`` names the zoo architecture of a state dict; ``input_shape`` is the per-sample
    input shape, or shapes by input name for a model with several inputs (see the module
    docstring). Where it gives none, an input's shape is the zoo entry's, the ONNX file's,
    the exported program's, or the calibration data's, in that order: ``sample_inputs`` (the
    data's arrays, by input name, or one array for a single input; their types also type a
    torch module's example inputs) or ``sample_input_shape``. Pickled modules are loaded only
    with ``trust_pickle``.
    """
    path = Path(path)
    _check_file(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ModelLoadError(
            f"{path}: unknown model format '{path.suffix or '(no extension)'}': expected "
            f"{', '.join(SUPPORTED_SUFFIXES)}"
        )
    zoo_shape = None
    if arch is not None:
        zoo = _zoo()
        if zoo is not None:
            zoo_shape = tuple(zoo.get(arch).input_shape)

    if suffix == ".onnx":
        return _load_onnx(path, input_shape, zoo_shape, sample_inputs, sample_input_shape)

    archive = _torch_archive_format(_zip_names(path))
    module: torch.nn.Module
    dtypes: dict[str, np.dtype | None] = {}
    recorded: dict[str, Shape | None] = {}
    if archive == "torchscript":
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError for most problems
            raise ModelLoadError(f"{path}: cannot load TorchScript: {_first_line(exc)}") from exc
        source_format = "torchscript"
        names = _forward_names(module)
    elif archive == "torch.export":
        try:
            program = torch.export.load(str(path))
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(
                f"{path}: cannot load the torch.export program: {_first_line(exc)}"
            ) from exc
        program_inputs = _exported_inputs(path, program)
        if not all(i.dynamic_batch for i in program_inputs):
            # Its graph has the example's batch size baked in (in reshapes, for instance).
            raise ModelLoadError(
                f"{path}: the torch.export program has a fixed batch size; export it again "
                "with a dynamic batch: torch.export.export(model, (x,), "
                "dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))"
            )
        try:  # guards would refuse batch sizes outside the range seen at export
            module = program.module(check_guards=False)
        except TypeError:  # pragma: no cover - torch without check_guards
            module = program.module()
        source_format = "torch.export"
        names = [i.name for i in program_inputs]
        dtypes = {i.name: i.dtype for i in program_inputs}
        recorded = {i.name: i.shape for i in program_inputs}
    else:
        obj = _torch_load(path, trust_pickle)
        state = _find_state_dict(obj)
        if isinstance(obj, torch.nn.Module):
            module, source_format = obj, "pickle"
        elif state is not None:
            if arch is None:
                raise ModelLoadError(
                    f"{path}: holds a state dict (weights only): pass --arch to say which "
                    f"architecture it belongs to (one of: {_zoo_names()})"
                )
            module, source_format = _load_state_dict(path, state, arch), "state_dict"
        else:
            kind = type(obj).__name__
            raise ModelLoadError(f"{path}: holds a {kind}, neither a state dict nor an nn.Module")
        names = _forward_names(module)
    if len(names) <= 1:
        names = names or [INPUT_NAME]
        # one input: an unnamed shape or data array is its, whatever forward calls it
        if isinstance(input_shape, Mapping) and list(input_shape) == [INPUT_NAME]:
            input_shape = input_shape[INPUT_NAME]
    shapes = _resolve_shapes(
        path,
        [(name, recorded.get(name), "") for name in names],
        input_shape,
        zoo_shape,
        sample_inputs,
        sample_input_shape,
    )
    _set_eval(module)
    specs = _torch_specs(names, dtypes, shapes, sample_inputs)
    if len(specs) == 1 and np.dtype(specs[0].dtype) == np.float32:
        proto = export_to_onnx(module, shapes[names[0]])
    else:
        proto = export_to_onnx(module, specs)
    inputs = graph_input_specs(proto)
    return LoadedModel(
        proto=proto,
        source=path,
        source_format=source_format,
        input_shape=tuple(inputs[0].shape or ()),  # type: ignore[arg-type]
        input_name=inputs[0].name,
        torch_module=module,
        inputs=inputs,
    )


def _load_onnx(
    path: Path,
    input_shape: InputShapes | None,
    zoo_shape: Shape | None,
    sample_inputs: DataArrays | None,
    sample_input_shape: Shape | None,
) -> LoadedModel:
    proto = _load_onnx_proto(path)
    values = _graph_inputs(proto)
    if not values:
        raise UnsupportedModelError(f"{path}: the model has no inputs")
    described = []
    for value in values:
        file_shape = _onnx_input_shape(value)
        static = None
        if file_shape and all(d is not None for d in file_shape):
            static = tuple(int(d) for d in file_shape)  # type: ignore[arg-type]
        symbolic = [i + 1 for i, d in enumerate(file_shape or ()) if d is None]
        why_not = f" (dimension {', '.join(map(str, symbolic))} is symbolic)" if symbolic else ""
        described.append((value.name, static, why_not))
    shapes = _resolve_shapes(
        path,
        described,
        input_shape,
        zoo_shape,
        sample_inputs,
        sample_input_shape,
    )
    for value in values:
        _fix_onnx_input(path, value, shapes[value.name])
    inputs = graph_input_specs(proto)
    return LoadedModel(
        proto=proto,
        source=path,
        source_format="onnx",
        input_shape=shapes[values[0].name],
        input_name=values[0].name,
        torch_module=None,
        inputs=inputs,
    )


# ---------------------------------------------------------------------------------- save


def _open_temp(directory: Path, name: str) -> tuple[Path, int]:
    """A new file beside the output; created with mode 0o666 so the umask applies as usual."""
    while True:
        temp = directory / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            return temp, os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue


def save_model(
    proto: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
) -> Path:
    """Write ``proto`` to ``path`` atomically (temp file in the same folder, then rename).

    Refuses to overwrite ``input_path``. Models over 1.8 GB keep their tensors in
    ``<name>.data`` beside the file. Returns ``path``.
    """
    path = Path(path)
    if input_path is not None and path.resolve() == Path(input_path).resolve():
        raise OptionError(f"output {path} is the input file; choose another -o")
    if path.is_dir():
        raise OptionError(f"output {path} is a directory; give a file name with -o")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OptionError(f"cannot create the folder of output {path}: {exc.strerror}") from exc
    temp, fd = _open_temp(path.parent, path.name)
    try:
        if proto.ByteSize() < EXTERNAL_DATA_THRESHOLD:
            with os.fdopen(fd, "wb") as f:
                f.write(proto.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
        else:
            os.close(fd)
            # save_model with external data rewrites the tensors it moves: work on a copy.
            large = onnx.ModelProto()
            large.CopyFrom(proto)
            onnx.save_model(
                large,
                str(temp),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=f"{path.name}.data",
            )
        os.replace(temp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        if isinstance(exc, OSError):
            raise OptionError(f"cannot write output {path}: {exc.strerror or exc}") from exc
        raise
    return path


def atomic_write_bytes(path: Path, content: bytes) -> None:
    """Write ``content`` to ``path`` through a temporary file in the same folder and a
    rename: a reader sees the old file or the new one, never half of either."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
