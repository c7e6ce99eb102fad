"""The decode GEMV's int8 activations in one Pallas launch, with the op that produces them fused in.

XLA needs two kernels to quantize x per scale group (an absmax reduce, then the rounding), and two
more for the RMSNorm in front of it; at batch 1 each is a launch for a few KB, and they were most of
the small kernels of an 8B decode step (BENCHMARKS.md).
This kernel reads x once and writes what the GEMV reads (qdot.prepare_x_q8's natural layout): int32 words of four int8s and one float32 scale per group of `group` values.

pre: None (x as is) or "norm" (RMSNorm by `weight`; every program reads the whole row for the sum
of squares and quantizes its share), rounded like layers.py, so the int8s match the unfused path's;
only float32 summation order and the GPU's rsqrt can move a value by an ulp (and, rarely, an int8 by
one step). Every entry takes the KernelConfig (`cfg`): tiles and interpret mode come from it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .tuning import KernelConfig


def rne_int(v, *, interpret: bool):
    """int32(round-half-even(v)), as jnp.round. On the GPU one cvt.rni: Pallas/Triton has no round,
    and the float tricks (adding 1.5 * 2**23) would be contracted with the multiply producing v into
    an FMA that rounds the exact product, not v, and flips ties against the XLA path."""
    if interpret:
        return jnp.round(v).astype(jnp.int32)
    [r] = plgpu.elementwise_inline_asm("cvt.rni.s32.f32 $0, $1;", args=[v], constraints="=r,r", pack=1,
                                       result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, jnp.int32)])
    return r


# (groups per program, warps): the row split over programs, each re-reading it for the norm's sum
# of squares, beat a program per row (whose loads, reductions and stores run one after another on
# one SM); 8 warps paid once the prep also adds the residual's K splits (BENCHMARKS.md, runs 10, 17).
TILE = (32, 8)


def _tile(cfg: KernelConfig) -> tuple:
    return cfg.tile("XQUANT", TILE)


def _chunk(groups: int, pre: str | None, cfg: KernelConfig) -> int | None:
    """Groups per program: a power of two dividing `groups` (Triton's blocks must be powers of two),
    at most the tile's. None when the norm cannot be fused: its sum of squares reads the whole row
    as one block, so `groups` itself must be a power of two."""
    if pre == "norm" and groups & (groups - 1):
        return None
    c = 1 << (_tile(cfg)[0].bit_length() - 1)
    while groups % c:
        c //= 2
    return c


def fusable_prep(cols: int, group: int, pre: str | None, cfg: KernelConfig) -> bool:
    """Whether quantize_x can take a row of `cols` values with this group size and pre-op."""
    return cols % group == 0 and _chunk(cols // group, pre, cfg) is not None


def _store_int8(ys, words_ref, scales_ref, interpret):
    """Byte lanes ys (4 x [groups, group/4] float32) -> per-group int8s packed in words, and scales."""
    amax = jnp.max(jnp.abs(ys[0]), axis=1)
    for y in ys[1:]:
        amax = jnp.maximum(amax, jnp.max(jnp.abs(y), axis=1))
    inv = jnp.where(amax > 0, 127.0 / jnp.where(amax > 0, amax, 1.0), 0.0)
    qs = [jnp.clip(rne_int(y * inv[:, None], interpret=interpret), -127, 127) for y in ys]
    words_ref[...] = (qs[0] & 255) | ((qs[1] & 255) << 8) | ((qs[2] & 255) << 16) | (qs[3] << 24)
    scales_ref[...] = amax / 127.0


def round_to(v, dtype):
    """float32 v rounded to the model's dtype, back in float32."""
    return v.astype(dtype).astype(jnp.float32)


def swiglu_rounded(g, u, dtype):
    """layers.swiglu on float32 values of the model's dtype: silu rounded once, the product once."""
    return round_to(round_to(g / (1.0 + jnp.exp(-g)), dtype) * u, dtype)


def _plus_parts(x, ref, idx, n_res: int, dtype):
    """x (float32) plus the K-split partials ref[s][idx] (s < n_res), as x + matmul(...) computes it:
    the splits' float32 sum rounded to the model's dtype, then the add rounded. x where ref is None."""
    if ref is None:
        return x
    total = ref[(0,) + idx].astype(jnp.float32)
    for s in range(1, n_res):
        total = total + ref[(s,) + idx].astype(jnp.float32)
    return round_to(x + round_to(total, dtype), dtype)


def _kernel(x_ref, words_ref, scales_ref, *, interpret):
    ys = [x_ref[:, :, k].astype(jnp.float32) for k in range(4)]      # byte k of every word: [groups, words]
    _store_int8(ys, words_ref, scales_ref, interpret)


def _norm_kernel(*refs, n_groups, n_res, eps, cols, dtype, interpret):
    """RMSNorm (after the residual add, when there is one) and the int8 quantization for each group
    size. refs: per group size its chunk of x and of the norm weight; the whole row of x; with a
    residual its whole row [S, ...] and per group size its chunk [S, ...] (S = n_res K splits);
    outputs: per group size words and scales, then (with a residual) the chunk of the new x."""
    f32 = jnp.float32
    xc = refs[:n_groups]
    wc = refs[n_groups:2 * n_groups]
    row_ref = refs[2 * n_groups]
    res_row = refs[2 * n_groups + 1] if n_res else None
    res_chunks = refs[2 * n_groups + 2:3 * n_groups + 2] if n_res else ()
    outs = refs[2 * n_groups + 1 + (n_groups + 1 if n_res else 0):]

    def with_residual(x, ref, idx):
        return _plus_parts(x, ref, idx, n_res, dtype)

    whole = (slice(None),) * 3
    row = with_residual(row_ref[...].astype(f32), res_row, whole)
    ss = jnp.sum(jnp.sum(jnp.sum(row * row, axis=2), axis=1), axis=0)
    r = jax.lax.rsqrt(ss / cols + eps)
    for gi in range(n_groups):
        part = res_chunks[gi] if n_res else None
        ys = []
        for k in range(4):
            v = with_residual(xc[gi][:, :, k].astype(f32), part, (slice(None), slice(None), k))
            ys.append(round_to(round_to(wc[gi][:, :, k].astype(f32), dtype) * round_to(v * r, dtype), dtype))
        _store_int8(ys, outs[2 * gi], outs[2 * gi + 1], interpret)
    if n_res:   # the new residual stream, this program's chunk (the first group size's view)
        new = with_residual(xc[0][...].astype(f32), res_chunks[0], whole)
        outs[-1][...] = new.astype(outs[-1].dtype)


@functools.partial(jax.jit, static_argnames=("group", "pre", "eps", "cfg"))
def quantize_x(x: jax.Array, group: int, *, cfg: KernelConfig, pre: str | None = None,
               other: jax.Array | None = None, eps: float | None = None):
    """x [B, cols] -> (words int32 [B, cols/group, group/4], scales float32 [B, cols/group]) of
    pre(x): per group, int8 q = round(v * 127 / absmax) packed little-endian, v ~= q * scale.

    pre="norm": other is the RMSNorm weight [cols], eps its epsilon (norm_quantize_x with one group
    size). Needs fusable_prep(cols, group, pre, cfg).
    """
    B, cols = x.shape
    if pre not in (None, "norm") or (pre is None) != (other is None):
        raise ValueError(f"quantize_x: pre={pre!r} with {'an' if other is not None else 'no'} operand")
    if not fusable_prep(cols, group, pre, cfg):
        raise ValueError(f"quantize_x: {cols} values in groups of {group} with pre={pre!r} do not tile")
    if pre == "norm":
        [prep], _ = norm_quantize_x(x, (group,), other, eps, cfg=cfg)
        return prep
    groups, wpg = cols // group, group // 4
    chunk = _chunk(groups, pre, cfg)
    interpret = cfg.interpret
    return pl.pallas_call(
        functools.partial(_kernel, interpret=interpret),
        grid=(B, groups // chunk),
        in_specs=[pl.BlockSpec((None, chunk, wpg, 4), lambda b, c: (b, c, 0, 0))],
        out_specs=[pl.BlockSpec((None, chunk, wpg), lambda b, c: (b, c, 0)),
                   pl.BlockSpec((None, chunk), lambda b, c: (b, c))],
        out_shape=[jax.ShapeDtypeStruct((B, groups, wpg), jnp.int32),
                   jax.ShapeDtypeStruct((B, groups), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=_tile(cfg)[1], num_stages=1),
        interpret=interpret,
        name="quantize_x_plain",
    )(x.reshape(B, groups, wpg, 4))


def norm_fusable(cols: int, groups, cfg: KernelConfig) -> bool:
    """Whether norm_quantize_x can take a row of `cols` values quantized in each of these group sizes."""
    return bool(groups) and all(fusable_prep(cols, g, "norm", cfg) for g in groups)


@functools.partial(jax.jit, static_argnames=("groups", "eps", "cfg"))
def norm_quantize_x(x: jax.Array, groups: tuple, weight: jax.Array, eps: float, *, cfg: KernelConfig,
                    residual=None):
    """The RMSNorm in front of a decode GEMV and its int8 activations, in one launch, optionally
    after the residual add that precedes the norm in a transformer block.

    x [B, cols] (the residual stream, model dtype); weight [cols]; residual None or [S, B, cols]: the
    K-split float32 partial sums of the matmul whose output joins the stream here (S = 1 for a plain
    delta). The new stream is x + bf16(sum of the splits), rounded as `x + matmul(...)` rounds.
    -> ([(words, scales) per group size, as quantize_x returns them], new x [B, cols] (x itself
    without a residual)). One launch for every group size the GEMV's weight types need (Q4_K's 32
    and Q6_K's 16 in one Q/K/V launch), where each size took its own launch.
    """
    B, cols = x.shape
    groups = tuple(int(g) for g in groups)
    if not norm_fusable(cols, groups, cfg):
        raise ValueError(f"norm_quantize_x: {cols} values in groups of {groups} do not tile")
    interpret = cfg.interpret
    if weight.shape != (cols,):
        raise ValueError(f"norm_quantize_x: the norm weight has shape {weight.shape}, x has {cols} values")
    if residual is not None and (residual.ndim != 3 or residual.shape[1:] != x.shape):
        raise ValueError(f"norm_quantize_x: residual {residual.shape} is not [splits, {B}, {cols}]")
    # every program covers the same span of values: a whole number of groups of each size
    span = max(_chunk(cols // g, "norm", cfg) * g for g in groups)
    view = lambda a, g: a.reshape(a.shape[:-1] + (cols // g, g // 4, 4))
    chunk_spec = lambda g: pl.BlockSpec((None, span // g, g // 4, 4), lambda b, c: (b, c, 0, 0))
    g0 = groups[0]
    operands = [view(x, g) for g in groups] + [view(weight, g) for g in groups] + [view(x, g0)]
    in_specs = ([chunk_spec(g) for g in groups]
                + [pl.BlockSpec((span // g, g // 4, 4), lambda b, c: (c, 0, 0)) for g in groups]
                + [pl.BlockSpec((None, cols // g0, g0 // 4, 4), lambda b, c: (b, 0, 0, 0))])
    n_res = 0 if residual is None else residual.shape[0]
    if n_res:   # the splits stay one operand: a slice per split is a copy XLA makes before the launch
        operands += [view(residual, g0)] + [view(residual, g) for g in groups]
        in_specs += ([pl.BlockSpec((n_res, None, cols // g0, g0 // 4, 4), lambda b, c: (0, b, 0, 0, 0))]
                     + [pl.BlockSpec((n_res, None, span // g, g // 4, 4), lambda b, c: (0, b, c, 0, 0))
                        for g in groups])
    out_specs, out_shape = [], []
    for g in groups:
        out_specs += [pl.BlockSpec((None, span // g, g // 4), lambda b, c: (b, c, 0)),
                      pl.BlockSpec((None, span // g), lambda b, c: (b, c))]
        out_shape += [jax.ShapeDtypeStruct((B, cols // g, g // 4), jnp.int32),
                      jax.ShapeDtypeStruct((B, cols // g), jnp.float32)]
    if n_res:
        out_specs.append(chunk_spec(g0))
        out_shape.append(jax.ShapeDtypeStruct((B, cols // g0, g0 // 4, 4), x.dtype))
    outs = pl.pallas_call(
        functools.partial(_norm_kernel, n_groups=len(groups), n_res=n_res, eps=float(eps), cols=cols,
                          dtype=x.dtype, interpret=interpret),
        grid=(B, cols // span),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=_tile(cfg)[1], num_stages=1),
        interpret=interpret,
        name="quantize_x_norm" + ("_residual" if n_res else ""),
    )(*operands)
    preps = [(outs[2 * i], outs[2 * i + 1]) for i in range(len(groups))]
    return preps, (outs[-1].reshape(B, cols) if n_res else x)


def norm_x_fusable(cols: int) -> bool:
    """Whether norm_x can take rows of `cols` values (Triton blocks: a power of two)."""
    return cols >= 16 and cols & (cols - 1) == 0


def _norm_x_kernel(*refs, n_res, eps, cols, dtype):
    """RMSNorm of one chunk of a row (after the residual add, when there is one). refs: the chunk of
    x, of the norm weight, the whole row of x; with a residual its whole row and chunk [S, ...];
    outputs: the normalized chunk, then (with a residual) the chunk of the new x."""
    f32 = jnp.float32
    x_ref, w_ref, row_ref = refs[:3]
    res_row, res_chunk = refs[3:5] if n_res else (None, None)
    outs = refs[5:] if n_res else refs[3:]
    whole = (slice(None),)
    row = _plus_parts(row_ref[...].astype(f32), res_row, whole, n_res, dtype)
    r = jax.lax.rsqrt(jnp.sum(row * row, axis=0) / cols + eps)
    v = _plus_parts(x_ref[...].astype(f32), res_chunk, whole, n_res, dtype)
    outs[0][...] = (round_to(w_ref[...].astype(f32), dtype) * round_to(v * r, dtype)).astype(dtype)
    if n_res:
        outs[1][...] = v.astype(dtype)


@functools.partial(jax.jit, static_argnames=("eps", "cfg"))
def norm_x(x: jax.Array, weight: jax.Array, eps: float, *, cfg: KernelConfig, residual=None):
    """layers.rms_norm(x + residual, weight, eps) and the new stream x + residual in one launch: the
    float-activation counterpart of norm_quantize_x, for GEMVs on dense bf16/f16 weights (XLA takes
    a reduce, an elementwise kernel and, with a residual, the splits' sum and the add).

    x [B, cols] (model dtype, norm_x_fusable(cols)); weight [cols]; residual None or [S, B, cols]
    (K-split float32 partials, S = 1 for a plain delta). -> (normed [B, cols], new x (x itself
    without a residual)). Each program normalizes a chunk, re-reading the row for the sum of squares.
    """
    B, cols = x.shape
    if not norm_x_fusable(cols):
        raise ValueError(f"norm_x: rows of {cols} values do not tile (a power of two >= 16)")
    if weight.shape != (cols,):
        raise ValueError(f"norm_x: the norm weight has shape {weight.shape}, x has {cols} values")
    if residual is not None and (residual.ndim != 3 or residual.shape[1:] != x.shape):
        raise ValueError(f"norm_x: residual {residual.shape} is not [splits, {B}, {cols}]")
    span = min(cols, 32 * _tile(cfg)[0])   # the values of 32-wide groups the int8 prep's programs take
    n_res = 0 if residual is None else residual.shape[0]
    chunk, row = pl.BlockSpec((None, span), lambda b, c: (b, c)), pl.BlockSpec((None, cols), lambda b, c: (b, 0))
    operands = [x, weight, x]
    in_specs = [chunk, pl.BlockSpec((span,), lambda b, c: (c,)), row]
    if n_res:
        operands += [residual, residual]
        in_specs += [pl.BlockSpec((n_res, None, cols), lambda b, c: (0, b, 0)),
                     pl.BlockSpec((n_res, None, span), lambda b, c: (0, b, c))]
    n_out = 2 if n_res else 1
    outs = pl.pallas_call(
        functools.partial(_norm_x_kernel, n_res=n_res, eps=float(eps), cols=cols, dtype=x.dtype),
        grid=(B, cols // span),
        in_specs=in_specs,
        out_specs=[chunk] * n_out,
        out_shape=[jax.ShapeDtypeStruct((B, cols), x.dtype)] * n_out,
        compiler_params=plgpu.CompilerParams(num_warps=_tile(cfg)[1], num_stages=1),
        interpret=cfg.interpret,
        name="norm_x" + ("_residual" if n_res else ""),
    )(*operands)
    return outs[0], (outs[1] if n_res else x)


def _merge_kernel(o_ref, m_ref, l_ref, words_ref, scales_ref, *, chunk, group, head_dim, heads_per_kv,
                  dtype, interpret):
    """Merge the attention's split-K partials (kernels/attention.py) for this program's share of the
    row, round to the model's dtype as the XLA merge does, then quantize like _kernel."""
    f32 = jnp.float32
    c = pl.program_id(1)
    splits, wpg = o_ref.shape[0], group // 4
    s = jnp.arange(splits, dtype=jnp.int32)[:, None, None]
    base = (c * chunk * group + jnp.arange(chunk, dtype=jnp.int32)[None, :, None] * group
            + jnp.arange(wpg, dtype=jnp.int32)[None, None, :] * 4)
    ys = []
    for k in range(4):
        j = base + k                                     # [1, chunk, wpg] positions in the row
        h, d = j // head_dim, j % head_dim
        kv, g = h // heads_per_kv, h % heads_per_kv
        m = m_ref[s, kv, g]                              # [splits, chunk, wpg]
        w = jnp.exp(m - jnp.max(m, axis=0)[None])
        num = jnp.sum(o_ref[s, kv, g, d] * w, axis=0)
        den = jnp.sum(l_ref[s, kv, g] * w, axis=0)
        ys.append((num / den).astype(dtype).astype(f32))
    _store_int8(ys, words_ref, scales_ref, interpret)


# (groups per program, warps) of the merge prep, tile key "XMERGE": many small programs, since few
# programs wait on their splits' loads one after another (BENCHMARKS.md, run 10).
MERGE_TILE = (1, 2)


@functools.partial(jax.jit, static_argnames=("group", "heads_per_kv", "dtype", "cfg"))
def merge_quantize_x(o, m, l, group: int, *, heads_per_kv: int, dtype, cfg: KernelConfig):
    """The decode attention's split partials -> quantize_x's (words, scales) of the merged output.

    o [B, splits, Hkv, gp, D], m/l [B, splits, Hkv, gp] float32, of which the first heads_per_kv (G)
    rows of each kv head are real (kernels/attention.py). The merged row is attention's output
    [B, Hkv * G * D] in `dtype`, exactly as attention._merge rounds it, up to float32 summation order.
    One launch where XLA takes three (max, exp, weighted sums) plus the quantization's.
    """
    B, splits, hkv, gp, D = o.shape
    cols = hkv * heads_per_kv * D
    if m.shape != (B, splits, hkv, gp) or l.shape != m.shape or heads_per_kv > gp:
        raise ValueError(f"merge_quantize_x: partials o {o.shape}, m {m.shape}, l {l.shape} with "
                         f"G={heads_per_kv} do not match")
    if cols % group or group % 4:
        raise ValueError(f"merge_quantize_x: {cols} values do not split into groups of {group}")
    groups, wpg = cols // group, group // 4
    most, warps = cfg.tile("XMERGE", MERGE_TILE)
    interpret = cfg.interpret
    chunk = 1 << (most.bit_length() - 1)
    while groups % chunk:
        chunk //= 2
    part = lambda *blk: pl.BlockSpec((None,) + blk, lambda b, c: (b,) + (0,) * len(blk))
    return pl.pallas_call(
        functools.partial(_merge_kernel, chunk=chunk, group=group, head_dim=D, heads_per_kv=heads_per_kv,
                          dtype=jnp.dtype(dtype), interpret=interpret),
        grid=(B, groups // chunk),
        in_specs=[part(splits, hkv, gp, D), part(splits, hkv, gp), part(splits, hkv, gp)],
        out_specs=[pl.BlockSpec((None, chunk, wpg), lambda b, c: (b, c, 0)),
                   pl.BlockSpec((None, chunk), lambda b, c: (b, c))],
        out_shape=[jax.ShapeDtypeStruct((B, groups, wpg), jnp.int32),
                   jax.ShapeDtypeStruct((B, groups), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name="quantize_x_merge",
    )(o, m, l)
