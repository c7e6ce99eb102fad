"""OLMo 2: no pre-norms; RMSNorm on the attention's and the MLP's outputs before each residual add, and on
q and k over the whole projection (all heads at once) before RoPE.

    h = x + post_attn_norm(attn(x));  out = h + post_ffn_norm(mlp(h))

Embedding and head are llama's.
"""
from __future__ import annotations

import jax

from ..config import ModelConfig
from ..ops.fused import Stream, mlp, project, rms_norm
from ..weights import LayerParams
from .llama import MLP_ACTIVATION, embed, head  # noqa: F401  (the family's embed and head)


def block(lp: LayerParams, x: Stream, attention, config: ModelConfig):
    eps = config.norm_eps
    with jax.named_scope("qkv"):
        x, (q, k, v) = project(x, (lp.wq, lp.wk, lp.wv))
        q, k = rms_norm(q, lp.q_norm, eps), rms_norm(k, lp.k_norm, eps)
        lead = q.shape[:-1]
        q = q.reshape(*lead, config.num_heads, config.head_dim)
        k = k.reshape(*lead, config.num_kv_heads, config.head_dim)
        v = v.reshape(*lead, config.num_kv_heads, config.head_dim)
    with jax.named_scope("attention"):
        attn_out, attention = attention(q, k, v, lp.wo)
    h = x + rms_norm(attn_out, lp.post_attn_norm, eps)
    with jax.named_scope("mlp"):
        h, mlp_out = mlp(h, lp.w_gate, lp.w_up, lp.w_down, MLP_ACTIVATION)
    return h + rms_norm(mlp_out, lp.post_ffn_norm, eps), attention
