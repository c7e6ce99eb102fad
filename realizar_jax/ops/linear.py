"""Linear ops on weights of every storage: `linear(x, w)`, `linear_many(x, ws)`, `embedding(table, ids)`.

w is a dense [out, in] array, a QTensor (the file's packed blocks) or a GpuQTensor (the packed GPU
layout). Each op asks the route table once (ops/routes.py) and otherwise runs its reference here:
dequantize to x's dtype, then an XLA dot accumulated in float32. A result may come back as a
kernels' SplitSum (the K splits' partial sums) only where the caller asked for `unsummed=True`: a
delta for the residual stream (ops/fused.py's Stream adds it in the next norm's launch).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ..kernels.layout import GpuQTensor, dequantize_gpu, gather_rows
from ..kernels.splitsum import SplitSum
from ..quant.dequant import dequantize, dequantize_rows
from ..quant.qtensor import QTensor
from .routes import route, rows_of


def describe(w) -> str:
    return repr(w) if hasattr(w, "qtype") else f"weight of shape {tuple(w.shape)}"


def check_input(x, w) -> None:
    """TypeError/ValueError naming the weight unless x [..., in] can multiply w [out, in]."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"linear needs floating activations, got {x.dtype}")
    if getattr(w, "ndim", 0) != 2:
        raise ValueError(f"linear: weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    if x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"linear: x has shape {tuple(x.shape)} but {describe(w)} takes {w.shape[1]} input features")


def dense_weight(w, dtype) -> jax.Array:
    """w as a dense [out, in] array of `dtype`: the reference's view of any storage."""
    if isinstance(w, GpuQTensor):
        return dequantize_gpu(w, dtype)
    if isinstance(w, QTensor):
        return dequantize(w, dtype)
    return jnp.asarray(w).astype(dtype)


def reference_linear(x, w) -> jax.Array:
    """x [..., in] @ w.T -> [..., out] in x's dtype, accumulated in float32."""
    # float32 models are the exact reference: keep GPUs from silently using TF32 for them
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    y = lax.dot_general(x, dense_weight(w, x.dtype), (((x.ndim - 1,), (1,)), ((), ())),
                        precision=precision, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def linear(x, w, *, unsummed: bool = False):
    """x [..., in] times a weight w [out, in] -> x @ w.T, [..., out] in x's dtype. unsummed=True: the
    result may be a SplitSum, for a delta that only joins the residual stream."""
    x = jnp.asarray(x)
    check_input(x, w)
    kernel = route("linear", rows_of(x), w)
    y = kernel(x, w, unsummed=unsummed) if kernel is not None else None
    return reference_linear(x, w) if y is None else y


def linear_many(x, ws) -> list:
    """[linear(x, w) for w in ws]: projections that share an input (Q/K/V, gate/up), as one kernel
    launch where the route takes them together."""
    x = jnp.asarray(x)
    for w in ws:
        check_input(x, w)
    kernel = route("linear_many", rows_of(x), ws[0])
    ys = kernel(x, ws) if kernel is not None else None
    return [linear(x, w) for w in ws] if ys is None else ys


def summed(y) -> jax.Array:
    """A result as an array: a SplitSum's total, anything else as it is."""
    return y.total() if isinstance(y, SplitSum) else y


def embedding(table, ids, dtype=None) -> jax.Array:
    """Rows `ids` (any int shape S) of an embedding table [vocab, dim] -> S + (dim,).

    A packed table is gathered packed and only those rows dequantized. dtype defaults to the
    table's dtype (float32 for a packed one). Out-of-range ids are clamped.
    """
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"embedding ids must be integers, got {ids.dtype}")
    if isinstance(table, GpuQTensor):
        return gather_rows(table, ids, jnp.float32 if dtype is None else dtype)
    if isinstance(table, QTensor):
        return dequantize_rows(table, ids, jnp.float32 if dtype is None else dtype)
    rows = jnp.take(jnp.asarray(table), ids, axis=0, mode="clip")
    return rows if dtype is None else rows.astype(dtype)
