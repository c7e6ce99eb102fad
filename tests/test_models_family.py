"""A new architecture is one module in models/: a toy llama variant with a GeGLU MLP, registered in
models.FAMILIES from this test, runs through the one layer loop (prefill and decode, jnp reference
and the Pallas routes in interpret mode) and equals an independent numpy forward pass."""
from __future__ import annotations

import types

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from realizar_jax import models
from realizar_jax.cache import init_cache
from realizar_jax.config import ModelConfig
from realizar_jax.kernels import KernelConfig, repack_for_gpu
from realizar_jax.models import llama
from realizar_jax.quant.quantize import quantize_qtensor
from realizar_jax.weights import LayerParams, Params, rope_inv_freq

CONFIG = ModelConfig(architecture="toy_geglu", vocab_size=96, hidden_size=256, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=64, intermediate_size=512, context_length=64)


def _toy_family() -> types.ModuleType:
    """What a models/toy_geglu.py would hold: llama's embed and head, its block with GeGLU."""
    mod = types.ModuleType("toy_geglu")
    mod.embed, mod.head = llama.embed, llama.head
    mod.block = lambda lp, x, attention, config: llama.block(lp, x, attention, config, activation="gelu_tanh")
    return mod


def _weights(seed: int):
    rng = np.random.default_rng(seed)
    c = CONFIG
    m = lambda r, k: (rng.standard_normal((r, k)) / np.sqrt(k)).astype(np.float32)
    v = lambda n: (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)
    layers = [dict(attn_norm=v(c.hidden_size), wq=m(c.q_size, c.hidden_size), wk=m(c.kv_size, c.hidden_size),
                   wv=m(c.kv_size, c.hidden_size), wo=m(c.hidden_size, c.q_size), ffn_norm=v(c.hidden_size),
                   w_gate=m(c.intermediate_size, c.hidden_size), w_up=m(c.intermediate_size, c.hidden_size),
                   w_down=m(c.hidden_size, c.intermediate_size)) for _ in range(c.num_layers)]
    return dict(embed=rng.standard_normal((c.vocab_size, c.hidden_size)).astype(np.float32), layers=layers,
                final_norm=v(c.hidden_size), lm_head=m(c.vocab_size, c.hidden_size))


def _params(w, matrix=jnp.asarray) -> Params:
    mats = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    layers = tuple(LayerParams(**{k: (matrix(a) if k in mats else jnp.asarray(a)) for k, a in lp.items()})
                   for lp in w["layers"])
    return Params(embed=jnp.asarray(w["embed"]), layers=layers, final_norm=jnp.asarray(w["final_norm"]),
                  lm_head=matrix(w["lm_head"]), rope_inv_freq=jnp.asarray(rope_inv_freq(CONFIG)))


def _numpy_logits(w, ids):
    """The toy model in float64 numpy: pre-norm blocks, halves RoPE, causal GQA attention, GeGLU."""
    c = CONFIG
    norm = lambda x, g: g * x / np.sqrt((x * x).mean(-1, keepdims=True) + c.norm_eps)
    t = len(ids)
    inv = 1.0 / c.rope_theta ** (np.arange(0, c.head_dim, 2) / c.head_dim)
    ang = np.arange(t)[:, None] * np.concatenate([inv, inv])[None]
    rope = lambda a: a * np.cos(ang)[:, None] + np.concatenate([-a[..., 32:], a[..., :32]], -1) * np.sin(ang)[:, None]
    gelu = lambda g: 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
    x = w["embed"][ids].astype(np.float64)
    for lp in w["layers"]:
        h = norm(x, lp["attn_norm"])
        q = rope((h @ lp["wq"].T).reshape(t, c.num_heads, c.head_dim))
        k = rope((h @ lp["wk"].T).reshape(t, c.num_kv_heads, c.head_dim))
        vv = (h @ lp["wv"].T).reshape(t, c.num_kv_heads, c.head_dim)
        k, vv = np.repeat(k, 2, axis=1), np.repeat(vv, 2, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(c.head_dim) + np.triu(np.full((t, t), -np.inf), 1)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", p, vv).reshape(t, -1) @ lp["wo"].T
        h = norm(x, lp["ffn_norm"])
        x = x + (gelu(h @ lp["w_gate"].T) * (h @ lp["w_up"].T)) @ lp["w_down"].T
    return norm(x, w["final_norm"]) @ w["lm_head"].T


def _run(params, ids, dtype, kernels):
    """All-position prefill logits, and the last prompt's next-token logits from prefill(t-1) + one decode."""
    cfg = dict(config=CONFIG, dtype=dtype, kernels=kernels)
    tokens = jnp.asarray([ids], jnp.int32)
    full, _ = models.prefill(params, init_cache(CONFIG, 1, 32, dtype), tokens, jnp.asarray([len(ids)]),
                             all_logits=True, **cfg)
    _, cache = models.prefill(params, init_cache(CONFIG, 1, 32, dtype), tokens[:, :-1],
                              jnp.asarray([len(ids) - 1]), **cfg)
    step, _ = models.decode_logits(params, cache, tokens[:, -1], **cfg)
    return np.asarray(full[0], np.float64), np.asarray(step[0], np.float64)


@pytest.fixture
def toy_family(monkeypatch):
    monkeypatch.setitem(models.FAMILIES, "toy_geglu", _toy_family())


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**31), n=st.integers(3, 12))
def test_toy_family_equals_numpy(toy_family, seed, n):
    w = _weights(seed)
    ids = [int(i) for i in np.random.default_rng(seed + 1).integers(0, CONFIG.vocab_size, n)]
    want = _numpy_logits(w, ids)
    full, step = _run(_params(w), ids, jnp.float32, KernelConfig())
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel(full, want) < 1e-4, rel(full, want)
    assert rel(step, want[-1]) < 1e-4, rel(step, want[-1])


def test_toy_family_through_the_kernels(toy_family):
    """Packed Q8_0 weights in the GPU layout and the Pallas routes (interpret mode): the GeGLU MLP has
    no fused kernel, so its route declines and the reference runs; everything else takes the kernels.
    The result matches the dequantized weights' numpy forward within bf16 rounding."""
    w = _weights(7)

    def q8(a):
        q = repack_for_gpu(quantize_qtensor(np.asarray(a), "Q8_0"))
        return q
    params = _params(w, q8)
    from realizar_jax.kernels import dequantize_gpu
    deq = {**w, "layers": [{k: (np.asarray(dequantize_gpu(getattr(lp, k))) if k in ("wq", "wk", "wv", "wo", "w_gate",
                                                                              "w_up", "w_down") else a)
                            for k, a in wl.items()} for lp, wl in zip(params.layers, w["layers"])],
           "lm_head": np.asarray(dequantize_gpu(params.lm_head))}
    ids = [3, 41, 7, 88, 19, 5]
    want = _numpy_logits(deq, ids)
    full, step = _run(params, ids, jnp.bfloat16, KernelConfig(pallas=True, interpret=True))
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel(full, want) < 3e-2, rel(full, want)
    assert rel(step, want[-1]) < 3e-2, rel(step, want[-1])


def test_unknown_family_is_named():
    with pytest.raises(ValueError, match="toy_nope"):
        models.prefill(_params(_weights(0)), init_cache(CONFIG, 1, 8, jnp.float32), jnp.zeros((1, 4), jnp.int32),
                       jnp.asarray([4]), config=CONFIG.replace(architecture="toy_nope"))
