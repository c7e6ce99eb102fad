"""kernel_matmul: the GPU route behind quant.matmul.matmul(x, w) (and normed_matmul_many /
swiglu_matmul, whose RMSNorm or SwiGLU gate the decode GEMV takes as a pre-op, kernels/xquant.py).

Decode (<= 8 activation rows): the Pallas GEMV on packed weights (GpuQTensor); dense weights use
XLA's dot unless REALIZAR_DENSE_GEMV=pallas.
Prefill (more rows), one of three routes (REALIZAR_PREFILL_GEMM, default the fastest measured):
- "unpack": a Pallas kernel unpacks the matrix to bf16 at memory speed, then XLA's tensor-core dot
  (the weight is re-read as bf16 once per call, which at 512 tokens costs less than the matmul);
- "xla": the same with the unpacking done by XLA from the jnp dequantizer;
- "pallas": kernels/gemm.py, dequantizing tiles in registers inside the GEMM.
The unpacked weight stays in the layout's part order and the activations are permuted to match, so
no gather touches the big matrix. Dense weights use XLA's dot for prefill. Anything else (a QTensor
of a type without a GPU layout) dequantizes and dots.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .gemm import gemm
from .gemv import apply_pre, fusable, gemv, gemv_multi, gemv_prepared, gemv_swiglu, interpret_mode, swiglu_fusable
from .layout import GpuQTensor, dequantize_gpu_part_order, x_part_order
from .qdot import FACTORED_QTYPES, Q8_ACT_QTYPES, x_q8_group
from .splitsum import SplitSum, as_parts
from .switches import switch
from .unpack import unpack
from .xquant import norm_x, norm_x_fusable

GEMV_MAX_ROWS = 8


def prefill_route() -> str:
    """REALIZAR_PREFILL_GEMM (see the module doc and switches.py)."""
    return switch("REALIZAR_PREFILL_GEMM")


def fused_gemv_applies(x: jax.Array, ws) -> bool:
    """REALIZAR_GEMV_FUSE=1 (the default) and gemv_multi can take ws (dense ones only where the
    dense GEMV applies)."""
    rows = x.size // x.shape[-1] if x.ndim else 0
    if any(not isinstance(w, GpuQTensor) for w in ws) and not all(
            isinstance(w, jax.Array) and dense_gemv_applies(x, w) for w in ws):
        return False
    return switch("REALIZAR_GEMV_FUSE") == "1" and fusable(tuple(ws), rows)


def _pre_operand(pre: str | None, other):
    """The pre-op's operand as the GEMV takes it: the norm weight as is, `up` as rows like x."""
    return other if pre != "swiglu" else other.reshape(-1, other.shape[-1])


def kernel_matmul_many(x: jax.Array, ws, *, pre: str | None = None, other=None, eps=None) -> list:
    """[kernel_matmul(x, w, ...) for w in ws] as one gemv_multi launch (fused_gemv_applies must hold)."""
    lead, cols = x.shape[:-1], x.shape[-1]
    ys = gemv_multi(x.reshape(-1, cols), tuple(ws), interpret=interpret_mode(), pre=pre,
                    other=_pre_operand(pre, other), eps=eps, out_dtype=x.dtype)
    return [y.reshape(*lead, y.shape[-1]).astype(x.dtype) for y in ys]


def residual_fuses() -> bool:
    """REALIZAR_RESIDUAL_ADD=prep (the default): the residual add may run in the norm's prep."""
    return switch("REALIZAR_RESIDUAL_ADD") == "prep"


def kernel_residual_normed_matmul_many(x: jax.Array, delta, norm, eps, ws) -> tuple:
    """(x + delta, [kernel_matmul(rms_norm(x + delta), w, ...) for w in ws]) for decode rows on packed
    weights (pre_fuses for each w): the add runs in the first launch's activation prep, which takes
    delta's K-split partials as they are (delta: a SplitSum or an array like x)."""
    lead, cols = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, cols)
    parts = as_parts(delta, x2.shape[0], cols)
    if len(ws) > 1 and fused_gemv_applies(x, ws):
        ys, x_new = gemv_multi(x2, tuple(ws), interpret=interpret_mode(), pre="norm", other=norm, eps=eps,
                               out_dtype=x.dtype, residual=parts)
    else:
        y, x_new = gemv(x2, ws[0], interpret=interpret_mode(), pre="norm", other=norm, eps=eps, residual=parts)
        ys = [y] + [gemv(x_new, w, interpret=interpret_mode(), pre="norm", other=norm, eps=eps) for w in ws[1:]]
    return x_new.reshape(x.shape), [y.reshape(*lead, y.shape[-1]).astype(x.dtype) for y in ys]


def dense_norm_fuses(x: jax.Array, ws) -> bool:
    """Whether kernel_dense_normed_matmul_many can take ws: dense weights on the Pallas GEMV's route
    (dense_gemv_applies), REALIZAR_GEMV_XPREP=fused, rows norm_x can tile."""
    return (bool(ws) and switch("REALIZAR_GEMV_XPREP") == "fused" and norm_x_fusable(x.shape[-1])
            and all(not hasattr(w, "qtype") and dense_gemv_applies(x, w) for w in ws))


def kernel_dense_normed_matmul_many(x: jax.Array, delta, norm, eps, ws) -> tuple:
    """(x + delta, [kernel_matmul(rms_norm(x + delta), w) for w in ws]) on dense weights
    (dense_norm_fuses): one norm_x launch adds delta's K-split partials as they are and normalizes,
    where XLA took three to five kernels; the GEMVs then read the normalized row (Q/K/V or gate/up as
    one launch where fused_gemv_applies). delta None: no add."""
    cols = x.shape[-1]
    x2 = x.reshape(-1, cols)
    parts = None if delta is None else as_parts(delta, x2.shape[0], cols)
    y, x_new = norm_x(x2, norm, eps, residual=parts, interpret=interpret_mode())
    y = y.reshape(x.shape)
    if len(ws) > 1 and fused_gemv_applies(y, ws):
        return x_new.reshape(x.shape), kernel_matmul_many(y, ws)
    ys = [kernel_matmul(y, w) for w in ws]
    return x_new.reshape(x.shape), ys


def takes_prepared_int8(rows: int, dtype, w) -> bool:
    """Whether w's decode GEMV reads int8 activations that another kernel wrote (gemv_prepared): a
    packed type with the int8 kernel, 1..4 rows of bf16/f16 activations, REALIZAR_GEMV_ACT=int8 and
    REALIZAR_GEMV_XPREP=fused."""
    return (isinstance(w, GpuQTensor) and w.qtype in Q8_ACT_QTYPES and w.qtype in FACTORED_QTYPES
            and dtype in (jnp.bfloat16, jnp.float16) and 0 < rows <= 4
            and switch("REALIZAR_GEMV_ACT") == "int8" and switch("REALIZAR_GEMV_XPREP") == "fused")


def swiglu_epilogue_applies(x: jax.Array, w_gate, w_up, w_down) -> bool:
    """Whether kernel_residual_normed_mlp can run the MLP with the SwiGLU gate in the gate/up launch
    (REALIZAR_SWIGLU=gemv, decode rows, <= 4 of them): packed gate/up/down on the int8 route, the
    launch writing the down GEMV's int8 activations; or dense ones on the Pallas GEMVs, after norm_x."""
    rows = x.size // x.shape[-1] if x.ndim else 0
    if switch("REALIZAR_SWIGLU") != "gemv" or not 0 < rows <= 4 or getattr(w_down, "ndim", 0) != 2:
        return False
    if all(isinstance(w, GpuQTensor) for w in (w_gate, w_up, w_down)):
        return (all(takes_prepared_int8(rows, x.dtype, w) for w in (w_gate, w_up, w_down))
                and fused_gemv_applies(x, (w_gate, w_up))
                and swiglu_fusable(w_gate, w_up, rows, x_q8_group(w_down.qtype)))
    return (dense_norm_fuses(x, (w_gate, w_up)) and fused_gemv_applies(x, (w_gate, w_up))
            and not hasattr(w_down, "qtype") and dense_gemv_applies(x, w_down)
            and swiglu_fusable(w_gate, w_up, rows, None))


def kernel_residual_normed_mlp(x: jax.Array, delta, norm, eps, w_gate, w_up, w_down) -> tuple:
    """(x + delta, the SwiGLU MLP of rms_norm(x + delta)) on the GPU's decode route
    (swiglu_epilogue_applies): one gemv_swiglu launch for gate, up and the gate, then the down GEMV.
    Packed weights: the launch takes the norm (and delta's K-split partials) in its int8 prep and
    writes the down GEMV's int8 activations. Dense: norm_x first, the launch writes the activation.
    The MLP output comes back as the down GEMV's K-split partials (a SplitSum)."""
    lead, cols = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, cols)
    parts = None if delta is None else as_parts(delta, x2.shape[0], cols)
    interpret = interpret_mode()
    if isinstance(w_down, GpuQTensor):
        res = gemv_swiglu(x2, w_gate, w_up, interpret=interpret, pre="norm", other=norm, eps=eps, residual=parts,
                          group=x_q8_group(w_down.qtype))
        (words, scales), x_new = res if parts is not None else (res, x2)
        y = gemv_prepared(words, scales, w_down, interpret=interpret, summed=False)
    else:
        normed, x_new = norm_x(x2, norm, eps, residual=parts, interpret=interpret)
        y = gemv(gemv_swiglu(normed, w_gate, w_up, interpret=interpret), w_down, summed=False)
    return x_new.reshape(x.shape), SplitSum(y.reshape(y.shape[0], *lead, y.shape[-1]), x.dtype)


def pre_fuses(x: jax.Array, w) -> bool:
    """Whether kernel_matmul(x, w, pre=...) can hand the pre-op to the GEMV (decode rows on a packed
    GPU weight) rather than running it first in XLA."""
    rows = x.size // x.shape[-1] if x.ndim else 0
    return isinstance(w, GpuQTensor) and 0 < rows <= GEMV_MAX_ROWS


def dense_gemv_applies(x: jax.Array, w: jax.Array) -> bool:
    """Whether a dense weight's matmul takes the Pallas GEMV: REALIZAR_DENSE_GEMV=pallas, decode rows,
    half-precision activations (float32 models keep XLA's exact HIGHEST-precision dot), a GPU."""
    rows = x.size // x.shape[-1] if x.ndim else 0
    return (jax.default_backend() == "gpu" and not interpret_mode() and 0 < rows <= GEMV_MAX_ROWS
            and x.dtype in (jnp.bfloat16, jnp.float16) and w.ndim == 2 and w.shape[1] % 256 == 0
            and switch("REALIZAR_DENSE_GEMV") == "pallas")


def _dense_dot(x2, w):
    return jax.lax.dot_general(x2, w.astype(x2.dtype), (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def kernel_matmul(x: jax.Array, w, *, pre: str | None = None, other=None, eps=None, summed: bool = True):
    """pre(x) [..., in] @ w.T -> [..., out] in x.dtype with float32 accumulation. A pre-op (gemv.apply_pre)
    goes to the GEMV when pre_fuses(x, w), else runs here first. summed=False: on the GEMV route the
    result is a SplitSum of the K splits' partials (for a residual add in the next norm's prep)."""
    if pre is not None and not pre_fuses(x, w):
        x, pre = apply_pre(x, pre, other, eps), None
    lead, cols = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, cols)
    M = x2.shape[0]
    if isinstance(w, GpuQTensor):
        if M <= GEMV_MAX_ROWS:
            y = gemv(x2, w, interpret=interpret_mode(), pre=pre, other=_pre_operand(pre, other), eps=eps,
                     summed=summed)
            if not summed:
                return SplitSum(y.reshape(y.shape[0], *lead, y.shape[-1]), x.dtype)
        else:
            route = prefill_route()
            if route == "pallas" and w.shape[0] % 16 == 0:
                y = gemm(x2, w, interpret=interpret_mode())
            elif route == "unpack":
                y = _dense_dot(x_part_order(x2, w.qtype), unpack(w, x2.dtype, interpret=interpret_mode()))
            else:
                y = _dense_dot(x_part_order(x2, w.qtype), dequantize_gpu_part_order(w, x2.dtype))
    elif hasattr(w, "qtype"):   # QTensor without a GPU layout
        from ..quant.dequant import dequantize
        y = _dense_dot(x2, dequantize(w, x2.dtype))
    elif dense_gemv_applies(x2, w):
        y = gemv(x2, w, summed=summed)
        if not summed:
            return SplitSum(y.reshape(y.shape[0], *lead, y.shape[-1]), x.dtype)
    else:
        y = _dense_dot(x2, w)
    return y.reshape(*lead, y.shape[-1]).astype(x.dtype)
