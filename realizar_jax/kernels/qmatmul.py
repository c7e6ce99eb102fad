"""Batched decode matmul on packed weights: tensor cores fed by tiles dequantized in registers.

Between the GEMV (a few activation rows, dot products on the ALUs) and the prefill GEMM (unpack the
whole matrix to bf16 in HBM, then XLA's dot), a decode step of many sequences must read each weight
once and multiply it against every row. A program here owns BN output features and BM rows of x and
walks K in steps of BS superblocks: it dequantizes the weight tile in registers (layout.dequant_parts,
shared with the unpack kernel and the jnp reference), rounds it to x's dtype and makes it the left
operand of the tensor-core dot, so the weights never pass through HBM unpacked. x is split into the
layout's parts once per call (split_x, small), each part flattened to [M, nsb * P] so a K step loads
a plain [BM, BS * P] tile and each part is one dot [BN, BS * P] x [BS * P, BM].

K splits fill the SMs when there are few (feature, row) tiles, as in the GEMV; their partial sums
[S, M, N] are added by XLA, or by the consumer (summed=False: the next RMSNorm's prep).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .layout import GPU_LAYOUTS, SB, GpuQTensor, dequant_parts, split_x
from .tuning import KernelConfig

N_SM = 132
# (features per program, rows of x per program, superblocks per K step, warps, stages) by the padded
# row count they serve (the smallest cap >= it). The x tile is the larger operand per K step (BM x BS
# x 512 bytes against BN x BS x ~150 for Q4_K), so stages x that must stay inside the 227 KiB of
# shared memory. KernelConfig.tiles key "QMM_<type>_<cap>" overrides one (BENCHMARKS.md: the probe).
TILES = {16: (64, 16, 2, 4, 3), 32: (64, 32, 1, 4, 4), 64: (64, 64, 1, 4, 4), 256: (128, 64, 1, 8, 3)}
MIN_ROWS = 16   # the tensor cores' smallest tile: fewer rows of x are padded to it


def row_cap(m_padded: int) -> int:
    return next((c for c in sorted(TILES) if c >= m_padded), max(TILES))


def tiles_for(cfg: KernelConfig, qtype: str, m_padded: int) -> tuple:
    cap = row_cap(m_padded)
    return cfg.tile(f"QMM_{qtype}_{cap}", TILES[cap])


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


def _dot_t(a, b):
    """a [m, k] @ b [n, k].T -> [m, n] float32 on the tensor cores."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _kernel(*refs, qtype, n_w, bn, bm, bs, steps):
    w_refs, x_refs, o_ref = refs[:n_w], refs[n_w:-1], refs[-1]
    i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    features, xrows = pl.ds(i * bn, bn), pl.ds(j * bm, bm)

    def body(t, acc):
        k = s * steps + t
        blocks = pl.ds(k * bs, bs)
        loaded = [r[(features, blocks) + (slice(None),) * (len(r.shape) - 2)] for r in w_refs]
        for w, x_ref in zip(dequant_parts(qtype, loaded), x_refs):   # [bn, bs, P] float32 each
            width = bs * w.shape[-1]
            xt = x_ref[xrows, pl.ds(k * width, width)]                  # [bm, bs * P]
            acc = acc + _dot_t(w.reshape(bn, width).astype(xt.dtype), xt)
        return acc

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bn, bm), jnp.float32))
    o_ref[...] = acc.T


@functools.partial(jax.jit, static_argnames=("cfg", "summed", "target_programs"))
def matmul_packed(x: jax.Array, w: GpuQTensor, *, cfg: KernelConfig, summed: bool = True,
                  target_programs: int = 2 * N_SM) -> jax.Array:
    """x [M, in] (bf16/f16) times the packed w [out, in] transposed -> [M, out] float32, or with
    summed=False the K splits' partial sums [S, M, out]. Needs supports(w, x.dtype)."""
    if not supports(w, x.dtype):
        raise ValueError(f"matmul_packed: {w!r} with {x.dtype} activations is not supported")
    M, cols = x.shape
    if cols != w.shape[1]:
        raise ValueError(f"matmul_packed: x has {cols} columns, {w!r} takes {w.shape[1]}")
    rows, nsb = w.shape[0], cols // SB
    mp = max(MIN_ROWS, 1 << (M - 1).bit_length())
    *tile, num_warps, num_stages = tiles_for(cfg, w.qtype, mp)
    bn, bm, bs, splits = plan(rows, nsb, mp, tuple(tile), target_programs)
    mp = -(-M // bm) * bm
    xp = jnp.pad(x, ((0, mp - M), (0, 0))) if mp != M else x
    xs = [p.reshape(mp, -1) for p in split_x(xp, w.qtype)]
    steps = nsb // bs // splits
    out = pl.pallas_call(
        functools.partial(_kernel, qtype=w.qtype, n_w=len(w.parts), bn=bn, bm=bm, bs=bs, steps=steps),
        grid=(rows // bn, mp // bm, splits),
        out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, j, i)),
        out_shape=jax.ShapeDtypeStruct((splits, mp, rows), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=cfg.interpret,
        name=f"qmatmul_{w.qtype.lower()}",
    )(*w.parts, *xs)
    out = out[:, :M]
    return out.sum(axis=0) if summed else out
