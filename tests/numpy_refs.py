"""numpy references of the layer math, rounded to bf16 where the model rounds (layers.py)."""
from __future__ import annotations

import ml_dtypes
import numpy as np

BF16 = ml_dtypes.bfloat16


def bf16(a):
    return np.asarray(a, np.float32).astype(BF16).astype(np.float32)


def numpy_norm(x, weight, eps):
    """layers.rms_norm: normalize in float64, round to bf16, scale by the bf16 weight, round."""
    r = 1.0 / np.sqrt((np.asarray(x, np.float64) ** 2).mean(axis=-1, keepdims=True) + eps)
    return bf16(bf16(weight) * bf16(x * r))


def numpy_swiglu(g, u):
    """layers.swiglu on bf16 values: silu rounded once, the product once."""
    g, u = np.asarray(g, np.float32), np.asarray(u, np.float32)
    return bf16(bf16(g / (1.0 + np.exp(-g.astype(np.float64)))) * u)
