"""Elementwise layer math shared by ops/ and the GPU kernels that fuse it (kernels/xquant.py,
kernels/attention.py): RMSNorm, the gated activations and RoPE, rounded exactly as HF computes them
in the model's dtype."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x, weight, eps):
    """RMSNorm as HF computes it: normalize in float32, cast back, then scale."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def swiglu(gate, up):
    """The MLP's gated activation silu(gate) * up in the inputs' dtype, rounded as torch does it: silu
    in float32 rounded once, then the product rounded once. (jax.nn.silu on bf16 rounds every step
    of its logistic expansion on some backends, so its results depend on the backend.)"""
    g = gate.astype(jnp.float32)
    return (g / (1.0 + jnp.exp(-g))).astype(gate.dtype) * up


def geglu(gate, up):
    """The GeGLU gate gelu_tanh(gate) * up (Gemma), rounded as swiglu: the activation in float32
    rounded once, then the product once."""
    g = gate.astype(jnp.float32)
    return jax.nn.gelu(g, approximate=True).astype(gate.dtype) * up


def clamped_swiglu(gate, up, alpha: float, limit: float):
    """gpt-oss's experts' activation: gate clamped to at most `limit`, up to [-limit, limit], then
    (up + 1) * gate * sigmoid(alpha * gate); in float32, rounded once to the inputs' dtype."""
    g = jnp.minimum(gate.astype(jnp.float32), limit)
    u = jnp.clip(up.astype(jnp.float32), -limit, limit)
    return ((u + 1.0) * (g / (1.0 + jnp.exp(-alpha * g)))).astype(gate.dtype)


def rope_tables(inv_freq, positions, attention_factor: float = 1.0):
    """cos/sin [..., 2 * len(inv_freq)] (halves layout) for integer positions [...], both multiplied by
    attention_factor (longrope's scaling of the attention, as HF applies it to cos and sin)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos, sin


def apply_rope(x, cos, sin):
    """x [..., heads, D]; cos/sin [..., R] broadcast over heads. HF's rotate_half convention, in float32, on
    the first R dimensions of each head (partial RoPE when R < D: the rest pass through)."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return jnp.concatenate([apply_rope(x[..., :r], cos, sin), x[..., r:]], axis=-1)
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[..., None, :] + rotated * sin[..., None, :]).astype(x.dtype)
