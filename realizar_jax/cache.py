"""The KV cache: explicit state, passed into the jitted prefill/decode and returned updated.

One stacked array per K and V ([layers, batch, kv_heads, max_seq_len, head_dim]) so a step updates it
in place once the caller donates it. `lengths` counts the valid positions of each sequence; attention
never reads past it, so whatever sits beyond (padding, stale tokens) is harmless.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from .config import ModelConfig


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [L, B, Hkv, S, D]
    v: jax.Array  # [L, B, Hkv, S, D]
    lengths: jax.Array  # int32 [B]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]


def init_cache(config: ModelConfig, batch: int, max_seq_len: int, dtype=jnp.bfloat16) -> KVCache:
    if batch < 1 or max_seq_len < 1:
        raise ValueError(f"batch and max_seq_len must be >= 1, got batch={batch}, max_seq_len={max_seq_len}")
    shape = (config.num_layers, batch, config.num_kv_heads, max_seq_len, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32))

