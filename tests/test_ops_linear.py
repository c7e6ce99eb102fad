"""ops.linear / ops.embedding vs numpy references, dense and quantized, eager and under jit; the route table."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gguf import quants as gq
from gguf.constants import GGMLQuantizationType as GT
from hypothesis import given, settings, strategies as st

from realizar_jax.kernels import KernelConfig, repack_for_gpu
from realizar_jax.ops import embedding as embedding_lookup, linear as matmul, using
from realizar_jax.ops import routes
from realizar_jax.quant import QTensor, quantize

IN, OUT = 512, 48
QTYPES = ("Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "MXFP4", "F16", "BF16")
jmatmul = jax.jit(matmul)


def qtensor(w, qtype):
    raw = quantize(w, qtype)
    return QTensor(jnp.asarray(raw), qtype, w.shape), raw


def reference(x, w_values):
    """x @ w.T in float64 numpy."""
    return np.asarray(x, np.float64) @ np.asarray(w_values, np.float64).T


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), lead=st.sampled_from([(1,), (5,), (2, 3)]))
def test_dense_float32(seed, lead):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, IN)).astype(np.float32)
    w = rng.standard_normal((OUT, IN)).astype(np.float32)
    for f in (matmul, jmatmul):
        y = f(jnp.asarray(x), jnp.asarray(w))
        assert y.dtype == jnp.float32 and y.shape == (*lead, OUT)
        np.testing.assert_allclose(np.asarray(y), reference(x, w), rtol=1e-5, atol=1e-4)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_dense_bfloat16_accumulates_in_float32(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, IN)).astype(ml_dtypes.bfloat16)
    w = rng.standard_normal((OUT, IN)).astype(ml_dtypes.bfloat16)
    y = jmatmul(jnp.asarray(x), jnp.asarray(w))
    assert y.dtype == jnp.bfloat16
    ref = reference(x.astype(np.float32), w.astype(np.float32))
    # exact products, float32 sums, one bf16 rounding (2^-9 relative) at the end
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2 ** -8, atol=1e-3)


@pytest.mark.parametrize("qtype", QTYPES)
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_quantized_matches_dequantize_then_float64(qtype, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((OUT, IN)) * 0.05).astype(np.float32)
    x = rng.standard_normal((2, 3, IN)).astype(np.float32)
    q, raw = qtensor(w, qtype)
    w_deq = gq.dequantize(raw, GT[qtype]) if qtype != "F16" else raw.view("<f2").astype(np.float32)
    ref = reference(x, w_deq)
    for f in (matmul, jmatmul):
        y = f(jnp.asarray(x), q)
        assert y.dtype == jnp.float32 and y.shape == (2, 3, OUT)
        np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-4)
    # and it is close to the unquantized product (a sanity check on the quantizer, loose)
    assert np.abs(np.asarray(jmatmul(jnp.asarray(x), q)) - reference(x, w)).max() < 0.25 * np.abs(reference(x, w)).max()


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0"])
def test_quantized_bfloat16_activations(qtype):
    rng = np.random.default_rng(11)
    w = (rng.standard_normal((OUT, IN)) * 0.05).astype(np.float32)
    x = rng.standard_normal((3, IN)).astype(ml_dtypes.bfloat16)
    q, raw = qtensor(w, qtype)
    y = jmatmul(jnp.asarray(x), q)
    assert y.dtype == jnp.bfloat16
    w_bf16 = gq.dequantize(raw, GT[qtype]).astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_allclose(np.asarray(y, np.float64), reference(x.astype(np.float32), w_bf16),
                               rtol=2 ** -8, atol=2e-3)


def test_each_op_asks_the_route_table_once(monkeypatch):
    """linear() on a packed GPU weight takes the ("linear", rows bucket, "gpu") route when the
    KernelConfig asks for kernels, and the reference otherwise; a route that declines (None) falls
    back to the reference, whose result equals the dequantized product."""
    calls = []

    def fake(x, w, *, unsummed=False):
        calls.append((x.shape[0], w.qtype))
        return None   # declines: the op must fall back
    monkeypatch.setitem(routes.ROUTES, ("linear", "gemv", "gpu"), fake)
    w = np.random.default_rng(0).standard_normal((OUT, IN)).astype(np.float32)
    q, _ = qtensor(w, "Q8_0")
    gq_ = repack_for_gpu(q)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, IN)), jnp.float32)
    want = matmul(x, q)   # the QTensor reference
    with using(KernelConfig(pallas=True, interpret=True)):
        got = matmul(x, gq_)
    assert calls == [(2, "Q8_0")]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    with using(KernelConfig(pallas=False)):
        matmul(x, gq_)
    assert calls == [(2, "Q8_0")]   # pallas=False: no route is asked


def test_mxfp4_has_no_gpu_layout_and_takes_the_reference(monkeypatch):
    """MXFP4 has no GPU layout yet: repack_for_gpu keeps the QTensor, no route takes a packed weight, and
    with kernels on, linear() is the dequantize-then-dot reference (every route is made to fail loudly)."""
    w = (np.random.default_rng(2).standard_normal((OUT, IN)) * 0.05).astype(np.float32)
    q, raw = qtensor(w, "MXFP4")
    assert repack_for_gpu(q) is q
    assert all(kind != "packed" or op in ("decode_attention", "paged_decode_attention") for op, _, kind in routes.ROUTES)
    for key in list(routes.ROUTES):
        monkeypatch.setitem(routes.ROUTES, key, lambda *a, _key=key, **k: pytest.fail(f"route {_key} taken"))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((3, IN)), jnp.float32)
    with using(KernelConfig(pallas=True, interpret=True)):
        assert routes.route("linear", 3, q) is None
        y = jax.jit(matmul)(x, q)   # a fresh jit: traced under this KernelConfig
    np.testing.assert_allclose(np.asarray(y), reference(x, gq.dequantize(raw, GT.MXFP4)), rtol=1e-5, atol=1e-4)


def test_matmul_errors():
    w = jnp.ones((OUT, IN), jnp.float32)
    with pytest.raises(ValueError, match=f"takes {IN} input features"):
        matmul(jnp.ones((2, IN + 1)), w)
    with pytest.raises(TypeError, match="floating"):
        matmul(jnp.ones((2, IN), jnp.int32), w)
    q, _ = qtensor(np.ones((OUT, IN), np.float32), "Q8_0")
    with pytest.raises(ValueError, match="Q8_0"):
        matmul(jnp.ones((2, 256)), q)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q8_0", "MXFP4", None])
@settings(max_examples=5, deadline=None)
@given(ids=st.lists(st.integers(0, 99), min_size=10, max_size=10))
def test_embedding_lookup(qtype, ids):
    vocab, dim = 100, 256
    table = (np.random.default_rng(3).standard_normal((vocab, dim)) * 0.1).astype(np.float32)
    ids = np.asarray(ids, np.int32).reshape(2, 5)
    if qtype is None:
        tab, values = jnp.asarray(table), table
    else:
        tab, raw = qtensor(table, qtype)
        values = gq.dequantize(raw, GT[qtype])
    look = jax.jit(embedding_lookup, static_argnames="dtype")
    out = look(tab, ids)
    assert out.shape == (2, 5, dim) and out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), values[ids])
    out16 = look(tab, ids, dtype=jnp.bfloat16)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out16), values[ids].astype(ml_dtypes.bfloat16))
