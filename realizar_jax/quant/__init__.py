"""Quantized weights: the QTensor leaf, gguf-exact dequantization and numpy quantizers."""
from __future__ import annotations

from .dequant import dequantize, dequantize_blocks, dequantize_rows
from .qtensor import QTensor
from .quantize import QUANTIZABLE_QTYPES, quantize, quantize_qtensor
from .types import (DENSE_QTYPES, QTYPE_SIZES, QUANTIZED_QTYPES, SUPPORTED_QTYPES, bits_per_weight,
                    block_size, check_qtype, row_bytes, type_size)

__all__ = ["QTensor", "dequantize", "dequantize_blocks", "dequantize_rows",
           "quantize", "quantize_qtensor", "QUANTIZABLE_QTYPES", "DENSE_QTYPES", "QUANTIZED_QTYPES",
           "SUPPORTED_QTYPES", "QTYPE_SIZES", "bits_per_weight", "block_size", "check_qtype", "row_bytes",
           "type_size"]
