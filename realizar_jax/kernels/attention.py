"""Decode attention over a KV cache: one query token per sequence, GQA, ragged valid lengths.

Flash-decoding: grid (batch, kv head, split of the sequence axis). A program takes the G query
heads that share its kv head (padded to 16 rows so the two products run on tensor cores), walks
only the valid positions of its split in blocks of BT, and keeps an online softmax (running max m,
running sum l, unnormalised output o). Splits past a sequence's length do no loads at all. The
partial (o, m, l) of every split are merged in a few XLA ops. (A second small Pallas kernel doing
the merge in one launch was slower on the H100: 8B Q4_K_M 292 vs 306 tok/s, BENCHMARKS.md.)
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ..attention import decode_attention_ref  # the model's jnp reference, also the fallback here

NEG = -1e30  # finite "minus infinity": empty splits must not turn the merge into NaN


def _kernel(len_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, scale, bt, ss):
    s = pl.program_id(2)
    length = len_ref[()]
    start = s * ss
    n = jnp.clip((length - start + bt - 1) // bt, 0, ss // bt)
    q = q_ref[...]
    gp, d = q.shape

    def body(t, carry):
        o, m, l = carry
        k = k_ref[pl.ds(t * bt, bt), :]
        qk = jax.lax.dot_general(q.astype(k.dtype), k, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32) * scale           # [gp, bt] f32
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
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


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
    # the one layer's caches: shapes, and the operands of the jnp fallbacks (unused slices of the
    # stack are dropped by XLA when the kernel runs)
    layer_k, layer_v = (k_cache[layer], v_cache[layer]) if stacked else (k_cache, v_cache)
    B, Hq, D = q.shape
    Hkv, S = layer_k.shape[1], layer_k.shape[2]
    G = Hq // Hkv
    bt = min(bt, S)
    if S % bt or D % 16 or (D & (D - 1)):
        return decode_attention_ref(q, layer_k, layer_v, lengths, scale)
    gp = max(16, 1 << (G - 1).bit_length())
    if splits is None:
        splits = 1
        while B * Hkv * splits < 2 * 132 and S % (splits * 2 * bt) == 0:
            splits *= 2
    if S % splits:
        return decode_attention_ref(q, layer_k, layer_v, lengths, scale)
    ss = S // splits
    bt = min(bt, ss)
    if ss % bt or bt < 16:
        return decode_attention_ref(q, layer_k, layer_v, lengths, scale)
    qg = q.reshape(B, Hkv, G, D)
    if gp != G:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - G), (0, 0)))
    kernel = functools.partial(_kernel, scale=float(scale), bt=bt, ss=ss)
    if stacked:
        kv_spec = pl.BlockSpec((None, None, None, ss, D), lambda b, h, s: (layer, b, h, s, 0))
    else:
        kv_spec = pl.BlockSpec((None, None, ss, D), lambda b, h, s: (b, h, s, 0))
    o, m, l = pl.pallas_call(
        kernel,
        grid=(B, Hkv, splits),
        in_specs=[
            pl.BlockSpec((None,), lambda b, h, s: (b,)),
            pl.BlockSpec((None, None, gp, D), lambda b, h, s: (b, h, 0, 0)),
            kv_spec,
            kv_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, gp, D), lambda b, h, s: (b, s, h, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda b, h, s: (b, s, h, 0)),
            pl.BlockSpec((None, None, None, gp), lambda b, h, s: (b, s, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, splits, Hkv, gp, D), jnp.float32),
            jax.ShapeDtypeStruct((B, splits, Hkv, gp), jnp.float32),
            jax.ShapeDtypeStruct((B, splits, Hkv, gp), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="decode_attention",
    )(lengths.astype(jnp.int32), qg, k_cache, v_cache)
    mx = m.max(axis=1, keepdims=True)
    w = jnp.exp(m - mx)                                                   # [B, splits, Hkv, gp]
    num = (o * w[..., None]).sum(axis=1)
    den = (l * w).sum(axis=1)
    out = num / den[..., None]
    return out[:, :, :G].reshape(B, Hq, D).astype(q.dtype)
