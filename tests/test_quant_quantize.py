"""numpy quantizers: round-trip error bounds per type, gguf-py reads our blocks, jnp agrees bit for bit."""
from __future__ import annotations

import ctypes
import os
import time

import jax
import numpy as np
import pytest
from gguf import quants as gq
from gguf.constants import GGMLQuantizationType as GT
from hypothesis import given, settings, strategies as st

from realizar_jax.quant import QTensor, dequantize, dequantize_blocks, quantize, quantize_qtensor, row_bytes

QTYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
FAMILIES = ("gauss", "uniform", "laplace", "positive", "negative", "outliers", "subscales",
            "suboffsets", "integers", "constant")
ROWS, COLS = 2, 512
deq = jax.jit(dequantize_blocks, static_argnames=("qtype", "dtype"))


def make_values(seed, family, scale, rows=ROWS, cols=COLS):
    """Test weights of one family; every 256-value super-block rescaled to max |x| == scale."""
    rng = np.random.default_rng(seed)
    shape = (rows, cols // 256, 256)
    if family == "gauss":
        x = rng.standard_normal(shape)
    elif family == "uniform":
        x = rng.uniform(-1, 1, shape)
    elif family == "laplace":
        x = rng.laplace(size=shape)
    elif family == "positive":
        x = rng.uniform(0.5, 1, shape)
    elif family == "negative":
        x = -rng.uniform(0.5, 1, shape)
    elif family == "outliers":  # tiny weights with a few huge ones
        x = rng.standard_normal(shape) * 1e-3
        x[..., ::97] = rng.standard_normal(x[..., ::97].shape) * 10
    elif family == "subscales":  # sub-blocks of 16 spanning 4 decades
        x = rng.standard_normal((*shape[:2], 16, 16)) * 10.0 ** rng.uniform(-4, 0, (*shape[:2], 16, 1))
    elif family == "suboffsets":  # small spread around a per-32 offset
        x = rng.standard_normal((*shape[:2], 8, 32)) * 0.01 + rng.uniform(-1, 1, (*shape[:2], 8, 1))
    elif family == "integers":
        x = np.round(rng.standard_normal(shape) * 3) + 0.5
    else:
        x = np.ones(shape) * rng.uniform(-1, 1, (*shape[:2], 1))
    x = x.reshape(shape)
    x = x / np.abs(x).max(axis=-1, keepdims=True) * scale
    return x.reshape(rows, cols).astype(np.float32)


# A subnormal f16 scale is off by at most half its ulp (2^-25); times the largest quant*sub-scale
# product that is the worst absolute error it can add.
_SUBNORMAL = 2.0 ** -25
_K_NMAX = {"Q4_K": 15, "Q5_K": 31}


def error_bound(qtype, x):
    """Largest |dequant(quant(x)) - x| each element may have, broadcast to x's shape.

    Legacy types (proved from the algorithm): Q8_0 rounds to steps of d = A/127 (A = block max |x|),
    so <= d/2, plus up to 127 * f16 rounding of d (2^-11 relative). Q4_0/Q5_0 map the signed max
    to -8/-16, so the opposite extreme clips by one step: <= A/8 (A/16). Q4_1/Q5_1 step over
    max-min: half a step, plus the f16 rounding of d and of the min.
    K-quants (the fit is a search, so measured, then given margin): Q4_K/Q5_K stay within 1.5
    steps of a grid with nmax steps over the super-block's span [min(x,0), max(x,0)] -- half a step
    of rounding plus the 6-bit coding of each sub-block's scale and min (worst seen over 10^5 adversarial
    super-blocks: 0.96 / 1.11 steps); Q6_K within 1.25 steps of A/32 (worst seen 0.79).
    """
    bs = 32 if qtype[-1] != "K" else 256
    xb = x.reshape(-1, bs).astype(np.float64)
    amax = np.abs(xb).max(axis=1, keepdims=True)
    span = xb.max(axis=1, keepdims=True) - xb.min(axis=1, keepdims=True)
    if qtype == "Q8_0":
        b = amax * (1 / 254 + 2.0 ** -11) + 127 * _SUBNORMAL
    elif qtype in ("Q4_0", "Q5_0"):
        n = 8 if qtype == "Q4_0" else 16
        b = amax * (1 / n + 2.0 ** -11) + n * _SUBNORMAL
    elif qtype in ("Q4_1", "Q5_1"):
        n = 15 if qtype == "Q4_1" else 31
        b = span / (2 * n) * 1.001 + (span + amax) * 2.0 ** -10 + n * _SUBNORMAL
    elif qtype in _K_NMAX:
        n = _K_NMAX[qtype]
        kspan = np.maximum(xb.max(axis=1, keepdims=True), 0) - np.minimum(xb.min(axis=1, keepdims=True), 0)
        b = 1.5 * kspan / n + 63 * (n + 1) * _SUBNORMAL
    else:  # Q6_K
        b = 1.25 * amax / 32 + 128 * 32 * _SUBNORMAL
    return np.broadcast_to(b, xb.shape).reshape(x.shape)


@pytest.mark.parametrize("qtype", QTYPES)
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), family=st.sampled_from(FAMILIES), scale=st.floats(0.25, 64.0))
def test_round_trip_within_bound_and_readable_by_gguf(qtype, seed, family, scale):
    x = make_values(seed, family, scale)
    q = quantize(x, qtype)
    assert q.dtype == np.uint8 and q.shape == (ROWS, row_bytes(qtype, COLS))
    ref = gq.dequantize(q, GT[qtype])
    ours = np.asarray(deq(q, qtype=qtype))
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
    err = np.abs(ref.astype(np.float64) - x)
    bound = error_bound(qtype, x)
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert (err <= bound).all(), f"{family}: |err| {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"


# Typical quality on Gaussian weights (sigma 0.02, like a real layer), RMS error / RMS weight over
# the matrix. Uniform rounding noise is step/sqrt(12): Q8_0 step ~ 2.1 sigma/127 -> 0.005;
# Q4_0 step ~ 2.1 sigma/8 plus clipping -> 0.086; Q4_1/Q5_1 step ~ 4.1 sigma/15 (/31) -> 0.078 (0.038).
# The K-quant search must beat the plain min/max grid of the same width (Q4_1 0.078, Q5_1 0.038);
# Q6_K step ~ 1.8 sigma/32 -> 0.017. MXFP4's power-of-two scale and E2M1 grid (steps of 1/8 to 1/3 of the
# block max) measure 0.114-0.115. Bounds are measured values (3 seeds) plus ~6-10%.
TYPICAL_RMS = {"MXFP4": 0.123, "Q8_0": 0.006, "Q4_0": 0.092, "Q4_1": 0.083, "Q5_0": 0.046, "Q5_1": 0.041,
               "Q4_K": 0.076, "Q5_K": 0.038, "Q6_K": 0.0195, "F16": 3e-4, "BF16": 2.2e-3}


@pytest.mark.parametrize("qtype", list(TYPICAL_RMS))
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_typical_relative_rms_error(qtype, seed):
    x = (np.random.default_rng(seed).standard_normal((32, 1024)) * 0.02).astype(np.float32)
    y = np.asarray(deq(quantize(x, qtype), qtype=qtype), np.float64)
    rel = np.sqrt(((y - x) ** 2).mean() / (x.astype(np.float64) ** 2).mean())
    assert rel < TYPICAL_RMS[qtype]


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_dense_passthrough(seed):
    x = (np.random.default_rng(seed).standard_normal((3, 48)) * 100).astype(np.float32)
    np.testing.assert_array_equal(quantize(x, "F32"), x.view(np.uint8))
    np.testing.assert_array_equal(quantize(x, "F16"), x.astype("<f2").view(np.uint8))
    np.testing.assert_array_equal(quantize(x, "BF16"), gq.quantize(x, GT.BF16))  # gguf-py: ggml's rounding
    np.testing.assert_array_equal(np.asarray(deq(quantize(x, "F32"), qtype="F32")), x)


def test_quantize_qtensor_round_trip():
    x = make_values(5, "gauss", 1.0, rows=8, cols=512)
    q = quantize_qtensor(x, "Q4_K")
    assert isinstance(q, QTensor) and q.qtype == "Q4_K" and q.shape == (8, 512)
    np.testing.assert_array_equal(np.asarray(q.data), quantize(x, "Q4_K"))
    np.testing.assert_array_equal(np.asarray(dequantize(q)), gq.dequantize(quantize(x, "Q4_K"), GT.Q4_K))


# ---- MXFP4: llama.cpp's quantize_row_mxfp4_ref, which gguf-py's quantize implements; ours must equal it

def _gguf_mxfp4(x):
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        return gq.quantize(x, GT.MXFP4)


def _mxfp4_ties(rng, shape):
    """Values on and beside the grid's midpoints and points (k * d for a block's d), both signs."""
    d = 2.0 ** rng.integers(-100, 100, (*shape[:-1], 1))
    k = rng.choice([0, 0.25, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 10, 12, 14, 15.99], shape)
    nudge = rng.choice([1.0, 1 + 2.0 ** -23, 1 - 2.0 ** -24], shape)
    return (k * d * nudge * rng.choice([-1, 1], shape)).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), family=st.sampled_from(FAMILIES + ("ties",)),
       log_scale=st.floats(-37, 38))
def test_mxfp4_equals_gguf_py_bit_for_bit(seed, family, log_scale):
    """Any finite input whose blocks have max |x| >= 2^-125 (below that llama.cpp's exponent is an
    undefined cast): the same bytes as gguf-py, so the same as llama.cpp's reference."""
    rng = np.random.default_rng(seed)
    if family == "ties":
        x = _mxfp4_ties(rng, (ROWS, COLS))
    else:
        x = make_values(seed, family, 1.0) * np.float32(10.0 ** log_scale)
    x = np.clip(x, -np.finfo(np.float32).max, np.finfo(np.float32).max).astype(np.float32)
    x = x.reshape(-1, 32)
    x = x[np.abs(x).max(axis=1) >= 2.0 ** -125]
    if x.size == 0:
        return
    np.testing.assert_array_equal(quantize(x, "MXFP4"), _gguf_mxfp4(x))


def test_mxfp4_extremes():
    f = np.finfo(np.float32)
    x = np.zeros((5, 32), np.float32)
    x[0] = f.max * np.linspace(-1, 1, 32, dtype=np.float32)        # float32 log2 rounds max |x| up to 2^128
    x[1, 3] = 2.0 ** -125                                            # the smallest max with a defined e: 0
    x[2, ::5] = -2.0 ** 100
    x[3] = np.float32(2.0 ** 3 - 2.0 ** -20)                          # just below a power of two
    ours = quantize(x, "MXFP4")
    np.testing.assert_array_equal(ours, _gguf_mxfp4(x))
    assert ours[0, 0] == 253 and ours[1, 0] == 0 and ours[4].tolist() == [0] * 17   # a zero block: e = 0
    y = np.asarray(deq(ours, qtype="MXFP4"))
    assert np.isfinite(y).all()   # 8d and 12d are inf at e = 253: never chosen


def _mxfp4_bound(q, x):
    """Per value: ggml's grid k*d (k in 0,1,2,3,4,6,8,12) is at most 4d apart, so rounding costs
    <= 2d, and a value beyond 12d clips by |x| - 12d; d = 2^(e - 128) read from the block."""
    d = np.ldexp(1.0, q.reshape(-1, 17)[:, :1].astype(np.int64) - 128)
    ax = np.abs(x.reshape(-1, 32)).astype(np.float64)
    return np.maximum(2 * d, ax - 12 * d).reshape(x.shape)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), family=st.sampled_from(FAMILIES), scale=st.floats(1e-3, 1e3))
def test_mxfp4_round_trip_within_bound(seed, family, scale):
    x = make_values(seed, family, scale)
    q = quantize(x, "MXFP4")
    y = np.asarray(deq(q, qtype="MXFP4"), np.float64)
    err = np.abs(y - x)
    assert (err <= _mxfp4_bound(q, x)).all()
    # and in terms of the block max alone: d <= A/8 (or A/4 when log2 rounds up) -> err <= A/4 (A/2)
    amax = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True).astype(np.float64)
    assert (err.reshape(-1, 32) <= amax / 2).all()


def test_mxfp4_tiny_blocks_get_the_finest_scale():
    """max |x| < 2^-125: llama.cpp's exponent would be negative (an undefined cast); ours is 0, the
    finest scale 2^-128, which rounds those values to within 2^-128 (subnormals, handled exactly)."""
    rng = np.random.default_rng(3)
    x = (rng.uniform(-1, 1, (4, 32)) * 2.0 ** rng.integers(-149, -125, (4, 1))).astype(np.float32)
    q = quantize(x, "MXFP4")
    assert (q.reshape(-1, 17)[:, 0] == 0).all()
    y = gq.dequantize(q, GT.MXFP4).astype(np.float64)   # numpy keeps the subnormals XLA's CPU flushes
    assert (np.abs(y - x) <= 2.0 ** -128).all()


def test_mxfp4_refuses_non_finite_but_takes_large_values():
    x = np.ones((2, 64), np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="non-finite values to MXFP4"):
            quantize(np.where(np.arange(64) == 7, np.float32(bad), x), "MXFP4")
    big = x * np.float32(1e30)   # no f16 field: anything float32 holds
    np.testing.assert_array_equal(quantize(big, "MXFP4"), _gguf_mxfp4(big))


def test_quantize_rejects_bad_input():
    x = np.ones((2, 256), np.float32)
    with pytest.raises(ValueError, match="multiple of the Q4_K block size"):
        quantize(x[:, :100], "Q4_K")
    with pytest.raises(ValueError, match="non-finite"):
        quantize(np.where(np.arange(256) == 3, np.nan, x), "Q8_0")
    with pytest.raises(ValueError, match="cannot quantize to Q3_K"):
        quantize(x, "Q3_K")
    with pytest.raises(ValueError, match="65504"):
        quantize(x * 1e5, "Q6_K")


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_4096_square_takes_seconds(qtype):
    x = (np.random.default_rng(0).standard_normal((4096, 4096)) * 0.02).astype(np.float32)
    t = time.process_time()
    quantize(x, qtype)
    assert time.process_time() - t < 8.0


def _ggml_library():
    """llama.cpp's ggml (REALIZAR_GGML_LIB, or the one llama-cpp-python ships), or skip."""
    path = os.environ.get("REALIZAR_GGML_LIB")
    if not path:
        llama_cpp = pytest.importorskip("llama_cpp")
        libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
        found = [f for f in os.listdir(libdir) if f.startswith("libggml-base")] if os.path.isdir(libdir) else []
        if not found:
            pytest.skip("llama-cpp-python has no libggml-base")
        path = os.path.join(libdir, found[0])
    return ctypes.CDLL(path)


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", QTYPES)
def test_matches_llama_cpp_reference_quantizer(qtype):
    """Legacy types: byte-identical to quantize_row_*_ref. K-quants: the same float32 operations in the
    same order, but llama.cpp's build may contract a*b+c into an FMA, so near-ties between trial
    scales may resolve differently: most blocks identical, error no worse."""
    lib = _ggml_library()
    fn = getattr(lib, f"quantize_row_{qtype.lower()[:-2]}{qtype[-2:]}_ref")
    x = np.concatenate([make_values(s, f, 1.0, rows=8, cols=1024) for s, f in enumerate(FAMILIES)])
    ref = np.zeros((x.shape[0], row_bytes(qtype, x.shape[1])), np.uint8)
    fn(x.ctypes.data_as(ctypes.c_void_p), ref.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
    ours = quantize(x, qtype)
    if qtype[-1] != "K":
        np.testing.assert_array_equal(ours, ref)
        return
    y_ours, y_ref = gq.dequantize(ours, GT[qtype]), gq.dequantize(ref, GT[qtype])
    same = (y_ours.reshape(-1, 256) == y_ref.reshape(-1, 256)).all(axis=1)
    assert same.mean() > 0.75
    rms = lambda y: np.sqrt(((y - x) ** 2).mean())
    assert rms(y_ours) <= 1.01 * rms(y_ref)


@pytest.mark.llamacpp
def test_mxfp4_matches_llama_cpp_reference_quantizer():
    lib = _ggml_library()
    x = np.concatenate([make_values(s, f, 10.0 ** (s % 7 - 3), rows=8, cols=1024) for s, f in enumerate(FAMILIES)])
    ref = np.zeros((x.shape[0], row_bytes("MXFP4", x.shape[1])), np.uint8)
    lib.quantize_row_mxfp4_ref(x.ctypes.data_as(ctypes.c_void_p), ref.ctypes.data_as(ctypes.c_void_p),
                               ctypes.c_int64(x.size))
    np.testing.assert_array_equal(quantize(x, "MXFP4"), ref)


# ---- the jitted encoders (quant.device_quant) write the numpy encoders' bytes --------------------

ALL_QTYPES = ("F32", "F16", "BF16") + QTYPES
ROW_KINDS = ("gauss", "equal", "negative", "subscales", "zeros", "grid", "outliers")


@st.composite
def hostile_rows(draw, rows=4, cols=512, min_exp=-40):
    """[rows, cols] float32, each row of a drawn kind and magnitude (1e-5 to 6e4; the last row's from
    10^min_exp, subnormal at the default): rows of one repeated value, negative-only rows, sub-block
    scales over 6 decades, rows sprinkled with +0 and -0, values on a quantization grid (rounding
    ties); never a row of zeros only."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    out = np.empty((rows, cols), np.float64)
    for r in range(rows):
        kind = draw(st.sampled_from(ROW_KINDS))
        # the last row reaches the subnormal range (which device_quant re-encodes on the host); the
        # others stay above its TINY, where the device's own arithmetic is under test
        scale = 10.0 ** draw(st.floats(min_exp if r == rows - 1 else -5, 4.8))
        g = rng.standard_normal(cols)
        if kind == "equal":
            g = np.full(cols, rng.choice([-1.0, 1.0]) * rng.uniform(0.1, 1))
        elif kind == "negative":
            g = -rng.uniform(0.01, 1, cols)
        elif kind == "subscales":
            g = g * np.repeat(10.0 ** rng.uniform(-6, 0, cols // 16), 16)
        elif kind == "zeros":
            g[rng.random(cols) < 0.4] = 0.0
            g[rng.random(cols) < 0.2] = -0.0
            g[0] = 1.0
        elif kind == "grid":
            g = np.round(g * 4) / 4 + rng.choice([0.0, 0.125])
            g[0] = 1.0
        elif kind == "outliers":
            g = g * 1e-3
            g[::97] *= 1e4
        out[r] = g / np.abs(g).max() * min(scale, 65504.0)
    return out.astype(np.float32)


@pytest.mark.parametrize("qtype", ALL_QTYPES)
@settings(max_examples=25, deadline=None)
@given(x=hostile_rows())
def test_device_encoder_writes_the_numpy_bytes(qtype, x):
    from realizar_jax.quant.device_quant import quantize_on_device
    want = quantize(x, qtype)
    got = np.asarray(quantize_on_device(x, qtype))
    assert got.dtype == np.uint8 and got.shape == want.shape
    bad = np.nonzero((got != want).any(axis=1))[0]
    assert not bad.size, f"rows {bad.tolist()} differ"


@pytest.mark.parametrize("qtype", ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"))
@settings(max_examples=25, deadline=None)
@given(x=hostile_rows(min_exp=-28))   # below (and 6 decades of sub-scales), 1/d overflows: gguf-py then casts NaN
def test_legacy_encoders_write_gguf_py_bytes(qtype, x):
    x = np.where(x == 0, np.float32(0), x)   # gguf-py's np.min/np.max may keep either zero of a +-0 tie
    np.testing.assert_array_equal(quantize(x, qtype), gq.quantize(x, GT[qtype]))


def test_device_quantize_chunks_and_rejects_what_numpy_rejects(monkeypatch):
    from realizar_jax.quant import device_quant
    from realizar_jax.quant.device_quant import quantize_on_device
    monkeypatch.setattr(device_quant, "CHUNK_VALUES", 1024)   # 2 rows a chunk, the last one padded
    x = make_values(3, "gauss", 2.0, rows=7, cols=256 + 256)
    np.testing.assert_array_equal(np.asarray(quantize_on_device(x, "Q8_0")), quantize(x, "Q8_0"))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_on_device(np.where(np.arange(512) == 3, np.inf, x), "Q8_0")
    with pytest.raises(ValueError, match="65504"):
        quantize_on_device(x * 1e5, "Q4_0")
    with pytest.raises(ValueError, match="multiple of the Q8_0 block size"):
        quantize_on_device(x[:, :100], "Q8_0")
    with pytest.raises(ValueError, match="cannot quantize to Q3_K"):
        quantize_on_device(x, "Q3_K")
