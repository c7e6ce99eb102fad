"""Quantized weights: the QType registry, the QTensor leaf, gguf-exact dequantization and numpy quantizers."""
from __future__ import annotations

from .types import (DENSE_QTYPES, QTYPE_SIZES, QTYPES, QUANTIZABLE_QTYPES, QUANTIZED_QTYPES, SUPPORTED_QTYPES,
                    QType, bits_per_weight, block_size, check_qtype, qtype_info, row_bytes, type_size)
from .dequant import dequantize, dequantize_blocks, dequantize_rows
from .qtensor import QTensor
from .quantize import quantize, quantize_qtensor

__all__ = ["QTensor", "dequantize", "dequantize_blocks", "dequantize_rows",
           "quantize", "quantize_qtensor", "QUANTIZABLE_QTYPES", "DENSE_QTYPES", "QUANTIZED_QTYPES",
           "SUPPORTED_QTYPES", "QTYPE_SIZES", "QTYPES", "QType", "bits_per_weight", "block_size", "check_qtype",
           "qtype_info", "row_bytes", "type_size"]
