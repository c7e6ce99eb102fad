"""GGUF quantizers, each written once over an array backend: numpy on the host, jax.numpy jitted on a
device (device_quant.py). Both run the same float32 operations in the same order, so their bytes are
identical; the tests draw tensors and compare them.

Every encoder takes float32 blocks [N, block_size] laid out as the file's values and returns uint8
[N, type_size], following llama.cpp's reference quantizers (`quantize_row_*_ref` in ggml-quants.c)
operation by operation, in float32 as they are:
- Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: byte-identical to gguf-py's numpy ports (tests) and through them to
  llama.cpp (`pytest -m llamacpp` compares with its library directly).
- Q4_K/Q5_K: per 32-value sub-block, `make_qkx2_quants` fits scale and min by weighted least squares
  (weights |x| + rms of the sub-block) over 21 (Q4_K) or 16 (Q5_K) trial step sizes, keeping each fit
  that lowers the weighted squared error (and moving the grid's min with it); the 8 scales and 8 mins
  are coded in 6 bits against the largest of each, and the values requantized with the coded scales.
- Q6_K: per 16-value sub-block, `make_qx_quants` (rmse_type 1: weights x^2) tries 19 symmetric step
  sizes; the 16 scales are coded as int8 against the one of largest magnitude.
Sums run sequentially over a sub-block, first value first, and maxima are first-occurrence scans, as
llama.cpp's loops run. Where we differ from llama.cpp, none of it changes the format: rounding
saturates (llama.cpp's nearest_int wraps past 2^22), the quants of a sub-block whose coded scale is 0
are written as the zero point, and llama.cpp's build may contract a*b+c into an FMA (its rounding then
differs in the last bit, so near-ties between trial scales can resolve differently).

Bit-identity on a device needs two guards, both in `JaxOps` (in numpy they are the identity), against
rewrites that change the rounding numpy does (each measured on XLA:CPU; the tests catch a new one):
- LLVM contracts a*b + c into an FMA. `pin` hides a product behind an XOR with a zero that only exists
  at run time, so no contraction can see through it; every product that feeds an add is pinned.
- XLA turns x / broadcast(b) into x * broadcast(1 / b), even for b computed at run time. `divisor`
  expands b to the quotient's shape and XORs it with zeros made from the input's bits, which XLA
  cannot prove to be a broadcast.
XLA:CPU also flushes subnormals to zero; device_quant.py re-encodes the blocks that could meet one.
"""
from __future__ import annotations

import numpy as np

_F32 = np.float32
_GROUP_MAX_EPS = _F32(1e-15)   # llama.cpp: a Q6_K sub-block (and block) below this is all zero
_HOST_CHUNK = 1024             # 256-value super-blocks per numpy pass: the [n, chunk] rows stay in cache


class _Numpy:
    """Host backend: numpy evaluates each float32 operation exactly as written."""
    xp = np

    @staticmethod
    def pin(v):
        return v

    @staticmethod
    def divisor(b, shape):
        return b

    @staticmethod
    def fori(n, body, carry):
        for i in range(n):
            carry = body(i, carry)
        return carry

    @staticmethod
    def table(values):
        return np.asarray(values, _F32)

    @staticmethod
    def t(v):
        """v.T, contiguous: the scans then read whole rows."""
        return np.ascontiguousarray(v.T)

    @staticmethod
    def u8(v):
        return v.astype(np.uint8)

    @staticmethod
    def f16(v):
        """float32 [...] -> (little-endian f16 bytes [..., 2], the f16 value back as float32)."""
        h = v.astype("<f2")
        return h.view(np.uint8).reshape(*v.shape, 2), h.astype(_F32)


class JaxOps:
    """Device backend, traced under jit: `zero` is a uint32 0 passed in as an argument, `like` the
    encoder's input (at least as many values as any divisor)."""

    def __init__(self, zero, like):
        import jax.numpy as jnp
        from jax import lax
        self.xp, self._lax, self._zero = jnp, lax, zero
        self._zeros = (lax.bitcast_convert_type(like, jnp.uint32) & zero).reshape(-1)

    def _xor(self, v, z):
        lax, jnp = self._lax, self.xp
        return lax.bitcast_convert_type(lax.bitcast_convert_type(v, jnp.uint32) ^ z, jnp.float32)

    def pin(self, v):
        return self._xor(self.xp.asarray(v, self.xp.float32), self._zero)

    def divisor(self, b, shape):
        size = int(np.prod(shape))
        b = self.xp.broadcast_to(self.xp.asarray(b, self.xp.float32), shape)
        return self._xor(b, self._zeros[:size].reshape(shape))

    def fori(self, n, body, carry):
        return self._lax.fori_loop(0, n, body, carry)

    def table(self, values):
        return self.xp.asarray(np.asarray(values, _F32))

    @staticmethod
    def t(v):
        return v.T

    def u8(self, v):
        return v.astype(self.xp.uint8)

    def f16(self, v):
        jnp = self.xp
        h = v.astype(jnp.float16)
        return self._lax.bitcast_convert_type(h, jnp.uint8), h.astype(jnp.float32)


NUMPY = _Numpy()


# ---- shared pieces: values are laid out [n, M] (the n values of M sub-blocks), scans run over axis 0 ----

def _seq_sum(t):
    """t[0] + t[1] + ... + t[n-1], in that order (llama.cpp's accumulation loop)."""
    acc = t[0]
    for i in range(1, t.shape[0]):
        acc = acc + t[i]
    return acc


def _rint_clip(ops, v, lo, hi):
    """nearest_int (round half to even), saturated to [lo, hi]; still float32."""
    return ops.xp.rint(ops.xp.clip(v, lo, hi))


def _div(ops, a, b):
    """a / b, correctly rounded: never a multiply by the reciprocal."""
    return a / ops.divisor(b, np.broadcast_shapes(np.shape(a), np.shape(b)))


def _mul(ops, a, b):
    return ops.pin(a * b)


def _first_max(xp, v, start):
    """max(start, v[0], v[1], ...) keeping the first of equal values (llama.cpp's `if (v > m) m = v`)."""
    m = start
    for i in range(v.shape[0]):
        m = xp.where(v[i] > m, v[i], m)
    return m


def _first_min(xp, v):
    m = v[0]
    for i in range(1, v.shape[0]):
        m = xp.where(v[i] < m, v[i], m)
    return m


# ---- legacy 32-value blocks: x [N, 32] -> uint8 [N, type_size] -------------------------------------

def _absmax_signed(xp, xt):
    """llama.cpp's scan for the value of largest magnitude (first one; 0 for an all-zero block)."""
    amax = xp.zeros(xt.shape[1:], _F32)
    vmax = amax
    for i in range(xt.shape[0]):
        a = xp.abs(xt[i])
        bigger = amax < a
        amax = xp.where(bigger, a, amax)
        vmax = xp.where(bigger, xt[i], vmax)
    return amax, vmax


def _inverse(ops, d):
    return ops.xp.where(d == 0, _F32(0), _div(ops, _F32(1), d))


def _scaled(ops, v, inv):
    """v * inv per block; 0 where that is 0 * inf (a subnormal d: llama.cpp's cast is undefined there)."""
    p = ops.pin(v * inv[:, None])
    return ops.xp.where(p == p, p, _F32(0))


def _nibbles(xp, q):
    """q [N, 32] in 0..15 (or 0..31: the low 4 bits) -> 16 bytes: value j low, value j + 16 high."""
    return (q[:, :16] & 0xF) | (q[:, 16:] << 4)


def _high_bits(xp, q):
    """Bit 4 of each of 32 values -> 4 bytes, value j at bit j % 8 of byte j // 8 (packbits, little)."""
    b = (q >> 4).reshape(q.shape[0], 4, 8)
    out = b[..., 0]
    for j in range(1, 8):
        out = out | (b[..., j] << j)
    return out


def _q8_0(ops, x):
    xp = ops.xp
    amax, _ = _absmax_signed(xp, ops.t(x))
    d = _div(ops, amax, _F32(127))
    q = _scaled(ops, x, _inverse(ops, d))
    a = xp.abs(q)   # roundf: half away from zero
    fl = xp.floor(a)
    q = xp.sign(q) * (fl + xp.floor((a - fl) * _F32(2)))
    return xp.concatenate([ops.f16(d)[0], ops.u8(q.astype(xp.int8))], axis=1)


def _q4_0_like(ops, x, n):
    xp = ops.xp
    _, vmax = _absmax_signed(xp, ops.t(x))
    d = _div(ops, vmax, _F32(-n))
    q = xp.trunc(_scaled(ops, x, _inverse(ops, d)) + _F32(n + 0.5))
    return ops.f16(d)[0], ops.u8(xp.clip(q, 0, 2 * n - 1))


def _q4_1_like(ops, x, nmax):
    xp = ops.xp
    xt = ops.t(x)
    lo, hi = _first_min(xp, xt), _first_max(xp, xt[1:], xt[0])
    d = _div(ops, hi - lo, _F32(nmax))
    q = xp.trunc(_scaled(ops, x - lo[:, None], _inverse(ops, d)) + _F32(0.5))
    return ops.f16(d)[0], ops.f16(lo)[0], ops.u8(xp.clip(q, 0, nmax))


def _q4_0(ops, x):
    d, q = _q4_0_like(ops, x, 8)
    return ops.xp.concatenate([d, _nibbles(ops.xp, q)], axis=1)


def _q5_0(ops, x):
    d, q = _q4_0_like(ops, x, 16)
    return ops.xp.concatenate([d, _high_bits(ops.xp, q), _nibbles(ops.xp, q)], axis=1)


def _q4_1(ops, x):
    d, m, q = _q4_1_like(ops, x, 15)
    return ops.xp.concatenate([d, m, _nibbles(ops.xp, q)], axis=1)


def _q5_1(ops, x):
    d, m, q = _q4_1_like(ops, x, 31)
    return ops.xp.concatenate([d, m, _high_bits(ops.xp, q), _nibbles(ops.xp, q)], axis=1)


# ---- K-quants: x [N, 256] -> uint8 [N, type_size] --------------------------------------------------

def _make_qkx2(ops, x, w, nmax, rmin, rdelta, nstep):
    """make_qkx2_quants over M sub-blocks: x, w [n, M] -> (scale [M], the_min [M] >= 0).

    The search is sequential, as in llama.cpp: each improvement moves `min`, which shifts the grid
    (x - min) and the step (max - min) of every later trial.
    """
    xp = ops.xp
    lo, hi = _first_min(xp, x), _first_max(xp, x[1:], x[0])
    lo = xp.where(lo > 0, _F32(0), lo)
    flat = hi == lo
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(_mul(ops, w, x))

    def quants(iscale, mn):
        return _rint_clip(ops, _mul(ops, iscale, x - mn), 0, nmax)

    def error(scale, mn, q):   # sum w (scale*q + min - x)^2
        diff = ops.pin(scale * q) + mn - x
        return _seq_sum(_mul(ops, w, _mul(ops, diff, diff)))

    iscale = _div(ops, _F32(nmax), xp.where(flat, _F32(1), hi - lo))
    scale = _div(ops, _F32(1), iscale)
    err = error(scale, lo, quants(iscale, lo))
    numerators = ops.table([_F32(rmin) + _F32(rdelta) * _F32(s) + _F32(nmax) for s in range(nstep + 1)])

    def trial(step, carry):
        best_err, best_scale, best_min = carry
        q = quants(_div(ops, numerators[step], hi - best_min), best_min)
        wq = _mul(ops, w, q)
        sum_l, sum_l2, sum_xl = _seq_sum(wq), _seq_sum(_mul(ops, wq, q)), _seq_sum(_mul(ops, wq, x))
        det = _mul(ops, sum_w, sum_l2) - _mul(ops, sum_l, sum_l)
        this_scale = _div(ops, _mul(ops, sum_w, sum_xl) - _mul(ops, sum_x, sum_l), det)
        this_min = _div(ops, _mul(ops, sum_l2, sum_x) - _mul(ops, sum_l, sum_xl), det)
        pos = this_min > 0
        this_scale = xp.where(pos, _div(ops, sum_xl, sum_l2), this_scale)
        this_min = xp.where(pos, _F32(0), this_min)
        cur = error(this_scale, this_min, q)
        better = ~flat & (det > 0) & (cur < best_err)
        return (xp.where(better, cur, best_err), xp.where(better, this_scale, best_scale),
                xp.where(better, this_min, best_min))

    _, scale, mn = ops.fori(nstep + 1, trial, (err, scale, lo))
    return xp.where(flat, _F32(0), scale), -mn


def _k4_quants(ops, x, nmax, rmin, rdelta, nstep):
    """Shared Q4_K/Q5_K: x [N, 256] -> (header bytes [N, 16], quants [N, 8, 32] in 0..nmax as uint8)."""
    xp = ops.xp
    n = x.shape[0]
    xt = ops.t(x.reshape(n * 8, 32))                                             # [32, n*8]
    av = xp.sqrt(_div(ops, _seq_sum(_mul(ops, xt, xt)), _F32(32)))
    w = av + xp.abs(xt)
    scales, mins = _make_qkx2(ops, xt, w, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(n, 8).T, mins.reshape(n, 8).T               # [8, n]
    max_scale = _first_max(xp, scales, xp.zeros(n, _F32))
    max_min = _first_max(xp, mins, xp.zeros(n, _F32))
    inv_scale = xp.where(max_scale > 0, _div(ops, _F32(63), max_scale), _F32(0))
    inv_min = xp.where(max_min > 0, _div(ops, _F32(63), max_min), _F32(0))
    ls = _rint_clip(ops, _mul(ops, inv_scale, scales), 0, 63)               # [8, n]
    lm = _rint_clip(ops, _mul(ops, inv_min, mins), 0, 63)
    d_bytes, d = ops.f16(_div(ops, max_scale, _F32(63)))
    m_bytes, dmin = ops.f16(_div(ops, max_min, _F32(63)))
    dq = _mul(ops, d, ls).T.reshape(n * 8)                                    # llama.cpp's d * sc
    mq = _mul(ops, dmin, lm).T.reshape(n * 8)
    q = _rint_clip(ops, _div(ops, xt + mq, dq), 0, nmax)
    q = ops.u8(xp.where(dq == 0, _F32(0), q)).T.reshape(n, 8, 32)
    ls, lm = ops.u8(ls.T), ops.u8(lm.T)                                       # [n, 8]
    packed = xp.concatenate([ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
                             lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                             (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], axis=1)
    return xp.concatenate([d_bytes, m_bytes, packed], axis=1), q


def _k_nibbles(xp, q):
    """[N, 8, 32] values 0..15 -> 128 bytes: chunk c holds sub-block 2c low, 2c+1 high."""
    q = q.reshape(q.shape[0], 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], 128)


def _q4_k(ops, x):
    head, q = _k4_quants(ops, x, 15, -1.0, 0.1, 20)
    return ops.xp.concatenate([head, _k_nibbles(ops.xp, q)], axis=1)


def _q5_k(ops, x):
    xp = ops.xp
    head, q = _k4_quants(ops, x, 31, -0.5, 0.1, 15)
    qh = q[:, 0] >> 4
    for j in range(1, 8):   # bit j of qh[l] is the 5th bit of value l of sub-block j
        qh = qh | ((q[:, j] >> 4) << j)
    return xp.concatenate([head, qh, _k_nibbles(xp, q & 0xF)], axis=1)


def _make_qx(ops, x, nmax):
    """make_qx_quants(rmse_type=1, no importance weights) over M sub-blocks: x [n, M] -> scale [M]."""
    xp = ops.xp
    amax, vmax = _absmax_signed(xp, x)
    zero = amax < _GROUP_MAX_EPS
    vmax = xp.where(zero, _F32(1), vmax)
    w = _mul(ops, x, x)
    wx = _mul(ops, w, x)

    def sums(iscale):
        q = _rint_clip(ops, _mul(ops, iscale, x), -nmax, nmax - 1)
        return _seq_sum(_mul(ops, wx, q)), _seq_sum(_mul(ops, _mul(ops, w, q), q))

    sumlx, suml2 = sums(_div(ops, _F32(-nmax), vmax))
    scale = xp.where(suml2 != 0, _div(ops, sumlx, suml2), _F32(0))
    numerators = ops.table([-(_F32(nmax) + _F32(0.1) * _F32(s)) for s in range(-9, 10) if s])

    def trial(i, carry):
        scale, best = carry
        sumlx, suml2 = sums(_div(ops, numerators[i], vmax))
        better = (suml2 > 0) & (_mul(ops, sumlx, sumlx) > _mul(ops, best, suml2))
        scale = xp.where(better, _div(ops, sumlx, suml2), scale)
        return scale, xp.where(better, _mul(ops, scale, sumlx), best)

    scale, _ = ops.fori(18, trial, (scale, _mul(ops, scale, sumlx)))
    return xp.where(zero, _F32(0), scale)


def _q6_k(ops, x):
    xp = ops.xp
    n = x.shape[0]
    xt = ops.t(x.reshape(n * 16, 16))                                             # [16, n*16]
    scales = _make_qx(ops, xt, 32).reshape(n, 16).T                           # [16, n]
    amax, max_scale = _absmax_signed(xp, scales)
    zero = amax < _GROUP_MAX_EPS
    iscale = _div(ops, _F32(-128), xp.where(zero, _F32(1), max_scale))
    d_bytes, d = ops.f16(_div(ops, _F32(1), iscale))
    sc = xp.clip(xp.rint(_mul(ops, iscale, scales)), -128, 127)              # [16, n]
    dq = _mul(ops, d, sc).T.reshape(n * 16)
    q = _rint_clip(ops, _div(ops, xt, dq), -32, 31) + _F32(32)
    q = ops.u8(xp.where(dq == 0, _F32(32), q)).T.reshape(n, 2, 4, 32)         # [half, quarter, l]
    ql = xp.concatenate([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
                         (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], axis=2).reshape(n, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4)
          | ((q[:, :, 3] >> 4) << 6)).reshape(n, 64)
    sc_bytes = ops.u8(sc.astype(xp.int8)).T
    out = xp.concatenate([ql, qh, sc_bytes, d_bytes], axis=1)
    return xp.where(zero[:, None], np.uint8(0), out)   # llama.cpp zeroes the whole block


def _mxfp4_exponent(amax):
    """The shared E8M0 exponent of blocks with max |x| = amax (float32 [N]) -> int32 [N] in 0..253."""
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(amax)) - 2 + 127   # float32 log2, so a max just below 2^k may round up to k
    return np.where(amax > 0, np.maximum(e, 0), 0).astype(np.int32)


def quantize_mxfp4(x):
    """float32 rows [N, cols] -> MXFP4 blocks [N, cols / 32 * 17]: llama.cpp's quantize_row_mxfp4_ref
    (e = floor(log2(max |x|)) - 2 + 127, each value the nearest of the E2M1 grid times 2^(e - 128); e = 0
    where llama.cpp's exponent would be negative)."""
    blocks = x.reshape(-1, 32)
    ax = np.abs(blocks)
    e = _mxfp4_exponent(ax.max(axis=1) if blocks.size else np.zeros(0, np.float32))
    d = np.ldexp(np.float32(1), e - 128).astype(np.float32)[:, None]   # exact, subnormal for e < 2
    # Nearest of the doubled magnitudes 0,1,2,3,4,6,8,12 (times d): count the midpoints below |x|, a tie
    # staying below. This is ggml's exhaustive search exactly: each |x - k*d| it compares is exact
    # (Sterbenz: x is within a factor 2 of both grid neighbours), so its first-wins ties are these.
    mag = np.zeros(ax.shape, np.uint8)
    with np.errstate(over="ignore"):
        for mid in (0.5, 1.5, 2.5, 3.5, 5, 7, 10):   # one pass each: no [blocks, 32, 7] temporary
            mag += ax > d * np.float32(mid)
        # e = 253 (max |x| within 2^-17 of float32's max) puts 8d and 12d at inf; ggml's error to them
        # is inf, so it never picks them: neither do we
        top = np.where(np.isfinite(d * np.float32(12)), 7, np.where(np.isfinite(d * np.float32(8)), 6, 5))
    mag = np.minimum(mag, top).astype(np.uint8)
    code = np.where((blocks < 0) & (mag > 0), mag | 8, mag).astype(np.uint8)   # -0 is never chosen
    return np.concatenate([e.astype(np.uint8)[:, None], code[:, :16] | (code[:, 16:] << 4)], axis=1)


def _dense(dtype):
    def encode(ops, x):
        xp = ops.xp
        v = x.astype(dtype)
        if xp is np:
            return v.view(np.uint8).reshape(x.shape[0], -1)
        import jax
        return jax.lax.bitcast_convert_type(v, xp.uint8).reshape(x.shape[0], -1)
    return encode


def _bf16():
    import ml_dtypes
    return _dense(ml_dtypes.bfloat16)


# qtype -> encoder(ops, float32 blocks [N, block_size]) -> uint8 [N, type_size]
ENCODERS = {"F32": _dense(np.float32), "F16": _dense(np.float16), "BF16": _bf16(),
            "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
            "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def host_encoder(qtype: str, block_size: int, type_size: int):
    """The numpy encoder of `qtype`: float32 rows [N, cols] -> uint8 [N, row_bytes], run a bounded
    number of blocks at a time."""
    encode = ENCODERS[qtype]
    per_pass = _HOST_CHUNK * 256 // block_size

    def quantize_rows(x):
        blocks = x.reshape(-1, block_size)
        with np.errstate(all="ignore"):   # trial scales of degenerate sub-blocks divide by 0; never kept
            out = [encode(NUMPY, blocks[i:i + per_pass]) for i in range(0, blocks.shape[0], per_pass)]
        packed = np.concatenate(out) if out else np.empty((0, type_size), np.uint8)
        return packed.reshape(x.shape[0], x.shape[1] // block_size * type_size)
    return quantize_rows


# Types the device does not encode (a float32 log2 on the device may round differently from numpy's at
# a power of two, and MXFP4 is written by convert, not quantized on load at scale): numpy only.
HOST_ONLY = {"MXFP4": quantize_mxfp4}
