"""realizar-jax: LLM inference on JAX for GGUF and safetensors models."""
from __future__ import annotations

from .config import ModelConfig
from .errors import (DamagedFileError, InsufficientMemoryError, MissingTensorError, ModelFormatError,
                     RealizarError, ShapeMismatchError, UnknownArchitectureError, UnsupportedQuantError)

__version__ = "0.1.0"

# imported on first use, so `import realizar_jax` (and the CLI's inspect/convert) does not start JAX
_LAZY = {"load": "engine", "Model": "engine", "Generation": "generate", "GenerationStats": "generate",
         "KernelConfig": "kernels.tuning"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'realizar_jax' has no attribute {name!r}")


def default_model_path():
    """The small LLaMA embedded in the package (trained on Python's standard library)."""
    from pathlib import Path
    return Path(__file__).parent / "data" / "default.gguf"


__all__ = ["load", "Model", "Generation", "GenerationStats", "KernelConfig", "default_model_path", "ModelConfig",
           "ModelFormatError", "DamagedFileError", "MissingTensorError", "ShapeMismatchError",
           "UnknownArchitectureError", "UnsupportedQuantError", "InsufficientMemoryError", "RealizarError",
           "__version__"]
