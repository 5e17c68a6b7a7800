"""onnxruntime sessions for compressor's models, with the custom-op library when a model needs it.

Models that use compressor's own ops (domain ``ai.compressor``) run in stock onnxruntime once the
compiled library is registered::

    so = onnxruntime.SessionOptions()
    so.register_custom_ops_library(compressor.runtime.library_path())

``session()`` does that by itself when the model needs it.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import onnx

from compressor.errors import RuntimeLibraryError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

# The op domain of compressor's custom ops. runtime_ext/CMakeLists.txt reads these two lines to
# generate the C++ constants, so this is the only place they are written.
OP_DOMAIN = "ai.compressor"
OP_DOMAIN_VERSION = 1

LIBRARY_NAME = "libcompressor_ops.so"
LIBRARY_ENV = "COMPRESSOR_OPS_LIBRARY"  # path of a library to use instead of the installed one

_HOW_TO_LOAD = (
    "so = onnxruntime.SessionOptions(); "
    "so.register_custom_ops_library(compressor.runtime.library_path()); "
    "onnxruntime.InferenceSession(model, so)"
)


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeLibraryError(
            "onnxruntime is not installed: pip install 'compressor[cpu]' (or '[gpu]')"
        ) from e
    return ort


def available_providers() -> list[str]:
    """Short names ('cpu', 'cuda') of the execution providers this onnxruntime offers."""
    offered = set(_ort().get_available_providers())
    return [short for short, full in PROVIDERS.items() if full in offered]


def _preload_blas() -> None:
    """Load scipy-openblas32's library globally, in case the RPATH of libcompressor_ops.so
    (``$ORIGIN/../../scipy_openblas32/lib``) does not reach it (e.g. another site dir)."""
    try:
        import scipy_openblas32
    except ImportError:
        return
    path = Path(scipy_openblas32.get_lib_dir()) / f"lib{scipy_openblas32.get_library()}.so"
    # The kernels call OpenBLAS from ORT's own worker threads, one GEMM per thread: without
    # this, OpenBLAS starts a pool of its own threads at load time that only spin. This copy of
    # OpenBLAS is ours alone (numpy has its own, already loaded), so the setting stays local.
    previous = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError:
        pass
    finally:
        if previous is None:
            del os.environ["OPENBLAS_NUM_THREADS"]
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = previous


def library_path() -> str:
    """Absolute path of the compiled custom-op library (``libcompressor_ops.so``).

    ``$COMPRESSOR_OPS_LIBRARY`` overrides the search; otherwise every entry of
    ``compressor.__path__`` is searched for ``lib/libcompressor_ops.so`` (an editable install
    puts it in site-packages, a wheel next to the Python files).
    Raises ``RuntimeLibraryError`` with how to fix it when the library is missing.
    """
    override = os.environ.get(LIBRARY_ENV)
    if override:
        if not Path(override).is_file():
            raise RuntimeLibraryError(
                f"{LIBRARY_ENV}={override} does not exist: point it at a built "
                f"{LIBRARY_NAME} or unset it to use the installed one"
            )
        _preload_blas()
        return str(Path(override).resolve())
    import compressor

    searched = []
    for entry in compressor.__path__:
        candidate = Path(entry) / "lib" / LIBRARY_NAME
        searched.append(str(candidate.parent))
        if candidate.is_file():
            _preload_blas()
            return str(candidate.resolve())
    raise RuntimeLibraryError(
        f"the custom-op library {LIBRARY_NAME} is not built (looked in {', '.join(searched)}): "
        "reinstall the package, which builds it with CMake: `pip install -e .` in the source "
        f"tree (or `make setup`), or set {LIBRARY_ENV} to a built library"
    )


def _as_proto(model) -> onnx.ModelProto | None:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.ModelProto.FromString(model)
    try:
        import onnx_ir as ir

        if isinstance(model, ir.Model):
            return ir.to_proto(model)
    except ImportError:  # pragma: no cover
        pass
    return None


def uses_custom_ops(model: onnx.ModelProto | str | os.PathLike | bytes) -> bool:
    """Whether ``model`` imports the ``ai.compressor`` domain or has a node in it."""
    proto = _as_proto(model)
    if proto is None:
        proto = onnx.load(str(model), load_external_data=False)
    if any(op.domain == OP_DOMAIN for op in proto.opset_import):
        return True

    def graph_uses(graph: onnx.GraphProto) -> bool:
        for node in graph.node:
            if node.domain == OP_DOMAIN:
                return True
            for attribute in node.attribute:
                if attribute.HasField("g") and graph_uses(attribute.g):
                    return True
                if any(graph_uses(g) for g in attribute.graphs):
                    return True
        return False

    return graph_uses(proto.graph) or any(
        node.domain == OP_DOMAIN for function in proto.functions for node in function.node
    )


def register_library(so) -> None:
    """Register the custom-op library with ``onnxruntime.SessionOptions`` ``so``."""
    so.register_custom_ops_library(library_path())


def explain_load_error(error: BaseException) -> RuntimeLibraryError | None:
    """If ``error`` is onnxruntime failing on one of our ops because the library was not
    registered, a ``RuntimeLibraryError`` saying how to load it; else ``None``."""
    message = str(error)
    if OP_DOMAIN not in message:
        return None
    if "is not a registered function/op" in message or "No opset import for domain" in message or (
        "Could not find an implementation" in message
    ):
        return RuntimeLibraryError(
            f"the model uses compressor's custom ops (domain {OP_DOMAIN}) but the custom-op "
            f"library is not registered with onnxruntime; load it with: {_HOW_TO_LOAD} "
            f"(or use compressor.runtime.session(model)). onnxruntime said: {message.strip()}"
        )
    return None


def inference_session(model, sess_options=None, providers=None):
    """``onnxruntime.InferenceSession`` that turns a missing custom-op library into a
    ``RuntimeLibraryError`` saying how to load it."""
    ort = _ort()
    try:
        return ort.InferenceSession(model, sess_options=sess_options, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph classes
        explained = explain_load_error(e)
        if explained is not None:
            raise explained from e
        raise


_SHARED_ARENA: bool | None = None  # None: not tried yet


def shared_cpu_arena() -> bool:
    """Register one CPU memory arena with onnxruntime's environment, once per process, for
    sessions made with ``shared_arena=True`` to allocate from (``session.use_env_allocators``).

    Each session otherwise grows an arena of its own from fresh pages on its first runs, and
    hands it back when it goes: a calibration walk runs a new session for every segment of
    the network, and on ResNet-50 at 224 x 224 the first runs of each took up to ten times the
    later ones (page faults on hundreds of MB). One arena, grown as requested and reused, is
    warm for every later session. ``shrink_shared_arena`` returns what it holds unused.
    Returns whether it is in place (False where onnxruntime refuses it)."""
    global _SHARED_ARENA
    if _SHARED_ARENA is None:
        ort = _ort()
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                     ort.OrtMemType.DEFAULT)
            # kSameAsRequested: grow by what a run asks for, not to the next power of two
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
            _SHARED_ARENA = True
        except Exception:  # noqa: BLE001 - onnxruntime raises its own Fail class
            _SHARED_ARENA = False
    return _SHARED_ARENA


def shrink_shared_arena() -> None:
    """Hand the shared arena's free memory back to the system (a run of a one-node session
    on it with onnxruntime's arena shrinkage on): what a walk's segments needed at most
    stays mapped otherwise, beside whatever runs next."""
    if not _SHARED_ARENA:
        return
    ort = _ort()
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "shrink",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    proto.ir_version = 8
    so = session_options(shared_arena=True)
    sess = inference_session(proto.SerializeToString(), sess_options=so,
                             providers=[PROVIDERS["cpu"]])
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    sess.run(None, {"x": np.zeros(1, np.float32)}, options)


def session_options(threads: int | None = None, spinning: bool = False,
                    shared_arena: bool = False):
    """Session options; spinning off by default so two sessions timed side by side do not
    steal each other's cores. ``shared_arena``: CPU tensors from the process's one arena
    (``shared_cpu_arena``), for many short-lived sessions run one after another."""
    ort = _ort()
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if shared_arena and shared_cpu_arena():
        so.add_session_config_entry("session.use_env_allocators", "1")
    so.log_severity_level = 3
    return so


def session(
    model: onnx.ModelProto | str | os.PathLike | bytes,
    provider: str = "cpu",
    threads: int | None = None,
    spinning: bool = False,
    shared_arena: bool = False,
):
    """An ``InferenceSession`` for ``model`` on ``provider`` ('cpu' or 'cuda').

    The custom-op library is registered when the model uses the ``ai.compressor`` domain.
    ``shared_arena``: see ``session_options``.
    """
    _ort()
    if provider not in PROVIDERS:
        raise RuntimeLibraryError(f"unknown provider '{provider}': choose cpu or cuda")
    if provider not in available_providers():
        raise RuntimeLibraryError(
            f"provider '{provider}' is not available in this onnxruntime "
            f"(has: {', '.join(available_providers())}); install 'compressor[gpu]' for cuda"
        )
    proto = _as_proto(model)
    if proto is not None:
        payload: bytes | str = (
            model if isinstance(model, bytes) else proto.SerializeToString()
        )
    else:
        payload = str(Path(model))
    so = session_options(threads, spinning, shared_arena)
    if uses_custom_ops(proto if proto is not None else payload):
        register_library(so)
    providers = [PROVIDERS[provider]]
    if provider == "cuda":
        providers.append(PROVIDERS["cpu"])
    return inference_session(payload, sess_options=so, providers=providers)
