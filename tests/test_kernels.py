"""Pallas kernels (interpret mode on CPU) vs independent references: gguf-py dequantize + numpy.

Every kernel takes a KernelConfig (`cfg`) as a static argument; CFG runs the Pallas routes,
interpreted off the GPU and compiled on one (`pytest -m "not slow" tests/test_kernels.py` there runs
these checks compiled; `-m gpu` runs the large shapes).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from realizar_jax.kernels import GpuQTensor, KernelConfig, dequantize_gpu, repack_blocks
from realizar_jax.kernels.attention import _plan, attention_tile, decode_attention_update
from realizar_jax.kernels.gemv import TILES, gemv, gemv_multi, gemv_swiglu, tiles_for
from realizar_jax.kernels.layout import GPU_QTYPES, dequantize_gpu_part_order
from realizar_jax.kernels.qdot import prepare_x_q8
from realizar_jax.kernels.qmatmul import TILES as QMM_TILES, matmul_packed
from realizar_jax.kernels.tuning import TILES_ENV, parse_tiles
from realizar_jax.kernels.unpack import unpack
from realizar_jax.kernels.xquant import quantize_x
from realizar_jax.ops import linear, linear_many, routes, summed, using
from realizar_jax.ops.attention import decode_attention_ref, decode_attention_update_ref
from realizar_jax.cli.synth import random_blocks

from numpy_refs import bf16 as _bf16, numpy_norm as _numpy_norm, numpy_swiglu as _numpy_swiglu

ON_GPU = jax.default_backend() == "gpu"
SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck))
CFG = KernelConfig(pallas=True, interpret=not ON_GPU)   # the Pallas routes, int8 activations (the default)
FLOAT = CFG.replace(int8_activations=False)             # float32 activations on every type
BF16 = ml_dtypes.bfloat16


def _packed(qtype, rows, cols, rng):
    data = random_blocks(qtype, rows, cols, rng)
    w = GpuQTensor(tuple(jnp.asarray(p) for p in repack_blocks(data, qtype, (rows, cols))),
                   qtype, (rows, cols))
    ref = quants.dequantize(data, GGMLQuantizationType[qtype]).reshape(rows, cols)
    return w, ref.astype(np.float64)


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def _small_tiles(cfg, bn, bs):
    """cfg with every GEMV type's tile at bn rows and bs superblocks per K step (warps and stages do
    not matter in interpret mode): several row tiles and K splits even on these small matrices."""
    return cfg.replace(tiles=tuple((k, (bn, bs, 4, 3)) for k in GPU_QTYPES + ("DENSE",)))


@functools.partial(jax.jit, static_argnames="cfg")
def _linear(x, w, *, cfg):
    """ops.linear traced under cfg (the models' pattern: the KernelConfig is a static argument)."""
    with using(cfg):
        return linear(x, w)


@settings(max_examples=10, **SETTINGS)
@given(qtype=st.sampled_from(GPU_QTYPES), rows=st.sampled_from([16, 32]), nsb=st.integers(1, 3),
       seed=st.integers(0, 2**31))
def test_repack_dequantize_is_exact(qtype, rows, nsb, seed):
    w, ref = _packed(qtype, rows, nsb * 256, np.random.default_rng(seed))
    np.testing.assert_array_equal(np.asarray(dequantize_gpu(w), np.float64), ref)
    file_bytes = random_blocks(qtype, rows, nsb * 256, np.random.default_rng(0)).nbytes
    assert file_bytes <= w.nbytes <= 1.05 * file_bytes   # the 5% device-bytes budget


@settings(max_examples=10, **SETTINGS)
@given(qtype=st.sampled_from(GPU_QTYPES), rows=st.sampled_from([1, 16, 48]), nsb=st.integers(1, 3),
       seed=st.integers(0, 2**31))
def test_repack_on_device_is_the_host_repack(qtype, rows, nsb, seed):
    """load() repacks on the device (jax.numpy over the uploaded bytes); the numpy repack on the host
    is the same code over numpy: every part bit for bit, same shapes and dtypes."""
    from realizar_jax.kernels.layout import repack_on_device
    data = random_blocks(qtype, rows, nsb * 256, np.random.default_rng(seed))
    host = repack_blocks(data, qtype, (rows, nsb * 256))
    device = repack_on_device(jnp.asarray(data), qtype, (rows, nsb * 256))
    assert len(host) == len(device)
    for h, d in zip(host, device):
        assert h.shape == d.shape and h.dtype == d.dtype
        np.testing.assert_array_equal(np.asarray(d).view(np.uint8), np.asarray(h).view(np.uint8))


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
       batch=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_gemv_matches_gguf_reference(qtype, rows, nsb, batch, seed):
    """float32 x takes the float path whatever the config says about int8 activations."""
    rng = np.random.default_rng(seed)
    w, ref = _packed(qtype, rows, nsb * 256, rng)
    x = rng.standard_normal((batch, nsb * 256)).astype(np.float32)
    y = gemv(jnp.asarray(x), w, cfg=_small_tiles(CFG, 16, 2), target_programs=4)
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
       nsb=st.integers(1, 3), batch=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_gemv_int8_activations(qtype, rows, nsb, batch, seed):
    """int8_activations=True (the dp4a path; x quantized per scale group by the xquant kernel, the
    group sums of the rounded x taken by the GEMV): exactly the gguf-py weights times x rounded to
    int8 per scale group (that rounding done in numpy), and near the unrounded product; the float
    path (int8_activations=False) on the same bf16 x stays exact."""
    rng = np.random.default_rng(seed)
    w, ref = _packed(qtype, rows, nsb * 256, rng)
    x = _bf16(rng.standard_normal((batch, nsb * 256)))
    y = gemv(jnp.asarray(x, jnp.bfloat16), w, cfg=_small_tiles(CFG, 16, 2), target_programs=4)
    assert y.shape == (batch, rows)
    xq = _int8_grid(x, 16 if qtype == "Q6_K" else 32)
    assert _rel(y, xq @ ref.T) < (1e-3 if ON_GPU else 2e-6)   # GPU: see large_shapes
    assert 1e-4 < _rel(y, x.astype(np.float64) @ ref.T) < 3e-2   # int8 rounding of x: ~0.5-1% here
    y_float = gemv(jnp.asarray(x, jnp.bfloat16), w, cfg=_small_tiles(FLOAT, 16, 2), target_programs=4)
    assert _rel(y_float, x.astype(np.float64) @ ref.T) < 2e-5


@settings(max_examples=6, **SETTINGS)
@given(qtypes=st.lists(st.sampled_from(["Q4_K", "Q8_0", "Q6_K"]), min_size=1, max_size=3),
       rows=st.lists(st.sampled_from([16, 32, 48]), min_size=3, max_size=3), nsb=st.integers(1, 3),
       batch=st.integers(1, 4), int8=st.booleans(), seed=st.integers(0, 2**31))
def test_gemv_multi_matches_separate_products(qtypes, rows, nsb, batch, int8, seed):
    """Several matrices in one launch (Q/K/V, gate/up) give each matrix's own product: float32 x
    exactly, bf16 x with int8 activations exactly on the int8 grid."""
    rng = np.random.default_rng(seed)
    packed = [_packed(q, r, nsb * 256, rng) for q, r in zip(qtypes, rows)]
    x = rng.standard_normal((batch, nsb * 256)).astype(np.float32)
    if int8:   # int8 activations need half-precision x
        x = _bf16(x)
    xin = jnp.asarray(x, jnp.bfloat16 if int8 else jnp.float32)
    outs = gemv_multi(xin, tuple(w for w, _ in packed), cfg=CFG)
    assert len(outs) == len(packed)
    for y, (w, ref) in zip(outs, packed):
        assert y.shape == (batch, w.shape[0])
        xr = _int8_grid(x, 16 if w.qtype == "Q6_K" else 32) if int8 else x.astype(np.float64)
        assert _rel(y, xr @ ref.T) < (1e-3 if ON_GPU and int8 else 2e-5)   # GPU: see large_shapes
    # results in the activations' dtype come out of the kernel rounded as a cast after it would be
    halves = gemv_multi(xin, tuple(w for w, _ in packed), cfg=CFG, out_dtype=jnp.bfloat16)
    for h, y in zip(halves, outs):
        assert h.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(h.astype(jnp.float32)),
                                      np.asarray(y.astype(jnp.bfloat16).astype(jnp.float32)))


def test_linear_many_takes_one_launch(monkeypatch):
    """ops.linear_many on decode rows routes packed matrices of the factored kernel through one
    gemv_multi launch, and a set that cannot share a launch (a Q4_0 matrix among them) through one
    GEMV per matrix; either way each result is its matrix's product (gguf-py reference)."""
    calls = []
    real = routes.gemv_multi
    monkeypatch.setattr(routes, "gemv_multi", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.standard_normal((1, 2, 512)), jnp.float32)
    xf = np.asarray(x, np.float64).reshape(2, -1)
    for qtypes, launches in ((("Q4_K", "Q6_K", "Q8_0"), [3]), (("Q4_K", "Q4_0"), [])):
        packed = [_packed(q, r, 512, rng) for q, r in zip(qtypes, (32, 16, 16))]
        calls.clear()
        with using(CFG):
            ys = linear_many(x, [w for w, _ in packed])
        assert calls == launches, (qtypes, calls)
        for y, (w, ref) in zip(ys, packed):
            assert y.shape == (1, 2, w.shape[0]) and y.dtype == jnp.float32
            assert _rel(y.reshape(2, -1), xf @ ref.T) < 2e-5, (qtypes, w.qtype)
    with using(KernelConfig(pallas=False)):   # the reference: no kernel launch
        calls.clear()
        ys = linear_many(x, [w for w, _ in packed])
    assert calls == [] and _rel(ys[0].reshape(2, -1), xf @ packed[0][1].T) < 2e-5


@settings(max_examples=4, **SETTINGS)
@given(rows=st.sampled_from([16, 32]), nsb=st.integers(1, 3), batch=st.integers(1, 3),
       seed=st.integers(0, 2**31))
def test_gemv_dense_bf16(rows, nsb, batch, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, nsb * 256)).astype(np.float32)
    x = rng.standard_normal((batch, nsb * 256)).astype(np.float32)
    y = gemv(jnp.asarray(x), jnp.asarray(w, jnp.bfloat16), cfg=_small_tiles(CFG, 16, 1))
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
    outs = gemv_multi(x, tuple(ws), cfg=CFG, out_dtype=x.dtype)
    xf = np.asarray(x.astype(jnp.float32), np.float64)
    for y, w in zip(outs, ws):
        exact = xf @ np.asarray(w.astype(jnp.float32), np.float64).T
        assert y.shape == (batch, w.shape[0]) and y.dtype == x.dtype
        # one rounding to the half type: within half an ulp (2^-8 relative for bf16, 2^-11 for f16)
        ulp = 2.0 ** (-8 if dtype == "bfloat16" else -11)
        np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), exact, rtol=ulp, atol=1e-3)
    packed, _ = _packed("Q4_K", 16, nsb * 256, rng)
    with pytest.raises(ValueError, match="not fusable"):   # dense and packed do not share a launch
        gemv_multi(x, (ws[0], packed), cfg=CFG)


@settings(max_examples=4, **SETTINGS)
@given(qtype=st.sampled_from(["Q4_K", "Q8_0", "Q6_K"]), tokens=st.sampled_from([2, 6, 17]),
       seed=st.integers(0, 2**31))
def test_linear_routes_and_matches(qtype, tokens, seed):
    """ops.linear on a GPU-layout weight, traced under the KernelConfig as inside the model: leading
    dims kept, x.dtype returned; 2 rows -> the int8 GEMV, 6 and 17 rows -> the packed tensor-core
    matmul. Each runs a Pallas kernel; pallas=False none."""
    rng = np.random.default_rng(seed)
    w, ref = _packed(qtype, 32, 512, rng)
    x = jnp.asarray(rng.standard_normal((1, tokens, 512)), jnp.bfloat16)
    y = _linear(x, w, cfg=CFG)
    assert y.shape == (1, tokens, 32) and y.dtype == jnp.bfloat16
    xb = np.asarray(x.astype(jnp.float32), np.float64)
    assert _rel(y.astype(jnp.float32), xb @ ref.T) < 1.5e-2
    assert "pallas_call" in str(jax.make_jaxpr(functools.partial(_linear, cfg=CFG))(x, w))
    assert "pallas_call" not in str(jax.make_jaxpr(functools.partial(_linear, cfg=KernelConfig()))(x, w))


def test_rows_pick_the_route():
    """Activation rows -> bucket -> kernel on a packed weight: the int8 GEMV up to 4, the packed
    tensor-core matmul up to routes.MM_ROWS, beyond that the prefill's unpack + XLA dot."""
    w, _ = _packed("Q4_K", 32, 256, np.random.default_rng(0))
    for rows, bucket, kernel in ((1, "gemv", "gemv_q4_k"), (6, "gemv8", "qmatmul_q4_k"), (9, "mm", "qmatmul_q4_k"),
                                 (routes.MM_ROWS, "mm", "qmatmul_q4_k"), (routes.MM_ROWS + 1, "gemm", "unpack_q4_k")):
        assert routes.rows_bucket(rows) == bucket
        x = jnp.ones((rows, 256), jnp.bfloat16)
        jaxpr = str(jax.make_jaxpr(functools.partial(_linear, cfg=CFG))(x, w))
        assert kernel in jaxpr, (rows, kernel)


@settings(max_examples=5, **SETTINGS)
@given(qtype=st.sampled_from(GPU_QTYPES), rows=st.sampled_from([32, 64]), nsb=st.integers(1, 3),
       m=st.integers(1, 40), summed=st.booleans(), seed=st.integers(0, 2**31))
def test_qmatmul_matches_reference(qtype, rows, nsb, m, summed, seed):
    """The packed tensor-core matmul on small tiles (several feature and row tiles, K splits): the
    product of x and the weight rounded to bf16 (as the kernel feeds it to the tensor cores), summed
    in float32; against gguf-py's float weights only bf16 rounding apart."""
    rng = np.random.default_rng(seed)
    w, ref = _packed(qtype, rows, nsb * 256, rng)
    x = jnp.asarray(rng.standard_normal((m, nsb * 256)), jnp.bfloat16)
    cfg = CFG.replace(tiles=tuple((f"QMM_{qtype}_{cap}", (16, 16, 1, 4, 1)) for cap in QMM_TILES))
    y = matmul_packed(x, w, cfg=cfg, summed=summed, target_programs=8)
    if not summed:
        assert y.ndim == 3 and y.shape[1:] == (m, rows)
        y = y.sum(axis=0)
    assert y.shape == (m, rows) and y.dtype == jnp.float32
    xf = np.asarray(x.astype(jnp.float32), np.float64)
    wb = np.asarray(dequantize_gpu(w, jnp.bfloat16).astype(jnp.float32), np.float64)
    assert _rel(y, xf @ wb.T) < 1e-5
    assert _rel(y, xf @ ref.T) < 5e-3


@settings(max_examples=10, **SETTINGS)
@given(qtype=st.sampled_from(["Q4_K", "Q5_K", "Q6_K", "Q8_0"]), seed=st.integers(0, 2**31), rows=st.sampled_from([1, 3, 16]),
       nsb=st.integers(1, 3))
def test_qmatmul_fast_dequant_is_the_layout_dequant(qtype, seed, rows, nsb):
    """The kernel's own dequantizers (quant bits selected in place into a float's mantissa) give
    layout.dequant_parts' values bit for bit in interpret mode. On the GPU, Q6_K's are the same
    operations (Q8_0's too); Q4_K's q * s - m is one fma there, rounded once: emulated exactly in float64 (where
    q * s - m is exact), at most one float32 ulp from the reference."""
    from realizar_jax.kernels.layout import dequant_parts
    from realizar_jax.kernels.qdot import q4k_scales
    from realizar_jax.kernels.qmatmul import FAST_DEQUANT
    rng = np.random.default_rng(seed)
    w, _ = _packed(qtype, rows, nsb * 256, rng)
    ref = [np.asarray(a) for a in dequant_parts(qtype, list(w.parts))]
    fast = [np.asarray(a) for a in FAST_DEQUANT[qtype](list(w.parts), True)]
    assert len(fast) == len(ref) and all(f.shape == r.shape and np.array_equal(f, r) for f, r in zip(fast, ref))
    if qtype != "Q4_K":   # (Q5_K's fma is Q4_K's; its exact emulation needs the fifth bits: the kernel test covers it)
        return
    qs, meta, dm = (np.asarray(a) for a in w.parts)
    (se, so), (me, mo) = (tuple(np.asarray(v, np.float64) for v in pair) for pair in q4k_scales(meta, dm))
    for (k, h), r in zip([(k, h) for k in range(4) for h in range(2)], ref):
        q = ((qs.astype(np.uint32) >> (8 * k + 4 * h)) & 15).astype(np.float64)
        s, m = (se, me) if h == 0 else (so, mo)
        once = (q * s[..., None] - m[..., None]).astype(np.float32).reshape(r.shape)
        assert np.all(np.abs(once.astype(np.float64) - r) <= np.spacing(np.abs(r).astype(np.float32)))


def test_qmatmul_rejects_what_it_cannot_take():
    w, _ = _packed("Q4_K", 32, 256, np.random.default_rng(0))
    with pytest.raises(ValueError, match="float32"):
        matmul_packed(jnp.ones((16, 256), jnp.float32), w, cfg=CFG)
    with pytest.raises(ValueError, match="512 columns"):
        matmul_packed(jnp.ones((16, 512), jnp.bfloat16), w, cfg=CFG)


@settings(max_examples=4, **SETTINGS)
@given(qtype=st.sampled_from(GPU_QTYPES), batch=st.integers(1, 2), tokens=st.sampled_from([257, 300]),
       nsb=st.integers(1, 2), seed=st.integers(0, 2**31))
def test_prefill_linear_matches_gguf_reference(qtype, batch, tokens, nsb, seed):
    """The prefill route on packed weights (more than routes.MM_ROWS rows: the Pallas unpack to bf16
    in part order, x permuted to match, XLA's dot accumulated in float32): ragged row counts, several
    row tiles, vs gguf-py + numpy."""
    rng = np.random.default_rng(seed)
    w, ref = _packed(qtype, 48, nsb * 256, rng)
    x = jnp.asarray(rng.standard_normal((batch, tokens, nsb * 256)), jnp.bfloat16)
    y = _linear(x, w, cfg=CFG)
    assert y.shape == (batch, tokens, 48) and y.dtype == jnp.bfloat16
    # bf16 weights in the dot and a bf16 result: error within bf16 rounding (2**-8 relative)
    want = np.asarray(x.astype(jnp.float32), np.float64).reshape(-1, nsb * 256) @ ref.T
    assert _rel(y.astype(jnp.float32).reshape(-1, 48), want) < 1e-2


@settings(max_examples=6, **SETTINGS)
@given(qtype=st.sampled_from(GPU_QTYPES), rows=st.sampled_from([16, 48]), nsb=st.integers(1, 3),
       seed=st.integers(0, 2**31))
def test_unpack_kernel_is_exact(qtype, rows, nsb, seed):
    """The prefill's Pallas unpack writes exactly the jnp dequantizer's part-order matrix."""
    w, ref = _packed(qtype, rows, nsb * 256, np.random.default_rng(seed))
    got = unpack(w, jnp.float32, tiles=(16, 2, 4), interpret=not ON_GPU)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(dequantize_gpu_part_order(w, jnp.float32)))


def test_kernel_config_tiles_and_rejects(monkeypatch):
    """KernelConfig.from_env reads REALIZAR_GEMV_TILES once; tiles_for/attention_tile take a key's
    override or the default and refuse overrides of the wrong shape, and a kernel asked to run with
    one refuses it too."""
    monkeypatch.setenv(TILES_ENV, '{"Q4_K": [8, 2, 2, 3]}')
    cfg = KernelConfig.from_env(pallas=True)
    assert cfg.pallas and cfg.tiles == (("Q4_K", (8, 2, 2, 3)),)
    assert tiles_for(cfg, "Q4_K") == (8, 2, 2, 3) and tiles_for(cfg, "Q6_K") == TILES["Q6_K"]
    assert tiles_for(KernelConfig(), "Q4_K") == TILES["Q4_K"] != (8, 2, 2, 3)
    assert hash(cfg) == hash(KernelConfig.from_env(pallas=True))   # a static jit argument
    assert KernelConfig.from_env(int8_activations=False).int8_activations is False
    for bad in ("[1, 2", '{"Q4_K": 5}', "[8, 2, 2, 3]"):
        monkeypatch.setenv(TILES_ENV, bad)
        with pytest.raises(ValueError, match="JSON"):
            KernelConfig.from_env()
    monkeypatch.delenv(TILES_ENV)
    assert parse_tiles('{"Q6_K": [16, 4, 4, 2], "ATTN": [32, 0, 4, 2]}') == (("ATTN", (32, 0, 4, 2)),
                                                                           ("Q6_K", (16, 4, 4, 2)))
    w, _ = _packed("Q4_K", 16, 256, np.random.default_rng(0))
    x = jnp.ones((1, 256), jnp.bfloat16)
    for tile in ((8, 2), (8, 0, 2, 3)):
        bad = CFG.replace(tiles=(("Q4_K", tile),))
        with pytest.raises(ValueError, match="4 ints >= 1"):
            tiles_for(bad, "Q4_K")
        with pytest.raises(ValueError, match="4 ints >= 1"):
            gemv(x, w, cfg=bad)
    for tile in ((8, 0, 4, 2), (64, 0, 0, 2), (48, 2, 4, 2), (64, 0, 4)):
        with pytest.raises(ValueError, match="ATTN"):
            attention_tile(KernelConfig(tiles=(("ATTN", tile),)))
    assert attention_tile(KernelConfig(tiles=(("ATTN", (32, 4, 2, 3)),))) == (32, 4, 2, 3)


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
       seq=st.sampled_from([32, 64, 128]), dim=st.sampled_from([16, 64]), seed=st.integers(0, 2**31))
def test_decode_attention_ref_ragged_gqa(batch, hkv, group, seq, dim, seed):
    """The jnp decode attention (the CPU path and the kernels' reference): GQA over ragged lengths,
    blind to garbage past each length."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, hkv * group, dim)).astype(np.float32)
    k = rng.standard_normal((batch, hkv, seq, dim)).astype(np.float32)
    v = rng.standard_normal((batch, hkv, seq, dim)).astype(np.float32)
    lengths = rng.integers(1, seq + 1, batch).astype(np.int32)
    past = np.arange(seq)[None, None, :] >= lengths[:, None, None]
    k[np.broadcast_to(past, k.shape[:3])] = 1e4                      # garbage past the length
    v[np.broadcast_to(past, v.shape[:3])] = 1e4
    want = _attn_numpy(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), lengths, dim ** -0.5)
    ref = decode_attention_ref(*map(jnp.asarray, (q, k, v, lengths)), dim ** -0.5)
    np.testing.assert_allclose(np.asarray(ref), want, atol=2e-5)


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


def _attn_tiles(cfg, bt, splits):
    return cfg.replace(tiles=(("ATTN", (bt, splits, 4, 2)),))


@settings(max_examples=6, **SETTINGS)
@given(batch=st.integers(1, 3), hkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 3, 4, 8]),
       seq=st.sampled_from([32, 64, 128]), dim=st.sampled_from([32, 64]), splits=st.sampled_from([1, 2, 4]),
       layers=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_decode_attention_update(batch, hkv, group, seq, dim, splits, layers, seed):
    """The fused step (RoPE, cache write at pos, attention over <= pos) against numpy in float64 and
    against the XLA composition; the cache changes at exactly the new rows of the named layer (read
    in place in the whole stack), garbage past pos is never attended to; where the split is shorter
    than a 16-position block the kernel does not apply and says so (None)."""
    rng = np.random.default_rng(seed)
    q, k, v, kc, vc, pos, cos, sin, inv_freq = _update_case(rng, batch, hkv, group, seq, dim, layers,
                                                            jnp.float32)
    layer, scale = int(rng.integers(0, layers)), dim ** -0.5
    pos_np = np.asarray(pos)
    past = np.arange(seq)[None, None, :] > pos_np[:, None, None]          # [B, 1, S]: after the new row
    kc_np, vc_np = np.array(kc), np.array(vc)
    kc_np[layer][np.broadcast_to(past, kc_np.shape[1:4])] = 1e4
    vc_np[layer][np.broadcast_to(past, vc_np.shape[1:4])] = -1e4
    kc, vc = jnp.asarray(kc_np), jnp.asarray(vc_np)
    qr = _rope_numpy(np.asarray(q), pos_np, inv_freq)
    kr = _rope_numpy(np.asarray(k), pos_np, inv_freq)
    want_k, want_v = kc_np.astype(np.float64), vc_np.astype(np.float64)
    for b in range(batch):
        want_k[layer, b, :, pos_np[b]] = kr[b]
        want_v[layer, b, :, pos_np[b]] = np.asarray(v)[b]
    want = _attn_numpy(qr, want_k[layer], want_v[layer], pos_np + 1, scale)
    cfg = _attn_tiles(CFG, 16, splits)
    applies = seq // splits >= 16
    assert (_plan(q.shape, kc.shape, 16, splits) is not None) == applies
    got = decode_attention_update(q, k, v, kc, vc, pos, cos, sin, scale, layer, cfg=cfg)
    assert (got is not None) == applies
    for name, res in (("xla", decode_attention_update_ref(q, k, v, kc, vc, pos, cos, sin, scale, layer)),
                      ("kernel", got)):
        if res is None:
            continue
        out, k2, v2 = res
        # float32 RoPE against a float64 reference: the angle pos * freq rounds at ~pos * 1e-7 (hypothesis
        # found 1.1e-5 at position 116), so the bound grows with the position
        np.testing.assert_allclose(np.asarray(k2), want_k, atol=2e-7 * seq + 1e-6, err_msg=name)
        np.testing.assert_array_equal(np.asarray(v2), want_v, err_msg=name)
        np.testing.assert_allclose(np.asarray(out), want, atol=3e-2 if ON_GPU else 5e-5, err_msg=name)


def test_decode_attention_update_rejects_operands_that_do_not_fit():
    """The kernel writes into the cache stack in place: a wrong layer or shape is an error first."""
    rng = np.random.default_rng(3)
    q, k, v, kc, vc, pos, cos, sin, _ = _update_case(rng, 2, 2, 2, 32, 32, 2, jnp.float32)
    run = lambda **kw: decode_attention_update(*[kw.get(n, a) for n, a in zip(
        ("q", "k", "v", "kc", "vc", "pos", "cos", "sin"), (q, k, v, kc, vc, pos, cos, sin))], 0.1,
        kw.get("layer", 1), cfg=CFG)
    assert run() is not None
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


def _int8_steps(a, b):
    """The int8s in two (words, ...) as ints, flattened."""
    return [np.asarray(w).view(np.int8).ravel().astype(int) for w in (a, b)]


@pytest.mark.gpu
def test_gpu_kernels_large_shapes():
    """Real layer shapes, compiled on the GPU: every packed type, the activation preps, the prefill
    route and the fused decode attention step with bf16 KV, through the o projection."""
    assert ON_GPU
    from realizar_jax.kernels.qdot import x_q8_group
    from realizar_jax.layers import rope_tables
    rng = np.random.default_rng(7)
    for qtype in GPU_QTYPES:
        w, ref = _packed(qtype, 1024, 4096, rng)
        for batch in (1, 4, 8):
            x = rng.standard_normal((batch, 4096)).astype(np.float32)
            xb = jnp.asarray(x, jnp.bfloat16)
            xf = np.asarray(xb.astype(jnp.float32), np.float64)
            want = xf @ ref.T
            y = gemv(xb, w, cfg=FLOAT)   # float32 activations: float32 rounding only
            assert _rel(y, want) < (1e-5 if batch <= 4 else 1e-2), (qtype, batch)
            y = _linear(xb, w, cfg=CFG).astype(jnp.float32)   # the model's default route, bf16 result
            int8 = batch <= 4 and qtype in ("Q4_K", "Q8_0", "Q6_K")   # default int8 activations + dp4a
            assert _rel(y, want) < (1.5e-2 if int8 or batch > 4 else 4e-3), (qtype, batch)
            if int8:   # the weights times x rounded to int8 per scale group: the GPU's float32 127/amax
                # can differ from numpy's by an ulp and round an odd element one step the other way
                # (~1.5e-4 each here); int8 vs float rounding is ~1e-2, so this still tells them apart
                group = x_q8_group(qtype)
                y8 = gemv(xb, w, cfg=CFG)
                assert _rel(y8, _int8_grid(xf, group) @ ref.T) < 1e-3, (qtype, batch)
                # the RMSNorm fused into the prep: numpy's norm, rounded as the model rounds, then the
                # int8 product, up to bf16 rounding flips (the GPU's rsqrt against numpy's)
                norm = (rng.standard_normal(4096) + 1.0).astype(np.float32)
                got = gemv(xb, w, cfg=CFG, pre="norm", other=jnp.asarray(norm), eps=1e-5)
                want_pre = _int8_grid(_numpy_norm(xf, norm, 1e-5).astype(np.float64), group) @ ref.T
                assert _rel(got, want_pre) < 1e-2, (qtype, batch)
        wb = np.asarray(dequantize_gpu(w, jnp.bfloat16).astype(jnp.float32), np.float64)
        for m in (16, 64, 200):   # the packed tensor-core matmul of a batched decode step, compiled
            xb = jnp.asarray(rng.standard_normal((m, 4096)), jnp.bfloat16)
            xf = np.asarray(xb.astype(jnp.float32), np.float64)
            assert _rel(matmul_packed(xb, w, cfg=CFG), xf @ wb.T) < 1e-5, (qtype, m)
            assert _rel(_linear(xb, w, cfg=CFG).astype(jnp.float32), xf @ ref.T) < 1e-2, (qtype, m)
        if qtype in ("Q4_K", "Q6_K"):   # the int8s of the Pallas prep vs XLA's: ties may round apart
            group = 16 if qtype == "Q6_K" else 32
            xq = jnp.asarray(rng.standard_normal((4, 14336)) * 5, jnp.bfloat16)
            words, scales = quantize_x(xq, group, cfg=CFG)
            want_w, want_s = prepare_x_q8(xq, qtype)
            a, b = _int8_steps(words, want_w)
            assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3, (qtype, (a != b).mean())
            np.testing.assert_allclose(np.asarray(scales).ravel(), np.asarray(want_s).ravel(), rtol=1e-6)
        if qtype in ("Q4_K", "Q6_K"):   # gate, up and the SwiGLU gate in one launch at 8B's MLP shape,
            # writing the down GEMV's int8s: the multi-matrix launch's outputs through numpy's SwiGLU
            # and the int8 prep, up to a tie rounded apart
            gate, _ = _packed(qtype, 14336, 4096, rng)
            up, _ = _packed(qtype, 14336, 4096, rng)
            xs = jnp.asarray(rng.standard_normal((1, 4096)), jnp.bfloat16)
            norm = jnp.asarray(rng.standard_normal(4096) * 0.2 + 1.0, jnp.bfloat16)
            g, u = gemv_multi(xs, (gate, up), cfg=CFG, pre="norm", other=norm, eps=1e-5, out_dtype=jnp.bfloat16)
            act = jnp.asarray(_numpy_swiglu(g.astype(jnp.float32), u.astype(jnp.float32)), jnp.bfloat16)
            for group in (16, 32):
                words, scales = gemv_swiglu(xs, gate, up, cfg=CFG, pre="norm", other=norm, eps=1e-5, group=group)
                want_w, want_s = quantize_x(act, group, cfg=CFG)
                a, b = _int8_steps(words, want_w)
                assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3, (qtype, group, (a != b).mean())
                np.testing.assert_allclose(np.asarray(scales), np.asarray(want_s), rtol=1e-2)
        x = jnp.asarray(rng.standard_normal((200, 4096)), jnp.bfloat16)   # prefill: unpack + XLA's dot
        want = np.asarray(x.astype(jnp.float32), np.float64) @ ref.T
        assert _rel(_linear(x, w, cfg=CFG).astype(jnp.float32), want) < 1.5e-2, (qtype, "prefill route")
    # the fused step at 8B shapes in bf16 (and a 3:1 GQA group): RoPE and the cache write exactly as
    # XLA's (up to an FMA's rounding), attention within bf16 rounding
    for group in (4, 3):
        q, k, v, kc, vc, pos, cos, sin, _ = _update_case(rng, 2, 8, group, 2048, 128, 2, jnp.bfloat16)
        pos = jnp.asarray([1500, 37], jnp.int32)
        cos, sin = rope_tables(jnp.asarray(1.0 / 500000 ** (np.arange(0, 128, 2) / 128), jnp.float32), pos)
        args = (q, k, v, kc, vc, pos, cos, sin, 128 ** -0.5, 1)
        want = decode_attention_update_ref(*args)
        got = decode_attention_update(*args, cfg=CFG)
        assert got is not None
        w32, g32 = (np.asarray(a.astype(jnp.float32)) for a in (want[0], got[0]))
        assert np.linalg.norm(g32 - w32) / np.linalg.norm(w32) < 1e-2, group
        for a, b in zip(want[1:], got[1:]):
            diff = np.abs(np.asarray(a.astype(jnp.float32)) - np.asarray(b.astype(jnp.float32)))
            assert diff.max() <= 1e-2 * np.abs(np.asarray(a.astype(jnp.float32))).max() and (diff > 0).mean() < 1e-4
        # and through the o projection (the decode route): a Q4_K wo takes the merge inside its int8
        # prep, a dense bf16 wo the XLA merge and the dense GEMV; against the XLA step's output
        # projected by numpy (gguf-py weights), within the int8 (or bf16) rounding of the activations
        wo, wo_ref = _packed("Q4_K", 4096, 8 * group * 128, rng)
        wo_dense = jnp.asarray(wo_ref, jnp.bfloat16)
        attn = w32.reshape(2, -1).astype(np.float64)
        for wmat, wref in ((wo, wo_ref), (wo_dense, np.asarray(wo_dense.astype(jnp.float32), np.float64))):
            with using(CFG):
                res = routes.decode_attention_kernel(*args, wmat, functools.partial(linear, unsummed=True))
            assert res is not None
            y = summed(res[0])
            assert y.shape == (2, 4096) and y.dtype == jnp.bfloat16
            assert _rel(y.astype(jnp.float32), attn @ wref.T) < 1.5e-2, (group, type(wmat).__name__)
            for a, b in zip(got[1:], res[1:]):   # the same kernel wrote the caches
                np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
