"""Gemma 2 and Gemma 3 (text): llama's block with norms before *and after* the attention and the MLP, a
GeGLU MLP (tanh GELU), embeddings scaled by sqrt(hidden), sliding-window attention on the layers that
layer_types marks, the attention scale query_pre_attn_scalar ** -0.5, soft-capped attention logits
(Gemma 2) and soft-capped final logits.

    h = x + post_attn_norm(attn(attn_norm(x)));  out = h + post_ffn_norm(mlp(ffn_norm(h)))

Gemma 3 adds RMSNorm on q and k per head (llama.attention_inputs, as qwen3) and gives its sliding layers
their own RoPE table (base rope_local_theta, unscaled; the global layers' table carries the rope scaling).
Gemma's RMSNorm multiplies by (1 + w): the weights hold 1 + w (the builder adds 1 to an HF checkpoint's
norms; llama.cpp's GGUFs store them so), so the norm ops are llama's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ..config import ModelConfig
from ..ops.fused import Stream, norm_mlp, rms_norm
from ..ops.linear import embedding
from ..weights import LayerParams, Params
from . import llama

MLP_ACTIVATION = "gelu_tanh"


def embed(params: Params, tokens, config: ModelConfig, dtype):
    """The embedding rows times sqrt(hidden), the scale rounded to the rows' dtype first (as HF does)."""
    x = embedding(params.embed, tokens, dtype)
    return x * jnp.asarray(config.hidden_size ** 0.5, x.dtype)


def block(lp: LayerParams, x: Stream, attention, config: ModelConfig):
    layer, eps = attention.layer, config.norm_eps
    local = config.rope_local_theta is not None and config.layer_type(layer) == "sliding_attention"
    with jax.named_scope("qkv"):
        x, q, k, v = llama.attention_inputs(lp, x, config)
    with jax.named_scope("attention"):
        attn_out, attention = attention(q, k, v, lp.wo, window=config.window(layer), softcap=config.attn_softcap,
                                        rope="local" if local else "global")
    h = x + rms_norm(attn_out, lp.post_attn_norm, eps)
    with jax.named_scope("mlp"):
        h, mlp_out = norm_mlp(h, lp.ffn_norm, eps, lp.w_gate, lp.w_up, lp.w_down, MLP_ACTIVATION)
    return h + rms_norm(mlp_out, lp.post_ffn_norm, eps), attention


def head(params: Params, x: Stream, config: ModelConfig):
    """llama's head, then the final soft-capping c * tanh(logits / c)."""
    logits = llama.head(params, x, config)
    c = config.final_softcap
    return logits if c is None else jnp.tanh(logits / c) * c
