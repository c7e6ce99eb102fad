"""Attention over the KV cache. The jnp versions here are the reference and the CPU path; on a GPU
the decode functions hand over to Pallas kernels with the same contracts (kernels/attention.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .layers import apply_rope

NEG_INF = -1e30  # finite, so a fully masked row gives a uniform (not NaN) softmax


def _gpu_kernel(name: str):
    """kernels.attention.<name> on a GPU backend with Pallas importable, else None (the jnp path)."""
    if jax.default_backend() != "gpu":
        return None
    try:
        from .kernels import attention as kernels
    except ImportError:
        return None
    return getattr(kernels, name)


def _update_in_kernel() -> bool:
    """REALIZAR_ATTN_UPDATE=kernel, and the cache stack is read in place (REALIZAR_ATTN_INPLACE=1)."""
    from .kernels.switches import switch
    return switch("REALIZAR_ATTN_UPDATE") == "kernel" and switch("REALIZAR_ATTN_INPLACE") == "1"


def decode_attention_ref(q, k_cache, v_cache, lengths, scale):
    """q [B, Hq, D]; k/v_cache [B, Hkv, S, D]; lengths [B] valid positions (incl. current). -> [B, Hq, D]."""
    b, hq, d = q.shape
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(b, hkv, hq // hkv, d).astype(jnp.float32)
    scores = jnp.einsum("bhgd,bhsd->bhgs", qg, k_cache.astype(jnp.float32)) * scale
    valid = jnp.arange(s)[None, :] < lengths[:, None]  # [B, S]
    scores = jnp.where(valid[:, None, None, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgs,bhsd->bhgd", probs, v_cache.astype(jnp.float32))
    return out.reshape(b, hq, d).astype(q.dtype)


def decode_attention(q, k_cache, v_cache, lengths, scale, layer: int | None = None):
    """Caches [B, Hkv, S, D], or the whole stack [L, B, Hkv, S, D] with `layer` naming one.

    With REALIZAR_ATTN_INPLACE=1 (the default) the GPU kernel reads that layer of the stack in
    place. With 0 the layer is sliced out first, which XLA does by copying it (every layer, every
    step: 2 x 2 MB per layer at 1,024 positions for Llama-3-8B; BENCHMARKS.md).
    """
    kernel = _gpu_kernel("decode_attention")
    if kernel is not None:
        from .kernels.switches import switch
        if layer is not None and switch("REALIZAR_ATTN_INPLACE") == "1":
            return kernel(q, k_cache, v_cache, lengths, scale, layer=layer)
        if layer is not None:
            k_cache, v_cache = k_cache[layer], v_cache[layer]
        return kernel(q, k_cache, v_cache, lengths, scale)
    if layer is not None:
        k_cache, v_cache = k_cache[layer], v_cache[layer]
    return decode_attention_ref(q, k_cache, v_cache, lengths, scale)


def decode_attention_update_ref(q, k, v, k_cache, v_cache, pos, cos, sin, scale, layer: int):
    """One decode step's attention with its cache update, in XLA ops.

    q [B, Hq, D], k/v [B, Hkv, D]: the new token's projections before RoPE; k/v_cache: the stacks
    [L, B, Hkv, S, D]; pos [B]: the new token's position (= the valid positions before it); cos/sin
    [B, D]: rope_tables at pos. Rotates q and k, writes k and v at pos in layer `layer`, attends over
    positions <= pos. -> (out [B, Hq, D], k_cache, v_cache).
    """
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rows = jnp.arange(q.shape[0])
    k_cache = k_cache.at[layer, rows, :, pos].set(k.astype(k_cache.dtype))
    v_cache = v_cache.at[layer, rows, :, pos].set(v.astype(v_cache.dtype))
    return decode_attention(q, k_cache, v_cache, pos + 1, scale, layer=layer), k_cache, v_cache


def decode_attention_update(q, k, v, k_cache, v_cache, pos, cos, sin, scale, layer: int):
    """decode_attention_update_ref's contract; on a GPU with REALIZAR_ATTN_UPDATE=kernel (the default)
    the RoPE and the cache writes run inside the attention kernel (kernels/attention.py), one launch
    where XLA takes about seven. With "xla" (or REALIZAR_ATTN_INPLACE=0) XLA rotates and writes and
    the kernel only attends."""
    kernel = _gpu_kernel("decode_attention_update")
    if kernel is not None and _update_in_kernel():
        return kernel(q, k, v, k_cache, v_cache, pos, cos, sin, scale, layer)
    return decode_attention_update_ref(q, k, v, k_cache, v_cache, pos, cos, sin, scale, layer)


def decode_attention_output(q, k, v, k_cache, v_cache, pos, cos, sin, scale, layer: int, wo, *, sync=None,
                            unsummed: bool = False):
    """The decode step's attention through its output projection: decode_attention_update, then
    matmul(out [B, Hq * D], wo). -> (delta [B, hidden], k_cache, v_cache, sync).

    sync: the step's counters (attention_sync(k_cache), threaded through the layers; None: none).
    On the GPU the attention kernel's split-K partials are merged inside the kernel that quantizes the
    o projection's activations (REALIZAR_ATTN_MERGE=prep, the default, packed wo) or inside the
    attention launch itself (=kernel: its last split merges them, counting in sync); see
    kernels/attention.py decode_attention_output. unsummed=True: delta may be the o GEMV's K-split
    partials (a SplitSum), for quant.matmul.residual_normed_matmul_many."""
    from .quant.matmul import matmul, matmul_unsummed
    kernel = _gpu_kernel("decode_attention_output")
    if kernel is not None and _update_in_kernel():
        res = kernel(q, k, v, k_cache, v_cache, pos, cos, sin, scale, layer, wo, sync=sync, unsummed=unsummed)
        if res is not None:
            return res
    out, k_cache, v_cache = decode_attention_update(q, k, v, k_cache, v_cache, pos, cos, sin, scale, layer)
    return (matmul_unsummed if unsummed else matmul)(out.reshape(out.shape[0], -1), wo), k_cache, v_cache, sync


def attention_sync(k_cache):
    """Per-step scratch for decode_attention_output: zeroed counters [L, B, Hkv] int32 (one launch per
    step), in which each layer's attention kernel counts its finished splits."""
    L, B, Hkv = k_cache.shape[:3]
    return jnp.zeros((L, B, Hkv), jnp.int32)


def prefill_attention(q, k, v, lengths, scale):
    """Causal attention within a prompt. q [B, T, Hq, D]; k, v [B, T, Hkv, D]; lengths [B]. -> [B, T, Hq, D].

    Key j is visible to query i when j <= i and j < lengths[b]; padded queries compute junk nobody reads.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d).astype(jnp.float32)
    scores = jnp.einsum("bthgd,bshd->bhgts", qg, k.astype(jnp.float32)) * scale
    pos = jnp.arange(t)
    visible = (pos[None, :] <= pos[:, None])[None] & (pos[None, None, :] < lengths[:, None, None])  # [B, T, S]
    scores = jnp.where(visible[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgts,bshd->bthgd", probs, v.astype(jnp.float32))
    return out.reshape(b, t, hq, d).astype(q.dtype)
