"""Tile arithmetic of the GPU layouts (layout.py): exact int->float bit tricks, the K-quant scale
decoders, and per type the factored tile dot (float activations) and the int8 tile dot (dp4a).

Every function here works on loaded tiles whose leading axes are [rows, superblocks] (layout.py's
GpuQTensor parts) and is shared by the Pallas kernels and, in tests, by plain jnp. A type's dots
are its FactoredDot / Int8Dot in FACTORED_DOTS / INT8_DOTS (its layout.GpuLayout's .factored /
.int8_group); the module-level functions taking a qtype look them up.

Factored tile dots: block scales applied once per group of quants instead of once per weight. Per
weight the inner loop is one masked bit-select, one float subtract and one FMA:
- a quant q sitting at bit p of its int32 word is selected in place (word & (mask << p)) and OR-ed
  into the mantissa of the float 2**23, giving exactly 2**23 + q * 2**p; subtracting 2**23 (plus the
  type's zero point) leaves (q - zero) * 2**p, exact;
- the activation it multiplies was scaled by 2**-p when x was split (`prepare_x`; exact, a power of
  two), so the product is (q - zero) * x with no shift and no int->float convert (16/clk/SM on Hopper
  against 64 for logic ops and 128 for FMAs). Quants too high in the word for the 23-bit mantissa
  are read from the word shifted right (by 12; by 16 for Q8_0's bytes), one shift shared by several.
Sub-block scales (and Q4_K's mins, through per-sub-block sums of x) multiply the group sums.
"""
from __future__ import annotations

from collections import namedtuple

import jax
import jax.numpy as jnp

_MAGIC = 0x4B000000                     # float32 bits of 2**23: OR-ing a small int n into its mantissa gives 2**23 + n
_TWO23 = float(2 ** 23)
_BYTE_SIGNS = 0x80808080 - (1 << 32)    # int32 with bit 7 of every byte set


def _small_int_to_f32(v, offset: int = 0):
    """float32(v - offset) for ints 0 <= v < 2**23, without an int->float convert instruction.

    Why: on Hopper a cvt.f32.s32 issues at 16/clk/SM against 64 for logic ops and 128 for FMAs, so
    one convert per weight made the decode GEMV ALU-bound far below HBM bandwidth. bitcast(v | 2**23
    bits) is exactly 2**23 + v; subtracting 2**23 + offset is exact too, so results are bit-identical.
    """
    f = jax.lax.bitcast_convert_type(v | _MAGIC, jnp.float32)
    return f - (_TWO23 + offset)


def _f16_half(words, high: bool):
    """float32 of the float16 in the low (or high) half of int32 words."""
    bits = ((words >> 16) if high else words) & 0xFFFF
    return jax.lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.float16).astype(jnp.float32)


def q4k_scales(meta, dm):
    """Q4_K's per-chunk words (layout.repack_blocks) -> ((d*sc_even, d*sc_odd), (dmin*m_even, dmin*m_odd)),
    float32 of meta's shape: the scales and mins of sub-blocks 2j and 2j+1 of chunk j."""
    d, dmin = _f16_half(dm, False)[..., None], _f16_half(dm, True)[..., None]
    sce, sco, me, mo = (_small_int_to_f32((meta >> (8 * k)) & 255) for k in range(4))
    return (d * sce, d * sco), (dmin * me, dmin * mo)


def q6k_scales(sc_words, d):
    """Q6_K's scale words [..., 4] (byte c of word t: group (t, c)'s signed scale) and d -> the four
    float32 [..., 4] arrays d * scale of groups (t, c), c = 0..3."""
    d = d.astype(jnp.float32)[..., None]
    # signed byte b read as unsigned u: u ^ 128 = b + 128, converted exactly by _small_int_to_f32
    return [d * _small_int_to_f32(((sc_words >> (8 * c)) & 255) ^ 128, 128) for c in range(4)]


# ---- factored tile dots (float activations) ------------------------------------------------------

def _select(word, pos: int, mask: int, extra=None):
    """float32(2**23 + ((word >> pos) & mask) * 2**pos [+ bits of `extra`]), by bit-select alone."""
    bits = (word & (mask << pos)) | _MAGIC
    if extra is not None:
        bits = bits | extra
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


# (k, h, shifted, pos): nibble h of byte k of each Q4_K word, read at bit pos of the word (shifted right
# by 12 first when `shifted`: the 23-bit mantissa cannot take it in place)
_Q4K_TERMS = [(k, h, p > 16, p - 12 if p > 16 else p) for h in range(2) for k in range(4) for p in [8 * k + 4 * h]]
# (k, shifted, pos): signed byte k of each Q8_0 word, read at bit pos (of the word shifted right by 16)
_Q8_TERMS = [(k, k >= 2, 8 * (k % 2)) for k in range(4)]
# (c, k, shifted, pos): quant c (its nibble from e/o, its 2 high bits from h) of byte k, read as in Q4_K
_Q6_TERMS = [(c, k, p > 16, p - 12 if p > 16 else p) for c in range(4) for k in range(4) for p in [8 * k + 4 * (c % 2)]]
_Q6_SHIFT = (4, 6, 0, 2)   # moves the 2 high bits of quant c next to its nibble (see layout.py)


def _tile_dot_dense(w, xs, accs):
    f32 = jnp.float32
    wf = w[0].astype(f32)
    return [(a + wf * x[0][None].astype(f32),) for (a,), x in zip(accs, xs)]


def _prepare_q8_0(x, B, nsb):   # value 32blk + 4w + k <-> word (blk, w), byte k
    v = x.astype(jnp.float32).reshape(B, nsb, 8, 8, 4)
    return [v[..., k] * 2.0 ** -pos for k, _, pos in _Q8_TERMS]


def _tile_dot_q8_0(w, xs, accs):
    qs, d = w
    u = qs ^ _BYTE_SIGNS                                  # signed byte b -> b + 128
    src = (u, u >> 16)
    vals = [_select(src[sh], pos, 255) - (_TWO23 + 128.0 * 2 ** pos) for _, sh, pos in _Q8_TERMS]
    d = d.astype(jnp.float32)[..., None]
    out = []
    for (a,), x in zip(accs, xs):
        t = vals[0] * x[0][None]
        for i in range(1, 4):
            t = t + vals[i] * x[i][None]
        out.append((a + t * d,))
    return out


def _prepare_q4_k(x, B, nsb):   # value 64j + 32h + 4w + k <-> word (j, w), byte k, nibble h
    v = x.astype(jnp.float32).reshape(B, nsb, 4, 2, 8, 4)
    xs = [v[:, :, :, h, :, k] * 2.0 ** -pos for k, h, _, pos in _Q4K_TERMS]
    sums = v.sum(axis=(4, 5))                            # [B, nsb, 4(j), 2(h)]
    return xs + [sums[..., 0], sums[..., 1]]


def _tile_dot_q4_k(w, xs, accs):
    qs, meta, dm = w
    src = (qs, qs >> 12)
    vals = [_select(src[sh], pos, 15) - _TWO23 for _, _, sh, pos in _Q4K_TERMS]
    scales, mins = q4k_scales(meta, dm)
    scales = [s[..., None] for s in scales]
    out = []
    for (a, c), x in zip(accs, xs):
        for h in range(2):
            t = vals[4 * h] * x[4 * h][None]
            for k in range(1, 4):
                t = t + vals[4 * h + k] * x[4 * h + k][None]
            a = a + t * scales[h]
            c = c - mins[h] * x[8 + h][None]
        out.append((a, c))
    return out


def _prepare_q6_k(x, B, nsb):   # value 64t + 16c + 4w + k <-> word (t, w), byte k, quant c
    v = x.astype(jnp.float32).reshape(B, nsb, 4, 4, 4, 4)
    return [v[:, :, :, c, :, k] * 2.0 ** -pos for c, k, _, pos in _Q6_TERMS]


def _tile_dot_q6_k(w, xs, accs):
    e, o, h, sc_words, d = w
    lo_src = ((e, o), (e >> 12, o >> 12))
    h12 = h >> 12
    vals = []
    for c, k, sh, pos in _Q6_TERMS:
        ql = lo_src[sh][c // 2]
        hs = (h12 if sh else h) << _Q6_SHIFT[c]
        hi_bits = hs & (48 << pos)
        vals.append(_select(ql, pos, 15, hi_bits) - (_TWO23 + 32.0 * 2 ** pos))
    scales = [s[..., None] for s in q6k_scales(sc_words, d)]
    out = []
    for (a,), x in zip(accs, xs):
        for c in range(4):
            t = vals[4 * c] * x[4 * c][None]
            for k in range(1, 4):
                t = t + vals[4 * c + k] * x[4 * c + k][None]
            a = a + t * scales[c]
        out.append((a,))
    return out


# a layout's factored tile dot: prepare_x(x, B, nsb) and tile_dot(w, xs, accs) as the functions of those
# names below; acc_shapes: each accumulator's shape after [rows, superblocks]
FactoredDot = namedtuple("FactoredDot", "prepare_x acc_shapes tile_dot")
FACTORED_DOTS: dict[str, FactoredDot] = {
    "Q4_K": FactoredDot(_prepare_q4_k, ((4, 8), (4,)), _tile_dot_q4_k),
    "Q8_0": FactoredDot(_prepare_q8_0, ((8, 8),), _tile_dot_q8_0),
    "Q6_K": FactoredDot(_prepare_q6_k, ((4, 4),), _tile_dot_q6_k),
    # DENSE: x kept in its dtype, widened in registers (a cast here would be its own kernel wherever x
    # comes from another launch)
    "DENSE": FactoredDot(lambda x, B, nsb: [x.reshape(B, nsb, 256)], ((256,),), _tile_dot_dense),
}
FACTORED_QTYPES = tuple(FACTORED_DOTS)


def prepare_x(x: jax.Array, qtype: str) -> list:
    """x [B, cols] -> float32 arrays the kernel multiplies, each [B, nsb, ...] matching a weight tile
    (DENSE: x itself, reshaped).

    Each array holds the activations of one quant position of the words, pre-scaled by 2**-pos;
    Q4_K adds the per-sub-block sums of x for the mins.
    """
    B, cols = x.shape
    return FACTORED_DOTS[qtype].prepare_x(x, B, cols // 256)


def init_accumulators(qtype: str, bn: int, bs: int) -> tuple:
    """Zero accumulators of one batch row; the row's output is the sum of all their elements."""
    return tuple(jnp.zeros((bn, bs) + s, jnp.float32) for s in FACTORED_DOTS[qtype].acc_shapes)


def tile_dot(qtype: str, w: list, xs: list, accs: list) -> list:
    """Add one tile's products to the accumulators of every batch row.

    w: loaded layout arrays of the tile (leading axes [bn, bs]); xs[b]: the matching tiles of
    prepare_x's arrays for batch row b (leading axis [bs]); accs[b]: that row's accumulators.
    """
    return FACTORED_DOTS[qtype].tile_dot(w, xs, accs)


# ---- int8 activations (bf16/f16 models): integer dot products, as llama.cpp's MMVQ kernels do ----
#
# x is quantized once per call to int8 in blocks that match the weight's scale groups (32 values; 16
# for Q6_K) with one float scale per block. Four packed quants then meet four int8 activations in
# one dp4a instruction (int32 result), so per 4 weights the inner loop is a mask, a dp4a and a
# convert, against 4 x (select + subtract + FMA) on floats above: the float kernels were
# issue-bound. float32 models keep the exact float path. The int32 sums stay below 2**22, so the
# exact 2**23 trick converts them. The kernel sums each group's rounded x itself (_group_sums), for
# the mins (Q4_K) and zero point (Q6_K): they meet the same rounded x as the quants, so the result
# is exactly the dequantized weights times the rounded x.

_I2F_MAGIC = 0x4B400000          # float32 bits of 1.5 * 2**23
_I2F_BIAS = 1.5 * 2 ** 23
_LOW_NIBBLES = 0x0F0F0F0F
_Q6_HIGH = 0x30303030


def _i2f(s):
    """float32(s) for int32 |s| < 2**22: one integer add and one float subtract (no cvt)."""
    return jax.lax.bitcast_convert_type(s + _I2F_MAGIC, jnp.float32) - _I2F_BIAS


def dp4a(a, b, *, signed_a: bool, interpret: bool):
    """sum over the 4 bytes of a * b (b signed int8s, a signed or unsigned), int32: one PTX dp4a."""
    b = jnp.broadcast_to(b, a.shape)
    if interpret:
        out = jnp.zeros(a.shape, jnp.int32)
        for k in range(4):
            ak = ((a << (24 - 8 * k)) >> 24) if signed_a else ((a >> (8 * k)) & 255)
            out = out + ak * ((b << (24 - 8 * k)) >> 24)
        return out
    from jax.experimental.pallas import triton as plgpu
    asm = f"dp4a.{'s32' if signed_a else 'u32'}.s32 $0, $1, $2, $3;"
    [r] = plgpu.elementwise_inline_asm(asm, args=[a, b, jnp.zeros(a.shape, jnp.int32)],
                                       constraints="=r,r,r,r", pack=1,
                                       result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.int32)])
    return r


def _quantize_blocks(v):
    """float32 [..., n] -> (int8 [..., n], scale [...]) with v ~= q * scale, |q| <= 127."""
    amax = jnp.max(jnp.abs(v), axis=-1)
    scale = amax / 127.0
    inv = jnp.where(amax > 0, 127.0 / jnp.where(amax > 0, amax, 1.0), 0.0)
    q = jnp.clip(jnp.round(v * inv[..., None]), -127, 127).astype(jnp.int8)
    return q, scale


def _words(q):
    """int8 [..., 4m] -> int32 [..., m], byte k of word w = q[4w + k] (little-endian)."""
    return jax.lax.bitcast_convert_type(q.reshape(*q.shape[:-1], -1, 4), jnp.int32)


def _group_sums(xw, *, interpret: bool):
    """int32 words of int8s [..., m] -> float32 sum of their 4m int8s [...] (dp4a with all-ones)."""
    ones = jnp.full(xw.shape, 0x01010101, jnp.int32)
    return _i2f(jnp.sum(dp4a(ones, xw, signed_a=False, interpret=interpret), axis=-1))


def _int8_dot_q8_0(w, xs, accs, interpret):
    qs, d = w
    d = d.astype(jnp.float32)
    out = []
    for (a,), (xw, sx) in zip(accs, xs):
        s = _i2f(dp4a(qs, xw[None], signed_a=True, interpret=interpret))
        out.append((a + s * (d * sx[None])[..., None],))
    return out


def _int8_dot_q4_k(w, xs, accs, interpret):
    qs, meta, dm = w
    nib = (qs & _LOW_NIBBLES, (qs >> 4) & _LOW_NIBBLES)
    scales, mins = q4k_scales(meta, dm)
    out = []
    for (a, c), xb in zip(accs, xs):
        for h in range(2):
            xw, sx = xb[h], xb[2 + h]
            sm = sx * _group_sums(xw, interpret=interpret)
            s = _i2f(dp4a(nib[h], xw[None], signed_a=False, interpret=interpret))
            a = a + s * (scales[h] * sx[None])[..., None]
            c = c - mins[h] * sm[None]
        out.append((a, c))
    return out


def _int8_dot_q6_k(w, xs, accs, interpret):
    e, o, h, sc_words, d = w
    scales = q6k_scales(sc_words, d)
    quants = []
    for c in range(4):   # bytes of quant c: low nibble from e/o, bits 4-5 from h's bits 2c, 2c+1
        ql = (e if c < 2 else o) >> (4 * (c % 2))
        hs = (h << (4 - 2 * c)) if c < 3 else (h >> 2)
        quants.append((ql & _LOW_NIBBLES) | (hs & _Q6_HIGH))
    out = []
    for (a, corr), xb in zip(accs, xs):
        xw, sx = xb[0:4], xb[4:8]
        for c in range(4):
            zero = 32.0 * sx[c] * _group_sums(xw[c], interpret=interpret)
            s = _i2f(dp4a(quants[c], xw[c][None], signed_a=False, interpret=interpret))
            a = a + s * (scales[c] * sx[c][None])[..., None]
            corr = corr - scales[c] * zero[None]
        out.append((a, corr))
    return out


# a layout's int8-activation tile dot. groups: x's scale groups as the axes after [B, superblocks] (the
# last is the group size; every group is contiguous in x); parts: the parts of each prepared array a
# tile reads (strided loads: XLA writes no slice per part); acc_shapes as FactoredDot's
Int8Dot = namedtuple("Int8Dot", "groups parts acc_shapes tile_dot")
# Q4_K sub-block 2j+h = 32 values 64j + 32h + (4w + k); Q8_0 block = 32 values; Q6_K group (t, c) =
# 16 values 64t + 16c + (4w + k)
INT8_DOTS: dict[str, Int8Dot] = {
    "Q4_K": Int8Dot((4, 2, 32), 2, ((4, 8), (4,)), _int8_dot_q4_k),
    "Q8_0": Int8Dot((8, 32), 1, ((8, 8),), _int8_dot_q8_0),
    "Q6_K": Int8Dot((4, 4, 16), 4, ((4, 4), (4,)), _int8_dot_q6_k),
}
Q8_ACT_QTYPES = tuple(INT8_DOTS)


def x_q8_group(qtype: str) -> int:
    """Values per int8 scale group of the activations for this weight type."""
    return INT8_DOTS[qtype].groups[-1]


def x_q8_natural(words: jax.Array, scales: jax.Array, qtype: str) -> list:
    """Flat per-group words [B, groups, group/4] and scales [B, groups] (kernels/xquant.py) ->
    prepare_x_q8's arrays: free reshapes."""
    B = words.shape[0]
    *lead, g = INT8_DOTS[qtype].groups
    return [words.reshape(B, -1, *lead, g // 4), scales.reshape(B, -1, *lead)]


def prepare_x_q8(x: jax.Array, qtype: str) -> list:
    """x [B, cols] -> the int8-activation kernel's inputs [words, scales]: int32 words of the int8s
    and the float32 scale of each group, in their natural layout (parts on axis 3); the GEMV sums
    each group's rounded x itself (dp4a against all-ones)."""
    groups = INT8_DOTS[qtype].groups
    B, cols = x.shape
    q, s = _quantize_blocks(x.astype(jnp.float32).reshape(B, cols // 256, *groups))
    return [_words(q), s]


def x_q8_tiles(xs: list, qtype: str, tile) -> list:
    """tile_dot_q8's list of x operands: tile(array, idx) for every part of every prepared array,
    idx being the indexers after (batch row, superblocks): () where there is no part axis."""
    n = INT8_DOTS[qtype].parts
    if n == 1:
        return [tile(a, ()) for a in xs]
    return [tile(a, (slice(None), p)) for a in xs for p in range(n)]


def init_accumulators_q8(qtype: str, bn: int, bs: int) -> tuple:
    return tuple(jnp.zeros((bn, bs) + s, jnp.float32) for s in INT8_DOTS[qtype].acc_shapes)


def tile_dot_q8(qtype: str, w: list, xs: list, accs: list, *, interpret: bool) -> list:
    """tile_dot for int8 activations (x_q8_tiles of prepare_x_q8's arrays in xs[b]; the group sums
    are computed here)."""
    return INT8_DOTS[qtype].tile_dot(w, xs, accs, interpret)
