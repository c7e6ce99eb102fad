"""Factored tile dot products for the decode GEMV: packed quants times activations, block scales
applied once per group of quants instead of once per weight.

Per weight the inner loop is one masked bit-select, one float subtract and one FMA:
- a quant q sitting at bit p of its int32 word is selected in place (word & (mask << p)) and OR-ed
  into the mantissa of the float 2**23, giving exactly 2**23 + q * 2**p; subtracting 2**23 (plus the
  type's zero point) leaves (q - zero) * 2**p, exact;
- the activation it multiplies was scaled by 2**-p when x was split (`prepare_x`; exact, a power of
  two), so the product is (q - zero) * x with no shift and no int->float convert (16/clk/SM on Hopper
  against 64 for logic ops and 128 for FMAs). Quants too high in the word for the 23-bit mantissa
  are read from the word shifted right (by 12; by 16 for Q8_0's bytes), one shift shared by several.
Sub-block scales (and Q4_K's mins, through per-sub-block sums of x) multiply the group sums.

Every function here works on loaded tiles whose leading axes are [rows, superblocks] (layout.py's
GpuQTensor parts) and is shared by the Pallas kernel and, in tests, by plain jnp.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .layout import q4k_scales, q6k_scales

FACTORED_QTYPES = ("Q4_K", "Q8_0", "Q6_K", "DENSE")

_MAGIC = 0x4B000000                     # float32 bits of 2**23
_TWO23 = float(2 ** 23)
_BYTE_SIGNS = 0x80808080 - (1 << 32)    # int32 with bit 7 of every byte set


def _select(word, pos: int, mask: int, extra=None):
    """float32(2**23 + ((word >> pos) & mask) * 2**pos [+ bits of `extra`]), by bit-select alone."""
    bits = (word & (mask << pos)) | _MAGIC
    if extra is not None:
        bits = bits | extra
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _q4k_terms():
    """(k, h, shifted, pos): nibble h of byte k of each Q4_K word, read at bit `pos` of the word
    (shifted right by 12 first when `shifted`)."""
    out = []
    for h in range(2):
        for k in range(4):
            p = 8 * k + 4 * h
            out.append((k, h, p > 16, p - 12 if p > 16 else p))
    return out


def _q8_terms():
    """(k, shifted, pos): signed byte k of each Q8_0 word, read at bit `pos` (of the word shifted
    right by 16 when `shifted`)."""
    return [(k, k >= 2, 8 * (k % 2)) for k in range(4)]


_Q6_SHIFT = (4, 6, 0, 2)   # moves the 2 high bits of quant c next to its nibble (see layout.py)


def _q6_terms():
    """(c, k, shifted, pos): quant c (its nibble from e/o, its 2 high bits from h) of byte k."""
    out = []
    for c in range(4):
        for k in range(4):
            p = 8 * k + 4 * (c % 2)
            out.append((c, k, p > 16, p - 12 if p > 16 else p))
    return out


def prepare_x(x: jax.Array, qtype: str) -> list:
    """x [B, cols] -> float32 arrays the kernel multiplies, each [B, nsb, ...] matching a weight tile
    (DENSE: x itself, reshaped).

    Each array holds the activations of one quant position of the words, pre-scaled by 2**-pos;
    Q4_K adds the per-sub-block sums of x for the mins.
    """
    B, cols = x.shape
    nsb = cols // 256
    if qtype == "DENSE":   # kept in x's dtype, widened in registers: a cast here would be its own
        return [x.reshape(B, nsb, 256)]   # kernel wherever x comes from another launch
    x = x.astype(jnp.float32)
    if qtype == "Q4_K":   # value 64j + 32h + 4w + k <-> word (j, w), byte k, nibble h
        v = x.reshape(B, nsb, 4, 2, 8, 4)
        xs = [v[:, :, :, h, :, k] * 2.0 ** -pos for k, h, _, pos in _q4k_terms()]
        sums = v.sum(axis=(4, 5))                            # [B, nsb, 4(j), 2(h)]
        return xs + [sums[..., 0], sums[..., 1]]
    if qtype == "Q8_0":   # value 32blk + 4w + k <-> word (blk, w), byte k
        v = x.reshape(B, nsb, 8, 8, 4)
        return [v[..., k] * 2.0 ** -pos for k, _, pos in _q8_terms()]
    if qtype == "Q6_K":   # value 64t + 16c + 4w + k <-> word (t, w), byte k, quant c
        v = x.reshape(B, nsb, 4, 4, 4, 4)
        return [v[:, :, :, c, :, k] * 2.0 ** -pos for c, k, _, pos in _q6_terms()]
    raise ValueError(qtype)


def init_accumulators(qtype: str, bn: int, bs: int) -> tuple:
    """Zero accumulators of one batch row; the row's output is the sum of all their elements."""
    shapes = {"DENSE": [(bn, bs, 256)], "Q4_K": [(bn, bs, 4, 8), (bn, bs, 4)],
              "Q8_0": [(bn, bs, 8, 8)], "Q6_K": [(bn, bs, 4, 4)]}[qtype]
    return tuple(jnp.zeros(s, jnp.float32) for s in shapes)


def tile_dot(qtype: str, w: list, xs: list, accs: list) -> list:
    """Add one tile's products to the accumulators of every batch row.

    w: loaded layout arrays of the tile (leading axes [bn, bs]); xs[b]: the matching tiles of
    prepare_x's arrays for batch row b (leading axis [bs]); accs[b]: that row's accumulators.
    """
    f32 = jnp.float32
    if qtype == "DENSE":
        wf = w[0].astype(f32)
        return [(a + wf * x[0][None].astype(f32),) for (a,), x in zip(accs, xs)]
    if qtype == "Q8_0":
        qs, d = w
        u = qs ^ _BYTE_SIGNS                                  # signed byte b -> b + 128
        src = (u, u >> 16)
        vals = [_select(src[sh], pos, 255) - (_TWO23 + 128.0 * 2 ** pos) for _, sh, pos in _q8_terms()]
        d = d.astype(f32)[..., None]
        out = []
        for (a,), x in zip(accs, xs):
            t = vals[0] * x[0][None]
            for i in range(1, 4):
                t = t + vals[i] * x[i][None]
            out.append((a + t * d,))
        return out
    if qtype == "Q4_K":
        qs, meta, dm = w
        src = (qs, qs >> 12)
        vals = [_select(src[sh], pos, 15) - _TWO23 for _, _, sh, pos in _q4k_terms()]
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
    if qtype == "Q6_K":
        e, o, h, sc_words, d = w
        lo_src = ((e, o), (e >> 12, o >> 12))
        h12 = h >> 12
        vals = []
        for c, k, sh, pos in _q6_terms():
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
    raise ValueError(qtype)


def reference_gemv(x: jax.Array, qtype: str, parts) -> jax.Array:
    """The factored product over a whole matrix in plain jnp (one tile = the whole matrix): tests
    check the kernel's arithmetic against gguf-py through this, independent of Pallas."""
    rows = parts[0].shape[0]
    nsb = parts[0].shape[1]
    xs = prepare_x(x, qtype)
    accs = [init_accumulators(qtype, rows, nsb) for _ in range(x.shape[0])]
    accs = tile_dot(qtype, list(parts), [[xa[b] for xa in xs] for b in range(x.shape[0])], accs)
    return jnp.stack([sum(jnp.sum(a, axis=tuple(range(1, a.ndim))) for a in acc) for acc in accs])


# ---- int8 activations (bf16/f16 models): integer dot products, as llama.cpp's MMVQ kernels do ----
#
# x is quantized once per call to int8 in blocks that match the weight's scale groups (32 values; 16
# for Q6_K) with one float scale per block. Four packed quants then meet four int8 activations in
# one dp4a instruction (int32 result), so per 4 weights the inner loop is a mask, a dp4a and a
# convert, against 4 x (select + subtract + FMA) on floats above: the float kernels were
# issue-bound (ncu: 1.57 TB/s DRAM for Q4_K, 2/3 of issue slots busy). float32 models keep the
# exact float path. The int32 sums stay below 2**22, so the exact 2**23 trick converts them.

Q8_ACT_QTYPES = ("Q4_K", "Q8_0", "Q6_K")
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


# parts of the activations' int8 words, scales (and sums), per type: the kernel takes each part with
# a strided load, so XLA writes no slice per part.
X_Q8_PARTS = {"Q4_K": 2, "Q8_0": 1, "Q6_K": 4}


# scale groups of each type's activations, as the axes after [B, superblocks]: Q4_K sub-block 2j+h
# = 32 values 64j + 32h + (4w + k); Q8_0 block = 32 values; Q6_K group (t, c) = 16 values 64t + 16c +
# (4w + k). Every group is contiguous in x, so only the group size differs between the types.
X_GROUPS = {"Q4_K": (4, 2, 32), "Q8_0": (8, 32), "Q6_K": (4, 4, 16)}
_ZERO_POINT = {"Q4_K": 1.0, "Q6_K": 32.0}   # the quants' offset the sums correct for (Q6_K's -32)


def x_q8_group(qtype: str) -> int:
    """Values per int8 scale group of the activations for this weight type."""
    return X_GROUPS[qtype][-1]


def x_q8_natural(words: jax.Array, scales: jax.Array, qtype: str) -> list:
    """Flat per-group words [B, groups, group/4] and scales [B, groups] (kernels/xquant.py) ->
    prepare_x_q8(..., in_kernel=True)'s arrays: free reshapes."""
    B = words.shape[0]
    *lead, g = X_GROUPS[qtype]
    return [words.reshape(B, -1, *lead, g // 4), scales.reshape(B, -1, *lead)]


def prepare_x_q8(x: jax.Array, qtype: str, *, in_kernel: bool = False) -> list:
    """x [B, cols] -> the int8-activation kernel's inputs: int32 words of int8s, float32 scales and,
    for Q4_K/Q6_K, the scaled sums of the rounded x per group.

    in_kernel=False: [words, scales, sums], parts on axis 2 (XLA computes the sums and writes the
    part axis first; on the H100 that is a reduce and a transpose kernel before each launch).
    in_kernel=True (REALIZAR_GEMV_XPREP=kernel or fused): [words, scales] in their natural layout,
    parts on axis 3; the kernel sums the rounded x itself with dp4a (_group_sums).
    """
    if qtype not in X_GROUPS:
        raise ValueError(qtype)
    B, cols = x.shape
    q, s = _quantize_blocks(x.astype(jnp.float32).reshape(B, cols // 256, *X_GROUPS[qtype]))
    if in_kernel or qtype == "Q8_0":
        return [_words(q), s]
    # the mins (zero point) meet the same rounded x as the quants, so the result is exactly the
    # dequantized weights times the rounded x (with the true sums the two large terms cancel unevenly)
    sums = _ZERO_POINT[qtype] * s * q.astype(jnp.float32).sum(axis=-1)
    return [jnp.moveaxis(a, 3, 2) for a in (_words(q), s, sums)]


def x_q8_tiles(xs: list, qtype: str, tile, *, in_kernel: bool = False) -> list:
    """tile_dot_q8's list of x operands: tile(array, idx) for every part of every prepared array,
    idx being the indexers after (batch row, superblocks): () where there is no part axis."""
    n = X_Q8_PARTS[qtype]
    if n == 1:
        return [tile(a, ()) for a in xs]
    return [tile(a, (slice(None), p) if in_kernel else (p,)) for a in xs for p in range(n)]


def _group_sums(xw, *, interpret: bool):
    """int32 words of int8s [..., m] -> float32 sum of their 4m int8s [...] (dp4a with all-ones)."""
    ones = jnp.full(xw.shape, 0x01010101, jnp.int32)
    return _i2f(jnp.sum(dp4a(ones, xw, signed_a=False, interpret=interpret), axis=-1))


def init_accumulators_q8(qtype: str, bn: int, bs: int) -> tuple:
    shapes = {"Q4_K": [(bn, bs, 4, 8), (bn, bs, 4)], "Q8_0": [(bn, bs, 8, 8)],
              "Q6_K": [(bn, bs, 4, 4), (bn, bs, 4)]}[qtype]
    return tuple(jnp.zeros(s, jnp.float32) for s in shapes)


def tile_dot_q8(qtype: str, w: list, xs: list, accs: list, *, interpret: bool, in_kernel: bool = False) -> list:
    """tile_dot for int8 activations (x_q8_tiles of prepare_x_q8's arrays in xs[b]; in_kernel: no
    sums among them, computed here)."""
    f32 = jnp.float32
    if qtype == "Q8_0":
        qs, d = w
        d = d.astype(f32)
        out = []
        for (a,), (xw, sx) in zip(accs, xs):
            s = _i2f(dp4a(qs, xw[None], signed_a=True, interpret=interpret))
            out.append((a + s * (d * sx[None])[..., None],))
        return out
    if qtype == "Q4_K":
        qs, meta, dm = w
        nib = (qs & _LOW_NIBBLES, (qs >> 4) & _LOW_NIBBLES)
        scales, mins = q4k_scales(meta, dm)
        out = []
        for (a, c), xb in zip(accs, xs):
            for h in range(2):
                xw, sx = xb[h], xb[2 + h]
                sm = sx * _group_sums(xw, interpret=interpret) if in_kernel else xb[4 + h]
                s = _i2f(dp4a(nib[h], xw[None], signed_a=False, interpret=interpret))
                a = a + s * (scales[h] * sx[None])[..., None]
                c = c - mins[h] * sm[None]
            out.append((a, c))
        return out
    if qtype == "Q6_K":
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
                zero = 32.0 * sx[c] * _group_sums(xw[c], interpret=interpret) if in_kernel else xb[8 + c]
                s = _i2f(dp4a(quants[c], xw[c][None], signed_a=False, interpret=interpret))
                a = a + s * (scales[c] * sx[c][None])[..., None]
                corr = corr - scales[c] * zero[None]
            out.append((a, corr))
        return out
    raise ValueError(qtype)


def reference_gemv_q8(x: jax.Array, qtype: str, parts, *, in_kernel: bool = False) -> jax.Array:
    """The int8-activation product over a whole matrix in plain jnp (dp4a emulated)."""
    rows, nsb = parts[0].shape[:2]
    xs = prepare_x_q8(x, qtype, in_kernel=in_kernel)
    accs = [init_accumulators_q8(qtype, rows, nsb) for _ in range(x.shape[0])]
    rows_x = [x_q8_tiles(xs, qtype, lambda a, idx, b=b: a[b][(slice(None),) + idx], in_kernel=in_kernel)
              for b in range(x.shape[0])]
    accs = tile_dot_q8(qtype, list(parts), rows_x, accs, interpret=True, in_kernel=in_kernel)
    return jnp.stack([sum(jnp.sum(a, axis=tuple(range(1, a.ndim))) for a in acc) for acc in accs])
