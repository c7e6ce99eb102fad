"""Quantization of float arrays into GGUF blocks through the QType registry's numpy encoders
(encoders.py, which says how each type is computed and how it relates to llama.cpp's reference)."""
from __future__ import annotations

import math

import numpy as np

from .types import QUANTIZABLE_QTYPES, check_qtype, qtype_info, row_bytes

_F16_MAX = 65504.0   # the largest finite float16: a type with f16 scale fields cannot hold more


def quantize(array, qtype: str) -> np.ndarray:
    """Quantize float values [..., cols] (cols a multiple of the block size) to uint8 [..., row_bytes].

    Dense types are passed through as their little-endian bytes (BF16 rounded to nearest even).
    Raises ValueError for non-finite values, and for |x| > 65504 with any type that stores f16.
    """
    q = qtype_info(qtype)
    if q.quantize is None:
        raise ValueError(f"cannot quantize to {q.name} (can: {', '.join(QUANTIZABLE_QTYPES)})")
    x = np.ascontiguousarray(array, dtype=np.float32)
    if x.ndim < 1:
        raise ValueError("quantize needs at least one axis")
    nbytes = row_bytes(q.name, x.shape[-1])
    if x.size:
        check_values(float(np.abs(x).max()), q.name)
    lead = x.shape[:-1]
    out = q.quantize(x.reshape(math.prod(lead), x.shape[-1]))
    return np.ascontiguousarray(out).reshape(*lead, nbytes)


def check_values(amax: float, qtype: str) -> None:
    """ValueError unless the largest magnitude `amax` of the values (NaN or inf when any is) fits `qtype`."""
    q = qtype_info(qtype)
    if not math.isfinite(amax):
        raise ValueError(f"cannot quantize non-finite values to {q.name}")
    if q.f16_offsets and amax > _F16_MAX:
        raise ValueError(f"values beyond +-{_F16_MAX} do not fit the f16 fields of {q.name}")


def quantize_qtensor(array, qtype: str):
    """A 2-D float array [rows, cols] as a QTensor of `qtype` on the default device."""
    import jax.numpy as jnp

    from .qtensor import QTensor
    x = np.asarray(array)
    if x.ndim != 2:
        raise ValueError(f"quantize_qtensor needs a 2-D array, got shape {x.shape}")
    return QTensor(jnp.asarray(quantize(x, qtype)), check_qtype(qtype), tuple(int(s) for s in x.shape))
