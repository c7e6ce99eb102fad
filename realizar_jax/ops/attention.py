"""Attention over the KV cache, as the varying part of the one layer loop (models/).

`PrefillAttention` (a prompt from position 0), `ExtendAttention` (a chunk of a long prompt after the
positions already cached) and `DecodeAttention` (one token per sequence at its position) share one call: `attention(q, k, v, wo) -> (output projection, attention with its cache
updated)`, with q/k/v the block's projections before RoPE. Decode asks the route table for the fused
kernel (RoPE, cache write and attention in one launch, the merge in the o projection's prep); the
jnp functions here are the reference and the CPU path.

The storage is the cache's (cache.py): a contiguous KVCache, or a PagedKVCache whose block tables the
attention objects carry (`tables`, None for the contiguous one). Writes go to each sequence's pages,
reads gather them (the reference) or walk them in the paged decode kernel; the models do not know which.

Per-call features (static, chosen by the block): `window=w` (a query at position i sees keys i-w+1..i;
the cache keeps every position, the window is a mask), `softcap=c` (logits -> c * tanh(logits / c), as
Gemma 2), `rope="local"` (the second RoPE table, Gemma 3's sliding layers), `sinks=` (gpt-oss: a learned
logit per query head [Hq], an extra entry of the softmax's denominator that no value goes with). The decode
kernel route declines them (and partial RoPE); then the reference runs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp

from ..cache import KVCache, PagedKVCache, gather_pages, write_pages
from ..layers import apply_rope, rope_tables
from .linear import linear
from .routes import route

NEG_INF = -1e30  # finite, so a fully masked row gives a uniform (not NaN) softmax


def _softcap(scores, softcap):
    return scores if softcap is None else jnp.tanh(scores / softcap) * softcap


def _softmax(scores, sinks, hkv: int):
    """The softmax over the keys (the last axis) of scores [B, Hkv, G, ..., S]; with sinks [Hq = Hkv * G],
    each head's sink logit joins the denominator (its probability is dropped), as transformers' gpt-oss."""
    if sinks is None:
        return jax.nn.softmax(scores, axis=-1)
    b, _, g = scores.shape[:3]
    sink = jnp.asarray(sinks, jnp.float32).reshape((1, hkv, g) + (1,) * (scores.ndim - 3))
    full = jnp.concatenate([scores, jnp.broadcast_to(sink, scores.shape[:-1] + (1,))], axis=-1)
    return jax.nn.softmax(full, axis=-1)[..., :-1]


def decode_attention_ref(q, k_cache, v_cache, lengths, scale, window=None, softcap=None, sinks=None):
    """q [B, Hq, D]; k/v_cache [B, Hkv, S, D]; lengths [B] valid positions (incl. current). -> [B, Hq, D]."""
    b, hq, d = q.shape
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(b, hkv, hq // hkv, d).astype(jnp.float32)
    scores = _softcap(jnp.einsum("bhgd,bhsd->bhgs", qg, k_cache.astype(jnp.float32)) * scale, softcap)
    j = jnp.arange(s)[None, :]
    valid = j < lengths[:, None]  # [B, S]
    if window is not None:   # the query sits at lengths - 1
        valid &= j >= lengths[:, None] - window
    scores = jnp.where(valid[:, None, None, :], scores, NEG_INF)
    probs = _softmax(scores, sinks, hkv)
    out = jnp.einsum("bhgs,bhsd->bhgd", probs, v_cache.astype(jnp.float32))
    return out.reshape(b, hq, d).astype(q.dtype)


def decode_attention_update_ref(q, k, v, k_cache, v_cache, pos, cos, sin, scale, layer: int, window=None,
                                softcap=None, sinks=None):
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
    return (decode_attention_ref(q, k_cache[layer], v_cache[layer], pos + 1, scale, window, softcap, sinks),
            k_cache, v_cache)


def paged_decode_attention_update_ref(q, k, v, k_pages, v_pages, tables, pos, cos, sin, scale, layer: int,
                                      window=None, softcap=None, sinks=None):
    """decode_attention_update_ref through block tables: k/v_pages the pools [L, P, Hkv, ps, D],
    tables [B, max_pages]. Writes the rotated k and v at pos of each sequence's pages in layer
    `layer`, attends over its gathered pages. -> (out [B, Hq, D], k_pages, v_pages)."""
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_pages = write_pages(k_pages, tables, layer, pos[:, None], k[:, None])
    v_pages = write_pages(v_pages, tables, layer, pos[:, None], v[:, None])
    return (decode_attention_ref(q, gather_pages(k_pages, tables, layer), gather_pages(v_pages, tables, layer),
                                 pos + 1, scale, window, softcap, sinks), k_pages, v_pages)


def prefill_attention(q, k, v, lengths, scale, window=None, softcap=None, sinks=None):
    """Causal attention within a prompt. q [B, T, Hq, D]; k, v [B, T, Hkv, D]; lengths [B]. -> [B, T, Hq, D].

    Key j is visible to query i when j <= i (and i - j < window) and j < lengths[b]; padded queries compute
    junk nobody reads.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d).astype(jnp.float32)
    scores = _softcap(jnp.einsum("bthgd,bshd->bhgts", qg, k.astype(jnp.float32)) * scale, softcap)
    pos = jnp.arange(t)
    causal = pos[None, :] <= pos[:, None]
    if window is not None:
        causal &= pos[None, :] > pos[:, None] - window
    visible = causal[None] & (pos[None, None, :] < lengths[:, None, None])  # [B, T, S]
    scores = jnp.where(visible[:, None, None], scores, NEG_INF)
    probs = _softmax(scores, sinks, hkv)
    out = jnp.einsum("bhgts,bshd->bthgd", probs, v.astype(jnp.float32))
    return out.reshape(b, t, hq, d).astype(q.dtype)


@dataclass(frozen=True)
class Rope:
    """What the RoPE tables are made of: inverse frequencies (float32 [R / 2], R the rotated dimensions of a
    head), the attention factor multiplying cos and sin (longrope), and the sliding layers' own
    frequencies (None: they share the global ones)."""
    inv_freq: jax.Array
    attention_factor: float = 1.0
    local_inv_freq: jax.Array | None = None

    def tables(self, positions):
        """((cos, sin), (cos, sin) of the local frequencies or None) at integer positions [...]."""
        glob = rope_tables(self.inv_freq, positions, self.attention_factor)
        local = None if self.local_inv_freq is None else rope_tables(self.local_inv_freq, positions)
        return glob, local


def _as_rope(rope) -> Rope:
    return rope if isinstance(rope, Rope) else Rope(rope)


@dataclass(frozen=True)
class _Attention:
    """The cache stacks k/v (contiguous [L, B, Hkv, S, D], or page pools [L, P, Hkv, ps, D] with the
    block tables [B, max_pages] in `tables`), the RoPE tables of the positions being computed (and a
    second pair for rope="local" calls, or None), and the layer (static) the next call reads and writes."""
    k: jax.Array
    v: jax.Array
    cos: jax.Array
    sin: jax.Array
    scale: float = field(metadata=dict(static=True))
    layer: int = field(default=0, metadata=dict(static=True))
    local: tuple | None = None
    tables: jax.Array | None = None

    def at_layer(self, layer: int):
        return dataclasses.replace(self, layer=layer)

    @property
    def positions(self) -> int:
        """The positions a sequence's cache holds (S)."""
        return self.k.shape[3] if self.tables is None else self.tables.shape[1] * self.k.shape[3]

    def _window(self, window: int | None) -> int | None:
        """window, or None where it cannot bite: every position the cache holds (S) is within it, so the
        mask is all-causal (the decode kernel, which has no window, then takes the call)."""
        return None if window is None or window >= self.positions else window

    def _tables(self, rope: str):
        if rope == "global":
            return self.cos, self.sin
        if rope == "local" and self.local is not None:
            return self.local
        raise ValueError(f"attention: rope must be 'global' or 'local' (with local frequencies), got {rope!r}")

    def _write(self, k, v, pos, valid=None):
        """The stacks with k/v [B, C, Hkv, D] at positions pos [B, C] of layer self.layer (positions past
        the cache, or where valid [B, C] is False, dropped)."""
        if self.tables is not None:
            return (write_pages(self.k, self.tables, self.layer, pos, k, valid),
                    write_pages(self.v, self.tables, self.layer, pos, v, valid))
        if valid is not None:
            pos = jnp.where(valid, pos, self.k.shape[3])
        rows = jnp.arange(k.shape[0])[:, None]
        # k/v [B, C, Hkv, D] land at cache[layer, b, :, pos]
        return (self.k.at[self.layer, rows, :, pos].set(k.astype(self.k.dtype), mode="drop"),
                self.v.at[self.layer, rows, :, pos].set(v.astype(self.v.dtype), mode="drop"))

    def _rows(self, ks, vs):
        """Layer self.layer of the stacks as contiguous rows [B, Hkv, S, D] (paged: gathered)."""
        if self.tables is None:
            return ks[self.layer], vs[self.layer]
        return gather_pages(ks, self.tables, self.layer), gather_pages(vs, self.tables, self.layer)

    def _cache(self, k, v, lengths):
        if self.tables is None:
            return KVCache(k, v, lengths)
        return PagedKVCache(k, v, self.tables, lengths)


def _tables_of(cache) -> jax.Array | None:
    return cache.tables if isinstance(cache, PagedKVCache) else None


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PrefillAttention(_Attention):
    """Prompts [B, T] from position 0; lengths [B] real tokens (the rest is padding)."""
    lengths: jax.Array = None

    @classmethod
    def start(cls, cache: KVCache, rope, lengths, t: int, scale: float) -> "PrefillAttention":
        """rope: a Rope, or the inverse frequencies alone."""
        b = lengths.shape[0]
        (cos, sin), local = _as_rope(rope).tables(jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
        return cls(k=cache.k, v=cache.v, cos=cos, sin=sin, scale=scale, local=local, tables=_tables_of(cache),
                   lengths=lengths)

    def __call__(self, q, k, v, wo, *, window: int | None = None, softcap: float | None = None,
                 rope: str = "global", sinks=None):
        """q [B, T, Hq, D], k/v [B, T, Hkv, D] before RoPE -> (attention @ wo.T [B, T, hidden], self updated)."""
        cos, sin = self._tables(rope)
        window = self._window(window)
        with jax.named_scope("rope"):
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        b, t = q.shape[:2]
        if self.tables is None:   # one slice update of the contiguous rows
            ks = self.k.at[self.layer, :, :, :t].set(k.swapaxes(1, 2).astype(self.k.dtype))
            vs = self.v.at[self.layer, :, :, :t].set(v.swapaxes(1, 2).astype(self.v.dtype))
        else:
            pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            ks, vs = self._write(k, v, pos, pos < self.lengths[:, None])
        out = prefill_attention(q, k, v, self.lengths, self.scale, window, softcap, sinks)
        with jax.named_scope("o"):
            y = linear(out.reshape(b, t, -1), wo, unsummed=True)
        return y, dataclasses.replace(self, k=ks, v=vs)

    def cache(self):
        return self._cache(self.k, self.v, self.lengths.astype(jnp.int32))


def extend_attention(q, k_cache, v_cache, start, lengths, scale, window=None, softcap=None, sinks=None):
    """A prompt chunk's attention over the cache. q [B, C, Hq, D] at positions start + i; k/v_cache
    [B, Hkv, S, D] already holding the chunk; lengths [B] valid tokens of the chunk. -> [B, C, Hq, D].

    Key j is visible to query i when j <= start + i (and start + i - j < window) and j < start + lengths[b].
    """
    b, c, hq, d = q.shape
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(b, c, hkv, hq // hkv, d).astype(jnp.float32)
    scores = _softcap(jnp.einsum("bchgd,bhsd->bhgcs", qg, k_cache.astype(jnp.float32)) * scale, softcap)
    qpos = start[:, None] + jnp.arange(c)[None, :]                       # [B, C]
    j = jnp.arange(s)
    visible = (j[None, None, :] <= qpos[:, :, None]) & (j[None, None, :] < (start + lengths)[:, None, None])
    if window is not None:
        visible &= j[None, None, :] > qpos[:, :, None] - window
    scores = jnp.where(visible[:, None, None], scores, NEG_INF)
    probs = _softmax(scores, sinks, hkv)
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
    def begin(cls, cache: KVCache, rope, start, lengths, c: int, scale: float) -> "ExtendAttention":
        (cos, sin), local = _as_rope(rope).tables(start[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :])
        return cls(k=cache.k, v=cache.v, cos=cos, sin=sin, scale=scale, local=local, tables=_tables_of(cache),
                   start=start, lengths=lengths)

    def __call__(self, q, k, v, wo, *, window: int | None = None, softcap: float | None = None,
                 rope: str = "global", sinks=None):
        cos, sin = self._tables(rope)
        window = self._window(window)
        with jax.named_scope("rope"):
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        b, c = q.shape[:2]
        pos = self.start[:, None] + jnp.arange(c)[None, :]               # [B, C]
        # padding is not written: in a paged cache its positions may lie in pages the sequence does not own
        ks, vs = self._write(k, v, pos, jnp.arange(c)[None, :] < self.lengths[:, None])
        k_rows, v_rows = self._rows(ks, vs)
        out = extend_attention(q, k_rows, v_rows, self.start, self.lengths, self.scale, window, softcap, sinks)
        with jax.named_scope("o"):
            y = linear(out.reshape(b, c, -1), wo, unsummed=True)
        return y, dataclasses.replace(self, k=ks, v=vs)

    def cache(self):
        return self._cache(self.k, self.v, (self.start + self.lengths).astype(jnp.int32))


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class DecodeAttention(_Attention):
    """One token per sequence at position pos [B] (= the valid positions before it)."""
    pos: jax.Array = None

    @classmethod
    def start(cls, cache: KVCache, rope, scale: float) -> "DecodeAttention":
        (cos, sin), local = _as_rope(rope).tables(cache.lengths)   # [B, R], shared by the layers
        return cls(k=cache.k, v=cache.v, cos=cos, sin=sin, scale=scale, local=local, tables=_tables_of(cache),
                   pos=cache.lengths)

    def __call__(self, q, k, v, wo, *, window: int | None = None, softcap: float | None = None,
                 rope: str = "global", sinks=None):
        """q [B, Hq, D], k/v [B, Hkv, D] before RoPE -> (attention @ wo.T [B, hidden] (maybe a
        SplitSum), self with k/v written at pos)."""
        cos, sin = self._tables(rope)
        window = self._window(window)
        if self.tables is None:
            op, ref, args = "decode_attention", decode_attention_update_ref, (q, k, v, self.k, self.v)
        else:
            op, ref, args = ("paged_decode_attention", paged_decode_attention_update_ref,
                             (q, k, v, self.k, self.v, self.tables))
        args += (self.pos, cos, sin, self.scale, self.layer)
        kernel = route(op, q.shape[0], wo)
        res = (kernel(*args, wo, partial(linear, unsummed=True), window=window, softcap=softcap, sinks=sinks)
               if kernel is not None else None)
        if res is None:
            out, ks, vs = ref(*args, window, softcap, sinks)
            with jax.named_scope("o"):
                res = linear(out.reshape(out.shape[0], -1), wo, unsummed=True), ks, vs
        y, ks, vs = res
        return y, dataclasses.replace(self, k=ks, v=vs)

    def cache(self):
        return self._cache(self.k, self.v, self.pos + 1)
