"""Unpack a GpuQTensor to a dense bf16 matrix on the GPU, for the prefill's tensor-core dot.

At 512 prompt tokens a prefill matmul is compute-bound, so re-reading the weight as bf16 once per
call costs little, provided the unpacking itself runs at memory speed: XLA's fusion of the jnp
dequantizer did not (about twice the bf16 dot's time: BENCHMARKS.md, "Prefill at 512 tokens").
This kernel dequantizes tiles in registers (layout.dequant_parts) and writes each part as a
contiguous run, so the result is dequantize_gpu_part_order's matrix: columns of each superblock in
the layout's part order, which x_part_order matches on the activation side.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .layout import GPU_LAYOUTS, SB, GpuQTensor, dequant_parts

DEFAULT_TILES = (32, 4, 4)   # (rows, superblocks, warps) per program


def _kernel(*refs, qtype, n_w, n_parts):
    w_refs, o_ref = refs[:n_w], refs[-1]
    parts = dequant_parts(qtype, [r[...] for r in w_refs], flat=False)
    for p in range(n_parts):
        o_ref[:, :, p] = parts[p].astype(o_ref.dtype)


def _fit(n: int, want: int) -> int:
    b = min(want, n)
    while n % b:
        b //= 2
    return b


@functools.partial(jax.jit, static_argnames=("dtype", "tiles", "interpret"))
def unpack(w: GpuQTensor, dtype=jnp.bfloat16, *, tiles: tuple | None = None,
           interpret: bool = False) -> jax.Array:
    """[rows, cols] dense matrix of w in part order (== layout.dequantize_gpu_part_order(w, dtype))."""
    bn, bs, num_warps = tiles or DEFAULT_TILES
    rows, cols = w.shape
    nsb = cols // SB
    bn, bs = _fit(rows, bn), _fit(nsb, bs)
    n_parts, a, b = GPU_LAYOUTS[w.qtype].part_shape   # each part's words of a superblock
    in_specs = [pl.BlockSpec((bn, bs) + p.shape[2:], lambda i, s, nd=p.ndim: (i, s) + (0,) * (nd - 2))
                for p in w.parts]
    out = pl.pallas_call(
        functools.partial(_kernel, qtype=w.qtype, n_w=len(w.parts), n_parts=n_parts),
        grid=(rows // bn, nsb // bs),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bn, bs, n_parts, a, b), lambda i, s: (i, s, 0, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((rows, nsb, n_parts, a, b), dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"unpack_{w.qtype.lower()}",
    )(*w.parts)
    return out.reshape(rows, cols)
