"""numpy quantizers: float32 [..., cols] -> uint8 [..., row_bytes] blocks in GGUF layout.

Legacy types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) go through gguf-py; its output is byte-identical to
llama.cpp's `quantize_row_*_ref` (checked against ggml-quants.c, tests marked llamacpp).
gguf-py has no K-quant quantizers, so Q4_K, Q5_K and Q6_K are ours: llama.cpp's reference
algorithm (`quantize_row_q{4,5,6}_K_ref`), vectorised over all sub-blocks at once:
- Q4_K/Q5_K: per 32-value sub-block, `make_qkx2_quants` fits scale and min by weighted least
  squares (weights |x| + rms of the sub-block) over 21 (Q4_K) or 16 (Q5_K) trial step sizes,
  keeping each fit that lowers the weighted squared error (and moving the grid's min with it);
  the 8 scales and 8 mins are coded in 6 bits against the largest of each, and the values
  requantized with the coded scales.
- Q6_K: per 16-value sub-block, `make_qx_quants` (rmse_type 1: weights x^2) tries 19 symmetric
  step sizes; the 16 scales are coded as int8 against the one of largest magnitude.
Differences from llama.cpp, none of which changes the format: sums and trial errors are computed
in float64 from the weighted sums (algebraically equal to llama.cpp's float32 loops, whose own
rounding depends on the build's FMA contraction), so near-ties between trial scales may resolve
differently -- most blocks come out identical, the others with the same error on average; quants
of a sub-block whose coded scale is 0 are written as 0.
"""
from __future__ import annotations

import numpy as np

_F16_MAX = 65504.0
_CHUNK = 1024  # super-blocks per pass: keeps the [chunk*8, 32] temporaries in cache


# ---- the encoders of types.QTYPES: float32 rows [N, cols] -> their uint8 bytes -----------------------

def quantize_dense(dtype):
    """Little-endian values of `dtype` (BF16: rounded to nearest even), as bytes."""
    return lambda x: x.astype(dtype, copy=False).view(np.uint8)


def _superblocks(encode):
    """A K-quant encoder of super-blocks [n, 256] -> [n, type_size], run _CHUNK super-blocks at a time."""
    def quantize_rows(x):
        blocks = x.reshape(-1, 256)
        out = [encode(blocks[i:i + _CHUNK]) for i in range(0, blocks.shape[0], _CHUNK)]
        return np.concatenate(out) if out else np.empty(0, np.uint8)
    return quantize_rows


# ---- shared pieces ------------------------------------------------------------------------------

def _rint(v):
    """llama.cpp's nearest_int: round half to even (the 1.5*2^23 trick) -> int32."""
    return np.rint(v).astype(np.int32)


def _f16_bytes(v):
    """float32 [N] -> (f16 bytes [N, 2], the f16 value back as float32 [N])."""
    h = v.astype("<f2")
    return h.view(np.uint8).reshape(-1, 2), h.astype(np.float32)


def _make_qkx2(x, w, nmax, rmin, rdelta, nstep):
    """Vectorised make_qkx2_quants over rows of x [M, n]: returns (scale [M], the_min [M] >= 0).

    As in llama.cpp the search is sequential: each improvement moves `min`, which shifts the grid
    (x - min) and the step (max - min) of every later trial.
    """
    f32 = np.float32
    mn = np.minimum(x.min(axis=1), 0)
    mx = x.max(axis=1)
    flat = mx == mn
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    sum_w = w64.sum(axis=1)
    sum_x = (w64 * x64).sum(axis=1)
    sum_x2 = (w64 * x64 * x64).sum(axis=1)

    def error(scale, minv, sl, sl2, sxl):  # sum w (scale*l + min - x)^2, from the sums
        return (scale * scale * sl2 + 2 * scale * minv * sl - 2 * scale * sxl
                + minv * minv * sum_w - 2 * minv * sum_x + sum_x2)

    def sums(iscale, minv):
        q = np.clip(_rint(iscale[:, None] * (x - minv[:, None])), 0, nmax).astype(np.float64)
        wq = w64 * q
        return wq.sum(axis=1), np.einsum("ij,ij->i", wq, q), np.einsum("ij,ij->i", wq, x64)

    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = f32(nmax) / np.where(flat, f32(1), mx - mn)
        best_scale = f32(1) / iscale
        best_min = mn
        best_err = error(best_scale.astype(np.float64), mn.astype(np.float64), *sums(iscale, mn))
        for step in range(nstep + 1):
            iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / (mx - best_min)
            sl, sl2, sxl = sums(iscale, best_min)
            det = sum_w * sl2 - sl * sl
            scale = ((sum_w * sxl - sum_x * sl) / det).astype(f32)
            minv = ((sl2 * sum_x - sl * sxl) / det).astype(f32)
            pos = minv > 0
            minv = np.where(pos, f32(0), minv)
            scale = np.where(pos, (sxl / sl2).astype(f32), scale)
            err = error(scale.astype(np.float64), minv.astype(np.float64), sl, sl2, sxl)
            better = ~flat & (det > 0) & (err < best_err)
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, scale, best_scale)
            best_min = np.where(better, minv, best_min)
    best_scale = np.where(flat, f32(0), best_scale)
    return best_scale.astype(f32), (-best_min).astype(f32)


def _make_qx(x, nmax):
    """Vectorised make_qx_quants(rmse_type=1, no importance) over rows of x [M, n] -> scale [M]."""
    f32 = np.float32
    ax = np.abs(x)
    amax = ax.max(axis=1)
    signed_max = np.take_along_axis(x, ax.argmax(axis=1)[:, None], axis=1)[:, 0]
    zero = amax < 1e-15
    safe_max = np.where(zero, f32(1), signed_max)
    x64 = x.astype(np.float64)
    w_x = x64 * x64 * x64  # weight x^2 times x

    def sums(iscale):
        q = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1).astype(np.float64)
        return np.einsum("ij,ij->i", w_x, q), np.einsum("ij,ij->i", x64 * x64, q * q)

    with np.errstate(divide="ignore", invalid="ignore"):
        slx, sl2 = sums(-f32(nmax) / safe_max)
        scale = np.where(sl2 > 0, slx / sl2, 0.0)
        best = scale * slx
        for step in range(-9, 10):
            if step == 0:
                continue
            slx, sl2 = sums(-(f32(nmax) + f32(0.1) * f32(step)) / safe_max)
            better = (sl2 > 0) & (slx * slx > best * sl2)
            scale = np.where(better, slx / sl2, scale)
            best = np.where(better, scale * slx, best)
    return np.where(zero, 0.0, scale).astype(np.float32)


def _code_k4_scales(scales, mins):
    """Per super-block: 8 scales and 8 mins -> (d, dmin f16 bytes, 12 packed bytes, ls, lm, d, dmin)."""
    max_scale = np.maximum(scales.max(axis=1), 0)
    max_min = np.maximum(mins.max(axis=1), 0)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, np.float32(63) / max_scale, 0).astype(np.float32)
        inv_min = np.where(max_min > 0, np.float32(63) / max_min, 0).astype(np.float32)
    ls = np.clip(_rint(inv_scale[:, None] * scales), 0, 63).astype(np.uint8)
    lm = np.clip(_rint(inv_min[:, None] * mins), 0, 63).astype(np.uint8)
    d_bytes, d = _f16_bytes(max_scale / np.float32(63))
    m_bytes, dmin = _f16_bytes(max_min / np.float32(63))
    packed = np.concatenate([ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
                             lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                             (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], axis=1)
    return d_bytes, m_bytes, packed, d[:, None] * ls, dmin[:, None] * lm


def _k4_quants(x, nmax, rmin, rdelta, nstep):
    """Shared Q4_K/Q5_K search: x [N, 256] -> (header bytes [N, 16], quants [N, 8, 32] in 0..nmax)."""
    n = x.shape[0]
    xs = x.reshape(n, 8, 32)
    av = np.sqrt((xs * xs).sum(axis=2, keepdims=True) / np.float32(32))
    w = av + np.abs(xs)
    scales, mins = _make_qkx2(xs.reshape(-1, 32), w.reshape(-1, 32), nmax, rmin, rdelta, nstep)
    d_bytes, m_bytes, packed, dq, mq = _code_k4_scales(scales.reshape(n, 8), mins.reshape(n, 8))
    dq, mq = dq[..., None], mq[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(_rint((xs + mq) / dq), 0, nmax)
    q = np.where(dq == 0, 0, q).astype(np.uint8)
    return np.concatenate([d_bytes, m_bytes, packed], axis=1), q


def _pack_k_nibbles(q):
    """[N, 8, 32] values 0..15 -> 128 bytes: chunk c holds sub-block 2c low, 2c+1 high."""
    q = q.reshape(q.shape[0], 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], 128)


def _q4_k(x):
    head, q = _k4_quants(x, 15, -1.0, 0.1, 20)
    return np.concatenate([head, _pack_k_nibbles(q)], axis=1)


def _q5_k(x):
    head, q = _k4_quants(x, 31, -0.5, 0.1, 15)
    qh = np.zeros((x.shape[0], 32), np.uint8)
    for j in range(8):  # bit j of qh[l] is the 5th bit of value l of sub-block j
        qh |= (q[:, j] >> 4) << j
    return np.concatenate([head, qh, _pack_k_nibbles(q & 0xF)], axis=1)


def _q6_k(x):
    n = x.shape[0]
    xs = x.reshape(n, 16, 16)
    scales = _make_qx(xs.reshape(-1, 16), 32).reshape(n, 16)
    pick = np.abs(scales).argmax(axis=1)[:, None]
    max_scale = np.take_along_axis(scales, pick, axis=1)[:, 0]
    zero = np.abs(max_scale) < 1e-15
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(zero, 0, np.float32(-128) / max_scale).astype(np.float32)
        d_bytes, d = _f16_bytes(np.where(zero, 0, np.float32(1) / iscale).astype(np.float32))
        sc = np.minimum(127, _rint(iscale[:, None] * scales)).astype(np.int8)
        dq = (d[:, None] * sc)[..., None]                              # [n, 16, 1]
        q = np.clip(_rint(xs / dq), -32, 31) + 32
    q = np.where(dq == 0, 32, q).astype(np.uint8).reshape(n, 2, 4, 32)  # [half, quarter, l]
    ql = np.concatenate([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
                         (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], axis=2).reshape(n, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4)
          | ((q[:, :, 3] >> 4) << 6)).reshape(n, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d_bytes], axis=1)
    out[zero] = 0  # llama.cpp zeroes the whole block
    return out


def _mxfp4_exponent(amax):
    """The shared E8M0 exponent of blocks with max |x| = amax (float32 [N]) -> int32 [N] in 0..253."""
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(amax)) - 2 + 127   # float32 log2, so a max just below 2^k may round up to k
    return np.where(amax > 0, np.maximum(e, 0), 0).astype(np.int32)


def quantize_mxfp4(x):
    """float32 rows [N, cols] -> MXFP4 blocks (see the module doc for the rule)."""
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


quantize_q4_k, quantize_q5_k, quantize_q6_k = _superblocks(_q4_k), _superblocks(_q5_k), _superblocks(_q6_k)
