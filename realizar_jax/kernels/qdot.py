"""Factored tile dot products for the decode GEMV: packed quants times activations, block scales
applied once per group of quants instead of once per weight.

Per weight the inner loop is one masked bit-select, one float subtract and one FMA:
- a quant q sitting at bit p of its int32 word is selected in place (word & (mask << p)) and OR-ed
  into the mantissa of the float 2**23, giving exactly 2**23 + q * 2**p; subtracting 2**23 (plus the
  type's zero point) leaves (q - zero) * 2**p, exact;
- the activation it multiplies was scaled by 2**-p when x was split (`prepare_x`; exact, a power of
  two), so the product is (q - zero) * x with no shift and no int->float convert (16/clk/SM on Hopper
  against 64 for logic ops and 128 for FMAs). Quants above bit 16 are read from the word shifted
  right by 12, one shift shared by several quants.
Sub-block scales (and Q4_K's mins, through per-sub-block sums of x) multiply the group sums.

Every function here works on loaded tiles whose leading axes are [rows, superblocks] (layout.py's
GpuQTensor parts) and is shared by the Pallas kernel and, in tests, by plain jnp.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

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
    return [(k, k >= 2, 8 * (k % 2)) for k in range(4)]


_Q6_SHIFT = (4, 6, 0, 2)   # moves the 2 high bits of quant c next to its nibble (see layout.py)


def _q6_terms():
    out = []
    for c in range(4):
        for k in range(4):
            p = 8 * k + 4 * (c % 2)
            out.append((c, k, p > 16, p - 12 if p > 16 else p))
    return out


def prepare_x(x: jax.Array, qtype: str) -> list:
    """x [B, cols] -> float32 arrays the kernel multiplies, each [B, nsb, ...] matching a weight tile.

    Each array holds the activations of one quant position of the words, pre-scaled by 2**-pos;
    Q4_K adds the per-sub-block sums of x for the mins.
    """
    B, cols = x.shape
    nsb = cols // 256
    x = x.astype(jnp.float32)
    if qtype == "DENSE":
        return [x.reshape(B, nsb, 256)]
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
        return [(a + wf * x[0][None],) for (a,), x in zip(accs, xs)]
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
        qs, sce, sco, me, mo, d, dmin = w
        src = (qs, qs >> 12)
        vals = [_select(src[sh], pos, 15) - _TWO23 for _, _, sh, pos in _q4k_terms()]
        d = d.astype(f32)[..., None]
        dmin = dmin.astype(f32)[..., None]
        scales = [(d * sce.astype(f32))[..., None], (d * sco.astype(f32))[..., None]]
        mins = [dmin * me.astype(f32), dmin * mo.astype(f32)]
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
        e, o, h, s0, s1, s2, s3, d = w
        lo_src = ((e, o), (e >> 12, o >> 12))
        h12 = h >> 12
        vals = []
        for c, k, sh, pos in _q6_terms():
            ql = lo_src[sh][c // 2]
            hs = (h12 if sh else h) << _Q6_SHIFT[c]
            hi_bits = hs & (48 << pos)
            vals.append(_select(ql, pos, 15, hi_bits) - (_TWO23 + 32.0 * 2 ** pos))
        d = d.astype(f32)[..., None]
        scales = [(d * s.astype(f32))[..., None] for s in (s0, s1, s2, s3)]
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
