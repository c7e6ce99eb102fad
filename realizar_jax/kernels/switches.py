"""The GPU switches: environment variables that pick among kernel paths, read when a function is
traced (so set them before the first call, or call jax.clear_caches() after changing them).

The first value of each is the default: the configuration whose speed BENCHMARKS.md reports. The
others exist to be A/B-timed (`realizar-jax bench --ab NAME=VALUE`) before they become defaults.
REALIZAR_GEMV_TILES (JSON tile sizes) is read by kernels/gemv.py.
"""
from __future__ import annotations

import os

SWITCHES = {
    "REALIZAR_PREFILL_GEMM": ("unpack", "xla", "pallas"),   # prefill matmuls on packed weights
    # decode activations: int8 per scale group + dp4a (as llama.cpp's MMVQ; 8B Q4_K_M 236 -> 269 tok/s
    # alone, BENCHMARKS.md) or float32 (exact up to float rounding)
    "REALIZAR_GEMV_ACT": ("int8", "float"),
    # who prepares the int8 activations: "fused", one Pallas launch (kernels/xquant.py) that also
    # runs the RMSNorm or SwiGLU gate in front, with the per-group sums taken in the GEMV; "kernel",
    # XLA quantizes (natural layout) and the GEMV sums (8B Q4_K_M 327 vs 306 tok/s for "xla");
    # "xla", XLA quantizes, sums and lays the parts out (a transpose and a reduce per launch)
    "REALIZAR_GEMV_XPREP": ("fused", "kernel", "xla"),
    "REALIZAR_GEMV_FUSE": ("1", "0"),                      # Q/K/V and gate/up as one launch
    # decode matmuls on bf16/f16 weights: the Pallas GEMV or XLA's dot (8B bf16: 160 vs 155 tok/s)
    "REALIZAR_DENSE_GEMV": ("pallas", "xla"),
    "REALIZAR_ATTN_INPLACE": ("1", "0"),                   # decode attention reads the cache stack in place
    # the decode step's RoPE and KV-cache writes: inside the attention kernel, or XLA ops before it
    "REALIZAR_ATTN_UPDATE": ("kernel", "xla"),
    # the attention's split-K merge: inside the o projection's int8 activation prep (packed o weights;
    # dense ones merge in XLA), XLA ops, or inside the attention launch (its last split per kv head
    # merges, writing the o GEMV's int8s or the attention output). H200, 8B Q4_K_M, one process:
    # "kernel" 453.8 vs 447.8 tok/s (run 32; a first version looping over the splits: 435 vs 446,
    # run 31). One run, and none on a dense model at 8B: not the default yet (BENCHMARKS.md)
    "REALIZAR_ATTN_MERGE": ("prep", "xla", "kernel"),
    # the residual add after the o and down projections: inside the next RMSNorm's int8 prep, which
    # takes the GEMV's K-split partials as they are, or an XLA kernel (the partials' sum and the add)
    "REALIZAR_RESIDUAL_ADD": ("prep", "xla"),
    # the MLP's SwiGLU gate at decode: in the epilogue of the gate/up GEMV launch (which then writes
    # the down projection's int8 activations, or the bf16 activation for a dense down weight), or in
    # its own launch after it (the int8 prep; an XLA kernel for dense weights)
    "REALIZAR_SWIGLU": ("gemv", "prep"),
}


def check_switch(name: str, value: str) -> None:
    """ValueError naming the switch unless `value` is one of its values."""
    allowed = SWITCHES[name]
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def switch(name: str) -> str:
    """The switch's value from the environment, or its default."""
    value = os.environ.get(name, SWITCHES[name][0])
    check_switch(name, value)
    return value
