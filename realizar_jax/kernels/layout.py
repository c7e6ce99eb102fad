"""GpuQTensor: GGUF blocks re-laid out (same bytes, give or take 3%) so a Pallas kernel can read them.

The file's blocks interleave f16 scales with packed quants, which a Triton tile cannot load as
vectors. `repack_for_gpu` splits each block's fields into separate arrays whose leading axes are
[rows, superblocks] (a superblock = 256 input values for every type here, so one kernel tiling
fits all), keeping every quant bit and every scale. Device bytes vs file bytes:
Q8_0, Q4_0, Q6_K, Q5_K: identical; Q4_K: 148 / 144 (+2.8%, the 6-bit sub-scales stored as bytes).

Each layout also fixes how the 256 input values of a superblock are split into "parts": a part
is the set of values that one packed array field (e.g. the low nibbles) multiplies. The kernels
compute sum_parts <dequant(part), x_part>, with x split the same way once per call (x is tiny).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

SB = 256  # values per superblock, every layout
GPU_QTYPES = ("Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K")
_BLOCK = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_K": (256, 144), "Q5_K": (256, 176),
          "Q6_K": (256, 210)}


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class GpuQTensor:
    """A [rows=out, cols=in] quantized matrix in the GPU layout of `qtype` (see module doc)."""
    parts: tuple  # arrays, each with leading axes [rows, cols // 256]; meaning fixed by qtype
    qtype: str = field(metadata=dict(static=True))
    shape: tuple[int, int] = field(metadata=dict(static=True))

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nbytes(self) -> int:
        return int(sum(p.size * p.dtype.itemsize for p in self.parts))

    def __repr__(self) -> str:
        return f"GpuQTensor({self.qtype}, shape={self.shape}, nbytes={self.nbytes})"


def supports_gpu_layout(qtype: str, shape) -> bool:
    return qtype in GPU_QTYPES and shape[1] % SB == 0


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def _k_scales(s: np.ndarray):
    """Q4_K/Q5_K 12-byte packed scales [..., 12] -> (sc, m) uint8 [..., 8] (6-bit values)."""
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    m = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    m[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    m[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, m


def repack_blocks(data: np.ndarray, qtype: str, shape) -> tuple[np.ndarray, ...]:
    """File bytes uint8 [rows, row_bytes] -> the numpy parts of the GPU layout (see GpuQTensor)."""
    rows, cols = shape
    if not supports_gpu_layout(qtype, shape):
        raise ValueError(f"no GPU layout for {qtype} {shape}")
    bs, ts = _BLOCK[qtype]
    nsb = cols // SB
    b = np.asarray(data, np.uint8).reshape(rows, nsb, SB // bs, ts)
    if qtype == "Q8_0":   # qs as int32 words [r, nsb, 8, 8] (byte k of word w: value 4w+k), d [r, nsb, 8]
        return (np.ascontiguousarray(b[..., 2:]).view(np.int32), _f16(b[..., :2]))
    if qtype == "Q4_0":   # qs uint8 [r, nsb, 8, 16] (lo nibble: value i, hi: i+16), d [r, nsb, 8]
        return (np.ascontiguousarray(b[..., 2:]), _f16(b[..., :2]))
    b = b[:, :, 0]
    if qtype == "Q4_K":
        sc, m = _k_scales(b[..., 4:16])
        # qs chunk j (32 bytes): lo nibble -> sub-block 2j, hi nibble -> 2j+1; int32 words
        # [r, nsb, 4, 8], byte k of word w is byte l = 4w+k
        qs = np.ascontiguousarray(b[..., -128:].reshape(rows, nsb, 4, 32)).view(np.int32)
        # chunk j's four 6-bit scales/mins as the bytes of one word, and d/dmin as the halves of one
        # word: three arrays for the GEMV to load per tile instead of seven
        meta = np.stack([sc[..., 0::2], sc[..., 1::2], m[..., 0::2], m[..., 1::2]], axis=-1)
        return (qs, np.ascontiguousarray(meta).view(np.int32)[..., 0],
                np.ascontiguousarray(b[..., 0:4]).view(np.int32)[..., 0])
    if qtype == "Q5_K":
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, m = _k_scales(b[..., 4:16])
        qs = np.ascontiguousarray(b[..., -128:].reshape(rows, nsb, 4, 32))
        qh = np.ascontiguousarray(b[..., 16:48])   # [r, nsb, 32]: bit 2j -> sub-block 2j, bit 2j+1 -> 2j+1
        return (qs, qh, np.ascontiguousarray(sc[..., 0::2]), np.ascontiguousarray(sc[..., 1::2]),
                np.ascontiguousarray(m[..., 0::2]), np.ascontiguousarray(m[..., 1::2]), d, dmin)
    if qtype == "Q6_K":
        q = _q6_values(b)                                   # [r, nsb, 256] in 0..63
        g = q.reshape(rows, nsb, 4, 4, 16)                  # group 4t+c of 16 values
        lo, hi = g & 15, g >> 4
        ql_e = lo[:, :, :, 0] | (lo[:, :, :, 1] << 4)       # [r, nsb, 4, 16]
        ql_o = lo[:, :, :, 2] | (lo[:, :, :, 3] << 4)
        qh = hi[:, :, :, 0] | (hi[:, :, :, 1] << 2) | (hi[:, :, :, 2] << 4) | (hi[:, :, :, 3] << 6)
        # the signed 8-bit scales of groups (t, 0..3) as the bytes of word t: [r, nsb, 4] int32
        sc = np.ascontiguousarray(b[..., 192:208]).view(np.int32)
        words = [np.ascontiguousarray(a.astype(np.uint8)).view(np.int32) for a in (ql_e, ql_o, qh)]
        return (*words, sc, _f16(b[..., 208:210]))          # words int32 [r, nsb, 4, 4] each
    raise AssertionError(qtype)


def _q6_values(b: np.ndarray) -> np.ndarray:
    """Q6_K blocks [..., 210] -> unsigned 6-bit quants [..., 256] in natural value order."""
    ql = b[..., :128].astype(np.uint8)
    qh = b[..., 128:192].astype(np.uint8)
    out = np.empty(b.shape[:-1] + (256,), np.uint8)
    for n in range(2):
        a, c, h = ql[..., n * 64:n * 64 + 32], ql[..., n * 64 + 32:n * 64 + 64], qh[..., n * 32:n * 32 + 32]
        o = n * 128
        out[..., o:o + 32] = (a & 15) | ((h & 3) << 4)
        out[..., o + 32:o + 64] = (c & 15) | (((h >> 2) & 3) << 4)
        out[..., o + 64:o + 96] = (a >> 4) | (((h >> 4) & 3) << 4)
        out[..., o + 96:o + 128] = (c >> 4) | (((h >> 6) & 3) << 4)
    return out


def repack_for_gpu(q):
    """QTensor (file blocks) -> GpuQTensor on the default device. A QTensor whose type (or row
    length) has no GPU layout is returned unchanged: quant.matmul dequantizes it + XLA dot."""
    if not supports_gpu_layout(q.qtype, q.shape):
        return q
    parts = repack_blocks(np.asarray(q.data), q.qtype, q.shape)
    return GpuQTensor(tuple(jnp.asarray(p) for p in parts), q.qtype, tuple(q.shape))


# ---- x split into the parts each layout multiplies: x [B, cols] -> list of [B, nsb, P] --------

def split_x(x: jax.Array, qtype: str) -> list:
    B, cols = x.shape
    nsb = cols // SB
    if qtype == "DENSE":
        return [x.reshape(B, nsb, SB)]
    if qtype == "Q8_0":
        v = x.reshape(B, nsb, 8, 8, 4)
        return [v[..., k].reshape(B, nsb, 64) for k in range(4)]
    if qtype == "Q4_0":
        v = x.reshape(B, nsb, 8, 2, 16)
        return [v[:, :, :, h].reshape(B, nsb, 128) for h in range(2)]
    if qtype == "Q5_K":
        v = x.reshape(B, nsb, 4, 2, 32)
        return [v[:, :, :, h].reshape(B, nsb, 128) for h in range(2)]
    if qtype == "Q4_K":   # part (k, h): byte k of each word, low (h=0) or high nibble
        v = x.reshape(B, nsb, 4, 2, 8, 4)
        return [v[:, :, :, h, :, k].reshape(B, nsb, 32) for k in range(4) for h in range(2)]
    if qtype == "Q6_K":   # part (c, k): quant c (group 4t+c) from byte k of each word
        v = x.reshape(B, nsb, 4, 4, 4, 4)
        return [v[:, :, :, c, :, k].reshape(B, nsb, 16) for c in range(4) for k in range(4)]
    raise ValueError(qtype)


# ---- dequantization of a tile, shared by the kernels (on loaded values) and by the jnp path ----

_MAGIC = 0x4B000000   # float32 bit pattern of 2**23: OR-ing a small int n into its mantissa gives 2**23 + n
_TWO23 = float(2 ** 23)
_BYTE_SIGNS = 0x80808080 - (1 << 32)   # the int32 with bit 7 of every byte set


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
    """Q4_K's per-chunk words (repack_blocks) -> ((d*sc_even, d*sc_odd), (dmin*m_even, dmin*m_odd)),
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


def dequant_parts(qtype: str, p, flat: bool = True) -> list:
    """Loaded layout arrays (leading axes [N, S]) -> list of float32 [N, S, P] matching split_x.

    flat=False keeps each part in the shape of its words, [N, S, a, b] with a * b = P (no reshape:
    inside a Triton kernel a reshape can cost a trip through shared memory).
    """
    f32 = jnp.float32

    def done(w, P):
        return w.reshape(w.shape[0], w.shape[1], P) if flat else w

    if qtype == "DENSE_ID":   # a dense matrix viewed as [rows, nsb, 256]
        return [p[0].astype(f32)]
    if qtype == "Q8_0":
        qs, d = p                                           # int32 words [N, S, 8, 8]
        d = d.astype(f32)[..., None]
        out = []
        biased = qs ^ _BYTE_SIGNS                           # each signed byte b -> b + 128, unsigned
        for k in range(4):
            w = _small_int_to_f32((biased >> (8 * k)) & 255, 128) * d  # signed byte k
            out.append(done(w, 64))
        return out
    if qtype == "Q4_0":
        qs, d = p
        q = qs.astype(jnp.int32)
        d = d.astype(f32)[..., None]
        out = []
        for v in (q & 15, q >> 4):
            w = _small_int_to_f32(v, 8) * d
            out.append(done(w, 128))
        return out
    if qtype == "Q4_K":
        qs, meta, dm = p                                    # qs int32 words [N, S, 4, 8]
        scale, mins = q4k_scales(meta, dm)
        scale, mins = [s[..., None] for s in scale], [m[..., None] for m in mins]
        out = []
        for k in range(4):
            for h in range(2):
                w = _small_int_to_f32((qs >> (8 * k + 4 * h)) & 15) * scale[h] - mins[h]
                out.append(done(w, 32))
        return out
    if qtype == "Q5_K":
        qs, qh, sce, sco, me, mo, d, dmin = p
        q = qs.astype(jnp.int32)
        d = d.astype(f32)[..., None]
        dmin = dmin.astype(f32)[..., None]
        lo, hi = q & 15, q >> 4
        if qh is not None:   # [N, S, 32] -> bit 2j / 2j+1 of byte l for chunk j
            h = qh.astype(jnp.int32)[:, :, None, :]
            sh = (jnp.arange(4, dtype=jnp.int32) * 2).reshape(1, 1, 4, 1)
            lo = lo + (((h >> sh) & 1) << 4)
            hi = hi + (((h >> (sh + 1)) & 1) << 4)
        out = []
        for v, sc, m in ((lo, sce, me), (hi, sco, mo)):
            s = (d * sc.astype(f32))[..., None]
            mm = (dmin * m.astype(f32))[..., None]
            w = _small_int_to_f32(v) * s - mm
            out.append(done(w, 128))
        return out
    if qtype == "Q6_K":
        e, o, h, sc_words, d = p                           # words int32 [N, S, 4, 4]
        out = []
        for c, s in enumerate(q6k_scales(sc_words, d)):
            ql = e if c < 2 else o
            sc = s[..., None]
            for k in range(4):
                nib = (ql >> (8 * k + 4 * (c % 2))) & 15
                hi = (h >> (8 * k + 2 * c)) & 3
                w = _small_int_to_f32(nib | (hi << 4), 32) * sc
                out.append(done(w, 16))
        return out
    raise ValueError(qtype)


def _part_order(qtype: str) -> np.ndarray:
    """Natural value index (0..255) of each position of the concatenated parts of split_x."""
    idx = np.arange(SB, dtype=np.int32).reshape(1, SB)   # numpy: also callable while tracing
    parts = split_x(idx, qtype)
    return np.concatenate([np.asarray(p).reshape(-1) for p in parts]).astype(np.int32)


def _merge_parts(qtype: str, parts: list, rows: int, nsb: int) -> jax.Array:
    """Inverse of split_x for dequantized weights: list of [rows, nsb, P] -> [rows, nsb*256]."""
    w = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
    inv = np.argsort(_part_order(qtype))
    if not np.array_equal(inv, np.arange(SB)):
        w = w[..., inv]
    return w.reshape(rows, nsb * SB)


def dequantize_gpu(w: GpuQTensor, dtype=jnp.float32) -> jax.Array:
    """The dense [rows, cols] matrix a GpuQTensor stands for (jnp; used for prefill and tests)."""
    rows, cols = w.shape
    nsb = cols // SB
    return _merge_parts(w.qtype, dequant_parts(w.qtype, w.parts), rows, nsb).astype(dtype)


def dequantize_gpu_part_order(w: GpuQTensor, dtype=jnp.bfloat16) -> jax.Array:
    """The dense matrix with each superblock's columns in part order (split_x's), not natural order.

    x_part_order(x) @ this.T == x @ dequantize_gpu(w).T, without permuting the big matrix: the
    prefill GEMM permutes the small activations instead of gathering every weight column.
    """
    rows, cols = w.shape
    parts = dequant_parts(w.qtype, w.parts)
    dense = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
    return dense.reshape(rows, cols).astype(dtype)


def x_part_order(x: jax.Array, qtype: str) -> jax.Array:
    """x [M, cols] with each superblock's values reordered as split_x's parts, flattened back."""
    parts = split_x(x, qtype)
    return (jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]).reshape(x.shape)


def gather_rows(w: GpuQTensor, ids: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Dequantized rows `ids` (any int shape) of a packed [vocab, dim] table -> ids.shape + (dim,).

    Only the gathered rows' blocks are read and dequantized (an embedding lookup of a quantized
    token_embd). Out-of-range ids are clamped, as jnp.take(mode='clip') does for dense tables.
    """
    rows, cols = w.shape
    flat = jnp.clip(jnp.asarray(ids).reshape(-1), 0, rows - 1)
    parts = [jnp.take(p, flat, axis=0) for p in w.parts]
    dense = _merge_parts(w.qtype, dequant_parts(w.qtype, parts), flat.shape[0], cols // SB)
    return dense.reshape(*jnp.shape(ids), cols).astype(dtype)
