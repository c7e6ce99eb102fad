"""On-device sampling: filters against HF transformers' logits processors, draw properties, no recompiles."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from realizar_jax.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filter_logits,
    make_sampling_params,
    sample,
    seen_mask_from_tokens,
    update_seen_mask,
)

B, V = 4, 64  # fixed shapes: every hypothesis example reuses the same compiled functions
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_filter = jax.jit(filter_logits)
_penalize = jax.jit(apply_repetition_penalty)
_seen = jax.jit(seen_mask_from_tokens, static_argnums=1)
_update = jax.jit(update_seen_mask)
T = 40  # token rows are padded to T; `lengths` varies what counts
_sample = jax.jit(sample)
# Many independent draws of the same rows in one call: vmap over keys.
_draws = jax.jit(jax.vmap(sample, in_axes=(None, None, 0, None)))


def _logits(seed: int, scale: float, b: int = B, v: int = V) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, v)).astype(np.float32) * np.float32(scale)
    assert np.all(x != 0)
    return x


def _keys(seed: int, n: int):
    return jax.random.split(jax.random.key(seed), n)


def row_floats(lo, hi):
    """One float32-representable value per row."""
    f32 = st.floats(lo, hi).map(lambda f: float(np.float32(f)))
    return st.lists(f32, min_size=B, max_size=B)


# ---------------------------------------------------------------- draw properties

@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.5, 4.0),
       ks=st.lists(st.integers(1, 8), min_size=B, max_size=B), temps=row_floats(0.3, 3.0))
def test_top_k_never_samples_outside_top_k(seed, scale, ks, temps):
    x = _logits(seed, scale)
    params = make_sampling_params(B, temperature=temps, top_k=ks)
    toks = np.asarray(_draws(jnp.asarray(x), params, _keys(seed, 400), None))  # [400, B]
    for b in range(B):
        top = set(np.argsort(-x[b])[: ks[b]].tolist())
        drawn = set(toks[:, b].tolist())
        assert drawn <= top, (b, ks[b], drawn - top)
        z = np.sort(x[b].astype(np.float64))[::-1] / np.float32(temps[b])
        if ks[b] > 1 and np.exp(z[1] - z[0]) > 0.05:
            assert len(drawn) > 1  # it does sample, not just argmax


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.5, 4.0), ps=row_floats(0.05, 0.99),
       temps=row_floats(0.3, 3.0))
def test_top_p_kept_mass_and_minimality(seed, scale, ps, temps):
    x = _logits(seed, scale)
    kept = np.isfinite(np.asarray(_filter(jnp.asarray(x), make_sampling_params(B, temperature=temps, top_p=ps))))
    for b in range(B):
        z = x[b].astype(np.float64) / np.float32(temps[b])
        prob = np.exp(z - z.max())
        prob /= prob.sum()
        mass = prob[kept[b]].sum()
        assert kept[b, np.argmax(prob)]
        # Kept tokens are the most probable ones.
        assert prob[kept[b]].min() > prob[~kept[b]].max(initial=-1.0)
        # Enough mass (up to float32 rounding), and minimal: dropping the least likely kept token falls short.
        assert mass >= ps[b] - 1e-5
        assert mass - prob[kept[b]].min() < ps[b] + 1e-5


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.5, 4.0), mins=row_floats(0.01, 0.9))
def test_min_p_keeps_tokens_above_scaled_max(seed, scale, mins):
    x = _logits(seed, scale)
    kept = np.isfinite(np.asarray(_filter(jnp.asarray(x), make_sampling_params(B, temperature=1.0, min_p=mins))))
    for b in range(B):
        ratio = np.exp(x[b].astype(np.float64) - x[b].max())  # prob / max prob
        far = np.abs(ratio - mins[b]) > 1e-5
        np.testing.assert_array_equal(kept[b][far], (ratio >= mins[b])[far])


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.5, 4.0), pens=row_floats(0.5, 2.0))
def test_greedy_is_argmax_of_penalized_logits(seed, scale, pens):
    x = _logits(seed, scale)
    rng = np.random.default_rng(seed + 1)
    seen = rng.random((B, V)) < 0.3
    key = jax.random.key(seed)
    params = make_sampling_params(B, temperature=0.0, top_k=3, top_p=0.5, repetition_penalty=pens)
    np.testing.assert_array_equal(np.asarray(_sample(jnp.asarray(x), params, key, None)), x.argmax(-1))
    pen = np.asarray(pens, np.float32)[:, None]
    want = np.where(seen, np.where(x < 0, x * pen, x / pen), x).argmax(-1)
    np.testing.assert_array_equal(np.asarray(_sample(jnp.asarray(x), params, key, jnp.asarray(seen))), want)
    # Mixed batch: greedy rows stay argmax while the others sample.
    mixed = make_sampling_params(B, temperature=[0.0, 5.0, 0.0, 5.0])
    toks = np.asarray(_draws(jnp.asarray(x), mixed, _keys(seed, 400), None))
    np.testing.assert_array_equal(toks[:, [0, 2]], np.broadcast_to(x.argmax(-1)[[0, 2]], (400, 2)))
    assert len(set(toks[:, 1].tolist())) > 1


def test_seed_determinism():
    x = jnp.asarray(_logits(7, 1.0, b=64))
    params = make_sampling_params(64, temperature=1.0, top_k=20, top_p=0.95)
    a = np.asarray(_sample(x, params, jax.random.key(123), None))
    b = np.asarray(_sample(x, params, jax.random.key(123), None))
    c = np.asarray(_sample(x, params, jax.random.key(124), None))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert a.dtype == np.int32 and a.shape == (64,)


def test_draw_frequencies_follow_filtered_distribution():
    v = 8
    x = _logits(11, 1.5, b=1, v=v)
    params = make_sampling_params(1, temperature=0.7, top_k=5, top_p=0.9)
    n = 20000
    toks = np.asarray(jax.jit(jax.vmap(sample, in_axes=(None, None, 0, None)))(
        jnp.asarray(x), params, _keys(5, n), None))[:, 0]
    f = np.asarray(filter_logits(jnp.asarray(x), params))[0]
    want = np.where(np.isfinite(f), np.exp(f - f.max()), 0.0)
    want /= want.sum()
    got = np.bincount(toks, minlength=v) / n
    assert np.all(got[want == 0] == 0)
    assert np.abs(got - want).max() < 4 * np.sqrt(0.25 / n) + 1e-3


# ---------------------------------------------------------------- equality with HF transformers

@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.5, 8.0), pens=row_floats(0.3, 3.0),
       t=st.integers(1, T))
def test_repetition_penalty_equals_hf(seed, scale, pens, t):
    x = _logits(seed, scale)
    rng = np.random.default_rng(seed + 2)
    ids = rng.integers(0, V, (B, T))
    seen = _seen(jnp.asarray(ids), V, jnp.full((B,), t))
    ids = ids[:, :t]
    params = make_sampling_params(B, repetition_penalty=pens)
    got = np.asarray(_penalize(jnp.asarray(x), params.repetition_penalty, seen))
    for b in range(B):
        proc = RepetitionPenaltyLogitsProcessor(penalty=float(np.float32(pens[b])))
        want = proc(torch.from_numpy(ids[b : b + 1]), torch.from_numpy(x[b : b + 1].copy())).numpy()[0]
        # XLA turns x / penalty into x * (1 / penalty): equal to HF within one float32 ulp.
        np.testing.assert_allclose(got[b], want, rtol=2.5e-7, atol=0)
        np.testing.assert_array_equal(got[b] != x[b], want != x[b])


def _hf_filter(row: np.ndarray, temp: float, k: int, p: float, m: float) -> np.ndarray:
    s = torch.from_numpy(row[None].copy())
    ids = torch.zeros((1, 1), dtype=torch.long)
    if temp > 0:
        s = TemperatureLogitsWarper(float(temp))(ids, s)
    if k > 0:
        s = TopKLogitsWarper(int(k))(ids, s)
    if p < 1:
        s = TopPLogitsWarper(float(p))(ids, s)
    if m > 0:
        s = MinPLogitsWarper(float(m))(ids, s)
    return s.numpy()[0]


def _near_boundary(row, temp, k, p, m) -> bool:
    """True when float rounding could legitimately flip a top-p / min-p decision (ties to the threshold)."""
    z = row.astype(np.float64) / (temp if temp > 0 else 1.0)
    if k > 0:
        z = np.where(z >= np.sort(z)[-min(k, z.size)], z, -np.inf)
    if p < 1:
        pr = np.exp(z - z.max())
        pr /= pr.sum()
        cum = np.cumsum(np.sort(pr))
        if np.any(np.abs(cum - (1 - p)) < 1e-5):
            return True
        drop = np.sort(z)[np.searchsorted(cum, 1 - p, side="right") :]
        z = np.where(z >= drop[0], z, -np.inf)
    if m > 0:
        ratio = np.exp(z - z.max())
        if np.any(np.abs(ratio - m) < 1e-5):
            return True
    return False


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.5, 6.0),
       temps=st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.7]), min_size=B, max_size=B),
       ks=st.lists(st.sampled_from([0, 1, 5, 20, V, V + 10]), min_size=B, max_size=B),
       ps=st.lists(st.sampled_from([1.0, 0.3, 0.8, 0.95]), min_size=B, max_size=B),
       mins=st.lists(st.sampled_from([0.0, 0.05, 0.2]), min_size=B, max_size=B))
def test_filters_equal_hf_warpers(seed, scale, temps, ks, ps, mins):
    x = _logits(seed, scale)
    assume(not any(_near_boundary(x[b], temps[b], ks[b], ps[b], mins[b]) for b in range(B)))
    got = np.asarray(_filter(jnp.asarray(x), make_sampling_params(B, temps, ks, ps, mins)))
    for b in range(B):
        want = _hf_filter(x[b], temps[b], ks[b], ps[b], mins[b])
        np.testing.assert_array_equal(np.isfinite(got[b]), np.isfinite(want), err_msg=f"row {b}")
        np.testing.assert_allclose(got[b][np.isfinite(got[b])], want[np.isfinite(want)], rtol=1e-6)


# ---------------------------------------------------------------- compile once

def test_changing_params_does_not_recompile():
    traces = []

    def step(logits, params, key, seen):
        traces.append(1)  # runs only while tracing
        tok = sample(logits, params, key, seen)
        return tok, update_seen_mask(seen, tok)

    f = jax.jit(step)
    x = jnp.asarray(_logits(3, 2.0))
    seen = jnp.zeros((B, V), jnp.bool_)
    settings_list = [
        dict(temperature=0.0),
        dict(temperature=1.0),
        dict(temperature=[0.0, 0.5, 1.0, 2.0], top_k=[0, 1, 7, 64]),
        dict(temperature=0.8, top_p=[0.1, 0.5, 0.9, 1.0], min_p=0.1),
        dict(temperature=1.3, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=[1.0, 1.1, 1.3, 0.8]),
    ]
    for i, kw in enumerate(settings_list * 2):
        tok, seen = f(x, make_sampling_params(B, **kw), jax.random.key(i), seen)
    assert len(traces) == 1
    assert f._cache_size() == 1
    assert np.asarray(seen).sum(axis=1).min() >= 1


# ---------------------------------------------------------------- helpers and validation

@SETTINGS
@given(seed=st.integers(0, 2**31 - 1))
def test_seen_mask_from_tokens_and_update(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, T))
    lengths = rng.integers(0, T + 1, B)
    got = np.asarray(_seen(jnp.asarray(ids), V, jnp.asarray(lengths)))
    want = np.zeros((B, V), bool)
    for b in range(B):
        want[b, ids[b, : lengths[b]]] = True
    np.testing.assert_array_equal(got, want)
    new = rng.integers(0, V, B)
    upd = np.asarray(_update(jnp.asarray(got), jnp.asarray(new, jnp.int32)))
    want[np.arange(B), new] = True
    np.testing.assert_array_equal(upd, want)


def test_sampling_params_are_a_pytree_of_arrays():
    p = make_sampling_params(3, temperature=[0.0, 1.0, 0.5], top_k=4)
    leaves = jax.tree_util.tree_leaves(p)
    assert len(leaves) == 5 and all(leaf.shape == (3,) for leaf in leaves)
    assert p.top_k.dtype == jnp.int32 and p.temperature.dtype == jnp.float32
    assert isinstance(jax.tree_util.tree_map(lambda a: a, p), SamplingParams)


@pytest.mark.parametrize("kw, name", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(min_p=-0.2), "min_p"),
    (dict(min_p=1.1), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(temperature=[1.0, 2.0]), "temperature"),  # wrong number of rows
    (dict(top_k="many"), "top_k"),
])
def test_bad_params_name_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        make_sampling_params(3, **kw)
    with pytest.raises(ValueError, match="batch"):
        make_sampling_params(0)
