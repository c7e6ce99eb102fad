"""Attention over the KV cache, as the varying part of the one layer loop (models/).

`PrefillAttention` (a prompt from position 0), `ExtendAttention` (a chunk of a long prompt after the
positions already cached) and `DecodeAttention` (one token per sequence at its position) share one call: `attention(q, k, v, wo) -> (output projection, attention with its cache
updated)`, with q/k/v the block's projections before RoPE. Decode asks the route table for the fused
kernel (RoPE, cache write and attention in one launch, the merge in the o projection's prep); the
jnp functions here are the reference and the CPU path.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp

from ..cache import KVCache
from ..layers import apply_rope, rope_tables
from .linear import linear
from .routes import route

NEG_INF = -1e30  # finite, so a fully masked row gives a uniform (not NaN) softmax


def decode_attention_ref(q, k_cache, v_cache, lengths, scale):
    """q [B, Hq, D]; k/v_cache [B, Hkv, S, D]; lengths [B] valid positions (incl. current). -> [B, Hq, D]."""
    b, hq, d = q.shape
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(b, hkv, hq // hkv, d).astype(jnp.float32)
    scores = jnp.einsum("bhgd,bhsd->bhgs", qg, k_cache.astype(jnp.float32)) * scale
    valid = jnp.arange(s)[None, :] < lengths[:, None]  # [B, S]
    scores = jnp.where(valid[:, None, None, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgs,bhsd->bhgd", probs, v_cache.astype(jnp.float32))
    return out.reshape(b, hq, d).astype(q.dtype)


def decode_attention_update_ref(q, k, v, k_cache, v_cache, pos, cos, sin, scale, layer: int):
    """One decode step's attention with its cache update, in XLA ops.

    q [B, Hq, D], k/v [B, Hkv, D]: the new token's projections before RoPE; k/v_cache: the stacks
    [L, B, Hkv, S, D]; pos [B]: the new token's position (= the valid positions before it); cos/sin
    [B, D]: rope_tables at pos. Rotates q and k, writes k and v at pos in layer `layer`, attends over
    positions <= pos. -> (out [B, Hq, D], k_cache, v_cache).
    """
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rows = jnp.arange(q.shape[0])
    k_cache = k_cache.at[layer, rows, :, pos].set(k.astype(k_cache.dtype))
    v_cache = v_cache.at[layer, rows, :, pos].set(v.astype(v_cache.dtype))
    return decode_attention_ref(q, k_cache[layer], v_cache[layer], pos + 1, scale), k_cache, v_cache


def prefill_attention(q, k, v, lengths, scale):
    """Causal attention within a prompt. q [B, T, Hq, D]; k, v [B, T, Hkv, D]; lengths [B]. -> [B, T, Hq, D].

    Key j is visible to query i when j <= i and j < lengths[b]; padded queries compute junk nobody reads.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d).astype(jnp.float32)
    scores = jnp.einsum("bthgd,bshd->bhgts", qg, k.astype(jnp.float32)) * scale
    pos = jnp.arange(t)
    visible = (pos[None, :] <= pos[:, None])[None] & (pos[None, None, :] < lengths[:, None, None])  # [B, T, S]
    scores = jnp.where(visible[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgts,bshd->bthgd", probs, v.astype(jnp.float32))
    return out.reshape(b, t, hq, d).astype(q.dtype)


@dataclass(frozen=True)
class _Attention:
    """The cache stacks k/v [L, B, Hkv, S, D], the RoPE tables of the positions being computed, and
    the layer (static) the next call reads and writes."""
    k: jax.Array
    v: jax.Array
    cos: jax.Array
    sin: jax.Array
    scale: float = field(metadata=dict(static=True))
    layer: int = field(default=0, metadata=dict(static=True))

    def at_layer(self, layer: int):
        return dataclasses.replace(self, layer=layer)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PrefillAttention(_Attention):
    """Prompts [B, T] from position 0; lengths [B] real tokens (the rest is padding)."""
    lengths: jax.Array = None

    @classmethod
    def start(cls, cache: KVCache, inv_freq, lengths, t: int, scale: float) -> "PrefillAttention":
        b = lengths.shape[0]
        cos, sin = rope_tables(inv_freq, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
        return cls(cache.k, cache.v, cos, sin, scale, 0, lengths)

    def __call__(self, q, k, v, wo):
        """q [B, T, Hq, D], k/v [B, T, Hkv, D] before RoPE -> (attention @ wo.T [B, T, hidden], self updated)."""
        with jax.named_scope("rope"):
            q, k = apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin)
        b, t = q.shape[:2]
        ks = self.k.at[self.layer, :, :, :t].set(k.swapaxes(1, 2).astype(self.k.dtype))
        vs = self.v.at[self.layer, :, :, :t].set(v.swapaxes(1, 2).astype(self.v.dtype))
        out = prefill_attention(q, k, v, self.lengths, self.scale)
        with jax.named_scope("o"):
            y = linear(out.reshape(b, t, -1), wo, unsummed=True)
        return y, dataclasses.replace(self, k=ks, v=vs)

    def cache(self) -> KVCache:
        return KVCache(self.k, self.v, self.lengths.astype(jnp.int32))


def extend_attention(q, k_cache, v_cache, start, lengths, scale):
    """A prompt chunk's attention over the cache. q [B, C, Hq, D] at positions start + i; k/v_cache
    [B, Hkv, S, D] already holding the chunk; lengths [B] valid tokens of the chunk. -> [B, C, Hq, D].

    Key j is visible to query i when j <= start + i and j < start + lengths[b].
    """
    b, c, hq, d = q.shape
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(b, c, hkv, hq // hkv, d).astype(jnp.float32)
    scores = jnp.einsum("bchgd,bhsd->bhgcs", qg, k_cache.astype(jnp.float32)) * scale
    qpos = start[:, None] + jnp.arange(c)[None, :]                       # [B, C]
    j = jnp.arange(s)
    visible = (j[None, None, :] <= qpos[:, :, None]) & (j[None, None, :] < (start + lengths)[:, None, None])
    scores = jnp.where(visible[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgcs,bhsd->bchgd", probs, v_cache.astype(jnp.float32))
    return out.reshape(b, c, hq, d).astype(q.dtype)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class ExtendAttention(_Attention):
    """A chunk [B, C] of each prompt at positions start [B] onwards, after the cached ones; lengths [B]
    real tokens of the chunk (the rest is padding, whose cache writes past the end are dropped)."""
    start: jax.Array = None
    lengths: jax.Array = None

    @classmethod
    def begin(cls, cache: KVCache, inv_freq, start, lengths, c: int, scale: float) -> "ExtendAttention":
        cos, sin = rope_tables(inv_freq, start[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :])
        return cls(cache.k, cache.v, cos, sin, scale, 0, start, lengths)

    def __call__(self, q, k, v, wo):
        with jax.named_scope("rope"):
            q, k = apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin)
        b, c = q.shape[:2]
        rows = jnp.arange(b)[:, None]
        pos = self.start[:, None] + jnp.arange(c)[None, :]               # [B, C]
        # k/v [B, C, Hkv, D] land at cache[layer, b, :, pos]; padding past max_seq_len is dropped
        ks = self.k.at[self.layer, rows, :, pos].set(k.astype(self.k.dtype), mode="drop")
        vs = self.v.at[self.layer, rows, :, pos].set(v.astype(self.v.dtype), mode="drop")
        out = extend_attention(q, ks[self.layer], vs[self.layer], self.start, self.lengths, self.scale)
        with jax.named_scope("o"):
            y = linear(out.reshape(b, c, -1), wo, unsummed=True)
        return y, dataclasses.replace(self, k=ks, v=vs)

    def cache(self) -> KVCache:
        return KVCache(self.k, self.v, (self.start + self.lengths).astype(jnp.int32))


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class DecodeAttention(_Attention):
    """One token per sequence at position pos [B] (= the valid positions before it)."""
    pos: jax.Array = None

    @classmethod
    def start(cls, cache: KVCache, inv_freq, scale: float) -> "DecodeAttention":
        cos, sin = rope_tables(inv_freq, cache.lengths)   # [B, D], shared by the layers
        return cls(cache.k, cache.v, cos, sin, scale, 0, cache.lengths)

    def __call__(self, q, k, v, wo):
        """q [B, Hq, D], k/v [B, Hkv, D] before RoPE -> (attention @ wo.T [B, hidden] (maybe a
        SplitSum), self with k/v written at pos)."""
        args = (q, k, v, self.k, self.v, self.pos, self.cos, self.sin, self.scale, self.layer)
        kernel = route("decode_attention", q.shape[0], wo)
        res = kernel(*args, wo, partial(linear, unsummed=True)) if kernel is not None else None
        if res is None:
            out, ks, vs = decode_attention_update_ref(*args)
            with jax.named_scope("o"):
                res = linear(out.reshape(out.shape[0], -1), wo, unsummed=True), ks, vs
        y, ks, vs = res
        return y, dataclasses.replace(self, k=ks, v=vs)

    def cache(self) -> KVCache:
        return KVCache(self.k, self.v, self.pos + 1)
