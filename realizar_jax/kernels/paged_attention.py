"""Decode attention through block tables: one query token per sequence, GQA, ragged lengths, the KV
cache in pages (cache.PagedKVCache: pools [L, P, Hkv, page_size, D], a block table per sequence).

The same flash-decoding shape as kernels/attention.py: grid (batch, kv head, split), a split being a
run of `pages per split` entries of the row's block table. A program gathers the G query heads of
its kv head into gp >= 16 rows (tensor cores), then walks its pages in blocks of `ppb` pages: it
loads the block's page ids from the table, gathers those pages' rows (pages need not be adjacent in
the pool) and keeps an online softmax. Splits past a sequence's length load nothing; the splits'
(o, m, l) partials have the contiguous kernel's layout, so its merges (kernels.attention._merge and
xquant.merge_quantize_x) take them unchanged.

As the contiguous kernel, it takes the new token's q, k, v before RoPE, rotates them in registers
(a head's rotated row is x * cos + sign * x[partner] * sin, partner the other half's column, so no
halves are split or joined), and the program whose split holds the new position writes k and v into
that position's page (the pools are aliased in and out: in place). The host allocator guarantees
that page is the row's own (shared pages are copied before a write), so no program reads what
another writes. Entry points return None where the kernel does not apply; ops/attention.py then runs
the jnp reference.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .attention import NEG, _merge, check_step_operands, decode_tile
from .tuning import KernelConfig


def _kernel(pos_ref, table_ref, q_ref, k_ref, v_ref, cos_ref, sin_ref, knew_ref, vnew_ref, o_ref, m_ref, l_ref,
            kout_ref, vout_ref, *, scale, ps, ppb, pps, group, gp):
    """table_ref: this split's pps page ids; k/v_ref: this layer's and kv head's pool [P, ps, D]. The
    cache holds positions < pos_ref; the new token's unrotated k/v arrive in knew/vnew."""
    s = pl.program_id(2)
    length = pos_ref[()]
    span = pps * ps          # positions per split
    bt = ppb * ps            # positions per block
    start = s * span
    d = k_ref.shape[-1]
    half = d // 2
    col = jnp.arange(d, dtype=jnp.int32)
    partner = (col + half) % d
    sign = jnp.where(col < half, -1.0, 1.0).astype(jnp.float32)
    cos, sin = cos_ref[...], sin_ref[...]
    kdt = k_ref.dtype
    # row r holds query head r mod G: a gather of the G heads, so no padded copy of q exists
    rows = (jnp.arange(gp, dtype=jnp.int32) % group)[:, None]
    qf = q_ref[rows, col[None, :]].astype(jnp.float32)
    qp = q_ref[rows, partner[None, :]].astype(jnp.float32)
    q = (qf * cos[None, :] + sign[None, :] * qp * sin[None, :]).astype(q_ref.dtype).astype(kdt)
    kn = (knew_ref[...].astype(jnp.float32) * cos + sign * knew_ref[partner].astype(jnp.float32) * sin).astype(kdt)
    vn = vnew_ref[...].astype(kdt)
    owner = (length >= start) & (length < start + span)

    @pl.when(owner)
    def _write():
        page = table_ref[(length - start) // ps]
        kout_ref[page, length % ps, :] = kn
        vout_ref[page, length % ps, :] = vn
    n = jnp.clip((length - start + bt - 1) // bt, 0, pps // ppb)

    def body(t, carry):
        o, m, l = carry
        pages = table_ref[pl.ds(t * ppb, ppb)]
        kb = k_ref[pages].reshape(bt, d)
        vb = v_ref[pages].reshape(bt, d)
        qk = jax.lax.dot_general(q, kb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        pos = start + t * bt + jnp.arange(bt)
        qk = jnp.where((pos < length)[None, :], qk, NEG)
        m_new = jnp.maximum(m, qk.max(axis=1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(qk - m_new[:, None])
        o = o * corr[:, None] + jnp.dot(p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        return o, m_new, l * corr + p.sum(axis=1)

    init = (jnp.zeros((gp, d), jnp.float32), jnp.full((gp,), NEG, jnp.float32), jnp.zeros((gp,), jnp.float32))
    o, m, l = jax.lax.fori_loop(0, n, body, init)
    # the new token, from registers (no other program reads its cache row)
    qk = (q.astype(jnp.float32) * kn.astype(jnp.float32)[None, :]).sum(axis=1) * scale
    m_new = jnp.where(owner, jnp.maximum(m, qk), m)
    corr = jnp.exp(m - m_new)
    p = jnp.where(owner, jnp.exp(qk - m_new), 0.0)
    o = o * corr[:, None] + p[:, None] * vn.astype(jnp.float32)[None, :]
    m, l = m_new, l * corr + p
    real = jnp.arange(gp) < group   # store the G real rows only (the merges read no others)
    plgpu.store(o_ref, o, mask=real[:, None])
    plgpu.store(m_ref, m, mask=real)
    plgpu.store(l_ref, l, mask=real)


def _plan(q_shape, pool_shape, tables_shape, block: int, splits: int | None):
    """(G, gp, ppb, splits, pps), or None where the kernel does not apply. block: positions per block
    (at least one page); splits None: enough for ~2 programs per SM (132 on the H100)."""
    B, Hq, D = q_shape
    Hkv, ps = pool_shape[2], pool_shape[3]
    max_pages = tables_shape[1]
    if D % 32 or D & (D - 1) or ps < 1 or ps & (ps - 1):
        return None
    ppb = max(1, block // ps)
    if ppb * ps < 16 or max_pages % ppb:
        return None
    if splits is None:
        splits = 1
        while B * Hkv * splits < 2 * 132 and max_pages % (splits * 2 * ppb) == 0:
            splits *= 2
    if max_pages % (splits * ppb):
        return None
    G = Hq // Hkv
    return G, max(16, 1 << (G - 1).bit_length()), ppb, splits, max_pages // splits


def _call(operands, plan, ps, D, layer, num_warps, num_stages, interpret, scale):
    G, gp, ppb, splits, pps = plan
    B, Hkv = operands[2].shape[0], operands[2].shape[1]
    P = operands[3].shape[1]
    pool = pl.BlockSpec((None, P, None, ps, D), lambda b, h, s: (layer, 0, h, 0, 0))
    row = pl.BlockSpec((None, D), lambda b, h, s: (b, 0))
    head = pl.BlockSpec((None, None, D), lambda b, h, s: (b, h, 0))
    in_specs = [pl.BlockSpec((None,), lambda b, h, s: (b,)),
                pl.BlockSpec((None, None, pps), lambda b, h, s: (b, s, 0)),
                pl.BlockSpec((None, None, G, D), lambda b, h, s: (b, h, 0, 0)), pool, pool, row, row, head, head]
    out_specs = [pl.BlockSpec((None, None, None, gp, D), lambda b, h, s: (b, s, h, 0, 0)),
                 pl.BlockSpec((None, None, None, gp), lambda b, h, s: (b, s, h, 0)),
                 pl.BlockSpec((None, None, None, gp), lambda b, h, s: (b, s, h, 0)), pool, pool]
    out_shape = [jax.ShapeDtypeStruct((B, splits, Hkv, gp, D), jnp.float32),
                 jax.ShapeDtypeStruct((B, splits, Hkv, gp), jnp.float32),
                 jax.ShapeDtypeStruct((B, splits, Hkv, gp), jnp.float32),
                 jax.ShapeDtypeStruct(operands[3].shape, operands[3].dtype),
                 jax.ShapeDtypeStruct(operands[4].shape, operands[4].dtype)]
    return pl.pallas_call(
        functools.partial(_kernel, scale=float(scale), ps=ps, ppb=ppb, pps=pps, group=G, gp=gp),
        grid=(B, Hkv, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases={3: 3, 4: 4},   # the pools are updated in place
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_decode_attention_update",
    )(*operands)


def _check(q, k, v, k_pages, v_pages, tables, pos, cos, sin, layer):
    """ValueError naming the operand that does not fit the pools (the kernel writes into them in place)."""
    if k_pages.ndim != 5 or v_pages.shape != k_pages.shape:
        raise ValueError(f"paged_decode_attention_update: pools {k_pages.shape} / {v_pages.shape} must be one "
                         "[L, P, Hkv, page_size, D] stack each")
    L, _, Hkv, _, D = k_pages.shape
    if not 0 <= layer < L:
        raise ValueError(f"paged_decode_attention_update: layer {layer} is not in the pools' {L} layers")
    B = q.shape[0]
    if tables.ndim != 2 or tables.shape[0] != B:
        raise ValueError(f"paged_decode_attention_update: tables has shape {tables.shape}, need [{B}, max_pages]")
    check_step_operands("paged_decode_attention_update", "the pools need", q, k, v, pos, cos, sin, B, Hkv, D)


# (positions per block, splits (0: enough for ~2 programs per SM), warps, stages); the KernelConfig's
# tile key "PAGED_ATTN" overrides it (for sweeps on a new GPU or page size).
PAGED_ATTN_TILE = (64, 0, 4, 2)


def paged_attention_tile(cfg: KernelConfig) -> tuple:
    return decode_tile(cfg, "PAGED_ATTN", PAGED_ATTN_TILE)


@functools.partial(jax.jit, static_argnames=("scale", "layer", "cfg", "merge"))
def paged_decode_attention_update(q, k, v, k_pages, v_pages, tables, pos, cos, sin, scale, layer: int, *,
                                  cfg: KernelConfig, merge: bool = True):
    """One decode step's attention with its cache update through block tables
    (ops.attention.paged_decode_attention_update_ref's contract): q [B, Hq, D], k/v [B, Hkv, D] before
    RoPE; pools [L, P, Hkv, ps, D]; tables [B, max_pages]; pos [B]; cos/sin [B, D] at pos.
    -> (out [B, Hq, D], k_pages, v_pages), or with merge=False the splits' partials (o, m, l) in place
    of out. None where the kernel does not apply."""
    _check(q, k, v, k_pages, v_pages, tables, pos, cos, sin, layer)
    block, splits, num_warps, num_stages = paged_attention_tile(cfg)
    plan = _plan(q.shape, k_pages.shape, tables.shape, block, splits or None)
    if plan is None:
        return None
    B, Hq, D = q.shape
    G, _, _, n_splits, pps = plan
    Hkv, ps = k_pages.shape[2], k_pages.shape[3]
    operands = (pos.astype(jnp.int32), tables.astype(jnp.int32).reshape(B, n_splits, pps), q.reshape(B, Hkv, G, D),
                k_pages, v_pages, cos.astype(jnp.float32), sin.astype(jnp.float32), k, v)
    o, m, l, k_pages, v_pages = _call(operands, plan, ps, D, layer, num_warps, num_stages, cfg.interpret, scale)
    if not merge:
        return (o, m, l), k_pages, v_pages
    return _merge(o, m, l, G, q.dtype), k_pages, v_pages
