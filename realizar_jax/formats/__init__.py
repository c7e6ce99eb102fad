"""File formats: read headers and metadata, memory-map tensors lazily. No JAX here.

Every reader returns a `ModelSource`: a validated ModelConfig plus the file's tensors as
`TensorSource`s (memory-mapped or read on use: nothing copied yet).
"""
from __future__ import annotations

import os
from pathlib import Path

from .source import ModelSource, TensorSource

__all__ = ["ModelSource", "TensorSource", "open_model"]


def open_model(path) -> ModelSource:
    """Open a .gguf file or an HF folder (config.json + *.safetensors) and validate its header."""
    path = Path(path)
    if not os.path.lexists(path):
        from ..errors import ModelFormatError
        raise ModelFormatError("no such file or folder", path=path)
    if path.is_dir():
        from .hf_dir import open_hf_dir
        return open_hf_dir(path)
    from .gguf_file import open_gguf
    return open_gguf(path)
