"""The paged decode-attention kernel (kernels/paged_attention.py) in Pallas interpret mode against the
jnp reference through the same block tables: ragged lengths, GQA, several splits, pages scattered over
the pool and full pages shared by rows; and the routes that decline features the kernel lacks."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from realizar_jax.kernels.paged_attention import _plan, paged_decode_attention_update
from realizar_jax.kernels.tuning import KernelConfig
from realizar_jax.layers import rope_tables
from realizar_jax.ops.attention import paged_decode_attention_update_ref
from realizar_jax.ops.routes import paged_decode_attention_kernel, using

# (batch, kv heads, heads per kv head, head dim, page size, table entries, dtype, tile override)
SHAPES = {
    "gqa3-splits": (3, 2, 3, 32, 16, 8, jnp.float32, ()),
    "gqa8-page-blocks-bf16": (2, 1, 8, 64, 8, 8, jnp.bfloat16, (("PAGED_ATTN", (16, 2, 4, 2)),)),
}


def _case(shape, lengths, share, seed):
    B, Hkv, G, D, ps, max_pages, dtype, _ = shape
    rng = np.random.default_rng(seed)
    pages = 1 + B * max_pages
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731  fresh data, never zeros
    q, k, v = f(B, Hkv * G, D), f(B, Hkv, D), f(B, Hkv, D)
    k_pages, v_pages = f(2, pages, Hkv, ps, D), f(2, pages, Hkv, ps, D)
    pos = np.asarray(lengths, np.int32)
    free = list(rng.permutation(np.arange(1, pages)))
    tables = np.zeros((B, max_pages), np.int32)   # entries a row does not hold: the null page
    for b in range(B):
        tables[b, :pos[b] // ps + 1] = [free.pop() for _ in range(pos[b] // ps + 1)]
    if share:   # row 1 reads row 0's first page where both have it full (no one writes a shared page)
        if B > 1 and pos[0] >= ps and pos[1] >= ps:
            tables[1, 0] = tables[0, 0]
    inv = jnp.asarray(1.0 / 10000 ** (np.arange(D // 2) * 2 / D), jnp.float32)
    cos, sin = rope_tables(inv, jnp.asarray(pos))
    return q, k, v, k_pages, v_pages, jnp.asarray(tables), jnp.asarray(pos), cos, sin


@pytest.mark.parametrize("name", list(SHAPES))
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_paged_kernel_matches_reference(name, data):
    shape = SHAPES[name]
    B, _, _, _, ps, max_pages, dtype, tiles = shape
    lengths = data.draw(st.lists(st.integers(0, max_pages * ps - 1), min_size=B, max_size=B), label="lengths")
    args = _case(shape, lengths, data.draw(st.booleans(), label="share"), data.draw(st.integers(0, 2**16)))
    cfg = KernelConfig(interpret=True, tiles=tiles)
    got = paged_decode_attention_update(*args, 0.3, 1, cfg=cfg)
    assert got is not None
    want = paged_decode_attention_update_ref(*args, 0.3, 1)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32), atol=tol, rtol=tol)
    for g, w in zip(got[1:], want[1:]):   # the new k/v land in the same page slots (RoPE rounding aside)
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=tol, rtol=tol)


def test_plan_splits_pages_and_declines_what_it_cannot_tile():
    G, gp, ppb, splits, pps = _plan((1, 32, 128), (32, 9000, 8, 16, 128), (1, 256), 64, None)
    assert (G, gp, ppb) == (4, 16, 4) and splits * pps == 256 and pps % ppb == 0 and splits > 1
    assert _plan((1, 32, 96), (32, 9000, 8, 16, 96), (1, 256), 64, None) is None        # head dim not 2^k
    assert _plan((1, 32, 128), (32, 9000, 8, 16, 128), (1, 258), 64, None) is None      # table not in blocks


def test_route_declines_softcap_window_and_partial_rope():
    shape = SHAPES["gqa3-splits"]
    args = list(_case(shape, [3, 40, 100], False, 0))
    wo = jnp.ones((8, 3 * 2 * 32), jnp.float32)
    with using(KernelConfig(interpret=True)):
        assert paged_decode_attention_kernel(*args, 0.3, 1, wo, None, softcap=30.0) is None
        assert paged_decode_attention_kernel(*args, 0.3, 1, wo, None, window=8) is None
        args[-2], args[-1] = args[-2][:, :16], args[-1][:, :16]
        assert paged_decode_attention_kernel(*args, 0.3, 1, wo, None) is None


def test_bad_operands_are_named():
    args = list(_case(SHAPES["gqa3-splits"], [3, 40, 100], False, 0))
    with pytest.raises(ValueError, match="layer 5"):
        paged_decode_attention_update(*args, 0.3, 5, cfg=KernelConfig(interpret=True))
    args[5] = args[5][:2]
    with pytest.raises(ValueError, match="tables"):
        paged_decode_attention_update(*args, 0.3, 1, cfg=KernelConfig(interpret=True))


@pytest.mark.gpu
@pytest.mark.parametrize("batch, longest, page_size", [(1, 4095, 16), (32, 4095, 16), (32, 1000, 32)])
def test_paged_kernel_compiled_matches_reference_at_llama3_8b_shapes(batch, longest, page_size):
    """Compiled for the GPU (Triton): 8 kv heads of 4 query heads, head dim 128, bf16, ragged rows up to
    `longest` positions over 4,096-position tables; the merge-free partials merge to the same output."""
    from realizar_jax.kernels.attention import _merge
    rng = np.random.default_rng(batch)
    max_pages = 4096 // page_size
    shape = (batch, 8, 4, 128, page_size, max_pages, jnp.bfloat16, ())
    lengths = [int(x) for x in rng.integers(0, longest + 1, batch)]
    lengths[0] = longest
    args = _case(shape, lengths, True, batch)
    cfg = KernelConfig(pallas=True)
    got = paged_decode_attention_update(*args, 128 ** -0.5, 1, cfg=cfg)   # the pools hold 2 layers
    want = paged_decode_attention_update_ref(*args, 128 ** -0.5, 1)
    np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32), atol=2e-2, rtol=2e-2)
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=2e-2, rtol=2e-2)
    (o, m, l), _, _ = paged_decode_attention_update(*args, 128 ** -0.5, 1, cfg=cfg, merge=False)
    np.testing.assert_allclose(np.asarray(_merge(o, m, l, 4, jnp.bfloat16), np.float32), np.asarray(got[0], np.float32),
                               atol=1e-2, rtol=1e-2)
