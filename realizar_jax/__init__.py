"""realizar-jax: LLM inference on JAX for GGUF and safetensors models."""
from __future__ import annotations

from .config import ModelConfig
from .errors import (DamagedFileError, InsufficientMemoryError, MissingTensorError, ModelFormatError,
                     RealizarError, ShapeMismatchError, UnknownArchitectureError, UnsupportedQuantError)

__version__ = "0.1.0"


def default_model_path():
    """The small LLaMA embedded in the package (trained on Python's standard library)."""
    from pathlib import Path
    return Path(__file__).parent / "data" / "default.gguf"


def load(path, dtype=None, max_seq_len=None, **kwargs):
    """Load a .gguf file or an HF model folder; see engine.Model."""
    from .engine import load as _load
    return _load(path, dtype=dtype, max_seq_len=max_seq_len, **kwargs)


__all__ = ["load", "default_model_path", "ModelConfig", "ModelFormatError", "DamagedFileError", "MissingTensorError",
           "ShapeMismatchError", "UnknownArchitectureError", "UnsupportedQuantError",
           "InsufficientMemoryError", "RealizarError", "__version__"]
