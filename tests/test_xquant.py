"""kernels/xquant.py: the one-launch int8 activation prep (RMSNorm / SwiGLU gate fused), in interpret
mode on CPU, against numpy and against the unfused XLA path; and the model-facing entries
normed_matmul_many / swiglu_matmul that route to it."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from realizar_jax.kernels import GpuQTensor, repack_blocks
from realizar_jax.kernels.gemv import apply_pre, gemv, gemv_multi
from realizar_jax.kernels.qdot import prepare_x_q8, x_q8_natural
from realizar_jax.kernels.xquant import fusable_prep, quantize_x
from realizar_jax.layers import rms_norm, swiglu
from realizar_jax.quant.matmul import matmul, normed_matmul_many, swiglu_matmul
from realizar_jax.quant.qtensor import QTensor
from realizar_jax.cli.synth import random_blocks

SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck))
BF16 = ml_dtypes.bfloat16


def _bf16(a):
    return np.asarray(a, np.float32).astype(BF16).astype(np.float32)


def _numpy_pre(x, pre, other, eps):
    """pre(x) in numpy, rounding to bf16 where the model does (layers.py)."""
    if pre == "norm":
        r = 1.0 / np.sqrt((x.astype(np.float64) ** 2).mean(axis=-1, keepdims=True) + eps)
        return _bf16(_bf16(other) * _bf16(x * r))
    if pre == "swiglu":
        silu = _bf16(x / (1.0 + np.exp(-x.astype(np.float64))))
        return _bf16(silu * other)
    return x


def _unpack(words, scales):
    """words [B, groups, group/4] int32, scales [B, groups] -> int8 q [B, groups, group], scales."""
    q = np.asarray(words).view(np.int8).reshape(words.shape[0], words.shape[1], -1)
    return q.astype(np.int64), np.asarray(scales, np.float64)


@settings(max_examples=8, **SETTINGS)
@given(group=st.sampled_from([16, 32]), batch=st.integers(1, 4), nsb=st.sampled_from([1, 2, 3, 4, 8]),
       pre=st.sampled_from([None, "norm", "swiglu"]), scale=st.sampled_from([1e-2, 1.0, 30.0]),
       seed=st.integers(0, 2**31))
def test_quantize_x_is_the_int8_rounding_of_pre_x(group, batch, nsb, pre, scale, seed):
    """Per group: |q| <= 127, the largest |q| is 127, and q * scale is pre(x) to within half a step
    (numpy pre-op, float64 except where the model rounds to bf16); the unfused XLA path's int8s
    (layers.py + qdot.prepare_x_q8): bit-identical, or for the norm up to rare one-step flips."""
    cols = nsb * 256
    if not fusable_prep(cols, group, pre):
        with pytest.raises(ValueError, match="do not tile"):
            quantize_x(jnp.zeros((batch, cols), jnp.bfloat16), group, pre=pre,
                       other=None if pre is None else jnp.ones((cols,)), eps=1e-5)
        return
    rng = np.random.default_rng(seed)
    x = _bf16(rng.standard_normal((batch, cols)) * scale)
    other = {"norm": rng.standard_normal(cols).astype(np.float32) + 1.0,
             "swiglu": _bf16(rng.standard_normal((batch, cols))), None: None}[pre]
    eps = 1e-5 if pre == "norm" else None
    words, scales = quantize_x(jnp.asarray(x, jnp.bfloat16), group, pre=pre,
                               other=None if other is None else jnp.asarray(other, jnp.bfloat16 if pre == "swiglu" else jnp.float32),
                               eps=eps, interpret=True)
    assert words.shape == (batch, cols // group, group // 4) and words.dtype == jnp.int32
    q, s = _unpack(words, scales)
    v = _numpy_pre(x, pre, other, eps).reshape(batch, cols // group, group)
    assert np.abs(q).max() <= 127 and (np.abs(q).max(axis=-1) == 127).all()
    step = s[..., None]
    # half a step, plus the ulps by which float32 rsqrt/exp may move v against numpy's float64
    assert (np.abs(q * step - v) <= 0.5 * step + 2e-2 * np.abs(v) + 1e-30).all()
    assert np.abs(q * step - v).mean() < 0.3 * step.mean()
    np.testing.assert_allclose(s, np.abs(v).max(axis=-1) / 127, rtol=1e-2)
    # the XLA path's int8s for the same pre-op, in the same layout
    qtype = "Q6_K" if group == 16 else "Q4_K"
    want = prepare_x_q8(apply_pre(jnp.asarray(x, jnp.bfloat16), pre,
                                  None if other is None else jnp.asarray(other, jnp.bfloat16 if pre == "swiglu" else jnp.float32),
                                  eps), qtype, in_kernel=True)
    got = x_q8_natural(words, scales, qtype)
    if pre != "norm":
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
        return
    # the norm's sum of squares adds in another order than XLA's mean: an ulp of the scale factor
    # can flip a bf16 rounding of the normed x, so a rare int8 moves by one step
    a = np.asarray(got[0]).view(np.int8).astype(int).ravel()
    b = np.asarray(want[0]).view(np.int8).astype(int).ravel()
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.02
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=8e-3)


@settings(max_examples=6, **SETTINGS)
@given(groups=st.sampled_from([(32,), (16,), (32, 16), (16, 32)]), batch=st.integers(1, 3),
       nsb=st.sampled_from([1, 2, 4, 8]), splits=st.sampled_from([0, 1, 2, 3]), plain=st.booleans(),
       scale=st.sampled_from([1e-2, 1.0, 30.0]), seed=st.integers(0, 2**31))
def test_norm_quantize_x_adds_the_residual_then_quantizes_each_group(groups, batch, nsb, splits, plain, scale,
                                                                     seed):
    """The residual add in the norm prep: the new stream is x plus the splits' float32 sum rounded to
    bf16, exactly as x + matmul(...) rounds it (numpy, adding the splits in order); every group size's
    int8s are quantize_x's of rms_norm(new x) (one-step flips from the sum of squares' order at most)."""
    from realizar_jax.kernels.xquant import norm_quantize_x
    rng = np.random.default_rng(seed)
    cols = nsb * 256
    x = _bf16(rng.standard_normal((batch, cols)) * scale)
    w = (rng.standard_normal(cols) * 0.2 + 1.0).astype(np.float32)
    if splits == 0:
        residual, new = None, x
    elif plain:   # a delta that is already an array in the model's dtype (one "split")
        residual = _bf16(rng.standard_normal((1, batch, cols)) * scale)
        new = _bf16(x + residual[0])
    else:
        residual = (rng.standard_normal((splits, batch, cols)) * scale).astype(np.float32)
        total = residual[0].copy()
        for p in residual[1:]:
            total = total + p
        new = _bf16(x + _bf16(total))
    res_arg = None if residual is None else jnp.asarray(residual, jnp.bfloat16 if plain else jnp.float32)
    preps, x_new = norm_quantize_x(jnp.asarray(x, jnp.bfloat16), groups, jnp.asarray(w), 1e-5,
                                   residual=res_arg, interpret=True)
    assert x_new.dtype == jnp.bfloat16 and x_new.shape == (batch, cols)
    np.testing.assert_array_equal(np.asarray(x_new, np.float32), new)
    assert len(preps) == len(groups)
    for g, (words, scales) in zip(groups, preps):
        assert words.shape == (batch, cols // g, g // 4) and scales.shape == (batch, cols // g)
        want_w, want_s = quantize_x(jnp.asarray(new, jnp.bfloat16), g, pre="norm", other=jnp.asarray(w), eps=1e-5,
                                    interpret=True)
        a = np.asarray(words).view(np.int8).astype(int).ravel()
        b = np.asarray(want_w).view(np.int8).astype(int).ravel()
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.02
        np.testing.assert_allclose(np.asarray(scales), np.asarray(want_s), rtol=8e-3)
        # and against numpy: q * scale is the normed new x within half a step
        q, s = _unpack(words, scales)
        v = _numpy_pre(new, "norm", w, 1e-5).reshape(batch, cols // g, g)
        assert (np.abs(q * s[..., None] - v) <= 0.5 * s[..., None] + 2e-2 * np.abs(v) + 1e-30).all()


def test_norm_quantize_x_rejects_bad_operands():
    from realizar_jax.kernels.xquant import norm_quantize_x
    x, w = jnp.ones((2, 512), jnp.bfloat16), jnp.ones((512,), jnp.float32)
    with pytest.raises(ValueError, match="residual"):
        norm_quantize_x(x, (32,), w, 1e-5, residual=jnp.ones((2, 1, 512)), interpret=True)
    with pytest.raises(ValueError, match="norm weight"):
        norm_quantize_x(x, (32,), w[:256], 1e-5, interpret=True)
    with pytest.raises(ValueError, match="do not tile"):
        norm_quantize_x(jnp.ones((1, 96 * 32), jnp.bfloat16), (32,), jnp.ones((96 * 32,)), 1e-5, interpret=True)


def test_quantize_x_tiles_do_not_change_the_result(monkeypatch):
    """Splitting a row over more programs (REALIZAR_GEMV_TILES "XQUANT", each program re-reading the
    row for the norm) or using other warp counts gives the same words and scales."""
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((2, 1024)) * 4, jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal(1024), jnp.float32)
    runs = []
    for tile in (None, "[4, 2]", "[1, 8]"):
        if tile:
            monkeypatch.setenv("REALIZAR_GEMV_TILES", '{"XQUANT": %s}' % tile)
        jax.clear_caches()
        runs.append([quantize_x(x, 32, pre=pre, other=o, eps=1e-5 if pre else None, interpret=True)
                     for pre, o in ((None, None), ("norm", w), ("swiglu", x))])
    for run in runs[1:]:
        for got, want in zip(run, runs[0]):
            np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
            np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    monkeypatch.setenv("REALIZAR_GEMV_TILES", '{"XQUANT": [4, 2, 1]}')
    with pytest.raises(ValueError, match="XQUANT"):
        quantize_x(x, 32, interpret=True)


def test_quantize_x_rejects_bad_arguments():
    x = jnp.ones((1, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="pre='gelu'"):
        quantize_x(x, 32, pre="gelu", other=x, interpret=True)
    with pytest.raises(ValueError, match="pre='norm' with no operand"):
        quantize_x(x, 32, pre="norm", interpret=True)
    with pytest.raises(ValueError, match="do not tile"):
        quantize_x(jnp.ones((1, 100), jnp.bfloat16), 32, interpret=True)
    with pytest.raises(ValueError, match="pre must be"):
        apply_pre(x, "gelu", None, None)


def _packed(qtype, rows, cols, rng):
    return _packed_from(random_blocks(qtype, rows, cols, rng), qtype, rows, cols)


def _packed_from(data, qtype, rows, cols):
    return GpuQTensor(tuple(jnp.asarray(p) for p in repack_blocks(data, qtype, (rows, cols))), qtype, (rows, cols))


def _int8_rows(x, group):
    """numpy: x rounded to int8 per block of `group` values with scale amax/127 (the GEMV's int8 x)."""
    v = x.astype(np.float32).reshape(x.shape[0], -1, group)
    amax = np.abs(v).max(axis=-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    return (np.clip(np.round(v * inv), -127, 127) * (amax / np.float32(127))).astype(np.float64).reshape(x.shape)


@settings(max_examples=3, **SETTINGS)
@given(qtypes=st.lists(st.sampled_from(["Q4_K", "Q8_0", "Q6_K"]), min_size=1, max_size=2),
       nsb=st.sampled_from([1, 2, 3]), batch=st.integers(1, 4), pre=st.sampled_from(["norm", "swiglu"]),
       seed=st.integers(0, 2**31))
def test_gemv_pre_op_equals_the_op_then_the_product(qtypes, nsb, batch, pre, seed):
    """gemv / gemv_multi with a pre-op give the product of the pre-op's output, for every xprep (the
    fused prep and, for 3 superblocks, where the norm cannot be fused, its fallback). The reference
    runs the pre-op in a jit of its own: XLA may keep excess precision where the op rounds to bf16
    (xla_allow_excess_precision), in different places in the two programs, which moves the product by
    bf16 rounding (~4e-3 here); a wrong norm weight, eps or gate would move it by ~1."""
    rng = np.random.default_rng(seed)
    cols = nsb * 256
    ws = tuple(_packed(q, 16, cols, rng) for q in qtypes)
    x = jnp.asarray(rng.standard_normal((batch, cols)), jnp.bfloat16)
    other = (jnp.asarray(rng.standard_normal(cols) + 1.0, jnp.float32) if pre == "norm"
             else jnp.asarray(rng.standard_normal((batch, cols)), jnp.bfloat16))
    eps = 1e-5 if pre == "norm" else None

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    for xprep in ("fused", "kernel", "xla"):
        kw = dict(act="int8", xprep=xprep, interpret=True)
        for w in ws:
            want = jax.jit(lambda x, o, w=w: gemv(apply_pre(x, pre, o, eps), w, **kw))(x, other)
            assert rel(gemv(x, w, pre=pre, other=other, eps=eps, **kw), want) < 1.5e-2, (xprep, w.qtype)
        many = gemv_multi(x, ws, pre=pre, other=other, eps=eps, **kw)
        for w, y in zip(ws, many):
            assert rel(y, gemv(x, w, pre=pre, other=other, eps=eps, **kw)) < 1e-6, (xprep, w.qtype)
    # float activations: the pre-op runs in XLA, then the exact float path
    want = jax.jit(lambda x, o: gemv(apply_pre(x, pre, o, eps), ws[0], act="float", interpret=True))(x, other)
    assert rel(gemv(x, ws[0], act="float", pre=pre, other=other, eps=eps, interpret=True), want) < 1.5e-2


def test_model_entries_match_the_unfused_ops():
    """normed_matmul_many / swiglu_matmul equal rms_norm / swiglu followed by matmul, on dense and
    on packed CPU weights (where nothing is fused) and on GPU-layout weights (the fused decode path)."""
    rng = np.random.default_rng(3)
    cols = 512
    x = jnp.asarray(rng.standard_normal((2, cols)), jnp.bfloat16)
    up = jnp.asarray(rng.standard_normal((2, cols)), jnp.bfloat16)
    norm = jnp.asarray(rng.standard_normal(cols) + 1.0, jnp.float32)
    data = random_blocks("Q4_K", 32, cols, rng)
    packed_cpu = QTensor(jnp.asarray(data), "Q4_K", (32, cols))
    dense = jnp.asarray(rng.standard_normal((32, cols)), jnp.bfloat16)
    gpu_layout = _packed("Q6_K", 32, cols, rng)
    for w in (dense, packed_cpu, gpu_layout):
        [y] = normed_matmul_many(x, norm, 1e-5, (w,))
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(matmul(rms_norm(x, norm, 1e-5), w), np.float32),
                                   rtol=1e-2, atol=1e-2)
        y = swiglu_matmul(x, up, w)
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(matmul(swiglu(x, up), w), np.float32),
                                   rtol=1e-2, atol=1e-2)
    # wrong operands are errors that name them, on every route
    for w in (dense, gpu_layout):
        with pytest.raises(ValueError, match="norm weight has shape"):
            normed_matmul_many(x, norm[:256], 1e-5, (w,))
        with pytest.raises(ValueError, match="gate .* and up"):
            swiglu_matmul(x, up[:, :256], w)


def _partials(rng, batch, splits, hkv, gp, group_heads, dim):
    """Random split-K attention partials as kernels/attention.py lays them out; splits of a sequence
    past its length hold m = -1e30, l = 0 (no positions), which the merge must weigh by 0."""
    o = rng.standard_normal((batch, splits, hkv, gp, dim)).astype(np.float32)
    m = (rng.standard_normal((batch, splits, hkv, gp)) * 4).astype(np.float32)
    l = rng.uniform(0.5, 5.0, (batch, splits, hkv, gp)).astype(np.float32)
    empty = rng.random((batch, splits)) < 0.3
    empty[:, 0] = False
    m[empty], l[empty], o[empty] = -1e30, 0.0, 0.0
    return jnp.asarray(o), jnp.asarray(m), jnp.asarray(l)


@settings(max_examples=6, **SETTINGS)
@given(batch=st.integers(1, 3), splits=st.sampled_from([1, 2, 8]), hkv=st.sampled_from([1, 2]),
       group_heads=st.sampled_from([1, 3, 4]), dim=st.sampled_from([64, 128]), group=st.sampled_from([16, 32]),
       seed=st.integers(0, 2**31))
def test_merge_quantize_x_is_quantize_x_of_the_merged_attention(batch, splits, hkv, group_heads, dim, group,
                                                                seed):
    """The split merge fused into the o projection's activation prep: the same int8s and scales as
    XLA's merge (attention._merge) followed by quantize_x, up to one step where the merged value's
    float32 summation order flips a bf16 rounding; and the merge itself against numpy."""
    from realizar_jax.kernels.attention import _merge
    from realizar_jax.kernels.xquant import merge_quantize_x
    rng = np.random.default_rng(seed)
    gp = max(16, 1 << (group_heads - 1).bit_length())
    o, m, l = _partials(rng, batch, splits, hkv, gp, group_heads, dim)
    merged = _merge(o, m, l, group_heads, jnp.bfloat16).reshape(batch, -1)
    on, mn, ln = (np.asarray(a, np.float64)[..., :group_heads, :] if a.ndim == 5 else
                  np.asarray(a, np.float64)[..., :group_heads] for a in (o, m, l))
    w = np.exp(mn - mn.max(axis=1, keepdims=True))
    want = (on * w[..., None]).sum(1) / (ln * w).sum(1)[..., None]
    np.testing.assert_allclose(np.asarray(merged, np.float32), want.reshape(batch, -1), rtol=1e-2, atol=1e-2)
    w1, s1 = quantize_x(merged, group, interpret=True)
    w2, s2 = merge_quantize_x(o, m, l, group, heads_per_kv=group_heads, dtype=jnp.bfloat16, interpret=True)
    a, b = (np.asarray(x).view(np.int8).astype(int) for x in (w1, w2))
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01
    np.testing.assert_allclose(np.asarray(s2), np.asarray(s1), rtol=1e-2)


def test_merge_quantize_x_rejects_bad_partials():
    from realizar_jax.kernels.xquant import merge_quantize_x
    o, m, l = _partials(np.random.default_rng(0), 1, 2, 2, 16, 4, 64)
    with pytest.raises(ValueError, match="do not match"):
        merge_quantize_x(o, m[..., :8], l, 32, heads_per_kv=4, dtype=jnp.bfloat16, interpret=True)
    with pytest.raises(ValueError, match="groups of 48"):
        merge_quantize_x(o, m, l, 48, heads_per_kv=4, dtype=jnp.bfloat16, interpret=True)


@settings(max_examples=4, **SETTINGS)
@given(qtype=st.sampled_from(["Q4_K", "Q6_K", "Q8_0"]), batch=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_attention_output_with_the_merge_in_the_prep(qtype, batch, seed):
    """kernels.attention.decode_attention_output (fused RoPE/cache write, merge inside the o
    projection's prep, gemv_prepared) against the XLA step then the int8 GEMV of its output."""
    from realizar_jax.attention import decode_attention_update_ref
    from realizar_jax.kernels.attention import decode_attention_output
    from realizar_jax.kernels.gemv import gemv_prepared
    from realizar_jax.layers import rope_tables
    rng = np.random.default_rng(seed)
    hkv, G, S, D, L = 2, 4, 64, 64, 2
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    q, k, v = f(batch, hkv * G, D), f(batch, hkv, D), f(batch, hkv, D)
    kc, vc = f(L, batch, hkv, S, D), f(L, batch, hkv, S, D)
    pos = jnp.asarray(rng.integers(0, S, batch), jnp.int32)
    cos, sin = rope_tables(jnp.asarray(1.0 / 10000 ** (np.arange(0, D, 2) / D), jnp.float32), pos)
    data = random_blocks(qtype, 256, hkv * G * D, rng)
    wo = GpuQTensor(tuple(jnp.asarray(p) for p in repack_blocks(data, qtype, (256, hkv * G * D))), qtype,
                    (256, hkv * G * D))
    attn, k_want, v_want = decode_attention_update_ref(q, k, v, kc, vc, pos, cos, sin, D ** -0.5, 1)
    want = gemv(attn.reshape(batch, -1), wo, act="int8", xprep="xla", interpret=True)
    from realizar_jax.attention import attention_sync
    outs = {}
    for merge, sync in (("prep", None), ("kernel", attention_sync(kc))):   # no counters: the prep merges
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("REALIZAR_ATTN_MERGE", "kernel")
            res = decode_attention_output(q, k, v, kc, vc, pos, cos, sin, D ** -0.5, 1, wo, sync=sync,
                                          interpret=True)
        assert res is not None
        got, k_got, v_got, sync_out = res
        outs[merge] = got
        assert got.dtype == jnp.bfloat16 and got.shape == (batch, 256)
        np.testing.assert_array_equal(np.asarray(v_got), np.asarray(v_want))
        np.testing.assert_allclose(np.asarray(k_got, np.float32), np.asarray(k_want, np.float32), atol=1e-2)
        rel = np.linalg.norm(np.asarray(got, np.float64) - np.asarray(want, np.float64)) / np.linalg.norm(np.asarray(want))
        # the kernel's attention (RoPE by FMA in registers) and XLA's differ by bf16 roundings, and each
        # is then rounded to int8 on its own (~0.9% each here): up to ~1.3% apart (seed 2097153: 1.13%)
        assert rel < 2e-2, rel
        if sync is not None:   # every split of layer 1 checked in
            assert (np.asarray(sync_out)[1] == np.asarray(sync_out)[1].flat[0]).all() and np.asarray(sync_out)[1].min() >= 1
    # the two merges read the same partials: the same int8s, the same projection (up to float32
    # summation order in the merge, which may flip an int8 on a tie)
    rel = np.linalg.norm(np.asarray(outs["kernel"], np.float64) - np.asarray(outs["prep"], np.float64))
    assert rel <= 1e-3 * np.linalg.norm(np.asarray(outs["prep"], np.float64))
    got = outs["prep"]
    # gemv_prepared on quantize_x's output is gemv's own fused route exactly
    x = jnp.asarray(rng.standard_normal((batch, hkv * G * D)), jnp.bfloat16)
    from realizar_jax.kernels.qdot import x_q8_group
    words, scales = quantize_x(x, x_q8_group(qtype), interpret=True)
    np.testing.assert_array_equal(np.asarray(gemv_prepared(words, scales, wo, interpret=True)),
                                  np.asarray(gemv(x, wo, act="int8", xprep="fused", interpret=True)))
    # unsummed: the o GEMV's K-split partials, whose total is the summed result
    from realizar_jax.kernels.splitsum import SplitSum
    parts, _, _, _ = decode_attention_output(q, k, v, kc, vc, pos, cos, sin, D ** -0.5, 1, wo, interpret=True,
                                             unsummed=True)
    assert isinstance(parts, SplitSum) and parts.shape == (batch, 256)
    np.testing.assert_array_equal(np.asarray(parts.total(), np.float32), np.asarray(got, np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        gemv_prepared(words[:, :-1], scales[:, :-1], wo, interpret=True)
    with pytest.raises(ValueError, match="1 to 4 activation rows"):
        gemv_prepared(jnp.tile(words, (5, 1, 1)), jnp.tile(scales, (5, 1)), wo, interpret=True)


@settings(max_examples=8, **SETTINGS)
@given(batch=st.integers(1, 3), cols=st.sampled_from([16, 64, 256, 2048, 4096]), splits=st.sampled_from([0, 1, 2, 3]),
       scale=st.sampled_from([1e-2, 1.0, 30.0]), dtype=st.sampled_from(["bfloat16", "float16"]),
       seed=st.integers(0, 2**31))
def test_norm_x_is_rms_norm_after_the_residual_add(batch, cols, splits, scale, dtype, seed):
    """norm_x (the dense GEMVs' prep): the new stream is x plus the splits' float32 sum rounded to the
    model's dtype, bit for bit as numpy adds them; the normed row is layers.rms_norm of it within
    one rounding step (the sum of squares' float32 order can move the scale by an ulp)."""
    from realizar_jax.kernels.xquant import norm_x
    rng = np.random.default_rng(seed)
    dt, npdt = jnp.dtype(dtype), (BF16 if dtype == "bfloat16" else np.float16)
    rnd = lambda a: np.asarray(a, np.float32).astype(npdt).astype(np.float32)
    x = rnd(rng.standard_normal((batch, cols)) * scale)
    w = (rng.standard_normal(cols) * 0.2 + 1.0).astype(np.float32)
    residual, new = None, x
    if splits:
        residual = (rng.standard_normal((splits, batch, cols)) * scale).astype(np.float32)
        total = residual[0].copy()
        for p in residual[1:]:
            total = total + p
        new = rnd(x + rnd(total))
    y, x_new = norm_x(jnp.asarray(x, dt), jnp.asarray(w), 1e-5,
                      residual=None if residual is None else jnp.asarray(residual), interpret=True)
    assert y.dtype == dt and x_new.dtype == dt and y.shape == x_new.shape == (batch, cols)
    np.testing.assert_array_equal(np.asarray(x_new, np.float32), new)
    want = np.asarray(rms_norm(jnp.asarray(new, dt), jnp.asarray(w), 1e-5), np.float32)
    step = 2.0 ** -7 if dtype == "bfloat16" else 2.0 ** -10
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2 * step, atol=1e-30)
    assert np.mean(np.asarray(y, np.float32) == want) > 0.95
    # and against float64 numpy
    ref = w * new / np.sqrt(np.mean(np.asarray(new, np.float64) ** 2, axis=-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=4 * step, atol=1e-6 * np.abs(ref).max())


def test_norm_x_rejects_bad_operands():
    from realizar_jax.kernels.xquant import norm_x
    x, w = jnp.ones((2, 512), jnp.bfloat16), jnp.ones((512,), jnp.float32)
    with pytest.raises(ValueError, match="residual"):
        norm_x(x, w, 1e-5, residual=jnp.ones((2, 1, 512)), interpret=True)
    with pytest.raises(ValueError, match="norm weight"):
        norm_x(x, w[:256], 1e-5, interpret=True)
    with pytest.raises(ValueError, match="do not tile"):
        norm_x(jnp.ones((1, 3072), jnp.bfloat16), jnp.ones((3072,)), 1e-5, interpret=True)


def test_dense_weights_take_the_norm_prep_and_hand_over_partials(monkeypatch):
    """Dense bf16 weights on the GEMV route (forced here on the CPU, the kernels in interpret mode):
    normed_matmul_many and residual_normed_matmul_many run one norm_x launch for all their matrices
    and equal the XLA route; matmul_unsummed and swiglu_matmul(unsummed=True) return the GEMV's K-split
    partials, whose total is matmul's result. REALIZAR_GEMV_XPREP=xla keeps XLA's norm."""
    import functools
    import importlib
    from realizar_jax.kernels import dispatch
    from realizar_jax.kernels.splitsum import SplitSum, total
    qm = importlib.import_module("realizar_jax.quant.matmul")   # the package re-exports the function
    from realizar_jax.kernels.xquant import norm_x
    calls = []
    applies = lambda x, w: x.size // x.shape[-1] <= dispatch.GEMV_MAX_ROWS and np.ndim(w) == 2
    monkeypatch.setattr(dispatch, "dense_gemv_applies", applies)
    monkeypatch.setattr(qm, "dense_gemv_applies", applies)
    monkeypatch.setattr(dispatch, "gemv", functools.partial(gemv, interpret=True))
    monkeypatch.setattr(dispatch, "norm_x", lambda *a, **k: calls.append(1) or norm_x(*a, **{**k, "interpret": True}))
    rng = np.random.default_rng(5)
    cols = 1024
    x = jnp.asarray(rng.standard_normal((1, cols)), jnp.bfloat16)
    norm = jnp.asarray(rng.standard_normal(cols) * 0.2 + 1.0, jnp.float32)
    ws = [jnp.asarray(rng.standard_normal((n, cols)) * 0.05, jnp.bfloat16) for n in (64, 32, 32)]
    delta = SplitSum(jnp.asarray(rng.standard_normal((2, 1, cols)), jnp.float32), jnp.bfloat16)
    want_x = x + total(delta)
    for xprep, launches in (("fused", 1), ("xla", 0)):
        monkeypatch.setenv("REALIZAR_GEMV_XPREP", xprep)
        for d, base in ((None, x), (delta, want_x)):
            calls.clear()
            want = [matmul(rms_norm(base, norm, 1e-5), w) for w in ws]
            if d is None:
                got_x, got = x, normed_matmul_many(x, norm, 1e-5, ws)
            else:
                got_x, got = qm.residual_normed_matmul_many(x, d, norm, 1e-5, ws)
            assert len(calls) == launches, (xprep, d is None, len(calls))
            np.testing.assert_array_equal(np.asarray(got_x, np.float32), np.asarray(base, np.float32))
            for g, wv in zip(got, want):
                assert g.shape == wv.shape and g.dtype == jnp.bfloat16
                rel = np.linalg.norm(np.asarray(g, np.float64) - np.asarray(wv, np.float64)) / np.linalg.norm(np.asarray(wv, np.float64))
                assert rel < 1e-2, (xprep, rel)
    wd = jnp.asarray(rng.standard_normal((cols, 4096)) * 0.02, jnp.bfloat16)   # K split on the GEMV
    h = jnp.asarray(rng.standard_normal((1, 4096)), jnp.bfloat16)
    parts = qm.matmul_unsummed(h, wd)
    assert isinstance(parts, SplitSum) and parts.shape == (1, cols)
    np.testing.assert_allclose(np.asarray(total(parts), np.float32), np.asarray(matmul(h, wd), np.float32),
                               rtol=1e-2, atol=1e-2)
    up = jnp.asarray(rng.standard_normal((1, 4096)), jnp.bfloat16)
    got = swiglu_matmul(h, up, wd, unsummed=True)
    assert isinstance(got, SplitSum)
    np.testing.assert_allclose(np.asarray(total(got), np.float32),
                               np.asarray(matmul(swiglu(h, up), wd), np.float32), rtol=1e-2, atol=2e-2)


def test_residual_normed_matmul_many_routes(monkeypatch):
    """residual_normed_matmul_many = (x + delta, normed_matmul_many(x + delta, ...)) on every route:
    dense, packed CPU, GPU-layout weights alone and as one multi-matrix launch (the fused prep with
    the add inside), each activation-prep switch; delta as an array or as a SplitSum of partials.
    The new stream is bit-identical to XLA's add on every route."""
    from realizar_jax.kernels.splitsum import SplitSum, total
    from realizar_jax.quant.matmul import residual_normed_matmul_many
    rng = np.random.default_rng(21)
    cols = 512
    x = jnp.asarray(rng.standard_normal((2, cols)), jnp.bfloat16)
    norm = jnp.asarray(rng.standard_normal(cols) * 0.2 + 1.0, jnp.float32)
    data = random_blocks("Q4_K", 32, cols, rng)
    routes = {"dense": (jnp.asarray(rng.standard_normal((32, cols)), jnp.bfloat16),),
              "packed cpu": (QTensor(jnp.asarray(data), "Q4_K", (32, cols)),),
              "gpu one": (_packed("Q6_K", 32, cols, rng),),
              "gpu multi": (_packed("Q4_K", 32, cols, rng), _packed("Q6_K", 16, cols, rng), _packed("Q4_K", 16, cols, rng))}
    deltas = [jnp.asarray(rng.standard_normal((2, cols)), jnp.bfloat16),
              SplitSum(jnp.asarray(rng.standard_normal((2, 2, cols)), jnp.float32), jnp.bfloat16)]
    for xprep in ("fused", "kernel"):
        monkeypatch.setenv("REALIZAR_GEMV_XPREP", xprep)
        for name, ws in routes.items():
            for delta in deltas:
                want_x = x + total(delta)
                want = [matmul(rms_norm(want_x, norm, 1e-5), w) for w in ws]
                got_x, got = residual_normed_matmul_many(x, delta, norm, 1e-5, ws)
                np.testing.assert_array_equal(np.asarray(got_x, np.float32), np.asarray(want_x, np.float32))
                for g, wv in zip(got, want):
                    assert g.shape == wv.shape and g.dtype == jnp.bfloat16
                    rel = np.linalg.norm(np.asarray(g, np.float64) - np.asarray(wv, np.float64)) / np.linalg.norm(np.asarray(wv, np.float64))
                    assert rel < 2e-2, (xprep, name, rel)   # int8 activations against bf16 ones
    # no delta: the stream is x
    got_x, _ = residual_normed_matmul_many(x, None, norm, 1e-5, routes["gpu one"])
    np.testing.assert_array_equal(np.asarray(got_x, np.float32), np.asarray(x, np.float32))
    with pytest.raises(ValueError, match="delta"):
        residual_normed_matmul_many(x, x[:, :256], norm, 1e-5, routes["gpu one"])


def test_decode_with_the_residual_add_in_the_prep(model_files, monkeypatch):
    """A whole model on GPU-layout weights (the kernels in interpret mode on the CPU): with the down
    projection's K-split partials added inside the next norm's prep (REALIZAR_RESIDUAL_ADD=prep, the
    default), prefill and decode logits equal those of XLA's add."""
    import realizar_jax as rj
    from realizar_jax import engine
    from realizar_jax import model as M
    from realizar_jax.cache import init_cache
    from realizar_jax.kernels import repack_for_gpu
    monkeypatch.setattr(engine, "_gpu_repack", lambda: repack_for_gpu)
    m = rj.load(model_files.gguf("llama", "q4_k_m"), dtype="bfloat16", max_seq_len=16)
    assert any(isinstance(leaf, GpuQTensor) for leaf in jax.tree_util.tree_leaves(
        m.params, is_leaf=lambda a: isinstance(a, GpuQTensor)))
    tokens = jnp.asarray([[5, 17, 99, 3]], jnp.int32)   # 4 rows: the prefill takes the GEMV too
    runs = {}
    for mode in ("prep", "xla"):
        monkeypatch.setenv("REALIZAR_RESIDUAL_ADD", mode)
        jax.clear_caches()
        cache = init_cache(m.config, 1, 16, jnp.bfloat16)
        first, cache = M.prefill(m.params, cache, tokens, jnp.asarray([4]), config=m.config)
        step, cache = M.decode_logits(m.params, cache, jnp.asarray([42]), config=m.config)
        runs[mode] = (np.asarray(first), np.asarray(step))
    for got, want in zip(runs["prep"], runs["xla"]):
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel < 1e-3, rel   # the same roundings; only int8 ties of the norm's scale may flip


@settings(max_examples=6, **SETTINGS)
@given(qtype=st.sampled_from(["Q4_K", "Q8_0", "Q6_K"]), group=st.sampled_from([16, 32]),
       rows=st.sampled_from([32, 64]), nsb=st.integers(1, 2), batch=st.integers(1, 3),
       n_res=st.integers(0, 2), seed=st.integers(0, 2**31))
def test_gemv_swiglu_matches_separate_launches(qtype, group, rows, nsb, batch, n_res, seed):
    """gemv_swiglu (gate, up and the SwiGLU gate in one launch, writing the down GEMV's int8s) gives
    the int8 words and scales of the unfused chain gemv_multi -> quantize_x(swiglu) bit for bit, and
    the new residual stream; its activation is numpy's swiglu of the two products (float64 weights
    from gguf-py times the int8-rounded normalized x) within the int8 rounding."""
    from realizar_jax.kernels.gemv import gemv_swiglu
    rng = np.random.default_rng(seed)
    cols = nsb * 256
    data = [random_blocks(qtype, rows, cols, rng) for _ in range(2)]
    gate, up = (_packed_from(d, qtype, rows, cols) for d in data)
    x = jnp.asarray(rng.standard_normal((batch, cols)), jnp.bfloat16)
    norm = jnp.asarray(rng.standard_normal(cols) * 0.2 + 1.0, jnp.bfloat16)
    res = jnp.asarray(rng.standard_normal((n_res, batch, cols)), jnp.float32) if n_res else None
    kw = dict(interpret=True, pre="norm", other=norm, eps=1e-5, residual=res)
    got = gemv_swiglu(x, gate, up, group=group, **kw)
    (words, scales), x_new = got if n_res else (got, x)
    outs = gemv_multi(x, (gate, up), out_dtype=jnp.bfloat16, **kw)
    (g, u), x_new2 = outs if n_res else (outs, x)
    want_w, want_s = quantize_x(g, group, pre="swiglu", other=u, interpret=True)
    assert words.shape == (batch, rows // group, group // 4) and scales.shape == (batch, rows // group)
    np.testing.assert_array_equal(np.asarray(words), np.asarray(want_w))
    np.testing.assert_array_equal(np.asarray(scales), np.asarray(want_s))
    np.testing.assert_array_equal(np.asarray(x_new, np.float32), np.asarray(x_new2, np.float32))
    # independent: numpy's chain on gguf-py's weights
    xs = np.asarray(x_new, np.float32)
    xn = _numpy_pre(xs, "norm", np.asarray(norm, np.float32), 1e-5)
    xq = _int8_rows(xn, 16 if qtype == "Q6_K" else 32)
    ref = [quants.dequantize(d, GGMLQuantizationType[qtype]).reshape(rows, cols).astype(np.float64) for d in data]
    want = _numpy_pre(_bf16(xq @ ref[0].T), "swiglu", _bf16(xq @ ref[1].T), None)
    act = (np.asarray(words).view(np.int8).reshape(batch, -1, group).astype(np.float64)
           * np.asarray(scales, np.float64)[..., None]).reshape(batch, rows)
    assert np.linalg.norm(act - want) <= 2e-2 * np.linalg.norm(want)


def test_gemv_swiglu_dense_and_rejects():
    """Dense gate/up: the activation in the model's dtype, equal to layers.swiglu of the multi-matrix
    launch's outputs; pairs that cannot fuse raise ValueError naming them."""
    from realizar_jax.kernels.gemv import gemv_swiglu
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 512)), jnp.bfloat16)
    gd, ud = (jnp.asarray(rng.standard_normal((64, 512)) * 0.05, jnp.bfloat16) for _ in range(2))
    y = gemv_swiglu(x, gd, ud, interpret=True)
    g, u = gemv_multi(x, (gd, ud), interpret=True, out_dtype=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 64)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(swiglu(g, u), np.float32))
    with pytest.raises(ValueError, match="do not fuse"):
        gemv_swiglu(x, gd, ud[:32], interpret=True)
    packed = _packed_from(random_blocks("Q4_K", 16, 512, rng), "Q4_K", 16, 512)
    with pytest.raises(ValueError, match="do not fuse"):   # 16 rows cannot hold whole groups of 32
        gemv_swiglu(x, packed, packed, interpret=True, group=32)


def test_gemv_swiglu_tile_override(monkeypatch):
    """REALIZAR_GEMV_TILES["SWIGLU_Q4_K"] sets the launch's tile, its K depth included: one
    superblock per step gives the default tile's activation (up to a float32 summation order that
    may move an int8 by one); a row tile that cannot hold whole groups is refused."""
    from realizar_jax.kernels.gemv import gemv_swiglu, swiglu_tile
    rng = np.random.default_rng(4)
    gate, up = _packed("Q4_K", 64, 512, rng), _packed("Q4_K", 64, 512, rng)
    x = jnp.asarray(rng.standard_normal((1, 512)), jnp.bfloat16)
    words, scales = gemv_swiglu(x, gate, up, interpret=True, group=32)
    monkeypatch.setenv("REALIZAR_GEMV_TILES", '{"SWIGLU_Q4_K": [32, 1, 8, 3]}')
    jax.clear_caches()   # tiles are read when a call is traced
    assert swiglu_tile("Q4_K", 32) == (32, 1, 8, 3)
    from realizar_jax.kernels.gemv import _plan_multi, weight_parts
    _, mats, *_ = _plan_multi(x, [weight_parts(gate)] * 2, 32, None, None, None, None, None, None, True, bs=1)
    assert [(m[5], m[6]) for m in mats] == [(1, 2), (1, 2)]   # 1 superblock per step, 2 steps
    w1, s1 = gemv_swiglu(x, gate, up, interpret=True, group=32)
    a = np.asarray(words).view(np.int8).astype(int)
    b = np.asarray(w1).view(np.int8).astype(int)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.05
    np.testing.assert_allclose(np.asarray(s1), np.asarray(scales), rtol=1e-5)
    monkeypatch.setenv("REALIZAR_GEMV_TILES", '{"SWIGLU_Q4_K": [16, 4, 4, 3]}')
    jax.clear_caches()
    with pytest.raises(ValueError, match="do not fuse"):
        gemv_swiglu(x, gate, up, interpret=True, group=32)
    monkeypatch.delenv("REALIZAR_GEMV_TILES")
    jax.clear_caches()


@pytest.mark.parametrize("kind", ["packed", "dense"])
def test_residual_normed_mlp_routes(monkeypatch, kind):
    """residual_normed_mlp on the GPU decode route (kernels in interpret mode; dense weights forced
    onto the Pallas GEMV as on a GPU) takes one gemv_swiglu launch with REALIZAR_SWIGLU=gemv and
    none with =prep, and both give the same new stream and the same down-projection partials (bit
    for bit: the same int8s or bf16 activation reach the same GEMV); off the route (prefill rows) it
    is the plain chain of matmuls."""
    import functools
    import importlib
    from realizar_jax.kernels import dispatch
    from realizar_jax.kernels.splitsum import SplitSum, total
    qm = importlib.import_module("realizar_jax.quant.matmul")
    calls = []
    real = dispatch.gemv_swiglu
    monkeypatch.setattr(dispatch, "gemv_swiglu", lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = np.random.default_rng(8)
    cols, ffn = 512, 256   # the down weight's input width: whole superblocks
    if kind == "dense":
        applies = lambda x, w: (x.size // x.shape[-1] <= dispatch.GEMV_MAX_ROWS and np.ndim(w) == 2
                                and w.shape[1] % 256 == 0)
        monkeypatch.setattr(dispatch, "dense_gemv_applies", applies)
        monkeypatch.setattr(qm, "dense_gemv_applies", applies)
        monkeypatch.setattr(dispatch, "gemv", functools.partial(gemv, interpret=True))
        wg, wu = (jnp.asarray(rng.standard_normal((ffn, cols)) * 0.05, jnp.bfloat16) for _ in range(2))
        wd = jnp.asarray(rng.standard_normal((cols, ffn)) * 0.05, jnp.bfloat16)
    else:
        wg, wu = _packed("Q4_K", ffn, cols, rng), _packed("Q4_K", ffn, cols, rng)
        wd = _packed("Q6_K", cols, ffn, rng)
    x = jnp.asarray(rng.standard_normal((1, cols)), jnp.bfloat16)
    norm = jnp.asarray(rng.standard_normal(cols) * 0.2 + 1.0, jnp.float32)
    delta = SplitSum(jnp.asarray(rng.standard_normal((2, 1, cols)), jnp.float32), jnp.bfloat16)
    got = {}
    for mode, launches in (("gemv", 1), ("prep", 0)):
        monkeypatch.setenv("REALIZAR_SWIGLU", mode)
        calls.clear()
        got[mode] = qm.residual_normed_mlp(x, delta, norm, 1e-5, wg, wu, wd)
        assert len(calls) == launches, (mode, len(calls))
    (xa, ya), (xb, yb) = got["gemv"], got["prep"]
    np.testing.assert_array_equal(np.asarray(xa, np.float32), np.asarray(x + total(delta), np.float32))
    np.testing.assert_array_equal(np.asarray(xa, np.float32), np.asarray(xb, np.float32))
    assert isinstance(ya, SplitSum) and ya.shape == (1, cols)
    np.testing.assert_array_equal(np.asarray(total(ya), np.float32), np.asarray(total(yb), np.float32))
    # prefill rows: the plain chain
    xs = jnp.asarray(rng.standard_normal((12, cols)), jnp.bfloat16)
    x12, y12 = qm.residual_normed_mlp(xs, None, norm, 1e-5, wg, wu, wd)
    h = rms_norm(xs, norm, 1e-5)
    want = matmul(swiglu(matmul(h, wg), matmul(h, wu)), wd)
    np.testing.assert_array_equal(np.asarray(total(y12), np.float32), np.asarray(want, np.float32))
    with pytest.raises(ValueError, match="delta"):
        qm.residual_normed_mlp(x, xs, norm, 1e-5, wg, wu, wd)
    if kind == "packed":   # a down weight whose input width is not gate/up's output width
        wd_bad = _packed("Q6_K", cols, 2 * ffn, rng)
        for mode, match in (("gemv", "do not chain"), ("prep", "takes 512 input features")):
            monkeypatch.setenv("REALIZAR_SWIGLU", mode)
            with pytest.raises(ValueError, match=match):
                qm.residual_normed_mlp(x, delta, norm, 1e-5, wg, wu, wd_bad)


@settings(max_examples=5, **SETTINGS)
@given(batch=st.integers(1, 2), hkv=st.sampled_from([1, 2]), G=st.sampled_from([1, 2, 4]),
       S=st.sampled_from([64, 256]), group=st.sampled_from([None, 16, 32]), seed=st.integers(0, 2**31))
def test_attention_merged_in_the_kernel(batch, hkv, G, S, group, seed):
    """decode_attention_merged (the last split of each kv head merges them in the attention launch)
    gives the fused step's XLA merge (_merge) or the merge prep's int8s (merge_quantize_x) on the same
    partials, bit for bit in interpret mode; the caches as decode_attention_update writes them; each
    split counted once in the layer's row of the counters."""
    from realizar_jax.attention import attention_sync
    from realizar_jax.kernels.attention import decode_attention_merged, decode_attention_update
    from realizar_jax.kernels.xquant import merge_quantize_x
    from realizar_jax.layers import rope_tables
    rng = np.random.default_rng(seed)
    D, L = 64, 2
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    q, k, v = f(batch, hkv * G, D), f(batch, hkv, D), f(batch, hkv, D)
    kc, vc = f(L, batch, hkv, S, D), f(L, batch, hkv, S, D)
    pos = jnp.asarray(rng.integers(0, S, batch), jnp.int32)
    cos, sin = rope_tables(jnp.asarray(1.0 / 10000 ** (np.arange(0, D, 2) / D), jnp.float32), pos)
    args = (q, k, v, kc, vc, pos, cos, sin, D ** -0.5, 1)
    sync = attention_sync(kc)
    got, k_got, v_got, sync_out = decode_attention_merged(*args, sync, group=group, interpret=True)
    want, k_want, v_want = decode_attention_update(*args, interpret=True)
    np.testing.assert_array_equal(np.asarray(k_got, np.float32), np.asarray(k_want, np.float32))
    np.testing.assert_array_equal(np.asarray(v_got, np.float32), np.asarray(v_want, np.float32))
    counts = np.asarray(sync_out)
    assert (counts[0] == 0).all() and (counts[1] == counts[1].flat[0]).all() and counts[1].flat[0] >= 1
    if group is None:
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    else:
        (o, m, l), _, _ = decode_attention_update(*args, interpret=True, merge=False)
        want_w, want_s = merge_quantize_x(o, m, l, group, heads_per_kv=G, dtype=q.dtype, interpret=True)
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want_w))
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want_s))
    with pytest.raises(ValueError, match="sync"):
        decode_attention_merged(*args, sync[0], group=group, interpret=True)
