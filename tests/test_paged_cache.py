"""Paged and contiguous KV storage give the same logits and the same tokens (models/ through
ops/attention.py, the CPU reference path): a ragged batch prefilled, extended in chunks and decoded,
its pages scattered over the pool in random order. The prompt's logits are bit-identical; a decode
step's agree to float32 rounding (XLA CPU contracts the RoPE into fused multiply-adds or not
depending on how it fuses the cache write), and the greedy and sampled tokens are identical."""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import realizar_jax as rj
from realizar_jax import models as M
from realizar_jax.cache import PagedKVCache, init_cache, init_paged_cache, pages_for

PS, MAX_SEQ = 8, 64


@pytest.fixture(scope="module")
def model():
    return rj.load(rj.default_model_path(), dtype="float32", max_seq_len=MAX_SEQ)


def _paged(config, batch, seed):
    """A paged cache whose rows hold every page of their table, in a random order of the pool's pages."""
    per = pages_for(MAX_SEQ, PS)
    cache = init_paged_cache(config, 1 + batch * per + 3, PS, batch, MAX_SEQ, jnp.float32)
    ids = np.random.default_rng(seed).permutation(np.arange(1, cache.pages))[:batch * per].reshape(batch, per)
    return PagedKVCache(cache.k, cache.v, jnp.asarray(ids, jnp.int32), cache.lengths)


def test_prefill_extend_decode_equal_through_pages_and_rows(model):
    cfg, params = model.config, model.params
    static = dict(config=cfg, kernels=model.kernels)
    prefill = jax.jit(partial(M.prefill, **static))
    extend = jax.jit(partial(M.extend, **static))
    decode = jax.jit(partial(M.decode_logits, **static))
    rng = np.random.default_rng(0)
    lengths = np.asarray([5, 17, 30])           # ragged: 1, 3 and 4 pages
    tokens = rng.integers(3, cfg.vocab_size, (3, 32)).astype(np.int32)
    first = np.minimum(lengths, 12)             # prefill up to 12 tokens, extend the rest as a chunk
    rest = lengths - first
    chunk = np.zeros((3, 24), np.int32)
    for b in range(3):
        chunk[b, :rest[b]] = tokens[b, first[b]:lengths[b]]
    results = []
    for cache in (init_cache(cfg, 3, MAX_SEQ, jnp.float32), _paged(cfg, 3, 1)):
        logits, cache = prefill(params, cache, jnp.asarray(tokens[:, :16]), jnp.asarray(first))
        ext, cache = extend(params, cache, jnp.asarray(chunk), jnp.asarray(first, jnp.int32), jnp.asarray(rest))
        # rows without a rest keep their prefill logits
        logits = jnp.where(jnp.asarray(rest > 0)[:, None], ext, logits)
        steps, toks, key = [logits], [], jax.random.key(7)
        for i in range(8):   # alternate greedy and sampled (temperature 1) tokens
            key, sub = jax.random.split(key)
            tok = (jnp.argmax(logits, -1) if i % 2 else jax.random.categorical(sub, logits)).astype(jnp.int32)
            toks.append(np.asarray(tok))
            logits, cache = decode(params, cache, tok)
            steps.append(logits)
        assert (np.asarray(cache.lengths) == lengths + 8).all()
        results.append((np.stack([np.asarray(x) for x in steps]), np.stack(toks)))
    (contiguous, c_toks), (paged, p_toks) = results
    np.testing.assert_array_equal(paged[0], contiguous[0])
    np.testing.assert_allclose(paged, contiguous, rtol=0, atol=1e-5 * np.abs(contiguous).max())
    np.testing.assert_array_equal(p_toks, c_toks)


def test_paged_cache_rejects_bad_shapes(model):
    with pytest.raises(ValueError, match="power of two"):
        init_paged_cache(model.config, 8, 12, 1, 64)
    with pytest.raises(ValueError, match="at least 2 pages"):
        init_paged_cache(model.config, 1, 16, 1, 64)
