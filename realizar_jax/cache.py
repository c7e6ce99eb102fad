"""The KV cache: explicit state, passed into the jitted prefill/decode and returned updated.

Two storages behind one contract (ops/attention.py reads and writes both):
- `KVCache`: one stacked array per K and V ([layers, batch, kv_heads, max_seq_len, head_dim]), a
  contiguous row per sequence. Prefill from position 0 and the single-stream tools use it.
- `PagedKVCache`: a pool of pages per K and V ([layers, pages, kv_heads, page_size, head_dim]) and a
  block table per sequence ([batch, max_pages]: the page holding positions j*page_size.. of the
  sequence). Sequences hold only the pages they fill and may share pages (a common prompt prefix);
  the serving engine allocates them on the host (serving/pages.py). Page 0 is the null page: table
  entries no sequence owns point at it, so a gather never leaves the pool; nothing valid lives there.

Both update in place once the caller donates them. `lengths` counts the valid positions of each
sequence; attention never reads past it, so whatever sits beyond (padding, stale tokens) is harmless.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from .config import ModelConfig

NULL_PAGE = 0
DEFAULT_PAGE_SIZE = 16   # positions per page of the serving engine's pool (serve --page-size)


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


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PagedKVCache:
    k: jax.Array       # [L, P, Hkv, page_size, D]
    v: jax.Array       # [L, P, Hkv, page_size, D]
    tables: jax.Array  # int32 [B, max_pages]: page ids, NULL_PAGE where a sequence holds none
    lengths: jax.Array  # int32 [B]

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    @property
    def pages(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.tables.shape[1] * self.page_size

    @property
    def batch(self) -> int:
        return self.tables.shape[0]


def init_cache(config: ModelConfig, batch: int, max_seq_len: int, dtype=jnp.bfloat16) -> KVCache:
    if batch < 1 or max_seq_len < 1:
        raise ValueError(f"batch and max_seq_len must be >= 1, got batch={batch}, max_seq_len={max_seq_len}")
    shape = (config.num_layers, batch, config.num_kv_heads, max_seq_len, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32))


def pages_for(positions: int, page_size: int) -> int:
    """Pages that hold `positions` positions."""
    return -(-positions // page_size)


def page_bytes(config: ModelConfig, page_size: int, dtype) -> int:
    """Device bytes of one page (K and V, every layer)."""
    return 2 * config.num_layers * config.num_kv_heads * page_size * config.head_dim * jnp.dtype(dtype).itemsize


def init_paged_cache(config: ModelConfig, pages: int, page_size: int, batch: int, max_seq_len: int,
                     dtype=jnp.bfloat16) -> PagedKVCache:
    """A pool of `pages` pages (the null page included) and `batch` empty block tables covering
    max_seq_len positions each."""
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    if pages < 2:
        raise ValueError(f"a paged cache needs at least 2 pages (the null page and one more), got {pages}")
    if batch < 1 or max_seq_len < 1:
        raise ValueError(f"batch and max_seq_len must be >= 1, got batch={batch}, max_seq_len={max_seq_len}")
    shape = (config.num_layers, pages, config.num_kv_heads, page_size, config.head_dim)
    tables = jnp.full((batch, pages_for(max_seq_len, page_size)), NULL_PAGE, jnp.int32)
    return PagedKVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), tables, jnp.zeros((batch,), jnp.int32))


def _page_slots(tables, pos, valid, page_size: int, pages: int):
    """(page, offset) of positions pos [B, C] through tables [B, max_pages]; positions not valid or past
    the table get page `pages` (out of range: a write there is dropped)."""
    idx = pos // page_size
    inside = idx < tables.shape[1]
    page = jnp.take_along_axis(tables, jnp.clip(idx, 0, tables.shape[1] - 1), axis=1)
    keep = inside if valid is None else inside & valid
    return jnp.where(keep, page, pages), pos % page_size


def write_pages(pool, tables, layer: int, pos, x, valid=None):
    """pool [L, P, Hkv, ps, D] with layer `layer`'s positions pos [B, C] of each sequence set to
    x [B, C, Hkv, D]; positions where valid [B, C] is False (or past the table) are not written."""
    page, off = _page_slots(tables, pos, valid, pool.shape[3], pool.shape[1])
    # advanced indices (layer, page, off) around a slice: the update is [B, C, Hkv, D]
    return pool.at[layer, page, :, off].set(x.astype(pool.dtype), mode="drop")


def write_pages_all_layers(pool, table, x, length):
    """pool with positions [0, T) of one sequence (table [max_pages]) set to x [L, T, Hkv, D] in every
    layer, positions >= length not written."""
    t = x.shape[1]
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    page, off = _page_slots(table[None], pos, pos < length, pool.shape[3], pool.shape[1])
    # (slice, page, slice, off): the advanced indices broadcast to [T] and lead the update
    return pool.at[:, page[0], :, off[0]].set(x.swapaxes(0, 1).astype(pool.dtype), mode="drop")


def gather_pages(pool, tables, layer: int):
    """Layer `layer` of each sequence's pages as contiguous rows: [B, Hkv, max_pages * ps, D]."""
    x = pool[layer][tables]                      # [B, max_pages, Hkv, ps, D]
    b, n, h, ps, d = x.shape
    return x.transpose(0, 2, 1, 3, 4).reshape(b, h, n * ps, d)


def copy_pages(pool, src, dst):
    """pool with pages dst [K] set to pages src [K] in every layer (copy-on-write of shared pages;
    pairs (NULL_PAGE, NULL_PAGE) pad a fixed-size batch of copies)."""
    return pool.at[:, dst].set(pool[:, src])
