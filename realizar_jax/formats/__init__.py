"""File formats: read headers and metadata, memory-map tensors lazily. No JAX here.

Every reader returns a `ModelSource`: a validated ModelConfig plus the file's tensors as
`TensorSource`s (memory-mapped or read on use: nothing copied yet).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import ModelConfig


@dataclass(frozen=True)
class TensorSource:
    name: str  # the tensor's name in the file
    qtype: str  # gguf spelling: 'F32', 'F16', 'BF16', 'Q8_0', 'Q4_K', ...
    shape: tuple[int, ...]  # logical shape in numpy order: [rows=out, cols=in] for matrices
    # Dense types: an array of `shape` in float32/float16/ml_dtypes.bfloat16. Quantized types: uint8
    # [rows, row_bytes] of packed blocks (rows = prod(shape[:-1])). GGUF: an np.memmap; safetensors: a
    # hf_dir.LazyTensor (shape, dtype, nbytes; read through the library by np.asarray or slicing).
    data: np.ndarray = field(repr=False)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


@dataclass(frozen=True)
class ModelSource:
    path: Path
    format: str  # 'gguf' or 'hf'
    config: ModelConfig
    tensors: dict[str, TensorSource] = field(repr=False)
    metadata: dict = field(repr=False)  # GGUF key/values, or the HF config.json (+ tokenizer files)


def open_model(path) -> ModelSource:
    """Open a .gguf file or an HF folder (config.json + *.safetensors) and validate its header."""
    path = Path(path)
    if path.is_dir():
        from .hf_dir import open_hf_dir
        return open_hf_dir(path)
    from .gguf_file import open_gguf
    return open_gguf(path)
