"""How much device memory a loaded model needs, and a clear refusal when it will not fit.

weights (as packed on the device: quantized tensors keep their blocks) + KV cache + workspace.
The workspace is an estimate of the largest transient buffers of one prefill chunk: float32
activations, attention scores against the whole cache, and the logits of the chunk.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import ml_dtypes
import numpy as np

from .config import ModelConfig
from .errors import InsufficientMemoryError
from .quant.types import qtype_info

DEFAULT_PREFILL_CHUNK = 512
GIB = 1024 ** 3
# load(dense_weights=None) on a CPU dequantizes the packed matrices once when the dense form stays
# under both limits (XLA's CPU dot reads a dense matrix faster than it expands a packed one each step)
DENSE_WEIGHTS_MAX_BYTES = 2 * GIB
DENSE_WEIGHTS_MAX_FRACTION = 0.25   # of the memory free at load
# Average bits per weight of common GGUF files (llama.cpp's tables), for the "try a quantized file" hint.
BITS_PER_WEIGHT = {"Q8_0": 8.5, "Q6_K": 6.56, "Q4_K_M": 4.89}


def dtype_itemsize(dtype) -> int:
    """Bytes per element of a dtype given as a name ('bfloat16', 'float16', ...) or a numpy/jax dtype."""
    if isinstance(dtype, str):
        dtype = getattr(ml_dtypes, dtype, dtype)
    return int(np.dtype(dtype).itemsize)


def parameter_count(config: ModelConfig) -> int:
    """The model's weights: every role its architecture has (Gemma's four norms a layer, OLMo 2's q/k norms
    over the whole projection), every expert of a mixture (and its router), a tied LM head once. The cache of a sliding-window model stays full length
    (the window is a mask), so the KV estimate is the same for every family."""
    from .formats.roles import LAYER_NORMS
    c = config
    norms = len(LAYER_NORMS.get(c.architecture, ("attn_norm", "ffn_norm")))
    mlp = (c.num_experts * (3 * c.hidden_size * c.expert_ffn + c.hidden_size) if c.moe
           else 3 * c.hidden_size * c.intermediate_size)
    per_layer = c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size + mlp + norms * c.hidden_size
    if c.qkv_bias:
        per_layer += c.q_size + 2 * c.kv_size
    if c.attn_out_bias:
        per_layer += c.hidden_size
    if c.attn_sinks:
        per_layer += c.num_heads
    if c.moe_bias:   # the router's bias and each expert's gate, up and down biases
        per_layer += c.num_experts * (1 + 2 * c.expert_ffn + c.hidden_size)
    if c.qk_norm:
        per_layer += c.q_size + c.kv_size if c.architecture == "olmo2" else 2 * c.head_dim
    embed = c.vocab_size * c.hidden_size * (1 if c.tie_embeddings else 2)
    return embed + c.num_layers * per_layer + c.hidden_size


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    workspace: int
    max_seq_len: int
    batch: int
    kv_dtype: str
    parameters: int
    page_size: int = 16    # positions per KV page (the serving engine's pool)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace

    @property
    def kv_pages(self) -> int:
        """Pages of page_size positions that hold every sequence at max_seq_len."""
        return self.batch * -(-self.max_seq_len // self.page_size)

    @property
    def kv_page_bytes(self) -> int:
        return self.kv_cache // (self.batch * self.max_seq_len) * self.page_size

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes for one more position of every sequence in the batch."""
        return self.kv_cache // self.max_seq_len

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "kv_pages": self.kv_pages, "kv_page_bytes": self.kv_page_bytes}


def estimate_memory(config: ModelConfig, max_seq_len: int, batch: int = 1, kv_dtype="bfloat16",
                    weight_bytes: int | None = None, prefill_chunk: int | None = None,
                    page_size: int = 16) -> MemoryEstimate:
    """Device bytes to serve `batch` sequences of up to `max_seq_len` tokens (the KV cache also as
    pages of `page_size` positions: what the serving engine's pool holds).

    weight_bytes: the weights as packed on the device (see weight_bytes_of); default: every
    parameter in bfloat16. prefill_chunk: tokens prefilled at once (default min(max_seq_len, 512)).
    """
    if max_seq_len <= 0 or batch <= 0:
        raise ValueError(f"max_seq_len ({max_seq_len}) and batch ({batch}) must be positive")
    c = config
    params = parameter_count(c)
    if weight_bytes is None:
        weight_bytes = params * 2
    kv = 2 * c.num_layers * batch * max_seq_len * c.num_kv_heads * c.head_dim * dtype_itemsize(kv_dtype)
    t = min(max_seq_len, prefill_chunk or DEFAULT_PREFILL_CHUNK)
    ffn = c.experts_per_token * c.expert_ffn if c.moe else c.intermediate_size
    activations = batch * t * (2 * c.hidden_size + c.q_size + 2 * c.kv_size + 2 * ffn) * 4
    if c.moe:   # ops.moe: the gathered experts of a decode step (at most one layer's stack, float32) and the
        # grouped form's copy of the rows, sorted by expert and padded to whole blocks
        activations += 3 * c.num_experts * c.hidden_size * c.expert_ffn * 4
        activations += (batch * t * c.experts_per_token + c.num_experts * 64) * c.hidden_size * 4 * 2
    scores = batch * c.num_heads * t * max_seq_len * 4
    logits = batch * t * c.vocab_size * 4
    kv_name = kv_dtype if isinstance(kv_dtype, str) else np.dtype(kv_dtype).name
    return MemoryEstimate(weights=int(weight_bytes), kv_cache=kv, workspace=activations + scores + logits,
                          max_seq_len=max_seq_len, batch=batch, kv_dtype=kv_name, parameters=params,
                          page_size=page_size)


def weight_bytes_of(source, dense_dtype=None, dequantized: bool = False) -> int:
    """Bytes the source's tensors take on the device: quantized tensors as their packed blocks (or,
    dequantized=True, as load(dense_weights=True) holds them: dense in `dense_dtype`), dense ones in
    `dense_dtype` (default: as stored in the file)."""
    if dequantized and dense_dtype is None:
        raise ValueError("dequantized=True needs the dense_dtype the weights are expanded to")
    total = 0
    for t in source.tensors.values():
        if dense_dtype is not None and (dequantized or qtype_info(t.qtype).is_dense):
            total += int(np.prod(t.shape, dtype=np.int64)) * dtype_itemsize(dense_dtype)
        else:
            total += t.nbytes
    return total


def dense_weights_fit(dense_bytes: int, free_bytes: int | None) -> bool:
    """Whether weights of dense_bytes are small enough to hold dequantized (see DENSE_WEIGHTS_MAX_*);
    free_bytes None (unknown) checks the absolute limit only."""
    return dense_bytes <= DENSE_WEIGHTS_MAX_BYTES and (
        free_bytes is None or dense_bytes <= DENSE_WEIGHTS_MAX_FRACTION * free_bytes)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def check_fits(estimate: MemoryEstimate, free_bytes: int, path=None) -> None:
    """Raise InsufficientMemoryError, saying what to change, if `estimate` exceeds `free_bytes`."""
    e = estimate
    if e.total <= free_bytes:
        return
    what = f"{path}: " if path is not None else ""
    msg = (f"{what}model needs {_gib(e.total)} of device memory (weights {_gib(e.weights)}, KV cache "
           f"{_gib(e.kv_cache)} for max_seq_len={e.max_seq_len} batch={e.batch} {e.kv_dtype}: {e.kv_pages} pages "
           f"of {e.page_size} positions, workspace "
           f"{_gib(e.workspace)}) but only {_gib(free_bytes)} is free.")
    hints = []
    room = free_bytes - e.weights - e.workspace
    if room > 0 and e.kv_bytes_per_token > 0:
        seq = room // e.kv_bytes_per_token
        seq = (seq // 256) * 256 if seq >= 256 else seq
        if 0 < seq < e.max_seq_len:
            hints.append(f"a shorter context (max_seq_len={seq} would fit)")
        if e.batch > 1:
            b = room // (e.kv_bytes_per_token // e.batch * e.max_seq_len)
            if 0 < b < e.batch:
                hints.append(f"a smaller batch (batch={b} would fit)")
    smaller = [f"{q} ~{_gib(int(e.parameters * bits / 8))}" for q, bits in BITS_PER_WEIGHT.items()
               if e.parameters * bits / 8 < 0.9 * e.weights]   # only types that would save something
    if smaller:
        hints.append("a quantized file (" + ", ".join(smaller) + ")")
    if hints:
        msg += " Try " + ", or ".join(hints) + "."
    raise InsufficientMemoryError(msg)


def free_device_memory() -> int | None:
    """Bytes free on the default device, or None when the backend does not say (then: host RAM)."""
    import jax
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
