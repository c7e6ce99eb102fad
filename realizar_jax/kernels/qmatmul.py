"""Batched decode matmul on packed weights: tensor cores fed by tiles dequantized in registers.

Between the GEMV (a few activation rows, dot products on the ALUs) and the prefill GEMM (unpack the
whole matrix to bf16 in HBM, then XLA's dot), a decode step of many sequences must read each weight
once and multiply it against every row. A program here owns BN output features and BM rows of x and
walks K in steps of BS superblocks: it dequantizes the weight tile in registers (layout.dequant_parts,
shared with the unpack kernel and the jnp reference), rounds it to x's dtype and makes it the left
operand of the tensor-core dot, so the weights never pass through HBM unpacked. x is split into the
layout's parts once per call (split_x, small) into one array [M, parts, nsb * P], so a K step loads
a plain [BM, BS * P] tile per part and each part is one dot [BN, BS * P] x [BS * P, BM].

K splits fill the SMs when there are few (feature, row) tiles, as in the GEMV; their partial sums
[S, M, N] are added by XLA, or by the consumer (summed=False: the next RMSNorm's prep).

Q4_K with int8 activations (KernelConfig.int8_activations, as the GEMV) takes an integer kernel
instead, as llama.cpp's MMQ does: x is rounded to int8 per group of 32 (one XLA fusion), the
weights' 4-bit quants are read as bytes (the layout's words viewed as uint8: natural value order,
so x needs no split) and each 32-value sub-block is one int8 x int8 -> int32 tensor-core dot; its
scale, x's scale and the sub-block's min are applied to the [BN, BM] result, not to every weight.
That is ~3 instructions per weight value against ~9 for the dequantize-to-bf16 kernel
(BENCHMARKS.md: the Nsight Compute counts).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .layout import GPU_LAYOUTS, SB, GpuQTensor, dequant_parts, split_x
from .qdot import _f16_half
from .tuning import KernelConfig

N_SM = 132
# (features per program, rows of x per program, superblocks per K step, warps, stages) by the padded
# row count they serve (the smallest cap >= it). The x tile is the larger operand per K step (BM x BS
# x 512 bytes against BN x BS x ~150 for Q4_K), so stages x that must stay inside the 227 KiB of
# shared memory. KernelConfig.tiles key "QMM_<type>_<cap>" overrides one (BENCHMARKS.md: the probe).
TILES = {16: (64, 16, 2, 4, 3), 32: (64, 32, 1, 4, 4), 64: (64, 64, 1, 4, 4), 256: (128, 64, 1, 8, 3)}
MIN_ROWS = 16   # the tensor cores' smallest tile: fewer rows of x are padded to it
# The integer Q4_K kernel's tiles (features, rows, 1, warps, stages) by row cap; key "QMM8_Q4_K_<cap>".
INT8_TILES = {16: (64, 16, 1, 4, 3), 32: (64, 32, 1, 4, 3), 64: (64, 64, 1, 4, 3), 256: (128, 64, 1, 8, 3)}
INT8_GROUP = 32   # x's int8 scale group: one Q4_K sub-block


def row_cap(m_padded: int) -> int:
    return next((c for c in sorted(TILES) if c >= m_padded), max(TILES))


def tiles_for(cfg: KernelConfig, qtype: str, m_padded: int) -> tuple:
    cap = row_cap(m_padded)
    return cfg.tile(f"QMM_{qtype}_{cap}", TILES[cap])


def int8_tiles_for(cfg: KernelConfig, m_padded: int) -> tuple:
    cap = row_cap(m_padded)
    return cfg.tile(f"QMM8_Q4_K_{cap}", INT8_TILES[cap])


def takes_int8(w, cfg: KernelConfig) -> bool:
    """Whether matmul_packed runs the integer kernel on w: Q4_K with int8 activations asked for."""
    return w.qtype == "Q4_K" and cfg.int8_activations


def supports(w, x_dtype) -> bool:
    """Whether matmul_packed takes this weight: a GPU-layout tensor with whole superblocks, half-
    precision activations (float32 models keep the exact reference)."""
    return (isinstance(w, GpuQTensor) and w.qtype in GPU_LAYOUTS and w.shape[1] % SB == 0
            and jnp.dtype(x_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)))


def _pow2_at_most(n: int, most: int) -> int:
    """The largest power of two <= most that divides n."""
    d = 1 << (max(1, min(most, n)).bit_length() - 1)
    while n % d:
        d //= 2
    return d


def plan(rows: int, nsb: int, m_padded: int, tile: tuple, target_programs: int = 2 * N_SM) -> tuple:
    """(bn, bm, bs, splits): the tile fitted to the shapes and the fewest K splits that give
    target_programs programs (or as many as the K steps allow)."""
    bn, bm, bs = _pow2_at_most(rows, tile[0]), min(tile[1], m_padded), _pow2_at_most(nsb, tile[2])
    steps, tiles = nsb // bs, (rows // bn) * (m_padded // bm)
    splits = 1
    for s in range(1, steps + 1):
        if steps % s == 0:
            splits = s
            if tiles * s >= target_programs:
                break
    return bn, bm, bs, splits


def _dot_t(a, b, out=jnp.float32):
    """a [m, k] @ b [n, k].T -> [m, n] (float32, or int32 for int8 operands) on the tensor cores."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=out)


def _kernel(*refs, qtype, n_w, bn, bm, bs, steps):
    w_refs, x_ref, o_ref = refs[:n_w], refs[n_w], refs[-1]
    i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    features, xrows = pl.ds(i * bn, bn), pl.ds(j * bm, bm)

    def body(t, acc):
        k = s * steps + t
        blocks = pl.ds(k * bs, bs)
        loaded = [r[(features, blocks) + (slice(None),) * (len(r.shape) - 2)] for r in w_refs]
        for part, w in enumerate(dequant_parts(qtype, loaded)):        # [bn, bs, P] float32 each
            width = bs * w.shape[-1]
            xt = x_ref[xrows, part, pl.ds(k * width, width)]            # [bm, bs * P]
            acc = acc + _dot_t(w.reshape(bn, width).astype(xt.dtype), xt)
        return acc

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bn, bm), jnp.float32))
    o_ref[...] = acc.T


def quantize_rows(x: jax.Array):
    """x [M, cols] -> (int8 [M, cols / 32, 32], scale float32 [M, cols / 32], the group's sum of
    the rounded values times its scale): per group of 32, q = round-half-even(v * 127 / absmax), as
    the GEMV's xquant kernels round."""
    M, cols = x.shape
    v = x.astype(jnp.float32).reshape(M, cols // INT8_GROUP, INT8_GROUP)
    amax = jnp.max(jnp.abs(v), axis=-1)
    inv = jnp.where(amax > 0, 127.0 / jnp.where(amax > 0, amax, 1.0), 0.0)
    q = jnp.clip(jnp.round(v * inv[..., None]), -127, 127)
    scale = amax / 127.0
    return q.astype(jnp.int8), scale, scale * jnp.sum(q, axis=-1)


def _kernel_q4k_int8(qs_ref, meta_ref, dm_ref, xq_ref, dx_ref, xs_ref, o_ref, *, bn, bm, steps):
    """One (feature tile, row tile, K split): per superblock k and 32-byte chunk j, the low and
    high nibbles are sub-blocks 2j and 2j+1; each is an int8 dot against x's group 8k + 2j + h,
    scaled by d * sc[bn] x dx[bm], minus dmin * m[bn] x (dx * sum of x's int8s)[bm]."""
    i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    features, xrows = pl.ds(i * bn, bn), pl.ds(j * bm, bm)

    def body(t, acc):
        k = s * steps + t
        dm = dm_ref[features, k]                                   # [bn] int32: f16 d | f16 dmin << 16
        d, dmin = _f16_half(dm, False), _f16_half(dm, True)
        for c in range(4):
            meta = meta_ref[features, k, c]                        # bytes: sc 2c, sc 2c+1, m 2c, m 2c+1
            b = qs_ref[features, k, c, :]                          # [bn, 32] uint8
            for h in range(2):
                q = ((b >> 4) if h else (b & 15)).astype(jnp.int8)
                g = k * 8 + 2 * c + h
                p = _dot_t(q, xq_ref[xrows, g, :], jnp.int32)      # [bn, bm]
                sc = d * ((meta >> (8 * h)) & 255).astype(jnp.float32)
                mn = dmin * ((meta >> (16 + 8 * h)) & 255).astype(jnp.float32)
                acc = (acc + p.astype(jnp.float32) * (sc[:, None] * dx_ref[xrows, g][None, :])
                       - mn[:, None] * xs_ref[xrows, g][None, :])
        return acc

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bn, bm), jnp.float32))
    o_ref[...] = acc.T


def _matmul_q4k_int8(x, w, cfg, summed, target_programs):
    M, cols = x.shape
    rows, nsb = w.shape[0], cols // SB
    mp = max(MIN_ROWS, 1 << (M - 1).bit_length())
    *tile, num_warps, num_stages = int8_tiles_for(cfg, mp)
    bn, bm, bs, splits = plan(rows, nsb, mp, (tile[0], tile[1], 1), target_programs)
    mp = -(-M // bm) * bm
    xq, dx, xs = quantize_rows(jnp.pad(x, ((0, mp - M), (0, 0))) if mp != M else x)
    qs, meta, dm = w.parts
    qs = jax.lax.bitcast_convert_type(qs, jnp.uint8).reshape(rows, nsb, 4, 32)   # byte l of chunk c: value 64c + l (lo)
    out = pl.pallas_call(
        functools.partial(_kernel_q4k_int8, bn=bn, bm=bm, steps=nsb // splits),
        grid=(rows // bn, mp // bm, splits),
        out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, j, i)),
        out_shape=jax.ShapeDtypeStruct((splits, mp, rows), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=cfg.interpret,
        name="qmatmul8_q4_k",
    )(qs, meta, dm, xq, dx, xs)
    out = out[:, :M]
    return out.sum(axis=0) if summed else out


@functools.partial(jax.jit, static_argnames=("cfg", "summed", "target_programs"))
def matmul_packed(x: jax.Array, w: GpuQTensor, *, cfg: KernelConfig, summed: bool = True,
                  target_programs: int = 2 * N_SM) -> jax.Array:
    """x [M, in] (bf16/f16) times the packed w [out, in] transposed -> [M, out] float32, or with
    summed=False the K splits' partial sums [S, M, out]. Needs supports(w, x.dtype). Where
    takes_int8(w, cfg), x is rounded to int8 per group of 32 first (the integer kernel)."""
    if not supports(w, x.dtype):
        raise ValueError(f"matmul_packed: {w!r} with {x.dtype} activations is not supported")
    M, cols = x.shape
    if cols != w.shape[1]:
        raise ValueError(f"matmul_packed: x has {cols} columns, {w!r} takes {w.shape[1]}")
    if takes_int8(w, cfg):
        return _matmul_q4k_int8(x, w, cfg, summed, target_programs)
    rows, nsb = w.shape[0], cols // SB
    mp = max(MIN_ROWS, 1 << (M - 1).bit_length())
    *tile, num_warps, num_stages = tiles_for(cfg, w.qtype, mp)
    bn, bm, bs, splits = plan(rows, nsb, mp, tuple(tile), target_programs)
    mp = -(-M // bm) * bm
    xp = jnp.pad(x, ((0, mp - M), (0, 0))) if mp != M else x
    # x's parts side by side, [M, parts, nsb * P]: one XLA fusion per call (separate part arrays
    # cost one slice launch each, 16 for Q6_K: ~0.6 ms of a batch-8 step, BENCHMARKS.md)
    xs = jnp.stack([p.reshape(mp, -1) for p in split_x(xp, w.qtype)], axis=1)
    steps = nsb // bs // splits
    out = pl.pallas_call(
        functools.partial(_kernel, qtype=w.qtype, n_w=len(w.parts), bn=bn, bm=bm, bs=bs, steps=steps),
        grid=(rows // bn, mp // bm, splits),
        out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, j, i)),
        out_shape=jax.ShapeDtypeStruct((splits, mp, rows), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=cfg.interpret,
        name=f"qmatmul_{w.qtype.lower()}",
    )(*w.parts, xs)
    out = out[:, :M]
    return out.sum(axis=0) if summed else out
