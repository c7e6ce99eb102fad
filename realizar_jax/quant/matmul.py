"""`matmul(x, w)`: the one entry model code uses for every weight, dense or quantized.

Model code never branches on how a weight is stored: it calls `matmul(x, w)` with w either a dense
[out, in] array or a QTensor of logical shape (out, in), and `embedding_lookup(table, ids)`.
Quantized weights go through `_quantized_matmul`, the single dispatch point that the Pallas kernels
replace; the reference here dequantizes to x's dtype and runs an XLA dot.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .dequant import dequantize, dequantize_rows
from .qtensor import QTensor
from ..kernels.layout import GpuQTensor, gather_rows
from ..kernels.dispatch import (dense_gemv_applies, dense_norm_fuses, fused_gemv_applies, kernel_dense_normed_matmul_many,
                                kernel_matmul, kernel_matmul_many, kernel_residual_normed_matmul_many,
                                kernel_residual_normed_mlp, pre_fuses, residual_fuses, swiglu_epilogue_applies)
from ..kernels.splitsum import total
from ..layers import rms_norm, swiglu


def _check(x, in_features: int, what: str) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"matmul needs floating activations, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != in_features:
        raise ValueError(f"matmul: x has shape {tuple(x.shape)} but {what} takes {in_features} input features")


def _dense_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w[out, in].T -> [..., out] in x's dtype, accumulated in float32."""
    w = w.astype(x.dtype)
    # float32 models are the exact reference: keep GPUs from silently using TF32 for them
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    y = lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                        precision=precision, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def _quantized_matmul(x: jax.Array, w: QTensor) -> jax.Array:
    """Reference path for packed weights: dequantize to x's dtype, then a dense dot.

    This is the dispatch point for quantized kernels: swap this function (same signature and
    result) for one that picks a fused dequant-matmul kernel by w.qtype and the shapes.
    """
    return _dense_matmul(x, dequantize(w, x.dtype))


def matmul_many(x, ws) -> list:
    """[matmul(x, w) for w in ws]: projections that share an input (Q/K/V, gate/up). With
    REALIZAR_GEMV_FUSE=1 on a GPU, decode-sized x on packed weights of one input width runs them as
    a single kernel launch."""
    x = jnp.asarray(x)
    if fused_gemv_applies(x, ws):
        for w in ws:
            _check(x, w.shape[1], repr(w))
        return kernel_matmul_many(x, ws)
    return [matmul(x, w) for w in ws]


def normed_matmul_many(x, norm_weight, eps: float, ws) -> list:
    """[matmul(rms_norm(x, norm_weight, eps), w) for w in ws]. On the GPU's decode path the RMSNorm
    runs inside the launch that quantizes the activations for the GEMV (kernels/xquant.py): one
    kernel where XLA needs four."""
    x, norm_weight = jnp.asarray(x), jnp.asarray(norm_weight)
    _check_norm(x, norm_weight, "normed_matmul_many")
    if all(pre_fuses(x, w) for w in ws):
        for w in ws:
            _check(x, w.shape[1], repr(w))
        if len(ws) > 1 and fused_gemv_applies(x, ws):
            return kernel_matmul_many(x, ws, pre="norm", other=norm_weight, eps=eps)
        return [kernel_matmul(x, w, pre="norm", other=norm_weight, eps=eps) for w in ws]
    if dense_norm_fuses(x, ws):   # dense bf16/f16 weights: the norm in one Pallas launch
        for w in ws:
            _check(x, w.shape[1], f"weight of shape {tuple(w.shape)}")
        return kernel_dense_normed_matmul_many(x, None, norm_weight, eps, ws)[1]
    return matmul_many(rms_norm(x, norm_weight, eps), ws)


def _check_norm(x, norm_weight, what: str) -> None:
    if norm_weight.shape != x.shape[-1:]:
        raise ValueError(f"{what}: the norm weight has shape {tuple(norm_weight.shape)} but x "
                         f"has {x.shape[-1]} features")


def residual_normed_matmul_many(x, delta, norm_weight, eps: float, ws) -> tuple:
    """A transformer block's residual add and the RMSNorm-ed projections after it:
    (x + delta, normed_matmul_many(x + delta, norm_weight, eps, ws)).

    delta: None (no add), an array like x, or what a matmul called with unsummed=True returned (a
    kernels.splitsum.SplitSum). On the GPU's decode path the add runs inside the launch that
    normalizes and quantizes the activations, taking the previous GEMV's K-split partials as they
    are: the kernel that added them to x is gone."""
    x, norm_weight = jnp.asarray(x), jnp.asarray(norm_weight)
    _check_norm(x, norm_weight, "residual_normed_matmul_many")
    if delta is None:
        return x, normed_matmul_many(x, norm_weight, eps, ws)
    if tuple(delta.shape) != x.shape:
        raise ValueError(f"residual_normed_matmul_many: delta {tuple(delta.shape)} does not match x {x.shape}")
    if residual_fuses() and all(pre_fuses(x, w) for w in ws):
        for w in ws:
            _check(x, w.shape[1], repr(w))
        return kernel_residual_normed_matmul_many(x, delta, norm_weight, eps, ws)
    if residual_fuses() and dense_norm_fuses(x, ws):
        for w in ws:
            _check(x, w.shape[1], f"weight of shape {tuple(w.shape)}")
        return kernel_dense_normed_matmul_many(x, delta, norm_weight, eps, ws)
    x = x + total(delta).astype(x.dtype)
    return x, normed_matmul_many(x, norm_weight, eps, ws)


def residual_normed_mlp(x, delta, norm_weight, eps: float, w_gate, w_up, w_down) -> tuple:
    """A SwiGLU MLP block after the residual add: (x + delta, matmul(swiglu(gate, up), w_down)) with
    gate, up = residual_normed_matmul_many(x, delta, norm_weight, eps, (w_gate, w_up))[1].

    The MLP output may come back as the down GEMV's K-split partials (a SplitSum), which only
    residual_normed_matmul_many takes. On the GPU's decode path the gate runs in the epilogue of the
    one launch that computes gate and up, which writes what the down GEMV reads (its int8
    activations for packed weights): the gate/up outputs and a launch per layer are gone."""
    x, norm_weight = jnp.asarray(x), jnp.asarray(norm_weight)
    _check_norm(x, norm_weight, "residual_normed_mlp")
    if delta is not None and tuple(delta.shape) != x.shape:
        raise ValueError(f"residual_normed_mlp: delta {tuple(delta.shape)} does not match x {x.shape}")
    if (delta is None or residual_fuses()) and swiglu_epilogue_applies(x, w_gate, w_up, w_down):
        for w in (w_gate, w_up):
            _check(x, w.shape[1], repr(w) if hasattr(w, "qtype") else f"weight of shape {tuple(w.shape)}")
        if w_gate.shape != w_up.shape or w_down.shape[1] != w_gate.shape[0]:
            raise ValueError(f"residual_normed_mlp: gate {tuple(w_gate.shape)}, up {tuple(w_up.shape)} and "
                             f"down {tuple(w_down.shape)} do not chain")
        return kernel_residual_normed_mlp(x, delta, norm_weight, eps, w_gate, w_up, w_down)
    x, (gate, up) = residual_normed_matmul_many(x, delta, norm_weight, eps, (w_gate, w_up))
    return x, swiglu_matmul(gate, up, w_down, unsummed=True)


def swiglu_matmul(gate, up, w, *, unsummed: bool = False):
    """matmul(swiglu(gate, up), w): the MLP's down projection, with the gate fused into the GEMV's
    activation quantization on the GPU's decode path. unsummed=True: where the GEMV splits K, the
    result may come back as its partial sums (a SplitSum), for residual_normed_matmul_many only."""
    gate, up = jnp.asarray(gate), jnp.asarray(up)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu_matmul: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} "
                         f"{up.dtype} must match")
    if pre_fuses(gate, w):
        _check(gate, w.shape[1], repr(w))
        return kernel_matmul(gate, w, pre="swiglu", other=up, summed=not unsummed)
    return (matmul_unsummed if unsummed else matmul)(swiglu(gate, up), w)


def matmul_unsummed(x, w):
    """matmul(x, w), or where the GPU's GEMV takes it, its K splits' float32 partial sums (a
    kernels.splitsum.SplitSum): for a result that only joins the residual stream, which
    residual_normed_matmul_many adds (inside the next norm's launch on the GPU)."""
    x = jnp.asarray(x)
    if pre_fuses(x, w) or (not hasattr(w, "qtype") and dense_gemv_applies(x, jnp.asarray(w))):
        _check(x, w.shape[1], repr(w) if hasattr(w, "qtype") else f"weight of shape {tuple(w.shape)}")
        return kernel_matmul(x, w, summed=False)
    return matmul(x, w)


def matmul(x, w) -> jax.Array:
    """x [..., in] times a weight w [out, in] (dense array or QTensor) -> x @ w.T, [..., out], x.dtype."""
    x = jnp.asarray(x)
    if isinstance(w, GpuQTensor):  # packed GPU layout: Pallas GEMV / dequant + dot (kernels/)
        _check(x, w.shape[1], repr(w))
        return kernel_matmul(x, w)
    if isinstance(w, QTensor):
        _check(x, w.shape[1], repr(w))
        return _quantized_matmul(x, w)
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"matmul: weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    _check(x, w.shape[1], f"weight of shape {tuple(w.shape)}")
    if dense_gemv_applies(x, w):   # bf16 decode on a GPU with REALIZAR_DENSE_GEMV=pallas
        return kernel_matmul(x, w)
    return _dense_matmul(x, w)


def embedding_lookup(table, ids, dtype=None) -> jax.Array:
    """Rows `ids` (any int shape S) of an embedding table [vocab, dim] -> S + (dim,).

    A QTensor table is gathered packed and only those rows dequantized. dtype defaults to the
    table's dtype (float32 for a QTensor). Out-of-range ids are clamped.
    """
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"embedding ids must be integers, got {ids.dtype}")
    if isinstance(table, GpuQTensor):
        return gather_rows(table, ids, jnp.float32 if dtype is None else dtype)
    if isinstance(table, QTensor):
        return dequantize_rows(table, ids, jnp.float32 if dtype is None else dtype)
    table = jnp.asarray(table)
    rows = jnp.take(table, ids, axis=0, mode="clip")
    return rows if dtype is None else rows.astype(dtype)
