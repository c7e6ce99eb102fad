"""Pallas kernels (interpret mode on CPU) vs independent references: gguf-py dequantize + numpy.

The same checks run on the GPU (compiled, not interpreted) under `pytest -m gpu`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from realizar_jax.kernels import (GpuQTensor, decode_attention, decode_attention_ref, dequantize_gpu,
                                  gemv, kernel_matmul, repack_blocks)
from realizar_jax.kernels.gemm import gemm
from realizar_jax.kernels.dispatch import prefill_route
from realizar_jax.kernels.gemv import apply_pre, default_tiles, gemv_multi, gemv_swiglu
from realizar_jax.kernels.attention import _plan, attention_tile, decode_attention_update
from realizar_jax.attention import decode_attention_update_ref
from realizar_jax.kernels.layout import dequantize_gpu_part_order
from realizar_jax.kernels.unpack import unpack
from realizar_jax.kernels.qdot import prepare_x_q8
from realizar_jax.kernels.xquant import quantize_x
from realizar_jax.quant.matmul import matmul_many
from realizar_jax.kernels.layout import GPU_QTYPES
from realizar_jax.synth import random_blocks

ON_GPU = jax.default_backend() == "gpu"
SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck))


def _packed(qtype, rows, cols, rng):
    data = random_blocks(qtype, rows, cols, rng)
    w = GpuQTensor(tuple(jnp.asarray(p) for p in repack_blocks(data, qtype, (rows, cols))),
                   qtype, (rows, cols))
    ref = quants.dequantize(data, GGMLQuantizationType[qtype]).reshape(rows, cols)
    return w, ref.astype(np.float64)


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@settings(max_examples=10, **SETTINGS)
@given(qtype=st.sampled_from(GPU_QTYPES), rows=st.sampled_from([16, 32]), nsb=st.integers(1, 3),
       seed=st.integers(0, 2**31))
def test_repack_dequantize_is_exact(qtype, rows, nsb, seed):
    w, ref = _packed(qtype, rows, nsb * 256, np.random.default_rng(seed))
    np.testing.assert_array_equal(np.asarray(dequantize_gpu(w), np.float64), ref)
    file_bytes = random_blocks(qtype, rows, nsb * 256, np.random.default_rng(0)).nbytes
    assert file_bytes <= w.nbytes <= 1.05 * file_bytes   # the 5% device-bytes budget


def test_gpu_layouts_agree_with_the_qtype_registry():
    """Each GPU layout: a registry type with synth scales; split_x's parts and the dequantized parts
    pair up (count, size), unpack's part_shape is their words' shape, and .factored / .int8_group agree
    with the tuples the GEMV reads."""
    from realizar_jax.kernels.layout import GPU_LAYOUTS, dequant_parts, split_x
    from realizar_jax.kernels.qdot import FACTORED_QTYPES, Q8_ACT_QTYPES, x_q8_group
    from realizar_jax.quant import QTYPES
    for qtype in GPU_QTYPES:
        lay, q = GPU_LAYOUTS[qtype], QTYPES[qtype]
        assert q.random_scale is not None and 256 % q.block_size == 0
        w, _ = _packed(qtype, 16, 256, np.random.default_rng(1))
        parts, xs = dequant_parts(qtype, list(w.parts), flat=False), split_x(jnp.zeros((1, 256)), qtype)
        assert len(parts) == len(xs) == lay.part_shape[0], qtype
        for p, x in zip(parts, xs):
            assert p.shape == (16, 1) + lay.part_shape[1:] and x.shape == (1, 1, p.shape[2] * p.shape[3]), qtype
        assert lay.factored == (qtype in FACTORED_QTYPES)
        assert lay.int8_group == (x_q8_group(qtype) if qtype in Q8_ACT_QTYPES else None)


@settings(max_examples=8, **SETTINGS)
@given(qtype=st.sampled_from(GPU_QTYPES), rows=st.sampled_from([16, 32, 48]), nsb=st.integers(1, 4),
       batch=st.integers(1, 8), xprep=st.sampled_from(["fused", "kernel", "xla"]), seed=st.integers(0, 2**31))
def test_gemv_matches_gguf_reference(qtype, rows, nsb, batch, xprep, seed):
    """float32 x takes the float path whatever xprep says (xprep only concerns int8 activations)."""
    rng = np.random.default_rng(seed)
    w, ref = _packed(qtype, rows, nsb * 256, rng)
    x = rng.standard_normal((batch, nsb * 256)).astype(np.float32)
    y = gemv(jnp.asarray(x), w, bn=16, bs=2, target_programs=4, xprep=xprep, interpret=not ON_GPU)
    assert y.shape == (batch, rows) and np.isfinite(np.asarray(y)).all()
    # batch <= 4: float32 FMAs; batch > 4: bf16 tensor-core dot (2^-8 relative rounding of inputs)
    tol = 2e-5 if batch <= 4 else 1.5e-2
    assert _rel(y, x.astype(np.float64) @ ref.T) < tol


def _int8_grid(x, group):
    """numpy: x rounded to int8 per block of `group` values with scale amax/127 (the GEMV's int8 x)."""
    v = x.astype(np.float64).reshape(x.shape[0], -1, group)
    amax = np.abs(v).max(axis=-1, keepdims=True)
    scale = (amax / 127.0).astype(np.float32).astype(np.float64)
    inv = np.where(amax > 0, 127.0 / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.clip(np.round(v.astype(np.float32) * inv), -127, 127)
    return (q * scale).reshape(x.shape)


@settings(max_examples=8, **SETTINGS)
@given(qtype=st.sampled_from(["Q4_K", "Q8_0", "Q6_K"]), rows=st.sampled_from([16, 32]),
       nsb=st.integers(1, 3), batch=st.integers(1, 4), xprep=st.sampled_from(["fused", "kernel", "xla"]),
       seed=st.integers(0, 2**31))
def test_gemv_int8_activations(qtype, rows, nsb, batch, xprep, seed):
    """act="int8" (the dp4a path; x quantized by the xquant kernel (xprep="fused") or by XLA, the
    group sums of the rounded x taken by the GEMV or, xprep="xla", by XLA): exactly the gguf-py weights times x rounded to int8 per scale group (checked against
    that rounding done in numpy), and near the unrounded product; the float path (act="float") on
    the same bf16 x stays exact."""
    rng = np.random.default_rng(seed)
    w, ref = _packed(qtype, rows, nsb * 256, rng)
    x = np.asarray(jnp.asarray(rng.standard_normal((batch, nsb * 256)), jnp.bfloat16).astype(jnp.float32))
    y = gemv(jnp.asarray(x, jnp.bfloat16), w, bn=16, bs=2, target_programs=4, act="int8", xprep=xprep,
             interpret=not ON_GPU)
    assert y.shape == (batch, rows)
    xq = _int8_grid(x, 16 if qtype == "Q6_K" else 32)
    assert _rel(y, xq @ ref.T) < 2e-6
    assert _rel(y, x.astype(np.float64) @ ref.T) < 3e-2   # int8 rounding of x: ~0.5-1% here
    y_float = gemv(jnp.asarray(x, jnp.bfloat16), w, bn=16, bs=2, target_programs=4, act="float",
                   interpret=not ON_GPU)
    assert _rel(y_float, x.astype(np.float64) @ ref.T) < 2e-5


@settings(max_examples=6, **SETTINGS)
@given(qtypes=st.lists(st.sampled_from(["Q4_K", "Q8_0", "Q6_K"]), min_size=1, max_size=3),
       rows=st.lists(st.sampled_from([16, 32, 48]), min_size=3, max_size=3), nsb=st.integers(1, 3),
       batch=st.integers(1, 4), xprep=st.sampled_from(["fused", "kernel", "xla"]),
       act=st.sampled_from(["float", "int8"]), seed=st.integers(0, 2**31))
def test_gemv_multi_matches_separate_products(qtypes, rows, nsb, batch, xprep, act, seed):
    """Several matrices in one launch (Q/K/V, gate/up) give each matrix's own product: float32 x
    exactly, bf16 x with int8 activations exactly on the int8 grid."""
    rng = np.random.default_rng(seed)
    packed = [_packed(q, r, nsb * 256, rng) for q, r in zip(qtypes, rows)]
    x = rng.standard_normal((batch, nsb * 256)).astype(np.float32)
    if act == "int8":   # int8 activations need half-precision x
        x = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
    xin = jnp.asarray(x, jnp.bfloat16 if act == "int8" else jnp.float32)
    outs = gemv_multi(xin, tuple(w for w, _ in packed), xprep=xprep, act=act, interpret=not ON_GPU)
    assert len(outs) == len(packed)
    for y, (w, ref) in zip(outs, packed):
        assert y.shape == (batch, w.shape[0])
        xr = _int8_grid(x, 16 if w.qtype == "Q6_K" else 32) if act == "int8" else x.astype(np.float64)
        assert _rel(y, xr @ ref.T) < (1e-3 if ON_GPU and act == "int8" else 2e-5)   # GPU: see large_shapes
    # results in the activations' dtype come out of the kernel rounded as a cast after it would be
    halves = gemv_multi(xin, tuple(w for w, _ in packed), xprep=xprep, act=act, interpret=not ON_GPU,
                        out_dtype=jnp.bfloat16)
    for h, y in zip(halves, outs):
        assert h.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(h.astype(jnp.float32)),
                                      np.asarray(y.astype(jnp.bfloat16).astype(jnp.float32)))


def test_matmul_many_fused_switch(monkeypatch):
    """REALIZAR_GEMV_FUSE=1 (default) routes decode rows through one launch, =0 through one per matrix;
    the results stay the products."""
    rng = np.random.default_rng(9)
    packed = [_packed("Q4_K", r, 512, rng) for r in (32, 16, 16)]
    x = jnp.asarray(rng.standard_normal((1, 2, 512)), jnp.float32)
    monkeypatch.setenv("REALIZAR_PALLAS_INTERPRET", "1")
    monkeypatch.setenv("REALIZAR_GEMV_FUSE", "0")
    separate = matmul_many(x, [w for w, _ in packed])
    monkeypatch.setenv("REALIZAR_GEMV_FUSE", "1")
    fused = matmul_many(x, [w for w, _ in packed])
    for a, b, (w, ref) in zip(separate, fused, packed):
        assert a.shape == b.shape == (1, 2, w.shape[0])
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
        assert _rel(b.reshape(2, -1), np.asarray(x, np.float64).reshape(2, -1) @ ref.T) < 2e-5


@settings(max_examples=4, **SETTINGS)
@given(rows=st.sampled_from([16, 32]), nsb=st.integers(1, 3), batch=st.integers(1, 3),
       seed=st.integers(0, 2**31))
def test_gemv_dense_bf16(rows, nsb, batch, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, nsb * 256)).astype(np.float32)
    x = rng.standard_normal((batch, nsb * 256)).astype(np.float32)
    y = gemv(jnp.asarray(x), jnp.asarray(w, jnp.bfloat16), bn=16, bs=1, interpret=not ON_GPU)
    wb = np.asarray(jnp.asarray(w, jnp.bfloat16).astype(jnp.float32), np.float64)
    assert _rel(y, x.astype(np.float64) @ wb.T) < 2e-5


@settings(max_examples=4, **SETTINGS)
@given(rows=st.lists(st.sampled_from([4, 8, 20]), min_size=1, max_size=3), nsb=st.integers(1, 3),
       batch=st.integers(1, 4), dtype=st.sampled_from(["bfloat16", "float16"]), seed=st.integers(0, 2**31))
def test_gemv_multi_dense(rows, nsb, batch, dtype, seed):
    """Dense half-precision matrices (an 8B bf16 model's Q/K/V, gate/up) in one launch: each output is
    its matrix's product of the half-precision x, summed in float32, rounded once to x's dtype."""
    rng = np.random.default_rng(seed)
    ws = [jnp.asarray(rng.standard_normal((r, nsb * 256)), dtype) for r in rows]
    x = jnp.asarray(rng.standard_normal((batch, nsb * 256)), dtype)
    outs = gemv_multi(x, tuple(ws), interpret=not ON_GPU, out_dtype=x.dtype)
    xf = np.asarray(x.astype(jnp.float32), np.float64)
    for y, w in zip(outs, ws):
        exact = xf @ np.asarray(w.astype(jnp.float32), np.float64).T
        assert y.shape == (batch, w.shape[0]) and y.dtype == x.dtype
        # one rounding to the half type: within half an ulp (2^-8 relative for bf16, 2^-11 for f16)
        ulp = 2.0 ** (-8 if dtype == "bfloat16" else -11)
        np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), exact, rtol=ulp, atol=1e-3)
    packed, _ = _packed("Q4_K", 16, nsb * 256, rng)
    with pytest.raises(ValueError, match="not fusable"):   # dense and packed do not share a launch
        gemv_multi(x, (ws[0], packed), interpret=not ON_GPU)


@settings(max_examples=3, **SETTINGS)
@given(qtype=st.sampled_from(["Q4_K", "Q8_0", "Q6_K"]), tokens=st.sampled_from([2, 9, 17]),
       seed=st.integers(0, 2**31))
def test_kernel_matmul_routes_and_matches(qtype, tokens, seed):
    """Leading dims kept, x.dtype returned; 2 rows -> GEMV kernel, 9/17 rows -> dequant + bf16 dot."""
    rng = np.random.default_rng(seed)
    w, ref = _packed(qtype, 32, 512, rng)
    x = rng.standard_normal((1, tokens, 512)).astype(np.float32)
    y = jax.jit(kernel_matmul)(jnp.asarray(x, jnp.bfloat16), w)   # traced, as inside the model
    assert y.shape == (1, tokens, 32) and y.dtype == jnp.bfloat16
    xb = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
    assert _rel(y.astype(jnp.float32), xb @ ref.T) < 1.5e-2


@settings(max_examples=4, **SETTINGS)
@given(qtype=st.sampled_from(GPU_QTYPES), tokens=st.sampled_from([9, 20, 33]), nsb=st.integers(1, 2),
       seed=st.integers(0, 2**31))
def test_prefill_gemm_matches_gguf_reference(qtype, tokens, nsb, seed):
    """Pallas prefill GEMM (ragged M padded to the tile, several row tiles) vs gguf-py dequant + numpy."""
    rng = np.random.default_rng(seed)
    w, ref = _packed(qtype, 48, nsb * 256, rng)
    x = jnp.asarray(rng.standard_normal((tokens, nsb * 256)), jnp.bfloat16)
    y = gemm(x, w, tiles=(16, 16, 1, 4, 2), interpret=not ON_GPU)
    assert y.shape == (tokens, 48) and y.dtype == jnp.float32
    # bf16 weights in the dot: error within bf16 rounding of the weights (2**-8 relative)
    assert _rel(y, np.asarray(x.astype(jnp.float32), np.float64) @ ref.T) < 1e-2


@settings(max_examples=6, **SETTINGS)
@given(qtype=st.sampled_from(GPU_QTYPES), rows=st.sampled_from([16, 48]), nsb=st.integers(1, 3),
       seed=st.integers(0, 2**31))
def test_unpack_kernel_is_exact(qtype, rows, nsb, seed):
    """The prefill's Pallas unpack writes exactly the jnp dequantizer's part-order matrix."""
    w, ref = _packed(qtype, rows, nsb * 256, np.random.default_rng(seed))
    got = unpack(w, jnp.float32, tiles=(16, 2, 4), interpret=not ON_GPU)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(dequantize_gpu_part_order(w, jnp.float32)))


def test_gpu_switches_reject_bad_values(monkeypatch):
    monkeypatch.setenv("REALIZAR_GEMV_TILES", '{"Q4_K": [8, 2, 2, 3]}')
    assert default_tiles("Q4_K") == (8, 2, 2, 3) and default_tiles("Q6_K") != (8, 2, 2, 3)
    for bad, what in (("[1, 2", "JSON"), ('{"Q4_K": [8, 2]}', "4 ints >= 1"), ('{"Q4_K": 5}', "JSON")):
        monkeypatch.setenv("REALIZAR_GEMV_TILES", bad)
        with pytest.raises(ValueError, match=what):
            default_tiles("Q4_K")
    for bad in ('{"ATTN": [8, 0, 4, 2]}', '{"ATTN": [64, 0, 0, 2]}', '{"ATTN": [48, 2, 4, 2]}'):
        monkeypatch.setenv("REALIZAR_GEMV_TILES", bad)
        with pytest.raises(ValueError, match="ATTN"):
            attention_tile()
    monkeypatch.setenv("REALIZAR_GEMV_TILES", '{"ATTN": [32, 4, 2, 3]}')
    assert attention_tile() == (32, 4, 2, 3)
    monkeypatch.delenv("REALIZAR_GEMV_TILES")
    monkeypatch.setenv("REALIZAR_PREFILL_GEMM", "cublas")
    with pytest.raises(ValueError, match="REALIZAR_PREFILL_GEMM"):
        prefill_route()
    w, _ = _packed("Q4_K", 16, 256, np.random.default_rng(0))
    x = jnp.ones((1, 256), jnp.bfloat16)
    for name in ("REALIZAR_GEMV_ACT", "REALIZAR_GEMV_XPREP"):
        monkeypatch.setenv(name, "fast")
        with pytest.raises(ValueError, match=name):
            gemv(x, w, interpret=True)
        monkeypatch.delenv(name)
    monkeypatch.setenv("REALIZAR_GEMV_FUSE", "yes")
    with pytest.raises(ValueError, match="REALIZAR_GEMV_FUSE"):
        matmul_many(x, [w, w])


@pytest.mark.parametrize("route", ["unpack", "pallas", "xla"])
def test_prefill_routes_agree(route, monkeypatch):
    """Both prefill routes behind kernel_matmul give the reference product (the env var picks one)."""
    monkeypatch.setenv("REALIZAR_PREFILL_GEMM", route)
    rng = np.random.default_rng(5)
    w, ref = _packed("Q4_K", 32, 512, rng)
    x = jnp.asarray(rng.standard_normal((2, 9, 512)), jnp.bfloat16)
    y = jax.jit(kernel_matmul)(x, w)
    want = np.asarray(x.astype(jnp.float32), np.float64) @ ref.T
    assert y.shape == (2, 9, 32) and _rel(y.astype(jnp.float32), want) < 1.5e-2


def _attn_numpy(q, k, v, lengths, scale):
    B, Hq, D = q.shape
    G = Hq // k.shape[1]
    out = np.zeros((B, Hq, D))
    for b in range(B):
        for h in range(Hq):
            kk, vv = k[b, h // G, :lengths[b]], v[b, h // G, :lengths[b]]
            s = kk @ q[b, h] * scale
            p = np.exp(s - s.max())
            out[b, h] = (p / p.sum()) @ vv
    return out


@settings(max_examples=6, **SETTINGS)
@given(batch=st.integers(1, 3), hkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 4, 8]),
       seq=st.sampled_from([32, 64, 128]), dim=st.sampled_from([16, 64]), splits=st.sampled_from([1, 2, 4]),
       seed=st.integers(0, 2**31))
def test_decode_attention_ragged_gqa(batch, hkv, group, seq, dim, splits, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, hkv * group, dim)).astype(np.float32)
    k = rng.standard_normal((batch, hkv, seq, dim)).astype(np.float32)
    v = rng.standard_normal((batch, hkv, seq, dim)).astype(np.float32)
    lengths = rng.integers(1, seq + 1, batch).astype(np.int32)
    past = np.arange(seq)[None, None, :] >= lengths[:, None, None]
    k[np.broadcast_to(past, k.shape[:3])] = 1e4                      # garbage past the length
    scale = dim ** -0.5
    want = _attn_numpy(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), lengths, scale)
    ref = decode_attention_ref(*map(jnp.asarray, (q, k, v, lengths)), scale)
    np.testing.assert_allclose(np.asarray(ref), want, atol=2e-5)
    got = decode_attention(*map(jnp.asarray, (q, k, v, lengths)), scale, bt=16, splits=splits,
                           interpret=not ON_GPU)
    # on the GPU the two products run on tensor cores (tf32/bf16 inputs)
    np.testing.assert_allclose(np.asarray(got), want, atol=3e-2 if ON_GPU else 2e-5)
    # the model passes the whole layer stack and a layer index (read in place, not sliced out)
    stack_k = jnp.stack([jnp.asarray(rng.standard_normal(k.shape), jnp.float32), jnp.asarray(k)])
    stack_v = jnp.stack([jnp.asarray(rng.standard_normal(v.shape), jnp.float32), jnp.asarray(v)])
    got_l = decode_attention(jnp.asarray(q), stack_k, stack_v, jnp.asarray(lengths), scale, bt=16,
                             splits=splits, layer=1, interpret=not ON_GPU)
    np.testing.assert_allclose(np.asarray(got_l), np.asarray(got), atol=1e-6)


def _rope_numpy(x, pos, inv_freq):
    """x [B, H, D] rotated (HF halves convention) at positions pos [B], float64."""
    ang = pos[:, None].astype(np.float64) * inv_freq[None, :]            # [B, D/2]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = np.split(x.astype(np.float64), 2, axis=-1)
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def _update_case(rng, batch, hkv, group, seq, dim, layers, dtype):
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    q, k, v = f(batch, hkv * group, dim), f(batch, hkv, dim), f(batch, hkv, dim)
    kc, vc = f(layers, batch, hkv, seq, dim), f(layers, batch, hkv, seq, dim)
    pos = jnp.asarray(rng.integers(0, seq, batch), jnp.int32)
    inv_freq = 1.0 / (rng.uniform(100, 1e6) ** (np.arange(0, dim, 2) / dim))
    from realizar_jax.layers import rope_tables
    cos, sin = rope_tables(jnp.asarray(inv_freq, jnp.float32), pos)
    return q, k, v, kc, vc, pos, cos, sin, inv_freq


@settings(max_examples=6, **SETTINGS)
@given(batch=st.integers(1, 3), hkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 3, 4, 8]),
       seq=st.sampled_from([32, 64, 128]), dim=st.sampled_from([32, 64]), splits=st.sampled_from([1, 2, 4]),
       layers=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_decode_attention_update(batch, hkv, group, seq, dim, splits, layers, seed):
    """The fused step (RoPE, cache write at pos, attention over <= pos) against numpy in float64 and
    against the XLA composition; the cache changes at exactly the new rows of the named layer."""
    rng = np.random.default_rng(seed)
    q, k, v, kc, vc, pos, cos, sin, inv_freq = _update_case(rng, batch, hkv, group, seq, dim, layers,
                                                            jnp.float32)
    layer, scale = int(rng.integers(0, layers)), dim ** -0.5
    pos_np = np.asarray(pos)
    qr = _rope_numpy(np.asarray(q), pos_np, inv_freq)
    kr = _rope_numpy(np.asarray(k), pos_np, inv_freq)
    want_k, want_v = np.array(kc, np.float64), np.array(vc, np.float64)
    for b in range(batch):
        want_k[layer, b, :, pos_np[b]] = kr[b]
        want_v[layer, b, :, pos_np[b]] = np.asarray(v)[b]
    want = _attn_numpy(qr, want_k[layer], want_v[layer], pos_np + 1, scale)
    for name, fn in (("xla", decode_attention_update_ref),
                     ("kernel", lambda *a: decode_attention_update(*a, bt=16, splits=splits,
                                                                   interpret=not ON_GPU))):
        out, k2, v2 = fn(q, k, v, kc, vc, pos, cos, sin, scale, layer)
        np.testing.assert_allclose(np.asarray(k2), want_k, atol=1e-5, err_msg=name)   # float32 RoPE
        np.testing.assert_array_equal(np.asarray(v2), want_v, err_msg=name)
        np.testing.assert_allclose(np.asarray(out), want, atol=3e-2 if ON_GPU else 5e-5, err_msg=name)


def test_decode_attention_update_rejects_operands_that_do_not_fit():
    """The kernel writes into the cache stack in place: a wrong layer or shape is an error first."""
    rng = np.random.default_rng(3)
    q, k, v, kc, vc, pos, cos, sin, _ = _update_case(rng, 2, 2, 2, 32, 32, 2, jnp.float32)
    run = lambda **kw: decode_attention_update(*[kw.get(n, a) for n, a in zip(
        ("q", "k", "v", "kc", "vc", "pos", "cos", "sin"), (q, k, v, kc, vc, pos, cos, sin))], 0.1,
        kw.get("layer", 1), interpret=True)
    with pytest.raises(ValueError, match="layer 2 is not in the cache's 2 layers"):
        run(layer=2)
    with pytest.raises(ValueError, match="k has shape"):
        run(k=k[:, :1])
    with pytest.raises(ValueError, match="pos has shape"):
        run(pos=pos[:1])
    with pytest.raises(ValueError, match="query heads do not group"):
        run(q=jnp.concatenate([q, q[:, :1]], axis=1))
    with pytest.raises(ValueError, match="one \\[L, B, Hkv, S, D\\] stack"):
        run(kc=kc[0])


@pytest.mark.gpu
def test_gpu_kernels_large_shapes():
    """Real layer shapes, compiled on the GPU: every packed type and decode attention with bf16 KV."""
    assert ON_GPU
    rng = np.random.default_rng(7)
    for qtype in GPU_QTYPES:
        w, ref = _packed(qtype, 1024, 4096, rng)
        for batch in (1, 4, 8):
            x = rng.standard_normal((batch, 4096)).astype(np.float32)
            xb = jnp.asarray(x, jnp.bfloat16)
            xf = np.asarray(xb.astype(jnp.float32), np.float64)
            want = xf @ ref.T
            y = gemv(xb, w, act="float")   # float32 activations: float32 rounding only
            assert _rel(y, want) < (1e-5 if batch <= 4 else 1e-2), (qtype, batch)
            y = kernel_matmul(xb, w).astype(jnp.float32)   # the model's default route, bf16 result
            int8 = batch <= 4 and qtype in ("Q4_K", "Q8_0", "Q6_K")   # default int8 activations + dp4a
            assert _rel(y, want) < (1.5e-2 if int8 or batch > 4 else 4e-3), (qtype, batch)
            if int8:   # the weights times x rounded to int8 per scale group: XLA's float32 127/amax on
                # the GPU can differ from numpy's by an ulp and round an odd element one step the other
                # way (~1.5e-4 each here); int8 vs float rounding is ~1e-2, so this still tells them apart
                y8 = gemv(xb, w, act="int8")
                assert _rel(y8, _int8_grid(xf, 16 if qtype == "Q6_K" else 32) @ ref.T) < 1e-3, (qtype, batch)
                # XLA quantizes x (REALIZAR_GEMV_XPREP=kernel; the default, fused, quantizes x in a
                # Pallas kernel), the GEMV sums the rounded x itself: the same products
                y8x = np.asarray(gemv(xb, w, act="int8", xprep="kernel"), np.float64)
                assert _rel(y8, y8x) < 1e-3, (qtype, batch)   # a tie may round apart (see below)
                # the RMSNorm / SwiGLU gate fused into that kernel: the XLA ops' product up to bf16
                # rounding flips (the GPU's rsqrt and exp against XLA's)
                norm = jnp.asarray(rng.standard_normal(4096) + 1.0, jnp.float32)
                up = jnp.asarray(rng.standard_normal((batch, 4096)), jnp.bfloat16)
                for pre, other in (("norm", norm), ("swiglu", up)):
                    eps = 1e-5 if pre == "norm" else None
                    want_pre = jax.jit(lambda x, o: gemv(apply_pre(x, pre, o, eps), w, act="int8", xprep="xla"))(xb, other)
                    got = gemv(xb, w, act="int8", pre=pre, other=other, eps=eps)
                    assert _rel(got, np.asarray(want_pre, np.float64)) < 1e-2, (qtype, batch, pre)
        if qtype in ("Q4_K", "Q6_K"):   # the int8s of the Pallas prep vs XLA's: ties may round apart
            group = 16 if qtype == "Q6_K" else 32
            xq = jnp.asarray(rng.standard_normal((4, 14336)) * 5, jnp.bfloat16)
            words, scales = quantize_x(xq, group)
            want_w, want_s = prepare_x_q8(xq, qtype, in_kernel=True)
            a = np.asarray(words).view(np.int8).ravel().astype(int)
            b = np.asarray(want_w).view(np.int8).ravel().astype(int)
            assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3, (qtype, (a != b).mean())
            np.testing.assert_allclose(np.asarray(scales).ravel(), np.asarray(want_s).ravel(), rtol=1e-6)
        if qtype in ("Q4_K", "Q6_K"):   # gate, up and the SwiGLU gate in one launch at 8B's MLP shape,
            # writing the down GEMV's int8s: the unfused launches' up to a tie rounded apart
            gate, _ = _packed(qtype, 14336, 4096, rng)
            up, _ = _packed(qtype, 14336, 4096, rng)
            xs = jnp.asarray(rng.standard_normal((1, 4096)), jnp.bfloat16)
            norm = jnp.asarray(rng.standard_normal(4096) * 0.2 + 1.0, jnp.bfloat16)
            for group in (16, 32):
                words, scales = gemv_swiglu(xs, gate, up, pre="norm", other=norm, eps=1e-5, group=group)
                g, u = gemv_multi(xs, (gate, up), pre="norm", other=norm, eps=1e-5, out_dtype=jnp.bfloat16)
                want_w, want_s = quantize_x(g, group, pre="swiglu", other=u)
                a = np.asarray(words).view(np.int8).ravel().astype(int)
                b = np.asarray(want_w).view(np.int8).ravel().astype(int)
                assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3, (qtype, group, (a != b).mean())
                np.testing.assert_allclose(np.asarray(scales), np.asarray(want_s), rtol=1e-2)
        x = jnp.asarray(rng.standard_normal((200, 4096)), jnp.bfloat16)   # prefill: both routes
        want = np.asarray(x.astype(jnp.float32), np.float64) @ ref.T
        assert _rel(gemm(x, w), want) < 1e-2, (qtype, "pallas gemm")
        assert _rel(kernel_matmul(x, w).astype(jnp.float32), want) < 1.5e-2, (qtype, "prefill route")
    B, Hq, Hkv, S, D = 2, 32, 8, 2048, 128
    q = jnp.asarray(rng.standard_normal((B, Hq, D)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((B, Hkv, S, D)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((B, Hkv, S, D)), jnp.bfloat16)
    lengths = jnp.asarray([1500, 37], jnp.int32)
    want = decode_attention_ref(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                lengths, D ** -0.5)
    got = decode_attention(q, k, v, lengths, D ** -0.5).astype(jnp.float32)
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-2
    # the fused step at 8B shapes in bf16 (and a 3:1 GQA group): RoPE and the cache write exactly as
    # XLA's (up to an FMA's rounding), attention within bf16 rounding
    for group in (4, 3):
        q, k, v, kc, vc, pos, cos, sin, _ = _update_case(rng, 2, 8, group, 2048, 128, 2, jnp.bfloat16)
        pos = jnp.asarray([1500, 37], jnp.int32)
        from realizar_jax.layers import rope_tables
        cos, sin = rope_tables(jnp.asarray(1.0 / 500000 ** (np.arange(0, 128, 2) / 128), jnp.float32), pos)
        want = decode_attention_update_ref(q, k, v, kc, vc, pos, cos, sin, 128 ** -0.5, 1)
        got = decode_attention_update(q, k, v, kc, vc, pos, cos, sin, 128 ** -0.5, 1)
        w32, g32 = (np.asarray(a.astype(jnp.float32)) for a in (want[0], got[0]))
        assert np.linalg.norm(g32 - w32) / np.linalg.norm(w32) < 1e-2, group
        for a, b in zip(want[1:], got[1:]):
            diff = np.abs(np.asarray(a.astype(jnp.float32)) - np.asarray(b.astype(jnp.float32)))
            assert diff.max() <= 1e-2 * np.abs(np.asarray(a.astype(jnp.float32))).max() and (diff > 0).mean() < 1e-4
        # and through the o projection, with the merge inside the attention launch (the default
        # decode route, counters given; a 3:1 group falls back to the prep) or inside the o GEMV's
        # int8 prep; the attention output in bf16 merged in the launch for a dense wo
        from realizar_jax.attention import attention_sync
        from realizar_jax.kernels.attention import decode_attention_merged, decode_attention_output
        wo, _ = _packed("Q4_K", 4096, 8 * group * 128, rng)
        y_want = gemv(want[0].reshape(2, -1), wo, act="int8", xprep="xla")
        splits = _plan(q.shape, kc.shape, 64, None)[3]
        for merge, sync in (("kernel", attention_sync(kc)), ("kernel", None), ("prep", None)):
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("REALIZAR_ATTN_MERGE", merge)
                res = decode_attention_output(q, k, v, kc, vc, pos, cos, sin, 128 ** -0.5, 1, wo, sync=sync)
            assert res is not None
            assert _rel(res[0].astype(jnp.float32), np.asarray(y_want, np.float64)) < 1e-2, (group, merge, sync is None)
            if sync is not None and group == 4:   # counted: every split of layer 1 checked in once
                counts = np.asarray(res[3])
                assert (counts[1] == splits).all() and (counts[0] == 0).all(), counts
        if group == 4:
            out, *_ = decode_attention_merged(q, k, v, kc, vc, pos, cos, sin, 128 ** -0.5, 1, attention_sync(kc))
            assert _rel(out.astype(jnp.float32), w32.astype(np.float64)) < 1e-2
