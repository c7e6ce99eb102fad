"""Mixture-of-experts families: Mixtral (llama attention, optional sliding window) and Qwen3-MoE (qwen3's
per-head q/k RMSNorm). llama's pre-norm block with the MLP replaced by a routed mixture of experts:

    h = x + attn(norm(x));  out = h + sum_{e in top_k(router(norm(h)))} w_e * expert_e(norm(h))

The router's softmax, top-k and renormalization (config.norm_topk_prob: Mixtral always, Qwen3-MoE as its
config says) and the experts' matmuls are ops.moe's. Embedding and head are llama's.
"""
from __future__ import annotations

import jax

from ..config import ModelConfig
from ..ops.fused import Stream
from ..ops.moe import norm_moe
from ..weights import LayerParams
from . import llama
from .llama import MLP_ACTIVATION, embed, head  # noqa: F401  (the family's embed and head)


def block(lp: LayerParams, x: Stream, attention, config: ModelConfig):
    with jax.named_scope("qkv"):
        x, q, k, v = llama.attention_inputs(lp, x, config)
    with jax.named_scope("attention"):
        attn_out, attention = attention(q, k, v, lp.wo, window=config.window(attention.layer))
    h = x + attn_out
    with jax.named_scope("moe"):
        h, moe_out = norm_moe(h, lp.ffn_norm, config.norm_eps, lp.router, lp.experts_gate, lp.experts_up,
                              lp.experts_down, top_k=config.experts_per_token, normalize=config.norm_topk_prob,
                              activation=MLP_ACTIVATION)
    return h + moe_out, attention
