"""Decode attention over a KV cache: one query token per sequence, GQA, ragged valid lengths.

Flash-decoding: grid (batch, kv head, split of the sequence axis). A program gathers the G query
heads that share its kv head into 16 rows (repeated, so the two products run on tensor cores),
walks only the valid positions of its split in blocks of BT, and keeps an online softmax (running
max m, running sum l, unnormalised output o). Splits past a sequence's length do no loads at all.
Each split stores its G real rows of (o, m, l). The splits are merged by a few XLA ops (_merge) or,
in the model's decode step, inside the kernel that quantizes the o projection's activations
(xquant.merge_quantize_x). (A separate Pallas merge kernel was slower: BENCHMARKS.md.)

The kernel takes the step's new q, k, v before RoPE: it rotates them in registers, the program whose
split holds the new position writes k and v into the cache stack (aliased in and out, so in place)
and adds the new token to its softmax. That is one launch per layer where XLA needed ~7 (RoPE's
halves and concatenations, the q padding, two scatters). Where the kernel does not apply the entry
points return None and the caller (ops/attention.py) runs the jnp reference.
The layout of q/k is HF's "halves" RoPE convention (layers.apply_rope): the kernel works on the
two halves of the head dimension separately, as two tensor-core products.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .tuning import KernelConfig

NEG = -1e30  # finite "minus infinity": empty splits must not turn the merge into NaN


def _rotate(a, b, cos, sin, dtype):
    """RoPE on the halves (a, b) of float32 rows, rounded to dtype (as apply_rope) and back."""
    ra = a * cos - b * sin
    rb = b * cos + a * sin
    return ra.astype(dtype).astype(jnp.float32), rb.astype(dtype).astype(jnp.float32)


def _kernel(pos_ref, q_ref, k_ref, v_ref, cos_ref, sin_ref, knew_ref, vnew_ref, o_ref, m_ref, l_ref, kout_ref,
            vout_ref, *, scale, bt, ss, group, gp):
    """The cache holds positions < pos_ref; the new token's k/v (and q) arrive unrotated in
    knew/vnew, with cos/sin of position pos_ref; the owning split writes them to kout/vout."""
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
    # the new token, from registers (no other program reads its cache row)
    qk = ((qa.astype(jnp.float32) * ka[None, :]).sum(axis=1)
          + (qb.astype(jnp.float32) * kb[None, :]).sum(axis=1)) * scale
    m_new = jnp.where(owner, jnp.maximum(m, qk), m)
    corr = jnp.exp(m - m_new)
    p = jnp.where(owner, jnp.exp(qk - m_new), 0.0)
    o = o * corr[:, None] + p[:, None] * vn.astype(jnp.float32)[None, :]
    m, l = m_new, l * corr + p
    real = jnp.arange(gp) < group   # store the G real rows only (the merge reads no others)
    plgpu.store(o_ref, o, mask=real[:, None])
    plgpu.store(m_ref, m, mask=real)
    plgpu.store(l_ref, l, mask=real)


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


def _call(operands, plan, D, layer, num_warps, num_stages, interpret, scale, caches):
    """The pallas_call of _kernel for a _plan: -> (o, m, l) partials and the k/v cache stacks."""
    G, gp, bt, splits, ss = plan
    B, Hkv = operands[1].shape[0], operands[1].shape[1]
    kv_spec = pl.BlockSpec((None, None, None, ss, D), lambda b, h, s: (layer, b, h, s, 0))
    row = pl.BlockSpec((None, D), lambda b, h, s: (b, 0))
    head = pl.BlockSpec((None, None, D), lambda b, h, s: (b, h, 0))
    in_specs = [pl.BlockSpec((None,), lambda b, h, s: (b,)),
                pl.BlockSpec((None, None, G, D), lambda b, h, s: (b, h, 0, 0)), kv_spec, kv_spec,
                row, row, head, head]
    # gp rows per head group, of which the kernel writes the G real ones (the rest stays unwritten)
    out_specs = [pl.BlockSpec((None, None, None, gp, D), lambda b, h, s: (b, s, h, 0, 0)),
                 pl.BlockSpec((None, None, None, gp), lambda b, h, s: (b, s, h, 0)),
                 pl.BlockSpec((None, None, None, gp), lambda b, h, s: (b, s, h, 0)), kv_spec, kv_spec]
    out_shape = [jax.ShapeDtypeStruct((B, splits, Hkv, gp, D), jnp.float32),
                 jax.ShapeDtypeStruct((B, splits, Hkv, gp), jnp.float32),
                 jax.ShapeDtypeStruct((B, splits, Hkv, gp), jnp.float32)]
    out_shape += [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches]
    return pl.pallas_call(
        functools.partial(_kernel, scale=float(scale), bt=bt, ss=ss, group=G, gp=gp),
        grid=(B, Hkv, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases={2: 3, 3: 4},   # the k/v cache operands are the k/v cache results: in place
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="decode_attention_update",
    )(*operands)


def _check_update(q, k, v, k_cache, v_cache, pos, cos, sin, layer):
    """ValueError naming the operand whose shape does not fit the cache stack (the kernel writes into
    the stack in place, so a wrong layer or head count must not reach it)."""
    if k_cache.ndim != 5 or v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention_update: caches {k_cache.shape} / {v_cache.shape} must be one "
                         "[L, B, Hkv, S, D] stack each")
    L, B, Hkv, _, D = k_cache.shape
    if not 0 <= layer < L:
        raise ValueError(f"decode_attention_update: layer {layer} is not in the cache's {L} layers")
    check_step_operands("decode_attention_update", "the cache needs", q, k, v, pos, cos, sin, B, Hkv, D)


def check_step_operands(fn: str, holder: str, q, k, v, pos, cos, sin, B: int, Hkv: int, D: int) -> None:
    """ValueError naming the one decode step's operand (q, k, v before RoPE; pos; cos/sin at pos) whose
    shape does not fit B sequences of Hkv kv heads of head dim D."""
    want = {"q": (B, q.shape[1], D), "k": (B, Hkv, D), "v": (B, Hkv, D), "pos": (B,), "cos": (B, D), "sin": (B, D)}
    for name, a in (("q", q), ("k", k), ("v", v), ("pos", pos), ("cos", cos), ("sin", sin)):
        if a.shape != want[name]:
            raise ValueError(f"{fn}: {name} has shape {a.shape}, {holder} {want[name]}")
    if q.shape[1] % Hkv:
        raise ValueError(f"{fn}: {q.shape[1]} query heads do not group over {Hkv} kv heads")


def decode_tile(cfg: KernelConfig, key: str, default: tuple) -> tuple:
    """A decode attention kernel's (positions per block, splits, warps, stages), KernelConfig's tile
    `key` overriding `default`."""
    tile = cfg.tile(key, default, min_value=0)
    if tile[0] < 16 or tile[0] & (tile[0] - 1) or min(tile[2:]) < 1:
        raise ValueError(f"tile '{key}' must be [positions per block (a power of two >= 16), splits "
                         f"(0: auto), warps, stages], got {list(tile)}")
    return tile


# (positions per block, splits (0: enough for ~2 programs per SM), warps, stages) of the fused
# decode attention step; the KernelConfig's tile key "ATTN" overrides it (for sweeps on a new GPU).
ATTN_TILE = (64, 0, 4, 2)


def attention_tile(cfg: KernelConfig) -> tuple:
    return decode_tile(cfg, "ATTN", ATTN_TILE)


def _tile_plan(q_shape, k_cache_shape, cfg: KernelConfig):
    bt, splits, _, _ = attention_tile(cfg)
    return _plan(q_shape, k_cache_shape, bt, splits or None)


@functools.partial(jax.jit, static_argnames=("scale", "layer", "cfg", "merge"))
def decode_attention_update(q, k, v, k_cache, v_cache, pos, cos, sin, scale, layer: int, *, cfg: KernelConfig,
                            merge: bool = True):
    """One decode step's attention with its cache update (ops.attention.decode_attention_update_ref's
    contract): q [B, Hq, D], k/v [B, Hkv, D] before RoPE; the cache stacks [L, B, Hkv, S, D]; pos [B];
    cos/sin [B, D] at pos. -> (out [B, Hq, D], k_cache, v_cache) with k/v rotated and written at `pos`
    of layer `layer`, in place. merge=False returns the splits' partials (o, m, l) in place of out
    (see _merge), for a consumer that merges them itself. None where the kernel does not apply."""
    _check_update(q, k, v, k_cache, v_cache, pos, cos, sin, layer)
    _, _, num_warps, num_stages = attention_tile(cfg)
    plan = _tile_plan(q.shape, k_cache.shape, cfg)
    if plan is None:
        return None
    B, Hq, D = q.shape
    G, Hkv = plan[0], k_cache.shape[-3]
    operands = (pos.astype(jnp.int32), q.reshape(B, Hkv, G, D), k_cache, v_cache,
                cos.astype(jnp.float32), sin.astype(jnp.float32), k, v)
    o, m, l, k_cache, v_cache = _call(operands, plan, D, layer, num_warps, num_stages, cfg.interpret, scale,
                                      (k_cache, v_cache))
    if not merge:
        return (o, m, l), k_cache, v_cache
    return _merge(o, m, l, G, q.dtype), k_cache, v_cache
