"""On-device sampling: repetition penalty, temperature, top-k, top-p, min-p, then a categorical draw.

Every sampling knob is a per-row array in `SamplingParams`, never a static argument, so one compiled decode
step serves any mix of settings: changing them recompiles nothing. The processing order is the one HF
transformers' generate() uses: repetition penalty, temperature, top-k, top-p, min-p.

The filters share one ascending sort of each row. Each filter removes a prefix of that sorted row, so each
becomes a threshold value, and the final mask is `logit >= max(thresholds)`: no scatter back to vocab order.
(Exact ties at a threshold are all kept; HF keeps an arbitrary subset of them.)
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """Per-row sampling settings; every field is a jnp array of shape [batch]."""

    temperature: jax.Array  # float32; 0 => greedy (argmax of the penalized logits)
    top_k: jax.Array  # int32; 0 => off
    top_p: jax.Array  # float32 in (0, 1]; 1 => off
    min_p: jax.Array  # float32 in [0, 1]; 0 => off
    repetition_penalty: jax.Array  # float32 > 0; 1 => off

    @property
    def batch(self) -> int:
        return self.temperature.shape[0]


_FIELDS = ["temperature", "top_k", "top_p", "min_p", "repetition_penalty"]
jax.tree_util.register_dataclass(SamplingParams, data_fields=_FIELDS, meta_fields=[])


def _per_row(name: str, value, batch: int, dtype) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{name} must be a number or a sequence of {batch} numbers, got {value!r}")
    if arr.ndim == 0:
        arr = np.full((batch,), arr)
    elif arr.shape != (batch,):
        raise ValueError(f"{name} must be a number or have one value per row ({batch}), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if dtype == np.int32 and not np.all(arr == np.round(arr)):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if dtype == np.int32 and np.any(np.abs(arr) >= 2**31):
        raise ValueError(f"{name} must be below 2**31, got {value!r}")
    return arr.astype(dtype)


def make_sampling_params(batch: int, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                         repetition_penalty=1.0) -> SamplingParams:
    """Validate on the host and build `SamplingParams`; each argument is a scalar or one value per row."""
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    t = _per_row("temperature", temperature, batch, np.float32)
    k = _per_row("top_k", top_k, batch, np.int32)
    p = _per_row("top_p", top_p, batch, np.float32)
    m = _per_row("min_p", min_p, batch, np.float32)
    r = _per_row("repetition_penalty", repetition_penalty, batch, np.float32)
    if np.any(t < 0):
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")
    if np.any(k < 0):
        raise ValueError(f"top_k must be >= 0 (0 means off), got {top_k!r}")
    if np.any((p <= 0) | (p > 1)):
        raise ValueError(f"top_p must be in (0, 1] (1 means off), got {top_p!r}")
    if np.any((m < 0) | (m > 1)):
        raise ValueError(f"min_p must be in [0, 1] (0 means off), got {min_p!r}")
    if np.any(r <= 0):
        raise ValueError(f"repetition_penalty must be > 0 (1 means off), got {repetition_penalty!r}")
    return SamplingParams(*(jnp.asarray(a) for a in (t, k, p, m, r)))


# ---- seen-token mask (for the repetition penalty) ----

def seen_mask_from_tokens(tokens, vocab_size: int, lengths=None) -> jax.Array:
    """bool [B, V]: which token ids occur in each row of `tokens` [B, T] (only the first lengths[b] count)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    b, t = tokens.shape
    valid = (tokens >= 0) & (tokens < vocab_size)
    if lengths is not None:
        valid &= jnp.arange(t)[None, :] < jnp.asarray(lengths)[:, None]
    # Padding and out-of-range ids go to an extra column that is dropped.
    ids = jnp.where(valid, tokens, vocab_size)
    mask = jnp.zeros((b, vocab_size + 1), jnp.bool_).at[jnp.arange(b)[:, None], ids].set(True)
    return mask[:, :vocab_size]


def update_seen_mask(seen_mask: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mark the newly sampled `tokens` [B] as seen."""
    return seen_mask.at[jnp.arange(seen_mask.shape[0]), tokens].set(True)


# ---- logits processors ----

def apply_repetition_penalty(logits: jax.Array, penalty: jax.Array, seen_mask: jax.Array) -> jax.Array:
    """HF's definition: seen tokens with logit < 0 are multiplied by the penalty, the others divided by it."""
    pen = penalty[:, None]
    return jnp.where(seen_mask, jnp.where(logits < 0, logits * pen, logits / pen), logits)


def _softmax_sorted(x_asc: jax.Array) -> jax.Array:
    # The max of an ascending row is its last element; all-(-inf) cannot happen (the top token is always kept).
    e = jnp.exp(x_asc - x_asc[:, -1:])
    return e / jnp.sum(e, axis=-1, keepdims=True)


def filter_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Temperature, top-k, top-p, min-p (in that order); removed tokens become -inf.

    Rows with temperature 0 are returned unscaled (their result is only used for an argmax).
    """
    x = logits.astype(jnp.float32)
    temp = jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]
    x = x / temp
    v = x.shape[-1]
    x_asc = jnp.sort(x, axis=-1)
    neg_inf = jnp.float32(-jnp.inf)

    # top-k: keep values >= the k-th largest.
    k = jnp.clip(params.top_k, 1, v)
    thr_k = jnp.take_along_axis(x_asc, (v - k)[:, None], axis=-1)
    thr = jnp.where(params.top_k[:, None] > 0, thr_k, neg_inf)

    # top-p on the top-k survivors: HF removes the ascending prefix whose cumulative mass is <= 1 - p,
    # never the top token. That prefix's length gives the new threshold's position in the sorted row.
    probs = _softmax_sorted(jnp.where(x_asc >= thr, x_asc, neg_inf))
    cum = jnp.cumsum(probs, axis=-1)
    drop_p = jnp.sum(cum <= (1.0 - params.top_p)[:, None], axis=-1)
    thr_p = jnp.take_along_axis(x_asc, jnp.minimum(drop_p, v - 1)[:, None], axis=-1)
    thr = jnp.where(params.top_p[:, None] < 1.0, jnp.maximum(thr, thr_p), thr)

    # min-p on what is left: drop tokens with prob < min_p * (top prob).
    probs = _softmax_sorted(jnp.where(x_asc >= thr, x_asc, neg_inf))
    drop_m = jnp.sum(probs < params.min_p[:, None] * probs[:, -1:], axis=-1)
    thr_m = jnp.take_along_axis(x_asc, jnp.minimum(drop_m, v - 1)[:, None], axis=-1)
    thr = jnp.where(params.min_p[:, None] > 0.0, jnp.maximum(thr, thr_m), thr)

    return jnp.where(x >= thr, x, neg_inf)


def sample(logits: jax.Array, params: SamplingParams, key: jax.Array,
           seen_mask: jax.Array | None = None) -> jax.Array:
    """Pick one token per row: int32 [B]. `logits` [B, V]; `key` is consumed (split it outside)."""
    logits = logits.astype(jnp.float32)
    if seen_mask is not None:
        logits = apply_repetition_penalty(logits, params.repetition_penalty, seen_mask)
    greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    greedy = params.temperature <= 0

    def draw(_):
        drawn = jax.random.categorical(key, filter_logits(logits, params), axis=-1).astype(jnp.int32)
        return jnp.where(greedy, greedy_tokens, drawn)

    # An all-greedy batch skips the sort entirely (a real branch at run time, not a recompile).
    return jax.lax.cond(jnp.all(greedy), lambda _: greedy_tokens, draw, None)
