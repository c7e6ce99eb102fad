"""The frozen, hashable model config. jit specializes on it, so it holds only static facts.

Built from GGUF metadata (formats.gguf_file) or an HF config.json (formats.hf_dir); both land here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
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


def _size(obj, field: str, prefix: str = "") -> None:
    value = getattr(obj, field)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIZE:
        raise ConfigValueError(prefix + field, value, f"must be an integer in 1..{MAX_SIZE}")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. kind: 'linear' or 'llama3' (Llama 3.1+ wavelength-dependent scaling)."""

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context_length: int = 8192

    def __post_init__(self):
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            _finite_positive(self, name, "rope_scaling.")
        _size(self, "original_context_length", "rope_scaling.")
        if self.kind == "llama3" and not self.low_freq_factor < self.high_freq_factor:
            raise ConfigValueError("rope_scaling.high_freq_factor", self.high_freq_factor,
                                   f"must be greater than low_freq_factor ({self.low_freq_factor})")


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
    qk_norm: bool = False  # qwen3: per-head RMSNorm on q and k before RoPE
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    add_bos: bool = True

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
        # token ids index the embedding: one past it would read a clamped row (BOS) or never match (EOS)
        for name, ids in (("bos_token_id", () if self.bos_token_id is None else (self.bos_token_id,)),
                          ("eos_token_ids", self.eos_token_ids)):
            for i in ids:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size:
                    raise ConfigValueError(name, i, f"must be a token id in 0..{self.vocab_size - 1}")

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
