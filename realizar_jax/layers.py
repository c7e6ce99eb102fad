"""Elementwise layer math shared by the model and the GPU kernels that fuse it (kernels/xquant.py):
RMSNorm and the SwiGLU gate, rounded exactly as HF computes them in the model's dtype."""
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
