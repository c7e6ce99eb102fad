"""Quantization on the default JAX device: the encoders of encoders.py (the same code numpy runs on the
host, so the bytes are identical) jitted over fixed-size chunks of blocks.

A tensor is read, uploaded and encoded a chunk of rows at a time, so neither the host nor the device
ever holds more than a few chunks of float values beside the packed output. Every chunk of a large
tensor is padded to the chunk size (CHUNK_VALUES on a CPU, 4x that on an accelerator, where each
chunk's scale search costs ~25 kernel launches a trial whatever its size), so one compiled program
per type serves every large tensor; a tensor smaller than that is padded to a power of two of blocks.
The packed result stays on the device: the GPU repack reads it there, and the CPU path uses it where
it is.

XLA:CPU flushes subnormal floats to zero (GPUs keep them: xla_gpu_ftz is off by default), which numpy
does not. A block holding a group of 16 values whose largest magnitude is below TINY (but not zero)
can reach the subnormal range in the scale search (Q6_K's sums of x^6), so its rows are encoded again
by numpy on the host and written over the device's: rare in real weights, and then the bytes agree
on every backend. Above TINY a subnormal term can only be added to a sum 2^24 times larger, so it
cannot change a result.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .encoders import ENCODERS, JaxOps
from .quantize import check_values
from .types import qtype_info, row_bytes

CHUNK_VALUES = 1 << 22   # values per encoded chunk on a CPU (16 MiB of float32): bounds every temporary
TINY = np.float32(2.0 ** -20)
# Measured on a 2-core CPU (BENCHMARKS.md, "Quantize on load"): XLA:CPU runs the 32-value types faster
# than numpy, but the K-quants' scale search (a while loop of small fusions) slower.
_FASTER_ON_CPU = frozenset({"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"})


def faster_on_device(qtype: str, backend: str | None = None) -> bool:
    """Whether quantize_rows_on_device beats the numpy encoders for `qtype` on `backend` (default:
    JAX's). On an accelerator always, for the types it encodes (not encoders.HOST_ONLY): numpy makes
    ~3 M values/s of Q4_K, hours for an 8B model."""
    name = qtype_info(qtype).name
    return name in ENCODERS and ((backend or jax.default_backend()) != "cpu" or name in _FASTER_ON_CPU)


@functools.partial(jax.jit, static_argnames="qtype")
def _encode(x, zero, qtype: str):
    """float blocks [B, block_size] -> (uint8 [B, type_size], [bits of max |x|, tiny blocks], tiny mask [B]).

    The checks compare bits as integers: a backend that flushes subnormals would read them as zeros."""
    x = x.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32) & np.uint32(0x7FFFFFFF)   # |x|; NaN above inf
    group = bits.reshape(x.shape[0], -1, min(16, x.shape[1])).max(axis=-1)
    tiny = ((group > 0) & (group < TINY.view(np.uint32))).any(axis=-1)
    return ENCODERS[qtype](JaxOps(zero, x), x), jnp.stack([jnp.max(bits), tiny.sum(dtype=jnp.uint32)]), tiny


@functools.lru_cache(maxsize=None)
def _zero(device) -> jax.Array:
    return jax.device_put(np.zeros((), np.uint32), device)


def _bucket(blocks: int, cap: int) -> int:
    return cap if blocks >= cap else 1 << max(0, math.ceil(math.log2(max(blocks, 1))))


def quantize_rows_on_device(read: Callable[[int, int], np.ndarray], rows: int, cols: int, qtype: str,
                            device=None) -> jax.Array:
    """Quantize a [rows, cols] tensor whose rows a..b `read(a, b)` returns (any float dtype, host or
    device) -> uint8 [rows, row_bytes] on `device` (default: JAX's default device).

    Raises ValueError as quant.quantize does: an unknown type, a row length that is not a whole number
    of blocks, non-finite values, or values beyond the f16 range of a type that stores f16 fields.
    """
    q = qtype_info(qtype)
    if q.name not in ENCODERS:
        raise ValueError(f"cannot quantize to {q.name} on the device (can: {', '.join(ENCODERS)})")
    nbytes = row_bytes(q.name, cols)
    device = device or jax.devices()[0]
    bs = q.block_size
    chunk = CHUNK_VALUES if device.platform == "cpu" else 4 * CHUNK_VALUES
    cap = chunk // bs
    step = max(1, chunk // cols)                         # rows per chunk
    per_row = cols // bs
    out, stats, masks = [], [], []
    for a in range(0, rows, step):
        b = min(rows, a + step)
        nb = (b - a) * per_row
        size = _bucket(nb if rows * per_row >= cap else rows * per_row, cap)
        x = read(a, b)
        x = (x if isinstance(x, jax.Array) else np.asarray(x)).reshape(nb, bs)
        if size != nb:   # zero blocks: the device then sees one shape per type and bucket
            xp = jnp if isinstance(x, jax.Array) else np
            x = xp.concatenate([x, xp.zeros((size - nb, bs), x.dtype)])
        enc, st, tiny = _encode(jax.device_put(x, device), _zero(device), q.name)
        out.append(enc if size == nb else enc[:nb])
        stats.append(st)
        masks.append(tiny if size == nb else tiny[:nb])
    if not out:
        return jax.device_put(np.zeros((0, nbytes), np.uint8), device)
    amax, n_tiny = np.asarray(jnp.stack(stats)).max(axis=0)   # one read back per tensor
    check_values(float(amax.view(np.float32)), q.name)
    packed = (out[0] if len(out) == 1 else jnp.concatenate(out)).reshape(rows, nbytes)
    if n_tiny and q.block_size > 1:
        blocks = np.flatnonzero(np.concatenate([np.asarray(m) for m in masks]))
        redo = np.unique(blocks // per_row)
        values = np.concatenate([np.asarray(read(int(r), int(r) + 1), np.float32) for r in redo])
        packed = packed.at[jnp.asarray(redo)].set(jax.device_put(q.quantize(values.reshape(len(redo), cols)), device))
    return packed


def quantize_on_device(array, qtype: str, device=None) -> jax.Array:
    """quant.quantize on the device: float values [..., cols] -> uint8 [..., row_bytes], the same bytes."""
    shape = tuple(array.shape)
    if len(shape) < 1:
        raise ValueError("quantize needs at least one axis")
    cols, lead = shape[-1], shape[:-1]
    rows = math.prod(lead)
    x = array.reshape(rows, cols)
    out = quantize_rows_on_device(lambda a, b: x[a:b], rows, cols, qtype, device)
    return out.reshape(*lead, out.shape[-1])
