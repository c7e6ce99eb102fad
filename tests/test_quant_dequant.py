"""jnp dequantization vs gguf-py's numpy reference: bit-identical float32 for every supported type."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gguf import quants as gq
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as GT
from hypothesis import HealthCheck, given, settings, strategies as st

from realizar_jax.errors import UnsupportedQuantError
from realizar_jax.quant import (DENSE_QTYPES, QTYPE_SIZES, QTYPES, QUANTIZED_QTYPES, QTensor, bits_per_weight,
                                dequantize, dequantize_blocks, dequantize_rows, row_bytes)

# byte offsets of the f16 scale fields in each block (from the ggml block structs)
F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
              "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
              "IQ4_NL": (0,), "IQ4_XS": (0,), "MXFP4": ()}   # MXFP4's scale is an E8M0 byte
ROWS, BLOCKS = 3, 2  # one shape per type keeps jit compiles to one per type

deq = jax.jit(dequantize_blocks, static_argnames=("qtype", "dtype"))
# any finite f16 bit pattern (incl. +-0, subnormals, +-65504), drawn without filtering
finite_f16_bits = st.builds(lambda mag, neg: mag | (0x8000 if neg else 0), st.integers(0, 0x7BFF), st.booleans())


@st.composite
def packed_blocks(draw, qtype):
    """Random bytes [ROWS, BLOCKS*type_size] with every f16 field set to a hypothesis-chosen finite f16."""
    ts = QTYPE_SIZES[qtype][1]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    data = rng.integers(0, 256, (ROWS, BLOCKS, ts), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        bits = draw(st.lists(finite_f16_bits, min_size=ROWS * BLOCKS, max_size=ROWS * BLOCKS))
        data[..., off:off + 2] = np.asarray(bits, "<u2").view(np.uint8).reshape(ROWS, BLOCKS, 2)
    return data.reshape(ROWS, BLOCKS * ts)


def assert_bits_equal(ours, ref):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(ours), nan)
    bad = (ours.view(np.uint32) != ref.view(np.uint32)) & ~nan
    assert not bad.any(), f"{bad.sum()} values differ, first at {np.argwhere(bad)[0]}: " \
        f"{ours[bad][0]!r} vs {ref[bad][0]!r}"


def test_f16_fields_table_matches_block_sizes():
    for qtype, offs in F16_FIELDS.items():
        assert all(off + 2 <= QTYPE_SIZES[qtype][1] for off in offs)
    assert set(F16_FIELDS) == set(QUANTIZED_QTYPES)
    assert all(QTYPES[qtype].f16_offsets == offs for qtype, offs in F16_FIELDS.items())   # the registry's


@pytest.mark.parametrize("qtype", QUANTIZED_QTYPES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_bit_identical_to_gguf(qtype, data):
    blocks = data.draw(packed_blocks(qtype))
    with np.errstate(over="ignore"):   # MXFP4's largest exponents overflow to inf, in gguf-py as in ours
        ref = gq.dequantize(blocks, GT[qtype])
    ours = deq(blocks, qtype=qtype)
    assert ours.dtype == jnp.float32 and ours.shape == (ROWS, BLOCKS * QTYPE_SIZES[qtype][0])
    assert_bits_equal(ours, ref)


# MXFP4: every E8M0 exponent, the extremes more often (0 and 1 give subnormal scales, 255 is the OCP NaN
# code that gguf-py reads as 2^127, so most of its values overflow to inf, as do 253 and 254's largest)
e8m0 = st.one_of(st.sampled_from([0, 1, 2, 3, 125, 126, 127, 128, 129, 252, 253, 254, 255]), st.integers(0, 255))


def test_mxfp4_every_exponent_and_code():
    """All 256 exponents x all 16 codes, in both nibble positions, against gguf-py."""
    codes = np.arange(16, dtype=np.uint8)
    qs = np.concatenate([codes[0::2] | (codes[1::2] << 4), codes[::-1][0::2] | (codes[::-1][1::2] << 4)])
    blocks = np.concatenate([np.arange(256, dtype=np.uint8)[:, None], np.tile(qs, (256, 1))], axis=1)
    with np.errstate(over="ignore"):
        ref = gq.dequantize(blocks, GT.MXFP4)
    ours = np.asarray(deq(blocks, qtype="MXFP4"))
    assert_bits_equal(ours, ref)
    assert np.isinf(ours).any() and ((ours != 0) & (np.abs(ours) < np.finfo(np.float32).tiny)).any()
    # the grid: code c of exponent e is ggml's doubled E2M1 value times 2^(e - 128)
    grid = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float64)
    # qs byte j holds value j (low nibble) and j + 16 (high): here codes 2j and 2j + 1
    np.testing.assert_array_equal(ours[127, :8], grid[0::2] / 2)            # e = 127: d = 2^-1
    np.testing.assert_array_equal(ours[127, 16:24], grid[1::2] / 2)
    np.testing.assert_array_equal(ours[255, [0, 1, 16, 20, 21]], [0, np.inf, 2.0 ** 127, -2.0 ** 127, -np.inf])
    assert ours[0, 16] == 2.0 ** -128 and ours[0, 17] == 3 * 2.0 ** -128     # subnormal: e = 0, codes 1 and 3


@settings(max_examples=60, deadline=None)
@given(exps=st.lists(e8m0, min_size=ROWS * BLOCKS, max_size=ROWS * BLOCKS), seed=st.integers(0, 2**32 - 1))
def test_mxfp4_bit_identical_on_drawn_exponents(exps, seed):
    data = np.random.default_rng(seed).integers(0, 256, (ROWS, BLOCKS, 17), dtype=np.uint8)
    data[..., 0] = np.asarray(exps, np.uint8).reshape(ROWS, BLOCKS)
    data = data.reshape(ROWS, BLOCKS * 17)
    with np.errstate(over="ignore"):
        ref = gq.dequantize(data, GT.MXFP4)
    assert_bits_equal(deq(data, qtype="MXFP4"), ref)


@pytest.mark.parametrize("qtype", DENSE_QTYPES)
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_dense_bit_identical(qtype, seed):
    # random bit patterns: every exponent incl. subnormals, infinities and NaNs
    raw = np.random.default_rng(seed).integers(0, 256, (4, 64), dtype=np.uint8)
    if qtype == "F16":
        ref = raw.view("<f2").astype(np.float32)  # gguf-py's F16 path
    else:
        ref = gq.dequantize(raw, GT[qtype])
    assert_bits_equal(deq(raw, qtype=qtype), ref)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_0", "Q6_K", "IQ4_XS", "MXFP4", "BF16"])
def test_leading_axes_and_dtype(qtype):
    rng = np.random.default_rng(7)
    nbytes = row_bytes(qtype, 512)
    raw = rng.integers(0, 256, (2, 3, nbytes), dtype=np.uint8)
    for off in F16_FIELDS.get(qtype, ()):  # keep scales finite so the bf16 comparison is meaningful
        for b in range(0, nbytes, QTYPE_SIZES[qtype][1]):
            raw[..., b + off:b + off + 2] = rng.normal(0, 1, (2, 3)).astype("<f2")[..., None].view(np.uint8)
    out = np.asarray(deq(raw, qtype=qtype))
    assert out.shape == (2, 3, 512)
    with np.errstate(over="ignore"):
        assert_bits_equal(out.reshape(6, 512), gq.dequantize(raw.reshape(6, nbytes), GT[qtype]))
    out_bf16 = deq(raw, qtype=qtype, dtype=jnp.bfloat16)
    assert out_bf16.dtype == jnp.bfloat16
    with np.errstate(invalid="ignore"):  # NaN payloads in the random BF16 bits
        want = out.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert_bits_equal(np.asarray(out_bf16).astype(np.float32), want)


def _random_qtensor(qtype, rows, cols, seed):
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, row_bytes(qtype, cols)), dtype=np.uint8)
    ts = QTYPE_SIZES[qtype][1]
    for off in F16_FIELDS[qtype]:
        for b in range(0, raw.shape[1], ts):
            raw[:, b + off:b + off + 2] = rng.normal(0, 0.01, (rows, 1)).astype("<f2").view(np.uint8)
    return QTensor(jnp.asarray(raw), qtype, (rows, cols)), raw


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0", "Q6_K"])
def test_dequantize_qtensor_under_jit(qtype):
    q, raw = _random_qtensor(qtype, 16, 512, seed=1)
    ref = gq.dequantize(raw, GT[qtype])
    f = jax.jit(dequantize, static_argnames="dtype")
    assert_bits_equal(f(q), ref)
    assert f(q, dtype=jnp.bfloat16).dtype == jnp.bfloat16


@settings(max_examples=10, deadline=None)
@given(ids=st.lists(st.integers(0, 4095), min_size=6, max_size=6))
def test_dequantize_rows_gathers_only_needed_rows(ids):
    vocab, cols = 4096, 256
    q, raw = _random_qtensor("Q4_K", vocab, cols, seed=3)
    ids = np.asarray(ids, np.int32).reshape(2, 3)
    out = jax.jit(dequantize_rows)(q, ids)
    assert out.shape == (2, 3, cols)
    assert_bits_equal(np.asarray(out).reshape(6, cols), gq.dequantize(raw[ids.reshape(-1)], GT.Q4_K))


def test_dequantize_rows_never_expands_the_table():
    vocab, cols = 4096, 512
    q, _ = _random_qtensor("Q6_K", vocab, cols, seed=4)
    jaxpr = jax.make_jaxpr(dequantize_rows)(q, jnp.zeros((7,), jnp.int32))

    def sizes(jx):
        for eqn in jx.eqns:
            for v in eqn.outvars:
                yield int(np.prod(v.aval.shape))
            for p in eqn.params.values():
                if hasattr(p, "jaxpr"):
                    yield from sizes(p.jaxpr)
    assert max(sizes(jaxpr.jaxpr)) <= 7 * cols


def test_types_table():
    for name, (bs, ts) in QTYPE_SIZES.items():
        assert (bs, ts) == tuple(GGML_QUANT_SIZES[GT[name]])
    assert row_bytes("Q4_K", 4096) == 16 * 144
    assert row_bytes("Q8_0", 64) == 68
    assert row_bytes("BF16", 3) == 6
    assert bits_per_weight("Q4_K") == 4.5
    assert bits_per_weight("Q6_K") == 6.5625
    assert bits_per_weight("Q8_0") == 8.5
    assert bits_per_weight("F16") == 16
    assert row_bytes("MXFP4", 64) == 34 and bits_per_weight("MXFP4") == 4.25   # 17 bytes per 32 values
    with pytest.raises(ValueError, match="multiple of the Q4_K block size 256"):
        row_bytes("Q4_K", 300)


def test_errors_name_the_problem():
    with pytest.raises(UnsupportedQuantError, match="IQ2_XXS"):
        dequantize_blocks(np.zeros((1, 66), np.uint8), "IQ2_XXS")
    with pytest.raises(TypeError, match="uint8"):
        dequantize_blocks(np.zeros((1, 18), np.float32), "Q4_0")
    with pytest.raises(ValueError, match="whole number of Q8_0 blocks"):
        dequantize_blocks(np.zeros((1, 35), np.uint8), "Q8_0")
    bad = QTensor(jnp.zeros((4, 100), jnp.uint8), "Q4_K", (4, 256))
    with pytest.raises(ValueError, match=r"expected \(4, 144\)"):
        dequantize(bad)


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q8_0"])
def test_dequant_4096_square_is_fast(qtype):
    data = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4096, row_bytes(qtype, 4096)), dtype=np.uint8))
    f = jax.jit(lambda d: dequantize_blocks(d, qtype))
    f(data).block_until_ready()
    t = time.perf_counter()
    f(data).block_until_ready()
    assert time.perf_counter() - t < 1.0
