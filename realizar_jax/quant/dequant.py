"""Dequantization of packed GGUF blocks: the QType registry's jnp decoders (decoders.py) applied to
rows, whole QTensors or gathered rows of one (an embedding lookup never expands the whole table)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .qtensor import QTensor
from .types import qtype_info, row_bytes


def dequantize_blocks(data, qtype: str, dtype=jnp.float32) -> jax.Array:
    """uint8 [..., row_bytes] packed rows of `qtype` -> [..., cols] values in `dtype`.

    qtype is static (a Python str); the leading axes are kept. Float32 output is bit-identical to
    gguf.quants.dequantize; other dtypes are that float32 result rounded once.
    """
    q = qtype_info(qtype)
    data = jnp.asarray(data)
    if data.dtype != jnp.uint8:
        raise TypeError(f"{q.name} data must be uint8 bytes, got {data.dtype}")
    if data.ndim < 1:
        raise ValueError(f"{q.name} data must have at least one axis of bytes")
    nbytes, ts = data.shape[-1], q.type_size
    if nbytes % ts:
        raise ValueError(f"{nbytes} bytes per row is not a whole number of {q.name} blocks of {ts} bytes")
    lead = data.shape[:-1]
    out = q.dequant(data.reshape(*lead, nbytes // ts, ts))
    return out.reshape(*lead, nbytes // ts * q.block_size).astype(dtype)


def _check_qtensor(q: QTensor) -> None:
    *lead, cols = q.shape
    want = (*lead, row_bytes(q.qtype, cols))
    if tuple(q.data.shape) != want:
        raise ValueError(f"{q!r}: data has shape {tuple(q.data.shape)}, expected {want} for {q.qtype}")


def dequantize(q: QTensor, dtype=jnp.float32) -> jax.Array:
    """The whole QTensor as a dense [rows, cols] (or [experts, rows, cols]) array of `dtype`."""
    _check_qtensor(q)
    return dequantize_blocks(q.data, q.qtype, dtype)


def dequantize_rows(q: QTensor, row_ids, dtype=jnp.float32) -> jax.Array:
    """Rows `row_ids` (any int shape S) of q, dequantized -> S + (cols,).

    Gathers the packed rows first, so a quantized embedding table is never expanded whole.
    Out-of-range ids are clamped (ids are validated by the tokenizer, not here).
    """
    _check_qtensor(q)
    rows = jnp.take(q.data, jnp.asarray(row_ids), axis=0, mode="clip")
    return dequantize_blocks(rows, q.qtype, dtype)
