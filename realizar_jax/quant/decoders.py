"""Pure-jnp dequantization of GGUF blocks, bit-identical (float32) to gguf-py's `quants.dequantize`.

Every function here is traceable with the qtype static, and works on any leading shape: the
last axis holds packed bytes, `row_bytes(qtype, cols)` of them per row.

Why the results match gguf-py bit for bit even when XLA fuses a*b-c into an FMA: in every type
the products are exact in float32. An f16 scale has 11 significant bits, a sub-block scale at
most 7, a quant at most 5 (IQ4 grid values 7), so d*sc*q has at most 24 bits (IQ4_XS: 11+6+7)
and is computed without rounding in any order. The only rounding is the final add/subtract of a
min (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K), which an FMA performs identically when its product is exact.
MXFP4 does no float arithmetic at all: its values are powers of two times 1 or 1.5, so their
float32 bits are assembled from integers (XLA's CPU flushes subnormal operands and results to
zero, and the smallest E8M0 scales are subnormal; gguf-py's numpy keeps them).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

_IQ4_GRID = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


# ---- byte-field helpers: b is uint8 [..., nblocks, type_size] --------------------------------

def _u16(b, off):
    """Little-endian uint16 from bytes off, off+1 -> [..., nb, 1]."""
    lo = b[..., off:off + 1].astype(jnp.uint16)
    hi = b[..., off + 1:off + 2].astype(jnp.uint16)
    return lo | (hi << 8)


def _f16(b, off):
    """The f16 at byte offset `off`, as float32 [..., nb, 1] (exact)."""
    return lax.bitcast_convert_type(_u16(b, off), jnp.float16).astype(jnp.float32)


def _shifts(x, shifts, axis):
    """x with a new axis at `axis` holding x >> s for each shift s (x's dtype kept)."""
    x = jnp.expand_dims(x, axis)
    shape = [1] * x.ndim
    shape[axis] = len(shifts)
    return x >> jnp.asarray(shifts, x.dtype).reshape(shape)


def _split_groups(x, group):
    """[..., nb, n] -> [..., nb, n // group, group]."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // group, group)


def _lut(idx, table):
    """table[idx] for a small static table of grid values (exact small integers as float32)."""
    t = jnp.asarray(np.asarray(table, np.float32))
    return jnp.take(t, idx.astype(jnp.int32), axis=0, mode="clip")


# ---- one decoder per type (types.QTYPES): uint8 [..., nb, type_size] -> float32 [..., nb, block_size]

def _nibbles_lohi(qs):
    """[..., k] bytes -> [..., 2k]: all low nibbles, then all high nibbles (the 32-block layout)."""
    return jnp.concatenate([qs & 0xF, qs >> 4], axis=-1)


def dequant_q4_0(b):
    d = _f16(b, 0)
    q = _nibbles_lohi(b[..., 2:18]).astype(jnp.int32) - 8
    return d * q.astype(jnp.float32)


def dequant_q4_1(b):
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles_lohi(b[..., 4:20]).astype(jnp.float32)
    return d * q + m


def _bits32(qh):
    """4 bytes holding a little-endian uint32 bit mask -> [..., 32] bits (bit i = value i)."""
    bits = _shifts(qh, tuple(range(8)), qh.ndim) & 1  # [..., 4, 8]: byte j, bit k -> value 8j+k
    return bits.reshape(*qh.shape[:-1], 32)


def dequant_q5_0(b):
    d = _f16(b, 0)
    hi = _bits32(b[..., 2:6])
    q = (_nibbles_lohi(b[..., 6:22]) | (hi << 4)).astype(jnp.int32) - 16
    return d * q.astype(jnp.float32)


def dequant_q5_1(b):
    d, m = _f16(b, 0), _f16(b, 2)
    hi = _bits32(b[..., 4:8])
    q = (_nibbles_lohi(b[..., 8:24]) | (hi << 4)).astype(jnp.float32)
    return d * q + m


def dequant_q8_0(b):
    d = _f16(b, 0)
    q = lax.bitcast_convert_type(b[..., 2:34], jnp.int8).astype(jnp.float32)
    return q * d


def dequant_q2_k(b):
    lead = b.shape[:-1]
    sc, qs = b[..., 0:16], b[..., 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (sc & 0xF).astype(jnp.float32))[..., None]           # [..., 16, 1]
    ml = (dmin * (sc >> 4).astype(jnp.float32))[..., None]
    # 2 halves of 32 bytes; each byte holds 4 crumbs; value = half*128 + shift*32 + byte
    q = _shifts(_split_groups(qs, 32), (0, 2, 4, 6), -2) & 3        # [..., 2, 4, 32]
    q = q.reshape(*lead, 16, 16).astype(jnp.float32)
    return (dl * q - ml).reshape(*lead, 256)


def dequant_q3_k(b):
    lead = b.shape[:-1]
    hmask, qs, sc, d = b[..., 0:32], b[..., 32:96], b[..., 96:108], _f16(b, 108)
    lo = _shifts(sc[..., 0:8], (0, 4), -2).reshape(*lead, 16) & 0xF
    hi = _shifts(sc[..., 8:12], (0, 2, 4, 6), -2).reshape(*lead, 16) & 3
    scale = (lo | (hi << 4)).astype(jnp.int32) - 32
    dl = (d * scale.astype(jnp.float32))[..., None]                 # [..., 16, 1]
    ql = _shifts(_split_groups(qs, 32), (0, 2, 4, 6), -2) & 3       # [..., 2, 4, 32]
    qh = _shifts(hmask, tuple(range(8)), -2) & 1                    # [..., 8, 32]
    # a set high bit means "no offset"; a clear one subtracts 4
    q = ql.reshape(*lead, 256).astype(jnp.int32) - ((qh.reshape(*lead, 256) ^ 1) << 2).astype(jnp.int32)
    return (dl * q.reshape(*lead, 16, 16).astype(jnp.float32)).reshape(*lead, 256)


def _k4_scale_min(s):
    """The 12 packed bytes of Q4_K/Q5_K -> (scales, mins), each [..., 8] in 0..63."""
    a, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = jnp.concatenate([a & 0x3F, (md & 0xF) | ((a >> 2) & 0x30)], axis=-1)
    mn = jnp.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k4_ds(b):
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k4_scale_min(b[..., 4:16])
    return (d * sc.astype(jnp.float32))[..., None], (dmin * mn.astype(jnp.float32))[..., None]


def _k_nibbles(qs):
    """128 bytes -> [..., 8, 32]: 4 chunks of 32 bytes, low nibbles are sub-block 2c, high 2c+1."""
    return _shifts(_split_groups(qs, 32), (0, 4), -2) & 0xF         # [..., 4, 2, 32]


def dequant_q4_k(b):
    lead = b.shape[:-1]
    dl, ml = _k4_ds(b)
    q = _k_nibbles(b[..., 16:144]).reshape(*lead, 8, 32).astype(jnp.float32)
    return (dl * q - ml).reshape(*lead, 256)


def dequant_q5_k(b):
    lead = b.shape[:-1]
    dl, ml = _k4_ds(b)
    ql = _k_nibbles(b[..., 48:176]).reshape(*lead, 8, 32)
    qh = _shifts(b[..., 16:48], tuple(range(8)), -2) & 1            # [..., 8, 32]: bit j = sub-block j
    q = (ql | (qh << 4)).astype(jnp.float32)
    return (dl * q - ml).reshape(*lead, 256)


def dequant_q6_k(b):
    lead = b.shape[:-1]
    ql, qh, sc, d = b[..., 0:128], b[..., 128:192], b[..., 192:208], _f16(b, 208)
    scale = lax.bitcast_convert_type(sc, jnp.int8).astype(jnp.float32)
    dl = (d * scale)[..., None]                                     # [..., 16, 1]
    lo = _shifts(_split_groups(ql, 64), (0, 4), -2) & 0xF           # [..., 2, 2, 64]
    hi = _shifts(_split_groups(qh, 32), (0, 2, 4, 6), -2) & 3       # [..., 2, 4, 32]
    q = (lo.reshape(*lead, 256) | (hi.reshape(*lead, 256) << 4)).astype(jnp.int32) - 32
    return (dl * q.reshape(*lead, 16, 16).astype(jnp.float32)).reshape(*lead, 256)


def dequant_iq4_nl(b):
    d = _f16(b, 0)
    return d * _lut(_nibbles_lohi(b[..., 2:18]), _IQ4_GRID)


def dequant_iq4_xs(b):
    lead = b.shape[:-1]
    d = _f16(b, 0)
    sh = _u16(b, 2)                                                 # 2 high bits of 8 scales
    lo = _shifts(b[..., 4:8], (0, 4), -1).reshape(*lead, 8) & 0xF   # byte j: scales 2j, 2j+1
    hi = (sh >> jnp.arange(0, 16, 2, dtype=jnp.uint16)) & 3         # [..., 8]
    scale = (lo.astype(jnp.int32) | (hi.astype(jnp.int32) << 4)) - 32
    dl = (d * scale.astype(jnp.float32))[..., None]                 # [..., 8, 1]
    q = _shifts(_split_groups(b[..., 8:136], 16), (0, 4), -2) & 0xF  # [..., 8, 2, 16]
    return (dl * _lut(q.reshape(*lead, 8, 32), _IQ4_GRID)).reshape(*lead, 256)


def dequant_mxfp4(b):
    """MXFP4 (OCP microscaling, as ggml stores it): byte 0 an E8M0 exponent e, bytes 1..16 the 32 E2M1
    codes, low nibbles values 0..15 and high nibbles 16..31. ggml's grid doubles E2M1 (0, 1, 2, 3, 4,
    6, 8, 12) and halves the scale, so a value is +-(1 or 1.5) * 2^(e - 128 + p): its float32 exponent
    field is e - 1 + p. Every e is decoded (255 included, which the OCP spec calls NaN and gguf-py
    reads as 2^127); results beyond float32 are +-inf, below its normal range subnormal, as gguf-py's
    float32 product gives them exactly."""
    u32 = jnp.uint32
    e = b[..., 0:1].astype(jnp.int32)                                # [..., nb, 1]
    code = _nibbles_lohi(b[..., 1:17]).astype(u32)                   # [..., nb, 32]
    mag, sign = code & 7, (code >> 3) << 31                         # E2M1: sign | 2 exponent bits | 1 mantissa bit
    p = (mag >> 1).astype(jnp.int32)                                # doubled values 1,2|3,4|6,8|12: p 0,1,1,2,2,3,3
    half = (mag & 1) & (mag > 1).astype(u32)                        # x1.5 (code 1 is E2M1's subnormal 0.5, doubled)
    ex = e - 1 + p                                                  # float32 biased exponent, -1 .. 257
    normal = (jnp.clip(ex, 1, 254).astype(u32) << 23) | (half << 22)
    subnormal = (2 + half) << jnp.clip(ex + 21, 0, 21).astype(u32)  # ex 0 / -1: (1 or 1.5) * 2^(ex + 22) * 2^-149
    bits = jnp.where(ex >= 255, u32(0x7F800000), jnp.where(ex >= 1, normal, subnormal)) | sign
    bits = jnp.where(mag == 0, u32(0), bits)                        # both zero codes decode to +0, as in gguf-py
    return lax.bitcast_convert_type(bits, jnp.float32)


def _dense_u16(b):
    """[..., nb, 2] bytes -> the little-endian uint16 of each value [..., nb]."""
    w = b.astype(jnp.uint16)
    return w[..., 0] | (w[..., 1] << 8)


def dequant_f32(b):   # the F32 bits are kept
    w = b.astype(jnp.uint32)
    u = w[..., 0] | (w[..., 1] << 8) | (w[..., 2] << 16) | (w[..., 3] << 24)
    return lax.bitcast_convert_type(u, jnp.float32)


def dequant_f16(b):
    return lax.bitcast_convert_type(_dense_u16(b), jnp.float16).astype(jnp.float32)


def dequant_bf16(b):
    return lax.bitcast_convert_type(_dense_u16(b).astype(jnp.uint32) << 16, jnp.float32)
