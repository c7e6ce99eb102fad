"""GpuQTensor: GGUF blocks re-laid out (same bytes, give or take 3%) so a Pallas kernel can read them.

The file's blocks interleave f16 scales with packed quants, which a Triton tile cannot load as
vectors. `repack_for_gpu` splits each block's fields into separate arrays whose leading axes are
[rows, superblocks] (a superblock = 256 input values for every type here, so one kernel tiling
fits all), keeping every quant bit and every scale. Device bytes vs file bytes:
Q8_0, Q4_0, Q6_K: identical; Q4_K: 148 / 144 (+2.8%, the 6-bit sub-scales stored as bytes); Q5_K: 180 / 176
(+2.3%, the same).

Each layout also fixes how the 256 input values of a superblock are split into "parts": a part
is the set of values that one packed array field (e.g. the low nibbles) multiplies. The kernels
compute sum_parts <dequant(part), x_part>, with x split the same way once per call (x is tiny).

A GPU type is its GpuLayout in GPU_LAYOUTS (below: repack, split of x, tile dequantizer, unpack's
part shape) plus, where it has them, its factored and int8 tile dots in qdot.py.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..quant.types import qtype_info
from .qdot import FACTORED_DOTS, INT8_DOTS, _BYTE_SIGNS, _small_int_to_f32, q4k_scales, q6k_scales

SB = 256  # values per superblock, every layout


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


# ---- per type: repack (numpy: file blocks [rows, nsb, 256 // block_size, type_size] -> parts), dequant
# (loaded parts -> float32 [N, S, P] matching split_x; `done(w, P)` flattens a part unless flat=False)

# The repacks are written once over an array module `xp` (numpy on the host; jax.numpy on the device,
# where repack_for_gpu runs them jitted on the uploaded blocks): byte slicing, shifts and reinterpreting
# little-endian bytes as wider words (`_as`), nothing that rounds.

def _as(xp, b, dtype):
    """uint8 [..., n * k] -> [..., n] of the k-byte little-endian `dtype` (a numpy view, a jax bitcast)."""
    size = np.dtype(dtype).itemsize
    b = b.reshape(*b.shape[:-1], b.shape[-1] // size, size)
    if xp is np:
        return np.ascontiguousarray(b).view(dtype)[..., 0]
    return jax.lax.bitcast_convert_type(b, dtype)


def _f16(xp, b):
    return _as(xp, b, np.float16)[..., 0]


def _k_scales(xp, s):
    """Q4_K/Q5_K 12-byte packed scales [..., 12] -> (sc, m) uint8 [..., 8] (6-bit values)."""
    sc = xp.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    m = xp.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    return sc, m


def _dequant_q8_0(p, done):
    qs, d = p                                           # int32 words [N, S, 8, 8]
    d = d.astype(jnp.float32)[..., None]
    biased = qs ^ _BYTE_SIGNS                           # each signed byte b -> b + 128, unsigned
    return [done(_small_int_to_f32((biased >> (8 * k)) & 255, 128) * d, 64) for k in range(4)]  # byte k


def _dequant_q4_0(p, done):
    qs, d = p
    q = qs.astype(jnp.int32)
    d = d.astype(jnp.float32)[..., None]
    return [done(_small_int_to_f32(v, 8) * d, 128) for v in (q & 15, q >> 4)]


def _repack_q4_k(xp, b):
    b = b[:, :, 0]
    rows, nsb = b.shape[:2]
    sc, m = _k_scales(xp, b[..., 4:16])
    # qs chunk j (32 bytes): lo nibble -> sub-block 2j, hi nibble -> 2j+1; int32 words
    # [r, nsb, 4, 8], byte k of word w is byte l = 4w+k
    qs = _as(xp, b[..., -128:].reshape(rows, nsb, 4, 32), np.int32)
    # chunk j's four 6-bit scales/mins as the bytes of one word, and d/dmin as the halves of one
    # word: three arrays for the GEMV to load per tile instead of seven
    meta = xp.stack([sc[..., 0::2], sc[..., 1::2], m[..., 0::2], m[..., 1::2]], axis=-1)
    return qs, _as(xp, meta, np.int32)[..., 0], _as(xp, b[..., 0:4], np.int32)[..., 0]


def _dequant_q4_k(p, done):
    qs, meta, dm = p                                    # qs int32 words [N, S, 4, 8]
    scale, mins = q4k_scales(meta, dm)
    scale, mins = [s[..., None] for s in scale], [m[..., None] for m in mins]
    return [done(_small_int_to_f32((qs >> (8 * k + 4 * h)) & 15) * scale[h] - mins[h], 32)
            for k in range(4) for h in range(2)]


def _repack_q5_k(xp, b):
    """Q4_K's words (qs, meta, dm) plus the fifth bits as int32 words: byte k of qh word w is the qh
    byte l = 4w + k, whose bit 2j + h is the fifth bit of chunk j's value l, sub-block 2j + h."""
    b = b[:, :, 0]
    rows, nsb = b.shape[:2]
    sc, m = _k_scales(xp, b[..., 4:16])
    qs = _as(xp, b[..., -128:].reshape(rows, nsb, 4, 32), np.int32)
    qh = _as(xp, b[..., 16:48], np.int32)               # [r, nsb, 8]
    meta = xp.stack([sc[..., 0::2], sc[..., 1::2], m[..., 0::2], m[..., 1::2]], axis=-1)
    return qs, qh, _as(xp, meta, np.int32)[..., 0], _as(xp, b[..., 0:4], np.int32)[..., 0]


def _dequant_q5_k(p, done):
    qs, qh, meta, dm = p                                # qs int32 words [N, S, 4, 8], qh [N, S, 8]
    scale, mins = q4k_scales(meta, dm)
    scale, mins = [s[..., None] for s in scale], [m[..., None] for m in mins]
    h = qh[:, :, None, :]
    chunk_bit = (jnp.arange(4, dtype=jnp.int32) * 2).reshape(1, 1, 4, 1)   # bit 2j of chunk j
    return [done(_small_int_to_f32(((qs >> (8 * k + 4 * hh)) & 15) | (((h >> (8 * k + hh + chunk_bit)) & 1) << 4))
                 * scale[hh] - mins[hh], 32)
            for k in range(4) for hh in range(2)]


def _repack_q6_k(xp, b):
    b = b[:, :, 0]
    rows, nsb = b.shape[:2]
    q = _q6_values(xp, b)                               # [r, nsb, 256] in 0..63
    g = q.reshape(rows, nsb, 4, 4, 16)                  # group 4t+c of 16 values
    lo, hi = g & 15, g >> 4
    ql_e = lo[:, :, :, 0] | (lo[:, :, :, 1] << 4)       # [r, nsb, 4, 16]
    ql_o = lo[:, :, :, 2] | (lo[:, :, :, 3] << 4)
    qh = hi[:, :, :, 0] | (hi[:, :, :, 1] << 2) | (hi[:, :, :, 2] << 4) | (hi[:, :, :, 3] << 6)
    # the signed 8-bit scales of groups (t, 0..3) as the bytes of word t: [r, nsb, 4] int32
    sc = _as(xp, b[..., 192:208], np.int32)
    words = [_as(xp, a, np.int32) for a in (ql_e, ql_o, qh)]
    return (*words, sc, _f16(xp, b[..., 208:210]))      # words int32 [r, nsb, 4, 4] each


def _q6_values(xp, b):
    """Q6_K blocks [..., 210] -> unsigned 6-bit quants [..., 256] in natural value order."""
    ql, qh = b[..., :128], b[..., 128:192]
    out = []
    for n in range(2):
        a, c, h = ql[..., n * 64:n * 64 + 32], ql[..., n * 64 + 32:n * 64 + 64], qh[..., n * 32:n * 32 + 32]
        out += [(a & 15) | ((h & 3) << 4), (c & 15) | (((h >> 2) & 3) << 4),
                (a >> 4) | (((h >> 4) & 3) << 4), (c >> 4) | (((h >> 6) & 3) << 4)]
    return xp.concatenate(out, axis=-1)


def _dequant_q6_k(p, done):
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


# ---- the registry -----------------------------------------------------------------------------------

_ = slice(None)


@dataclass(frozen=True)
class GpuLayout:
    """One GPU type (qtype: its gguf name; DENSE: a dense matrix read as is). split_x views x as [B, nsb,
    *x_view] and takes part i (the values dequantized part i multiplies) as [B, nsb, *x_parts[i]], flat.
    part_shape: (parts, a, b), the words' shape of each part of a superblock, as unpack.py writes them."""
    qtype: str
    x_view: tuple
    x_parts: tuple
    dequant: Callable
    repack: Callable | None = None
    part_shape: tuple[int, int, int] | None = None

    @property
    def factored(self) -> bool:   # a factored tile dot (qdot.FACTORED_DOTS); else the GEMV dequantizes tiles
        return self.qtype in FACTORED_DOTS

    @property
    def int8_group(self) -> int | None:   # values per int8 scale group of x (qdot.INT8_DOTS); None: x stays float
        return INT8_DOTS[self.qtype].groups[-1] if self.qtype in INT8_DOTS else None


GPU_LAYOUTS: dict[str, GpuLayout] = {lay.qtype: lay for lay in (
    # qs int32 words [r, nsb, 8, 8] (byte k of word w: value 4w+k), d [r, nsb, 8]; part k: byte k of each word
    GpuLayout("Q8_0", (8, 8, 4), tuple((_, _, k) for k in range(4)), _dequant_q8_0,
              lambda xp, b: (_as(xp, b[..., 2:], np.int32), _f16(xp, b[..., :2])), (4, 8, 8)),
    # qs uint8 [r, nsb, 8, 16] (lo nibble: value i, hi: i+16), d [r, nsb, 8]; part h: the lo/hi nibbles
    GpuLayout("Q4_0", (8, 2, 16), tuple((_, h) for h in range(2)), _dequant_q4_0,
              lambda xp, b: (b[..., 2:], _f16(xp, b[..., :2])), (2, 8, 16)),
    # part (k, h): byte k of each word, low (h=0) or high nibble
    GpuLayout("Q4_K", (4, 2, 8, 4), tuple((_, h, _, k) for k in range(4) for h in range(2)), _dequant_q4_k,
              _repack_q4_k, (8, 4, 8)),
    # as Q4_K's parts, each value's fifth bit from the qh words
    GpuLayout("Q5_K", (4, 2, 8, 4), tuple((_, h, _, k) for k in range(4) for h in range(2)), _dequant_q5_k,
              _repack_q5_k, (8, 4, 8)),
    # part (c, k): quant c (group 4t+c) from byte k of each word
    GpuLayout("Q6_K", (4, 4, 4, 4), tuple((_, c, _, k) for c in range(4) for k in range(4)), _dequant_q6_k,
              _repack_q6_k, (16, 4, 4)),
    GpuLayout("DENSE", (SB,), ((),), lambda p, done: [p[0].astype(jnp.float32)]),   # viewed as [rows, nsb, 256]
)}
GPU_LAYOUTS["DENSE_ID"] = GPU_LAYOUTS["DENSE"]   # the name the GEMV's dequantizing kernel uses for it
GPU_QTYPES = tuple(q for q, lay in GPU_LAYOUTS.items() if lay.repack is not None)   # packed types


def supports_gpu_layout(qtype: str, shape) -> bool:
    lay = GPU_LAYOUTS.get(qtype)
    return lay is not None and lay.repack is not None and shape[1] % SB == 0


def _blocks(data, qtype: str, shape):
    rows, cols = shape
    if not supports_gpu_layout(qtype, shape):
        raise ValueError(f"no GPU layout for {qtype} {shape}")
    q = qtype_info(qtype)
    return data.reshape(rows, cols // SB, SB // q.block_size, q.type_size)


def repack_blocks(data: np.ndarray, qtype: str, shape) -> tuple[np.ndarray, ...]:
    """File bytes uint8 [rows, row_bytes] -> the numpy parts of the GPU layout (see GpuQTensor)."""
    return GPU_LAYOUTS[qtype].repack(np, _blocks(np.asarray(data, np.uint8), qtype, shape))


@functools.partial(jax.jit, static_argnames=("qtype", "shape"))
def repack_on_device(data: jax.Array, qtype: str, shape) -> tuple[jax.Array, ...]:
    """repack_blocks on the device: the uploaded file bytes -> the layout's parts, jitted per
    (type, shape). Loading then uploads each tensor once and never copies it back to the host."""
    return GPU_LAYOUTS[qtype].repack(jnp, _blocks(data, qtype, shape))


def repack_for_gpu(q):
    """QTensor (file blocks) -> GpuQTensor on the default device, repacked there. A QTensor whose type
    (or row length) has no GPU layout is returned unchanged: ops/ dequantize it for an XLA dot."""
    if not supports_gpu_layout(q.qtype, q.shape):
        return q
    shape = tuple(int(n) for n in q.shape)
    return GpuQTensor(tuple(repack_on_device(jnp.asarray(q.data), q.qtype, shape)), q.qtype, shape)


def split_x(x: jax.Array, qtype: str) -> list:
    """x [B, cols] -> the list of [B, nsb, P] activations each part of the layout multiplies."""
    B, cols = x.shape
    nsb, lay = cols // SB, GPU_LAYOUTS[qtype]
    v = x.reshape(B, nsb, *lay.x_view)
    return [v[(_, _) + idx].reshape(B, nsb, -1) for idx in lay.x_parts]


def dequant_parts(qtype: str, p, flat: bool = True) -> list:
    """Loaded layout arrays (leading axes [N, S]) -> list of float32 [N, S, P] matching split_x.

    flat=False keeps each part in the shape of its words, [N, S, a, b] with a * b = P (no reshape:
    inside a Triton kernel a reshape can cost a trip through shared memory).
    """
    def done(w, P):
        return w.reshape(w.shape[0], w.shape[1], P) if flat else w

    return GPU_LAYOUTS[qtype].dequant(p, done)


def _part_order(qtype: str) -> np.ndarray:
    """Natural value index (0..255) of each position of the concatenated parts of split_x."""
    idx = np.arange(SB, dtype=np.int32).reshape(1, SB)   # numpy: also callable while tracing
    parts = split_x(idx, qtype)
    return np.concatenate([np.asarray(p).reshape(-1) for p in parts]).astype(np.int32)


def _cat(parts: list) -> jax.Array:
    return jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]


def _merge_parts(qtype: str, parts: list, rows: int, nsb: int) -> jax.Array:
    """Inverse of split_x for dequantized weights: list of [rows, nsb, P] -> [rows, nsb*256]."""
    w = _cat(parts)
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
    return _cat(parts).reshape(rows, cols).astype(dtype)


def x_part_order(x: jax.Array, qtype: str) -> jax.Array:
    """x [M, cols] with each superblock's values reordered as split_x's parts, flattened back."""
    return _cat(split_x(x, qtype)).reshape(x.shape)


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
