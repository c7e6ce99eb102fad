"""Prefill GEMM over packed weights: dequantize a weight tile to bf16 in registers, tensor-core dot.

Grid (M tiles, row tiles), M fastest, so the programs that share one packed weight tile run next to
each other and read it from L2 rather than HBM. Each program walks all of K in steps of BS
superblocks: it loads the tile of every layout array, dequantizes it with layout.dequant_parts (the
function the GEMV and the jnp path use) and adds one bf16 dot per part against the matching slice
of the activations, split once with layout.split_x. Accumulation is float32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .layout import SB, GpuQTensor, dequant_parts, split_x

# (M rows per program, weight rows per program, superblocks per K step, warps, stages)
DEFAULT_TILES = (64, 64, 2, 4, 2)


def _kernel(*refs, qtype, n_w, bm, bn, bs, tiles):
    w_refs, x_refs, o_ref = refs[:n_w], refs[n_w:-1], refs[-1]
    j, i = pl.program_id(0), pl.program_id(1)
    ms, rows = pl.ds(j * bm, bm), pl.ds(i * bn, bn)

    def body(t, acc):
        ks = pl.ds(t * bs, bs)
        loaded = [r[(rows, ks) + (slice(None),) * (len(r.shape) - 2)] for r in w_refs]
        for w, xr in zip(dequant_parts(qtype, loaded), x_refs):   # [bn, bs, P] float32 each
            P = w.shape[-1]
            xt = xr[ms, ks, :].reshape(bm, bs * P).astype(jnp.bfloat16)
            acc = acc + jax.lax.dot_general(xt, w.reshape(bn, bs * P).astype(jnp.bfloat16),
                                            (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return acc

    o_ref[...] = jax.lax.fori_loop(0, tiles, body, jnp.zeros((bm, bn), jnp.float32))


def _fit(n: int, want: int) -> int:
    b = min(want, n)
    while n % b:
        b //= 2
    return b


@functools.partial(jax.jit, static_argnames=("tiles", "interpret"))
def gemm(x: jax.Array, w: GpuQTensor, *, tiles: tuple | None = None, interpret: bool = False):
    """x [M, in] times a packed w [out, in] -> [M, out] float32 (bf16 products, f32 accumulation)."""
    bm, bn, bs, num_warps, num_stages = tiles or DEFAULT_TILES
    rows, cols = w.shape
    nsb = cols // SB
    M = x.shape[0]
    bm = max(16, min(bm, 1 << (M - 1).bit_length()))   # tensor-core tiles are at least 16 rows
    Mp = -(-M // bm) * bm
    xp = jnp.pad(x, ((0, Mp - M), (0, 0))) if Mp != M else x
    xs = split_x(xp, w.qtype)
    bn, bs = max(16, _fit(rows, bn)), _fit(nsb, bs)
    if rows % bn:
        raise ValueError(f"gemm: {rows} output rows are not a multiple of 16")
    kernel = functools.partial(_kernel, qtype=w.qtype, n_w=len(w.parts), bm=bm, bn=bn, bs=bs,
                               tiles=nsb // bs)
    out = pl.pallas_call(
        kernel,
        grid=(Mp // bm, rows // bn),
        out_specs=pl.BlockSpec((bm, bn), lambda j, i: (j, i)),
        out_shape=jax.ShapeDtypeStruct((Mp, rows), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"gemm_{w.qtype.lower()}",
    )(*w.parts, *xs)
    return out[:M]
