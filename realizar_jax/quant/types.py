"""The quantization types realizar-jax reads, spelled as gguf spells them ('Q4_K', 'F16', ...): one
QType per type in one table, QTYPES. Block geometry comes from gguf-py's GGML_QUANT_SIZES, so it
cannot drift from the file format: a row of `cols` values is `cols // block_size` blocks of
`type_size` bytes each. A new type is one entry below (its jnp decoder in decoders.py, its
encoder in encoders.py if we write it); a type the GPU kernels read also gets a GpuLayout in
kernels/layout.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import ml_dtypes
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as GT

from ..errors import UnsupportedQuantError
from .decoders import (dequant_bf16, dequant_f16, dequant_f32, dequant_iq4_nl, dequant_iq4_xs, dequant_mxfp4, dequant_q2_k,
                      dequant_q3_k, dequant_q4_0, dequant_q4_1, dequant_q4_k, dequant_q5_0, dequant_q5_1,
                      dequant_q5_k, dequant_q6_k, dequant_q8_0)
from .encoders import ENCODERS, HOST_ONLY, host_encoder


@dataclass(frozen=True)
class QType:
    name: str                     # gguf spelling
    dequant: Callable             # jnp: uint8 [..., nb, type_size] -> float32 [..., nb, block_size] (or [..., nb])
    f16_offsets: tuple[int, ...]  # byte offsets of the block's f16 fields (F16: the value itself)
    dtype: type | None = None     # dense types: the numpy dtype of one value
    random_scale: tuple[float, float] | None = None   # synth.py: scales that give weights ~1e-2
    e8m0_offsets: tuple[int, ...] = ()   # byte offsets of E8M0 exponent fields (scale 2^(e - 128) in ggml's MXFP4)
    block_size: int = field(init=False)   # values per block
    type_size: int = field(init=False)    # bytes per block
    # numpy: float32 [N, cols] -> uint8 [N, row_bytes] (encoders.ENCODERS; the device runs the same
    # code, device_quant.py); None: read-only
    quantize: Callable | None = field(init=False)

    def __post_init__(self):
        bs, ts = GGML_QUANT_SIZES[GT[self.name]]
        object.__setattr__(self, "block_size", bs)
        object.__setattr__(self, "type_size", ts)
        quantize = host_encoder(self.name, bs, ts) if self.name in ENCODERS else HOST_ONLY.get(self.name)
        object.__setattr__(self, "quantize", quantize)

    @property
    def is_dense(self) -> bool:
        return self.dtype is not None

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


QTYPES: dict[str, QType] = {q.name: q for q in (
    QType("F32", dequant_f32, (), np.float32),
    QType("F16", dequant_f16, (0,), np.float16),
    QType("BF16", dequant_bf16, (), ml_dtypes.bfloat16),
    QType("Q4_0", dequant_q4_0, (0,), random_scale=(2e-3, 4e-3)),
    QType("Q4_1", dequant_q4_1, (0, 2)),
    QType("Q5_0", dequant_q5_0, (0,)),
    QType("Q5_1", dequant_q5_1, (0, 2)),
    QType("Q8_0", dequant_q8_0, (0,), random_scale=(2e-4, 4e-4)),
    QType("Q2_K", dequant_q2_k, (80, 82)),
    QType("Q3_K", dequant_q3_k, (108,)),
    QType("Q4_K", dequant_q4_k, (0, 2), random_scale=(5e-5, 1.5e-4)),
    QType("Q5_K", dequant_q5_k, (0, 2), random_scale=(3e-5, 8e-5)),
    QType("Q6_K", dequant_q6_k, (208,), random_scale=(1e-5, 3e-5)),
    QType("IQ4_NL", dequant_iq4_nl, (0,)),
    QType("IQ4_XS", dequant_iq4_xs, (0,)),
    QType("MXFP4", dequant_mxfp4, (), random_scale=(2.0 ** -9, 2.0 ** -8), e8m0_offsets=(0,)),
)}

DENSE_QTYPES: tuple[str, ...] = tuple(n for n, q in QTYPES.items() if q.is_dense)
QUANTIZED_QTYPES: tuple[str, ...] = tuple(n for n, q in QTYPES.items() if not q.is_dense)
SUPPORTED_QTYPES: tuple[str, ...] = tuple(QTYPES)
QUANTIZABLE_QTYPES: tuple[str, ...] = tuple(n for n, q in QTYPES.items() if q.quantize is not None)
# qtype -> (values per block, bytes per block)
QTYPE_SIZES: dict[str, tuple[int, int]] = {n: (q.block_size, q.type_size) for n, q in QTYPES.items()}


def qtype_info(qtype, *, path=None, tensor: str | None = None) -> QType:
    """The QType of `qtype` (its gguf name in any case, a GGMLQuantizationType or its integer id), or
    UnsupportedQuantError (naming path and tensor when given) if we cannot read it."""
    if isinstance(qtype, int):   # GGMLQuantizationType is an IntEnum
        try:
            qtype = GT(qtype).name
        except ValueError:
            raise UnsupportedQuantError(f"unknown ggml type id {qtype}", path=path, tensor=tensor) from None
    q = QTYPES.get(str(qtype).upper())
    if q is None:
        raise UnsupportedQuantError(f"quantization type {str(qtype).upper()} is not supported (supported: "
                                    f"{', '.join(SUPPORTED_QTYPES)})", path=path, tensor=tensor)
    return q


def check_qtype(qtype) -> str:
    """Return the gguf spelling of `qtype`, or raise UnsupportedQuantError if we cannot read it."""
    return qtype_info(qtype).name


def block_size(qtype) -> int:
    return qtype_info(qtype).block_size


def type_size(qtype) -> int:
    return qtype_info(qtype).type_size


def row_bytes(qtype, cols: int) -> int:
    """Bytes of one packed row of `cols` values; ValueError if cols is not a whole number of blocks."""
    q = qtype_info(qtype)
    if cols % q.block_size:
        raise ValueError(f"row length {cols} is not a multiple of the {q.name} block size {q.block_size}")
    return cols // q.block_size * q.type_size


def bits_per_weight(qtype) -> float:
    return qtype_info(qtype).bits_per_weight
