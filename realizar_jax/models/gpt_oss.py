"""gpt-oss (OpenAI's gpt-oss-20b / -120b): llama's pre-norm block with biases on q/k/v/o, attention sinks,
sliding-window attention on alternating layers (config.layer_types), YaRN RoPE, and a mixture of experts
with a biased router (its top-k logits softmaxed) and biased experts whose activation is the clamped SwiGLU:

    h = x + attn(norm(x), sinks) + b_o;  out = h + sum_{e in top_k(router(norm(h)) + b_r)} w_e * expert_e(norm(h))
    expert_e(y) = down_e((clamp(up_e(y)) + 1) * glu(clamp(gate_e(y)))) (each projection with its bias)

The sinks, the router's order and the clamp are explicit op arguments (ops.attention, ops.moe); the YaRN
frequencies and attention factor are the weights' RoPE tables. Embedding and head are llama's.
"""
from __future__ import annotations

import jax

from ..config import ModelConfig
from ..ops.fused import Stream
from ..ops.linear import summed
from ..ops.moe import norm_moe
from ..weights import LayerParams
from . import llama
from .llama import embed, head  # noqa: F401  (the family's embed and head)

EXPERT_ACTIVATION = "clamped_swiglu"


def block(lp: LayerParams, x: Stream, attention, config: ModelConfig):
    with jax.named_scope("qkv"):
        x, q, k, v = llama.attention_inputs(lp, x, config)   # q/k/v biases: config.qkv_bias
    with jax.named_scope("attention"):
        attn_out, attention = attention(q, k, v, lp.wo, window=config.window(attention.layer), sinks=lp.attn_sinks)
    if lp.bo is not None:
        attn_out = summed(attn_out) + lp.bo.astype(x.x.dtype)
    h = x + attn_out
    with jax.named_scope("moe"):
        biases = None if lp.experts_gate_bias is None else (lp.experts_gate_bias, lp.experts_up_bias,
                                                            lp.experts_down_bias)
        h, moe_out = norm_moe(h, lp.ffn_norm, config.norm_eps, lp.router, lp.experts_gate, lp.experts_up,
                              lp.experts_down, top_k=config.experts_per_token, normalize=config.norm_topk_prob,
                              activation=EXPERT_ACTIVATION, router_bias=lp.router_bias, order=config.moe_router,
                              biases=biases, limit=config.swiglu_limit, alpha=config.swiglu_alpha)
    return h + moe_out, attention
