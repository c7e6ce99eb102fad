"""What every reader returns: a `ModelSource`, a validated ModelConfig with the file's tensors
as `TensorSource`s."""
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
