"""onnxruntime sessions for compressor's models, with the custom-op library when a model needs it."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from compressor.errors import RuntimeLibraryError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


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


def session_options(threads: int | None = None, spinning: bool = False):
    """Session options; spinning off by default so two sessions timed side by side do not
    steal each other's cores."""
    ort = _ort()
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    return so


def session(
    model: onnx.ModelProto | str | os.PathLike | bytes,
    provider: str = "cpu",
    threads: int | None = None,
    spinning: bool = False,
):
    """An ``InferenceSession`` for ``model`` on ``provider`` ('cpu' or 'cuda')."""
    ort = _ort()
    if provider not in PROVIDERS:
        raise RuntimeLibraryError(f"unknown provider '{provider}': choose cpu or cuda")
    if provider not in available_providers():
        raise RuntimeLibraryError(
            f"provider '{provider}' is not available in this onnxruntime "
            f"(has: {', '.join(available_providers())}); install 'compressor[gpu]' for cuda"
        )
    if isinstance(model, onnx.ModelProto):
        payload: bytes | str = model.SerializeToString()
    elif isinstance(model, bytes):
        payload = model
    else:
        payload = str(Path(model))
    so = session_options(threads, spinning)
    providers = [PROVIDERS[provider]]
    if provider == "cuda":
        providers.append(PROVIDERS["cpu"])
    return ort.InferenceSession(payload, sess_options=so, providers=providers)
