"""The role-keyed weights pytree, and the builder that fills it from a validated ModelSource.

This is the one place that knows how a file's tensors become model weights: fused tensors are split,
GGUF's llama Q/K row permutation is undone (the model always uses HF's "halves" RoPE), quantized
tensors stay packed as QTensor, dense ones become arrays of the requested dtype. Model code sees roles only.
"""
from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .errors import MissingTensorError, ShapeMismatchError, UnsupportedQuantError
from .formats import ModelSource, TensorSource
from .quant.dequant import dequantize
from .quant.qtensor import QTensor
from .formats.roles import (FUSED, GGUF_QK_PERMUTED_ARCHS, NORM_ROLES, NORM_SHIFT, ROLES, expected_shape,
                            required_layer_roles, tensor_name)

DENSE_QTYPES = ("F32", "F16", "BF16")
PROGRESS_MIN_BYTES = 256 * 2**20  # progress=None shows a bar only for files at least this large


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LayerParams:
    attn_norm: jax.Array
    wq: jax.Array | QTensor
    wk: jax.Array | QTensor
    wv: jax.Array | QTensor
    wo: jax.Array | QTensor
    ffn_norm: jax.Array
    w_gate: jax.Array | QTensor | None = None   # the dense MLP (None in mixture-of-experts layers)
    w_up: jax.Array | QTensor | None = None
    w_down: jax.Array | QTensor | None = None
    bq: jax.Array | None = None
    bk: jax.Array | None = None
    bv: jax.Array | None = None
    q_norm: jax.Array | None = None
    k_norm: jax.Array | None = None
    post_attn_norm: jax.Array | None = None  # the norm of the attention's output (gemma, olmo2)
    post_ffn_norm: jax.Array | None = None  # the norm of the MLP's output
    # mixture of experts: the router [experts, hidden] and the stacked experts [experts, out, in] (dense
    # arrays, or QTensors of the file's packed blocks with the experts as their leading axis)
    router: jax.Array | QTensor | None = None
    experts_gate: jax.Array | QTensor | None = None
    experts_up: jax.Array | QTensor | None = None
    experts_down: jax.Array | QTensor | None = None
    # gpt-oss: the o projection's bias, a sink logit per head (float32 [heads]), the router's bias [experts]
    # and the experts' biases [experts, out] (all float32)
    bo: jax.Array | None = None
    attn_sinks: jax.Array | None = None
    router_bias: jax.Array | None = None
    experts_gate_bias: jax.Array | None = None
    experts_up_bias: jax.Array | None = None
    experts_down_bias: jax.Array | None = None


LAYER_FIELDS = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down", "bq", "bk", "bv",
                "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm", "router", "experts_gate", "experts_up",
                "experts_down", "bo", "attn_sinks", "router_bias", "experts_gate_bias", "experts_up_bias",
                "experts_down_bias")


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Params:
    embed: jax.Array | QTensor  # [vocab, hidden]
    layers: tuple[LayerParams, ...]
    final_norm: jax.Array
    lm_head: jax.Array | QTensor  # [vocab, hidden]; the embedding itself when tied
    rope_inv_freq: jax.Array  # float32 [rotary_dim // 2], scaling already applied
    rope_local_inv_freq: jax.Array | None = None  # the sliding layers' (Gemma 3: own base, unscaled)


def rope_inv_freq(config: ModelConfig, *, long: bool = False, local: bool = False) -> np.ndarray:
    """Inverse RoPE frequencies with the config's scaling (linear, llama3 or longrope), as HF computes them,
    over the rotated dimensions. long: longrope's long factors (a context beyond the original one).
    local: the sliding layers' frequencies (rope_local_theta, no scaling)."""
    d = config.rotary_dim
    theta = config.rope_local_theta if local else config.rope_theta
    inv = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    s = None if local else config.rope_scaling
    if s is None:
        return inv.astype(np.float32)
    if s.kind == "longrope":   # transformers: 1 / (ext_factors * base ** (arange / dim)), all float32
        base = np.float32(theta) ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d)
        return (np.float32(1.0) / (np.asarray(s.factors(long), np.float32) * base)).astype(np.float32)
    if s.kind == "linear":
        return (inv / s.factor).astype(np.float32)
    if s.kind == "yarn":
        return yarn_inv_freq(theta, d, s)
    if s.kind == "llama3":
        low_wavelen = s.original_context_length / s.low_freq_factor
        high_wavelen = s.original_context_length / s.high_freq_factor
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_context_length / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope scaling {s.kind!r}")


def yarn_inv_freq(theta: float, d: int, s) -> np.ndarray:
    """YaRN's inverse frequencies as transformers' _compute_yarn_parameters computes them in float32: the
    frequencies that turn fewer than beta_slow times over the original context are interpolated (divided by
    the factor), those turning more than beta_fast times kept, a linear ramp over the dimensions between."""
    f32 = np.float32
    pos = f32(theta) ** (np.arange(0, d, 2, dtype=np.int64).astype(f32) / f32(d))
    extrapolation, interpolation = f32(1.0) / pos, f32(1.0) / (f32(s.factor) * pos)

    def dim_of(rotations):   # the dimension that turns `rotations` times over the original context
        return d * math.log(s.original_context_length / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001   # transformers: "prevent singularity"
    ramp = np.clip((np.arange(d // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1).astype(f32)
    keep = f32(1.0) - ramp   # the extrapolated share
    return (interpolation * (f32(1.0) - keep) + extrapolation * keep).astype(f32)


def _unpermute_rows(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert permutation: per head, GGUF row (j, half) holds HF row (half, j)."""
    per_head = rows.shape[0] // n_heads
    tail = rows.shape[1:]
    return rows.reshape(n_heads, per_head // 2, 2, *tail).swapaxes(1, 2).reshape(rows.shape)


class _Reader:
    """Fetches role tensors from a source as numpy arrays (memmapped until converted)."""

    def __init__(self, source: ModelSource):
        self.source = source
        self.fmt = source.format

    def get(self, role: str, layer: int | None) -> TensorSource | None:
        name = tensor_name(role, self.fmt, layer, self.source.config.architecture)
        return None if name is None else self.source.tensors.get(name)

    def rows_of(self, role: str, layer: int | None) -> tuple[np.ndarray, str] | None:
        """(data, qtype) of a role, splitting a fused tensor when the separate one is absent."""
        t = self.get(role, layer)
        if t is not None:
            return t.data, t.qtype
        for fused, parts in FUSED.items():
            if role in parts:
                f = self.get(fused, layer)
                if f is None:
                    continue
                sizes = [expected_shape(p, self.source.config)[0] for p in parts]
                start = sum(sizes[:parts.index(role)])
                return f.data[start:start + sizes[parts.index(role)]], f.qtype
        return None


def _progress_bar(source: ModelSource, progress: bool | None):
    """A tqdm bar over the file's tensor bytes on stderr: reading a large file from disk is the slow part."""
    from tqdm import tqdm
    total = sum(t.nbytes for t in source.tensors.values())
    show = total >= PROGRESS_MIN_BYTES if progress is None else bool(progress)
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"loading {source.path.name}",
                file=sys.stderr, disable=not show)


def build_params(source: ModelSource, dtype=jnp.bfloat16, *, transform_matrix=None, transform_experts=None,
                 progress: bool | None = None, max_seq_len: int | None = None) -> Params:
    """Turn a validated ModelSource into a Params pytree on the default device.

    transform_matrix: optional callable (QTensor -> leaf) applied to each packed weight, e.g. a GPU repack.
    transform_experts: the same for packed expert stacks (QTensors [experts, out, in]), e.g. `dequantizer`;
    None keeps them packed (the GPU layout has no expert axis, so a GPU repack does not apply to them).
    progress: show a progress bar on stderr (True/False); None shows it when the tensors total >= 256 MiB.
    max_seq_len: the context the model is loaded for. longrope (Phi-3) uses its long factors when it exceeds
    the original context, its short ones otherwise (as llama.cpp picks them by the context size); None: short.
    """
    with _progress_bar(source, progress) as bar:
        params = _build_params(source, dtype, transform_matrix, bar, max_seq_len, transform_experts)
        bar.update(bar.total - bar.n)  # 1-D and unused tensors were not counted one by one
    return params


def _build_params(source: ModelSource, dtype, transform_matrix, bar, max_seq_len=None,
                  transform_experts=None) -> Params:
    config = source.config
    reader = _Reader(source)
    dtype = jnp.dtype(dtype)
    missing: list[str] = []
    permute = source.format == "gguf" and config.architecture in GGUF_QK_PERMUTED_ARCHS
    shift = NORM_SHIFT.get(config.architecture, 0.0) if source.format == "hf" else 0.0

    def leaf(role: str, layer: int | None, optional: bool = False):
        out = _leaf(role, layer, optional)
        found = reader.rows_of(role, layer)
        if found is not None:
            bar.update(found[0].nbytes)
        return out

    def _leaf(role: str, layer: int | None, optional: bool = False):
        found = reader.rows_of(role, layer)
        name = tensor_name(role, source.format, layer, config.architecture) or role
        if found is None:
            if not optional:
                missing.append(name)
            return None
        data, qtype = found
        want = expected_shape(role, config)
        if permute and role in ("wq", "wk", "bq", "bk"):
            data = _unpermute_rows(np.asarray(data), config.num_heads if role in ("wq", "bq") else config.num_kv_heads)
        if ROLES[role].kind == "vector":   # 1-D, or one vector per expert [experts, n]
            arr = np.asarray(data, dtype=np.float32)
            arr = arr.reshape(-1) if len(want) == 1 else arr
            if arr.shape != want:
                raise ShapeMismatchError(f"expected shape {want}, found {arr.shape}", path=source.path, tensor=name)
            if shift and role in NORM_ROLES:   # HF stores Gemma's norms as w for (1 + w): GGUF, and we, hold 1 + w
                arr = arr + np.float32(shift)
            return jnp.asarray(arr)
        if qtype in DENSE_QTYPES:
            arr = np.asarray(data)
            if arr.shape != want:
                raise ShapeMismatchError(f"expected shape {want}, found {arr.shape}", path=source.path, tensor=name)
            return dense_to_device(arr, dtype)
        from .quant.types import row_bytes
        try:
            nbytes = row_bytes(qtype, want[-1])
        except (KeyError, ValueError) as exc:
            raise UnsupportedQuantError(str(exc), path=source.path, tensor=name) from None
        # quantize on load (formats/quantized.py) may hand over blocks already made on the device
        packed = data.packed() if hasattr(data, "packed") else np.ascontiguousarray(np.asarray(data, dtype=np.uint8))
        rows = int(np.prod(want[:-1]))
        if packed.shape != (rows, nbytes):
            raise ShapeMismatchError(f"expected {want} in {qtype} ({rows} rows of {nbytes} bytes), found "
                                     f"{packed.shape[0]} rows of {packed.shape[1]} bytes", path=source.path, tensor=name)
        q = QTensor(jnp.asarray(packed.reshape(*want[:-1], nbytes)), qtype, want)
        transform = transform_experts if ROLES[role].kind == "experts" else transform_matrix
        return transform(q) if transform is not None else q

    embed = leaf("embed", None)
    lm_head = embed if config.tie_embeddings else leaf("lm_head", None)
    final_norm = leaf("final_norm", None)
    layers = []
    needed = set(required_layer_roles(config))
    for i in range(config.num_layers):
        fields = {r: leaf(r, i, optional=r not in needed) for r in LAYER_FIELDS}
        if not config.qkv_bias:
            fields.update(bq=None, bk=None, bv=None)
        if not config.qk_norm:
            fields.update(q_norm=None, k_norm=None)
        layers.append(LayerParams(**fields))
    if missing:
        raise MissingTensorError(f"{len(missing)} required tensor(s) missing, first: {', '.join(missing[:5])}",
                                 path=source.path)
    s = config.rope_scaling
    inv = rope_inv_freq(config, long=s is not None and s.kind == "longrope" and max_seq_len is not None
                        and max_seq_len > s.original_context_length)
    freqs = reader.get("rope_freqs", None)
    if freqs is not None:  # llama3 scaling stored as per-frequency divisors (llama.cpp's rope_freqs.weight)
        factors = np.asarray(freqs.data, dtype=np.float32).reshape(-1)
        if factors.shape != inv.shape:
            raise ShapeMismatchError(f"expected shape {inv.shape}, found {factors.shape}", path=source.path,
                                     tensor=freqs.name)
        inv = rope_inv_freq(config.replace(rope_scaling=None)) / factors
    local = None if config.rope_local_theta is None else jnp.asarray(rope_inv_freq(config, local=True))
    return Params(embed=embed, layers=tuple(layers), final_norm=final_norm, lm_head=lm_head,
                  rope_inv_freq=jnp.asarray(inv, dtype=jnp.float32), rope_local_inv_freq=local)


DENSE_CHUNK_BYTES = 64 * 2**20   # host bytes uploaded per step when a dense matrix is converted on the device


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(out: jax.Array, rows: jax.Array, start) -> jax.Array:
    return jax.lax.dynamic_update_slice(out, rows.astype(out.dtype), (start,) + (0,) * (out.ndim - 1))


def dense_to_device(arr: np.ndarray, dtype) -> jax.Array:
    """A host (often memory-mapped) array as a device array of `dtype`, converted on the device a chunk of
    rows at a time into one donated buffer: host memory holds a chunk beside the output, where
    jnp.asarray(arr.astype(dtype)) held up to three whole copies (ml_dtypes' f16 -> bf16 goes through
    float32, and jnp.asarray copied a bfloat16 array twice: 4.3 GB for a 1 GiB embedding)."""
    dtype = jnp.dtype(dtype)
    step = max(1, DENSE_CHUNK_BYTES // max(1, arr[:1].nbytes)) if arr.ndim else 1
    if arr.ndim < 1 or arr.shape[0] <= step:
        return jax.device_put(arr).astype(dtype)
    out = jnp.zeros(arr.shape, dtype)
    for a in range(0, arr.shape[0], step):
        a = min(a, arr.shape[0] - step)   # the last chunk rewrites a few rows: one chunk shape per tensor
        out = _write_rows(out, jax.device_put(arr[a:a + step]), a)
        out.block_until_ready()   # else every chunk's upload is queued at once, each a host copy
    return out


_dequantize = jax.jit(dequantize, static_argnames="dtype")   # one compile per (qtype, shape, dtype) per process


def dequantizer(dtype):
    """A transform_matrix for build_params that dequantizes each packed matrix once, to a dense array
    of `dtype` (load(dense_weights=True)): the ops take either form and compute the same values."""
    dtype = jnp.dtype(dtype)
    return lambda q: _dequantize(q, dtype=dtype)


def param_bytes(params: Params) -> int:
    """Device bytes held by the weights (a tied LM head counted once)."""
    seen, total = set(), 0
    for x in jax.tree_util.tree_leaves(params):
        if id(x) not in seen:
            seen.add(id(x))
            total += int(x.nbytes)
    return total
