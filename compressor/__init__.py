"""compressor: compress trained models into smaller, faster ONNX graphs for onnxruntime."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("compressor")
except _metadata.PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
