"""The quantization types realizar-jax reads, spelled as gguf spells them ('Q4_K', 'F16', ...).

Block geometry comes from gguf-py's GGML_QUANT_SIZES, so it cannot drift from the file format:
a row of `cols` values is `cols // block_size` blocks of `type_size` bytes each.
"""
from __future__ import annotations

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import UnsupportedQuantError

DENSE_QTYPES: tuple[str, ...] = ("F32", "F16", "BF16")
QUANTIZED_QTYPES: tuple[str, ...] = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                                     "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                                     "IQ4_NL", "IQ4_XS")
SUPPORTED_QTYPES: tuple[str, ...] = DENSE_QTYPES + QUANTIZED_QTYPES

# qtype -> (values per block, bytes per block)
QTYPE_SIZES: dict[str, tuple[int, int]] = {
    name: tuple(GGML_QUANT_SIZES[GGMLQuantizationType[name]]) for name in SUPPORTED_QTYPES}


def qtype_name(qtype) -> str:
    """Normalise a qtype given as a str, a GGMLQuantizationType or its integer id to gguf spelling."""
    if isinstance(qtype, GGMLQuantizationType):
        return qtype.name
    if isinstance(qtype, int):
        try:
            return GGMLQuantizationType(qtype).name
        except ValueError:
            raise UnsupportedQuantError(f"unknown ggml type id {qtype}") from None
    return str(qtype).upper()


def check_qtype(qtype) -> str:
    """Return the gguf spelling of `qtype`, or raise UnsupportedQuantError if we cannot read it."""
    name = qtype_name(qtype)
    if name not in QTYPE_SIZES:
        raise UnsupportedQuantError(
            f"quantization type {name} is not supported (supported: {', '.join(SUPPORTED_QTYPES)})")
    return name


def block_size(qtype) -> int:
    return QTYPE_SIZES[check_qtype(qtype)][0]


def type_size(qtype) -> int:
    return QTYPE_SIZES[check_qtype(qtype)][1]


def row_bytes(qtype, cols: int) -> int:
    """Bytes of one packed row of `cols` values; ValueError if cols is not a whole number of blocks."""
    bs, ts = QTYPE_SIZES[check_qtype(qtype)]
    if cols % bs:
        raise ValueError(f"row length {cols} is not a multiple of the {qtype_name(qtype)} block size {bs}")
    return cols // bs * ts


def bits_per_weight(qtype) -> float:
    bs, ts = QTYPE_SIZES[check_qtype(qtype)]
    return 8.0 * ts / bs
