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
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .layout import GPU_LAYOUTS, SB, GpuQTensor, dequant_parts, split_x
from .qdot import q4k_scales, q6k_scales
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


def _fma(a, b, c, interpret: bool):
    """a * b + c, rounded once on the GPU: Pallas's PTX multiplies and adds with .rn, which ptxas never
    contracts, so the GPU takes one fma.rn by inline asm. Interpret mode rounds a * b first."""
    if interpret:
        return a * b + c
    b, c = jnp.broadcast_to(b, a.shape), jnp.broadcast_to(c, a.shape)
    [r] = plgpu.elementwise_inline_asm("fma.rn.f32 $0, $1, $2, $3;", args=[a, b, c], constraints="=f,f,f,f",
                                       pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])
    return r


def _nibble_f32(words, at: int, interpret: bool):
    """float32(2**(23 - at) + the 4 bits of `words` at bit `at`), exactly, for at <= 19: the bits
    selected in place into the mantissa of 2**(23 - at), whose unit there is 1 (one LOP3 on the GPU:
    an AND then an OR of two immediates compiles to two)."""
    mask, magic = 15 << at, (150 - at) << 23
    if interpret:
        bits = (words & mask) | magic
    else:
        [bits] = plgpu.elementwise_inline_asm(f"lop3.b32 $0, $1, {mask}, {magic}, 0xEA;", args=[words],
                                              constraints="=r,r", pack=1,
                                              result_shape_dtypes=[jax.ShapeDtypeStruct(words.shape, jnp.int32)])
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _q4_k_parts(p, interpret: bool) -> list:
    """layout.dequant_parts for Q4_K in about half the instructions per value (the kernel is bound by
    its instruction stream, BENCHMARKS.md run 49): q = _nibble_f32(word, at) - 2**(23 - at), exact,
    without shifting the word (nibbles above bit 19 come from one shift of it by 16); then q * s - m
    as one fma, rounded once where the reference rounds q * s, then - m (interpret mode keeps the
    reference's roundings). Reference per value: shift, mask, OR, two subtractions and a multiply."""
    qs, meta, dm = p                                    # qs int32 words [N, S, 4, 8]
    scale, mins = q4k_scales(meta, dm)                  # [N, S, 4] each: sub-blocks 2j (even), 2j + 1
    high = jax.lax.shift_right_logical(qs, 16)
    out = []
    for k in range(4):
        for h in range(2):
            pos = 8 * k + 4 * h
            src, at = (qs, pos) if pos <= 16 else (high, pos - 16)
            q = _nibble_f32(src, at, interpret) - float(2 ** (23 - at))
            w = _fma(q, scale[h][..., None], -mins[h][..., None], interpret)
            out.append(w.reshape(w.shape[0], w.shape[1], 32))
    return out


def _bits_f32(low, high, at: int, high_bits: int, interpret: bool):
    """float32(2**(23 - at) + nib + 16 * hi), exactly, for at + 4 + high_bits <= 23: nib the 4 bits of
    `low` at bit `at`, hi the `high_bits` bits of `high` at bit at + 4, both selected in place into the
    mantissa of 2**(23 - at) (two LOP3s on the GPU). Q6_K's quants have 2 high bits, Q5_K's one."""
    m_lo, m_hi, magic = 15 << at, ((1 << high_bits) - 1) << (at + 4), (150 - at) << 23
    if interpret:
        bits = (low & m_lo) | (high & m_hi) | magic
    else:
        [bits] = plgpu.elementwise_inline_asm(
            f"lop3.b32 $0, $1, {m_lo}, {magic}, 0xEA;\n\tlop3.b32 $0, $2, {m_hi}, $0, 0xEA;", args=[low, high],
            constraints="=&r,r,r", pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(low.shape, jnp.int32)])
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _q6_k_parts(p, interpret: bool) -> list:
    """layout.dequant_parts for Q6_K, bit for bit, in fewer instructions per value: quant c's low
    nibble (bit 8k + 4(c % 2) of its ql word) and high 2 bits (bit 8k + 2c of the h word, shifted
    once per c to sit 4 above the nibble) are selected in place into one float (_bits_f32);
    subtracting 2**(23 - at) + 32 is exact, and the product with the scale rounds as the reference's.
    Bytes 2 and 3 come from the words shifted right by 16 once."""
    e, o, h, sc_words, d = p                           # words int32 [N, S, 4, 4]
    srl, sll = jax.lax.shift_right_logical, jax.lax.shift_left
    e16, o16, h16 = srl(e, 16), srl(o, 16), srl(h, 16)
    out = []
    for c, s in enumerate(q6k_scales(sc_words, d)):
        align = 4 * (c % 2) + 4 - 2 * c                # h's bits 8k + 2c -> 8k + 4(c % 2) + 4
        hc, hc16 = (h, h16) if align == 0 else (sll(h, align), sll(h16, align))
        lows, lows16 = (e, e16) if c < 2 else (o, o16)
        sc = s[..., None]
        for k in range(4):
            low, high, at = (lows, hc, 8 * k) if k < 2 else (lows16, hc16, 8 * (k - 2))
            at += 4 * (c % 2)
            f = _bits_f32(low, high, at, 2, interpret)
            w = (f - float(2 ** (23 - at) + 32)) * sc
            out.append(w.reshape(w.shape[0], w.shape[1], 16))
    return out


def _q5_k_parts(p, interpret: bool) -> list:
    """layout.dequant_parts for Q5_K as Q4_K's (_q4_k_parts), each value's fifth bit brought next to its
    nibble: bit 8k + h + 2j of the qh word (chunk j, sub-block 2j + h) moves to 8k + 4h + 4 by a left
    shift of 7 and a right shift of 3 - 3h + 2j (one shift per chunk and h, shared by the four bytes)."""
    qs, qh, meta, dm = p                                # qs int32 words [N, S, 4, 8], qh [N, S, 8]
    scale, mins = q4k_scales(meta, dm)
    srl, sll = jax.lax.shift_right_logical, jax.lax.shift_left
    high = srl(qs, 16)
    chunk = jnp.arange(4, dtype=jnp.int32).reshape(1, 1, 4, 1)
    h7 = [sll(qh, 7)[:, :, None, :], sll(srl(qh, 16), 7)[:, :, None, :]]   # bytes 0-1, bytes 2-3
    fifth = {(half, hh): srl(jnp.broadcast_to(h7[half], qs.shape), 3 - 3 * hh + 2 * chunk)
             for half in range(2) for hh in range(2)}
    out = []
    for k in range(4):
        for hh in range(2):
            pos = 8 * k + 4 * hh
            half = 0 if k < 2 else 1
            low, at = (qs, pos) if half == 0 else (high, pos - 16)
            q = _bits_f32(low, fifth[half, hh], at, 1, interpret) - float(2 ** (23 - at))
            w = _fma(q, scale[hh][..., None], -mins[hh][..., None], interpret)
            out.append(w.reshape(w.shape[0], w.shape[1], 32))
    return out


def _signed_byte_f32(words, at: int, interpret: bool):
    """float32(2**(23 - at) + 128 + the signed byte of `words` at bit `at`), exactly, for at <= 15:
    the byte, its sign bit flipped (b + 128, unsigned), selected in place into the mantissa of
    2**(23 - at): one LOP3, out = mask ? word ^ k : k with k = 0x80 << at | the float's bits."""
    mask, k = 255 << at, (0x80 << at) | ((150 - at) << 23)
    if interpret:
        bits = ((words ^ k) & mask) | (k & ~mask)
    else:
        [bits] = plgpu.elementwise_inline_asm(f"lop3.b32 $0, $1, {mask}, {k}, 0x6A;", args=[words],
                                              constraints="=r,r", pack=1,
                                              result_shape_dtypes=[jax.ShapeDtypeStruct(words.shape, jnp.int32)])
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _q8_0_parts(p, interpret: bool) -> list:
    """layout.dequant_parts for Q8_0, bit for bit: byte k of each word selected in place
    (_signed_byte_f32; bytes 2 and 3 from the word shifted right by 16 once), minus 2**(23 - at) + 128
    exactly, times d."""
    qs, d = p                                           # int32 words [N, S, 8, 8], d [N, S, 8]
    d = d.astype(jnp.float32)[..., None]
    high = jax.lax.shift_right_logical(qs, 16)
    out = []
    for k in range(4):
        src, at = (qs, 8 * k) if k < 2 else (high, 8 * (k - 2))
        w = (_signed_byte_f32(src, at, interpret) - float(2 ** (23 - at) + 128)) * d
        out.append(w.reshape(w.shape[0], w.shape[1], 64))
    return out


# the kernel's own dequantizers where they beat layout.dequant_parts (same values, bit for bit)
FAST_DEQUANT = {"Q4_K": _q4_k_parts, "Q5_K": _q5_k_parts, "Q6_K": _q6_k_parts, "Q8_0": _q8_0_parts}


def _dequant(qtype: str, loaded, interpret: bool) -> list:
    fast = FAST_DEQUANT.get(qtype)
    return fast(loaded, interpret) if fast else dequant_parts(qtype, loaded)


def _kernel(*refs, qtype, n_w, bn, bm, bs, steps, interpret):
    w_refs, x_ref, o_ref = refs[:n_w], refs[n_w], refs[-1]
    i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    features, xrows = pl.ds(i * bn, bn), pl.ds(j * bm, bm)

    def body(t, acc):
        k = s * steps + t
        blocks = pl.ds(k * bs, bs)
        loaded = [r[(features, blocks) + (slice(None),) * (len(r.shape) - 2)] for r in w_refs]
        for part, w in enumerate(_dequant(qtype, loaded, interpret)):   # [bn, bs, P] float32 each
            width = bs * w.shape[-1]
            xt = x_ref[xrows, part, pl.ds(k * width, width)]            # [bm, bs * P]
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
    # one array [mp, parts, nsb * P]: one XLA fusion, where a list cost a slice launch per part (run 48)
    xs = jnp.stack([p.reshape(mp, -1) for p in split_x(xp, w.qtype)], axis=1)
    steps = nsb // bs // splits
    out = pl.pallas_call(
        functools.partial(_kernel, qtype=w.qtype, n_w=len(w.parts), bn=bn, bm=bm, bs=bs, steps=steps,
                          interpret=cfg.interpret),
        grid=(rows // bn, mp // bm, splits),
        out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, j, i)),
        out_shape=jax.ShapeDtypeStruct((splits, mp, rows), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=cfg.interpret,
        name=f"qmatmul_{w.qtype.lower()}",
    )(*w.parts, xs)
    out = out[:, :M]
    return out.sum(axis=0) if summed else out
