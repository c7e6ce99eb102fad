"""Decode GEMV (1..8 activation rows) over packed weights, dequantizing in registers (Pallas/Triton).

Grid (row tiles, K splits). A program owns BN output rows and one K split and walks that split in
tiles of BS superblocks (256 values each), loading the packed tile of every layout array.
- Q4_K, Q8_0, Q6_K and dense weights take the factored kernel (qdot.py): quants are bit-selected in
  place and multiplied by pre-scaled activations, with block scales applied once per group; with
  int8 activations the products are dp4a integer dot products instead.
- Other types (Q4_0, Q5_K), and 5..8 bf16 rows on the tensor cores, take the older kernel: it
  dequantizes each tile with layout.dequant_parts (shared with the jnp path) and multiplies by x
  split with layout.split_x.
Partial sums of each split land in out[split, b, rows]; one small XLA reduce adds them, or the
consumer does (summed=False: the next RMSNorm's prep adds them to the residual stream). Decode is
bandwidth-bound: the split count is chosen so that enough programs are in flight to cover all SMs
even for narrow matrices (K/V projections have 512..1024 rows). gemv_multi runs several matrices
that share x (Q/K/V, gate/up; all packed or all dense) as one launch. int8 activations come from
one xquant launch, which also runs the RMSNorm in front of the matmul when the caller passes it
(`pre="norm"`). Every entry takes the KernelConfig (`cfg`) as a static argument: tiles, interpret
mode and the activation rounding come from it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ..layers import rms_norm
from .layout import GPU_LAYOUTS, SB, GpuQTensor, dequant_parts, split_x
from .qdot import (FACTORED_QTYPES, Q8_ACT_QTYPES, init_accumulators, init_accumulators_q8,
                   prepare_x, prepare_x_q8, tile_dot, tile_dot_q8, x_q8_group, x_q8_natural, x_q8_tiles)
from .tuning import KernelConfig
from .xquant import fusable_prep, norm_fusable, norm_quantize_x, quantize_x, rne_int, round_to, swiglu_rounded

N_SM = 132  # H100/H200 SXM; only used to size the grid
# (rows per program, superblocks per K step, warps, pipeline stages) of the factored kernels, per
# weight type (BENCHMARKS.md: the H100 sweeps and the whole-model benches that chose them).
TILES = {"Q4_K": (16, 4, 4, 3), "Q8_0": (8, 2, 2, 4), "Q6_K": (16, 4, 4, 2), "DENSE": (4, 8, 4, 2)}
OTHER_TILE = (16, 2, 4, 3)


def tiles_for(cfg: KernelConfig, qtype: str) -> tuple:
    """(rows, superblocks, warps, stages) of the GEMV on `qtype` weights under cfg's overrides."""
    return cfg.tile(qtype, TILES.get(qtype, OTHER_TILE))


def _pow2_divisor(n: int, most: int) -> int:
    """The largest power of two <= most that divides n (Triton's blocks are powers of two)."""
    d = 1 << (max(1, min(most, n)).bit_length() - 1)
    while n % d:
        d //= 2
    return d


def _pick(nsb: int, rows: int, bn: int, bs: int, target_programs: int):
    bs, bn = _pow2_divisor(nsb, bs), _pow2_divisor(rows, bn)
    tiles = nsb // bs
    splits = 1
    for s in range(1, tiles + 1):
        if tiles % s == 0:
            splits = s
            if (rows // bn) * s >= target_programs:
                break
    return bn, bs, splits


def _dot_t(a, b):
    """a [m, k] @ b[n, k].T -> [m, n] float32 (tensor cores for bf16 inputs)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _tile(ref, lead: tuple):
    """ref[lead..., :, ...]: the block at the leading indices, all of the trailing axes."""
    return ref[lead + (slice(None),) * (len(ref.shape) - len(lead))]


def _kernel(*refs, qtype, n_w, n_x, bn, bs, tiles, nb, use_dot):
    w_refs, x_refs, o_ref = refs[:n_w], refs[n_w:n_w + n_x], refs[-1]
    i, s = pl.program_id(0), pl.program_id(1)
    rows = pl.ds(i * bn, bn)

    def body(t, accs):
        ks = pl.ds((s * tiles + t) * bs, bs)
        ws = dequant_parts(qtype, [_tile(r, (rows, ks)) for r in w_refs])   # [bn, bs, P] float32 each
        if use_dot:
            acc = accs
            for w, xr in zip(ws, x_refs):
                P = w.shape[-1]
                xt = xr[:, ks, :].reshape(nb, bs * P)            # [nb(>=16), bs*P]
                acc = acc + _dot_t(w.reshape(bn, bs * P).astype(jnp.bfloat16), xt.astype(jnp.bfloat16))
            return acc
        # elementwise accumulate [bn, bs*P] per row of x; the cross-thread reduction happens
        # once after the loop, not once per tile
        new = []
        for b in range(nb):
            a = accs[b]
            for w, xr in zip(ws, x_refs):
                P = w.shape[-1]
                xb = xr[b, ks, :].astype(jnp.float32).reshape(1, bs * P)
                a = a + w.reshape(bn, bs * P) * xb
            new.append(a)
        return tuple(new)

    if use_dot:
        init = jnp.zeros((bn, nb), jnp.float32)
        acc = jax.lax.fori_loop(0, tiles, body, init)
        o_ref[...] = acc.T
    else:
        width = bs * SB // len(GPU_LAYOUTS[qtype].x_parts)   # values of one part in a tile
        init = tuple(jnp.zeros((bn, width), jnp.float32) for _ in range(nb))
        accs = jax.lax.fori_loop(0, tiles, body, init)
        for b in range(nb):
            o_ref[b, :] = jnp.sum(accs[b], axis=1)


def _factored_rows(mats, i, s, *, bn, tiles, nb, q8, interpret):
    """qdot.tile_dot (or tile_dot_q8) over K tiles `s * tiles ...` of row block i of each matrix in
    mats ((qtype, w refs, x refs, bs) each; all walked in one loop, so their loads overlap) -> per
    matrix, [bn] per batch row; accumulators stay elementwise until the end."""
    rows = pl.ds(i * bn, bn)

    def body(t, accs):
        new = []
        for (qtype, w_refs, x_refs, bs), acc in zip(mats, accs):
            ks = pl.ds((s * tiles + t) * bs, bs)
            loaded = [_tile(r, (rows, ks)) for r in w_refs]
            if q8:
                xs = [x_q8_tiles(x_refs, qtype, lambda r, idx, b=b: _tile(r, (b, ks) + idx))
                      for b in range(nb)]
                new.append(tuple(tile_dot_q8(qtype, loaded, xs, list(acc), interpret=interpret)))
            else:
                xs = [[_tile(r, (b, ks)) for r in x_refs] for b in range(nb)]
                new.append(tuple(tile_dot(qtype, loaded, xs, list(acc))))
        return tuple(new)

    init = tuple(tuple((init_accumulators_q8 if q8 else init_accumulators)(qtype, bn, bs) for _ in range(nb))
                 for qtype, _, _, bs in mats)
    accs = jax.lax.fori_loop(0, tiles, body, init)
    out = []
    for acc in accs:
        totals = []
        for b in range(nb):
            total = None
            for a in acc[b]:
                r = jnp.sum(a, axis=tuple(range(1, a.ndim)))
                total = r if total is None else total + r
            totals.append(total)
        out.append(totals)
    return out


def _kernel_factored(*refs, qtype, n_w, n_x, bn, bs, tiles, nb, q8, interpret):
    w_refs, x_refs, o_ref = refs[:n_w], refs[n_w:n_w + n_x], refs[-1]
    [totals] = _factored_rows([(qtype, w_refs, x_refs, bs)], pl.program_id(0), pl.program_id(1), bn=bn,
                              tiles=tiles, nb=nb, q8=q8, interpret=interpret)
    for b in range(nb):
        o_ref[b, :] = totals[b]


def _kernel_multi(*refs, mats, bn, nb, q8, interpret):
    """Several matrices in one launch: program p serves the matrix whose block range holds p and
    writes that matrix's output (one output per matrix, already in its dtype: no slicing after).
    mats: per matrix (qtype, w ref range, x ref range, first program, programs, bs, tiles)."""
    o_refs = refs[len(refs) - len(mats):]
    p = pl.program_id(0)
    for (qtype, (w0, w1), (x0, x1), first, count, bs, tiles), o_ref in zip(mats, o_refs):
        @pl.when((p >= first) & (p < first + count))
        def _(qtype=qtype, w0=w0, w1=w1, x0=x0, x1=x1, first=first, bs=bs, tiles=tiles, o_ref=o_ref):
            [totals] = _factored_rows([(qtype, refs[w0:w1], refs[x0:x1], bs)], p - first, 0, bn=bn, tiles=tiles,
                                      nb=nb, q8=q8, interpret=interpret)
            for b in range(nb):
                o_ref[b, :] = totals[b].astype(o_ref.dtype)


def _quantize_rows(y, group: int, interpret: bool):
    """float32 [n] -> (int32 words [n/4] of the int8s, little-endian; scales [n/group]), rounding as
    xquant.quantize_x does. Group membership is a broadcast mask over the row (a reshape would cost a
    trip through shared memory); these rows hold 16 or 32 values."""
    n = y.shape[0]
    r = jnp.arange(n, dtype=jnp.int32)
    member = (r[None, :] // group) == jnp.arange(n // group, dtype=jnp.int32)[:, None]      # [G, n]
    amax = jnp.max(jnp.where(member, jnp.abs(y)[None, :], 0.0), axis=1)
    inv = jnp.where(amax > 0, 127.0 / jnp.where(amax > 0, amax, 1.0), 0.0)
    inv_rows = jnp.sum(jnp.where(member, inv[:, None], 0.0), axis=0)                          # exact
    q = jnp.clip(rne_int(y * inv_rows, interpret=interpret), -127, 127)
    lanes = (q & 255) << ((r % 4) * 8)
    word_of = (r[None, :] // 4) == jnp.arange(n // 4, dtype=jnp.int32)[:, None]               # [n/4, n]
    words = jnp.sum(jnp.where(word_of, lanes[None, :], 0), axis=1)   # disjoint bytes: the sum is an OR
    return words, amax / 127.0


def _kernel_swiglu(*refs, gate, up, bn, nb, q8, interpret, dtype, group):
    """Program p: row block p of both gate and up, then the SwiGLU gate on them and, with a group
    size, the int8 quantization the down projection's GEMV reads (outputs: words, scales); without
    one, the activation in the model's dtype."""
    outs = refs[-2:] if group else refs[-1:]
    p = pl.program_id(0)
    mat = lambda m: (m[0], refs[m[1][0]:m[1][1]], refs[m[2][0]:m[2][1]], m[3])
    kw = dict(bn=bn, nb=nb, q8=q8, interpret=interpret)
    # one loop over both matrices' tiles, so their loads overlap; dense tiles are too wide for two
    # matrices' accumulators at once (BENCHMARKS.md, run 31)
    if gate[4] == up[4] and gate[0] != "DENSE":
        g_tot, u_tot = _factored_rows([mat(gate), mat(up)], p, 0, tiles=gate[4], **kw)
    else:
        [g_tot] = _factored_rows([mat(gate)], p, 0, tiles=gate[4], **kw)
        [u_tot] = _factored_rows([mat(up)], p, 0, tiles=up[4], **kw)
    for b in range(nb):
        # gate and up rounded to the model's dtype first, as the GEMV's outputs in that dtype are
        y = swiglu_rounded(round_to(g_tot[b], dtype), round_to(u_tot[b], dtype), dtype)
        if group:
            words, scales = _quantize_rows(y, group, interpret)
            outs[0][b, :] = words
            outs[1][b, :] = scales
        else:
            outs[0][b, :] = y.astype(outs[0].dtype)


def _int8(cfg: KernelConfig, qtype_ok: bool, dtype) -> bool:
    """Whether the int8-activation path runs: asked for, a type with the int8 kernel, bf16/f16 x."""
    return cfg.int8_activations and qtype_ok and dtype in (jnp.bfloat16, jnp.float16)


def apply_pre(x, pre: str | None, other, eps):
    """The op in front of the matmul, in XLA: x itself or rms_norm(x, other, eps)."""
    if pre == "norm":
        return rms_norm(x, other, eps)
    if pre is not None:
        raise ValueError(f"pre must be None or 'norm', got {pre!r}")
    return x


def _pad_rows(a, nb: int, axis: int = 0):
    if a is None or a.shape[axis] == nb:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, nb - a.shape[axis])
    return jnp.pad(a, pad)


def add_residual(x, residual):
    """x + the matmul result whose K-split partial sums are residual [S, B, cols], rounded as
    `x + matmul(...)` rounds (the float32 sum in x's dtype, then the add)."""
    return x + residual.sum(axis=0).astype(x.dtype)


def _check_residual(residual, x):
    if residual is not None and (residual.ndim != 3 or residual.shape[1:] != x.shape):
        raise ValueError(f"residual partials {residual.shape} do not match x {x.shape} ([splits, B, cols])")


def _x_q8(xp, qtype: str, pre, other, eps, cfg: KernelConfig) -> list:
    """The int8 activations for one weight type: one xquant.quantize_x launch where it tiles the
    row, else XLA rounds (natural layout; the GEMV sums each group itself)."""
    group = x_q8_group(qtype)
    if fusable_prep(xp.shape[1], group, pre, cfg):
        words, scales = quantize_x(xp, group, pre=pre, other=other, eps=eps, cfg=cfg)
        return x_q8_natural(words, scales, qtype)
    return prepare_x_q8(apply_pre(xp, pre, other, eps), qtype)


def _x_q8_all(xp, qtypes, pre, other, eps, cfg: KernelConfig, residual=None):
    """({qtype: int8 activations} for these weight types, x after the residual add).

    A fused RMSNorm makes the int8s of every group size the types need in one norm_quantize_x
    launch, which also adds the residual partials; otherwise XLA adds them, then _x_q8 per type."""
    groups = tuple(dict.fromkeys(x_q8_group(q) for q in qtypes))
    if pre == "norm" and norm_fusable(xp.shape[1], groups, cfg):
        preps, xp = norm_quantize_x(xp, groups, other, eps, residual=residual, cfg=cfg)
        by_group = dict(zip(groups, preps))
        return {q: x_q8_natural(*by_group[x_q8_group(q)], q) for q in qtypes}, xp
    if residual is not None:
        xp = add_residual(xp, residual)
    return {q: _x_q8(xp, q, pre, other, eps, cfg) for q in qtypes}, xp


def weight_parts(w) -> tuple:
    """(qtype, layout arrays, (rows, cols)) of a GpuQTensor, or of a dense [rows, cols] matrix viewed
    as the "DENSE" layout [rows, cols // 256, 256]."""
    if isinstance(w, GpuQTensor):
        return w.qtype, w.parts, w.shape
    rows, cols = w.shape
    return "DENSE", (w.reshape(rows, cols // SB, SB),), (rows, cols)


def _is_dense(w) -> bool:
    return not isinstance(w, GpuQTensor) and getattr(w, "ndim", 0) == 2 and w.shape[1] % SB == 0


def fusable(ws, rows_in_x: int, cfg: KernelConfig) -> bool:
    """Whether gemv_multi can take these weights: all packed types of the factored kernel, or all
    dense matrices; one input width, row counts divisible by the shared row tile, at most 4
    activation rows."""
    if not 0 < rows_in_x <= 4 or not ws:
        return False
    if not (all(isinstance(w, GpuQTensor) and w.qtype in FACTORED_QTYPES for w in ws)
            or all(_is_dense(w) for w in ws)):
        return False
    bn = tiles_for(cfg, weight_parts(ws[0])[0])[0]
    return all(w.shape[1] == ws[0].shape[1] and w.shape[0] % bn == 0 for w in ws)


@functools.partial(jax.jit, static_argnames=("cfg", "pre", "eps", "out_dtype"))
def gemv_multi(x: jax.Array, ws: tuple, *, cfg: KernelConfig, pre: str | None = None, other=None,
               eps: float | None = None, out_dtype=jnp.float32, residual=None):
    """pre(x) [B <= 4, in] times several packed (or several dense) matrices, e.g. Q, K and V, in one
    launch -> [B, out_i] each, in out_dtype (rounded from the float32 sums in the kernel, as an XLA
    cast after it would).

    One launch instead of one per matrix, and no K-split partial sums: the programs of all matrices
    together fill the GPU. Each matrix uses its type's tile depth; row tile, warps and stages are the
    first matrix's. Needs fusable(ws, B, cfg). pre/other/eps: the RMSNorm in front (apply_pre), fused
    into the activations' quantization where that applies.
    residual [S, B, in] (float32 K-split partials of another matmul): x is first replaced by
    add_residual(x, residual), inside the RMSNorm prep where that is fused; the call then returns
    (outputs, that new x).
    """
    B = x.shape[0]
    if not fusable(ws, B, cfg):
        raise ValueError("gemv_multi: " + ", ".join(f"{w!r}" for w in ws) + f" with {B} rows is not fusable")
    mats_in = [weight_parts(w) for w in ws]   # (qtype, parts, shape) each
    bn, _, num_warps, num_stages = tiles_for(cfg, mats_in[0][0])
    inputs, mats, nb, q8, x_new = _plan_multi(x, mats_in, bn, pre, other, eps, residual, cfg)
    first = sum(m[4] for m in mats)
    # matrix i's output block for program p: its own while p is in its range, clamped (and not
    # written) otherwise
    out_specs = [pl.BlockSpec((nb, bn), lambda p, f=m[3], c=m[4]: (0, jnp.clip(p - f, 0, c - 1))) for m in mats]
    outs = pl.pallas_call(
        functools.partial(_kernel_multi, mats=tuple(mats), bn=bn, nb=nb, q8=q8, interpret=cfg.interpret,
                          ),
        grid=(first,),
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct((nb, w.shape[0]), out_dtype) for w in ws],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=cfg.interpret,
        name="gemv_multi_" + "_".join(q.lower() for q, _, _ in mats_in),
    )(*inputs)
    outs = [o[:B] for o in outs]
    return (outs, x_new) if residual is not None else outs


def _plan_multi(x, mats_in, bn, pre, other, eps, residual, cfg: KernelConfig, bs=None):
    """The operands of a launch over several matrices sharing x: (inputs (every matrix's layout
    arrays, then x prepared once per distinct type), mats (per matrix: qtype, w input range, x input
    range, first program, programs, bs, K tiles), nb, q8, x after the residual add).
    bs: superblocks per K step of every matrix (default: each type's tile's)."""
    B, cols = x.shape
    _check_residual(residual, x)
    nb = max(1, 1 << (B - 1).bit_length())
    nsb = cols // SB
    q8 = _int8(cfg, all(q in Q8_ACT_QTYPES for q, _, _ in mats_in), x.dtype)
    x_new = x
    if not q8:
        if residual is not None:
            x = x_new = add_residual(x, residual)
        x, pre, residual = apply_pre(x, pre, other, eps), None, None
    xp = _pad_rows(x, nb)
    qtypes = tuple(dict.fromkeys(q for q, _, _ in mats_in))
    if q8:   # one prepared x per distinct type, shared by the matrices of that type
        prepared, xq = _x_q8_all(xp, qtypes, pre, other, eps, cfg, _pad_rows(residual, nb, 1))
        if residual is not None:
            x_new = xq[:B]
    else:
        prepared = {q: prepare_x(xp, q) for q in qtypes}
    inputs, x_ranges, mats, first = [], {}, [], 0
    for _, parts, _ in mats_in:
        inputs.extend(parts)
    for q in qtypes:
        x_ranges[q] = (len(inputs), len(inputs) + len(prepared[q]))
        inputs.extend(prepared[q])
    w_at = 0
    for qtype, parts, (rows, _) in mats_in:
        _, depth, _ = _pick(nsb, rows, bn, bs or tiles_for(cfg, qtype)[1], 1)   # K not split
        count = rows // bn
        mats.append((qtype, (w_at, w_at + len(parts)), x_ranges[qtype], first, count, depth, nsb // depth))
        w_at += len(parts)
        first += count
    return inputs, mats, nb, q8, x_new


def swiglu_tile(qtype: str, group: int | None, cfg: KernelConfig) -> tuple:
    """(rows per program, superblocks per K step, warps, stages) of gemv_swiglu on `qtype` weights:
    the type's GEMV tile with at least `group` rows (each program quantizes whole groups), warps
    scaled with the rows; the tile key "SWIGLU_<qtype>" overrides it."""
    bn, bs, warps, stages = tiles_for(cfg, qtype)
    if group and bn < group:
        bn, warps = group, warps * group // bn
    return cfg.tile("SWIGLU_" + qtype, (bn, bs, warps, stages))


def swiglu_fusable(gate, up, rows_in_x: int, group: int | None, cfg: KernelConfig) -> bool:
    """Whether gemv_swiglu can take this gate/up pair (same shape, fusable as a pair, rows a whole
    number of its row tiles, each tile whole groups of `group`)."""
    if gate.shape != up.shape or not fusable((gate, up), rows_in_x, cfg):
        return False
    bn = swiglu_tile(weight_parts(gate)[0], group, cfg)[0]
    return gate.shape[0] % bn == 0 and (not group or (bn % group == 0 and group % 4 == 0))


@functools.partial(jax.jit, static_argnames=("cfg", "pre", "eps", "group"))
def gemv_swiglu(x: jax.Array, gate, up, *, cfg: KernelConfig, pre: str | None = None, other=None,
                eps: float | None = None, residual=None, group: int | None = None):
    """The MLP's gate and up projections of pre(x) [B <= 4, in] and the SwiGLU gate on them, in one
    launch: program p computes row block p of both matrices and applies layers.swiglu to the pair,
    rounded as swiglu(gate_out, up_out) on outputs in x's dtype. The gate's output and its separate
    activation launch are gone.

    group None: -> the activation [B, rows] in x's dtype. group (the down projection's int8 group,
    qdot.x_q8_group): -> (words [B, rows/group, group/4], scales [B, rows/group]) as
    xquant.quantize_x(activation, group) returns them, for gemv_prepared. pre/other/eps/residual as
    gemv_multi's (with a residual the call returns (result, new x)). Needs swiglu_fusable.
    """
    B, cols = x.shape
    if not swiglu_fusable(gate, up, B, group, cfg):
        raise ValueError(f"gemv_swiglu: gate {gate!r} / up {up!r} with {B} rows and group {group} do not fuse")
    mats_in = [weight_parts(w) for w in (gate, up)]
    qtype, rows = mats_in[0][0], gate.shape[0]
    bn, bs, num_warps, num_stages = swiglu_tile(qtype, group, cfg)
    inputs, mats, nb, q8, x_new = _plan_multi(x, mats_in, bn, pre, other, eps, residual, cfg, bs=bs)
    # both matrices walk the same row blocks: (qtype, w range, x range, bs, K tiles) each
    pair = [(m[0], m[1], m[2], m[5], m[6]) for m in mats]
    if group:
        out_specs = [pl.BlockSpec((nb, bn // 4), lambda p: (0, p)), pl.BlockSpec((nb, bn // group), lambda p: (0, p))]
        out_shape = [jax.ShapeDtypeStruct((nb, rows // 4), jnp.int32),
                     jax.ShapeDtypeStruct((nb, rows // group), jnp.float32)]
    else:
        out_specs = [pl.BlockSpec((nb, bn), lambda p: (0, p))]
        out_shape = [jax.ShapeDtypeStruct((nb, rows), x.dtype)]
    outs = pl.pallas_call(
        functools.partial(_kernel_swiglu, gate=pair[0], up=pair[1], bn=bn, nb=nb, q8=q8, interpret=cfg.interpret,
                          dtype=x.dtype, group=group),
        grid=(rows // bn,),
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=cfg.interpret,
        name="gemv_swiglu_" + qtype.lower(),
    )(*inputs)
    if group:
        result = (outs[0][:B].reshape(B, rows // group, group // 4), outs[1][:B])
    else:
        result = outs[0][:B]
    return (result, x_new) if residual is not None else result


@functools.partial(jax.jit, static_argnames=("cfg", "target_programs", "pre", "eps", "summed"))
def gemv(x: jax.Array, w, *, cfg: KernelConfig, target_programs: int = 2 * N_SM, pre: str | None = None,
         other=None, eps: float | None = None, residual=None, summed: bool = True):
    """pre(x) [B <= 8, in] times w.T -> [B, out] float32.

    w: GpuQTensor, or a dense [out, in] array (bf16/f16/f32) read as is. Tiles: tiles_for(cfg, type);
    target_programs: how many programs the K splits aim for (tests lower it to split small matrices).
    With cfg.int8_activations, bf16/f16 x meets Q4_K/Q8_0/Q6_K weights as int8s in dp4a dot products
    (qdot.tile_dot_q8); float32 x always stays float. 5..8 bf16 rows take the tensor-core kernel.
    pre/other/eps: the RMSNorm in front of the product; on the int8 route it runs inside the kernel
    that quantizes x. residual: as gemv_multi's (the call returns (y, new x)). summed=False: y is the
    K splits' partial sums [S, B, out], left for the consumer to add (splitsum.SplitSum).
    """
    _check_residual(residual, x)
    keep_x = residual is not None
    qtype, parts, (rows, cols) = weight_parts(w)
    bn, bs, num_warps, num_stages = tiles_for(cfg, qtype)
    B = x.shape[0]
    nsb = cols // SB
    use_dot = B > 4 and x.dtype != jnp.float32   # bf16 tensor-core dot for 5..8 rows; float32 stays exact
    if use_dot:
        bn = max(bn, 16)   # tensor-core tiles are at least 16 x 16
    nb = 16 if use_dot else max(1, 1 << (B - 1).bit_length())
    factored = qtype in FACTORED_QTYPES and not use_dot   # scales factored out of the inner product
    q8 = _int8(cfg, factored and qtype in Q8_ACT_QTYPES, x.dtype)
    x_new = x
    if not q8:
        if residual is not None:
            x = x_new = add_residual(x, residual)
        x, pre, residual = apply_pre(x, pre, other, eps), None, None
    xp = _pad_rows(x, nb)
    bn, bs, splits = _pick(nsb, rows, bn, bs, target_programs)
    if factored:
        if q8:
            prepared, xq = _x_q8_all(xp, (qtype,), pre, other, eps, cfg, _pad_rows(residual, nb, 1))
            xs = prepared[qtype]
            if residual is not None:
                x_new = xq[:B]
        else:
            xs = prepare_x(xp, qtype)
        y = _factored_call(parts, xs, qtype, rows, nsb, nb, bn, bs, splits, num_warps, num_stages, q8,
                           cfg.interpret, summed)
    else:
        tiles = nsb // bs // splits   # K tiles per split
        xs = split_x(xp, qtype)
        kq = "DENSE_ID" if qtype == "DENSE" else qtype
        kernel = functools.partial(_kernel, qtype=kq, n_w=len(parts), n_x=len(xs), bn=bn, bs=bs,
                                   tiles=tiles, nb=nb, use_dot=use_dot)
        y = _launch(kernel, parts, xs, qtype, rows, nb, bn, splits, num_warps, num_stages, cfg.interpret, summed)
    y = y[:B] if summed else y[:, :B]
    return (y, x_new) if keep_x else y


def _launch(kernel, parts, xs, qtype, rows, nb, bn, splits, num_warps, num_stages, interpret, summed=True):
    """The GEMV's launch: grid (row tiles, K splits); the splits' partial sums [S, nb, rows], added by
    XLA unless summed=False (into whatever consumes the result, e.g. the residual add)."""
    out = pl.pallas_call(
        kernel,
        grid=(rows // bn, splits),
        out_specs=pl.BlockSpec((None, nb, bn), lambda i, s: (s, 0, i)),
        out_shape=jax.ShapeDtypeStruct((splits, nb, rows), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"gemv_{qtype.lower()}",
    )(*parts, *xs)
    return out.sum(axis=0) if summed else out


def _factored_call(parts, xs, qtype, rows, nsb, nb, bn, bs, splits, num_warps, num_stages, q8, interpret,
                   summed=True):
    kernel = functools.partial(_kernel_factored, qtype=qtype, n_w=len(parts), n_x=len(xs), bn=bn, bs=bs,
                               tiles=nsb // bs // splits, nb=nb, q8=q8, interpret=interpret)
    return _launch(kernel, parts, xs, qtype, rows, nb, bn, splits, num_warps, num_stages, interpret, summed)


def takes_prepared(w, rows: int, dtype, cfg: KernelConfig) -> bool:
    """Whether w's GEMV can read int8 activations another kernel wrote (gemv_prepared): a packed type
    with the int8 kernel, 1..4 rows of bf16/f16 activations, int8 activations asked for."""
    return (isinstance(w, GpuQTensor) and w.qtype in Q8_ACT_QTYPES and w.qtype in FACTORED_QTYPES
            and 0 < rows <= 4 and _int8(cfg, True, dtype))


@functools.partial(jax.jit, static_argnames=("cfg", "summed"))
def gemv_prepared(words: jax.Array, scales: jax.Array, w: GpuQTensor, *, cfg: KernelConfig,
                  summed: bool = True) -> jax.Array:
    """The int8 GEMV on activations another kernel already quantized (xquant.quantize_x's layout:
    words [B, groups, group/4], scales [B, groups], group = qdot.x_q8_group(w.qtype)); used where the
    op producing x is fused into its quantization (the SwiGLU gate, the attention merge). -> [B, out]
    float32 (summed=False: the K splits' partial sums [S, B, out])."""
    qtype, (rows, cols) = w.qtype, w.shape
    B = words.shape[0]
    if qtype not in Q8_ACT_QTYPES or qtype not in FACTORED_QTYPES:
        raise ValueError(f"gemv_prepared: {w!r} has no int8-activation kernel")
    if not 0 < B <= 4:
        raise ValueError(f"gemv_prepared: the int8 GEMV takes 1 to 4 activation rows, got {B}")
    if words.shape != (B, cols // x_q8_group(qtype), x_q8_group(qtype) // 4) or scales.shape != words.shape[:2]:
        raise ValueError(f"gemv_prepared: words {words.shape} / scales {scales.shape} do not fit {w!r}")
    bn, bs, num_warps, num_stages = tiles_for(cfg, qtype)
    nb = max(1, 1 << (B - 1).bit_length())
    xs = [_pad_rows(a, nb) for a in x_q8_natural(words, scales, qtype)]
    nsb = cols // SB
    bn, bs, splits = _pick(nsb, rows, bn, bs, 2 * N_SM)
    y = _factored_call(w.parts, xs, qtype, rows, nsb, nb, bn, bs, splits, num_warps, num_stages, True,
                       cfg.interpret, summed)
    return y[:B] if summed else y[:, :B]
