"""Decode attention over a KV cache: one query token per sequence, GQA, ragged valid lengths.

Flash-decoding: grid (batch, kv head, split of the sequence axis). A program gathers the G query
heads that share its kv head into 16 rows (repeated, so the two products run on tensor cores),
walks only the valid positions of its split in blocks of BT, and keeps an online softmax (running
max m, running sum l, unnormalised output o). Splits past a sequence's length do no loads at all.
Each split stores its G real rows of (o, m, l). The splits are merged by a few XLA ops (_merge) or,
in the model's decode step, inside the kernel that quantizes the o projection's activations
(decode_attention_output, xquant.merge_quantize_x). (A separate Pallas merge kernel was slower on
the H100: 8B Q4_K_M 292 vs 306 tok/s, BENCHMARKS.md.)

`decode_attention_update` is the same kernel taking the step's new q, k, v before RoPE: it rotates
them in registers, the program whose split holds the new position writes k and v into the cache
(aliased in and out, so in place) and adds the new token to its softmax. That is one launch per
layer where XLA needed ~7 (RoPE's halves and concatenations, the q padding, two scatters).
The layout of q/k is HF's "halves" RoPE convention (layers.apply_rope): the kernel works on the
two halves of the head dimension separately, as two tensor-core products.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ..attention import decode_attention_ref, decode_attention_update_ref  # references and fallbacks

NEG = -1e30  # finite "minus infinity": empty splits must not turn the merge into NaN


def _rotate(a, b, cos, sin, dtype):
    """RoPE on the halves (a, b) of float32 rows, rounded to dtype (as apply_rope) and back."""
    ra = a * cos - b * sin
    rb = b * cos + a * sin
    return ra.astype(dtype).astype(jnp.float32), rb.astype(dtype).astype(jnp.float32)


def _kernel(pos_ref, q_ref, k_ref, v_ref, *refs, scale, bt, ss, group, gp, update, merge=None, layer=0,
            interpret=False):
    """update=False: the cache holds positions < pos_ref (the caller wrote the new token; q rotated).
    update=True: the cache holds positions < pos_ref; the new token's k/v (and q) arrive unrotated
    in knew/vnew, with cos/sin of position pos_ref; the owning split writes them to kout/vout.
    merge (update only): the last split of each kv head to finish merges them all (_merge_last);
    "dtype" writes the merged heads in the model's dtype, an int (a group size) their int8s."""
    if merge is not None:
        # the counters come in and go out aliased: the atomics use the output ref
        cos_ref, sin_ref, knew_ref, vnew_ref, _, o_ref, m_ref, l_ref, kout_ref, vout_ref, sync_ref, *res_refs = refs
    elif update:
        cos_ref, sin_ref, knew_ref, vnew_ref, o_ref, m_ref, l_ref, kout_ref, vout_ref = refs
    else:
        o_ref, m_ref, l_ref = refs
    s = pl.program_id(2)
    length = pos_ref[()]
    start = s * ss
    d = k_ref.shape[-1]
    half = d // 2
    # row r holds query head r mod G: a gather of the G heads, so no padded copy of q exists
    rows = (jnp.arange(gp, dtype=jnp.int32) % group)[:, None]
    cols = jnp.arange(half, dtype=jnp.int32)[None, :]
    qa = q_ref[rows, cols].astype(jnp.float32)
    qb = q_ref[rows, cols + half].astype(jnp.float32)
    kdt = k_ref.dtype
    if update:
        cos, sin = cos_ref[pl.ds(0, half)], sin_ref[pl.ds(0, half)]
        qa, qb = _rotate(qa, qb, cos[None, :], sin[None, :], q_ref.dtype)
        ka, kb = _rotate(knew_ref[pl.ds(0, half)].astype(jnp.float32),
                         knew_ref[pl.ds(half, half)].astype(jnp.float32), cos, sin, kdt)
        vn = vnew_ref[...].astype(vout_ref.dtype)
        owner = (length >= start) & (length < start + ss)

        @pl.when(owner)
        def _write():
            r = length - start
            kout_ref[r, pl.ds(0, half)] = ka.astype(kdt)
            kout_ref[r, pl.ds(half, half)] = kb.astype(kdt)
            vout_ref[r, :] = vn
    qa, qb = qa.astype(kdt), qb.astype(kdt)
    n = jnp.clip((length - start + bt - 1) // bt, 0, ss // bt)

    def body(t, carry):
        o, m, l = carry
        ka_t = k_ref[pl.ds(t * bt, bt), pl.ds(0, half)]
        kb_t = k_ref[pl.ds(t * bt, bt), pl.ds(half, half)]
        dims = (((1,), (1,)), ((), ()))
        qk = (jax.lax.dot_general(qa, ka_t, dims, preferred_element_type=jnp.float32)
              + jax.lax.dot_general(qb, kb_t, dims, preferred_element_type=jnp.float32)) * scale
        pos = start + t * bt + jnp.arange(bt)
        qk = jnp.where((pos < length)[None, :], qk, NEG)
        m_new = jnp.maximum(m, qk.max(axis=1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(qk - m_new[:, None])
        v = v_ref[pl.ds(t * bt, bt), :]
        o = o * corr[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return o, m_new, l * corr + p.sum(axis=1)

    init = (jnp.zeros((gp, d), jnp.float32), jnp.full((gp,), NEG, jnp.float32),
            jnp.zeros((gp,), jnp.float32))
    o, m, l = jax.lax.fori_loop(0, n, body, init)
    if update:   # the new token, from registers (no other program reads its cache row)
        qk = ((qa.astype(jnp.float32) * ka[None, :]).sum(axis=1)
              + (qb.astype(jnp.float32) * kb[None, :]).sum(axis=1)) * scale
        m_new = jnp.where(owner, jnp.maximum(m, qk), m)
        corr = jnp.exp(m - m_new)
        p = jnp.where(owner, jnp.exp(qk - m_new), 0.0)
        o = o * corr[:, None] + p[:, None] * vn.astype(jnp.float32)[None, :]
        m, l = m_new, l * corr + p
    real = jnp.arange(gp) < group   # store the G real rows only (the merge reads no others)
    if merge is None:
        plgpu.store(o_ref, o, mask=real[:, None])
        plgpu.store(m_ref, m, mask=real)
        plgpu.store(l_ref, l, mask=real)
        return
    # every split's partials sit in this kv head's block; each program writes its own row
    plgpu.store(o_ref.at[s], o, mask=real[:, None])
    plgpu.store(m_ref.at[s], m, mask=real)
    plgpu.store(l_ref.at[s], l, mask=real)
    _merge_last(o_ref, m_ref, l_ref, sync_ref, res_refs, layer=layer, group=group, dtype=q_ref.dtype,
                merge=merge, interpret=interpret)


def _merge_last(o_ref, m_ref, l_ref, sync_ref, res_refs, *, layer, group, dtype, merge, interpret):
    """The split that checks in last for its (batch row, kv head) merges the splits' partials, as
    _merge does, and writes the result. Check-in: a CTA barrier (this program's partials are all
    stored), then an acquire-release atomic add on the step's counter for (layer, b, h): the last
    one sees every other split's stores (read with volatile loads, past the SM's L1). Splits past
    the sequence's length check in too."""
    b, h = pl.program_id(0), pl.program_id(1)
    splits = pl.num_programs(2)
    if not interpret:   # (interpret mode runs programs one at a time and has no barrier)
        plgpu.debug_barrier()
    ticket = plgpu.atomic_add(sync_ref, (jnp.int32(layer), b, h), jnp.int32(1))

    @pl.when(ticket == splits - 1)
    def _():
        if not interpret:
            plgpu.debug_barrier()
        # all splits' rows at once: one round of loads (a loop over the splits waited on each in
        # turn: 9.9 us per launch against 4.4 without the merge, H200 run 31)
        rows = pl.ds(0, group)
        m_all = plgpu.load(m_ref.at[:, rows], volatile=True)      # [splits, G]
        l_all = plgpu.load(l_ref.at[:, rows], volatile=True)
        o_all = plgpu.load(o_ref.at[:, rows, :], volatile=True)   # [splits, G, D]
        mx = jnp.max(m_all, axis=0)
        w = jnp.exp(m_all - mx[None, :])
        num = jnp.sum(o_all * w[:, :, None], axis=0)
        out = (num / jnp.sum(l_all * w, axis=0)[:, None]).astype(dtype)
        if merge == "dtype":
            res_refs[0][...] = out
        else:
            from .xquant import quantize_flat
            words, scales = quantize_flat(out.astype(jnp.float32).reshape(-1), merge, interpret=interpret)
            res_refs[0][...] = words
            res_refs[1][...] = scales


def _splits(B, Hkv, S, bt):
    """Enough splits of the sequence for ~2 programs per SM (132 on the H100)."""
    splits = 1
    while B * Hkv * splits < 2 * 132 and S % (splits * 2 * bt) == 0:
        splits *= 2
    return splits


def _plan(q_shape, cache_shape, bt, splits):
    """(G, gp, bt, splits, ss), or None where the kernel does not apply (the jnp fallback runs)."""
    B, Hq, D = q_shape
    Hkv, S = cache_shape[-3], cache_shape[-2]
    G = Hq // Hkv
    bt = min(bt, S)
    if S % bt or D % 32 or (D & (D - 1)):
        return None
    splits = splits or _splits(B, Hkv, S, bt)
    if S % splits:
        return None
    ss = S // splits
    bt = min(bt, ss)
    if ss % bt or bt < 16:
        return None
    return G, max(16, 1 << (G - 1).bit_length()), bt, splits, ss


def _merge(o, m, l, group, dtype):
    """The splits' partial softmaxes [B, splits, Hkv, gp(, D)], of which the first G rows are real
    -> [B, Hkv * G, D]."""
    o, m, l = o[..., :group, :], m[..., :group], l[..., :group]
    mx = m.max(axis=1, keepdims=True)
    w = jnp.exp(m - mx)
    num = (o * w[..., None]).sum(axis=1)
    den = (l * w).sum(axis=1)
    out = num / den[..., None]
    B, Hkv, G, D = out.shape
    return out.reshape(B, Hkv * G, D).astype(dtype)


def _call(operands, plan, D, layer, stacked, num_warps, num_stages, interpret, scale, update, caches, merge=None):
    """The pallas_call of _kernel for a _plan: -> (o, m, l) partials, and the k/v caches if update;
    with merge (update only; operands end with the step's counters): then the counters and the
    merged result ([B, Hkv, G, D] in q's dtype, or int8 words [B, Hkv, G*D/4] and scales)."""
    G, gp, bt, splits, ss = plan
    B, Hkv = operands[1].shape[0], operands[1].shape[1]
    if stacked:
        kv_spec = pl.BlockSpec((None, None, None, ss, D), lambda b, h, s: (layer, b, h, s, 0))
    else:
        kv_spec = pl.BlockSpec((None, None, ss, D), lambda b, h, s: (b, h, s, 0))
    in_specs = [pl.BlockSpec((None,), lambda b, h, s: (b,)),
                pl.BlockSpec((None, None, G, D), lambda b, h, s: (b, h, 0, 0)), kv_spec, kv_spec]
    # gp rows per head group, of which the kernel writes the G real ones (the rest stays unwritten);
    # with merge, one block holds a kv head's splits, for the last of them to read
    n_split = splits if merge is not None else None
    split_at = (lambda s: 0) if merge is not None else (lambda s: s)
    out_specs = [pl.BlockSpec((None, n_split, None, gp, D), lambda b, h, s: (b, split_at(s), h, 0, 0)),
                 pl.BlockSpec((None, n_split, None, gp), lambda b, h, s: (b, split_at(s), h, 0)),
                 pl.BlockSpec((None, n_split, None, gp), lambda b, h, s: (b, split_at(s), h, 0))]
    out_shape = [jax.ShapeDtypeStruct((B, splits, Hkv, gp, D), jnp.float32),
                 jax.ShapeDtypeStruct((B, splits, Hkv, gp), jnp.float32),
                 jax.ShapeDtypeStruct((B, splits, Hkv, gp), jnp.float32)]
    aliases = {}
    if update:
        row = pl.BlockSpec((None, D), lambda b, h, s: (b, 0))
        head = pl.BlockSpec((None, None, D), lambda b, h, s: (b, h, 0))
        in_specs += [row, row, head, head]
        out_specs += [kv_spec, kv_spec]
        out_shape += [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches]
        aliases = {2: 3, 3: 4}   # the k/v cache operands are the k/v cache results: written in place
    if merge is not None:
        sync = operands[-1]
        whole = pl.BlockSpec(sync.shape, lambda b, h, s: (0,) * sync.ndim)
        in_specs.append(whole)
        out_specs.append(whole)
        out_shape.append(jax.ShapeDtypeStruct(sync.shape, sync.dtype))
        aliases[len(operands) - 1] = len(out_shape) - 1
        if merge == "dtype":
            out_specs.append(pl.BlockSpec((None, None, G, D), lambda b, h, s: (b, h, 0, 0)))
            out_shape.append(jax.ShapeDtypeStruct((B, Hkv, G, D), operands[1].dtype))
        else:
            for n, dt in ((G * D // 4, jnp.int32), (G * D // merge, jnp.float32)):
                out_specs.append(pl.BlockSpec((None, None, n), lambda b, h, s: (b, h, 0)))
                out_shape.append(jax.ShapeDtypeStruct((B, Hkv, n), dt))
    return pl.pallas_call(
        functools.partial(_kernel, scale=float(scale), bt=bt, ss=ss, group=G, gp=gp, update=update, merge=merge,
                          layer=layer if merge is not None else 0, interpret=interpret),
        grid=(B, Hkv, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="decode_attention_update" if update else "decode_attention",
    )(*operands)


@functools.partial(jax.jit, static_argnames=("scale", "bt", "splits", "num_warps", "num_stages",
                                             "interpret", "layer"))
def decode_attention(q, k_cache, v_cache, lengths, scale, *, bt: int = 64, splits: int | None = None,
                     num_warps: int = 4, num_stages: int = 2, interpret: bool | None = None,
                     layer: int | None = None):
    """Pallas flash-decoding; same signature and result as decode_attention_ref.

    layer: the caches are the whole stack [L, B, Hkv, S, D] and the kernel reads layer `layer` of it
    in place (a sliced-out operand would be copied first).
    """
    from .gemv import interpret_mode
    if interpret is None:
        interpret = interpret_mode()
    stacked = layer is not None
    plan = _plan(q.shape, k_cache.shape, bt, splits)
    if plan is None:
        layer_k, layer_v = (k_cache[layer], v_cache[layer]) if stacked else (k_cache, v_cache)
        return decode_attention_ref(q, layer_k, layer_v, lengths, scale)
    B, Hq, D = q.shape
    G, Hkv = plan[0], k_cache.shape[-3]
    o, m, l = _call((lengths.astype(jnp.int32), q.reshape(B, Hkv, G, D), k_cache, v_cache), plan, D, layer,
                    stacked, num_warps, num_stages, interpret, scale, False, None)
    return _merge(o, m, l, G, q.dtype)


def _check_update(q, k, v, k_cache, v_cache, pos, cos, sin, layer):
    """ValueError naming the operand whose shape does not fit the cache stack (the kernel writes into
    the stack in place, so a wrong layer or head count must not reach it)."""
    if k_cache.ndim != 5 or v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention_update: caches {k_cache.shape} / {v_cache.shape} must be one "
                         "[L, B, Hkv, S, D] stack each")
    L, B, Hkv, _, D = k_cache.shape
    if not 0 <= layer < L:
        raise ValueError(f"decode_attention_update: layer {layer} is not in the cache's {L} layers")
    want = {"q": (B, q.shape[1], D), "k": (B, Hkv, D), "v": (B, Hkv, D), "pos": (B,), "cos": (B, D), "sin": (B, D)}
    for name, a in (("q", q), ("k", k), ("v", v), ("pos", pos), ("cos", cos), ("sin", sin)):
        if a.shape != want[name]:
            raise ValueError(f"decode_attention_update: {name} has shape {a.shape}, the cache needs {want[name]}")
    if q.shape[1] % Hkv:
        raise ValueError(f"decode_attention_update: {q.shape[1]} query heads do not group over {Hkv} kv heads")


# (positions per block, splits (0: enough for ~2 programs per SM), warps, stages) of the fused
# decode attention step; REALIZAR_GEMV_TILES key "ATTN" overrides it (for sweeps on a new GPU).
ATTN_TILE = (64, 0, 4, 2)


def attention_tile() -> tuple:
    """ATTN_TILE, unless REALIZAR_GEMV_TILES overrides it under the key "ATTN" (read when traced)."""
    from .gemv import TILES_ENV, default_tiles
    tile = default_tiles("ATTN", ATTN_TILE, min_value=0)
    if tile[0] < 16 or tile[0] & (tile[0] - 1) or min(tile[2:]) < 1:
        raise ValueError(f"{TILES_ENV}['ATTN'] must be [positions per block (a power of two >= 16), splits "
                         f"(0: auto), warps, stages], got {list(tile)}")
    return tile


@functools.partial(jax.jit, static_argnames=("scale", "layer", "bt", "splits", "num_warps", "num_stages",
                                             "interpret", "merge"))
def decode_attention_update(q, k, v, k_cache, v_cache, pos, cos, sin, scale, layer: int, *, bt: int | None = None,
                            splits: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                            interpret: bool | None = None, merge: bool = True):
    """The fused step; same signature and results as attention.decode_attention_update_ref:
    -> (out [B, Hq, D], k_cache, v_cache) with k/v rotated and written at `pos` of layer `layer`.
    merge=False returns the splits' partials (o, m, l) in place of out (see _merge), for a consumer
    that merges them itself (decode_attention_output); None where the kernel does not apply.
    Tiles left None come from attention_tile()."""
    from .gemv import interpret_mode
    _check_update(q, k, v, k_cache, v_cache, pos, cos, sin, layer)
    if interpret is None:
        interpret = interpret_mode()
    d_bt, d_splits, d_warps, d_stages = attention_tile()
    bt, num_warps, num_stages = bt or d_bt, num_warps or d_warps, num_stages or d_stages
    splits = splits or d_splits or None
    plan = _plan(q.shape, k_cache.shape, bt, splits)
    if plan is None:
        if not merge:
            return None
        return decode_attention_update_ref(q, k, v, k_cache, v_cache, pos, cos, sin, scale, layer)
    B, Hq, D = q.shape
    G, Hkv = plan[0], k_cache.shape[-3]
    operands = (pos.astype(jnp.int32), q.reshape(B, Hkv, G, D), k_cache, v_cache,
                cos.astype(jnp.float32), sin.astype(jnp.float32), k, v)
    o, m, l, k_cache, v_cache = _call(operands, plan, D, layer, True, num_warps, num_stages, interpret,
                                      scale, True, (k_cache, v_cache))
    if not merge:
        return (o, m, l), k_cache, v_cache
    return _merge(o, m, l, G, q.dtype), k_cache, v_cache


def merged_in_kernel(q_shape, k_cache_shape, group: int | None = None) -> bool:
    """Whether decode_attention_merged applies: the fused step's plan exists, the query heads of a kv
    head are a power of two (the merge works on [G, D] tiles) and, for int8 output, the row splits
    into whole groups of `group` within each head."""
    bt, splits, _, _ = attention_tile()
    plan = _plan(q_shape, k_cache_shape, bt, splits or None)
    if plan is None:
        return False
    G, D = plan[0], q_shape[-1]
    return G & (G - 1) == 0 and (group is None or (D % group == 0 and group % 4 == 0))


@functools.partial(jax.jit, static_argnames=("scale", "layer", "group", "interpret"))
def decode_attention_merged(q, k, v, k_cache, v_cache, pos, cos, sin, scale, layer: int, sync, *,
                            group: int | None = None, interpret: bool | None = None):
    """decode_attention_update with the splits merged inside the same launch: the last split of each
    kv head to finish (counted in sync[layer]; sync: realizar_jax.attention.attention_sync's
    counters, aliased in and out) merges them. -> (result, k_cache, v_cache, sync); result: the
    attention output [B, Hq, D] in q's dtype or, with `group`, its int8 quantization (words [B, Hq*D/group, group/4], scales [B, Hq*D/group])
    as xquant.quantize_x returns it, for gemv_prepared. Needs merged_in_kernel."""
    from .gemv import interpret_mode
    _check_update(q, k, v, k_cache, v_cache, pos, cos, sin, layer)
    if interpret is None:
        interpret = interpret_mode()
    if not merged_in_kernel(q.shape, k_cache.shape, group):
        raise ValueError(f"decode_attention_merged: q {q.shape} / cache {k_cache.shape} (group {group}) "
                         "cannot merge in the kernel")
    if sync.shape != k_cache.shape[:3] or sync.dtype != jnp.int32:
        raise ValueError(f"decode_attention_merged: sync {sync.shape} {sync.dtype} is not int32 {k_cache.shape[:3]}")
    bt, splits, num_warps, num_stages = attention_tile()
    plan = _plan(q.shape, k_cache.shape, bt, splits or None)
    B, Hq, D = q.shape
    G, Hkv = plan[0], k_cache.shape[-3]
    operands = (pos.astype(jnp.int32), q.reshape(B, Hkv, G, D), k_cache, v_cache,
                cos.astype(jnp.float32), sin.astype(jnp.float32), k, v, sync)
    outs = _call(operands, plan, D, layer, True, num_warps, num_stages, interpret, scale, True,
                 (k_cache, v_cache), merge="dtype" if group is None else group)
    k_cache, v_cache, sync = outs[3:6]
    if group is None:
        return outs[6].reshape(B, Hq, D), k_cache, v_cache, sync
    cols = Hq * D
    return (outs[6].reshape(B, cols // group, group // 4), outs[7].reshape(B, cols // group)), k_cache, v_cache, sync


def _o_takes_int8(q, wo) -> bool:
    """Whether the o projection's GEMV reads int8s another kernel wrote (dispatch.takes_prepared_int8)."""
    from .dispatch import takes_prepared_int8
    return takes_prepared_int8(q.shape[0], q.dtype, wo)


def merge_fuses(q, wo) -> bool:
    """Whether decode_attention_output can merge the splits inside the o projection's int8 activation
    prep: REALIZAR_ATTN_MERGE=prep (or =kernel where the kernel cannot merge) and _o_takes_int8."""
    from .switches import switch
    return switch("REALIZAR_ATTN_MERGE") in ("kernel", "prep") and _o_takes_int8(q, wo)


def decode_attention_output(q, k, v, k_cache, v_cache, pos, cos, sin, scale, layer: int, wo, *, sync=None,
                            interpret: bool | None = None, unsummed: bool = False):
    """(matmul(attention, wo), k_cache, v_cache, sync) for decode_attention_update's arguments with
    the splits' merge fused somewhere; None where no fused route applies (the caller merges in XLA).

    REALIZAR_ATTN_MERGE=prep (the default; also =kernel where the kernel cannot merge), packed wo on
    the int8 route: the merge runs inside the o projection's activation quantization
    (xquant.merge_quantize_x). =kernel with the step's counters (sync, attention_sync): the last
    split merges inside the attention launch (decode_attention_merged) and writes the o GEMV's int8
    activations (packed wo on the int8 route) or the attention output (anything else, then matmul). unsummed=True: the projection may come back as the
    GEMV's K-split partials (splitsum.SplitSum)."""
    from .gemv import gemv_prepared, interpret_mode
    from .qdot import x_q8_group
    from .splitsum import SplitSum
    from .switches import switch
    from .xquant import merge_quantize_x
    if interpret is None:
        interpret = interpret_mode()
    int8 = _o_takes_int8(q, wo)
    group = x_q8_group(wo.qtype) if int8 else None
    B, Hq, _ = q.shape

    def project(words, scales):
        if unsummed:
            return SplitSum(gemv_prepared(words, scales, wo, interpret=interpret, summed=False), q.dtype)
        return gemv_prepared(words, scales, wo, interpret=interpret).astype(q.dtype)

    if (switch("REALIZAR_ATTN_MERGE") == "kernel" and sync is not None
            and merged_in_kernel(q.shape, k_cache.shape, group)):
        out, k_cache, v_cache, sync = decode_attention_merged(q, k, v, k_cache, v_cache, pos, cos, sin, scale, layer,
                                                              sync, group=group, interpret=interpret)
        if int8:
            return project(*out), k_cache, v_cache, sync
        from ..quant.matmul import matmul, matmul_unsummed
        return (matmul_unsummed if unsummed else matmul)(out.reshape(B, -1), wo), k_cache, v_cache, sync
    if not merge_fuses(q, wo):
        return None
    res = decode_attention_update(q, k, v, k_cache, v_cache, pos, cos, sin, scale, layer, merge=False,
                                  interpret=interpret)
    if res is None:
        return None
    (o, m, l), k_cache, v_cache = res
    words, scales = merge_quantize_x(o, m, l, group, heads_per_kv=Hq // k_cache.shape[-3], dtype=q.dtype,
                                     interpret=interpret)
    return project(words, scales), k_cache, v_cache, sync
