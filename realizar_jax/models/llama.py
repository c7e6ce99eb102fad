"""The llama family: llama, mistral (sliding window), qwen2 (biases on q/k/v), qwen3 (RMSNorm on q and k
per head) and phi3 (whose fused qkv / gate_up tensors the weights builder splits, longrope RoPE).

A family module gives the three parts the layer loop (models/__init__.py) runs: `embed`, `block`
and `head`, written from ops/ only. The block is the pre-norm transformer block,
`h = x + attn(norm(x)); out = h + mlp(norm(h))`: x is an ops.fused.Stream, whose `+` the next norm op adds.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ..ops.fused import Stream, norm_linear, norm_mlp, rms_norm
from ..ops.linear import embedding
from ..config import ModelConfig
from ..weights import LayerParams, Params

MLP_ACTIVATION = "silu"


def embed(params: Params, tokens, config: ModelConfig, dtype):
    return embedding(params.embed, tokens, dtype)


def attention_inputs(lp: LayerParams, x, config: ModelConfig):
    """(x with its pending add, q [..., Hq, D], k/v [..., Hkv, D]) before RoPE."""
    x, (q, k, v) = norm_linear(x, lp.attn_norm, config.norm_eps, (lp.wq, lp.wk, lp.wv))
    if config.qkv_bias:
        dt = q.dtype
        q, k, v = q + lp.bq.astype(dt), k + lp.bk.astype(dt), v + lp.bv.astype(dt)
    lead = q.shape[:-1]
    q = q.reshape(*lead, config.num_heads, config.head_dim)
    k = k.reshape(*lead, config.num_kv_heads, config.head_dim)
    v = v.reshape(*lead, config.num_kv_heads, config.head_dim)
    if config.qk_norm:
        q, k = rms_norm(q, lp.q_norm, config.norm_eps), rms_norm(k, lp.k_norm, config.norm_eps)
    return x, q, k, v


def block(lp: LayerParams, x: Stream, attention, config: ModelConfig, activation: str = MLP_ACTIVATION):
    """-> (the block's output stream, attention with this layer's cache written)."""
    with jax.named_scope("qkv"):
        x, q, k, v = attention_inputs(lp, x, config)
    with jax.named_scope("attention"):   # Mistral: a sliding window (on every layer)
        attn_out, attention = attention(q, k, v, lp.wo, window=config.window(attention.layer))
    h = x + attn_out
    with jax.named_scope("mlp"):
        h, mlp_out = norm_mlp(h, lp.ffn_norm, config.norm_eps, lp.w_gate, lp.w_up, lp.w_down, activation)
    return h + mlp_out, attention


def head(params: Params, x: Stream, config: ModelConfig):
    """The final norm and the LM head -> float32 logits."""
    _, [logits] = norm_linear(x, params.final_norm, config.norm_eps, (params.lm_head,))
    return logits.astype(jnp.float32)
