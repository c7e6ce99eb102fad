"""The model as pure functions over (params, cache, tokens). Jitted by the engine; usable directly.

One code path for llama/mistral/qwen2/qwen3: branches are config flags only (qkv bias, q/k norm).
Weights are roles; `matmul` hides whether one is a dense array or packed quantized blocks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .attention import attention_sync, decode_attention_output, prefill_attention
from .cache import KVCache
from .config import ModelConfig
from .kernels.splitsum import total
from .layers import apply_rope, rms_norm, rope_tables  # noqa: F401 (the notebooks import them here)
from .quant.matmul import embedding_lookup, matmul, residual_normed_matmul_many, residual_normed_mlp
from .weights import LayerParams, Params


def _project_qkv(lp: LayerParams, x, delta, config: ModelConfig):
    """x [..., hidden] (the residual stream) plus delta (the previous block's output, None before the
    first) -> (x + delta, q [..., Hq, D], k/v [..., Hkv, D]): the residual add, attention norm,
    projections, biases and q/k norms (RoPE comes after, with the positions)."""
    x, (q, k, v) = residual_normed_matmul_many(x, delta, lp.attn_norm, config.norm_eps, (lp.wq, lp.wk, lp.wv))
    if config.qkv_bias:
        q, k, v = q + lp.bq.astype(x.dtype), k + lp.bk.astype(x.dtype), v + lp.bv.astype(x.dtype)
    lead = x.shape[:-1]
    q = q.reshape(*lead, config.num_heads, config.head_dim)
    k = k.reshape(*lead, config.num_kv_heads, config.head_dim)
    v = v.reshape(*lead, config.num_kv_heads, config.head_dim)
    if config.qk_norm:
        q, k = rms_norm(q, lp.q_norm, config.norm_eps), rms_norm(k, lp.k_norm, config.norm_eps)
    return x, q, k, v


def _mlp(lp: LayerParams, x, delta, config: ModelConfig):
    """(x + delta, the MLP's output for it). The output may be the down GEMV's K-split partials
    (a SplitSum), which only the next residual_normed_matmul_many takes."""
    return residual_normed_mlp(x, delta, lp.ffn_norm, config.norm_eps, lp.w_gate, lp.w_up, lp.w_down)


def _lm_head(params: Params, x, delta, config: ModelConfig):
    _, [logits] = residual_normed_matmul_many(x, delta, params.final_norm, config.norm_eps, (params.lm_head,))
    return logits.astype(jnp.float32)


def prefill(params: Params, cache: KVCache, tokens, lengths, *, config: ModelConfig, dtype=None,
            all_logits: bool = False):
    """Run prompts [B, T] (right-padded; lengths [B] real tokens) from position 0 and fill the cache.

    Returns (logits, cache): logits [B, T, V] if all_logits else [B, V] at each prompt's last token.
    """
    dtype = jnp.dtype(dtype or cache.k.dtype)
    x = embedding_lookup(params.embed, tokens, dtype)
    return prefill_embeddings(params, cache, x, lengths, config=config, all_logits=all_logits)


def prefill_embeddings(params: Params, cache: KVCache, x, lengths, *, config: ModelConfig, all_logits: bool = False):
    """prefill() from input embeddings x [B, T, hidden] instead of token ids: what jax.grad differentiates
    for input attribution (weights, packed ones included, stay constants)."""
    b, t = x.shape[:2]
    scale = config.head_dim ** -0.5
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = rope_tables(params.rope_inv_freq, positions)
    ks, vs = cache.k, cache.v
    delta = None   # each block's output, added to the stream x by the next block's norm
    for i, lp in enumerate(params.layers):
        x, q, k, v = _project_qkv(lp, x, delta, config)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn = prefill_attention(q, k, v, lengths, scale)
        ks = ks.at[i, :, :, :t].set(k.swapaxes(1, 2).astype(ks.dtype))
        vs = vs.at[i, :, :, :t].set(v.swapaxes(1, 2).astype(vs.dtype))
        x, delta = _mlp(lp, x, matmul(attn.reshape(b, t, -1), lp.wo), config)
    if delta is not None:
        x = x + total(delta).astype(x.dtype)
    if not all_logits:
        x = jnp.take_along_axis(x, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    return _lm_head(params, x, None, config), KVCache(ks, vs, lengths.astype(jnp.int32))


def decode_logits(params: Params, cache: KVCache, tokens, *, config: ModelConfig, dtype=None):
    """One token per sequence [B] at position cache.lengths -> (logits [B, V] float32, cache with lengths + 1)."""
    dtype = jnp.dtype(dtype or cache.k.dtype)
    scale = config.head_dim ** -0.5
    pos = cache.lengths
    x = embedding_lookup(params.embed, tokens, dtype)
    cos, sin = rope_tables(params.rope_inv_freq, pos)   # [B, D], shared by the layers
    ks, vs = cache.k, cache.v
    delta = None   # each block's output, added to the stream x by the next block's norm
    sync = attention_sync(ks)   # the attention kernels' per-step counters
    for i, lp in enumerate(params.layers):
        x, q, k, v = _project_qkv(lp, x, delta, config)
        # RoPE on q and k, k and v written at each row's position of layer i, attention over <= pos,
        # then the output projection
        delta, ks, vs, sync = decode_attention_output(q, k, v, ks, vs, pos, cos, sin, scale, i, lp.wo, sync=sync,
                                                      unsummed=True)
        x, delta = _mlp(lp, x, delta, config)
    return _lm_head(params, x, delta, config), KVCache(ks, vs, pos + 1)


def decode_step(params: Params, cache: KVCache, tokens, key, sampling, seen=None, *, config: ModelConfig,
                dtype=None):
    """Feed tokens [B], sample the next ones on device. Returns (next_tokens [B], logits [B, V], cache, seen)."""
    from .sampling import sample, update_seen_mask
    logits, cache = decode_logits(params, cache, tokens, config=config, dtype=dtype)
    next_tokens = sample(logits, sampling, key, seen)
    if seen is not None:
        seen = update_seen_mask(seen, next_tokens)
    return next_tokens, logits, cache, seen


def decode_loop(params: Params, cache: KVCache, tokens, key, sampling, seen, *, config: ModelConfig, steps: int,
                dtype=None):
    """`steps` decode steps on device in one call (lax.scan): -> (tokens [steps, B], cache, seen, last tokens).

    tokens[j] is the token sampled at step j; the host reads them once per call, not once per token.
    """
    def body(carry, step_key):
        cache, toks, seen = carry
        nxt, _, cache, seen = decode_step(params, cache, toks, step_key, sampling, seen, config=config, dtype=dtype)
        return (cache, nxt, seen), nxt

    (cache, last, seen), out = jax.lax.scan(body, (cache, tokens, seen), jax.random.split(key, steps))
    return out, cache, seen, last
