"""The frozen, hashable model config. jit specializes on it, so it holds only static facts.

Built from GGUF metadata (formats.gguf_file) or an HF config.json (formats.hf_dir); both land here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "phi3", "gemma2", "gemma3", "mixtral",
                           "qwen3moe", "gptoss")
MOE_ARCHITECTURES = ("mixtral", "qwen3moe", "gptoss")   # every layer's MLP is a routed mixture of experts
MOE_ROUTERS = ("softmax_topk", "topk_softmax")
LAYER_TYPES = ("full_attention", "sliding_attention")
MAX_SIZE = 2**24  # bound on every size and on the context length: far above any real model, far below overflow


class ConfigValueError(ValueError):
    """A config field out of range; `field` names it (dotted for rope_scaling) so a reader can name its own key."""

    def __init__(self, field: str, value, why: str):
        self.field, self.value, self.why = field, value, why
        super().__init__(f"{field} = {value!r:.60} {why}")


def _finite_positive(obj, field: str, prefix: str = "") -> None:
    """Check obj.field is a finite number > 0 and store it as a float (an int too large for one is refused)."""
    value = getattr(obj, field)
    try:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(float(value))
    except OverflowError:
        ok = False
    if not ok or value <= 0:
        raise ConfigValueError(prefix + field, value, "must be a finite number > 0")
    object.__setattr__(obj, field, float(value))


def _f32(value: float) -> float:
    """value rounded to float32, as the shortest decimal that round-trips (1.1, not 1.100000023841858): what
    the GGUF reader makes of a float32 too."""
    return float(str(np.float32(value)))


def _size(obj, field: str, prefix: str = "") -> None:
    value = getattr(obj, field)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIZE:
        raise ConfigValueError(prefix + field, value, f"must be an integer in 1..{MAX_SIZE}")


def yarn_attention_factor(factor, mscale=None, mscale_all_dim=None) -> float:
    """YaRN's default attention factor (transformers' get_mscale): 0.1 * ln(factor) + 1 (1 for factor <= 1),
    or the ratio of two such with mscale / mscale_all_dim where both are given; NaN for a bad factor (the
    RopeScaling check then names it)."""
    def mscale_of(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    try:
        if mscale and mscale_all_dim:
            return float(mscale_of(factor, mscale) / mscale_of(factor, mscale_all_dim))
        return float(mscale_of(factor))
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return math.nan


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. kind: 'linear', 'llama3' (Llama 3.1+ wavelength-dependent scaling),
    'longrope' (Phi-3: per-frequency divisors, `short_factor` within the original context and `long_factor`
    beyond it, and cos/sin multiplied by `attention_factor`) or 'yarn' (gpt-oss: the frequencies between
    the `beta_fast` and `beta_slow` rotation counts of the original context ramp from extrapolated to
    interpolated by `factor`, the ramp's ends rounded outwards when `truncate`; cos/sin multiplied by
    `attention_factor`)."""

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context_length: int = 8192
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True

    def __post_init__(self):
        for name in ("factor", "low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast", "beta_slow"):
            _finite_positive(self, name, "rope_scaling.")
        if not isinstance(self.truncate, bool):
            raise ConfigValueError("rope_scaling.truncate", self.truncate, "must be true or false")
        if self.attention_factor >= 3e38:
            raise ConfigValueError("rope_scaling.attention_factor", self.attention_factor, "must be finite in float32")
        _size(self, "original_context_length", "rope_scaling.")
        if self.kind == "llama3" and not self.low_freq_factor < self.high_freq_factor:
            raise ConfigValueError("rope_scaling.high_freq_factor", self.high_freq_factor,
                                   f"must be greater than low_freq_factor ({self.low_freq_factor})")
        if self.kind == "longrope":
            for name in ("short_factor", "long_factor"):
                values = getattr(self, name)
                try:
                    values = tuple(float(v) for v in values)
                    ok = all(0 < v < 3e38 for v in values) and 0 < len(values) <= MAX_SIZE   # finite in float32
                except (TypeError, ValueError, OverflowError):
                    ok = False
                if not ok or any(isinstance(v, bool) for v in getattr(self, name)):
                    raise ConfigValueError(f"rope_scaling.{name}", getattr(self, name),
                                           "must be a list of finite numbers > 0")
                # float32, as transformers computes with them and GGUF stores them: both readers agree
                object.__setattr__(self, name, tuple(_f32(v) for v in values))
            object.__setattr__(self, "attention_factor", _f32(self.attention_factor))
            if len(self.short_factor) != len(self.long_factor):
                raise ConfigValueError("rope_scaling.long_factor", self.long_factor,
                                       f"must have as many entries as short_factor ({len(self.short_factor)})")

    def factors(self, long: bool) -> tuple[float, ...] | None:
        """longrope's per-frequency divisors: the long set (beyond the original context) or the short one."""
        return self.long_factor if long else self.short_factor


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    context_length: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False  # qwen2: biases on q/k/v projections
    qk_norm: bool = False  # RMSNorm on q and k before RoPE: per head (qwen3, gemma3), whole projection (olmo2)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    add_bos: bool = True
    # Attention variants (None: off). sliding_window: a query at position i sees keys i-w+1..i on the
    # layers whose layer_types entry is "sliding_attention" (layer_types None: every layer, as Mistral).
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    attn_softcap: float | None = None  # attention logits -> c * tanh(logits / c) (Gemma 2)
    final_softcap: float | None = None  # LM-head logits -> c * tanh(logits / c) (Gemma 2 and 3)
    query_pre_attn_scalar: float | None = None  # attention scale is its -1/2 power (Gemma); None: head_dim's
    rope_local_theta: float | None = None  # RoPE base of the sliding layers, unscaled (Gemma 3)
    rope_dim: int | None = None  # dimensions of each head that RoPE rotates (Phi-4-mini 0.75); None: head_dim
    # Mixture of experts (MOE_ARCHITECTURES; None elsewhere): each token's MLP is the weighted sum of
    # experts_per_token of num_experts gated MLPs of width expert_intermediate_size (None: intermediate_size),
    # chosen by a softmax router; norm_topk_prob renormalizes the chosen weights to sum to 1.
    num_experts: int | None = None
    experts_per_token: int | None = None
    expert_intermediate_size: int | None = None
    norm_topk_prob: bool = True
    # gpt-oss: moe_router "topk_softmax" (the top_k logits first, then their softmax; "softmax_topk": the
    # softmax over every expert, then its top_k), biases on the router and the experts (moe_bias), the
    # experts' clamped SwiGLU (swiglu_limit / swiglu_alpha: see layers.clamped_swiglu), a bias on the
    # attention's output projection (attn_out_bias) and a learned logit per head in the softmax's
    # denominator (attn_sinks).
    moe_router: str = "softmax_topk"
    moe_bias: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float | None = None
    attn_out_bias: bool = False
    attn_sinks: bool = False

    def __post_init__(self):
        """Every value a reader hands over is checked here, once for both formats; failures are ConfigValueError."""
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "context_length"):
            _size(self, name)
        if self.num_heads % self.num_kv_heads:
            raise ConfigValueError("num_kv_heads", self.num_kv_heads,
                                   f"must divide num_heads ({self.num_heads})")
        if self.head_dim % 2:
            raise ConfigValueError("head_dim", self.head_dim, "must be even (RoPE rotates pairs)")
        _finite_positive(self, "norm_eps")
        _finite_positive(self, "rope_theta")
        for name in ("attn_softcap", "final_softcap", "query_pre_attn_scalar", "rope_local_theta", "swiglu_limit",
                     "swiglu_alpha"):
            if getattr(self, name) is not None:
                _finite_positive(self, name)
        for name in ("sliding_window", "rope_dim", "num_experts", "experts_per_token", "expert_intermediate_size"):
            if getattr(self, name) is not None:
                _size(self, name)
        moe = self.architecture in MOE_ARCHITECTURES
        if moe and (self.num_experts is None or self.experts_per_token is None):
            raise ConfigValueError("num_experts", self.num_experts,
                                   f"and experts_per_token ({self.experts_per_token}) must be given for {self.architecture}")
        if not moe and (self.num_experts is not None or self.experts_per_token is not None):
            raise ConfigValueError("num_experts", self.num_experts, f"is for {', '.join(MOE_ARCHITECTURES)} only")
        if moe and self.experts_per_token > self.num_experts:
            raise ConfigValueError("experts_per_token", self.experts_per_token,
                                   f"must be at most num_experts ({self.num_experts})")
        for name in ("norm_topk_prob", "moe_bias", "attn_out_bias", "attn_sinks"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigValueError(name, getattr(self, name), "must be true or false")
        if self.moe_router not in MOE_ROUTERS:
            raise ConfigValueError("moe_router", self.moe_router, f"must be one of {', '.join(MOE_ROUTERS)}")
        if (self.swiglu_limit is None) != (self.swiglu_alpha is None) or (
                self.architecture == "gptoss" and self.swiglu_limit is None):
            raise ConfigValueError("swiglu_limit", self.swiglu_limit,
                                   f"and swiglu_alpha ({self.swiglu_alpha}) must be given together (gptoss: both)")
        if self.rope_dim is not None and (self.rope_dim % 2 or self.rope_dim > self.head_dim):
            raise ConfigValueError("rope_dim", self.rope_dim, f"must be even and at most head_dim ({self.head_dim})")
        if self.layer_types is not None:
            types = self.layer_types
            if (isinstance(types, (str, bytes)) or not isinstance(types, (tuple, list))
                    or len(types) != self.num_layers or any(t not in LAYER_TYPES for t in types)):
                raise ConfigValueError("layer_types", types, f"must list {self.num_layers} of {', '.join(LAYER_TYPES)}")
            object.__setattr__(self, "layer_types", tuple(types))
        s = self.rope_scaling
        if s is not None and s.kind == "longrope" and len(s.short_factor) * 2 != self.rotary_dim:
            raise ConfigValueError("rope_scaling.short_factor", s.short_factor,
                                   f"must have rotary dimensions / 2 = {self.rotary_dim // 2} entries")
        # token ids index the embedding: one past it would read a clamped row (BOS) or never match (EOS)
        for name, ids in (("bos_token_id", () if self.bos_token_id is None else (self.bos_token_id,)),
                          ("eos_token_ids", self.eos_token_ids)):
            for i in ids:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size:
                    raise ConfigValueError(name, i, f"must be a token id in 0..{self.vocab_size - 1}")

    @property
    def rotary_dim(self) -> int:
        return self.head_dim if self.rope_dim is None else self.rope_dim

    @property
    def attn_scale(self) -> float:
        """The attention logits' scale: query_pre_attn_scalar ** -0.5 where given, else head_dim ** -0.5."""
        return (self.head_dim if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar) ** -0.5

    def layer_type(self, layer: int) -> str:
        """"sliding_attention" or "full_attention": layer_types' entry, or for every layer "sliding_attention"
        when the config has a sliding window and no layer_types."""
        if self.layer_types is not None:
            return self.layer_types[layer]
        return "full_attention" if self.sliding_window is None else "sliding_attention"

    def sliding(self, layer: int) -> bool:
        """Whether layer `layer` attends within the sliding window."""
        return self.sliding_window is not None and self.layer_type(layer) == "sliding_attention"

    def window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, or None where it attends to the whole context."""
        return self.sliding_window if self.sliding(layer) else None

    @property
    def moe(self) -> bool:
        """Whether the MLPs are mixtures of experts."""
        return self.num_experts is not None

    @property
    def expert_ffn(self) -> int:
        """The width of each expert's gated MLP."""
        return self.expert_intermediate_size or self.intermediate_size

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
