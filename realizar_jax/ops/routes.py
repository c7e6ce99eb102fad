"""The route table: which kernel runs an op, keyed by (op, rows bucket, weight kind).

Each op in ops/ asks `route(op, rows, w)` once. A route is a function that runs the op on the Pallas
kernels or returns None where its kernels do not take these shapes; then, as when no route is listed,
the op runs its jnp reference. Kernels never fall back themselves.

Rows buckets (activation rows of the call, thresholds from the kernels' shapes and BENCHMARKS.md):
"gemv" 1..4 rows (the int8 GEMV, the multi-matrix and SwiGLU launches), "gemv8" 5..8 (packed
weights: kernels/qmatmul.py, as "mm"; dense: the GEMV's tensor-core kernel), "mm" 9..MM_ROWS (a
batched decode step: kernels/qmatmul.py dequantizes weight tiles in registers for the tensor
cores), "gemm" more (prefill: unpack the packed weight to bf16
once, then XLA's dot, which is compute-bound there).
Weight kinds: "gpu" (GpuQTensor), "dense" (a bf16/f16 array; float32 keeps XLA's exact dot),
"packed" (a QTensor whose type has no GPU layout: always the reference).

The KernelConfig in force is the static argument of the jitted entry point (models/), made current
for the trace with `using(cfg)`; only ops/ read it.
"""
from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

from ..kernels import attention as attention_kernels, paged_attention as paged_attention_kernels
from ..kernels.gemv import (fusable, gemv, gemv_multi, gemv_prepared, gemv_swiglu, swiglu_fusable,
                            takes_prepared)
from ..kernels.layout import GpuQTensor, x_part_order
from ..kernels.qmatmul import matmul_packed, supports as qmatmul_supports
from ..kernels.qdot import x_q8_group
from ..kernels.splitsum import SplitSum, as_parts
from ..kernels.tuning import KernelConfig
from ..kernels.unpack import unpack
from ..kernels.xquant import merge_quantize_x, norm_x, norm_x_fusable

_current: contextvars.ContextVar[KernelConfig] = contextvars.ContextVar("kernel_config", default=KernelConfig())


@contextlib.contextmanager
def using(cfg: KernelConfig):
    """Make cfg the KernelConfig of the ops traced inside the block."""
    token = _current.set(cfg)
    try:
        yield cfg
    finally:
        _current.reset(token)


def current() -> KernelConfig:
    return _current.get()


def rows_of(x) -> int:
    return x.size // x.shape[-1] if x.ndim else 0


MM_ROWS = 64   # the most activation rows the packed tensor-core matmul takes (BENCHMARKS.md)


def rows_bucket(rows: int) -> str:
    if rows <= 0:
        return "gemm"
    return "gemv" if rows <= 4 else "gemv8" if rows <= 8 else "mm" if rows <= MM_ROWS else "gemm"


def weight_kind(w) -> str:
    if isinstance(w, GpuQTensor):
        return "gpu"
    return "packed" if hasattr(w, "qtype") else "dense"


# ---- the routes ---------------------------------------------------------------------------------

def _dense_ok(x, w, cfg: KernelConfig) -> bool:
    """The Pallas GEMV on a dense weight: compiled (not interpreted), half-precision activations
    (float32 models keep XLA's exact dot), whole superblocks."""
    return (not cfg.interpret and x.dtype in (jnp.bfloat16, jnp.float16) and getattr(w, "ndim", 0) == 2
            and not hasattr(w, "qtype") and w.shape[1] % 256 == 0)


def _rows(x):
    return x.reshape(-1, x.shape[-1])


def _out(y, x, unsummed: bool):
    """A GEMV's result in x's leading shape: [S, B, out] partials as a SplitSum, else [B, out] in x's dtype."""
    if unsummed:
        return SplitSum(y.reshape(y.shape[0], *x.shape[:-1], y.shape[-1]), x.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1]).astype(x.dtype)


def linear_gemv(x, w, *, unsummed=False):
    cfg = current()
    if weight_kind(w) == "dense" and not _dense_ok(x, w, cfg):
        return None
    return _out(gemv(_rows(x), w, cfg=cfg, summed=not unsummed), x, unsummed)


def linear_qmatmul(x, w, *, unsummed=False):
    if not qmatmul_supports(w, x.dtype):
        return None
    return _out(matmul_packed(_rows(x), w, cfg=current(), summed=not unsummed), x, unsummed)


def linear_unpack_dot(x, w, *, unsummed=False):
    cfg = current()
    x2 = _rows(x)
    y = jax.lax.dot_general(x_part_order(x2, w.qtype), unpack(w, x2.dtype, interpret=cfg.interpret),
                            (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return y.reshape(*x.shape[:-1], y.shape[-1]).astype(x.dtype)


def _fusable(x, ws, cfg) -> bool:
    if weight_kind(ws[0]) == "dense" and not all(_dense_ok(x, w, cfg) for w in ws):
        return False
    return len(ws) > 1 and fusable(tuple(ws), rows_of(x), cfg)


def linear_many_gemv(x, ws):
    cfg = current()
    if not _fusable(x, ws, cfg):
        return None
    ys = gemv_multi(_rows(x), tuple(ws), cfg=cfg, out_dtype=x.dtype)
    return [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys]


def norm_linear_gemv(x, delta, norm, eps, ws):
    """(x + delta, [rms_norm(x + delta) @ w.T for w in ws]) with the add and the norm in the GEMV's
    int8 prep (one launch for all of ws where they fuse)."""
    cfg = current()
    if not all(weight_kind(w) == "gpu" for w in ws):
        return None
    x2 = _rows(x)
    parts = None if delta is None else as_parts(delta, *x2.shape)
    kw = dict(cfg=cfg, pre="norm", other=norm, eps=eps)
    if _fusable(x, ws, cfg):
        ys = gemv_multi(x2, tuple(ws), out_dtype=x.dtype, residual=parts, **kw)
        ys, x_new = ys if parts is not None else (ys, x2)
    else:
        first = gemv(x2, ws[0], residual=parts, **kw)
        y, x_new = first if parts is not None else (first, x2)
        ys = [y] + [gemv(x_new, w, **kw) for w in ws[1:]]
    return x_new.reshape(x.shape), [y.reshape(*x.shape[:-1], y.shape[-1]).astype(x.dtype) for y in ys]


def norm_linear_dense(x, delta, norm, eps, ws):
    """(x + delta, the normed projections) on dense weights: one norm_x launch adds delta's K-split
    partials and normalizes, then the GEMVs read the normalized row."""
    cfg = current()
    if not (norm_x_fusable(x.shape[-1]) and all(_dense_ok(x, w, cfg) for w in ws)):
        return None
    x2 = _rows(x)
    parts = None if delta is None else as_parts(delta, *x2.shape)
    normed, x_new = norm_x(x2, norm, eps, cfg=cfg, residual=parts)
    normed = normed.reshape(x.shape)
    ys = linear_many_gemv(normed, ws) if len(ws) > 1 else None
    if ys is None:
        ys = [linear_gemv(normed, w) for w in ws]
    return x_new.reshape(x.shape), ys


def mlp_swiglu_gemv(x, delta, norm, eps, w_gate, w_up, w_down, activation):
    """The SwiGLU MLP with the gate in the epilogue of the one gate/up launch, which writes the down
    GEMV's int8 activations; the add and the norm in that launch's prep. -> (x + delta, SplitSum)."""
    cfg = current()
    rows = rows_of(x)
    if (activation != "silu" or w_gate.shape != w_up.shape or w_down.shape[1] != w_gate.shape[0]
            or not all(takes_prepared(w, rows, x.dtype, cfg) for w in (w_gate, w_up, w_down))
            or not swiglu_fusable(w_gate, w_up, rows, x_q8_group(w_down.qtype), cfg)):
        return None
    x2 = _rows(x)
    parts = None if delta is None else as_parts(delta, *x2.shape)
    res = gemv_swiglu(x2, w_gate, w_up, cfg=cfg, pre="norm", other=norm, eps=eps, residual=parts,
                      group=x_q8_group(w_down.qtype))
    (words, scales), x_new = res if parts is not None else (res, x2)
    y = gemv_prepared(words, scales, w_down, cfg=cfg, summed=False)
    return x_new.reshape(x.shape), _out(y, x, True)


def mlp_swiglu_dense(x, delta, norm, eps, w_gate, w_up, w_down, activation):
    """The dense SwiGLU MLP: norm_x (with the add), the gate/up launch with the gate in its epilogue,
    the down GEMV handing over its K-split partials."""
    cfg = current()
    rows = rows_of(x)
    if (activation != "silu" or not norm_x_fusable(x.shape[-1])
            or not all(_dense_ok(x, w, cfg) for w in (w_gate, w_up, w_down))
            or w_down.shape[1] != w_gate.shape[0] or not swiglu_fusable(w_gate, w_up, rows, None, cfg)):
        return None
    x2 = _rows(x)
    parts = None if delta is None else as_parts(delta, *x2.shape)
    normed, x_new = norm_x(x2, norm, eps, cfg=cfg, residual=parts)
    y = gemv(gemv_swiglu(normed, w_gate, w_up, cfg=cfg), w_down, cfg=cfg, summed=False)
    return x_new.reshape(x.shape), _out(y, x, True)


def decode_attention_kernel(q, k, v, k_cache, v_cache, pos, cos, sin, scale, layer, wo, project, *,
                            window=None, softcap=None, sinks=None):
    """RoPE, the cache write and attention in one launch per layer; the splits merged inside the o
    projection's int8 prep where wo takes prepared int8s, else by XLA, then `project` (ops' linear).
    Declines a sliding window, soft-capped logits, attention sinks and partial RoPE (the kernel has none
    of them)."""
    return _attention_then_o(attention_kernels.decode_attention_update, (q, k, v, k_cache, v_cache, pos, cos, sin),
                             scale, layer, wo, project, window, softcap, sinks)


def paged_decode_attention_kernel(q, k, v, k_pages, v_pages, tables, pos, cos, sin, scale, layer, wo, project, *,
                                  window=None, softcap=None, sinks=None):
    """decode_attention_kernel through block tables (kernels/paged_attention.py); declines the same."""
    return _attention_then_o(paged_attention_kernels.paged_decode_attention_update,
                             (q, k, v, k_pages, v_pages, tables, pos, cos, sin), scale, layer, wo, project, window,
                             softcap, sinks)


def _attention_then_o(kernel, args, scale, layer, wo, project, window, softcap, sinks):
    cfg = current()
    q, cos = args[0], args[-2]
    B, Hq, D = q.shape
    if window is not None or softcap is not None or sinks is not None or cos.shape[-1] != D:
        return None
    int8 = takes_prepared(wo, B, q.dtype, cfg) and (Hq * D) % x_q8_group(wo.qtype) == 0
    res = kernel(*args, scale, layer, cfg=cfg, merge=not int8)
    if res is None:
        return None
    out, k_cache, v_cache = res
    if int8:
        o, m, l = out
        words, scales = merge_quantize_x(o, m, l, x_q8_group(wo.qtype), heads_per_kv=Hq // k_cache.shape[2],
                                         dtype=q.dtype, cfg=cfg)
        y = SplitSum(gemv_prepared(words, scales, wo, cfg=cfg, summed=False), q.dtype)
    else:
        y = project(out.reshape(B, -1), wo)
    return y, k_cache, v_cache


ROUTES = {
    ("linear", "gemv", "gpu"): linear_gemv,
    ("linear", "gemv8", "gpu"): linear_qmatmul,
    ("linear", "mm", "gpu"): linear_qmatmul,
    ("linear", "gemm", "gpu"): linear_unpack_dot,
    ("linear", "gemv", "dense"): linear_gemv,
    ("linear", "gemv8", "dense"): linear_gemv,
    ("linear_many", "gemv", "gpu"): linear_many_gemv,
    ("linear_many", "gemv", "dense"): linear_many_gemv,
    ("norm_linear", "gemv", "gpu"): norm_linear_gemv,
    ("norm_linear", "gemv", "dense"): norm_linear_dense,
    ("norm_linear", "gemv8", "dense"): norm_linear_dense,
    ("mlp", "gemv", "gpu"): mlp_swiglu_gemv,
    ("mlp", "gemv", "dense"): mlp_swiglu_dense,
    # weight kind: the o projection's (the attention runs the kernel for either)
    **{("decode_attention", rows, kind): decode_attention_kernel
       for rows in ("gemv", "gemv8", "mm", "gemm") for kind in ("gpu", "dense", "packed")},
    **{("paged_decode_attention", rows, kind): paged_decode_attention_kernel
       for rows in ("gemv", "gemv8", "mm", "gemm") for kind in ("gpu", "dense", "packed")},
}


def route(op: str, rows: int, w):
    """The kernel route of `op` for this many activation rows and this weight, or None (the reference)."""
    if not current().pallas:
        return None
    return ROUTES.get((op, rows_bucket(rows), weight_kind(w)))
