"""model.py against HF transformers (float32), and its own consistency: prefill + decode == one forward,
batched rows == rows alone, padding never leaks."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from realizar_jax.cache import init_cache
from realizar_jax.models import decode_logits, prefill
from realizar_jax.weights import rope_inv_freq

from model_helpers import config_from_hf, hf_logits, params_from_hf, tiny_hf_model

VARIANTS = {
    "llama-gqa": dict(arch="llama"),
    "llama-mqa-tied": dict(arch="llama", kv_heads=1, tie=True),
    "llama3-scaling": dict(arch="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 32}),
    "mistral": dict(arch="mistral", kv_heads=4),
    "qwen2-bias": dict(arch="qwen2"),
    "qwen3-qknorm-headdim": dict(arch="qwen3", head_dim=32),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
    kw = VARIANTS[request.param]
    model = tiny_hf_model(**kw)
    config = config_from_hf(model, kw["arch"])
    return model, config, params_from_hf(model, config)


T = 32  # every prompt is padded to one length, so each jitted function compiles once per variant


@functools.lru_cache(maxsize=None)
def _jitted(config):
    return (jax.jit(functools.partial(prefill, config=config, all_logits=True)),
            jax.jit(functools.partial(prefill, config=config)),
            jax.jit(functools.partial(decode_logits, config=config)))


def _padded(prompts):
    tokens = np.full((len(prompts), T), 3, np.int32)  # padding is a real token id: it must not leak
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)


def _forward_all(params, config, ids):
    tokens, lengths = _padded([ids])
    logits, _ = _jitted(config)[0](params, init_cache(config, 1, 64, jnp.float32), tokens, lengths)
    return np.asarray(logits[0, :len(ids)])


def test_prefill_logits_equal_hf_float32(variant):
    model, config, params = variant
    ids = list(np.random.default_rng(1).integers(0, config.vocab_size, 23))
    ours = _forward_all(params, config, ids)
    ref = hf_logits(model, ids)
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-4


def test_rope_inv_freq_matches_hf_llama3():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    model = tiny_hf_model(**VARIANTS["llama3-scaling"])
    config = config_from_hf(model, "llama")
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    np.testing.assert_allclose(rope_inv_freq(config), inv.numpy(), rtol=1e-6)


@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_prefill_then_decode_equals_full_forward(variant, data):
    _, config, params = variant
    n = data.draw(st.integers(2, 24), label="prompt length")
    extra = data.draw(st.integers(1, 6), label="decode steps")
    ids = data.draw(st.lists(st.integers(0, config.vocab_size - 1), min_size=n + extra, max_size=n + extra))
    full = _forward_all(params, config, ids)
    _, prefill_last, step = _jitted(config)
    logits, cache = prefill_last(params, init_cache(config, 1, 64, jnp.float32), *_padded([ids[:n]]))
    np.testing.assert_allclose(np.asarray(logits[0]), full[n - 1], rtol=1e-4, atol=1e-4 * np.abs(full).max())
    for j in range(extra - 1):
        logits, cache = step(params, cache, jnp.asarray([ids[n + j]], jnp.int32))
        np.testing.assert_allclose(np.asarray(logits[0]), full[n + j], rtol=1e-4, atol=1e-4 * np.abs(full).max())


def test_batched_ragged_rows_equal_rows_alone(variant):
    _, config, params = variant
    rng = np.random.default_rng(7)
    prompts = [list(rng.integers(0, config.vocab_size, n)) for n in (5, 17, 11)]
    _, prefill_last, step = _jitted(config)
    logits, cache = prefill_last(params, init_cache(config, 3, 64, jnp.float32), *_padded(prompts))
    nxt = jnp.asarray(rng.integers(0, config.vocab_size, 3), jnp.int32)
    step_logits, _ = step(params, cache, nxt)
    for i, p in enumerate(prompts):
        alone = _forward_all(params, config, p + [int(nxt[i])])
        scale = np.abs(alone).max()
        np.testing.assert_allclose(np.asarray(logits[i]), alone[len(p) - 1], atol=1e-4 * scale)
        np.testing.assert_allclose(np.asarray(step_logits[i]), alone[len(p)], atol=1e-4 * scale)
