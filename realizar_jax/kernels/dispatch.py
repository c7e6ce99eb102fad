"""kernel_matmul: the GPU route behind quant.matmul.matmul(x, w).

Decode (<= 8 activation rows): Pallas GEMV on packed weights (GpuQTensor). Prefill (more rows):
dequantize the packed matrix to x's dtype (bf16) in XLA and use the tensor-core dot (the weight is re-read as
bf16 once per call, which at 512 tokens costs less than the matmul itself). The weight stays in the
layout's part order and the activations are permuted to match, so no gather touches the big matrix.
Dense weights use XLA's dot. Anything else (a QTensor of a type without a GPU layout) dequantizes and dots.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from .gemm import gemm
from .gemv import gemv, interpret_mode
from .layout import GpuQTensor, dequantize_gpu_part_order, x_part_order

GEMV_MAX_ROWS = 8
# Prefill route for packed weights: "pallas" (kernels/gemm.py, dequantizes tiles in registers) or
# "xla" (dequantize the whole matrix to bf16, then XLA's dot). Read when a function is traced.
PREFILL_ENV = "REALIZAR_PREFILL_GEMM"
PREFILL_DEFAULT = "xla"


def prefill_route() -> str:
    route = os.environ.get(PREFILL_ENV, PREFILL_DEFAULT)
    if route not in ("pallas", "xla"):
        raise ValueError(f"{PREFILL_ENV} must be 'pallas' or 'xla', got {route!r}")
    return route


def _dense_dot(x2, w):
    return jax.lax.dot_general(x2, w.astype(x2.dtype), (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def kernel_matmul(x: jax.Array, w) -> jax.Array:
    """x [..., in] @ w.T -> [..., out] in x.dtype with float32 accumulation."""
    lead, cols = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, cols)
    M = x2.shape[0]
    if isinstance(w, GpuQTensor):
        if M <= GEMV_MAX_ROWS:
            y = gemv(x2, w, interpret=interpret_mode())
        elif prefill_route() == "pallas" and w.shape[0] % 16 == 0:
            y = gemm(x2, w, interpret=interpret_mode())
        else:
            y = _dense_dot(x_part_order(x2, w.qtype), dequantize_gpu_part_order(w, x2.dtype))
    elif hasattr(w, "qtype"):   # QTensor without a GPU layout
        from ..quant.dequant import dequantize
        y = _dense_dot(x2, dequantize(w, x2.dtype))
    else:
        y = _dense_dot(x2, w)
    return y.reshape(*lead, y.shape[-1]).astype(x.dtype)
