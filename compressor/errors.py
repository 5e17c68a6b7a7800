"""The errors compressor raises for problems a user can act on.

Every message names the thing at fault (file, layer, option) so the CLI can print it as one
line and exit non-zero; anything that is not a ``CompressionError`` is a bug and keeps its
traceback.
"""

from __future__ import annotations


class CompressionError(Exception):
    """Base class: a problem with the user's input, options or environment."""

    exit_code = 1


class OptionError(CompressionError):
    """An option is missing, out of range or contradicts another one."""

    exit_code = 2


class ModelLoadError(CompressionError):
    """A model file is missing, corrupt, truncated or of an unknown format."""


class DataError(CompressionError):
    """Calibration or evaluation data is missing, malformed or does not fit the model."""


class UnsupportedModelError(CompressionError):
    """The model uses a structure compressor cannot handle (and cannot skip)."""


class PassError(CompressionError):
    """A compression pass failed; the message names the pass."""

    def __init__(self, pass_name: str, message: str):
        super().__init__(f"{pass_name}: {message}")
        self.pass_name = pass_name


class VerificationError(CompressionError):
    """The compressed model failed a check (onnx.checker, onnxruntime load or run)."""


class RuntimeLibraryError(CompressionError):
    """onnxruntime or the compiled custom-op library is missing or cannot be loaded."""
