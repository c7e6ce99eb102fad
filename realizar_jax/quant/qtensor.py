"""QTensor: a weight matrix kept as the file's packed quantized blocks, on the device.

A QTensor stands for a logical [rows, cols] matrix (rows = output features, cols = input features,
the GGUF/ggml layout: each row is a run of blocks along the input dimension). `data` is uint8
[rows, cols // block_size * type_size]; qtype (gguf spelling, e.g. 'Q4_K') and shape are static
pytree metadata, so jit specializes on them and model code never sees them.

A stack of mixture-of-experts matrices is one QTensor with a leading experts axis: shape
(experts, rows, cols), data uint8 [experts, rows, row_bytes], so the chosen experts' blocks can be
gathered (and only those dequantized) by expert id.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import jax


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QTensor:
    data: jax.Array  # uint8 [rows, row_bytes], or [experts, rows, row_bytes]
    qtype: str = field(metadata=dict(static=True))
    shape: tuple[int, ...] = field(metadata=dict(static=True))  # (rows, cols) or (experts, rows, cols)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.size)

    def __repr__(self) -> str:
        return f"QTensor({self.qtype}, shape={self.shape}, nbytes={self.nbytes})"
