"""The models as pure functions over (params, cache, tokens), and the registry of families.

One layer loop serves prefill and decode: the attention object (PrefillAttention or
DecodeAttention) is the varying part. A family module (llama.py) gives `embed`, `block` and
`head`; FAMILIES maps ModelConfig.architecture to it. The KernelConfig is a static argument of the
entry points (jit specializes on it, as on the ModelConfig), made current while the ops trace.
"""
from __future__ import annotations

from types import ModuleType

import jax
import jax.numpy as jnp

from ..cache import KVCache
from ..config import ModelConfig
from ..ops.attention import DecodeAttention, ExtendAttention, PrefillAttention, Rope
from ..ops.fused import Stream
from ..ops.routes import KernelConfig, using
from ..weights import Params
from . import gemma, gpt_oss, llama, moe, olmo2

FAMILIES: dict[str, ModuleType] = {"llama": llama, "mistral": llama, "qwen2": llama, "qwen3": llama,
                                   "olmo2": olmo2, "phi3": llama, "gemma2": gemma, "gemma3": gemma,
                                   "mixtral": moe, "qwen3moe": moe, "gptoss": gpt_oss}


def family(config: ModelConfig) -> ModuleType:
    try:
        return FAMILIES[config.architecture]
    except KeyError:
        raise ValueError(f"no model family for architecture {config.architecture!r} "
                         f"(known: {', '.join(sorted(FAMILIES))})") from None


def rope(params: Params, config: ModelConfig) -> Rope:
    """The RoPE tables' parts: the weights' inverse frequencies, longrope's or YaRN's attention factor, Gemma 3's
    local ones."""
    s = config.rope_scaling
    factor = s.attention_factor if s is not None and s.kind in ("longrope", "yarn") else 1.0
    return Rope(params.rope_inv_freq, factor, params.rope_local_inv_freq)


def layers(params: Params, x, attention, config: ModelConfig):
    """The layer loop: (the residual stream after the last block, attention with every layer's cache)."""
    block = family(config).block
    x = Stream(x)
    for i, lp in enumerate(params.layers):
        with jax.named_scope(f"layer{i}"):
            x, attention = block(lp, x, attention.at_layer(i), config)
    return x, attention


def prefill(params: Params, cache: KVCache, tokens, lengths, *, config: ModelConfig, dtype=None,
            kernels: KernelConfig = KernelConfig(), all_logits: bool = False):
    """Run prompts [B, T] (right-padded; lengths [B] real tokens) from position 0 and fill the cache.

    Returns (logits, cache): logits [B, T, V] if all_logits else [B, V] at each prompt's last token.
    """
    dtype = jnp.dtype(dtype or cache.k.dtype)
    with using(kernels):
        x = family(config).embed(params, tokens, config, dtype)
    return prefill_embeddings(params, cache, x, lengths, config=config, kernels=kernels, all_logits=all_logits)


def prefill_embeddings(params: Params, cache: KVCache, x, lengths, *, config: ModelConfig,
                       kernels: KernelConfig = KernelConfig(), all_logits: bool = False):
    """prefill() from input embeddings x [B, T, hidden] instead of token ids: what jax.grad differentiates
    for input attribution (weights, packed ones included, stay constants)."""
    with using(kernels):
        attention = PrefillAttention.start(cache, rope(params, config), lengths, x.shape[1], config.attn_scale)
        x, attention = layers(params, x, attention, config)
        if not all_logits:   # the head reads each prompt's last real position only
            last = jnp.take_along_axis(x.value(), jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
            x = Stream(last)
        return family(config).head(params, x, config), attention.cache()


def extend(params: Params, cache: KVCache, tokens, start, lengths, *, config: ModelConfig, dtype=None,
           kernels: KernelConfig = KernelConfig()):
    """Continue prompts with a chunk tokens [B, C] at positions start [B] (the cache holds the earlier
    positions); lengths [B] real tokens of the chunk. Returns (logits [B, V] at each chunk's last real
    token, cache with lengths start + lengths): chunked prefill of prompts longer than one chunk."""
    dtype = jnp.dtype(dtype or cache.k.dtype)
    fam = family(config)
    with using(kernels):
        x = fam.embed(params, tokens, config, dtype)
        attention = ExtendAttention.begin(cache, rope(params, config), start, lengths, tokens.shape[1],
                                          config.attn_scale)
        x, attention = layers(params, x, attention, config)
        last = jnp.take_along_axis(x.value(), jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
        return fam.head(params, Stream(last), config), attention.cache()


def decode_logits(params: Params, cache: KVCache, tokens, *, config: ModelConfig, dtype=None,
                  kernels: KernelConfig = KernelConfig()):
    """One token per sequence [B] at position cache.lengths -> (logits [B, V] float32, cache with lengths + 1)."""
    dtype = jnp.dtype(dtype or cache.k.dtype)
    fam = family(config)
    with using(kernels):
        x = fam.embed(params, tokens, config, dtype)
        attention = DecodeAttention.start(cache, rope(params, config), config.attn_scale)
        x, attention = layers(params, x, attention, config)
        return fam.head(params, x, config), attention.cache()
