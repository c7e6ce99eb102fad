"""Device run under Nsight Compute: launch one kernel of the decode/prefill path a few times so ncu
can read its counters. usage: ncu ... python scripts/device_ncu.py KIND   (KIND: q4k q8 q6k dense unpack)
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from realizar_jax.kernels.gemv import gemv  # noqa: E402
from realizar_jax.kernels.layout import GpuQTensor, repack_blocks  # noqa: E402
from realizar_jax.kernels.unpack import unpack  # noqa: E402
from realizar_jax.cli.synth import random_blocks  # noqa: E402

kind = sys.argv[1]
rng = np.random.default_rng(0)
qt = {"q4k": "Q4_K", "q8": "Q8_0", "q6k": "Q6_K", "unpack": "Q4_K"}.get(kind)
if qt:
    data = random_blocks(qt, 14336, 4096, rng)
    w = GpuQTensor(tuple(jnp.asarray(p) for p in repack_blocks(data, qt, (14336, 4096))), qt, (14336, 4096))
else:
    w = jnp.asarray(rng.standard_normal((14336, 4096)), jnp.bfloat16)
x = jnp.asarray(rng.standard_normal((1, 4096)), jnp.bfloat16)
f = jax.jit(lambda w: unpack(w)) if kind == "unpack" else jax.jit(lambda x, w: gemv(x, w))
for _ in range(4):
    jax.block_until_ready(f(w) if kind == "unpack" else f(x, w))
print("done", kind)
